"""Disk health per LUN: retry backoff, coalesced error reports, and the degraded state.

Owns what the firmware does when a LUN's disk fails writes, after the arrays
people trust:

- Retries back off. After a failed destage (or replay) write or flush, the
  LUN's lines wait out of the write-back queue for `disk_retry_initial_ms`;
  then one of them, the one parked longest, goes to the disk as a probe.
  Every round that fails again doubles the wait, up to `disk_retry_max_ms`;
  the first write made durable (its flush succeeded) brings the wait back to
  the start and the parked lines back to the queue. So a dying disk gets one
  write a round, and a bad spot holds back only its own line. Other LUNs
  destage on meanwhile.
- Reports are coalesced. The first error of a burst is reported at once;
  after it, one `disk_error` per LUN per `disk_report_interval_ms` at most,
  carrying the count of failed line writes since the last report, the first
  and last byte offsets and the errno; and no more than
  REPORTS_PER_INTERVAL_MAX reports of all LUNs together per interval (the
  rest keep counting until the next). A failing disk costs a few events a
  second, never one per line per retry.
- A LUN whose destage writes have failed for `degraded_after_ms` without a
  single success goes `degraded` (event `lun_degraded`): the controller then
  answers its new host writes with EIO at once (every write needs free cache
  blocks, copy-on-write, and only a working disk frees them), fails the
  writes that waited for blocks on it, still serves reads, and keeps its
  dirty lines in NVRAM, retried with backoff. The first write made durable
  on it clears it (`lun_recovered`).
- Reservation-record I/O that fails is reported as what it is
  (`reservation_write_failed`, `reservation_read_failed`, coalesced the same
  way), and a takeover claim whose record write failed is not tried again
  before a backoff of its own (RECORD_RETRY_INITIAL_MS doubling to
  `disk_retry_max_ms`), instead of looping claim and abandon.

Rules: no clock, no I/O. Every call takes the firmware's `now_ms`; the
methods return the Notify actions to emit. `DiskHealth` is a part of the
controller with its own state (per LUN: the backoff, the reports, the lines
parked out of the write-back queue); destage tells it of each failed and
durable write, and the write path asks it whether a LUN is degraded. It
touches the cache only through the one it is handed, to put parked lines
back in the write-back queue.
"""
from . import actions as A

EIO = 5
REPORTS_PER_INTERVAL_MAX = 4     # disk_error + reservation_*_failed reports of all LUNs per interval
RECORD_RETRY_INITIAL_MS = 1000   # a failed claim write: the next claim waits at least this long
OK, FAILING, DEGRADED = "ok", "failing", "degraded"


class _Retry:
    """Exponential backoff of one kind of write on one LUN."""
    __slots__ = ("initial_ms", "max_ms", "delay_ms", "at_ms")

    def __init__(self, initial_ms, max_ms):
        assert 0 < initial_ms <= max_ms
        self.initial_ms = initial_ms
        self.max_ms = max_ms
        self.delay_ms = 0          # 0: no failure since the last success
        self.at_ms = 0             # no try before this

    def failed(self, now_ms):
        """A write failed. Writes started before the hold began fail in the same round and
        double nothing: only the first failure after the hold ended starts a longer one."""
        if now_ms >= self.at_ms:
            self.delay_ms = self.initial_ms if not self.delay_ms else min(2 * self.delay_ms, self.max_ms)
            self.at_ms = now_ms + self.delay_ms

    def ok(self):
        self.delay_ms = 0
        self.at_ms = 0


class _Burst:
    """Errors of one kind on one LUN not reported yet."""
    __slots__ = ("count", "first", "last", "errno", "reported_ms", "extra")

    def __init__(self):
        self.count = 0
        self.first = self.last = None
        self.errno = 0
        self.reported_ms = None
        self.extra = {}

    def add(self, where, errno, extra):
        if not self.count:
            self.first = where
        self.count += 1
        self.last = where
        self.errno = errno
        self.extra = extra

    def due(self, now_ms, interval_ms) -> bool:
        return bool(self.count) and (self.reported_ms is None or now_ms - self.reported_ms >= interval_ms)

    def take(self, now_ms) -> dict:
        fields = dict(count=self.count, errno=self.errno, **self.extra)
        if self.first is not None:
            fields.update(first_offset=self.first, last_offset=self.last)
        self.count = 0
        self.reported_ms = now_ms
        return fields


class LunHealth:
    __slots__ = ("lun", "state", "failing_since_ms", "errors", "retry", "burst",
                 "record_retry", "record_errno", "record_bursts", "parked")

    def __init__(self, lun, params):
        self.lun = lun
        self.state = OK
        self.failing_since_ms = None    # the first failed write with no success since
        self.errors = 0                 # failed line writes since then
        self.retry = _Retry(params.disk_retry_initial_ms, params.disk_retry_max_ms)
        self.burst = _Burst()
        self.record_retry = _Retry(min(RECORD_RETRY_INITIAL_MS, params.disk_retry_max_ms),
                                   params.disk_retry_max_ms)
        self.record_errno = 0           # the last record write failed with this (0: it landed)
        self.record_bursts = {"write": _Burst(), "read": _Burst()}
        self.parked = {}                # key -> Line: failed, out of the write-back queue until the retry


class DiskHealth:
    """Per-LUN error state of one controller's disks."""

    def __init__(self, luns, params):
        self.luns = [LunHealth(lun, params) for lun in range(luns)]
        self.degraded_after_ms = params.degraded_after_ms
        self.interval_ms = params.disk_report_interval_ms
        self.failing = set()            # LUNs with a failed write and no success since
        self.pending = set()            # LUNs with errors not reported yet
        self.window_ms = None           # the start of the current report interval
        self.window_reports = 0

    # -- data writes ----------------------------------------------------------

    def write_failed(self, lun, offset, errno, now_ms) -> list:
        h = self.luns[lun]
        if h.state == OK:
            h.state, h.failing_since_ms, h.errors = FAILING, now_ms, 0
            self.failing.add(lun)
        h.errors += 1
        h.retry.failed(now_ms)
        h.burst.add(offset, errno, {})
        return self._report(h, now_ms)

    def write_ok(self, lun, now_ms) -> list:
        """Writes to the LUN's data area were made durable (their flush succeeded): the disk
        works; the backoff starts over."""
        h = self.luns[lun]
        h.retry.ok()
        if h.state == OK:
            return []
        return self._clear(h, now_ms, "writes to the disk succeed again")

    def written(self, lun, now_ms, cache) -> list:
        """A destage write of the LUN was made durable: `write_ok`, and its parked lines go back
        to `cache`'s write-back queue."""
        h = self.luns[lun]
        if self.failing:
            out = self.write_ok(lun, now_ms)
        else:
            h.retry.ok()                # nothing failing: only the backoff starts over
            out = []
        if h.parked:
            self.unpark(lun, cache)
        return out

    # -- lines parked after a failed destage -------------------------------------------

    def park(self, line):
        """A line whose destage failed waits out of the write-back queue until its LUN's retry:
        left in it, every pump walked thousands of them to start nothing (3 ms a pump with a
        64 MiB NVRAM full of a failed disk's lines, at every tick, read and completion)."""
        self.luns[line.lun].parked[line.key] = line

    def unpark(self, lun, cache, probe=False):
        """Parked lines queue for destage again in `cache`, those still current (a newer
        version, or a line dropped meanwhile, is not written). A probe takes one line, the one
        parked longest: a failing disk gets one write a retry, not the whole cache, and a bad
        spot cannot hold the good lines of its extent back for good, since each probe that
        lands brings the rest back (and a probe that fails goes to the end of the line)."""
        h = self.luns[lun]
        wbq, lines = cache.wbq, cache.lines
        while h.parked:
            key = next(iter(h.parked))
            line = h.parked.pop(key)
            if line.current and not line.dead and lines.get(key) is line and key not in wbq:
                wbq[key] = line
                if probe:
                    return

    def probe_parked(self, now_ms, cache):
        """Each failing LUN whose retry is due sends one parked line to the disk (`unpark`)."""
        for lun in self.failing:
            if self.luns[lun].parked and self.may_write(lun, now_ms):
                self.unpark(lun, cache, probe=True)

    def may_write(self, lun, now_ms) -> bool:
        return now_ms >= self.luns[lun].retry.at_ms

    def retry_at_ms(self, lun) -> int:
        return self.luns[lun].retry.at_ms

    def degraded(self, lun) -> bool:
        return self.luns[lun].state == DEGRADED

    def any_degraded(self) -> bool:
        return any(self.luns[lun].state == DEGRADED for lun in self.failing)

    def forget(self, lun, now_ms, reason) -> list:
        """Nothing of the LUN is left here to write (ownership moved, lines dropped)."""
        h = self.luns[lun]
        h.retry.ok()
        return self._clear(h, now_ms, reason) if h.state != OK else []

    def _clear(self, h, now_ms, reason):
        """Errors not reported yet stay counted for the next report, within the rate. A run of
        failures shorter than a report interval ends quietly: a bad sector among good ones
        would otherwise say "recovered" at every retry."""
        failing_ms, out = now_ms - h.failing_since_ms, []
        if h.state == DEGRADED or failing_ms >= self.interval_ms:
            kind = "lun_recovered" if h.state == DEGRADED else "disk_recovered"
            out.append(A.Notify(kind, lun=h.lun, failing_ms=failing_ms, errors=h.errors, reason=reason))
        h.state, h.failing_since_ms, h.errors = OK, None, 0
        self.failing.discard(h.lun)
        return out

    # -- reservation records --------------------------------------------------

    def record_failed(self, lun, write, errno, now_ms, **what) -> list:
        h = self.luns[lun]
        io = "write" if write else "read"
        if write:
            h.record_errno = errno
            h.record_retry.failed(now_ms)
        h.record_bursts[io].add(None, errno, what)
        return self._report(h, now_ms)

    def record_written(self, lun):
        h = self.luns[lun]
        h.record_errno = 0
        h.record_retry.ok()

    def record_write_errno(self, lun) -> int:
        """The errno of the last record write, if it failed (0 if it landed)."""
        return self.luns[lun].record_errno

    def may_claim(self, lun, now_ms) -> bool:
        return now_ms >= self.luns[lun].record_retry.at_ms

    # -- time -----------------------------------------------------------------

    def tick(self, now_ms) -> tuple:
        """Reports due and LUNs degraded now: (notifications, newly degraded LUNs)."""
        out, degraded = [], []
        # Longest unreported first: with more LUNs failing than reports an interval allows,
        # each gets its turn.
        for h in sorted([self.luns[lun] for lun in self.failing | self.pending],
                        key=lambda h: (h.burst.reported_ms is not None, h.burst.reported_ms or 0, h.lun)):
            if h.state == FAILING and now_ms - h.failing_since_ms >= self.degraded_after_ms:
                h.state = DEGRADED
                degraded.append(h.lun)
                out.append(A.Notify("lun_degraded", lun=h.lun, failing_ms=now_ms - h.failing_since_ms,
                                    errors=h.errors, errno=h.burst.errno or EIO,
                                    retry_in_ms=max(0, h.retry.at_ms - now_ms)))
            if h.lun in self.pending:
                out.extend(self._report(h, now_ms))
        return out, degraded

    def _report(self, h, now_ms) -> list:
        if self.window_ms is None or now_ms - self.window_ms >= self.interval_ms:
            self.window_ms, self.window_reports = now_ms, 0
        out = []
        for kind, burst in (("disk_error", h.burst), ("reservation_write_failed", h.record_bursts["write"]),
                            ("reservation_read_failed", h.record_bursts["read"])):
            if self.window_reports < REPORTS_PER_INTERVAL_MAX and burst.due(now_ms, self.interval_ms):
                self.window_reports += 1
                fields = burst.take(now_ms)
                if kind == "disk_error":
                    fields.update(state=h.state, retry_in_ms=max(0, h.retry.at_ms - now_ms))
                    if h.failing_since_ms is not None:
                        fields["failing_ms"] = now_ms - h.failing_since_ms
                out.append(A.Notify(kind, lun=h.lun, **fields))
        if h.burst.count or h.record_bursts["write"].count or h.record_bursts["read"].count:
            self.pending.add(h.lun)
        else:
            self.pending.discard(h.lun)
        return out

    def status(self, now_ms) -> dict:
        """What `twincache status` shows per LUN."""
        st = {}
        for h in self.luns:
            entry = {"state": h.state}
            if h.state != OK:
                entry.update(failing_ms=now_ms - h.failing_since_ms, errors=h.errors,
                             retry_in_ms=max(0, h.retry.at_ms - now_ms))
            if h.record_errno:
                entry["record_write_errno"] = h.record_errno
            st[f"lun{h.lun}"] = entry
        return st
