"""Does KVM work here? A short boot probe, because /dev/kvm can lie.

On this machine kind /dev/kvm exists but guests under it hang or abort, so
the pair defaults to TCG (`<domain type='qemu'>`, `-cpu max`, one vCPU).
`probe_kvm()` boots the initramfs under plain QEMU with `-accel kvm` and a
command that powers the guest off, and answers True only if the ready marker
appears and QEMU exits within the timeout. The result is cached per boot of
the host (keyed by /proc/sys/kernel/random/boot_id).

Rules: QEMU is started here and killed by its own PID on timeout.
"""
from __future__ import annotations

import os
import pathlib
import subprocess

from vm import assets

PROBE_TIMEOUT_S = 30.0


def _boot_id() -> str:
    try:
        return pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def probe_kvm(cache_dir=None, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    cache_dir = pathlib.Path(cache_dir or assets.DEFAULT_CACHE_DIR)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    stamp = cache_dir / "kvm-probe"
    if stamp.exists():
        boot_id, _, answer = stamp.read_text().partition(" ")
        if boot_id == _boot_id():
            return answer.strip() == "yes"
    boot = assets.ensure_assets(cache_dir)
    argv = ["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-smp", "1", "-m", "256M",
            "-kernel", str(boot.kernel), "-initrd", str(boot.initrd), "-nographic", "-no-reboot",
            "-net", "none", "-append", "console=ttyS0 quiet panic=-1 tc.name=kvmprobe tc.after=poweroff"]
    assets.progress(f"probing KVM (at most {timeout_s:.0f} s)")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        works = proc.returncode == 0 and assets.READY_MARKER.encode() in out
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        works = False
    stamp.write_text(f"{_boot_id()} {'yes' if works else 'no'}\n")
    assets.progress(f"KVM {'works' if works else 'does not work'} here; "
                    f"{'using kvm' if works else 'using TCG (-cpu max, one vCPU)'}")
    return works


def domain_type(accel: str, cache_dir=None) -> str:
    """libvirt domain type for --accel tcg | kvm | auto (auto probes)."""
    assert accel in ("tcg", "kvm", "auto"), accel
    if accel == "auto":
        return "kvm" if probe_kvm(cache_dir) else "qemu"
    return "kvm" if accel == "kvm" else "qemu"
