"""Simulated disk array: one in-memory disk per LUN, shared by both controllers (ha mode).

Disks have a volatile write cache, like a drive's or the host page cache over
a file: a write that completed is visible to every read at once, but durable
only once a DiskFlush of that LUN, issued by the same controller after the
write completed, has completed too. A crash or power cut of a controller
loses its unflushed writes, each one whole, not at all, or torn at a random
sector, chosen independently (so they may land out of order). `disks` is what
reads see; `durable` is what a power cut of everyone would leave.

Faults injected (seeded, from `DiskFaults`):
- latency: every I/O completes after a random delay, so completions reorder;
- EIO on read, EIO on write (a failed write may leave a torn prefix behind);
- torn multi-sector writes: a write in flight when its controller crashes is
  applied fully, not at all, or up to a random sector;
- a vanishing disk: for a while every I/O to one LUN fails with EIO.

Each disk also holds its LUN's 512 B reservation record (firmware/ha/fencing.py),
seen by both controllers like the rest of the disk. Record I/O takes the
same latency and EIO faults (a vanished disk fails it too); a record is one
sector, so a record write in flight at a crash lands whole or not at all,
and a record write that fails with EIO may or may not have landed.
- slow record I/O: for a while, one controller's record I/O (its path to the
  reservation area) takes `record_latency_us[ctrl]`, far longer than data
  I/O (its writes only, if `record_write_only[ctrl]`); a slow read sees the
  record as it is when it completes;
- failing record writes: for a while, one controller's record writes fail
  with EIO without landing (its reads still work, unless its record reads
  fail too: its path to the reservation area is gone).
"""
EIO = 5
SECTOR_BYTES = 512


class DiskFaults:
    def __init__(self, latency_us=(50, 3000), p_read_eio=0.0, p_write_eio=0.0):
        self.latency_us = latency_us
        self.p_read_eio = p_read_eio
        self.p_write_eio = p_write_eio


RECORD_BYTES = 512


class DiskIo:
    __slots__ = ("ctrl", "epoch", "op", "write", "lun", "offset", "length", "data", "done", "record", "gen",
                 "flush")

    def __init__(self, ctrl, epoch, op, write, lun, offset, length, data, record=False, flush=None):
        self.ctrl = ctrl
        self.epoch = epoch
        self.op = op
        self.write = write
        self.lun = lun
        self.offset = offset
        self.length = length
        self.data = data
        self.done = False
        self.record = record               # the reservation record, not the data area
        self.gen = None                    # the generation the writer held (split-brain checker)
        self.flush = flush                 # a flush: the newest landed write it covers (its seq)


class Landed:
    """A write in a disk's volatile cache: visible, not yet durable."""
    __slots__ = ("seq", "ctrl", "lun", "offset", "data")

    def __init__(self, seq, ctrl, lun, offset, data):
        self.seq = seq
        self.ctrl = ctrl
        self.lun = lun
        self.offset = offset
        self.data = data


class SimDiskArray:
    def __init__(self, lun_sizes, rng, faults: DiskFaults):
        self.disks = [bytearray(size) for size in lun_sizes]
        self.durable = [bytearray(size) for size in lun_sizes]
        self.durable_seq = [[0] * (size // SECTOR_BYTES) for size in lun_sizes]   # per sector: newest landed
        self.unflushed = []                  # Landed, in landing order
        self.landed = 0                      # landing sequence number
        self.records = [bytearray(RECORD_BYTES) for _ in lun_sizes]   # blank: never written
        self.rng = rng
        self.faults = faults
        self.inflight = {}                   # DiskIo -> None: insertion order keeps replays exact
        self.vanished = set()                # LUNs whose disk is gone for now
        self.stats = {"reads": 0, "writes": 0, "eio": 0, "torn": 0, "record_reads": 0, "record_writes": 0,
                      "flushes": 0, "unflushed_lost": 0}
        self.on_apply = None               # called with (io, sectors) whenever a write lands
        self.record_latency_us = [None, None]   # per controller: (lo, hi) while its record I/O is slow
        self.record_write_eio = [False, False]  # per controller: its record writes fail, not landing
        self.record_read_eio = [False, False]   # per controller: its record reads fail
        self.record_write_only = [False, False]  # per controller: only its record writes are slow

    def submit(self, ctrl, epoch, act, write):
        """Start an I/O; return (DiskIo, latency in us). Write data is copied now (the DMA)."""
        data = bytes(act.data) if write else None
        length = len(data) if write else act.length
        assert 0 <= act.offset and act.offset + length <= len(self.disks[act.lun])
        io = DiskIo(ctrl, epoch, act.op, write, act.lun, act.offset, length, data)
        self.inflight[io] = None
        lo, hi = self.faults.latency_us
        return io, self.rng.randint(lo, hi)

    def submit_record(self, ctrl, epoch, act, write):
        """Start a reservation record read or write; return (DiskIo, latency in us)."""
        data = bytes(act.data) if write else None
        assert not write or len(data) == RECORD_BYTES
        io = DiskIo(ctrl, epoch, act.op, write, act.lun, 0, RECORD_BYTES, data, record=True)
        self.inflight[io] = None
        slow = self.record_latency_us[ctrl]
        if slow is None or not write and self.record_write_only[ctrl]:
            slow = self.faults.latency_us
        return io, self.rng.randint(*slow)

    def submit_flush(self, ctrl, epoch, act):
        """Start a flush of `act.lun`: it covers ctrl's writes that landed before now."""
        io = DiskIo(ctrl, epoch, act.op, False, act.lun, 0, 0, None, flush=self.landed)
        self.inflight[io] = None
        lo, hi = self.faults.latency_us
        return io, self.rng.randint(lo, hi)

    def complete(self, io):
        """The I/O finishes now: apply it; return (errno, data)."""
        self.inflight.pop(io, None)
        io.done = True
        f, rng = self.faults, self.rng
        if io.record:
            return self._complete_record(io)
        if io.flush is not None:
            return self._complete_flush(io)
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

    def _complete_record(self, io):
        f, rng = self.faults, self.rng
        self.stats["record_writes" if io.write else "record_reads"] += 1
        p = f.p_write_eio if io.write else f.p_read_eio
        if self.record_write_eio[io.ctrl] if io.write else self.record_read_eio[io.ctrl]:
            self.stats["eio"] += 1
            return EIO, None
        if io.lun in self.vanished or rng.random() < p:
            self.stats["eio"] += 1
            if io.write and rng.random() < 0.5:     # the error came after the sector landed
                self._apply(io, 1)
            return EIO, None
        if io.write:
            self._apply(io, 1)
            return 0, None
        return 0, bytearray(self.records[io.lun])

    def _complete_flush(self, io):
        self.stats["flushes"] += 1
        if io.lun in self.vanished or self.rng.random() < self.faults.p_write_eio:
            self.stats["eio"] += 1
            return EIO, None
        keep = []
        for w in self.unflushed:
            if w.ctrl == io.ctrl and w.lun == io.lun and w.seq <= io.flush:
                self._make_durable(w, len(w.data) // SECTOR_BYTES)
            else:
                keep.append(w)
        self.unflushed = keep
        return 0, None

    def _make_durable(self, w, sectors):
        """Sector by sector, unless a later landed write is durable there already."""
        seqs, durable, first = self.durable_seq[w.lun], self.durable[w.lun], w.offset // SECTOR_BYTES
        for k in range(sectors):
            if seqs[first + k] < w.seq:
                seqs[first + k] = w.seq
                durable[(first + k) * SECTOR_BYTES:(first + k + 1) * SECTOR_BYTES] = \
                    w.data[k * SECTOR_BYTES:(k + 1) * SECTOR_BYTES]

    def _apply(self, io, sectors):
        if io.record:
            if sectors:
                self.records[io.lun][:] = io.data
        elif sectors:
            end = io.offset + sectors * SECTOR_BYTES
            data = io.data[:sectors * SECTOR_BYTES]
            self.disks[io.lun][io.offset:end] = data
            self.landed += 1
            self.unflushed.append(Landed(self.landed, io.ctrl, io.lun, io.offset, data))
        if self.on_apply is not None and sectors:
            self.on_apply(io, sectors)

    def image_without(self, lun, ctrl):
        """LUN `lun` as it would be if controller `ctrl` lost power now: its unflushed writes gone."""
        image = bytearray(self.durable[lun])
        self._overlay(image, lun, [w for w in self.unflushed if w.lun == lun and w.ctrl != ctrl])
        return image

    def _overlay(self, image, lun, writes):
        """Unflushed writes over the durable image, each sector only where it landed after the
        write that is durable there (an older write still cached never hides a newer one)."""
        seqs = self.durable_seq[lun]
        for w in writes:                    # in landing order
            first = w.offset // SECTOR_BYTES
            for k in range(len(w.data) // SECTOR_BYTES):
                if seqs[first + k] < w.seq:
                    image[(first + k) * SECTOR_BYTES:(first + k + 1) * SECTOR_BYTES] = \
                        w.data[k * SECTOR_BYTES:(k + 1) * SECTOR_BYTES]

    def _drop_cache(self, ctrl):
        """ctrl's unflushed writes: each lands whole, not at all, or torn, independently."""
        rng, lost, keep, luns = self.rng, 0, [], set()
        for w in self.unflushed:
            if w.ctrl != ctrl:
                keep.append(w)
                continue
            sectors = len(w.data) // SECTOR_BYTES
            cut = rng.choice((0, 0, sectors, rng.randint(0, sectors)))
            lost += cut < sectors
            self._make_durable(w, cut)
            luns.add(w.lun)
        self.unflushed = keep
        self.stats["unflushed_lost"] += lost
        for lun in luns:                    # what reads see now: the durable image and others' writes
            self.disks[lun][:] = self.durable[lun]
            self._overlay(self.disks[lun], lun, [w for w in keep if w.lun == lun])

    def crash(self, ctrl):
        """Controller `ctrl` lost power: its writes in flight land whole, not at all, or torn, and
        so do its writes still in the disks' volatile cache."""
        for io in [io for io in self.inflight if io.ctrl == ctrl]:
            self.inflight.pop(io, None)
            io.done = True
            if io.write:
                sectors = io.length // SECTOR_BYTES
                cut = self.rng.choice((0, sectors, self.rng.randint(0, sectors)))
                if io.record:
                    cut = self.rng.choice((0, 1))        # one sector: whole or not at all
                self.stats["torn"] += 0 < cut < sectors
                self._apply(io, cut)
        self._drop_cache(ctrl)

    def ios_inflight(self, ctrl) -> int:
        return sum(1 for io in self.inflight if io.ctrl == ctrl)
