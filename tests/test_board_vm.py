"""Serial flashing against an emulated board: the board agent inside a QEMU guest.

One plain QEMU guest (no libvirt: one VM with two serial ports needs
nothing more) boots the VM pair's assets (vm/assets.py: Debian kernel, the
Python-built initramfs, the host root read-only over 9p under a tmpfs
overlay) and runs, from the kernel command line (`tc.cmd=`, as
vm/domain.py encodes it):

    provision the controller's key and disk on the guest's tmpfs,
    twincache board agent --port /dev/ttyS1 --slots /run/board/slots

The guest's console is its first UART (ttyS0 -> a host file); the agent's
line is its second UART, a 16550 that QEMU connects to a host pty
(`-chardev pty`). The real flasher (`twincache board flash --serial
/dev/pts/N`, pyserial) runs on the host against that pty, as it would
against a USB-serial adapter. The bundle's controller config is a real
`twincache controller run` inside the guest (file NVRAM and disk on the
guest's /run tmpfs, NBD on a unix socket), and the agent's health check is
its NBD handshake.

Checks: a full flash succeeds and reports slot a, healthy; a bundle signed
by another key is refused (BAD_SIGNATURE) and the board still runs the good
build. The boot, the flash rate over the guest's UART and the wall times
are printed (run with -s to see them). QEMU's 16550 does not pace its line
at the baud rate the guest sets: a TCG guest moved 18 to 54 KiB/s at "115200
baud" from run to run (load), 1.6 to 5x the line rate, so the rate here is
what the guest's UART interrupt handling and the agent manage, not the
wire's; the pty cable of fixtures/board.py (`baud=`) is the test of a paced line.

Accelerator: TWINCACHE_VM_ACCEL (tcg, kvm, auto; default auto = the cached
KVM boot probe of vm/kvm.py, TCG otherwise). One guest, under the VM tests'
machine-wide lock (fixtures/vm.py), killed by its PID at the end.
"""
from __future__ import annotations

import base64
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import pytest

from fixtures.board import TWINCACHE, _controller_toml
from fixtures.vm import session_lock

pytestmark = pytest.mark.vm

GUEST_DIR = pathlib.Path("/run/board")          # the guest's tmpfs: the host root is read-only
GUEST_PORT = "/dev/ttyS1"
BAUD = 115200
BOOT_TIMEOUT_S = 120.0
FILLER_BYTES = 64 << 10
AGENT_CONFIG = """\
[agent]
device = "qemu-board"
target = "board"
[service]
health = "nbd"
health_timeout_s = 90
settle_s = 1.0
stop_timeout_s = 5
"""


def say(text: str):
    print(f"board-vm: {text}", file=sys.__stderr__, flush=True)


def accel() -> str:
    choice = os.environ.get("TWINCACHE_VM_ACCEL", "auto")
    if choice == "auto":
        from vm import kvm
        return "kvm" if kvm.probe_kvm() else "tcg"
    assert choice in ("tcg", "kvm"), choice
    return choice


class QemuBoard:
    """One QEMU guest running the board agent on its second UART, a host pty."""

    def __init__(self, root: pathlib.Path):
        from board import bundle
        from vm import assets
        self.root = root
        self.boot = assets.ensure_assets(os.environ.get("TWINCACHE_VM_CACHE") or None)
        self.key, self.pub = bundle.keygen(root / "signing.key")
        self.agent_config = root / "agent.toml"
        self.agent_config.write_text(AGENT_CONFIG)
        self.controller_text = _controller_toml(GUEST_DIR / "ctl", broken=False)
        self.controller_config = root / "controller.toml"   # the guest provisions from this copy
        self.controller_config.write_text(self.controller_text)
        self.console = root / "console.log"
        self.qemu_log = root / "qemu.log"
        self.proc = None
        self.pty = None
        self.accel = accel()
        self.times = {}

    def guest_command(self) -> str:
        venv = pathlib.Path(TWINCACHE).parent
        provision = ("import sys; from fixtures.board import provision; "
                     "provision(open(sys.argv[1]).read())")
        return (f"mkdir -p {GUEST_DIR}/ctl/disks {GUEST_DIR}/slots && "
                f"{venv}/python -c '{provision}' {self.controller_config} && "
                f"echo TWINCACHE-BOARD-PROVISIONED && "
                f"exec {TWINCACHE} board agent --port {GUEST_PORT} --baud {BAUD} --slots {GUEST_DIR}/slots "
                f"--pubkey {self.pub} --agent-config {self.agent_config}")

    def argv(self) -> list:
        cmd64 = base64.urlsafe_b64encode(self.guest_command().encode()).decode()
        append = f"console=ttyS0 quiet panic=-1 tc.name=board tc.after=stay tc.cmd={cmd64}"
        assert len(append) < 2048, "kernel command line too long"
        cpu = ["-accel", "kvm", "-cpu", "host"] if self.accel == "kvm" else ["-accel", "tcg", "-cpu", "max"]
        return ["qemu-system-x86_64", *cpu, "-smp", "1", "-m", "512M", "-nodefaults", "-display", "none",
                "-no-reboot", "-monitor", "none",
                "-kernel", str(self.boot.kernel), "-initrd", str(self.boot.initrd), "-append", append,
                "-fsdev", "local,id=hostroot,path=/,security_model=passthrough,readonly=on,multidevs=remap",
                "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
                "-chardev", f"file,id=con,path={self.console}", "-serial", "chardev:con",     # ttyS0
                "-chardev", "pty,id=brd", "-serial", "chardev:brd"]                          # ttyS1

    def start(self):
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=open(self.qemu_log, "wb"),
                                     stderr=subprocess.STDOUT)
        text = self._wait(self.qemu_log, re.compile(r"char device redirected to (/dev/pts/\d+) \(label brd\)"), 20)
        self.pty = text.group(1)
        self._wait(self.console, re.compile(r"TWINCACHE-READY"), BOOT_TIMEOUT_S)
        self.times["boot_s"] = time.monotonic() - t0
        self._wait(self.console, re.compile(r"listening on /dev/ttyS1"), BOOT_TIMEOUT_S)
        self.times["agent_ready_s"] = time.monotonic() - t0
        say(f"{self.accel} guest: console ready in {self.times['boot_s']:.1f} s, agent listening on "
            f"{GUEST_PORT} (host {self.pty}) after {self.times['agent_ready_s']:.1f} s")

    def _wait(self, path: pathlib.Path, pattern, timeout_s: float):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = path.read_text(errors="replace") if path.exists() else ""
            if m := pattern.search(text):
                return m
            if "TWINCACHE-FATAL" in text or "TWINCACHE-EXIT" in text:
                break
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"no {pattern.pattern!r} in {path.name} after {timeout_s:.0f} s "
                             f"(qemu {'exited ' + str(self.proc.returncode) if self.proc.poll() is not None else 'running'}):\n"
                             f"--- qemu ---\n{self.qemu_log.read_text(errors='replace')[-2000:]}\n"
                             f"--- console ---\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()             # by the PID of the QEMU this fixture started
            self.proc.wait(10)

    def make_bundle(self, name: str, build_id: str, key=None) -> pathlib.Path:
        from board import bundle
        from firmware.formats.bundle import EntryKind
        filler = (b"twincache-vm-filler" * (FILLER_BYTES // 19 + 1))[:FILLER_BYTES]
        entries = [(EntryKind.CONFIG, "controller.toml", self.controller_text.encode()),
                   (EntryKind.DEPENDENCY, "filler-0.0.0-py3-none-any.whl", filler)]
        blob = bundle.build(bundle.load_private_key(key or self.key), entries, build_id,
                            bundle.parse_target("board"))
        path = self.root / name
        path.write_bytes(blob)
        return path

    def flash(self, bundle_path, timeout_s: float = 200) -> subprocess.CompletedProcess:
        return subprocess.run([TWINCACHE, "board", "flash", str(bundle_path), "--serial", self.pty,
                               "--baud", str(BAUD), "--activate-timeout", "150"],
                              capture_output=True, text=True, timeout=timeout_s)


@pytest.fixture(scope="module")
def qemu_board(tmp_path_factory):
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    from vm import assets
    t0 = time.monotonic()
    try:
        assets.ensure_assets(os.environ.get("TWINCACHE_VM_CACHE") or None)
    except assets.AssetError as exc:
        pytest.skip(f"no VM boot assets here: {exc}")
    t1 = time.monotonic()
    with session_lock():
        say(f"boot assets ready in {t1 - t0:.1f} s, VM lock taken after {time.monotonic() - t1:.1f} s more")
        b = QemuBoard(tmp_path_factory.mktemp("qemu-board"))
        try:
            b.start()
            yield b
        finally:
            b.stop()
            say(f"guest console log: {b.console}")


def _rate_line(stderr: str) -> str:
    done = [line for line in stderr.splitlines() if line.startswith("progress 100.0%")]
    assert done, stderr
    return done[-1]


def _rate_bytes_per_s(line: str) -> float:
    m = re.search(r"([\d.]+) (KiB|MiB)/s", line)
    assert m, line
    return float(m.group(1)) * (1024 if m.group(2) == "KiB" else 1 << 20)


def test_full_flash_into_the_qemu_board_runs_a_healthy_controller(qemu_board):
    b = qemu_board
    bundle = b.make_bundle("good.tcb", "vm-build-1")
    t0 = time.monotonic()
    r = b.flash(bundle)
    wall = time.monotonic() - t0
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}\n--- console ---\n{b.log()[-4000:]}"
    assert "board 'qemu-board': slot none, build -, no_firmware" in r.stderr, r.stderr
    assert "board: build vm-build-1 verified" in r.stderr, r.stderr
    assert re.search(r"^flashed: slot a, healthy; \d+ bytes in", r.stdout, re.M), r.stdout
    assert "switched to slot a (build vm-build-1); health check" in b.log()
    assert "slot a healthy" in b.log()
    rate = _rate_bytes_per_s(_rate_line(r.stderr))
    size = bundle.stat().st_size
    b.times.update(flash_wall_s=wall, rate=rate, size=size)
    say(f"full flash of {size} bytes over the guest's ttyS1 at {BAUD} baud: {rate / 1024:.1f} KiB/s "
        f"({rate * 10 / BAUD:.0%} of the line rate), wall {wall:.1f} s including the controller's health check; "
        f"{r.stdout.strip()}")
    assert rate > 0


def test_a_bad_signature_is_refused_by_the_qemu_board_and_it_keeps_its_build(qemu_board):
    from board.bundle import keygen
    b = qemu_board
    other_key, _ = keygen(b.root / "other.key")
    evil = b.make_bundle("evil.tcb", "evil-1", key=other_key)
    t0 = time.monotonic()
    r = b.flash(evil)
    assert r.returncode == 1, f"{r.stdout}\n{r.stderr}"
    assert "refused the bundle (BAD_SIGNATURE)" in r.stderr and "bad signature" in r.stderr, r.stderr
    say(f"bad signature refused in {time.monotonic() - t0:.1f} s: {r.stderr.strip().splitlines()[-1]}")
    # The board is unchanged: it still runs the good build, healthy (flashed here if the test above did not run).
    good = b.root / "good.tcb"
    if not good.exists():
        good = b.make_bundle("good.tcb", "vm-build-1")
        assert b.flash(good).returncode == 0
    r = b.flash(good)
    assert r.returncode == 0 and "nothing to flash" in r.stderr, f"{r.stdout}\n{r.stderr}"
    assert r.stdout.startswith("unchanged: slot a already runs this build (healthy)"), r.stdout
