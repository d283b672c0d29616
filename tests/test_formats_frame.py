"""The link frame: golden vectors, the struct twin, bad input, and both framers.

Link bytes are fed whole, one byte at a time and with random cuts; garbage
before, between and inside frames must never crash a framer or grow its
buffer past one maximal frame.
"""
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.formats import FormatError
from firmware.formats import frame as F
from hal.backends.framing import COBS_CHUNK_MAX_BYTES, FRAME_MAX_BYTES, CobsFramer, StreamFramer

# type 4, flags 1, lane 1, resource 1, seq 0x01020304, ack 0x05060708, tag 0x0a0b0c0d, "hello"
GOLDEN_HEADER = bytes.fromhex("5443" "01" "04" "01" "01" "0001" "01020304" "05060708"
                              "0a0b0c0d" "00000005" "00000000")
GOLDEN_FRAME = GOLDEN_HEADER + b"hello" + bytes.fromhex("4583d47a")
# an empty HEARTBEAT-typed frame: type 3, seq 1, everything else zero
GOLDEN_EMPTY_FRAME = bytes.fromhex("54430103000000000000000100000000000000000000000000000000"
                                   "4c997f09")
GOLDEN_FIELDS = dict(magic=0x5443, version=1, type=4, flags=1, lane=1, resource=1,
                     seq=0x01020304, ack=0x05060708, tag=0x0A0B0C0D, payload_len=5, reserved=0)


# The auth trailer: pair key 00..1f; the session's HELLO bodies (protocol 3, ha, generation 1,
# capabilities 3, pair id 00..0f, 4096 x 16 blocks) of controller 0 with nonce 01 x 32 and of
# controller 1 with nonce 02 x 32; the golden frame above sealed by controller 0 with auth_seq 5
# (flags 0x05: FLAG_AUTH | FLAG_RESPONSE).
AUTH_PAIR_KEY = bytes(range(32))
AUTH_HELLOS = tuple(bytes.fromhex(
    "0303" + cid + "00" "0000000000000001" "00000003" "0000000000000000" "000102030405060708090a0b0c0d0e0f"
    + nonce * 32 + "00001000" "00000010" + "00" * 16) for cid, nonce in (("00", "01"), ("01", "02")))
GOLDEN_KEY_0 = bytes.fromhex("44a47b204e26717e122f1d7b01c0b553efe3d188f9f0f2e4ea7a639e70a13ce9")
GOLDEN_KEY_1 = bytes.fromhex("140208a75339d45342c6b7185993f1a2917fcd6d2eade165a4a3eee6acac21d7")
GOLDEN_MAC = bytes.fromhex("ae65fc833b1ab0fad9d23308d509a326")
GOLDEN_TRAILER = bytes.fromhex("0000000000000005") + GOLDEN_MAC
GOLDEN_AUTH_FRAME = (bytes.fromhex("5443" "01" "04" "05" "01" "0001" "01020304" "05060708" "0a0b0c0d"
                                   "00000005" "00000000") + b"hello" + GOLDEN_TRAILER + bytes.fromhex("2219ba02"))


def plain(value):
    return {k: v for k, v in value.items() if not k.startswith("_")}


def test_crc32c_is_castagnoli():
    assert F.crc32c(b"123456789") == 0xE3069283     # the standard check value


def test_encode_frame_golden():
    assert b"".join(F.encode_frame(4, 1, 1, 1, 0x01020304, 0x05060708, 0x0A0B0C0D, b"hello")) == GOLDEN_FRAME
    assert b"".join(F.encode_frame(3, 0, 0, 0, 1, 0, 0)) == GOLDEN_EMPTY_FRAME


def test_header_construct_golden():
    assert F.FrameHeader.sizeof() == F.HEADER_SIZE_BYTES == 28
    assert plain(F.FrameHeader.parse(GOLDEN_HEADER)) == GOLDEN_FIELDS
    assert F.FrameHeader.build(GOLDEN_FIELDS) == GOLDEN_HEADER
    assert F.FrameHeader.compile().parse(GOLDEN_HEADER).tag == 0x0A0B0C0D


def test_header_struct_twin_golden():
    assert F.HEADER_STRUCT.unpack(GOLDEN_HEADER) == tuple(GOLDEN_FIELDS.values())
    assert F.pack_header(4, 1, 1, 1, 0x01020304, 0x05060708, 0x0A0B0C0D, 5) == GOLDEN_HEADER


def test_frame_construct_golden():
    parsed = F.Frame.parse(GOLDEN_FRAME)
    assert parsed.payload == b"hello" and parsed.crc == 0x4583D47A
    built = F.Frame.build(dict(header=dict(value=GOLDEN_FIELDS), payload=b"hello", auth=None))
    assert built == GOLDEN_FRAME


def test_parse_frame_untrusted_golden():
    head, payload = F.parse_frame_untrusted(GOLDEN_FRAME, "link")
    assert (head.type, head.flags, head.lane, head.resource) == (4, 1, 1, 1)
    assert (head.seq, head.ack, head.tag, head.payload_len) == (0x01020304, 0x05060708, 0x0A0B0C0D, 5)
    assert bytes(payload) == b"hello"


@pytest.mark.parametrize("offset, value, message", [
    (0, 0x00, "magic"), (2, 2, "version"), (5, 2, "lane"), (20, 0xFF, "exceeds"),
    (30, ord("j"), "CRC"), (33, 0, "CRC")])
def test_bad_frames_refused(offset, value, message):
    bad = bytearray(GOLDEN_FRAME)
    bad[offset] = value
    with pytest.raises(FormatError, match=message):
        F.parse_frame_untrusted(bytes(bad), "link")


def test_short_and_long_frames_refused():
    with pytest.raises(FormatError, match="short"):
        F.parse_frame_untrusted(GOLDEN_FRAME[:10])
    with pytest.raises(FormatError, match="header says"):
        F.parse_frame_untrusted(GOLDEN_FRAME + b"\0")
    with pytest.raises(FormatError, match="link: "):
        F.parse_header_untrusted(b"", "link")


def test_direction_keys_golden_and_by_the_documented_recipe():
    import hashlib
    from firmware.formats import messages as M
    assert M.Hello.parse(AUTH_HELLOS[1]).nonce == b"\x02" * 32 and M.Hello.parse(AUTH_HELLOS[0]).controller_id == 0
    assert F.derive_direction_key(AUTH_PAIR_KEY, *AUTH_HELLOS, 0) == GOLDEN_KEY_0
    assert F.derive_direction_key(AUTH_PAIR_KEY, *AUTH_HELLOS, 1) == GOLDEN_KEY_1
    recipe = hashlib.blake2b(b"twincache-frame-mac-v1" + AUTH_HELLOS[0] + AUTH_HELLOS[1] + b"\x00",
                             key=AUTH_PAIR_KEY, digest_size=32).digest()
    assert recipe == GOLDEN_KEY_0
    # Another session (another nonce), a HELLO field changed on the way: another key.
    for offset in (60, 5):                              # a nonce byte; a generation byte
        other = bytearray(AUTH_HELLOS[0])
        other[offset] ^= 1
        assert F.derive_direction_key(AUTH_PAIR_KEY, bytes(other), AUTH_HELLOS[1], 0) != GOLDEN_KEY_0


def test_auth_trailer_golden():
    assert F.AuthTrailer.sizeof() == F.AUTH_TRAILER_SIZE_BYTES == 24
    assert F.AuthTrailer.parse(GOLDEN_TRAILER).auth_seq == 5
    assert F.AuthTrailer.parse(GOLDEN_TRAILER).mac == GOLDEN_MAC
    assert F.AuthTrailer.build(dict(auth_seq=5, mac=GOLDEN_MAC)) == GOLDEN_TRAILER
    assert F.AuthTrailer.compile().parse(GOLDEN_TRAILER).auth_seq == 5
    assert F.AUTH_STRUCT.unpack(GOLDEN_TRAILER) == (5, GOLDEN_MAC)
    import hashlib          # the MAC by its documented recipe: BLAKE2b-128 over header | payload | auth_seq
    covered = GOLDEN_AUTH_FRAME[:F.HEADER_SIZE_BYTES + 5 + 8]
    assert hashlib.blake2b(covered, key=GOLDEN_KEY_0, digest_size=16).digest() == GOLDEN_MAC


def test_encode_authenticated_frame_golden():
    auth = (F.mac_hasher(GOLDEN_KEY_0), 5)
    built = b"".join(F.encode_frame(4, 1, 1, 1, 0x01020304, 0x05060708, 0x0A0B0C0D, b"hello", auth=auth))
    assert built == GOLDEN_AUTH_FRAME
    assert len(built) == F.HEADER_SIZE_BYTES + 5 + F.AUTH_TRAILER_SIZE_BYTES + F.TRAILER_SIZE_BYTES


def test_authenticated_frame_construct_and_parser_golden():
    parsed = F.Frame.parse(GOLDEN_AUTH_FRAME)
    assert parsed.payload == b"hello" and parsed.auth.value.auth_seq == 5 and parsed.auth.value.mac == GOLDEN_MAC
    fields = dict(GOLDEN_FIELDS, flags=F.FLAG_AUTH | F.FLAG_RESPONSE)
    built = F.Frame.build(dict(header=dict(value=fields), payload=b"hello",
                               auth=dict(value=dict(auth_seq=5, mac=GOLDEN_MAC))))
    assert built == GOLDEN_AUTH_FRAME
    head, payload = F.parse_frame_untrusted(GOLDEN_AUTH_FRAME, "link")
    assert head.flags == 5 and bytes(payload) == b"hello"
    auth_seq, mac, covered = F.parse_auth_untrusted(GOLDEN_AUTH_FRAME, head)
    assert (auth_seq, mac, bytes(covered)) == (5, GOLDEN_MAC, GOLDEN_AUTH_FRAME[:41])
    assert F.split_frames(GOLDEN_AUTH_FRAME + GOLDEN_FRAME) == [GOLDEN_AUTH_FRAME, GOLDEN_FRAME]


def test_the_crc_covers_the_auth_trailer():
    for offset in (33, 40, 41, 56):                  # auth_seq and MAC bytes
        bad = bytearray(GOLDEN_AUTH_FRAME)
        bad[offset] ^= 0x01
        with pytest.raises(FormatError, match="CRC"):
            F.parse_frame_untrusted(bytes(bad), "link")


@settings(max_examples=100, deadline=None)
@given(st.integers(0, (1 << 64) - 1), st.binary(min_size=16, max_size=16))
def test_auth_trailer_twin_agrees_with_construct(auth_seq, mac):
    packed = F.AUTH_STRUCT.pack(auth_seq, mac)
    assert F.AuthTrailer.build(dict(auth_seq=auth_seq, mac=mac)) == packed
    assert plain(F.AuthTrailer.parse(packed)) == dict(auth_seq=auth_seq, mac=mac)


u8, u16, u32 = (st.integers(0, (1 << b) - 1) for b in (8, 16, 32))


@settings(max_examples=200, deadline=None)
@given(type=u8, flags=u8, lane=u8, resource=u16, seq=u32, ack=u32, tag=u32, payload_len=u32, reserved=u32)
def test_header_twin_agrees_with_construct(type, flags, lane, resource, seq, ack, tag, payload_len, reserved):
    fields = dict(magic=F.FRAME_MAGIC, version=F.FRAME_VERSION, type=type, flags=flags, lane=lane,
                  resource=resource, seq=seq, ack=ack, tag=tag, payload_len=payload_len, reserved=reserved)
    packed = F.HEADER_STRUCT.pack(*fields.values())
    assert F.FrameHeader.build(fields) == packed
    assert plain(F.FrameHeader.parse(packed)) == fields


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=120))
def test_arbitrary_bytes_into_header_and_frame_parsers(data):
    for parse in (F.parse_header_untrusted, F.parse_frame_untrusted):
        try:
            parse(data, "fuzz")
        except FormatError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=40), st.integers(0, 60))
def test_mutated_golden_frame_into_parser(noise, position):
    data = GOLDEN_FRAME[:position] + noise + GOLDEN_FRAME[position:]
    try:
        F.parse_frame_untrusted(data, "fuzz")
    except FormatError:
        pass


# ---- framers ------------------------------------------------------------------

def make_frames(count: int, seed: int = 1) -> list:
    rng = random.Random(seed)
    hasher = F.mac_hasher(GOLDEN_KEY_0)       # every other frame sealed: the framers take both kinds
    return [b"".join(F.encode_frame(4, 0, 1, 1, i, 0, i, rng.randbytes(rng.randrange(0, 300)),
                                    auth=(hasher, i) if i % 2 else None))
            for i in range(count)]


def wire(framer, frames) -> bytes:
    return b"".join(b"".join(framer.encode([f])) for f in frames)


def feed_in_cuts(framer, data: bytes, cuts) -> list:
    out, start = [], 0
    for cut in sorted(cuts) + [len(data)]:
        out += framer.feed(data[start:cut])
        start = cut
    return out


@pytest.mark.parametrize("make", [StreamFramer, CobsFramer])
def test_framer_whole_and_byte_by_byte(make):
    frames = make_frames(20)
    data = wire(make(), frames)
    assert make().feed(data) == frames
    framer = make()
    assert [f for byte in data for f in framer.feed(bytes([byte]))] == frames
    assert framer.dropped_bytes == 0 and framer.buffered_bytes == 0


@pytest.mark.parametrize("make", [StreamFramer, CobsFramer])
def test_framer_returns_bytes(make):
    out = make().feed(wire(make(), make_frames(2)))
    assert all(type(f) is bytes for f in out)


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(0, 4000), max_size=30), kind=st.sampled_from([StreamFramer, CobsFramer]))
def test_framer_random_cuts(cuts, kind):
    frames = make_frames(10)
    data = wire(kind(), frames)
    assert feed_in_cuts(kind(), data, [c for c in cuts if c < len(data)]) == frames


@settings(max_examples=100, deadline=None)
@given(garbage=st.lists(st.binary(min_size=1, max_size=50), min_size=10, max_size=10),
       kind=st.sampled_from([StreamFramer, CobsFramer]))
def test_framer_garbage_between_frames_loses_nothing(garbage, kind):
    frames = make_frames(10)
    encoder = kind()
    data = b"".join(g + wire(encoder, [f]) for g, f in zip(garbage, frames))
    framer = kind()
    out = framer.feed(data)
    if kind is StreamFramer and out != frames:
        # Garbage that mimics a header waits for its payload; the frames after it stay
        # buffered (skipping is one byte at a time), none is lost or reordered.
        assert out == frames[:len(out)] and framer.buffered_bytes > 0
    else:
        assert out == frames


def test_stream_framer_skips_one_byte_after_a_bad_crc():
    frames = make_frames(3)
    bad = bytearray(frames[1])
    bad[-1] ^= 0xFF
    framer = StreamFramer()
    assert framer.feed(frames[0] + bytes(bad) + frames[2]) == [frames[0], frames[2]]
    assert framer.dropped_bytes == len(bad)


def test_stream_framer_fake_header_delays_but_does_not_lose_frames():
    frames = make_frames(3)
    fake = F.pack_header(4, 0, 1, 0, 0, 0, 0, 100)     # claims 100 bytes of payload, then a bad CRC
    framer = StreamFramer()
    assert framer.feed(fake + frames[0]) == []        # waiting for the fake frame's payload
    assert framer.feed(frames[1] + frames[2]) == frames
    assert framer.dropped_bytes == len(fake)


def test_stream_framer_finds_frame_hidden_behind_false_magic():
    frame = make_frames(1)[0]
    framer = StreamFramer()
    assert framer.feed(b"TC" + b"TCx" + b"T" + frame) == [frame]
    assert framer.dropped_bytes == 6


def test_cobs_framer_frame_cut_by_garbage_is_lost_the_next_survives():
    frames = make_frames(3)
    framer = CobsFramer()
    encoded = [framer.encode([f])[0] for f in frames]
    middle = encoded[1][:20] + b"\x13\x37garbage" + encoded[1][20:]
    assert CobsFramer().feed(encoded[0] + middle + encoded[2]) == [frames[0], frames[2]]


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=2000), cuts=st.lists(st.integers(0, 2000), max_size=10),
       kind=st.sampled_from([StreamFramer, CobsFramer]))
def test_framer_random_bytes_never_crash(data, cuts, kind):
    framer = kind()
    out = feed_in_cuts(framer, data, [c for c in cuts if c < len(data)])
    for frame in out:
        F.parse_frame_untrusted(frame)       # whatever came out is a valid frame
    assert framer.buffered_bytes <= len(data)


def test_stream_framer_memory_bound_under_garbage():
    framer = StreamFramer()
    rng = random.Random(7)
    for _ in range(200):
        framer.feed(rng.randbytes(64 * 1024).replace(b"TC", b"tc"))
        assert framer.buffered_bytes <= 1
    # A header that claims the largest payload holds at most one maximal frame.
    framer.feed(F.pack_header(4, 0, 1, 0, 0, 0, 0, F.PAYLOAD_MAX_BYTES))
    for _ in range(F.PAYLOAD_MAX_BYTES // (256 * 1024) + 2):
        framer.feed(bytes(256 * 1024))
        assert framer.buffered_bytes <= FRAME_MAX_BYTES + 256 * 1024


def test_cobs_framer_memory_bound_without_delimiters():
    framer = CobsFramer()
    chunk = b"\x01" * (256 * 1024)
    for _ in range(COBS_CHUNK_MAX_BYTES // len(chunk) + 3):
        assert framer.feed(chunk) == []
        assert framer.buffered_bytes <= COBS_CHUNK_MAX_BYTES
    frame = make_frames(1)[0]
    assert framer.feed(framer.encode([frame])[0]) == [frame]


def test_stream_framer_large_frame_in_small_chunks_is_linear():
    payload = bytes(range(256)) * 4096          # 1 MiB
    frame = b"".join(F.encode_frame(4, 0, 1, 1, 0, 0, 0, payload))
    framer = StreamFramer()
    out = []
    for start in range(0, len(frame), 1500):
        out += framer.feed(frame[start:start + 1500])
    assert out == [frame]


def test_cobs_framer_large_frame_in_small_chunks():
    payload = bytes(range(256)) * 4096          # 1 MiB, full of zero bytes to stuff
    frame = b"".join(F.encode_frame(4, 0, 1, 1, 0, 0, 0, payload))
    framer = CobsFramer()
    encoded = framer.encode([frame])[0]
    out = []
    for start in range(0, len(encoded), 1500):
        out += framer.feed(encoded[start:start + 1500])
    assert out == [frame] and framer.buffered_bytes == 0
