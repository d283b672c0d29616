"""Provisioning one controller before its first run: the pair key and the disk labels.

`plan(cfg, force)` looks at the key file and every disk of a controller
config and decides, per item, one of: create, keep (already right), or
refuse. Nothing is written unless no item is refused, so a run that refuses
leaves every disk as it found it. `apply(steps)` then does the writes.

What a disk may hold and what provisioning does with it:

- missing image file, or nothing but zeroes: label it (an image file is
  created sparse, at 1 MiB of metadata plus `lun_size`);
- our label (this pair, this LUN, this size): keep it, write nothing;
- another label (another pair, another LUN or size, or a corrupt one), or
  no label but non-zero bytes: refuse, unless `force`, which zeroes the
  metadata MiB (label and reservation records) and writes a fresh label.
  The LUN data after it is left as it is.

Non-zero data is looked for in every allocated extent of an image file
(SEEK_DATA, so a sparse file costs nothing) and, on a block device, in its
first `DEVICE_SCAN_BYTES` and last MiB (a partition table, a filesystem
superblock or an LVM label sits there).

Rules: never overwrite a key file; never write a disk that holds data
without `force`; every decision carries a one-line reason for the user.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import stat

from firmware.formats import FormatError
from firmware.formats.disklabel import (DATA_OFFSET_BYTES, LABEL_SIZE_BYTES, SERIAL_BYTES, build_disklabel,
                                        parse_disklabel_untrusted)

from hal.backends.disk_array import find_disk_by_serial
from hal.backends.interfaces import HalError
from hal.backends.keyfile import create_pair_key, load_pair_key

DEVICE_SCAN_BYTES = 64 << 20
CHUNK_BYTES = 1 << 20


@dataclasses.dataclass
class Step:
    what: str            # "key" or "disk0", "disk1", ...
    path: str
    action: str          # "create", "label", "relabel", "keep", "refuse"
    reason: str
    lun: int = -1
    serial: str = ""

    @property
    def changes(self) -> bool:
        return self.action in ("create", "label", "relabel")


def plan(cfg, force: bool = False, sys_root: str = "/sys", dev_root: str = "/dev") -> list[Step]:
    """What provisioning `cfg` (a hal.runtime.config.ControllerConfig) would do; writes nothing."""
    steps = [_plan_key(cfg.key_file)]
    if cfg.disks.backend == "serial":
        paths = [find_disk_by_serial(s, sys_root, dev_root) for s in cfg.disks.serials]
        serials = list(cfg.disks.serials)
    else:
        paths, serials = list(cfg.disks.paths), [""] * len(cfg.disks.paths)
    for lun, (path, serial) in enumerate(zip(paths, serials)):
        step = _plan_disk(path, lun, cfg.pair_id, cfg.disks.lun_size_bytes, force)
        step.serial = serial
        steps.append(step)
    return steps


def apply(steps: list[Step], cfg) -> None:
    """Carry out a plan that refuses nothing."""
    assert not [s for s in steps if s.action == "refuse"], steps
    for step in steps:
        if step.what == "key" and step.action == "create":
            pathlib.Path(step.path).parent.mkdir(parents=True, exist_ok=True)
            create_pair_key(step.path)
        elif step.action in ("label", "relabel"):
            _label(step, cfg.pair_id, cfg.disks.lun_size_bytes)


def _plan_key(path: str) -> Step:
    if not os.path.exists(path):
        return Step("key", path, "create", "no pair key yet")
    try:
        load_pair_key(path)
    except HalError as exc:
        return Step("key", path, "refuse", f"{exc}; fix or remove it by hand (a pair key is never replaced)")
    return Step("key", path, "keep", "pair key present")


def _plan_disk(path: str, lun: int, pair_id: bytes, lun_size_bytes: int, force: bool) -> Step:
    what, total_bytes = f"disk{lun}", DATA_OFFSET_BYTES + lun_size_bytes
    if not os.path.exists(path):
        if path.startswith("/dev/"):
            return Step(what, path, "refuse", "no such device", lun)
        return Step(what, path, "label", f"new image file of {total_bytes} bytes", lun)
    size = _size(path)
    if size < total_bytes and _is_device(path):
        return Step(what, path, "refuse", f"device is {size} bytes, LUN {lun} needs {total_bytes}", lun)
    with open(path, "rb") as f:
        head = f.read(LABEL_SIZE_BYTES)
    found = _describe_label(head, lun, pair_id, lun_size_bytes)
    if found == "ours":
        if size < total_bytes:
            return Step(what, path, "refuse", f"labelled for this LUN but only {size} bytes long", lun)
        return Step(what, path, "keep", f"labelled for this pair as LUN {lun}", lun)
    if found is None and not _holds_data(path, size):
        return Step(what, path, "label", "blank", lun)
    reason = found or "no twincache label, but it holds non-zero data"
    if force:
        return Step(what, path, "relabel", f"{reason}; relabelled as --force asks", lun)
    return Step(what, path, "refuse", f"{reason}; refusing to relabel it without --force", lun)


def _describe_label(head: bytes, lun: int, pair_id: bytes, lun_size_bytes: int) -> str | None:
    """"ours", None (no label at all), or what foreign or damaged label it is."""
    if not any(head):
        return None
    try:
        label = parse_disklabel_untrusted(head, "offset 0")
    except FormatError as exc:
        return None if "bad magic" in str(exc) else f"a damaged twincache label ({exc})"
    if label.pair_id != pair_id:
        return f"labelled for another pair ({label.pair_id.hex()})"
    if label.disk_index != lun:
        return f"labelled for this pair as LUN {label.disk_index}, not {lun}"
    if label.data_size_bytes != lun_size_bytes:
        return f"labelled for {label.data_size_bytes} bytes of LUN data, the config says {lun_size_bytes}"
    return "ours"


def _holds_data(path: str, size: int) -> bool:
    if _is_device(path):
        ranges = [(0, min(size, DEVICE_SCAN_BYTES)), (max(0, size - CHUNK_BYTES), size)]
    else:
        ranges = _extents(path, size)
    with open(path, "rb") as f:
        for start, end in ranges:
            f.seek(start)
            while start < end:
                chunk = f.read(min(CHUNK_BYTES, end - start))
                if not chunk:
                    break
                if any(chunk):
                    return True
                start += len(chunk)
    return False


def _extents(path: str, size: int) -> list[tuple[int, int]]:
    """The allocated (data) extents of a file: holes read as zeroes and need no look."""
    fd = os.open(path, os.O_RDONLY)
    try:
        out, offset = [], 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:           # ENXIO: no data past offset
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            offset = end
        return out
    finally:
        os.close(fd)


def _label(step: Step, pair_id: bytes, lun_size_bytes: int) -> None:
    total_bytes = DATA_OFFSET_BYTES + lun_size_bytes
    pathlib.Path(step.path).parent.mkdir(parents=True, exist_ok=True)
    device = os.path.exists(step.path) and _is_device(step.path)
    fd = os.open(step.path, os.O_RDWR | (0 if device else os.O_CREAT), 0o600)
    try:
        if not device and os.fstat(fd).st_size < total_bytes:
            os.ftruncate(fd, total_bytes)
        if step.action == "relabel":   # the old pair's reservation records go with its label
            os.pwrite(fd, bytes(DATA_OFFSET_BYTES), 0)
        label = build_disklabel(step.lun, pair_id, lun_size_bytes, step.serial.encode("ascii")[:SERIAL_BYTES])
        os.pwrite(fd, label, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_device(path: str) -> bool:
    return stat.S_ISBLK(os.stat(path).st_mode)


def _size(path: str) -> int:
    if not _is_device(path):
        return os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
