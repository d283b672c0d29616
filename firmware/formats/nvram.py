"""NVRAM layout: superblock, descriptor tables, cache segments, log, bitmap.

    0        superblock copy 0 (256 B, in a 4 KiB slot)
    4 KiB    superblock copy 1
    64 KiB   primary descriptors  (one 64 B record per primary block)
    ...      mirror descriptors   (one 64 B record per mirror block)
    ...      primary segment      (primary_blocks x block_size_bytes)
    ...      mirror segment       (mirror block i corresponds to the partner's primary block i)
    ...      log partitions       (log_partitions x log_partition_bytes)
    ...      bitmap region        (bitmap_bytes)

Every region starts on a 4 KiB boundary, so block data can go to an O_DIRECT
disk write straight from the mapping.

Crash-consistent update order for a cache block (claims 1.10: atomic write):
  1. store the data into the block, then `persist` it;
  2. store the descriptor (state, LUN, LBA, dirty bitmap, cache id, sequence,
     data CRC32C, group index and count, descriptor CRC32C), then `persist` it.
A block is only ever written while it is FREE (copy-on-write: a rewrite goes
to a fresh block and the old one is freed after the new one is complete), so
a crash at any point leaves either the old version or the new one intact.
On recovery a descriptor whose own CRC fails is torn; one whose data CRC
fails points at torn data; a group (one host write) with a member missing is
incomplete. All three are reported and never returned as data.

The superblock is written to alternate slots with an increasing `sb_seq`, so
a torn superblock write leaves the previous copy.
"""
import enum
import struct as _struct_mod

import crc32c as _crc32c
from construct import (Bytes, Checksum, Const, Int8ub, Int16ub, Int32ub,
                       Int64ub, RawCopy, Struct, this)
from construct.core import ConstructError

from . import FormatError

SB_MAGIC = b"TCNVRAM\x00"
NVRAM_VERSION = 1
SB_SLOT_BYTES = 4096
SB_SLOTS = 2
HEADER_AREA_BYTES = 64 * 1024
DESC_SIZE_BYTES = 64
SECTOR_SIZE_BYTES = 512
ALIGN_BYTES = 4096
BITMAP_BYTES = 16             # dirty bitmap: up to 128 sectors (64 KiB lines)
LOG_ENTRY_MAGIC = 0x4C45      # "LE"
LOG_PARTITION_MAGIC = 0x4C50  # "LP"
BLOCKS_MIN = 16               # cache blocks per segment, at least


def crc32c(data, value: int = 0) -> int:
    return _crc32c.crc32c(data, value)


crc32c_raw = _crc32c.crc32c       # the same function without a Python frame, for the data path


class BlockState(enum.IntEnum):
    FREE = 0        # no data; may be allocated
    DIRTY = 1       # holds data not yet on disk
    FLUSHING = 2    # being written to disk (mirror copy temporarily invalid, claims 5.12)


SuperblockFields = Struct(
    "magic" / Const(SB_MAGIC),
    "version" / Int16ub,
    "controller_id" / Int8ub,           # 0 = a, 1 = b
    "peer_id" / Int8ub,
    "flags" / Int32ub,
    "generation" / Int64ub,             # bumped on every role change
    "sb_seq" / Int64ub,                 # the copy with the larger sb_seq wins
    "pair_id" / Bytes(16),
    "nvram_size_bytes" / Int64ub,
    "block_size_bytes" / Int32ub,       # cache line size
    "sector_size_bytes" / Int16ub,      # dirty-bitmap granularity
    "desc_size_bytes" / Int16ub,
    "primary_blocks" / Int32ub,
    "mirror_blocks" / Int32ub,
    "primary_desc_offset" / Int64ub,
    "mirror_desc_offset" / Int64ub,
    "primary_data_offset" / Int64ub,
    "mirror_data_offset" / Int64ub,
    "log_offset" / Int64ub,
    "log_partitions" / Int16ub,
    "reserved0" / Int16ub,
    "log_partition_bytes" / Int32ub,
    "bitmap_offset" / Int64ub,
    "bitmap_bytes" / Int64ub,
    "reserved" / Bytes(116),
)
Superblock = Struct(
    "fields" / RawCopy(SuperblockFields),
    "checksum" / Checksum(Int32ub, lambda data: crc32c(data), this.fields.data),
)
SUPERBLOCK_SIZE_BYTES = 256
assert Superblock.sizeof() == SUPERBLOCK_SIZE_BYTES

DescriptorFields = Struct(
    "state" / Int8ub,                   # BlockState
    "flags" / Int8ub,
    "lun" / Int16ub,
    "group_index" / Int16ub,            # this block's place in its host write
    "group_count" / Int16ub,            # blocks in that host write
    "lba" / Int64ub,                    # first 512 B sector of the line
    "seq" / Int64ub,                    # write sequence of the host write (the group id)
    "generation" / Int32ub,             # owner's generation when written
    "cache_id" / Int32ub,               # block index (same on both sides)
    "data_crc" / Int32ub,               # CRC32C of the block's data
    "dirty_bitmap" / Bytes(BITMAP_BYTES),
    "reserved" / Bytes(8),
)
Descriptor = Struct(
    "fields" / RawCopy(DescriptorFields),
    "desc_crc" / Checksum(Int32ub, lambda data: crc32c(data), this.fields.data),
)
assert Descriptor.sizeof() == DESC_SIZE_BYTES

LogPartitionHeader = Struct(
    "magic" / Const(LOG_PARTITION_MAGIC, Int16ub),
    "partition" / Int16ub,
    "state" / Int8ub,                   # 0 empty, 1 filling, 2 full, 3 applied
    "reserved0" / Bytes(3),
    "first_seq" / Int64ub,
    "entries" / Int32ub,
    "used_bytes" / Int32ub,
    "reserved" / Bytes(36),
    "crc" / Int32ub,                    # CRC32C of the bytes before it
)
assert LogPartitionHeader.sizeof() == 64

LOG_PARTITION_BYTES = LogPartitionHeader.sizeof()
LOG_PARTITION_STATE_MAX = 3            # applied
# The hot-path twin of LogPartitionHeader (tests check they agree).
LOG_PARTITION_STRUCT = _struct_mod.Struct(">HHB3sQII36sI")


def pack_log_partition(index, state, first_seq, entries, used) -> bytes:
    body = LOG_PARTITION_STRUCT.pack(LOG_PARTITION_MAGIC, index, state, bytes(3), first_seq, entries, used,
                                     bytes(36), 0)[:-4]
    return body + crc32c(body).to_bytes(4, "big")


def parse_log_partition_untrusted(buf):
    """(index, state, first_seq, entries, used) or None when blank or torn."""
    magic, index, state, _r0, first_seq, entries, used, _r, crc = LOG_PARTITION_STRUCT.unpack_from(buf, 0)
    if (magic != LOG_PARTITION_MAGIC or crc32c(bytes(buf[:LOG_PARTITION_BYTES - 4])) != crc
            or state > LOG_PARTITION_STATE_MAX):
        return None
    return index, state, first_seq, entries, used


LogEntryHeader = Struct(
    "magic" / Const(LOG_ENTRY_MAGIC, Int16ub),
    "lun" / Int16ub,
    "length" / Int32ub,                 # data bytes following this header
    "seq" / Int64ub,                    # source's request sequence number
    "lba" / Int64ub,
    "data_crc" / Int32ub,
    "hdr_crc" / Int32ub,                # CRC32C of the 28 bytes before it
)
assert LogEntryHeader.sizeof() == 32


COMMIT_MAGIC = 0x54434D54    # "TCMT"
COMMIT_AREA_OFFSET = 2 * SB_SLOT_BYTES
COMMIT_SLOT_BYTES = 64

CommitRecord = Struct(
    "fields" / RawCopy(Struct(
        "magic" / Const(COMMIT_MAGIC, Int32ub),
        "segment" / Int8ub,             # 0 = primary, 1 = mirror
        "reserved0" / Bytes(3),
        "counter" / Int64ub,            # bumped on every update; the larger valid slot wins
        "committed_seq" / Int64ub,      # every group (host write) with seq <= this is committed
        "reserved" / Bytes(36),
    )),
    "crc" / Checksum(Int32ub, lambda data: crc32c(data), this.fields.data),
)
assert CommitRecord.sizeof() == COMMIT_SLOT_BYTES
COMMIT_STRUCT = _struct_mod.Struct(">IB3sQQ36s")
COMMIT_COUNTER_MAX = (1 << 64) - 1        # the commit record's counter field


def commit_slot_offset(segment: int, slot: int) -> int:
    """Two slots per segment, written alternately, so a torn update keeps the previous value."""
    return COMMIT_AREA_OFFSET + (2 * segment + slot) * COMMIT_SLOT_BYTES


def pack_commit_into(buf, segment: int, counter: int, committed_seq: int) -> int:
    """Store a commit record into the slot `counter` selects; return its offset."""
    offset = commit_slot_offset(segment, counter % 2)
    COMMIT_STRUCT.pack_into(buf, offset, COMMIT_MAGIC, segment, bytes(3), counter,
                            committed_seq, bytes(36))
    end = offset + COMMIT_SLOT_BYTES - 4
    buf[end:end + 4] = crc32c(buf[offset:end]).to_bytes(4, "big")
    return offset


def read_commit_untrusted(buf, segment: int):
    """Return (counter, committed_seq, errors) from the newest valid slot; (0, 0) if none."""
    best, errors = (0, 0), []
    for slot in range(2):
        offset = commit_slot_offset(segment, slot)
        end = offset + COMMIT_SLOT_BYTES - 4
        if len(buf) < end + 4:
            raise FormatError(f"NVRAM of {len(buf)} bytes ends before its commit record at offset {offset}")
        if crc32c(buf[offset:end]) != int.from_bytes(buf[end:end + 4], "big"):
            if any(buf[offset:end + 4]):
                errors.append(f"commit record at offset {offset} is torn or corrupt")
            continue
        magic, seg, _r, counter, committed, _res = COMMIT_STRUCT.unpack_from(buf, offset)
        if magic == COMMIT_MAGIC and seg == segment and counter >= best[0]:
            best = (counter, committed)
    return best[0], best[1], errors


class Geometry:
    """Where every region lives, derived from the superblock."""

    def __init__(self, sb):
        self.sb = sb
        self.block_size_bytes = sb.block_size_bytes
        self.primary_blocks = sb.primary_blocks
        self.mirror_blocks = sb.mirror_blocks
        self.primary_desc_offset = sb.primary_desc_offset
        self.mirror_desc_offset = sb.mirror_desc_offset
        self.primary_data_offset = sb.primary_data_offset
        self.mirror_data_offset = sb.mirror_data_offset

    def desc_offset(self, mirror: bool, index: int) -> int:
        base = self.mirror_desc_offset if mirror else self.primary_desc_offset
        return base + index * DESC_SIZE_BYTES

    def data_offset(self, mirror: bool, index: int) -> int:
        base = self.mirror_data_offset if mirror else self.primary_data_offset
        return base + index * self.block_size_bytes


def _align(value: int) -> int:
    return (value + ALIGN_BYTES - 1) // ALIGN_BYTES * ALIGN_BYTES


def plan_layout(nvram_size_bytes: int, block_size_bytes: int, controller_id: int,
                pair_id: bytes, log_partitions: int = 4,
                log_partition_bytes: int | None = None, bitmap_bytes: int | None = None) -> dict:
    """Return superblock fields for a fresh NVRAM of the given size (generation 1).

    By default the log takes 1/8 of the NVRAM (at most 4 x 1 MiB) and the
    bitmap 1/64 (at most 256 KiB); the cache segments get the rest.
    """
    if log_partition_bytes is None:
        log_partition_bytes = max(ALIGN_BYTES, min(1 << 20, nvram_size_bytes // 32) // ALIGN_BYTES * ALIGN_BYTES)
    if bitmap_bytes is None:
        bitmap_bytes = max(ALIGN_BYTES, min(256 * 1024, nvram_size_bytes // 64) // ALIGN_BYTES * ALIGN_BYTES)
    if block_size_bytes % SECTOR_SIZE_BYTES or not 512 <= block_size_bytes <= 65536:
        raise ValueError(f"block size {block_size_bytes} must be a multiple of 512 up to 64 KiB")
    if block_size_bytes & (block_size_bytes - 1):
        raise ValueError(f"block size {block_size_bytes} must be a power of two")
    tail = _align(log_partitions * log_partition_bytes) + _align(bitmap_bytes)
    room = nvram_size_bytes - HEADER_AREA_BYTES - tail - 4 * ALIGN_BYTES
    per_block = 2 * (DESC_SIZE_BYTES + block_size_bytes)
    blocks = room // per_block if room > 0 else 0
    if blocks < BLOCKS_MIN:
        raise ValueError(f"NVRAM of {nvram_size_bytes} bytes is too small: "
                         f"room for {blocks} cache blocks of {block_size_bytes} bytes, need {BLOCKS_MIN}")
    primary_desc = HEADER_AREA_BYTES
    mirror_desc = _align(primary_desc + blocks * DESC_SIZE_BYTES)
    primary_data = _align(mirror_desc + blocks * DESC_SIZE_BYTES)
    mirror_data = _align(primary_data + blocks * block_size_bytes)
    log_offset = _align(mirror_data + blocks * block_size_bytes)
    bitmap_offset = _align(log_offset + log_partitions * log_partition_bytes)
    assert bitmap_offset + bitmap_bytes <= nvram_size_bytes
    return dict(
        version=NVRAM_VERSION, controller_id=controller_id, peer_id=1 - controller_id,
        flags=0, generation=1, sb_seq=1, pair_id=pair_id,
        nvram_size_bytes=nvram_size_bytes, block_size_bytes=block_size_bytes,
        sector_size_bytes=SECTOR_SIZE_BYTES, desc_size_bytes=DESC_SIZE_BYTES,
        primary_blocks=blocks, mirror_blocks=blocks,
        primary_desc_offset=primary_desc, mirror_desc_offset=mirror_desc,
        primary_data_offset=primary_data, mirror_data_offset=mirror_data,
        log_offset=log_offset, log_partitions=log_partitions, reserved0=0,
        log_partition_bytes=log_partition_bytes,
        bitmap_offset=bitmap_offset, bitmap_bytes=bitmap_bytes, reserved=bytes(116),
    )


def build_superblock(fields: dict) -> bytes:
    return Superblock.build({"fields": {"value": fields}})


def parse_superblock_untrusted(buf, where: str = ""):
    """Parse one superblock copy; raise FormatError naming `where` if it is bad."""
    if len(buf) < SUPERBLOCK_SIZE_BYTES:
        raise FormatError(f"superblock is {len(buf)} bytes, need {SUPERBLOCK_SIZE_BYTES}", where)
    try:
        sb = Superblock.parse(bytes(buf[:SUPERBLOCK_SIZE_BYTES])).fields.value
    except ConstructError as exc:
        raise FormatError(f"bad superblock: {exc}".splitlines()[0], where) from None
    if sb.version != NVRAM_VERSION:
        raise FormatError(f"unsupported NVRAM version {sb.version}", where)
    _check_geometry(sb, where)
    return sb


def _check_geometry(sb, where: str):
    """Every region after the header area, inside the NVRAM, none overlapping another."""
    bs = sb.block_size_bytes
    if bs < SECTOR_SIZE_BYTES or bs % SECTOR_SIZE_BYTES or bs & (bs - 1):
        raise FormatError(f"block size {bs} is not a power of two of whole sectors", where)
    if bs // SECTOR_SIZE_BYTES > 8 * BITMAP_BYTES:
        raise FormatError(f"block size {bs} exceeds the dirty bitmap", where)
    if sb.desc_size_bytes != DESC_SIZE_BYTES:
        raise FormatError("superblock geometry does not fit the NVRAM size", where)
    if min(sb.primary_blocks, sb.mirror_blocks) < BLOCKS_MIN:
        raise FormatError(f"superblock has {sb.primary_blocks} primary and {sb.mirror_blocks} mirror "
                          f"blocks, fewer than {BLOCKS_MIN}", where)
    regions = sorted([(sb.primary_desc_offset, sb.primary_blocks * DESC_SIZE_BYTES),
                      (sb.mirror_desc_offset, sb.mirror_blocks * DESC_SIZE_BYTES),
                      (sb.primary_data_offset, sb.primary_blocks * bs),
                      (sb.mirror_data_offset, sb.mirror_blocks * bs),
                      (sb.log_offset, sb.log_partitions * sb.log_partition_bytes),
                      (sb.bitmap_offset, sb.bitmap_bytes)])
    end = HEADER_AREA_BYTES
    for offset, size in regions:
        if offset < end:
            raise FormatError("superblock geometry has overlapping regions", where)
        end = offset + size
    if end > sb.nvram_size_bytes:
        raise FormatError("superblock geometry does not fit the NVRAM size", where)


def read_superblock_untrusted(buf, where: str = ""):
    """Return the newest valid superblock copy of an NVRAM image and its slot."""
    best, errors = None, []
    for slot in range(SB_SLOTS):
        offset = slot * SB_SLOT_BYTES
        try:
            sb = parse_superblock_untrusted(buf[offset:offset + SUPERBLOCK_SIZE_BYTES],
                                            f"{where} offset {offset}")
        except FormatError as exc:
            errors.append(str(exc))
            continue
        if best is None or sb.sb_seq > best[0].sb_seq:
            best = (sb, slot)
    if best is None:
        raise FormatError("no valid superblock: " + "; ".join(errors), where)
    return best


# The hot-path twin of Descriptor (tests check they agree).
import struct as _struct  # noqa: E402
DESC_STRUCT = _struct.Struct(">BBHHHQQIII16s8s")
assert DESC_STRUCT.size == DESC_SIZE_BYTES - 4
_CRC_STRUCT = _struct.Struct(">I")


def pack_descriptor_into(buf, offset, state, lun, group_index, group_count, lba, seq,
                         generation, cache_id, data_crc, dirty_bitmap, flags=0):
    """Store a descriptor record (with its CRC) into `buf` at `offset`."""
    DESC_STRUCT.pack_into(buf, offset, state, flags, lun, group_index, group_count, lba,
                          seq, generation, cache_id, data_crc, dirty_bitmap, bytes(8))
    end = offset + DESC_SIZE_BYTES - 4
    _CRC_STRUCT.pack_into(buf, end, crc32c(buf[offset:end]))


FREE_DESCRIPTOR = b""  # filled below: the record of a FREE block


class DescriptorRecord:
    __slots__ = ("state", "flags", "lun", "group_index", "group_count", "lba", "seq",
                 "generation", "cache_id", "data_crc", "dirty_bitmap")

    def __init__(self, fields):
        (self.state, self.flags, self.lun, self.group_index, self.group_count, self.lba,
         self.seq, self.generation, self.cache_id, self.data_crc, self.dirty_bitmap,
         _reserved) = fields


def parse_descriptor_untrusted(buf, offset: int = 0, where: str = "") -> DescriptorRecord:
    """Parse one descriptor; raise FormatError if it is torn (CRC) or nonsensical."""
    end = offset + DESC_SIZE_BYTES - 4
    if len(buf) < end + 4:
        raise FormatError("short descriptor", where)
    (stored,) = _CRC_STRUCT.unpack_from(buf, end)
    if crc32c(buf[offset:end]) != stored:
        raise FormatError("descriptor CRC32C mismatch (torn or corrupt record)", where)
    rec = DescriptorRecord(DESC_STRUCT.unpack_from(buf, offset))
    if rec.state not in (0, 1, 2):
        raise FormatError(f"descriptor state {rec.state} unknown", where)
    if rec.state and not rec.group_index < rec.group_count:
        raise FormatError(f"descriptor group {rec.group_index}/{rec.group_count} impossible", where)
    return rec


def _free_record() -> bytes:
    buf = bytearray(DESC_SIZE_BYTES)
    pack_descriptor_into(buf, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, bytes(BITMAP_BYTES))
    return bytes(buf)


FREE_DESCRIPTOR = _free_record()
