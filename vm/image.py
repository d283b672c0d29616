"""A self-contained guest image, for libvirt hosts that do not share our root.

`debootstrap --variant=minbase --include=python3 bookworm DIR` (about a
minute here, with python3-venv and ndctl), the twincache wheel and its
dependencies' wheels under /opt/twincache/wheels, installed into the venv
/opt/twincache/venv (on the guest PATH), then `mkfs.ext4 -d DIR IMG` (about
a second; no mount, no loop device). The guest boots it with the same kernel
and initramfs (`tc.root=/dev/vda`, DomainSpec.root_image), under the same
tmpfs overlay.

Rules: everything lives under the given directory; a finished rootfs is
reused (delete DIR/rootfs to rebuild).
"""
from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

from vm.assets import REPO, progress

SUITE = "bookworm"


class ImageError(RuntimeError):
    """The image cannot be built here; the message says why."""


def build_image(out_dir: pathlib.Path, size: str = "2G") -> pathlib.Path:
    for tool in ("debootstrap", "mkfs.ext4"):
        if shutil.which(tool) is None:
            raise ImageError(f"{tool} is not installed (apt-get install debootstrap e2fsprogs)")
    out_dir.mkdir(parents=True, exist_ok=True)
    rootfs = out_dir / "rootfs"
    if not (rootfs / ".complete").exists():
        shutil.rmtree(rootfs, ignore_errors=True)
        progress(f"debootstrap {SUITE} into {rootfs} (about a minute)")
        subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ndctl", SUITE,
                        str(rootfs)], check=True)
        (rootfs / ".complete").write_text("ok\n")
    wheels = rootfs / "opt" / "twincache" / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    progress("building the twincache wheel and its dependencies' wheels")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(wheels), str(REPO)], check=True)
    venv = "/opt/twincache/venv"
    progress(f"installing twincache into {venv} in the image")
    subprocess.run(["chroot", str(rootfs), "python3", "-m", "venv", "--clear", venv], check=True)
    subprocess.run(["chroot", str(rootfs), f"{venv}/bin/pip", "install", "-q", "--no-index",
                    "--find-links", "/opt/twincache/wheels", "twincache"], check=True)
    image = out_dir / "guest.img"
    image.unlink(missing_ok=True)
    progress(f"mkfs.ext4 -d {rootfs} {image} ({size})")
    subprocess.run(["mkfs.ext4", "-q", "-L", "twincache", "-d", str(rootfs), str(image), size], check=True)
    return image
