"""Simulated NVRAM: a bytearray with a crash model for stores not yet persisted.

The firmware stores straight into `buffer` (as into mapped NVRAM) and then
asks for `persist(offset, length)`. This backend keeps a shadow copy of what
is durable: `persist` copies the range into the shadow. Anything stored since
its range was last persisted differs from the shadow, so at a crash it is
found by comparing the two.

Faults injected (at `crash(rng)`, seeded):
- every unpersisted 512 B sector is independently kept (the store reached
  the device after all), lost (back to its persisted bytes) or torn: a
  random subset of its 8-byte words is new, the rest old;
- persisted bytes are never changed.
`persisted` is the worst case a crash can leave (everything unpersisted
lost); the checkers scan it to see what a failover would find.
"""
from hal.backends.interfaces import Nvram

SECTOR_BYTES = 512
WORD_BYTES = 8
CHUNK_BYTES = 4096
KEEP, LOSE, TEAR = "keep", "lose", "tear"


class SimNvram(Nvram):
    durability = "sim"

    def __init__(self, size_bytes: int):
        assert size_bytes % CHUNK_BYTES == 0
        self.size_bytes = size_bytes
        self.mem = bytearray(size_bytes)
        self.shadow = bytearray(size_bytes)      # the durable content
        self._view = memoryview(self.mem)
        self.persists = 0

    @property
    def buffer(self) -> memoryview:
        return self._view

    @property
    def persisted(self) -> memoryview:
        return memoryview(self.shadow)

    def persist(self, offset: int, length: int) -> None:
        assert 0 <= offset and offset + length <= self.size_bytes, (offset, length)
        self.shadow[offset:offset + length] = self.mem[offset:offset + length]
        self.persists += 1

    def unpersisted_sectors(self):
        """Indices of the 512 B sectors whose content differs from the durable copy."""
        mem, shadow = self.mem, self.shadow
        for base in range(0, self.size_bytes, CHUNK_BYTES):
            if mem[base:base + CHUNK_BYTES] == shadow[base:base + CHUNK_BYTES]:
                continue
            for off in range(base, base + CHUNK_BYTES, SECTOR_BYTES):
                if mem[off:off + SECTOR_BYTES] != shadow[off:off + SECTOR_BYTES]:
                    yield off // SECTOR_BYTES

    def crash(self, rng, p_keep=0.35, p_lose=0.35) -> dict:
        """Power is gone: decide the fate of every unpersisted sector; return counts."""
        counts = {KEEP: 0, LOSE: 0, TEAR: 0}
        for sector in list(self.unpersisted_sectors()):
            roll = rng.random()
            fate = KEEP if roll < p_keep else LOSE if roll < p_keep + p_lose else TEAR
            counts[fate] += 1
            off = sector * SECTOR_BYTES
            if fate == LOSE:
                self.mem[off:off + SECTOR_BYTES] = self.shadow[off:off + SECTOR_BYTES]
            elif fate == TEAR:
                self._tear(off, rng)
        self.shadow[:] = self.mem                  # after restart, this is what the device holds
        return counts

    def _tear(self, off, rng):
        """Each 8-byte word of the sector independently new or old (a torn sector)."""
        for w in range(off, off + SECTOR_BYTES, WORD_BYTES):
            if rng.random() < 0.5:
                self.mem[w:w + WORD_BYTES] = self.shadow[w:w + WORD_BYTES]

    def close(self) -> None:
        pass          # the controller may still hold views into the buffer
