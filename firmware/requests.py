"""The records a host request travels in through the firmware: a write waiting for its mirror
ack, a read being assembled, a request the partner forwarded to us. Small __slots__ classes,
made on the hot path; every part that handles requests imports them from here.

Where a host request goes (the ownership part's route, firmware/owners.py): HERE (carry it out in this controller),
THERE (forward it to the partner, the owner), TAKEN (already dealt with: answered, held until
the LUN settles, or written through)."""

HERE, THERE, TAKEN = "here", "there", "taken"


class HostRequest:
    """A host request parked until it can go on: a write waiting for free blocks, or a request
    held while its LUN settles. `kind` is "w" or "r"; `arg` a write's data (its own copy) or a
    read's length."""
    __slots__ = ("kind", "req", "lun", "offset", "arg", "fua")

    def __init__(self, kind, req, lun, offset, arg, fua):
        self.kind = kind
        self.req = req
        self.lun = lun
        self.offset = offset
        self.arg = arg
        self.fua = fua


class Forwarded:
    """A host request that arrived from the partner (the non-owner forwarded it) in link session
    `session`: its tag means something only in that session."""
    __slots__ = ("tag", "op", "session")

    def __init__(self, tag, op, session):
        self.tag = tag
        self.op = op
        self.session = session


class WriteOp:
    __slots__ = ("req", "seq", "lines", "replaced", "fua")

    def __init__(self, req, seq, lines, fua):
        self.req = req
        self.seq = seq
        self.lines = lines
        self.replaced = []
        self.fua = fua


class ReadOp:
    __slots__ = ("req", "lun", "offset", "length", "overlay")

    def __init__(self, req, lun, offset, length, overlay):
        self.req = req
        self.lun = lun
        self.offset = offset
        self.length = length
        self.overlay = overlay
