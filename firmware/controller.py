"""The controller's shared parts: driven by events, returning actions.

`Controller` is abstract: a mode composes it with the ownership it needs
(firmware/owners.py lists the questions it asks): HaController
(firmware/ha/controller.py), ReplicaController (firmware/replica/controller.py).

The write path (firmware/writepath.py, `ctrl.write_path`) stores a host write
copy-on-write in the primary NVRAM segment and holds its copy requests in the
holding pen until every block is valid; then the mode's copy step
(`_release_pen`: here the mirror, which replica mode replaces with its copy to
the secondary) sends them all together. The partner persists them into the corresponding blocks of its mirror segment
(claims 1.7-1.11) and acknowledges; only then is the host acknowledged. Dirty
lines are destaged by watermark and idle policy, bracketed by flush-begin and
flush-done messages (claims 5.12-5.14).

I/O for a LUN the partner owns is forwarded to the owner over the link: the
owner's cache is the one coherent copy, and forwarding keeps ownership stable
while a host uses both paths, like the non-optimized paths of an ALUA array.

When the link is down the owner keeps serving: writes land in its own NVRAM
only (durable across its own crash and a power cut) and are destaged
eagerly; when the link comes back a resync sends every live line to the
partner before the pair counts as mirrored again.

Entry points: host_requests (a loop turn's batch), host_read, host_write, host_flush,
host_trim, host_write_zeroes, host_block_status (answered by firmware/allocation.py),
link_connected, link_frame, link_disconnected, disk_done, tick. Each returns the list of
actions to carry out, in order.
"""
import collections

from . import actions as A
from .cache import SECTOR_BYTES, PrimaryCache
from .formats import FormatError
from .formats import frame as F
from .formats import messages as M
from .formats import nvram as N
from .link import LinkSession
from .allocation import Allocation
from .destage import DestageMixin
from .destage_policy import DestagePolicy
from .diskhealth import DiskHealth
from . import mirrorsync as MS
from .mirror import MirrorSide
from .forwarding import Forwarder
from .params import Params
from .peer import PeerMixin
from .requests import BLOCK_STATUS, FLUSH, READ, TRIM, WRITE, ZEROES, Forwarded, WriteOp
from .recovery import recover
from .segment import Segment
from .writepath import WritePath
from .zeroes import ZeroPiece

_crc32c = N.crc32c_raw

EIO, EINVAL, ENOSPC, ESTALE = 5, 22, 28, 116


class Controller(DestageMixin, PeerMixin):
    """The shared parts. Abstract: a mode adds its ownership (firmware/owners.py)."""

    _forwards_block_status = True         # replica mode asks nobody (firmware/replica/controller.py)

    def __init__(self, params: Params, nv, key: bytes, now_ms: int = 0):
        self.params = params
        self.id = params.controller_id
        self.nv = nv
        self.out = []
        self.now_ms = now_ms
        self.buggify = params.buggify
        self.buggify_on = params.buggify_on     # skip the calls on the hot path when nothing is broken
        self.on_serve = params.on_serve         # a checker's hook (firmware/params.py), None in production
        sb, self.sb_slot = N.read_superblock_untrusted(nv, "NVRAM")
        if sb.controller_id != self.id or sb.pair_id != params.pair_id:
            raise FormatError(f"NVRAM belongs to controller {sb.controller_id} of pair "
                              f"{sb.pair_id.hex()}, not controller {self.id} of {params.pair_id.hex()}")
        if sb.nvram_size_bytes > len(nv):
            raise FormatError(f"NVRAM of {len(nv)} bytes, its superblock says {sb.nvram_size_bytes}")
        if sb.block_size_bytes != params.block_size_bytes:
            raise FormatError(f"NVRAM has {sb.block_size_bytes} B cache blocks, config says "
                              f"{params.block_size_bytes}")
        self.sb = sb
        self.generation = sb.generation
        geometry = N.Geometry(sb)
        self.block_size = sb.block_size_bytes
        self.primary = Segment(nv, geometry, mirror=False)
        self.cache = PrimaryCache(self.primary.blocks, self.block_size)
        self.mirror = MirrorSide(Segment(nv, geometry, mirror=True), self.block_size // SECTOR_BYTES)
        self.mirror_blocks_per_message = max(1, params.mirror_message_bytes_max // self.block_size)
        self.link = LinkSession(
            self.id, params.pair_id, key, mode=0 if params.mode == "ha" else 1,
            generation=self.generation, block_size_bytes=self.block_size,
            primary_blocks=self.primary.blocks, reliable_transport=params.reliable_transport,
            data_window_bytes=params.data_window_bytes,
            heartbeat_interval_ms=params.heartbeat_interval_ms,
            heartbeat_timeout_ms=params.heartbeat_timeout_ms)
        self.sync_state = MS.DOWN         # is the partner's mirror a copy of our cache (firmware/mirrorsync.py)
        self.acks_owed = 0                # writes committed for the partner, not yet acknowledged
        self.ack_seq = 0
        self.resync_lines = []            # lines the resync sent, pinned until SYNC_DONE
        self.resync_progress = None       # lines total / transferred / remaining of the running resync
        self.pending = {}                 # write seq -> WriteOp awaiting the mirror ack
        self.link_session = 0             # link sessions established so far (Forwarded requests carry theirs)
        self.disk_ops = {}                # op id -> ReadOp | DestageOp
        self.next_op = 1
        self.flushing_keys = collections.Counter()
        self.flush_queue = {}             # lun -> ops whose writes wait for the next disk flush
        self.flush_busy = set()           # LUNs with a DiskFlush in flight
        self.flush_queue_lines = collections.Counter()   # lun -> destaged lines waiting for a flush
        self.flush_urgent = set()         # LUNs where a host write or a replay waits for the flush
        self.destage_writing = collections.Counter()     # lun -> destage writes in flight
        self.destage_flush_batch_lines = max(1, params.destage_flush_batch_bytes // self.block_size)
        self.flush_begin_refs = []        # sent together when the output is taken
        self.refs_due = False             # batch_link_output: send them even with nothing else
        self.flush_done_refs = []
        self.destage = DestagePolicy(params, self.cache, self.block_size)   # when, and which lines
        self.destage_inflight = 0
        self.last_host_io_ms = now_ms
        self.stats = collections.Counter()
        self.forwarder = Forwarder(self.link, self.stats, params.forward_inflight_max,
                                   params.forward_inflight_bytes_max, params.waiting_max)
        self.disk_health = DiskHealth(len(params.lun_sizes), params)
        self.allocation = Allocation(self, self.cache, self.link, self._forwards_block_status)   # block status
        self.ownership = None             # the mode's ownership part (firmware/owners.py), set by the mode
        # Recovery rebuilds the cache and the mirror's view from NVRAM alone (firmware/recovery.py).
        next_seq, actions = recover(params, self.primary, self.cache, self.mirror, self.generation)
        self.out.extend(actions)
        self.write_path = WritePath(self, params, self.cache, self.primary, self.disk_health, next_seq)

    def owns(self, lun) -> bool:
        """Is `lun` ours now (its host I/O is done here)?"""
        return self.ownership.owns(lun)

    @property
    def mirroring(self) -> bool:
        """The link is up and the partner's mirror holds every dirty line of ours."""
        return self.sync_state in MS.MIRRORING

    @property
    def sync_pending(self) -> bool:
        """A resync of ours runs: the partner has not answered its SYNC_DONE yet."""
        return self.sync_state in MS.PENDING

    def start(self):
        """The actions recovery produced (persist cleanups, notifications)."""
        return self._take()

    def status(self) -> dict:
        """What `twincache status` shows: role, link, LUNs, block counts, generation."""
        cache = self.cache
        owned = [f"lun{lun}" for lun in range(len(self.params.lun_sizes)) if self.ownership.owns(lun)]
        dirty_by_lun = collections.Counter(line.lun for line in cache.lines.values())
        luns = self.ownership.lun_status(dirty_by_lun)
        link = self.link.state
        if self.link.up:
            link = "mirrored" if self.mirroring else "resyncing"
        return {
            "controller": "ab"[self.id], "role": "owner" if owned else "partner",
            "mode": self.params.mode, "link": link, "owned_luns": owned,
            "generation": max([self.generation] + [lun["generation"] for lun in luns.values()]),
            "dirty_blocks": cache.dirty_lines,
            "used_blocks": cache.used_blocks, "free_blocks": len(cache.free),
            "primary_blocks": cache.capacity, **self.mirror.counts(),
            "pending_mirror_writes": len(self.pending), "waiting_writes": len(self.write_path.waiting),
            "forwarded_inflight": len(self.forwarder.inflight), "forwarded_waiting": len(self.forwarder.waiting),
            "destage_inflight": self.destage_inflight, "stats": dict(self.stats),
            "resync": dict(self.resync_progress) if self.resync_progress else None,
            "link_stats": dict(self.link.stats),
            "disks": self.disk_health.status(self.now_ms),
            "luns": luns,
        }

    # -- helpers --------------------------------------------------------------

    def _take(self):
        if not self.params.batch_link_output:
            self._queue_refs()
        out, self.out = self.out, []
        return out

    def _reply(self, req, error=0, data=None):
        if req.__class__ is ZeroPiece:
            self.write_path.piece_done(req, error)
            return
        if req.__class__ is Forwarded:
            # Only in the session it came in: the forwarder failed it when that session ended, and
            # its tag is reused by the next one. Answered there (it was held while the LUN settled),
            # its data answered the new session's request of that tag (seed 831457 at 300 steps: a
            # 256 KiB read through a returned 48 KiB, another read's data).
            if data.__class__ is list:          # block status runs (firmware/allocation.py)
                data = M.pack_block_runs(data)
            payload = (M.IO_REPLY_HEAD.pack(error), data) if data is not None else M.IO_REPLY_HEAD.pack(error)
            if self.link.up and req.session == self.link_session:
                self.link.send(M.MsgType.IO_REPLY, M.Resource.HOST_IO, payload, tag=req.tag,
                               flags=F.FLAG_RESPONSE,
                               lane=F.LANE_DATA if data is not None else F.LANE_CONTROL)
            return
        self.out.append(A.HostReply(req, error, data))

    def _check_range(self, lun, offset, length):
        if not 0 <= lun < len(self.params.lun_sizes):
            return EINVAL
        if offset < 0 or length < 0 or offset + length > self.params.lun_sizes[lun]:
            return ENOSPC if length else EINVAL
        if offset % SECTOR_BYTES or length % SECTOR_BYTES:
            return EINVAL
        return 0

    def _disk_op(self, entry) -> int:
        """A new disk operation's id, `entry` waiting for its completion (disk_done)."""
        op = self.next_op
        self.next_op += 1
        self.disk_ops[op] = entry
        return op

    def _disk_write_failed(self, lun, offset, error):
        """A data write to the LUN's disk failed: disk health backs off and reports, coalesced."""
        self.out.extend(self.disk_health.write_failed(lun, offset, error, self.now_ms))

    def _disk_health_tick(self):
        """Disk health's reports and degraded LUNs due now: a degraded LUN's waiting writes are
        refused, parked lines probe the disk, and a LUN with nothing of it left here is
        forgotten (firmware/diskhealth.py)."""
        health = self.disk_health
        if not health.failing and not health.pending:
            return
        notes, degraded = health.tick(self.now_ms)
        self.out.extend(notes)
        health.probe_parked(self.now_ms, self.cache)
        for lun in degraded:
            self.write_path.refuse_waiting(lun)
        for lun in list(health.failing):
            if not self.owns(lun) and not any(line.lun == lun for line in self.cache.lines.values()):
                self.out.extend(health.forget(lun, self.now_ms, "no line of the LUN is left here"))
                health.unpark(lun, self.cache)

    def _persist(self, rng):
        if not (self.buggify_on and self.buggify("skip_persist_metadata")):  # a broken variant
            self.out.append(A.Persist(rng[0], rng[1]))

    # -- host I/O -------------------------------------------------------------

    def host_requests(self, batch):
        """A loop turn's host requests (HostRequest records, firmware/requests.py), handled in
        order: one action list for them all. The entry points below take one each."""
        wp = self.write_path
        for h in batch:
            kind = h.kind
            if kind == WRITE:
                wp.host_write(h.req, h.lun, h.offset, h.arg, h.fua)
            elif kind == READ:
                wp.host_read(h.req, h.lun, h.offset, h.arg)
            elif kind == FLUSH:
                wp.host_flush(h.req, h.lun)
            elif kind == ZEROES:
                wp.host_write_zeroes(h.req, h.lun, h.offset, h.arg, h.fua)
            elif kind == TRIM:
                wp.host_trim(h.req, h.lun, h.offset, h.arg)
            elif kind == BLOCK_STATUS:
                self.allocation.ask(h.req, h.lun, h.offset, h.arg)
            else:
                raise ValueError(f"a host request of kind {kind!r}")
        return self._take()

    def host_write(self, req, lun, offset, data, fua=False):
        self.write_path.host_write(req, lun, offset, data, fua)
        return self._take()

    def host_read(self, req, lun, offset, length):
        self.write_path.host_read(req, lun, offset, length)
        return self._take()

    def host_flush(self, req, lun):
        self.write_path.host_flush(req, lun)
        return self._take()

    def host_trim(self, req, lun, offset, length):
        self.write_path.host_trim(req, lun, offset, length)
        return self._take()

    def host_write_zeroes(self, req, lun, offset, length, fua=False):
        self.write_path.host_write_zeroes(req, lun, offset, length, fua)
        return self._take()

    def host_block_status(self, req, lun, offset, length):
        """Reply with [(length_bytes, status), ...] runs from `offset`, within `length`."""
        self.allocation.ask(req, lun, offset, length)
        return self._take()

    # -- the copy step and the NVRAM persists the write path asks for ------------------

    def _persist_runs(self, ranges, data=False):
        """Persist (offset, length) ranges in order, joining each with the next when adjacent."""
        if not data and self.buggify_on and self.buggify("skip_persist_metadata"):
            return                              # a broken variant for the simulator
        out = self.out
        offset, length = ranges[0]
        for o, n in ranges[1:]:
            if o == offset + length:
                length += n
            else:
                out.append(A.Persist(offset, length))
                offset, length = o, n
        out.append(A.Persist(offset, length))

    def _release_pen(self, req, seq, pen, fua, lun, offset, data):
        """All data valid: install the lines and send all mirror requests together (claims 2.4).
        `pen` is (line, crc) per block; the host's `lun`, `offset` and `data` are for a mode
        that copies the write whole (replica mode)."""
        cache = self.cache
        op = WriteOp(req, seq, [line for line, _ in pen], fua)
        for line in op.lines:
            old = cache.install(line)
            if old is not None:
                op.replaced.append(old)
        if not self.link.up:
            self.write_path.finish(op, mirrored=False, pinned=False)
            return
        count = len(pen)
        ctx = (M.CTX_FUA if fua else 0)
        step = self.mirror_blocks_per_message
        for first in range(0, count, step):
            part = pen[first:first + step]
            for line, _crc in part:
                line.pins += 1  # the queued frame views the block: it must not be reused before the ack
            self._send_mirror(op.lines[0].lun, ctx | (M.CTX_FIRST if first == 0 else 0)
                              | (M.CTX_LAST if first + step >= count else 0), seq,
                              self.ownership.mirror_generation_of(op.lines[0].lun), first, count, part)
        self.pending[seq] = op
        if self.buggify_on and self.buggify("ack_before_mirror"):
            self._reply(req, 0)                 # the broken variant the simulator must catch
            op.req = None

    # -- what ownership asks of the write path ------------------------------------

    def _lun_clean(self, lun) -> bool:
        """No line of `lun` is cached, waits for the mirror's ack or is on its way to disk."""
        return not any(line.lun == lun for line in self.cache.lines.values()) and not any(
            op.lines and op.lines[0].lun == lun for op in self.pending.values()) and not any(
            line.lun == lun for line in self._flushing_lines())

    def _forget_lines(self, lines, partner_copy_too):
        """Drop these lines (a newer owner has the LUN); with `partner_copy_too`, the partner
        frees its copies too (flush-done: the new owner replayed or voided its own)."""
        for line in lines:
            line.dead = True
            if partner_copy_too:
                self.flush_done_refs.append((line.block, line.seq))
            self.write_path.maybe_free(line)

    def _destage_now(self):
        """Destage every dirty line now, whatever the watermarks (a LUN is being handed over)."""
        self.destage.start()
        self._pump()
