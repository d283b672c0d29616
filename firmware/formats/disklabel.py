"""The disk label: byte 0 of every disk of the array, so the wrong disk is refused.

    0        label (512 B, in a 4 KiB slot)
    4 KiB    reservation / fencing area (another issue defines its records)
    1 MiB    LUN data (data_size_bytes)

The label names the pair the disk belongs to and its index in the array,
which is its LUN. A disk whose label has another pair_id, another index, a
bad checksum or no label at all is refused by name: writing a LUN onto the
wrong disk would destroy someone else's data.
"""
import crc32c as _crc32c
from construct import Bytes, Checksum, Const, Int16ub, Int32ub, Int64ub, RawCopy, Struct, this
from construct.core import ChecksumError, ConstructError

from . import FormatError

LABEL_MAGIC = b"TCDISKLB"
LABEL_VERSION = 1
LABEL_SIZE_BYTES = 512
LABEL_SLOT_BYTES = 4096
SERIAL_BYTES = 32
PAIR_ID_BYTES = 16
RESERVATION_OFFSET_BYTES = LABEL_SLOT_BYTES
DATA_OFFSET_BYTES = 1 << 20                    # the first MiB is metadata
RESERVATION_SIZE_BYTES = DATA_OFFSET_BYTES - RESERVATION_OFFSET_BYTES
SECTOR_SIZE_BYTES = 512


def crc32c(data, value: int = 0) -> int:
    return _crc32c.crc32c(data, value)


DiskLabelFields = Struct(
    "magic" / Const(LABEL_MAGIC),
    "version" / Int16ub,                # LABEL_VERSION
    "disk_index" / Int16ub,             # position in the array = the LUN it holds
    "flags" / Int32ub,                  # zero; for growth
    "pair_id" / Bytes(PAIR_ID_BYTES),   # the pair this disk belongs to
    "serial" / Bytes(SERIAL_BYTES),     # the device serial when labelled, NUL-padded ASCII
    "data_offset_bytes" / Int64ub,      # where LUN data starts (DATA_OFFSET_BYTES)
    "data_size_bytes" / Int64ub,        # bytes of LUN data (the LUN size)
    "created_generation" / Int64ub,     # the pair's generation when the disk was labelled
    "reserved" / Bytes(420),            # zero; for growth
)
DiskLabel = Struct(
    "fields" / RawCopy(DiskLabelFields),
    "checksum" / Checksum(Int32ub, lambda data: crc32c(data), this.fields.data),
)
assert DiskLabel.sizeof() == LABEL_SIZE_BYTES


def build_disklabel(disk_index: int, pair_id: bytes, data_size_bytes: int, serial: bytes = b"",
                    created_generation: int = 1) -> bytes:
    """The 512-byte label of a fresh disk."""
    assert len(pair_id) == PAIR_ID_BYTES and len(serial) <= SERIAL_BYTES
    fields = dict(version=LABEL_VERSION, disk_index=disk_index, flags=0, pair_id=pair_id,
                  serial=serial.ljust(SERIAL_BYTES, b"\0"), data_offset_bytes=DATA_OFFSET_BYTES,
                  data_size_bytes=data_size_bytes, created_generation=created_generation,
                  reserved=bytes(420))
    return DiskLabel.build({"fields": {"value": fields}})


def parse_disklabel_untrusted(buf, where: str = ""):
    """Parse a label read from a disk; raise FormatError naming `where` if it is not one of ours."""
    if len(buf) < LABEL_SIZE_BYTES:
        raise FormatError(f"disk label is {len(buf)} bytes, need {LABEL_SIZE_BYTES}", where)
    raw = bytes(buf[:LABEL_SIZE_BYTES])
    if raw[:len(LABEL_MAGIC)] != LABEL_MAGIC:
        raise FormatError("no twincache disk label (bad magic)", where)
    try:
        label = DiskLabel.parse(raw).fields.value
    except ChecksumError:
        raise FormatError("disk label checksum mismatch (corrupt or torn label)", where) from None
    except ConstructError as exc:
        raise FormatError(f"bad disk label: {exc}".splitlines()[0], where) from None
    if label.version != LABEL_VERSION:
        raise FormatError(f"unsupported disk label version {label.version}", where)
    if label.data_offset_bytes < DATA_OFFSET_BYTES or label.data_offset_bytes % LABEL_SLOT_BYTES:
        raise FormatError(f"disk label data offset {label.data_offset_bytes} is impossible", where)
    if label.data_size_bytes == 0 or label.data_size_bytes % SECTOR_SIZE_BYTES:
        raise FormatError(f"disk label data size {label.data_size_bytes} is impossible", where)
    return label


def label_serial(label) -> str:
    """The serial as text (labels store it NUL-padded)."""
    return label.serial.rstrip(b"\0").decode("ascii", "replace")
