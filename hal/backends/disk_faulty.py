"""A file disk that fails on command, for tests on real processes.

Chosen by `[disks] fault_files = true`, which the configuration accepts only
with TWINCACHE_TEST_FAULTS=1 in the environment, so no production controller
ever runs it. Faults injected, while a control file next to the disk exists:

- `<disk>.fail-writes`: every write and every flush raises EIO (the data
  area and the reservation record alike, as a dying disk does);
- `<disk>.fail-reads`: every read raises EIO.

Removing the file heals the disk. A test switches faults from outside the
controller process with `touch` and `rm`; the disk looks at the files on
every I/O (one stat, a microsecond or two).
"""
from __future__ import annotations

import errno
import os

from hal.backends.disk_file import FileDisk


class FaultyFileDisk(FileDisk):
    def __init__(self, path, *args, **kw):
        super().__init__(path, *args, **kw)
        self.fail_writes_path = f"{self.path}.fail-writes"
        self.fail_reads_path = f"{self.path}.fail-reads"

    def _fault(self, control_path, what, offset):
        if os.path.exists(control_path):
            raise OSError(errno.EIO, f"{self.path}: {what} at offset {offset} failed "
                                     f"(injected: {os.path.basename(control_path)} exists)")

    def read_into(self, offset: int, buf) -> None:
        self._fault(self.fail_reads_path, "read", offset)
        return super().read_into(offset, buf)

    def write(self, offset: int, data) -> None:
        self._fault(self.fail_writes_path, "write", offset)
        return super().write(offset, data)

    def flush(self) -> None:
        self._fault(self.fail_writes_path, "flush", 0)
        return super().flush()


class IgnoreFlushFileDisk(FileDisk):
    """A disk that says every flush is done at once and does nothing (as some drives with a
    volatile cache do): destage as it was before it waited for flushes. `[disks] write_cache =
    "ignore-flush"`, with TWINCACHE_TEST_FAULTS=1: the peer the destage benchmark measures against."""

    def flush(self) -> None:
        return None

