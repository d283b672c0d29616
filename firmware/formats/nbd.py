"""NBD structured replies and metadata contexts: the wire structures of the host port's extensions.

The NBD protocol (NetworkBlockDevice/nbd doc/proto.md) after NBD_OPT_STRUCTURED_REPLY:
the structured reply chunk header and the payloads of the chunk types this
server sends (OFFSET_DATA, BLOCK_STATUS, ERROR, NONE); the option data of
NBD_OPT_SET_META_CONTEXT / NBD_OPT_LIST_META_CONTEXT and the NBD_REP_META_CONTEXT
reply; the NBD_INFO_BLOCK_SIZE reply of NBD_OPT_INFO / NBD_OPT_GO. All big-endian,
as the spec says.

The declarations here are the one source of truth. The host port's data path
(hal/host/nbd_structured.py) packs the fixed-size ones with struct.Struct twins
(`*_STRUCT` below); tests check twin and declaration agree.
"""
import struct

from construct import (Const, GreedyRange, Int16ub, Int32ub, Int64ub, PascalString,
                       PrefixedArray, Struct, GreedyString)
from construct.core import ConstructError

from . import FormatError

STRUCTURED_REPLY_MAGIC = 0x668E33EF

# Structured reply flags and chunk types.
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1

# base:allocation status flags.
STATE_HOLE = 1 << 0          # not allocated in the backing store
STATE_ZERO = 1 << 1          # reads as zeroes

META_CONTEXT_NAME_MAX_BYTES = 4096     # a string in the spec's sense
META_QUERIES_MAX = 64                  # more queries in one option than any client sends

STRUCTURED_REPLY_HEAD = Struct(
    "magic" / Const(STRUCTURED_REPLY_MAGIC, Int32ub),
    "flags" / Int16ub,                  # REPLY_FLAG_DONE on the last chunk of a reply
    "type" / Int16ub,                   # REPLY_TYPE_*
    "cookie" / Int64ub,                 # the request's handle
    "length" / Int32ub,                 # payload bytes that follow
)
assert STRUCTURED_REPLY_HEAD.sizeof() == 20

OFFSET_DATA_HEAD = Struct(
    "offset" / Int64ub,                 # export offset of the data that follows (length - 8 bytes)
)
assert OFFSET_DATA_HEAD.sizeof() == 8

OFFSET_HOLE = Struct(
    "offset" / Int64ub,                 # export offset of the hole
    "hole_size" / Int32ub,              # bytes that read as zeroes, nonzero
)
assert OFFSET_HOLE.sizeof() == 12

ERROR_CHUNK = Struct(
    "error" / Int32ub,                  # an NBD error value, nonzero
    "message" / PascalString(Int16ub, "utf8"),    # for a human; may be empty
)

BLOCK_DESCRIPTOR = Struct(
    "length" / Int32ub,                 # bytes, nonzero
    "status" / Int32ub,                 # STATE_* for base:allocation
)
assert BLOCK_DESCRIPTOR.sizeof() == 8

BLOCK_STATUS = Struct(
    "context_id" / Int32ub,             # the id NBD_REP_META_CONTEXT gave the context
    "descriptors" / GreedyRange(BLOCK_DESCRIPTOR),    # consecutive from the request's offset
)

META_CONTEXT_REQUEST = Struct(          # the data of NBD_OPT_SET_META_CONTEXT and LIST_META_CONTEXT
    "export_name" / PascalString(Int32ub, "utf8"),
    "queries" / PrefixedArray(Int32ub, PascalString(Int32ub, "utf8")),
)

META_CONTEXT_REPLY = Struct(            # the data of NBD_REP_META_CONTEXT
    "context_id" / Int32ub,             # 0 in replies to LIST (the spec: reserved)
    "name" / GreedyString("utf8"),
)

INFO_BLOCK_SIZE = Struct(               # NBD_REP_INFO data for NBD_INFO_BLOCK_SIZE
    "info_type" / Const(3, Int16ub),
    "minimum_bytes" / Int32ub,          # offsets and lengths are multiples of this
    "preferred_bytes" / Int32ub,
    "maximum_bytes" / Int32ub,          # largest READ/WRITE payload accepted
)
assert INFO_BLOCK_SIZE.sizeof() == 14

# struct.Struct twins for the data path.
STRUCTURED_REPLY_HEAD_STRUCT = struct.Struct(">IHHQI")
OFFSET_DATA_CHUNK_HEAD_STRUCT = struct.Struct(">IHHQIQ")     # chunk header + OFFSET_DATA_HEAD
ERROR_CHUNK_STRUCT = struct.Struct(">IHHQIIH")               # chunk header + error + empty message
BLOCK_DESCRIPTOR_STRUCT = struct.Struct(">II")
INFO_BLOCK_SIZE_STRUCT = struct.Struct(">HIII")


def parse_meta_context_request_untrusted(data) -> tuple:
    """NBD_OPT_{SET,LIST}_META_CONTEXT data -> (export name, [query, ...]); FormatError if malformed."""
    try:
        raw = bytes(data)
        parsed = META_CONTEXT_REQUEST.parse(raw)
        used = META_CONTEXT_REQUEST.build(parsed)
    except (ConstructError, UnicodeDecodeError) as exc:
        raise FormatError(f"metadata context request: {exc}") from None
    if len(used) != len(raw):
        raise FormatError(f"metadata context request: {len(raw) - len(used)} bytes after the queries")
    names = [parsed.export_name, *parsed.queries]
    if any("\0" in s or len(s.encode()) > META_CONTEXT_NAME_MAX_BYTES for s in names):
        raise FormatError("metadata context request: a string holds NUL or is over 4096 bytes")
    if len(parsed.queries) > META_QUERIES_MAX:
        raise FormatError(f"metadata context request: {len(parsed.queries)} queries, at most "
                          f"{META_QUERIES_MAX}")
    return parsed.export_name, list(parsed.queries)
