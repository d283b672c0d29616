"""Destage durability on real processes: NVRAM copies are freed only after a disk flush.

The LUN disks get a volatile write cache in each controller's own memory
(hal/backends/disk_volatile.py, `[disks] write_cache = "volatile"`): a write reaches the
disk file only at a flush, so a SIGKILL of both controllers is a power cut of
the disks' caches as well. NVRAM (a shared file mapping) survives it, as a
battery-backed NVRAM does. Before this, destage freed both NVRAM copies as soon
as the write returned, and the data lived only in a cache that a power cut
loses.
"""
import random

import pytest

from fixtures.pair import LoggedWriter, MiB, PairHandle, block_pattern, read_block_via, wait_for

pytestmark = pytest.mark.needs("qemu-io")

BLOCKS = 2048          # 8 MiB of lun0 in 4 KiB blocks


def _volatile_pair(tmp_path):
    pair = PairHandle(tmp_path / "pair")
    pair.proxy = None
    pair.create(luns=2, lun_size_bytes=16 * MiB, nvram_size_bytes=16 * MiB, cache={"idle_flush_ms": 100})
    for name in ("a", "b"):
        path = pair.config_path(name)
        path.write_text(path.read_text().replace("[disks]\n", '[disks]\nwrite_cache = "volatile"\n', 1))
    pair.up()
    return pair


def _stats(pair, name):
    return pair.status(name)["stats"]


def test_destaged_writes_are_on_the_disk_file_and_survive_a_power_cut_of_both(tmp_path):
    pair = _volatile_pair(tmp_path)
    try:
        pair.wait_settled(owners={"lun0": "a"})
        writer = LoggedWriter(pair.socket_path("a"), 0, BLOCKS, depth=16)
        writer.run(3000, random.Random(5))
        assert writer.acked and not writer.errors
        # Idle: the owner destages everything and frees both NVRAM copies.
        wait_for(lambda: pair.status("a")["dirty_blocks"] == 0 and pair.status("b")["mirror_blocks"] == 0,
                 30, "destage of lun0 to finish")
        # Freed copies mean the data is in the disk file itself, not in a cache a power cut loses.
        disk = open(pair.disk_path(0), "rb").read()
        data_offset = 1 * MiB
        for block, version in writer.acked.items():
            at = data_offset + block * 4096
            later = [v for v in writer.sent_versions[block] if v >= version]
            assert any(disk[at:at + 4096] == block_pattern(0, block, v) for v in later), \
                f"block {block}: acknowledged version {version} is not on the disk file"
        st = _stats(pair, "a")
        assert st["destaged"] > 0 and st.get("disk_flushes", 0) > 0
        assert st["disk_flushes"] < st["destage_writes"]      # one flush covers many writes
        pair.stop_all()                     # the power cut: both controllers and their disk caches
        pair.up()
        pair.wait_settled()
        for name in ("a", "b"):
            assert writer.check(read_block_via(pair, name, 0)) == [], f"lost through {name}"
    finally:
        pair.stop_all()


def test_power_cut_in_the_middle_of_destaging_loses_no_acknowledged_write(tmp_path):
    """Killed while lines are being destaged (some written, not yet flushed): the NVRAM copies of
    what was not flushed are still there, and recovery destages them again."""
    pair = _volatile_pair(tmp_path)
    try:
        pair.wait_settled(owners={"lun0": "a"})
        writer = LoggedWriter(pair.socket_path("b"), 0, BLOCKS, depth=16)   # through the non-owner too
        writer.run(4000, random.Random(11))
        assert writer.acked and not writer.errors
        wait_for(lambda: _stats(pair, "a").get("destage_writes", 0) > 0, 30, "destage to start")
        pair.stop_all()
        pair.up()
        pair.wait_settled()
        for name in ("a", "b"):
            assert writer.check(read_block_via(pair, name, 0)) == [], f"lost through {name}"
    finally:
        pair.stop_all()
