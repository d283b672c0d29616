"""Simulated disks with a volatile write cache, and NVRAM with its crash model, for the in-memory rigs.

Shared by the replica pair (hal/sim/replicarig.py), the log-shipping rig
(hal/sim/logrig.py) and the ha pair (fixtures/mempair.py), so every rig
loses the same things at a crash.

A `VolatileDisk` is a bytearray holding what reads see: a write is visible at
once. Durable is only what a flush made so: a DiskFlush covers every write
that completed before the flush was issued (`flush_mark` when it is issued,
`flush_done` when it completes). The writes not covered yet are kept in
order, with the controller that wrote them.

Faults injected (at `crash(writer, rng)`, seeded by the rig's own
random.Random):
- every unflushed write of the crashed controller independently lands
  whole, not at all, or torn (a random subset of its sectors);
- the ones that land, land in a random order, so of two overlapping writes
  the older may win (a cache destaging out of order);
- writes that were flushed, and other controllers' writes, are untouched.
What the disk holds after a crash is durable.

NVRAM is hal/sim/nvram.py's SimNvram: stores not persisted are kept, lost or
torn at a crash, sector by sector.
"""
from hal.sim.nvram import SimNvram

SECTOR_BYTES = 512


class VolatileDisk(bytearray):
    """One disk: the bytearray is its visible content; `durable` what survives a crash.

    Every sector remembers which write made it durable (its sequence number and writer): a write
    never lands over a newer one of another controller (in a disk's cache the newer replaced it),
    only the crashed controller's own unflushed writes may land in any order."""

    def __init__(self, size_bytes):
        super().__init__(size_bytes)
        assert size_bytes % SECTOR_BYTES == 0
        self.durable = bytearray(size_bytes)
        sectors = size_bytes // SECTOR_BYTES
        self.durable_seq = [0] * sectors
        self.durable_writer = [None] * sectors
        self.unflushed = []          # [seq, writer, offset, bytes], oldest first
        self.seq = 0                 # writes completed so far
        self.stats = {"writes": 0, "flushes": 0, "dropped": 0, "torn": 0}

    def write(self, writer, offset, data):
        """A write completes: visible now, durable after a flush issued from now on."""
        data = bytes(data)
        assert 0 <= offset and offset + len(data) <= len(self) and offset % SECTOR_BYTES == 0, offset
        self[offset:offset + len(data)] = data
        self.seq += 1
        self.unflushed.append((self.seq, writer, offset, data))
        self.stats["writes"] += 1

    def flush_mark(self):
        """A flush is issued: it covers the writes completed so far; pass this to flush_done."""
        return self.seq

    def flush_done(self, mark):
        """The flush completes: every write it covers is durable (whoever wrote it: the disk's
        cache is flushed as a whole)."""
        self.stats["flushes"] += 1
        keep = []
        for w in self.unflushed:
            if w[0] <= mark:
                self._land(*w)
            else:
                keep.append(w)
        self.unflushed = keep

    def _land(self, seq, writer, offset, data, sectors=None):
        """Sectors of one write (all, or those listed) reach the medium, except where a newer
        write of another writer is there already."""
        first, n = offset // SECTOR_BYTES, len(data) // SECTOR_BYTES
        dseq, dwriter = self.durable_seq, self.durable_writer
        if sectors is None and max(dseq[first:first + n]) < seq:      # the usual case, at once
            self.durable[offset:offset + len(data)] = data
            dseq[first:first + n] = [seq] * n
            dwriter[first:first + n] = [writer] * n
            return
        for s in range(n) if sectors is None else sectors:
            i = first + s
            if dseq[i] > seq and dwriter[i] != writer:
                continue
            self.durable[(first + s) * SECTOR_BYTES:(first + s + 1) * SECTOR_BYTES] = \
                data[s * SECTOR_BYTES:(s + 1) * SECTOR_BYTES]
            dseq[i], dwriter[i] = seq, writer

    def land(self, offset, data):
        """A store the test puts on the medium itself (durable at once), e.g. half a torn write."""
        self.seq += 1
        self[offset:offset + len(data)] = data
        self._land(self.seq, None, offset, bytes(data))

    def crash(self, writer, rng, worst=False):
        """`writer` lost power: decide the fate of its unflushed writes; the rest stay pending.
        worst: every one of them is lost (what a firmware test wants to show)."""
        mine = [w for w in self.unflushed if w[1] == writer]
        if not mine:
            return
        self.unflushed = [w for w in self.unflushed if w[1] != writer]
        rng.shuffle(mine)
        for w in mine:
            fate = 1 if worst else rng.randrange(3)
            if fate == 0:
                self._land(*w)
            elif fate == 1:
                self.stats["dropped"] += 1
            else:
                self.stats["torn"] += 1
                n = len(w[3]) // SECTOR_BYTES
                self._land(*w, sectors=[s for s in range(n) if rng.random() < 0.5])
        self[:] = self.durable
        dseq = self.durable_seq
        for seq, _w, offset, data in self.unflushed:    # other controllers' writes stay visible
            first = offset // SECTOR_BYTES
            for s in range(len(data) // SECTOR_BYTES):
                if dseq[first + s] < seq:
                    self[offset + s * SECTOR_BYTES:offset + (s + 1) * SECTOR_BYTES] = \
                        data[s * SECTOR_BYTES:(s + 1) * SECTOR_BYTES]


def new_nvram(size_bytes):
    return SimNvram(size_bytes)


def power_on(nvram):
    """Whatever the device holds when a controller boots is durable (a test may have torn it)."""
    nvram.shadow[:] = nvram.mem

