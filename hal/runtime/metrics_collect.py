"""The metric families of one controller, built from a snapshot at scrape time.

Runs in prometheus-client's server thread, on a snapshot the loop took (see
hal/runtime/metrics.py): the runtime's status() and copies of its recorder. Names follow
Prometheus conventions: base units (seconds, bytes), `_total` on counters
(prometheus-client adds it), every sample labelled with its controller and,
where it has one, its LUN. A figure a mode does not have is left out, not zero.
"""
from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from hal.runtime.metrics_names import LATENCY_BOUNDS_S, OPS

P = "twincache_"


class Collector:
    def __init__(self, server):
        self.server = server

    def collect(self):
        snap = self.server.snapshot()
        st, rec = snap["status"], snap["rec"]
        c = st.get("name", "")
        st = dict(st, link_up=snap["link_up"])
        yield from host_families(c, rec)
        yield from cache_families(c, st, rec, snap["block_size"])
        yield from link_families(c, st, rec)
        yield from resync_families(c, st, rec, snap["block_size"])
        yield from ownership_families(c, st)


def _histogram(h):
    buckets, total = [], 0
    for bound, n in zip(LATENCY_BOUNDS_S, h.counts):
        total += n
        buckets.append((repr(bound), total))
    buckets.append(("+Inf", total + h.counts[-1]))
    return buckets, h.sum_ns / 1e9


def host_families(c, rec):
    count = CounterMetricFamily(P + "host_requests", "NBD requests answered, by LUN and op",
                                labels=["controller", "lun", "op"])
    nbytes = CounterMetricFamily(P + "host_request_bytes", "Bytes the answered NBD requests covered "
                                 "(read/write: data moved; trim/zeroes/block_status: range; flush: 0)",
                                 labels=["controller", "lun", "op"])
    errors = CounterMetricFamily(P + "host_request_errors", "NBD requests answered with an error",
                                 labels=["controller", "lun", "op"])
    latency = HistogramMetricFamily(P + "host_request_duration_seconds", "From taking an NBD request off "
                                    "the connection to handing its reply to the socket",
                                    labels=["controller", "lun", "op"])
    for lun in range(rec.luns):
        for i, op in enumerate(OPS):
            k = lun * len(OPS) + i
            labels = [c, f"lun{lun}", op]
            count.add_metric(labels, rec.host_count[k])
            nbytes.add_metric(labels, rec.host_bytes[k])
            errors.add_metric(labels, rec.host_errors[k])
            buckets, total_s = _histogram(rec.host_latency[k])
            latency.add_metric(labels, buckets, total_s)
    mirror = HistogramMetricFamily(P + "mirror_round_trip_seconds", "From sending a host write's mirror "
                                   "frames to receiving the partner's acknowledgement",
                                   labels=["controller", "lun"])
    for lun in range(rec.luns):
        buckets, total_s = _histogram(rec.mirror_rtt[lun])
        mirror.add_metric([c, f"lun{lun}"], buckets, total_s)
    return [count, nbytes, errors, latency, mirror]


def cache_families(c, st, rec, block_size):
    out = []
    gauges = (("dirty_blocks", "cache_dirty_blocks", "Primary cache blocks holding data not yet on disk"),
              ("free_blocks", "cache_free_blocks", "Primary cache blocks free for host writes"),
              ("primary_blocks", "cache_blocks", "Primary cache blocks in all"),
              ("mirror_blocks", "mirror_blocks", "Mirror blocks holding the partner's writes"),
              ("mirror_free", "mirror_free_blocks", "Mirror blocks free"),
              ("destage_inflight", "destage_inflight", "Destage writes in flight"),
              ("pending_mirror_writes", "mirror_pending_writes", "Host writes waiting for the mirror ack"),
              ("nbd_clients", "nbd_clients", "NBD connections open"))
    for key, name, doc in gauges:
        if isinstance(st.get(key), int):
            out.append(_gauge(P + name, doc, c, st[key]))
    lun_dirty = GaugeMetricFamily(P + "lun_dirty_blocks", "Dirty cache blocks of the LUN",
                                  labels=["controller", "lun"])
    for lun, info in sorted((st.get("luns") or {}).items()):
        if "dirty_lines" in info:
            lun_dirty.add_metric([c, lun], info["dirty_lines"])
    out.append(lun_dirty)
    stats = st.get("stats") or {}
    counters = (("destaged", "destaged_lines", "Cache lines destaged to disk"),
                ("destage_errors", "destage_errors", "Destage writes that failed"),
                ("flush_errors", "disk_flush_errors", "Disk flushes that failed"),
                ("read_hits", "read_hits", "Host reads served wholly from the cache"))
    for key, name, doc in counters:
        if key in stats or key in ("destaged", "destage_errors"):
            out.append(_counter(P + name, doc, c, stats.get(key, 0)))
    out.append(_counter(P + "destaged_bytes", "Bytes of cache lines destaged to disk (lines x block size)",
                        c, stats.get("destaged", 0) * block_size))
    writes = CounterMetricFamily(P + "disk_writes", "Disk writes (destage, write-through, replay)",
                                 labels=["controller", "lun"])
    wbytes = CounterMetricFamily(P + "disk_write_bytes", "Bytes written to disk (destage, write-through, "
                                 "replay)", labels=["controller", "lun"])
    for lun in range(rec.luns):
        writes.add_metric([c, f"lun{lun}"], rec.disk_writes[lun])
        wbytes.add_metric([c, f"lun{lun}"], rec.disk_write_bytes[lun])
    return out + [writes, wbytes]


def link_families(c, st, rec):
    link = st.get("link", "")
    out = [_gauge(P + "link_up", "1 while an authenticated link session to the partner is up", c,
                  int(bool(st.get("link_up")))),
           _gauge(P + "link_mirrored", "1 while writes are mirrored (or shipped) to the partner", c,
                  int(link in ("mirrored", "shipping"))),
           _counter(P + "link_pings", "Round-trip pings sent to the partner for link_round_trip_seconds", c,
                    rec.pings)]
    state = GaugeMetricFamily(P + "link_state", "The link's state (1 on the current one)",
                              labels=["controller", "state"])
    state.add_metric([c, str(link)], 1)
    out.append(state)
    if rec.link_rtt_s is not None:
        out.append(_gauge(P + "link_round_trip_seconds", "The last control-lane ping's round trip", c,
                          rec.link_rtt_s))
    ls = st.get("link_stats") or {}
    for key in ("retransmits", "fast_retransmits", "frames_sent", "heartbeats_received"):
        if key in ls:
            out.append(_counter(P + "link_" + key, f"Link session {key.replace('_', ' ')}", c, ls[key]))
    refused = (("auth_failures", "Link frames refused because their MAC did not verify or was missing "
                "(forged or altered; enough of them end the session)"),
               ("auth_replays", "Link frames refused because their MAC counter was not new (replayed, "
                "duplicated or reordered)"))
    for key, doc in refused:
        if key in ls:
            out.append(_counter(P + "link_" + key, doc, c, ls[key]))
    return out


def resync_families(c, st, rec, block_size):
    remaining = GaugeMetricFamily(P + "resync_remaining_bytes", "Bytes the running resync still has to send "
                                  "(0 when none runs)", labels=["controller", "kind"])
    sent = CounterMetricFamily(P + "resync_bytes", "Bytes resyncs sent to the partner",
                               labels=["controller", "kind"])
    out = [remaining, sent]
    replica = st.get("replica")
    if replica is None and "resync" not in st:
        return []                   # the log variant: no resync (its gaps are in events and status)
    if replica is None:
        sync = st.get("resync") or {}
        remaining.add_metric([c, "ha"], sync.get("lines_remaining", 0) * block_size)
        sent.add_metric([c, "ha"], rec.resync_bytes["ha"])
        return out
    rs = replica.get("resync") or {}
    remaining.add_metric([c, "replica"], rs.get("remaining_bytes", 0))
    sent.add_metric([c, "replica"], rec.resync_bytes["replica"])
    out.append(_gauge(P + "resync_rate_bytes_per_second", "The running resync's average rate (0 when none runs)",
                      c, rs.get("rate_bytes_s", 0)))
    out.append(_gauge(P + "replica_out_of_sync_bytes", "Bytes of ranges copied to the peer and not destaged "
                      "there (what a resync would send)", c, replica.get("record_bytes", 0)))
    out.append(_gauge(P + "replica_peer_undestaged_bytes", "Bytes of ranges the peer copied here that it "
                      "has not destaged", c, replica.get("received_bytes", 0)))
    out.append(_gauge(P + "replica_primary", "1 on the primary", c, int(st.get("role") == "primary")))
    out.append(_gauge(P + "replica_split_brain", "1 in split brain", c, int(bool(replica.get("split_brain")))))
    state = GaugeMetricFamily(P + "replica_state", "The replica's sync state (1 on the current one)",
                              labels=["controller", "state"])
    state.add_metric([c, str(replica.get("state"))], 1)
    out.append(state)
    return out


def ownership_families(c, st):
    owned = GaugeMetricFamily(P + "lun_owned", "1 where this controller owns the LUN",
                              labels=["controller", "lun"])
    generation = GaugeMetricFamily(P + "lun_generation", "The LUN's ownership generation",
                                   labels=["controller", "lun"])
    state = GaugeMetricFamily(P + "lun_state", "The LUN's ownership state here (1 on the current one)",
                              labels=["controller", "lun", "state"])
    owned_luns = set(st.get("owned_luns") or ())
    luns = st.get("luns") or {}
    for lun in sorted(set(luns) | {e for e in (st.get("exports") or {}) if e.startswith("lun")}):
        owned.add_metric([c, lun], int(lun in owned_luns))
        info = luns.get(lun)
        if info:
            generation.add_metric([c, lun], info.get("generation", 0))
            state.add_metric([c, lun, str(info.get("state"))], 1)
    out = [owned, generation, state]
    if isinstance(st.get("generation"), int):
        out.append(_gauge(P + "generation", "The controller's generation (the highest of its LUNs')", c,
                          st["generation"]))
    return out


def _gauge(name, doc, c, value):
    g = GaugeMetricFamily(name, doc, labels=["controller"])
    g.add_metric([c], value)
    return g


def _counter(name, doc, c, value):
    m = CounterMetricFamily(name, doc, labels=["controller"])
    m.add_metric([c], value)
    return m
