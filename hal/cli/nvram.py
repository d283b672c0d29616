"""`twincache nvram dump PATH [--json]`: inspect an NVRAM image without trusting it.

Reads the file read-only through firmware.formats.nvram: the newest valid
superblock (a bad copy is reported with its offset), the geometry, and for the
primary and mirror segments the count of FREE / DIRTY / FLUSHING blocks and
every block that is not free (index, state, LUN, LBA, seq, group, dirty
sectors, whether its data matches the descriptor's CRC32C). A torn or
corrupt descriptor and a data CRC mismatch are reported with their file
offsets and never shown as data. With no valid superblock at all the
command fails (exit 1) naming the file and both offsets.
"""
from __future__ import annotations

import json
import mmap
import os

from firmware.formats import FormatError
from firmware.formats import nvram as nv

from hal.cli.errors import CommandFailed, UsageError

STATE_NAMES = {state.value: state.name for state in nv.BlockState}
# The superblock's generation is not the one `twincache status` shows: say so where it is printed.
GENERATION_NOTE = ("this NVRAM's own generation, written when it was formatted; not the LUN ownership "
                   "(fencing) generation of `twincache status`, which lives in each LUN's reservation "
                   "record on disk (ha) or in the replica record (replica mode)")
SB_SKIP_FIELDS = ("magic", "reserved")


def register(sub) -> None:
    parser = sub.add_parser("nvram", help="inspect NVRAM images")
    nvram_sub = parser.add_subparsers(dest="nvram_command", required=True, metavar="ACTION")
    dump = nvram_sub.add_parser("dump", help="superblock, geometry and cache blocks of an NVRAM image")
    dump.add_argument("path", help="NVRAM file (or a copy of a device's contents)")
    dump.add_argument("--json", action="store_true", help="print one JSON object")
    dump.set_defaults(func=cmd_dump)


def cmd_dump(args) -> int:
    report = dump_nvram(args.path)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def dump_nvram(path: str) -> dict:
    """The whole report as plain data (the --json output)."""
    try:
        with open(path, "rb") as file:
            if os.fstat(file.fileno()).st_size == 0:
                raise CommandFailed(f"{path}: empty file, not an NVRAM image")
            with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as image:
                return _dump_image(image, path)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory") from None
    except PermissionError:
        raise CommandFailed(f"{path}: permission denied") from None


def _dump_image(image, path: str) -> dict:
    sb, slot, sb_errors = _read_superblock(image, path)
    if len(image) < sb.nvram_size_bytes:
        raise CommandFailed(f"{path}: file is {len(image)} bytes, the superblock at offset "
                            f"{slot * nv.SB_SLOT_BYTES} says {sb.nvram_size_bytes}")
    geometry = nv.Geometry(sb)
    superblock = {k: (v.hex() if isinstance(v, bytes) else v)
                  for k, v in sb.items() if not k.startswith("_") and k not in SB_SKIP_FIELDS}
    superblock.update(slot=slot, offset=slot * nv.SB_SLOT_BYTES, errors=sb_errors, generation_note=GENERATION_NOTE)
    return {"file": path, "superblock": superblock,
            "primary": _scan_segment(image, geometry, False, path),
            "mirror": _scan_segment(image, geometry, True, path)}


def _read_superblock(image, path: str):
    """The newest valid copy, and the errors of the copies that are not valid."""
    try:
        sb, slot = nv.read_superblock_untrusted(image, path)
    except FormatError as exc:
        raise CommandFailed(f"corrupt NVRAM superblock: {exc}") from None
    errors = []
    for other in range(nv.SB_SLOTS):
        offset = other * nv.SB_SLOT_BYTES
        if not any(image[offset:offset + nv.SUPERBLOCK_SIZE_BYTES]):
            continue           # a fresh image has written only one copy so far
        try:
            nv.parse_superblock_untrusted(image[offset:offset + nv.SUPERBLOCK_SIZE_BYTES],
                                          f"{path} offset {offset}")
        except FormatError as exc:
            errors.append({"offset": offset, "error": f"superblock copy {other}: {exc}"})
    return sb, slot, errors


def _scan_segment(image, geometry: nv.Geometry, mirror: bool, path: str) -> dict:
    counts = {name: 0 for name in STATE_NAMES.values()}
    counts.update(TORN=0, UNWRITTEN=0)
    blocks, errors = [], []
    count = geometry.mirror_blocks if mirror else geometry.primary_blocks
    for index in range(count):
        offset = geometry.desc_offset(mirror, index)
        record = image[offset:offset + nv.DESC_SIZE_BYTES]
        if not any(record):
            counts["UNWRITTEN"] += 1     # never formatted: no record, not a torn one
            continue
        try:
            rec = nv.parse_descriptor_untrusted(record, 0, f"{path} offset {offset}")
        except FormatError as exc:
            counts["TORN"] += 1
            errors.append({"index": index, "offset": offset, "error": f"descriptor {index}: {exc}"})
            continue
        counts[STATE_NAMES[rec.state]] += 1
        if rec.state != nv.BlockState.FREE:
            blocks.append(_block_record(image, geometry, mirror, index, rec, errors, path))
    return {"counts": counts, "blocks": blocks, "errors": errors}


def _block_record(image, geometry, mirror: bool, index: int, rec, errors: list, path: str) -> dict:
    data_offset = geometry.data_offset(mirror, index)
    data = image[data_offset:data_offset + geometry.block_size_bytes]
    data_crc_ok = nv.crc32c(data) == rec.data_crc
    if not data_crc_ok:
        errors.append({"index": index, "offset": data_offset,
                       "error": f"block {index}: data CRC32C mismatch at {path} offset {data_offset} "
                                f"(torn data; never served)"})
    if rec.cache_id != index:
        errors.append({"index": index, "offset": geometry.desc_offset(mirror, index),
                       "error": f"descriptor {index}: names cache id {rec.cache_id}"})
    return {"index": index, "state": STATE_NAMES[rec.state], "lun": rec.lun, "lba": rec.lba,
            "seq": rec.seq, "generation": rec.generation, "group_index": rec.group_index,
            "group_count": rec.group_count,
            "dirty_sectors": int.from_bytes(rec.dirty_bitmap, "big").bit_count(),
            "dirty_bitmap": rec.dirty_bitmap.hex(), "data_offset": data_offset,
            "data_crc": rec.data_crc, "data_crc_ok": data_crc_ok}


def format_report(report: dict) -> str:
    sb = report["superblock"]
    lines = [f"{report['file']}: NVRAM of {sb['nvram_size_bytes']} bytes, controller {_name(sb['controller_id'])} "
             f"(peer {_name(sb['peer_id'])}), pair {sb['pair_id']}",
             f"  superblock generation {sb['generation']}: {GENERATION_NOTE}",
             f"  superblock copy {sb['slot']} at offset {sb['offset']}, sb_seq {sb['sb_seq']} "
             f"(superblock writes: the copy with the larger sb_seq wins)",
             f"  cache blocks: {sb['primary_blocks']} primary at {sb['primary_data_offset']}, "
             f"{sb['mirror_blocks']} mirror at {sb['mirror_data_offset']}, {sb['block_size_bytes']} bytes each",
             f"  log: {sb['log_partitions']} x {sb['log_partition_bytes']} bytes at {sb['log_offset']}; "
             f"bitmap: {sb['bitmap_bytes']} bytes at {sb['bitmap_offset']}"]
    lines += [f"  ERROR at offset {e['offset']}: {e['error']}" for e in sb["errors"]]
    for name in ("primary", "mirror"):
        lines += _format_segment(name, report[name])
    return "\n".join(lines)


def _name(controller_id: int) -> str:
    return f"{controller_id} ({'ab'[controller_id]})" if controller_id in (0, 1) else str(controller_id)


def _format_segment(name: str, segment: dict) -> list:
    counts = ", ".join(f"{n} {state.lower()}" for state, n in segment["counts"].items() if n or state != "UNWRITTEN")
    lines = [f"{name}: {counts}"]
    for b in segment["blocks"]:
        crc = "ok" if b["data_crc_ok"] else "MISMATCH"
        lines.append(f"  block {b['index']}: {b['state']} lun {b['lun']} lba {b['lba']} seq {b['seq']} "
                     f"group {b['group_index'] + 1}/{b['group_count']} dirty {b['dirty_sectors']} sectors, "
                     f"data crc {crc}")
    lines += [f"  ERROR at offset {e['offset']}: {e['error']}" for e in segment["errors"]]
    return lines
