"""A disk on a file or a block device (/dev/sd* from virtio-scsi): sector-granular pread/pwrite.

Every offset and length is a multiple of the sector size (512 B, or the
device's logical block size); anything else is refused with a message naming
the disk, because a misaligned request would read-modify-write behind the
cache's back. With `direct=True` the disk is opened O_DIRECT: buffers whose
address is page-aligned go straight to the device, others through one
page-aligned bounce buffer (an anonymous mmap) reused across calls.
`flush()` is fdatasync: the firmware calls it before it frees cache blocks.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import stat
import struct

from hal.backends.interfaces import Disk, HalError

SECTOR_SIZE_BYTES = 512
BOUNCE_MAX_BYTES = 4 << 20     # larger unaligned I/O goes through the bounce buffer in pieces
BLKSSZGET = 0x1268             # ioctl: logical block size of a block device
DATA_RANGES_MAX = 1024         # extents one data_ranges() call walks; the rest counts as data


class FileDisk(Disk):
    def __init__(self, path, size_bytes: int | None = None, direct: bool = False, create: bool = False):
        self.path = self.name = str(path)
        self.direct = direct
        self._bounce = None
        self.fd = _open(self.path, direct, create)
        try:
            self._size(size_bytes, create)
        except BaseException:
            os.close(self.fd)
            raise

    def _size(self, size_bytes: int | None, create: bool):
        st = os.fstat(self.fd)
        self.block_device = stat.S_ISBLK(st.st_mode)
        if self.block_device:
            actual = os.lseek(self.fd, 0, os.SEEK_END)
            self.sector_size_bytes = _logical_block_size(self.fd)
        elif stat.S_ISREG(st.st_mode):
            actual = st.st_size
            self.sector_size_bytes = SECTOR_SIZE_BYTES
            if create and size_bytes and actual < size_bytes:
                os.ftruncate(self.fd, size_bytes)   # sparse: a disk image costs nothing until written
                actual = size_bytes
        else:
            raise HalError(f"{self.path}: not a file or block device")
        if size_bytes is not None and actual < size_bytes:
            raise HalError(f"{self.path}: disk is {actual} bytes, need {size_bytes}")
        self.size_bytes = actual if size_bytes is None else size_bytes
        if self.size_bytes % self.sector_size_bytes:
            raise HalError(f"{self.path}: size {self.size_bytes} is not a multiple of "
                           f"{self.sector_size_bytes}-byte sectors")

    def _check(self, offset: int, length: int, what: str):
        sector = self.sector_size_bytes
        if offset % sector or length % sector:
            raise HalError(errno.EINVAL, f"{self.path}: {what} of {length} bytes at offset {offset} "
                                         f"is not a multiple of {sector}-byte sectors")
        if offset < 0 or offset + length > self.size_bytes:
            raise HalError(errno.EINVAL, f"{self.path}: {what} of [{offset}, {offset + length}) is "
                                         f"outside the disk of {self.size_bytes} bytes")

    def read_into(self, offset: int, buf) -> None:
        view = memoryview(buf).cast("B")
        self._check(offset, len(view), "read")
        if not self.direct or _aligned(view):
            return self._pread_all(view, offset)
        for start in range(0, len(view), BOUNCE_MAX_BYTES):
            piece = view[start:start + BOUNCE_MAX_BYTES]
            bounce = self._bounce_view(len(piece))
            self._pread_all(bounce, offset + start)
            piece[:] = bounce
            bounce.release()

    def write(self, offset: int, data) -> None:
        view = memoryview(data).cast("B")
        self._check(offset, len(view), "write")
        if not self.direct or _aligned(view):
            return self._pwrite_all(view, offset)
        for start in range(0, len(view), BOUNCE_MAX_BYTES):
            piece = view[start:start + BOUNCE_MAX_BYTES]
            bounce = self._bounce_view(len(piece))
            bounce[:] = piece
            self._pwrite_all(bounce, offset + start)
            bounce.release()

    def _pread_all(self, view: memoryview, offset: int):
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n == 0:
                raise HalError(errno.EIO, f"{self.path}: read past the end at offset {offset + done}")
            done += n

    def _pwrite_all(self, view: memoryview, offset: int):
        done = 0
        while done < len(view):
            done += os.pwritev(self.fd, [view[done:]], offset + done)

    def _bounce_view(self, length: int) -> memoryview:
        """A page-aligned buffer of `length` bytes (an anonymous mapping is page-aligned)."""
        if self._bounce is None or len(self._bounce) < length:
            if self._bounce is not None:
                self._bounce.close()
            self._bounce = mmap.mmap(-1, max(length, mmap.PAGESIZE))
        return memoryview(self._bounce)[:length]

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def data_ranges(self, offset: int, length: int) -> list:
        """Data extents by SEEK_DATA/SEEK_HOLE: a sparse image file knows its holes.

        A block device, or a filesystem without SEEK_DATA, answers all data. The walk is
        bounded (DATA_RANGES_MAX extents); beyond it the rest of the range counts as data.
        """
        end = offset + length
        if self.block_device or not length:
            return [(offset, end)]
        ranges, pos = [], offset
        try:
            while pos < end:
                if len(ranges) == DATA_RANGES_MAX:
                    ranges.append((pos, end))
                    break
                start = os.lseek(self.fd, pos, os.SEEK_DATA)
                if start >= end:
                    break
                stop = min(os.lseek(self.fd, start, os.SEEK_HOLE), end)
                ranges.append((start, stop))
                pos = stop
        except OSError as exc:
            if exc.errno == errno.ENXIO:    # no data at or after pos: the rest is a hole
                return ranges
            return [(offset, end)]          # EINVAL (no SEEK_DATA here) and the like: all data
        return ranges

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._bounce is not None:
            self._bounce.close()
            self._bounce = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _open(path: str, direct: bool, create: bool) -> int:
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_DIRECT if direct else 0) | (os.O_CREAT if create else 0)
    try:
        return os.open(path, flags, 0o600)
    except FileNotFoundError:
        raise HalError(f"{path}: no such disk") from None
    except OSError as exc:
        if exc.errno == errno.EINVAL and direct:
            raise HalError(f"{path}: this filesystem does not support O_DIRECT") from None
        raise HalError(f"{path}: cannot open disk: {exc.strerror}") from None


def _aligned(view: memoryview) -> bool:
    """O_DIRECT wants the buffer's address on a page boundary (the length is checked already)."""
    if not len(view):
        return True
    if view.readonly:
        return False           # ctypes cannot take the address of read-only memory: bounce it
    address = ctypes.addressof(ctypes.c_char.from_buffer(view))
    return address % mmap.PAGESIZE == 0


def _logical_block_size(fd: int) -> int:
    try:
        return struct.unpack("i", fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4))[0]
    except OSError:
        return SECTOR_SIZE_BYTES
