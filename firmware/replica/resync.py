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
"""
from .. import actions as A
from ..cache import LUN_SHIFT
from ..formats import frame as F
from ..formats import messages as M
from ..formats.nvram import crc32c
from .record import RECEIVED, SENT, runs

T = M.MsgType
RANGES_PER_REQUEST = 4096
PROGRESS_EVERY_MS = 500


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


class ResyncMixin:
    # -- target ---------------------------------------------------------------

    def _send_resync_request(self):
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

    def _on_resync_done(self, msg):
        body = M.parse_body_untrusted(T.RESYNC_DONE, msg.payload, "RESYNC_DONE")
        self._fire("resync_done", body)

    def _target_finish(self, body):
        rec = self.rec
        history = (rec.current_uuid, rec.history0) if rec.current_uuid != body.current_uuid else (
            rec.history0, rec.history1)
        flags = rec.flags & ~(M.STATE_FRESH | M.STATE_INCONSISTENT | M.STATE_DISCARD)
        for r in rec.clear_all(SENT) + rec.update(current_uuid=body.current_uuid, bitmap_uuid=0, flags=flags,
                                                  history0=history[0], history1=history[1]):
            self._persist(r)
        self.out.append(A.Notify("resync_done", side="target", ranges=body.ranges, bytes=body.bytes,
                                 current_uuid=f"{body.current_uuid:016x}"))

    # -- source ---------------------------------------------------------------

    def _on_resync_request(self, msg):
        body = M.parse_body_untrusted(T.RESYNC_REQUEST, msg.payload, "RESYNC_REQUEST")
        if self.sync != "sync-source" or self.resync is not None:
            raise self.Error(f"RESYNC_REQUEST in state {self.sync}")
        if body.lun == M.RESYNC_END_LUN:
            self._start_resync_source()
            return
        rec, rpb = self.rec, self.rec.range_bytes // 512
        if body.lun >= len(rec.lun_ranges):
            raise self.Error(f"RESYNC_REQUEST for LUN {body.lun}")
        for rng in body.ranges:
            if rng.lba % rpb or rng.sectors % rpb or rng.lba // rpb + rng.sectors // rpb > rec.lun_ranges[body.lun]:
                raise self.Error(f"RESYNC_REQUEST range {rng.lba}+{rng.sectors} is not whole ranges of the LUN")
            first = rng.lba // rpb
            self.peer_wants.update((body.lun, r) for r in range(first, first + rng.sectors // rpb))

    def _start_resync_source(self):
        rec = self.rec
        wanted = set(self.peer_wants) | set(rec.members(SENT)) | set(rec.members(RECEIVED))
        if self.sync_full:
            wanted = {(lun, r) for lun, n in enumerate(rec.lun_ranges) for r in range(n)}
        self.peer_wants = set()
        for lun, r in wanted:
            for p in rec.set(SENT, lun, (r,)):
                self._persist(p)
        todo = sorted(wanted)
        self.resync = Resync(todo, rec.bytes_of(todo), self.now_ms, self.sync_full)
        self.out.append(A.Notify("resync_start", side="source", ranges=len(todo), bytes=self.resync.total_bytes,
                                 full=self.sync_full, record_bits=rec.counts[SENT]))
        self._resync_pump()

    def _resync_pump(self):
        rs = self.resync
        if rs is None or self.sync != "sync-source":
            return
        p = self.params.replica
        self._refill(rs)
        while rs.next < len(rs.todo) and len(rs.inflight) + rs.reading < p.resync_inflight_max:
            if p.resync_rate_bytes_s and rs.tokens < 0:
                break
            lun, r = rs.todo[rs.next]
            rs.next += 1
            rs.tokens -= self.rec.span(lun, r)[1]
            self._resync_read(rs, lun, r)
        if rs.finished():
            self._fire("resync_complete")

    def _refill(self, rs):
        rate = self.params.replica.resync_rate_bytes_s
        if rate:
            rs.tokens = min(rs.tokens + (self.now_ms - rs.refill_ms) * rate / 1000,
                            max(rate / 10, self.rec.range_bytes))
        rs.refill_ms = self.now_ms

    def _resync_read(self, rs, lun, r):
        rs.reading += 1
        offset, length = self.rec.span(lun, r)
        self._read(ResyncRead(rs, lun, r, self.range_writes[(lun, r)]), lun, offset, length)

    def _resync_read_done(self, req, error, data):
        rs = req.resync
        if rs is not self.resync or self.sync != "sync-source":
            return                          # a resync that ended (link loss) meanwhile
        rs.reading -= 1
        if error:
            self.out.append(A.Notify("resync_read_error", lun=req.lun, range=req.r, errno=error))
            rs.todo.append((req.lun, req.r))   # try it again at the end
            return
        if self.range_writes[(req.lun, req.r)] != req.epoch:
            self.stats["resync_reread"] += 1
            self._resync_read(rs, req.lun, req.r)
            return
        offset, length = self.rec.span(req.lun, req.r)
        seq = rs.next_seq
        rs.next_seq += 1
        rs.inflight[seq] = (req.lun, req.r, length)
        payload = bytes(data)
        head = M.REPLICATE_HEAD.pack(seq, req.lun, M.REPL_RESYNC, 0, offset, crc32c(payload), length)
        self.link.send(T.REPLICATE, M.Resource.REPLICATION, (head, payload))

    def _resync_acked(self, seq):
        rs = self.resync
        entry = rs.inflight.pop(seq, None) if rs is not None else None
        if entry is None:
            raise self.Error(f"resync ack for unknown range {seq}")
        rs.unacked.discard(entry[:2])
        rs.done_bytes += entry[2]
        rs.done_ranges += 1
        self._resync_pump()

    def _source_finish(self):
        rs, rec = self.resync, self.rec
        body = M.ResyncDone.build(dict(current_uuid=rec.current_uuid, ranges=rs.done_ranges,
                                       bytes=rs.done_bytes, reserved=0))
        self.link.send(T.RESYNC_DONE, M.Resource.REPLICATION, body)
        self._send_clean_sweep()
        values = dict(flags=rec.flags & ~M.STATE_FRESH)
        if rec.bitmap_uuid:
            values.update(history0=rec.bitmap_uuid, history1=rec.history0, bitmap_uuid=0)
        for r in rec.update(**values):
            self._persist(r)
        seconds = max(0.001, (self.now_ms - rs.started_ms) / 1000)
        self.out.append(A.Notify("resync_done", side="source", ranges=rs.done_ranges, bytes=rs.done_bytes,
                                 seconds=round(seconds, 3), rate_bytes_s=round(rs.done_bytes / seconds),
                                 full=rs.full))
        self.last_resync = self._resync_status(rs)
        self.resync = None

    def _send_clean_sweep(self):
        """Every range this cache holds nothing of, as destaged: the target's RECEIVED record may
        still name ranges destaged here while it was away (their messages were never sent)."""
        rec, bs = self.rec, self.block_size
        mask = (1 << LUN_SHIFT) - 1
        dirty = {(key >> LUN_SHIFT, (key & mask) * bs // rec.range_bytes)
                 for key in list(self.cache.lines) + list(self.flushing_keys)}
        rpb = rec.range_bytes // 512
        for lun, count in enumerate(rec.lun_ranges):
            pairs = runs(r for r in range(count) if (lun, r) not in dirty)
            for i in range(0, len(pairs), RANGES_PER_REQUEST):
                body = M.DestagedRange.build(dict(lun=lun, ranges=[
                    dict(lba=r * rpb, sectors=n * rpb) for r, n in pairs[i:i + RANGES_PER_REQUEST]]))
                self.link.send(T.DESTAGED_RANGE, M.Resource.REPLICATION, body, lane=F.LANE_CONTROL)

    def _resync_status(self, rs):
        return {"total_bytes": rs.total_bytes, "done_bytes": rs.done_bytes,
                "remaining_bytes": rs.remaining_bytes(), "ranges": len(rs.todo),
                "done_ranges": rs.done_ranges, "rate_bytes_s": rs.rate_bytes_s(self.now_ms),
                "full": rs.full}

    def _resync_progress(self):
        rs = self.resync
        if rs is not None and self.now_ms - rs.progress_ms >= PROGRESS_EVERY_MS:
            rs.progress_ms = self.now_ms
            self.out.append(A.Notify("resync_progress", **self._resync_status(rs)))

