"""NBD over TLS on a real controller pair, with real clients and real certificates.

The pair comes from `pair up --tls` (a throwaway CA, the controllers' certificate,
a client certificate; tls = "require", client certificates checked). QEMU
(tls-creds-x509) and libnbd (nbds+unix:// with tls-certificates=) write and read
back through the owner and through the non-owner, which forwards over the link in
the clear (only the host side is TLS). A client without TLS gets the spec's
NBD_REP_ERR_TLS_REQD, not a hang; "allow" serves both kinds; a client certificate
from another CA is refused; a handshake that stalls meets the handshake deadline.
"""
import os
import pathlib
import socket
import ssl
import struct
import time

import pytest

from hal.host.client import RawNbdClient
from fixtures.pair import make_pair, run
from hal.host import nbd
from hal.host import tls_certs

from test_nbd_protocol import assert_still_serves

MiB = 1 << 20
pytestmark = pytest.mark.needs("qemu-io", "nbdinfo", "nbdcopy", "qemu-img")


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory):
    pair = make_pair(tmp_path_factory.mktemp("tls"), tls=True)
    pair.wait_settled(owners={"lun0": "a", "lun1": "b"})
    yield pair
    pair.stop_all()


def client_dir(pair):
    return pair.tls_client_dir()


def qemu_tls(pair, name, lun, *commands, certs=None):
    """qemu-io over TLS to controller `name`'s lunN, running each -c command."""
    opts = tls_certs.client_options(certs or client_dir(pair), pair.socket_path(name), f"lun{lun}")
    args = ["qemu-io", "--object", opts["qemu_object"]]
    for c in commands:
        args += ["-c", c]
    return run(args + ["--image-opts", opts["qemu_image_opts"]], timeout=60, check=False)


def tls_uri(pair, name, lun, certs=None):
    return tls_certs.client_options(certs or client_dir(pair), pair.socket_path(name), f"lun{lun}")["uri"]


def assert_ok(result):
    assert result.returncode == 0 and "error" not in result.stdout.lower() + result.stderr.lower(), \
        f"{result.returncode}\n{result.stdout}\n{result.stderr}"


def python_tls_session(pair, name, export="lun0", certs=None, timeout_s=10.0):
    """A RawNbdClient through STARTTLS and NBD_OPT_GO inside TLS (Python's ssl on a real socket)."""
    certs = pathlib.Path(certs or client_dir(pair))
    client = RawNbdClient(pair.socket_path(name), timeout_s)
    client.handshake()
    client.send_option(nbd.NBD_OPT_STARTTLS)
    assert client.read_option_reply()[:2] == (nbd.NBD_OPT_STARTTLS, nbd.NBD_REP_ACK)
    ctx = ssl.create_default_context(cafile=str(certs / "ca-cert.pem"))
    ctx.load_cert_chain(str(certs / "client-cert.pem"), str(certs / "client-key.pem"))
    client.sock = ctx.wrap_socket(client.sock, server_hostname="localhost")
    replies = client.info_or_go(nbd.NBD_OPT_GO, export)
    assert replies[-1][0] == nbd.NBD_REP_ACK, replies
    return client


def set_nbd(pair, name, **settings):
    """Restart controller `name` with [nbd] keys replaced or added."""
    path = pair.dir / name / "config.toml"
    lines = path.read_text().splitlines()
    out, section = [], ""
    for line in lines:
        if line.startswith("["):
            if section == "[nbd]":
                out += [f"{k} = {v}" for k, v in settings.items()]
            section = line.strip()
        elif section == "[nbd]" and line.split("=")[0].strip() in settings:
            continue
        out.append(line)
    path.write_text("\n".join(out) + "\n")
    pair.kill(name)
    pair.up()


# -- real clients over TLS ------------------------------------------------------------------

def test_qemu_io_over_tls_through_the_non_owner_and_the_owner(tls_pair):
    """lun0 is a's: written through b (forwarded over the link), read back through a; and back."""
    assert_ok(qemu_tls(tls_pair, "b", 0, "write -P 0x5a 1M 2M", "write -P 0x11 0 4k"))
    assert_ok(qemu_tls(tls_pair, "a", 0, "read -P 0x5a 1M 2M", "read -P 0x11 0 4k"))
    assert_ok(qemu_tls(tls_pair, "a", 1, "write -P 0xc3 0 1M"))
    assert_ok(qemu_tls(tls_pair, "b", 1, "read -P 0xc3 0 1M"))


def test_qemu_img_convert_over_tls_round_trips(tls_pair, tmp_path):
    src, back = tmp_path / "src.img", tmp_path / "back.img"
    src.write_bytes(os.urandom(3 * MiB) + bytes(MiB))
    back.write_bytes(b"")
    os.truncate(back, 64 * MiB)
    opts = tls_certs.client_options(client_dir(tls_pair), tls_pair.socket_path("b"), "lun0")
    image = ",".join("file." + kv for kv in opts["qemu_image_opts"].split(","))
    run(["qemu-img", "convert", "-n", "-f", "raw", "--object", opts["qemu_object"], "--target-image-opts",
         str(src), "driver=raw," + image], timeout=60)
    image_a = image.replace(tls_pair.socket_path("b"), tls_pair.socket_path("a"))
    run(["qemu-img", "convert", "-n", "--object", opts["qemu_object"], "--image-opts", "driver=raw," + image_a,
         "-O", "raw", str(back)], timeout=60)
    assert back.read_bytes()[:4 * MiB] == src.read_bytes()


def test_nbdinfo_and_nbdcopy_over_tls(tls_pair, tmp_path):
    info = run(["nbdinfo", tls_uri(tls_pair, "b", 0)], timeout=30)
    assert "with TLS" in info.stdout and "export-size: 67108864" in info.stdout
    src, back = tmp_path / "src.img", tmp_path / "back.img"
    src.write_bytes(os.urandom(8 * MiB))
    run(["nbdcopy", str(src), tls_uri(tls_pair, "b", 0)], timeout=60)
    run(["nbdcopy", "--requests=16", tls_uri(tls_pair, "a", 0), str(back)], timeout=60)
    assert back.read_bytes()[:8 * MiB] == src.read_bytes()


def test_pipelined_requests_of_every_size_over_tls(tls_pair):
    """Python's ssl client, 64 pipelined writes from 512 bytes to 4 MiB, then reads of each:
    replies cross TLS records and socket reads at every boundary."""
    client = python_tls_session(tls_pair, "a", "lun1")      # lun1 is b's: forwarded
    sizes = [512 << (i % 14) for i in range(64)]
    offsets, pos = [], 0
    for size in sizes:
        offsets.append(pos)
        pos += size
    payloads = [os.urandom(size) for size in sizes]
    for i, (off, data) in enumerate(zip(offsets, payloads)):
        client.request(nbd.NBD_CMD_WRITE, i, off, len(data), data=data)
    assert sorted(client.read_reply()[:2] for _ in sizes) == [(0, i) for i in range(64)]
    for i, (off, data) in enumerate(zip(offsets, payloads)):
        client.request(nbd.NBD_CMD_READ, 1000 + i, off, len(data))
    got = {}                                # simple replies come in completion order
    pending = dict(enumerate(payloads))
    while pending:
        error, cookie, _ = client.read_reply()
        assert error == 0
        got[cookie - 1000] = client.recv_exact(len(pending.pop(cookie - 1000)))
    assert all(got[i] == payloads[i] for i in range(64))
    assert_still_serves(client)
    client.request(nbd.NBD_CMD_DISC, 0)
    assert client.server_closed()           # after our close_notify: EOF


def test_starttls_twice_is_invalid_inside_tls(tls_pair):
    certs = pathlib.Path(client_dir(tls_pair))
    client = RawNbdClient(tls_pair.socket_path("a"))
    client.handshake()
    client.send_option(nbd.NBD_OPT_STARTTLS)
    assert client.read_option_reply()[1] == nbd.NBD_REP_ACK
    ctx = ssl.create_default_context(cafile=str(certs / "ca-cert.pem"))
    ctx.load_cert_chain(str(certs / "client-cert.pem"), str(certs / "client-key.pem"))
    client.sock = ctx.wrap_socket(client.sock, server_hostname="localhost")
    client.send_option(nbd.NBD_OPT_STARTTLS)
    assert client.read_option_reply()[1] == nbd.NBD_REP_ERR_INVALID
    assert client.info_or_go(nbd.NBD_OPT_GO, "lun0")[-1][0] == nbd.NBD_REP_ACK
    assert_still_serves(client)


# -- refusals -------------------------------------------------------------------------------

def test_client_without_tls_gets_tls_reqd_when_tls_is_required(tls_pair):
    client = RawNbdClient(tls_pair.socket_path("b"))
    client.handshake()
    for option in (nbd.NBD_OPT_GO, nbd.NBD_OPT_INFO, nbd.NBD_OPT_LIST, nbd.NBD_OPT_STRUCTURED_REPLY):
        data = struct.pack(">I4sH", 4, b"lun0", 0) if option in (nbd.NBD_OPT_GO, nbd.NBD_OPT_INFO) else b""
        client.send_option(option, data)
        assert client.read_option_reply()[:2] == (option, nbd.NBD_REP_ERR_TLS_REQD)
    client.send_option(nbd.NBD_OPT_EXPORT_NAME, b"lun0")   # cannot be errored: the server hangs up
    assert client.server_closed()
    started = time.monotonic()
    result = run(["nbdinfo", tls_pair.uri("b", 0)], timeout=30, check=False)
    assert result.returncode != 0 and time.monotonic() - started < 10, result.stdout
    plain = run(["qemu-io", "-f", "raw", "-c", "read 0 4k", tls_pair.uri("a", 0)], timeout=30, check=False)
    assert plain.returncode != 0 or "read 4096/4096" not in plain.stdout, plain.stdout
    assert "read 4096/4096" not in plain.stdout


def test_client_certificate_from_another_ca_is_refused(tls_pair, tmp_path):
    """The client trusts the pair's CA, but its own certificate comes from a stranger's CA."""
    rogue_ca_key, rogue_ca = tls_certs.make_ca("someone else's CA")
    key, cert = tls_certs.make_leaf(rogue_ca_key, rogue_ca, "intruder", server=False)
    certs = tmp_path / "rogue"
    certs.mkdir()
    (certs / "ca-cert.pem").write_bytes(pathlib.Path(client_dir(tls_pair), "ca-cert.pem").read_bytes())
    tls_certs._write_pem(certs / "client-cert.pem", cert)
    tls_certs._write_pem(certs / "client-key.pem", key, private=True)
    refused_before = tls_pair.status("a")["nbd_tls_refused"]
    info = run(["nbdinfo", tls_uri(tls_pair, "a", 0, certs=str(certs))], timeout=30, check=False)
    assert info.returncode != 0 and "export-size" not in info.stdout
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        python_tls_session(tls_pair, "a", certs=str(certs))
    assert tls_pair.status("a")["nbd_tls_refused"] >= refused_before + 2
    # QEMU checks its own certificate against ca-cert.pem before it connects, and gives up there.
    assert qemu_tls(tls_pair, "a", 0, "read 0 4k", certs=str(certs)).returncode != 0
    assert_ok(qemu_tls(tls_pair, "a", 0, "read 0 4k"))      # the genuine client still gets in


def test_allow_serves_clients_with_and_without_tls(tmp_path):
    pair = make_pair(tmp_path, tls=True)
    try:
        set_nbd(pair, "a", tls='"allow"', tls_verify_client="false")
        assert pair.status("a")["nbd_tls"] == "allow"
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x77 0 64k", pair.uri("a", 0)], timeout=30)
        assert_ok(qemu_tls(pair, "a", 0, "read -P 0x77 0 64k", "write -P 0x78 64k 64k"))
        run(["qemu-io", "-f", "raw", "-c", "read -P 0x78 64k 64k", pair.uri("a", 0)], timeout=30)
        info = run(["nbdinfo", tls_uri(pair, "a", 1)], timeout=30)
        assert "with TLS" in info.stdout
        assert "without TLS" in run(["nbdinfo", pair.uri("a", 1)], timeout=30).stdout
    finally:
        pair.stop_all()


def test_stalled_tls_handshake_hits_the_deadline_and_blocks_nobody(tmp_path):
    pair = make_pair(tmp_path, tls=True)
    try:
        set_nbd(pair, "a", handshake_timeout_ms=1000)
        stalled = []
        for half in (False, True):
            client = RawNbdClient(pair.socket_path("a"), timeout_s=10)
            client.handshake()
            client.send_option(nbd.NBD_OPT_STARTTLS)
            assert client.read_option_reply()[1] == nbd.NBD_REP_ACK
            if half:                        # the first bytes of a TLS record header, then nothing
                client.send(b"\x16\x03\x01\x02")
            stalled.append(client)
        started = time.monotonic()
        assert_ok(qemu_tls(pair, "a", 0, "write -P 0x42 0 1M", "read -P 0x42 0 1M"))
        for client in stalled:
            assert client.server_closed()
        assert time.monotonic() - started < 5
        assert pair.status("a")["nbd_handshake_timeouts"] >= 2
    finally:
        pair.stop_all()
