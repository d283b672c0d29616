"""The replica record header (NVRAM bitmap region): golden bytes, twin, torn slots, bad input."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.formats import FormatError
from firmware.formats import replica_record as R

VALUES = dict(role=1, flags=2, counter=7, generation=3, current_uuid=0x1111111111111111,
              bitmap_uuid=0x2222222222222222, history0=0x3333333333333333, history1=0x4444444444444444,
              range_bytes=65536, map_bits=2048)
GOLDEN = bytes.fromhex(
    "54435250"              # magic "TCRP"
    "0001"                  # version
    "01"                    # role primary
    "02"                    # flags: inconsistent
    "0000000000000007"      # counter
    "0000000000000003"      # generation
    "1111111111111111"      # current uuid
    "2222222222222222"      # bitmap uuid
    "3333333333333333"      # history 0
    "4444444444444444"      # history 1
    "00010000"              # range_bytes 64 KiB
    "00000800"              # map_bits 2048
    + "00" * 60 +           # reserved
    "63c9fe48")             # CRC32C of the 124 bytes before it


def test_golden_build_parse_size_and_twin():
    assert R.ReplicaHeader.sizeof() == R.SLOT_BYTES == len(GOLDEN) == 128
    assert R.build_header(VALUES) == GOLDEN
    assert R.parse_header_untrusted(GOLDEN) == VALUES
    buf = bytearray(2 * R.SLOT_BYTES)
    assert R.pack_header_into(buf, 0, VALUES) == R.SLOT_BYTES       # counter 7: slot 1
    assert bytes(buf[R.SLOT_BYTES:]) == GOLDEN and not any(buf[:R.SLOT_BYTES])
    parsed = R.ReplicaHeader.parse(GOLDEN).fields.value
    assert {k: parsed[k] for k in VALUES} == VALUES


def test_newest_valid_slot_wins_and_a_torn_one_is_reported():
    buf = bytearray(2 * R.SLOT_BYTES)
    R.pack_header_into(buf, 0, dict(VALUES, counter=8, role=0))
    R.pack_header_into(buf, 0, dict(VALUES, counter=9, role=1))
    header, errors = R.read_header_untrusted(buf, 0)
    assert header["counter"] == 9 and header["role"] == 1 and errors == []
    buf[R.SLOT_BYTES + 30] ^= 0x40                                   # tear the newer slot
    header, errors = R.read_header_untrusted(buf, 0, "nvram")
    assert header["counter"] == 8 and header["role"] == 0 and "CRC32C" in errors[0]


def test_blank_region_has_no_header():
    assert R.read_header_untrusted(bytes(256), 0) == (None, [])


def test_bad_range_size_and_magic_refused():
    with pytest.raises(FormatError):
        R.parse_header_untrusted(R.build_header(dict(VALUES, range_bytes=3000)))
    bad = bytearray(GOLDEN)
    bad[0] = 0
    with pytest.raises(FormatError):
        R.parse_header_untrusted(bytes(bad))


def test_region_layout():
    assert R.map_offsets(2048) == (4096, 8192) and R.region_bytes_needed(2048) == 12288
    assert R.map_offsets(8 * 4096 + 1) == (4096, 4096 + 8192)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_parse_or_raise_format_error(blob):
    try:
        R.parse_header_untrusted(blob)
    except FormatError:
        pass
