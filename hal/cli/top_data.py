"""What `twincache top` shows, read from a running pair: samples, rates, quantiles, recent events.

A sample of one controller is its status (the control socket, as `twincache
status` reads it) and, when [metrics] is on, its Prometheus counters (the
HTTP endpoint, as `twincache metrics` reads it). Rates are the differences
between two samples of the same process divided by the time between them;
p50/p99 come from the differences of the latency histogram's buckets, the way
Prometheus' histogram_quantile() reads them. A controller that does not
answer is a sample with `down` set, never an exception. Nothing here draws.
"""
from __future__ import annotations

import dataclasses
import heapq
import json
import math
import os
import time
import urllib.error
import urllib.request

from hal.runtime.control import request

NAMES = ("a", "b")
READ, WRITE = "read", "write"
EVENT_TAIL_BYTES = 64 << 10     # at start, read only this much of each events file (the recent end)


@dataclasses.dataclass
class Counters:
    """The Prometheus samples top uses, keyed by (lun, op); buckets cumulative by upper bound."""
    requests: dict = dataclasses.field(default_factory=dict)
    nbytes: dict = dataclasses.field(default_factory=dict)
    buckets: dict = dataclasses.field(default_factory=dict)     # (lun, op) -> {le: count}
    link_up: bool = False
    link_rtt_s: float | None = None


@dataclasses.dataclass
class Sample:
    name: str
    t_s: float                          # time.monotonic() when the counters were read
    status: dict | None = None          # None when down
    down: str | None = None             # "stopped" or "unreachable", with `error`
    error: str = ""
    counters: Counters | None = None    # None when metrics are off or did not answer
    metrics_error: str = ""
    link_rtt_s: float | None = None

    @property
    def pid(self):
        return (self.status or {}).get("pid")


@dataclasses.dataclass
class Rates:
    r_iops: float
    w_iops: float
    r_mbs: float
    w_mbs: float
    p50_s: float | None                 # over every request answered in the interval
    p99_s: float | None


def parse_counters(text: str) -> Counters:
    from prometheus_client.parser import text_string_to_metric_families
    c = Counters()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = s.labels
            key = (labels.get("lun"), labels.get("op"))
            if s.name == "twincache_host_requests_total":
                c.requests[key] = s.value
            elif s.name == "twincache_host_request_bytes_total":
                c.nbytes[key] = s.value
            elif s.name == "twincache_host_request_duration_seconds_bucket":
                c.buckets.setdefault(key, {})[float(labels["le"])] = s.value
            elif s.name == "twincache_link_up":
                c.link_up = s.value == 1
            elif s.name == "twincache_link_round_trip_seconds":
                c.link_rtt_s = s.value
    return c


def fetch_text(url: str, timeout_s: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as reply:
        return reply.read().decode()


def take_sample(pair, name: str, timeout_s: float) -> Sample:
    """One controller's status and counters; a controller that does not answer is marked down."""
    st = pair.status(name, timeout_s)
    if "pid" not in st:
        return Sample(name, time.monotonic(), down=st.get("state", "unreachable"), error=st.get("error", ""))
    sample = Sample(name, time.monotonic(), status=st)
    url = st.get("metrics_url")
    if url:
        try:
            sample.counters = parse_counters(fetch_text(url, timeout_s))
            sample.t_s = time.monotonic()
        except (urllib.error.URLError, OSError, ValueError) as exc:
            sample.metrics_error = f"{url}: {getattr(exc, 'reason', exc)}"
    if sample.counters is not None and sample.counters.link_up:
        sample.link_rtt_s = sample.counters.link_rtt_s          # the controller's own ping, each second
    if sample.link_rtt_s is None and st.get("link") in ("mirrored", "shipping"):
        sample.link_rtt_s = _ping(pair, name, timeout_s)        # metrics off, or no ping answered yet
    return sample


def _ping(pair, name, timeout_s):
    """The link round trip as the control socket measures it (`{"cmd": "ping"}`); None if it cannot."""
    try:
        answer = request(pair.control_path(name), {"cmd": "ping"}, timeout_s)
    except (OSError, ValueError):
        return None
    return answer["rtt_us"] / 1e6 if isinstance(answer.get("rtt_us"), (int, float)) else None


def quantile(q: float, cumulative: list) -> float | None:
    """histogram_quantile(q) over [(upper bound, cumulative count)], ascending, +Inf last.
    Linear within a bucket; a rank in the +Inf bucket reports the highest finite bound."""
    if not cumulative or cumulative[-1][1] <= 0:
        return None
    rank = q * cumulative[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in cumulative:
        if count >= rank and count > 0:
            if math.isinf(bound):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def rates(prev: Sample | None, cur: Sample, lun: str | None = None) -> Rates | None:
    """The rates between two samples of one controller process, for one LUN or all.
    None when there is nothing to compare: no earlier sample, no metrics, a restart."""
    if prev is None or prev.counters is None or cur.counters is None or prev.pid != cur.pid:
        return None
    dt_s = cur.t_s - prev.t_s
    if dt_s <= 0:
        return None
    a, b = prev.counters, cur.counters
    keys = [k for k in b.requests if lun is None or k[0] == lun]
    if any(b.requests[k] < a.requests.get(k, 0) for k in keys):
        return None                     # a counter went back: not the same process after all

    def delta(name, op):
        new, old = getattr(b, name), getattr(a, name)
        return sum(new.get(k, 0) - old.get(k, 0) for k in keys if k[1] == op)

    latency = _bucket_deltas(a.buckets, b.buckets, keys)
    return Rates(r_iops=delta("requests", READ) / dt_s, w_iops=delta("requests", WRITE) / dt_s,
                 r_mbs=delta("nbytes", READ) / dt_s / 1e6, w_mbs=delta("nbytes", WRITE) / dt_s / 1e6,
                 p50_s=quantile(0.5, latency), p99_s=quantile(0.99, latency))


def _bucket_deltas(before: dict, after: dict, keys) -> list:
    """The histograms of `keys`, summed, as the increase between two scrapes: [(le, count)]."""
    total = {}
    for k in keys:
        old = before.get(k, {})
        for le, count in after.get(k, {}).items():
            total[le] = total.get(le, 0) + count - old.get(le, 0)
    return sorted(total.items())


class EventTail:
    """The most recent events of both controllers, merged by time: the reading of `twincache
    events` (its EventFile), started near the end of each file and kept to the last `keep`."""

    def __init__(self, directory, keep: int):
        from hal.cli.controller import EventFile
        self.keep = keep
        self.files = []
        for name in NAMES:
            f = EventFile(os.path.join(directory, name, "events.jsonl"))
            f.offset = _line_start_near_end(f.path, EVENT_TAIL_BYTES)
            self.files.append(f)
        self.recent = []                # (ts, order, event) of the last `keep`, oldest first
        self.order = 0

    def poll(self) -> list:
        for f in self.files:
            for ts, _kind, line in f.read_new():
                self.order += 1
                self.recent.append((ts, self.order, line))
        self.recent = heapq.nlargest(self.keep, self.recent)[::-1] if self.keep else []
        return [json.loads(line) for _ts, _order, line in self.recent]


def _line_start_near_end(path, tail_bytes: int) -> int:
    """The offset of the first whole line in the last `tail_bytes` of the file (0 if shorter)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size <= tail_bytes:
                return 0
            f.seek(size - tail_bytes)
            skipped = f.readline()
            return size - tail_bytes + len(skipped)
    except FileNotFoundError:
        return 0
