"""Message bodies: golden vectors for every body in messages.BODIES, twins, and bad input.

Each vector is written out in hex here, so a change to any body's layout
fails this test; HELLO's vector must never change (it is frozen forever).
"""
import pytest
from construct.core import SizeofError
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.formats import FormatError
from firmware.formats import messages as M

P = bytes(range(16))

VECTORS = {
    "HELLO": (
        dict(protocol_min=1, protocol_max=1, controller_id=1, mode=0, generation=7, capabilities=0x1f,
             features=0x0102030405060708, pair_id=P, nonce=bytes(range(32, 64)), block_size_bytes=4096,
             primary_blocks=1024, reserved=bytes(16)),
        bytes.fromhex(
            "0101010000000000000000070000001f01020304050607080001020304050607"
            "08090a0b0c0d0e0f202122232425262728292a2b2c2d2e2f3031323334353637"
            "38393a3b3c3d3e3f000010000000040000000000000000000000000000000000")),
    "AUTH": (
        dict(hmac=bytes(range(0xa0, 0xc0))),
        bytes.fromhex(
            "a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf")),
    "HEARTBEAT": (
        dict(generation=7, sent_ms=123456789, state=2, reserved=bytes(7)),
        bytes.fromhex(
            "000000000000000700000000075bcd150200000000000000")),
    "MIRROR_WRITE": (       # blocks 1 and 2 of a 3-block write, 4-byte blocks
        dict(lun=1, context_flags=3, seq=42, generation=7, group_count=3, first_index=1, count=2,
             reserved=0, block_size=4,
             blocks=[dict(cache_id=5, lba=0x1000, data_crc=0xdeadbeef, dirty_bitmap=b"\xff" + bytes(15)),
                     dict(cache_id=6, lba=0x1008, data_crc=0x01020304, dirty_bitmap=bytes(15) + b"\x01")],
             data=b"ABCDEFGH"),
        bytes.fromhex(
            "00010003000000000000002a0000000700030001000200000000000400000005"
            "0000000000001000deadbeefff00000000000000000000000000000000000006"
            "0000000000001008010203040000000000000000000000000000000141424344"
            "45464748")),
    "MIRROR_ACK": (
        dict(seq=42, status=0, count=1, reserved=0),
        bytes.fromhex(
            "000000000000002a0000000100000000")),
    "METADATA": (
        dict(cache_id=5, state=1, reserved0=0, lun=1, lba=0x1000, seq=42, dirty_bitmap=b"\x0f"+bytes(15)),
        bytes.fromhex(
            "00000005010000010000000000001000000000000000002a0f00000000000000"
            "0000000000000000")),
    "FLUSH_BEGIN": (
        dict(blocks=[dict(cache_id=1, seq=2), dict(cache_id=3, seq=4)]),
        bytes.fromhex(
            "0002000000010000000000000002000000030000000000000004")),
    "FLUSH_DONE": (
        dict(blocks=[dict(cache_id=9, seq=10)]),
        bytes.fromhex(
            "000100000009000000000000000a")),
    "OWNERSHIP_REQUEST": (
        dict(lun=2, scope=0, reserved0=0, lba=0, generation=7, reserved=bytes(8)),
        bytes.fromhex(
            "00020000000000000000000000000000000000070000000000000000")),
    "OWNERSHIP_GRANT": (
        dict(lun=2, scope=1, reserved0=0, lba=0x80, generation=8, reserved=bytes(8)),
        bytes.fromhex(
            "00020100000000000000008000000000000000080000000000000000")),
    "OWNERSHIP_RELEASE": (
        dict(lun=3, scope=0, reserved0=0, lba=0, generation=9, reserved=bytes(8)),
        bytes.fromhex(
            "00030000000000000000000000000000000000090000000000000000")),
    "DESTAGED_RANGE": (
        dict(lun=1, ranges=[dict(lba=0, sectors=8), dict(lba=64, sectors=16)]),
        bytes.fromhex(
            "00010002000000000000000000000008000000000000004000000010")),
    "RESYNC_REQUEST": (
        dict(lun=1, reserved0=0, generation=7, ranges=[dict(lba=128, sectors=8)]),
        bytes.fromhex(
            "0001000000000000000000070001000000000000008000000008")),
    "RESYNC_DATA": (
        dict(lun=1, reserved0=0, lba=128, data=b"xyz"),
        bytes.fromhex(
            "0001000000000000000000800000000378797a")),
    "LOG_SHIP": (
        dict(source_id=1, partition=2,
             entries=[dict(seq=100, lun=0, flags=0, lba=8, data_crc=0x01020304, data=b"\x01\x02")]),
        bytes.fromhex(
            "0001000200010000000000000064000000000000000000000008010203040000"
            "00020102")),
    "CONSISTENCY_POINT": (
        dict(source_id=1, partition=2, first_seq=100, last_seq=199),
        bytes.fromhex(
            "00010002000000000000006400000000000000c7")),
    "ERROR": (
        dict(code=22, ref_type=4, reserved0=0, message="bad lun"),
        bytes.fromhex(
            "001604000007626164206c756e")),
    "IO_REQUEST": (
        dict(op=1, fua=1, lun=0, offset=4096, length=4, data=b"data"),
        bytes.fromhex(
            "0101000000000000000010000000000464617461")),
    "IO_REPLY": (
        dict(error=0, data=b"rd"),
        bytes.fromhex(
            "000000007264")),
    "SYNC_BEGIN": (
        dict(generation=7, blocks=0, reserved=0),
        bytes.fromhex(
            "00000000000000070000000000000000")),
    "SYNC_DONE": (
        dict(generation=7, blocks=12, reserved=0),
        bytes.fromhex(
            "00000000000000070000000c00000000")),
    "PING": (
        dict(sent_ns=0x0102030405060708),
        bytes.fromhex(
            "0102030405060708")),
    "PONG": (
        dict(sent_ns=0x0102030405060709),
        bytes.fromhex(
            "0102030405060709")),
    "REPLICATE": (
        dict(seq=42, lun=1, flags=1, reserved0=0, offset=0x10000, data_crc=0xdeadbeef, length=4, data=b"ABCD"),
        bytes.fromhex(
            "000000000000002a00010001000000000000000000010000deadbeef00000004"
            "41424344")),
    "REPLICATE_ACK": (
        dict(seq=42, status=0, level=1, flags=2, reserved=0),
        bytes.fromhex(
            "000000000000002a0000010200000000")),
    "REPLICA_STATE": (
        dict(role=1, flags=2, ack_level=0, reserved0=0, range_bytes=65536, generation=3,
             current_uuid=0x1111111111111111, bitmap_uuid=0x2222222222222222, history0=0x3333333333333333,
             history1=0, sent_bits=5, received_bits=6, reserved=bytes(8)),
        bytes.fromhex(
            "0102000000010000000000000000000311111111111111112222222222222222"
            "3333333333333333000000000000000000000000000000050000000000000006"
            "0000000000000000")),
    "RESYNC_DONE": (
        dict(current_uuid=0x0102030405060708, ranges=256, bytes=16777216, reserved=0),
        bytes.fromhex(
            "0102030405060708000000000000010000000000010000000000000000000000")),
}

FIXED_SIZES = {"HELLO": 96, "AUTH": 32, "HEARTBEAT": 24, "MIRROR_ACK": 16, "METADATA": 40,
               "OWNERSHIP_REQUEST": 28, "OWNERSHIP_GRANT": 28, "OWNERSHIP_RELEASE": 28,
               "CONSISTENCY_POINT": 20, "SYNC_BEGIN": 16, "SYNC_DONE": 16, "PING": 8, "PONG": 8,
               "REPLICATE_ACK": 16, "REPLICA_STATE": 72, "RESYNC_DONE": 32}


def plain(value):
    """A parsed construct value as plain dicts and lists (without construct's _io keys)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def test_every_body_has_a_vector():
    assert set(VECTORS) == {t.name for t in M.BODIES}


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_build_matches_golden_vector(name):
    fields, golden = VECTORS[name]
    assert M.build_body(M.MsgType[name], **fields) == golden


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_parse_golden_vector(name):
    fields, golden = VECTORS[name]
    assert plain(M.parse_body_untrusted(M.MsgType[name], golden)) == fields


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_sizeof(name):
    body = M.BODIES[M.MsgType[name]]
    if name in FIXED_SIZES:
        assert body.sizeof() == FIXED_SIZES[name] == len(VECTORS[name][1])
    else:
        with pytest.raises(SizeofError):
            body.sizeof()


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_compiled_form_agrees(name):
    body = M.BODIES[M.MsgType[name]]
    fields, golden = VECTORS[name]
    compiled = body.compile()
    assert plain(compiled.parse(golden)) == fields
    assert compiled.build(fields) == golden


def test_hello_is_frozen():
    fields, golden = VECTORS["HELLO"]
    assert M.Hello.sizeof() == 96
    assert golden.hex().startswith("01010100" + "0000000000000007" + "0000001f")


def test_mirror_write_twins_golden():
    fields, golden = VECTORS["MIRROR_WRITE"]
    head = M.MIRROR_WRITE_HEAD.unpack_from(golden)
    assert head == (1, 3, 42, 7, 3, 1, 2, 0, 4)
    blocks = list(M.MIRROR_BLOCK.iter_unpack(golden[28:28 + 2 * 32]))
    assert blocks == [(5, 0x1000, 0xDEADBEEF, b"\xff" + bytes(15)), (6, 0x1008, 0x01020304, bytes(15) + b"\x01")]
    assert golden[28 + 2 * 32:] == b"ABCDEFGH"


def test_mirror_ack_twin_golden():
    assert M.MIRROR_ACK.pack(42, 0, 1, 0) == VECTORS["MIRROR_ACK"][1]


def test_io_twins_golden():
    golden = VECTORS["IO_REQUEST"][1]
    assert M.IO_REQUEST_HEAD.unpack_from(golden) == (1, 1, 0, 4096, 4)
    assert M.IO_REPLY_HEAD.pack(0) + b"rd" == VECTORS["IO_REPLY"][1]


# A forwarded WRITE_ZEROES is a range: 1 GiB at 64 KiB on LUN 1, FUA, and no data.
IO_REQUEST_ZEROES = (dict(op=4, fua=1, lun=1, offset=0x10000, length=1 << 30, data=b""),
                     bytes.fromhex("040100010000000000010000" "40000000"))


def test_io_request_write_zeroes_golden():
    fields, golden = IO_REQUEST_ZEROES
    assert M.IoRequest.build(fields) == golden
    assert plain(M.parse_body_untrusted(M.MsgType.IO_REQUEST, golden, "test")) == fields
    assert len(golden) == M.IO_REQUEST_HEAD.size == 16       # the head alone
    assert M.IO_REQUEST_HEAD.unpack(golden) == (M.IoOp.WRITE_ZEROES, 1, 1, 0x10000, 1 << 30)


def test_replicate_twins_golden():
    golden = VECTORS["REPLICATE"][1]
    assert M.REPLICATE_HEAD.unpack_from(golden) == (42, 1, 1, 0, 0x10000, 0xDEADBEEF, 4)
    assert golden[M.REPLICATE_HEAD.size:] == b"ABCD"
    assert M.REPLICATE_ACK.pack(42, 0, 1, 2, 0) == VECTORS["REPLICATE_ACK"][1]


u8, u16, u32, u64 = (st.integers(0, (1 << b) - 1) for b in (8, 16, 32, 64))


@settings(max_examples=200, deadline=None)
@given(seq=u64, lun=u16, flags=u16, res=u32, offset=u64, crc=u32, data=st.binary(max_size=64),
       status=u16, level=u8, aflags=u8)
def test_replicate_twins_agree(seq, lun, flags, res, offset, crc, data, status, level, aflags):
    fields = dict(seq=seq, lun=lun, flags=flags, reserved0=res, offset=offset, data_crc=crc,
                  length=len(data), data=data)
    assert M.Replicate.build(fields) == M.REPLICATE_HEAD.pack(seq, lun, flags, res, offset, crc, len(data)) + data
    ack = dict(seq=seq, status=status, level=level, flags=aflags, reserved=res)
    packed = M.REPLICATE_ACK.pack(seq, status, level, aflags, res)
    assert M.ReplicateAck.build(ack) == packed and plain(M.ReplicateAck.parse(packed)) == ack


@settings(max_examples=200, deadline=None)
@given(lun=u16, ctx=u16, seq=u64, gen=u32, gc=u16, first=u16, reserved=u16, block_size=st.integers(0, 8),
       blocks=st.lists(st.tuples(u32, u64, u32, st.binary(min_size=16, max_size=16)), min_size=0, max_size=4),
       data=st.data())
def test_mirror_write_twins_agree(lun, ctx, seq, gen, gc, first, reserved, block_size, blocks, data):
    payload = data.draw(st.binary(min_size=len(blocks) * block_size, max_size=len(blocks) * block_size))
    fields = dict(lun=lun, context_flags=ctx, seq=seq, generation=gen, group_count=gc, first_index=first,
                  count=len(blocks), reserved=reserved, block_size=block_size,
                  blocks=[dict(cache_id=c, lba=lba, data_crc=crc, dirty_bitmap=bm) for c, lba, crc, bm in blocks],
                  data=payload)
    built = M.MirrorWrite.build(fields)
    twin = (M.MIRROR_WRITE_HEAD.pack(lun, ctx, seq, gen, gc, first, len(blocks), reserved, block_size)
            + b"".join(M.MIRROR_BLOCK.pack(*b) for b in blocks) + payload)
    assert built == twin
    assert plain(M.MirrorWrite.parse(twin)) == fields


@settings(max_examples=200, deadline=None)
@given(seq=u64, status=u16, count=u16, reserved=u32)
def test_mirror_ack_twin_agrees(seq, status, count, reserved):
    fields = dict(seq=seq, status=status, count=count, reserved=reserved)
    packed = M.MIRROR_ACK.pack(seq, status, count, reserved)
    assert M.MirrorAck.build(fields) == packed
    assert plain(M.MirrorAck.parse(packed)) == fields


@settings(max_examples=200, deadline=None)
@given(op=u8, fua=u8, lun=u16, offset=u64, length=u32, data=st.binary(max_size=32), error=u32)
def test_io_twins_agree(op, fua, lun, offset, length, data, error):
    fields = dict(op=op, fua=fua, lun=lun, offset=offset, length=length, data=data)
    assert M.IoRequest.build(fields) == M.IO_REQUEST_HEAD.pack(op, fua, lun, offset, length) + data
    assert M.IoReply.build(dict(error=error, data=data)) == M.IO_REPLY_HEAD.pack(error) + data


@settings(max_examples=200, deadline=None)
@given(msg_type=st.integers(0, 255), payload=st.binary(max_size=200))
def test_parse_body_untrusted_raises_only_format_error(msg_type, payload):
    try:
        M.parse_body_untrusted(msg_type, payload, "test")
    except FormatError:
        pass


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(sorted(VECTORS)), data=st.data())
def test_mutated_vectors_raise_only_format_error(name, data):
    golden = bytearray(VECTORS[name][1])
    cut = data.draw(st.integers(0, len(golden)))
    flips = data.draw(st.lists(st.tuples(st.integers(0, max(len(golden) - 1, 0)), st.integers(1, 255)),
                               max_size=4))
    for pos, xor in flips:
        if pos < len(golden):
            golden[pos] ^= xor
    try:
        M.parse_body_untrusted(M.MsgType[name], bytes(golden[:cut]), "test")
    except FormatError:
        pass


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_trailing_bytes_refused(name):
    fields, golden = VECTORS[name]
    if name in ("IO_REQUEST", "IO_REPLY"):
        return       # their data runs to the end of the payload
    with pytest.raises(FormatError):
        M.parse_body_untrusted(M.MsgType[name], golden + b"\x00", "test")


def test_unknown_type_refused():
    with pytest.raises(FormatError, match="unknown message type 200"):
        M.parse_body_untrusted(200, b"", "link")


def test_length_prefix_beyond_payload_refused():
    # MIRROR_WRITE claiming 4 GiB blocks in an 8-byte data field: refused, nothing allocated.
    fields, golden = VECTORS["MIRROR_WRITE"]
    bad = golden[:24] + b"\xff\xff\xff\xff" + golden[28:]
    with pytest.raises(FormatError):
        M.parse_body_untrusted(M.MsgType.MIRROR_WRITE, bad, "test")
