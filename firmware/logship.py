"""Replica mode, NVRAM-log variant: log shipping with consistency points (claims 4).

The source logs each host write in a partition of its NVRAM log with a
sequence number, persists it, and ships it to the destination. The
destination writes it into its own NVRAM, acknowledges, and moves it into a
file that belongs to that source on its own disks; once a request is in the
file (written and flushed) it is removed from the destination's NVRAM.
Sequence numbers keep the file ordered: an entry that arrives early waits
in memory, unacknowledged, until the gap before it is filled.

Consistency point: when the active partition fills, or `cp_interval_ms`
passes with entries in it, the source starts the next partition, applies the
full one to its volume (disk writes, then a flush), and sends a
CONSISTENCY_POINT through its last sequence number; the destination applies
its file's requests up to there to the image volume, then records that in
the file header. A partition is reused only once it is applied locally and
every entry in it is acknowledged by the destination.

The host is acknowledged once the destination acknowledged the request
(it is in two NVRAMs). While the destination is unreachable the source
serves on alone: a write is acknowledged from its own NVRAM, and its
partitions keep every entry the destination has not acknowledged; when the
link returns the destination says how far it got and the source resends the
rest in order. If every partition holds unshipped entries, host writes wait
(bounded) until the destination takes some.

Reads at the source see the volume plus every logged request not yet applied.
The destination serves its image volumes read-only (the state of the last
consistency point); after a disaster at the source, `recover` applies every
request in the file, and the image holds every acknowledged write.

One destination serves several sources (fan-in): each has its own link
session, NVRAM log partition, file and image volume.
"""
import collections
import struct

from . import actions as A
from .formats import FormatError
from .formats import frame as F
from .formats import logfile as LF
from .formats import messages as M
from .formats import nvram as N
from .link import LinkProtocolError, LinkSession

EPERM, EIO, EINVAL, ENOSPC = 1, 5, 22, 28
T = M.MsgType
SECTOR = 512
PART_HEAD = N.LogPartitionHeader.sizeof()
PART = struct.Struct(">HHB3sQII36sI")     # the struct twin of nvram.LogPartitionHeader
EMPTY, FILLING, FULL, APPLIED = 0, 1, 2, 3
LOG_MODE = 2                                          # HELLO mode byte: 0 ha, 1 replica, 2 log shipping
SOURCE_ID, DEST_ID = 0, 1                             # link controller ids of the two ends
SHIP_BATCH_MAX = 64                                   # entries per LOG_SHIP message


class LogParams:
    """What the log-shipping firmware needs to know that is not in NVRAM."""

    def __init__(self, pair_id, lun_sizes, *, source_id=0, cp_interval_ms=2000, max_write_bytes=4 << 20,
                 heartbeat_interval_ms=100, heartbeat_timeout_ms=1000, reliable_transport=True,
                 data_window_bytes=4 << 20, waiting_max=1024, buggify=None):
        self.pair_id = pair_id
        self.lun_sizes = list(lun_sizes)
        self.source_id = source_id
        self.cp_interval_ms = cp_interval_ms
        self.max_write_bytes = max_write_bytes
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.heartbeat_timeout_ms = heartbeat_timeout_ms
        self.reliable_transport = reliable_transport
        self.data_window_bytes = data_window_bytes
        self.waiting_max = waiting_max
        # Deliberately broken variants for the simulator (hal/sim/log.py BROKEN_SITES): off in service.
        self.buggify = buggify or (lambda site: False)


def partition_header(index, state, first_seq, entries, used) -> bytes:
    body = PART.pack(N.LOG_PARTITION_MAGIC, index, state, bytes(3), first_seq, entries, used, bytes(36), 0)[:-4]
    return body + N.crc32c(body).to_bytes(4, "big")


def parse_partition_untrusted(buf):
    """(index, state, first_seq, entries, used) or None when blank or torn."""
    magic, index, state, _r0, first_seq, entries, used, _r, crc = PART.unpack_from(buf, 0)
    if magic != N.LOG_PARTITION_MAGIC or N.crc32c(bytes(buf[:PART_HEAD - 4])) != crc or state > APPLIED:
        return None
    return index, state, first_seq, entries, used


class Entry:
    __slots__ = ("seq", "lun", "offset", "length", "data_off")

    def __init__(self, seq, lun, offset, length, data_off):
        self.seq = seq
        self.lun = lun
        self.offset = offset          # bytes into the LUN
        self.length = length
        self.data_off = data_off      # where its data lives (NVRAM or file offset)


class Partition:
    __slots__ = ("index", "offset", "size", "state", "first_seq", "entries", "used", "started_ms", "end_seq")

    def __init__(self, index, offset, size):
        self.index = index
        self.offset = offset
        self.size = size
        self.state = EMPTY
        self.first_seq = 0
        self.entries = []
        self.used = PART_HEAD
        self.started_ms = 0
        self.end_seq = 0              # after a scan: the sequence number after its last entry

    @property
    def last_seq(self):
        return self.first_seq + len(self.entries) - 1

    def header(self):
        return partition_header(self.index, self.state, self.first_seq, len(self.entries), self.used)


class Log:
    """The NVRAM log partitions of one controller: append, scan, header updates (no I/O)."""

    def __init__(self, nv, sb, partitions=None):
        self.nv = nv
        indexes = range(sb.log_partitions) if partitions is None else partitions
        self.parts = [Partition(i, sb.log_offset + i * sb.log_partition_bytes, sb.log_partition_bytes)
                      for i in indexes]

    def write_header(self, part):
        head = part.header()
        self.nv[part.offset:part.offset + len(head)] = head
        return A.Persist(part.offset, len(head))

    def room(self, part, length):
        return part.used + LF.ENTRY.size + length <= part.size

    def append(self, part, seq, lun, offset, data):
        """Store one entry (header, then data) at the partition's end; return its Persist."""
        at = part.offset + part.used
        n = len(data)
        nv = self.nv
        nv[at + LF.ENTRY.size:at + LF.ENTRY.size + n] = data
        nv[at:at + LF.ENTRY.size] = LF.entry_header(lun, n, seq, offset // SECTOR,
                                                    N.crc32c(nv[at + LF.ENTRY.size:at + LF.ENTRY.size + n]))
        part.entries.append(Entry(seq, lun, offset, n, at + LF.ENTRY.size))
        part.used += LF.ENTRY.size + n
        return A.Persist(at, LF.ENTRY.size + n)

    def scan(self, part):
        """Rebuild a partition from NVRAM: its header, then entries with consecutive sequence
        numbers from first_seq whose header and data CRCs hold; the first that fails ends it."""
        nv = self.nv
        parsed = parse_partition_untrusted(nv[part.offset:part.offset + PART_HEAD])
        if parsed is None or parsed[0] != part.index:
            part.state, part.first_seq, part.entries, part.used, part.end_seq = EMPTY, 0, [], PART_HEAD, 0
            return 0
        _i, part.state, part.first_seq, count, _used = parsed
        part.entries, part.used = [], PART_HEAD
        torn = 0
        if part.state != EMPTY:
            end = part.offset + part.size
            while True:
                at = part.offset + part.used
                e = LF.parse_entry_untrusted(nv[at:min(end, at + LF.ENTRY.size)])
                if e is None or e[2] != part.first_seq + len(part.entries):
                    break
                lun, length, seq, lba, crc = e
                if at + LF.ENTRY.size + length > end or N.crc32c(
                        nv[at + LF.ENTRY.size:at + LF.ENTRY.size + length]) != crc:
                    torn += 1
                    break
                part.entries.append(Entry(seq, lun, lba * SECTOR, length, at + LF.ENTRY.size))
                part.used += LF.ENTRY.size + length
            if part.state == APPLIED and len(part.entries) != count:
                part.entries = []     # overwritten since: it cannot be resent, only counted
        part.end_seq = part.first_seq + (count if part.state == APPLIED else len(part.entries))
        return torn


def overlaps(a_off, a_len, b_off, b_len):
    return a_off < b_off + b_len and b_off < a_off + a_len


def waves(entries):
    """Split entries (in sequence order) into waves with no overlap inside a wave, so a wave's
    writes may complete in any order and the newest data still wins."""
    out, current = [], []
    for e in entries:
        if any(x.lun == e.lun and overlaps(x.offset, x.length, e.offset, e.length) for x in current):
            out.append(current)
            current = []
        current.append(e)
    if current:
        out.append(current)
    return out


class _Session:
    """Link handling shared by both ends: entry points the runtime calls."""

    def _make_link(self, key, controller_id, params):
        return LinkSession(controller_id, params.pair_id, key, mode=LOG_MODE, generation=1,
                           capabilities=M.CAP_LOG_SHIP, reliable_transport=params.reliable_transport,
                           data_window_bytes=params.data_window_bytes,
                           heartbeat_interval_ms=params.heartbeat_interval_ms,
                           heartbeat_timeout_ms=params.heartbeat_timeout_ms)

    def set_time(self, now_ms):
        self.now_ms = now_ms

    def link_connected(self, nonce, now_ms, link=0):
        self.now_ms = now_ms
        session = self._link(link)
        if session.state != "down":             # the runtime closed the old connection already
            self._link_down(link, "a new connection replaced the old one", reset=False)
        session.connected(nonce, now_ms)
        return self._take()

    def link_disconnected(self, reason, link=0):
        if self._link(link).state != "down":
            self._link_down(link, reason, reset=False)
        return self._take()

    def link_frame(self, frame, now_ms, link=0):
        return self.link_frames((frame,), now_ms, link)

    def link_frames(self, frames, now_ms, link=0):
        self.now_ms = now_ms
        session = self._link(link)
        for frame in frames:
            if session.state == "down":
                break
            was_up = session.up
            try:
                msg = session.receive(frame, now_ms)
                if not was_up and session.up:
                    self._link_up(link)
                if msg is not None:
                    self._dispatch(link, msg)
            except (LinkProtocolError, FormatError) as exc:
                self.stats["link_errors"] += 1
                self._link_down(link, f"protocol error: {exc}")
        return self._take()

    def link_is_up(self, link=0) -> bool:
        """The session on link `link` authenticated and serves."""
        return self._link(link).up

    def flush_link(self):
        """The runtime's once-a-turn call (firmware/controller.py batches; every entry point here
        already returned its frames)."""
        return self._take()

    def _tick_links(self, now_ms):
        for link, session in self._links():
            try:
                session.tick(now_ms)
            except LinkProtocolError as exc:
                self._link_down(link, str(exc))

    def _link_down(self, link, reason, reset=True):
        self.out.append(A.Notify("link_down", reason=reason, **self._link_fields(link)))
        if reset:
            self.out.append(A.LinkReset(reason, link))
        self._link(link).disconnected()
        self._on_link_down(link)

    def _take(self):
        for link, session in self._links():
            if session.state != "down":
                buffers = session.take_output()
                if buffers:
                    self.out.append(A.Transmit(buffers, link))
        out, self.out = self.out, []
        return out

    def _init_common(self, params, nv, now_ms):
        """What both ends start with; returns the NVRAM superblock."""
        self.params = params
        self.nv = nv
        self.now_ms = now_ms
        self.out = []
        self.stats = collections.Counter()
        sb, _slot = N.read_superblock_untrusted(nv, "NVRAM")
        if sb.nvram_size_bytes > len(nv):
            raise FormatError(f"NVRAM of {len(nv)} bytes, its superblock says {sb.nvram_size_bytes}")
        return sb

    def _persist(self, act):
        """Every NVRAM persist of either end goes out here."""
        if not self.params.buggify("log_skip_persist"):        # (a broken variant)
            self.out.append(act)

    def _op(self, what):
        op = self.next_op
        self.next_op += 1
        self.ops[op] = what
        return op


class LogSource(_Session):
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
                p.state = FULL
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
        nxt.state, nxt.first_seq, nxt.entries, nxt.used, nxt.started_ms = FILLING, self.next_seq, [], PART_HEAD, self.now_ms
        self._persist(self.log.write_header(nxt))
        self.active = nxt
        return nxt

    def _reusable(self, part):
        if self.params.buggify("log_reuse_unshipped"):
            return True
        return part.state == EMPTY or not part.entries or part.last_seq <= self.acked_seq

    def _close(self, part):
        """The active partition is full (or its timer fired): apply it, then a consistency point."""
        part.state = FULL
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
        part.state = APPLIED
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


class FeedParams:
    """One source as the destination sees it: its pairing, partition, file and image disks."""

    def __init__(self, source_id, pair_id, key, lun_sizes, image_disks, journal_disk, journal_bytes,
                 partition, name=None):
        assert len(image_disks) == len(lun_sizes)
        self.source_id = source_id
        self.pair_id = pair_id
        self.key = key
        self.lun_sizes = list(lun_sizes)
        self.image_disks = list(image_disks)      # destination disk index of each image LUN
        self.journal_disk = journal_disk          # destination disk index of the file
        self.journal_bytes = journal_bytes
        self.partition = partition                # destination NVRAM log partition staging its entries
        self.name = name or f"source{source_id}"


SCAN_CHUNK_BYTES = 1 << 20


class Feed:
    """The destination's state for one source."""

    def __init__(self, fp, part, link):
        self.p = fp
        self.part = part
        self.link = link
        self.ready = False
        self.held = collections.deque()           # messages that came before the recovery scan ended
        self.expected = 1                         # the next sequence number to store
        self.early = {}                           # seq -> (lun, offset, bytes): arrived ahead of a gap
        self.staged = collections.deque()         # stored in NVRAM, not yet filed (Entry, NVRAM data_off)
        self.filing = 0                           # records written to the file, not yet flushed
        self.records = collections.deque()        # in the file, not yet applied (Entry, file data_off)
        self.filed_seq = 0
        self.applied_seq = 0
        self.cp_count = 0
        self.tail = LF.DATA_START
        self.cp_target = 0
        self.cp = None                            # the running apply: dict
        self.scan_at = LF.DATA_START
        self.scan_wrapped = False
        self.recovered_nvram = None               # entries the NVRAM scan found, until the file scan ends
        self.filing_batch = []                    # the entries of the records in flight
        self.file_error = 0


class LogDestination(_Session):
    """The destination: stores shipped entries in NVRAM, files them, applies them at consistency points."""

    def __init__(self, params: LogParams, feeds, nv, now_ms=0):
        sb = self._init_common(params, nv, now_ms)
        if sb.controller_id != DEST_ID:
            raise FormatError(f"NVRAM belongs to controller {sb.controller_id}, not a destination")
        if len(feeds) > sb.log_partitions:
            raise FormatError(f"{len(feeds)} sources need {len(feeds)} NVRAM log partitions; "
                              f"this NVRAM has {sb.log_partitions}")
        self.log = Log(nv, sb)
        self.feeds = []
        self.by_disk = {}
        for i, fp in enumerate(feeds):
            link = self._make_link(fp.key, DEST_ID, LogParams(fp.pair_id, fp.lun_sizes, **{
                k: getattr(params, k) for k in ("heartbeat_interval_ms", "heartbeat_timeout_ms",
                                                "reliable_transport", "data_window_bytes")}))
            feed = Feed(fp, self.log.parts[fp.partition], link)
            self.feeds.append(feed)
            for lun, disk in enumerate(fp.image_disks):
                self.by_disk[disk] = (feed, lun)
        self.ops = {}
        self.next_op = 1
        for feed in self.feeds:
            self._recover(feed)

    # -- recovery: NVRAM partition, then the file on disk ---------------------------

    def _recover(self, feed):
        torn = self.log.scan(feed.part)
        if feed.part.state == EMPTY:
            self._reset_partition(feed, 1)
        feed.recovered_nvram = [e for e in feed.part.entries]
        self.out.append(A.Notify("recovering", source=feed.p.name, nvram_entries=len(feed.part.entries),
                                 torn_entries=torn))
        # After a kill of this process (not a power cut) the file may show records and a header
        # still in the disk's volatile cache: flush it before they are trusted to drop entries from
        # NVRAM, or a power cut later takes records whose entries are gone from here.
        self.out.append(A.DiskFlush(self._op(("boot_flush", feed)), feed.p.journal_disk))

    def _boot_flushed(self, feed, error):
        if error:
            self.out.append(A.Notify("journal_error", source=feed.p.name, error=error))
            return
        self.out.append(A.DiskRead(self._op(("header", feed)), feed.p.journal_disk, 0,
                                   LF.HEADER_BYTES * LF.HEADER_SLOTS))

    def _reset_partition(self, feed, first_seq):
        part = feed.part
        part.state, part.first_seq, part.entries, part.used = FILLING, first_seq, [], PART_HEAD
        self._persist(self.log.write_header(part))

    def _header_read(self, feed, error, data):
        if error:
            self.out.append(A.Notify("journal_error", source=feed.p.name, error=error))
            return
        try:
            hdr = LF.newest_header_untrusted(data, f"{feed.p.name} journal")
        except FormatError:
            hdr = None
        if hdr is None and any(data):
            # not blank, not valid: refuse rather than start over on top of records
            self.out.append(A.Notify("journal_header_invalid", source=feed.p.name,
                                     error="the source's file header is damaged; not serving this source"))
            return
        if hdr is None:
            feed.applied_seq, feed.cp_count = 0, 0
            feed.tail = LF.DATA_START
            self._write_header(feed, ("header_init", feed), 0, LF.DATA_START, 1, 0)
            return
        if hdr.source_id != feed.p.source_id or hdr.pair_id != feed.p.pair_id:
            self.out.append(A.Notify("journal_foreign", source=feed.p.name, found_source=hdr.source_id))
            return
        feed.applied_seq, feed.cp_count = hdr.applied_seq, hdr.cp_count
        feed.filed_seq = hdr.applied_seq
        feed.tail = hdr.head_offset
        feed.scan_at, feed.scan_wrapped = hdr.head_offset, False
        self._scan_next(feed)

    def _write_header(self, feed, what, applied_seq, head, head_seq, cp_count):
        """Write the file header of `cp_count` to its slot: only one this destination's recovery
        reads back as written. The header is what lets the destination drop entries and reuse the
        file: one that recovery rejects is silently replaced by the older slot, whose head points
        at records the next lap overwrites. Seed 412026 showed it: a consistency point emptied a
        ring whose last record ended the file, recorded head_offset == the file's size (rejected
        as outside the file), and the restarted destination lost the acknowledged entries filed
        after it. A head is a place a record starts (LF.ring_offset: the ring's end is its start);
        a header that still does not read back is a bug, stopped here before it is on disk."""
        data = LF.build_header(feed.p.source_id, feed.p.pair_id, feed.p.journal_bytes, applied_seq,
                               head, head_seq, cp_count)
        try:
            back = LF.parse_header_untrusted(data, f"{feed.p.name} journal")
        except FormatError as exc:
            raise AssertionError(f"a file header recovery would reject: {exc}") from None
        if (back.applied_seq, back.head_offset, back.head_seq, back.cp_count) != (applied_seq, head, head_seq,
                                                                                 cp_count):
            raise AssertionError(f"a file header recovery would read otherwise: head {head} read as "
                                 f"{back.head_offset}")
        self.out.append(A.DiskWrite(self._op(what), feed.p.journal_disk, LF.header_slot_offset(cp_count), data))

    def _scan_next(self, feed):
        end = feed.p.journal_bytes
        if feed.scan_at + LF.RECORD_ALIGN > end:
            self._scan_wrap_or_end(feed)
            return
        length = min(SCAN_CHUNK_BYTES, end - feed.scan_at)
        self.out.append(A.DiskRead(self._op(("scan", feed)), feed.p.journal_disk, feed.scan_at, length))

    def _scan_wrap_or_end(self, feed):
        if not feed.scan_wrapped and feed.scan_at != LF.DATA_START:
            feed.scan_wrapped = True
            feed.scan_at = LF.DATA_START
            self._scan_next(feed)
        else:
            self._scan_done(feed)

    def _scan_chunk(self, feed, error, data):
        """Follow records with the next sequence number; the first that is not ends this lap."""
        if error:
            self.out.append(A.Notify("journal_error", source=feed.p.name, error=error))
            return
        at = 0
        while True:
            e = LF.parse_entry_untrusted(data, at)
            if e is None or e[2] != feed.filed_seq + 1:
                break
            lun, length, seq, lba, crc = e
            size = LF.record_bytes(length)
            if at + size > len(data):                 # the record runs past this chunk: read on from it
                if feed.scan_at + at + size > feed.p.journal_bytes:
                    break
                feed.scan_at += at
                self.out.append(A.DiskRead(self._op(("scan", feed)), feed.p.journal_disk, feed.scan_at,
                                           max(size, min(SCAN_CHUNK_BYTES, feed.p.journal_bytes - feed.scan_at))))
                return
            if N.crc32c(data[at + LF.RECORD_ALIGN:at + LF.RECORD_ALIGN + length]) != crc:
                break                                 # torn: it was never filed (never flushed)
            feed.records.append(Entry(seq, lun, lba * SECTOR, length, feed.scan_at + at + LF.RECORD_ALIGN))
            feed.filed_seq = seq
            at += size
            feed.tail = feed.scan_at + at
        if at == len(data) and at:
            feed.scan_at += at
            self._scan_next(feed)
            return
        self._scan_wrap_or_end(feed)

    def _scan_done(self, feed):
        staged = [e for e in feed.recovered_nvram if e.seq > feed.filed_seq]
        feed.recovered_nvram = None
        if staged and staged[0].seq != feed.filed_seq + 1:
            self.out.append(A.Notify("journal_gap", source=feed.p.name, filed_seq=feed.filed_seq,
                                     first_staged=staged[0].seq))
        feed.staged.extend(staged)
        feed.expected = max([feed.filed_seq + 1] + [e.seq + 1 for e in staged])
        if not staged:                  # everything in NVRAM is filed: start the partition afresh
            self._reset_partition(feed, feed.expected)
        feed.ready = True
        self.out.append(A.Notify("recovered", role="destination", source=feed.p.name, filed_seq=feed.filed_seq,
                                 applied_seq=feed.applied_seq, staged=len(staged), records=len(feed.records)))
        self._file(feed)
        if feed.link.up:
            self._greet(feed)
        held, feed.held = feed.held, collections.deque()
        for msg in held:
            self._handle(feed, msg)

    # -- link ------------------------------------------------------------------------

    def _link(self, link):
        return self.feeds[link].link

    def _links(self):
        return ((i, f.link) for i, f in enumerate(self.feeds))

    def _link_fields(self, link):
        return {"source": self.feeds[link].p.name}

    def _link_up(self, link):
        feed = self.feeds[link]
        self.out.append(A.Notify("link_up", source=feed.p.name))
        if feed.ready:
            self._greet(feed)

    def _on_link_down(self, link):
        self.feeds[link].early.clear()

    def _greet(self, feed):
        self._ack(feed, tag=1)

    def _ack(self, feed, tag=0, msg_type=T.LOG_SHIP):
        body = M.LOG_ACK.pack(feed.p.source_id, 0, 0, feed.expected - 1, feed.filed_seq, feed.applied_seq)
        feed.link.send(msg_type, M.Resource.REPLICATION, body, lane=F.LANE_CONTROL, flags=F.FLAG_RESPONSE, tag=tag)

    def _dispatch(self, link, msg):
        feed = self.feeds[link]
        if msg.flags & F.FLAG_RESPONSE or msg.type not in (T.LOG_SHIP, T.CONSISTENCY_POINT):
            raise LinkProtocolError(f"a destination does not take message type {msg.type}")
        if not feed.ready:
            msg.payload = bytes(msg.payload)
            feed.held.append(msg)
            return
        self._handle(feed, msg)

    def _handle(self, feed, msg):
        if msg.type == T.CONSISTENCY_POINT:
            if len(msg.payload) != M.CONSISTENCY_POINT.size:
                raise FormatError(f"consistency point of {len(msg.payload)} bytes")
            sid, _p, _first, through = M.CONSISTENCY_POINT.unpack_from(msg.payload)
            if sid != feed.p.source_id:
                raise LinkProtocolError(f"consistency point for source {sid} on {feed.p.name}'s link")
            feed.cp_target = max(feed.cp_target, through)
            self.out.append(A.Notify("consistency_point_signal", source=feed.p.name, through_seq=through))
            self._pump_cp(feed)
            return
        for seq, lun, offset, data in self._parse_ship(feed, msg.payload):
            if seq < feed.expected:
                self.stats["duplicates"] += 1
            elif seq > feed.expected:
                feed.early[seq] = (lun, offset, bytes(data))
                self.stats["early"] += 1
            else:
                self._store(feed, seq, lun, offset, data)
        while feed.expected in feed.early and self._room(feed, len(feed.early[feed.expected][2])):
            lun, offset, data = feed.early.pop(feed.expected)
            self._store(feed, feed.expected, lun, offset, data)
        self._ack(feed)
        self._file(feed)

    def _parse_ship(self, feed, payload):
        """Entries of a LOG_SHIP body: [(seq, lun, offset, data)]; FormatError if malformed."""
        if len(payload) < M.LOG_SHIP_HEAD.size:
            raise FormatError("short LOG_SHIP")
        sid, _partition, count = M.LOG_SHIP_HEAD.unpack_from(payload)
        if sid != feed.p.source_id:
            raise LinkProtocolError(f"log entries of source {sid} on {feed.p.name}'s link")
        at, out = M.LOG_SHIP_HEAD.size, []
        sizes = feed.p.lun_sizes
        for _ in range(count):
            if len(payload) - at < M.LOG_ENTRY_HEAD.size:
                raise FormatError("LOG_SHIP entry header cut short")
            seq, lun, _flags, lba, crc, length = M.LOG_ENTRY_HEAD.unpack_from(payload, at)
            at += M.LOG_ENTRY_HEAD.size
            data = payload[at:at + length]
            at += length
            if len(data) != length or N.crc32c(data) != crc:
                raise FormatError(f"log entry {seq}: data cut short or failing its CRC")
            if lun >= len(sizes) or lba * SECTOR + length > sizes[lun] or length % SECTOR:
                raise FormatError(f"log entry {seq} outside lun{lun}")
            out.append((seq, lun, lba * SECTOR, data))
        if at != len(payload):
            raise FormatError("trailing bytes after LOG_SHIP entries")
        return out

    def _room(self, feed, length):
        part = feed.part
        if self.log.room(part, length):
            return True
        if not feed.staged and not feed.filing:    # all filed: the partition starts afresh
            self._reset_partition(feed, feed.expected)
            return self.log.room(part, length)
        return False

    def _store(self, feed, seq, lun, offset, data):
        if not self._room(feed, len(data)):
            feed.early[seq] = (lun, offset, bytes(data))     # waits (unacknowledged) for filing
            return
        self._persist(self.log.append(feed.part, seq, lun, offset, data))
        feed.staged.append(feed.part.entries[-1])
        feed.expected = seq + 1
        self.stats["entries_stored"] += 1

    # -- filing: NVRAM -> the source's file ---------------------------------------------

    def _place(self, feed, size):
        end = feed.p.journal_bytes
        if not feed.records:
            at = feed.tail if feed.tail + size <= end else LF.DATA_START
            return at if at + size <= end else None
        head = feed.records[0].data_off - LF.RECORD_ALIGN
        newest = feed.records[-1].data_off - LF.RECORD_ALIGN
        if newest >= head:                 # not wrapped: [head, tail) is in use
            if feed.tail + size <= end:
                return feed.tail
            return LF.DATA_START if LF.DATA_START + size <= head else None
        # wrapped: [head, end) and [DATA_START, tail) are in use (tail == head is full, not empty)
        return feed.tail if feed.tail + size <= head else None

    def _file(self, feed):
        if not feed.ready or feed.filing:
            return
        batch = []
        nv = self.nv
        for e in feed.staged:
            size = LF.record_bytes(e.length)
            at = self._place(feed, size)
            if at is None:
                self.stats["journal_full"] += 1
                break
            if at < feed.tail:
                self.stats["journal_wraps"] += 1
            record = LF.build_record(e.lun, e.seq, e.offset // SECTOR, nv[e.data_off:e.data_off + e.length])
            self.out.append(A.DiskWrite(self._op(("file", feed)), feed.p.journal_disk, at, record))
            feed.records.append(Entry(e.seq, e.lun, e.offset, e.length, at + LF.RECORD_ALIGN))
            feed.tail = at + size
            batch.append(e)
        feed.filing = len(batch)
        feed.filing_batch = batch

    def _filed_writes_done(self, feed):
        if self.params.buggify("log_destage_no_flush"):     # (a broken variant)
            self._filed(feed)
            return
        self.out.append(A.DiskFlush(self._op(("file_flush", feed)), feed.p.journal_disk))

    def _filed(self, feed):
        batch, feed.filing_batch = feed.filing_batch, []
        feed.filing = 0
        for e in batch:
            feed.staged.popleft()
            feed.filed_seq = e.seq
        self.stats["entries_filed"] += len(batch)
        if not feed.staged:
            # every stored entry is in the file: the NVRAM partition is emptied (claims 4.17)
            self._reset_partition(feed, feed.expected)
            while feed.expected in feed.early and self._room(feed, len(feed.early[feed.expected][2])):
                lun, offset, data = feed.early.pop(feed.expected)
                self._store(feed, feed.expected, lun, offset, data)
            if feed.link.up:
                self._ack(feed)
        self._pump_cp(feed)
        self._file(feed)

    # -- consistency points: the file -> the image volume ---------------------------------

    def recover(self, name=None):
        """After a disaster at the source: apply every request this side acknowledged to the image.

        Through the last one stored, not the last one filed: with the file ring full, entries wait
        in NVRAM for the space this very consistency point frees, and are applied as they are filed
        (recovering only what was filed when it was called left an acknowledged write out)."""
        for feed in self.feeds:
            if name is None or feed.p.name == name:
                feed.cp_target = max(feed.cp_target, feed.expected - 1)
                self.out.append(A.Notify("recover_start", source=feed.p.name, through_seq=feed.expected - 1,
                                         records=len(feed.records)))
                self._pump_cp(feed)
        return self._take()

    def _pump_cp(self, feed):
        if feed.cp is not None or not feed.ready:
            return
        through = min(feed.cp_target, feed.filed_seq)
        records = [r for r in feed.records if r.seq <= through]
        if not records:
            if feed.cp_target and feed.applied_seq >= feed.cp_target and feed.link.up:
                self._ack(feed, msg_type=T.CONSISTENCY_POINT)
            return
        feed.cp = {"records": records, "data": {}, "left": len(records), "waves": [], "through": records[-1].seq,
                   "error": 0, "stage": "reading"}
        for r in records:
            self.out.append(A.DiskRead(self._op(("cp_read", (feed, r))), feed.p.journal_disk, r.data_off, r.length))

    def _cp_step(self, feed):
        cp = feed.cp
        if cp["error"]:
            self.out.append(A.Notify("consistency_point_failed", source=feed.p.name, error=cp["error"]))
            feed.cp = None                  # the records stay in the file; the next signal retries
            return
        if cp["stage"] == "read":
            cp["waves"] = waves(cp["records"])
            cp["stage"] = "write"
        if cp["stage"] == "write" and cp["waves"]:
            wave = cp["waves"].pop(0)
            cp["left"] = len(wave)
            for r in wave:
                self.out.append(A.DiskWrite(self._op(("cp", feed)), feed.p.image_disks[r.lun], r.offset,
                                            cp["data"][r.seq]))
            return
        if cp["stage"] == "write" and self.params.buggify("log_destage_no_flush"):     # (a broken variant)
            cp["stage"] = "flush"
        elif cp["stage"] == "write":
            cp["stage"] = "flush"
            disks = sorted({feed.p.image_disks[r.lun] for r in cp["records"]})
            cp["left"] = len(disks)
            for d in disks:
                self.out.append(A.DiskFlush(self._op(("cp", feed)), d))
            return
        if cp["stage"] == "flush":
            # the header moves the head past the applied records; they stay in feed.records (and
            # their file space unused) until the header is durable
            cp["stage"] = "header"
            n = len(cp["records"])
            rest = list(feed.records)[n:]
            # no record left: the head is where the next one goes, and a tail at the very end of
            # the ring means its start (seed 412026; see _write_header)
            head = rest[0].data_off - LF.RECORD_ALIGN if rest else LF.ring_offset(feed.tail, feed.p.journal_bytes)
            cp["left"] = 1
            self._write_header(feed, ("cp", feed), cp["through"], head, cp["through"] + 1, feed.cp_count + 1)
            return
        if cp["stage"] == "header" and self.params.buggify("log_destage_no_flush"):    # (a broken variant)
            cp["stage"] = "header_flush"
        elif cp["stage"] == "header":
            cp["stage"] = "header_flush"
            cp["left"] = 1
            self.out.append(A.DiskFlush(self._op(("cp", feed)), feed.p.journal_disk))
            return
        for _ in cp["records"]:
            feed.records.popleft()
        feed.applied_seq = cp["through"]
        feed.cp_count += 1
        feed.cp = None
        self.stats["consistency_points"] += 1
        self.out.append(A.Notify("image_applied", source=feed.p.name, through_seq=feed.applied_seq,
                                 cp_count=feed.cp_count))
        if feed.link.up:
            self._ack(feed, msg_type=T.CONSISTENCY_POINT)
        self._pump_cp(feed)
        self._file(feed)

    def disk_done(self, op, error, data):
        kind, what = self.ops.pop(op)
        if kind == "boot_flush":
            self._boot_flushed(what, error)
        elif kind == "header":
            self._header_read(what, error, data)
        elif kind == "header_init":
            if error:
                self.out.append(A.Notify("journal_error", source=what.p.name, error=error))
            else:
                self._scan_done(what)
        elif kind == "scan":
            self._scan_chunk(what, error, data)
        elif kind == "file":
            feed = what
            if error:
                self.stats["disk_errors"] += 1
                feed.file_error = error
            feed.filing -= 1
            if feed.filing == 0:
                feed.filing = len(feed.filing_batch)
                if feed.file_error:         # write the batch again at the same places
                    feed.file_error = 0
                    self.out.append(A.Notify("journal_error", source=feed.p.name, error=error))
                    self._refile(feed)
                else:
                    self._filed_writes_done(feed)
        elif kind == "file_flush":
            if error:
                self._refile(what)
            else:
                self._filed(what)
        elif kind == "cp_read":
            feed, r = what
            cp = feed.cp
            cp["data"][r.seq] = data
            cp["error"] = cp["error"] or error
            cp["left"] -= 1
            if cp["left"] == 0:
                cp["stage"] = "read"
                self._cp_step(feed)
        elif kind == "cp":
            cp = what.cp
            cp["error"] = cp["error"] or error
            cp["left"] -= 1
            if cp["left"] == 0:
                self._cp_step(what)
        elif kind == "read":
            req = what
            self.out.append(A.HostReply(req, EIO) if error else A.HostReply(req, 0, data))
        return self._take()

    def _refile(self, feed):
        """A file write or flush failed: drop the batch's records and file it again."""
        batch = feed.filing_batch
        for _ in batch:
            r = feed.records.pop()
            feed.tail = r.data_off - LF.RECORD_ALIGN
        feed.filing, feed.filing_batch = 0, []
        self._file(feed)

    # -- hosts: the image volumes, read-only ---------------------------------------------------

    def host_read(self, req, lun, offset, length):
        feed, image_lun = self.by_disk.get(lun, (None, 0))
        if feed is None or offset < 0 or offset + length > feed.p.lun_sizes[image_lun]:
            self.out.append(A.HostReply(req, EINVAL))
        else:
            self.out.append(A.DiskRead(self._op(("read", req)), lun, offset, length))
        return self._take()

    def host_write(self, req, lun, offset, data, fua=False):
        self.out.append(A.HostReply(req, EPERM))      # an image volume is read-only
        return self._take()

    def host_write_zeroes(self, req, lun, offset, length, fua=False):
        return self.host_write(req, lun, offset, b"")

    def host_trim(self, req, lun, offset, length):
        return self.host_write(req, lun, offset, b"")

    def host_flush(self, req, lun):
        self.out.append(A.HostReply(req))
        return self._take()

    def start(self):
        return self._take()

    def tick(self, now_ms):
        self.now_ms = now_ms
        self._tick_links(now_ms)
        return self._take()

    def _link_stats(self):
        """Every source's link counters added up (update keeps the zeros status shows)."""
        total = collections.Counter()
        for f in self.feeds:
            total.update(f.link.stats)
        return dict(total)

    def status(self):
        ready = all(f.ready and f.link.up for f in self.feeds)
        return {"mode": "replica", "replica_variant": "log", "role": "destination",
                "link": "shipping" if ready else "waiting",
                "sources": {f.p.name: {"link": f.link.state, "ready": f.ready, "stored_seq": f.expected - 1,
                                       "filed_seq": f.filed_seq, "applied_seq": f.applied_seq,
                                       "nvram_entries": len(f.staged), "file_records": len(f.records),
                                       "consistency_points": f.cp_count, "early": len(f.early),
                                       "link_stats": dict(f.link.stats)}
                            for f in self.feeds},
                "link_stats": self._link_stats(),
                "stats": dict(self.stats), "owned_luns": [], "generation": 1}
