"""The libvirt VM pair, phase 1: what the guests give the firmware.

Two QEMU guests boot through libvirt and run the guest probe (vm/probe.py):
they map the nvdimm as /dev/dax0.0, find the shared disks by serial, pass
frames both ways over the virtio-serial link, and A writes a shared-disk
block with O_DIRECT that B reads back. Then A loses power (libvirt destroy)
and restarts: its NVRAM is back, in the guest and in the host's backing file,
and B's end of the link reconnects by itself.

Three guest boots in all (A and B together, then A again); the tests share
them and run in file order.
"""
import hashlib
import json
import secrets
import socket
import time

import pytest

from fixtures.vm import vm_pair  # noqa: F401  (until fixtures/plugin.py registers it)
from vm.probe import BLOCK_BYTES, nvram_pattern

pytestmark = [pytest.mark.vm, pytest.mark.slow]

PROBE_TIMEOUT_S = 150.0
DEVDAX_DATA_OFFSET_BYTES = 2 << 20      # devdax info block, then data from 2 MiB in the nvdimm file
TOKEN = secrets.token_hex(8)


def probe_command(*args: str) -> str:
    return "exec .venv/bin/python -m vm.probe " + " ".join(args)


def probe_reports(console: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for line in console.splitlines():
        if line.startswith("TWINCACHE-PROBE {"):
            report = json.loads(line.partition(" ")[2])
            out.setdefault(report["kind"], []).append(report)
    return out


def wait_probe(vm_pair, name: str) -> dict[str, list[dict]]:
    vm_pair.wait_for(name, r"TWINCACHE-PROBE-DONE", PROBE_TIMEOUT_S)
    reports = probe_reports(vm_pair.console(name))
    assert "error" not in reports, f"guest {name}: {reports['error']}\n{vm_pair.console(name)}"
    return reports


@pytest.fixture(scope="module")
def booted(vm_pair):
    """A and B booted together, each having run its probe; wall times recorded."""
    serial = vm_pair.disk_serial(0)
    t0 = time.monotonic()
    vm_pair.start("a", probe_command("--name a", f"--token {TOKEN}", "--nvram write",
                                     f"--disk-serial {serial}", "--link a", "--serve"))
    vm_pair.start("b", probe_command("--name b", f"--token {TOKEN}", f"--disk-serial {serial}",
                                     "--link b", "--echo", "--serve"))
    vm_pair.wait_ready("a")
    vm_pair.wait_ready("b")
    ready_s = time.monotonic() - t0
    reports = {name: wait_probe(vm_pair, name) for name in "ab"}
    times = {"pair_ready_s": round(ready_s, 1), "pair_probed_s": round(time.monotonic() - t0, 1)}
    print(f"\nvm pair wall times: {times}")
    return reports, times


def test_guests_find_the_shared_disks_by_serial(vm_pair, booted):
    reports, _ = booted
    serials = {vm_pair.disk_serial(i) for i in range(vm_pair.config.disk_count)}
    for name in "ab":
        found = reports[name]["disks"][0]["by_serial"]
        assert set(found) == serials, (name, found)
        assert all(dev.startswith("/dev/sd") for dev in found.values())


def test_guest_a_stores_into_devdax_nvram(vm_pair, booted):
    reports, _ = booted
    nvram = reports["a"]["nvram"][0]
    assert nvram["mode"] == "write" and nvram["matches"], nvram
    assert nvram["size_bytes"] >= 32 << 20
    with open(vm_pair.nvram_path("a"), "rb") as f:
        f.seek(DEVDAX_DATA_OFFSET_BYTES)
        assert f.read(BLOCK_BYTES) == nvram_pattern(TOKEN), "the store is not in the host backing file"


def test_link_frames_go_both_ways(booted):
    reports, _ = booted
    hello_ack = reports["a"]["link"][0]
    assert hello_ack["step"] == "hello-ack" and hello_ack["frame"]["src"] == "b"
    assert reports["b"]["shared-disk"][0]["peer"]["op"] == "wrote"


def test_a_writes_a_shared_disk_block_b_reads_it(vm_pair, booted):
    reports, _ = booted
    a, b = reports["a"]["shared-disk"][0], reports["b"]["shared-disk"][0]
    assert a["wrote_sha256"] == b["read_sha256"] == a["peer"]["sha256"]
    with open(vm_pair.disks()[0].path, "rb") as f:
        f.seek(b["peer"]["offset"])
        assert hashlib.sha256(f.read(BLOCK_BYTES)).hexdigest() == a["wrote_sha256"]


def test_host_port_forward_reaches_each_guest(vm_pair, booted):
    for name in "ab":
        vm_pair.wait_for(name, r'"kind": "serve"', 30)
        with socket.create_connection(vm_pair.nbd_address(name), timeout=10) as conn:
            conn.settimeout(10)
            line = conn.makefile("rb").readline()
        assert line == f"twincache-probe {name} {TOKEN}\n".encode()


def test_power_cut_a_nvram_survives_and_link_reconnects(vm_pair, booted):
    path = vm_pair.nvram_path("a")
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    t0 = time.monotonic()
    vm_pair.power_cut("a")
    cut_s = time.monotonic() - t0
    assert not vm_pair.is_running("a") and vm_pair.is_running("b")
    stopped = [e for e in vm_pair.events.events(vm_pair.domain_name("a")) if e.event == "stopped"]
    assert stopped[-1].detail == "destroyed"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before, "the power cut changed the NVRAM file"
    t1 = time.monotonic()
    vm_pair.restart("a", probe_command("--name a", f"--token {TOKEN}", "--nvram check", "--link ping"))
    reports = wait_probe(vm_pair, "a")
    print(f"\nvm power cut: destroy {cut_s:.1f} s, restart to probe done {time.monotonic() - t1:.1f} s")
    nvram = reports["nvram"][0]
    assert nvram["mode"] == "check" and nvram["matches"], nvram
    assert "creating devdax" not in vm_pair.console("a"), "the namespace was recreated on restart"
    assert reports["link"][0]["frame"]["src"] == "b", "B's end of the link did not reconnect"
