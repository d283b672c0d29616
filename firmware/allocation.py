"""Block allocation for NBD_CMD_BLOCK_STATUS (`base:allocation`): where a LUN may hold data.

Owns the one answer the host port cannot give alone. A range of a LUN is a
hole (reads as zeroes, was never written) only if both agree: the disk (the
runtime asks the backend with a DiskExtents action: SEEK_DATA/SEEK_HOLE on a
sparse image file) and the cache (no cache line covers it, dirty or being
destaged). Everything else is data.

Rules:
- Never report data as a hole: a copy tool skips holes, so that would lose
  data. When in doubt, data: a disk error, a backend that cannot tell, a LUN
  settling after a role change, a partner's LUN while the link is down: all
  answer "all data", which the spec allows always.
- A LUN the partner owns is asked of the partner (IoOp.BLOCK_STATUS over the
  link, like a forwarded read): only the owner knows its cache. An owner that
  does not know the op answers EINVAL, and that answer, any other error, or
  runs that do not fit the range, become "all data" here.
- Cache lines are counted twice, when the question is asked and when the disk
  answers. A line leaves the cache only after its destage write completed, so
  an acknowledged write is either on disk before the disk is asked, or in the
  cache at the first count: no order of events makes it a hole.
- Cache lines count whole (a partly dirty line is data all through).
- Trimmed ranges stay data (TRIM discards nothing here), and so do zeroed ones
  (WRITE_ZEROES writes zeroes through the cache).
"""
from . import actions as A
from .cache import LUN_SHIFT
from .formats import FormatError
from .formats import messages as M

EINVAL, ESTALE = 22, 116
STATE_DATA = 0
STATE_HOLE_ZERO = 3            # NBD_STATE_HOLE | NBD_STATE_ZERO: not allocated, reads as zeroes


class AllocOp:
    """A block status question waiting for the disk's answer."""
    __slots__ = ("req", "lun", "offset", "length", "cached")

    def __init__(self, req, lun, offset, length, cached):
        self.req = req
        self.lun = lun
        self.offset = offset
        self.length = length
        self.cached = cached          # cache line ranges when the question was asked


# What allocation asks of the controller through `self.ctrl`, and nothing else
# (tests/test_boundary.py holds it to this list).
ASKED_OF_THE_CONTROLLER = frozenset({
    "out", "stats", "ownership",                # the action list, counters, who owns the LUN
    "_check_range", "_reply", "_disk_op",       # the host request's checks and answer, a disk op
    "_forward",                                 # a question for the partner's LUN
})


class Allocation:
    """Block status questions, a part of the controller: asked here of the disk and the cache,
    or forwarded to the LUN's owner. Given the cache and the link; `forwards` is False for a
    mode whose partner is not asked (replica mode: all data)."""

    def __init__(self, ctrl, cache, link, forwards=True):
        self.ctrl = ctrl
        self.cache = cache
        self.link = link
        self.forwards = forwards

    def ask(self, req, lun, offset, length):
        """Reply with [(length_bytes, status), ...] runs from `offset`, within `length`."""
        ctrl = self.ctrl
        error = ctrl._check_range(lun, offset, length)
        if error or not length:
            ctrl._reply(req, EINVAL)
            return
        ctrl.stats["block_status"] += 1
        ownership = ctrl.ownership
        if ownership.allocation_known_here(lun):
            op = ctrl._disk_op(AllocOp(req, lun, offset, length, self._cached_ranges(lun, offset, length)))
            ctrl.out.append(A.DiskExtents(op, lun, offset, length))
        elif ownership.partner_owns(lun) and self.link.up and self.forwards:
            ctrl.stats["block_status_forwarded"] += 1
            ctrl._forward(req, M.IoOp.BLOCK_STATUS, lun, offset, length, None, False)
        else:
            self._all_data(req, length)

    def _all_data(self, req, length):
        self.ctrl.stats["block_status_all_data"] += 1
        self.ctrl._reply(req, 0, [(length, STATE_DATA)])

    def forwarded_done(self, req, lun, offset, length, error, payload):
        """The owner's answer to a forwarded question; anything but good runs is all data."""
        if error == ESTALE and self.ctrl.ownership.owns(lun):  # ownership came here meanwhile: ask here
            self.ask(req, lun, offset, length)
            return
        try:
            if error:
                raise FormatError(f"error {error}")
            runs = M.parse_block_runs_untrusted(payload[M.IO_REPLY_HEAD.size:], length)
        except FormatError:
            self._all_data(req, length)
            return
        self.ctrl._reply(req, 0, runs)

    def _cached_ranges(self, lun, offset, length) -> list:
        bs = self.cache.block_size
        mask = (1 << LUN_SHIFT) - 1
        lines = self.cache.overlapping(lun, offset // bs, (offset + length - 1) // bs)
        return [((line.key & mask) * bs, (line.key & mask) * bs + bs) for line in lines]

    def disk_done(self, entry, error, data):
        """The disk's answer (DiskExtents) to an AllocOp."""
        if error:
            self._all_data(entry.req, entry.length)
            return
        ranges = list(data) + entry.cached + self._cached_ranges(entry.lun, entry.offset, entry.length)
        runs = allocation_runs(entry.offset, entry.length, ranges)[:M.BLOCK_RUNS_MAX]
        self.ctrl.stats["block_status_holes"] += sum(1 for _, status in runs if status)
        self.ctrl._reply(entry.req, 0, runs)


def allocation_runs(offset, length, data_ranges) -> list:
    """[(length, status)] runs over [offset, offset + length): data where any range overlaps."""
    end = offset + length
    runs, pos = [], offset
    for start, stop in sorted(data_ranges):
        start, stop = max(start, pos), min(stop, end)
        if start >= stop:
            continue
        if start > pos:
            runs.append((start - pos, STATE_HOLE_ZERO))
        if runs and runs[-1][1] == STATE_DATA and start == pos:
            runs[-1] = (runs[-1][0] + stop - start, STATE_DATA)
        else:
            runs.append((stop - start, STATE_DATA))
        pos = stop
    if pos < end:
        runs.append((end - pos, STATE_HOLE_ZERO))
    return runs
