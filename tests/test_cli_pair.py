"""The pair commands on real pairs: pair up refusing contradictions, merged events with
filters, demote in replica mode, and which generation `nvram dump` shows.

Every pair here is two real controller processes under a temporary directory,
started with `twincache pair up` in a subprocess (1 LUN of 16 MiB) and always
stopped afterwards.
"""
import datetime
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

from hal.host import nbd
from hal.host.client import open_session
from fixtures.pair import PairHandle, block_pattern, wait_for

REPO = pathlib.Path(__file__).resolve().parent.parent
TC = [sys.executable, "-m", "hal.cli"]
SMALL = ["--luns", "1", "--lun-size", "16M", "--nvram-size", "16M"]


def tc(*args, check=True, timeout=90):
    result = subprocess.run(TC + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert "Traceback" not in result.stderr, result.stderr
    if check:
        assert result.returncode == 0, f"{args}: {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def start_pair(directory, *options):
    pair = PairHandle(directory)
    try:
        tc("pair", "up", "--dir", directory, *SMALL, *options)
    except BaseException:
        pair.stop_all()
        raise
    return pair


@pytest.fixture
def ha_pair(tmp_path):
    pair = start_pair(tmp_path / "pair")
    yield pair
    pair.stop_all()


@pytest.fixture
def replica_pair(tmp_path):
    pair = start_pair(tmp_path / "pair", "--mode", "replica")
    yield pair
    pair.stop_all()


def events(pair, *options):
    return [json.loads(line) for line in tc("events", "--dir", pair.dir, *options).stdout.splitlines()]


def pids(pair):
    return {name: pair.pid(name) for name in "ab"}


# -- pair up on an existing pair --------------------------------------------------

@pytest.mark.parametrize("options,named", [
    (["--mode", "replica"], "--mode replica (it has ha)"),
    (["--luns", "2"], "--luns 2 (it has 1)"),
    (["--lun-size", "32M"], "--lun-size 32M (it has 16M)"),
    (["--nvram-size", "64M"], "--nvram-size 64M (it has 16M)"),
    (["--replica-variant", "log"], "--replica-variant log (it has none: it is ha)"),
])
def test_pair_up_refuses_options_contradicting_an_ha_pair(ha_pair, options, named):
    before, meta = pids(ha_pair), ha_pair.meta_path.read_text()
    result = tc("pair", "up", "--dir", ha_pair.dir, *options, check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert named in result.stderr and "remove that directory" in result.stderr
    assert pids(ha_pair) == before and ha_pair.meta_path.read_text() == meta
    assert ha_pair.status("a")["mode"] == "ha"


def test_pair_up_with_agreeing_or_no_options_keeps_the_pair(ha_pair):
    before = pids(ha_pair)
    for options in ([], SMALL, ["--mode", "ha", "--lun-size", "16384K"]):
        out = tc("pair", "up", "--dir", ha_pair.dir, *options).stdout
        assert out.count("(already running)") == 2 and pids(ha_pair) == before


def test_pair_up_refuses_to_turn_a_stopped_replica_pair_into_another(replica_pair):
    tc("pair", "down", "--dir", replica_pair.dir)
    for options, named in ((["--mode", "ha"], "--mode ha (it has replica)"),
                           (["--mode", "replica", "--replica-variant", "log"],
                            "--replica-variant log (it has bitmap)")):
        result = tc("pair", "up", "--dir", replica_pair.dir, *options, check=False)
        assert result.returncode == 2 and named in result.stderr, result.stderr
        assert pids(replica_pair) == {"a": None, "b": None}
    tc("pair", "up", "--dir", replica_pair.dir)          # no options: restarted as it was made
    assert replica_pair.status("a")["replica"]["variant"] == "bitmap"


# -- events -----------------------------------------------------------------------

def assert_merged(stream, pair):
    """The stream is every event of both files, in time order."""
    assert [e["ts"] for e in stream] == sorted(e["ts"] for e in stream)
    assert sorted(map(json.dumps, stream)) == sorted(map(json.dumps, pair.events("a") + pair.events("b")))
    switches = sum(1 for x, y in zip(stream, stream[1:]) if x["controller"] != y["controller"])
    assert switches >= 2, [e["controller"] for e in stream]      # interleaved, not a's then b's


def test_events_merge_both_controllers_by_time_ha(ha_pair):
    tc("ownership", "move", "lun0", "--to", "b", "--dir", ha_pair.dir)
    tc("ownership", "move", "lun0", "--to", "a", "--dir", ha_pair.dir)
    assert_merged(events(ha_pair), ha_pair)


def test_events_filter_by_kind_and_since(ha_pair):
    tc("ownership", "move", "lun0", "--to", "b", "--dir", ha_pair.dir)
    everything = events(ha_pair)
    wanted = {"serving", "link_up"}
    chosen = [e for e in everything if e["kind"] in wanted]
    assert {e["controller"] for e in chosen} == {"a", "b"}
    assert events(ha_pair, "--kind", "serving", "--kind", "link_up") == chosen
    assert events(ha_pair, "--kind", "serving,link_up") == chosen
    middle = everything[len(everything) // 2]["ts"]
    iso = datetime.datetime.fromtimestamp(middle, datetime.timezone.utc).isoformat()
    later = events(ha_pair, "--since", iso)
    assert later == [e for e in everything if e["ts"] >= middle] and 0 < len(later) < len(everything)
    assert events(ha_pair, "--since", "1h") == everything
    time.sleep(1.2)
    assert events(ha_pair, "--since", "1s", "--kind", "serving") == []
    bad = tc("events", "--dir", ha_pair.dir, "--since", "yesterday", check=False)
    assert bad.returncode == 2 and "--since 'yesterday'" in bad.stderr


def test_events_follow_stays_merged(ha_pair, tmp_path):
    out = tmp_path / "followed.jsonl"
    with open(out, "w") as f:
        proc = subprocess.Popen(TC + ["events", "--dir", str(ha_pair.dir), "-f", "--since", "0s"], stdout=f,
                                stderr=subprocess.PIPE, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        time.sleep(0.5)
        tc("ownership", "move", "lun0", "--to", "b", "--dir", ha_pair.dir)

        def followed():
            return [json.loads(line) for line in out.read_text().splitlines()]
        wait_for(lambda: {e["controller"] for e in followed()} == {"a", "b"}, 20, "events of both while following")
        time.sleep(0.5)
        stream = followed()
        assert [e["ts"] for e in stream] == sorted(e["ts"] for e in stream)
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert "Traceback" not in proc.stderr.read().decode()


# -- demote (replica mode) -----------------------------------------------------------

def write_block(pair, name, block, version):
    session = open_session(pair.socket_path(name))
    try:
        session.request(nbd.NBD_CMD_WRITE, 1, block * 4096, 4096, data=block_pattern(0, block, version))
        assert session.read_reply()[0] == 0
    finally:
        session.close()


def read_block(pair, name, block):
    session = open_session(pair.socket_path(name))
    try:
        session.request(nbd.NBD_CMD_READ, 2, block * 4096, 4096)
        error, _, data = session.read_reply(4096)
        assert error == 0
        return data
    finally:
        session.close()


def roles(pair):
    return {name: pair.status(name)["role"] for name in "ab"}


def test_demote_promote_round_trip_replica(replica_pair):
    write_block(replica_pair, "a", 7, 1)
    out = tc("demote", "--dir", replica_pair.dir, "a").stdout
    assert "controller a is secondary" in out and roles(replica_pair) == {"a": "secondary", "b": "secondary"}
    tc("promote", "--dir", replica_pair.dir, "b")
    assert roles(replica_pair) == {"a": "secondary", "b": "primary"}
    assert read_block(replica_pair, "b", 7) == block_pattern(0, 7, 1)
    write_block(replica_pair, "b", 8, 2)
    tc("demote", "--dir", replica_pair.dir, "b")
    tc("promote", "--dir", replica_pair.dir, "a")
    assert roles(replica_pair) == {"a": "primary", "b": "secondary"}
    assert read_block(replica_pair, "a", 8) == block_pattern(0, 8, 2)
    assert read_block(replica_pair, "a", 7) == block_pattern(0, 7, 1)
    st = replica_pair.status("a")
    assert st["link"] == "mirrored" and not st["replica"]["split_brain"]
    stream = events(replica_pair, "--kind", "demoted,promoted")
    assert [(e["controller"], e["kind"]) for e in stream] == [
        ("a", "demoted"), ("b", "promoted"), ("b", "demoted"), ("a", "promoted")]
    assert_merged(events(replica_pair), replica_pair)


def demote_refused(pair, name):
    result = tc("demote", "--dir", pair.dir, name, check=False)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


def test_demote_refused_cases_replica(replica_pair):
    assert "already secondary" in demote_refused(replica_pair, "b")
    host = open_session(replica_pair.socket_path("a"))
    try:
        assert "1 host connection(s) open" in demote_refused(replica_pair, "a")
    finally:
        host.close()
    assert roles(replica_pair) == {"a": "primary", "b": "secondary"}
    wait_for(lambda: replica_pair.status("a")["nbd_clients"] == 0, 10, "the host connection closed")
    tc("demote", "--dir", replica_pair.dir, "a")
    assert "already secondary" in demote_refused(replica_pair, "a")


def test_demote_refused_on_an_ha_pair(ha_pair):
    assert "demote is for replica mode" in demote_refused(ha_pair, "a")


# -- nvram dump: which generation ---------------------------------------------------------

def test_nvram_dump_says_its_generation_is_not_the_ownership_generation(ha_pair):
    tc("ownership", "move", "lun0", "--to", "b", "--dir", ha_pair.dir)
    status_generation = ha_pair.status("b")["generation"]
    out = tc("nvram", "dump", ha_pair.nvram_path("b")).stdout
    report = json.loads(tc("nvram", "dump", ha_pair.nvram_path("b"), "--json").stdout)
    sb_generation = report["superblock"]["generation"]
    assert status_generation != sb_generation, (status_generation, sb_generation)
    assert f"superblock generation {sb_generation}: this NVRAM's own generation" in out
    assert "not the LUN ownership (fencing) generation of `twincache status`" in out
    assert "controller 1 (b) (peer 0 (a))" in out
    assert "not the LUN ownership" in report["superblock"]["generation_note"]
