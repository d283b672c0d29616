"""One interpreter of the firmware's actions, for every place the firmware runs.

The firmware returns actions (firmware/actions.py); the runtime (files,
sockets, a flush thread), the simulator (virtual time, seeded faults) and the
in-memory rigs of the tests carry them out. They differ in what an action
does, never in how a list of actions is taken: in order, each by the method
of the place's `Effects` that `METHODS` names for its class. An action a
place does not carry out (a class not in `METHODS`, or one the place leaves
to the base class, such as reservation records in replica mode) raises
`UnknownAction` at once: dropped, it would be a promise the firmware thinks
was kept.
"""
from firmware import actions as A

METHODS = {
    A.Persist: "persist",
    A.Transmit: "transmit",
    A.HostReply: "host_reply",
    A.DiskRead: "disk_read",
    A.DiskWrite: "disk_write",
    A.DiskFlush: "disk_flush",
    A.RecordRead: "record_read",
    A.RecordWrite: "record_write",
    A.DiskExtents: "disk_extents",
    A.Notify: "notify",
    A.LinkReset: "link_reset",
}


class UnknownAction(AssertionError):
    """A place the firmware runs was handed an action it does not carry out."""


class Effects:
    """What one place does for each action: one method per entry of METHODS.

    Every method here refuses its action; a place overrides those its firmware
    asks for, and is told at once when it is asked for another."""

    who = "the controller"

    def refuse(self, act):
        raise UnknownAction(f"{self.who} asked for an action this place does not carry out: {act!r}")

    persist = transmit = host_reply = disk_read = disk_write = disk_flush = refuse
    record_read = record_write = disk_extents = notify = link_reset = refuse


def interpreter(effects: Effects):
    """Return execute(actions), which carries each action out by `effects`' method for its class.

    The methods are looked up once, here: the table is a dict of bound methods, so an action
    costs one dict lookup and one call on the hot path."""
    table = {cls: getattr(effects, name) for cls, name in METHODS.items()}
    refuse = effects.refuse

    def execute(actions):
        get = table.get
        for act in actions:
            handler = get(act.__class__)
            if handler is None:
                refuse(act)
            handler(act)

    return execute


__all__ = ["METHODS", "Effects", "UnknownAction", "interpreter"]
