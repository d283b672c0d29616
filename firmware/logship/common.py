"""What both ends of log shipping share: their settings, the NVRAM log (entries in partitions),
and the constants of the protocol."""
from .. import actions as A
from ..formats import logfile as LF
from ..formats import messages as M
from ..formats import nvram as N

EPERM, EIO, EINVAL, ENOSPC = 1, 5, 22, 28
T = M.MsgType
SECTOR = 512
EMPTY, FILLING, FULL, APPLIED = 0, 1, 2, 3          # a partition's state, in its NVRAM header
LOG_MODE = 2                                          # HELLO mode byte: 0 ha, 1 replica, 2 log shipping
SOURCE_ID, DEST_ID = 0, 1                             # link controller ids of the two ends
SHIP_BATCH_MAX = 64                                   # entries per LOG_SHIP message
PART_HEAD = N.LOG_PARTITION_BYTES


class LogParams:
    """What the log-shipping firmware needs to know that is not in NVRAM."""

    def __init__(self, pair_id, lun_sizes, *, source_id=0, cp_interval_ms=2000, max_write_bytes=4 << 20,
                 heartbeat_interval_ms=100, heartbeat_timeout_ms=1000, reliable_transport=True,
                 data_window_bytes=4 << 20, waiting_max=1024, buggify=None):
        self.pair_id = pair_id
        self.lun_sizes = list(lun_sizes)
        self.source_id = source_id
        self.cp_interval_ms = cp_interval_ms
        self.max_write_bytes = max_write_bytes
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.heartbeat_timeout_ms = heartbeat_timeout_ms
        self.reliable_transport = reliable_transport
        self.data_window_bytes = data_window_bytes
        self.waiting_max = waiting_max
        # Deliberately broken variants for the simulator (hal/sim/log.py BROKEN_SITES): off in service.
        self.buggify = buggify or (lambda site: False)


class Entry:
    __slots__ = ("seq", "lun", "offset", "length", "data_off")

    def __init__(self, seq, lun, offset, length, data_off):
        self.seq = seq
        self.lun = lun
        self.offset = offset          # bytes into the LUN
        self.length = length
        self.data_off = data_off      # where its data lives (NVRAM or file offset)


# The life of a log partition: (state, event) -> the next state; any other move is a bug.
PART_NEXT = {
    # the source's partitions, in turn
    (EMPTY, "open"): FILLING,          # the source starts filling it
    (APPLIED, "open"): FILLING,        # reused: the destination acknowledged its entries
    (FILLING, "close"): FULL,          # full, or its timer fired (or an older live one at
                                       # recovery): its consistency point begins
    (FULL, "applied"): APPLIED,        # written to the volume, and the volume flushed
    # the destination's one partition per source starts afresh once every entry is filed, at
    # whatever state its header was recovered in
    (EMPTY, "refill"): FILLING,
    (FILLING, "refill"): FILLING,
    (FULL, "refill"): FILLING,
    (APPLIED, "refill"): FILLING,
}
PART_STATES = (EMPTY, FILLING, FULL, APPLIED)
PART_EVENTS = ("open", "close", "applied", "refill")


class PartitionError(AssertionError):
    """A partition move the table does not have: a bug in the firmware, never the peer's input."""


class Partition:
    __slots__ = ("index", "offset", "size", "state", "first_seq", "entries", "used", "started_ms", "end_seq")

    def __init__(self, index, offset, size):
        self.index = index
        self.offset = offset
        self.size = size
        self.state = EMPTY
        self.first_seq = 0
        self.entries = []
        self.used = PART_HEAD
        self.started_ms = 0
        self.end_seq = 0              # after a scan: the sequence number after its last entry

    def move(self, event):
        try:
            self.state = PART_NEXT[(self.state, event)]
        except KeyError:
            raise PartitionError(f"log partition {self.index}: {event} cannot happen in state "
                                 f"{self.state}") from None

    @property
    def last_seq(self):
        return self.first_seq + len(self.entries) - 1

    def header(self):
        return N.pack_log_partition(self.index, self.state, self.first_seq, len(self.entries), self.used)


class Log:
    """The NVRAM log partitions of one controller: append, scan, header updates (no I/O)."""

    def __init__(self, nv, sb, partitions=None):
        self.nv = nv
        indexes = range(sb.log_partitions) if partitions is None else partitions
        self.parts = [Partition(i, sb.log_offset + i * sb.log_partition_bytes, sb.log_partition_bytes)
                      for i in indexes]

    def write_header(self, part):
        head = part.header()
        self.nv[part.offset:part.offset + len(head)] = head
        return A.Persist(part.offset, len(head))

    def room(self, part, length):
        return part.used + LF.ENTRY.size + length <= part.size

    def append(self, part, seq, lun, offset, data):
        """Store one entry (header, then data) at the partition's end; return its Persist."""
        at = part.offset + part.used
        n = len(data)
        nv = self.nv
        nv[at + LF.ENTRY.size:at + LF.ENTRY.size + n] = data
        nv[at:at + LF.ENTRY.size] = LF.entry_header(lun, n, seq, offset // SECTOR,
                                                    N.crc32c(nv[at + LF.ENTRY.size:at + LF.ENTRY.size + n]))
        part.entries.append(Entry(seq, lun, offset, n, at + LF.ENTRY.size))
        part.used += LF.ENTRY.size + n
        return A.Persist(at, LF.ENTRY.size + n)

    def scan(self, part):
        """Rebuild a partition from NVRAM: its header, then entries with consecutive sequence
        numbers from first_seq whose header and data CRCs hold; the first that fails ends it."""
        nv = self.nv
        parsed = N.parse_log_partition_untrusted(nv[part.offset:part.offset + PART_HEAD])
        if parsed is None or parsed[0] != part.index:
            part.state, part.first_seq, part.entries, part.used, part.end_seq = EMPTY, 0, [], PART_HEAD, 0
            return 0
        _i, part.state, part.first_seq, count, _used = parsed
        part.entries, part.used = [], PART_HEAD
        torn = 0
        if part.state != EMPTY:
            end = part.offset + part.size
            while True:
                at = part.offset + part.used
                e = LF.parse_entry_untrusted(nv[at:min(end, at + LF.ENTRY.size)])
                if e is None or e[2] != part.first_seq + len(part.entries):
                    break
                lun, length, seq, lba, crc = e
                if at + LF.ENTRY.size + length > end or N.crc32c(
                        nv[at + LF.ENTRY.size:at + LF.ENTRY.size + length]) != crc:
                    torn += 1
                    break
                part.entries.append(Entry(seq, lun, lba * SECTOR, length, at + LF.ENTRY.size))
                part.used += LF.ENTRY.size + length
            if part.state == APPLIED and len(part.entries) != count:
                part.entries = []     # overwritten since: it cannot be resent, only counted
        part.end_seq = part.first_seq + (count if part.state == APPLIED else len(part.entries))
        return torn


def overlaps(a_off, a_len, b_off, b_len):
    return a_off < b_off + b_len and b_off < a_off + a_len


def waves(entries):
    """Split entries (in sequence order) into waves with no overlap inside a wave, so a wave's
    writes may complete in any order and the newest data still wins."""
    out, current = [], []
    for e in entries:
        if any(x.lun == e.lun and overlaps(x.offset, x.length, e.offset, e.length) for x in current):
            out.append(current)
            current = []
        current.append(e)
    if current:
        out.append(current)
    return out
