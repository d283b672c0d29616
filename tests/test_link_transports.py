"""Socket link transports on loopback: frames both ways, partial writes, reconnect, backoff."""
import random
import select
import socket
import time

import pytest

from firmware.formats import frame as F
from hal.runtime.backoff import Backoff
from hal.backends.framing import StreamFramer
from hal.backends.interfaces import HalError
from hal.backends.link_socket import SocketTransport, TcpLinkEndpoint, UnixLinkEndpoint

TIMEOUT_S = 10


def frame(seq: int, payload: bytes = b"") -> list:
    return F.encode_frame(4, 0, 1, 1, seq, 0, seq, payload)


def establish(listener, connector):
    """Connect the two endpoints the way the runtime does: try, wait, retry."""
    deadline = time.monotonic() + TIMEOUT_S
    client = None
    while client is None:
        assert time.monotonic() < deadline, "connect timed out"
        client = connector.connect()
    select.select([listener.listen_fileno()], [], [], TIMEOUT_S)
    server = listener.connect()
    assert server is not None
    return server, client


class Pipe:
    """One direction of a link: pending send buffers on one side, a framer on the other."""

    def __init__(self, sender, receiver):
        self.sender, self.receiver = sender, receiver
        self.pending = []
        self.framer = StreamFramer()
        self.received = []
        self.buf = bytearray(64 * 1024)

    def queue(self, buffers):
        self.pending += [memoryview(b).cast("B") for b in buffers if len(b)]

    def step(self):
        if self.pending:
            self._advance(self.sender.send(self.pending))
        try:
            n = self.receiver.recv_into(self.buf)
        except BlockingIOError:
            return
        assert n > 0, "peer closed unexpectedly"
        self.received += self.framer.feed(memoryview(self.buf)[:n])

    def _advance(self, written: int):
        # A partial write: drop what went out, keep the rest for the next send.
        while written:
            head = self.pending[0]
            if written >= len(head):
                written -= len(head)
                self.pending.pop(0)
            else:
                self.pending[0] = head[written:]
                written = 0


def pump(pipes, until, timeout_s=TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while not until():
        assert time.monotonic() < deadline, "link made no progress"
        fds = {p.receiver.fileno() for p in pipes}
        select.select(list(fds), [p.sender.fileno() for p in pipes if p.pending], [], 0.05)
        for p in pipes:
            p.step()


@pytest.fixture(params=["unix", "tcp"])
def endpoints(request, tmp_path):
    if request.param == "unix":
        listener = UnixLinkEndpoint(tmp_path / "link.sock", listen=True)
        connector = UnixLinkEndpoint(tmp_path / "link.sock", listen=False)
    else:
        listener = TcpLinkEndpoint("127.0.0.1", 0, listen=True)
        connector = TcpLinkEndpoint("127.0.0.1", listener.port, listen=False)
    yield listener, connector
    listener.close()


def test_frames_both_ways(endpoints):
    server, client = establish(*endpoints)
    a_to_b, b_to_a = Pipe(client, server), Pipe(server, client)
    sent_ab = [frame(i, bytes([i]) * i * 10) for i in range(50)]
    sent_ba = [frame(1000 + i, b"r" * i) for i in range(50)]
    for f in sent_ab:
        a_to_b.queue(f)
    for f in sent_ba:
        b_to_a.queue(f)
    pump([a_to_b, b_to_a], lambda: len(a_to_b.received) == 50 and len(b_to_a.received) == 50)
    assert a_to_b.received == [b"".join(f) for f in sent_ab]
    assert b_to_a.received == [b"".join(f) for f in sent_ba]
    assert a_to_b.framer.dropped_bytes == b_to_a.framer.dropped_bytes == 0
    server.close()
    client.close()


def test_large_frames_survive_partial_writes(endpoints):
    server, client = establish(*endpoints)
    pipe = Pipe(client, server)
    payload = random.Random(3).randbytes(F.PAYLOAD_MAX_BYTES)
    first = client.send(frame(1, payload))
    assert 0 < first < len(payload)          # the socket buffer cannot take it all: a partial write
    pipe.queue(frame(1, payload))
    pipe._advance(first)
    pipe.queue(frame(2, b"after"))
    pump([pipe], lambda: len(pipe.received) == 2)
    assert pipe.received == [b"".join(frame(1, payload)), b"".join(frame(2, b"after"))]
    server.close()
    client.close()


def test_reconnect_after_the_peer_closes(endpoints):
    listener, connector = endpoints
    server, client = establish(listener, connector)
    client.close()
    select.select([server], [], [], TIMEOUT_S)
    assert server.recv_into(bytearray(100)) == 0     # the listener sees the close
    server.close()
    server, client = establish(listener, connector)   # the connector comes back
    pipe = Pipe(client, server)
    pipe.queue(frame(7, b"again"))
    pump([pipe], lambda: pipe.received)
    # Now the listening side goes away; the connector sees 0 and backs off until it is back.
    server.close()
    select.select([client], [], [], TIMEOUT_S)
    assert client.recv_into(bytearray(100)) == 0
    client.close()
    server.close()


def test_connector_backs_off_while_the_listener_is_away(tmp_path):
    path = tmp_path / "link.sock"
    connector = UnixLinkEndpoint(path, listen=False)
    backoff = Backoff(initial_ms=1, max_ms=8)
    delays = []
    for _ in range(5):
        assert connector.connect() is None      # nobody listens yet
        delays.append(backoff.next_delay_ms())
        time.sleep(delays[-1] / 1000)
    assert delays == [1, 2, 4, 8, 8]
    listener = UnixLinkEndpoint(path, listen=True)
    server, client = establish(listener, connector)
    backoff.reset()
    assert backoff.next_delay_ms() == 1
    for t in (server, client):
        t.close()
    listener.close()
    assert not path.exists()                    # the listener removes its socket file


def test_tcp_connect_to_closed_port_returns_none():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    assert TcpLinkEndpoint("127.0.0.1", port, listen=False).connect() is None


def test_tcp_transport_disables_nagle(endpoints):
    listener, connector = endpoints
    server, client = establish(listener, connector)
    if isinstance(listener, TcpLinkEndpoint):
        for t in (server, client):
            assert t.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    assert not server.sock.getblocking() and not client.sock.getblocking()
    with pytest.raises(BlockingIOError):
        server.recv_into(bytearray(10))          # nothing there: the socket convention
    server.close()
    client.close()


def test_stale_unix_socket_is_replaced_live_one_refused(tmp_path):
    path = tmp_path / "link.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()                                # a dead controller's socket file
    live = UnixLinkEndpoint(path, listen=True)
    with pytest.raises(HalError, match="another process is listening"):
        UnixLinkEndpoint(path, listen=True)
    live.close()
    (tmp_path / "file").write_text("not a socket")
    with pytest.raises(HalError, match="exists and is not a socket"):
        UnixLinkEndpoint(tmp_path / "file", listen=True)


def test_accept_without_a_peer_returns_none(endpoints):
    listener, _ = endpoints
    assert listener.accept() is None and listener.connect() is None


def test_backoff_doubles_caps_and_jitters():
    backoff = Backoff(initial_ms=10, max_ms=1000)
    assert [backoff.next_delay_ms() for _ in range(9)] == [10, 20, 40, 80, 160, 320, 640, 1000, 1000]
    backoff.reset()
    assert backoff.next_delay_ms() == 10
    jittered = Backoff(initial_ms=100, max_ms=100, rng=random.Random(1))
    delays = [jittered.next_delay_ms() for _ in range(50)]
    assert all(75 <= d <= 100 for d in delays) and len(set(delays)) > 1


def test_transport_is_a_socket_transport(endpoints):
    server, client = establish(*endpoints)
    assert isinstance(server, SocketTransport) and isinstance(client, SocketTransport)
    server.close()
    client.close()


# ---- the pair key the link authenticates with -----------------------------------

def test_pair_key_created_0600_and_loaded(tmp_path):
    from hal.backends.keyfile import create_pair_key, load_pair_key
    path = tmp_path / "pair.key"
    key = create_pair_key(path)
    assert len(key) == 32 and (path.stat().st_mode & 0o777) == 0o600
    assert load_pair_key(path) == key
    with pytest.raises(HalError, match="refusing to overwrite"):
        create_pair_key(path)
    assert load_pair_key(path) == key


def test_pair_key_refusals(tmp_path):
    from hal.backends.keyfile import load_pair_key
    with pytest.raises(HalError, match="no pair key file"):
        load_pair_key(tmp_path / "missing.key")
    path = tmp_path / "pair.key"
    path.write_text("ab" * 32 + "\n")
    for mode in (0o640, 0o604, 0o644):
        path.chmod(mode)
        with pytest.raises(HalError, match=f"mode is {mode:04o}.*owner only"):
            load_pair_key(path)
    path.chmod(0o600)
    assert load_pair_key(path) == b"\xab" * 32
    for text, message in (("zz" * 32, "hex digits"), ("ab" * 16, "need 32"), ("\xff", "hex digits")):
        path.write_text(text)
        with pytest.raises(HalError, match=message):
            load_pair_key(path)
