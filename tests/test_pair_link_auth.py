"""Per-frame link authentication on real processes, with a man in the middle on the link.

Controller b reaches a through fixtures/linkmitm.py, a relay that knows the
frame format but not the pair key: it changes a MIRROR_WRITE's data and
fixes the block's data CRC and the frame's CRC32C, so only the MAC can tell.
Dirty lines stay in the cache (no idle destage), so after a's death b serves
them from its mirror copies: a refused frame that had been taken would show
up there as corrupted data.
"""
import json
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from firmware.formats import messages as M
from fixtures.linkmitm import FrameRelay
from hal.host.client import open_session
from fixtures.pair import MiB, block_pattern, make_pair, read_block_via, run, wait_for
from hal.host import nbd

KEEP_DIRTY = {"idle_flush_ms": 600_000, "high_watermark": 0.9, "low_watermark": 0.5}


@pytest.fixture
def mitm_pair(tmp_path):
    pair = make_pair(tmp_path, luns=1, lun_size_bytes=16 * MiB, nvram_size_bytes=16 * MiB, cache=KEEP_DIRTY,
                     link_proxy=FrameRelay, metrics=True)
    try:
        pair.wait_settled(owners={"lun0": "a"})
        wait_mirrored(pair)
        yield pair
    finally:
        pair.stop_all()
        pair.proxy.close()


def wait_mirrored(pair, timeout_s=20):
    wait_for(lambda: all(pair.status(n)["link"] == "mirrored" for n in "ab"), timeout_s, "a mirrored pair")


def write_blocks(pair, name, versions):
    """Write {block: version} through controller `name`; every write must be acknowledged."""
    session = open_session(pair.socket_path(name), "lun0", timeout_s=30)
    try:
        for cookie, (block, version) in enumerate(versions.items(), 1):
            session.request(nbd.NBD_CMD_WRITE, cookie, block * 4096, 4096, data=block_pattern(0, block, version))
        for _ in versions:
            error, _cookie, _ = session.read_reply()
            assert error == 0
    finally:
        session.close()


def auth_failures(pair, name):
    return pair.status(name)["link_stats"]["auth_failures"]


def scraped_auth_failures(pair, name):
    with urllib.request.urlopen(pair.status(name)["metrics_url"], timeout=10) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "twincache_link_auth_failures_total":
                return s.value
    raise AssertionError("no twincache_link_auth_failures_total in the metrics")


def failover_reads_back(pair, expected):
    """Kill a; b takes lun0 over from its mirror copies; every block reads back as written."""
    killed = time.time()
    # a dies first (cut off alive, it destages its lines and b's copies are no longer what is
    # served); then the relay goes, as a dead a's socket would refuse b. While the relay took b's
    # connections and closed them, every close restarted b's quiet time (firmware/ha/takeover.py,
    # _watch_anew) and b never took over (seen here: 20 s of "peer closed the link", no takeover).
    pair.kill("a")
    pair.proxy.cut()
    pair.proxy.close()
    pair.wait_event("b", "takeover", since=killed, lun=0)
    read = read_block_via(pair, "b", 0)
    bad = [block for block, version in sorted(expected.items()) if read(block) != block_pattern(0, block, version)]
    assert bad == [], f"blocks read back wrong through b after the failover: {bad}"


def test_an_altered_mirror_write_is_refused_counted_and_the_partners_copy_stays_true(mitm_pair):
    pair = mitm_pair
    written = {block: 1 for block in range(16)}
    write_blocks(pair, "a", written)
    assert auth_failures(pair, "b") == 0
    since = time.time()
    pair.proxy.alter(M.MsgType.MIRROR_WRITE)
    write_blocks(pair, "a", {20: 2})                   # its mirror frame is altered on the way to b
    written[20] = 2
    assert pair.proxy.altered == 1
    # A socket has no retransmission: the session starts over and the resync sends the true data.
    wait_mirrored(pair)
    write_blocks(pair, "a", {21: 3})
    written[21] = 3
    failover_reads_back(pair, written)                 # b's mirror copies: what a taken frame would spoil
    assert auth_failures(pair, "b") == 1 and scraped_auth_failures(pair, "b") == 1
    down = pair.wait_event("b", "link_down", since=since)
    print(f"\nb refused the altered frame; link down: {down['reason']}")


def test_repeated_forged_frames_end_the_session_and_no_host_data_is_corrupted(mitm_pair):
    pair = mitm_pair
    written = {block: 1 for block in range(8)}
    write_blocks(pair, "a", written)
    since = time.time()
    pair.proxy.forge_after(M.MsgType.MIRROR_WRITE, 8)  # the genuine frame, then 8 altered copies
    write_blocks(pair, "a", {30: 2})
    written[30] = 2
    deadline = time.monotonic() + 10
    while True:
        ended = [e for e in pair.events("b", "link_down")
                 if e["ts"] >= since and "failed authentication" in e["reason"]]
        if ended or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert ended, f"b's link did not end on forged frames: {pair.events('b', 'link_down')}"
    print(f"\n{pair.proxy.forged} forged frames; b: {ended[0]['reason']}")
    assert auth_failures(pair, "b") == 8
    wait_mirrored(pair)                                # a new session, with new keys
    assert scraped_auth_failures(pair, "b") == 8
    cli = run([sys.executable, "-m", "hal.cli", "status", "--dir", str(pair.dir), "--json"])
    shown = {c["name"]: c["link_stats"]["auth_failures"] for c in json.loads(cli.stdout)["controllers"]}
    assert shown == {"a": 0, "b": 8}
    text = run([sys.executable, "-m", "hal.cli", "status", "--dir", str(pair.dir)]).stdout
    assert "link frames refused: 8 failed authentication, 0 replayed" in text
    write_blocks(pair, "b", {31: 3})                   # forwarded to the owner over the new session
    written[31] = 3
    read = read_block_via(pair, "a", 0)
    assert all(read(block) == block_pattern(0, block, version) for block, version in written.items())
    failover_reads_back(pair, written)


def test_a_replayed_frame_is_refused_and_counted_and_the_session_goes_on(mitm_pair):
    """An exact copy of a MIRROR_WRITE (its MAC verifies) right behind it: its counter is not new,
    so b refuses it and counts it; it left no gap, so one is not enough to end the session."""
    pair = mitm_pair
    since = time.time()
    pair.proxy.replay_after(M.MsgType.MIRROR_WRITE, 1)
    write_blocks(pair, "a", {40: 1})
    assert pair.proxy.replayed == 1
    wait_for(lambda: pair.status("b")["link_stats"]["auth_replays"] == 1, 10, "b counting the replay")
    write_blocks(pair, "a", {41: 2})
    assert pair.status("b")["link_stats"]["auth_failures"] == 1         # a socket never repeats a frame
    assert [e for e in pair.events("b", "link_down") if e["ts"] >= since] == []
    assert all(pair.status(n)["link"] == "mirrored" for n in "ab")
    failover_reads_back(pair, {40: 1, 41: 2})
