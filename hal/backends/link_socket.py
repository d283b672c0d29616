"""Link transports over sockets: unix-domain (local pairs, a QEMU chardev) and TCP.

An endpoint either listens (controller a, by default) or connects. Both
sides call `connect()` to try once without blocking long: the listening side
accepts a pending connection, the connecting side tries a short connect. It
returns a `SocketTransport` or None; the caller retries with a `Backoff`.

`SocketTransport` is non-blocking: `recv_into` returns the bytes read, 0 when
the peer closed, and raises BlockingIOError when nothing is there (as a
socket does); `send` writes what fits with one sendmsg and returns the bytes
written (0 when the socket buffer is full), so the caller keeps the rest.
Frames on sockets go through hal.backends.framing.StreamFramer.
"""
from __future__ import annotations

import os
import socket
import stat

from hal.runtime.backoff import Backoff  # noqa: F401  (re-exported: endpoints and their backoff go together)
from hal.backends.interfaces import HalError, LinkEndpoint, LinkTransport

CONNECT_TIMEOUT_MS = 200
IOV_MAX = 1024                 # sendmsg refuses more buffers than this
SOCKET_BUFFER_BYTES = 1 << 20      # the kernel doubles it


class SocketTransport(LinkTransport):
    def __init__(self, sock: socket.socket, name: str):
        sock.setblocking(False)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            # Room for a 1 MiB mirror write and more in one send: fewer wakeups per frame.
            # The kernel caps it at net.core.[wr]mem_max; best effort.
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER_BYTES)
            except OSError:
                pass
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # Frames are small and latency-bound: never wait for Nagle.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.name = name

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv_into(self, buf) -> int:
        try:
            return self.sock.recv_into(buf)
        except (ConnectionResetError, ConnectionAbortedError):
            return 0           # the peer is gone: same as an orderly close

    def send(self, buffers: list) -> int:
        try:
            return self.sock.sendmsg(buffers[:IOV_MAX], [], socket.MSG_NOSIGNAL)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        self.sock.close()

    def __repr__(self):
        return f"SocketTransport({self.name})"


class _SocketEndpoint(LinkEndpoint):
    """Shared by the unix and TCP endpoints: listen and accept, or connect once."""

    family = socket.AF_UNIX

    def __init__(self, address, listen: bool, name: str, connect_timeout_ms: int = CONNECT_TIMEOUT_MS):
        self.address = address
        self.listen = listen
        self.name = name
        self.connect_timeout_ms = connect_timeout_ms
        self._listener = self._bind() if listen else None

    def _bind(self) -> socket.socket:
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            self._prepare_listener(sock)
            sock.bind(self.address)
            sock.listen(1)
        except OSError as exc:
            sock.close()
            raise HalError(f"link {self.name}: cannot listen: {exc.strerror or exc}") from None
        sock.setblocking(False)
        return sock

    def _prepare_listener(self, sock: socket.socket):
        pass

    def listen_fileno(self) -> int | None:
        return self._listener.fileno() if self._listener else None

    def accept(self) -> SocketTransport | None:
        """Accept a pending connection without blocking; None if there is none."""
        assert self._listener is not None, "accept() on a connecting endpoint"
        try:
            sock, _peer = self._listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return None
        return SocketTransport(sock, self.name)

    def connect(self) -> SocketTransport | None:
        if self._listener is not None:
            return self.accept()
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        sock.settimeout(self.connect_timeout_ms / 1000)
        try:
            sock.connect(self.address)
        except OSError:        # refused, no socket file yet, timed out, unreachable
            sock.close()
            return None
        return SocketTransport(sock, self.name)

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None


class UnixLinkEndpoint(_SocketEndpoint):
    family = socket.AF_UNIX

    def __init__(self, path, listen: bool, connect_timeout_ms: int = CONNECT_TIMEOUT_MS):
        super().__init__(str(path), listen, f"unix:{path}", connect_timeout_ms)

    def _prepare_listener(self, sock: socket.socket):
        # A socket file left by a dead controller would make bind fail; anything else is not ours.
        try:
            mode = os.lstat(self.address).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise HalError(f"link {self.name}: {self.address} exists and is not a socket")
        if _unix_socket_alive(self.address):
            raise HalError(f"link {self.name}: another process is listening on {self.address}")
        os.unlink(self.address)

    def close(self) -> None:
        listening = self._listener is not None
        super().close()
        if listening:
            try:
                os.unlink(self.address)
            except FileNotFoundError:
                pass


def _unix_socket_alive(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.1)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


class TcpLinkEndpoint(_SocketEndpoint):
    def __init__(self, host: str, port: int, listen: bool, connect_timeout_ms: int = CONNECT_TIMEOUT_MS):
        self.family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), listen, f"tcp:{host}:{port}", connect_timeout_ms)

    def _prepare_listener(self, sock: socket.socket):
        # A restarted controller must rebind while the old connection sits in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    @property
    def port(self) -> int:
        """The bound port (useful with port 0 in tests)."""
        sock = self._listener
        return sock.getsockname()[1] if sock else self.address[1]
