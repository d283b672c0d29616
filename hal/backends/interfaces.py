"""The HAL protocols: small ABCs, one per kind of hardware.

Backends implement one of these each, in a file of their own. Operating
faults (a missing device, EIO, a cut link) raise HalError or OSError and are
turned into firmware events by the runtime; they are never asserts.
"""
from __future__ import annotations

import abc


class HalError(OSError):
    """A device fault or misconfiguration the runtime reports as an event."""


class Nvram(abc.ABC):
    """Byte-addressable non-volatile memory, mapped: stores go straight into `buffer`."""

    size_bytes: int
    durability: str          # "controller", "host" or "device" (see DESIGN.md)

    @property
    @abc.abstractmethod
    def buffer(self) -> memoryview:
        """Writable view of the whole NVRAM."""

    @abc.abstractmethod
    def persist(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) durable in this backend's power domain."""

    @abc.abstractmethod
    def close(self) -> None: ...


class Disk(abc.ABC):
    """One disk of the array: sector-granular reads and writes."""

    name: str
    size_bytes: int
    sector_size_bytes: int = 512

    @abc.abstractmethod
    def read_into(self, offset: int, buf) -> None:
        """Fill `buf` from `offset`; raise OSError (EIO) on a media error."""

    @abc.abstractmethod
    def write(self, offset: int, data) -> None: ...

    @abc.abstractmethod
    def flush(self) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def read(self, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        self.read_into(offset, buf)
        return buf

    def data_ranges(self, offset: int, length: int) -> list:
        """The (start, end) byte ranges of [offset, offset + length) that may hold data.

        Everything outside them reads as zeroes and was never written (a hole of a
        sparse file). A backend that cannot tell says all of it may hold data: that
        is always true, and the default.
        """
        return [(offset, offset + length)]


class LinkTransport(abc.ABC):
    """A connected byte stream to the partner (socket, serial line, virtio port)."""

    name: str

    @abc.abstractmethod
    def fileno(self) -> int: ...

    @abc.abstractmethod
    def recv_into(self, buf) -> int:
        """Read what is there without blocking; 0 means the peer closed."""

    @abc.abstractmethod
    def send(self, buffers: list) -> int:
        """Write as much of `buffers` as fits without blocking; return bytes written."""

    @abc.abstractmethod
    def close(self) -> None: ...


class LinkEndpoint(abc.ABC):
    """Makes LinkTransports: listens or connects, with reconnect backoff done by the caller."""

    @abc.abstractmethod
    def connect(self) -> LinkTransport | None:
        """Try once, without blocking long; None if the peer is not there yet."""

    def listen_fileno(self) -> int | None:
        """A listening socket to wait on, for the accepting end; None otherwise."""
        return None

    def close(self) -> None:
        pass


class Framer(abc.ABC):
    """Turns link frames into transport bytes and back, resynchronising after garbage."""

    @abc.abstractmethod
    def encode(self, frame_buffers: list) -> list:
        """The buffers to write for one frame."""

    @abc.abstractmethod
    def feed(self, data) -> list:
        """Consume received bytes; return the complete frames (bytes-like) found."""

    dropped_bytes: int = 0   # garbage skipped while resynchronising


class Clock(abc.ABC):
    @abc.abstractmethod
    def monotonic_ns(self) -> int: ...

    def monotonic_ms(self) -> int:
        return self.monotonic_ns() // 1_000_000
