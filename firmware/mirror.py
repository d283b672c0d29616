"""The partner's side of mirroring: this controller's mirror segment.

Owns what the partner keeps of the owner's cache (claims 5.2: each
controller knows the content of the other's cache): the mirror blocks the
owner wrote, their metadata (LUN, LBA, dirty bitmap, cache id, sequence;
claims 5.3), and the atomic commit of a multi-block host write: a group's
blocks are persisted as they arrive but become part of the view only when
the last one is in, and the commit record is advanced (claims 1.10). A group
cut short by a crash is dropped on recovery because the commit record never
reached it. Flush-begin marks a mirror copy temporarily invalid (5.12);
flush-done frees it for reuse (5.13, 5.14). During a resync every block the
owner does not resend is freed when the resync is done.
"""

from .cache import LUN_SHIFT, SECTOR_BYTES
from .formats import nvram as N
from .segment import DIRTY, FLUSHING, FREE


class MirrorError(Exception):
    """The owner sent a mirror message that cannot be right (an operating fault)."""


class MirrorBlock:
    __slots__ = ("key", "lun", "lba", "seq", "bitmap", "state", "generation")

    def __init__(self, key, lun, lba, seq, bitmap, state, generation):
        self.key = key
        self.lun = lun
        self.lba = lba
        self.seq = seq
        self.bitmap = bitmap
        self.state = state
        self.generation = generation        # the owner's generation of the LUN it was mirrored at


class MirrorSide:
    def __init__(self, segment, sectors_per_line: int):
        self.segment = segment
        self.sectors_per_line = sectors_per_line
        self.blocks = [None] * segment.blocks      # block -> MirrorBlock (committed)
        self.view = {}                             # key -> block: the owner's cache content
        self.group = []                            # blocks of the group being received
        self.group_seq = -1
        self.unconfirmed = None                    # during a resync: blocks not yet resent
        self.undecided = set()                     # not resent, kept until their LUN's owner is known

    @property
    def used_blocks(self) -> int:
        return len(self.view)

    def recover(self, scan):
        """Rebuild the view from a segment scan (newest version of each key wins)."""
        persists = []
        for rb in sorted(scan.blocks, key=lambda b: b.seq):
            key = (rb.lun << LUN_SHIFT) | (rb.lba * SECTOR_BYTES // self.segment.block_size)
            old = self.view.get(key)
            if old is not None:
                persists.append(self._free(old))
            self.view[key] = rb.index
            self.blocks[rb.index] = MirrorBlock(key, rb.lun, rb.lba, rb.seq, rb.bitmap, rb.state, rb.generation)
        for index, _reason in scan.dropped:
            if index >= 0:
                persists.append(self.segment.store_free(index))
        return persists

    def write(self, lun, seq, generation, first, gc, entries, data, keep=lambda lun: False):
        """Persist blocks [first, first + len(entries)) of write `seq`, a group of `gc` blocks.

        `entries` are (cache_id, lba, data_crc, bitmap) and `data` their blocks back to
        back. Return (persist ranges, committed group seq or None): the group joins
        the view only once its last block is in (claims 1.10). A block the owner reused
        replaces ours, unless ours is of a LUN we `keep` (our takeover replays it): then
        the write is refused whole, before anything changed.
        """
        seg = self.segment
        bs = seg.block_size
        count = len(entries)
        if not count or first + count > gc or len(data) != count * bs:
            raise MirrorError(f"mirror write of blocks {first}+{count} of {gc}, {len(data)} bytes")
        for cache_id, *_ in entries:
            held = self.blocks[cache_id] if cache_id < seg.blocks else None
            if held is not None and keep(held.lun):
                raise MirrorError(f"mirror write to block {cache_id}, which holds a line of lun{held.lun} "
                                  f"our takeover replays")
        persists = []
        if first == 0:
            persists.extend(self.abandon_group())
            self.group_seq = seq
        elif seq != self.group_seq or len(self.group) != first:
            raise MirrorError(f"mirror blocks {first}/{gc} of write {seq} arrived out of their group")
        blocks, group, crc32c, nv, base = self.blocks, self.group, N.crc32c_raw, seg.nv, seg.data_base
        datas, descs, store = [], [], seg.store_descriptor
        for i, (cache_id, lba, data_crc, bitmap) in enumerate(entries):
            piece = data[i * bs:(i + 1) * bs]
            if cache_id >= seg.blocks:
                raise MirrorError(f"mirror write to block {cache_id} of {seg.blocks}")
            if crc32c(piece) != data_crc:
                raise MirrorError(f"mirror write to block {cache_id}: data CRC32C mismatch")
            if blocks[cache_id] is not None:      # the owner reused it: its decision wins
                persists.append(self._free(cache_id))
            offset = base + cache_id * bs
            nv[offset:offset + bs] = piece        # data stored before its descriptor
            datas.append((offset, bs))
            descs.append(store(cache_id, DIRTY, lun, first + i, gc, lba, seq, generation, data_crc, bitmap))
            group.append((cache_id, lun, lba, bitmap, generation))
        persists += datas
        persists += descs
        if len(group) < gc:
            return persists, None
        self._commit(seq, persists)
        return persists, seq

    def _commit(self, seq, persists):
        block_size = self.segment.block_size
        for cache_id, lun, lba, bitmap, generation in self.group:
            key = (lun << LUN_SHIFT) | (lba * SECTOR_BYTES // block_size)
            old = self.view.get(key)
            if old is not None and old != cache_id:
                persists.append(self._free(old))
            self.view[key] = cache_id
            self.blocks[cache_id] = MirrorBlock(key, lun, lba, seq, bitmap, DIRTY, generation)
            if self.unconfirmed is not None:
                self.unconfirmed.discard(cache_id)
        self.group = []
        if seq > self.segment.committed_seq:
            persists.append(self.segment.store_commit(seq))

    def abandon_group(self):
        """Free the blocks of a group that will never complete (cut by a link drop or resync)."""
        persists = [self.segment.store_free(cache_id) for cache_id, *_ in self.group]
        self.group = []
        return persists

    def _free(self, cache_id):
        block = self.blocks[cache_id]
        self.blocks[cache_id] = None
        self.undecided.discard(cache_id)
        if block is not None and self.view.get(block.key) == cache_id:
            del self.view[block.key]
        return self.segment.store_free(cache_id)

    def flush_begin(self, refs):
        persists = []
        for cache_id, seq in refs:
            block = self.blocks[cache_id] if cache_id < len(self.blocks) else None
            if block is not None and block.seq == seq and block.state == DIRTY:
                # Kept in memory only: after a crash a FLUSHING copy is replayed exactly
                # like a DIRTY one (it is the same data), so persisting it buys nothing.
                block.state = FLUSHING
        return persists

    def flush_done(self, refs):
        persists = []
        for cache_id, seq in refs:
            block = self.blocks[cache_id] if cache_id < len(self.blocks) else None
            if block is not None and block.seq == seq:
                persists.append(self._free(cache_id))
        return persists

    def sync_begin(self):
        """The owner resends its live lines: until then every block is unconfirmed (sync_done decides)."""
        persists = self.abandon_group()
        self.unconfirmed = {i for i, b in enumerate(self.blocks) if b is not None}
        self.undecided = set()
        return persists

    def sync_done(self, voidable=lambda lun: True, undecided=lambda lun: False, ours=lambda lun: False):
        """Free what the owner did not resend; blocks of `undecided` LUNs wait for settle(), and
        those of LUNs no longer `voidable` (taken over since sync_begin) are kept. Blocks of LUNs
        that are `ours` go, resent or not: the peer resent lines of a LUN it no longer owns."""
        persists = [self._free(i) for i, b in enumerate(self.blocks) if b is not None and ours(b.lun)]
        for i in sorted(self.unconfirmed or ()):
            block = self.blocks[i]
            if block is None:
                continue
            if undecided(block.lun):
                self.undecided.add(i)
            elif voidable(block.lun):
                persists.append(self._free(i))
        self.unconfirmed = None
        return persists

    def has_undecided(self, lun) -> bool:
        blocks = self.blocks
        return any(blocks[i] is not None and blocks[i].lun == lun for i in self.undecided)

    def settle(self, lun, keep):
        """`lun`'s owner is known: its blocks the last resync did not resend are kept or freed."""
        mine = [i for i in self.undecided if self.blocks[i] is not None and self.blocks[i].lun == lun]
        self.undecided.difference_update(mine)
        return [] if keep else [self._free(i) for i in sorted(mine)]

    def counts(self):
        states = [b.state for b in self.blocks if b is not None]
        return {"mirror_blocks": len(states), "mirror_flushing": states.count(FLUSHING),
                "mirror_free": len(self.blocks) - len(states)}


__all__ = ["MirrorSide", "MirrorError", "FREE"]
