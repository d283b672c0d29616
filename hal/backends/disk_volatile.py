"""A disk with a volatile write cache in the controller's own memory, for tests.

`VolatileCacheDisk` wraps a FileDisk: a write lands in a cache held by this
process and is visible to this process's reads at once, but reaches the file
only at `flush()` (then fdatasync). A SIGKILL of the controller is then what a
power cut is to a drive's write cache or to the host page cache: every write
not flushed is gone. It makes a missing flush visible on real processes, where
the kernel's page cache would otherwise keep the data through any kill.

Chosen with `[disks] write_cache = "volatile"` (hal/runtime/config.py); never for data
anyone keeps. The cache is by sector, so overlapping writes keep the newest.
"""
from __future__ import annotations

import threading

from hal.backends.interfaces import Disk


class VolatileCacheDisk(Disk):
    def __init__(self, raw):
        self.raw = raw
        self.path = raw.path
        self.name = raw.name
        self.size_bytes = raw.size_bytes
        self.sector_size_bytes = raw.sector_size_bytes
        self.block_device = raw.block_device
        self.cache = {}                  # sector -> bytes, not yet on the file
        self.lock = threading.Lock()     # writes vs the flush thread's clean-up
        self.flushes = 0

    def read_into(self, offset: int, buf) -> None:
        self.raw.read_into(offset, buf)
        if not self.cache:
            return
        view = memoryview(buf).cast("B")
        size = self.sector_size_bytes
        first = offset // size
        for k in range(len(view) // size):
            sec = self.cache.get(first + k)
            if sec is not None:
                view[k * size:(k + 1) * size] = sec

    def write(self, offset: int, data) -> None:
        view = memoryview(data).cast("B")
        self.raw._check(offset, len(view), "write")
        size, cache, first = self.sector_size_bytes, self.cache, offset // self.sector_size_bytes
        sectors = [bytes(view[k * size:(k + 1) * size]) for k in range(len(view) // size)]
        with self.lock:
            for k, sec in enumerate(sectors):
                cache[first + k] = sec

    def flush(self) -> None:
        """Write the cache out in runs of adjacent sectors, then make the file durable. It may
        run in a flush thread while the loop writes on: what it wrote leaves the cache only if
        no newer write replaced it meanwhile."""
        size, cache = self.sector_size_bytes, self.cache
        with self.lock:
            snapshot = dict(cache)
        run_start, run = None, []
        for sector in sorted(snapshot):
            if run and sector != run_start + len(run):
                self.raw.write(run_start * size, b"".join(run))
                run = []
            if not run:
                run_start = sector
            run.append(snapshot[sector])
        if run:
            self.raw.write(run_start * size, b"".join(run))
        self.raw.flush()
        with self.lock:
            for sector, data in snapshot.items():
                if cache.get(sector) is data:
                    del cache[sector]
        self.flushes += 1

    def close(self) -> None:
        """Closed without a flush: what was not flushed is lost, as at a power cut."""
        self.cache.clear()
        self.raw.close()
