"""Where a disk may hold data (Disk.data_ranges): SEEK_DATA/SEEK_HOLE on sparse image files.

Block status trusts this answer for holes, so the tests check a real sparse
file on this machine's filesystem: written ranges come back as data (rounded
out to the filesystem's blocks, never in), unwritten ones as holes, and a LUN's
offsets are relative to its data area.
"""
import os

import pytest

from hal.backends.disk_array import DiskArray
from hal.backends.disk_file import DATA_RANGES_MAX, FileDisk
from hal.backends.disk_volatile import VolatileCacheDisk

from test_disks import PAIR, config

MiB = 1 << 20


def covers(ranges, start, end):
    return any(a <= start and end <= b for a, b in ranges)


def sparse_supported(path):
    with FileDisk(path, 8 * MiB, create=True) as disk:
        disk.write(4 * MiB, b"x" * 4096)
        return disk.data_ranges(0, 8 * MiB) != [(0, 8 * MiB)]


def test_file_disk_reports_written_ranges_and_holes(tmp_path):
    path = tmp_path / "d.img"
    if not sparse_supported(tmp_path / "probe.img"):
        pytest.skip("this filesystem has no SEEK_DATA holes")
    with FileDisk(path, 64 * MiB, create=True) as disk:
        assert disk.data_ranges(0, 64 * MiB) == []
        disk.write(MiB, b"a" * 65536)
        disk.write(32 * MiB - 512, b"b" * 1024)
        ranges = disk.data_ranges(0, 64 * MiB)
        assert covers(ranges, MiB, MiB + 65536) and covers(ranges, 32 * MiB - 512, 32 * MiB + 512)
        assert not covers(ranges, 0, 4096) and not covers(ranges, 48 * MiB, 48 * MiB + 4096)
        assert sum(b - a for a, b in ranges) < MiB
        assert disk.data_ranges(MiB + 4096, 4096) == [(MiB + 4096, MiB + 8192)]   # clipped to the window
        assert disk.data_ranges(40 * MiB, MiB) == []


def test_file_disk_walk_is_bounded_and_the_rest_counts_as_data(tmp_path):
    if not sparse_supported(tmp_path / "probe.img"):
        pytest.skip("this filesystem has no SEEK_DATA holes")
    size = (2 * DATA_RANGES_MAX + 8) * 65536
    with FileDisk(tmp_path / "d.img", size, create=True) as disk:
        for i in range(DATA_RANGES_MAX + 4):
            disk.write(2 * i * 65536, b"z" * 4096)
        ranges = disk.data_ranges(0, size)
        assert len(ranges) == DATA_RANGES_MAX + 1 and ranges[-1][1] == size
        assert covers(ranges, 2 * (DATA_RANGES_MAX + 3) * 65536, 2 * (DATA_RANGES_MAX + 3) * 65536 + 4096)


def test_lun_offsets_are_relative_to_the_data_area(tmp_path):
    if not sparse_supported(tmp_path / "probe.img"):
        pytest.skip("this filesystem has no SEEK_DATA holes")
    array = DiskArray.open(config(tmp_path, 1, lun_size_bytes=8 * MiB), PAIR, create=True)
    lun = array[0]
    assert lun.data_ranges(0, lun.size_bytes) == []       # the label lies before the data area
    lun.write(3 * MiB, b"q" * 4096)
    ranges = lun.data_ranges(0, lun.size_bytes)
    assert covers(ranges, 3 * MiB, 3 * MiB + 4096) and not covers(ranges, 0, 4096)
    array.close()


def test_a_disk_with_a_volatile_write_cache_answers_all_data(tmp_path):
    raw = FileDisk(tmp_path / "v.img", 8 * MiB, create=True)
    disk = VolatileCacheDisk(raw)
    disk.write(0, b"v" * 4096)                 # held in memory: the file has a hole there
    assert disk.data_ranges(0, 8 * MiB) == [(0, 8 * MiB)]
    disk.close()


def test_a_block_device_answers_all_data(tmp_path):
    with FileDisk(tmp_path / "b.img", MiB, create=True) as disk:
        disk.block_device = True               # what a /dev/sd* disk is; lseek is never asked
        assert disk.data_ranges(0, MiB) == [(0, MiB)]
    assert os.path.getsize(tmp_path / "b.img") == MiB
