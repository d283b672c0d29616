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
import base64
import hashlib
import json
import secrets
import socket
import time
import xml.etree.ElementTree as ET

import pytest

from fixtures.vm import vm_pair  # noqa: F401  (until fixtures/plugin.py registers it)
from vm import assets, libvirtd
from vm.domain import QEMU_NS, Disk, DomainSpec, domain_xml
from vm.probe import BLOCK_BYTES, nvram_pattern


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


@pytest.mark.vm
@pytest.mark.slow
def test_guests_find_the_shared_disks_by_serial(vm_pair, booted):
    reports, _ = booted
    serials = {vm_pair.disk_serial(i) for i in range(vm_pair.config.disk_count)}
    for name in "ab":
        found = reports[name]["disks"][0]["by_serial"]
        assert set(found) == serials, (name, found)
        assert all(dev.startswith("/dev/sd") for dev in found.values())


@pytest.mark.vm
@pytest.mark.slow
def test_guests_write_their_state_dir_share(vm_pair, booted):
    for name in "ab":
        assert (vm_pair.state_dir(name) / f"probe-{name}").read_text() == TOKEN + "\n"


@pytest.mark.vm
@pytest.mark.slow
def test_guest_a_stores_into_devdax_nvram(vm_pair, booted):
    reports, _ = booted
    nvram = reports["a"]["nvram"][0]
    assert nvram["mode"] == "write" and nvram["matches"], nvram
    assert nvram["size_bytes"] >= 32 << 20
    with open(vm_pair.nvram_path("a"), "rb") as f:
        f.seek(DEVDAX_DATA_OFFSET_BYTES)
        assert f.read(BLOCK_BYTES) == nvram_pattern(TOKEN), "the store is not in the host backing file"


@pytest.mark.vm
@pytest.mark.slow
def test_link_frames_go_both_ways(booted):
    reports, _ = booted
    hello_ack = reports["a"]["link"][0]
    assert hello_ack["step"] == "hello-ack" and hello_ack["frame"]["src"] == "b"
    assert reports["b"]["shared-disk"][0]["peer"]["op"] == "wrote"


@pytest.mark.vm
@pytest.mark.slow
def test_a_writes_a_shared_disk_block_b_reads_it(vm_pair, booted):
    reports, _ = booted
    a, b = reports["a"]["shared-disk"][0], reports["b"]["shared-disk"][0]
    assert a["wrote_sha256"] == b["read_sha256"] == a["peer"]["sha256"]
    with open(vm_pair.disks()[0].path, "rb") as f:
        f.seek(b["peer"]["offset"])
        assert hashlib.sha256(f.read(BLOCK_BYTES)).hexdigest() == a["wrote_sha256"]


@pytest.mark.vm
@pytest.mark.slow
def test_host_port_forward_reaches_each_guest(vm_pair, booted):
    for name in "ab":
        vm_pair.wait_for(name, r'"kind": "serve"', 30)
        with socket.create_connection(vm_pair.nbd_address(name), timeout=10) as conn:
            conn.settimeout(10)
            line = conn.makefile("rb").readline()
        assert line == f"twincache-probe {name} {TOKEN}\n".encode()


@pytest.mark.vm
@pytest.mark.slow
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


# --- no VM needed: the domain XML, the initramfs archive, the libvirtd config ---------------

def spec(name="a", **overrides) -> DomainSpec:
    values = dict(name=f"twincache-{name}", controller=name, kernel="/k/vmlinuz", initrd="/k/initrd",
                  nvram_path=f"/r/{name}/nvram.img", nvram_size_mib=64,
                  disks=[Disk("/r/disks/disk0.img", "s0"), Disk("/r/disks/disk1.img", "s1")],
                  link_socket="/r/link.sock", link_listen=(name == "a"), console_log=f"/r/{name}/console.log",
                  nbd_host_port=11809, command="echo 'hi there' | cat")
    values.update(overrides)
    return DomainSpec(**values)


def test_domain_xml_boots_the_kernel_on_tcg_with_the_command_encoded():
    root = ET.fromstring(domain_xml(spec()))
    assert root.get("type") == "qemu" and root.findtext("vcpu") == "1"
    assert root.find("os/type").get("machine") == "pc" and root.findtext("os/kernel") == "/k/vmlinuz"
    assert root.find("features/acpi") is not None and root.find("cpu").get("mode") == "maximum"
    args = dict(a.partition("=")[::2] for a in root.findtext("os/cmdline").split())
    assert args["console"] == "ttyS0" and args["tc.name"] == "a"
    assert base64.urlsafe_b64decode(args["tc.cmd"]).decode() == "echo 'hi there' | cat"


def test_domain_xml_nvdimm_is_the_controllers_nvram_file():
    root = ET.fromstring(domain_xml(spec("b")))
    nvdimm = root.find("devices/memory[@model='nvdimm']")
    assert nvdimm.get("access") == "shared"
    assert nvdimm.findtext("source/path") == "/r/b/nvram.img"
    assert nvdimm.find("target/size").text == "64" and nvdimm.find("target/size").get("unit") == "MiB"
    assert root.find("maxMemory").get("slots") == "2"
    assert root.find("cpu/numa/cell").get("memory") == "512"


def test_domain_xml_disks_are_shareable_scsi_with_serials_and_no_host_cache():
    root = ET.fromstring(domain_xml(spec()))
    assert root.find("devices/controller[@type='scsi']").get("model") == "virtio-scsi"
    disks = root.findall("devices/disk")
    assert [d.findtext("serial") for d in disks] == ["s0", "s1"]
    for unit, disk in enumerate(disks):
        assert disk.find("shareable") is not None and disk.find("target").get("bus") == "scsi"
        assert disk.find("driver").get("cache") == "none" and disk.find("driver").get("type") == "raw"
        assert disk.find("address").get("unit") == str(unit)


def test_domain_xml_link_binds_on_a_and_reconnects_on_b():
    a = ET.fromstring(domain_xml(spec("a"))).find("devices/channel")
    b = ET.fromstring(domain_xml(spec("b"))).find("devices/channel")
    for channel in (a, b):
        assert channel.get("type") == "unix" and channel.find("source").get("path") == "/r/link.sock"
        assert channel.find("target").get("type") == "virtio" and channel.find("target").get("name") == "ctl.link"
    assert a.find("source").get("mode") == "bind" and a.find("source/reconnect") is None
    assert b.find("source").get("mode") == "connect" and b.find("source/reconnect").get("enabled") == "yes"


def test_domain_xml_root_share_console_and_loopback_only_port_forward():
    root = ET.fromstring(domain_xml(spec()))
    fs = root.find("devices/filesystem")
    assert fs.find("source").get("dir") == "/" and fs.find("target").get("dir") == "hostroot"
    assert fs.find("readonly") is not None and fs.get("multidevs") == "remap"
    serial = root.find("devices/serial")
    assert serial.get("type") == "file" and serial.find("source").get("path") == "/r/a/console.log"
    args = [a.get("value") for a in root.findall(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg")]
    netdev = args[args.index("-netdev") + 1]
    assert "hostfwd=tcp:127.0.0.1:11809-10.0.2.15:10809" in netdev


def test_domain_xml_state_share_is_writable():
    root = ET.fromstring(domain_xml(spec(state_dir="/r/a/state")))
    state = root.find("devices/filesystem/target[@dir='tcstate']/..")
    assert state.find("source").get("dir") == "/r/a/state" and state.find("readonly") is None


def test_guest_controller_config_selects_the_guest_backends(tmp_path):
    from hal import config as hal_config
    from vm import guest
    from vm.pair import PairConfig

    class FakePair:      # just what guest.controller_config reads
        config = PairConfig(uri="test:///default", cache_dir=tmp_path, nvram_size_mib=64, disk_size_mib=64)
        run_dir = tmp_path

        def disks(self):
            return [Disk(str(tmp_path / f"d{i}"), f"s{i}") for i in range(3)]

    for name in "ab":
        cfg = hal_config.load(guest.write_controller_config(FakePair(), name))
        assert (cfg.nvram.backend, cfg.nvram.path, cfg.nvram.size_bytes) == ("dax", "/dev/dax0.0", 62 << 20)
        assert (cfg.disks.backend, cfg.disks.serials, cfg.disks.direct) == ("serial", ["s0", "s1", "s2"], True)
        assert 0 < cfg.disks.lun_size_bytes < 64 << 20
        assert (cfg.link.transport, cfg.link.device) == ("virtio", "/dev/virtio-ports/ctl.link")
        assert cfg.link.listen == (name == "a") and cfg.nbd.tcp == "0.0.0.0:10809"
        assert cfg.state_dir == f"/run/twincache/{name}"
        command = guest.controller_command(tmp_path / name / "controller.toml", name)
        assert command.endswith(f"twincache controller run --config {tmp_path / name / 'controller.toml'}")


def test_domain_xml_boots_a_self_contained_image_instead_of_the_host_root():
    root = ET.fromstring(domain_xml(spec(root_image="/img/guest.img")))
    assert root.find("devices/filesystem/target[@dir='hostroot']") is None
    vda = root.find("devices/disk/target[@dev='vda']/..")
    assert vda.find("source").get("file") == "/img/guest.img" and vda.find("readonly") is not None
    assert "tc.root=/dev/vda" in root.findtext("os/cmdline").split()


def test_self_contained_command_carries_config_and_key_within_the_kernel_limit(tmp_path):
    from vm import guest
    from vm.pair import PairConfig

    class FakePair:
        config = PairConfig(uri="test:///default", cache_dir=tmp_path)
        run_dir = tmp_path

        def disks(self):
            return [Disk(str(tmp_path / f"d{i}"), f"twincache-d{i}") for i in range(3)]

    command = guest.self_contained_command(FakePair(), "b")
    toml = base64.b64decode(command.split("echo ")[2].split(" |")[0]).decode()
    assert 'key_file = "/run/twincache/pair.key"' in toml and 'name = "b"' in toml
    assert (tmp_path / "pair.key").read_text().strip() in command
    domain_xml(spec("b", command=command))        # fits on the kernel command line


def test_domain_xml_refuses_a_command_line_the_kernel_would_cut():
    with pytest.raises(ValueError, match="kernel command line"):
        domain_xml(spec(command="x" * 2000))


def test_cpio_newc_archive_layout():
    cpio = assets.CpioWriter()
    cpio.directory("bin")
    cpio.file("init", b"#!/bin/sh\n", 0o755)
    cpio.symlink("bin/sh", "busybox")
    data = cpio.finish()
    assert len(data) % 4 == 0 and data.startswith(b"070701")
    names, offset = [], 0
    while True:
        header = data[offset:offset + 110]
        assert header[:6] == b"070701"
        mode, filesize, namesize = (int(header[6 + 8 * i:14 + 8 * i], 16) for i in (1, 6, 11))
        name = data[offset + 110:offset + 110 + namesize - 1].decode()
        offset += (110 + namesize + 3) // 4 * 4
        body = data[offset:offset + filesize]
        offset += (filesize + 3) // 4 * 4
        names.append((name, oct(mode), body))
        if name == "TRAILER!!!":
            break
    assert names == [("bin", "0o40755", b""), ("init", "0o100755", b"#!/bin/sh\n"),
                     ("bin/sh", "0o120777", b"busybox"), ("TRAILER!!!", "0o0", b"")]
    assert offset == len(data)


def test_initramfs_init_runs_the_command_after_the_ready_marker():
    script = assets.init_script().decode()
    assert script.startswith("#!/bin/busybox sh")
    assert script.index("TWINCACHE-READY") < script.index("tc-cmd.sh")
    assert "ndctl create-namespace -f -e namespace0.0 -m devdax" in script
    assert "/sys/class/virtio-ports/" in script and str(assets.REPO) in script


def test_modinfo_depends_from_a_built_initramfs_kernel_module():
    tree = assets.DEFAULT_CACHE_DIR / "kernel"
    modules = sorted(tree.glob("linux-image-*/lib/modules/*/kernel"))
    if not modules:
        pytest.skip("the kernel package is not downloaded yet (inv vm.setup)")
    index = assets.module_index(modules[-1])
    order = assets.resolve_modules(index, ["virtio_scsi", "dax_pmem"])
    assert order.index("virtio") < order.index("virtio_scsi") and order.index("scsi_mod") < order.index("virtio_scsi")
    assert order.index("libnvdimm") < order.index("dax_pmem") and order[-1] == "dax_pmem"


def test_private_libvirtd_qemu_conf_has_the_settings_that_make_start_work(tmp_path):
    libvirtd._prepare_config(tmp_path)
    conf = (tmp_path / "etc" / "qemu.conf").read_text()
    for line in ['security_driver = "none"', 'user = "root"', 'group = "root"', "dynamic_ownership = 0",
                 "remember_owner = 0", "cgroup_controllers = [ ]", "namespaces = [ ]", 'stdio_handler = "file"']:
        assert line in conf
    assert libvirtd.uri(tmp_path.parent).endswith("/libvirtd/run/libvirt-sock")


# --- phase 2 preview: the controller runtime in the guests ------------------------------------

def read_events(vm_pair, name: str) -> list[dict]:
    path = vm_pair.state_dir(name) / name / "events.jsonl"
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def wait_event(vm_pair, name: str, kind: str, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for event in read_events(vm_pair, name):
            if event["kind"] == kind:
                return event
        assert vm_pair.is_running(name), vm_pair.console(name)
        time.sleep(0.2)
    raise AssertionError(f"{name}: no {kind!r} event in {timeout_s:.0f} s:\n{vm_pair.console(name)[-3000:]}")


@pytest.mark.vm
@pytest.mark.slow
def test_controllers_run_in_the_guests_and_serve_nbd_through_the_forward(vm_pair):
    pytest.importorskip("hal.runtime", reason="the controller runtime is not in this tree yet")
    from vm import guest
    vm_pair.down()
    vm_pair.prepare(fresh=True)
    guest.provision(vm_pair)
    t0 = time.monotonic()
    for name in "ab":
        vm_pair.start(name, guest.controller_command(guest.write_controller_config(vm_pair, name), name))
    for name in "ab":
        serving = wait_event(vm_pair, name, "serving", PROBE_TIMEOUT_S)
        assert "lun0" in serving["exports"]
    for name in "ab":
        assert wait_event(vm_pair, name, "link_up")["peer"] == "ab".index(name) ^ 1
    print(f"\nvm controllers serving and linked in {time.monotonic() - t0:.1f} s")
    for name in "ab":
        with socket.create_connection(vm_pair.nbd_address(name), timeout=10) as conn:
            conn.settimeout(10)
            assert conn.makefile("rb").read(16) == b"NBDMAGICIHAVEOPT", f"{name}: no NBD greeting"
