"""Destage: writing dirty cache lines to disk, and the policy that decides when.

Owns the write-back policy (claims 5.5): destaging starts when the dirty
fraction of the primary segment passes the high watermark, when host writes
wait for free blocks, when the link is down (lines held in one NVRAM only are
written out eagerly), or after `idle_flush_ms` without host I/O; it stops
below the low watermark. Each destaged line is announced to the partner with
flush-begin (its mirror copy is temporarily invalid, claims 5.12) and, once
the disk write is done, flush-done (the copy is clean and its block reusable,
claims 5.13, 5.14). Two versions of one line are never on their way to the
disk at once, so disk writes of a line land in order. Also the disk_done and
tick entry points, and the read completions they carry.
"""
from . import actions as A
from .cache import SECTOR_BYTES, dirty_runs
from .formats import messages as M
from .link import LinkProtocolError

EIO = 5
DESTAGE_ERROR_PAUSE_MS = 200


class DestageOp:
    __slots__ = ("line", "remaining", "error")

    def __init__(self, line, remaining):
        self.line = line
        self.remaining = remaining
        self.error = 0


class ReplayOp:
    """Writing one of the partner's mirror blocks (or a line of ours held under its claim) to
    disk during a takeover."""
    __slots__ = ("lun", "index", "remaining", "error", "line")

    def __init__(self, lun, index, remaining, line=None):
        self.lun = lun
        self.index = index
        self.remaining = remaining
        self.error = 0
        self.line = line


class ThroughOp:
    """A write-through host write (a LUN owned alone); FUA adds a disk flush."""
    __slots__ = ("req", "lun", "fua", "flushed")

    def __init__(self, req, lun, fua):
        self.req = req
        self.lun = lun
        self.fua = fua
        self.flushed = False


class DestageMixin:
    def _destage_wanted(self) -> bool:
        cache, p = self.cache, self.params
        used = cache.used_blocks / cache.capacity
        urgent = bool(self.waiting) or not self.mirroring or self._fence_wants_destage() or (
            self.now_ms - self.last_host_io_ms >= p.idle_flush_ms)
        if urgent or used >= p.high_watermark:
            self.destaging = True
        elif used <= p.low_watermark:
            self.destaging = False
        return self.destaging and bool(cache.wbq) and self.now_ms >= self.destage_pause_until_ms

    def _pump(self):
        """Start destage writes up to the in-flight bound, oldest dirty lines first."""
        budget = self.params.destage_inflight_max - self.destage_inflight
        if budget <= 0 or not self._destage_wanted():
            return
        chosen = []
        flushing = self.flushing_keys
        for key, line in self.cache.wbq.items():     # oldest first; stop at the budget
            if len(chosen) == budget:
                break
            if key not in flushing and self.may_write_disk(line.lun):
                chosen.append(line)   # (a flushing key: an older version is still being written)
        begins = []
        for line in chosen:
            self._start_destage(line)
            begins.append((line.block, line.seq))
        if begins and self.link.up:
            self._send_refs(M.MsgType.FLUSH_BEGIN, begins)

    def _start_destage(self, line):
        del self.cache.wbq[line.key]
        line.flushing = True
        self.flushing_keys[line.key] += 1
        self.destage_inflight += 1
        runs = list(dirty_runs(line.bitmap, 0, self.cache.sectors_per_line))
        op = self._new_op()
        self.disk_ops[op] = DestageOp(line, len(runs))
        view = self.primary.data(line.block)
        base = line.lba * SECTOR_BYTES
        for s, e in runs:
            a, b = s * SECTOR_BYTES, e * SECTOR_BYTES
            self.out.append(A.DiskWrite(op, line.lun, base + a, view[a:b]))
        self.stats["destage_started"] += 1

    def disk_done(self, op, error=0, data=None):
        """A disk read or write finished; `error` is an errno (0 = success)."""
        entry = self.disk_ops.get(op)
        assert entry is not None, f"disk_done for unknown op {op}"
        kind = entry.__class__
        if kind is DestageOp:
            entry.error = entry.error or error
            entry.remaining -= 1
            if entry.remaining == 0:
                del self.disk_ops[op]
                self._destage_done(entry)
        elif kind is ThroughOp:
            self._through_done(op, entry, error)
        elif kind is ReplayOp:
            entry.error = entry.error or error
            entry.remaining -= 1
            if entry.remaining == 0:
                del self.disk_ops[op]
                self._replay_done(entry, entry.error)
        elif kind.__name__ == "RecordOp":
            del self.disk_ops[op]
            self._record_done(entry, error, data)
        else:
            del self.disk_ops[op]
            self._read_done(entry, error, data)
        self._pump()
        return self._take()

    def _destage_done(self, entry):
        line = entry.line
        line.flushing = False
        self.destage_inflight -= 1
        self.flushing_keys[line.key] -= 1
        if not self.flushing_keys[line.key]:
            del self.flushing_keys[line.key]
        if entry.error:
            self.stats["destage_errors"] += 1
            self.destage_pause_until_ms = self.now_ms + DESTAGE_ERROR_PAUSE_MS
            self.out.append(A.Notify("disk_error", lun=line.lun, lba=line.lba, errno=entry.error))
            if line.current:
                self.cache.wbq[line.key] = line      # still dirty: try again later
            else:
                self._maybe_free(line)
            return
        self.stats["destaged"] += 1
        self.cache.remove_current(line)
        self.flush_done_refs.append((line.block, line.seq))
        line.dead = True
        self._maybe_free(line)

    def _through_done(self, op, entry, error):
        if not error and entry.fua and not entry.flushed:
            entry.flushed = True
            self.out.append(A.DiskFlush(op, entry.lun))
            return
        del self.disk_ops[op]
        self._reply(entry.req, EIO if error else 0)

    def _read_done(self, entry, error, data):
        for line in entry.overlay:
            line.pins -= 1
        if error:
            self.stats["read_errors"] += 1
            self._reply(entry.req, EIO)
        else:
            buf = data if isinstance(data, bytearray) else bytearray(data)
            assert len(buf) == entry.length
            self._apply_overlay(buf, entry.overlay, entry.offset, entry.length)
            self._reply(entry.req, 0, buf)
        for line in entry.overlay:
            self._maybe_free(line)

    def _fence_wants_destage(self) -> bool:
        return self.fence is not None and any(f.state in ("fencing", "releasing") for f in self.fence)

    def tick(self, now_ms):
        """Time passes: heartbeats, dead-peer detection, leases, idle destage."""
        self.now_ms = now_ms
        try:
            self.link.tick(now_ms)
        except LinkProtocolError as exc:    # the peer went silent
            self._link_failed(str(exc))
        if self.fence is not None:
            self.fence_tick()
        self._pump()
        return self._take()

    def set_time(self, now_ms):
        """The runtime says what time it is before handing over events (leases need it)."""
        self.now_ms = now_ms
