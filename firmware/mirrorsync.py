"""The ha pair's mirroring state as a table: is the partner's mirror a copy of our cache?

States:
- down: no link session. Writes go on without the partner (held for their mirror ack, or
  written through by a LUN served alone).
- resyncing: a session is up and every live line is being resent, between SYNC_BEGIN and
  SYNC_DONE; a write is mirrored, but the partner's copy is not complete yet.
- resync_again: a LUN went solo while the resync ran: lines it delivered may have been
  destaged and overwritten alone since, with their flush-done still on the way. When the
  partner answers SYNC_DONE, everything is resent once more, and the partner frees every
  line not resent (seed 13790 at 300 steps: an old line kept while the owner was mirrored).
- mirrored: the partner answered SYNC_DONE; its mirror holds every dirty line of ours.
- resending: mirrored, and everything is being resent once more after a takeover of ours finished
  while the partner was linked: its mirror may hold copies of lines of ours from before the claim
  it lost, which our replay made durable or overwrote; it frees what is not resent (seed 1201964
  at 1,000 steps: the partner's claim, abandoned to ours, kept three such copies for good). The
  pair stays mirrored and serving meanwhile: the end of a resend re-reads no record.
- resend_again: mirrored and resending, and another takeover finished (or a LUN went solo)
  meanwhile: when the partner answers SYNC_DONE everything is resent once more, still mirrored.
  (Sent through resync_again, the second resend became a full resync, whose end re-read every
  LUN's record: a LUN being released refused that as a protocol error and the session ended,
  seed 1900132 at 300 steps.)

Events:
- link_up: a session came up (the resync starts).
- solo: one of our LUNs went solo, at a new generation.
- takeover: our takeover of a LUN finished while the partner was linked.
- sync_done: the partner answered our SYNC_DONE.
- link_down: the session ended.

The table gives the next state; the handlers in firmware/peer.py do what a
transition means (send the resync, unpin its lines, tell the LUNs). A pair not
in the table cannot happen: a session comes up only after the last one ended.
"""

DOWN, RESYNCING, RESYNC_AGAIN, MIRRORED = "down", "resyncing", "resync_again", "mirrored"
RESENDING, RESEND_AGAIN = "resending", "resend_again"
STATES = (DOWN, RESYNCING, RESYNC_AGAIN, MIRRORED, RESENDING, RESEND_AGAIN)
MIRRORING = (MIRRORED, RESENDING, RESEND_AGAIN)             # the partner's mirror holds every dirty line
PENDING = (RESYNCING, RESYNC_AGAIN, RESENDING, RESEND_AGAIN)  # a resync of ours awaits its SYNC_DONE
EVENTS = ("link_up", "solo", "takeover", "sync_done", "link_down")

TRANSITIONS = {
    (DOWN, "link_up"): RESYNCING,
    (DOWN, "solo"): DOWN,
    (DOWN, "takeover"): DOWN,
    (DOWN, "link_down"): DOWN,
    (RESYNCING, "solo"): RESYNC_AGAIN,
    (RESYNCING, "takeover"): RESYNC_AGAIN,
    (RESYNCING, "sync_done"): MIRRORED,
    (RESYNCING, "link_down"): DOWN,
    (RESYNC_AGAIN, "solo"): RESYNC_AGAIN,
    (RESYNC_AGAIN, "takeover"): RESYNC_AGAIN,
    (RESYNC_AGAIN, "sync_done"): RESYNCING,     # resent from the start
    (RESYNC_AGAIN, "link_down"): DOWN,
    (MIRRORED, "solo"): MIRRORED,               # nothing the partner holds is older: no resync ran
    (MIRRORED, "takeover"): RESENDING,
    (MIRRORED, "sync_done"): MIRRORED,          # an answer to no resync of ours: nothing changes
    (MIRRORED, "link_down"): DOWN,
    (RESENDING, "solo"): RESEND_AGAIN,
    (RESENDING, "takeover"): RESEND_AGAIN,
    (RESENDING, "sync_done"): MIRRORED,
    (RESENDING, "link_down"): DOWN,
    (RESEND_AGAIN, "solo"): RESEND_AGAIN,
    (RESEND_AGAIN, "takeover"): RESEND_AGAIN,
    (RESEND_AGAIN, "sync_done"): RESENDING,     # resent from the start, still mirrored
    (RESEND_AGAIN, "link_down"): DOWN,
}


# The transitions that start sending every line to the partner (SYNC_BEGIN): a session came up,
# or a takeover of ours finished while mirrored. (A resend from the start at SYNC_DONE is the
# answer's handler's, in firmware/peer.py.)
STARTS_A_RESYNC = {(DOWN, "link_up"), (MIRRORED, "takeover")}


class MirrorSyncError(AssertionError):
    """An event the mirroring state cannot take: a bug in the firmware, never the partner's input."""


def next_state(state, event):
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise MirrorSyncError(f"mirroring: {event} cannot happen in state {state}") from None


__all__ = ["DOWN", "RESYNCING", "RESYNC_AGAIN", "MIRRORED", "RESENDING", "RESEND_AGAIN", "STATES", "EVENTS",
           "TRANSITIONS", "MIRRORING", "PENDING", "MirrorSyncError", "next_state"]
