"""A raw NBD client: speaks NBD byte by byte over a unix socket (or TCP), sends any bytes and
reads exact replies. Tests use it to send malformed input and check the reply bytes; the
benchmarks use it to time a failover."""
from __future__ import annotations

import socket
import struct

from hal.host import nbd


class RawNbdClient:
    """A hand-driven NBD client over a unix socket, or TCP when given (host, port): send any
    bytes, read exact replies."""

    def __init__(self, socket_path, timeout_s=5.0):
        if isinstance(socket_path, tuple):      # TCP, e.g. a VM's forwarded NBD port
            self.sock = socket.create_connection(socket_path, timeout=timeout_s)
            return
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout_s)
        self.sock.connect(str(socket_path))

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, nbytes: int) -> bytes:
        chunks, got = [], 0
        while got < nbytes:
            chunk = self.sock.recv(nbytes - got)
            if not chunk:
                raise ConnectionError(f"server closed after {got} of {nbytes} bytes")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def server_closed(self) -> bool:
        """True if the server hangs up (EOF) before sending anything more."""
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True

    def handshake(self, client_flags=nbd.CLIENT_FLAGS_KNOWN) -> bytes:
        greeting = self.recv_exact(len(nbd.GREETING))
        self.send(struct.pack(">I", client_flags))
        return greeting

    def send_option(self, option: int, data: bytes = b"") -> None:
        self.send(struct.pack(">QII", nbd.NBD_IHAVEOPT, option, len(data)) + data)

    def read_option_reply(self) -> tuple[int, int, bytes]:
        magic, option, reply_type, length = struct.unpack(">QIII", self.recv_exact(20))
        if magic != nbd.NBD_REP_MAGIC:
            raise ConnectionError(f"option reply magic {magic:#x}")
        return option, reply_type, self.recv_exact(length)

    def info_or_go(self, option, name: str, infos=()) -> list[tuple[int, bytes]]:
        """Send NBD_OPT_INFO/GO; return [(reply type, data)] up to the ACK or an error."""
        raw = name.encode()
        self.send_option(option, struct.pack(">I", len(raw)) + raw
                         + struct.pack(f">H{len(infos)}H", len(infos), *infos))
        replies = []
        while True:
            _, reply_type, data = self.read_option_reply()
            replies.append((reply_type, data))
            if reply_type != nbd.NBD_REP_INFO:
                return replies

    def request(self, op, cookie, offset=0, length=0, flags=0, data=b"") -> None:
        self.send(struct.pack(">IHHQQI", nbd.NBD_REQUEST_MAGIC, flags, op, cookie, offset, length) + data)

    def read_reply(self, data_bytes=0) -> tuple[int, int, bytes]:
        """One simple reply: (error, cookie, data); data only follows a successful READ."""
        magic, error, cookie = struct.unpack(">IIQ", self.recv_exact(16))
        if magic != nbd.NBD_SIMPLE_REPLY_MAGIC:
            raise ConnectionError(f"simple reply magic {magic:#x}")
        return error, cookie, self.recv_exact(data_bytes) if data_bytes and not error else b""


def open_session(socket_path, export_name="lun0", timeout_s=5.0) -> RawNbdClient:
    """A RawNbdClient (unix path or (host, port)) through handshake and NBD_OPT_GO."""
    client = RawNbdClient(socket_path, timeout_s)
    client.handshake()
    replies = client.info_or_go(nbd.NBD_OPT_GO, export_name)
    if replies[-1][0] != nbd.NBD_REP_ACK:
        client.close()
        raise ConnectionError(f"NBD_OPT_GO {export_name!r} refused: {replies}")
    return client
