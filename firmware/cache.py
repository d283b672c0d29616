"""The owner's write cache over its primary NVRAM segment.

Owns the cache data structures of claims 5: the hash table from (LUN, line)
to the newest version of a cache line (5.4), the write-back queue of dirty
lines in age order (5.5), and the free list of primary blocks, which is also
the free list of this controller's mirror locations in the partner's NVRAM,
because block i of the primary corresponds to block i of the partner's
mirror (claims 1.9, 5.6: the owner manages the free list of its mirror
locations in the partner).

Lines are copy-on-write: a host write always goes to a FREE block, and the
version it replaces is freed only once the new one is safe (mirrored, or the
write completed degraded). A dead line (superseded and safe, or destaged) has
its NVRAM descriptor freed at once, so a restart never brings it back over
newer data; its block returns to the free list only when no destage write is
in flight on it and no read or queued frame has it pinned.
"""
import collections

SECTOR_BYTES = 512
LUN_SHIFT = 40


def line_key(lun: int, line_no: int) -> int:
    return (lun << LUN_SHIFT) | line_no


class Line:
    """One version of one cache line, held in one primary block."""
    __slots__ = ("block", "key", "lun", "lba", "seq", "bitmap", "current", "flushing",
                 "pins", "dead", "mirrored", "forgotten", "older", "generation")

    def __init__(self, block, key, lun, lba, seq, bitmap, mirrored, generation=0):
        self.block = block
        self.key = key
        self.lun = lun
        self.lba = lba              # first 512 B sector of the line
        self.seq = seq              # the host write that made this version
        self.generation = generation    # the LUN's generation it was written (and mirrored) at
        self.bitmap = bitmap        # bit s set: sector s of the line is dirty
        self.current = True         # it is the hash table's entry for its key
        self.flushing = False       # a destage write is in flight
        self.pins = 0               # frames and reads in flight that view its block
        self.dead = False           # superseded and safe, or destaged
        self.mirrored = mirrored    # the partner holds it in its mirror segment
        self.forgotten = False      # dead, and its descriptor is FREE in NVRAM (a restart ignores it)
        self.older = None           # the version it replaced (forgotten ones are skipped when it is forgotten)


class PrimaryCache:
    def __init__(self, blocks: int, block_size: int):
        self.capacity = blocks
        self.block_size = block_size
        self.sectors_per_line = block_size // SECTOR_BYTES
        self.full_bitmap = (1 << self.sectors_per_line) - 1
        self.lines = {}                                   # key -> newest Line (hash table)
        self.wbq = collections.OrderedDict()              # key -> Line, oldest first, not flushing
        self.free = list(range(blocks - 1, -1, -1))       # stack of free block indices
        self.by_block = [None] * blocks                   # block -> Line while allocated

    @property
    def dirty_lines(self) -> int:
        return len(self.lines)

    @property
    def used_blocks(self) -> int:
        return self.capacity - len(self.free)

    def alloc(self) -> int:
        return self.free.pop()

    def install(self, line: Line):
        """Make `line` the newest version of its key; return the version it replaces (or None)."""
        old = self.lines.get(line.key)
        self.lines[line.key] = line
        self.by_block[line.block] = line
        if old is not None:
            old.current = False
            line.older = old
            self.wbq.pop(line.key, None)
        self.wbq[line.key] = line
        return old

    def remove_current(self, line: Line):
        """A destaged line leaves the hash table (unless a newer version replaced it)."""
        if line.current:
            line.current = False
            del self.lines[line.key]
            self.wbq.pop(line.key, None)

    def freeable(self, line: Line) -> bool:
        return line.dead and not line.flushing and not line.pins and self.by_block[line.block] is line

    def release_block(self, line: Line):
        assert self.freeable(line)
        self.by_block[line.block] = None
        self.free.append(line.block)

    def overlapping(self, lun: int, first_line: int, last_line: int):
        lines = self.lines
        base = lun << LUN_SHIFT
        if last_line - first_line < 64 or len(lines) > 4 * (last_line - first_line):
            for line_no in range(first_line, last_line + 1):
                line = lines.get(base | line_no)
                if line is not None:
                    yield line
        else:
            for key, line in list(lines.items()):
                if line.lun == lun and first_line <= (key & ((1 << LUN_SHIFT) - 1)) <= last_line:
                    yield line


def sector_bits(lo_bytes: int, hi_bytes: int) -> int:
    """Bitmap of the sectors [lo, hi) of a line covers (byte offsets within the line)."""
    first = lo_bytes // SECTOR_BYTES
    last = (hi_bytes + SECTOR_BYTES - 1) // SECTOR_BYTES
    return ((1 << (last - first)) - 1) << first


def dirty_runs(bitmap: int, lo_sector: int, hi_sector: int):
    """Yield (first, end) sector runs of `bitmap` inside [lo_sector, hi_sector)."""
    s = lo_sector
    while s < hi_sector:
        if bitmap >> s & 1:
            start = s
            while s < hi_sector and bitmap >> s & 1:
                s += 1
            yield start, s
        else:
            s += 1
