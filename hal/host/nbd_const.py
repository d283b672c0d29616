"""NBD protocol numbers and fixed headers: every constant of the host port in one place.

Values from NetworkBlockDevice/nbd doc/proto.md. The engine (hal/host/nbd.py), its
option haggling (hal/host/nbd_options.py) and structured replies
(hal/host/nbd_structured.py) import them from here; hal/host/nbd.py re-exports them,
so `nbd.NBD_CMD_READ` keeps working for every caller.
"""
from __future__ import annotations

import struct


# Magic numbers.
NBD_MAGIC = 0x4E42444D41474943              # "NBDMAGIC"
NBD_IHAVEOPT = 0x49484156454F5054           # "IHAVEOPT"
NBD_REP_MAGIC = 0x0003E889045565A9
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698

# Handshake flags (server) and client flags.
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1
HANDSHAKE_FLAGS = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES
CLIENT_FLAGS_KNOWN = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES

# Transmission flags.
NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_ROTATIONAL = 1 << 4
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_SEND_DF = 1 << 7
NBD_FLAG_CAN_MULTI_CONN = 1 << 8
NBD_FLAG_SEND_RESIZE = 1 << 9
NBD_FLAG_SEND_CACHE = 1 << 10
NBD_FLAG_SEND_FAST_ZERO = 1 << 11

# Options.
NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_LIST = 3
NBD_OPT_STARTTLS = 5
NBD_OPT_INFO = 6
NBD_OPT_GO = 7
NBD_OPT_STRUCTURED_REPLY = 8
NBD_OPT_LIST_META_CONTEXT = 9            # (an old draft of the spec said 10: libnbd and qemu send 9)
NBD_OPT_SET_META_CONTEXT = 10
NBD_OPT_EXTENDED_HEADERS = 11

# Option reply types.
NBD_REP_ACK = 1
NBD_REP_SERVER = 2
NBD_REP_INFO = 3
NBD_REP_META_CONTEXT = 4
NBD_REP_FLAG_ERROR = 1 << 31
NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR + 1
NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR + 2
NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR + 3
NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR + 5
NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR + 6
NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR + 7
NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR + 9

# Metadata contexts: the one this server knows, and the id NBD_OPT_SET_META_CONTEXT gives it.
BASE_ALLOCATION = "base:allocation"
BASE_ALLOCATION_ID = 1

# Info types (NBD_OPT_INFO / NBD_OPT_GO).
NBD_INFO_EXPORT = 0
NBD_INFO_NAME = 1
NBD_INFO_DESCRIPTION = 2
NBD_INFO_BLOCK_SIZE = 3

# Commands.
NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_CACHE = 5
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_BLOCK_STATUS = 7

# Command flags.
NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1
NBD_CMD_FLAG_DF = 1 << 2
NBD_CMD_FLAG_REQ_ONE = 1 << 3
NBD_CMD_FLAG_FAST_ZERO = 1 << 4

# Error values (the spec's list; ENOTSUP for an operation the backend lacks).
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

# Bounds.
NBD_STRING_MAX_BYTES = 4096                 # the spec's hard limit on names and messages
OPTION_DATA_MAX_BYTES = 16 << 10            # largest option we read into memory
OPTION_DISCARD_MAX_BYTES = 1 << 20          # larger options are a denial of service: hang up
INTEROP_PAYLOAD_BYTES = 32 << 20            # the spec's interoperable maximum (2^25)
RECV_CHUNK_MIN_BYTES = 64 << 10             # recv_buffer() always offers at least this
INFLIGHT_MAX = 4096
TLS_MODES = ("off", "allow", "require")
OUTPUT_UNBOUNDED = 1 << 62                  # max_output_bytes when the caller never reports sends

_REQUEST = struct.Struct(">IHHQQI")         # magic, flags, type, cookie, offset, length
_SIMPLE_REPLY = struct.Struct(">IIQ")       # magic, error, cookie
_OPTION = struct.Struct(">QII")             # IHAVEOPT, option, length
_OPTION_REPLY = struct.Struct(">QIII")      # magic, option, reply type, length
_EXPORT_NAME_REPLY = struct.Struct(">QH")   # size, transmission flags (+124 zeroes)
_INFO_EXPORT = struct.Struct(">HQH")        # NBD_INFO_EXPORT, size, transmission flags
_INFO_BLOCK_SIZE = struct.Struct(">HIII")   # NBD_INFO_BLOCK_SIZE, minimum, preferred, maximum
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
REQUEST_SIZE_BYTES = _REQUEST.size
assert REQUEST_SIZE_BYTES == 28 and _SIMPLE_REPLY.size == 16 and _OPTION_REPLY.size == 20

GREETING = struct.pack(">QQH", NBD_MAGIC, NBD_IHAVEOPT, HANDSHAKE_FLAGS)
_ZEROES_124 = bytes(124)
_WRITE_OPS = frozenset((NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES))
_SPACE_OPS = frozenset((NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES))   # ENOSPC beyond the end
