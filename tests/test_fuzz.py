"""The fuzzers (fuzz/): every seed runs clean, each target runs briefly under atheris, the checks bite.

The long runs are `inv fuzz --target all --minutes M`; CI runs each target for a
few seconds (about 40 s in all) so a harness that broke, or a crash on a seed,
shows up here. Crashes the fuzzers found are in test_fuzz_regressions.py.
"""
import os

import pytest

from fuzz import TARGETS
from fuzz import nbd as fuzz_nbd
from fuzz import nvram as fuzz_nvram
from fuzz.tasks import run_target
from hal.sim.static import StaticController  # recovery, then the write path at once
from fixtures.mempair import KEY
from hal.host.nbd import NbdRequest

SEEDS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fuzz", "seeds")
CI_SECONDS = {"formats": 5, "nbd": 5, "link": 10, "nvram": 6}


def seeds(target):
    directory = os.path.join(SEEDS, target)
    return [os.path.join(directory, name) for name in sorted(os.listdir(directory))]


@pytest.mark.parametrize("target", TARGETS)
def test_every_seed_runs_without_a_crash(target):
    one_input = __import__(f"fuzz.{target}", fromlist=["one_input"]).one_input
    paths = seeds(target)
    assert len(paths) >= 5, "each target starts from golden inputs"
    for path in paths:
        with open(path, "rb") as f:
            one_input(f.read())


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_each_target_fuzzes_briefly_without_a_crash(target, tmp_path):
    pytest.importorskip("atheris", reason="the fuzz extra (atheris) is not installed")
    status, inputs, _seconds, lines = run_target(target, seconds=CI_SECONDS[target], corpus=str(tmp_path),
                                                 artifacts=str(tmp_path / "crashes") + os.sep, quiet=True,
                                                 extra=["--seed", "1"])
    assert status == 0, "\n".join(lines[-40:])
    assert inputs >= 100, f"only {inputs} inputs ran"
    assert any(line.startswith(f"fuzz {target}: done:") for line in lines)


def test_nvram_check_catches_a_recovered_line_whose_data_is_corrupt():
    image, params, _sb = fuzz_nvram.golden()
    img = bytearray(image)
    ctrl = StaticController(params, img, KEY, 0)
    fuzz_nvram.check_recovered(ctrl, img)
    line = next(iter(ctrl.cache.lines.values()))
    img[ctrl.primary.data_offset(line.block)] ^= 0xFF
    with pytest.raises(AssertionError, match="fails its data CRC32C"):
        fuzz_nvram.check_recovered(ctrl, img)


def test_nbd_check_catches_a_request_the_engine_should_have_refused():
    conn = fuzz_nbd.NbdConnection(fuzz_nbd.EXPORTS)
    conn._enter_state(fuzz_nbd.EXPORTS[0])
    conn.inflight = 1
    beyond = NbdRequest(1, 0, 0, conn.export, conn.export.size_bytes, 512, None)
    with pytest.raises(AssertionError, match="out of range"):
        fuzz_nbd._check_request(conn, beyond)
