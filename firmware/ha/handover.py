"""Moving a LUN's ownership while the link is up: the CLI, failback and balancing.

The owner asked for a LUN (OWNERSHIP_REQUEST, or `twincache ownership move`)
destages the LUN's dirty lines, writes the record naming its partner at the
next generation and sends OWNERSHIP_GRANT; the preferred owner of a LUN asks
for it back until it has it (failback). The states and the table are in
firmware/ha/ownership.py.
"""
from .ownership import BALANCE_RETRY_MS, FenceError, Own, settled
from ..formats import messages as M
from ..formats import reservation as R


class HandoverMixin:
    def move(self, lun, tag=0):
        """Admin: bring `lun` to this controller (or give it away if we own it)."""
        f = self.fence[lun]
        f.move_tag = tag
        self._own_event(f, "move")

    def _ask_ownership(self, f):
        body = M.Ownership.build(dict(lun=f.lun, scope=0, reserved0=0, lba=0, generation=f.generation,
                                      reserved=bytes(8)))
        self.link.send(M.MsgType.OWNERSHIP_REQUEST, M.Resource.OWNERSHIP, body, tag=f.move_tag)

    def _start_release(self, f):
        self._note("handover_start", lun=f.lun)
        self.ctrl._destage_now()

    def _release_if_clean(self, f):
        """Clean: read the record first, and write the release only over our own (see below)."""
        if not f.io_inflight and self.ctrl._lun_clean(f.lun):
            self._read_record(f)

    def _releasing_record(self, f, rec):
        """The release record is written like a renewal: after a fresh read that shows the LUN
        still ours at our generation. Written blind, a release delayed past our lease (a pause
        while RELEASING) landed over the claim of a partner that had taken the LUN meanwhile,
        and the partner then served at the release's older generation (seed 8126 at 300 steps)."""
        if rec is None:
            return self._record_lost(f)
        released = f.pending_write
        if released is not None and released.owner != self.id and rec.key() == released.key():
            # Our release landed though its write reported an error: it is done, grant. Taken
            # for another owner's record, it left the LUN with no owner (seed 10003).
            return self._release_written(f)
        if not self._still_mine(f, rec):
            return self._fenced(f, rec)
        f.lease_until_ms = f.read_start_ms + self.params.lease_ms
        if self.ctrl._lun_clean(f.lun):
            self._write_record(f, self._new_record(f, 1 - self.id, f.generation + 1, R.LunState.MIRRORED))
        else:
            self._write_record(f, self._renewal(f, rec, rec.generation, settled(rec.state)))
        return None

    def _release_written(self, f):
        rec = f.pending_write
        if rec.owner == self.id:          # an earlier write of ours landed: the release record is next
            return Own.RELEASING
        f.generation = rec.generation
        body = M.Ownership.build(dict(lun=f.lun, scope=0, reserved0=0, lba=0, generation=rec.generation,
                                      reserved=bytes(8)))
        self.link.send(M.MsgType.OWNERSHIP_GRANT, M.Resource.OWNERSHIP, body, tag=f.move_tag)
        self._note("handover", lun=f.lun, to="ab"[1 - self.id], generation=rec.generation)
        return Own.PARTNER

    def _granted(self, f, generation):
        if f.held_lines:                # the granter's confirmed claim replayed them, then it served
            held, f.held_lines = f.held_lines, []
            self.ctrl._forget_lines(held, True)
        self._free_stale_mirror(f)
        f.generation = generation
        f.want_back = False
        f.granted_ms = self.ctrl.now_ms
        f.lease_until_ms = self.ctrl.now_ms + self.params.lease_ms
        self._note("ownership", lun=f.lun, owner="ab"[self.id], generation=generation)

    def _granted_already(self, f, generation):
        """The grant of a LUN the record made ours first: asking for it back, we read the record
        while the grant was on the wire, and the partner's release record named us (VM pair in
        CI: the grant then ended the session as a protocol error, and both LUNs went solo). At
        the record's generation there is nothing left to do; at another it is an error."""
        if generation != f.generation:
            raise FenceError(f"lun{f.lun}: grant at generation {generation} to its owner at {f.generation}")
        f.want_back = False
        self._note("ownership", lun=f.lun, owner="ab"[self.id], generation=generation)

    def on_message(self, msg):
        body = M.parse_body_untrusted(msg.type, msg.payload, "ownership message")
        if body.lun >= len(self.fence):
            raise FenceError(f"ownership message for lun{body.lun}")
        f = self.fence[body.lun]
        if body.scope != 0:
            # The format has room for one cache line (scope 1); ownership and its fencing are per
            # LUN here, so a line is never handed out alone: say so, change nothing.
            self._note("ownership_refused", lun=body.lun, scope=body.scope, lba=body.lba,
                       reason="only whole-LUN ownership is served")
            return
        if msg.type == M.MsgType.OWNERSHIP_REQUEST:
            f.move_tag = msg.tag
            self._own_event(f, "request")
        elif msg.type == M.MsgType.OWNERSHIP_GRANT:
            self._own_event(f, "grant", body.generation)

    def _partner_asked(self, f):
        """The peer asks us for a LUN we are partner of: it takes us for the owner, and the record
        may say so. Its release record naming us can land after we read the record at a restart,
        and the grant went with the session our restart ended; the peer read its release back
        and became a partner too, and the LUN had no owner (seed 946666 at 300 steps). Read the
        record: naming us, it makes us the owner (_partner_record), and the peer's next request
        is an owner's to answer."""
        if not f.io_inflight:
            self._read_record(f)

    def _partner_tick(self, f):
        """Failback by balancing: the preferred owner keeps asking until it has its LUN back. While
        it asks it reads the record too: the owner's release record may have named us, and the
        grant that says so gone with its link session; asked again, the old owner, a partner now,
        says nothing, and the LUN had no owner (seed 841181 at 300 steps). The record then makes
        us the owner, as after a restart (_partner_record)."""
        if f.held_lines or self.mirror.has_undecided(f.lun) or f.want_back:
            self._renew_if_due(f)         # watch the claim we hold lines or copies for until it is confirmed
        if (f.want_back and self.ctrl.mirroring and self.ctrl.now_ms - f.last_change_ms >= BALANCE_RETRY_MS):
            f.last_change_ms = self.ctrl.now_ms
            self._ask_ownership(f)
