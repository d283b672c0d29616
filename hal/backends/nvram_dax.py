"""NVRAM on persistent memory: device-dax, a file on fsdax, or a pmem block device.

Three kinds of path, told apart by what the kernel says they are:

- `/dev/daxX.Y`, a device-dax character device. The mapping goes straight to
  the media; its length and offset must be multiples of the region's
  alignment (2 MiB by default, read from sysfs). Stores are durable once they
  leave the CPU caches; in a VM the nvdimm's host file holds them.
  durability = "device"; `persist` only checks bounds.
- a regular file, meant to be on an fsdax mount: mapped with
  MAP_SHARED_VALIDATE | MAP_SYNC so filesystem metadata never needs an
  msync (durability "device"; `persist` still msyncs, which flushes the CPU
  caches of those pages). When the kernel refuses MAP_SYNC (not a DAX
  filesystem) the file is mapped MAP_SHARED and `persist` msyncs: durability
  "host", and `detail` says why.
- `/dev/pmemN`, a pmem block device: mmap plus msync on persist ("host").

Anything else, a missing path, or a device smaller than `size_bytes` is a
HalError naming the path.
"""
from __future__ import annotations

import errno
import mmap
import os
import pathlib
import stat

from hal.backends.interfaces import HalError, Nvram
from hal.backends.nvram_file import check_range, msync_range

# Linux values; the mmap module does not export them.
MAP_SHARED_VALIDATE = 0x03
MAP_SYNC = 0x80000
DAX_ALIGN_BYTES = 2 << 20


class DaxNvram(Nvram):
    def __init__(self, path, size_bytes: int | None = None, sys_root: str = "/sys"):
        self.path = str(path)
        self._sys = pathlib.Path(sys_root)
        self._msync = True
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise HalError(f"{self.path}: no such NVRAM device or file") from None
        except OSError as exc:
            raise HalError(f"{self.path}: cannot open NVRAM device: {exc.strerror}") from None
        try:
            self._map = self._open_kind(fd, size_bytes)
        finally:
            os.close(fd)
        self._view = memoryview(self._map)[:self.size_bytes]

    def _open_kind(self, fd: int, size_bytes: int | None) -> mmap.mmap:
        mode = os.fstat(fd).st_mode
        if stat.S_ISCHR(mode):
            return self._open_devdax(fd, size_bytes)
        if stat.S_ISBLK(mode):
            return self._open_pmem(fd, size_bytes)
        if stat.S_ISREG(mode):
            return self._open_fsdax_file(fd, size_bytes)
        raise HalError(f"{self.path}: not a dax device, pmem device or file")

    def _open_devdax(self, fd: int, size_bytes: int | None) -> mmap.mmap:
        dev = os.fstat(fd).st_rdev
        sysdir = self._sys / "dev" / "char" / f"{os.major(dev)}:{os.minor(dev)}"
        if not (sysdir / "subsystem").exists() or (sysdir / "subsystem").resolve().name != "dax":
            raise HalError(f"{self.path}: character device is not a device-dax device")
        device_bytes = _read_int(sysdir / "size", self.path)
        align = _read_int(sysdir / "align", self.path) if (sysdir / "align").exists() else DAX_ALIGN_BYTES
        self._fit(device_bytes, size_bytes)
        # The mapping must cover whole alignment units; the buffer is cut to size_bytes.
        length = -(-self.size_bytes // align) * align
        if length > device_bytes:
            raise HalError(f"{self.path}: {self.size_bytes} bytes round up to {length}, "
                           f"past the device's {device_bytes}")
        self.durability, self.detail, self._msync = "device", "device-dax", False
        return mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    def _open_pmem(self, fd: int, size_bytes: int | None) -> mmap.mmap:
        name = os.path.basename(os.path.realpath(self.path))
        if not name.startswith("pmem"):
            raise HalError(f"{self.path}: block device {name} is not a pmem device")
        self._fit(os.lseek(fd, 0, os.SEEK_END), size_bytes)
        self.durability, self.detail = "host", "pmem block device, msync on persist"
        return mmap.mmap(fd, self.size_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    def _open_fsdax_file(self, fd: int, size_bytes: int | None) -> mmap.mmap:
        self._fit(os.fstat(fd).st_size, size_bytes)
        if self.size_bytes % mmap.PAGESIZE:
            raise HalError(f"{self.path}: size {self.size_bytes} is not a multiple of {mmap.PAGESIZE}")
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        try:
            mapping = mmap.mmap(fd, self.size_bytes, MAP_SHARED_VALIDATE | MAP_SYNC, prot)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise HalError(f"{self.path}: cannot map: {exc.strerror}") from None
            self.durability = "host"
            self.detail = "MAP_SYNC refused (not a DAX filesystem): MAP_SHARED, msync on persist"
            return mmap.mmap(fd, self.size_bytes, mmap.MAP_SHARED, prot)
        self.durability, self.detail = "device", "fsdax file, MAP_SYNC"
        return mapping

    def _fit(self, device_bytes: int, size_bytes: int | None):
        if size_bytes is None:
            size_bytes = device_bytes
        if size_bytes <= 0:
            raise HalError(f"{self.path}: NVRAM device is empty")
        if device_bytes < size_bytes:
            raise HalError(f"{self.path}: NVRAM device is {device_bytes} bytes, need {size_bytes}")
        self.size_bytes = size_bytes

    @property
    def buffer(self) -> memoryview:
        if self._view is None:
            raise HalError(f"{self.path}: NVRAM is closed")
        return self._view

    def persist(self, offset: int, length: int) -> None:
        check_range(self.path, self.size_bytes, offset, length)
        if self._msync and length:
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


def _read_int(path: pathlib.Path, device: str) -> int:
    try:
        return int(path.read_text().strip(), 0)
    except (OSError, ValueError) as exc:
        raise HalError(f"{device}: cannot read {path}: {exc}") from None
