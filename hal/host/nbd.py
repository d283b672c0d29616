"""NBD host port: a sans-IO NBD server protocol engine, one NbdConnection per client.

Owns the NBD wire protocol as NetworkBlockDevice/nbd doc/proto.md defines it:
the fixed newstyle handshake, option haggling (hal/host/nbd_options.py) and the
transmission phase, with simple replies or, once negotiated, structured ones
(hal/host/nbd_structured.py); the numbers live in hal/host/nbd_const.py. It never
touches a socket: the runtime receives into `recv_buffer()`, passes the byte
count to `received()`, gets back the valid requests, answers each with
`reply()` and sends `pending_output()` with sendmsg.

Rules:
- Requests the engine can judge alone (unknown command or flags, out of range,
  oversized, misaligned, write to a read-only export, zero length) are answered
  here and never surfaced; the connection keeps serving.
- Only broken framing (bad magic, unknown client flags, absurd lengths, an
  unknown name in NBD_OPT_EXPORT_NAME, which cannot be errored) closes the
  connection, with `close_reason` set.
- Hot path: one precompiled struct per header; write payloads are memoryviews
  into the receive buffer (no copy); replies are lists of buffers.
- Everything is bounded: surfaced requests in flight (`max_inflight`), write
  payload, option data, bytes discarded from a refused request.
- Alignment to the export's min_block_bytes (512 by default) is enforced for
  every client, also those that did not ask for NBD_INFO_BLOCK_SIZE: the spec
  tells interoperable clients to use 512-byte blocks anyway, and the cache
  works in sectors.
- Backpressure: at most `max_inflight` requests are surfaced; complete requests
  beyond that stay in the receive buffer (`backlog`) until `received(0)`.
  Output is bounded too (`max_output_bytes`): replies queued and not yet sent
  (the runtime reports sends with `sent()`) plus READ data still owed. Past
  the bound the engine surfaces nothing more and stops wanting reads, so a
  client that never reads its replies costs at most the bound plus one
  request's payload; it goes on once the output drains.
- Structured replies, and NBD_CMD_BLOCK_STATUS for `base:allocation`, only
  for a client that negotiated them; extended headers are not offered.
- TLS (`tls`): "off" answers NBD_OPT_STARTTLS with NBD_REP_ERR_UNSUP (the
  spec's NOTLS mode); "allow" and "require" ACK it and stop parsing until the
  runtime has run the TLS handshake on the same socket (`starttls` set, then
  `tls_leftover()` and `tls_started()`); option haggling goes on inside TLS.
  With "require", before TLS every option but STARTTLS and ABORT gets
  NBD_REP_ERR_TLS_REQD, and NBD_OPT_EXPORT_NAME (which cannot be errored) closes.
"""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

from hal.host.nbd_const import *  # noqa: F401,F403 (re-exported: nbd.NBD_CMD_READ and so on)
from hal.host.nbd_const import (_REQUEST, _SIMPLE_REPLY, _OPTION, _SPACE_OPS, _WRITE_OPS, _U32)
from hal.host.nbd_options import (OPTION_HANDLERS, OPTIONS_BEFORE_TLS, NbdOptionError, OptionHaggling,  # noqa: F401
                          parse_info_request_untrusted)
from hal.host.nbd_structured import StructuredReplies


@dataclass(frozen=True)
class Export:
    """One NBD export: a LUN as hosts see it."""

    name: str
    size_bytes: int
    index: int                              # LUN number
    description: str = ""
    read_only: bool = False
    min_block_bytes: int = 512              # requests must be aligned to this
    preferred_block_bytes: int = 4096
    max_payload_bytes: int = 4 << 20        # largest READ or WRITE accepted

    def __post_init__(self):
        assert 0 < len(self.name.encode()) <= NBD_STRING_MAX_BYTES, self.name
        assert len(self.description.encode()) <= NBD_STRING_MAX_BYTES
        for size in (self.min_block_bytes, self.preferred_block_bytes):
            assert size > 0 and size & (size - 1) == 0, "block sizes are powers of two"
        assert self.min_block_bytes <= min(self.preferred_block_bytes, 64 << 10)
        assert self.max_payload_bytes % self.min_block_bytes == 0
        assert self.max_payload_bytes >= min(self.preferred_block_bytes, self.size_bytes)
        assert 0 <= self.size_bytes < 1 << 63 and self.size_bytes % self.min_block_bytes == 0

    @property
    def transmission_flags(self) -> int:
        # CAN_MULTI_CONN: an acked write is already in both controllers' NVRAM,
        # so a flush on any connection covers every connection's writes.
        flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_CAN_MULTI_CONN
        if self.read_only:
            return flags | NBD_FLAG_READ_ONLY
        return flags | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES

    def command_flags(self) -> dict:
        """Command -> the command flags valid for it on this export (the spec's table)."""
        fua = 0 if self.read_only else NBD_CMD_FLAG_FUA  # FUA is valid on every command once advertised
        return {NBD_CMD_READ: fua, NBD_CMD_WRITE: fua, NBD_CMD_FLUSH: fua,
                NBD_CMD_TRIM: fua, NBD_CMD_WRITE_ZEROES: fua | NBD_CMD_FLAG_NO_HOLE}


class NbdRequest:
    """A valid transmission request for the controller to carry out.

    `data` (WRITE only) views the connection's receive buffer and is valid only
    until the next recv_buffer() or received() call: consumers copy what they keep.
    """

    __slots__ = ("cookie", "op", "flags", "export", "offset", "length", "data")

    def __init__(self, cookie, op, flags, export, offset, length, data):
        self.cookie = cookie
        self.op = op
        self.flags = flags
        self.export = export
        self.offset = offset
        self.length = length
        self.data = data

    def __repr__(self):
        return (f"NbdRequest(cookie={self.cookie:#x}, op={self.op}, flags={self.flags:#x}, "
                f"export={self.export.name!r}, offset={self.offset}, length={self.length})")


class NbdConnection(StructuredReplies, OptionHaggling):
    """The server side of one NBD client connection, without I/O.

    The runtime loop: while `want_read`, `sock.recv_into(conn.recv_buffer())`,
    then `conn.received(n)`; answer each request with `conn.reply()`; send
    `conn.pending_output()`; once `closed`, send what is pending and close.
    When replies free in-flight slots and `backlog` is set, call `received(0)`
    to parse requests already buffered (the socket may never wake up for them).
    """

    def __init__(self, exports: list[Export], max_inflight: int = 128,
                 max_payload_bytes: int = 4 << 20, peer: str = "",
                 max_output_bytes: int | None = None, tls: str = "off"):
        assert tls in TLS_MODES, tls
        assert exports and len({e.name for e in exports}) == len(exports), "export names are unique"
        assert 0 < max_inflight <= INFLIGHT_MAX
        assert 0 < max_payload_bytes <= INTEROP_PAYLOAD_BYTES
        assert max_output_bytes is None or max_output_bytes >= max_payload_bytes
        # None: the caller does not call sent(), and the output is not bounded here.
        self.max_output_bytes = OUTPUT_UNBOUNDED if max_output_bytes is None else max_output_bytes
        self.unsent_bytes = len(GREETING)   # queued output the runtime has not reported sent
        self.read_bytes_owed = 0            # READ data of surfaced requests not yet replied
        self.exports = list(exports)
        self._by_name = {e.name: e for e in exports}
        self.max_inflight = max_inflight
        self.max_payload_bytes = max_payload_bytes
        self.peer = peer
        self.export: Export | None = None
        self.inflight = 0
        self.closed = False
        self.close_reason = ""
        self.no_zeroes = False
        self.backlog = False                # complete requests buffered, held back by max_inflight
        self.tls = tls
        self.tls_active = False             # the handshake finished: everything from here is inside TLS
        self.starttls = False               # STARTTLS acknowledged: the runtime starts TLS, then tls_started()
        self._draining = False              # NBD_CMD_DISC seen: finish in-flight, then close
        self._cap = REQUEST_SIZE_BYTES + max_payload_bytes + RECV_CHUNK_MIN_BYTES
        self._buf = bytearray(self._cap)
        self._mv = memoryview(self._buf)
        self._start = 0                     # first unparsed byte
        self._end = 0                       # end of received bytes
        self._need = 0                      # bytes the message at _start needs in all
        self._discard_bytes = 0
        self._after_discard = None          # (next phase, callback) once a discard is done
        self._out = [GREETING]
        self._phase = self._phase_client_flags
        self._enter_state(None)

    # -- the runtime's interface -------------------------------------------------

    @property
    def want_read(self) -> bool:
        return (not self.closed and not self._draining and not self.backlog and not self.starttls
                and self.has_room)

    @property
    def has_room(self) -> bool:
        """Below both bounds: in-flight requests, and output queued or owed."""
        return (self.inflight < self.max_inflight
                and self.unsent_bytes + self.read_bytes_owed < self.max_output_bytes)

    def sent(self, nbytes: int) -> None:
        """The runtime sent `nbytes` of what pending_output() handed over."""
        self.unsent_bytes -= nbytes
        assert self.unsent_bytes >= 0, "sent more than was queued"

    def recv_buffer(self) -> memoryview:
        """Where to recv_into next: at least 64 KiB, room for a whole max-size request."""
        start, end = self._start, self._end
        if start == end:
            self._start = self._end = 0
        elif start and (start + self._need > self._cap or self._cap - end < RECV_CHUNK_MIN_BYTES):
            # Move the partial message left at the tail to the front: a copy of
            # less than one message, and only when the tail runs short.
            n = end - start
            self._buf[:n] = self._buf[start:end]
            self._start, self._end = 0, n
        return self._mv[self._end:]

    def received(self, nbytes: int) -> list[NbdRequest]:
        """Process `nbytes` just received into recv_buffer(); return the valid requests."""
        assert 0 <= nbytes <= self._cap - self._end
        self._end += nbytes
        requests: list[NbdRequest] = []
        while not self.closed and self._phase(requests):
            pass
        return requests

    def reply(self, request_or_cookie, error: int = 0, data=None) -> None:
        """Queue the simple reply to a surfaced request (data: the READ payload).

        With max_output_bytes set, answer with the request, not its cookie: a READ's
        owed data is released by the request's length."""
        if type(request_or_cookie) is NbdRequest:
            cookie = request_or_cookie.cookie
            assert data is None or error or (request_or_cookie.op == NBD_CMD_READ
                                             and len(data) == request_or_cookie.length)
            if request_or_cookie.op == NBD_CMD_READ:
                self.read_bytes_owed -= request_or_cookie.length
        else:
            cookie = request_or_cookie
        assert self.inflight > 0, "reply without a request in flight"
        self.inflight -= 1
        if self.closed:
            return                          # hung up: nobody to send it to
        self._out.append(_SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, error, cookie))
        self.unsent_bytes += 16
        if data is not None and not error:  # an errored READ carries no payload
            self._out.append(data)
            self.unsent_bytes += len(data)
        if self._draining and not self.inflight:
            self._close("client sent NBD_CMD_DISC")

    def tls_leftover(self) -> bytes:
        """Bytes the client sent after NBD_OPT_STARTTLS: the start of its TLS handshake."""
        assert self.starttls
        rest = bytes(self._mv[self._start:self._end])
        self._start = self._end = 0
        return rest

    def tls_started(self) -> None:
        """The TLS handshake is done: option haggling goes on, inside TLS, from scratch."""
        assert self.starttls and self._start == self._end
        self.starttls = False
        self.tls_active = True
        self._forget_structured_replies()
        self._start = self._end = 0
        self._phase = self._phase_option

    def pending_output(self) -> list:
        """Take the queued output buffers, in order, for sendmsg."""
        out = self._out
        self._out = []
        return out

    # -- phases: each consumes what it can; True means "run the next phase now" --

    def _phase_client_flags(self, _requests) -> bool:
        if self._end - self._start < 4:
            self._need = 4
            return False
        (flags,) = _U32.unpack_from(self._mv, self._start)
        self._start += 4
        if flags & ~CLIENT_FLAGS_KNOWN:
            return self._fatal(f"unknown client flags {flags:#x}")
        # Clients without C_FIXED_NEWSTYLE still get fixed newstyle (the spec allows it).
        self.no_zeroes = bool(flags & NBD_FLAG_C_NO_ZEROES)
        self._phase = self._phase_option
        return True

    def _phase_option(self, _requests) -> bool:
        start, avail = self._start, self._end - self._start
        if avail < _OPTION.size:
            self._need = _OPTION.size
            return False
        magic, option, length = _OPTION.unpack_from(self._mv, start)
        if magic != NBD_IHAVEOPT:
            return self._fatal(f"bad option magic {magic:#x}")
        if length > OPTION_DATA_MAX_BYTES:
            return self._refuse_big_option(option, length)
        if avail < _OPTION.size + length:
            self._need = _OPTION.size + length
            return False
        data = bytes(self._mv[start + _OPTION.size:start + _OPTION.size + length])
        self._start = start + _OPTION.size + length
        if self.tls == "require" and not self.tls_active and option not in OPTIONS_BEFORE_TLS:
            return self._refuse_without_tls(option)
        OPTION_HANDLERS.get(option, NbdConnection._opt_unsupported)(self, option, data)
        return not self.starttls

    def _phase_tls_wait(self, _requests) -> bool:
        return False                        # the runtime runs the TLS handshake; see tls_started()

    def _phase_transmission(self, requests) -> bool:
        """The hot path: parse every complete request in the buffer.

        One function on purpose: a call per request costs as much as the parse.
        """
        mv, pos, end = self._mv, self._start, self._end
        unpack, inflight_max, output_max = _REQUEST.unpack_from, self.max_inflight, self.max_output_bytes
        self.backlog = False
        while end - pos >= 28:
            if self.inflight >= inflight_max or self.unsent_bytes + self.read_bytes_owed >= output_max:
                self.backlog = True
                self._need = 28
                break
            magic, flags, op, cookie, offset, length = unpack(mv, pos)
            if magic != NBD_REQUEST_MAGIC:
                self._start = pos
                return self._fatal(f"bad request magic {magic:#x}")
            if op == NBD_CMD_DISC:
                self._start = pos + 28
                return self._disconnect()
            error = self._check(op, flags, offset, length)
            if op == NBD_CMD_WRITE:
                if error:
                    self._start = pos + 28
                    return self._refuse_write(cookie, error, length)
                if end - pos < 28 + length:
                    self._need = 28 + length
                    break
                data = mv[pos + 28:pos + 28 + length]
                pos += 28 + length
            else:
                data = None
                pos += 28
                if error:
                    self._queue_reply(cookie, error)
                    continue
            if not length and op != NBD_CMD_FLUSH:
                # Nothing to do: never surface empty I/O. An empty BLOCK_STATUS has no
                # descriptor to answer with.
                self._queue_reply(cookie, NBD_EINVAL if op == NBD_CMD_BLOCK_STATUS else 0)
                continue
            requests.append(NbdRequest(cookie, op, flags, self.export, offset, length, data))
            self.inflight += 1
            if op == NBD_CMD_READ:
                self.read_bytes_owed += length
        else:
            self._need = 28
        self._start = pos
        return False

    def _phase_discard(self, _requests) -> bool:
        take = min(self._discard_bytes, self._end - self._start)
        self._start += take
        self._discard_bytes -= take
        if self._discard_bytes:
            self._need = 0
            return False
        self._phase, done = self._after_discard
        self._after_discard = None
        done()
        return True

    def _phase_done(self, _requests) -> bool:
        self._start = self._end             # nothing may follow NBD_CMD_DISC: ignore it
        return False

    # -- transmission helpers ----------------------------------------------------

    def _check(self, op, flags, offset, length) -> int:
        """The NBD error for a request the engine can judge alone, or 0 if it is valid."""
        allowed = self._cmd_flags.get(op)
        if allowed is None:
            return NBD_EINVAL                   # unknown command (the spec's SHOULD)
        if self._read_only and op in _WRITE_OPS:
            return NBD_EPERM
        if flags & ~allowed:
            return NBD_EINVAL                   # unknown flag, or one not valid for this command
        if op == NBD_CMD_FLUSH:
            return NBD_EINVAL if offset or length else 0
        if length > self._max_payload and op <= NBD_CMD_WRITE:
            return NBD_EINVAL                   # READ/WRITE over the advertised maximum payload
        if (offset | length) & self._align_mask:
            return NBD_EINVAL                   # not aligned to the advertised minimum block
        if offset + length > self._size:
            # The spec: ENOSPC for a write (WRITE, WRITE_ZEROES) beyond the end,
            # EINVAL for a read or a trim.
            return NBD_ENOSPC if op in _SPACE_OPS else NBD_EINVAL
        return 0

    def _refuse_write(self, cookie, error, length) -> bool:
        # The payload follows the header whatever we think of it: consume it,
        # then reply. Beyond the interoperable maximum that is a denial of
        # service, and the spec lets the server hang up instead.
        if length > max(INTEROP_PAYLOAD_BYTES, self._max_payload):
            return self._fatal(f"write payload of {length} bytes is beyond any sane bound")
        return self._discard(length, self._phase_transmission,
                             lambda: self._queue_reply(cookie, error))

    def _queue_reply(self, cookie, error) -> None:
        self._out.append(_SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, error, cookie))
        self.unsent_bytes += 16

    def _disconnect(self) -> bool:
        self._draining = True
        self._phase = self._phase_done
        if not self.inflight:
            self._close("client sent NBD_CMD_DISC")
        return False


    def _lookup(self, name) -> Export | None:
        return self.exports[0] if name == "" else self._by_name.get(name)

    def _payload_limit(self, export) -> int:
        return min(export.max_payload_bytes, self.max_payload_bytes)

    def _enter_state(self, export) -> None:
        """Select the export (None before option haggling ends) and cache what _check reads."""
        self.export = export
        self._size = export.size_bytes if export else 0
        self._read_only = export.read_only if export else True
        self._align_mask = export.min_block_bytes - 1 if export else 0
        self._max_payload = self._payload_limit(export) if export else 0
        self._cmd_flags = self._structured_command_flags(export, export.command_flags()) if export else {}
        if export is not None:
            self._phase = self._phase_transmission

    def _discard(self, nbytes, next_phase, done) -> bool:
        self._discard_bytes = nbytes
        self._after_discard = (next_phase, done)
        self._phase = self._phase_discard
        return True

    def _fatal(self, reason) -> bool:
        self._close(f"protocol violation: {reason}")
        return False

    def _close(self, reason) -> None:
        self.closed = True
        self.close_reason = reason


def nbd_uri_unix(socket_path: str, export_name: str, tls: bool = False) -> str:
    """`nbd+unix:///<export>?socket=<path>` (`nbds+unix` with TLS), per the NBD URI specification."""
    return f"{'nbds' if tls else 'nbd'}+unix:///{quote(export_name, safe='')}?socket={quote(str(socket_path), safe='/')}"


def nbd_uri_tcp(host: str, port: int, name: str, tls: bool = False) -> str:
    """`nbd://<host>:<port>/<export>` (`nbds://` with TLS); IPv6 literals are bracketed."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{'nbds' if tls else 'nbd'}://{host}:{port}/{quote(name, safe='')}"
