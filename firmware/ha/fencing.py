"""Ownership per LUN and fencing through the shared disks.

Owns the per-LUN ownership state machine (its table is in firmware/ha/ownership.py) and
the lease protocol on the reservation record (firmware/formats/reservation.py)
that keeps two controllers from ever both accepting I/O for one LUN. Its
handlers live in three mixins of HaOwnership (firmware/ha/controller.py, the part
that answers the shared parts' questions about ownership): this one (the record's I/O,
leases, boot, the owner alone, being fenced, held host requests),
firmware/ha/takeover.py (watching, claiming, replaying) and firmware/ha/handover.py
(moving a LUN while linked: the CLI, failback, balancing).

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
   A mirrored owner still reads the record every renew interval (a claim
   written while the link was down may land after the link came back), and
   whose link lease would not last the next renew interval (heartbeats no
   faster than the lease) renews the record as well. Every
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
   gives a lease the partner cannot see, which step 3 covers. The quiet
   time is what the reads saw: from the change to the start of the latest
   read, never to the moment its answer is heard (a pause in between is
   no observation). A record never written is seen as none: the default
   owner's first write of it is a change like any other.
   A claim is decided only on a read that is fresh by the claimant's own
   clock at the moment it acts: begun less than `renew_interval_ms` before
   (otherwise it reads again). A read answered after a pause shorter than
   `lease_ms` passes the re-read guard of every read, and a claim taken on
   it was two above a view the owner had left twice meanwhile.
3. After writing its claim (owner = itself, generation + 2: above a solo
   bump the owner may land meanwhile, state CLAIMED, counter 0)
   the partner waits another `lease_ms + renew_interval_ms` and reads the
   record back: if the old owner renewed over it, the old owner is alive and
   the claim is dropped; if not, any lease the old owner could have granted
   itself in the race has expired too. Only then does it replay its mirror
   (every block, retrying failed writes). It renews while it replays, still
   CLAIMED, so a long replay looks alive to a returning old owner that
   watches the record; then it writes SOLO and serves only once a read begun
   `lease_ms` after that SOLO landed still shows it, as after a solo bump
   (below): a claim decided on our CLAIMED record before the SOLO landed
   lands within `lease_ms` and fences us before we wrote anything through
   that its replay of older held lines would overwrite. So a CLAIMED record means its claimant has served nothing. A
   controller that finds its own CLAIMED record after a restart resumes it:
   settle, read back, replay.
   Why + 2 suffices, and why our mirror is still the owner's data: an
   owner bumps its generation only after a read showing its own record, and
   never sooner than `lease_ms` after its previous bump completed or after
   it booted (so a restart does not shorten it); having bumped, it serves
   alone only once a read begun `lease_ms` after the bump completed still
   shows its record. Our claim was decided on a read begun less than
   `renew_interval_ms` (at most `lease_ms / 2`) before we wrote it, so it
   lands less than `lease_ms` after that read began. An owner's bump that
   landed after our read saw the record was followed by its wait: its
   next read saw our claim and it stepped down having written nothing
   through (our mirror is its data, destaged before the bump), and it
   bumped no second time before our claim landed. As a guard, a claim
   whose write completed `lease_ms` or more after its read began is not
   settled on: a fresh read that still shows it claims again, two above it.
   Abandoned on its read-back, a claim judges the mirror lines it kept
   against the record that beat it, as a watch read would (a SOLO owner's,
   or another generation's, makes the copies mirrored below its generation
   old data: freed; the owner mirrored those at its generation or a newer
   one after writing it). A copy's generation is the one its line was
   written and first mirrored at, a resync's copy too (a line keeps it, in
   NVRAM as well): a restarted owner that stamped its resent lines with its
   own boot generation made acknowledged writes look older than its SOLO
   record, and a claim voided them. The record is then
   taken as seen, so no later read judges them, and kept they were replayed
   by a later claim over the owner's newer write-through. Our own cached lines
   of the LUN (kept from before the claim we were overruling, or recovered by
   a restart inside our claim) are judged by it too, as a fenced owner's are
   (step 4): held under a claim still CLAIMED, forgotten otherwise. A
   partner whose claim was abandoned to ours while it still stood CLAIMED
   voids nothing at that read, and may keep copies of our lines from before
   that our replay then made durable: a takeover of ours that finishes with
   the link up resends every line (firmware/mirrorsync.py: resending), and
   the partner frees every copy not resent.
   While we claim or replay, our mirror blocks of the LUN are the data we
   write out, and the old owner's cache may have reused their numbers (a
   version replaced by a write that then failed is freed there): a mirror
   write of the peer into such a block ends the session (mirror_replaying).
   All this assumes record I/O completes within `lease_ms / 2`: a renewal's
   read and write then land before a claimant's read-back.
4. A controller that reads a record with another owner or a newer
   generation stops serving that LUN at once. If the record is a confirmed
   claim or any other owner's record, it drops its cached lines (they were
   replayed by the new owner, or voided); under a claim still CLAIMED
   it holds them, unused but kept in NVRAM and their blocks not reused, so
   the claimant's mirror copy (same block numbers) stays intact until its
   replay, then drops them. A held line whose destage flush completes meanwhile is on disk and
   its partner copy freed: it keeps only its key (an older mirror copy of it is not replayed),
   and is never sent to the partner again (a resync during our own claim resends held lines).
   A read begun before the partner's grant handed
   us the LUN shows the record from before it and judges nothing: read again.
The window left is between a lease check and the system call it guards (a
pause landing exactly there): real arrays close it with SCSI persistent
reservations on the disks, which a stale writer cannot pass.

Losing the link while alive, an owner first destages every dirty line of
the LUN (its partner may still replay the same data, which is harmless),
then bumps the generation with state SOLO (the partner's mirror copy is now
void: a later takeover must not replay it), waits `lease_ms` and reads the
record again (step 3: a claim decided before the bump has landed by then),
then serves write-through, so
nothing acknowledged lives only in its NVRAM. Writes that waited for a mirror
ack when the link dropped are acknowledged once they are on disk, and not at a
record read begun sooner than `lease_ms` after our last bump or boot: on disk
but not in the partner's mirror, they are served solo, and a claim decided on
our record from before may still land and replay an older copy over them.
"""
import collections

from .. import actions as A
from ..formats import FormatError
from ..formats import reservation as R
from .ownership import EIO, FenceError, LunFence, OWNING, Own, RecordOp, SERVING, TRANSITIONS, settled

class FenceMixin:
    # -- plumbing -------------------------------------------------------------

    def _act(self, action):
        """An action for the controller's output (record I/O, a replay's disk write)."""
        self.ctrl.out.append(action)

    def _note(self, what, **fields):
        self.ctrl.out.append(A.Notify(what, **fields))

    def _init_fencing(self):
        self.fence = [LunFence(lun) for lun in range(len(self.params.lun_sizes))]
        for f in self.fence:
            f.bump_after_ms = self.ctrl.now_ms + self.params.lease_ms
            self._read_record(f)

    def _own_event(self, f, event, *args):
        try:
            handler, next_state, others = TRANSITIONS[(f.state, event)]
        except KeyError:
            raise FenceError(f"lun{f.lun}: {event} not allowed in state {f.state}") from None
        before = f.state
        result = getattr(self, handler)(f, *args)
        if result is not None and result != next_state and result not in others:
            raise FenceError(f"lun{f.lun}: {event} in state {before} led to {result}, which the table "
                             f"does not allow")
        f.state = result or next_state
        if f.state is None:
            raise FenceError(f"lun{f.lun}: {handler} chose no next state for {event} in state {before}")
        if before == Own.STARTING and f.state != Own.STARTING and not (
                f.state in (Own.PARTNER, Own.WATCHING) and self._peer_claim_open(f)):
            for r in self.mirror.settle(f.lun, keep=f.state == Own.CLAIMING):
                self.ctrl._persist(r)
        if f.state != before:
            self._note("ownership_state", lun=f.lun, old=before, new=f.state,
                       generation=f.generation)
            self._release_held(f)

    def _noop(self, f, *args):
        return None

    def _read_record(self, f):
        if f.io_inflight:
            return
        f.io_inflight = True
        f.read_start_ms = self.ctrl.now_ms
        op = self.ctrl._disk_op(RecordOp(f.lun, False))
        self._act(A.RecordRead(op, f.lun))

    def _write_record(self, f, rec):
        if rec.owner == self.id:
            f.counter_written = max(f.counter_written, rec.counter)
        f.io_inflight = True
        f.pending_write = rec
        op = self.ctrl._disk_op(RecordOp(f.lun, True, rec))
        self._act(A.RecordWrite(op, f.lun, R.build_record(rec)))

    def _record_done(self, entry, error, data):
        f = self.fence[entry.lun]
        f.io_inflight = False
        if error:
            rec = entry.record         # reported as what failed, coalesced (firmware/diskhealth.py)
            self.ctrl.out.extend(self.disk_health.record_failed(
                f.lun, entry.write, error, self.ctrl.now_ms, state=f.state,
                **({"record": f"{R.LunState(rec.state).name} owner {rec.owner} generation "
                              f"{rec.generation} counter {rec.counter}"} if entry.write else {})))
            f.renew_due_ms = self.ctrl.now_ms + self.params.renew_interval_ms
            if entry.write and f.state == Own.CLAIMING and f.claim_written_ms is None and not f.claim_stale:
                # The claim may have landed or not: settle as if it had, then the read-back
                # decides. Waiting for a "written" that never came left the LUN CLAIMING for
                # good, with the hosts' requests held (seed 7254 at 300 steps).
                self._claim_landed(f)
            elif f.state == Own.CLAIMING and f.claim_stale and not f.io_inflight:
                self._read_record(f)    # the read that decides on a late claim failed: again
            return
        if entry.write:
            self.disk_health.record_written(f.lun)
            f.record = entry.record
            self._own_event(f, "written")
            return
        if self.ctrl.now_ms - f.read_start_ms >= self.params.lease_ms and \
                not self.buggify("skip_fencing_reread"):
            self._read_record(f)        # answered after a pause: a claim may have landed since; read again
            return
        if f.read_start_ms < f.granted_ms:
            # Begun before the partner handed us the LUN, the read shows its record from before
            # (its owner, our generation - 1): taken for a newer owner's, it fenced us and dropped
            # a line the partner had mirrored and acknowledged (seed 871927 at 1000 steps).
            self._read_record(f)
            return
        try:
            rec = R.parse_record_untrusted(data, f"lun{f.lun} reservation record")
        except FormatError as exc:
            self._note("reservation_corrupt", lun=f.lun, error=str(exc))
            rec = None
        f.renew_due_ms = self.ctrl.now_ms + self.params.renew_interval_ms
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
        if not f.io_inflight and self.ctrl.now_ms >= f.renew_due_ms:
            self._read_record(f)

    def _peer_claim_open(self, f) -> bool:
        """The newest record we read of this LUN is the peer's claim, still CLAIMED."""
        seen = f.last_seen if f.state == Own.WATCHING and f.last_seen is not None else (
            f.record.key() if f.record is not None else None)
        return seen is not None and seen[0] != self.id and seen[1] == R.LunState.CLAIMED

    def serves(self, lun) -> bool:
        """Would this controller take on host I/O for `lun` at this instant (OWNER or SOLO under
        a valid lease)? For checkers (the simulator's split-brain judge) and status."""
        f = self.fence[lun]
        return f.state in SERVING and self._lease_ok(f)

    def _lease_ok(self, f) -> bool:
        if self.buggify("fence_skip_lease_check") and f.state in OWNING:
            return True                 # a broken variant for the simulator: serve without a lease
        if f.state in (Own.OWNER, Own.RELEASING) and self.link.up:
            # Link lease: the partner acknowledged a frame we sent at heard_ms, so it cannot
            # have declared the link dead before then (one-way cuts included).
            return self.ctrl.now_ms < max(f.lease_until_ms, self.link.heard_ms + self.params.lease_ms)
        return f.state in (Own.SOLO, Own.FENCING) and self.ctrl.now_ms < f.lease_until_ms

    # -- boot and link up: the record decides ---------------------------------

    def _reread(self, f):
        self._read_record(f)

    def _st_tick(self, f):
        if not f.io_inflight:
            self._read_record(f)

    def _st_record(self, f, rec):
        me, peer = self.id, 1 - self.id
        seen = rec.key() if rec is not None else None
        if rec is None:                        # never written: the default owner claims it
            default = f.lun % 2
            if f.acks and not self._acks_wait(f, default == me):
                self._settle_acks(f, default == me)
            rec = self._new_record(f, default, 1, R.LunState.MIRRORED)
            if default == me:
                self._write_record(f, rec)
                f.record, f.generation = rec, 1
                f.lease_until_ms = f.read_start_ms + self.params.lease_ms
                return self._owner_or_fencing(f)
        if rec.owner == me and rec.state == R.LunState.CLAIMED and (
                f.replayed_generation != rec.generation):
            return self._resume_claim(f, rec)
        if f.acks and not self._acks_wait(f, rec.owner == me and rec.generation == f.acks_generation):
            self._settle_acks(f, rec.owner == me and rec.generation == f.acks_generation)
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
        f.void_mirror = rec.generation if rec.state != R.LunState.MIRRORED and not claim else 0
        if self.link.up and self.ctrl.mirroring:
            if self.params.auto_balance and f.lun % 2 == self.id:
                self._note("failback_request", lun=f.lun)
                self._ask_ownership(f)               # failback: the preferred owner asks for it
                f.last_change_ms = self.ctrl.now_ms
                f.want_back = True
            return Own.PARTNER
        # What we read, not the default record we stand in for it: the owner's first write is
        # that very record, and taken for it that write was no change, so a claim counted its
        # quiet time from before it landed (seed 700954: 182 ms of the 200).
        f.last_seen, f.last_change_ms = seen, self.ctrl.now_ms
        return Own.WATCHING

    def _owner_or_fencing(self, f):
        if self.link.up and self.ctrl.mirroring:
            return Own.OWNER
        self._to_fencing(f)
        return Own.FENCING

    # -- the owner alone ------------------------------------------------------

    def _to_fencing(self, f):
        f.solo_after_ms = None
        f.renew_due_ms = self.ctrl.now_ms
        self._read_record(f)
        self.ctrl._pump()

    def _fencing_record(self, f, rec):
        if rec is None:
            return self._record_lost(f)
        if not self._still_mine(f, rec):
            return self._fenced(f, rec)
        f.lease_until_ms = f.read_start_ms + self.params.lease_ms
        if f.solo_after_ms is not None:
            # Our bump landed: solo on a read begun lease_ms after it, still showing it (see below).
            self._write_record(f, self._renewal(f, rec, rec.generation, R.LunState.SOLO))
            return self._go_solo(f) if f.read_start_ms >= f.solo_after_ms else Own.FENCING
        if self.ctrl._lun_clean(f.lun) and self.ctrl.now_ms >= f.bump_after_ms:
            self._write_record(f, self._renewal(f, rec, rec.generation + 1, R.LunState.SOLO))
        elif self.ctrl._lun_clean(f.lun):
            # Too soon after our last bump (or our boot) for another: renew, bump at a later read.
            self._write_record(f, self._renewal(f, rec, rec.generation, settled(rec.state)))
        else:
            # Dirty lines here were mirrored (a solo owner writes through): the partner's copy is
            # good, so MIRRORED, even over a SOLO left from before whose MIRRORED rewrite failed.
            self._write_record(f, self._renewal(f, rec, rec.generation, R.LunState.MIRRORED))
        return Own.FENCING

    def _fencing_link_up(self, f):
        """Back in sync before the LUN went solo: the resync just done mirrored the lines of the
        writes whose mirror ack the link drop cut off, or they were destaged meanwhile; they are
        acknowledged at the read of the record this starts, if it still names us (_settle_acks).
        Left waiting for a solo that never comes, they kept their lines pinned and the versions
        they replaced alive in NVRAM, and a restart brought an old version back (seed 223)."""
        self._read_record(f)

    def _acks_wait(self, f, ours) -> bool:
        """Must writes whose mirror ack was cut off wait for a later read, though this one names
        us? Yes if it began less than lease_ms after our last bump or our boot (bump_after_ms):
        they are on disk, not in the partner's mirror, and a claim decided on our record from
        before may still land and replay the partner's older copy over them, as with serving
        solo (_go_solo). Seed 902844 at 300 steps: b restarted, bumped, was mirrored again, lost
        the link on a write and acknowledged it 96 ms after the bump; a's claim, decided before
        the bump, landed later and replayed write 8 over it. A renewal read settles them later."""
        return ours and f.read_start_ms < f.bump_after_ms

    def _settle_acks(self, f, ours):
        """Writes whose mirror ack the link drop cut off, at the first record read after the link
        came back. Acknowledged only if the record still names us at our generation: a line of
        theirs destaged while the partner could not hear us is on disk but not in the partner's
        mirror, and a claim the partner made meanwhile replays an older copy over it (seed 711369
        at 300 steps: b acknowledged write 37 after a's claim had replayed 34 over it)."""
        acks, f.acks = f.acks, []
        for op in acks:
            if not ours:
                op.req, req = None, op.req
                if req is not None:
                    self.ctrl._reply(req, EIO)
            self.write_path.finish(op, mirrored=ours)

    def _fencing_written(self, f):
        """Solo once the bump to the next generation (written clean) has landed. A renewal that
        merely found SOLO in the record is not one: taken for it, an owner went solo with dirty
        lines and served a newer write-through under an older cached line (seed 16701)."""
        rec = f.pending_write
        if rec.state != R.LunState.SOLO or rec.generation <= f.generation:
            return Own.FENCING
        f.generation = rec.generation
        f.bump_after_ms = self.ctrl.now_ms + self.params.lease_ms
        f.solo_after_ms = f.renew_due_ms = self.ctrl.now_ms + self.params.lease_ms
        return Own.FENCING

    def _go_solo(self, f):
        """Serve alone, write-through, at the generation of our bump. Only after a read begun
        lease_ms after the bump completed still showed it: a claim decided on our record from
        before the bump (its claimant had not seen it, so it keeps its mirror copy) lands within
        lease_ms of that read, and such a claim then fences us before we wrote anything through
        that its replay would overwrite."""
        f.solo_after_ms = None
        self.ctrl._mirroring_event("solo")
        self._note("solo", lun=f.lun, generation=f.generation)
        acks, f.acks = f.acks, []
        for op in acks:
            self.write_path.finish(op, mirrored=False)
        return Own.SOLO

    def _owner_record(self, f, rec):
        if rec is None:
            return self._record_lost(f)
        if not self._still_mine(f, rec):
            return self._fenced(f, rec)
        if f.acks and not self._acks_wait(f, rec.generation == f.acks_generation):
            self._settle_acks(f, rec.generation == f.acks_generation)
        f.lease_until_ms = f.read_start_ms + self.params.lease_ms
        self._write_record(f, self._renewal(f, rec, rec.generation, settled(rec.state)))
        return f.state

    def _record_lost(self, f):
        """We own the LUN and its record reads blank or corrupt: our first write of it failed, or
        a write was torn. A claim is a whole record (and its claimant abandons it if it reads
        anything else back), so nobody else owns it: write ours again; no lease from this read.
        Fenced by a blank record instead, the owner left the LUN with no owner at all."""
        self._note("reservation_rewritten", lun=f.lun, generation=f.generation)
        state = f.record.state if f.record is not None else R.LunState.MIRRORED
        if f.state != Own.REPLAYING:
            state = settled(state)
        self._write_record(f, self._new_record(f, self.id, f.generation, state, f.counter_written + 1))
        return f.state

    def _linked_owner_tick(self, f):
        """Mirrored, an owner's lease comes from the link (frames the partner acknowledged). It
        still reads the record every renew interval: a claim written while the link was down
        can land after the link came back and after the partner's own reading of the record,
        and nothing else would tell this owner; serving on its link lease, it never looked, and
        the claimant took the LUN over it (seed 10726 at 300 steps: both OWNER of lun1). When
        the link lease will not last the next renew interval (heartbeats no faster than the
        lease), the read is followed by a renewal as an owner alone does; otherwise an idle
        owner lost its lease at every tick (seed 108: stuck in RELEASING)."""
        self._renew_if_due(f)

    def _releasing_tick(self, f):
        self._release_if_clean(f)
        self._linked_owner_tick(f)

    def _linked_owner_record(self, f, rec):
        if rec is None:
            return self._record_lost(f)
        if not self._still_mine(f, rec):
            return self._fenced(f, rec)
        if f.acks and not self._acks_wait(f, rec.generation == f.acks_generation):
            self._settle_acks(f, rec.generation == f.acks_generation)
        link_lease_ms = self.link.heard_ms + self.params.lease_ms
        if rec.state != R.LunState.MIRRORED or (
                self.ctrl.now_ms + self.params.renew_interval_ms >= max(f.lease_until_ms, link_lease_ms)):
            # Mirrored: the record says so, also when the write of MIRRORED at link-up failed.
            f.lease_until_ms = f.read_start_ms + self.params.lease_ms
            self._write_record(f, self._renewal(f, rec, rec.generation, R.LunState.MIRRORED))
        return None

    def _partner_record(self, f, rec):
        if rec is not None and rec.owner == self.id:
            return self._st_record(f, rec)
        if rec is not None:
            f.record = rec
            if not self._claim_unconfirmed(rec) and self.mirror.has_undecided(f.lun):
                # The peer's claim we kept mirror blocks for is confirmed (its replay wrote its
                # held lines) or gone: our copies are older than its data now.
                for r in self.mirror.settle(f.lun, keep=False):
                    self.ctrl._persist(r)
        return None

    def _still_mine(self, f, rec) -> bool:
        return rec is not None and rec.owner == self.id and rec.generation == f.generation

    def _fenced(self, f, rec):
        """Someone else owns the LUN now: stop at once, drop our copies (promise 4)."""
        f.solo_after_ms = None
        self._note("fenced", lun=f.lun, record_owner=getattr(rec, "owner", None),
                   record_generation=getattr(rec, "generation", None),
                   our_generation=f.generation)
        f.lease_until_ms = -1
        acks, f.acks = f.acks, []
        for op in acks:
            op.req, req = None, op.req
            if req is not None:
                self.ctrl._reply(req, EIO)
            self.write_path.finish(op, mirrored=False)
        self._drop_lines(f, rec, "fenced")
        if rec is not None:
            f.record, f.generation = rec, rec.generation
            f.mirror_generation = -1
            f.last_seen, f.last_change_ms = rec.key(), self.ctrl.now_ms
        return Own.PARTNER if self.link.up else Own.WATCHING

    # -- holding host requests while a LUN settles ----------------------------

    def _hold(self, f, entry):
        if len(f.held) >= self.params.held_max:
            self.ctrl._reply(entry.req, EIO)
            return
        f.held.append(entry)

    def _release_held(self, f):
        if not f.held or (f.state in OWNING and f.state not in SERVING):
            return
        if f.state in SERVING and not self._lease_ok(f):
            return
        held, f.held = f.held, collections.deque()
        for h in held:
            self.write_path.reenter(h)
