"""The records a host request travels in through the firmware: a write waiting for its mirror
ack, a read being assembled, a request the partner forwarded to us. Small __slots__ classes,
made on the hot path; every part that handles requests imports them from here.

Where a host request goes (the ownership part's route, firmware/owners.py): HERE (carry it
out in this controller), THERE (forward it to the partner, the owner), TAKEN (already dealt
with: answered, held until the LUN settles, or written through)."""

HERE, THERE, TAKEN = "here", "there", "taken"

# A host request's kind; its `arg` is a write's data, or the length of the range for the others
# (none for a flush).
WRITE, READ, FLUSH, TRIM, ZEROES, BLOCK_STATUS = "w", "r", "f", "t", "z", "b"


class HostRequest:
    """One host request: a loop turn's batch hands them in (`host_requests`), and one is parked
    until it can go on (a write waiting for free blocks, or a request held while its LUN
    settles: then a write's `arg` is its own copy of the data)."""
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


def one_by_one(node, batch) -> list:
    """`host_requests` for a node whose host entry points each return their own actions (the
    log variant's): the batch's requests in order, their actions in one list."""
    out = []
    for h in batch:
        kind = h.kind
        if kind == WRITE:
            out += node.host_write(h.req, h.lun, h.offset, h.arg, h.fua)
        elif kind == READ:
            out += node.host_read(h.req, h.lun, h.offset, h.arg)
        elif kind == FLUSH:
            out += node.host_flush(h.req, h.lun)
        elif kind == ZEROES:
            out += node.host_write_zeroes(h.req, h.lun, h.offset, h.arg, h.fua)
        elif kind == TRIM:
            out += node.host_trim(h.req, h.lun, h.offset, h.arg)
        else:
            raise ValueError(f"a host request of kind {kind!r} this node does not take")
    return out
