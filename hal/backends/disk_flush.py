"""Disk flushes off the event loop: one worker thread that runs fdatasync.

A flush of a file disk writes back everything the page cache holds for it:
8 MiB of random 4 KiB lines took over 100 ms here. Run in the loop, it held up
host requests and destage writes for that long; in this thread the loop goes
on (fdatasync releases the GIL) and the firmware hears of the flush when it
is done. Writes issued meanwhile may or may not be covered by it, which is
what the firmware assumes of any disk: it counts only writes that completed
before it asked for the flush.

Completions come back through a pipe the loop watches (`fileno()`), then
`done()` hands them over as (op, errno, None).
"""
from __future__ import annotations

import collections
import errno
import os
import queue
import threading


class FlushWorker:
    def __init__(self):
        self._jobs = queue.SimpleQueue()
        self._done = collections.deque()
        self._rfd, self._wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name="disk-flush", daemon=True)
        self._thread.start()

    def fileno(self) -> int:
        return self._rfd

    def submit(self, op, disk):
        self._jobs.put((op, disk))

    def _run(self):
        while True:
            job = self._jobs.get()
            if job is None:
                return
            op, disk = job
            try:
                disk.flush()
                err = 0
            except OSError as exc:
                err = exc.errno or errno.EIO
            self._done.append((op, err, None))
            try:
                os.write(self._wfd, b"\0")
            except BlockingIOError:
                pass                 # the loop has a wake-up pending already

    def done(self) -> list:
        """The flushes finished since the last call (drains the wake-up pipe)."""
        try:
            while os.read(self._rfd, 4096):
                pass
        except BlockingIOError:
            pass
        out = []
        while self._done:
            out.append(self._done.popleft())
        return out

    def close(self):
        self._jobs.put(None)
        self._thread.join(timeout=10)
        os.close(self._rfd)
        os.close(self._wfd)
