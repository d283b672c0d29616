"""Replica mode: destage by the record, and the destaged-range messages that clear it.

Owns the part of replica mode (firmware/replica.py) between the cache and the
record: the secondary picks what to destage from its mirror of the primary's
record, whole ranges oldest first (claims 13); a side whose cache no longer
holds anything of a range after a destage sends DESTAGED_RANGE (claims 11,
18); the receiver clears that range in SENT, unless a copy of it to the
sender is still unacknowledged (a host write or resync data in flight), and
in RECEIVED (claims 9, 16). The ack level "disk" completes here too.

A destage write that completed is not yet durable: the disk may hold it in a
volatile cache. Its lines stay in NVRAM (and their keys flushing, so their
ranges are not clean) until a DiskFlush of that LUN issued after the write
completed has completed too; only then are they freed, the ack level "disk"
answered and the range announced. One flush covers every destage write of
the LUN that completed before it, and at most one is in flight per LUN: the
writes that complete meanwhile wait for the next one.
"""
import collections

from . import actions as A
from .cache import LUN_SHIFT, SECTOR_BYTES
from .formats import frame as F
from .formats import messages as M
from .record import RECEIVED, SENT, runs

T = M.MsgType
PRIMARY = M.ROLE_PRIMARY
PEERED = ("synced", "sync-source", "sync-target")  # destaged-range messages mean something


class DestageFlush:
    """One DiskFlush of a LUN, covering the destage writes (DestageOps) that completed before it."""
    __slots__ = ("lun", "entries")

    def __init__(self, lun, entries):
        self.lun = lun
        self.entries = entries


class DestagedMixin:

    def _send_refs(self, msg_type, refs):
        """ha's flush-begin/flush-done: replica mode has no mirror segment to tell."""

    def _destage_wanted(self) -> bool:
        cache, p = self.cache, self.params
        used = cache.used_blocks / cache.capacity
        urgent = bool(self.waiting) or bool(self.disk_waiters) or self.sync != "synced" or (
            self.now_ms - self.last_host_io_ms >= p.idle_flush_ms)
        if urgent or used >= p.high_watermark:
            self.destaging = True
        elif used <= p.low_watermark:
            self.destaging = False
        return self.destaging and bool(cache.wbq) and self.now_ms >= self.destage_pause_until_ms

    def _pump(self):
        """The secondary destages by its mirror of the record, whole ranges, oldest first (claims 13)."""
        if self.rec.role == PRIMARY or not self.peer_record:
            return super()._pump()
        budget = self.params.destage_inflight_max - self.destage_inflight
        if budget <= 0 or not self._destage_wanted():
            return None
        chosen = []
        per = self.rec.range_bytes // self.block_size
        wbq, flushing = self.cache.wbq, self.flushing_keys
        for lun, r in self.peer_record:
            base = (lun << LUN_SHIFT) | r * per
            chosen.extend(line for key in range(base, base + per)
                          if (line := wbq.get(key)) is not None and key not in flushing)
            if len(chosen) >= budget:
                break
        if not chosen:
            return super()._pump()
        for line in chosen[:budget]:
            self._start_destage([line])        # one line per disk write here (an extent of one)
        return None

    def _destage_done(self, entry):
        """A destage write finished: durable only after the next flush of its LUN."""
        if entry.error or (self.buggify_on and self.buggify("replica_destage_no_flush")):     # (a broken variant)
            self._destage_durable(entry)
            return
        lun = entry.lines[0].lun
        self.unflushed.setdefault(lun, []).append(entry)
        if lun not in self.flushes_inflight:
            self._start_flush(lun)

    def _start_flush(self, lun):
        op = self._new_op()
        self.flushes_inflight[lun] = op
        self.disk_ops[op] = DestageFlush(lun, self.unflushed.pop(lun))
        self.out.append(A.DiskFlush(op, lun))

    def disk_done(self, op, error=0, data=None):
        flush = self.disk_ops.get(op)
        if flush.__class__ is not DestageFlush:
            return super().disk_done(op, error, data)
        del self.disk_ops[op]
        del self.flushes_inflight[flush.lun]
        for entry in flush.entries:      # a failed flush fails its writes: their lines stay dirty
            entry.error = error
            self._destage_durable(entry)
        if flush.lun in self.unflushed:
            self._start_flush(flush.lun)
        self._pump()
        return self._take()

    def _destage_durable(self, entry):
        super()._destage_done(entry)
        if entry.error:
            return
        for line in entry.lines:
            for req in self.disk_waiters.pop(line, ()):
                req.remaining -= 1
                if req.remaining == 0:
                    self._reply(req, 0)
            r = line.lba * SECTOR_BYTES // self.rec.range_bytes
            if self._range_clean(line.lun, r):
                self.destaged_out.add((line.lun, r))
                self.peer_record.pop((line.lun, r), None)

    def _range_clean(self, lun, r) -> bool:
        per = self.rec.range_bytes // self.block_size
        base = (lun << LUN_SHIFT) | r * per
        lines, flushing = self.cache.lines, self.flushing_keys
        return not any(key in lines or key in flushing for key in range(base, base + per))

    def _take(self):
        if self.destaged_out:
            if self.link.up and self.sync in PEERED:
                self._send_destaged()
            self.destaged_out = set()
        return super()._take()

    def _send_destaged(self):
        rpb = self.rec.range_bytes // SECTOR_BYTES
        by_lun = collections.defaultdict(list)
        for lun, r in self.destaged_out:
            by_lun[lun].append(r)
        for lun, rs in by_lun.items():
            pairs = runs(sorted(rs))
            for i in range(0, len(pairs), 4096):
                body = M.DestagedRange.build(dict(lun=lun, ranges=[
                    dict(lba=r * rpb, sectors=n * rpb) for r, n in pairs[i:i + 4096]]))
                self.link.send(T.DESTAGED_RANGE, M.Resource.REPLICATION, body, lane=F.LANE_CONTROL)
                self.stats["destaged_ranges_sent"] += len(pairs[i:i + 4096])

    def _on_destaged_range(self, msg):
        body = M.parse_body_untrusted(T.DESTAGED_RANGE, msg.payload, "DESTAGED_RANGE")
        rec, rpb = self.rec, self.rec.range_bytes // SECTOR_BYTES
        if body.lun >= len(rec.lun_ranges):
            raise self.Error(f"DESTAGED_RANGE for LUN {body.lun}")
        if self.sync not in PEERED or (self.sync == "sync-source" and self.resync is None):
            self.stats["destaged_ranges_ignored"] += 1
            return
        unacked = self.resync.unacked if self.resync is not None else ()
        for rng in body.ranges:
            first, count = rng.lba // rpb, rng.sectors // rpb
            if rng.lba % rpb or rng.sectors % rpb or first + count > rec.lun_ranges[body.lun]:
                raise self.Error(f"DESTAGED_RANGE {rng.lba}+{rng.sectors} is not whole ranges of the LUN")
            for r in range(first, first + count):
                key = (body.lun, r)
                if not self.inflight_ranges.get(key) and key not in unacked:
                    for p in rec.clear(SENT, body.lun, r):
                        self._persist(p)
                for p in rec.clear(RECEIVED, body.lun, r):
                    self._persist(p)
        self.stats["destaged_ranges_received"] += len(body.ranges)
