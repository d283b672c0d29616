"""Message bodies carried in link frames, and the ids that name them.

Like DRBD's drbd_protocol.h: every message type, named resource and body is
declared here, in one place. Bodies are versioned by the frame version; each
body keeps reserved bytes so it can grow without a new version. HELLO is the
feature negotiation and is frozen forever: its layout never changes, new
abilities are announced through its capability and feature bits.

Hot-path bodies (MIRROR_WRITE, MIRROR_ACK, IO_REQUEST, IO_REPLY) have a
struct.Struct twin for the data path; tests check both agree.
"""
import enum
import struct

from construct import (Array, Bytes, GreedyBytes, GreedyRange, Int8ub, Int16ub,
                       Int32ub, Int64ub, PascalString, Prefixed,
                       PrefixedArray, Struct, this)
from construct.core import ConstructError

from . import FormatError


class MsgType(enum.IntEnum):
    HELLO = 1                # frozen forever
    AUTH = 2                 # HMAC-SHA256 challenge response
    HEARTBEAT = 3
    MIRROR_WRITE = 4         # claims 1.10/1.11: atomic mirrored write with context, 1..n blocks
    MIRROR_ACK = 5
    METADATA = 6             # claims 5.1: cache metadata of a mirror line
    FLUSH_BEGIN = 7          # claims 5.12: mirror copy temporarily invalid
    FLUSH_DONE = 8           # claims 5.13/5.14: mirror copy clean, block reusable
    OWNERSHIP_REQUEST = 9    # claims 5.7
    OWNERSHIP_GRANT = 10     # claims 5.8
    OWNERSHIP_RELEASE = 11
    DESTAGED_RANGE = 12      # claims 3: ranges the secondary has destaged
    RESYNC_REQUEST = 13
    RESYNC_DATA = 14
    LOG_SHIP = 15            # claims 4: NVRAM log entries with sequence numbers
    CONSISTENCY_POINT = 16
    ERROR = 17
    IO_REQUEST = 18          # host I/O forwarded from the non-owner to the owner
    IO_REPLY = 19
    SYNC_BEGIN = 20          # mirror resynchronisation after a link comes up
    SYNC_DONE = 21
    PING = 22                # control round trip (admin, tests)
    PONG = 23
    REPLICATE = 24           # replica mode: one host write (or resync range) copied to the secondary
    REPLICATE_ACK = 25       # the secondary holds it at the acknowledgement level
    REPLICA_STATE = 26       # role, generation identifiers and record sizes, after link-up
    RESYNC_DONE = 27         # the sync source sent every range: the target adopts its generation


class Resource(enum.IntEnum):
    """Named resources (mailboxes) that command-response traffic is addressed to (claims 1.3)."""
    SESSION = 0
    MIRROR = 1
    CACHE_META = 2
    OWNERSHIP = 3
    HOST_IO = 4
    REPLICATION = 5
    ADMIN = 6


class ErrorCode(enum.IntEnum):
    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    ESTALE = 116             # stale generation: the sender is fenced
    EPROTO = 71


class IoOp(enum.IntEnum):
    READ = 0
    WRITE = 1
    FLUSH = 2
    TRIM = 3
    WRITE_ZEROES = 4
    BLOCK_STATUS = 5         # allocation of a range; the reply's data is BlockRuns (an older owner: EINVAL)


CAP_MIRROR = 1 << 0
CAP_OWNERSHIP = 1 << 1
CAP_REPLICA = 1 << 2
CAP_LOG_SHIP = 1 << 3
CAP_FORWARD_IO = 1 << 4

# Context flags of a mirror write.
CTX_FIRST = 0x01             # first block of its host write
CTX_LAST = 0x02              # last block: the group may be committed
CTX_RESYNC = 0x04            # resent during mirror resynchronisation
CTX_FUA = 0x08               # the host asked for FUA

NONCE_BYTES = 32
HMAC_BYTES = 32
PAIR_ID_BYTES = 16
BITMAP_BYTES = 16            # dirty bitmap: up to 128 sectors a cache line

Hello = Struct(                             # FROZEN: never change this layout
    "protocol_min" / Int8ub,
    "protocol_max" / Int8ub,
    "controller_id" / Int8ub,               # 0 = a, 1 = b
    "mode" / Int8ub,                        # 0 = ha, 1 = replica
    "generation" / Int64ub,
    "capabilities" / Int32ub,               # CAP_*
    "features" / Int64ub,                   # feature bits, for growth
    "pair_id" / Bytes(PAIR_ID_BYTES),       # both ends must belong to one pair
    "nonce" / Bytes(NONCE_BYTES),           # challenge for the peer's AUTH
    "block_size_bytes" / Int32ub,
    "primary_blocks" / Int32ub,
    "reserved" / Bytes(16),
)
assert Hello.sizeof() == 96

Auth = Struct(
    "hmac" / Bytes(HMAC_BYTES),             # HMAC-SHA256(key, AUTH_LABEL|peer nonce|own nonce|own id)
)

Heartbeat = Struct(
    "generation" / Int64ub,
    "sent_ms" / Int64ub,                    # sender's monotonic clock, for RTT only
    "state" / Int8ub,
    "reserved" / Bytes(7),
)

HEARTBEAT_STRUCT = struct.Struct(">QQB7s")   # the hot-path twin of Heartbeat

MirrorBlock = Struct(                       # one cache block of a mirror write
    "cache_id" / Int32ub,                   # block index: same in owner's primary and partner's mirror
    "lba" / Int64ub,                        # first sector (512 B) of the cache line
    "data_crc" / Int32ub,                   # CRC32C of the block data
    "dirty_bitmap" / Bytes(BITMAP_BYTES),   # one bit per 512 B sector of the line
)
MirrorWrite = Struct(                       # blocks [first_index, first_index + count) of one host write
    "lun" / Int16ub,
    "context_flags" / Int16ub,              # CTX_*
    "seq" / Int64ub,                        # write sequence: one per host write (the group)
    "generation" / Int32ub,
    "group_count" / Int16ub,                # blocks in the whole host write
    "first_index" / Int16ub,                # group index of this message's first block
    "count" / Int16ub,                      # blocks in this message, >= 1
    "reserved" / Int16ub,
    "block_size" / Int32ub,                 # bytes of data per block
    "blocks" / Array(this.count, MirrorBlock),
    "data" / Bytes(this.count * this.block_size),   # the blocks' data, back to back
)
# The hot-path twins of MirrorWrite's head and of one MirrorBlock.
MIRROR_WRITE_HEAD = struct.Struct(">HHQIHHHHI")
MIRROR_BLOCK = struct.Struct(">IQI16s")
assert MIRROR_WRITE_HEAD.size == 28 and MIRROR_BLOCK.size == 32

MirrorAck = Struct(                         # cumulative: one ack may answer many writes
    "seq" / Int64ub,                        # every write up to this sequence (sent this session) is persisted
    "status" / Int16ub,                     # ErrorCode
    "count" / Int16ub,                      # writes this ack answers (since the previous ack)
    "reserved" / Int32ub,
)
MIRROR_ACK = struct.Struct(">QHHI")

Metadata = Struct(
    "cache_id" / Int32ub,
    "state" / Int8ub,                       # nvram.BlockState
    "reserved0" / Int8ub,
    "lun" / Int16ub,
    "lba" / Int64ub,
    "seq" / Int64ub,
    "dirty_bitmap" / Bytes(BITMAP_BYTES),
)

BlockRef = Struct(
    "cache_id" / Int32ub,
    "seq" / Int64ub,
)
FlushBegin = Struct("blocks" / PrefixedArray(Int16ub, BlockRef))
FlushDone = Struct("blocks" / PrefixedArray(Int16ub, BlockRef))
BLOCK_REFS_MAX = 4096
_COUNT = struct.Struct(">H")


def pack_block_refs(refs) -> bytes:
    """The hot-path twin of FlushBegin/FlushDone.build (tests check they agree)."""
    assert len(refs) <= BLOCK_REFS_MAX
    flat = [v for ref in refs for v in ref]
    return _COUNT.pack(len(refs)) + struct.pack(f">{'IQ' * len(refs)}", *flat)


def parse_block_refs_untrusted(payload, where: str = "") -> list:
    """[(cache_id, seq), ...] from a FLUSH_BEGIN/FLUSH_DONE body; FormatError if malformed."""
    if len(payload) < 2:
        raise FormatError("block reference list shorter than its count", where)
    (count,) = _COUNT.unpack_from(payload, 0)
    if len(payload) != 2 + 12 * count:
        raise FormatError(f"block reference list of {count} entries is {len(payload)} bytes", where)
    values = struct.unpack_from(f">{'IQ' * count}", payload, 2)
    return list(zip(values[0::2], values[1::2]))

Ownership = Struct(                         # request, grant and release share one body
    "lun" / Int16ub,
    "scope" / Int8ub,                       # 0 = whole LUN, 1 = one cache line
    "reserved0" / Int8ub,
    "lba" / Int64ub,                        # the line, when scope is 1
    "generation" / Int64ub,
    "reserved" / Bytes(8),
)

Range = Struct(
    "lba" / Int64ub,
    "sectors" / Int32ub,
)
DestagedRange = Struct(
    "lun" / Int16ub,
    "ranges" / PrefixedArray(Int16ub, Range),
)

ResyncRequest = Struct(
    "lun" / Int16ub,
    "reserved0" / Int16ub,
    "generation" / Int64ub,
    "ranges" / PrefixedArray(Int16ub, Range),
)
ResyncData = Struct(
    "lun" / Int16ub,
    "reserved0" / Int16ub,
    "lba" / Int64ub,
    "data" / Prefixed(Int32ub, GreedyBytes),
)

LogEntry = Struct(
    "seq" / Int64ub,
    "lun" / Int16ub,
    "flags" / Int16ub,
    "lba" / Int64ub,
    "data_crc" / Int32ub,
    "data" / Prefixed(Int32ub, GreedyBytes),
)
LogShip = Struct(
    "source_id" / Int16ub,
    "partition" / Int16ub,
    "entries" / PrefixedArray(Int16ub, LogEntry),
)
ConsistencyPoint = Struct(
    "source_id" / Int16ub,
    "partition" / Int16ub,
    "first_seq" / Int64ub,
    "last_seq" / Int64ub,
)
LogAck = Struct(                            # LOG_SHIP / CONSISTENCY_POINT with FLAG_RESPONSE
    "source_id" / Int16ub,
    "status" / Int16ub,                     # ErrorCode
    "reserved0" / Int32ub,
    "stored_seq" / Int64ub,                 # every entry up to here is in the destination's NVRAM
    "filed_seq" / Int64ub,                  # ... and in the source's file on its disks
    "applied_seq" / Int64ub,                # ... and applied to the image volume (last consistency point)
)
LOG_ACK = struct.Struct(">HHIQQQ")
LOG_ENTRY_HEAD = struct.Struct(">QHHQI I")   # LogEntry before its data: seq lun flags lba data_crc length
LOG_SHIP_HEAD = struct.Struct(">HHH")        # LogShip before its entries: source_id partition count
CONSISTENCY_POINT = struct.Struct(">HHQQ")

Error = Struct(
    "code" / Int16ub,                       # ErrorCode
    "ref_type" / Int8ub,                    # the MsgType this answers, 0 if none
    "reserved0" / Int8ub,
    "message" / PascalString(Int16ub, "utf8"),
)

IoRequest = Struct(
    "op" / Int8ub,                          # IoOp
    "fua" / Int8ub,
    "lun" / Int16ub,
    "offset" / Int64ub,                     # bytes
    "length" / Int32ub,                     # bytes; for WRITE_ZEROES and TRIM the range, sent without data
    "data" / GreedyBytes,                   # WRITE only
)
IO_REQUEST_HEAD = struct.Struct(">BBHQI")

IoReply = Struct(
    "error" / Int32ub,                      # NBD error number, 0 = success
    "data" / GreedyBytes,                   # READ: the data; BLOCK_STATUS: BlockRuns
)
IO_REPLY_HEAD = struct.Struct(">I")

BLOCK_RUNS_MAX = 1024                       # runs one BLOCK_STATUS reply carries at most
BlockRuns = GreedyRange(Struct(             # the data of a BLOCK_STATUS reply: consecutive from its offset
    "length" / Int32ub,                     # bytes, nonzero
    "status" / Int32ub,                     # NBD base:allocation flags (1 hole, 2 zero)
))


def pack_block_runs(runs) -> bytes:
    """[(length, status), ...] -> BlockRuns bytes, at most BLOCK_RUNS_MAX runs (a prefix)."""
    runs = runs[:BLOCK_RUNS_MAX]
    return struct.pack(f">{2 * len(runs)}I", *[v for run in runs for v in run])


def parse_block_runs_untrusted(data, length: int) -> list:
    """BlockRuns bytes -> [(length, status)]; FormatError unless they fit in `length` bytes."""
    data = bytes(data)
    if not data or len(data) % 8 or len(data) > 8 * BLOCK_RUNS_MAX:
        raise FormatError(f"block runs of {len(data)} bytes")
    values = struct.unpack(f">{len(data) // 4}I", data)
    runs = list(zip(values[0::2], values[1::2]))
    if not all(n for n, _ in runs) or sum(n for n, _ in runs) > length:
        raise FormatError(f"block runs {runs[:4]}... do not fit a range of {length} bytes")
    return runs

Sync = Struct(                              # SYNC_BEGIN and SYNC_DONE
    "generation" / Int64ub,
    "blocks" / Int32ub,                     # mirror blocks sent in this resync
    "reserved" / Int32ub,
)

# -- replica mode (variant 1, firmware/replica/controller.py) ------------------------------

REPL_FUA = 0x01              # the host asked for FUA
REPL_RESYNC = 0x02           # resync data (a recorded range), not a host write

Replicate = Struct(
    "seq" / Int64ub,                        # primary's write sequence, or the resync range number
    "lun" / Int16ub,
    "flags" / Int16ub,                      # REPL_*
    "reserved0" / Int32ub,
    "offset" / Int64ub,                     # bytes into the LUN
    "data_crc" / Int32ub,                   # CRC32C of the data (checked before it enters the cache)
    "length" / Int32ub,                     # bytes of data that follow
    "data" / Bytes(this.length),
)
REPLICATE_HEAD = struct.Struct(">QHHIQII")
assert REPLICATE_HEAD.size == 32

ACK_CACHE, ACK_NVRAM, ACK_DISK = 0, 1, 2     # DRBD's protocols A/B/C, roughly: where the copy is
ACK_LEVELS = ("cache", "nvram", "disk")

ReplicateAck = Struct(
    "seq" / Int64ub,                        # the REPLICATE acknowledged (its seq, and its flags below)
    "status" / Int16ub,                     # ErrorCode
    "level" / Int8ub,                       # ACK_*: where the secondary holds the data
    "flags" / Int8ub,                       # REPL_RESYNC if it answers resync data
    "reserved" / Int32ub,
)
REPLICATE_ACK = struct.Struct(">QHBBI")
assert REPLICATE_ACK.size == 16

ROLE_SECONDARY, ROLE_PRIMARY = 0, 1
STATE_FRESH = 0x01           # NVRAM formatted since the pair last met: knows nothing of the data
STATE_INCONSISTENT = 0x02    # a sync target that has not finished: its disks are a mix
STATE_DISCARD = 0x04         # the operator chose this side's data to be discarded (split brain)

ReplicaState = Struct(
    "role" / Int8ub,                        # ROLE_*
    "flags" / Int8ub,                       # STATE_*
    "ack_level" / Int8ub,                   # ACK_*: what this side asks of its secondary
    "reserved0" / Int8ub,
    "range_bytes" / Int32ub,                # bytes of LUN per record bit; both ends must agree
    "generation" / Int64ub,                 # role-change counter: larger = became primary later
    "current_uuid" / Int64ub,               # DRBD-style generation identifiers
    "bitmap_uuid" / Int64ub,                # current uuid when this side started recording alone, 0 if not
    "history0" / Int64ub,
    "history1" / Int64ub,
    "sent_bits" / Int64ub,                  # set bits: ranges copied to the peer, not destaged there
    "received_bits" / Int64ub,              # set bits: ranges the peer copied here, not destaged there
    "reserved" / Bytes(8),
)
assert ReplicaState.sizeof() == 72

ResyncDone = Struct(
    "current_uuid" / Int64ub,               # the target adopts it: the sides are in sync
    "ranges" / Int64ub,                     # ranges sent in this resync
    "bytes" / Int64ub,                      # bytes sent
    "reserved" / Int64ub,
)
RESYNC_END_LUN = 0xFFFF      # a RESYNC_REQUEST with this LUN ends the target's list of ranges

Ping = Struct("sent_ns" / Int64ub)
PING_STRUCT = struct.Struct(">Q")

BODIES = {
    MsgType.HELLO: Hello,
    MsgType.AUTH: Auth,
    MsgType.HEARTBEAT: Heartbeat,
    MsgType.MIRROR_WRITE: MirrorWrite,
    MsgType.MIRROR_ACK: MirrorAck,
    MsgType.METADATA: Metadata,
    MsgType.FLUSH_BEGIN: FlushBegin,
    MsgType.FLUSH_DONE: FlushDone,
    MsgType.OWNERSHIP_REQUEST: Ownership,
    MsgType.OWNERSHIP_GRANT: Ownership,
    MsgType.OWNERSHIP_RELEASE: Ownership,
    MsgType.DESTAGED_RANGE: DestagedRange,
    MsgType.RESYNC_REQUEST: ResyncRequest,
    MsgType.RESYNC_DATA: ResyncData,
    MsgType.LOG_SHIP: LogShip,
    MsgType.CONSISTENCY_POINT: ConsistencyPoint,
    MsgType.ERROR: Error,
    MsgType.IO_REQUEST: IoRequest,
    MsgType.IO_REPLY: IoReply,
    MsgType.SYNC_BEGIN: Sync,
    MsgType.SYNC_DONE: Sync,
    MsgType.PING: Ping,
    MsgType.PONG: Ping,
    MsgType.REPLICATE: Replicate,
    MsgType.REPLICATE_ACK: ReplicateAck,
    MsgType.REPLICA_STATE: ReplicaState,
    MsgType.RESYNC_DONE: ResyncDone,
}


def build_body(msg_type: int, **fields) -> bytes:
    return BODIES[MsgType(msg_type)].build(fields)


def parse_body_untrusted(msg_type: int, payload, where: str = ""):
    """Parse a message body from the peer; raise FormatError on anything malformed."""
    try:
        body = BODIES[MsgType(msg_type)]
    except ValueError:
        raise FormatError(f"unknown message type {msg_type}", where) from None
    try:
        value = body.parse(bytes(payload))
    except (ConstructError, UnicodeDecodeError, OverflowError) as exc:
        raise FormatError(f"malformed {MsgType(msg_type).name}: {exc}", where) from None
    if len(body.build(value)) != len(payload):
        raise FormatError(f"trailing bytes after {MsgType(msg_type).name}", where)
    return value
