"""Disks on real files: sector granularity, O_DIRECT, labels, the wrong disk refused."""
import mmap
import os

import pytest

from hal.runtime.config import DiskConfig
from hal.backends.disk_array import DiskArray, find_disk_by_serial
from hal.backends.disk_file import FileDisk
from hal.backends.interfaces import HalError

PAIR = bytes.fromhex("00112233445566778899aabbccddeeff")
OTHER_PAIR = bytes(16)
LUN_BYTES = 1 << 20


def config(tmp_path, count=2, **kw) -> DiskConfig:
    return DiskConfig(paths=[str(tmp_path / f"disk{i}.img") for i in range(count)],
                      lun_size_bytes=kw.pop("lun_size_bytes", LUN_BYTES), **kw)


# ---- FileDisk ------------------------------------------------------------------

def test_file_disk_write_read_flush(tmp_path):
    with FileDisk(tmp_path / "d.img", 1 << 20, create=True) as disk:
        assert disk.size_bytes == 1 << 20
        disk.write(4096, b"\xab" * 1024)
        disk.flush()
        assert disk.read(4096, 1024) == b"\xab" * 1024
        assert disk.read(0, 512) == bytes(512)      # sparse holes read as zeros
    assert (tmp_path / "d.img").read_bytes()[4096:5120] == b"\xab" * 1024


@pytest.mark.parametrize("offset, length", [(100, 512), (512, 100), (0, 513), (1, 1)])
def test_sector_granularity_enforced(tmp_path, offset, length):
    with FileDisk(tmp_path / "d.img", 1 << 20, create=True) as disk:
        with pytest.raises(HalError, match=r"d.img: write .* not a multiple of 512-byte sectors"):
            disk.write(offset, bytes(length))
        with pytest.raises(HalError, match="not a multiple of 512"):
            disk.read_into(offset, bytearray(length))


def test_out_of_range_refused(tmp_path):
    with FileDisk(tmp_path / "d.img", 1 << 20, create=True) as disk:
        with pytest.raises(HalError, match="outside the disk"):
            disk.write((1 << 20) - 512, bytes(1024))
        with pytest.raises(HalError, match="outside the disk"):
            disk.read_into(-512, bytearray(512))


def test_missing_disk_and_too_small(tmp_path):
    with pytest.raises(HalError, match="no such disk"):
        FileDisk(tmp_path / "nope.img")
    (tmp_path / "small.img").write_bytes(bytes(4096))
    with pytest.raises(HalError, match="small.img: disk is 4096 bytes, need 8192"):
        FileDisk(tmp_path / "small.img", 8192)


def test_o_direct_aligned_and_bounced(tmp_path):
    try:
        disk = FileDisk(tmp_path / "d.img", 1 << 20, direct=True, create=True)
    except HalError as exc:
        pytest.skip(str(exc))
    with disk:
        aligned = mmap.mmap(-1, 8192)              # page-aligned: goes straight to the device
        aligned[:] = os.urandom(8192)
        disk.write(8192, memoryview(aligned))
        back = mmap.mmap(-1, 8192)
        disk.read_into(8192, memoryview(back))
        assert back[:] == aligned[:]
        unaligned = bytearray(os.urandom(4096 + 1))[1:]   # bytes and odd addresses use the bounce buffer
        disk.write(0, bytes(unaligned))
        out = bytearray(1 + 4096)
        disk.read_into(0, memoryview(out)[1:])
        assert out[1:] == unaligned
        assert os.fstat(disk.fd).st_size == 1 << 20
        assert os.O_DIRECT & __import__("fcntl").fcntl(disk.fd, __import__("fcntl").F_GETFL)


def test_o_direct_unaligned_length_refused(tmp_path):
    try:
        disk = FileDisk(tmp_path / "d.img", 1 << 20, direct=True, create=True)
    except HalError as exc:
        pytest.skip(str(exc))
    with disk, pytest.raises(HalError, match="512-byte sectors"):
        disk.write(0, bytes(100))


# ---- DiskArray -----------------------------------------------------------------

def test_create_then_open_labels(tmp_path):
    cfg = config(tmp_path)
    array = DiskArray.open(cfg, PAIR, create=True)
    assert [d.lun for d in array] == [0, 1]
    assert all(d.data_offset == 1 << 20 and d.data_size == d.size_bytes == LUN_BYTES for d in array)
    assert os.path.getsize(cfg.paths[0]) == (1 << 20) + LUN_BYTES
    array[1].write(0, b"L1" * 256)
    array[1].flush()
    array.close()
    # LUN offset 0 is disk byte 1 MiB: the label is never in the way.
    assert open(cfg.paths[1], "rb").read()[(1 << 20):(1 << 20) + 4] == b"L1L1"
    array = DiskArray.open(cfg, PAIR)
    assert array[1].read(0, 512) == b"L1" * 256
    assert array[0].label.pair_id == PAIR and array[0].label.disk_index == 0
    array.close()


def test_lun_io_cannot_reach_past_its_data(tmp_path):
    array = DiskArray.open(config(tmp_path, 1), PAIR, create=True)
    with pytest.raises(HalError, match="outside LUN 0"):
        array[0].write(LUN_BYTES, bytes(512))
    with pytest.raises(HalError, match="outside LUN 0"):
        array[0].read_into(-512, bytearray(512))
    array.close()


def test_wrong_pair_refused_by_path(tmp_path):
    DiskArray.open(config(tmp_path), OTHER_PAIR, create=True).close()
    with pytest.raises(HalError, match=r"refusing disk .*disk0.img for LUN 0: it belongs to pair 0000"):
        DiskArray.open(config(tmp_path), PAIR)
    # create=True never relabels a disk that belongs to a pair.
    with pytest.raises(HalError, match="belongs to pair"):
        DiskArray.open(config(tmp_path), PAIR, create=True)


def test_swapped_disks_refused(tmp_path):
    cfg = config(tmp_path)
    DiskArray.open(cfg, PAIR, create=True).close()
    cfg.paths.reverse()
    with pytest.raises(HalError, match=r"disk1.img for LUN 0: its label says it is disk 1"):
        DiskArray.open(cfg, PAIR)


def test_corrupt_label_refused(tmp_path):
    cfg = config(tmp_path, 1)
    DiskArray.open(cfg, PAIR, create=True).close()
    with open(cfg.paths[0], "r+b") as f:
        f.seek(40)
        f.write(b"\xff")
    with pytest.raises(HalError, match=r"refusing disk for LUN 0: .*disk0.img offset 0: .*checksum"):
        DiskArray.open(cfg, PAIR)


def test_unlabelled_disk_refused_and_not_overwritten(tmp_path):
    cfg = config(tmp_path, 1)
    with open(cfg.paths[0], "wb") as f:
        f.write(b"somebody's filesystem".ljust(4096, b"\0"))
        f.truncate((1 << 20) + LUN_BYTES)
    for create in (False, True):
        with pytest.raises(HalError, match="no twincache disk label"):
            DiskArray.open(cfg, PAIR, create=create)
    assert open(cfg.paths[0], "rb").read(21) == b"somebody's filesystem"


def test_lun_size_mismatch_and_short_disk_refused(tmp_path):
    cfg = config(tmp_path, 1)
    DiskArray.open(cfg, PAIR, create=True).close()
    with pytest.raises(HalError, match="configured lun_size"):
        DiskArray.open(config(tmp_path, 1, lun_size_bytes=LUN_BYTES // 2), PAIR)
    with pytest.raises(HalError, match=r"disk0.img: disk is .* LUN 0 needs"):
        DiskArray.open(config(tmp_path, 1, lun_size_bytes=2 * LUN_BYTES), PAIR)


def test_missing_disk_named(tmp_path):
    with pytest.raises(HalError, match="disk0.img: no such disk"):
        DiskArray.open(config(tmp_path, 1), PAIR)


def test_reservation_area():
    assert DiskArray.reservation_area(0) == (4096, (1 << 20) - 4096)


def fake_sysfs(tmp_path, disks: dict):
    """A /sys/block and /dev tree: {sdX: (vpd_pg80 bytes or None, serial text or None)}."""
    sys_root, dev_root = tmp_path / "sys", tmp_path / "dev"
    dev_root.mkdir()
    for name, (vpd, serial) in disks.items():
        device = sys_root / "block" / name / "device"
        device.mkdir(parents=True)
        if vpd is not None:
            (device / "vpd_pg80").write_bytes(vpd)
        if serial is not None:
            (device / "serial").write_text(serial + "\n")
    return str(sys_root), str(dev_root)


def vpd80(serial: bytes) -> bytes:
    return bytes([0, 0x80]) + len(serial).to_bytes(2, "big") + serial


def test_serial_backend_finds_disks_by_serial_not_name(tmp_path):
    sys_root, dev_root = fake_sysfs(tmp_path, {
        "sda": (vpd80(b"BOOTDISK"), None), "sdb": (vpd80(b"TC-LUN1 "), None),
        "sdc": (None, "TC-LUN0"), "vda": (vpd80(b"TC-LUN0"), None)})
    assert find_disk_by_serial("TC-LUN1", sys_root, dev_root) == f"{dev_root}/sdb"
    for name in ("sdb", "sdc"):
        FileDisk(f"{dev_root}/{name}", (1 << 20) + LUN_BYTES, create=True).close()
    cfg = DiskConfig(backend="serial", serials=["TC-LUN0", "TC-LUN1"], lun_size_bytes=LUN_BYTES)
    array = DiskArray.open(cfg, PAIR, create=True, sys_root=sys_root, dev_root=dev_root)
    assert [(d.lun, d.name) for d in array] == [(0, f"{dev_root}/sdc"), (1, f"{dev_root}/sdb")]
    assert array[1].label.serial.rstrip(b"\0") == b"TC-LUN1"
    array.close()
    with pytest.raises(HalError, match="no disk /dev/sd\\* with serial 'TC-LUN9'"):
        find_disk_by_serial("TC-LUN9", sys_root, dev_root)
