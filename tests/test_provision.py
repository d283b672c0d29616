"""`twincache provision --config FILE.toml`: the pair key and disk labels of one controller.

Real image files and the real command (a process, as a user runs it): a
first run creates the key and labels the disks and the controller's own disk
array opens them; a second run changes nothing and says so; a disk with
another pair's label, or with data and no label, is refused (and then
nothing at all is written) unless --force. A board's first flash over the
pty cable, to the real agent and controller, is healthy after it, and fails
its health check without it.
"""
import hashlib
import os
import pathlib
import subprocess

import pytest

from firmware.formats.disklabel import DATA_OFFSET_BYTES, build_disklabel
from fixtures.board import TWINCACHE, _controller_toml, board, serial_cable  # noqa: F401
from hal.runtime import config as C
from hal.backends.disk_array import DiskArray
from hal.backends.keyfile import load_pair_key

OTHER_PAIR = bytes.fromhex("ffeeddccbbaa99887766554433221100")
LUN_SIZE = 16 << 20


def write_config(root: pathlib.Path, disks: int = 2) -> pathlib.Path:
    """A controller config with `disks` image files under root/ctl (none of them created)."""
    d = root / "ctl"
    text = _controller_toml(d, broken=False)
    paths = ", ".join(f'"{d / "disks" / f"disk{i}.img"}"' for i in range(disks))
    text = text.replace(f'paths = ["{d / "disks" / "disk0.img"}"]', f"paths = [{paths}]")
    path = root / "controller.toml"
    path.write_text(text)
    return path


def provision(config: pathlib.Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([TWINCACHE, "provision", "--config", str(config), *extra],
                          capture_output=True, text=True, timeout=60)


def digest(cfg) -> dict:
    files = [cfg.key_file, *cfg.disks.paths]
    return {p: hashlib.sha256(pathlib.Path(p).read_bytes()).hexdigest() for p in files if os.path.exists(p)}


def test_first_run_creates_the_key_and_labels_the_disks_the_second_changes_nothing(tmp_path):
    config = write_config(tmp_path)
    cfg = C.load(config)
    r = provision(config)
    assert r.returncode == 0, r.stderr
    assert "provisioned controller a: 3 change(s)" in r.stdout, r.stdout
    assert os.stat(cfg.key_file).st_mode & 0o777 == 0o600 and len(load_pair_key(cfg.key_file)) == 32
    array = DiskArray.open(cfg.disks, cfg.pair_id)          # what `controller run` opens
    assert [d.lun for d in array] == [0, 1] and array[0].size_bytes == LUN_SIZE
    array.close()
    before = digest(cfg)
    r = provision(config)
    assert r.returncode == 0, r.stderr
    assert "nothing to do: controller a is already provisioned" in r.stdout, r.stdout
    assert r.stdout.count("unchanged") == 3
    assert digest(cfg) == before


def test_a_disk_of_another_pair_is_refused_and_nothing_is_written_then_force_relabels_it(tmp_path):
    config = write_config(tmp_path)
    cfg = C.load(config)
    foreign = pathlib.Path(cfg.disks.paths[1])
    foreign.parent.mkdir(parents=True)
    with open(foreign, "wb") as f:
        f.truncate(DATA_OFFSET_BYTES + LUN_SIZE)
        f.write(build_disklabel(1, OTHER_PAIR, LUN_SIZE))
        f.seek(DATA_OFFSET_BYTES)
        f.write(b"their data" * 100)
    before = digest(cfg)
    r = provision(config)
    assert r.returncode == 1
    assert f"labelled for another pair ({OTHER_PAIR.hex()}); refusing to relabel it without --force" in r.stdout
    assert "refused disk1; nothing was written" in r.stderr, r.stderr
    assert digest(cfg) == before and not os.path.exists(cfg.key_file)
    assert not os.path.exists(cfg.disks.paths[0]), "disk0 was created although disk1 was refused"
    r = provision(config, "--force")
    assert r.returncode == 0 and "RELABELLED" in r.stdout, r.stdout + r.stderr
    array = DiskArray.open(cfg.disks, cfg.pair_id)
    data = array[1].read(0, 1024)
    array.close()
    assert data[:1000] == b"their data" * 100       # --force rewrites the metadata MiB, not the LUN data


def test_a_disk_with_data_but_no_label_is_refused_and_a_blank_one_is_labelled(tmp_path):
    config = write_config(tmp_path)
    cfg = C.load(config)
    full = pathlib.Path(cfg.disks.paths[0])
    full.parent.mkdir(parents=True)
    with open(full, "wb") as f:
        f.truncate(DATA_OFFSET_BYTES + LUN_SIZE)
        f.seek(DATA_OFFSET_BYTES + (8 << 20))       # a filesystem's block deep inside, byte 0 still zero
        f.write(b"\x53\xef" * 256)
    with open(cfg.disks.paths[1], "wb") as f:
        f.truncate(DATA_OFFSET_BYTES + LUN_SIZE)     # blank, sparse
    r = provision(config)
    assert r.returncode == 1 and "no twincache label, but it holds non-zero data" in r.stdout, r.stdout
    assert "disk1  labelled" in r.stdout and not os.path.exists(cfg.key_file)
    with open(cfg.disks.paths[1], "rb") as f:
        assert not any(f.read(4096)), "the blank disk was labelled although another was refused"
    full.write_bytes(bytes(DATA_OFFSET_BYTES + LUN_SIZE))      # now all zero, and not sparse
    r = provision(config)
    assert r.returncode == 0 and "provisioned controller a: 3 change(s)" in r.stdout, r.stdout + r.stderr


def test_a_disk_of_this_pair_labelled_as_another_lun_is_refused(tmp_path):
    config = write_config(tmp_path)
    cfg = C.load(config)
    swapped = pathlib.Path(cfg.disks.paths[0])
    swapped.parent.mkdir(parents=True)
    with open(swapped, "wb") as f:
        f.truncate(DATA_OFFSET_BYTES + LUN_SIZE)
        f.write(build_disklabel(1, cfg.pair_id, LUN_SIZE))
    r = provision(config)
    assert r.returncode == 1 and "labelled for this pair as LUN 1, not 0" in r.stdout, r.stdout


def test_a_bad_config_is_one_line_and_exit_status_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[controller]\nname = "c"\n')
    r = provision(bad)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.slow
def test_a_new_boards_first_flash_is_healthy_after_provision_and_not_before(board):
    from fixtures.board import controller_available
    if not controller_available():
        pytest.skip("needs twincache controller run")
    text = _controller_toml(board.root / "ctl", broken=False)     # a new board: no key, no disks
    board.start_agent()
    r = board.flash(board.make_bundle("b1.tcb", text, "build-1"))
    assert r.returncode == 1 and "slot a failed its health check" in r.stderr, r.stderr
    assert "disk0.img: no such disk" in r.stderr, r.stderr
    config = board.root / "board-controller.toml"
    config.write_text(text)
    p = provision(config)
    assert p.returncode == 0 and "provisioned controller a" in p.stdout, p.stdout + p.stderr
    r = board.flash(board.make_bundle("b2.tcb", text, "build-2"))
    assert r.returncode == 0 and "healthy" in r.stdout, r.stderr
