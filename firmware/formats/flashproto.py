"""The board flashing protocol: frames between `twincache board flash` and the board agent.

On the serial line every frame is COBS-encoded and ends with a 0x00 byte, so
a receiver resynchronises at the next zero after any damage. A frame is

    magic (2) | version (1) | type (1) | seq (2) | length (2) | body | crc32c (4)

and the CRC32C covers everything before it. The host numbers its requests
with `seq`; a reply carries the seq of the request it answers, so a host
that restarted ignores replies meant for its predecessor. A NAK for a frame
the board could not read carries SEQ_UNKNOWN.

A flash is: HELLO (device info, current slot and build) -> BEGIN (size,
SHA-256; the reply says which block to start at, so a cut transfer resumes)
-> BLOCK i, each acked (a NAK names the block the board expects next) ->
VERIFY (hash, signature, target) -> ACTIVATE (switch slot, restart the
controller, health check, rollback). HELLO and its reply never change
layout: a newer protocol announces itself through protocol_version.
"""
import enum

import crc32c as _crc32c
from construct import (Bytes, Checksum, Const, GreedyBytes, Int8ub, Int16ub,
                       Int32ub, Int64ub, PaddedString, PascalString, RawCopy,
                       Struct, Terminated, this)
from construct.core import ConstructError

from . import FormatError

FLASH_MAGIC = 0x5446          # "TF"
PROTOCOL_VERSION = 1
HEADER_SIZE_BYTES = 8
CRC_SIZE_BYTES = 4
BLOCK_SIZE_MAX_BYTES = 4096
BLOCK_SIZE_DEFAULT_BYTES = 1024
BODY_MAX_BYTES = BLOCK_SIZE_MAX_BYTES + 8
FRAME_MAX_BYTES = HEADER_SIZE_BYTES + BODY_MAX_BYTES + CRC_SIZE_BYTES
SEQ_UNKNOWN = 0xFFFF
SLOT_NONE = 0xFF
SHA256_BYTES = 32


class MsgType(enum.IntEnum):
    HELLO = 1                 # frozen forever
    HELLO_REPLY = 2           # frozen forever
    BEGIN = 3
    BEGIN_REPLY = 4
    BLOCK = 5
    BLOCK_ACK = 6
    BLOCK_NAK = 7
    VERIFY = 8
    VERIFY_REPLY = 9
    ACTIVATE = 10
    ACTIVATE_REPLY = 11
    ERROR = 15                # a request the board cannot serve at all


class Status(enum.IntEnum):
    OK = 0
    BAD_SIGNATURE = 1
    WRONG_TARGET = 2
    BAD_BUNDLE = 3            # truncated, corrupt, not a bundle
    HASH_MISMATCH = 4         # the received bytes do not hash to BEGIN's SHA-256
    NO_TRANSFER = 5           # BLOCK/VERIFY/ACTIVATE without a BEGIN
    INCOMPLETE = 6            # VERIFY before every block arrived
    ROLLED_BACK = 7           # the new slot failed its health check
    BAD_REQUEST = 8
    TOO_LARGE = 9             # the bundle does not fit in a slot
    FAILED = 10


class Health(enum.IntEnum):
    UNKNOWN = 0
    HEALTHY = 1
    UNHEALTHY = 2
    ROLLED_BACK = 3
    NO_FIRMWARE = 4


class NakReason(enum.IntEnum):
    BAD_FRAME = 1             # CRC or COBS damage: the block is resent
    OUT_OF_ORDER = 2          # not the block expected next
    NO_TRANSFER = 3


FrameHeader = Struct(
    "magic" / Const(FLASH_MAGIC, Int16ub),
    "version" / Int8ub,                       # PROTOCOL_VERSION
    "type" / Int8ub,                          # MsgType
    "seq" / Int16ub,                          # request number, echoed by the reply
    "length" / Int16ub,                       # body bytes, <= BODY_MAX_BYTES
)
assert FrameHeader.sizeof() == HEADER_SIZE_BYTES

FlashFrame = Struct(
    "head" / RawCopy(Struct("header" / FrameHeader, "body" / Bytes(this.header.length))),
    "crc" / Checksum(Int32ub, lambda data: _crc32c.crc32c(data), this.head.data),
    Terminated,
)

Hello = Struct(                               # FROZEN
    "protocol_version" / Int8ub,
    "reserved" / Bytes(3),
)
HelloReply = Struct(                          # FROZEN
    "protocol_version" / Int8ub,
    "target_kind" / Int8ub,                   # bundle.TargetKind
    "active_slot" / Int8ub,                   # 0 = a, 1 = b, SLOT_NONE
    "health" / Int8ub,                        # Health of the active slot
    "block_size_max" / Int16ub,               # bytes
    "reserved" / Bytes(2),
    "device" / PaddedString(32, "utf8"),      # board name
    "active_sha256" / Bytes(SHA256_BYTES),    # SHA-256 of the active slot's bundle file, zeros if none
    "active_build_id" / PaddedString(32, "ascii"),
)
assert HelloReply.sizeof() == 104
Begin = Struct(
    "total_size" / Int64ub,                   # bundle bytes
    "sha256" / Bytes(SHA256_BYTES),           # of the whole bundle file
    "block_size" / Int16ub,                   # bytes per BLOCK, <= block_size_max
    "reserved" / Bytes(2),
)
BeginReply = Struct(
    "status" / Int8ub,                        # Status
    "reserved" / Bytes(3),
    "next_block" / Int32ub,                   # > 0: resume, blocks before it are already on the board
    "block_count" / Int32ub,
)
Block = Struct(
    "index" / Int32ub,
    "data" / GreedyBytes,                     # block_size bytes, the last block may be shorter
)
BlockAck = Struct("index" / Int32ub)
BlockNak = Struct(
    "expected" / Int32ub,                     # the block the board wants next
    "reason" / Int8ub,                        # NakReason
)
Empty = Struct()
Reply = Struct(                               # VERIFY_REPLY and ERROR
    "status" / Int8ub,
    "message" / PascalString(Int16ub, "utf8"),
)
ActivateReply = Struct(
    "status" / Int8ub,                        # OK or ROLLED_BACK or an error
    "slot" / Int8ub,                          # the slot running now
    "health" / Int8ub,                        # Health of that slot
    "reserved" / Int8ub,
    "message" / PascalString(Int16ub, "utf8"),
)

BODIES = {
    MsgType.HELLO: Hello, MsgType.HELLO_REPLY: HelloReply,
    MsgType.BEGIN: Begin, MsgType.BEGIN_REPLY: BeginReply,
    MsgType.BLOCK: Block, MsgType.BLOCK_ACK: BlockAck, MsgType.BLOCK_NAK: BlockNak,
    MsgType.VERIFY: Empty, MsgType.VERIFY_REPLY: Reply,
    MsgType.ACTIVATE: Empty, MsgType.ACTIVATE_REPLY: ActivateReply,
    MsgType.ERROR: Reply,
}


def build_frame(msg_type, seq: int, **fields) -> bytes:
    """The frame bytes (before COBS) of one message."""
    body = BODIES[msg_type].build(fields)
    assert len(body) <= BODY_MAX_BYTES and 0 <= seq <= 0xFFFF
    header = dict(version=PROTOCOL_VERSION, type=int(msg_type), seq=seq, length=len(body))
    return FlashFrame.build(dict(head=dict(value=dict(header=header, body=body))))


def parse_frame_untrusted(buf, where: str = ""):
    """Return (MsgType, seq, body container) for one frame; FormatError otherwise."""
    if len(buf) < HEADER_SIZE_BYTES + CRC_SIZE_BYTES:
        raise FormatError(f"short flash frame: {len(buf)} bytes", where)
    if len(buf) > FRAME_MAX_BYTES:
        raise FormatError(f"flash frame of {len(buf)} bytes exceeds {FRAME_MAX_BYTES}", where)
    try:
        frame = FlashFrame.parse(bytes(buf))
    except ConstructError as exc:
        kind = "CRC32C mismatch" if "checksum" in str(exc).lower() else "malformed flash frame"
        raise FormatError(kind, where) from None
    header = frame.head.value.header
    if header.version != PROTOCOL_VERSION:
        raise FormatError(f"unsupported flash protocol version {header.version}", where)
    try:
        msg_type = MsgType(header.type)
        body = BODIES[msg_type].parse(frame.head.value.body)
    except (ValueError, ConstructError):
        raise FormatError(f"bad body for message type {header.type}", where) from None
    return msg_type, header.seq, body
