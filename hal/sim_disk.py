"""Simulated disk array: one in-memory disk per LUN, shared by both controllers (ha mode).

A write is durable when it completes (the firmware issues no disk flushes and
the array is modelled without a volatile write cache); a read returns the
disk's content at its completion time.

Faults injected (seeded, from `DiskFaults`):
- latency: every I/O completes after a random delay, so completions reorder;
- EIO on read, EIO on write (a failed write may leave a torn prefix behind);
- torn multi-sector writes: a write in flight when its controller crashes is
  applied fully, not at all, or up to a random sector;
- a vanishing disk: for a while every I/O to one LUN fails with EIO.
"""
EIO = 5
SECTOR_BYTES = 512


class DiskFaults:
    def __init__(self, latency_us=(50, 3000), p_read_eio=0.0, p_write_eio=0.0):
        self.latency_us = latency_us
        self.p_read_eio = p_read_eio
        self.p_write_eio = p_write_eio


class DiskIo:
    __slots__ = ("ctrl", "epoch", "op", "write", "lun", "offset", "length", "data", "done")

    def __init__(self, ctrl, epoch, op, write, lun, offset, length, data):
        self.ctrl = ctrl
        self.epoch = epoch
        self.op = op
        self.write = write
        self.lun = lun
        self.offset = offset
        self.length = length
        self.data = data
        self.done = False


class SimDiskArray:
    def __init__(self, lun_sizes, rng, faults: DiskFaults):
        self.disks = [bytearray(size) for size in lun_sizes]
        self.rng = rng
        self.faults = faults
        self.inflight = {}                   # DiskIo -> None: insertion order keeps replays exact
        self.vanished = set()                # LUNs whose disk is gone for now
        self.stats = {"reads": 0, "writes": 0, "eio": 0, "torn": 0}

    def submit(self, ctrl, epoch, act, write):
        """Start an I/O; return (DiskIo, latency in us). Write data is copied now (the DMA)."""
        data = bytes(act.data) if write else None
        length = len(data) if write else act.length
        assert 0 <= act.offset and act.offset + length <= len(self.disks[act.lun])
        io = DiskIo(ctrl, epoch, act.op, write, act.lun, act.offset, length, data)
        self.inflight[io] = None
        lo, hi = self.faults.latency_us
        return io, self.rng.randint(lo, hi)

    def complete(self, io):
        """The I/O finishes now: apply it; return (errno, data)."""
        self.inflight.pop(io, None)
        io.done = True
        f, rng = self.faults, self.rng
        if io.write:
            self.stats["writes"] += 1
            if io.lun in self.vanished or rng.random() < f.p_write_eio:
                self.stats["eio"] += 1
                self._apply(io, rng.randint(0, io.length // SECTOR_BYTES))
                return EIO, None
            self._apply(io, io.length // SECTOR_BYTES)
            return 0, None
        self.stats["reads"] += 1
        if io.lun in self.vanished or rng.random() < f.p_read_eio:
            self.stats["eio"] += 1
            return EIO, None
        return 0, bytearray(self.disks[io.lun][io.offset:io.offset + io.length])

    def _apply(self, io, sectors):
        end = io.offset + sectors * SECTOR_BYTES
        self.disks[io.lun][io.offset:end] = io.data[:sectors * SECTOR_BYTES]

    def crash(self, ctrl):
        """Controller `ctrl` lost power: its writes in flight land whole, not at all, or torn."""
        for io in [io for io in self.inflight if io.ctrl == ctrl]:
            self.inflight.pop(io, None)
            io.done = True
            if io.write:
                sectors = io.length // SECTOR_BYTES
                cut = self.rng.choice((0, sectors, self.rng.randint(0, sectors)))
                self.stats["torn"] += 0 < cut < sectors
                self._apply(io, cut)

    def ios_inflight(self, ctrl) -> int:
        return sum(1 for io in self.inflight if io.ctrl == ctrl)
