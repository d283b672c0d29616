"""The NBD host port of a real controller: bad input, limits, and the control lane under load."""
import json
import subprocess
import time

import pytest

from hal.host.client import RawNbdClient, open_session
from fixtures.pair import make_pair
from hal.host import nbd
from hal.runtime.control import request

from test_nbd_protocol import MALFORMED, assert_still_serves

WRITABLE = sorted(k for k, v in MALFORMED.items() if v[0] == "lun0" and "fua_not" not in k)


@pytest.mark.parametrize("name", WRITABLE)
@pytest.mark.parametrize("via", ["a", "b"])
def test_malformed_request_to_a_controller_gets_its_error_and_it_keeps_serving(local_pair, name, via):
    export, op, flags, offset, length, payload, error = MALFORMED[name]
    client = open_session(local_pair.socket_path(via), export)
    client.request(op, 0x1234, offset % (1 << 64), length, flags, b"\x77" * payload)
    assert client.read_reply() == (error, 0x1234, b"")
    assert_still_serves(client)
    client.close()
    assert local_pair.status("a")["link"] == "mirrored"


def test_bad_magic_closes_only_that_connection(local_pair):
    bad = open_session(local_pair.socket_path("a"), "lun0")
    good = open_session(local_pair.socket_path("a"), "lun0")
    bad.send(b"\xde\xad\xbe\xef" + bytes(24))
    assert bad.server_closed()
    assert_still_serves(good)


def test_connections_beyond_the_limit_are_refused_and_the_rest_keep_serving(tmp_path):
    pair = make_pair(tmp_path)
    try:
        cfg = (pair.dir / "a" / "config.toml").read_text()
        (pair.dir / "a" / "config.toml").write_text(cfg.replace("[nbd]\n", "[nbd]\nmax_connections = 3\n"))
        pair.kill("a")
        pair.up()
        clients = [open_session(pair.socket_path("a"), "lun0") for _ in range(3)]
        extra = RawNbdClient(pair.socket_path("a"))
        assert extra.server_closed()
        for c in clients:
            assert_still_serves(c)
    finally:
        pair.stop_all()


@pytest.mark.needs("fio")
def test_control_round_trip_stays_short_while_a_bulk_mirror_stream_runs(local_pair):
    """Reserved credit on the link: a ping overtakes the mirror data queued behind it."""
    ctl = str(local_pair.dir / "a" / "control.sock")
    idle = sorted(request(ctl, {"cmd": "ping"})["rtt_us"] for _ in range(20))[10]
    fio = subprocess.Popen(["fio", "--name=bulk", "--ioengine=nbd", f"--uri={local_pair.uri('a', 0)}",
                            "--rw=write", "--bs=1M", "--iodepth=16", "--size=48M", "--time_based",
                            "--runtime=6", "--output-format=json"], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
        busy_status = local_pair.status("a")
        loaded = sorted(request(ctl, {"cmd": "ping"})["rtt_us"] for _ in range(20))
    finally:
        out, _ = fio.communicate(timeout=60)
    mirrored_mb = json.loads(out[out.index("{"):])["jobs"][0]["write"]["io_bytes"] / 1e6
    assert mirrored_mb > 20 and busy_status["stats"].get("writes", 0) > 0
    median = loaded[10]
    print(f"\ncontrol RTT: idle median {idle:.0f} us, under a {mirrored_mb:.0f} MB mirror stream "
          f"median {median:.0f} us, max {loaded[-1]:.0f} us")
    # Behind 16 queued 1 MiB writes (256 mirror frames each) the ping would wait for
    # megabytes to drain; on the control lane it waits for at most one loop turn.
    assert median < 50_000
