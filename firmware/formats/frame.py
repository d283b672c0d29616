"""The link frame: header, payload, CRC32C trailer.

Every message between the two controllers travels in one frame:

    header (28 bytes) | payload (payload_len bytes) | crc32c (4 bytes)

The CRC covers the header and the payload. The header carries the lane
(control or data: control frames have reserved credit and overtake bulk
data), a sequence number and a cumulative acknowledgement for the reliable
session, a tag that pairs a response with its request, and the named resource
(mailbox) a request is addressed to (claims 1.3, 1.6).

`Frame` is the one declaration. The data path packs and unpacks headers with
`HEADER_STRUCT`, a struct.Struct derived from it (construct costs ~14 us a
header here, struct ~0.1 us); tests/test_formats_frame.py checks that both
agree on random values.
"""
import struct

import crc32c as _crc32c
from construct import (Bytes, Checksum, Const, Int8ub, Int16ub, Int32ub,
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


Frame = Struct(
    "header" / RawCopy(FrameHeader),
    "payload" / Bytes(this.header.value.payload_len),
    "crc" / Checksum(Int32ub, lambda data: crc32c(data),
                     lambda ctx: ctx.header.data + ctx.payload),
)

# The hot-path twin of FrameHeader; test_formats_frame checks they agree.
HEADER_STRUCT = struct.Struct(">HBBBBHIIIII")
TRAILER_STRUCT = struct.Struct(">I")
assert HEADER_STRUCT.size == HEADER_SIZE_BYTES


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


def encode_frame(type, flags, lane, resource, seq, ack, tag, payload=b"") -> list:
    """Return the frame as a list of buffers for sendmsg (the payload is not copied)."""
    header = pack_header(type, flags, lane, resource, seq, ack, tag, len(payload))
    crc = crc32c(payload, crc32c(header))
    return [header, payload, TRAILER_STRUCT.pack(crc)]


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
    """Parse one whole frame from `buf`; return (FrameHead, payload memoryview)."""
    head = parse_header_untrusted(buf, where)
    end = HEADER_SIZE_BYTES + head.payload_len
    if len(buf) != end + TRAILER_SIZE_BYTES:
        raise FormatError(f"frame is {len(buf)} bytes, header says {end + TRAILER_SIZE_BYTES}", where)
    view = memoryview(buf)
    (crc,) = TRAILER_STRUCT.unpack_from(buf, end)
    if crc32c(view[:end]) != crc:
        raise FormatError("frame CRC32C mismatch", where)
    return head, view[HEADER_SIZE_BYTES:end]


def split_frames(data) -> list:
    """Cut trusted bytes holding whole frames back to back (as the firmware emits them) into frames."""
    frames, pos = [], 0
    while pos < len(data):
        head = parse_header_untrusted(data[pos:pos + HEADER_SIZE_BYTES])
        end = pos + HEADER_SIZE_BYTES + head.payload_len + TRAILER_SIZE_BYTES
        frames.append(data[pos:end])
        pos = end
    return frames
