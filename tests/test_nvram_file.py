"""NVRAM on a file: stores survive kill -9 of the writer; host durability msyncs; DAX fallbacks."""
import mmap
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import pytest

from hal.backends.interfaces import HalError
from hal.backends.nvram_dax import DaxNvram
from hal.backends.nvram_file import FileNvram

REPO = pathlib.Path(__file__).resolve().parent.parent
SIZE = 1 << 20


def pattern(offset: int, length: int) -> bytes:
    return bytes((offset + i * 7) & 0xFF for i in range(length))


WRITER = textwrap.dedent("""
    import sys, time
    from hal.backends.nvram_file import FileNvram
    nvram = FileNvram(sys.argv[1], int(sys.argv[2]), durability=sys.argv[3])
    buf = nvram.buffer
    for offset, length in ((0, 4096), (123457, 1000), (%d - 512, 512)):
        buf[offset:offset + length] = bytes((offset + i * 7) & 0xFF for i in range(length))
        nvram.persist(offset, length)
    print("persisted", flush=True)
    time.sleep(60)
""" % SIZE)


@pytest.mark.parametrize("durability", ["controller", "host"])
def test_stores_survive_kill_9(tmp_path, durability):
    path = tmp_path / "nvram.img"
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(SIZE), durability],
                             cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "persisted"
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
        child.stdout.close()
    with FileNvram(path, SIZE, create=False) as nvram:
        buf = nvram.buffer
        for offset, length in ((0, 4096), (123457, 1000), (SIZE - 512, 512)):
            assert bytes(buf[offset:offset + length]) == pattern(offset, length)
        assert bytes(buf[4096:8192]) == bytes(4096)


def test_buffer_is_the_file(tmp_path):
    path = tmp_path / "nvram.img"
    with FileNvram(path, SIZE) as nvram:
        assert nvram.size_bytes == len(nvram.buffer) == SIZE and not nvram.buffer.readonly
        nvram.buffer[100:104] = b"TCNV"
        with open(path, "rb") as f:            # MAP_SHARED: other openers see the store at once
            assert f.read(104)[100:] == b"TCNV"
    assert os.path.getsize(path) == SIZE
    assert os.stat(path).st_blocks * 512 >= SIZE    # allocated up front: no SIGBUS on a full disk later


@pytest.mark.parametrize("offset, length", [(0, 1), (4095, 2), (5000, 10000), (SIZE - 1, 1), (0, SIZE), (77, 0)])
def test_host_durability_msyncs_unaligned_ranges(tmp_path, offset, length):
    with FileNvram(tmp_path / "nvram.img", SIZE, durability="host") as nvram:
        nvram.buffer[offset:offset + length] = b"\x5a" * length
        nvram.persist(offset, length)           # msync wants a page-aligned start: must not raise
        assert nvram.durability == "host"


@pytest.mark.parametrize("durability", ["controller", "host"])
@pytest.mark.parametrize("offset, length", [(-1, 1), (SIZE, 1), (SIZE - 10, 11), (0, -5)])
def test_persist_outside_nvram_refused(tmp_path, durability, offset, length):
    with FileNvram(tmp_path / "nvram.img", SIZE, durability=durability) as nvram:
        with pytest.raises(HalError, match="outside NVRAM"):
            nvram.persist(offset, length)


def test_open_errors_are_clear(tmp_path):
    with pytest.raises(HalError, match="missing.img: NVRAM file does not exist"):
        FileNvram(tmp_path / "missing.img", SIZE, create=False)
    (tmp_path / "small.img").write_bytes(bytes(4096))
    with pytest.raises(HalError, match="small.img: NVRAM file is 4096 bytes, need 1048576"):
        FileNvram(tmp_path / "small.img", SIZE, create=False)
    with pytest.raises(HalError, match="durability 'battery'"):
        FileNvram(tmp_path / "x.img", SIZE, durability="battery")
    with pytest.raises(HalError, match="multiple of"):
        FileNvram(tmp_path / "x.img", 1000)
    with pytest.raises(HalError, match="not a regular file; use the dax backend"):
        FileNvram("/dev/zero", SIZE)
    with pytest.raises(HalError, match="Is a directory"):
        FileNvram(tmp_path, SIZE)


def test_existing_file_is_kept_and_grown(tmp_path):
    path = tmp_path / "nvram.img"
    path.write_bytes(b"keep" + bytes(4092))
    with FileNvram(path, SIZE) as nvram:
        assert bytes(nvram.buffer[:4]) == b"keep"
    assert os.path.getsize(path) == SIZE


def test_close_with_views_in_use_is_refused(tmp_path):
    nvram = FileNvram(tmp_path / "nvram.img", SIZE)
    held = nvram.buffer[0:16]
    with pytest.raises(HalError, match="still in use"):
        nvram.close()
    held.release()
    with pytest.raises(HalError, match="closed"):
        nvram.buffer


# ---- DAX backend: what this machine can exercise ---------------------------------

def test_dax_regular_file_falls_back_to_msync(tmp_path):
    path = tmp_path / "pmem.img"
    path.write_bytes(bytes(SIZE))
    nvram = DaxNvram(path)
    try:
        assert nvram.size_bytes == SIZE
        # tmp_path is not on a DAX filesystem: the kernel refuses MAP_SYNC and persist msyncs.
        assert nvram.durability == "host" and "MAP_SYNC refused" in nvram.detail
        nvram.buffer[4095:4097] = b"ok"
        nvram.persist(4095, 2)
        with pytest.raises(HalError, match="outside NVRAM"):
            nvram.persist(SIZE, 1)
    finally:
        nvram.close()
    assert path.read_bytes()[4095:4097] == b"ok"


def test_dax_smaller_size_maps_a_prefix(tmp_path):
    path = tmp_path / "pmem.img"
    path.write_bytes(bytes(SIZE))
    nvram = DaxNvram(path, SIZE // 2)
    assert len(nvram.buffer) == SIZE // 2
    nvram.close()


def test_dax_errors(tmp_path):
    with pytest.raises(HalError, match="pmem9: no such NVRAM device"):
        DaxNvram(tmp_path / "pmem9")
    (tmp_path / "small.img").write_bytes(bytes(4096))
    with pytest.raises(HalError, match="small.img: NVRAM device is 4096 bytes, need 1048576"):
        DaxNvram(tmp_path / "small.img", SIZE)
    with pytest.raises(HalError, match="not a device-dax device"):
        DaxNvram("/dev/null")


def test_dax_fake_devdax_sysfs_sizes(tmp_path):
    """A char device whose sysfs entry says dax, but too small: refused before mapping."""
    dev = os.stat("/dev/zero").st_rdev
    node = tmp_path / "sys" / "dev" / "char" / f"{os.major(dev)}:{os.minor(dev)}"
    (tmp_path / "sys" / "bus" / "dax").mkdir(parents=True)
    node.mkdir(parents=True)
    (node / "subsystem").symlink_to(tmp_path / "sys" / "bus" / "dax")
    (node / "size").write_text(str(2 << 20))
    with pytest.raises(HalError, match="NVRAM device is 2097152 bytes, need 4194304"):
        DaxNvram("/dev/zero", 4 << 20, sys_root=str(tmp_path / "sys"))
    # 3 MiB rounds up to two 2 MiB units: past the 2 MiB device.
    (node / "size").write_text(str(3 << 20))
    with pytest.raises(HalError, match="round up"):
        DaxNvram("/dev/zero", 3 << 20, sys_root=str(tmp_path / "sys"))
    assert mmap.PAGESIZE == 4096
