"""Metrics of one controller in the Prometheus text format, served on a loopback HTTP port.

Two halves, one per thread. The event loop records into plain lists and ints
(`Recorder`): no locks, no label look-ups, one bisect per histogram sample, so
the data path pays a few hundred nanoseconds a request. The HTTP server is
prometheus-client's own (its thread); on a scrape its collector asks the loop
for a snapshot, which the loop takes at its next tick (every 10 ms): the
runtime's status() and copies of the recorder's lists. The server thread never
reads the firmware or the recorder itself, so nothing is read half-updated.

What is measured and where: host requests from the moment the runtime takes
them from the connection to the moment their reply is handed to the socket
(one clock read per received chunk and one per flushed client); mirror round
trips from the end of the loop turn that sent a write's mirror frames to the
receipt of the frames that acknowledged it; link round trip with a control-lane
ping each second. The firmware is only read (status()), never changed.
"""
from __future__ import annotations

import bisect
import ipaddress
import threading
import time

import hal.host.nbd as NBD
from hal.runtime.metrics_names import LATENCY_BOUNDS_S, OPS

OP_INDEX = {NBD.NBD_CMD_READ: 0, NBD.NBD_CMD_WRITE: 1, NBD.NBD_CMD_FLUSH: 2, NBD.NBD_CMD_TRIM: 3,
            NBD.NBD_CMD_WRITE_ZEROES: 4, NBD.NBD_CMD_BLOCK_STATUS: 5}
NOPS = len(OPS)
LATENCY_BOUNDS_NS = tuple(round(b * 1e9) for b in LATENCY_BOUNDS_S)
PING_INTERVAL_MS = 1000
PING_LOST_MS = 5000          # a ping unanswered this long is forgotten and another sent
SNAPSHOT_WAIT_S = 2.0        # a scrape waits this long for the loop; then it fails (HTTP 500)


class MetricsError(OSError):
    """The metrics server cannot start; the message says why and what to change."""


def parse_listen(value: str) -> tuple[str, int]:
    """"127.0.0.1:9520" or "[::1]:9520" -> (host, port); ValueError with the reason."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not host:port (like 127.0.0.1:9520; port 1 to 65535)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ValueError(f"{value!r} names no host (like 127.0.0.1:9520)")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False            # a name other than localhost may resolve anywhere


def url_of(listen: str) -> str:
    host, port = parse_listen(listen)
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/metrics"


class Histo:
    """Bucket counts (not cumulative) and a sum, in nanoseconds."""
    __slots__ = ("counts", "sum_ns")

    def __init__(self):
        self.counts = [0] * (len(LATENCY_BOUNDS_NS) + 1)
        self.sum_ns = 0

    def copy(self):
        h = Histo()
        h.counts, h.sum_ns = list(self.counts), self.sum_ns
        return h


class Recorder:
    """The loop thread's counters. Index host figures by lun * len(OPS) + op index."""

    def __init__(self, luns: int):
        n = luns * len(OPS)
        self.luns = luns
        self.host_count = [0] * n
        self.host_bytes = [0] * n
        self.host_errors = [0] * n
        self.host_latency = [Histo() for _ in range(n)]
        self.mirror_rtt = [Histo() for _ in range(luns)]
        self.disk_writes = [0] * luns
        self.disk_write_bytes = [0] * luns
        self.resync_bytes = {"ha": 0, "replica": 0}      # bytes sent by resyncs, all of them
        self.resync_seen = {"ha": 0, "replica": 0}       # of the running one, counted already
        self.link_rtt_s = None
        self.pings = 0
        self.pongs = 0

    def host_done(self, batch, now_ns):
        """Replies just handed to a socket: (lun, op, bytes, received_ns, error) each."""
        bounds, latency = LATENCY_BOUNDS_NS, self.host_latency
        count, nbytes_, errors = self.host_count, self.host_bytes, self.host_errors
        for lun, op, nbytes, t0, error in batch:
            k = lun * NOPS + OP_INDEX[op]
            dt = now_ns - t0
            count[k] += 1
            nbytes_[k] += nbytes
            h = latency[k]
            h.counts[bisect.bisect_left(bounds, dt)] += 1
            h.sum_ns += dt
            if error:
                errors[k] += 1

    def mirror_done(self, lun, dt_ns):
        h = self.mirror_rtt[lun]
        h.counts[bisect.bisect_left(LATENCY_BOUNDS_NS, dt_ns)] += 1
        h.sum_ns += dt_ns

    def resync_event(self, kind, fields, block_size):
        """Resync notifications the firmware emits: count bytes sent as they progress."""
        if kind == "resync_start":
            side = "ha" if "lines" in fields else "replica"
            if side == "ha" or fields.get("side") == "source":
                self.resync_seen[side] = 0
            return
        if "lines_transferred" in fields:
            self._resync_add("ha", fields["lines_transferred"] * block_size)
        elif fields.get("side", "source") == "source":
            done = fields.get("done_bytes", fields.get("bytes"))
            if isinstance(done, int):
                self._resync_add("replica", done)

    def _resync_add(self, side, done):
        seen = self.resync_seen[side]
        if done < seen:             # a new resync whose start we did not see
            seen = 0
        self.resync_bytes[side] += done - seen
        self.resync_seen[side] = done

    def copy(self):
        r = Recorder(0)
        r.luns = self.luns
        for name in ("host_count", "host_bytes", "host_errors", "disk_writes", "disk_write_bytes"):
            setattr(r, name, list(getattr(self, name)))
        r.host_latency = [h.copy() for h in self.host_latency]
        r.mirror_rtt = [h.copy() for h in self.mirror_rtt]
        r.resync_bytes = dict(self.resync_bytes)
        r.link_rtt_s, r.pings, r.pongs = self.link_rtt_s, self.pings, self.pongs
        return r


class MetricsServer:
    """The HTTP endpoint and the loop's side of the snapshot hand-over."""

    def __init__(self, runtime, listen: str, luns: int):
        self.runtime = runtime
        self.listen = listen
        self.url = url_of(listen)
        self.rec = Recorder(luns)
        self.wanted = False                  # set by a scrape; the loop answers at its next tick
        self._snapshot = None
        self._ready = threading.Event()
        self._scrape_lock = threading.Lock()
        self.ping_tag = None                 # the link ping in flight: (tag, sent_ms)
        self.next_ping_ms = 0
        self.httpd = self._start(listen)

    def _start(self, listen):
        from prometheus_client import CollectorRegistry, start_http_server
        from hal.runtime.metrics_collect import Collector
        registry = CollectorRegistry(auto_describe=False)
        registry.register(Collector(self))
        host, port = parse_listen(listen)
        try:
            httpd, _thread = start_http_server(port, host, registry)
        except OSError as exc:
            if exc.errno == 98:              # EADDRINUSE
                raise MetricsError(exc.errno, f"[metrics] listen = \"{listen}\": the port is in use (another "
                                              f"controller or program listens there); choose a free port") from None
            raise MetricsError(exc.errno, f"[metrics] listen = \"{listen}\": cannot listen: {exc.strerror}") from None
        return httpd

    # -- the loop's side ---------------------------------------------------------

    def tick(self, now_ms):
        if self.wanted:
            self.wanted = False
            snap = {"status": self.runtime.status(), "rec": self.rec.copy(),
                    "link_up": self._link_up(),
                    "block_size": self.runtime.cfg.nvram.block_size_bytes}
            self._snapshot = snap
            self._ready.set()
        if now_ms >= self.next_ping_ms:
            self.next_ping_ms = now_ms + PING_INTERVAL_MS
            self._ping(now_ms)

    def _link_up(self):
        """The partner's link session is up; at a log destination, any source's."""
        feeds = getattr(self.runtime.ctrl, "feeds", None)
        if feeds is not None:
            return any(getattr(f.link, "up", False) for f in feeds)
        return self.runtime._link_session_up()

    def _ping(self, now_ms):
        """A control-lane round trip to the partner, like `twincache status` ping's, once a second."""
        rt = self.runtime
        ctrl = rt.ctrl
        if self.ping_tag is not None and now_ms - self.ping_tag[1] < PING_LOST_MS:
            return
        if not hasattr(ctrl, "ping") or not rt._link_session_up():
            self.ping_tag = None
            return
        tag = rt.control.next_tag            # one tag space with the control socket's pings
        rt.control.next_tag += 1
        self.ping_tag = (tag, now_ms)
        self.rec.pings += 1
        rt.execute(ctrl.ping(tag, time.monotonic_ns()))

    def pong(self, fields) -> bool:
        """True if the pong answers our ping (then it is ours, not the control socket's)."""
        if self.ping_tag is None or fields.get("tag") != self.ping_tag[0]:
            return False
        self.ping_tag = None
        self.rec.pongs += 1
        self.rec.link_rtt_s = (time.monotonic_ns() - fields["sent_ns"]) / 1e9
        return True

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- the scrape's side (prometheus-client's server thread) ---------------------

    def snapshot(self):
        with self._scrape_lock:
            self._ready.clear()
            self.wanted = True
            if not self._ready.wait(SNAPSHOT_WAIT_S):
                raise TimeoutError(f"the controller's loop did not answer within {SNAPSHOT_WAIT_S} s")
            return self._snapshot
