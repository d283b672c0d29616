"""Replica mode, variant 1: cache-acknowledged mirroring with a destage record.

Each controller owns its own disks. The primary stores a host write in its
cache (copy-on-write into its primary NVRAM segment, as in ha mode), marks the
write's ranges in its SENT record, and sends the write to the secondary as
one REPLICATE message. The secondary stores it in its own cache, marks the
ranges in its RECEIVED record and acknowledges at the configured level:
"cache" (the ack frame goes out before the NVRAM persists), "nvram" (after
them) or "disk" (after the lines are destaged). Only then does the primary
reply to the host (claims 1, 21). Both destage on their own schedule; the
secondary picks what to destage from its mirror of the primary's record,
range by range (claims 13). A side whose cache no longer holds anything of a
range after a destage tells the other with DESTAGED_RANGE; the other clears
that range in SENT (unless a copy to it is still unacknowledged) and in
RECEIVED (claims 7-11, 14-18): firmware/replica/destage.py.

While the peer is away the primary goes on serving and recording; at the
next link-up both sides exchange REPLICA_STATE, each computes the same
verdict from the generation identifiers (firmware/replica/generations.py) and the
resync (firmware/replica/resync.py) resends only recorded ranges. Promotion, split
brain and its resolution by policy are here too. The replica session is the
TRANSITIONS table below; a (state, event) pair not in it is a protocol error
and resets the link.

This module is variant "bitmap"; variant "log" (NVRAM-log shipping) is
firmware/logship/.
"""
import collections
from operator import attrgetter

from .. import actions as A
from ..controller import EIO, Controller
from ..owners import FixedOwnership
from ..requests import HERE, TAKEN, WRITE, HostRequest, WriteOp
from ..formats import frame as F
from ..formats import messages as M
from ..formats.nvram import crc32c
from .generations import POLICIES, Side, decide, victim
from ..link import LinkProtocolError
from .record import RECEIVED, SENT, Record
from .destage import DestagedMixin
from .resync import QuickResync, ResyncRead

EPERM = 1
T = M.MsgType
PRIMARY, SECONDARY = M.ROLE_PRIMARY, M.ROLE_SECONDARY
VARIANTS = ("bitmap", "log")
REPLICATING = ("synced", "sync-source")          # the primary copies host writes to the peer


class ReplicaError(LinkProtocolError):
    """The peer sent a replica message that cannot be right: the link is reset."""


class ReplicaSettings:
    """Replica mode knobs (config [replica]); `new_uuid` is the injected source of fresh uuids."""

    def __init__(self, new_uuid, *, variant="bitmap", ack="cache", range_bytes=64 << 10,
                 resync_rate_bytes_s=0, resync_inflight_max=16, auto_promote_after_ms=0,
                 initial_primary=0, held_max=1024):
        assert variant in VARIANTS and ack in M.ACK_LEVELS
        assert variant == "bitmap", "variant 'log' is reserved: not built in this module"
        assert resync_inflight_max > 0 and held_max > 0
        self.new_uuid = new_uuid
        self.variant = variant
        self.ack = ack
        self.ack_level = M.ACK_LEVELS.index(ack)
        self.range_bytes = range_bytes
        self.resync_rate_bytes_s = resync_rate_bytes_s
        self.resync_inflight_max = resync_inflight_max
        self.auto_promote_after_ms = auto_promote_after_ms
        self.initial_primary = initial_primary
        self.held_max = held_max


class ReplicaReq:
    """A REPLICATE being stored here; replying to it sends REPLICATE_ACK."""
    __slots__ = ("seq", "flags", "session", "remaining")

    def __init__(self, seq, flags, session):
        self.seq = seq
        self.flags = flags
        self.session = session
        self.remaining = 0


# (state, event) -> (handler, next state). States: standalone (no peer), waiting (link up,
# REPLICA_STATE sent), sync-source / sync-target (resync under way), synced, split-brain.
TRANSITIONS = {
    ("standalone", "link_up"): ("_on_up", "waiting"),
    ("waiting", "become_source"): ("_on_source", "sync-source"),
    ("waiting", "become_target"): ("_on_target", "sync-target"),
    ("waiting", "diverged"): ("_on_diverged", "split-brain"),
    ("sync-source", "resync_complete"): ("resync.finish_source", "synced"),
    ("sync-target", "resync_done"): ("resync.finish_target", "synced"),
    ("standalone", "link_down"): ("_on_down", "standalone"),
    ("waiting", "link_down"): ("_on_down", "standalone"),
    ("sync-source", "link_down"): ("_on_down", "standalone"),
    ("sync-target", "link_down"): ("_on_down", "standalone"),
    ("synced", "link_down"): ("_on_down", "standalone"),
    ("split-brain", "link_down"): ("_on_down", "standalone"),
}
STATES = ("standalone", "waiting", "sync-source", "sync-target", "synced", "split-brain")
EVENTS = ("link_up", "become_source", "become_target", "diverged", "resync_complete", "resync_done",
          "link_down")
LINK_NAMES = {"standalone": "down", "waiting": "connecting", "synced": "mirrored",
              "sync-source": "resyncing", "sync-target": "resyncing", "split-brain": "split-brain"}


def initial_uuid(pair_id: bytes) -> int:
    """The data generation of a new pair: the same on both sides, derived from the pair id."""
    return int.from_bytes(pair_id[:8], "big") | 1


class ReplicaOwnership(FixedOwnership):
    """The primary owns every LUN; its role, the record's state and the handshake decide where
    a host request goes."""

    def owns(self, lun) -> bool:
        return self.ctrl.rec.role == PRIMARY and 0 <= lun < len(self.ctrl.params.lun_sizes)

    def allocation_known_here(self, lun) -> bool:
        return False

    def route(self, kind, req, lun, offset, arg, fua):
        ctrl = self.ctrl
        rec = ctrl.rec
        if req.__class__ is ReplicaReq:
            # A copy from the primary that waited for free blocks, routed again when they came:
            # stored as it came, no host write (refused with EPERM here, it ended every resync
            # that filled a restarted secondary's cache). One from an ended session is dropped:
            # the primary's SENT record resends its range, and newer data may have come since.
            return HERE if req.session == ctrl.session_no and rec.role == SECONDARY else TAKEN
        if kind == WRITE:
            if rec.role != PRIMARY:
                ctrl.stats["writes_refused_secondary"] += 1
                ctrl._reply(req, EPERM)          # the secondary is read-only until promoted
                return TAKEN
            if rec.flags & (M.STATE_FRESH | M.STATE_INCONSISTENT):
                ctrl._reply(req, EIO)            # has not met its peer yet, or is mid-resync
                return TAKEN
            if ctrl.sync == "waiting":
                if len(ctrl.held) >= ctrl.params.replica.held_max:
                    ctrl._reply(req, EIO)
                else:
                    ctrl.held.append(HostRequest(WRITE, req, lun, offset, bytes(arg), fua))
                return TAKEN
            return HERE
        if rec.has(M.STATE_INCONSISTENT):
            ctrl._reply(req, EIO)                # a mix of old and new data: never served
            return TAKEN
        return HERE


class ReplicaController(DestagedMixin, Controller):
    Error = ReplicaError

    # Block status answers "all data" in replica mode: correct, not sparse. Its destage
    # and resync paths were not reviewed for when a range first reaches disk.
    _forwards_block_status = False

    def __init__(self, params, nv, key, now_ms=0):
        assert params.mode == "replica" and params.replica is not None
        super().__init__(params, nv, key, now_ms)
        s = params.replica
        assert s.range_bytes % self.block_size == 0 and s.range_bytes <= params.max_write_bytes
        role = PRIMARY if self.id == s.initial_primary else SECONDARY
        self.rec = Record(nv, self.sb.bitmap_offset, self.sb.bitmap_bytes, params.lun_sizes, s.range_bytes,
                          initial_uuid(params.pair_id), role)
        if self.rec.formatted:
            for r in self.rec.format_ranges():
                self._persist(r)
        for error in self.rec.errors:
            self.out.append(A.Notify("nvram_dropped", segment="replica-header", block=-1, reason=error))
        self.sync = "standalone"
        self.session_no = 0
        self.hs_me = self.peer_side = None
        self.sync_full, self.sync_reason = False, ""
        self.resync = QuickResync(self, self.rec, self.link, self.cache, self.write_path, s)   # both ends of a resync
        self.pending_ranges = {}                      # write seq -> (lun, ranges) awaiting the ack
        self.inflight_ranges = collections.Counter()  # (lun, r) -> copies not yet acknowledged
        self.peer_record = collections.OrderedDict()  # mirror of the peer's record: (lun, r), oldest first
        self.destaged_out = set()
        self.disk_waiters = {}                        # Line -> [ReplicaReq] (ack level "disk")
        self.held = collections.deque()               # host writes held during the handshake
        self.down_since_ms = now_ms
        self.ownership = ReplicaOwnership(self)
        self.out.append(A.Notify("replica_recovered", **self._ids(), sent_bits=self.rec.counts[SENT],
                                 received_bits=self.rec.counts[RECEIVED], formatted=self.rec.formatted))

    # -- the replica session table ------------------------------------------

    def _fire(self, event, *args):
        try:
            handler, next_state = TRANSITIONS[(self.sync, event)]
        except KeyError:
            raise ReplicaError(f"{event} not allowed in replica state {self.sync}") from None
        prev, self.sync = self.sync, next_state
        attrgetter(handler)(self)(*args)
        if prev != next_state:
            self.out.append(A.Notify("replica_state", state=next_state, prev=prev))

    @property
    def mirroring(self) -> bool:
        """The session is up and the peer's copy in sync (the session table's "synced")."""
        return self.sync == "synced"

    def _side(self) -> Side:
        rec = self.rec
        return Side(self.id, role=rec.role, flags=rec.flags, generation=rec.generation,
                    current_uuid=rec.current_uuid, bitmap_uuid=rec.bitmap_uuid, history0=rec.history0,
                    history1=rec.history1, sent_bits=rec.counts[SENT], received_bits=rec.counts[RECEIVED])

    def _ids(self) -> dict:
        rec = self.rec
        return {"role": "primary" if rec.role == PRIMARY else "secondary",
                "current_uuid": f"{rec.current_uuid:016x}", "bitmap_uuid": f"{rec.bitmap_uuid:016x}",
                "history": [f"{rec.history0:016x}", f"{rec.history1:016x}"], "generation": rec.generation}

    def _on_link_up(self):
        self.out.append(A.Notify("link_up", peer=self.link.peer.controller_id))
        self._fire("link_up")

    def _on_up(self):
        self.session_no += 1
        self.hs_me = me = self._side()
        body = M.ReplicaState.build(dict(
            role=me.role, flags=me.flags, ack_level=self.params.replica.ack_level, reserved0=0,
            range_bytes=self.rec.range_bytes, generation=me.generation, current_uuid=me.current_uuid,
            bitmap_uuid=me.bitmap_uuid, history0=me.history0, history1=me.history1,
            sent_bits=me.sent_bits, received_bits=me.received_bits, reserved=bytes(8)))
        self.link.send(T.REPLICA_STATE, M.Resource.REPLICATION, body, lane=F.LANE_CONTROL)

    def _on_replica_state(self, msg):
        body = M.parse_body_untrusted(T.REPLICA_STATE, msg.payload, "REPLICA_STATE")
        if body.range_bytes != self.rec.range_bytes:
            raise ReplicaError(f"peer records {body.range_bytes} B ranges, this side {self.rec.range_bytes}")
        if body.role not in (PRIMARY, SECONDARY):
            raise ReplicaError(f"peer claims role {body.role}")
        self.peer_side = Side(1 - self.id, **{k: body[k] for k in Side.__slots__[1:]})
        event, full, reason = decide(self.hs_me, self.peer_side)
        self.sync_full, self.sync_reason = full, reason
        self.out.append(A.Notify("replica_decision", verdict=event, full=full, reason=reason, **self._ids(),
                                 peer_current_uuid=f"{body.current_uuid:016x}",
                                 peer_bitmap_uuid=f"{body.bitmap_uuid:016x}"))
        self._fire(event)

    def _on_source(self):
        self.resync.session_starts()
        self._release_held()

    def _on_target(self):
        rec = self.rec
        values = dict(flags=rec.flags | M.STATE_INCONSISTENT)
        if rec.role == PRIMARY:
            values.update(role=SECONDARY, generation=rec.generation + 1)
            self.out.append(A.Notify("demoted", reason=self.sync_reason))
        for r in rec.update(**values):
            self._persist(r)
        self.peer_record.clear()
        self.resync.send_request()
        self.out.append(A.Notify("resync_start", side="target", full=self.sync_full,
                                 own_bits=rec.counts[SENT]))
        self._release_held()

    def _on_diverged(self):
        self.out.append(A.Notify("split_brain", reason=self.sync_reason, **self._ids(),
                                 peer_current_uuid=f"{self.peer_side.current_uuid:016x}"))
        self._release_held()

    def _on_down(self):
        self.resync.session_ended()
        self.inflight_ranges.clear()
        self.disk_waiters.clear()
        self.down_since_ms = self.now_ms
        pending, self.pending = self.pending, {}
        self.pending_ranges.clear()
        if pending:
            self._new_data_generation()      # acknowledged without the peer: data it does not have
        for seq in sorted(pending):
            self.write_path.finish(pending[seq], mirrored=False, pinned=False)
        self._release_held()

    def _link_failed(self, reason, reset=True):
        self.out.append(A.Notify("link_down", reason=reason))
        if reset:
            self.out.append(A.LinkReset(reason))
        self.link.disconnected()
        self._fire("link_down")
        self._pump()

    def _dispatch(self, msg):
        handler = DISPATCH.get(msg.type)
        if handler is None:
            raise ReplicaError(f"message type {msg.type} has no place in replica mode")
        handler(self)(msg)

    # -- host I/O -------------------------------------------------------------

    def _persist(self, rng):
        if not (self.buggify_on and self.buggify("replica_skip_persist")):      # (a broken variant)
            super()._persist(rng)

    def _persist_runs(self, ranges, data=False):
        if not (self.buggify_on and self.buggify("replica_skip_persist")):      # (a broken variant)
            super()._persist_runs(ranges, data)

    def _release_held(self):
        held, self.held = self.held, collections.deque()
        for h in held:
            self.write_path.reenter(h)

    def _release_pen(self, req, seq, pen, fua, lun, offset, data):
        """All data valid and in this cache: record, then copy to the peer or complete alone."""
        op = WriteOp(req, seq, [line for line, _ in pen], fua)
        for line in op.lines:
            old = self.cache.install(line)
            if old is not None:
                op.replaced.append(old)
                self._move_waiters(old, line)
        ranges = self.rec.ranges_of(lun, offset, len(data))
        if req.__class__ is ReplicaReq:
            self._replica_stored(op, req, lun, ranges)
            return
        self.resync.host_wrote(lun, ranges)
        for p in self.rec.set(SENT, lun, ranges):       # recorded before the copy leaves
            self._persist(p)
        if self.sync not in REPLICATING or self.buggify("replica_skip_copy"):   # (a broken variant)
            self._new_data_generation()
            self.write_path.finish(op, mirrored=False, pinned=False)
            return
        head = M.REPLICATE_HEAD.pack(seq, lun, M.REPL_FUA if fua else 0, 0, offset, crc32c(data), len(data))
        self.link.send(T.REPLICATE, M.Resource.REPLICATION, (head, bytes(data)))
        for r in ranges:
            self.inflight_ranges[(lun, r)] += 1
        self.pending[seq] = op
        self.pending_ranges[seq] = (lun, ranges)

    def _new_data_generation(self):
        """The first write the peer does not get: bitmap uuid := current, current := new."""
        rec = self.rec
        if rec.role != PRIMARY or rec.bitmap_uuid:
            return
        for r in rec.update(bitmap_uuid=rec.current_uuid, current_uuid=self.params.replica.new_uuid()):
            self._persist(r)
        self.out.append(A.Notify("new_data_generation", **self._ids()))

    def _reply(self, req, error=0, data=None):
        cls = req.__class__
        if cls is ReplicaReq:
            if req.session == self.session_no and self.link.up:
                self.link.send(T.REPLICATE_ACK, M.Resource.REPLICATION,
                               M.REPLICATE_ACK.pack(req.seq, error, self.params.replica.ack_level,
                                                    req.flags & M.REPL_RESYNC, 0),
                               lane=F.LANE_CONTROL, flags=F.FLAG_RESPONSE)
        elif cls is ResyncRead:
            self.resync.read_done(req, error, data)
        else:
            super()._reply(req, error, data)

    # -- the secondary's side of the copy -------------------------------------

    def _on_replicate(self, msg):
        p = msg.payload
        if len(p) < M.REPLICATE_HEAD.size:
            raise ReplicaError(f"REPLICATE of {len(p)} bytes is shorter than its header")
        seq, lun, flags, _r, offset, crc, length = M.REPLICATE_HEAD.unpack_from(p)
        data = p[M.REPLICATE_HEAD.size:]
        if length != len(data) or crc32c(data) != crc:
            raise ReplicaError(f"REPLICATE {seq}: {len(data)} bytes, says {length}; or data CRC32C mismatch")
        resync = bool(flags & M.REPL_RESYNC)
        if self.rec.role != SECONDARY or self.sync not in ("synced", "sync-target") or (
                resync and self.sync != "sync-target"):
            raise ReplicaError(f"REPLICATE in state {self.sync} as {self._ids()['role']}")
        if self._check_range(lun, offset, length) or not 0 < length <= self.params.max_write_bytes:
            raise ReplicaError(f"REPLICATE {seq}: LUN {lun} [{offset}, +{length}) out of range")
        self.last_host_io_ms = self.now_ms
        self.stats["replicas_received"] += 1
        req = ReplicaReq(seq, flags, self.session_no)
        mark = len(self.out)
        fua = bool(flags & M.REPL_FUA)
        if self.write_path.waiting or len(self.cache.free) < self.write_path.lines_spanned(offset, length):
            self.write_path.wait(req, lun, offset, data, fua)
        else:
            self.write_path.store(req, lun, offset, data, fua)
        if self.params.replica.ack_level == M.ACK_CACHE and self.link.up:
            buffers = self.link.take_output()     # the ack overtakes this write's NVRAM persists
            if buffers:
                self.out.insert(mark, A.Transmit(buffers))

    def _replica_stored(self, op, req, lun, ranges):
        if not req.flags & M.REPL_RESYNC:
            for p in self.rec.set(RECEIVED, lun, ranges):   # the symmetric record
                self._persist(p)
        for r in ranges:
            self.peer_record.setdefault((lun, r), True)
        if self.params.replica.ack_level == M.ACK_DISK:
            req.remaining = len(op.lines)
            for line in op.lines:
                self.disk_waiters.setdefault(line, []).append(req)
            op.req = None
        self.write_path.finish(op, mirrored=True, pinned=False)

    def _move_waiters(self, old, new):
        waiters = self.disk_waiters.pop(old, None)
        if waiters:
            self.disk_waiters.setdefault(new, []).extend(waiters)

    def _on_replicate_ack(self, msg):
        if len(msg.payload) != M.REPLICATE_ACK.size:
            raise ReplicaError(f"REPLICATE_ACK of {len(msg.payload)} bytes")
        seq, status, _level, flags, _r = M.REPLICATE_ACK.unpack_from(msg.payload)
        if status:
            raise ReplicaError(f"peer refused replica {seq}: error {status}")
        if flags & M.REPL_RESYNC:
            self.resync.acked(seq)
            return
        op = self.pending.pop(seq, None)
        if op is None:
            raise ReplicaError(f"REPLICATE_ACK for unknown write {seq}")
        lun, ranges = self.pending_ranges.pop(seq)
        for r in ranges:
            self.inflight_ranges[(lun, r)] -= 1
            if not self.inflight_ranges[(lun, r)]:
                del self.inflight_ranges[(lun, r)]
        self.write_path.finish(op, mirrored=True, pinned=False)

    # -- operator: promotion and split-brain resolution ----------------------

    def promote(self, force=False, auto=False):
        """Make this side primary; refused while a connected peer is primary or mid-resync."""
        self._promote(force, auto)
        return self._take()

    def _promote(self, force, auto):
        rec = self.rec
        reason = None
        if rec.role == PRIMARY:
            reason = "already primary"
        elif self.sync in ("waiting", "sync-source", "sync-target") or (
                self.sync == "synced" and self.peer_side is not None and self.peer_side.role == PRIMARY):
            reason = f"the peer is connected ({self.sync}) and primary: demote it first, or cut the link"
        elif rec.flags & (M.STATE_INCONSISTENT | M.STATE_FRESH) and not force:
            reason = "this side's data is inconsistent (an unfinished resync) or unknown: --force to accept"
        if reason is not None:
            self.out.append(A.Notify("promote_refused", reason=reason))
            return
        peer_gen = self.peer_side.generation if self.peer_side is not None else 0
        values = dict(role=PRIMARY, generation=max(rec.generation, peer_gen) + 1,
                      flags=rec.flags & ~(M.STATE_INCONSISTENT | M.STATE_FRESH))
        if self.sync != "synced":                  # alone: a new data generation starts here
            values.update(current_uuid=self.params.replica.new_uuid())
            if not rec.bitmap_uuid:
                values.update(bitmap_uuid=rec.current_uuid)
        for r in rec.update(**values):
            self._persist(r)
        self.out.append(A.Notify("promoted", auto=auto, forced=force, **self._ids()))

    def demote(self):
        """Make this primary a secondary. Refused while a handshake, a resync or a split brain is
        under way, and while host writes are still being copied; a connected peer hears it in a
        new handshake (the link is reset), after which it can be promoted."""
        rec = self.rec
        reason = None
        if rec.role != PRIMARY:
            reason = "already secondary"
        elif self.sync == "split-brain":
            reason = "split brain: resolve it first (twincache resolve)"
        elif self.sync in ("waiting", "sync-source", "sync-target"):
            reason = f"the link is {LINK_NAMES[self.sync]} ({self.sync}): wait until it is mirrored or down"
        elif self.pending or self.held:
            reason = f"{len(self.pending) + len(self.held)} host writes are still being copied: stop the hosts first"
        if reason is not None:
            self.out.append(A.Notify("demote_refused", reason=reason))
            return self._take()
        for r in rec.update(role=SECONDARY, generation=rec.generation + 1):
            self._persist(r)
        self.out.append(A.Notify("demoted", reason="operator", **self._ids()))
        if self.sync != "standalone":
            self._link_failed("demoted by the operator: a new handshake tells the peer")
        return self._take()

    def resolve(self, policy):
        """After a split brain: discard the data of the side `policy` names (a new handshake follows)."""
        if policy not in POLICIES:
            self.out.append(A.Notify("resolve_refused", reason=f"unknown policy {policy!r}"))
            return self._take()
        if self.sync != "split-brain":
            self.out.append(A.Notify("resolve_refused", reason=f"no split brain here (state {self.sync})"))
            return self._take()
        loser = victim(policy, self.hs_me, self.peer_side)
        if loser is None:
            self.out.append(A.Notify("resolve_refused", reason=f"{policy} cannot tell the sides apart"))
            return self._take()
        self.out.append(A.Notify("resolved", policy=policy, victim="ab"[loser]))
        if loser == self.id:
            rec = self.rec
            for r in rec.update(role=SECONDARY, generation=rec.generation + 1,
                                flags=rec.flags | M.STATE_DISCARD):
                self._persist(r)
            self._link_failed(f"split brain resolved by {policy}: this side's data is discarded")
        return self._take()

    # -- time and status --------------------------------------------------------

    def tick(self, now_ms):
        self.now_ms = now_ms
        self.resync.tick()
        s = self.params.replica
        if (s.auto_promote_after_ms and self.rec.role == SECONDARY and self.sync == "standalone"
                and not self.rec.flags & (M.STATE_INCONSISTENT | M.STATE_FRESH)
                and now_ms - self.down_since_ms >= s.auto_promote_after_ms):
            self._promote(False, True)
        return super().tick(now_ms)

    def status(self) -> dict:
        st = super().status()
        rec = self.rec
        primary = rec.role == PRIMARY
        flags = [name for bit, name in ((M.STATE_FRESH, "fresh"), (M.STATE_INCONSISTENT, "inconsistent"),
                                        (M.STATE_DISCARD, "discard")) if rec.flags & bit]
        peer = self.peer_side
        st.update(role="primary" if primary else "secondary", link=LINK_NAMES[self.sync],
                  owned_luns=[f"lun{n}" for n in range(len(self.params.lun_sizes))] if primary else [],
                  generation=rec.generation, replica={
                      "variant": self.params.replica.variant, "state": self.sync,
                      "split_brain": self.sync == "split-brain", "reason": self.sync_reason,
                      "ack_level": self.params.replica.ack, "range_bytes": rec.range_bytes,
                      "record_bits": rec.counts[SENT], "record_bytes": rec.counts[SENT] * rec.range_bytes,
                      "received_bits": rec.counts[RECEIVED],
                      "received_bytes": rec.counts[RECEIVED] * rec.range_bytes,
                      "flags": flags, **self._ids(),
                      "resync": self.resync.status(),
                      "last_resync": self.resync.last_run, "pending_copies": len(self.pending),
                      "peer": None if peer is None else {
                          "role": "primary" if peer.role == PRIMARY else "secondary",
                          "current_uuid": f"{peer.current_uuid:016x}", "generation": peer.generation}})
        return st


DISPATCH = {  # message type -> its handler, the controller's or a part's (resync.*)
    T.REPLICATE: attrgetter("_on_replicate"),
    T.REPLICATE_ACK: attrgetter("_on_replicate_ack"),
    T.REPLICA_STATE: attrgetter("_on_replica_state"),
    T.RESYNC_REQUEST: attrgetter("resync.on_request"),
    T.RESYNC_DONE: attrgetter("resync.on_done"),
    T.DESTAGED_RANGE: attrgetter("_on_destaged_range"),
    T.PING: attrgetter("_on_ping"),
    T.PONG: attrgetter("_on_pong"),
    T.ERROR: attrgetter("_on_error"),
}
