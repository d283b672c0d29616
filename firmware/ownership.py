"""The ownership state of one LUN: its states and events, the transition table, and what a
controller keeps per LUN (LunFence). The protocol that moves it (leases on the reservation
record, takeover, handover) and its argument are in firmware/fencing.py, takeover.py and
handover.py."""
import collections

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
    (Own.PARTNER, "request"): ("_partner_asked", Own.PARTNER),
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
    (Own.REPLAYING, "written"): ("_replay_written", Own.REPLAYING),
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
    (Own.RELEASING, "record"): ("_releasing_record", Own.RELEASING),
}
STATES = [v for k, v in vars(Own).items() if not k.startswith("_")]
EVENTS = ("record", "written", "link_up", "link_down", "tick", "move", "request", "grant", "replayed")


def settled(state):
    """The state an owner renews with once its replay is done: a claim becomes SOLO."""
    return R.LunState.SOLO if state == R.LunState.CLAIMED else state


class FenceError(Exception):
    """An ownership event that the state table does not allow (a protocol error)."""


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
