"""Generation identifiers: which side's data is newer, and split brain.

Like DRBD's generation UUIDs. Each side keeps a current uuid (names its data
as of now), a bitmap uuid (the current uuid when it started recording changes
alone, 0 when it is not) and two history uuids. A primary that writes while
its peer is away, or a secondary promoted while the link is down, starts a new
data generation: bitmap := current, current := a new uuid. A finished resync
gives the target the source's current uuid and retires the source's bitmap
uuid into its history.

`decide(me, peer)` is a pure function of both sides' REPLICA_STATE and is
symmetric: when one side decides "become_source", the other, given the same
two states, decides "become_target". Both compute it, so neither has to
trust the other's verdict. `victim(policy, me, peer)` picks the side whose
data is discarded after a split brain, again the same on both sides.
"""
from ..formats import messages as M

SOURCE, TARGET, DIVERGED = "become_source", "become_target", "diverged"
POLICIES = ("discard-younger-primary", "discard-fewer-changes", "discard-a", "discard-b")


class Side:
    """One side's REPLICA_STATE, plus its controller id."""
    __slots__ = ("controller_id", "role", "flags", "generation", "current_uuid", "bitmap_uuid",
                 "history0", "history1", "sent_bits", "received_bits")

    def __init__(self, controller_id, **fields):
        self.controller_id = controller_id
        for name in self.__slots__[1:]:
            setattr(self, name, fields[name])

    def has(self, flag):
        return bool(self.flags & flag)

    @property
    def history(self):
        return {u for u in (self.history0, self.history1) if u}


def _mirror(verdict):
    event, full, reason = verdict
    return {SOURCE: TARGET, TARGET: SOURCE}.get(event, event), full, reason


def decide(me: Side, peer: Side):
    """(event, full_sync, reason): what `me` becomes towards `peer`."""
    if me.controller_id > peer.controller_id:          # one evaluation order: symmetric by construction
        return _mirror(decide(peer, me))
    return _decide_ordered(me, peer)


def _related(a, b) -> bool:
    return (a.current_uuid == b.current_uuid or (a.bitmap_uuid and a.bitmap_uuid == b.bitmap_uuid)
            or a.bitmap_uuid == b.current_uuid or b.bitmap_uuid == a.current_uuid)


def _decide_ordered(a: Side, b: Side):
    da, db = a.has(M.STATE_DISCARD), b.has(M.STATE_DISCARD)
    if da != db:
        return (TARGET if da else SOURCE), not _related(a, b), "operator discarded " + "ab"[
            a.controller_id if da else b.controller_id]
    fa, fb = a.has(M.STATE_FRESH), b.has(M.STATE_FRESH)
    if fa != fb:
        return (TARGET if fa else SOURCE), True, "fresh NVRAM knows nothing of the data"
    ia, ib = a.has(M.STATE_INCONSISTENT), b.has(M.STATE_INCONSISTENT)
    if ia and ib:
        return DIVERGED, False, "both sides are inconsistent sync targets"
    if ia != ib:
        return (TARGET if ia else SOURCE), False, "continuing an interrupted resync"
    if a.current_uuid == b.current_uuid:
        return _same_generation(a, b)
    if b.bitmap_uuid == a.current_uuid and a.bitmap_uuid != b.current_uuid:
        return TARGET, False, "peer has newer data (bitmap resync)"
    if a.bitmap_uuid == b.current_uuid and b.bitmap_uuid != a.current_uuid:
        return SOURCE, False, "this side has newer data (bitmap resync)"
    if a.bitmap_uuid and a.bitmap_uuid == b.bitmap_uuid:
        return DIVERGED, False, "split brain: both sides wrote since they parted"
    if b.current_uuid in a.history or b.bitmap_uuid in a.history - {0}:
        return SOURCE, True, "peer is generations behind (full resync)"
    if a.current_uuid in b.history or a.bitmap_uuid in b.history - {0}:
        return TARGET, True, "this side is generations behind (full resync)"
    return DIVERGED, False, "unrelated data generations"


def _same_generation(a, b):
    P = M.ROLE_PRIMARY
    if a.role == P and b.role == P:
        return DIVERGED, False, "both sides primary on one data generation"
    if a.role != b.role:
        return (SOURCE if a.role == P else TARGET), False, "same data generation"
    if a.generation != b.generation:
        return (SOURCE if a.generation > b.generation else TARGET), False, "same data generation"
    return SOURCE, False, "same data generation"       # two secondaries: a is the source


def victim(policy: str, me: Side, peer: Side):
    """The controller id whose data is discarded, or None if the policy cannot tell."""
    sides = {me.controller_id: me, peer.controller_id: peer}
    if policy in ("discard-a", "discard-b"):
        return "ab".index(policy[-1])
    if policy == "discard-fewer-changes":
        a, b = sides[0], sides[1]
        if a.sent_bits != b.sent_bits:
            return 0 if a.sent_bits < b.sent_bits else 1
        policy = "discard-younger-primary"
    if policy == "discard-younger-primary":
        a, b = sides[0], sides[1]
        if a.generation != b.generation:
            return 0 if a.generation > b.generation else 1
        return None
    raise ValueError(f"unknown policy {policy!r}")
