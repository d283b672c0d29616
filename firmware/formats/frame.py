"""The link frame: header, payload, MAC trailer (after the handshake), CRC32C trailer.

Every message between the two controllers travels in one frame:

    header (28 bytes) | payload (payload_len bytes) | [auth (24 bytes)] | crc32c (4 bytes)

The auth trailer is there when the header's flags hold FLAG_AUTH: every frame
of a session after the HELLOs (firmware/link_auth.py). It is the sender's
per-direction frame counter and a 16-byte keyed BLAKE2b over the header, the
payload and that counter, keyed with the sender's direction key, which is
derived from the pair key and both HELLO bodies, nonces and all
(`derive_direction_key`): a HELLO altered on the way gives the two ends
different keys, and the first sealed frame (the AUTH) fails.
The CRC covers everything before it, trailer included. It stays beside the
MAC: the framers (hal/backends/framing.py) hold no key and find frames in a byte
stream by magic and CRC, so line noise is dropped there as it always was,
and a frame that reaches the MAC check with a good CRC and a bad MAC was
made that way on purpose, which is what the session counts and acts on.

The header carries the lane
(control or data: control frames have reserved credit and overtake bulk
data), a sequence number and a cumulative acknowledgement for the reliable
session, a tag that pairs a response with its request, and the named resource
(mailbox) a request is addressed to (claims 1.3, 1.6).

`Frame` is the one declaration. The data path packs and unpacks headers with
`HEADER_STRUCT`, a struct.Struct derived from it (construct costs ~14 us a
header here, struct ~0.1 us); tests/test_formats_frame.py checks that both
agree on random values.
"""
import hashlib
import struct

import crc32c as _crc32c
from construct import (Bytes, Checksum, Const, If, Int8ub, Int16ub, Int32ub, Int64ub,
                       RawCopy, Struct, this)

from . import FormatError

FRAME_MAGIC = 0x5443          # "TC"
FRAME_VERSION = 1
HEADER_SIZE_BYTES = 28
TRAILER_SIZE_BYTES = 4
PAYLOAD_MAX_BYTES = (4 << 20) + 4096  # a forwarded 4 MiB host I/O and its header; larger is refused

LANE_CONTROL = 0
LANE_DATA = 1

FLAG_NONE = 0
FLAG_RESPONSE = 0x01          # this frame answers the request with the same tag
FLAG_ACK_ONLY = 0x02          # carries no message, only `ack` (seq is not consumed)
FLAG_AUTH = 0x04              # an auth trailer (AuthTrailer) follows the payload

AUTH_TRAILER_SIZE_BYTES = 24
MAC_SIZE_BYTES = 16
DIRECTION_KEY_BYTES = 32
AUTH_LABEL = b"twincache-frame-mac-v1"

FrameHeader = Struct(
    "magic" / Const(FRAME_MAGIC, Int16ub),
    "version" / Int8ub,       # FRAME_VERSION; bodies grow by version
    "type" / Int8ub,          # messages.MsgType
    "flags" / Int8ub,         # FLAG_*
    "lane" / Int8ub,          # LANE_CONTROL or LANE_DATA
    "resource" / Int16ub,     # messages.Resource: the mailbox addressed
    "seq" / Int32ub,          # session sequence number of this frame
    "ack" / Int32ub,          # every frame with seq < ack was received
    "tag" / Int32ub,          # request/response correlation
    "payload_len" / Int32ub,  # bytes of payload that follow, <= PAYLOAD_MAX_BYTES
    "reserved" / Int32ub,     # zero; for growth
)
assert FrameHeader.sizeof() == HEADER_SIZE_BYTES


def crc32c(data, value: int = 0) -> int:
    return _crc32c.crc32c(data, value)


AuthTrailer = Struct(
    "auth_seq" / Int64ub,     # the sender's frame counter in this session and direction, from 0 up;
                              # a receiver takes only a counter above the last it took
    "mac" / Bytes(MAC_SIZE_BYTES),   # BLAKE2b-128 keyed with the sender's direction key, over
                                     # header | payload | auth_seq (the bytes before it)
)
assert AuthTrailer.sizeof() == AUTH_TRAILER_SIZE_BYTES


def _crc_input(ctx):
    return ctx.header.data + ctx.payload + (ctx.auth.data if ctx.auth is not None else b"")


Frame = Struct(
    "header" / RawCopy(FrameHeader),
    "payload" / Bytes(this.header.value.payload_len),
    "auth" / If(this.header.value.flags & FLAG_AUTH, RawCopy(AuthTrailer)),
    "crc" / Checksum(Int32ub, lambda data: crc32c(data), _crc_input),
)

# The hot-path twins of FrameHeader and AuthTrailer; test_formats_frame checks they agree.
HEADER_STRUCT = struct.Struct(">HBBBBHIIIII")
TRAILER_STRUCT = struct.Struct(">I")
AUTH_SEQ_STRUCT = struct.Struct(">Q")
AUTH_STRUCT = struct.Struct(">Q16s")
assert HEADER_STRUCT.size == HEADER_SIZE_BYTES
assert AUTH_STRUCT.size == AUTH_TRAILER_SIZE_BYTES


def derive_direction_key(pair_key: bytes, hello0: bytes, hello1: bytes, sender_id: int) -> bytes:
    """The key of the frames `sender_id` sends in one session: keyed BLAKE2b of the pair key over
    both HELLO bodies (controller 0's first; fixed-size, each with its sender's fresh nonce), so
    no two sessions or directions share a key and every HELLO field is authenticated."""
    assert 16 <= len(pair_key) <= 64 and sender_id in (0, 1)
    assert len(hello0) == len(hello1) > 0
    return hashlib.blake2b(AUTH_LABEL + hello0 + hello1 + bytes([sender_id]), key=pair_key,
                           digest_size=DIRECTION_KEY_BYTES).digest()


def mac_hasher(direction_key: bytes):
    """A keyed BLAKE2b-128 to copy() per frame: keying costs a compression, a copy does not."""
    return hashlib.blake2b(key=direction_key, digest_size=MAC_SIZE_BYTES)


def auth_trailer(hasher, parts, auth_seq: int) -> bytes:
    """The trailer of a frame whose header and payload are `parts` (FLAG_AUTH already set)."""
    h = hasher.copy()
    for part in parts:
        h.update(part)
    seq = AUTH_SEQ_STRUCT.pack(auth_seq)
    h.update(seq)
    return seq + h.digest()


def frame_size_bytes(head) -> int:
    """The whole frame's size as its header tells it."""
    auth = AUTH_TRAILER_SIZE_BYTES if head.flags & FLAG_AUTH else 0
    return HEADER_SIZE_BYTES + head.payload_len + auth + TRAILER_SIZE_BYTES


class FrameHead:
    """A parsed header: plain attributes, no construct container on the data path."""

    __slots__ = ("type", "flags", "lane", "resource", "seq", "ack", "tag", "payload_len")

    def __init__(self, type, flags, lane, resource, seq, ack, tag, payload_len):
        self.type = type
        self.flags = flags
        self.lane = lane
        self.resource = resource
        self.seq = seq
        self.ack = ack
        self.tag = tag
        self.payload_len = payload_len

    def __repr__(self):
        return (f"FrameHead(type={self.type}, flags={self.flags}, lane={self.lane}, "
                f"resource={self.resource}, seq={self.seq}, ack={self.ack}, "
                f"tag={self.tag}, payload_len={self.payload_len})")


def pack_header(type, flags, lane, resource, seq, ack, tag, payload_len) -> bytes:
    return HEADER_STRUCT.pack(FRAME_MAGIC, FRAME_VERSION, type, flags, lane,
                              resource, seq, ack, tag, payload_len, 0)


def encode_frame(type, flags, lane, resource, seq, ack, tag, payload=b"", auth=None) -> list:
    """Return the frame as a list of buffers for sendmsg (the payload is not copied).

    `auth` is (mac_hasher(direction key), auth_seq) for an authenticated frame."""
    if auth is not None:
        flags |= FLAG_AUTH
    header = pack_header(type, flags, lane, resource, seq, ack, tag, len(payload))
    buffers = [header, payload]
    if auth is not None:
        buffers.append(auth_trailer(auth[0], buffers, auth[1]))
    crc = 0
    for part in buffers:
        crc = crc32c(part, crc)
    return buffers + [TRAILER_STRUCT.pack(crc)]


def parse_header_untrusted(buf, where: str = "") -> FrameHead:
    """Parse and bound-check a header; the CRC is checked once the payload is in."""
    if len(buf) < HEADER_SIZE_BYTES:
        raise FormatError(f"short frame header: {len(buf)} bytes", where)
    (magic, version, type, flags, lane, resource, seq, ack, tag, payload_len,
     reserved) = HEADER_STRUCT.unpack_from(buf, 0)
    if magic != FRAME_MAGIC:
        raise FormatError(f"bad frame magic 0x{magic:04x}", where)
    if version != FRAME_VERSION:
        raise FormatError(f"unsupported frame version {version}", where)
    if lane > LANE_DATA:
        raise FormatError(f"bad lane {lane}", where)
    if payload_len > PAYLOAD_MAX_BYTES:
        raise FormatError(f"payload of {payload_len} bytes exceeds {PAYLOAD_MAX_BYTES}", where)
    return FrameHead(type, flags, lane, resource, seq, ack, tag, payload_len)


def parse_frame_untrusted(buf, where: str = ""):
    """Parse one whole frame from `buf`; return (FrameHead, payload memoryview).

    Checks the CRC only: the auth trailer, if any, is the session's to check
    (firmware/link_auth.py), with `parse_auth_untrusted`."""
    head = parse_header_untrusted(buf, where)
    end = frame_size_bytes(head) - TRAILER_SIZE_BYTES
    if len(buf) != end + TRAILER_SIZE_BYTES:
        raise FormatError(f"frame is {len(buf)} bytes, header says {end + TRAILER_SIZE_BYTES}", where)
    view = memoryview(buf)
    (crc,) = TRAILER_STRUCT.unpack_from(buf, end)
    if crc32c(view[:end]) != crc:
        raise FormatError("frame CRC32C mismatch", where)
    payload_end = HEADER_SIZE_BYTES + head.payload_len
    return head, view[HEADER_SIZE_BYTES:payload_end]


def parse_auth_untrusted(buf, head):
    """(auth_seq, mac, covered) of a frame parse_frame_untrusted took with FLAG_AUTH set:
    `covered` is the memoryview the MAC is over (header | payload | auth_seq)."""
    at = HEADER_SIZE_BYTES + head.payload_len
    auth_seq, mac = AUTH_STRUCT.unpack_from(buf, at)
    return auth_seq, mac, memoryview(buf)[:at + AUTH_SEQ_STRUCT.size]


def split_frames(data) -> list:
    """Cut trusted bytes holding whole frames back to back (as the firmware emits them) into frames."""
    frames, pos = [], 0
    while pos < len(data):
        head = parse_header_untrusted(data[pos:pos + HEADER_SIZE_BYTES])
        end = pos + frame_size_bytes(head)
        frames.append(data[pos:end])
        pos = end
    return frames
