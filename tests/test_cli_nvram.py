"""`twincache nvram dump` on real NVRAM files: human and JSON output, torn records with offsets."""
import json
import pathlib
import subprocess
import sys

import pytest

from firmware.formats import nvram as nv
from hal.cli.main import main
from hal.backends.nvram_file import FileNvram

REPO = pathlib.Path(__file__).resolve().parent.parent
SIZE = 8 << 20
PAIR = bytes.fromhex("0123456789abcdef0123456789abcdef")


def write_block(buf, geometry, mirror, index, state, lun, lba, seq, group_index, group_count, fill):
    """The crash-consistent order of nvram.py: data first, then the descriptor."""
    offset = geometry.data_offset(mirror, index)
    buf[offset:offset + geometry.block_size_bytes] = fill * geometry.block_size_bytes
    crc = nv.crc32c(buf[offset:offset + geometry.block_size_bytes])
    nv.pack_descriptor_into(buf, geometry.desc_offset(mirror, index), state, lun, group_index, group_count,
                            lba, seq, 3, index, crc, b"\x0f" + bytes(15))


@pytest.fixture
def image(tmp_path):
    """An NVRAM file: 2 superblock copies, every descriptor FREE, a few blocks in use."""
    path = tmp_path / "nvram.img"
    fields = nv.plan_layout(SIZE, 4096, 0, PAIR, log_partitions=1, log_partition_bytes=65536, bitmap_bytes=4096)
    with FileNvram(path, SIZE) as nvram:
        buf = nvram.buffer
        buf[0:256] = nv.build_superblock(fields)
        buf[4096:4096 + 256] = nv.build_superblock(dict(fields, sb_seq=2, generation=3))
        geometry = nv.Geometry(nv.parse_superblock_untrusted(buf[0:256]))
        for mirror in (False, True):
            for index in range(geometry.primary_blocks):
                start = geometry.desc_offset(mirror, index)
                buf[start:start + nv.DESC_SIZE_BYTES] = nv.FREE_DESCRIPTOR
        write_block(buf, geometry, False, 2, nv.BlockState.DIRTY, 0, 64, 10, 0, 2, b"a")
        write_block(buf, geometry, False, 3, nv.BlockState.DIRTY, 0, 72, 10, 1, 2, b"b")
        write_block(buf, geometry, False, 9, nv.BlockState.FLUSHING, 1, 8, 11, 0, 1, b"c")
        write_block(buf, geometry, True, 5, nv.BlockState.DIRTY, 1, 800, 4, 0, 1, b"m")
        del buf
    return path, geometry


def dump(capsys, *args):
    status = main(["nvram", "dump", *map(str, args)])
    out = capsys.readouterr()
    return status, out.out, out.err


def test_dump_json(image, capsys):
    path, geometry = image
    status, out, _ = dump(capsys, path, "--json")
    report = json.loads(out)
    assert status == 0 and set(report) >= {"superblock", "primary", "mirror"}
    sb = report["superblock"]
    assert (sb["slot"], sb["sb_seq"], sb["generation"], sb["pair_id"]) == (1, 2, 3, PAIR.hex())
    assert sb["errors"] == []
    primary = report["primary"]
    assert primary["counts"] == {"FREE": geometry.primary_blocks - 3, "DIRTY": 2, "FLUSHING": 1,
                                 "TORN": 0, "UNWRITTEN": 0}
    assert [(b["index"], b["state"], b["lun"], b["lba"], b["seq"], b["group_index"], b["group_count"])
            for b in primary["blocks"]] == [(2, "DIRTY", 0, 64, 10, 0, 2), (3, "DIRTY", 0, 72, 10, 1, 2),
                                           (9, "FLUSHING", 1, 8, 11, 0, 1)]
    assert all(b["data_crc_ok"] and b["dirty_sectors"] == 4 for b in primary["blocks"])
    assert primary["errors"] == []
    assert [b["index"] for b in report["mirror"]["blocks"]] == [5]


def test_dump_human(image, capsys):
    path, _ = image
    status, out, _ = dump(capsys, path)
    assert status == 0
    assert "generation 3" in out and "superblock copy 1 at offset 4096" in out
    assert "block 2: DIRTY lun 0 lba 64 seq 10 group 1/2 dirty 4 sectors, data crc ok" in out
    assert "block 9: FLUSHING lun 1 lba 8" in out
    assert "mirror: " in out and "ERROR" not in out


def test_corrupt_descriptor_and_torn_data_reported_with_offsets(image, capsys):
    path, geometry = image
    desc_offset = geometry.desc_offset(False, 3)
    data_offset = geometry.data_offset(True, 5)
    with open(path, "r+b") as f:
        f.seek(desc_offset + 20)
        f.write(b"\xee")                    # a torn descriptor
        f.seek(data_offset + 100)
        f.write(b"torn")                    # data that no longer matches its descriptor
    status, out, _ = dump(capsys, path, "--json")
    report = json.loads(out)
    assert status == 0
    primary, mirror = report["primary"], report["mirror"]
    assert [b["index"] for b in primary["blocks"]] == [2, 9]          # the torn record is not shown as data
    assert primary["counts"]["TORN"] == 1
    assert primary["errors"] == [{"index": 3, "offset": desc_offset, "error":
                                  f"descriptor 3: {path} offset {desc_offset}: descriptor CRC32C mismatch "
                                  f"(torn or corrupt record)"}]
    assert mirror["blocks"][0]["data_crc_ok"] is False
    assert mirror["errors"][0]["offset"] == data_offset and "data CRC32C mismatch" in mirror["errors"][0]["error"]
    _, human, _ = dump(capsys, path)
    assert f"ERROR at offset {desc_offset}: descriptor 3" in human
    assert "data crc MISMATCH" in human


def test_torn_newer_superblock_falls_back_and_is_reported(image, capsys):
    path, _ = image
    with open(path, "r+b") as f:
        f.seek(4096 + 30)
        f.write(b"\x99")
    status, out, _ = dump(capsys, path, "--json")
    sb = json.loads(out)["superblock"]
    assert status == 0 and (sb["slot"], sb["sb_seq"]) == (0, 1)
    assert sb["errors"][0]["offset"] == 4096 and "offset 4096" in sb["errors"][0]["error"]


def test_both_superblocks_torn_fails_naming_file_and_offsets(image, capsys):
    path, _ = image
    with open(path, "r+b") as f:
        for offset in (30, 4096 + 30):
            f.seek(offset)
            f.write(b"\x99")
    status, out, err = dump(capsys, path)
    assert status == 1 and out == ""
    assert f"corrupt NVRAM superblock: {path}: no valid superblock: {path} offset 0:" in err
    assert f"{path} offset 4096:" in err


def test_command_line_exit_codes(image, tmp_path):
    path, _ = image
    # The console script's entry point, called as the console script calls it.
    run = [sys.executable, "-c", "import sys; from hal.cli.main import main; sys.exit(main())", "nvram", "dump"]
    ok = subprocess.run(run + [str(path), "--json"], cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0 and json.loads(ok.stdout)["primary"]["counts"]["DIRTY"] == 2
    missing = subprocess.run(run + [str(tmp_path / "nope.img")], cwd=REPO, capture_output=True, text=True)
    assert missing.returncode == 2 and "nope.img: no such file" in missing.stderr
    (tmp_path / "junk.img").write_bytes(b"\x42" * 8192)
    junk = subprocess.run(run + [str(tmp_path / "junk.img")], cwd=REPO, capture_output=True, text=True)
    assert junk.returncode == 1 and "junk.img offset 0" in junk.stderr and "Traceback" not in junk.stderr


def test_truncated_image_refused(image, capsys):
    path, _ = image
    with open(path, "r+b") as f:
        f.truncate(SIZE // 2)
    status, _, err = dump(capsys, path)
    assert status == 1 and f"file is {SIZE // 2} bytes" in err
