"""NVRAM on a file: a MAP_SHARED mapping, with the two durability modes of DESIGN.md.

- "controller": stores land in the kernel's page cache the moment they are
  made, so they survive the death of this process (SIGKILL, crash); `persist`
  only checks its bounds. This models NVRAM in the controller's power domain.
- "host": `persist` msyncs the page-aligned range, so the bytes also survive
  a crash of the host. Slow (about 0.5 ms per 4 KiB here): use it on purpose.

The file is created and extended to `size_bytes` with its blocks allocated,
so a full filesystem fails here, at open, and not later as SIGBUS on a store.
"""
from __future__ import annotations

import errno
import mmap
import os
import stat

from hal.backends.interfaces import HalError, Nvram

DURABILITIES = ("controller", "host")


class FileNvram(Nvram):
    def __init__(self, path, size_bytes: int, durability: str = "controller", create: bool = True):
        if durability not in DURABILITIES:
            raise HalError(f"{path}: durability {durability!r}: choose one of {', '.join(DURABILITIES)}")
        if size_bytes <= 0 or size_bytes % mmap.PAGESIZE:
            raise HalError(f"{path}: NVRAM size {size_bytes} must be a positive multiple of {mmap.PAGESIZE}")
        self.path = str(path)
        self.size_bytes = size_bytes
        self.durability = durability
        self._map = _map_file(self.path, size_bytes, create)
        self._view = memoryview(self._map)

    @property
    def buffer(self) -> memoryview:
        if self._view is None:
            raise HalError(f"{self.path}: NVRAM is closed")
        return self._view

    def persist(self, offset: int, length: int) -> None:
        check_range(self.path, self.size_bytes, offset, length)
        if self.durability == "host" and length:
            msync_range(self._map, offset, length)

    def close(self) -> None:
        if self._view is None:
            return
        self._view.release()
        self._view = None
        try:
            self._map.close()
        except BufferError:
            raise HalError(f"{self.path}: views of the NVRAM are still in use; release them first") from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_range(path: str, size_bytes: int, offset: int, length: int):
    """A persist outside the NVRAM is a caller bug, but name it clearly."""
    if offset < 0 or length < 0 or offset + length > size_bytes:
        raise HalError(f"{path}: persist of [{offset}, {offset + length}) outside NVRAM of {size_bytes} bytes")


def msync_range(mapping: mmap.mmap, offset: int, length: int):
    """msync the pages covering [offset, offset+length); msync wants a page-aligned start."""
    start = offset - offset % mmap.PAGESIZE
    mapping.flush(start, offset + length - start)


def _map_file(path: str, size_bytes: int, create: bool) -> mmap.mmap:
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileNotFoundError:
        raise HalError(f"{path}: NVRAM file does not exist (create it, or pass create=True)") from None
    except OSError as exc:
        raise HalError(f"{path}: cannot open NVRAM file: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise HalError(f"{path}: not a regular file; use the dax backend for devices")
        if st.st_size < size_bytes:
            if not create:
                raise HalError(f"{path}: NVRAM file is {st.st_size} bytes, need {size_bytes}")
            _allocate(fd, path, size_bytes)
        return mmap.mmap(fd, size_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def _allocate(fd: int, path: str, size_bytes: int):
    try:
        os.posix_fallocate(fd, 0, size_bytes)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise HalError(f"{path}: no space for an NVRAM file of {size_bytes} bytes") from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise HalError(f"{path}: cannot allocate NVRAM file: {exc.strerror}") from None
        os.ftruncate(fd, size_bytes)   # filesystems without fallocate: sparse is the best we get
