"""Fuzz target `formats`: every parse_*_untrusted of firmware/formats/.

Input: one byte picks the parser, one byte of options (bit 0: "seal", recompute
the format's checksum over the mutated bytes first, so the fuzzer gets past
the CRC to the checks behind it; bits 1-7: a message type or an offset), then
the bytes to parse. The contract (firmware/formats/__init__.py): FormatError
and nothing else, whatever the input; a parse that succeeds must give values
the format allows.
"""
import hashlib
import struct

from firmware.formats import FormatError
from firmware.formats import bundle as B
from firmware.formats import disklabel as DL
from firmware.formats import flashproto as FP
from firmware.formats import frame as F
from firmware.formats import logfile as LF
from firmware.formats import messages as M
from firmware.formats import nvram as N
from firmware.formats import replica_record as RR
from firmware.formats import reservation as RS

from .reader import Reader


def _crc_at_end(size):
    """Seal: CRC32C of the first size-4 bytes, big-endian, in the last 4 (most of our records)."""
    def seal(buf):
        if len(buf) >= size:
            buf[size - 4:size] = N.crc32c(bytes(buf[:size - 4])).to_bytes(4, "big")
    return seal


def _seal_frame(buf):
    if len(buf) >= F.HEADER_SIZE_BYTES + 4:
        buf[-4:] = N.crc32c(bytes(buf[:-4])).to_bytes(4, "big")


def _seal_bundle(buf):
    if len(buf) < B.HEADER_SIZE_BYTES:
        return
    (payload_len,) = struct.unpack_from(">Q", buf, 52)
    start = B.HEADER_SIZE_BYTES + payload_len
    if start + B.SHA256_BYTES <= len(buf):
        buf[start:start + B.SHA256_BYTES] = hashlib.sha256(bytes(buf[B.HEADER_SIZE_BYTES:start])).digest()


def _seal_two_slots(slot_bytes, record_bytes):
    one = _crc_at_end(record_bytes)

    def seal(buf):
        for slot in range(2):
            view = buf[slot * slot_bytes:]
            one(view)
            buf[slot * slot_bytes:slot * slot_bytes + len(view)] = view
    return seal


def _seal_commits(buf):
    for segment in range(2):
        for slot in range(2):
            offset = N.commit_slot_offset(segment, slot)
            end = offset + N.COMMIT_SLOT_BYTES - 4
            if len(buf) >= end + 4:
                buf[end:end + 4] = N.crc32c(bytes(buf[offset:end])).to_bytes(4, "big")


def _check_message(opt, buf):
    msg_type = opt % 32
    try:
        value = M.parse_body_untrusted(msg_type, buf, "fuzz")
    except FormatError:
        return
    assert M.BODIES[M.MsgType(msg_type)].build(value) == bytes(buf), "a parsed body does not build back"


def _check_descriptor(opt, buf):
    rec = N.parse_descriptor_untrusted(buf, opt % 4, "fuzz")
    assert rec.state in (0, 1, 2) and (not rec.state or rec.group_index < rec.group_count)


def _check_block_refs(opt, buf):
    refs = M.parse_block_refs_untrusted(buf, "fuzz")
    assert M.pack_block_refs(refs) == bytes(buf)


# (name, seal or None, check(opt, bytearray)); the check calls the parser.
PARSERS = [
    ("bundle.header", None, lambda opt, b: B.parse_header_untrusted(b, "fuzz")),
    ("bundle", _seal_bundle, lambda opt, b: B.parse_bundle_untrusted(b, "fuzz")),
    ("disklabel", _crc_at_end(DL.LABEL_SIZE_BYTES), lambda opt, b: DL.parse_disklabel_untrusted(b, "fuzz")),
    ("flashproto", _seal_frame, lambda opt, b: FP.parse_frame_untrusted(b, "fuzz")),
    ("frame.header", None, lambda opt, b: F.parse_header_untrusted(b, "fuzz")),
    ("frame", _seal_frame, lambda opt, b: F.parse_frame_untrusted(b, "fuzz")),
    ("logfile.header", _crc_at_end(LF.HEADER_BYTES), lambda opt, b: LF.parse_header_untrusted(b, "fuzz")),
    ("logfile.newest", _seal_two_slots(LF.HEADER_BYTES, LF.HEADER_BYTES),
     lambda opt, b: LF.newest_header_untrusted(b, "fuzz")),
    ("logfile.entry", None, lambda opt, b: LF.parse_entry_untrusted(b, opt % 64)),
    ("messages", None, _check_message),
    ("messages.block_refs", None, _check_block_refs),
    ("nvram.superblock", _crc_at_end(N.SUPERBLOCK_SIZE_BYTES),
     lambda opt, b: N.parse_superblock_untrusted(b, "fuzz")),
    ("nvram.read_superblock", _seal_two_slots(N.SB_SLOT_BYTES, N.SUPERBLOCK_SIZE_BYTES),
     lambda opt, b: N.read_superblock_untrusted(b, "fuzz")),
    ("nvram.descriptor", _crc_at_end(N.DESC_SIZE_BYTES), _check_descriptor),
    ("nvram.commit", _seal_commits, lambda opt, b: N.read_commit_untrusted(b, opt % 2)),
    ("replica_record", _crc_at_end(RR.SLOT_BYTES), lambda opt, b: RR.parse_header_untrusted(b, "fuzz")),
    ("replica_record.read", _seal_two_slots(RR.SLOT_BYTES, RR.SLOT_BYTES),
     lambda opt, b: RR.read_header_untrusted(b, 0, "fuzz")),
    ("reservation", _crc_at_end(RS.RECORD_BYTES), lambda opt, b: RS.parse_record_untrusted(b, "fuzz")),
]


def one_input(data: bytes) -> None:
    r = Reader(data)
    name, seal, check = PARSERS[r.u8() % len(PARSERS)]
    opt = r.u8()
    buf = bytearray(r.rest())
    if seal is not None and opt & 1:
        seal(buf)
    try:
        check(opt >> 1, buf)
    except FormatError:
        pass
