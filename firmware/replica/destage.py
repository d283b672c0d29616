"""Replica mode: destage by the record, and the destaged-range messages that clear it.

Owns the part of replica mode (firmware/replica/controller.py) between the cache and the
record: the secondary picks what to destage from its mirror of the primary's
record, whole ranges oldest first (claims 13); a side whose cache no longer
holds anything of a range after a destage sends DESTAGED_RANGE (claims 11,
18); the receiver clears that range in SENT, unless a copy of it to the
sender is still unacknowledged (a host write or resync data in flight), and
in RECEIVED (claims 9, 16). The ack level "disk" completes here too.
"""
import collections

from ..cache import LUN_SHIFT, SECTOR_BYTES
from ..formats import frame as F
from ..formats import messages as M
from .record import RECEIVED, SENT, runs

T = M.MsgType
PRIMARY = M.ROLE_PRIMARY
PEERED = ("synced", "sync-source", "sync-target")  # destaged-range messages mean something


class DestagedMixin:

    def _send_refs(self, msg_type, refs):
        """ha's flush-begin/flush-done: replica mode has no mirror segment to tell."""

    def _destage_urgent(self) -> bool:
        return bool(self.write_path.waiting) or bool(self.disk_waiters) or self.sync != "synced" or (
            self.now_ms - self.last_host_io_ms >= self.params.idle_flush_ms)

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
            if not self.disk_health.may_write(lun, self.now_ms):
                continue                       # its disk failed: backing off (firmware/diskhealth.py)
            chosen.extend(line for key in range(base, base + per)
                          if (line := wbq.get(key)) is not None and key not in flushing)
            if len(chosen) >= budget:
                break
        if not chosen:
            return super()._pump()
        for line in chosen[:budget]:
            self._start_destage([line])        # one line per disk write here (an extent of one)
        return None

    def _destage_durable(self, entry):
        """The destage of these lines is on disk and flushed: only now is a range clean."""
        super()._destage_durable(entry)
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
        if self.sync not in PEERED or (self.sync == "sync-source" and self.resync.running is None):
            self.stats["destaged_ranges_ignored"] += 1
            return
        unacked = self.resync.unacked()
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
