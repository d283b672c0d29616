"""NBD over TLS (the spec's NBD_OPT_STARTTLS): the server context and a sans-I/O TLS session.

Owns the TLS layer of the host port, not the NBD protocol (hal/host/nbd.py) nor the
sockets (hal/runtime/loop.py). `server_context()` builds the x509 server context from
the [nbd] settings and says clearly what is wrong with them. `TlsSession` is
`ssl.SSLObject` over a pair of `ssl.MemoryBIO`s: the runtime feeds it the
ciphertext it received and takes the ciphertext to send, the NbdConnection sees
only plaintext, and nothing here ever blocks or touches a socket.

Rules:
- Plaintext is decrypted straight into the NbdConnection's receive buffer
  (`SSLObject.read(n, buffer)`): no copy beyond the cipher itself.
- Plaintext output is encrypted only while less than `CIPHER_QUEUED_MAX_BYTES`
  of ciphertext waits for the socket, so the engine's output bound
  (max_output_bytes) still bounds the connection's memory: a reply counts as
  sent only once it is encrypted.
- Small buffers (reply headers) are joined with their neighbours up to one TLS
  record before encryption, so a 4 KiB read reply is one record, not two;
  large buffers (READ data) are encrypted where they lie.
- PSK: Python's ssl module has no TLS-PSK before 3.13 (SSLContext.set_psk_*);
  `psk_supported()` says whether this Python has it. Only x509 is offered.
"""
from __future__ import annotations

import os
import ssl

TLS_RECORD_MAX_BYTES = 16 << 10           # TLS plaintext record size limit
CIPHER_QUEUED_MAX_BYTES = 1 << 20         # ciphertext waiting for the socket before we stop encrypting
CIPHER_RECV_BYTES = 256 << 10             # one socket read of ciphertext
JOIN_BELOW_BYTES = 4096 + 64              # buffers smaller than this are joined before encryption


class TlsConfigError(ValueError):
    """The TLS settings cannot make a server context; the message says which file and why."""


def psk_supported() -> bool:
    return hasattr(ssl.SSLContext, "set_psk_server_callback")


def _check_file(path: str, what: str) -> None:
    if not path:
        raise TlsConfigError(f"{what} is not set")
    if not os.path.isfile(path):
        raise TlsConfigError(f"{what} {path!r}: no such file")
    if not os.access(path, os.R_OK):
        raise TlsConfigError(f"{what} {path!r}: not readable")


def server_context(cert: str, key: str, ca: str = "", verify_client: bool = False) -> ssl.SSLContext:
    """The TLS server context for the NBD port (TLS 1.2 or later, x509)."""
    _check_file(cert, "tls_cert")
    _check_file(key, "tls_key")
    if verify_client or ca:
        if not ca:
            raise TlsConfigError("tls_verify_client = true needs tls_ca (the CA that signs client certificates)")
        _check_file(ca, "tls_ca")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise TlsConfigError(f"tls_cert {cert!r} / tls_key {key!r}: cannot load the pair "
                             f"(not PEM, encrypted, or the key does not match): {exc.reason or exc}") from None
    if ca:
        try:
            ctx.load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            raise TlsConfigError(f"tls_ca {ca!r}: not a PEM certificate: {exc.reason or exc}") from None
    ctx.verify_mode = ssl.CERT_REQUIRED if verify_client else ssl.CERT_NONE
    return ctx


class TlsSession:
    """Server-side TLS over memory BIOs for one NBD connection, from the STARTTLS ACK on."""

    __slots__ = ("_in", "_out", "_obj", "handshake_done", "closing", "_pending_plain", "_read", "_write")

    def __init__(self, ctx: ssl.SSLContext, leftover=b""):
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(self._in, self._out, server_side=True)
        self._read = self._obj.read
        self._write = self._obj.write
        self.handshake_done = False
        self.closing = False
        self._pending_plain = []          # plaintext buffers not yet encrypted
        if leftover:
            self._in.write(leftover)      # a client that sent its ClientHello before our ACK

    # -- input ------------------------------------------------------------------

    def feed(self, cipher) -> None:
        """Ciphertext just received from the socket."""
        self._in.write(cipher)

    def handshake(self) -> bool:
        """Advance the handshake; True once done. ssl.SSLError when the peer fails it."""
        try:
            self._obj.do_handshake()
        except ssl.SSLWantReadError:
            return False
        self.handshake_done = True
        return True

    def read_into(self, buf) -> int:
        """Decrypt into `buf` (a writable memoryview); 0 when no whole record is buffered.

        EOFError at the peer's close_notify or a cut-off stream; ssl.SSLError on garbage."""
        if not self._in.pending and not self._obj.pending():
            return 0                      # all consumed: skip the SSLWantReadError round trip
        try:
            n = self._read(len(buf), buf)
        except ssl.SSLWantReadError:
            return 0
        except ssl.SSLZeroReturnError:
            raise EOFError("TLS close_notify") from None
        except ssl.SSLEOFError:
            raise EOFError("TLS stream cut off") from None
        if n == 0:
            raise EOFError("TLS stream ended")
        return n

    def buffered(self) -> bool:
        """Plaintext or ciphertext is waiting here (the socket may never wake up for it)."""
        return self._obj.pending() > 0 or self._in.pending > 0

    # -- output -----------------------------------------------------------------

    def queue(self, buffers) -> None:
        """Plaintext to send, in order (encrypted by encrypt())."""
        self._pending_plain.extend(buffers)

    def encrypt(self, cipher_queued_bytes: int) -> tuple[int, bytes]:
        """Encrypt queued plaintext while the ciphertext waiting stays under the bound.

        Returns (plaintext bytes consumed, ciphertext to send, possibly empty)."""
        plain = self._pending_plain
        done = 0
        k, n = 0, len(plain)
        budget = CIPHER_QUEUED_MAX_BYTES - cipher_queued_bytes - self._out.pending
        while k < n and budget > 0:
            first = plain[k]
            size = first.nbytes if first.__class__ is memoryview else len(first)
            if size < JOIN_BELOW_BYTES and k + 1 < n:
                k, chunk = self._join_small(plain, k)
            else:
                k, chunk = k + 1, first
            done += self._write_all(chunk)
            budget = CIPHER_QUEUED_MAX_BYTES - cipher_queued_bytes - self._out.pending
        if k:
            del plain[:k]
        return done, self._out.read() if self._out.pending else b""

    @staticmethod
    def _join_small(plain, k):
        """Join buffers from k while the total stays within one record; (next index, bytes)."""
        total, j, n = 0, k, len(plain)
        while j < n:
            b = plain[j]
            size = b.nbytes if b.__class__ is memoryview else len(b)
            if total + size > TLS_RECORD_MAX_BYTES and j > k:
                break
            total += size
            j += 1
        return j, b"".join(plain[k:j])

    def _write_all(self, chunk) -> int:
        # A memory BIO never fills, so SSLObject.write takes it all at once.
        return self._write(chunk)

    @property
    def plain_pending(self) -> bool:
        return bool(self._pending_plain)

    def close(self) -> bytes:
        """Queue our close_notify; the ciphertext to send (after any pending output)."""
        self.closing = True
        try:
            self._obj.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLError):
            pass                              # we do not wait for the peer's close_notify
        return self._out.read() if self._out.pending else b""

    def take_output(self) -> bytes:
        """Ciphertext produced by the handshake."""
        return self._out.read() if self._out.pending else b""
