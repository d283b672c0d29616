"""Ownership per LUN, fencing through the shared disks, takeover and handover.

Owns the per-LUN ownership state machine (the TRANSITIONS table below) and
the lease protocol on the reservation record (firmware/formats/reservation.py)
that keeps two controllers from ever both accepting I/O for one LUN.

Why two controllers never both serve a LUN (promise 4). Every duration is
measured by one controller on its own monotonic clock; no timestamps are
compared across controllers, so clock offset plays no part, and drift is
covered by the margins (takeover_wait_ms > lease_ms + renew_interval_ms).
1. An owner serves I/O for a LUN only while its lease is valid: until
   `lease_ms` after the start of its last successful renewal (a read of the
   record showing it still owns at its generation, then a counter bump), or,
   while the link is up and the partner mirrored, `lease_ms` after sending
   the newest frame the partner has acknowledged (so a one-way cut, where
   the owner still hears the partner but is not heard, ends the lease too).
   A mirrored owner whose link lease would not last the next renew interval
   (heartbeats no faster than the lease) renews the record as well. Every
   host request is checked against the lease when it is handled: a
   controller paused by SIGSTOP resumes with its clock past the lease, holds
   the request, and its next read of the record tells it whether it still
   owns the LUN.
2. The partner starts a takeover only when the link session is down, and
   then only after watching the record not change for `takeover_wait_ms`,
   counted from its last change seen or from the end of the session,
   whichever is later: an owner on its link lease moves no record, and that
   lease ends at most `lease_ms` after the newest frame of the owner the
   partner acknowledged, before the session ended. Every renewal writes a
   counter above every counter its writer wrote before, so each renewal that
   lands is a change the partner sees, and the owner's last lease began no
   later than that change; a renewal whose write failed without landing
   gives a lease the partner cannot see, which step 3 covers.
3. After writing its claim (owner = itself, generation + 2: above a solo
   bump the owner may land meanwhile, state CLAIMED, counter 0)
   the partner waits another `lease_ms + renew_interval_ms` and reads the
   record back: if the old owner renewed over it, the old owner is alive and
   the claim is dropped; if not, any lease the old owner could have granted
   itself in the race has expired too. Only then does it replay its mirror
   (every block, retrying failed writes) and serve. It renews while it
   replays, still CLAIMED, so a long replay looks alive to a returning old
   owner that watches the record; its first renewal after the replay writes
   SOLO. A controller that finds its own CLAIMED record after a restart
   resumes it: settle, read back, replay.
4. A controller that reads a record with another owner or a newer
   generation stops serving that LUN at once. If the record is a confirmed
   claim or any other owner's record, it drops its cached lines (they were
   replayed by the new owner, or voided); under a claim still CLAIMED
   it holds them, unused but kept in NVRAM and their blocks not reused, so
   the claimant's mirror copy (same block numbers) stays intact until its
   replay, then drops them.
The window left is between a lease check and the system call it guards (a
pause landing exactly there): real arrays close it with SCSI persistent
reservations on the disks, which a stale writer cannot pass.

Losing the link while alive, an owner first destages every dirty line of
the LUN (its partner may still replay the same data, which is harmless),
then bumps the generation with state SOLO (the partner's mirror copy is now
void: a later takeover must not replay it), then serves write-through, so
nothing acknowledged lives only in its NVRAM. Writes that waited for a mirror
ack when the link dropped are acknowledged once they are on disk.
"""
import collections

from . import actions as A
from .formats import FormatError
from .formats import messages as M
from .formats import reservation as R

EIO = 5
BALANCE_RETRY_MS = 1000
REPLAY_RETRY_MS = 200


class Own:
    STARTING = "starting"      # reading the record (boot, link up)
    OWNER = "owner"            # owns it, partner's mirror in use
    FENCING = "fencing"        # owns it, link down: destaging before going on alone
    SOLO = "solo"              # owns it alone: write-through
    RELEASING = "releasing"    # owns it, handing it to the partner
    PARTNER = "partner"        # the partner owns it: forward
    WATCHING = "watching"      # the partner owned it when the link dropped: watch its lease
    CLAIMING = "claiming"      # our claim is written: wait, then read it back
    REPLAYING = "replaying"    # writing the partner's mirrored lines to disk


SERVING = {Own.OWNER, Own.SOLO}
OWNING = {Own.OWNER, Own.FENCING, Own.SOLO, Own.RELEASING}

# (state, event) -> (handler, next state); the handler may return another next state.
TRANSITIONS = {
    (Own.STARTING, "record"): ("_st_record", None),
    (Own.STARTING, "link_up"): ("_noop", Own.STARTING),
    (Own.STARTING, "link_down"): ("_noop", Own.STARTING),
    (Own.STARTING, "tick"): ("_st_tick", Own.STARTING),
    (Own.OWNER, "link_down"): ("_to_fencing", Own.FENCING),
    (Own.OWNER, "link_up"): ("_reread", Own.STARTING),
    (Own.OWNER, "tick"): ("_linked_owner_tick", Own.OWNER),
    (Own.OWNER, "move"): ("_start_release", Own.RELEASING),
    (Own.OWNER, "request"): ("_start_release", Own.RELEASING),
    (Own.FENCING, "tick"): ("_renew_if_due", Own.FENCING),
    (Own.FENCING, "record"): ("_fencing_record", None),
    (Own.FENCING, "written"): ("_fencing_written", None),
    (Own.FENCING, "link_up"): ("_fencing_link_up", Own.STARTING),
    (Own.FENCING, "link_down"): ("_noop", Own.FENCING),
    (Own.SOLO, "tick"): ("_renew_if_due", Own.SOLO),
    (Own.SOLO, "record"): ("_owner_record", None),
    (Own.SOLO, "written"): ("_noop", Own.SOLO),
    (Own.SOLO, "link_up"): ("_reread", Own.STARTING),
    (Own.SOLO, "link_down"): ("_noop", Own.SOLO),
    (Own.RELEASING, "tick"): ("_releasing_tick", Own.RELEASING),
    (Own.RELEASING, "written"): ("_release_written", None),
    (Own.RELEASING, "link_down"): ("_to_fencing", Own.FENCING),
    (Own.RELEASING, "request"): ("_noop", Own.RELEASING),
    (Own.RELEASING, "move"): ("_noop", Own.RELEASING),
    (Own.PARTNER, "link_down"): ("_to_watching", Own.WATCHING),
    (Own.PARTNER, "link_up"): ("_reread", Own.STARTING),
    (Own.PARTNER, "tick"): ("_partner_tick", Own.PARTNER),
    (Own.PARTNER, "grant"): ("_granted", Own.OWNER),
    (Own.PARTNER, "move"): ("_ask_ownership", Own.PARTNER),
    (Own.PARTNER, "request"): ("_noop", Own.PARTNER),
    (Own.WATCHING, "tick"): ("_renew_if_due", Own.WATCHING),
    (Own.WATCHING, "record"): ("_watch_record", None),
    (Own.WATCHING, "link_up"): ("_reread", Own.STARTING),
    (Own.WATCHING, "link_down"): ("_watch_anew", Own.WATCHING),
    (Own.CLAIMING, "written"): ("_claim_written", Own.CLAIMING),
    (Own.CLAIMING, "tick"): ("_claim_tick", Own.CLAIMING),
    (Own.CLAIMING, "record"): ("_claim_record", None),
    (Own.CLAIMING, "link_up"): ("_noop", Own.CLAIMING),
    (Own.CLAIMING, "link_down"): ("_noop", Own.CLAIMING),
    (Own.REPLAYING, "replayed"): ("_replayed", None),
    (Own.REPLAYING, "tick"): ("_replay_tick", Own.REPLAYING),
    (Own.REPLAYING, "record"): ("_replay_record", None),
    (Own.REPLAYING, "link_up"): ("_noop", Own.REPLAYING),
    (Own.REPLAYING, "link_down"): ("_noop", Own.REPLAYING),
    (Own.REPLAYING, "written"): ("_noop", Own.REPLAYING),     # a renewal during the replay
    # Admin moves reach a LUN in whatever state it is; only settled states act on them.
    (Own.STARTING, "move"): ("_noop", Own.STARTING),
    (Own.FENCING, "move"): ("_noop", Own.FENCING),
    (Own.SOLO, "move"): ("_noop", Own.SOLO),
    (Own.WATCHING, "move"): ("_noop", Own.WATCHING),
    (Own.CLAIMING, "move"): ("_noop", Own.CLAIMING),
    (Own.REPLAYING, "move"): ("_noop", Own.REPLAYING),
    # Ownership requests reach a LUN in whatever state it is; only an owner acts on them.
    (Own.STARTING, "request"): ("_noop", Own.STARTING),
    (Own.FENCING, "request"): ("_noop", Own.FENCING),
    (Own.SOLO, "request"): ("_noop", Own.SOLO),
    (Own.WATCHING, "request"): ("_noop", Own.WATCHING),
    (Own.CLAIMING, "request"): ("_noop", Own.CLAIMING),
    (Own.REPLAYING, "request"): ("_noop", Own.REPLAYING),
    # A record write started before a state change lands afterwards: nothing to do.
    (Own.STARTING, "written"): ("_noop", Own.STARTING),
    (Own.OWNER, "written"): ("_noop", Own.OWNER),
    (Own.OWNER, "record"): ("_linked_owner_record", Own.OWNER),
    (Own.PARTNER, "written"): ("_noop", Own.PARTNER),
    (Own.PARTNER, "record"): ("_partner_record", Own.PARTNER),
    (Own.WATCHING, "written"): ("_noop", Own.WATCHING),
    (Own.RELEASING, "record"): ("_linked_owner_record", Own.RELEASING),
}
STATES = [v for k, v in vars(Own).items() if not k.startswith("_")]
EVENTS = ("record", "written", "link_up", "link_down", "tick", "move", "request", "grant", "replayed")


def _settled(state):
    """The state an owner renews with once its replay is done: a claim becomes SOLO."""
    return R.LunState.SOLO if state == R.LunState.CLAIMED else state


class FenceError(Exception):
    """An ownership event that the state table does not allow (a protocol error)."""


class LunFence:
    __slots__ = ("lun", "state", "record", "generation", "renew_due_ms", "io_inflight", "lease_until_ms",
                 "read_start_ms", "last_seen", "last_change_ms", "mirror_generation", "pending_write",
                 "claim_written_ms", "void_mirror", "held", "acks", "replay_left", "move_tag",
                 "want_back", "counter_written", "replay_failed", "replay_retry_ms", "replayed_generation",
                 "held_lines", "held_generation", "peer_generation")

    def __init__(self, lun):
        self.lun = lun
        self.state = Own.STARTING
        self.record = None
        self.generation = 0
        self.renew_due_ms = 0
        self.io_inflight = False
        self.lease_until_ms = -1
        self.read_start_ms = 0
        self.last_seen = None
        self.last_change_ms = 0
        self.mirror_generation = 0
        self.pending_write = None      # the Record being written
        self.claim_written_ms = None
        self.void_mirror = False
        self.held = collections.deque()   # host requests waiting for the LUN to settle
        self.acks = []                    # writes whose mirror ack was cut off by the link drop
        self.replay_left = 0
        self.move_tag = 0
        self.want_back = False            # failback: the preferred owner wants its LUN back
        self.counter_written = 0          # the highest renewal counter we wrote (landed or not)
        self.replay_failed = False        # a replay write of this round failed: the block stays
        self.replay_retry_ms = None       # when the next replay round starts
        self.replayed_generation = 0      # the claim this incarnation replayed to the end
        self.held_lines = []              # dropped under an unconfirmed claim: kept in NVRAM, unused
        self.held_generation = 0          # the generation of the claim we hold them for
        self.peer_generation = 0          # the newest generation the partner mirrored this LUN's writes at


class RecordOp:
    __slots__ = ("lun", "write", "record")

    def __init__(self, lun, write, record=None):
        self.lun = lun
        self.write = write
        self.record = record


class FenceMixin:
    # -- plumbing -------------------------------------------------------------

    def _init_fencing(self):
        self.fence = [LunFence(lun) for lun in range(len(self.params.lun_sizes))]
        for f in self.fence:
            self._read_record(f)

    def _own_event(self, f, event, *args):
        try:
            handler, next_state = TRANSITIONS[(f.state, event)]
        except KeyError:
            raise FenceError(f"lun{f.lun}: {event} not allowed in state {f.state}") from None
        before = f.state
        result = getattr(self, handler)(f, *args)
        f.state = result or next_state
        if before == Own.STARTING and f.state != Own.STARTING:
            for r in self.mirror.settle(f.lun, keep=f.state == Own.CLAIMING):
                self._persist(r)
        if f.state != before:
            self.out.append(A.Notify("ownership_state", lun=f.lun, old=before, new=f.state,
                                     generation=f.generation))
            self._release_held(f)

    def _noop(self, f, *args):
        return None

    def _read_record(self, f):
        if f.io_inflight:
            return
        f.io_inflight = True
        f.read_start_ms = self.now_ms
        op = self._new_op()
        self.disk_ops[op] = RecordOp(f.lun, False)
        self.out.append(A.RecordRead(op, f.lun))

    def _write_record(self, f, rec):
        if rec.owner == self.id:
            f.counter_written = max(f.counter_written, rec.counter)
        f.io_inflight = True
        f.pending_write = rec
        op = self._new_op()
        self.disk_ops[op] = RecordOp(f.lun, True, rec)
        self.out.append(A.RecordWrite(op, f.lun, R.build_record(rec)))

    def _record_done(self, entry, error, data):
        f = self.fence[entry.lun]
        f.io_inflight = False
        if error:
            self.out.append(A.Notify("reservation_io_error", lun=f.lun, errno=error))
            f.renew_due_ms = self.now_ms + self.params.renew_interval_ms
            if entry.write and f.state == Own.CLAIMING and f.claim_written_ms is None:
                # The claim may have landed or not: settle as if it had, then the read-back
                # decides. Waiting for a "written" that never came left the LUN CLAIMING for
                # good, with the hosts' requests held (seed 7254 at 300 steps).
                f.claim_written_ms = self.now_ms
            return
        if entry.write:
            f.record = entry.record
            self._own_event(f, "written")
            return
        if self.now_ms - f.read_start_ms >= self.params.lease_ms and not self.buggify("skip_fencing_reread"):
            self._read_record(f)        # answered after a pause: a claim may have landed since; read again
            return
        try:
            rec = R.parse_record_untrusted(data, f"lun{f.lun} reservation record")
        except FormatError as exc:
            self.out.append(A.Notify("reservation_corrupt", lun=f.lun, error=str(exc)))
            rec = None
        f.renew_due_ms = self.now_ms + self.params.renew_interval_ms
        self._settle_held(f, rec)
        self._own_event(f, "record", rec)

    def _new_record(self, f, owner, generation, state, counter=0):
        return R.Record(f.lun, owner, state, generation, counter, self.params.lease_ms, self.params.pair_id)

    def _renewal(self, f, rec, generation, state):
        """Our next record, with a counter above every one we wrote before: a renewal write that
        failed may still have landed, and writing its key again looks like silence to the
        partner, which then claims under a live owner (seed 32)."""
        return self._new_record(f, self.id, generation, state, max(rec.counter, f.counter_written) + 1)

    def _renew_if_due(self, f):
        if not f.io_inflight and self.now_ms >= f.renew_due_ms:
            self._read_record(f)

    def fence_tick(self):
        for f in self.fence:
            self._own_event(f, "tick")
            if f.held and self._lease_ok(f):
                self._release_held(f)

    def mirror_generation_of(self, lun) -> int:
        """The generation mirror writes of `lun` carry: the LUN's own (its owner's fencing token)."""
        return (self.fence[lun].generation if self.fence is not None else self.generation) & 0xFFFFFFFF

    def mirror_written_at(self, lun, generation):
        """The owner mirrored a write of `lun` at `generation`: remember it for the void decision
        (seeds 377 and 5134: a partner that never read the owner's newer record voided its mirror,
        acknowledged writes with it, at the takeover)."""
        if self.fence is not None and 0 <= lun < len(self.fence):
            f = self.fence[lun]
            f.peer_generation = max(f.peer_generation, generation)

    def mirror_owned_by_peer(self, lun) -> bool:
        """May a resync from the peer void our mirror blocks of `lun`? Not while we take it over."""
        return self.fence is None or self.fence[lun].state in (Own.PARTNER, Own.WATCHING, Own.STARTING)

    def mirror_undecided(self, lun) -> bool:
        """Is it too early to void our mirror blocks of `lun` the peer did not resend? Yes while we
        read its record: it may name our own unfinished claim, whose replay needs them."""
        return self.fence is not None and self.fence[lun].state == Own.STARTING

    def may_write_disk(self, lun) -> bool:
        """Destage only what we own under a valid lease: a stale owner's lines are older data."""
        return self.fence is None or self._lease_ok(self.fence[lun])

    def _lease_ok(self, f) -> bool:
        if self.buggify("fence_skip_lease_check") and f.state in OWNING:
            return True                 # a broken variant for the simulator: serve without a lease
        if f.state in (Own.OWNER, Own.RELEASING) and self.link.up:
            # Link lease: the partner acknowledged a frame we sent at heard_ms, so it cannot
            # have declared the link dead before then (one-way cuts included).
            return self.now_ms < max(f.lease_until_ms, self.link.heard_ms + self.params.lease_ms)
        return f.state in (Own.SOLO, Own.FENCING) and self.now_ms < f.lease_until_ms

    # -- boot and link up: the record decides ---------------------------------

    def _reread(self, f):
        self._read_record(f)

    def _st_tick(self, f):
        if not f.io_inflight:
            self._read_record(f)

    def _st_record(self, f, rec):
        me, peer = self.id, 1 - self.id
        if rec is None:                        # never written: the default owner claims it
            default = f.lun % 2
            rec = self._new_record(f, default, 1, R.LunState.MIRRORED)
            if default == me:
                self._write_record(f, rec)
                f.record, f.generation = rec, 1
                f.lease_until_ms = f.read_start_ms + self.params.lease_ms
                return self._owner_or_fencing(f)
        if rec.owner == me and rec.state == R.LunState.CLAIMED and (
                f.replayed_generation != rec.generation):
            return self._resume_claim(f, rec)
        f.record, f.generation = rec, rec.generation
        if rec.owner == me:
            self._free_stale_mirror(f)
            f.lease_until_ms = f.read_start_ms + self.params.lease_ms
            if rec.state != R.LunState.MIRRORED and self.link.up:
                self._write_record(f, self._renewal(f, rec, rec.generation, R.LunState.MIRRORED))
            return self._owner_or_fencing(f)
        self._drop_lines(f, rec, f"lun{f.lun} is owned by controller {'ab'[peer]} at generation {rec.generation}")
        # The owner went on alone (SOLO): our copy is old. Not so a claim not yet confirmed: the
        # claimer has destaged nothing, and the lines it resent us may be the only other copy (seed 419).
        claim = self._claim_unconfirmed(rec)
        f.mirror_generation = rec.generation if rec.state == R.LunState.MIRRORED or claim else -1
        f.void_mirror = rec.state != R.LunState.MIRRORED and not claim
        if self.link.up and self.mirroring:
            if self.params.auto_balance and f.lun % 2 == self.id:
                self.out.append(A.Notify("failback_request", lun=f.lun))
                self._ask_ownership(f)               # failback: the preferred owner asks for it
                f.last_change_ms = self.now_ms
                f.want_back = True
            return Own.PARTNER
        f.last_seen, f.last_change_ms = rec.key(), self.now_ms
        return Own.WATCHING

    def _resume_claim(self, f, rec):
        """Our claim (CLAIMED: its replay not done) that this incarnation never replayed: we
        went down between claim and replay. The old owner dropped its lines when it saw the
        claim, so our mirror holds the only other copy of its acknowledged writes: confirm the
        claim and replay, as if just written. Served straight away, it lost them (seeds 32, 182)."""
        self.out.append(A.Notify("takeover_resumed", lun=f.lun, generation=rec.generation))
        f.pending_write, f.claim_written_ms = rec, self.now_ms
        return Own.CLAIMING

    def _owner_or_fencing(self, f):
        if self.link.up and self.mirroring:
            return Own.OWNER
        self._to_fencing(f)
        return Own.FENCING

    # -- the owner alone ------------------------------------------------------

    def _to_fencing(self, f):
        f.renew_due_ms = self.now_ms
        self._read_record(f)
        self._pump()

    def _lun_clean(self, lun) -> bool:
        return not any(line.lun == lun for line in self.cache.lines.values()) and not any(
            op.lines and op.lines[0].lun == lun for op in self.pending.values()) and not any(
            line.lun == lun for line in self._flushing_lines())

    def _flushing_lines(self):
        return [line for e in self.disk_ops.values() if e.__class__.__name__ == "DestageOp"
                for line in e.lines]

    def _fencing_record(self, f, rec):
        if rec is None:
            return self._record_lost(f)
        if not self._still_mine(f, rec):
            return self._fenced(f, rec)
        f.lease_until_ms = f.read_start_ms + self.params.lease_ms
        if self._lun_clean(f.lun):
            self._write_record(f, self._renewal(f, rec, rec.generation + 1, R.LunState.SOLO))
        else:
            self._write_record(f, self._renewal(f, rec, rec.generation, _settled(rec.state)))
        return Own.FENCING

    def _fencing_link_up(self, f):
        """Back in sync before the LUN went solo: the resync just done mirrored the lines of the
        writes whose mirror ack the link drop cut off, so they are acknowledged now. Left
        waiting for a solo that never comes, they kept their lines pinned and the versions they
        replaced alive in NVRAM, and a restart brought an old version back (seed 223)."""
        acks, f.acks = f.acks, []
        for op in acks:
            self._finish_write(op, mirrored=True)
        self._read_record(f)

    def _fencing_written(self, f):
        rec = f.pending_write
        if rec.state != R.LunState.SOLO:
            return Own.FENCING
        f.generation = rec.generation
        self.out.append(A.Notify("solo", lun=f.lun, generation=f.generation))
        acks, f.acks = f.acks, []
        for op in acks:
            self._finish_write(op, mirrored=False)
        return Own.SOLO

    def _owner_record(self, f, rec):
        if rec is None:
            return self._record_lost(f)
        if not self._still_mine(f, rec):
            return self._fenced(f, rec)
        f.lease_until_ms = f.read_start_ms + self.params.lease_ms
        self._write_record(f, self._renewal(f, rec, rec.generation, _settled(rec.state)))
        return f.state

    def _record_lost(self, f):
        """We own the LUN and its record reads blank or corrupt: our first write of it failed, or
        a write was torn. A claim is a whole record (and its claimant abandons it if it reads
        anything else back), so nobody else owns it: write ours again; no lease from this read.
        Fenced by a blank record instead, the owner left the LUN with no owner at all."""
        self.out.append(A.Notify("reservation_rewritten", lun=f.lun, generation=f.generation))
        state = f.record.state if f.record is not None else R.LunState.MIRRORED
        if f.state != Own.REPLAYING:
            state = _settled(state)
        self._write_record(f, self._new_record(f, self.id, f.generation, state, f.counter_written + 1))
        return f.state

    def _linked_owner_tick(self, f):
        """Mirrored, an owner's lease comes from the link (frames the partner acknowledged); when
        that will not last the next renew interval (heartbeats no faster than the lease), it
        renews the record as an owner alone does. Otherwise an idle owner lost its lease at every
        tick, and a handover could never destage (seed 108: stuck in RELEASING)."""
        link_lease_ms = self.link.heard_ms + self.params.lease_ms
        if self.now_ms + self.params.renew_interval_ms >= max(f.lease_until_ms, link_lease_ms):
            self._renew_if_due(f)

    def _releasing_tick(self, f):
        self._release_if_clean(f)
        self._linked_owner_tick(f)

    def _linked_owner_record(self, f, rec):
        if rec is None:
            return self._record_lost(f)
        if not self._still_mine(f, rec):
            return self._fenced(f, rec)
        f.lease_until_ms = f.read_start_ms + self.params.lease_ms
        self._write_record(f, self._renewal(f, rec, rec.generation, _settled(rec.state)))
        return None

    def _partner_record(self, f, rec):
        if rec is not None and rec.owner == self.id:
            return self._st_record(f, rec)
        return None

    def _still_mine(self, f, rec) -> bool:
        return rec is not None and rec.owner == self.id and rec.generation == f.generation

    def _fenced(self, f, rec):
        """Someone else owns the LUN now: stop at once, drop our copies (promise 4)."""
        self.out.append(A.Notify("fenced", lun=f.lun, record_owner=getattr(rec, "owner", None),
                                 record_generation=getattr(rec, "generation", None),
                                 our_generation=f.generation))
        f.lease_until_ms = -1
        acks, f.acks = f.acks, []
        for op in acks:
            op.req, req = None, op.req
            if req is not None:
                self._reply(req, EIO)
            self._finish_write(op, mirrored=False)
        self._drop_lines(f, rec, "fenced")
        if rec is not None:
            f.record, f.generation = rec, rec.generation
            f.mirror_generation = -1
            f.last_seen, f.last_change_ms = rec.key(), self.now_ms
        return Own.PARTNER if self.link.up else Own.WATCHING

    def _drop_lines(self, f, rec, reason):
        """Stop using this LUN's cached lines: `rec` names another owner, whose data is newer.

        Under a claim not yet confirmed (CLAIMED: the claimant's replay is not done) the lines are held, not freed: the claimant replays its mirror copy of them,
        which lives in the partner's blocks with the same numbers, and a block we reused would
        overwrite that copy before the replay (seed 32: an acknowledged write lost). Held lines
        stay DIRTY in NVRAM (after a restart they are held again) until a record shows the
        claim confirmed, or our own claim writes them out."""
        lines = [line for line in self.cache.lines.values() if line.lun == f.lun]
        for line in lines:
            self.cache.remove_current(line)
        if self._claim_unconfirmed(rec):
            f.held_lines.extend(lines)
            f.held_generation = rec.generation
        else:
            self._forget_lines(lines, rec is not None)
        if lines:
            self.out.append(A.Notify("lines_dropped", lun=f.lun, lines=len(lines), reason=reason,
                                     held=self._claim_unconfirmed(rec)))

    def _claim_unconfirmed(self, rec) -> bool:
        return rec is not None and rec.owner != self.id and rec.state == R.LunState.CLAIMED

    def _forget_lines(self, lines, partner_copy_too):
        for line in lines:
            line.dead = True
            if partner_copy_too:            # the new owner replayed (or voided) its copy: free it
                self.flush_done_refs.append((line.block, line.seq))
            self._maybe_free(line)

    def _settle_held(self, f, rec):
        """A record read while we hold lines: forget them once the claim is confirmed; take them
        back only if our own older record landed over the claim, which its claimant then
        abandoned (nobody served the LUN meanwhile). A record naming us at a newer generation
        came from a grant after the claimant served: the held lines are older than its writes
        (seed 7119 at 300 steps: taken back after a failback, write 103 came back over 156).
        Our own claim's replay (CLAIMING, REPLAYING) deals with them itself."""
        if (not f.held_lines or rec is None or self._claim_unconfirmed(rec)
                or f.state in (Own.CLAIMING, Own.REPLAYING)):
            return
        held, f.held_lines = f.held_lines, []
        if rec.owner == self.id and rec.generation < f.held_generation:
            for line in held:
                line.current = True
                self.cache.install(line)
        else:
            self._forget_lines(held, True)

    # -- the partner watching -------------------------------------------------

    def _to_watching(self, f):
        # The owner may have moved the LUN to a new generation without our reading the record (it
        # went solo and back while its resync to us was pending): its mirror writes said so.
        f.mirror_generation = max(f.generation, f.peer_generation)
        f.void_mirror = False           # mirrored up to the link drop: our copy is the partner's data
        f.last_seen, f.last_change_ms = None, self.now_ms
        f.renew_due_ms = self.now_ms
        self._read_record(f)

    def _watch_anew(self, f):
        """The session ended: an owner on its link lease holds it until at most lease_ms past
        the newest frame of its that we acknowledged, before now; the quiet time starts now."""
        f.last_change_ms = self.now_ms

    def _watch_record(self, f, rec):
        key = rec.key() if rec is not None else None
        if rec is not None and rec.owner == self.id:
            return self._st_record(f, rec)          # it is ours (we claimed it earlier)
        if key != f.last_seen or self.link.up:
            # With the session up (watching while our resync runs) the owner may serve on its
            # link lease, which moves no record: a quiet record proves nothing, so the quiet
            # time counts from when the session ends (seed 37: both served lun0).
            f.last_seen, f.last_change_ms = key, self.now_ms
            if rec is not None and not self._claim_unconfirmed(rec) and (
                    rec.state == R.LunState.SOLO or rec.generation != f.mirror_generation):
                f.void_mirror = True
            return Own.WATCHING
        if self.now_ms - f.last_change_ms < self.params.takeover_wait_ms and not self.buggify("takeover_no_wait"):
            return Own.WATCHING
        # Two above what we read: the owner may bump its generation once (solo) between our
        # read and our claim landing; a claim at + 1 named that same generation, and a claim
        # that landed over the bump then served it too (seed 676: both served generation 9).
        generation = (rec.generation if rec else f.generation) + 2
        self.out.append(A.Notify("takeover_claim", lun=f.lun, generation=generation,
                                 silent_ms=self.now_ms - f.last_change_ms))
        if f.void_mirror:
            self._void_mirror(f)        # before the claim: after a restart, what is left is replayed
        self._write_record(f, self._new_record(f, self.id, generation, R.LunState.CLAIMED))
        f.claim_written_ms = None
        return Own.CLAIMING

    def _claim_written(self, f):
        f.claim_written_ms = self.now_ms

    def _claim_tick(self, f):
        settle = 0 if self.buggify("claim_no_settle") else self.params.lease_ms + self.params.renew_interval_ms
        if f.claim_written_ms is not None and self.now_ms - f.claim_written_ms >= settle and not f.io_inflight:
            self._read_record(f)

    def _claim_record(self, f, rec):
        claimed = f.pending_write
        if rec is None or rec.key() != claimed.key():
            self.out.append(A.Notify("takeover_abandoned", lun=f.lun, reason="the owner renewed over our claim"))
            f.last_seen, f.last_change_ms = (rec.key() if rec else None), self.now_ms
            if self.link.up:
                # The link came up during the claim (CLAIMING ignores link_up): the record
                # decides now. Left WATCHING, we would claim again over an owner that, with
                # the link up, renews no record (VM pair: both owned lun1 at generations 2, 3).
                self._read_record(f)
                return Own.STARTING
            return Own.WATCHING
        f.record, f.generation = rec, rec.generation
        f.lease_until_ms = f.read_start_ms + self.params.lease_ms
        return self._start_replay(f)

    def _mirror_blocks_of(self, f):
        return [(i, b) for i, b in enumerate(self.mirror.blocks) if b is not None and b.lun == f.lun]

    def _void_mirror(self, f):
        """The owner went on alone (or ownership moved) since our copy was made: it is old data."""
        blocks = self._mirror_blocks_of(f)
        for i, _b in blocks:
            self._persist(self.mirror._free(i))
        self.out.append(A.Notify("mirror_void", lun=f.lun, blocks=len(blocks)))

    def _free_stale_mirror(self, f):
        """The LUN is ours, not by a claim still to replay: copies of it in our mirror are the old
        owner's lines that it destaged before it released the LUN, their flush-done lost with the
        link (a power cut right after a handover). Kept, no resync ever voids them (we own the
        LUN), and a later claim would replay them over newer data (seed 269)."""
        blocks = self._mirror_blocks_of(f)
        for i, _b in blocks:
            self._persist(self.mirror._free(i))
        if blocks:
            self.out.append(A.Notify("mirror_stale", lun=f.lun, blocks=len(blocks)))

    def _start_replay(self, f):
        """Write the partner's mirrored lines of this LUN to disk, skipping flushed ones (claims 5.13).

        A block leaves the mirror only once its replay write succeeded; one that failed is
        written again in the next round, REPLAY_RETRY_MS later. Given up on, it was lost: the
        takeover served the LUN from a disk without it (seed 159)."""
        f.replay_left = 0
        f.replay_failed = False
        f.replay_retry_ms = None
        own = [line for line in self.cache.lines.values() if line.lun == f.lun]
        for line in own:                # ours from before a claim by the partner we now overrule
            self.cache.remove_current(line)
        f.held_lines.extend(own)
        held_keys = {line.key for line in f.held_lines}
        for i, b in sorted(self._mirror_blocks_of(f), key=lambda ib: ib[1].seq):
            if b.key in held_keys:      # the partner's copy is older than our held version
                self._persist(self.mirror._free(i))
            else:
                self._replay_block(f, i, b)
        for line in f.held_lines:
            self._replay_run(f, None, line, self.primary.data(line.block), line.lba, line.bitmap)
        if not f.replay_left:
            return self._replayed(f)
        return Own.REPLAYING

    def _replay_tick(self, f):
        """Renew the claim while the replay runs, and read the record before a retry round: a
        partner may have claimed the LUN meanwhile (a pause); a round started without looking
        landed under the old generation after the new owner's writes (seed 996). Without the
        renewals, a replay longer than takeover_wait_ms looked dead to an old owner that came
        back with the link down, and it claimed the LUN over the replay."""
        if f.replay_retry_ms is not None and self.now_ms >= f.replay_retry_ms and not f.io_inflight:
            self._read_record(f)        # due until the record comes back: a failed read is retried
        else:
            self._renew_if_due(f)
        return None

    def _replay_record(self, f, rec):
        if rec is not None and rec.owner == self.id and rec.generation == f.generation and (
                rec.state == R.LunState.CLAIMED):
            f.lease_until_ms = f.read_start_ms + self.params.lease_ms
            if f.replay_retry_ms is not None and self.now_ms >= f.replay_retry_ms and not f.replay_left:
                return self._start_replay(f)
            self._write_record(f, self._renewal(f, rec, rec.generation, R.LunState.CLAIMED))
            return Own.REPLAYING
        self.out.append(A.Notify("takeover_abandoned", lun=f.lun, reason="claimed over during the replay"))
        return self._fenced(f, rec)

    def _replay_block(self, f, index, block):
        self._replay_run(f, index, None, self.mirror.segment.data(index), block.lba, block.bitmap)

    def _replay_run(self, f, index, line, view, lba, bitmap):
        from .cache import dirty_runs, SECTOR_BYTES
        from .destage import ReplayOp
        runs = list(dirty_runs(bitmap, 0, self.mirror.sectors_per_line))
        op = self._new_op()
        self.disk_ops[op] = ReplayOp(f.lun, index, len(runs), line)
        f.replay_left += 1
        base = lba * SECTOR_BYTES
        for s, e in runs:
            self.out.append(A.DiskWrite(op, f.lun, base + s * SECTOR_BYTES, view[s * SECTOR_BYTES:e * SECTOR_BYTES]))

    def _replay_done(self, entry, error):
        f = self.fence[entry.lun]
        if error:
            self.out.append(A.Notify("replay_error", lun=f.lun, block=entry.index, errno=error))
            f.replay_failed = True
        elif entry.line is not None:
            if entry.line in f.held_lines:
                f.held_lines.remove(entry.line)
                self._forget_lines([entry.line], True)
        else:
            self._persist(self.mirror._free(entry.index))
        f.replay_left -= 1
        if f.replay_left == 0 and f.state == Own.REPLAYING:
            if f.replay_failed:
                f.replay_retry_ms = self.now_ms + REPLAY_RETRY_MS
            else:
                self._own_event(f, "replayed")

    def _replayed(self, f):
        self.out.append(A.Notify("takeover", lun=f.lun, generation=f.generation))
        f.replayed_generation = f.generation
        f.renew_due_ms = self.now_ms
        if self.link.up and self.mirroring:      # the partner came back meanwhile: settle with it
            self._read_record(f)
            return Own.STARTING
        return Own.SOLO

    def _partner_tick(self, f):
        """Failback by balancing: the preferred owner keeps asking until it has its LUN back."""
        if f.held_lines:
            self._renew_if_due(f)         # watch the claim we hold lines for until it is confirmed
        if (f.want_back and self.mirroring and self.now_ms - f.last_change_ms >= BALANCE_RETRY_MS):
            f.last_change_ms = self.now_ms
            self._ask_ownership(f)

    # -- moving ownership while linked (failback, balancing, the CLI) ----------

    def move_lun(self, lun, tag=0):
        """Admin: bring `lun` to this controller (or give it away if we own it)."""
        f = self.fence[lun]
        f.move_tag = tag
        self._own_event(f, "move")
        return self._take()

    def _ask_ownership(self, f):
        body = M.Ownership.build(dict(lun=f.lun, scope=0, reserved0=0, lba=0, generation=f.generation,
                                      reserved=bytes(8)))
        self.link.send(M.MsgType.OWNERSHIP_REQUEST, M.Resource.OWNERSHIP, body, tag=f.move_tag)

    def _start_release(self, f):
        self.out.append(A.Notify("handover_start", lun=f.lun))
        self.destaging = True
        self._pump()

    def _release_if_clean(self, f):
        if not f.io_inflight and self._lun_clean(f.lun):
            self._write_record(f, self._new_record(f, 1 - self.id, f.generation + 1, R.LunState.MIRRORED))

    def _release_written(self, f):
        rec = f.pending_write
        if rec.owner == self.id:          # an earlier write of ours landed: the release record is next
            return Own.RELEASING
        f.generation = rec.generation
        body = M.Ownership.build(dict(lun=f.lun, scope=0, reserved0=0, lba=0, generation=rec.generation,
                                      reserved=bytes(8)))
        self.link.send(M.MsgType.OWNERSHIP_GRANT, M.Resource.OWNERSHIP, body, tag=f.move_tag)
        self.out.append(A.Notify("handover", lun=f.lun, to="ab"[1 - self.id], generation=rec.generation))
        return Own.PARTNER

    def _granted(self, f, generation):
        if f.held_lines:                # the granter's confirmed claim replayed them, then it served
            held, f.held_lines = f.held_lines, []
            self._forget_lines(held, True)
        self._free_stale_mirror(f)
        f.generation = generation
        f.want_back = False
        f.lease_until_ms = self.now_ms + self.params.lease_ms
        self.out.append(A.Notify("ownership", lun=f.lun, owner="ab"[self.id], generation=generation))

    def _on_ownership(self, msg):
        body = M.parse_body_untrusted(msg.type, msg.payload, "ownership message")
        if body.lun >= len(self.fence):
            raise FenceError(f"ownership message for lun{body.lun}")
        f = self.fence[body.lun]
        if msg.type == M.MsgType.OWNERSHIP_REQUEST:
            f.move_tag = msg.tag
            self._own_event(f, "request")
        elif msg.type == M.MsgType.OWNERSHIP_GRANT:
            self._own_event(f, "grant", body.generation)

    # -- holding host requests while a LUN settles ----------------------------

    def _hold(self, f, entry):
        if len(f.held) >= self.params.held_max:
            self._reply(entry[1], EIO)
            return
        f.held.append(entry)

    def _release_held(self, f):
        if not f.held or (f.state in OWNING and f.state not in SERVING):
            return
        if f.state in SERVING and not self._lease_ok(f):
            return
        held, f.held = f.held, collections.deque()
        for kind, req, lun, offset, arg, fua in held:
            if kind == "w":
                self._host_write(req, lun, offset, arg, fua)
            else:
                self._host_read(req, lun, offset, arg)
