"""The destage policy: when to write dirty lines to disk, and which ones first (claims 5.5).

Owns the write-back switch and its hysteresis: destaging starts when the dirty fraction of
the primary segment passes the high watermark, or at once when the controller says it is
urgent (host writes wait for free blocks, the partner's mirror is not a copy of the cache,
ownership waits for the cache to empty, no host I/O for `idle_flush_ms`, a disk failing:
each mode says what is urgent for it), and stops below the low watermark. And the choice:
oldest dirty lines first, whole lines adjacent on disk as one extent (one disk write of up to
`destage_extent_bytes_max`), never a line an older version of which is still on its way to
the disk, never a LUN whose disk may not be written now.

It decides only. Carrying the extents out (the disk writes, the flush that makes them
durable, flush-begin and flush-done to the partner) is firmware/destage.py's.
"""


class DestagePolicy:
    def __init__(self, params, cache, block_size):
        self.params = params
        self.cache = cache
        self.extent_lines = max(1, params.destage_extent_bytes_max // block_size)
        self.on = False                   # destaging now (between the watermarks it stays as it was)

    def wanted(self, urgent: bool) -> bool:
        """Should destage writes start now? `urgent`: the controller's mode says so."""
        cache, p = self.cache, self.params
        used = cache.used_blocks / cache.capacity
        if urgent or used >= p.high_watermark:
            self.on = True
        elif used <= p.low_watermark:
            self.on = False
        return self.on and bool(cache.wbq)

    def start(self):
        """Destage now, whatever the watermarks (until below the low one, unless urgent)."""
        self.on = True

    def extents(self, budget, flushing, may_write) -> list:
        """Up to `budget` extents (lists of lines adjacent on disk), oldest dirty line first.
        `flushing`: keys with a version on its way to the disk; `may_write(lun)`: its disk may
        be written now."""
        extents, taken = [], set()
        wbq, full = self.cache.wbq, self.cache.full_bitmap
        extent_max = self.extent_lines
        for key, line in wbq.items():     # oldest first; stop at the budget
            if len(extents) == budget:
                break
            if key in taken or key in flushing or not may_write(line.lun):
                continue                  # (a flushing key: an older version is still being written)
            extent = [line]
            taken.add(key)
            if line.bitmap == full:
                nxt = wbq.get(key + 1)
                while (nxt is not None and nxt.bitmap == full and len(extent) < extent_max
                       and nxt.key not in flushing and nxt.key not in taken):
                    extent.append(nxt)
                    taken.add(nxt.key)
                    nxt = wbq.get(nxt.key + 1)
            extents.append(extent)
        return extents
