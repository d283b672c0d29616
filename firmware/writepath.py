"""The write path: host writes and reads of the LUNs this controller serves, a part of it.

A host write for a LUN this controller owns is stored copy-on-write into
free primary blocks (data, persist, descriptor, persist), validated by
checksum, and its copy requests wait in the holding pen until every block of
the write is in NVRAM and valid; then the mode's copy step (`_release_pen`:
ha mode mirrors it to the partner's mirror segment, replica mode copies it to
the secondary) sends them all together, or all are deleted and the host gets
EIO (claims 2). The host is acknowledged when the copy is (`finish`). A write
that finds too few free blocks waits, in order, until destage frees some. A
read is answered from the cache where the cache covers it, else from the disk
with the cache's lines laid over the disk's bytes.

The part owns the waiting writes, the write sequence numbers and the pieces
of WRITE_ZEROES in flight (firmware/zeroes.py). It is given the settings, the
cache and the primary NVRAM segment at its start; what it asks of the
controller through `self.ctrl` is `ASKED_OF_THE_CONTROLLER` (held by
tests/test_boundary.py). Ownership decides where a request goes
(`ownership.route`); a request for the partner's LUN is forwarded.
"""
import collections

from . import actions as A
from .cache import LUN_SHIFT, SECTOR_BYTES, Line, dirty_runs, sector_bits
from .formats import messages as M
from .formats import nvram as N
from .requests import HERE, TAKEN, THERE, WRITE, READ, HostRequest, ReadOp
from .segment import DIRTY
from .zeroes import ZeroWriter

_crc32c = N.crc32c_raw

EIO, EINVAL, ENOSPC = 5, 22, 28

# What the write path asks of the controller through `self.ctrl`, and nothing else.
ASKED_OF_THE_CONTROLLER = frozenset({
    # time, the action list, counters, who owns a LUN, when a host last did I/O (idle destage)
    "now_ms", "out", "stats", "ownership", "last_host_io_ms",
    # a request's range check and answer, persisting NVRAM, a disk operation's id
    "_check_range", "_reply", "_persist", "_persist_runs", "_disk_op",
    # the mode's copy step, forwarding to the partner, destage after a write
    "_release_pen", "_forward", "_pump",
})


class WritePath:
    """Host writes and reads of this controller's LUNs (see the module docstring)."""

    def __init__(self, ctrl, params, cache, primary, disk_health, next_seq):
        self.ctrl = ctrl
        self.params = params
        self.cache = cache
        self.primary = primary
        self.disk_health = disk_health
        self.block_size = cache.block_size
        self.buggify = params.buggify
        self.buggify_on = params.buggify_on     # skip the calls on the hot path when nothing is broken
        self.on_serve = params.on_serve         # a checker's hook (firmware/params.py), None in production
        self.next_seq = next_seq                # the next write's sequence number (recovery's)
        self.waiting = collections.deque()      # host writes waiting for free blocks (HostRequest)
        self.zeroes = ZeroWriter(self.host_write, ctrl._reply, params.max_write_bytes,
                                 params.zero_pieces_inflight_max)

    # -- writes -----------------------------------------------------------------

    def host_write(self, req, lun, offset, data, fua):
        ctrl = self.ctrl
        ctrl.last_host_io_ms = ctrl.now_ms
        length = len(data)
        error = ctrl._check_range(lun, offset, length)
        if error or length > self.params.max_write_bytes or length == 0:
            ctrl._reply(req, error or EINVAL)
            return
        if self._refuse_degraded_write(req, lun):
            return
        route = ctrl.ownership.route(WRITE, req, lun, offset, data, fua)
        if route is TAKEN:
            return
        if route is THERE:
            ctrl._forward(req, M.IoOp.WRITE, lun, offset, length, data, fua)
        elif self.waiting or len(self.cache.free) < self.lines_spanned(offset, length):
            self.wait(req, lun, offset, data, fua)
        else:
            self.store(req, lun, offset, data, fua)

    def lines_spanned(self, offset, length):
        bs = self.block_size
        return (offset + length - 1) // bs - offset // bs + 1

    def wait(self, req, lun, offset, data, fua):
        ctrl = self.ctrl
        if len(self.waiting) >= self.params.waiting_max:
            ctrl._reply(req, ENOSPC)
            return
        if self._blocks_never_free(self.lines_spanned(offset, len(data))):
            ctrl._reply(req, EIO)               # they are held by degraded LUNs' lines
            return
        self.waiting.append(HostRequest(WRITE, req, lun, offset, bytes(data), fua))
        ctrl.stats["writes_waited"] += 1
        ctrl._pump()

    def drain_waiting(self):
        """Writes that waited for free blocks are routed again: the LUN may have changed hands or
        lost its mirror meanwhile (a write taken in while FENCING was acknowledged from this NVRAM
        alone, then dropped when the partner's takeover fenced us: seed 30 of another run)."""
        waiting, free, ctrl = self.waiting, self.cache.free, self.ctrl
        while waiting and len(free) >= self.lines_spanned(waiting[0].offset, len(waiting[0].arg)):
            w = waiting.popleft()
            req, lun, offset, data, fua = w.req, w.lun, w.offset, w.arg, w.fua
            route = ctrl.ownership.route(WRITE, req, lun, offset, data, fua)
            if route is HERE:
                self.store(req, lun, offset, data, fua)
            elif route is THERE:
                ctrl._forward(req, M.IoOp.WRITE, lun, offset, len(data), data, fua)

    def store(self, req, lun, offset, data, fua):
        """Copy-on-write into free primary blocks, validate, then release the holding pen.

        All data first (stored, then checked by CRC32C against the host's bytes), then
        the descriptors, then the commit record: every block's data is persisted before
        its descriptor, and a write with invalid data leaves no descriptor behind.
        Adjacent ranges share one Persist.
        """
        if self.on_serve is not None:
            self.on_serve("write", req, lun)
        ctrl = self.ctrl
        seg, cache, bs = self.primary, self.cache, self.block_size
        first = offset // bs
        end = offset + len(data)
        count = (end - 1) // bs - first + 1
        full, lines, buggy = cache.full_bitmap, cache.lines, self.buggify_on
        nv, data_base = seg.nv, seg.data_base
        pen = []          # holding pen: one mirror request per block, apart from the data (claims 2.6)
        pos = 0
        # Ascending blocks: a sequential stream given a run of free blocks lands in one
        # NVRAM range, which its destage then writes out without a copy.
        blocks = sorted([cache.alloc() for _ in range(count)]) if count > 1 else [cache.alloc()]
        for i, block in enumerate(blocks):
            start = (first + i) * bs
            lo = offset - start if i == 0 else 0
            hi = end - start if end - start < bs else bs
            at = data_base + block * bs
            key = (lun << LUN_SHIFT) | (first + i)
            if hi - lo == bs:
                bits = full
            else:
                bits = sector_bits(lo, hi)
                old = lines.get(key)
                if old is not None:             # merge: the new version carries the old sectors too
                    old_at = data_base + old.block * bs
                    nv[at:at + bs] = nv[old_at:old_at + bs]
                    bits |= old.bitmap
            piece = data[pos:pos + hi - lo]
            pos += hi - lo
            nv[at + lo:at + hi] = piece
            if buggy and self.buggify("nvram_store_corrupt"):
                nv[at + lo] ^= 0x5A             # a simulated bad store into NVRAM
            crc = _crc32c(piece)
            if _crc32c(nv[at + lo:at + hi]) != crc and not (buggy and self.buggify("skip_pen_validation")):
                cache.free.extend(blocks[i:])   # claims 2.1: the data in NVRAM is not what the host sent
                self._delete_pen(req, pen)
                return
            pen.append((block, key, start, bits, crc if hi - lo == bs else _crc32c(nv[at:at + bs])))
        seq = self.next_seq
        self.next_seq += 1
        generation = ctrl.ownership.mirror_generation_of(lun)   # what its mirror copy carries, a resync's too
        ctrl._persist_runs([(data_base + block * bs, bs) for block, *_ in pen], data=True)
        store = seg.store_descriptor
        ctrl._persist_runs([store(block, DIRTY, lun, i, count, start // SECTOR_BYTES, seq, generation,
                                  crc, bits) for i, (block, key, start, bits, crc) in enumerate(pen)])
        ctrl._persist(seg.store_commit(seq))
        ctrl._release_pen(req, seq, [(Line(block, key, lun, start // SECTOR_BYTES, seq, bits, False, generation),
                                      crc) for block, key, start, bits, crc in pen], fua, lun, offset, data)

    def _delete_pen(self, req, pen):
        """Invalid data: delete every mirror request of the write, free its blocks (claims 2.5).

        No descriptor of the write was stored yet: its blocks are FREE in NVRAM already.
        """
        ctrl = self.ctrl
        for block, *_ in pen:
            self.cache.free.append(block)
        ctrl.stats["writes_invalid"] += 1
        ctrl.out.append(A.Notify("write_invalid", blocks=len(pen) + 1))
        ctrl._reply(req, EIO)

    def finish(self, op, mirrored, pinned=True, pump=True):
        """The write's copy is done (or not to be had): the host gets its answer, the lines
        their state, the versions they replaced may go."""
        ctrl = self.ctrl
        if op.req is not None:
            ctrl._reply(op.req, 0)
        for line in op.lines:
            line.mirrored = mirrored
            if pinned:
                line.pins -= 1
                self.maybe_free(line)
        for old in op.replaced:
            old.dead = True
            self.maybe_free(old)
        ctrl.stats["writes"] += 1
        if not mirrored:
            ctrl.stats["writes_degraded"] += 1
        if pump:
            ctrl._pump()

    def maybe_free(self, line, drain=True):
        """Forget a dead line in NVRAM now; give its block back once nothing views it any more."""
        cache = self.cache
        if not line.dead or cache.by_block[line.block] is not line:
            return
        if not line.forgotten:
            # Now, not when the pins go: a pinned stale version (a resync frame or a read still
            # views it) that outlived a newer version's destage came back at a restart over
            # newer data on disk (seeds 114, 223).
            line.forgotten = True
            older = line.older          # only versions not forgotten yet stay linked: the chain stays short
            while older is not None and older.forgotten:
                older = older.older
            line.older = older
            self.ctrl._persist(self.primary.store_free(line.block))
        if cache.freeable(line):
            cache.release_block(line)
            if drain and self.waiting:
                self.drain_waiting()

    def reenter(self, h):
        """A host request held back (a HostRequest) is handled as if it came now."""
        if h.kind == WRITE:
            self.host_write(h.req, h.lun, h.offset, h.arg, h.fua)
        else:
            self.host_read(h.req, h.lun, h.offset, h.arg)

    # -- writes a degraded LUN refuses (firmware/diskhealth.py) ------------------------

    def _refuse_degraded_write(self, req, lun) -> bool:
        """A degraded LUN's writes get EIO at once: waiting, they would wait for a disk.

        In ha mode only. A replica secondary answers its peer's copies, not hosts, and an
        error there resets the link; replica mode reports and retries, and leaves it at that."""
        if not self.disk_health.degraded(lun) or self.params.mode != "ha":
            return False
        self.ctrl.stats["writes_refused_degraded"] += 1
        self.ctrl._reply(req, EIO)
        return True

    def refuse_waiting(self, lun):
        """The LUN went degraded: its writes waiting for free blocks get EIO now, and so do
        waiting writes of other LUNs that could only ever get blocks from its lines."""
        if self.params.mode != "ha":
            return
        ctrl = self.ctrl
        kept, usable = [], self._usable_blocks()
        for entry in self.waiting:
            if entry.lun == lun or usable < self.lines_spanned(entry.offset, len(entry.arg)):
                ctrl.stats["writes_refused_degraded"] += 1
                ctrl._reply(entry.req, EIO)
            else:
                kept.append(entry)
        self.waiting.clear()
        self.waiting.extend(kept)

    def _usable_blocks(self) -> int:
        """Cache blocks a waiting write may still get: all but those holding lines of degraded
        LUNs, which stay until their disk works again."""
        health = self.disk_health
        if not health.any_degraded():
            return self.cache.capacity
        return self.cache.capacity - sum(1 for line in self.cache.by_block
                                         if line is not None and health.degraded(line.lun))

    def _blocks_never_free(self, needed) -> bool:
        """A write about to wait for `needed` free blocks that can never come gets EIO instead."""
        return self.disk_health.any_degraded() and self.params.mode == "ha" and self._usable_blocks() < needed

    # -- reads ------------------------------------------------------------------

    def host_read(self, req, lun, offset, length):
        ctrl = self.ctrl
        ctrl.last_host_io_ms = ctrl.now_ms
        error = ctrl._check_range(lun, offset, length)
        if error or length > self.params.max_write_bytes:
            ctrl._reply(req, error or EINVAL)
            return
        route = ctrl.ownership.route(READ, req, lun, offset, length, False)
        if route is TAKEN:
            return
        if route is THERE:
            ctrl._forward(req, M.IoOp.READ, lun, offset, length, None, False)
        else:
            self.read(req, lun, offset, length)

    def read(self, req, lun, offset, length):
        if self.on_serve is not None:
            self.on_serve("read", req, lun)
        ctrl = self.ctrl
        bs = self.block_size
        first, last = offset // bs, (offset + length - 1) // bs
        overlay = [] if self.buggify("read_skip_cache") else list(self.cache.overlapping(lun, first, last))
        if overlay and self._covers(overlay, offset, length, first, last):
            buf = bytearray(length)
            self.apply_overlay(buf, overlay, offset, length)
            ctrl._reply(req, 0, buf)
            ctrl.stats["read_hits"] += 1
            return
        for line in overlay:
            line.pins += 1
        op = ctrl._disk_op(ReadOp(req, lun, offset, length, overlay))
        ctrl.out.append(A.DiskRead(op, lun, offset, length))

    def read_done(self, entry, error, data):
        """The disk answered a read (a ReadOp): the cache's lines go over its bytes."""
        ctrl = self.ctrl
        for line in entry.overlay:
            line.pins -= 1
        if error:
            ctrl.stats["read_errors"] += 1
            ctrl._reply(entry.req, EIO)
        else:
            buf = data if isinstance(data, bytearray) else bytearray(data)
            assert len(buf) == entry.length
            self.apply_overlay(buf, entry.overlay, entry.offset, entry.length)
            ctrl._reply(entry.req, 0, buf)
        for line in entry.overlay:
            self.maybe_free(line)

    def _covers(self, overlay, offset, length, first, last):
        if len(overlay) != last - first + 1:
            return False
        bs = self.block_size
        for line in overlay:
            start = (line.key & ((1 << LUN_SHIFT) - 1)) * bs
            need = sector_bits(max(offset, start) - start, min(offset + length, start + bs) - start)
            if line.bitmap & need != need:
                return False
        return True

    def apply_overlay(self, buf, overlay, offset, length):
        """Lay the cache lines `overlay` over `buf`, the bytes of [offset, offset + length)."""
        bs, seg = self.block_size, self.primary
        for line in overlay:
            start = (line.key & ((1 << LUN_SHIFT) - 1)) * bs
            lo, hi = max(offset, start) - start, min(offset + length, start + bs) - start
            view = seg.data(line.block)
            if line.bitmap == self.cache.full_bitmap:
                buf[start + lo - offset:start + hi - offset] = view[lo:hi]
                continue
            for s, e in dirty_runs(line.bitmap, lo // SECTOR_BYTES, hi // SECTOR_BYTES):
                a, b = s * SECTOR_BYTES, e * SECTOR_BYTES
                buf[start + a - offset:start + b - offset] = view[a:b]

    # -- flush, trim, zeroes ----------------------------------------------------------

    def host_flush(self, req, lun):
        """Acknowledged writes are already in NVRAM (both controllers' when mirrored): nothing to wait for."""
        self.ctrl._reply(req, self.ctrl._check_range(lun, 0, 0))

    def host_trim(self, req, lun, offset, length):
        """TRIM is advisory in NBD; the cache keeps its data, so nothing is discarded.
        A trim beyond the end is EINVAL (the spec keeps ENOSPC for writes)."""
        self.ctrl._reply(req, EINVAL if self.ctrl._check_range(lun, offset, length) else 0)

    def host_write_zeroes(self, req, lun, offset, length, fua):
        """Zeroes travel as a range: the partner's LUN gets the request forwarded as offset and
        length; here they go into the cache in pieces, a few at a time, so a 4 GiB request
        costs a few MiB of memory and never floods the link."""
        ctrl = self.ctrl
        error = ctrl._check_range(lun, offset, length)
        if error or length == 0:
            ctrl._reply(req, error or EINVAL)
            return
        if ctrl.ownership.partner_owns(lun):
            ctrl.last_host_io_ms = ctrl.now_ms
            ctrl._forward(req, M.IoOp.WRITE_ZEROES, lun, offset, length, None, fua)
            return
        self.zeroes.start(req, lun, offset, length, fua)

    def piece_done(self, piece, error):
        """A piece of WRITE_ZEROES (a ZeroPiece) was answered."""
        self.zeroes.piece_done(piece, error)
