"""The destination's file of a source's log requests (replica mode, NVRAM-log variant; claims 4).

One file per source, kept on a disk of the destination (a raw disk region,
"journal" below): a header sector, then records, a ring.

    0        FileHeader slot 0 (512 B sector)
    512      FileHeader slot 1: headers alternate by cp_count, so a torn header write
             leaves the other slot; the valid slot with the larger cp_count wins
    4 KiB    records, each starting on a 512 B boundary:
               LogEntryHeader (32 B, the same record the NVRAM log uses), padding to 512 B,
               the request's data (a multiple of 512 B)

Records are appended in sequence order. When a record does not fit before
the end of the file it goes to 4 KiB (the ring wraps). A scan starts at the
header's `head_offset` with `head_seq` and follows records whose sequence is
exactly the next one; a record of an older lap has a smaller sequence, a torn
one fails its CRC, and at either the scan tries the wrap once, then stops.
Records before the head were applied to the image volume by a consistency
point and may be overwritten.

`head_offset` is where a record can start, in [4 KiB, file_bytes): the end of
the ring is its start (`ring_offset`). Firmware before simulator seed 412026
was fixed wrote head_offset == file_bytes when a consistency point emptied a
ring whose last record ended the file; a reader takes that as 4 KiB (rejecting
it, recovery fell back to the older header and lost the records filed after).
"""
import struct

import crc32c as _crc32c
from construct import Bytes, Const, Int16ub, Int32ub, Int64ub, Struct
from construct.core import ConstructError

from . import FormatError
from . import nvram as N

FILE_MAGIC = b"TCLOGF\x00\x01"
FILE_VERSION = 1
HEADER_BYTES = 512
HEADER_SLOTS = 2
DATA_START = 4096
RECORD_ALIGN = 512

FileHeader = Struct(
    "magic" / Const(FILE_MAGIC),
    "version" / Int16ub,
    "source_id" / Int16ub,                  # the source this file belongs to
    "reserved0" / Int32ub,
    "pair_id" / Bytes(16),                  # the source-destination pairing
    "file_bytes" / Int64ub,                 # size of the ring, header included
    "applied_seq" / Int64ub,                # every request up to here is in the image volume
    "head_offset" / Int64ub,                # the first record not yet applied
    "head_seq" / Int64ub,                   # its sequence number (applied_seq + 1)
    "cp_count" / Int64ub,                   # consistency points applied, for status
    "reserved" / Bytes(436),
    "crc" / Int32ub,                        # CRC32C of the 508 bytes before it
)
assert FileHeader.sizeof() == HEADER_BYTES
FILE_HEADER = struct.Struct(">8sHHI16sQQQQQ436sI")
assert FILE_HEADER.size == HEADER_BYTES

ENTRY = struct.Struct(">HHIQQII")           # the struct twin of nvram.LogEntryHeader
assert ENTRY.size == N.LogEntryHeader.sizeof() == 32


def build_header(source_id, pair_id, file_bytes, applied_seq, head_offset, head_seq, cp_count) -> bytes:
    body = FILE_HEADER.pack(FILE_MAGIC, FILE_VERSION, source_id, 0, pair_id, file_bytes, applied_seq,
                            head_offset, head_seq, cp_count, bytes(436), 0)[:-4]
    return body + struct.pack(">I", _crc32c.crc32c(body))


def parse_header_untrusted(buf, where: str = ""):
    """The file header of a journal region; FormatError if blank, torn or foreign."""
    raw = bytes(buf[:HEADER_BYTES])
    if len(raw) < HEADER_BYTES:
        raise FormatError("short log file header", where)
    try:
        hdr = FileHeader.parse(raw)
    except ConstructError as exc:
        raise FormatError(f"not a log file header: {exc}", where) from None
    if _crc32c.crc32c(raw[:-4]) != hdr.crc:
        raise FormatError("log file header fails its CRC (torn or overwritten)", where)
    if hdr.version != FILE_VERSION:
        raise FormatError(f"log file version {hdr.version}", where)
    if not DATA_START <= hdr.head_offset <= hdr.file_bytes:
        raise FormatError(f"log file head {hdr.head_offset} outside the file", where)
    hdr.head_offset = ring_offset(hdr.head_offset, hdr.file_bytes)
    return hdr


def newest_header_untrusted(buf, where: str = ""):
    """The newest valid header of the two slots in the first 1 KiB of a journal; FormatError if none."""
    found, errors = [], []
    for slot in range(HEADER_SLOTS):
        try:
            found.append(parse_header_untrusted(buf[slot * HEADER_BYTES:(slot + 1) * HEADER_BYTES],
                                                f"{where} slot {slot}"))
        except FormatError as exc:
            errors.append(str(exc))
    if not found:
        raise FormatError("no valid log file header: " + "; ".join(errors), where)
    return max(found, key=lambda h: h.cp_count)


def ring_offset(offset, file_bytes) -> int:
    """Where a record at `offset` of the ring starts: the end of the ring is its start, DATA_START.

    A head is recorded through this: a header whose head_offset is the file's size is not one a
    scan can start at (seed 412026: a consistency point emptied a ring whose last record ended
    exactly at the file's end)."""
    return DATA_START if offset >= file_bytes else offset


def header_slot_offset(cp_count) -> int:
    return (cp_count % HEADER_SLOTS) * HEADER_BYTES


def entry_header(lun, length, seq, lba, data_crc) -> bytes:
    """A LogEntryHeader (NVRAM log and file records share it) with its header CRC."""
    head = ENTRY.pack(N.LOG_ENTRY_MAGIC, lun, length, seq, lba, data_crc, 0)[:28]
    return head + struct.pack(">I", _crc32c.crc32c(head))


def parse_entry_untrusted(buf, offset=0):
    """(lun, length, seq, lba, data_crc) of the entry header at `offset`, or None if there is none.

    None covers blank, torn and foreign bytes alike: a scan ends there."""
    if len(buf) - offset < ENTRY.size:
        return None
    magic, lun, length, seq, lba, data_crc, hdr_crc = ENTRY.unpack_from(buf, offset)
    if magic != N.LOG_ENTRY_MAGIC or _crc32c.crc32c(bytes(buf[offset:offset + 28])) != hdr_crc:
        return None
    return lun, length, seq, lba, data_crc


def record_bytes(length) -> int:
    """Bytes a record of `length` data bytes takes in the file."""
    return RECORD_ALIGN + _round_up(length, RECORD_ALIGN)


def build_record(lun, seq, lba, data) -> bytes:
    head = entry_header(lun, len(data), seq, lba, _crc32c.crc32c(data))
    pad = _round_up(len(data), RECORD_ALIGN) - len(data)
    return b"".join((head, bytes(RECORD_ALIGN - len(head)), data, bytes(pad)))


def _round_up(n, k):
    return -(-n // k) * k
