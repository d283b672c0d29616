"""Simulated inter-controller link: byte chunks between two controllers on virtual time.

Frames go through the real framers (hal/backends/framing.py), so corruption is byte
level and only the CRC32C can catch it. Each connection has an epoch;
bytes of an old connection are never delivered to a newer one.

Two transports, as on real hardware:
- reliable (a socket, `StreamFramer`): bytes arrive in order, exactly once;
  a partition holds them back until it heals (TCP retransmits), unless the
  connection is reset first.
- lossy (a serial line, `CobsFramer`, `Params(reliable_transport=False)`):
  each frame is a chunk that may be dropped, duplicated or, rarely, held
  back so later ones overtake it (in order otherwise, like a wire); a
  partition drops it.

Faults injected (seeded, from `LinkFaults`):
- delay with jitter, and a slow peer (a per-direction delay factor);
- drop, duplication and reordering (lossy transport only);
- corruption: one byte of a chunk flipped (both transports);
- partition, one-way or both ways, and heal.
"""
from firmware.formats import frame as F

from hal.backends.framing import CobsFramer, StreamFramer


class LinkFaults:
    def __init__(self, delay_us=(20, 300), p_drop=0.0, p_dup=0.0, p_reorder=0.0, p_corrupt=0.0):
        self.delay_us = delay_us
        self.p_drop = p_drop
        self.p_dup = p_dup
        self.p_reorder = p_reorder
        self.p_corrupt = p_corrupt


class SimLink:
    """Direction d carries bytes from controller d to controller 1 - d."""

    def __init__(self, rng, reliable: bool, faults: LinkFaults):
        self.rng = rng
        self.reliable = reliable
        self.faults = faults
        self.conn = 0                      # epoch: bumped by every close and every connect
        self.up = False
        self.blocked = [False, False]      # partition, per direction
        self.slow = [1, 1]                 # delay factor, per direction (a slow peer)
        self.held = [[], []]               # reliable transport: bytes waiting out a partition
        self.last_arrival_us = [0, 0]
        self.inflight_bytes = [0, 0]
        self.framers = [None, None]
        self.damaged = False               # reliable transport: this connection lost bytes to corruption
        self.stats = {"chunks": 0, "dropped": 0, "duplicated": 0, "corrupted": 0, "reordered": 0}

    def connect(self):
        self.conn += 1
        self.up = True
        cls = StreamFramer if self.reliable else CobsFramer
        self.framers = [cls(f"sim{d}") for d in range(2)]
        self.held = [[], []]
        self.inflight_bytes = [0, 0]
        self.last_arrival_us = [0, 0]
        self.damaged = False

    def close(self):
        if self.up:
            self.conn += 1
            self.up = False
            self.held = [[], []]
            self.inflight_bytes = [0, 0]

    def transmit(self, src, buffers, now_us):
        """Send the buffers of whole frames; return deliveries [(t_us, dst, conn, chunk)]."""
        if not self.up:
            return []
        data = b"".join(buffers)
        if self.reliable:
            return self._send_chunk(src, data, now_us, ordered=True)
        out = []
        for frame in F.split_frames(data):
            chunk = b"".join(self.framers[src].encode([frame]))
            out += self._lossy(src, chunk, now_us)
        return out

    def _lossy(self, src, chunk, now_us):
        f, rng = self.faults, self.rng
        if rng.random() < f.p_drop:
            self.stats["dropped"] += 1
            return []
        out = self._send_chunk(src, chunk, now_us, ordered=False)
        if rng.random() < f.p_dup:
            self.stats["duplicated"] += 1
            out += self._send_chunk(src, chunk, now_us, ordered=False)
        return out

    def _send_chunk(self, src, chunk, now_us, ordered):
        f, rng = self.faults, self.rng
        self.stats["chunks"] += 1
        if rng.random() < f.p_corrupt:
            self.stats["corrupted"] += 1
            self.damaged = self.damaged or ordered
            pos = rng.randrange(len(chunk))
            chunk = chunk[:pos] + bytes([chunk[pos] ^ (1 << rng.randrange(8))]) + chunk[pos + 1:]
        if self.blocked[src]:
            if ordered:
                self.held[src].append(chunk)
            return []
        lo, hi = f.delay_us
        t = max(now_us + rng.randint(lo, hi) * self.slow[src], self.last_arrival_us[src])
        if not ordered and rng.random() < f.p_reorder:
            self.stats["reordered"] += 1          # this chunk is late; the ones after it overtake
            t += rng.randint(hi, 10 * hi)
        else:
            self.last_arrival_us[src] = t         # wires and serial lines keep their order
        self.inflight_bytes[src] += len(chunk)
        return [(t, 1 - src, self.conn, chunk)]

    def receive(self, dst, conn, chunk):
        """Bytes arrive at `dst`: return the whole, CRC-checked frames (none if stale)."""
        if conn != self.conn:
            return []
        self.inflight_bytes[1 - dst] -= len(chunk)
        return self.framers[dst].feed(chunk)

    def partition(self, directions):
        for d in directions:
            self.blocked[d] = True

    def heal(self, now_us):
        """Lift every partition; return the deliveries of bytes held back meanwhile."""
        out = []
        for d in range(2):
            self.blocked[d] = False
            held, self.held[d] = self.held[d], []
            for chunk in held:
                out += self._send_chunk(d, chunk, now_us, ordered=True)
        return out

    def quiet(self) -> bool:
        return not any(self.inflight_bytes) and not any(self.held)
