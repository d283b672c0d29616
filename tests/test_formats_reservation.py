"""The reservation record: golden bytes, parse/build/sizeof, and untrusted input."""
from hypothesis import given, settings, strategies as st
import pytest

from firmware.formats import FormatError
from firmware.formats import reservation as R

PAIR = bytes(range(16))
GOLDEN_HEAD = bytes.fromhex(
    "5443525356000001"          # magic "TCRSV\0\0\1"
    "0001"                      # version
    "0002"                      # lun 2
    "01"                        # owner b
    "01"                        # state SOLO
    "0000"                      # reserved
    "0000000000000007"          # generation 7
    "000000000000002a"          # counter 42
    "00000190"                  # lease_ms 400
    "00000000"                  # reserved
    "000102030405060708090a0b0c0d0e0f")  # pair id


def record():
    return R.Record(2, 1, R.LunState.SOLO, 7, 42, 400, PAIR)


def test_golden_bytes_build_parse_and_size():
    data = R.build_record(record())
    assert len(data) == R.RECORD_BYTES == R.Reservation.sizeof() == 512
    assert data[:len(GOLDEN_HEAD)] == GOLDEN_HEAD
    assert data[len(GOLDEN_HEAD):-4] == bytes(512 - 4 - len(GOLDEN_HEAD))
    assert data[-4:].hex() == "f8ad8875"          # CRC32C of the 508 bytes before it
    parsed = R.parse_record_untrusted(data)
    assert parsed.key() == (1, R.LunState.SOLO, 7, 42) and parsed.pair_id == PAIR and parsed.lun == 2


def test_blank_sector_is_no_record_and_a_torn_one_is_refused():
    assert R.parse_record_untrusted(bytes(512)) is None
    data = bytearray(R.build_record(record()))
    data[40] ^= 1
    with pytest.raises(FormatError):
        R.parse_record_untrusted(bytes(data), "lun2 record")


@settings(max_examples=200)
@given(st.binary(min_size=0, max_size=600))
def test_arbitrary_bytes_parse_or_raise_format_error(blob):
    try:
        R.parse_record_untrusted(blob)
    except FormatError:
        pass


def test_golden_bytes_of_a_claim_in_progress():
    # A takeover's claim: owner a, CLAIMED while its replay runs, counter 0 (no renewal yet).
    data = R.build_record(R.Record(0, 0, R.LunState.CLAIMED, 9, 0, 400, PAIR))
    assert data[:56] == bytes.fromhex(
        "5443525356000001" "0001" "0000" "00" "02" "0000"
        "0000000000000009" "0000000000000000" "00000190" "00000000") + PAIR
    assert data[-4:].hex() == "3f20a014"          # CRC32C of the 508 bytes before it
    parsed = R.parse_record_untrusted(data)
    assert parsed.key() == (0, R.LunState.CLAIMED, 9, 0)
    bad = bytearray(data)
    bad[13] = 3                                   # no such state
    bad[-4:] = R.crc32c(bytes(bad[:-4])).to_bytes(4, "big")
    with pytest.raises(FormatError):
        R.parse_record_untrusted(bytes(bad))
