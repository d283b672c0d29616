"""One NVRAM cache segment (primary or mirror): block data, descriptors, commit record.

Owns the byte-level rules of firmware/formats/nvram.py for one segment: where
block i's data and descriptor live, how a descriptor is stored (and which
range must then be persisted), and the recovery scan that rebuilds the
segment's state from NVRAM alone. Stores go straight into the NVRAM buffer;
callers turn the returned ranges into Persist actions, data before
descriptor (the crash-consistent order documented in the format module).
"""
from .formats import FormatError
from .formats import nvram as N

FREE, DIRTY, FLUSHING = N.BlockState.FREE, N.BlockState.DIRTY, N.BlockState.FLUSHING


class RecoveredBlock:
    __slots__ = ("index", "state", "lun", "lba", "seq", "group_index", "group_count",
                 "generation", "data_crc", "bitmap")


class ScanResult:
    """What a segment holds after a restart: valid blocks, and every problem found."""

    def __init__(self):
        self.blocks = []          # RecoveredBlock, valid and part of a committed or complete group
        self.dropped = []         # (index, reason): torn/corrupt records, incomplete groups
        self.committed_seq = 0
        self.commit_counter = 0
        self.max_seq = 0


class Segment:
    def __init__(self, nv, geometry: N.Geometry, mirror: bool):
        self.nv = nv
        self.geometry = geometry
        self.mirror = mirror
        self.segment_id = 1 if mirror else 0
        self.blocks = geometry.mirror_blocks if mirror else geometry.primary_blocks
        self.block_size = geometry.block_size_bytes
        self.data_base = geometry.data_offset(mirror, 0)
        self.desc_base = geometry.desc_offset(mirror, 0)
        self.commit_counter = 0
        self.committed_seq = 0

    def data_offset(self, index: int) -> int:
        return self.data_base + index * self.block_size

    def data(self, index: int):
        offset = self.data_base + index * self.block_size
        return self.nv[offset:offset + self.block_size]

    def store_descriptor(self, index, state, lun, group_index, group_count, lba, seq,
                         generation, data_crc, bitmap: int):
        """Store block `index`'s descriptor; return (offset, length) to persist."""
        offset = self.desc_base + index * N.DESC_SIZE_BYTES
        N.pack_descriptor_into(self.nv, offset, state, lun, group_index, group_count, lba, seq,
                               generation, index, data_crc, bitmap.to_bytes(N.BITMAP_BYTES, "big"))
        return offset, N.DESC_SIZE_BYTES

    def store_free(self, index):
        offset = self.desc_base + index * N.DESC_SIZE_BYTES
        self.nv[offset:offset + N.DESC_SIZE_BYTES] = N.FREE_DESCRIPTOR
        return offset, N.DESC_SIZE_BYTES

    def store_commit(self, committed_seq: int):
        """Record that every group up to `committed_seq` is committed; return the range to persist."""
        self.commit_counter += 1
        self.committed_seq = committed_seq
        offset = N.pack_commit_into(self.nv, self.segment_id, self.commit_counter, committed_seq)
        return offset, N.COMMIT_SLOT_BYTES

    def scan(self) -> ScanResult:
        """Rebuild this segment's state from NVRAM alone (claims 5: restart, failover)."""
        result = ScanResult()
        counter, committed, errors = N.read_commit_untrusted(self.nv, self.segment_id)
        if counter >= N.COMMIT_COUNTER_MAX:
            # Intact checksums around a counter no controller reaches (2^64 commits): the next
            # commit could not be numbered above it, and the slot it picks would not be newer.
            name = "mirror" if self.mirror else "primary"
            raise FormatError(f"the NVRAM's {name} commit record counter is {counter}, the largest there "
                              f"is: no commit can follow it; not an NVRAM this firmware wrote")
        self.commit_counter, self.committed_seq = counter, committed
        result.commit_counter, result.committed_seq = counter, committed
        result.dropped.extend((-1, e) for e in errors)
        candidates = [b for b in (self._read_block(i, result) for i in range(self.blocks)) if b]
        groups = {}
        for block in candidates:
            groups.setdefault(block.seq, []).append(block)
        for seq, members in groups.items():
            result.max_seq = max(result.max_seq, seq)
            if seq > committed and len(members) != members[0].group_count:
                for block in members:
                    result.dropped.append((block.index, f"incomplete write seq {seq}: "
                                           f"{len(members)} of {members[0].group_count} blocks"))
                continue
            result.blocks.extend(members)
        result.max_seq = max(result.max_seq, committed)
        return result

    def _read_block(self, index, result):
        offset = self.desc_base + index * N.DESC_SIZE_BYTES
        where = f"{'mirror' if self.mirror else 'primary'} descriptor {index} at NVRAM offset {offset}"
        try:
            rec = N.parse_descriptor_untrusted(self.nv, offset, where)
        except FormatError as exc:
            if any(self.nv[offset:offset + N.DESC_SIZE_BYTES]):
                result.dropped.append((index, str(exc)))
            return None
        if rec.state == FREE:
            return None
        if rec.cache_id != index:
            result.dropped.append((index, f"{where}: names cache id {rec.cache_id}"))
            return None
        if N.crc32c(self.data(index)) != rec.data_crc:
            result.dropped.append((index, f"{where}: block data CRC32C mismatch (torn data)"))
            return None
        block = RecoveredBlock()
        block.index, block.state, block.lun, block.lba, block.seq = index, rec.state, rec.lun, rec.lba, rec.seq
        block.group_index, block.group_count = rec.group_index, rec.group_count
        block.generation, block.data_crc = rec.generation, rec.data_crc
        block.bitmap = int.from_bytes(rec.dirty_bitmap, "big")
        return block
