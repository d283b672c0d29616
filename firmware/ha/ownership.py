"""The ownership state of one LUN: its states and events, the transition table, and what a
controller keeps per LUN (LunFence). The protocol that moves it (leases on the reservation
record, takeover, handover) and its argument are in firmware/ha/fencing.py, takeover.py and
handover.py."""
import collections

from ..formats import reservation as R
from ..owners import FenceError  # noqa: F401 (the table's handlers raise it)

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

NONE = frozenset()
# (state, event) -> (handler, next state, the other next states the handler may choose). The
# handler returns None for the table's next state, or one of the others; a next state of None
# means the handler always decides. Any other outcome is a FenceError (`outcomes`).
TRANSITIONS = {
    (Own.STARTING, "record"): ("_st_record", None,
                                {Own.WATCHING, Own.CLAIMING, Own.OWNER, Own.FENCING, Own.PARTNER}),
    (Own.STARTING, "link_up"): ("_noop", Own.STARTING, NONE),
    (Own.STARTING, "link_down"): ("_noop", Own.STARTING, NONE),
    (Own.STARTING, "tick"): ("_st_tick", Own.STARTING, NONE),
    (Own.OWNER, "link_down"): ("_to_fencing", Own.FENCING, NONE),
    (Own.OWNER, "link_up"): ("_reread", Own.STARTING, NONE),
    (Own.OWNER, "tick"): ("_linked_owner_tick", Own.OWNER, NONE),
    (Own.OWNER, "move"): ("_start_release", Own.RELEASING, NONE),
    (Own.OWNER, "request"): ("_start_release", Own.RELEASING, NONE),
    (Own.FENCING, "tick"): ("_renew_if_due", Own.FENCING, NONE),
    (Own.FENCING, "record"): ("_fencing_record", Own.FENCING, {Own.SOLO, Own.PARTNER, Own.WATCHING}),
    (Own.FENCING, "written"): ("_fencing_written", Own.FENCING, NONE),
    (Own.FENCING, "link_up"): ("_fencing_link_up", Own.STARTING, NONE),
    (Own.FENCING, "link_down"): ("_noop", Own.FENCING, NONE),
    (Own.SOLO, "tick"): ("_renew_if_due", Own.SOLO, NONE),
    (Own.SOLO, "record"): ("_owner_record", Own.SOLO, {Own.PARTNER, Own.WATCHING}),
    (Own.SOLO, "written"): ("_noop", Own.SOLO, NONE),
    (Own.SOLO, "link_up"): ("_reread", Own.STARTING, NONE),
    (Own.SOLO, "link_down"): ("_noop", Own.SOLO, NONE),
    (Own.RELEASING, "tick"): ("_releasing_tick", Own.RELEASING, NONE),
    (Own.RELEASING, "written"): ("_release_written", None, {Own.PARTNER, Own.RELEASING}),
    (Own.RELEASING, "link_down"): ("_to_fencing", Own.FENCING, NONE),
    (Own.RELEASING, "request"): ("_noop", Own.RELEASING, NONE),
    (Own.RELEASING, "move"): ("_noop", Own.RELEASING, NONE),
    (Own.PARTNER, "link_down"): ("_to_watching", Own.WATCHING, NONE),
    (Own.PARTNER, "link_up"): ("_reread", Own.STARTING, NONE),
    (Own.PARTNER, "tick"): ("_partner_tick", Own.PARTNER, NONE),
    (Own.PARTNER, "grant"): ("_granted", Own.OWNER, NONE),
    (Own.OWNER, "grant"): ("_granted_already", Own.OWNER, NONE),      # the record said so first
    (Own.FENCING, "grant"): ("_granted_already", Own.FENCING, NONE),
    (Own.PARTNER, "move"): ("_ask_ownership", Own.PARTNER, NONE),
    (Own.PARTNER, "request"): ("_partner_asked", Own.PARTNER, NONE),
    (Own.WATCHING, "tick"): ("_renew_if_due", Own.WATCHING, NONE),
    (Own.WATCHING, "record"): ("_watch_record", Own.WATCHING,
                                {Own.CLAIMING, Own.OWNER, Own.FENCING, Own.PARTNER}),
    (Own.WATCHING, "link_up"): ("_reread", Own.STARTING, NONE),
    (Own.WATCHING, "link_down"): ("_watch_anew", Own.WATCHING, NONE),
    (Own.CLAIMING, "written"): ("_claim_written", Own.CLAIMING, NONE),
    (Own.CLAIMING, "tick"): ("_claim_tick", Own.CLAIMING, NONE),
    (Own.CLAIMING, "record"): ("_claim_record", Own.CLAIMING, {Own.REPLAYING, Own.WATCHING, Own.STARTING}),
    (Own.CLAIMING, "link_up"): ("_noop", Own.CLAIMING, NONE),
    (Own.CLAIMING, "link_down"): ("_noop", Own.CLAIMING, NONE),
    (Own.REPLAYING, "replayed"): ("_replayed", Own.REPLAYING, NONE),
    (Own.REPLAYING, "tick"): ("_replay_tick", Own.REPLAYING, NONE),
    (Own.REPLAYING, "record"): ("_replay_record", Own.REPLAYING,
                                 {Own.SOLO, Own.STARTING, Own.PARTNER, Own.WATCHING}),
    (Own.REPLAYING, "link_up"): ("_noop", Own.REPLAYING, NONE),
    (Own.REPLAYING, "link_down"): ("_noop", Own.REPLAYING, NONE),
    (Own.REPLAYING, "written"): ("_replay_written", Own.REPLAYING, NONE),
    # Admin moves reach a LUN in whatever state it is; only settled states act on them.
    (Own.STARTING, "move"): ("_noop", Own.STARTING, NONE),
    (Own.FENCING, "move"): ("_noop", Own.FENCING, NONE),
    (Own.SOLO, "move"): ("_noop", Own.SOLO, NONE),
    (Own.WATCHING, "move"): ("_noop", Own.WATCHING, NONE),
    (Own.CLAIMING, "move"): ("_noop", Own.CLAIMING, NONE),
    (Own.REPLAYING, "move"): ("_noop", Own.REPLAYING, NONE),
    # Ownership requests reach a LUN in whatever state it is; only an owner acts on them.
    (Own.STARTING, "request"): ("_noop", Own.STARTING, NONE),
    (Own.FENCING, "request"): ("_noop", Own.FENCING, NONE),
    (Own.SOLO, "request"): ("_noop", Own.SOLO, NONE),
    (Own.WATCHING, "request"): ("_noop", Own.WATCHING, NONE),
    (Own.CLAIMING, "request"): ("_noop", Own.CLAIMING, NONE),
    (Own.REPLAYING, "request"): ("_noop", Own.REPLAYING, NONE),
    # A record write started before a state change lands afterwards: nothing to do.
    (Own.STARTING, "written"): ("_noop", Own.STARTING, NONE),
    (Own.OWNER, "written"): ("_noop", Own.OWNER, NONE),
    (Own.OWNER, "record"): ("_linked_owner_record", Own.OWNER, {Own.PARTNER, Own.WATCHING}),
    (Own.PARTNER, "written"): ("_noop", Own.PARTNER, NONE),
    (Own.PARTNER, "record"): ("_partner_record", Own.PARTNER,
                               {Own.WATCHING, Own.CLAIMING, Own.OWNER, Own.FENCING}),
    (Own.WATCHING, "written"): ("_noop", Own.WATCHING, NONE),
    (Own.RELEASING, "record"): ("_releasing_record", Own.RELEASING, {Own.PARTNER, Own.WATCHING}),
}
STATES = [v for k, v in vars(Own).items() if not k.startswith("_")]
EVENTS = ("record", "written", "link_up", "link_down", "tick", "move", "request", "grant", "replayed")


def outcomes(state, event):
    """Every state (state, event) may lead to, by the table."""
    _handler, next_state, others = TRANSITIONS[(state, event)]
    return ({next_state} if next_state is not None else set()) | set(others)


def settled(state):
    """The state an owner renews with once its replay is done: a claim becomes SOLO."""
    return R.LunState.SOLO if state == R.LunState.CLAIMED else state


class LunFence:
    __slots__ = ("lun", "state", "record", "generation", "renew_due_ms", "io_inflight", "lease_until_ms",
                 "read_start_ms", "last_seen", "last_change_ms", "mirror_generation", "pending_write",
                 "claim_written_ms", "void_mirror", "held", "acks", "replay_left", "replay_written", "move_tag",
                 "want_back", "counter_written", "replay_failed", "replay_retry_ms", "replayed_generation",
                 "held_lines", "held_generation", "peer_generation", "replay_complete", "claim_read_ms",
                 "claim_stale", "bump_after_ms", "claim_over_generation", "solo_after_ms",
                 "acks_generation", "granted_ms")

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
        self.void_mirror = 0              # mirror copies of this LUN made below this generation are old
        self.held = collections.deque()   # host requests waiting for the LUN to settle
        self.acks = []                    # writes whose mirror ack was cut off by the link drop
        self.acks_generation = 0          # the generation we owned the LUN at when they were cut off
        self.replay_left = 0
        self.replay_written = []          # replay writes of this round done, waiting for the flush
        self.move_tag = 0
        self.want_back = False            # failback: the preferred owner wants its LUN back
        self.counter_written = 0          # the highest renewal counter we wrote (landed or not)
        self.replay_failed = False        # a replay write of this round failed: the block stays
        self.replay_retry_ms = None       # when the next replay round starts
        self.replayed_generation = 0      # the claim this incarnation replayed to the end
        self.held_lines = []              # dropped under an unconfirmed claim: kept in NVRAM, unused
        self.held_generation = 0          # the generation of the claim we hold them for
        self.replay_complete = False      # our takeover's replay is done: SOLO goes to the record next
        self.peer_generation = 0          # the newest generation the partner mirrored this LUN's writes at
        self.claim_read_ms = 0            # when the read our claim was decided on began
        self.granted_ms = -1              # when the partner last handed us the LUN (a grant)
        self.claim_stale = False          # our claim's write completed late: a fresh read decides
        self.bump_after_ms = 0            # no solo bump before this (lease_ms after the last, or boot)
        self.solo_after_ms = None         # our bump landed: solo on a read begun at or after this
        self.claim_over_generation = 0    # the generation of the record our claim was decided on


class RecordOp:
    __slots__ = ("lun", "write", "record")

    def __init__(self, lun, write, record=None):
        self.lun = lun
        self.write = write
        self.record = record
