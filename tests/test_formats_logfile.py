"""The destination's per-source log file and the log-shipping messages: golden vectors, twins."""
import random

import pytest

from firmware.formats import FormatError
from firmware.formats import logfile as LF
from firmware.formats import messages as M
from firmware.formats import nvram as N

PAIR = bytes(range(16))
GOLDEN_HEADER_HEAD = bytes.fromhex(                 # magic, version 1, source 3, pair, 1 MiB, 41, 8 KiB, 42, 7
    "54434c4f47460001" "0001" "0003" "00000000" "000102030405060708090a0b0c0d0e0f"
    "0000000000100000" "0000000000000029" "0000000000002000" "000000000000002a" "0000000000000007")
GOLDEN_HEADER_CRC = bytes.fromhex("a5c6c32e")
GOLDEN_LOG_ACK = bytes.fromhex("0001000000000000000000000000000900000000000000080000000000000005")
GOLDEN_RECORD_HEAD = bytes.fromhex("4c4500010000020000000000000000050000000000000010b2fde42f26c7ebd3")


def test_file_header_golden_vector_parse_build_size():
    raw = LF.build_header(3, PAIR, 1 << 20, 41, 8192, 42, 7)
    assert len(raw) == LF.FileHeader.sizeof() == LF.HEADER_BYTES
    assert raw.startswith(GOLDEN_HEADER_HEAD) and raw[-4:] == GOLDEN_HEADER_CRC
    assert raw[len(GOLDEN_HEADER_HEAD):-4] == bytes(LF.HEADER_BYTES - len(GOLDEN_HEADER_HEAD) - 4)
    hdr = LF.FileHeader.parse(raw)
    assert (hdr.source_id, hdr.pair_id, hdr.file_bytes, hdr.applied_seq, hdr.head_offset, hdr.head_seq,
            hdr.cp_count) == (3, PAIR, 1 << 20, 41, 8192, 42, 7)
    fields = {k: v for k, v in hdr.items() if not k.startswith("_")}
    assert LF.FileHeader.build(fields) == raw          # the construct declaration and the twin agree


def test_file_header_twin_agrees_with_construct_on_random_values():
    rng = random.Random(5)
    for _ in range(200):
        vals = [rng.randrange(1 << 16), bytes(rng.randrange(256) for _ in range(16)), rng.randrange(1 << 40),
                rng.randrange(1 << 60), rng.randrange(4096, 1 << 40), rng.randrange(1 << 60), rng.randrange(1 << 60)]
        raw = LF.build_header(*vals)
        hdr = LF.parse_header_untrusted(raw + bytes(8), "test") if vals[2] > vals[4] else LF.FileHeader.parse(raw)
        assert [hdr.source_id, hdr.pair_id, hdr.file_bytes, hdr.applied_seq, hdr.head_offset, hdr.head_seq,
                hdr.cp_count] == vals


def test_torn_header_slot_loses_to_the_other_slot():
    old = LF.build_header(1, PAIR, 1 << 20, 10, 8192, 11, 4)
    new = LF.build_header(1, PAIR, 1 << 20, 20, 12288, 21, 5)
    area = bytearray(1024)
    area[LF.header_slot_offset(4):LF.header_slot_offset(4) + 512] = old
    area[LF.header_slot_offset(5):LF.header_slot_offset(5) + 512] = new
    assert LF.newest_header_untrusted(area).applied_seq == 20
    area[LF.header_slot_offset(5) + 100] ^= 1                  # the newer write tore
    assert LF.newest_header_untrusted(area).applied_seq == 10
    with pytest.raises(FormatError):
        LF.newest_header_untrusted(bytes(1024))


def test_the_end_of_the_ring_is_its_start():
    """A head at the file's end (written before seed 412026 was fixed) is read as DATA_START, where
    its writer put the next record; beyond the end, or inside the header area, it is refused."""
    assert LF.ring_offset(1 << 20, 1 << 20) == LF.DATA_START
    assert LF.ring_offset(8192, 1 << 20) == 8192
    hdr = LF.parse_header_untrusted(LF.build_header(1, PAIR, 1 << 20, 10, 1 << 20, 11, 4))
    assert (hdr.applied_seq, hdr.head_offset, hdr.head_seq) == (10, LF.DATA_START, 11)
    for head in ((1 << 20) + 512, 512):
        with pytest.raises(FormatError, match="outside the file"):
            LF.parse_header_untrusted(LF.build_header(1, PAIR, 1 << 20, 10, head, 11, 4))


@pytest.mark.parametrize("cut", [0, 1, 31, 100, 511])
def test_damaged_header_is_a_format_error(cut):
    raw = bytearray(LF.build_header(1, PAIR, 1 << 20, 10, 8192, 11, 4))
    raw[cut] ^= 0x40
    with pytest.raises(FormatError):
        LF.parse_header_untrusted(raw)


def test_record_golden_vector_and_entry_header_is_the_nvram_log_entry():
    rec = LF.build_record(1, 5, 16, b"\xab" * 512)
    assert len(rec) == LF.record_bytes(512) == 1024
    assert rec[:32] == GOLDEN_RECORD_HEAD
    parsed = N.LogEntryHeader.parse(rec[:32])                  # the NVRAM log's declaration
    assert (parsed.lun, parsed.length, parsed.seq, parsed.lba) == (1, 512, 5, 16)
    assert LF.parse_entry_untrusted(rec) == (1, 512, 5, 16, parsed.data_crc)
    for i in range(32):
        bad = bytearray(rec)
        bad[i] ^= 0x08
        assert LF.parse_entry_untrusted(bad) is None


def test_log_ack_golden_vector_and_twin():
    fields = dict(source_id=1, status=0, reserved0=0, stored_seq=9, filed_seq=8, applied_seq=5)
    assert M.LogAck.build(fields) == GOLDEN_LOG_ACK == M.LOG_ACK.pack(1, 0, 0, 9, 8, 5)
    assert M.LogAck.sizeof() == M.LOG_ACK.size


def test_log_ship_twin_agrees_with_the_construct_declaration():
    rng = random.Random(9)
    for _ in range(50):
        entries = [dict(seq=rng.randrange(1 << 60), lun=rng.randrange(8), flags=0, lba=rng.randrange(1 << 30),
                        data_crc=rng.randrange(1 << 32), data=bytes(rng.randrange(256) for _ in range(
                            512 * rng.randrange(3)))) for _ in range(rng.randrange(1, 4))]
        built = M.LogShip.build(dict(source_id=2, partition=0, entries=entries))
        twin = M.LOG_SHIP_HEAD.pack(2, 0, len(entries)) + b"".join(
            M.LOG_ENTRY_HEAD.pack(e["seq"], e["lun"], 0, e["lba"], e["data_crc"], len(e["data"])) + e["data"]
            for e in entries)
        assert built == twin
    cp = M.ConsistencyPoint.build(dict(source_id=1, partition=0, first_seq=0, last_seq=77))
    assert cp == M.CONSISTENCY_POINT.pack(1, 0, 0, 77)
