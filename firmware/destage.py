"""Destage: writing dirty cache lines to disk, as the policy decides.

The policy (claims 5.5: when, and which lines first) is a part of its own,
firmware/destage_policy.py; here is what is urgent in ha mode (host writes
wait for free blocks, the link is down so lines are held in one NVRAM only,
ownership waits for the cache to empty, `idle_flush_ms` without host I/O, a
disk failing) and the carrying out. Each destaged line is announced to the partner with
flush-begin (its mirror copy is temporarily invalid, claims 5.12) and, once
the disk write is done, flush-done (the copy is clean and its block reusable,
claims 5.13, 5.14). Two versions of one line are never on their way to the
disk at once, so disk writes of a line land in order. Also the disk_done and
tick entry points, and the read completions they carry. A failed destage
write (or flush) goes back to the write-back queue; when its LUN is tried again,
how it is reported and when the LUN counts as degraded is firmware/diskhealth.py's.

Durability: a disk write that completed may still sit in the disk's volatile
write cache (the host page cache for a file, the drive's cache for a device),
lost at a power cut. Freeing an NVRAM copy is the point of no return, so a
destaged line, a write-through host write and a replayed mirror block wait for
a DiskFlush of their LUN issued after their write completed: only then are
the blocks freed, the host answered, or flush-done sent to the partner. One
flush per LUN is in flight at a time; everything whose write completed
meanwhile waits for the next one, so a destage round costs one flush, not
one per line (with batch_link_output the flushes go out once per loop turn).
"""
from . import actions as A
from .allocation import AllocOp
from .requests import ReadOp
from .cache import SECTOR_BYTES, dirty_runs
from .link import LinkProtocolError

EIO = 5


class DestageOp:
    """One disk write of adjacent lines (an extent), or of one partial line's dirty runs."""
    __slots__ = ("lines", "remaining", "error")

    def __init__(self, lines, remaining):
        self.lines = lines
        self.remaining = remaining
        self.error = 0


class FlushOp:
    """One disk flush of a LUN, and what waits for it: every write its waiters made completed
    before it was issued, so its success makes them durable."""
    __slots__ = ("lun", "waiters")

    def __init__(self, lun, waiters):
        self.lun = lun
        self.waiters = waiters


class ThroughOp:
    """A write-through host write (a LUN owned alone); FUA adds a disk flush."""
    __slots__ = ("req", "lun", "fua", "flushed")

    def __init__(self, req, lun, fua):
        self.req = req
        self.lun = lun
        self.fua = fua
        self.flushed = False



class DestageMixin:
    def _destage_urgent(self) -> bool:
        """Destage now, whatever the watermarks (firmware/destage_policy.py)?"""
        return bool(self.write_path.waiting) or not self.mirroring or self.ownership.wants_destage() or (
            self.now_ms - self.last_host_io_ms >= self.params.idle_flush_ms) or bool(self.disk_health.failing)

    def _destage_wanted(self) -> bool:
        return self.destage.wanted(self._destage_urgent())

    def _pump(self):
        """Start destage writes up to the in-flight bound: the extents the policy chooses
        (firmware/destage_policy.py), each one disk write, announced to the partner."""
        budget = self.params.destage_inflight_max - self.destage_inflight
        if budget <= 0 or not self._destage_wanted():
            return
        extents = self.destage.extents(budget, self.flushing_keys, self._may_write_disk)
        begins = self.flush_begin_refs if self.link.up else []
        for extent in extents:
            self._start_destage(extent)
            begins.extend([(line.block, line.seq) for line in extent])

    def _start_destage(self, extent):
        wbq, flushing = self.cache.wbq, self.flushing_keys
        self.destage_writing[extent[0].lun] += 1
        for line in extent:
            del wbq[line.key]
            line.flushing = True
            flushing[line.key] += 1
        self.destage_inflight += 1
        line = extent[0]
        base = line.lba * SECTOR_BYTES
        if len(extent) > 1 or line.bitmap == self.cache.full_bitmap:
            seg, first = self.primary, line.block
            if all(x.block == first + i for i, x in enumerate(extent)):
                data = seg.nv[seg.data_offset(first):seg.data_offset(first + len(extent))]
            else:       # blocks apart in NVRAM: one copy, still one disk write
                data = b"".join([seg.data(x.block) for x in extent])
            op = self._disk_op(DestageOp(extent, 1))
            self.out.append(A.DiskWrite(op, line.lun, base, data))
        else:
            runs = list(dirty_runs(line.bitmap, 0, self.cache.sectors_per_line))
            op = self._disk_op(DestageOp(extent, len(runs)))
            view = self.primary.data(line.block)
            for s, e in runs:
                a, b = s * SECTOR_BYTES, e * SECTOR_BYTES
                self.out.append(A.DiskWrite(op, line.lun, base + a, view[a:b]))
        self.stats["destage_started"] += len(extent)
        self.stats["destage_writes"] += 1

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
        elif kind is FlushOp:
            del self.disk_ops[op]
            self._flush_done(entry, error)
        elif kind is ThroughOp:
            self._through_done(op, entry, error)
        elif kind is ReadOp:
            del self.disk_ops[op]
            self.write_path.read_done(entry, error, data)
        elif kind is AllocOp:
            del self.disk_ops[op]
            self.allocation.disk_done(entry, error, data)
        elif self.ownership.disk_done(entry, error, data):
            del self.disk_ops[op]
        self._pump()
        if not self.params.batch_link_output:
            self._start_flushes()
        return self._take()

    def _destage_done(self, entry):
        """The extent's disk write completed: durable only once a flush of its LUN says so."""
        self.destage_inflight -= 1
        lun = entry.lines[0].lun
        left = self.destage_writing[lun] - 1
        if left:
            self.destage_writing[lun] = left
        else:
            del self.destage_writing[lun]
        if entry.error:
            for line in entry.lines:
                self._line_destaged(line, entry.error)
            return
        if self.buggify_on and self.buggify("destage_no_flush"):
            self._destage_durable(entry)        # a broken variant: free before the disk flushed
            return
        self._after_flush(entry.lines[0].lun, entry)

    def _destage_durable(self, entry):
        """The disk flushed the extent: the lines are clean, their NVRAM copies free.

        Lines are released last to first: the free stack then hands a sequential
        stream ascending blocks again, so its next extent is one NVRAM range."""
        flushing, cache, refs = self.flushing_keys, self.cache, self.flush_done_refs
        for line in reversed(entry.lines):
            line.flushing = False
            key = line.key
            left = flushing[key] - 1
            if left:
                flushing[key] = left
            else:
                del flushing[key]
            cache.remove_current(line)
            refs.append((line.block, line.seq))
            line.dead = True
            self._forget_older(line)
            self.write_path.maybe_free(line, drain=False)
        self.stats["destaged"] += len(entry.lines)
        if self.write_path.waiting:
            self.write_path.drain_waiting()

    def _forget_older(self, line):
        """The disk holds `line` durably: every older version of its key still in NVRAM is old
        data now, also one that waits for the write that replaced it (a mirror ack cut off by
        a link drop). Kept, it was the only version of its key left after the newer ones were
        destaged, and a restart replayed it over them (seed 910743 at 300 steps: write 2's line
        outlived writes 26 and 81, both destaged, and came back at a power cut)."""
        older = line.older
        while older is not None:
            # Past forgotten versions too: one superseded by a mirrored write is forgotten first,
            # and the version it had replaced may still wait (seed 961143 at 300 steps: write
            # 133's line, under a write cut off from its ack, outlived both newer versions).
            next_older = older.older
            if not older.forgotten:
                older.dead = True
                self.write_path.maybe_free(older, drain=False)
            older = next_older

    # -- disk flushes ---------------------------------------------------------

    def _after_flush(self, lun, waiter):
        """`waiter` (a DestageOp, ThroughOp or ReplayRound whose writes completed) waits for the
        next flush of `lun`; _start_flushes issues it."""
        self.flush_queue.setdefault(lun, []).append(waiter)
        if waiter.__class__ is DestageOp:
            self.flush_queue_lines[lun] += len(waiter.lines)
        else:
            self.flush_urgent.add(lun)

    def _start_flushes(self):
        """One DiskFlush per LUN with waiters and no flush in flight. While destage writes of the
        LUN are still going out, its lines wait for a batch (destage_flush_batch_bytes) instead:
        a flush per round of destage_inflight_max writes cost random-write destage more than
        half its throughput on file disks; a host write (write-through) or a replay round never
        waits for a batch."""
        queue, busy = self.flush_queue, self.flush_busy
        batch = self.destage_flush_batch_lines
        for lun in [lun for lun in queue if lun not in busy]:
            if (self.destage_writing[lun] and lun not in self.flush_urgent
                    and self.flush_queue_lines[lun] < batch):
                continue
            op = self._disk_op(FlushOp(lun, queue.pop(lun)))
            self.flush_queue_lines.pop(lun, None)
            self.flush_urgent.discard(lun)
            busy.add(lun)
            self.out.append(A.DiskFlush(op, lun))
            self.stats["disk_flushes"] += 1

    def _flush_done(self, entry, error):
        self.flush_busy.discard(entry.lun)
        if error:
            self.stats["flush_errors"] += 1
        elif entry.waiters:
            self.out.extend(self.disk_health.written(entry.lun, self.now_ms, self.cache))   # the disk works
        for w in entry.waiters:
            kind = w.__class__
            if kind is DestageOp:
                if error:
                    for line in w.lines:
                        self._line_destaged(line, error)
                else:
                    self._destage_durable(w)
            elif kind is ThroughOp:
                self._reply(w.req, EIO if error else 0)
            else:
                self.ownership.flush_done(w, error)

    def _flushing_lines(self):
        """Lines on their way to the disk: a destage write in flight, or done and waiting for
        the flush that makes it durable."""
        lines = []
        for e in self.disk_ops.values():
            kind = e.__class__
            if kind is DestageOp:
                lines.extend(e.lines)
            elif kind is FlushOp:
                lines.extend(line for w in e.waiters if w.__class__ is DestageOp for line in w.lines)
        for waiters in self.flush_queue.values():
            lines.extend(line for w in waiters if w.__class__ is DestageOp for line in w.lines)
        return lines

    def _line_destaged(self, line, error):
        line.flushing = False
        self.flushing_keys[line.key] -= 1
        if not self.flushing_keys[line.key]:
            del self.flushing_keys[line.key]
        if error:
            self.stats["destage_errors"] += 1
            self._disk_write_failed(line.lun, line.lba * SECTOR_BYTES, error)   # backoff, one report
            if line.current:
                self.disk_health.park(line)          # still dirty: try again after the backoff
            else:
                self.write_path.maybe_free(line)
            return
        self.stats["destaged"] += 1
        self.cache.remove_current(line)
        self.flush_done_refs.append((line.block, line.seq))
        line.dead = True
        self.write_path.maybe_free(line)

    def _write_through(self, req, lun, offset, data, fua):
        """A LUN owned alone (SOLO): on disk before the ack, nothing only in this NVRAM."""
        if self.on_serve is not None:
            self.on_serve("write_through", req, lun)
        op = self._disk_op(ThroughOp(req, lun, fua))
        self.out.append(A.DiskWrite(op, lun, offset, bytes(data)))
        self.stats["writes_through"] += 1

    def _through_done(self, op, entry, error):
        """A write-through host write is answered once a flush made it durable (FUA or not:
        with no NVRAM copy, the disk's cache is the only one)."""
        del self.disk_ops[op]
        if error:
            self._reply(entry.req, EIO)
        else:
            self._after_flush(entry.lun, entry)

    def _may_write_disk(self, lun) -> bool:
        """Destage only what ownership allows (an ha owner under a valid lease: a stale owner's
        lines are older data), and not while the LUN's disk backs off after failed writes
        (firmware/diskhealth.py)."""
        if self.disk_health.failing and not self.disk_health.may_write(lun, self.now_ms):
            return False
        return self.ownership.allows_disk(lun)

    def tick(self, now_ms):
        """Time passes: heartbeats, dead-peer detection, leases, idle destage."""
        self.now_ms = now_ms
        self.refs_due = True
        try:
            self.link.tick(now_ms)
        except LinkProtocolError as exc:    # the peer went silent
            self._link_failed(str(exc))
        self.ownership.tick()
        self._disk_health_tick()
        self._pump()
        self._start_flushes()
        return self._take()

    def set_time(self, now_ms):
        """The runtime says what time it is before handing over events (leases need it)."""
        self.now_ms = now_ms
