"""What the metrics measure, shared by the recorder in the loop (hal/runtime/metrics.py) and
the Prometheus collector (hal/runtime/metrics_collect.py), which the recorder loads only when
metrics are on."""

OPS = ("read", "write", "flush", "trim", "zeroes", "block_status")
# Upper bounds (seconds) of the latency buckets: 25 us (a cache hit over a unix socket) to 5 s
# (a takeover, a stalled disk); +Inf is implied.
LATENCY_BOUNDS_S = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3,
                    100e-3, 250e-3, 500e-3, 1.0, 2.5, 5.0)
