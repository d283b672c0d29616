"""The replica record in NVRAM's bitmap region (replica mode, variant 1).

The bitmap region of the NVRAM layout (formats/nvram.py) holds, in replica
mode:

    +0      header slot 0 (128 bytes)   } written alternately, the larger valid
    +128    header slot 1 (128 bytes)   } `counter` wins (a torn update keeps the old one)
    +4096   sent bitmap                 one bit per `range_bytes` of every LUN, LUN 0 first:
                                        data copied (or to be copied) to the peer that the
                                        peer has not destaged (claims 7-10)
    +4096+M received bitmap             data the peer copied here that the peer has not
                                        destaged (the symmetric record, claims 14-17)

M is the sent bitmap's size rounded up to 4 KiB. A bit is set by storing one
byte, which cannot tear. The bitmaps carry no checksum: they change on every
write, and a wrongly set bit only costs a range of resync; the header, which
decides roles and resync direction, is checksummed.
"""
import struct

from construct import Bytes, Checksum, Const, Int8ub, Int16ub, Int32ub, Int64ub, RawCopy, Struct, this

from . import FormatError
from .nvram import crc32c

RECORD_MAGIC = 0x54435250          # "TCRP"
RECORD_VERSION = 1
SLOT_BYTES = 128
HEADER_AREA_BYTES = 4096
MAP_ALIGN_BYTES = 4096

ReplicaHeaderFields = Struct(
    "magic" / Const(RECORD_MAGIC, Int32ub),
    "version" / Int16ub,
    "role" / Int8ub,                    # messages.ROLE_*
    "flags" / Int8ub,                   # messages.STATE_*
    "counter" / Int64ub,                # bumped on every update; the larger valid slot wins
    "generation" / Int64ub,             # role-change counter
    "current_uuid" / Int64ub,           # generation identifiers, as DRBD's
    "bitmap_uuid" / Int64ub,
    "history0" / Int64ub,
    "history1" / Int64ub,
    "range_bytes" / Int32ub,            # bytes of LUN per bit
    "map_bits" / Int32ub,               # bits in each bitmap (all LUNs)
    "reserved" / Bytes(60),
)
ReplicaHeader = Struct(
    "fields" / RawCopy(ReplicaHeaderFields),
    "crc" / Checksum(Int32ub, lambda data: crc32c(data), this.fields.data),
)
assert ReplicaHeader.sizeof() == SLOT_BYTES

# The hot-path twin (the header is rewritten on role and uuid changes only, but
# recovery reads both slots); tests check both agree.
HEADER_STRUCT = struct.Struct(">IHBBQQQQQQII60s")
assert HEADER_STRUCT.size == SLOT_BYTES - 4

FIELDS = ("role", "flags", "counter", "generation", "current_uuid", "bitmap_uuid", "history0",
          "history1", "range_bytes", "map_bits")


def map_bytes(map_bits: int) -> int:
    return (map_bits + 7) // 8


def region_bytes_needed(map_bits: int) -> int:
    aligned = (map_bytes(map_bits) + MAP_ALIGN_BYTES - 1) // MAP_ALIGN_BYTES * MAP_ALIGN_BYTES
    return HEADER_AREA_BYTES + 2 * aligned


def map_offsets(map_bits: int) -> tuple:
    """(sent, received) bitmap offsets relative to the region."""
    aligned = (map_bytes(map_bits) + MAP_ALIGN_BYTES - 1) // MAP_ALIGN_BYTES * MAP_ALIGN_BYTES
    return HEADER_AREA_BYTES, HEADER_AREA_BYTES + aligned


def build_header(values: dict) -> bytes:
    fields = dict(values, version=RECORD_VERSION, reserved=bytes(60))
    return ReplicaHeader.build({"fields": {"value": fields}})


def pack_header_into(buf, offset: int, values: dict) -> int:
    """Store a header into the slot its counter selects; return the slot's offset."""
    slot = offset + (values["counter"] % 2) * SLOT_BYTES
    HEADER_STRUCT.pack_into(buf, slot, RECORD_MAGIC, RECORD_VERSION, values["role"], values["flags"],
                            values["counter"], values["generation"], values["current_uuid"],
                            values["bitmap_uuid"], values["history0"], values["history1"],
                            values["range_bytes"], values["map_bits"], bytes(60))
    end = slot + SLOT_BYTES - 4
    buf[end:end + 4] = crc32c(buf[slot:end]).to_bytes(4, "big")
    return slot


def parse_header_untrusted(buf, where: str = "") -> dict:
    """Parse one slot; FormatError if torn, corrupt or of another version."""
    if len(buf) < SLOT_BYTES:
        raise FormatError(f"replica header is {len(buf)} bytes, need {SLOT_BYTES}", where)
    data = bytes(buf[:SLOT_BYTES])
    if crc32c(data[:-4]) != int.from_bytes(data[-4:], "big"):
        raise FormatError("replica header CRC32C mismatch (torn or corrupt)", where)
    (magic, version, *values, _res) = HEADER_STRUCT.unpack_from(data)
    if magic != RECORD_MAGIC:
        raise FormatError(f"bad replica header magic 0x{magic:08x}", where)
    if version != RECORD_VERSION:
        raise FormatError(f"unsupported replica header version {version}", where)
    header = dict(zip(FIELDS, values))
    if header["range_bytes"] < 4096 or header["range_bytes"] & (header["range_bytes"] - 1):
        raise FormatError(f"replica range of {header['range_bytes']} bytes is not a power of two >= 4 KiB",
                          where)
    return header


def read_header_untrusted(buf, offset: int, where: str = ""):
    """Return (header dict or None if both slots are blank, errors) from the newest valid slot."""
    best, errors = None, []
    for slot in range(2):
        start = offset + slot * SLOT_BYTES
        raw = buf[start:start + SLOT_BYTES]
        if not any(raw):
            continue
        try:
            header = parse_header_untrusted(raw, f"{where} slot {slot}")
        except FormatError as exc:
            errors.append(str(exc))
            continue
        if best is None or header["counter"] > best["counter"]:
            best = header
    return best, errors
