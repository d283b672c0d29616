"""Simulated disks with a volatile write cache, and NVRAM with its crash model, for the in-memory rigs.

Shared by the replica pair (hal/sim_replicarig.py), the log-shipping rig
(hal/sim_logrig.py) and the ha pair (fixtures/mempair.py), so every rig
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

NVRAM is hal/sim_nvram.py's SimNvram: stores not persisted are kept, lost or
torn at a crash, sector by sector.
"""
from .sim_nvram import SimNvram

SECTOR_BYTES = 512


class VolatileDisk(bytearray):
    """One disk: the bytearray is its visible content; `durable` what survives a crash."""

    def __init__(self, size_bytes):
        super().__init__(size_bytes)
        self.durable = bytearray(size_bytes)
        self.unflushed = []          # [seq, writer, offset, bytes], oldest first
        self.seq = 0                 # writes completed so far
        self.stats = {"writes": 0, "flushes": 0, "dropped": 0, "torn": 0}

    def write(self, writer, offset, data):
        """A write completes: visible now, durable after a flush issued from now on."""
        data = bytes(data)
        assert 0 <= offset and offset + len(data) <= len(self), (offset, len(data))
        self[offset:offset + len(data)] = data
        self.seq += 1
        self.unflushed.append((self.seq, writer, offset, data))
        self.stats["writes"] += 1

    def flush_mark(self):
        """A flush is issued: it covers the writes completed so far; pass this to flush_done."""
        return self.seq

    def flush_done(self, mark):
        """The flush completes: every write it covers is durable."""
        self.stats["flushes"] += 1
        keep = []
        for w in self.unflushed:
            if w[0] <= mark:
                self.durable[w[2]:w[2] + len(w[3])] = w[3]
            else:
                keep.append(w)
        self.unflushed = keep

    def land(self, offset, data):
        """A store the test puts on the medium itself (durable at once), e.g. half a torn write."""
        self[offset:offset + len(data)] = data
        self.durable[offset:offset + len(data)] = data

    def crash(self, writer, rng, worst=False):
        """`writer` lost power: decide the fate of its unflushed writes; the rest stay pending.
        worst: every one of them is lost (what a firmware test wants to show)."""
        mine = [w for w in self.unflushed if w[1] == writer]
        if not mine:
            return
        self.unflushed = [w for w in self.unflushed if w[1] != writer]
        rng.shuffle(mine)
        for _seq, _w, offset, data in mine:
            fate = 1 if worst else rng.randrange(3)
            if fate == 0:
                self.durable[offset:offset + len(data)] = data
            elif fate == 1:
                self.stats["dropped"] += 1
            else:
                self.stats["torn"] += 1
                for s in range(0, len(data), SECTOR_BYTES):
                    if rng.random() < 0.5:
                        self.durable[offset + s:offset + s + SECTOR_BYTES] = data[s:s + SECTOR_BYTES]
        self[:] = self.durable
        for _seq, _w, offset, data in self.unflushed:    # other controllers' writes stay visible
            self[offset:offset + len(data)] = data


def new_nvram(size_bytes):
    return SimNvram(size_bytes)


def power_on(nvram):
    """Whatever the device holds when a controller boots is durable (a test may have torn it)."""
    nvram.shadow[:] = nvram.mem


class UnknownAction(AssertionError):
    """A rig was handed an action it does not know how to carry out."""
