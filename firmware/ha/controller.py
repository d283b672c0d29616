"""The ha controller: the shared parts with ownership that moves (reservation records, leases,
takeover, handover).

`firmware/controller.py` is the write path, the mirror partner side and destage; they ask
about ownership through `firmware/owners.py`. `HaOwnership` is the part that answers here: it
owns each LUN's ownership state (firmware/ha/ownership.py), moved by three mixins of its own:
the record's I/O, leases and fencing (firmware/ha/fencing.py), taking a LUN over (takeover.py)
and handing it over while linked (handover.py). It reaches the controller only through
`self.ctrl`, and only for the names firmware/owners.py lists. Why two controllers never both
serve a LUN is argued at the top of fencing.py.
"""
from ..controller import Controller
from ..owners import Ownership
from ..requests import HERE, TAKEN, THERE, WRITE, Forwarded, HostRequest
from .fencing import FenceMixin
from .handover import HandoverMixin
from .ownership import EIO, OWNING, SERVING, Own, RecordOp
from .takeover import ReplayOp, TakeoverMixin

# Lines of LUNs in these states go out in a resync too: a LUN still reading its record may turn
# out ours; one we are claiming back (a resumed claim) holds lines whose other copy is the
# partner's mirror, which this resync would otherwise free (seed 419).
RESYNC_ALSO = (Own.STARTING, Own.CLAIMING, Own.REPLAYING)
RESYNC_HELD = (Own.CLAIMING, Own.REPLAYING)
WANTS_DESTAGE = (Own.FENCING, Own.RELEASING)


class HaController(Controller):
    """The shared parts, with `HaOwnership` as their ownership."""

    def __init__(self, params, nv, key: bytes, now_ms: int = 0):
        super().__init__(params, nv, key, now_ms)
        self.ownership = HaOwnership(self)

    def move_lun(self, lun, tag=0):
        """Admin: bring `lun` to this controller (or give it away if we own it)."""
        self.ownership.move(lun, tag)
        return self._take()


class HaOwnership(FenceMixin, TakeoverMixin, HandoverMixin, Ownership):
    """Ownership that moves: one `LunFence` per LUN, the record I/O, leases, takeover and
    handover. `ctrl` is the controller whose shared parts ask it."""

    def __init__(self, ctrl):
        super().__init__(ctrl)
        # Its settings, and the controller's parts it works with, fixed for the controller's life
        self.params, self.id, self.buggify = ctrl.params, ctrl.id, ctrl.buggify
        self.cache, self.primary, self.mirror, self.link, self.disk_health, self.write_path = (
            ctrl.cache, ctrl.primary, ctrl.mirror, ctrl.link, ctrl.disk_health, ctrl.write_path)
        self._init_fencing()

    # -- host I/O -------------------------------------------------------------

    def owns(self, lun) -> bool:
        return 0 <= lun < len(self.fence) and self.fence[lun].state in OWNING

    def partner_owns(self, lun):
        return self.fence[lun].state == Own.PARTNER

    def route(self, kind, req, lun, offset, arg, fua):
        """Where a host request for `lun` goes now: HERE, THERE (the owner) or TAKEN (dealt with)."""
        f = self.fence[lun]
        state = f.state
        if state == Own.PARTNER:
            return THERE
        if state == Own.WATCHING:
            self.ctrl._reply(req, EIO)       # the partner may still own it: refuse, never guess
            return TAKEN
        if state in (Own.OWNER, Own.SOLO) and self._lease_ok(f):
            if state == Own.SOLO and kind == WRITE:
                self.ctrl._write_through(req, lun, offset, arg, fua)
                return TAKEN
            return HERE
        self._hold(f, HostRequest(kind, req, lun, offset, bytes(arg) if kind == WRITE else arg, fua))
        return TAKEN

    def allocation_known_here(self, lun) -> bool:
        """This controller serves the LUN now: its cache and the disk are the whole truth."""
        f = self.fence[lun]
        return f.state in SERVING and self._lease_ok(f)

    # -- the mirror partner side ------------------------------------------------

    def mirror_generation_of(self, lun) -> int:
        """The generation mirror writes of `lun` carry: the LUN's own (its owner's fencing token)."""
        return self.fence[lun].generation & 0xFFFFFFFF

    def mirror_written_at(self, lun, generation):
        """The owner mirrored a write of `lun` at `generation`: remember it for the void decision
        (seeds 377 and 5134: a partner that never read the owner's newer record voided its mirror,
        acknowledged writes with it, at the takeover)."""
        if 0 <= lun < len(self.fence):
            f = self.fence[lun]
            f.peer_generation = max(f.peer_generation, generation)

    def mirror_owned_by_peer(self, lun) -> bool:
        """May a resync from the peer void our mirror blocks of `lun`? Not while we take it over."""
        return self.fence[lun].state in (Own.PARTNER, Own.WATCHING, Own.STARTING)

    def mirror_replaying(self, lun) -> bool:
        """Are our mirror blocks of `lun` what our takeover (a claim, or its replay) writes out?
        The old owner may have reused their blocks meanwhile: a version its newer write replaced
        was freed when that write was cut off and failed, though our copy of it was the one
        acknowledged (seed 805035 at 300 steps: b mirrored another LUN's line into the block of
        write 32 while a claimed lun1, and a's replay lacked it). A peer's write into such a
        block ends the session; the peer reconnects, and once the replay is done its blocks
        are free."""
        return self.fence[lun].state in (Own.CLAIMING, Own.REPLAYING)

    def mirror_ours(self, lun) -> bool:
        """Does a resync's copy of `lun` go, resent or not (as it lands, and at SYNC_DONE)? Yes
        for a LUN we own: a restarted peer resent lines it held from before it lost the LUN,
        before its read of the record told it so; its flush-done for them (a control frame)
        overtook the resync's data, and the copy stayed in our mirror for a later claim of ours
        to replay over our own newer write-through (seed 13790 at 300 steps: write 19 over 90)."""
        return self.fence[lun].state in OWNING

    def mirror_undecided(self, lun) -> bool:
        """Is it too early to void our mirror blocks of `lun` the peer did not resend? Yes while we
        read its record: it may name our own unfinished claim, whose replay needs them. And while
        we claim it: confirmed, the replay needs them; abandoned (the owner renewed over it), they
        are older than the owner's data and go when the LUN leaves STARTING. Kept outright, they
        stayed for a later takeover to replay (seed 9937 at 300 steps: 67 stale lines of lun2).
        And while the newest record we read is the peer's own claim, still CLAIMED: the lines it
        holds under it are not resent, and if the claim is cut short by a crash, the peer forgets
        them once our own claim is confirmed, so our copy must be there for our replay (seed
        16675 at 300 steps: voided at a resync under b's claim, b crashed, a claimed and replayed
        a mirror without write 34). They are settled when a read shows the claim gone."""
        f = self.fence[lun]
        return f.state in (Own.STARTING, Own.CLAIMING) or (
            f.state in (Own.PARTNER, Own.WATCHING) and self._peer_claim_open(f))

    def resync_copy_stored(self, lun):
        if self.mirror_ours(lun):
            self._free_stale_mirror(self.fence[lun])    # resent lines of a LUN the peer lost to us

    def lines_to_resync(self) -> list:
        # A LUN still reading its record (STARTING) may turn out ours: mirror its lines too; if it
        # is the partner's, _drop_lines frees the partner's copies with flush-done.
        lines = [line for line in self.cache.lines.values()
                 if self.owns(line.lun) or self.fence[line.lun].state in RESYNC_ALSO]
        # Lines we hold (a claim over them was not confirmed) while we claim their LUN
        # ourselves: our replay writes them, but if we go down first, the partner's claim
        # replays its mirror copy, the only other one. Not resent, the resync freed it
        # (seed 201100 at 300 steps: a held 24 lines, crashed in its claim, and b took the
        # LUN over with none of them). A held line destaged since is on disk, its block freed
        # and its copy freed with flush-done: resent, it came back to the partner's mirror as a
        # line we no longer hold, replayed over newer data at the partner's next takeover
        # (seed 970864 at 1000 steps).
        lines += [line for f in self.fence if f.state in RESYNC_HELD for line in f.held_lines
                  if not line.dead]
        return lines

    def cut_off(self, op):
        if not op.lines:
            self.write_path.finish(op, mirrored=False)
            return
        if op.req.__class__ is Forwarded:
            op.req = None         # the forwarder failed it with the session; its tag dies too
        f = self.fence[op.lines[0].lun]
        if not f.acks:
            f.acks_generation = f.generation
        f.acks.append(op)         # acknowledged once on disk, or at a record read naming us

    def link_down(self):
        for f in self.fence:
            self._own_event(f, "link_down")

    def resync_ended(self):
        for f in self.fence:
            self._own_event(f, "link_up")

    # -- destage ------------------------------------------------------------------

    def allows_disk(self, lun) -> bool:
        return self._lease_ok(self.fence[lun])

    def wants_destage(self) -> bool:
        return any(f.state in WANTS_DESTAGE for f in self.fence)

    def disk_done(self, entry, error, data) -> bool:
        kind = entry.__class__
        if kind is ReplayOp:
            entry.error = entry.error or error
            entry.remaining -= 1
            if entry.remaining:
                return False
            self._replay_done(entry, entry.error)
        elif kind is RecordOp:
            self._record_done(entry, error, data)
        else:
            raise AssertionError(f"a disk op of kind {kind.__name__}")
        return True

    def flush_done(self, waiter, error):
        self._replay_durable(waiter, error)

    # -- time and status ----------------------------------------------------------

    def tick(self):
        for f in self.fence:
            self._own_event(f, "tick")
            if f.held and self._lease_ok(f):
                self._release_held(f)

    def lun_status(self, dirty_by_lun) -> dict:
        return {f"lun{f.lun}": {"state": f.state, "generation": f.generation, "held": len(f.held),
                                "dirty_lines": dirty_by_lun.get(f.lun, 0)} for f in self.fence}
