"""The replica record: two bitmaps by address range and the generation header, in NVRAM.

Owns the byte-level rules of formats/replica_record.py for one controller:
which bit stands for which range of which LUN, setting and clearing bits
(each a one-byte store, returned as a range to persist), counting them, and
the header (role, flags, generation identifiers) written to alternate slots.

SENT holds the ranges this controller copied (or must copy) to the peer that
the peer has not destaged: the primary's record of claims 7-10. RECEIVED
holds the ranges the peer copied here that the peer has not destaged: the
symmetric record of claims 14-17. Both live in NVRAM and survive restarts.
"""
from ..formats import FormatError
from ..formats import messages as M
from ..formats import replica_record as R

SENT, RECEIVED = 0, 1


class Record:
    def __init__(self, nv, region_offset, region_bytes, lun_sizes, range_bytes, initial_uuid,
                 initial_role):
        assert range_bytes >= 4096 and not range_bytes & (range_bytes - 1)
        self.nv = nv
        self.base = region_offset
        self.range_bytes = range_bytes
        self.lun_sizes = list(lun_sizes)
        self.lun_ranges = [(size + range_bytes - 1) // range_bytes for size in lun_sizes]
        self.lun_base = [sum(self.lun_ranges[:i]) for i in range(len(lun_sizes))]
        self.map_bits = sum(self.lun_ranges)
        need = R.region_bytes_needed(self.map_bits)
        if need > region_bytes:
            raise FormatError(f"the replica record needs {need} bytes of NVRAM bitmap region for "
                              f"{self.map_bits} ranges of {range_bytes} B; the region has {region_bytes}")
        sent, received = R.map_offsets(self.map_bits)
        self.map_offset = (region_offset + sent, region_offset + received)
        self.map_len = R.map_bytes(self.map_bits)
        header, self.errors = R.read_header_untrusted(nv, region_offset, "replica record")
        self.formatted = header is None or header["range_bytes"] != range_bytes or \
            header["map_bits"] != self.map_bits
        if self.formatted:
            header = dict(role=initial_role, flags=M.STATE_FRESH, counter=0, generation=1,
                          current_uuid=initial_uuid, bitmap_uuid=0, history0=0, history1=0,
                          range_bytes=range_bytes, map_bits=self.map_bits)
            for which in (SENT, RECEIVED):
                start = self.map_offset[which]
                nv[start:start + self.map_len] = bytes(self.map_len)
        self.h = header
        self.counts = [self._popcount(SENT), self._popcount(RECEIVED)]

    # -- header ---------------------------------------------------------------

    def __getattr__(self, name):
        h = self.__dict__.get("h")
        if h is not None and name in h:
            return h[name]
        raise AttributeError(name)

    def update(self, **values) -> list:
        """Change header fields; return the ranges to persist (the new slot)."""
        self.h.update(values)
        self.h["counter"] += 1
        slot = R.pack_header_into(self.nv, self.base, self.h)
        return [(slot, R.SLOT_BYTES)]

    def format_ranges(self) -> list:
        """After a fresh start: store the header and persist it and both zeroed bitmaps."""
        persists = self.update()
        return persists + [(self.map_offset[w], self.map_len) for w in (SENT, RECEIVED)]

    def has(self, flag) -> bool:
        return bool(self.h["flags"] & flag)

    # -- bits -----------------------------------------------------------------

    def ranges_of(self, lun, offset, length):
        rb = self.range_bytes
        return range(offset // rb, (offset + length - 1) // rb + 1)

    def span(self, lun, r):
        """(offset, length) in bytes of range r of `lun`."""
        start = r * self.range_bytes
        return start, min(self.range_bytes, self.lun_sizes[lun] - start)

    def index(self, lun, r) -> int:
        assert 0 <= r < self.lun_ranges[lun]
        return self.lun_base[lun] + r

    def test(self, which, lun, r) -> bool:
        i = self.index(lun, r)
        return bool(self.nv[self.map_offset[which] + (i >> 3)] >> (i & 7) & 1)

    def set(self, which, lun, ranges) -> list:
        persists = []
        base = self.map_offset[which]
        nv = self.nv
        for r in ranges:
            i = self.index(lun, r)
            byte = base + (i >> 3)
            old = nv[byte]
            if not old >> (i & 7) & 1:
                nv[byte] = old | 1 << (i & 7)
                self.counts[which] += 1
                persists.append((byte, 1))
        return persists

    def clear(self, which, lun, r) -> list:
        i = self.index(lun, r)
        byte = self.map_offset[which] + (i >> 3)
        old = self.nv[byte]
        if not old >> (i & 7) & 1:
            return []
        self.nv[byte] = old & ~(1 << (i & 7))
        self.counts[which] -= 1
        return [(byte, 1)]

    def clear_all(self, which) -> list:
        start = self.map_offset[which]
        self.nv[start:start + self.map_len] = bytes(self.map_len)
        self.counts[which] = 0
        return [(start, self.map_len)]

    def members(self, which):
        """Every set (lun, r), in address order."""
        start = self.map_offset[which]
        data = bytes(self.nv[start:start + self.map_len])
        lun = 0
        for byte_no, value in enumerate(data):
            if not value:
                continue
            for bit in range(8):
                if value >> bit & 1:
                    i = byte_no * 8 + bit
                    while lun + 1 < len(self.lun_base) and i >= self.lun_base[lun + 1]:
                        lun += 1
                    yield lun, i - self.lun_base[lun]

    def _popcount(self, which) -> int:
        start = self.map_offset[which]
        return int.from_bytes(self.nv[start:start + self.map_len], "little").bit_count()

    def bytes_of(self, members) -> int:
        return sum(self.span(lun, r)[1] for lun, r in members)


def runs(indices):
    """Merge sorted range numbers into (first, count) runs."""
    out = []
    for r in indices:
        if out and out[-1][0] + out[-1][1] == r:
            out[-1][1] += 1
        else:
            out.append([r, 1])
    return [tuple(x) for x in out]
