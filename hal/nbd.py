"""NBD host port: a sans-IO NBD server protocol engine, one NbdConnection per client.

Owns the NBD wire protocol as NetworkBlockDevice/nbd doc/proto.md defines it:
the fixed newstyle handshake, option haggling (EXPORT_NAME, ABORT, LIST, INFO,
GO) and the transmission phase with simple replies. It never touches a socket:
the runtime receives into `recv_buffer()`, passes the byte count to
`received()`, gets back the valid requests, answers each with `reply()` and
sends `pending_output()` with sendmsg.

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
- Simple replies only: NBD_OPT_STRUCTURED_REPLY is answered NBD_REP_ERR_UNSUP,
  which the spec allows. So are metadata contexts and extended headers.
- TLS (`tls`): "off" answers NBD_OPT_STARTTLS with NBD_REP_ERR_UNSUP (the
  spec's NOTLS mode); "allow" and "require" ACK it and stop parsing until the
  runtime has run the TLS handshake on the same socket (`starttls` set, then
  `tls_leftover()` and `tls_started()`); option haggling goes on inside TLS.
  With "require", before TLS every option but STARTTLS and ABORT gets
  NBD_REP_ERR_TLS_REQD, and NBD_OPT_EXPORT_NAME (which cannot be errored) closes.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from urllib.parse import quote

# Magic numbers.
NBD_MAGIC = 0x4E42444D41474943              # "NBDMAGIC"
NBD_IHAVEOPT = 0x49484156454F5054           # "IHAVEOPT"
NBD_REP_MAGIC = 0x0003E889045565A9
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698

# Handshake flags (server) and client flags.
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1
HANDSHAKE_FLAGS = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES
CLIENT_FLAGS_KNOWN = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES

# Transmission flags.
NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_ROTATIONAL = 1 << 4
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_SEND_DF = 1 << 7
NBD_FLAG_CAN_MULTI_CONN = 1 << 8
NBD_FLAG_SEND_RESIZE = 1 << 9
NBD_FLAG_SEND_CACHE = 1 << 10
NBD_FLAG_SEND_FAST_ZERO = 1 << 11

# Options.
NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_LIST = 3
NBD_OPT_STARTTLS = 5
NBD_OPT_INFO = 6
NBD_OPT_GO = 7
NBD_OPT_STRUCTURED_REPLY = 8
NBD_OPT_LIST_META_CONTEXT = 10
NBD_OPT_SET_META_CONTEXT = 11
NBD_OPT_EXTENDED_HEADERS = 12

# Option reply types.
NBD_REP_ACK = 1
NBD_REP_SERVER = 2
NBD_REP_INFO = 3
NBD_REP_FLAG_ERROR = 1 << 31
NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR + 1
NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR + 2
NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR + 3
NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR + 5
NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR + 6
NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR + 7
NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR + 9

# Info types (NBD_OPT_INFO / NBD_OPT_GO).
NBD_INFO_EXPORT = 0
NBD_INFO_NAME = 1
NBD_INFO_DESCRIPTION = 2
NBD_INFO_BLOCK_SIZE = 3

# Commands.
NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_CACHE = 5
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_BLOCK_STATUS = 7

# Command flags.
NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1
NBD_CMD_FLAG_DF = 1 << 2
NBD_CMD_FLAG_REQ_ONE = 1 << 3
NBD_CMD_FLAG_FAST_ZERO = 1 << 4

# Error values (the spec's list; ENOTSUP for an operation the backend lacks).
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

# Bounds.
NBD_STRING_MAX_BYTES = 4096                 # the spec's hard limit on names and messages
OPTION_DATA_MAX_BYTES = 16 << 10            # largest option we read into memory
OPTION_DISCARD_MAX_BYTES = 1 << 20          # larger options are a denial of service: hang up
INTEROP_PAYLOAD_BYTES = 32 << 20            # the spec's interoperable maximum (2^25)
RECV_CHUNK_MIN_BYTES = 64 << 10             # recv_buffer() always offers at least this
INFLIGHT_MAX = 4096
TLS_MODES = ("off", "allow", "require")
OUTPUT_UNBOUNDED = 1 << 62                  # max_output_bytes when the caller never reports sends

_REQUEST = struct.Struct(">IHHQQI")         # magic, flags, type, cookie, offset, length
_SIMPLE_REPLY = struct.Struct(">IIQ")       # magic, error, cookie
_OPTION = struct.Struct(">QII")             # IHAVEOPT, option, length
_OPTION_REPLY = struct.Struct(">QIII")      # magic, option, reply type, length
_EXPORT_NAME_REPLY = struct.Struct(">QH")   # size, transmission flags (+124 zeroes)
_INFO_EXPORT = struct.Struct(">HQH")        # NBD_INFO_EXPORT, size, transmission flags
_INFO_BLOCK_SIZE = struct.Struct(">HIII")   # NBD_INFO_BLOCK_SIZE, minimum, preferred, maximum
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
REQUEST_SIZE_BYTES = _REQUEST.size
assert REQUEST_SIZE_BYTES == 28 and _SIMPLE_REPLY.size == 16 and _OPTION_REPLY.size == 20

GREETING = struct.pack(">QQH", NBD_MAGIC, NBD_IHAVEOPT, HANDSHAKE_FLAGS)
_ZEROES_124 = bytes(124)
_WRITE_OPS = frozenset((NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES))
_SPACE_OPS = frozenset((NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES))   # ENOSPC beyond the end


class NbdOptionError(ValueError):
    """Malformed option data from the client (answered NBD_REP_ERR_INVALID)."""


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


def parse_info_request_untrusted(data) -> tuple[str, tuple]:
    """NBD_OPT_INFO / NBD_OPT_GO data -> (export name, requested info types)."""
    if len(data) < 6:
        raise NbdOptionError("option data shorter than 6 bytes")
    (name_len,) = _U32.unpack_from(data, 0)
    if name_len > NBD_STRING_MAX_BYTES or len(data) < 6 + name_len:
        raise NbdOptionError(f"export name length {name_len} does not fit the option")
    name = _decode_name_untrusted(data[4:4 + name_len])
    (count,) = _U16.unpack_from(data, 4 + name_len)
    if len(data) != 6 + name_len + 2 * count:
        raise NbdOptionError(f"{count} info requests do not match the option length")
    return name, struct.unpack_from(f">{count}H", data, 6 + name_len)


def _decode_name_untrusted(raw) -> str:
    try:
        name = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NbdOptionError("export name is not UTF-8") from exc
    if "\0" in name:
        raise NbdOptionError("export name contains NUL")
    return name


class NbdConnection:
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
        if self.tls == "require" and not self.tls_active and option not in _OPTIONS_BEFORE_TLS:
            return self._refuse_without_tls(option)
        _OPTION_HANDLERS.get(option, NbdConnection._opt_unsupported)(self, option, data)
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
                self._queue_reply(cookie, 0)    # nothing to do: never surface empty I/O
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

    # -- option handlers -----------------------------------------------------------

    def _opt_export_name(self, option, data) -> None:
        try:
            export = self._lookup(_decode_name_untrusted(data))
        except NbdOptionError:
            export = None
        if export is None:                      # this option cannot be errored: hang up
            self._fatal(f"NBD_OPT_EXPORT_NAME for unknown export {bytes(data)[:64]!r}")
            return
        self._out.append(_EXPORT_NAME_REPLY.pack(export.size_bytes, export.transmission_flags))
        self.unsent_bytes += _EXPORT_NAME_REPLY.size
        if not self.no_zeroes:
            self._out.append(_ZEROES_124)
            self.unsent_bytes += len(_ZEROES_124)
        self._enter_state(export)

    def _opt_abort(self, option, data) -> None:
        self._option_reply(option, NBD_REP_ACK)
        self._close("client sent NBD_OPT_ABORT")

    def _opt_list(self, option, data) -> None:
        if data:
            self._option_reply(option, NBD_REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")
            return
        for export in self.exports:
            name = export.name.encode()
            self._option_reply(option, NBD_REP_SERVER,
                               _U32.pack(len(name)) + name + export.description.encode())
        self._option_reply(option, NBD_REP_ACK)

    def _opt_info_go(self, option, data) -> None:
        try:
            name, infos = parse_info_request_untrusted(data)
        except NbdOptionError as exc:
            self._option_reply(option, NBD_REP_ERR_INVALID, str(exc).encode())
            return
        export = self._lookup(name)
        if export is None:
            self._option_reply(option, NBD_REP_ERR_UNKNOWN, f"no export {name[:64]!r}".encode())
            return
        for info in self._info_replies(export, infos):
            self._option_reply(option, NBD_REP_INFO, info)
        self._option_reply(option, NBD_REP_ACK)
        if option == NBD_OPT_GO:
            self._enter_state(export)

    def _info_replies(self, export, infos) -> list:
        """NBD_INFO_EXPORT always; the others only when asked for."""
        replies = [_INFO_EXPORT.pack(NBD_INFO_EXPORT, export.size_bytes, export.transmission_flags)]
        if NBD_INFO_NAME in infos:
            replies.append(_U16.pack(NBD_INFO_NAME) + export.name.encode())
        if NBD_INFO_DESCRIPTION in infos and export.description:
            replies.append(_U16.pack(NBD_INFO_DESCRIPTION) + export.description.encode())
        if NBD_INFO_BLOCK_SIZE in infos:
            replies.append(_INFO_BLOCK_SIZE.pack(
                NBD_INFO_BLOCK_SIZE, export.min_block_bytes, export.preferred_block_bytes,
                self._payload_limit(export)))
        return replies

    def _opt_starttls(self, option, data) -> None:
        if self.tls == "off":
            self._opt_unsupported(option, data)
        elif self.tls_active:
            self._option_reply(option, NBD_REP_ERR_INVALID, b"TLS is already on")
        elif data:
            self._option_reply(option, NBD_REP_ERR_INVALID, b"NBD_OPT_STARTTLS takes no data")
        else:
            self._option_reply(option, NBD_REP_ACK)
            self.starttls = True
            self._phase = self._phase_tls_wait

    def _refuse_without_tls(self, option) -> bool:
        if option == NBD_OPT_EXPORT_NAME:       # cannot be errored: hang up
            return self._fatal("NBD_OPT_EXPORT_NAME without TLS, which this server requires")
        self._option_reply(option, NBD_REP_ERR_TLS_REQD, b"this server requires TLS (NBD_OPT_STARTTLS)")
        return True

    def _opt_unsupported(self, option, data) -> None:
        # STRUCTURED_REPLY, metadata contexts, extended headers, STARTTLS with
        # TLS off and anything unknown: simple replies, no block status.
        self._option_reply(option, NBD_REP_ERR_UNSUP, f"option {option} is not supported".encode())

    def _refuse_big_option(self, option, length) -> bool:
        if option == NBD_OPT_EXPORT_NAME or length > OPTION_DISCARD_MAX_BYTES:
            return self._fatal(f"option {option} with {length} bytes of data is too large")
        reply = NBD_REP_ERR_TOO_BIG if option in _OPTION_HANDLERS else NBD_REP_ERR_UNSUP
        self._start += _OPTION.size
        return self._discard(length, self._phase_option,
                             lambda: self._option_reply(option, reply, b"option data too large"))

    def _option_reply(self, option, reply_type, data=b"") -> None:
        self._out.append(_OPTION_REPLY.pack(NBD_REP_MAGIC, option, reply_type, len(data)) + data)
        self.unsent_bytes += _OPTION_REPLY.size + len(data)

    # -- state ---------------------------------------------------------------------

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
        self._cmd_flags = export.command_flags() if export else {}
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


_OPTION_HANDLERS = {
    NBD_OPT_EXPORT_NAME: NbdConnection._opt_export_name,
    NBD_OPT_ABORT: NbdConnection._opt_abort,
    NBD_OPT_LIST: NbdConnection._opt_list,
    NBD_OPT_INFO: NbdConnection._opt_info_go,
    NBD_OPT_GO: NbdConnection._opt_info_go,
    NBD_OPT_STARTTLS: NbdConnection._opt_starttls,
}
_OPTIONS_BEFORE_TLS = frozenset((NBD_OPT_STARTTLS, NBD_OPT_ABORT))


def nbd_uri_unix(socket_path: str, export_name: str, tls: bool = False) -> str:
    """`nbd+unix:///<export>?socket=<path>` (`nbds+unix` with TLS), per the NBD URI specification."""
    return f"{'nbds' if tls else 'nbd'}+unix:///{quote(export_name, safe='')}?socket={quote(str(socket_path), safe='/')}"


def nbd_uri_tcp(host: str, port: int, name: str, tls: bool = False) -> str:
    """`nbd://<host>:<port>/<export>` (`nbds://` with TLS); IPv6 literals are bracketed."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{'nbds' if tls else 'nbd'}://{host}:{port}/{quote(name, safe='')}"
