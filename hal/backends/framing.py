"""Framers: link frames into transport bytes and back, resynchronising after garbage.

Two framers, one per kind of byte stream:

- `StreamFramer` for sockets. Frames go on the wire as they are; the
  receiver finds them by the header magic and checks them with the header
  bounds and the CRC32C trailer (which covers the MAC trailer, if any). After a bad header or CRC it skips ONE
  byte and rescans for the next magic, so a frame hiding behind garbage is
  still found.
- `CobsFramer` for serial lines and virtio ports, which can drop or corrupt
  bytes. Each frame is COBS-encoded and delimited by 0x00 on both sides, so
  garbage between frames is isolated into a chunk of its own and the next
  frame is found at the next delimiter.

Both keep received bytes in one bytearray with a read offset (no quadratic
copying) and bound it: at most one maximal frame plus the last chunk fed.
Frames are returned as `bytes`, already validated by the CRC. The framers
hold no key: a frame's MAC is the link session's to check (firmware/link_auth.py).
"""
from __future__ import annotations

from cobs import cobs

from firmware.formats import FormatError
from firmware.formats.frame import (AUTH_TRAILER_SIZE_BYTES, FRAME_MAGIC, HEADER_SIZE_BYTES,
                                    PAYLOAD_MAX_BYTES, TRAILER_SIZE_BYTES, TRAILER_STRUCT, crc32c,
                                    frame_size_bytes, parse_frame_untrusted, parse_header_untrusted)

from hal.backends.interfaces import Framer

FRAME_MAX_BYTES = HEADER_SIZE_BYTES + PAYLOAD_MAX_BYTES + AUTH_TRAILER_SIZE_BYTES + TRAILER_SIZE_BYTES
_MAGIC_BYTES = FRAME_MAGIC.to_bytes(2, "big")
# COBS adds one byte per 254 plus one; two delimiters surround each frame.
COBS_CHUNK_MAX_BYTES = FRAME_MAX_BYTES + FRAME_MAX_BYTES // 254 + 2


class StreamFramer(Framer):
    """Frames over a reliable byte stream (TCP, unix socket), found by magic and CRC."""

    def __init__(self, name: str = "stream"):
        self.name = name
        self.dropped_bytes = 0
        self.frames_received = 0
        self._buf = bytearray()
        self._pos = 0           # first byte not yet consumed

    @property
    def buffered_bytes(self) -> int:
        return len(self._buf) - self._pos

    def encode(self, frame_buffers: list) -> list:
        return list(frame_buffers)

    def feed(self, data) -> list:
        self._buf += data
        frames = []
        while (frame := self._next_frame()) is not None:
            frames.append(frame)
        # Compact once per feed: what remains is less than one frame.
        if self._pos:
            del self._buf[:self._pos]
            self._pos = 0
        return frames

    def _next_frame(self) -> bytes | None:
        """Return the next valid frame, skipping garbage; None when more bytes are needed."""
        buf = self._buf
        while True:
            if not self._seek_magic():
                return None
            start = self._pos
            if len(buf) - start < HEADER_SIZE_BYTES:
                return None
            try:
                head = parse_header_untrusted(bytes(buf[start:start + HEADER_SIZE_BYTES]))
            except FormatError:
                self._skip(1)
                continue
            end = start + frame_size_bytes(head) - TRAILER_SIZE_BYTES
            if len(buf) < end + TRAILER_SIZE_BYTES:
                return None
            with memoryview(buf) as view:
                ok = crc32c(view[start:end]) == TRAILER_STRUCT.unpack_from(buf, end)[0]
            if not ok:
                self._skip(1)
                continue
            self._pos = end + TRAILER_SIZE_BYTES
            self.frames_received += 1
            with memoryview(buf) as view:
                return bytes(view[start:self._pos])     # one copy (a bytearray slice would be two)

    def _seek_magic(self) -> bool:
        """Move to the next magic; keep a trailing byte that may begin one."""
        found = self._buf.find(_MAGIC_BYTES, self._pos)
        if found < 0:
            keep = 1 if self._buf[-1:] == _MAGIC_BYTES[:1] else 0
            self._skip(len(self._buf) - self._pos - keep)
            return False
        self._skip(found - self._pos)
        return True

    def _skip(self, count: int):
        self._pos += count
        self.dropped_bytes += count


class CobsFramer(Framer):
    """Frames over a lossy byte stream (UART, pty, virtio port): COBS, 0x00-delimited."""

    def __init__(self, name: str = "cobs"):
        self.name = name
        self.dropped_bytes = 0
        self.dropped_chunks = 0
        self.frames_received = 0
        self._buf = bytearray()
        self._discarding = False   # an oversized chunk: drop until the next delimiter

    @property
    def buffered_bytes(self) -> int:
        return len(self._buf)

    def encode(self, frame_buffers: list) -> list:
        # The leading delimiter ends whatever garbage came before this frame.
        return [b"\x00" + cobs.encode(b"".join(frame_buffers)) + b"\x00"]

    def feed(self, data) -> list:
        buf = self._buf
        # Bytes kept from earlier feeds hold no delimiter: search only the new ones, so a
        # large frame arriving in small pieces is scanned once.
        search = len(buf)
        buf += data
        frames, pos = [], 0
        while (end := buf.find(0, search)) >= 0:
            if self._discarding:
                self._drop(end - pos)
                self._discarding = False
            elif end > pos:
                frame = self._decode(buf, pos, end)
                if frame is not None:
                    frames.append(frame)
            pos = search = end + 1
        del buf[:pos]
        if len(buf) > COBS_CHUNK_MAX_BYTES:
            # No delimiter within a maximal frame: this is garbage, bound memory.
            self._drop(len(buf))
            buf.clear()
            self._discarding = True
        elif self._discarding:
            self._drop(len(buf))
            buf.clear()
        return frames

    def _decode(self, buf: bytearray, start: int, end: int) -> bytes | None:
        try:
            frame = cobs.decode(buf[start:end])
            parse_frame_untrusted(frame)
        except (cobs.DecodeError, FormatError):
            self._drop(end - start)
            return None
        self.frames_received += 1
        return frame

    def _drop(self, count: int):
        if count:
            self.dropped_bytes += count
            self.dropped_chunks += 1
