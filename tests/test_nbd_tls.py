"""STARTTLS in the protocol engine (hal/host/nbd.py) and the sans-I/O TLS session (hal/host/nbd_tls.py).

No sockets: the engine and a TlsSession on one side, Python's ssl client over
memory BIOs on the other, real certificates from hal/host/tls_certs.py. The option
replies golden-checked per TLS mode; then a whole session through TLS, with the
client's handshake pipelined right behind its STARTTLS, and the bounds on
ciphertext and records.
"""
import ssl
import struct

import pytest

from hal.host import nbd, nbd_tls
from hal.host.nbd import NbdConnection
from hal.host.tls_certs import create_tls_dir

from test_nbd_protocol import EXPORTS, feed, go_data, option, request, simple_reply


def option_reply(opt, reply_type, data=b""):
    return struct.pack(">QIII", nbd.NBD_REP_MAGIC, opt, reply_type, len(data)) + data


FLAGS = struct.pack(">I", 3)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return create_tls_dir(tmp_path_factory.mktemp("tls"))


# -- option haggling per mode --------------------------------------------------------

def test_starttls_with_tls_off_is_unsupported():
    conn = NbdConnection(EXPORTS)
    _, out = feed(conn, FLAGS + option(nbd.NBD_OPT_STARTTLS))
    assert out[len(nbd.GREETING):] == option_reply(nbd.NBD_OPT_STARTTLS, nbd.NBD_REP_ERR_UNSUP,
                                                   b"option 5 is not supported")
    assert not conn.starttls


def test_require_answers_tls_reqd_and_closes_on_export_name():
    conn = NbdConnection(EXPORTS, tls="require")
    _, out = feed(conn, FLAGS + option(nbd.NBD_OPT_GO, go_data("lun0")) + option(nbd.NBD_OPT_LIST))
    msg = b"this server requires TLS (NBD_OPT_STARTTLS)"
    assert out[len(nbd.GREETING):] == (option_reply(nbd.NBD_OPT_GO, nbd.NBD_REP_ERR_TLS_REQD, msg)
                                       + option_reply(nbd.NBD_OPT_LIST, nbd.NBD_REP_ERR_TLS_REQD, msg))
    assert nbd.NBD_REP_ERR_TLS_REQD == 0x80000005 and conn.export is None
    feed(conn, option(nbd.NBD_OPT_EXPORT_NAME, b"lun0"))
    assert conn.closed and "without TLS" in conn.close_reason


def test_allow_serves_without_tls():
    conn = NbdConnection(EXPORTS, tls="allow")
    feed(conn, FLAGS + option(nbd.NBD_OPT_GO, go_data("lun0")))
    assert conn.export.name == "lun0" and not conn.tls_active


def test_starttls_is_acked_and_parsing_stops_until_tls_started():
    conn = NbdConnection(EXPORTS, tls="require")
    hello = b"\x16\x03\x01 pretend client hello"
    _, out = feed(conn, FLAGS + option(nbd.NBD_OPT_STARTTLS) + hello)
    assert out[len(nbd.GREETING):] == option_reply(nbd.NBD_OPT_STARTTLS, nbd.NBD_REP_ACK)
    assert conn.starttls and not conn.want_read
    assert conn.tls_leftover() == hello
    conn.tls_started()
    _, out = feed(conn, option(nbd.NBD_OPT_STARTTLS))
    assert out == option_reply(nbd.NBD_OPT_STARTTLS, nbd.NBD_REP_ERR_INVALID, b"TLS is already on")
    feed(conn, option(nbd.NBD_OPT_GO, go_data("lun0")))
    assert conn.export.name == "lun0" and conn.tls_active


def test_starttls_with_data_is_invalid():
    conn = NbdConnection(EXPORTS, tls="allow")
    _, out = feed(conn, FLAGS + option(nbd.NBD_OPT_STARTTLS, b"x"))
    assert out[len(nbd.GREETING):] == option_reply(nbd.NBD_OPT_STARTTLS, nbd.NBD_REP_ERR_INVALID,
                                                   b"NBD_OPT_STARTTLS takes no data")
    assert not conn.starttls


# -- a whole session through TLS over memory BIOs ------------------------------------------

class Wire:
    """The server (engine + TlsSession, as hal/host/tls_port.py drives them) and Python's ssl client."""

    def __init__(self, certs, verify_client=True):
        ctx = nbd_tls.server_context(certs["cert"], certs["key"], certs["ca"], verify_client)
        self.server_ctx = ctx
        cctx = ssl.create_default_context(cafile=certs["client_ca"])
        cctx.load_cert_chain(certs["client_cert"], certs["client_key"])
        self.c_in, self.c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.client = cctx.wrap_bio(self.c_in, self.c_out, server_hostname="localhost")
        self.conn = NbdConnection(EXPORTS, tls="require", max_output_bytes=8 << 20)
        self.tls = None
        self.to_client = b""               # plaintext ahead of TLS (greeting, STARTTLS ACK)
        self.records = []                  # ciphertext chunks the server sent

    def start(self):
        """Greeting, flags and STARTTLS in the clear; the ClientHello pipelined behind them."""
        try:
            self.client.do_handshake()
        except ssl.SSLWantReadError:
            pass
        _, greeting = feed(self.conn, b"")
        plain = FLAGS + option(nbd.NBD_OPT_STARTTLS) + self.c_out.read()
        _, out = feed(self.conn, plain)
        self.conn.sent(len(greeting) + len(out))
        assert self.conn.starttls
        self.tls = nbd_tls.TlsSession(self.server_ctx, self.conn.tls_leftover())
        assert out.endswith(option_reply(nbd.NBD_OPT_STARTTLS, nbd.NBD_REP_ACK))
        for _ in range(10):
            if self.tls.handshake():
                break
            self._to_client(self.tls.take_output())
            self._client_step()
        self.conn.tls_started()
        self._to_client(self.tls.take_output())
        self._client_step()

    def _to_client(self, cipher):
        if cipher:
            self.records.append(cipher)
            self.c_in.write(cipher)

    def _client_step(self):
        try:
            self.client.do_handshake()
        except ssl.SSLWantReadError:
            pass
        out = self.c_out.read()
        if out:
            self.tls.feed(out)

    def send(self, plaintext):
        """Client -> server: encrypt, decrypt into the engine's buffer; the surfaced requests."""
        self.client.write(plaintext)
        self.tls.feed(self.c_out.read())
        requests = []
        while True:
            n = self.tls.read_into(self.conn.recv_buffer())
            if not n:
                return requests
            requests += self.conn.received(n)

    def flush(self, cipher_queued=0):
        """Server -> client; the plaintext the client reads."""
        self.tls.queue(self.conn.pending_output())
        plain_bytes, cipher = self.tls.encrypt(cipher_queued)
        self.conn.sent(plain_bytes)
        self._to_client(cipher)
        got = b""
        while True:
            try:
                got += self.client.read(1 << 20)
            except ssl.SSLWantReadError:
                return got


def test_a_session_through_tls_with_the_client_hello_pipelined(certs):
    wire = Wire(certs)
    wire.start()
    assert wire.send(option(nbd.NBD_OPT_GO, go_data("lun0"))) == []
    assert wire.flush().endswith(option_reply(nbd.NBD_OPT_GO, nbd.NBD_REP_ACK))
    data = bytes(range(256)) * 4096                     # 1 MiB, crosses 64 records each way
    (w,) = wire.send(request(nbd.NBD_CMD_WRITE, 7, 0, len(data), data=data))
    assert bytes(w.data) == data
    wire.conn.reply(w)
    (r,) = wire.send(request(nbd.NBD_CMD_READ, 8, 0, 4096))
    wire.conn.reply(r, 0, data[:4096])
    assert wire.flush() == simple_reply(0, 7) + simple_reply(0, 8) + data[:4096]


def test_small_buffers_share_a_record_and_ciphertext_is_bounded(certs):
    wire = Wire(certs)
    wire.start()
    wire.send(option(nbd.NBD_OPT_GO, go_data("lun0")))
    wire.flush()
    wire.records.clear()
    (r,) = wire.send(request(nbd.NBD_CMD_READ, 1, 0, 4096))
    wire.conn.reply(r, 0, bytes(4096))
    assert wire.flush() == simple_reply(0, 1) + bytes(4096)
    assert len(wire.records) == 1 and len(wire.records[0]) < 16 + 4096 + 64    # one record, not two
    reads = wire.send(b"".join(request(nbd.NBD_CMD_READ, i, 0, 1 << 20) for i in range(4)))
    for r in reads:
        wire.conn.reply(r, 0, bytes(1 << 20))
    before = wire.conn.unsent_bytes
    # With the socket's queue full, nothing more is encrypted: the replies stay owed.
    assert wire.flush(cipher_queued=nbd_tls.CIPHER_QUEUED_MAX_BYTES) == b""
    assert wire.conn.unsent_bytes == before and wire.tls.plain_pending
    got, turns = b"", 0
    while wire.tls.plain_pending:           # about a MiB of ciphertext per turn, as the socket drains
        got += wire.flush()
        turns += 1
    assert len(got) == 4 * (16 + (1 << 20)) and wire.conn.unsent_bytes == 0 and turns >= 3


def test_server_context_refuses_a_client_certificate_from_another_ca(certs, tmp_path):
    other = create_tls_dir(tmp_path / "other")
    wire = Wire(dict(certs, client_cert=other["client_cert"], client_key=other["client_key"]))
    with pytest.raises(ssl.SSLError, match="certificate"):
        wire.start()
