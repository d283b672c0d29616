"""Fuzz target `nbd`: a client's bytes into the NBD server engine (hal/host/nbd.py) and its TLS layer.

Input: a mode byte (TLS off/allow/require, in-flight and output bounds, whether
the bytes after a STARTTLS go to a real TlsSession), a byte seeding how the
stream is cut into reads and how requests are answered, then the client's
byte stream. The engine must never raise on client bytes: it answers, or
closes with close_reason. Every request it surfaces must be one the engine
promised to check (known op, in range, aligned, within the payload bound), and
its bounds (in flight, output) must hold. A TlsSession fed the rest may raise
ssl.SSLError (bad handshake or record) and EOFError (the stream ended) only.
"""
import random
import ssl
import tempfile

from hal.host import nbd as NBD
from hal.host.nbd import Export, NbdConnection
from hal.host.nbd_tls import TlsSession, server_context

from .reader import Reader

MiB = 1 << 20
PAYLOAD_MAX = 64 << 10
EXPORTS = [
    Export("lun0", 64 * MiB, 0, description="first LUN", max_payload_bytes=PAYLOAD_MAX),
    Export("lun1", 16 * MiB, 1, description="read-only LUN", read_only=True, max_payload_bytes=PAYLOAD_MAX),
    Export("big", 1 << 40, 2, min_block_bytes=4096, max_payload_bytes=PAYLOAD_MAX),
]
OPS = (NBD.NBD_CMD_READ, NBD.NBD_CMD_WRITE, NBD.NBD_CMD_FLUSH, NBD.NBD_CMD_TRIM, NBD.NBD_CMD_WRITE_ZEROES)
_tls_ctx = None


def _server_context():
    global _tls_ctx
    if _tls_ctx is None:
        from hal.host.tls_certs import create_tls_dir
        paths = create_tls_dir(tempfile.mkdtemp(prefix="fuzz-nbd-tls-"))
        _tls_ctx = server_context(paths["cert"], paths["key"], paths["ca"], verify_client=True)
    return _tls_ctx


def _check_request(conn, req):
    export = conn.export
    assert req.export is export and req.op in OPS, f"surfaced {req!r}"
    assert 0 < conn.inflight <= conn.max_inflight, "in-flight bound broken"
    if req.op == NBD.NBD_CMD_FLUSH:
        assert req.offset == 0 and req.length == 0, f"surfaced {req!r}"
        return
    assert 0 < req.length and req.offset + req.length <= export.size_bytes, f"out of range: {req!r}"
    assert not (req.offset | req.length) % export.min_block_bytes, f"misaligned: {req!r}"
    assert not (export.read_only and req.op != NBD.NBD_CMD_READ), f"write to a read-only export: {req!r}"
    if req.op in (NBD.NBD_CMD_READ, NBD.NBD_CMD_WRITE):
        assert req.length <= min(PAYLOAD_MAX, conn.max_payload_bytes), f"oversized: {req!r}"
    if req.op == NBD.NBD_CMD_WRITE:
        assert req.data is not None and len(req.data) == req.length, f"write payload: {req!r}"


def _answer(conn, rng, outstanding):
    """Reply to some of the requests in flight, as a controller would, in any order."""
    rng.shuffle(outstanding)
    keep = rng.randrange(len(outstanding) + 1) if outstanding else 0
    for req in outstanding[keep:]:
        error = rng.choice((0, 0, 0, NBD.NBD_EIO))
        data = bytes(req.length) if req.op == NBD.NBD_CMD_READ and not error else None
        conn.reply(req, error, data)
    del outstanding[keep:]


def _drain(conn):
    out = conn.pending_output()
    size = sum(len(b) for b in out)
    assert size == conn.unsent_bytes, "output accounting"
    conn.sent(size)


def _tls(rest: bytes, leftover: bytes):
    session = TlsSession(_server_context(), leftover)
    try:
        session.feed(rest)
        if session.handshake():
            session.read_into(memoryview(bytearray(64 << 10)))
    except (ssl.SSLError, EOFError):
        pass
    session.take_output()


def one_input(data: bytes) -> None:
    r = Reader(data)
    mode = r.u8()
    rng = random.Random(r.u8())
    stream = r.rest()
    conn = NbdConnection(EXPORTS, max_inflight=1 + (mode >> 2) % 8, max_payload_bytes=PAYLOAD_MAX,
                         max_output_bytes=None if mode & 0x20 else PAYLOAD_MAX + 4096,
                         tls=NBD.TLS_MODES[mode % 3])
    outstanding, pos = [], 0
    while not conn.closed:
        if conn.starttls:
            leftover = conn.tls_leftover()
            if mode & 0x40:
                _tls(stream[pos:], leftover)
                return
            conn.tls_started()          # as if the TLS handshake ran: haggling goes on inside it
        if conn.want_read and pos < len(stream):
            buf = conn.recv_buffer()
            n = min(len(buf), len(stream) - pos, rng.choice((1, 3, 28, 64, 4096, 1 << 20)))
            buf[:n] = stream[pos:pos + n]
            pos += n
            got = conn.received(n)
        elif conn.backlog and conn.has_room:
            got = conn.received(0)
        elif outstanding:
            got = []
        else:
            break                       # nothing more to read and nothing to answer
        for req in got:
            _check_request(conn, req)
        outstanding += got
        _answer(conn, rng, outstanding)
        _drain(conn)
    assert conn.closed or pos == len(stream) or conn.starttls, "stopped reading with bytes left"
