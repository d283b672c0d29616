"""Metrics on real processes: a local pair with [metrics] on, fio over NBD, scraped over HTTP.

Each scrape is a real HTTP GET (urllib) of the controller's loopback port, parsed
with prometheus-client's own text parser; the counters are checked against
what fio reports it did.
"""
import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fixtures.pair import MiB, make_pair, run
from hal.runtime import config as C
from hal.tools.pair import PairError

pytestmark = pytest.mark.needs("fio")

TC = [sys.executable, "-m", "hal.cli"]
# Dirty lines stay in the cache until the test looks: no idle destage, a high watermark.
KEEP_DIRTY = {"idle_flush_ms": 600_000, "high_watermark": 0.9, "low_watermark": 0.5}


def scrape(url):
    """{(name, frozenset(labels)): value} of every sample at url."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    return samples(text)


def samples(text):
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples_, name, **labels):
    return samples_[(name, frozenset(labels.items()))]


def metrics_url(pair, name):
    url = pair.status(name)["metrics_url"]
    assert url.startswith("http://127.0.0.1:")
    return url


def fio(uri, rw, size, iodepth, extra=()):
    args = ["fio", "--name=m", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", "--bs=4k", f"--size={size}",
            f"--iodepth={iodepth}", "--output-format=json", *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def fio_result(proc, direction):
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    job = json.loads(out[out.index("{"):])["jobs"][0][direction]
    return job["io_bytes"], job["total_ios"]


@pytest.fixture
def mpair(tmp_path):
    pair = make_pair(tmp_path, luns=2, lun_size_bytes=16 * MiB, nvram_size_bytes=16 * MiB, cache=KEEP_DIRTY,
                     metrics=True)
    yield pair
    pair.stop_all()


def test_counters_follow_fio_writes_and_reads_through_the_owner(mpair):
    pair = mpair
    url = metrics_url(pair, "a")
    before = scrape(url)
    assert value(before, "twincache_host_requests_total", controller="a", lun="lun0", op="write") == 0
    writer = fio(pair.uri("a", 0), "write", "4M", 4)
    during = scrape(url)                                          # while fio runs: the loop answers
    wrote_bytes, writes = fio_result(writer, "write")
    reader = fio(pair.uri("a", 0), "read", "2M", 16)
    read_bytes, reads = fio_result(reader, "read")
    after = scrape(url)
    labels = dict(controller="a", lun="lun0")
    w = value(after, "twincache_host_requests_total", op="write", **labels)
    r = value(after, "twincache_host_requests_total", op="read", **labels)
    assert value(during, "twincache_host_requests_total", op="write", **labels) <= w
    assert writes == 1024 and writes <= w <= writes + 2           # fio may add a flush, never a write
    assert reads == 512 and reads <= r <= reads + 2
    assert value(after, "twincache_host_request_bytes_total", op="write", **labels) >= wrote_bytes == 4 * MiB
    assert value(after, "twincache_host_request_bytes_total", op="read", **labels) >= read_bytes == 2 * MiB
    for op, n in (("write", w), ("read", r)):
        assert value(after, "twincache_host_request_duration_seconds_count", op=op, **labels) == n
        assert value(after, "twincache_host_request_duration_seconds_bucket", op=op, le="+Inf", **labels) == n
        assert 0 < value(after, "twincache_host_request_duration_seconds_sum", op=op, **labels) < n * 1.0
    # Every write to a's LUN was mirrored to b while the link was up: one round trip each.
    assert value(after, "twincache_mirror_round_trip_seconds_count", **labels) == writes
    assert value(after, "twincache_host_request_errors_total", op="write", **labels) == 0
    assert value(after, "twincache_host_requests_total", controller="a", lun="lun1", op="write") == 0
    assert value(after, "twincache_cache_dirty_blocks", controller="a") == 1024      # 4 MiB of 4 KiB lines
    assert value(after, "twincache_lun_dirty_blocks", **labels) == 1024
    b = scrape(metrics_url(pair, "b"))
    assert value(b, "twincache_mirror_blocks", controller="b") >= 1024                # b holds a's copies
    assert value(after, "twincache_link_up", controller="a") == 1
    assert value(after, "twincache_link_mirrored", controller="a") == 1
    assert value(after, "twincache_lun_owned", **labels) == 1
    assert value(after, "twincache_lun_owned", controller="a", lun="lun1") == 0
    assert value(after, "twincache_lun_state", state="owner", **labels) == 1
    assert value(after, "twincache_lun_generation", **labels) >= 1


def test_link_round_trip_and_destage_show_up(tmp_path):
    pair = make_pair(tmp_path, luns=1, lun_size_bytes=16 * MiB, nvram_size_bytes=16 * MiB,
                     cache={"idle_flush_ms": 100}, metrics=True)
    try:
        _, writes = fio_result(fio(pair.uri("a", 0), "randwrite", "2M", 8, ["--norandommap"]), "write")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            m = scrape(metrics_url(pair, "a"))
            if (value(m, "twincache_cache_dirty_blocks", controller="a") == 0
                    and ("twincache_link_round_trip_seconds", frozenset({("controller", "a")})) in m):
                break
            time.sleep(0.2)
        assert value(m, "twincache_cache_dirty_blocks", controller="a") == 0           # idle destage ran
        assert 0 < value(m, "twincache_destaged_lines_total", controller="a") <= writes
        assert value(m, "twincache_disk_write_bytes_total", controller="a", lun="lun0") >= 4096
        assert value(m, "twincache_destage_errors_total", controller="a") == 0
        assert 0 < value(m, "twincache_link_round_trip_seconds", controller="a") < 1.0
        assert value(m, "twincache_resync_remaining_bytes", controller="a", kind="ha") == 0
        pair.kill("b")
        deadline = time.monotonic() + 10
        while value(scrape(metrics_url(pair, "a")), "twincache_link_up", controller="a") != 0:
            assert time.monotonic() < deadline, "link_up stayed 1 after the partner died"
            time.sleep(0.1)
        m = scrape(metrics_url(pair, "a"))
        assert value(m, "twincache_link_mirrored", controller="a") == 0
    finally:
        pair.stop_all()


def test_metrics_command_prints_both_controllers_then_one(mpair):
    pair = mpair
    out = run(TC + ["metrics", "--dir", str(pair.dir)])
    assert out.stdout.count("# controller ") == 2
    both = samples(out.stdout)
    assert value(both, "twincache_link_up", controller="a") == 1
    assert value(both, "twincache_link_up", controller="b") == 1
    out = run(TC + ["metrics", "--dir", str(pair.dir), "b"])
    one = samples(out.stdout)
    assert ("twincache_link_up", frozenset({("controller", "b")})) in one
    assert ("twincache_link_up", frozenset({("controller", "a")})) not in one
    up = run(TC + ["pair", "up", "--dir", str(pair.dir)])         # already running: prints the URLs
    assert up.stdout.count("  metrics  http://127.0.0.1:") == 2


def test_metrics_command_on_a_pair_without_metrics_says_so(tmp_path):
    pair = make_pair(tmp_path, luns=1, lun_size_bytes=16 * MiB, nvram_size_bytes=8 * MiB)
    try:
        out = run(TC + ["metrics", "--dir", str(pair.dir)], check=False)
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert "metrics are off" in out.stderr
        assert pair.status("a")["metrics_url"] is None
    finally:
        pair.stop_all()


def test_port_in_use_stops_the_controller_with_a_clear_reason(tmp_path):
    pair = make_pair(tmp_path, luns=1, lun_size_bytes=16 * MiB, nvram_size_bytes=8 * MiB, metrics=True)
    try:
        port = int(metrics_url(pair, "a").rsplit(":", 1)[1].split("/")[0])
        pair.kill("a")
        with socket.socket() as squatter:
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            squatter.bind(("127.0.0.1", port))
            squatter.listen(1)
            with pytest.raises(PairError) as err:
                pair.up(timeout_s=20)
        assert "the port is in use" in str(err.value) and f"127.0.0.1:{port}" in str(err.value)
        assert "Traceback" not in str(err.value)
    finally:
        pair.stop_all()


def _config(metrics):
    return {"controller": {"name": "a", "pair_id": "0" * 32}, "disks": {"paths": ["/tmp/x"]},
            "nbd": {"unix": "/tmp/n.sock"}, "metrics": metrics}


@pytest.mark.parametrize("listen", ["127.0.0.1:9520", "localhost:9520", "[::1]:9520", "127.0.0.2:1"])
def test_config_accepts_loopback_listen(listen):
    assert C.from_dict(_config({"listen": listen})).metrics.listen == listen


@pytest.mark.parametrize("listen, reason", [
    ("0.0.0.0:9520", "not a loopback address"),
    ("10.1.2.3:9520", "not a loopback address"),
    ("metrics.example:9520", "not a loopback address"),
    ("127.0.0.1", "is not host:port"),
    ("127.0.0.1:0", "is not host:port"),
    ("127.0.0.1:70000", "is not host:port"),
    (":9520", "names no host"),
])
def test_config_refuses_bad_or_non_loopback_listen(listen, reason):
    with pytest.raises(C.ConfigError, match=reason):
        C.from_dict(_config({"listen": listen}))


def test_config_non_loopback_needs_allow_remote_and_unknown_keys_are_refused():
    assert C.from_dict(_config({"listen": "0.0.0.0:9520", "allow_remote": True})).metrics.allow_remote
    assert C.from_dict(_config({})).metrics.listen == ""                  # off by default
    assert C.from_dict({k: v for k, v in _config({}).items() if k != "metrics"}).metrics.listen == ""
    with pytest.raises(C.ConfigError, match="unknown key"):
        C.from_dict(_config({"listen": "127.0.0.1:9520", "port": 1}))


@pytest.mark.needs("qemu-io")
def test_replica_pair_exposes_resync_and_replica_metrics(tmp_path):
    pair = make_pair(tmp_path, luns=1, lun_size_bytes=16 * MiB, nvram_size_bytes=16 * MiB, mode="replica",
                     metrics=True)
    try:
        a = scrape(metrics_url(pair, "a"))
        assert value(a, "twincache_replica_primary", controller="a") == 1
        assert value(scrape(metrics_url(pair, "b")), "twincache_replica_primary", controller="b") == 0
        sent_before = value(a, "twincache_resync_bytes_total", controller="a", kind="replica")
        pair.kill("b")
        _, writes = fio_result(fio(pair.uri("a", 0), "write", "1M", 4), "write")
        a = scrape(metrics_url(pair, "a"))
        assert value(a, "twincache_replica_out_of_sync_bytes", controller="a") >= 1 * MiB
        assert value(a, "twincache_link_up", controller="a") == 0
        restarted = time.time()
        pair.up()
        done = pair.wait_event("a", "resync_done", since=restarted, side="source", timeout_s=60)
        a = scrape(metrics_url(pair, "a"))
        assert value(a, "twincache_resync_bytes_total", controller="a", kind="replica") - sent_before \
            >= done["bytes"] >= 1 * MiB
        assert value(a, "twincache_resync_remaining_bytes", controller="a", kind="replica") == 0
        assert value(a, "twincache_host_requests_total", controller="a", lun="lun0", op="write") >= writes
        assert ("twincache_replica_state", frozenset({("controller", "a"), ("state", "synced")})) in a \
            or value(a, "twincache_link_up", controller="a") == 1
    finally:
        pair.stop_all()


def test_requests_over_tls_are_counted_and_timed(tmp_path):
    # A TLS client's flush returned before its timed replies were recorded: the latency histogram
    # never saw them and the list of them grew with every request.
    from hal.host import tls_certs
    pair = make_pair(tmp_path, luns=2, lun_size_bytes=16 * MiB, nvram_size_bytes=16 * MiB, metrics=True, tls=True)
    try:
        pair.wait_settled(owners={"lun0": "a", "lun1": "b"})
        opts = tls_certs.client_options(pair.tls_client_dir(), pair.socket_path("a"), "lun0")
        done = run(["qemu-io", "--object", opts["qemu_object"], "-c", "write -P 0x3c 0 64k",
                    "-c", "write -P 0x3d 64k 64k", "-c", "read -P 0x3c 0 64k",
                    "--image-opts", opts["qemu_image_opts"]], timeout=60, check=False)
        assert done.returncode == 0 and "error" not in (done.stdout + done.stderr).lower(), done.stderr
        labels = dict(controller="a", lun="lun0")
        got = scrape(metrics_url(pair, "a"))
        writes = value(got, "twincache_host_requests_total", op="write", **labels)
        assert writes >= 2
        assert value(got, "twincache_host_request_duration_seconds_count", op="write", **labels) == writes
        assert value(got, "twincache_host_request_duration_seconds_count", op="read", **labels) >= 1
    finally:
        pair.stop_all()
