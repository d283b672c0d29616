"""The host port and the link listener of real controllers under hostile clients (issue 15).

Each test drives a local process pair the way the tester did: a disconnect with
a write in flight, a large write-zeroes through the non-owner, a stray connect
to the link socket, a client that never reads its replies, sockets that connect
and say nothing. They check the controller's CPU, memory and event log, not
only the replies.
"""
import os
import socket
import struct
import time

import pytest

from hal.host.client import RawNbdClient, open_session
from fixtures.pair import make_pair, run
from hal.host import nbd

from test_nbd_protocol import assert_still_serves

MiB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid) -> float:
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def restart_with(pair, name, section, **settings):
    """Restart controller `name` with extra settings in one section of its config."""
    path = pair.dir / name / "config.toml"
    extra = "".join(f"{k} = {v}\n" for k, v in settings.items())
    path.write_text(path.read_text().replace(f"[{section}]\n", f"[{section}]\n{extra}", 1))
    pair.kill(name)
    pair.up()


def wait_for(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout_s} s: {what}")


# -- 1: a disconnect with a write in flight ---------------------------------------------

@pytest.mark.parametrize("via", ["a", "b"])
def test_disconnect_with_a_write_in_flight_gets_the_reply_then_the_close(local_pair, via):
    """NBD_CMD_DISC right behind a write: the write is answered, then the server hangs up.
    More of them than the connection limit leave the controller serving new clients."""
    for i in range(20):
        client = open_session(local_pair.socket_path(via), "lun0")
        client.request(nbd.NBD_CMD_WRITE, 100 + i, 0, MiB, data=b"B" * MiB)
        client.request(nbd.NBD_CMD_DISC, 0)
        assert client.read_reply() == (0, 100 + i, b"")
        assert client.server_closed()
        client.close()
    wait_for(lambda: local_pair.status(via)["nbd_clients"] == 0, 5, "every connection closed")
    assert_still_serves(open_session(local_pair.socket_path(via), "lun0"))


@pytest.mark.needs("nbdsh")
def test_nbdsh_shutdown_with_a_write_in_flight_returns(local_pair):
    """The issue's reproducer: libnbd's shutdown waits for the write's reply and the close."""
    script = 'h.aio_pwrite(b"B" * 1048576, 0); h.shutdown()'
    env = dict(os.environ, PATH="/usr/bin:" + os.environ["PATH"])   # nbdsh runs the system python3
    for _ in range(3):
        run(["nbdsh", "-u", local_pair.uri("b", 0), "-c", script], timeout=20, env=env)
    assert local_pair.status("b")["nbd_clients"] == 0


# -- 2: a large write-zeroes through the non-owner ---------------------------------------

def test_large_write_zeroes_through_the_non_owner_keeps_the_pair_and_memory(tmp_path):
    """256 MiB of zeroes through b for a LUN a owns travel as a range: b's memory stays put,
    the pair stays mirrored with its owners, and the LUN reads back zeroes."""
    pair = make_pair(tmp_path, lun_size_bytes=256 * MiB)
    try:
        pair.wait_settled(owners={"lun0": "a", "lun1": "b"})
        ones = open_session(pair.socket_path("a"), "lun0")
        for offset in (0, 128 * MiB, 256 * MiB - MiB):
            ones.request(nbd.NBD_CMD_WRITE, offset, offset, MiB, data=b"\x01" * MiB)
            assert ones.read_reply() == (0, offset, b"")
        pid_a, pid_b = pair.pid("a"), pair.pid("b")
        rss_a, rss_b = rss_bytes(pid_a), rss_bytes(pid_b)
        peak = {"a": rss_a, "b": rss_b}
        client = open_session(pair.socket_path("b"), "lun0", timeout_s=0.2)
        client.request(nbd.NBD_CMD_WRITE_ZEROES, 7, 0, 256 * MiB)
        deadline = time.monotonic() + 180
        while True:
            peak = {"a": max(peak["a"], rss_bytes(pid_a)), "b": max(peak["b"], rss_bytes(pid_b))}
            try:
                reply = client.read_reply()
                break
            except socket.timeout:
                assert time.monotonic() < deadline, "no reply to the write-zeroes"
        print(f"\nRSS before/peak: a {rss_a >> 20}/{peak['a'] >> 20} MiB, b {rss_b >> 20}/{peak['b'] >> 20} MiB")
        assert reply == (0, 7, b"")
        assert peak["b"] - rss_b < 64 * MiB
        assert peak["a"] - rss_a < 128 * MiB
        assert pair.status("a")["link"] == "mirrored" and not pair.events("a", "link_down")
        assert pair.wait_settled(owners={"lun0": "a", "lun1": "b"})
        client.sock.settimeout(10)
        for offset in (0, 128 * MiB, 256 * MiB - MiB):
            client.request(nbd.NBD_CMD_READ, offset, offset, MiB)
            assert client.read_reply(MiB) == (0, offset, bytes(MiB))
    finally:
        pair.stop_all()


# -- 3: a stray connect to the link socket -----------------------------------------------

def test_stray_connect_to_the_link_socket_is_refused_and_costs_no_cpu(local_pair):
    pid = local_pair.pid("a")
    idle_start = cpu_seconds(pid)
    time.sleep(2)
    idle = cpu_seconds(pid) - idle_start
    stray = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stray.settimeout(5)
    stray.connect(str(local_pair.dir / "link.sock"))
    start = cpu_seconds(pid)
    time.sleep(2)
    busy = cpu_seconds(pid) - start
    print(f"\nCPU of a over 2 s: idle {idle:.2f} s, with a stray link connection {busy:.2f} s")
    assert stray.recv(1) == b""                 # accepted and closed at once
    stray.close()
    assert busy < idle + 0.3
    assert local_pair.status("a")["link_refused"] >= 1
    assert local_pair.status("a")["link"] == "mirrored"


def test_forged_link_attempts_while_the_link_is_down_are_rate_limited(local_pair):
    """With b gone, a takes link connections one at a time and backs off after each that
    fails to authenticate: a flood of forged hellos gets a few tries, the rest are refused."""
    local_pair.kill("b")
    wait_for(lambda: local_pair.status("a")["link"] == "down", 10, "a sees the link down")
    path = str(local_pair.dir / "link.sock")
    deadline = time.monotonic() + 3
    attempts = 0
    while time.monotonic() < deadline:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(1)
        try:
            s.connect(path)
            s.sendall(b"\x00" * 64 + os.urandom(64))
            s.recv(4096)
        except OSError:
            pass
        finally:
            s.close()
        attempts += 1
    st = local_pair.status("a")
    print(f"\n{attempts} forged connections in 3 s: {st['link_refused']} refused")
    assert st["link_refused"] >= attempts // 2
    assert local_pair.status("a")["owned_luns"]


# -- 4: a client that never reads its replies ---------------------------------------------

def test_client_that_never_reads_its_replies_is_not_buffered_without_bound(local_pair):
    pid = local_pair.pid("a")
    client = open_session(local_pair.socket_path("a"), "lun0", timeout_s=30)
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 10)
    before = rss_bytes(pid)
    count = 100
    # All requests in one send: once the server stops reading (its output bound), requests
    # sent one by one would wait in the kernel, where each small send costs far more than its
    # 28 bytes of the socket's send buffer, and a smaller buffer than this machine's blocks.
    client.send(b"".join(struct.pack(">IHHQQI", nbd.NBD_REQUEST_MAGIC, 0, nbd.NBD_CMD_READ, i,
                                     (i % 15) * 4 * MiB, 4 * MiB) for i in range(count)))
    time.sleep(3)
    grown = rss_bytes(pid) - before
    print(f"\nRSS of a grew {grown >> 20} MiB with {count} unread 4 MiB replies")
    assert grown < 96 * MiB
    answered = set()
    for _ in range(count):                      # reading resumes once the client drains
        error, cookie, _data = client.read_reply(4 * MiB)
        assert error == 0
        answered.add(cookie)
    assert answered == set(range(count))
    assert_still_serves(client)


# -- 5: silent sockets, the connection cap and refusals -----------------------------------

def test_silent_connections_are_closed_at_the_handshake_deadline(local_pair):
    restart_with(local_pair, "a", "nbd", max_connections=4, handshake_timeout_ms=1000)
    silent = [RawNbdClient(local_pair.socket_path("a"), timeout_s=5) for _ in range(4)]
    started = time.monotonic()
    for s in silent:
        s.recv_exact(len(nbd.GREETING))
        assert s.server_closed()
    assert time.monotonic() - started < 4
    assert_still_serves(open_session(local_pair.socket_path("a"), "lun0"))


def test_connection_flood_is_counted_not_logged_line_by_line(local_pair):
    restart_with(local_pair, "a", "nbd", max_connections=2)
    kept = [open_session(local_pair.socket_path("a"), "lun0") for _ in range(2)]
    events_before = len(local_pair.events("a"))
    for _ in range(200):
        extra = RawNbdClient(local_pair.socket_path("a"))
        assert extra.server_closed()
        extra.close()
    st = local_pair.status("a")
    assert st["nbd_refused"] >= 200
    assert len(local_pair.events("a")) - events_before <= 3
    for c in kept:
        assert_still_serves(c)
