"""WRITE_ZEROES carried out by this controller: a part that owns its state.

Zeroes travel as a range (a non-owner forwards offset and length); here they go
into the cache in pieces of at most `max_write_bytes` (and 1 MiB), through the
ordinary write path, at most `inflight_max` pieces in flight over all requests,
in order. So a 4 GiB request costs a few MiB of memory and never floods the
link. A request is answered once every piece is done, with the first error.

The controller gives the part two calls, `write(piece, lun, offset, data, fua)`
into its write path and `reply(req, error)`, and hands back each piece's answer
through `piece_done` (a ZeroPiece is the write path's request).
"""
import collections

_ZEROES = bytes(1 << 20)          # the data of one piece, shared


class ZeroJob:
    """One WRITE_ZEROES in pieces; answered when all are done."""
    __slots__ = ("req", "lun", "next", "end", "fua", "inflight", "error", "done")

    def __init__(self, req, lun, offset, length, fua):
        self.req = req
        self.lun = lun
        self.next = offset                # the first byte no piece has covered yet
        self.end = offset + length
        self.fua = fua
        self.inflight = 0
        self.error = 0
        self.done = False


class ZeroPiece:
    """One piece of a ZeroJob, as the write path's request."""
    __slots__ = ("job",)

    def __init__(self, job):
        self.job = job


class ZeroWriter:
    def __init__(self, write, reply, max_write_bytes, inflight_max):
        self.write = write
        self.reply = reply
        self.chunk = min(max_write_bytes, len(_ZEROES))
        self.inflight_max = inflight_max
        self.jobs = collections.deque()   # with pieces still to start, in order
        self.inflight = 0                 # pieces in flight, over all jobs
        self.pumping = False

    def start(self, req, lun, offset, length, fua):
        self.jobs.append(ZeroJob(req, lun, offset, length, fua))
        self._pump()

    def piece_done(self, piece, error):
        job = piece.job
        job.inflight -= 1
        self.inflight -= 1
        job.error = job.error or error
        self._maybe_done(job)
        self._pump()

    def _pump(self):
        """Start pieces, in order, while fewer than inflight_max are out. A loop, not recursion:
        a piece may complete before the write path returns."""
        if self.pumping:
            return
        self.pumping = True
        jobs, limit, chunk = self.jobs, self.inflight_max, self.chunk
        while jobs and self.inflight < limit:
            job = jobs[0]
            if job.error or job.next >= job.end:
                jobs.popleft()                  # every piece started (or one failed)
                self._maybe_done(job)
                continue
            start, size = job.next, min(chunk, job.end - job.next)
            job.next += size
            job.inflight += 1
            self.inflight += 1
            self.write(ZeroPiece(job), job.lun, start, _ZEROES[:size], job.fua)
        self.pumping = False

    def _maybe_done(self, job):
        if not job.done and not job.inflight and (job.error or job.next >= job.end):
            job.done = True
            self.reply(job.req, job.error)


__all__ = ["ZeroPiece", "ZeroWriter"]
