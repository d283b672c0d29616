"""The reservation record: who owns a LUN, at which generation, and a lease.

One 512-byte sector at the start of each disk's reservation area (raw byte
4096; hal.backends.disk_array.DiskArray.reservation_area). Both controllers of an ha
pair see the same disks, so this is where ownership is decided when the link
cannot be trusted (see firmware/ha/fencing.py for the argument).

- `owner`: controller id (0 = a, 1 = b).
- `generation`: bumped on every change of owner and when an owner goes on
  alone without its partner's mirror ("solo"); a controller that finds a
  newer generation than its own stops serving writes for the LUN at once.
- `counter`: bumped by every lease renewal, so a reader can tell a live
  owner (the counter moves) from a dead or paused one (it does not).
- `lease_ms`: how long the owner promises to stop writing after its last
  renewal began; a taker waits longer than this, measured on its own
  monotonic clock from the last change it saw (durations only: no clock is
  compared across controllers, so clock offset does not matter).
- `state`: MIRRORED (the partner's mirror segment is valid for this LUN),
  SOLO (the owner went on alone: the partner's mirror copy is void), or
  CLAIMED (a takeover: the claimant is replaying its mirror of the old
  owner's lines, and renews while it does; the old owner holds its lines).
"""
import enum

from construct import Bytes, Checksum, Const, Int8ub, Int16ub, Int32ub, Int64ub, RawCopy, Struct, this
from construct.core import ConstructError

from . import FormatError
from .nvram import crc32c

RESERVATION_MAGIC = b"TCRSV\x00\x00\x01"
RESERVATION_VERSION = 1
RECORD_BYTES = 512
NO_OWNER = 0xFF


class LunState(enum.IntEnum):
    MIRRORED = 0
    SOLO = 1
    CLAIMED = 2


ReservationFields = Struct(
    "magic" / Const(RESERVATION_MAGIC),
    "version" / Int16ub,
    "lun" / Int16ub,
    "owner" / Int8ub,               # 0 = a, 1 = b, 0xFF = nobody
    "state" / Int8ub,               # LunState
    "reserved0" / Int16ub,
    "generation" / Int64ub,
    "counter" / Int64ub,            # bumped by every renewal
    "lease_ms" / Int32ub,           # the owner stops writing this long after a renewal began
    "reserved1" / Int32ub,
    "pair_id" / Bytes(16),
    "reserved" / Bytes(452),
)
Reservation = Struct(
    "fields" / RawCopy(ReservationFields),
    "crc" / Checksum(Int32ub, lambda data: crc32c(data), this.fields.data),
)
assert Reservation.sizeof() == RECORD_BYTES


class Record:
    __slots__ = ("lun", "owner", "state", "generation", "counter", "lease_ms", "pair_id")

    def __init__(self, lun, owner, state, generation, counter, lease_ms, pair_id):
        self.lun, self.owner, self.state = lun, owner, state
        self.generation, self.counter, self.lease_ms, self.pair_id = generation, counter, lease_ms, pair_id

    def key(self):
        return (self.owner, self.state, self.generation, self.counter)

    def __repr__(self):
        return (f"Record(lun={self.lun}, owner={self.owner}, state={self.state}, "
                f"generation={self.generation}, counter={self.counter})")


def build_record(rec: Record) -> bytes:
    return Reservation.build({"fields": {"value": dict(
        version=RESERVATION_VERSION, lun=rec.lun, owner=rec.owner, state=rec.state, reserved0=0,
        generation=rec.generation, counter=rec.counter, lease_ms=rec.lease_ms, reserved1=0,
        pair_id=rec.pair_id, reserved=bytes(452))}})


def parse_record_untrusted(buf, where: str = "") -> Record | None:
    """The record in `buf`; None for a blank (all-zero) sector; FormatError if corrupt."""
    if len(buf) < RECORD_BYTES:
        raise FormatError(f"reservation record is {len(buf)} bytes", where)
    if not any(buf[:RECORD_BYTES]):
        return None
    try:
        v = Reservation.parse(bytes(buf[:RECORD_BYTES])).fields.value
    except ConstructError as exc:
        raise FormatError(f"bad reservation record: {str(exc).splitlines()[0]}", where) from None
    if v.version != RESERVATION_VERSION or v.state not in (0, 1, 2) or v.owner not in (0, 1, NO_OWNER):
        raise FormatError("reservation record fields out of range", where)
    return Record(v.lun, v.owner, v.state, v.generation, v.counter, v.lease_ms, v.pair_id)
