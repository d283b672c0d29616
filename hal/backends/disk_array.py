"""The disk array: one labelled disk per LUN, found by path or by device serial.

`DiskArray.open(config.disks, pair_id)` opens every disk, reads its label
(firmware.formats.disklabel) and refuses, by path, a disk of another pair,
one at another index, one whose label is corrupt or missing, or one too small
for the configured LUN size. `create=True` makes sparse image files and
labels disks that carry no label yet; it never relabels a disk that
already belongs to some pair.

Each `ArrayDisk` is a Disk whose offsets are relative to the LUN's data
area: offset 0 is the LUN's first byte and `size_bytes` is the LUN size, so
the label and the reservation area cannot be overwritten by LUN I/O.
`.raw` is the whole disk, for the reservation area (`reservation_area()`).

Backend "serial" finds each disk among /dev/sd* by the serial the kernel
reports (VPD page 0x80, or device/serial), never by its sdX name, which
changes between boots.
"""
from __future__ import annotations

import os
import pathlib

from firmware.formats import FormatError
from firmware.formats.disklabel import (DATA_OFFSET_BYTES, LABEL_SIZE_BYTES, RESERVATION_OFFSET_BYTES,
                                        RESERVATION_SIZE_BYTES, SERIAL_BYTES, build_disklabel,
                                        parse_disklabel_untrusted)

from hal.backends.disk_file import FileDisk
from hal.backends.disk_volatile import VolatileCacheDisk
from hal.backends.interfaces import Disk, HalError


class ArrayDisk(Disk):
    """One LUN's disk: I/O offsets start at the label's data offset."""

    def __init__(self, raw: FileDisk, lun: int, label):
        self.raw = raw
        self.lun = lun
        self.label = label
        self.name = raw.name
        self.data_offset = label.data_offset_bytes
        self.data_size = self.size_bytes = label.data_size_bytes
        self.sector_size_bytes = raw.sector_size_bytes

    def _bounds(self, offset: int, length: int, what: str):
        if offset < 0 or offset + length > self.data_size:
            raise HalError(f"{self.name}: {what} of [{offset}, {offset + length}) outside LUN {self.lun} "
                           f"of {self.data_size} bytes")

    def read_into(self, offset: int, buf) -> None:
        self._bounds(offset, memoryview(buf).nbytes, "read")
        self.raw.read_into(self.data_offset + offset, buf)

    def write(self, offset: int, data) -> None:
        self._bounds(offset, memoryview(data).nbytes, "write")
        self.raw.write(self.data_offset + offset, data)

    def data_ranges(self, offset: int, length: int) -> list:
        self._bounds(offset, length, "allocation query")
        base = self.data_offset
        return [(start - base, end - base) for start, end in self.raw.data_ranges(base + offset, length)]

    def flush(self) -> None:
        self.raw.flush()

    def close(self) -> None:
        self.raw.close()


class DiskArray:
    """The disks of one controller, indexed by LUN."""

    def __init__(self, disks: list):
        self.disks = disks

    def __len__(self):
        return len(self.disks)

    def __iter__(self):
        return iter(self.disks)

    def __getitem__(self, lun: int) -> ArrayDisk:
        return self.disks[lun]

    @staticmethod
    def reservation_area(lun: int = 0) -> tuple:
        """(offset, length) of the fencing area on a disk's raw device; the same on every disk."""
        return RESERVATION_OFFSET_BYTES, RESERVATION_SIZE_BYTES

    @classmethod
    def open(cls, config, pair_id: bytes, create: bool = False, generation: int = 1,
             sys_root: str = "/sys", dev_root: str = "/dev") -> "DiskArray":
        """Open every disk of `config` (a hal.runtime.config.DiskConfig); refuse any wrong disk."""
        if config.backend == "serial":
            paths = [find_disk_by_serial(s, sys_root, dev_root) for s in config.serials]
            serials = list(config.serials)
        else:
            paths, serials = list(config.paths), [""] * len(config.paths)
        disks = []
        try:
            for lun, (path, serial) in enumerate(zip(paths, serials)):
                disks.append(_open_disk(path, lun, serial, pair_id, config, create, generation))
        except BaseException:
            for disk in disks:
                disk.close()
            raise
        return cls(disks)

    def close(self):
        for disk in self.disks:
            disk.close()


def _open_disk(path: str, lun: int, serial: str, pair_id: bytes, config, create: bool,
               generation: int) -> ArrayDisk:
    total_bytes = DATA_OFFSET_BYTES + config.lun_size_bytes
    disk_cls = FileDisk
    if getattr(config, "fault_files", False):       # tests only: hal/backends/disk_faulty.py
        from hal.backends.disk_faulty import FaultyFileDisk as disk_cls
    elif getattr(config, "write_cache", "os") == "ignore-flush":     # a benchmark's peer only
        from hal.backends.disk_faulty import IgnoreFlushFileDisk as disk_cls
    if create and config.backend == "file" and not pathlib.Path(path).is_block_device():
        pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
        raw = disk_cls(path, total_bytes, direct=config.direct, create=True)
    else:
        raw = disk_cls(path, direct=config.direct)
    if getattr(config, "write_cache", "os") == "volatile":
        raw = VolatileCacheDisk(raw)
    try:
        if raw.size_bytes < total_bytes:
            raise HalError(f"{path}: disk is {raw.size_bytes} bytes, LUN {lun} needs {total_bytes} "
                           f"({config.lun_size_bytes} of data after 1 MiB of metadata)")
        label = _read_label(raw, path, lun, serial, pair_id, config, create, generation)
        return ArrayDisk(raw, lun, label)
    except BaseException:
        raw.close()
        raise


def _read_label(raw: FileDisk, path: str, lun: int, serial: str, pair_id: bytes, config,
                create: bool, generation: int):
    head = raw.read(0, LABEL_SIZE_BYTES)
    if create and not any(head):
        # A blank disk: label it. A disk with anything at byte 0 is never overwritten.
        head = bytearray(build_disklabel(lun, pair_id, config.lun_size_bytes,
                                         serial.encode("ascii")[:SERIAL_BYTES], generation))
        raw.write(0, head)
        raw.flush()
    try:
        label = parse_disklabel_untrusted(head, f"{path} offset 0")
    except FormatError as exc:
        raise HalError(f"refusing disk for LUN {lun}: {exc}") from None
    if label.pair_id != pair_id:
        raise HalError(f"refusing disk {path} for LUN {lun}: it belongs to pair {label.pair_id.hex()}, "
                       f"not {pair_id.hex()}")
    if label.disk_index != lun:
        raise HalError(f"refusing disk {path} for LUN {lun}: its label says it is disk {label.disk_index}")
    if label.data_size_bytes != config.lun_size_bytes:
        raise HalError(f"refusing disk {path} for LUN {lun}: labelled for {label.data_size_bytes} bytes "
                       f"of data, configured lun_size is {config.lun_size_bytes}")
    if label.data_offset_bytes + label.data_size_bytes > raw.size_bytes:
        raise HalError(f"refusing disk {path} for LUN {lun}: label runs past the end of the disk")
    return label


def find_disk_by_serial(serial: str, sys_root: str = "/sys", dev_root: str = "/dev") -> str:
    """The /dev/sdX whose SCSI serial is `serial`; HalError if none or several."""
    matches = [name for name in sorted(os.listdir(pathlib.Path(sys_root) / "block"))
               if name.startswith("sd") and read_serial(pathlib.Path(sys_root) / "block" / name) == serial]
    if not matches:
        raise HalError(f"no disk /dev/sd* with serial {serial!r}")
    if len(matches) > 1:
        raise HalError(f"serial {serial!r} matches several disks: {', '.join(matches)}")
    return str(pathlib.Path(dev_root) / matches[0])


def read_serial(block_dir: pathlib.Path) -> str | None:
    """A disk's serial from sysfs: VPD page 0x80 (4-byte header, then ASCII) or device/serial."""
    device = block_dir / "device"
    try:
        page = (device / "vpd_pg80").read_bytes()
        if len(page) > 4 and page[1] == 0x80:
            return page[4:4 + int.from_bytes(page[2:4], "big")].decode("ascii", "replace").strip(" \0")
    except OSError:
        pass
    try:
        return (device / "serial").read_text().strip(" \0\n")
    except OSError:
        return None
