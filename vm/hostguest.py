"""A host VM for the pair: a plain QEMU guest whose one disk is a LUN over NBD.

Not a controller guest (that is `vm.pair`, under libvirt): this is the
*host* side, a VM that runs an application on a LUN and must ride through a
failover. It boots the same Debian kernel as the VM pair (`assets.fetch_kernel`,
same cache directory) with its own small initramfs: busybox-static, the
virtio PCI and block modules, and an `init` that writes a verifiable pattern
to `/dev/vda`, one block after another, and prints a line per write the
device acknowledged:

    TCGUEST-READY sectors=N     /dev/vda is there
    TCGUEST-WROTE i             block i (at offset i * block_bytes, every byte pattern(i))
                                was written with O_DIRECT and flushed (conv=fsync)
    TCGUEST-FAILED i ...        the write of block i failed (the guest saw an I/O error)
    TCGUEST-DONE                all writes were tried; the guest powers off

The write count and block size travel on the kernel command line
(`tc.writes=`, `tc.bs=`). Rules as in `assets`: nothing written outside the
cache directory, the cpio archive by `assets.CpioWriter`.
"""
from __future__ import annotations

import dataclasses
import gzip
import pathlib

from vm import assets

GUEST_MODULES = ["virtio_pci", "virtio_blk"]
INITRAMFS_VERSION = 1      # bump when the init script or the module list changes
READY = "TCGUEST-READY"
WROTE = "TCGUEST-WROTE"
FAILED = "TCGUEST-FAILED"
DONE = "TCGUEST-DONE"

INIT_SCRIPT = r"""#!/bin/busybox sh
# twincache host guest: write tc.writes blocks of tc.bs bytes to /dev/vda, block i
# filled with byte (i % 255 + 1), O_DIRECT and flushed; one console line per write.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
exec >/dev/console 2>&1 </dev/null
for m in $(cat /etc/tc-modules); do
    insmod /lib/modules/$m.ko || echo "TCGUEST-WARN insmod $m failed"
done
WRITES=0; BS=65536
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        tc.writes=*) WRITES="${arg#tc.writes=}";;
        tc.bs=*) BS="${arg#tc.bs=}";;
    esac
done
i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
if [ ! -b /dev/vda ]; then echo "TCGUEST-FATAL no /dev/vda"; poweroff -f; fi
echo "TCGUEST-READY sectors=$(cat /sys/block/vda/size)"
i=0
while [ $i -lt $WRITES ]; do
    head -c $BS /dev/zero | tr '\000' "\\$(printf %03o $((i % 255 + 1)))" > /tmp/block
    if dd if=/tmp/block of=/dev/vda bs=$BS seek=$i count=1 oflag=direct conv=fsync,notrunc 2>/tmp/err; then
        echo "TCGUEST-WROTE $i"
    else
        echo "TCGUEST-FAILED $i $(head -n 1 /tmp/err)"
    fi
    i=$((i+1))
done
echo "TCGUEST-DONE"
poweroff -f
"""


@dataclasses.dataclass(frozen=True)
class HostGuestAssets:
    kernel: pathlib.Path
    initrd: pathlib.Path


def pattern(i: int) -> int:
    """The byte block i is filled with (as the init script computes it)."""
    return i % 255 + 1


def ensure_assets(cache_dir=None) -> HostGuestAssets:
    """The VM pair's kernel (fetched once into the shared cache) and this guest's initramfs."""
    cache_dir = pathlib.Path(cache_dir or assets.DEFAULT_CACHE_DIR)
    if not assets.BUSYBOX.exists():
        raise assets.AssetError(f"{assets.BUSYBOX} is missing: apt-get install busybox-static")
    tree = assets.fetch_kernel(cache_dir)
    release = assets.kernel_release(tree)
    initrd = cache_dir / f"hostguest-{release}-v{INITRAMFS_VERSION}.img"
    stamp = initrd.with_suffix(".src")
    source = INIT_SCRIPT.encode() + " ".join(GUEST_MODULES).encode() + assets.BUSYBOX.read_bytes()[:4096]
    if not initrd.exists() or not stamp.exists() or stamp.read_bytes() != source:
        assets.progress(f"building {initrd.name}")
        _build_initramfs(tree, release, initrd)
        stamp.write_bytes(source)
    return HostGuestAssets(kernel=tree / "boot" / f"vmlinuz-{release}", initrd=initrd)


def _build_initramfs(tree: pathlib.Path, release: str, out: pathlib.Path) -> None:
    index = assets.module_index(tree / "lib" / "modules" / release / "kernel")
    order = assets.resolve_modules(index, GUEST_MODULES)
    cpio = assets.CpioWriter()
    for d in ["bin", "dev", "etc", "lib", "lib/modules", "proc", "sys", "tmp"]:
        cpio.directory(d)
    cpio.file("bin/busybox", assets.BUSYBOX.read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", INIT_SCRIPT.encode(), 0o755)
    cpio.file("etc/tc-modules", ("\n".join(order) + "\n").encode())
    for name in order:
        cpio.file(f"lib/modules/{name}.ko", assets.module_bytes(index[name]))
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(cpio.finish(), compresslevel=6))
    tmp.rename(out)


def qemu_argv(boot: HostGuestAssets, *, nbd_socket: str, export: str, reconnect_delay_s: int,
              werror: str, serial_socket: str, qmp_socket: str, writes: int, block_bytes: int,
              memory_mib: int = 256) -> list[str]:
    """QEMU under TCG (KVM guests hang on this host), the LUN as a virtio-blk disk through
    QEMU's NBD client; the serial console connects to `serial_socket` (the caller listens
    there), QMP listens on `qmp_socket`."""
    blockdev = (f"driver=nbd,server.type=unix,server.path={nbd_socket},export={export},"
                f"reconnect-delay={reconnect_delay_s},node-name=lun")
    append = (f"console=ttyS0 quiet panic=-1 mitigations=off tc.writes={writes} tc.bs={block_bytes}")
    return ["qemu-system-x86_64", "-accel", "tcg", "-m", str(memory_mib), "-smp", "1",
            "-nodefaults", "-display", "none", "-no-reboot",
            "-kernel", str(boot.kernel), "-initrd", str(boot.initrd), "-append", append,
            "-chardev", f"socket,id=console,path={serial_socket}", "-serial", "chardev:console",
            "-qmp", f"unix:{qmp_socket},server=on,wait=off",
            "-blockdev", blockdev,
            "-device", f"virtio-blk-pci,drive=lun,werror={werror},rerror={werror}"]
