"""The runtime's TLS host port: STARTTLS connections in the non-blocking event loop.

Owns moving ciphertext between a client's socket and its TlsSession
(hal/host/nbd_tls.py), and plaintext between the session and the client's
NbdConnection. Mixed into Runtime (hal/runtime/loop.py), which owns the sockets,
the selector and the client table; plain connections never come here.

Rules:
- Nothing blocks: a handshake or record that is not complete waits for the
  next readable event; the handshake deadline (handshake_timeout_ms) covers
  the TLS handshake, since a connection reaches transmission only inside TLS.
- The STARTTLS ACK leaves in plaintext ahead of any ciphertext: both go
  through the client's one output queue, in order.
- Plaintext the session holds is decrypted only while the connection takes
  requests (want_read); what stays buffered is pumped once it has room again,
  because the socket may never wake up for it.
- A handshake that fails (a client certificate from another CA, garbage) is
  counted (nbd_tls_refused) and closed after a best-effort send of our alert.
- A connection that ends sends its close_notify after its last reply.
"""
from __future__ import annotations

import selectors
import ssl

import hal.host.nbd_tls as T
from hal.backends.buffers import consume as _consume

SENDMSG_BUFFERS_MAX = 512


class NbdTlsPort:
    """Mixin for Runtime: the TLS half of the NBD host port."""

    def tls_setup(self, nb):
        """The server context from [nbd] (validated at config load), or None with tls = "off"."""
        self.tls_ctx = None
        if nb.tls != "off":
            self.tls_ctx = T.server_context(nb.tls_cert, nb.tls_key, nb.tls_ca, nb.tls_verify_client)
            self.tls_ctx.num_tickets = 0          # no resumption: no session tickets to send
        self.tls_recv_buf = bytearray(T.CIPHER_RECV_BYTES)
        self.tls_recv_mv = memoryview(self.tls_recv_buf)

    def _start_tls(self, client):
        """The connection acknowledged NBD_OPT_STARTTLS: the ACK in plaintext, then TLS."""
        conn = client.conn
        assert self.tls_ctx is not None and client.tls is None
        client.out.extend(conn.pending_output())
        # The plaintext still queued (the ACK) is counted as sent now: from here on the engine
        # hears only of the plaintext it encrypts.
        conn.sent(_queued_bytes(client.out))
        client.tls = T.TlsSession(self.tls_ctx, conn.tls_leftover())
        self._tls_pump(client)

    def _tls_read(self, client):
        if client.tls.handshake_done and not client.conn.want_read:
            return                                # backpressure: leave the ciphertext in the socket
        try:
            n = client.sock.recv_into(self.tls_recv_buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0
        if n == 0:
            self._drop_client(client)
            return
        client.tls.feed(self.tls_recv_mv[:n])
        self._tls_pump(client)

    def _tls_pump(self, client):
        """Advance the handshake, then decrypt and parse while the connection takes requests."""
        tls, conn = client.tls, client.conn
        try:
            if not tls.handshake_done:
                done = tls.handshake()
                self._queue_cipher(client, tls.take_output())
                if not done:
                    return
                conn.tls_started()
            while conn.want_read:
                n = tls.read_into(conn.recv_buffer())
                if not n:
                    break
                self._nbd_requests(client, conn.received(n))
        except EOFError:
            self._drop_client(client)
        except ssl.SSLError as exc:
            self._tls_failed(client, exc)

    def _tls_failed(self, client, exc):
        alert = client.tls.take_output()
        if alert and not client.out:
            try:
                client.sock.send(alert)
            except OSError:
                pass
        where = "handshake" if not client.tls.handshake_done else "record"
        self._count_refusal("nbd_tls", f"TLS {where} with {client.peer} failed: "
                                       f"{getattr(exc, 'reason', None) or exc}")
        self._drop_client(client)

    def _queue_cipher(self, client, cipher):
        if cipher:
            client.out.append(cipher)
            self.dirty_clients.add(client)

    def _flush_client_tls(self, client):
        """Encrypt the connection's output while little ciphertext waits, and send it."""
        conn, tls, out = client.conn, client.tls, client.out
        if tls.handshake_done:
            tls.queue(conn.pending_output())
        while True:
            if tls.plain_pending:
                plain_bytes, cipher = tls.encrypt(_queued_bytes(out))
                conn.sent(plain_bytes)
                if cipher:
                    out.append(cipher)
            elif conn.closed and not tls.closing and tls.handshake_done:
                self._queue_cipher(client, tls.close())
            if not out:
                break
            try:
                sent = client.sock.sendmsg(out[:SENDMSG_BUFFERS_MAX])
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop_client(client)
                return
            _consume(out, sent)
            if out and not sent:
                break
        if conn.closed and not out and not tls.plain_pending:
            self._drop_client(client)
            return
        if conn.backlog and conn.has_room:
            self._nbd_requests(client, conn.received(0))
        if conn.want_read and tls.handshake_done and tls.buffered():
            self._tls_pump(client)
            if client.sock.fileno() == -1:
                return
        self._watch(client, (selectors.EVENT_READ if conn.want_read or not tls.handshake_done else 0)
                    | (selectors.EVENT_WRITE if out or tls.plain_pending else 0))


def _queued_bytes(out) -> int:
    return sum(b.nbytes if b.__class__ is memoryview else len(b) for b in out)
