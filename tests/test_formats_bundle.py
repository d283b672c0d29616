"""Golden vectors for the firmware bundle and the board flashing protocol (parse, build, sizeof).

Each vector is written field by field, so a change to either declaration
shows up here as a changed byte, not as a silently different file.
"""
import hashlib

import crc32c
import pytest
from cobs import cobs

from firmware.formats import FormatError
from firmware.formats import bundle as b
from firmware.formats import flashproto as f

BUILD_ID = "0.1.0+g1".encode().ljust(32, b"\0").hex()
HEADER_HEX = ("544342554e444c00"       # magic "TCBUNDL\0"
              "0001" "03" "00"          # version 1, target board, flags
              + BUILD_ID +
              "000000006553f100"        # created_at_s 1700000000
              "0000000000000026"        # payload_len 38
              "0001020304050607"        # key_id
              + "00" * 28)              # reserved
PAYLOAD_HEX = ("0002"                                   # two entries
               "03" "000000" "0006" "632e746f6d6c" "00000003" "783d31"   # config c.toml "x=1"
               "01" "000000" "0005" "772e77686c" "00000002" "504b")      # wheel w.whl "PK"
SIGNATURE = bytes([0x5A]) * 64


def test_bundle_sizes():
    assert b.BundleHeader.sizeof() == b.HEADER_SIZE_BYTES == 96
    assert len(bytes.fromhex(HEADER_HEX)) == 96


def test_bundle_header_build_and_parse():
    header = b.build_header(b.TargetKind.BOARD, "0.1.0+g1", 1700000000, 38, bytes(range(8)))
    assert header.hex() == HEADER_HEX
    parsed = b.parse_header_untrusted(bytes.fromhex(HEADER_HEX))
    assert (parsed.version, parsed.target_kind, parsed.build_id, parsed.created_at_s, parsed.payload_len) == \
        (1, b.TargetKind.BOARD, "0.1.0+g1", 1700000000, 38)


def test_bundle_payload_build_and_parse():
    payload = b.build_payload([(b.EntryKind.CONFIG, "c.toml", b"x=1"), (b.EntryKind.WHEEL, "w.whl", b"PK")])
    assert payload.hex() == PAYLOAD_HEX
    entries = b.Payload.parse(bytes.fromhex(PAYLOAD_HEX)).entries
    assert [(e.kind, e.name, e.data) for e in entries] == [(3, "c.toml", b"x=1"), (1, "w.whl", b"PK")]


def whole_bundle() -> bytes:
    payload = bytes.fromhex(PAYLOAD_HEX)
    return bytes.fromhex(HEADER_HEX) + payload + hashlib.sha256(payload).digest() + SIGNATURE


def test_whole_bundle_assembles_and_parses():
    blob = whole_bundle()
    assert b.assemble(bytes.fromhex(HEADER_HEX), bytes.fromhex(PAYLOAD_HEX), SIGNATURE) == blob
    assert b.Bundle.build(b.Bundle.parse(blob)) == blob
    parsed = b.parse_bundle_untrusted(blob)
    assert parsed.signature == SIGNATURE and parsed.header.data.hex() == HEADER_HEX
    assert b.signed_message(parsed.header.data, parsed.payload_sha256) == blob[:96] + blob[134:166]


@pytest.mark.parametrize("damage, message", [
    (lambda x: x[:40], "shorter than the header"),
    (lambda x: x[:-1], "truncated bundle"),
    (lambda x: x + b"\0", "trailing bytes"),
    (lambda x: x[:100] + bytes([x[100] ^ 1]) + x[101:], "payload SHA-256 mismatch"),
    (lambda x: b"XCBUNDL\0" + x[8:], "not a twincache bundle"),
    (lambda x: x[:8] + b"\x00\x09" + x[10:], "unsupported bundle version 9"),
])
def test_bad_bundles_raise_format_error_only(damage, message):
    with pytest.raises(FormatError, match=message):
        b.parse_bundle_untrusted(damage(whole_bundle()))


def test_bundle_entry_of_unknown_kind_is_refused():
    payload = bytes.fromhex("0001" "09000000" "0001" "61" "00000000")
    header = b.build_header(b.TargetKind.BOARD, "x", 0, len(payload), bytes(8))
    with pytest.raises(FormatError, match="unknown kind 9"):
        b.parse_bundle_untrusted(b.assemble(header, payload, SIGNATURE))


FRAMES = [   # (type, fields, body hex); header is 5446 01 <type> 1234 <len>, then CRC32C
    (f.MsgType.HELLO, dict(protocol_version=1, reserved=bytes(3)), "01000000"),
    (f.MsgType.BEGIN, dict(total_size=4096, sha256=bytes(range(32)), block_size=1024, reserved=bytes(2)),
     "0000000000001000" + bytes(range(32)).hex() + "0400" "0000"),
    (f.MsgType.BLOCK, dict(index=2, data=b"abcd"), "00000002" "61626364"),
    (f.MsgType.BLOCK_ACK, dict(index=2), "00000002"),
    (f.MsgType.BLOCK_NAK, dict(expected=3, reason=f.NakReason.BAD_FRAME), "00000003" "01"),
    (f.MsgType.ACTIVATE_REPLY, dict(status=7, slot=0, health=1, reserved=0, message="rb"),
     "07" "00" "01" "00" "0002" "7262"),
]
CRCS = {"HELLO": "8d1183d7", "BEGIN": "b417c477", "BLOCK": "77f04f3c", "BLOCK_ACK": "760f9782",
        "BLOCK_NAK": "f4691c81", "ACTIVATE_REPLY": "be0bcef9"}


@pytest.mark.parametrize("msg_type, fields, body_hex", FRAMES, ids=lambda v: getattr(v, "name", ""))
def test_flash_frame_vectors(msg_type, fields, body_hex):
    head = "5446" "01" f"{msg_type:02x}" "1234" f"{len(body_hex) // 2:04x}"
    want = head + body_hex + CRCS[msg_type.name]
    assert crc32c.crc32c(bytes.fromhex(head + body_hex)) == int(CRCS[msg_type.name], 16)
    assert f.build_frame(msg_type, 0x1234, **fields).hex() == want
    parsed_type, seq, body = f.parse_frame_untrusted(bytes.fromhex(want))
    assert (parsed_type, seq) == (msg_type, 0x1234)
    assert {k: v for k, v in body.items() if not k.startswith("_")} == {k: v for k, v in fields.items()}
    assert cobs.decode(cobs.encode(bytes.fromhex(want))) == bytes.fromhex(want)


def test_flash_sizes():
    assert f.FrameHeader.sizeof() == f.HEADER_SIZE_BYTES == 8
    assert f.HelloReply.sizeof() == 104 and f.Hello.sizeof() == 4
    assert f.BlockAck.sizeof() == 4 and f.BlockNak.sizeof() == 5


@pytest.mark.parametrize("raw, message", [
    ("5446", "short flash frame"),
    ("5446010612340004000000027" "60f9783", "CRC32C mismatch"),
    ("544601061234000500000002" "00" "00000000", "CRC32C mismatch"),
    ("00" * (f.FRAME_MAX_BYTES + 1), "exceeds"),
])
def test_bad_flash_frames_raise_format_error_only(raw, message):
    with pytest.raises(FormatError, match=message):
        f.parse_frame_untrusted(bytes.fromhex(raw))


def test_unknown_type_and_version_are_refused():
    for head in ("5446" "01" "63" "1234" "0000", "5446" "02" "06" "1234" "0000"):
        raw = bytes.fromhex(head)
        raw += crc32c.crc32c(raw).to_bytes(4, "big")
        with pytest.raises(FormatError):
            f.parse_frame_untrusted(raw)
