"""The ha write path on real processes, with real NBD clients.

A local pair (two controller processes, unix-socket link, file NVRAM and a
shared file disk array) serves lun0 (owned by a) and lun1 (owned by b) on
both controllers; the non-owner forwards to the owner.
"""
import json
import os
import random
import signal
import time

import pytest

from fixtures.pair import LoggedWriter, MiB, make_pair, qemu_io, read_block_via, run
from hal.host import nbd

pytestmark = pytest.mark.needs("qemu-io")


def test_qemu_io_patterns_written_through_a_read_through_a_and_b(local_pair):
    for lun in (0, 1):
        qemu_io(local_pair.uri("a", lun), f"write -P 0x{0xa0 + lun:x} 0 1M", "write -P 0x5c 1M 4k",
                "write -P 0x33 3M 512")
        for name in ("a", "b"):
            out = qemu_io(local_pair.uri(name, lun), f"read -P 0x{0xa0 + lun:x} 0 1M",
                          "read -P 0x5c 1M 4k", "read -P 0x33 3M 512", "read -P 0 3146240 512")
            assert "Pattern verification failed" not in out.stdout + out.stderr


def test_unaligned_sub_line_writes_merge_with_cached_data(local_pair):
    uri = local_pair.uri("b", 0)         # through the non-owner, so forwarding is exercised too
    qemu_io(uri, "write -P 0x11 0 8k", "write -P 0x22 512 512", "write -P 0x33 4608 1024")
    out = qemu_io(local_pair.uri("a", 0), "read -P 0x11 0 512", "read -P 0x22 512 512",
                  "read -P 0x11 1k 3k", "read -P 0x33 4608 1024", "read -P 0x11 5632 2560")
    assert "Pattern verification failed" not in out.stdout + out.stderr


@pytest.mark.needs("nbdcopy")
def test_nbdcopy_round_trip_of_a_random_image(local_pair, tmp_path):
    src, back = tmp_path / "src.img", tmp_path / "back.img"
    src.write_bytes(random.Random(7).randbytes(24 * MiB))
    run(["nbdcopy", str(src), local_pair.uri("a", 1)])        # lun1 through its non-owner
    run(["nbdcopy", local_pair.uri("b", 1), str(back)])
    assert back.read_bytes()[:24 * MiB] == src.read_bytes()


@pytest.mark.needs("nbdinfo")
def test_nbdinfo_lists_every_lun_on_both_controllers(local_pair):
    for name in ("a", "b"):
        out = run(["nbdinfo", "--list", "--json", f"nbd+unix:///?socket={local_pair.socket_path(name)}"])
        exports = {e["export-name"]: e for e in json.loads(out.stdout)["exports"]}
        assert sorted(exports) == ["lun0", "lun1"]
        assert exports["lun0"]["export-size"] == 64 * MiB
        assert exports["lun0"]["can_flush"] and exports["lun0"]["can_fua"]


@pytest.mark.needs("fio")
def test_fio_verify_crc32c_mixed_sizes_several_jobs(local_pair):
    result = run(["fio", "--name=verify", "--ioengine=nbd", f"--uri={local_pair.uri('a', 0)}",
                  "--rw=randwrite", "--bsrange=4k-256k", "--size=16M", "--numjobs=3",
                  "--iodepth=8", "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0", "--offset_increment=20M",
                  "--output-format=json"], timeout=300)
    jobs = json.loads(result.stdout[result.stdout.index("{"):])["jobs"]
    assert len(jobs) == 3 and all(j["error"] == 0 for j in jobs)
    assert all(j["write"]["io_bytes"] >= 16 * MiB for j in jobs)


@pytest.mark.parametrize("victim", ["a", "b"])
def test_sigkill_of_the_owner_under_load_loses_no_acknowledged_write(local_pair, victim):
    """Kill -9 the owner of lun0 (a) while a host pipelines writes through `victim`."""
    writer = LoggedWriter(local_pair.socket_path(victim), 0, blocks=2048, depth=16)
    rng = random.Random(11)
    writer.run(3000, rng)                      # warm: data in both NVRAMs, some destaged
    import threading
    # Writes go on across the kill and the takeover for 10 s: through b they are written through
    # to disk once b owns lun0 alone, each answered after a disk flush, so a count would time out.
    t = threading.Thread(target=writer.run, args=(100000, rng), kwargs={"seconds": 10})
    t.start()
    time.sleep(0.5)
    local_pair.kill("a")
    t.join(timeout=30)
    assert not t.is_alive()
    assert len(writer.acked) > 1000
    local_pair.up()                            # restarts a on its NVRAM; waits until mirrored
    local_pair.wait_settled(owners={"lun0": "a"})   # b took lun0 over; failback gives it back
    for name in ("a", "b"):
        assert writer.check(read_block_via(local_pair, name, 0)) == []


def last_event(pair, name, kind):
    with open(pair.dir / name / "events.jsonl") as f:
        events = [json.loads(line) for line in f if f'"kind": "{kind}"' in line]
    return events[-1] if events else None


def test_restart_rebuilds_the_cache_from_nvram_alone(tmp_path):
    pair = make_pair(tmp_path, cache={"idle_flush_ms": 600000, "high_watermark": 0.9,
                                      "low_watermark": 0.8})
    try:
        qemu_io(pair.uri("a", 0), "write -P 0x77 0 2M")
        assert pair.status("a")["dirty_blocks"] == 512
        with open(pair.disk_path(0), "rb") as disk:      # nothing destaged yet: only NVRAM has it
            disk.seek(1 * MiB)
            assert disk.read(2 * MiB) == bytes(2 * MiB)
        pair.kill("a")
        pair.up()
        recovered = last_event(pair, "a", "recovered")
        assert recovered["dirty_lines"] == 512 and recovered["dropped"] == 0
        assert pair.status("a")["link"] == "mirrored"
        out = qemu_io(pair.uri("b", 0), "read -P 0x77 0 2M")
        assert "Pattern verification failed" not in out.stdout
        # Unmirrored after the restart, the recovered lines were destaged eagerly: from NVRAM.
        deadline = time.monotonic() + 10
        while pair.status("a")["dirty_blocks"] and time.monotonic() < deadline:
            time.sleep(0.05)
        with open(pair.disk_path(0), "rb") as disk:
            disk.seek(1 * MiB)
            assert disk.read(2 * MiB) == b"\x77" * (2 * MiB)
    finally:
        pair.stop_all()


def dump(path):
    out = run([os.path.join(os.path.dirname(os.sys.executable), "twincache"), "nvram", "dump",
               "--json", path])
    return json.loads(out.stdout)


def test_partner_mirror_segment_equals_owner_dirty_primary_blocks(tmp_path):
    pair = make_pair(tmp_path, cache={"idle_flush_ms": 600000, "high_watermark": 0.9,
                                      "low_watermark": 0.8})
    try:
        qemu_io(pair.uri("a", 0), "write -P 0x42 0 1M", "write -P 0x43 512k 8k", "write -P 0x44 7M 3k")
        qemu_io(pair.uri("a", 1), "write -P 0x45 0 64k")      # lun1: owned by b
        for name in ("a", "b"):                                 # freeze both, then a power cut of both
            os.kill(pair.pid(name), signal.SIGSTOP)
        pair.stop_all()
        a, b = dump(pair.nvram_path("a")), dump(pair.nvram_path("b"))

        def key(blk):
            return (blk["index"], blk["lun"], blk["lba"], blk["seq"], blk["data_crc"], blk["dirty_bitmap"])
        a_primary = sorted(key(x) for x in a["primary"]["blocks"] if x["state"] != "FREE")
        b_mirror = sorted(key(x) for x in b["mirror"]["blocks"] if x["state"] != "FREE")
        assert len(a_primary) == 256 + 1 and a_primary == b_mirror    # 8k at 512k rewrote two lines
        b_primary = sorted(key(x) for x in b["primary"]["blocks"] if x["state"] != "FREE")
        a_mirror = sorted(key(x) for x in a["mirror"]["blocks"] if x["state"] != "FREE")
        assert len(b_primary) == 16 and b_primary == a_mirror
    finally:
        pair.stop_all()
