"""The runtime's NBD host port: listeners, clients, their handshakes and requests, replies.

Owns accepting NBD connections (per-client limits, handshake deadlines,
refusals counted rather than logged one by one), reading requests into the
protocol engine (hal/host/nbd.py) and handing them to the firmware, and
writing replies back with one sendmsg per client and loop turn, within each
client's output bound. Mixed into Runtime (hal/runtime/loop.py), which owns
the selector, the firmware and the action interpreter; the TLS half is
hal/host/tls_port.py.
"""
from __future__ import annotations

import os
import selectors
import socket
import struct
import time

from firmware import actions as A
from firmware.requests import BLOCK_STATUS, FLUSH, READ, TRIM, WRITE, ZEROES, HostRequest

import hal.host.nbd as NBD
from hal.backends.buffers import consume as _consume

KINDS = {NBD.NBD_CMD_WRITE: WRITE, NBD.NBD_CMD_READ: READ, NBD.NBD_CMD_FLUSH: FLUSH,
         NBD.NBD_CMD_WRITE_ZEROES: ZEROES, NBD.NBD_CMD_TRIM: TRIM, NBD.NBD_CMD_BLOCK_STATUS: BLOCK_STATUS}

REFUSAL_NOTE_INTERVAL_MS = 10_000   # refused connections are counted; one event per kind per interval


class NbdClient:
    __slots__ = ("sock", "conn", "out", "mask", "peer", "tls", "done")

    def __init__(self, sock, conn, peer=""):
        self.sock = sock
        self.conn = conn
        self.out = []
        self.mask = selectors.EVENT_READ      # what the selector watches for
        self.peer = peer                      # who connected, for per-client accounting
        self.tls = None                       # a TlsSession from NBD_OPT_STARTTLS on (hal/host/tls_port.py)
        self.done = []                        # metrics: replies queued, timed when handed to the socket


def _peer_key(sock):
    """The client a connection counts against: its IP address, or its uid on a unix socket."""
    if sock.family == socket.AF_UNIX:
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return "unix"
        return f"uid:{struct.unpack('3i', creds)[1]}"
    try:
        return sock.getpeername()[0]
    except OSError:                       # gone already
        return "tcp"


class NbdHostPort:
    """Mixin for Runtime: the plain half of the NBD host port."""

    def listen_nbd(self):
        """Listen on the [nbd] unix socket and TCP address."""
        nb = self.cfg.nbd
        if nb.unix:
            if os.path.exists(nb.unix):
                os.unlink(nb.unix)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(nb.unix)
            self._add_listener(sock)
        if nb.tcp:
            host, _, port = nb.tcp.rpartition(":")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, int(port)))
            self._add_listener(sock)
    def _add_listener(self, sock):
        sock.listen(64)
        sock.setblocking(False)
        self.listeners.append(sock)
        self.sel.register(sock, selectors.EVENT_READ, ("nbd-listen", sock))

    def exports_uris(self):
        nb = self.cfg.nbd
        tls = nb.tls == "require"
        uris = {}
        for e in self.exports:
            if nb.unix:
                uris[e.name] = NBD.nbd_uri_unix(nb.unix, e.name, tls)
            else:
                host, _, port = nb.tcp.rpartition(":")
                uris[e.name] = NBD.nbd_uri_tcp(host, int(port), e.name, tls)
        return uris


    def _accept(self, listener):
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:          # EMFILE and the like: the backlog waits, note it once
            self._count_refusal("nbd", f"accept failed: {exc}")
            return
        nb = self.cfg.nbd
        peer = _peer_key(sock)
        per_client = nb.max_connections_per_client or nb.max_connections
        if len(self.clients) >= nb.max_connections:
            sock.close()
            self._count_refusal("nbd", f"{nb.max_connections} connections already")
            return
        if self.clients_per_peer.get(peer, 0) >= per_client:
            sock.close()
            self._count_refusal("nbd", f"{per_client} connections from {peer} already")
            return
        sock.setblocking(False)
        if sock.family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = NBD.NbdConnection(self.exports, max_inflight=nb.max_inflight, peer=peer,
                                 max_output_bytes=nb.max_output_mib << 20, tls=nb.tls)
        client = NbdClient(sock, conn, peer)
        self.clients[sock.fileno()] = client
        self.clients_per_peer[peer] = self.clients_per_peer.get(peer, 0) + 1
        self.handshaking[client] = self.clock.monotonic_ms() + nb.handshake_timeout_ms
        self.sel.register(sock, selectors.EVENT_READ, ("nbd", client))
        self.dirty_clients.add(client)

    def _expire_handshakes(self, now):
        """Close connections that have not finished the handshake by their deadline: a socket
        that connects and says nothing would otherwise hold a connection slot for ever."""
        for client, deadline_ms in list(self.handshaking.items()):
            if client.conn.export is not None or client.conn.closed:
                del self.handshaking[client]
            elif now >= deadline_ms:
                self.nbd_handshake_timeouts += 1
                self._drop_client(client)

    def _count_refusal(self, kind, reason):
        """Count a refused connection; note it at most once per interval, with the count since."""
        self.refused[kind] += 1
        now = self.clock.monotonic_ms()
        count_noted, noted_ms = self.refused_noted[kind]
        if now - noted_ms >= REFUSAL_NOTE_INTERVAL_MS:
            self.refused_noted[kind] = (self.refused[kind], now)
            self.note(f"{kind}_refused", reason=reason, refused=self.refused[kind] - count_noted)

    def _nbd_read(self, client):
        conn = client.conn
        if client.tls is not None:
            self._tls_read(client)
            return
        if not conn.want_read:
            return
        try:
            n = client.sock.recv_into(conn.recv_buffer())
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0
        if n == 0:
            self._drop_client(client)
            return
        self._nbd_requests(client, conn.received(n))
        if conn.starttls:
            self._start_tls(client)

    def _nbd_requests(self, client, requests):
        """Hand a read's requests to the firmware, as one batch (`host_requests`). The req it
        answers with is (client, request, taken_ns): taken_ns, one clock read for the batch,
        times the request for the metrics (0 when off)."""
        rec = self.rec
        t0 = time.perf_counter_ns() if rec is not None and requests else 0
        batch = []
        for r in requests:
            kind = KINDS.get(r.op)
            req = (client, r, t0)
            if kind is None:
                client.conn.reply(r, NBD.NBD_EINVAL)
            elif kind == BLOCK_STATUS and not self.answers_block_status:
                # base:allocation from firmware that cannot tell (the log variant's): all data,
                # which is always correct
                self.host_reply(A.HostReply(req, 0, [(r.length, 0)]))
            else:
                batch.append(HostRequest(kind, req, r.export.index, r.offset,
                                         r.data if kind == WRITE else r.length,
                                         bool(r.flags & NBD.NBD_CMD_FLAG_FUA)))
        if batch:
            if rec is not None and self.time_mirror:
                self._timed_requests(batch)
            else:
                self.execute(self.ctrl.host_requests(batch))
        self.dirty_clients.add(client)

    def _timed_requests(self, batch):
        """One by one, noting each write that now waits for the partner's ack (the mirror round
        trip of the metrics)."""
        ctrl = self.ctrl
        for h in batch:
            before = len(ctrl.pending)
            self.execute(ctrl.host_requests([h]))
            if h.kind == WRITE and len(ctrl.pending) > before:
                self.mirror_unsent.append(h.req)

    def _drop_client(self, client):
        if client.mask:
            self.sel.unregister(client.sock)
        client.mask = 0
        if self.clients.pop(client.sock.fileno(), None) is not None:
            left = self.clients_per_peer.pop(client.peer, 1) - 1
            if left:
                self.clients_per_peer[client.peer] = left
        self.handshaking.pop(client, None)
        client.sock.close()
        client.conn.closed = True
        self.dirty_clients.discard(client)

    def _flush_client(self, client):
        if client.tls is not None:
            self._flush_client_tls(client)
            if client.done:                 # metrics: handed to the TLS session, encrypted and sent
                self.rec.host_done(client.done, time.perf_counter_ns())
                client.done = []
            return
        conn = client.conn
        out = client.out
        out.extend(conn.pending_output())
        while out:
            try:
                sent = client.sock.sendmsg(out[:512])
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._drop_client(client)
                return
            _consume(out, sent)
            conn.sent(sent)
            if out and not sent:
                break
        if client.done:
            self.rec.host_done(client.done, time.perf_counter_ns())
            client.done = []
        if conn.closed and not out:
            self._drop_client(client)
            return
        if conn.backlog and conn.has_room:
            self._nbd_requests(client, conn.received(0))
        self._watch(client, (selectors.EVENT_READ if conn.want_read else 0)
                    | (selectors.EVENT_WRITE if out else 0))

    def _watch(self, client, mask):
        """Level-triggered epoll: watch for reads only while the connection takes more requests."""
        if mask == client.mask:
            return
        if not client.mask:
            self.sel.register(client.sock, mask, ("nbd", client))
        elif not mask:
            self.sel.unregister(client.sock)
        else:
            self.sel.modify(client.sock, mask, ("nbd", client))
        client.mask = mask
