"""Guest boot assets: Debian's kernel and a small initramfs built in Python.

The kernel comes from the distribution's package (`apt-get download`, then
`dpkg -x`); no root filesystem image is needed, because the initramfs mounts
the host's root read-only over 9p under a tmpfs overlay and runs the host's
own Python and the project's virtualenv. The initramfs holds busybox-static,
the modules the guest needs (resolved from each module's `.modinfo`
`depends=`, loaded deps first) and the `init` script below.

Everything is cached under a cache directory (default `<repo>/.cache/vm`);
nothing here writes outside it. Rules: no cpio, depmod or kmod on the host;
the newc archive is written by `CpioWriter`.
"""
from __future__ import annotations

import dataclasses
import gzip
import io
import lzma
import pathlib
import shutil
import struct
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CACHE_DIR = REPO / ".cache" / "vm"
BUSYBOX = pathlib.Path("/bin/busybox")
GUEST_MODULES = ["virtio_pci", "virtio_console", "9p", "9pnet_virtio", "overlay", "virtio_scsi",
                 "sd_mod", "nfit", "libnvdimm", "nd_pmem", "dax_pmem", "device_dax", "virtio_net",
                 "virtio_blk", "ext4", "crc32c_generic"]      # the last three: a self-contained image root
INITRAMFS_VERSION = 6      # bump when the init script or the module list changes
READY_MARKER = "TWINCACHE-READY"
EXIT_MARKER = "TWINCACHE-EXIT"
GUEST_ADDRESS = "10.0.2.15"


class AssetError(RuntimeError):
    """The boot assets cannot be built on this host; the message says why."""


def progress(message: str) -> None:
    print(f"vm: {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class BootAssets:
    kernel: pathlib.Path
    initrd: pathlib.Path
    kernel_release: str


# --- the kernel ---------------------------------------------------------------------------

def kernel_package_name() -> str:
    """The current `linux-image-6.1.0-*-amd64`, as the `linux-image-amd64` metapackage names it."""
    out = _run(["apt-cache", "depends", "linux-image-amd64"])
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "Depends:" and parts[1].startswith("linux-image-"):
            return parts[1]
    raise AssetError("apt-cache names no linux-image-* package for linux-image-amd64; run apt-get update")


def fetch_kernel(cache_dir: pathlib.Path, package: str | None = None) -> pathlib.Path:
    """Download and unpack the kernel package once; returns the unpacked tree."""
    package = package or kernel_package_name()
    tree = cache_dir / "kernel" / package
    if (tree / ".complete").exists():
        return tree
    debs = cache_dir / "kernel" / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    if not list(debs.glob(f"{package}_*.deb")):
        progress(f"downloading {package} with apt-get download")
        _run(["apt-get", "download", package], cwd=debs)
    deb = sorted(debs.glob(f"{package}_*.deb"))[-1]
    progress(f"unpacking {deb.name}")
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    _run(["dpkg", "-x", str(deb), str(tree)])
    (tree / ".complete").write_text(deb.name + "\n")
    return tree


def kernel_release(tree: pathlib.Path) -> str:
    releases = sorted(p.name for p in (tree / "lib" / "modules").iterdir() if p.is_dir())
    if len(releases) != 1:
        raise AssetError(f"{tree}: expected one kernel release under lib/modules, found {releases}")
    return releases[0]


# --- modules --------------------------------------------------------------------------------

def module_index(modules_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """Module name (dashes as underscores) -> .ko file, over the whole tree."""
    index = {}
    for path in modules_dir.rglob("*.ko*"):
        name = path.name.split(".ko")[0].replace("-", "_")
        index[name] = path
    return index


def module_bytes(path: pathlib.Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko"):
        return data
    raise AssetError(f"{path}: cannot decompress this module format")


def modinfo(elf: bytes) -> dict[str, list[str]]:
    """The key=value strings of an ELF64 module's `.modinfo` section."""
    assert elf[:4] == b"\x7fELF" and elf[4] == 2, "not an ELF64 module"
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    names_offset = sections[shstrndx][4]
    info: dict[str, list[str]] = {}
    for name_off, _type, _flags, _addr, offset, size in sections:
        end = elf.index(b"\0", names_offset + name_off)
        if elf[names_offset + name_off:end] != b".modinfo":
            continue
        for item in elf[offset:offset + size].split(b"\0"):
            key, sep, value = item.decode(errors="replace").partition("=")
            if sep:
                info.setdefault(key, []).append(value)
    return info


def resolve_modules(index: dict[str, pathlib.Path], wanted: list[str]) -> list[str]:
    """`wanted` and everything they depend on, each after its dependencies."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name not in index:
            raise AssetError(f"module {name} is not in the kernel package (built in, or misspelt?)")
        assert name not in visiting, f"module dependency cycle at {name}"
        visiting.add(name)
        depends = modinfo(module_bytes(index[name])).get("depends", [""])[0]
        for dep in filter(None, depends.split(",")):
            visit(dep.replace("-", "_"))
        order.append(name)

    for name in wanted:
        visit(name.replace("-", "_"))
    return order


# --- the newc cpio archive ------------------------------------------------------------------

class CpioWriter:
    """A newc ("070701") cpio archive, as the kernel unpacks an initramfs."""

    def __init__(self):
        self._out = io.BytesIO()
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        encoded = name.encode() + b"\0"
        fields = [self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._out.write(header + encoded)
        self._pad()
        self._out.write(data)
        self._pad()

    def _pad(self) -> None:
        self._out.write(b"\0" * (-self._out.tell() % 4))

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self._out.getvalue()


# --- the init script ------------------------------------------------------------------------

INIT_SCRIPT = r"""#!/bin/busybox sh
# twincache guest init: modules, host root over 9p under a tmpfs overlay,
# /dev/virtio-ports links, the devdax NVRAM, the network, then tc.cmd.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
exec >/dev/console 2>&1 </dev/null
echo "TWINCACHE-INIT"
for m in $(cat /etc/tc-modules); do
    insmod /lib/modules/$m.ko || echo "TWINCACHE-WARN insmod $m failed"
done
NAME=guest; CMD64=""; AFTER=stay; ROOT=9p
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        tc.name=*) NAME="${arg#tc.name=}";;
        tc.cmd=*) CMD64="${arg#tc.cmd=}";;
        tc.after=*) AFTER="${arg#tc.after=}";;
        tc.root=*) ROOT="${arg#tc.root=}";;
    esac
done
echo "$NAME" > /proc/sys/kernel/hostname
mkdir -p /host /rw /newroot
if [ "$ROOT" = 9p ]; then
    mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot /host \
        || echo "TWINCACHE-FATAL no 9p host root"
else
    i=0; while [ ! -b "$ROOT" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
    mount -t ext4 -o ro,noload "$ROOT" /host || echo "TWINCACHE-FATAL cannot mount root image $ROOT"
fi
mount -t tmpfs -o size=128m tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work /newroot \
    || echo "TWINCACHE-FATAL no overlay root"
mount -t proc proc /newroot/proc
mount -t sysfs sys /newroot/sys
mount -t devtmpfs dev /newroot/dev
# No tmpfs over /tmp: it hid a repository cloned under /tmp (CI's mktemp -d); the
# overlay's tmpfs upper already makes /tmp writable.
mount -t tmpfs tmpfs /newroot/run
if grep -q tcstate /sys/bus/virtio/drivers/9pnet_virtio/virtio*/mount_tag 2>/dev/null; then
    mkdir -p /newroot/var/lib/twincache
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 tcstate /newroot/var/lib/twincache \
        || echo "TWINCACHE-WARN no tcstate share"
fi
mkdir -p /dev/virtio-ports
for p in /sys/class/virtio-ports/*; do
    [ -f "$p/name" ] && ln -sf "../${p##*/}" "/dev/virtio-ports/$(cat $p/name)"
done
i=0
while [ -e /sys/bus/nd/devices/namespace0.0 ] && [ ! -e /dev/dax0.0 ] && [ $i -lt 15 ]; do
    sleep 0.1; i=$((i+1))
done
if [ -e /sys/bus/nd/devices/namespace0.0 ] && [ ! -e /dev/dax0.0 ]; then
    echo "TWINCACHE-NVRAM creating devdax namespace"
    chroot /newroot ndctl create-namespace -f -e namespace0.0 -m devdax -a 4K >/dev/null \
        || echo "TWINCACHE-WARN ndctl create-namespace failed"
fi
[ -e /dev/dax0.0 ] && echo "TWINCACHE-NVRAM /dev/dax0.0" || echo "TWINCACHE-WARN no /dev/dax0.0"
ip link set lo up
if [ -e /sys/class/net/eth0 ]; then
    ip link set eth0 up && ip addr add @GUEST_ADDRESS@/24 dev eth0 && ip route add default via 10.0.2.2
fi
echo "TWINCACHE-READY name=$NAME"
if [ -n "$CMD64" ]; then
    echo "$CMD64" | tr -- '-_' '+/' | base64 -d > /newroot/run/tc-cmd.sh
    chroot /newroot /usr/bin/env -i PATH=/opt/twincache/venv/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin \
        HOME=/root TC_NAME="$NAME" PYTHONDONTWRITEBYTECODE=1 /bin/sh -c "cd @REPO@ 2>/dev/null || cd /; . /run/tc-cmd.sh"
    echo "TWINCACHE-EXIT rc=$?"
fi
case "$AFTER" in
    poweroff) sync; poweroff -f;;
    shell) setsid cttyhack sh;;
esac
while true; do sleep 3600; done
"""


def init_script() -> bytes:
    script = INIT_SCRIPT.replace("@GUEST_ADDRESS@", GUEST_ADDRESS).replace("@REPO@", str(REPO))
    return script.encode()


def build_initramfs(tree: pathlib.Path, release: str, out: pathlib.Path) -> None:
    index = module_index(tree / "lib" / "modules" / release / "kernel")
    order = resolve_modules(index, GUEST_MODULES)
    progress(f"initramfs: {len(order)} modules: {' '.join(order)}")
    cpio = CpioWriter()
    for d in ["bin", "dev", "etc", "lib", "lib/modules", "proc", "sys", "tmp", "run"]:
        cpio.directory(d)
    cpio.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", init_script(), 0o755)
    cpio.file("etc/tc-modules", ("\n".join(order) + "\n").encode())
    for name in order:
        cpio.file(f"lib/modules/{name}.ko", module_bytes(index[name]))
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(cpio.finish(), compresslevel=6))
    tmp.rename(out)


def ensure_assets(cache_dir=None) -> BootAssets:
    """Fetch the kernel and build the initramfs unless cached; returns their paths."""
    cache_dir = pathlib.Path(cache_dir or DEFAULT_CACHE_DIR)
    if not BUSYBOX.exists():
        raise AssetError(f"{BUSYBOX} is missing: apt-get install busybox-static")
    tree = fetch_kernel(cache_dir)
    release = kernel_release(tree)
    kernel = tree / "boot" / f"vmlinuz-{release}"
    initrd = cache_dir / f"initramfs-{release}-v{INITRAMFS_VERSION}.img"
    stamp = initrd.with_suffix(".src")
    source = init_script() + " ".join(GUEST_MODULES).encode() + BUSYBOX.read_bytes()[:4096]
    if not initrd.exists() or not stamp.exists() or stamp.read_bytes() != source:
        progress(f"building {initrd.name}")
        build_initramfs(tree, release, initrd)
        stamp.write_bytes(source)
    return BootAssets(kernel=kernel, initrd=initrd, kernel_release=release)


def _run(argv: list[str], cwd=None) -> str:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise AssetError(f"{argv[0]} is not installed") from None
    if done.returncode:
        raise AssetError(f"{' '.join(argv)} failed: {done.stderr.strip()[-500:]}")
    return done.stdout


if __name__ == "__main__":
    print(ensure_assets())
