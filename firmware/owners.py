"""Who owns a LUN: the part the controller's shared parts ask.

The write path, the mirror partner side, destage and allocation never look at
how ownership is decided. They ask `ctrl.ownership`, a part of its own with
its own state, and a mode composes the controller with the part it needs:

- ha mode: `HaOwnership` in `firmware/ha/controller.py` (reservation records,
  leases, takeover, handover; ownership moves at run time);
- replica mode: `ReplicaOwnership` in `firmware/replica/controller.py`
  (`FixedOwnership`: the primary owns every LUN, its role decides);
- the test rigs' static pairs: `hal/sim/static.py` (`FixedOwnership`, LUN n
  belongs to controller n % 2), outside the firmware.

`Ownership` lists the methods, each with what it answers. A part reaches its
controller through `self.ctrl`, and an ownership that moves only for the
names listed below. `FixedOwnership` answers them for ownership that never
moves under the controller's feet: nothing to fence, no record to read, no
takeover to replay, so a write cut off by the link is done once it is in our
NVRAM and the partner's mirror holds only the partner's LUNs. A subclass
says which LUNs are ours (`owns`).
"""
from .requests import HERE, THERE


# What an ownership that moves (firmware/ha/) is given at its start, fixed for the controller's
# life: its settings and the controller's parts it works with.
GIVEN_BY_THE_CONTROLLER = frozenset({
    "params", "id", "buggify",                                  # settings, who we are, broken variants
    "cache", "primary", "mirror", "link", "disk_health", "write_path",     # the parts
})

# What it may ask of the controller itself, through `self.ctrl`, and nothing else
# (tests/test_boundary.py holds it to these two lists).
ASKED_OF_THE_CONTROLLER = frozenset({
    # time, the action list, whether the partner's mirror is a copy of our cache
    "now_ms", "out", "mirroring",
    # disk I/O of its own (records, replay), persisting NVRAM, and the completions
    "_disk_op", "_persist", "_disk_write_failed", "_after_flush",
    # host requests it held or refused, replay writes straight to disk
    "_reply", "_write_through",
    # the write path's lines of a LUN: clean yet, dropped for a newer owner, destaged now
    "_lun_clean", "_forget_lines", "_destage_now", "_pump",
    # the mirroring table (a LUN went solo, a takeover finished)
    "_mirroring_event",
})


class FenceError(Exception):
    """An ownership event or message that the ownership in force does not allow (a protocol
    error: the link session ends)."""


class Ownership:
    """The questions the shared parts ask, and the events they pass on. Abstract."""

    def __init__(self, ctrl):
        self.ctrl = ctrl

    # -- host I/O ---------------------------------------------------------------

    def owns(self, lun) -> bool:
        """Is `lun` ours now (its host I/O is done here)?"""
        raise NotImplementedError

    def partner_owns(self, lun) -> bool:
        """Is `lun` the partner's for certain (its host I/O is forwarded there)?"""
        raise NotImplementedError

    def route(self, kind, req, lun, offset, arg, fua):
        """Where a host request for `lun` goes now: HERE, THERE (the owner) or TAKEN (dealt
        with: refused, held, or written through)."""
        raise NotImplementedError

    def allocation_known_here(self, lun) -> bool:
        """Are our cache and the disk the whole truth about `lun` (block status)?"""
        raise NotImplementedError

    # -- the mirror partner side (firmware/peer.py, firmware/mirror.py) ----------

    def mirror_generation_of(self, lun) -> int:
        """The generation our mirror writes of `lun` carry."""
        raise NotImplementedError

    def mirror_written_at(self, lun, generation):
        """The peer mirrored a write of `lun` at `generation` (not a resync's copy)."""
        raise NotImplementedError

    def mirror_owned_by_peer(self, lun) -> bool:
        """May a resync from the peer void our mirror blocks of `lun`?"""
        raise NotImplementedError

    def mirror_replaying(self, lun) -> bool:
        """Are our mirror blocks of `lun` what a takeover of ours writes out?"""
        raise NotImplementedError

    def mirror_ours(self, lun) -> bool:
        """Does a resync's copy of `lun` go (the LUN is ours)?"""
        raise NotImplementedError

    def mirror_undecided(self, lun) -> bool:
        """Is it too early to void our mirror blocks of `lun` the peer did not resend?"""
        raise NotImplementedError

    def resync_copy_stored(self, lun):
        """A resync's copy of `lun` was committed in our mirror."""
        raise NotImplementedError

    def lines_to_resync(self) -> list:
        """The lines a resync sends the partner's mirror (any order)."""
        raise NotImplementedError

    def cut_off(self, op):
        """The link went down while write `op` waited for the mirror's ack."""
        raise NotImplementedError

    def link_down(self):
        """The link is down; cut-off writes and forwarded requests are dealt with."""
        raise NotImplementedError

    def resync_ended(self):
        """A resync ended: the partner's mirror is a copy of our cache again."""
        raise NotImplementedError

    # -- destage (firmware/destage.py) --------------------------------------------

    def allows_disk(self, lun) -> bool:
        """May our lines of `lun` be written to its disk now?"""
        raise NotImplementedError

    def wants_destage(self) -> bool:
        """Does ownership wait for the cache to empty (destage now, whatever the watermarks)?"""
        raise NotImplementedError

    def disk_done(self, entry, error, data) -> bool:
        """One completion of a disk operation ownership started (the shared parts know only
        theirs); True when the operation is done (the controller forgets it)."""
        raise NotImplementedError

    def flush_done(self, waiter, error):
        """A disk flush ownership waited on finished."""
        raise NotImplementedError

    # -- time, status, messages -------------------------------------------------

    def tick(self):
        """Time passed (the controller's now_ms)."""
        raise NotImplementedError

    def lun_status(self, dirty_by_lun) -> dict:
        """Each LUN's ownership for `status()`, by name ("lun0": {...})."""
        raise NotImplementedError

    def on_message(self, msg):
        """An OWNERSHIP_REQUEST or OWNERSHIP_GRANT from the peer."""
        raise NotImplementedError


class FixedOwnership(Ownership):
    """Ownership that never moves under the controller's feet. A subclass defines `owns`."""

    def partner_owns(self, lun) -> bool:
        return not self.owns(lun)

    def route(self, kind, req, lun, offset, arg, fua):
        return HERE if self.owns(lun) else THERE

    def allocation_known_here(self, lun) -> bool:
        return self.owns(lun)

    def mirror_generation_of(self, lun) -> int:
        return self.ctrl.generation & 0xFFFFFFFF

    def mirror_written_at(self, lun, generation):
        pass

    def mirror_owned_by_peer(self, lun) -> bool:
        return True

    def mirror_replaying(self, lun) -> bool:
        return False

    def mirror_ours(self, lun) -> bool:
        return False

    def mirror_undecided(self, lun) -> bool:
        return False

    def resync_copy_stored(self, lun):
        pass

    def lines_to_resync(self) -> list:
        return list(self.ctrl.cache.lines.values())

    def cut_off(self, op):
        self.ctrl.write_path.finish(op, mirrored=False)

    def link_down(self):
        pass

    def resync_ended(self):
        pass

    def allows_disk(self, lun) -> bool:
        return True

    def wants_destage(self) -> bool:
        return False

    def disk_done(self, entry, error, data) -> bool:
        raise AssertionError(f"a disk op ({entry.__class__.__name__}) that fixed ownership never starts")

    def flush_done(self, waiter, error):
        raise AssertionError(f"a flush waiter ({waiter.__class__.__name__}) fixed ownership never makes")

    def tick(self):
        pass

    def lun_status(self, dirty_by_lun) -> dict:
        return {}

    def on_message(self, msg):
        raise FenceError("ownership message to a controller whose ownership never moves")
