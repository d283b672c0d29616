"""The source of log shipping: logs, ships, acknowledges hosts, applies partitions at
consistency points."""
import collections

from .. import actions as A
from ..formats import FormatError
from ..formats import frame as F
from ..formats import logfile as LF
from ..formats import messages as M
from ..formats import nvram as N
from ..link import LinkProtocolError
from ..requests import one_by_one
from .common import (
    APPLIED, EINVAL, EIO, EMPTY, FILLING, FULL, Log, LogParams, PART_HEAD, SECTOR, SHIP_BATCH_MAX,
    SOURCE_ID, T, overlaps, waves)
from .session import Session


class LogSource(Session):
    """The source: logs, ships, acknowledges hosts, applies partitions at consistency points."""

    def __init__(self, params: LogParams, nv, key, now_ms=0):
        sb = self._init_common(params, nv, now_ms)
        if sb.pair_id != params.pair_id or sb.controller_id != SOURCE_ID:
            raise FormatError(f"NVRAM belongs to controller {sb.controller_id} of pair {sb.pair_id.hex()}, "
                              f"not the source of {params.pair_id.hex()}")
        if sb.log_partitions < 2:
            raise FormatError(f"the NVRAM log has {sb.log_partitions} partition(s); log shipping needs 2")
        self.log = Log(nv, sb)
        self.link = self._make_link(key, SOURCE_ID, params)
        self.entry_max = max(SECTOR, (sb.log_partition_bytes - PART_HEAD - LF.ENTRY.size) // 2 // SECTOR * SECTOR)
        self.ops = {}
        self.next_op = 1
        self.pending = collections.deque()        # (last seq, req) awaiting the destination's ack
        self.waiting = collections.deque()        # host writes waiting for a partition
        self.acked_seq = 0                        # the destination holds every entry up to here
        self.shipped_seq = 0                      # entries up to here are sent in this session
        self.dest_applied_seq = 0
        self.resend_from = None                   # link up: resend after the destination's ack
        self.applying = None                      # the partition being applied, or None
        self.apply_queue = collections.deque()    # full partitions waiting to be applied
        self.apply_waves = []
        self.apply_left = 0
        self.apply_error = 0
        self.cp_through = 0                       # entries up to here are applied to our volume
        self.gap = None                           # the destination lost entries we no longer hold
        self.resumed = False                      # the destination said where to resume, this session
        self._recover()

    # -- recovery -------------------------------------------------------------

    def _recover(self):
        parts = self.log.parts
        torn = sum(self.log.scan(p) for p in parts)
        live = sorted((p for p in parts if p.state in (FILLING, FULL)), key=lambda p: p.first_seq)
        self.next_seq = max([p.end_seq for p in parts if p.first_seq] + [1])
        # every live partition but the newest is full; the newest goes on filling
        for p in live[:-1]:
            if p.state != FULL:
                p.move("close")
                self._persist(self.log.write_header(p))
        self.active = live[-1] if live and live[-1].state == FILLING else None
        for p in live:
            if p.state == FULL:
                self.apply_queue.append(p)
        applied = [p.last_seq for p in parts if p.state == APPLIED and p.entries]
        self.cp_through = max(applied + [0])
        self.out.append(A.Notify("recovered", role="source", next_seq=self.next_seq, torn_entries=torn,
                                 logged_entries=sum(len(p.entries) for p in live)))

    def start(self):
        self._pump_apply()
        return self._take()

    # -- host requests ----------------------------------------------------------

    def _check(self, req, lun, offset, length):
        size = self.params.lun_sizes[lun] if 0 <= lun < len(self.params.lun_sizes) else -1
        if size < 0 or offset < 0 or offset + length > size or offset % SECTOR or length % SECTOR:
            self.out.append(A.HostReply(req, EINVAL))
            return False
        return True

    def host_requests(self, batch):
        """A loop turn's host requests (firmware/requests.py), in order: one action list."""
        return one_by_one(self, batch)

    def host_write(self, req, lun, offset, data, fua=False):
        if self._check(req, lun, offset, len(data)):
            if self.waiting:
                # a copy: the host's buffer (the NBD connection's) is reused once this call returns
                self._wait(req, lun, offset, memoryview(bytes(data)))
            else:
                self._write(req, lun, offset, memoryview(data))
        return self._take()

    def host_write_zeroes(self, req, lun, offset, length, fua=False):
        if self._check(req, lun, offset, length):
            self._write(req, lun, offset, memoryview(bytes(length)))
        return self._take()

    def host_trim(self, req, lun, offset, length):
        # TRIM is advisory (NBD): nothing is logged, nothing is lost.
        if self._check(req, lun, offset, length):
            self.out.append(A.HostReply(req))
        return self._take()

    def host_flush(self, req, lun):
        # NVRAM is durable: every acknowledged write already is; a flush waits for the ones before it.
        if self.pending:
            self.pending.append((self.pending[-1][0], req))
        else:
            self.out.append(A.HostReply(req))
        return self._take()

    def _wait(self, req, lun, offset, data):
        if len(self.waiting) >= self.params.waiting_max:
            self.out.append(A.HostReply(req, EIO))
            return
        self.waiting.append((req, lun, offset, data))

    def _write(self, req, lun, offset, data):
        if not len(data):
            self.out.append(A.HostReply(req))
            return
        step = self.entry_max
        last = None
        for at in range(0, len(data), step):
            chunk = data[at:at + step]
            part = self._room(len(chunk))
            if part is None:                  # no partition free: the rest waits, in order
                self.waiting.appendleft((req, lun, offset + at, memoryview(bytes(data[at:]))))   # a copy
                self.stats["writes_waiting"] += 1
                if self.resumed and self.gap is None:
                    self._ship()              # what is logged goes out: its acks free partitions
                return
            seq = self.next_seq
            self.next_seq += 1
            self._persist(self.log.append(part, seq, lun, offset + at, chunk))
            last = seq
        self.stats["host_writes"] += 1
        if self.link.up and self.gap is None:
            if self.resumed:                  # else the destination's greeting starts the shipping
                self._ship()
            if self.params.buggify("log_ack_before_ship"):
                self.out.append(A.HostReply(req))
                return
            self.pending.append((last, req))
        else:
            self.stats["writes_unshipped"] += 1
            self.out.append(A.HostReply(req))     # degraded: durable in our NVRAM alone

    def _room(self, length):
        """The partition the next entry goes to; switches partitions (a consistency point)."""
        part = self.active
        if part is not None and self.log.room(part, length):
            return part
        if part is not None:
            self._close(part)                 # full: a consistency point, whether or not one is free
        free = [p for p in self.log.parts if p.state in (EMPTY, APPLIED) and self._reusable(p)]
        if not free:
            return None
        nxt = min(free, key=lambda p: p.index if p.state == EMPTY else p.first_seq)
        nxt.move("open")
        nxt.first_seq, nxt.entries, nxt.used, nxt.started_ms = self.next_seq, [], PART_HEAD, self.now_ms
        self._persist(self.log.write_header(nxt))
        self.active = nxt
        return nxt

    def _reusable(self, part):
        if self.params.buggify("log_reuse_unshipped"):
            return True
        return part.state == EMPTY or not part.entries or part.last_seq <= self.acked_seq

    def _close(self, part):
        """The active partition is full (or its timer fired): apply it, then a consistency point."""
        part.move("close")
        self._persist(self.log.write_header(part))
        self.out.append(A.Notify("consistency_point_start", partition=part.index, first_seq=part.first_seq,
                                 last_seq=part.last_seq))
        if self.active is part:
            self.active = None
        self.apply_queue.append(part)
        self._pump_apply()

    # -- applying partitions to the volume ----------------------------------------

    def _pump_apply(self):
        if self.applying is None and self.apply_queue:
            part = self.apply_queue.popleft()
            self.applying = part
            self.apply_waves = waves(part.entries)
            self.apply_error = 0
            self._next_wave()

    def _next_wave(self):
        part = self.applying
        if not self.apply_waves:
            luns = sorted({e.lun for e in part.entries})
            self.apply_left = len(luns)
            if not luns or self.params.buggify("log_destage_no_flush"):     # (a broken variant)
                self._applied(part)
                return
            for lun in luns:
                self.out.append(A.DiskFlush(self._op(("flush", part)), lun))
            return
        wave = self.apply_waves.pop(0)
        self.apply_left = len(wave)
        nv = self.nv
        for e in wave:
            self.out.append(A.DiskWrite(self._op(("apply", part)), e.lun, e.offset,
                                        nv[e.data_off:e.data_off + e.length]))

    def disk_done(self, op, error, data):
        kind, what = self.ops.pop(op)
        if kind == "read":
            self._read_done(what, error, data)
            return self._take()
        if error:
            self.apply_error = error
            self.stats["disk_errors"] += 1
        self.apply_left -= 1
        if self.apply_left == 0:
            if self.apply_error:            # try the partition again: it is still in NVRAM
                self.out.append(A.Notify("apply_failed", partition=what.index, error=self.apply_error))
                self.apply_waves = waves(what.entries)
                self.apply_error = 0
                self._next_wave()
            elif kind == "apply":
                self._next_wave()
            else:
                self._applied(what)
        return self._take()

    def _applied(self, part):
        self.applying = None
        self.cp_through = max(self.cp_through, part.last_seq)
        self.out.append(A.Notify("consistency_point", partition=part.index, first_seq=part.first_seq,
                                 last_seq=part.last_seq))
        part.move("applied")
        self._persist(self.log.write_header(part))
        if self.resumed and self.gap is None:
            self._send_cp()
        self._pump_apply()
        self._drain_waiting()

    def _send_cp(self):
        body = M.CONSISTENCY_POINT.pack(self.params.source_id, 0, 0, self.cp_through)
        self.link.send(T.CONSISTENCY_POINT, M.Resource.REPLICATION, body)

    def _drain_waiting(self):
        while self.waiting:
            req, lun, offset, data = self.waiting.popleft()
            before = len(self.waiting)
            self._write(req, lun, offset, data)
            if len(self.waiting) > before:          # it went back: still no room
                return

    # -- reads -------------------------------------------------------------------

    def host_read(self, req, lun, offset, length):
        if self._check(req, lun, offset, length):
            # capture the logged data not yet applied now: its partition may be reused before the
            # disk read completes
            overlay = []
            nv = self.nv
            for part in sorted(self._unapplied(), key=lambda p: p.first_seq):
                for e in part.entries:
                    if e.lun == lun and overlaps(e.offset, e.length, offset, length):
                        lo, hi = max(e.offset, offset), min(e.offset + e.length, offset + length)
                        src = e.data_off + lo - e.offset
                        overlay.append((lo - offset, bytes(nv[src:src + hi - lo])))
            self.out.append(A.DiskRead(self._op(("read", (req, overlay))), lun, offset, length))
        return self._take()

    def _unapplied(self):
        return [p for p in self.log.parts if p.state in (FILLING, FULL)]

    def _read_done(self, what, error, data):
        req, overlay = what
        if error:
            self.out.append(A.HostReply(req, EIO))
            return
        buf = data if isinstance(data, bytearray) else bytearray(data)
        for at, chunk in overlay:
            buf[at:at + len(chunk)] = chunk
        self.out.append(A.HostReply(req, 0, buf))

    # -- shipping ----------------------------------------------------------------

    def _link(self, link):
        return self.link

    def _links(self):
        return ((0, self.link),)

    def _link_fields(self, link):
        return {}

    def _held_entries(self, after_seq):
        """Entries still in NVRAM with a sequence above `after_seq`, in order."""
        out = []
        for part in sorted((p for p in self.log.parts if p.state != EMPTY and p.entries),
                           key=lambda p: p.first_seq):
            out.extend(e for e in part.entries if e.seq > after_seq)
        return out

    def _ship(self):
        """Send every logged entry after shipped_seq, batched."""
        entries = self._held_entries(self.shipped_seq)
        if not entries:
            return
        nv = self.nv
        sid = self.params.source_id
        for i in range(0, len(entries), SHIP_BATCH_MAX):
            batch = entries[i:i + SHIP_BATCH_MAX]
            parts = [M.LOG_SHIP_HEAD.pack(sid, 0, len(batch))]
            for e in batch:
                data = nv[e.data_off:e.data_off + e.length]
                parts.append(M.LOG_ENTRY_HEAD.pack(e.seq, e.lun, 0, e.offset // SECTOR, N.crc32c(data), e.length))
                parts.append(data)
            self.link.send(T.LOG_SHIP, M.Resource.REPLICATION, tuple(parts))
        self.shipped_seq = entries[-1].seq
        self.stats["entries_shipped"] += len(entries)

    def _link_up(self, link):
        peer = self.link.peer
        self.out.append(A.Notify("link_up", peer=peer.controller_id))
        # wait for the destination's LOG_ACK: it says where to resume

    def _on_link_down(self, link):
        self.resumed = False
        # everything still pending is durable here: acknowledge it (degraded), keep it to resend
        pending, self.pending = self.pending, collections.deque()
        for _seq, req in pending:
            self.out.append(A.HostReply(req))
        self.stats["writes_unshipped"] += len(pending)

    def _dispatch(self, link, msg):
        if msg.type not in (T.LOG_SHIP, T.CONSISTENCY_POINT) or not msg.flags & F.FLAG_RESPONSE:
            raise LinkProtocolError(f"a source does not take message type {msg.type}")
        if len(msg.payload) != M.LOG_ACK.size:
            raise FormatError(f"log ack of {len(msg.payload)} bytes")
        sid, status, _r, stored, filed, applied = M.LOG_ACK.unpack_from(msg.payload)
        if sid != self.params.source_id:
            raise LinkProtocolError(f"log ack for source {sid}")
        if status:
            raise LinkProtocolError(f"destination refused: error {status}")
        if msg.tag == 1:                         # the destination's greeting: resume after `stored`
            self._resume(stored, applied)
        self._acked(stored)
        self.dest_applied_seq = max(self.dest_applied_seq, applied)

    def _resume(self, stored, applied):
        held = self._held_entries(stored)
        oldest = min([e.seq for e in held] + [self.next_seq])
        if stored >= self.next_seq:
            self.gap = (self.next_seq, stored)
            self.out.append(A.Notify("destination_gap", first_seq=self.next_seq, last_seq=stored,
                                     error="the destination holds entries this source never logged "
                                           "(its log was lost): recover from the destination"))
            return
        if stored + 1 < oldest:
            self.gap = (stored + 1, oldest - 1)
            self.out.append(A.Notify("destination_gap", first_seq=stored + 1, last_seq=oldest - 1,
                                     error="the destination lacks entries this source no longer holds: "
                                           "it needs a full copy"))
            return
        self.gap = None
        self.resumed = True
        self.acked_seq = max(self.acked_seq, stored)
        self.shipped_seq = stored
        self.out.append(A.Notify("log_resume", after_seq=stored, entries=len(held)))
        if self.params.buggify("log_skip_resend"):
            self.shipped_seq = self.next_seq - 1
        self._ship()
        if self.cp_through > applied:
            self._send_cp()

    def _acked(self, stored):
        if stored <= self.acked_seq:
            return
        self.acked_seq = stored
        pending = self.pending
        while pending and pending[0][0] <= stored:
            self.out.append(A.HostReply(pending.popleft()[1]))
        self._drain_waiting()

    def tick(self, now_ms):
        self.now_ms = now_ms
        self._tick_links(now_ms)
        part = self.active
        if (part is not None and part.entries and now_ms - part.started_ms >= self.params.cp_interval_ms
                and self.applying is None):
            self._close(part)
        elif self.waiting:
            self._drain_waiting()
        return self._take()

    def status(self):
        parts = self.log.parts
        link = self.link.state
        if self.link.up:
            link = "shipping" if self.resumed and self.gap is None else "connected"
        return {"mode": "replica", "replica_variant": "log", "role": "source",
                "link": link, "next_seq": self.next_seq, "acked_seq": self.acked_seq,
                "unshipped_entries": max(0, self.next_seq - 1 - self.acked_seq),
                "applied_seq": self.cp_through, "destination_applied_seq": self.dest_applied_seq,
                "partitions": [{"index": p.index, "state": ("empty", "filling", "full", "applied")[p.state],
                                "first_seq": p.first_seq, "entries": len(p.entries),
                                "used_bytes": p.used, "size_bytes": p.size} for p in parts],
                "pending_writes": len(self.pending), "waiting_writes": len(self.waiting),
                "gap": list(self.gap) if self.gap else None, "stats": dict(self.stats),
                "link_stats": dict(self.link.stats),
                "owned_luns": [f"lun{i}" for i in range(len(self.params.lun_sizes))],
                "generation": 1}
