"""Quick resync: the sync source resends only the recorded ranges (replica mode, variant 1).

Owns both ends of a resync. The target sends the ranges of its own SENT
record (what it wrote that the source may lack) as RESYNC_REQUEST messages,
closed by one with RESYNC_END_LUN. The source resends the union of that list
and its own SENT and RECEIVED records (everything in the target's list or
full sync: every range), in address order, each range read through its cache
over its disks, as REPLICATE messages flagged REPL_RESYNC; a bounded number
is in flight and a token bucket holds the rate to `resync_rate_bytes_s`.
The union is first ORed into the source's SENT record, so a crash of either
side mid-resync leaves every range still to send recorded. When every range
is acknowledged the source sends RESYNC_DONE and the target adopts its
current uuid.

A range written by a host while its resync read was in flight is read again:
the replicated host write is already on its way, and older data must not
follow it.

`QuickResync` is a part of the replica controller with its own state (the
running resync, the last one's figures, the ranges the target asked for, the
host writes per range). It is given the record, the link, the cache, the
write path and the replica settings at its start; what it asks of the controller through
`self.ctrl` is `ASKED_OF_THE_CONTROLLER` (tests/test_boundary.py holds it to
that list). The replica session table calls its `finish_source` and
`finish_target`.
"""
import collections

from .. import actions as A
from ..cache import LUN_SHIFT
from ..formats import frame as F
from ..formats import messages as M
from ..formats.nvram import crc32c
from .record import RECEIVED, SENT, runs

T = M.MsgType
RANGES_PER_REQUEST = 4096
PROGRESS_EVERY_MS = 500

# What the resync asks of the replica controller through `self.ctrl`, and nothing else.
ASKED_OF_THE_CONTROLLER = frozenset({
    # time, the action list, persisting NVRAM, counters, the protocol error to raise
    "now_ms", "out", "_persist", "stats", "Error",
    # the session table: its state, whether the handshake chose a full resync, its events
    "sync", "sync_full", "_fire",
    # the keys of lines being destaged
    "flushing_keys",
})


class ResyncRead:
    """A resync read of one range through the cache (answered through _reply)."""
    __slots__ = ("resync", "lun", "r", "epoch")

    def __init__(self, resync, lun, r, epoch):
        self.resync = resync
        self.lun = lun
        self.r = r
        self.epoch = epoch


class Resync:
    """The source's progress through one resync."""

    def __init__(self, todo, total_bytes, now_ms, full):
        self.todo = todo                # [(lun, r)], sorted; consumed from the front
        self.next = 0
        self.inflight = {}              # resync seq -> (lun, r, bytes)
        self.reading = 0
        self.next_seq = 1
        self.total_bytes = total_bytes
        self.done_bytes = 0
        self.done_ranges = 0
        self.started_ms = now_ms
        self.progress_ms = now_ms
        self.tokens = 0.0
        self.refill_ms = now_ms
        self.full = full
        self.unacked = set(todo)        # ranges whose resync data the target has not acknowledged

    def remaining_bytes(self):
        return self.total_bytes - self.done_bytes

    def rate_bytes_s(self, now_ms):
        elapsed = max(1, now_ms - self.started_ms)
        return round(self.done_bytes * 1000 / elapsed)

    def finished(self):
        return self.next == len(self.todo) and not self.inflight and not self.reading


class QuickResync:
    """Both ends of a quick resync (a part of ReplicaController)."""

    def __init__(self, ctrl, rec, link, cache, write_path, settings):
        self.ctrl = ctrl
        self.write_path = write_path    # reads go through the cache over the disks
        self.rec = rec                  # the SENT and RECEIVED records (firmware/replica/record.py)
        self.link = link
        self.cache = cache
        self.settings = settings        # the replica settings (rate, ranges in flight)
        self.running = None             # this source's Resync, while one runs
        self.last_run = None            # the last finished one's figures (status)
        self.peer_wants = set()         # (lun, r) the target asked for so far
        self.range_writes = collections.Counter()   # (lun, r) -> host writes so far (re-reads)

    # -- what the controller tells it ---------------------------------------------

    def host_wrote(self, lun, ranges):
        """A host write of these ranges of `lun` is in the cache: a resync read of them in
        flight is stale."""
        writes = self.range_writes
        for r in ranges:
            writes[(lun, r)] += 1

    def session_starts(self):
        """A new session chose this side as the source: the target's list comes next."""
        self.peer_wants = set()

    def session_ended(self):
        """The link went down: a running resync ends, the next session starts over."""
        self.running = None
        self.peer_wants = set()

    def unacked(self):
        """Ranges whose resync data the target has not acknowledged (never cleared from SENT)."""
        rs = self.running
        return rs.unacked if rs is not None else ()

    def tick(self):
        self.pump()
        self.progress()

    def status(self):
        """The running resync's figures, or None."""
        rs = self.running
        return self._status(rs) if rs is not None else None

    # -- target ---------------------------------------------------------------

    def send_request(self):
        """Tell the source which ranges this side wrote on its own (they get overwritten)."""
        rec = self.rec
        by_lun = {}
        for lun, r in rec.members(SENT):
            by_lun.setdefault(lun, []).append(r)
        rpb = rec.range_bytes // 512
        for lun, rs in sorted(by_lun.items()):
            pairs = runs(rs)
            for i in range(0, len(pairs), RANGES_PER_REQUEST):
                body = M.ResyncRequest.build(dict(
                    lun=lun, reserved0=0, generation=rec.current_uuid,
                    ranges=[dict(lba=r * rpb, sectors=n * rpb) for r, n in pairs[i:i + RANGES_PER_REQUEST]]))
                self.link.send(T.RESYNC_REQUEST, M.Resource.REPLICATION, body, lane=F.LANE_CONTROL)
        end = M.ResyncRequest.build(dict(lun=M.RESYNC_END_LUN, reserved0=0, generation=rec.current_uuid,
                                         ranges=[]))
        self.link.send(T.RESYNC_REQUEST, M.Resource.REPLICATION, end, lane=F.LANE_CONTROL)

    def on_done(self, msg):
        body = M.parse_body_untrusted(T.RESYNC_DONE, msg.payload, "RESYNC_DONE")
        self.ctrl._fire("resync_done", body)

    def finish_target(self, body):
        ctrl, rec = self.ctrl, self.rec
        history = (rec.current_uuid, rec.history0) if rec.current_uuid != body.current_uuid else (
            rec.history0, rec.history1)
        flags = rec.flags & ~(M.STATE_FRESH | M.STATE_INCONSISTENT | M.STATE_DISCARD)
        for r in rec.clear_all(SENT) + rec.update(current_uuid=body.current_uuid, bitmap_uuid=0, flags=flags,
                                                  history0=history[0], history1=history[1]):
            ctrl._persist(r)
        ctrl.out.append(A.Notify("resync_done", side="target", ranges=body.ranges, bytes=body.bytes,
                                 current_uuid=f"{body.current_uuid:016x}"))

    # -- source ---------------------------------------------------------------

    def on_request(self, msg):
        ctrl = self.ctrl
        body = M.parse_body_untrusted(T.RESYNC_REQUEST, msg.payload, "RESYNC_REQUEST")
        if ctrl.sync != "sync-source" or self.running is not None:
            raise ctrl.Error(f"RESYNC_REQUEST in state {ctrl.sync}")
        if body.lun == M.RESYNC_END_LUN:
            self._start_source()
            return
        rec, rpb = self.rec, self.rec.range_bytes // 512
        if body.lun >= len(rec.lun_ranges):
            raise ctrl.Error(f"RESYNC_REQUEST for LUN {body.lun}")
        for rng in body.ranges:
            if rng.lba % rpb or rng.sectors % rpb or rng.lba // rpb + rng.sectors // rpb > rec.lun_ranges[body.lun]:
                raise ctrl.Error(f"RESYNC_REQUEST range {rng.lba}+{rng.sectors} is not whole ranges of the LUN")
            first = rng.lba // rpb
            self.peer_wants.update((body.lun, r) for r in range(first, first + rng.sectors // rpb))

    def _start_source(self):
        ctrl, rec = self.ctrl, self.rec
        wanted = set(self.peer_wants) | set(rec.members(SENT)) | set(rec.members(RECEIVED))
        if ctrl.sync_full:
            wanted = {(lun, r) for lun, n in enumerate(rec.lun_ranges) for r in range(n)}
        self.peer_wants = set()
        for lun, r in wanted:
            for p in rec.set(SENT, lun, (r,)):
                ctrl._persist(p)
        todo = sorted(wanted)
        self.running = Resync(todo, rec.bytes_of(todo), ctrl.now_ms, ctrl.sync_full)
        ctrl.out.append(A.Notify("resync_start", side="source", ranges=len(todo), bytes=self.running.total_bytes,
                                 full=ctrl.sync_full, record_bits=rec.counts[SENT]))
        self.pump()

    def pump(self):
        rs = self.running
        if rs is None or self.ctrl.sync != "sync-source":
            return
        p = self.settings
        self._refill(rs)
        while rs.next < len(rs.todo) and len(rs.inflight) + rs.reading < p.resync_inflight_max:
            if p.resync_rate_bytes_s and rs.tokens < 0:
                break
            lun, r = rs.todo[rs.next]
            rs.next += 1
            rs.tokens -= self.rec.span(lun, r)[1]
            self._read_range(rs, lun, r)
        if rs.finished():
            self.ctrl._fire("resync_complete")

    def _refill(self, rs):
        rate, now_ms = self.settings.resync_rate_bytes_s, self.ctrl.now_ms
        if rate:
            rs.tokens = min(rs.tokens + (now_ms - rs.refill_ms) * rate / 1000,
                            max(rate / 10, self.rec.range_bytes))
        rs.refill_ms = now_ms

    def _read_range(self, rs, lun, r):
        rs.reading += 1
        offset, length = self.rec.span(lun, r)
        self.write_path.read(ResyncRead(rs, lun, r, self.range_writes[(lun, r)]), lun, offset, length)

    def read_done(self, req, error, data):
        """A resync read's answer (the controller's _reply hands it here)."""
        rs, ctrl = req.resync, self.ctrl
        if rs is not self.running or ctrl.sync != "sync-source":
            return                          # a resync that ended (link loss) meanwhile
        rs.reading -= 1
        if error:
            ctrl.out.append(A.Notify("resync_read_error", lun=req.lun, range=req.r, errno=error))
            rs.todo.append((req.lun, req.r))   # try it again at the end
            return
        if self.range_writes[(req.lun, req.r)] != req.epoch:
            ctrl.stats["resync_reread"] += 1
            self._read_range(rs, req.lun, req.r)
            return
        offset, length = self.rec.span(req.lun, req.r)
        seq = rs.next_seq
        rs.next_seq += 1
        rs.inflight[seq] = (req.lun, req.r, length)
        payload = bytes(data)
        head = M.REPLICATE_HEAD.pack(seq, req.lun, M.REPL_RESYNC, 0, offset, crc32c(payload), length)
        self.link.send(T.REPLICATE, M.Resource.REPLICATION, (head, payload))

    def acked(self, seq):
        """The target acknowledged resync range `seq`."""
        rs = self.running
        entry = rs.inflight.pop(seq, None) if rs is not None else None
        if entry is None:
            raise self.ctrl.Error(f"resync ack for unknown range {seq}")
        rs.unacked.discard(entry[:2])
        rs.done_bytes += entry[2]
        rs.done_ranges += 1
        self.pump()

    def finish_source(self):
        ctrl, rs, rec = self.ctrl, self.running, self.rec
        body = M.ResyncDone.build(dict(current_uuid=rec.current_uuid, ranges=rs.done_ranges,
                                       bytes=rs.done_bytes, reserved=0))
        self.link.send(T.RESYNC_DONE, M.Resource.REPLICATION, body)
        self._send_clean_sweep()
        values = dict(flags=rec.flags & ~M.STATE_FRESH)
        if rec.bitmap_uuid:
            values.update(history0=rec.bitmap_uuid, history1=rec.history0, bitmap_uuid=0)
        for r in rec.update(**values):
            ctrl._persist(r)
        seconds = max(0.001, (ctrl.now_ms - rs.started_ms) / 1000)
        ctrl.out.append(A.Notify("resync_done", side="source", ranges=rs.done_ranges, bytes=rs.done_bytes,
                                 seconds=round(seconds, 3), rate_bytes_s=round(rs.done_bytes / seconds),
                                 full=rs.full))
        self.last_run = self._status(rs)
        self.running = None

    def _send_clean_sweep(self):
        """Every range this cache holds nothing of, as destaged: the target's RECEIVED record may
        still name ranges destaged here while it was away (their messages were never sent)."""
        rec, bs = self.rec, self.cache.block_size
        mask = (1 << LUN_SHIFT) - 1
        dirty = {(key >> LUN_SHIFT, (key & mask) * bs // rec.range_bytes)
                 for key in list(self.cache.lines) + list(self.ctrl.flushing_keys)}
        rpb = rec.range_bytes // 512
        for lun, count in enumerate(rec.lun_ranges):
            pairs = runs(r for r in range(count) if (lun, r) not in dirty)
            for i in range(0, len(pairs), RANGES_PER_REQUEST):
                body = M.DestagedRange.build(dict(lun=lun, ranges=[
                    dict(lba=r * rpb, sectors=n * rpb) for r, n in pairs[i:i + RANGES_PER_REQUEST]]))
                self.link.send(T.DESTAGED_RANGE, M.Resource.REPLICATION, body, lane=F.LANE_CONTROL)

    def _status(self, rs):
        return {"total_bytes": rs.total_bytes, "done_bytes": rs.done_bytes,
                "remaining_bytes": rs.remaining_bytes(), "ranges": len(rs.todo),
                "done_ranges": rs.done_ranges, "rate_bytes_s": rs.rate_bytes_s(self.ctrl.now_ms),
                "full": rs.full}

    def progress(self):
        rs, now_ms = self.running, self.ctrl.now_ms
        if rs is not None and now_ms - rs.progress_ms >= PROGRESS_EVERY_MS:
            rs.progress_ms = now_ms
            self.ctrl.out.append(A.Notify("resync_progress", **self._status(rs)))
