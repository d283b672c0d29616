"""Link transports over serial lines: a UART or pty through pyserial, and virtio-serial ports.

- `SerialLinkEndpoint(url_or_device, baud)` opens with `serial.serial_for_url`,
  so a device (/dev/ttyUSB0, /dev/ttyS1, a pty's slave) and pyserial URLs
  (loop://) both work. pyserial puts the line in raw mode. For ports with a
  file descriptor, reads and writes go to the fd directly: pyserial's write
  with write_timeout=0 spins on EAGAIN instead of returning.
- `VirtioPortEndpoint(path)` opens /dev/virtio-ports/NAME, which is not a
  tty: plain non-blocking fd I/O. A read of 0 bytes there means the host
  side is not connected; the transport reports it as a closed link (0) and
  `connect()` returns None until the host side is back, so the caller
  retries with its backoff instead of treating it as fatal.

Both transports follow the socket convention: `recv_into` returns the bytes
read, 0 when the peer is gone, and raises BlockingIOError when nothing is
there; `send` returns the bytes written (0 when full). Serial bytes can be
lost or corrupted, so these transports pair with hal.backends.framing.CobsFramer.
"""
from __future__ import annotations

import errno
import os
import select

import serial

from hal.backends.interfaces import HalError, LinkEndpoint, LinkTransport

IOV_MAX = 1024
_GONE_ERRNOS = (errno.EIO, errno.ENXIO, errno.ENODEV, errno.EPIPE, errno.ECONNRESET)


class FdTransport(LinkTransport):
    """Non-blocking I/O on a plain file descriptor (virtio port, pty master)."""

    def __init__(self, fd: int, name: str, owns_fd: bool = True):
        os.set_blocking(fd, False)
        self.fd = fd
        self.name = name
        self._owns_fd = owns_fd

    def fileno(self) -> int:
        return self.fd

    def recv_into(self, buf) -> int:
        try:
            return os.readv(self.fd, [buf])
        except OSError as exc:
            if exc.errno in _GONE_ERRNOS:
                return 0       # the other side of a pty closed, or the port went away
            raise

    def send(self, buffers: list) -> int:
        try:
            return os.writev(self.fd, buffers[:IOV_MAX])
        except BlockingIOError:
            return 0

    def close(self) -> None:
        if self.fd >= 0 and self._owns_fd:
            os.close(self.fd)
        self.fd = -1


class SerialTransport(LinkTransport):
    """A pyserial port: fd I/O when it has a descriptor, pyserial calls otherwise (loop://)."""

    def __init__(self, port: serial.SerialBase, name: str):
        self.port = port
        self.name = name
        self._fd = getattr(port, "fd", None)
        if self._fd is not None:
            os.set_blocking(self._fd, False)

    def fileno(self) -> int:
        if self._fd is None:
            raise HalError(f"link {self.name}: this pyserial port has no file descriptor to wait on")
        return self._fd

    def recv_into(self, buf) -> int:
        if self._fd is None:
            return self._port_recv_into(buf)
        try:
            n = os.readv(self._fd, [buf])
        except OSError as exc:
            if exc.errno in _GONE_ERRNOS:
                return 0       # a hung-up line (the pty's other end closed, the adapter unplugged)
            raise
        if n == 0 and not _hung_up(self._fd):
            # pyserial sets VMIN=0/VTIME=0: an empty tty reads 0 bytes instead of EAGAIN;
            # only a hung-up line (POLLHUP) is a closed one.
            raise BlockingIOError(errno.EAGAIN, "no data on the serial line")
        return n

    def _port_recv_into(self, buf) -> int:
        view = memoryview(buf).cast("B")
        data = self.port.read(len(view))
        if not data:
            raise BlockingIOError(errno.EAGAIN, "no data on the serial port")
        view[:len(data)] = data
        return len(data)

    def send(self, buffers: list) -> int:
        if self._fd is None:
            return self.port.write(b"".join(buffers)) or 0
        try:
            return os.writev(self._fd, buffers[:IOV_MAX])
        except BlockingIOError:
            return 0

    def close(self) -> None:
        self.port.close()


class SerialLinkEndpoint(LinkEndpoint):
    """A serial line: no connection to make, only a port to open."""

    def __init__(self, url_or_device: str, baud: int = 115200):
        self.url = url_or_device
        self.baud = baud
        self.name = f"serial:{url_or_device}"
        self.last_error = ""

    def connect(self) -> SerialTransport | None:
        """Open the port; None (with `last_error`) while it is absent, e.g. a USB adapter unplugged."""
        try:
            port = serial.serial_for_url(self.url, baudrate=self.baud, timeout=0, write_timeout=0)
        except (serial.SerialException, OSError, ValueError) as exc:
            self.last_error = f"link {self.name}: cannot open: {exc}"
            return None
        if getattr(port, "fd", None) is None:
            # URL ports (loop://, socket://) have no fd to wait on and their zero write
            # timeout fails outright: let their writes complete instead.
            port.write_timeout = None
        return SerialTransport(port, self.name)


class VirtioPortEndpoint(LinkEndpoint):
    """A virtio-serial port (/dev/virtio-ports/NAME): a character device that is not a tty."""

    def __init__(self, path: str):
        self.path = str(path)
        self.name = f"virtio:{path}"
        self.last_error = ""

    def connect(self) -> FdTransport | None:
        """Open the port; None (with `last_error`) while it is missing, busy or the host side is away."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as exc:
            self.last_error = f"link {self.name}: cannot open: {exc.strerror}"
            return None
        if _hung_up(fd):
            os.close(fd)
            self.last_error = f"link {self.name}: host side not connected"
            return None
        return FdTransport(fd, self.name)


def _hung_up(fd: int) -> bool:
    """A hung-up tty, or a virtio port whose host side is closed, polls POLLHUP at once."""
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLOUT)
    return any(event & select.POLLHUP for _fd, event in poller.poll(0))
