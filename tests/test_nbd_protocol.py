"""The NBD protocol engine (hal/host/nbd.py): golden bytes, sans-IO behaviour, raw sockets.

Three parts: golden vectors for the handshake and the request/reply headers;
the engine driven without I/O (byte-at-a-time feeding, random chunking,
backpressure, discards); and raw-socket sessions against the in-memory server,
where every malformed request must get its error reply and the connection
must then serve the next valid request.
"""
import random
import struct
import time

import pytest

from fixtures.nbd_memserver import MemServer

from hal.host.client import RawNbdClient, open_session
from hal.host import nbd
from hal.host.nbd import Export, NbdConnection

MiB = 1 << 20
EXPORTS = [
    Export("lun0", 64 * MiB, 0, description="first LUN"),
    Export("lun1", 16 * MiB, 1, description="read-only LUN", read_only=True),
]
RW_FLAGS = 0x016D       # HAS_FLAGS SEND_FLUSH SEND_FUA SEND_TRIM SEND_WRITE_ZEROES CAN_MULTI_CONN
RO_FLAGS = 0x0107       # HAS_FLAGS READ_ONLY SEND_FLUSH CAN_MULTI_CONN


# -- helpers for the sans-IO tests -------------------------------------------------

def option(opt, data=b""):
    return struct.pack(">QII", nbd.NBD_IHAVEOPT, opt, len(data)) + data


def go_data(name, infos=()):
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def request(op, cookie, offset=0, length=0, flags=0, data=b""):
    return struct.pack(">IHHQQI", nbd.NBD_REQUEST_MAGIC, flags, op, cookie, offset, length) + data


def feed(conn, data, chunk=None):
    """Deliver `data` through recv_buffer()/received(); return (requests, output bytes)."""
    requests, pos = [], 0
    while pos < len(data):
        buf = conn.recv_buffer()
        n = min(len(buf), len(data) - pos, chunk or len(data))
        buf[:n] = data[pos:pos + n]
        pos += n
        got = conn.received(n)
        requests += [(r, bytes(r.data) if r.data is not None else None) for r in got]
    return requests, b"".join(bytes(b) for b in conn.pending_output())


def ready_conn(export="lun0", **kwargs):
    conn = NbdConnection(EXPORTS, **kwargs)
    _, out = feed(conn, struct.pack(">I", 3) + option(nbd.NBD_OPT_GO, go_data(export)))
    assert conn.export.name == export and out.startswith(nbd.GREETING)
    return conn


def simple_reply(error, cookie):
    return struct.pack(">IIQ", nbd.NBD_SIMPLE_REPLY_MAGIC, error, cookie)


def error_chunk(error, cookie):
    """A structured NBD_REPLY_TYPE_ERROR chunk flagged DONE, with no message."""
    return struct.pack(">IHHQIIH", 0x668E33EF, 1, 0x8001, cookie, 6, error, 0)


# -- golden vectors ----------------------------------------------------------------

def test_greeting_golden_bytes():
    conn = NbdConnection(EXPORTS)
    assert b"".join(conn.pending_output()).hex() == "4e42444d41474943" "49484156454f5054" "0003"
    assert conn.pending_output() == [] and conn.want_read and conn.export is None


@pytest.mark.parametrize("client_flags, tail", [(3, ""), (1, "00" * 124)])
def test_export_name_reply_golden_bytes(client_flags, tail):
    conn = NbdConnection(EXPORTS)
    conn.pending_output()
    _, out = feed(conn, struct.pack(">I", client_flags) + option(nbd.NBD_OPT_EXPORT_NAME, b"lun0"))
    assert out.hex() == "0000000004000000" "016d" + tail
    assert conn.export is EXPORTS[0]


def test_go_reply_golden_bytes():
    conn = NbdConnection(EXPORTS)
    conn.pending_output()
    infos = (nbd.NBD_INFO_NAME, nbd.NBD_INFO_DESCRIPTION, nbd.NBD_INFO_BLOCK_SIZE)
    _, out = feed(conn, bytes.fromhex("00000003") + option(nbd.NBD_OPT_GO, go_data("", infos)))
    rep = "0003e889045565a9" "00000007"
    assert out.hex() == (
        rep + "00000003" "0000000c" "0000" "0000000004000000" "016d"        # INFO_EXPORT
        + rep + "00000003" "00000006" "0001" + b"lun0".hex()               # INFO_NAME (default export)
        + rep + "00000003" "0000000b" "0002" + b"first LUN".hex()          # INFO_DESCRIPTION
        + rep + "00000003" "0000000e" "0003" "00000200" "00001000" "00400000"  # INFO_BLOCK_SIZE
        + rep + "00000001" "00000000")                                     # ACK
    assert conn.export is EXPORTS[0]


def test_request_and_reply_header_golden_bytes():
    conn = ready_conn()
    wire = bytes.fromhex("25609513" "0001" "0001" "0102030405060708" "0000000000001000" "00000200")
    assert wire == request(nbd.NBD_CMD_WRITE, 0x0102030405060708, 4096, 512, nbd.NBD_CMD_FLAG_FUA)
    [(req, data)], _ = feed(conn, wire + b"\xaa" * 512)
    assert (req.cookie, req.op, req.flags, req.offset, req.length) == (0x0102030405060708, 1, 1, 4096, 512)
    assert data == b"\xaa" * 512 and req.export is EXPORTS[0] and conn.inflight == 1
    conn.reply(req)
    assert b"".join(conn.pending_output()).hex() == "67446698" "00000000" "0102030405060708"


def test_read_reply_carries_data_and_an_errored_read_does_not():
    conn = ready_conn()
    reqs, _ = feed(conn, request(nbd.NBD_CMD_READ, 1, 0, 512) + request(nbd.NBD_CMD_READ, 2, 512, 512))
    conn.reply(reqs[0][0], data=b"\x01" * 512)
    conn.reply(2, error=nbd.NBD_EIO, data=b"\x02" * 512)
    assert b"".join(conn.pending_output()) == simple_reply(0, 1) + b"\x01" * 512 + simple_reply(5, 2)


# -- the engine without I/O --------------------------------------------------------

def session_bytes():
    return (struct.pack(">I", 3) + option(nbd.NBD_OPT_LIST)
            + option(nbd.NBD_OPT_STRUCTURED_REPLY) + option(nbd.NBD_OPT_GO, go_data("lun0"))
            + request(nbd.NBD_CMD_WRITE, 7, 0, 1024, data=b"w" * 1024)
            + request(nbd.NBD_CMD_READ, 8, 99 * MiB, 512) + request(nbd.NBD_CMD_FLUSH, 9))


def test_byte_at_a_time_equals_whole():
    whole = feed(NbdConnection(EXPORTS), session_bytes())
    trickle = feed(NbdConnection(EXPORTS), session_bytes(), chunk=1)
    assert [(r.cookie, d) for r, d in whole[0]] == [(r.cookie, d) for r, d in trickle[0]]
    assert [(r.cookie, d) for r, d in whole[0]] == [(7, b"w" * 1024), (9, None)]
    # The session negotiated structured replies: the refused read is an error chunk.
    assert whole[1] == trickle[1] and error_chunk(nbd.NBD_EINVAL, 8) in whole[1]


def test_write_payload_is_a_view_of_the_receive_buffer():
    conn = ready_conn()
    buf = conn.recv_buffer()
    wire = request(nbd.NBD_CMD_WRITE, 1, 0, 4096, data=b"z" * 4096)
    buf[:len(wire)] = wire
    [req] = conn.received(len(wire))
    assert isinstance(req.data, memoryview) and req.data.obj is buf.obj   # no copy was made
    assert req.data.nbytes == 4096


def random_requests(rng, count):
    """A stream of valid requests with their expected (cookie, op, offset, payload)."""
    wire, expected = [], []
    for cookie in range(count):
        length = rng.choice([512, 4096, 65536, 1 * MiB, 4 * MiB])
        offset = rng.randrange(0, (64 * MiB - length) // 512) * 512
        if rng.random() < 0.5:
            payload = rng.randbytes(length)
            wire.append(request(nbd.NBD_CMD_WRITE, cookie, offset, length, data=payload))
            expected.append((cookie, nbd.NBD_CMD_WRITE, offset, payload))
        else:
            wire.append(request(nbd.NBD_CMD_READ, cookie, offset, length))
            expected.append((cookie, nbd.NBD_CMD_READ, offset, None))
    return b"".join(wire), expected


@pytest.mark.parametrize("seed", range(4))
def test_random_chunking_keeps_every_request_and_payload(seed):
    rng = random.Random(seed)
    wire, expected = random_requests(rng, 40)
    conn, pos, seen = ready_conn(), 0, []
    while pos < len(wire):
        buf = conn.recv_buffer()
        assert len(buf) >= nbd.RECV_CHUNK_MIN_BYTES
        n = min(len(buf), len(wire) - pos, rng.choice([1, 27, 28, 4000, 70000, 1 << 22]))
        buf[:n] = wire[pos:pos + n]
        pos += n
        for req in conn.received(n):
            seen.append((req.cookie, req.op, req.offset, bytes(req.data) if req.data is not None else None))
            conn.reply(req, data=bytes(req.length) if req.op == nbd.NBD_CMD_READ else None)
    assert seen == expected, f"seed {seed}"


def test_backpressure_holds_requests_beyond_max_inflight():
    conn = ready_conn(max_inflight=4)
    reqs, _ = feed(conn, b"".join(request(nbd.NBD_CMD_FLUSH, c) for c in range(10)))
    assert [r.cookie for r, _ in reqs] == [0, 1, 2, 3]
    assert conn.inflight == 4 and conn.backlog and not conn.want_read
    conn.reply(0)
    conn.reply(1)
    assert [r.cookie for r in conn.received(0)] == [4, 5] and not conn.want_read
    for cookie in (2, 3, 4, 5):
        conn.reply(cookie)
    assert [r.cookie for r in conn.received(0)] == [6, 7, 8, 9]
    for cookie in (6, 7, 8, 9):
        conn.reply(cookie)
    assert conn.want_read and not conn.backlog and conn.inflight == 0


def test_output_bound_holds_requests_until_the_replies_are_sent():
    """Issue 15: reads whose replies are not sent stop the parsing; sent() lets it go on."""
    conn = ready_conn(max_output_bytes=8 * MiB)
    conn.sent(conn.unsent_bytes)                    # the handshake's output went out
    reqs, _ = feed(conn, b"".join(request(nbd.NBD_CMD_READ, c, 0, 4 * MiB) for c in range(6)))
    assert [r.cookie for r, _ in reqs] == [0, 1] and conn.backlog and not conn.want_read
    for r, _ in reqs:
        conn.reply(r, data=bytes(4 * MiB))
    assert conn.read_bytes_owed == 0 and conn.unsent_bytes == 2 * (4 * MiB + 16)
    assert not conn.has_room and conn.received(0) == []
    conn.pending_output()
    conn.sent(4 * MiB)                              # half of it went out: room for one more read
    assert conn.has_room and [r.cookie for r in conn.received(0)] == [2] and conn.backlog
    conn.sent(4 * MiB + 32)
    assert [r.cookie for r in conn.received(0)] == [3]


def test_oversized_write_payload_is_skipped_then_einval():
    conn = ready_conn(max_payload_bytes=64 << 10)
    wire = (request(nbd.NBD_CMD_WRITE, 1, 0, 1 * MiB, data=b"\xee" * MiB)
            + request(nbd.NBD_CMD_WRITE, 2, 0, 512, data=b"k" * 512))
    reqs, out = feed(conn, wire, chunk=30000)
    assert [(r.cookie, d) for r, d in reqs] == [(2, b"k" * 512)]
    assert out == simple_reply(nbd.NBD_EINVAL, 1) and not conn.closed


def test_write_beyond_any_sane_bound_closes():
    conn = ready_conn()
    feed(conn, request(nbd.NBD_CMD_WRITE, 1, 0, 0xFFFFF000))
    assert conn.closed and "beyond any sane bound" in conn.close_reason


def test_disc_closes_once_inflight_replies_are_queued():
    conn = ready_conn()
    reqs, _ = feed(conn, request(nbd.NBD_CMD_READ, 1, 0, 512) + request(nbd.NBD_CMD_DISC, 2)
                   + request(nbd.NBD_CMD_READ, 3, 0, 512))
    assert [r.cookie for r, _ in reqs] == [1] and not conn.closed and not conn.want_read
    conn.reply(1, data=bytes(512))
    assert conn.closed and conn.close_reason == "client sent NBD_CMD_DISC"
    assert b"".join(conn.pending_output()) == simple_reply(0, 1) + bytes(512)


@pytest.mark.parametrize("wire, reason", [
    (struct.pack(">I", 4), "unknown client flags"),
    (struct.pack(">I", 3) + b"IHAVEOPX" + bytes(8), "bad option magic"),
    (struct.pack(">I", 3) + option(nbd.NBD_OPT_EXPORT_NAME, b"nope"), "unknown export"),
    (struct.pack(">I", 3) + struct.pack(">QII", nbd.NBD_IHAVEOPT, 6, 1 << 30), "too large"),
])
def test_fatal_handshake_violations_close(wire, reason):
    conn = NbdConnection(EXPORTS)
    feed(conn, wire)
    assert conn.closed and reason in conn.close_reason and not conn.want_read


def test_uris_follow_the_nbd_uri_spec():
    assert nbd.nbd_uri_unix("/tmp/x y/s.sock", "lun0") == "nbd+unix:///lun0?socket=/tmp/x%20y/s.sock"
    assert nbd.nbd_uri_tcp("127.0.0.1", 10809, "lun1") == "nbd://127.0.0.1:10809/lun1"
    assert nbd.nbd_uri_tcp("::1", 10809, "a b") == "nbd://[::1]:10809/a%20b"


# -- raw sockets against a server ----------------------------------------------------

@pytest.fixture
def nbd_server(tmp_path):
    server = MemServer(tmp_path / "nbd.sock", EXPORTS).start()
    yield server
    server.stop()


@pytest.fixture
def session(nbd_server):
    client = open_session(nbd_server.socket_path, "lun0")
    yield client
    client.close()


def assert_still_serves(client, cookie=0xC0FFEE):
    """The connection answers a valid write and reads it back."""
    client.request(nbd.NBD_CMD_WRITE, cookie, 512, 512, data=b"\x5a" * 512)
    assert client.read_reply() == (0, cookie, b"")
    client.request(nbd.NBD_CMD_READ, cookie + 1, 512, 512)
    assert client.read_reply(512) == (0, cookie + 1, b"\x5a" * 512)


def test_handshake_bytes_over_a_socket(nbd_server):
    client = RawNbdClient(nbd_server.socket_path)
    assert client.handshake() == bytes.fromhex("4e42444d4147494349484156454f50540003")
    client.send_option(nbd.NBD_OPT_EXPORT_NAME, b"lun1")
    assert client.recv_exact(10) == struct.pack(">QH", 16 * MiB, RO_FLAGS)
    client.request(nbd.NBD_CMD_READ, 5, 0, 512)
    assert client.read_reply(512) == (0, 5, bytes(512))
    client.close()


def test_option_list_names_every_export_with_its_description(nbd_server):
    client = RawNbdClient(nbd_server.socket_path)
    client.handshake()
    client.send_option(nbd.NBD_OPT_LIST)
    replies = [client.read_option_reply() for _ in range(3)]
    assert replies == [(3, nbd.NBD_REP_SERVER, b"\0\0\0\4lun0first LUN"),
                       (3, nbd.NBD_REP_SERVER, b"\0\0\0\4lun1read-only LUN"),
                       (3, nbd.NBD_REP_ACK, b"")]
    client.send_option(nbd.NBD_OPT_LIST, b"junk")
    assert client.read_option_reply()[1] == nbd.NBD_REP_ERR_INVALID
    client.close()


def test_option_info_then_go(nbd_server):
    client = RawNbdClient(nbd_server.socket_path)
    client.handshake()
    info = client.info_or_go(nbd.NBD_OPT_INFO, "lun1", [nbd.NBD_INFO_BLOCK_SIZE])
    assert info == [(nbd.NBD_REP_INFO, struct.pack(">HQH", 0, 16 * MiB, RO_FLAGS)),
                    (nbd.NBD_REP_INFO, struct.pack(">HIII", 3, 512, 4096, 4 * MiB)),
                    (nbd.NBD_REP_ACK, b"")]
    missing = client.info_or_go(nbd.NBD_OPT_GO, "lun9")
    assert [t for t, _ in missing] == [nbd.NBD_REP_ERR_UNKNOWN]
    client.send_option(nbd.NBD_OPT_GO, b"\0\0\0\x09lun0")          # truncated: no info count
    assert client.read_option_reply()[1] == nbd.NBD_REP_ERR_INVALID
    assert client.info_or_go(nbd.NBD_OPT_GO, "lun0")[-1] == (nbd.NBD_REP_ACK, b"")
    assert_still_serves(client)
    client.close()


@pytest.mark.parametrize("opt", [nbd.NBD_OPT_STARTTLS, nbd.NBD_OPT_EXTENDED_HEADERS, 4, 999])
def test_unsupported_options_get_err_unsup(nbd_server, opt):
    client = RawNbdClient(nbd_server.socket_path)
    client.handshake()
    client.send_option(opt, b"\0" * 8)
    got_opt, reply_type, message = client.read_option_reply()
    assert (got_opt, reply_type) == (opt, nbd.NBD_REP_ERR_UNSUP) and b"not supported" in message
    assert client.info_or_go(nbd.NBD_OPT_GO, "lun0")[-1][0] == nbd.NBD_REP_ACK
    client.close()


def test_big_option_is_skipped_without_allocating_it(nbd_server):
    client = RawNbdClient(nbd_server.socket_path)
    client.handshake()
    client.send_option(nbd.NBD_OPT_GO, b"\0" * (200 << 10))
    assert client.read_option_reply()[1] == nbd.NBD_REP_ERR_TOO_BIG
    client.send(struct.pack(">QII", nbd.NBD_IHAVEOPT, nbd.NBD_OPT_GO, 1 << 31))
    assert client.server_closed()
    client.close()


def test_option_abort_is_acked_then_closed(nbd_server):
    client = RawNbdClient(nbd_server.socket_path)
    client.handshake()
    client.send_option(nbd.NBD_OPT_ABORT)
    assert client.read_option_reply() == (nbd.NBD_OPT_ABORT, nbd.NBD_REP_ACK, b"")
    assert client.server_closed()
    client.close()


F = nbd.NBD_CMD_FLAG_FUA
MALFORMED = {
    # name: (export, op, flags, offset, length, payload bytes, expected error)
    "read_out_of_range": ("lun0", nbd.NBD_CMD_READ, 0, 64 * MiB, 512, 0, nbd.NBD_EINVAL),
    "read_straddles_end": ("lun0", nbd.NBD_CMD_READ, 0, 64 * MiB - 512, 1024, 0, nbd.NBD_EINVAL),
    "write_out_of_range": ("lun0", nbd.NBD_CMD_WRITE, 0, 64 * MiB, 512, 512, nbd.NBD_ENOSPC),
    "offset_overflow": ("lun0", nbd.NBD_CMD_WRITE, 0, (1 << 64) - 512, 512, 512, nbd.NBD_ENOSPC),
    "trim_out_of_range": ("lun0", nbd.NBD_CMD_TRIM, 0, 64 * MiB, 4096, 0, nbd.NBD_EINVAL),
    "zeroes_out_of_range": ("lun0", nbd.NBD_CMD_WRITE_ZEROES, 0, 63 * MiB, 2 * MiB, 0, nbd.NBD_ENOSPC),
    "oversized_read": ("lun0", nbd.NBD_CMD_READ, 0, 0, 8 * MiB, 0, nbd.NBD_EINVAL),
    "oversized_write": ("lun0", nbd.NBD_CMD_WRITE, 0, 0, 8 * MiB, 8 * MiB, nbd.NBD_EINVAL),
    "unknown_flag": ("lun0", nbd.NBD_CMD_READ, 1 << 9, 0, 512, 0, nbd.NBD_EINVAL),
    "df_not_negotiated": ("lun0", nbd.NBD_CMD_READ, nbd.NBD_CMD_FLAG_DF, 0, 512, 0, nbd.NBD_EINVAL),
    "no_hole_on_write": ("lun0", nbd.NBD_CMD_WRITE, nbd.NBD_CMD_FLAG_NO_HOLE, 0, 512, 512, nbd.NBD_EINVAL),
    "fast_zero_not_advertised": ("lun0", nbd.NBD_CMD_WRITE_ZEROES, nbd.NBD_CMD_FLAG_FAST_ZERO, 0, 512, 0,
                                 nbd.NBD_EINVAL),
    "unknown_command": ("lun0", 42, 0, 0, 512, 0, nbd.NBD_EINVAL),
    "block_status_not_negotiated": ("lun0", nbd.NBD_CMD_BLOCK_STATUS, 0, 0, 512, 0, nbd.NBD_EINVAL),
    "cache_not_advertised": ("lun0", nbd.NBD_CMD_CACHE, 0, 0, 512, 0, nbd.NBD_EINVAL),
    "misaligned_offset": ("lun0", nbd.NBD_CMD_WRITE, 0, 100, 512, 512, nbd.NBD_EINVAL),
    "misaligned_length": ("lun0", nbd.NBD_CMD_READ, 0, 0, 100, 0, nbd.NBD_EINVAL),
    "flush_with_range": ("lun0", nbd.NBD_CMD_FLUSH, 0, 512, 512, 0, nbd.NBD_EINVAL),
    "write_read_only": ("lun1", nbd.NBD_CMD_WRITE, 0, 0, 512, 512, nbd.NBD_EPERM),
    "trim_read_only": ("lun1", nbd.NBD_CMD_TRIM, 0, 0, 512, 0, nbd.NBD_EPERM),
    "zeroes_read_only": ("lun1", nbd.NBD_CMD_WRITE_ZEROES, 0, 0, 512, 0, nbd.NBD_EPERM),
    "fua_not_advertised": ("lun1", nbd.NBD_CMD_READ, F, 0, 512, 0, nbd.NBD_EINVAL),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_request_gets_its_error_and_the_connection_keeps_serving(nbd_server, name):
    export, op, flags, offset, length, payload, error = MALFORMED[name]
    client = open_session(nbd_server.socket_path, export)
    client.request(op, 0x1234, offset % (1 << 64), length, flags, b"\x77" * payload)
    assert client.read_reply() == (error, 0x1234, b"")
    if export == "lun0":
        assert_still_serves(client)
    else:
        client.request(nbd.NBD_CMD_READ, 9, 0, 512)
        assert client.read_reply(512) == (0, 9, bytes(512))
    assert nbd_server.stores["lun0"][:512] == bytes(512)       # nothing malformed was written
    client.close()


def test_zero_length_requests_succeed_without_effect(session):
    for cookie, op in enumerate((nbd.NBD_CMD_READ, nbd.NBD_CMD_WRITE, nbd.NBD_CMD_TRIM), 1):
        session.request(op, cookie, 4096, 0)
        assert session.read_reply() == (0, cookie, b"")
    assert_still_serves(session)


def test_fua_flush_trim_zeroes_succeed(session):
    session.request(nbd.NBD_CMD_WRITE, 1, 0, 4096, F, b"\xff" * 4096)
    session.request(nbd.NBD_CMD_FLUSH, 2)
    session.request(nbd.NBD_CMD_WRITE_ZEROES, 3, 0, 1024, F | nbd.NBD_CMD_FLAG_NO_HOLE)
    session.request(nbd.NBD_CMD_TRIM, 4, 2048, 1024, F)
    assert [session.read_reply() for _ in range(4)] == [(0, c, b"") for c in (1, 2, 3, 4)]
    session.request(nbd.NBD_CMD_READ, 5, 0, 4096)
    ff, zero = b"\xff" * 1024, bytes(1024)           # zeroed [0, 1K), trimmed [2K, 3K)
    assert session.read_reply(4096) == (0, 5, zero + ff + zero + ff)


def test_bad_request_magic_closes_the_connection(nbd_server, session):
    session.send(b"\x00" * 28)
    assert session.server_closed()
    time.sleep(0.05)
    assert any("bad request magic" in r for r in nbd_server.close_reasons)


def test_pipelined_requests_all_answered(session):
    rng = random.Random(7)
    blocks = {c: rng.randbytes(4096) for c in range(64)}
    session.send(b"".join(request(nbd.NBD_CMD_WRITE, c, c * 4096, 4096, data=d) for c, d in blocks.items()))
    assert sorted(session.read_reply()[1] for _ in blocks) == sorted(blocks)
    session.send(b"".join(request(nbd.NBD_CMD_READ, 100 + c, c * 4096, 4096) for c in blocks))
    for _ in blocks:
        error, cookie, data = session.read_reply(4096)
        assert error == 0 and data == blocks[cookie - 100]


def test_pipeline_deeper_than_max_inflight(tmp_path):
    server = MemServer(tmp_path / "s", EXPORTS, max_inflight=2).start()
    client = open_session(server.socket_path)
    client.send(b"".join(request(nbd.NBD_CMD_FLUSH, c) for c in range(50)))
    assert [client.read_reply()[1] for _ in range(50)] == list(range(50))
    client.close()
    server.stop()


def test_disc_closes_after_replies(session):
    session.request(nbd.NBD_CMD_READ, 1, 0, 512)
    session.request(nbd.NBD_CMD_DISC, 2)
    assert session.read_reply(512) == (0, 1, bytes(512))
    assert session.server_closed()


@pytest.mark.parametrize("seed", range(20))
def test_garbage_and_mutated_sessions_never_raise(seed):
    """Untrusted bytes end in replies or a close with a reason, never an exception."""
    rng = random.Random(seed)
    wire = bytearray(session_bytes() + random_requests(rng, 5)[0][:200000])
    for _ in range(rng.randrange(1, 8)):
        wire[rng.randrange(len(wire))] = rng.randrange(256)
    if seed % 4 == 0:
        wire = bytearray(rng.randbytes(5000))
    conn = NbdConnection(EXPORTS, max_inflight=3)
    pos = 0
    while pos < len(wire) and not conn.closed:
        buf = conn.recv_buffer()
        n = min(len(buf), len(wire) - pos, rng.randrange(1, 3000))
        buf[:n] = wire[pos:pos + n]
        pos += n
        requests = conn.received(n)
        while requests:
            for req in requests:
                assert conn.inflight <= 3 and req.offset + req.length <= req.export.size_bytes
                conn.reply(req, data=bytes(req.length) if req.op == nbd.NBD_CMD_READ else None)
            requests = conn.received(0) if conn.backlog else []
    assert not conn.closed or conn.close_reason
