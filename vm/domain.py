"""libvirt domain XML for one controller VM.

A controller VM is a `<domain type='qemu'>` (TCG; KVM hangs guests on this
machine kind) with direct kernel boot of the boot assets, the host root as a
read-only 9p `<filesystem>`, an nvdimm `<memory>` backed by a host file (the
controller's NVRAM), the shared disk array as shareable virtio-scsi disks with
serials and cache=none, a virtio-serial `<channel>` for the inter-controller
link (A binds the unix socket, B connects and reconnects), a serial console
written to a log file, and user-mode networking that forwards one host port
(127.0.0.1 only) to the controller's NBD port.

Rules: this module only renders XML from a `DomainSpec`; it touches no file
and talks to no libvirt. The kernel command line carries the guest command
base64-encoded (`tc.cmd=`), so any shell text survives it.
"""
from __future__ import annotations

import base64
import dataclasses
import xml.etree.ElementTree as ET

from vm.assets import GUEST_ADDRESS

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
LINK_PORT_NAME = "ctl.link"
GUEST_NBD_PORT = 10809
KERNEL_CMDLINE_MAX_BYTES = 2048      # x86 COMMAND_LINE_SIZE
ET.register_namespace("qemu", QEMU_NS)


@dataclasses.dataclass(frozen=True)
class Disk:
    path: str        # raw image, the same file on both VMs
    serial: str      # what the guest finds in /sys/block/sdX/device/vpd_pg80


@dataclasses.dataclass
class DomainSpec:
    name: str                      # libvirt domain name, e.g. "twincache-a"
    controller: str                # "a" or "b"
    kernel: str
    initrd: str
    nvram_path: str
    nvram_size_mib: int
    disks: list
    link_socket: str
    link_listen: bool              # A binds the socket, B connects with reconnect
    console_log: str
    nbd_host_port: int             # 127.0.0.1:<this> on the host -> guest GUEST_NBD_PORT
    memory_mib: int = 512
    domain_type: str = "qemu"      # "kvm" only where a probe showed it works
    command: str = ""              # shell text run in the guest after TWINCACHE-READY
    after: str = "stay"            # after the command: "stay", "poweroff" or "shell"
    emulator: str = "/usr/bin/qemu-system-x86_64"
    extra_cmdline: str = ""
    uuid: str = ""                 # keep an existing domain's uuid when redefining it
    state_dir: str = ""            # host dir shared writable as 9p "tcstate" (/var/lib/twincache)
    root_image: str = ""           # an ext4 image (vm/image.py) as the guest root instead of the host's /


def kernel_cmdline(spec: DomainSpec) -> str:
    parts = ["console=ttyS0", "quiet", "panic=-1", f"tc.name={spec.controller}", f"tc.after={spec.after}"]
    if spec.command:
        parts.append("tc.cmd=" + base64.urlsafe_b64encode(spec.command.encode()).decode())
    if spec.root_image:
        parts.append("tc.root=/dev/vda")
    if spec.extra_cmdline:
        parts.append(spec.extra_cmdline)
    line = " ".join(parts)
    if len(line) >= KERNEL_CMDLINE_MAX_BYTES:
        raise ValueError(f"kernel command line is {len(line)} bytes; put the command in a script file")
    return line


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs) -> ET.Element:
    element = ET.SubElement(parent, tag, {k.rstrip("_"): str(v) for k, v in attrs.items()})
    if text is not None:
        element.text = str(text)
    return element


def _os(root: ET.Element, spec: DomainSpec) -> None:
    os_ = _sub(root, "os")
    _sub(os_, "type", "hvm", arch="x86_64", machine="pc")
    _sub(os_, "kernel", spec.kernel)
    _sub(os_, "initrd", spec.initrd)
    _sub(os_, "cmdline", kernel_cmdline(spec))
    features = _sub(root, "features")
    _sub(features, "acpi")         # the nvdimm is described to the guest by the ACPI NFIT
    cpu = _sub(root, "cpu", mode="maximum" if spec.domain_type == "qemu" else "host-passthrough",
               check="none")
    numa = _sub(cpu, "numa")       # memory devices need a guest NUMA node
    _sub(numa, "cell", id=0, cpus="0", memory=spec.memory_mib, unit="MiB")


def _disks(devices: ET.Element, spec: DomainSpec) -> None:
    _sub(devices, "controller", type="scsi", index=0, model="virtio-scsi")
    for unit, disk in enumerate(spec.disks):
        element = _sub(devices, "disk", type="file", device="disk")
        _sub(element, "driver", name="qemu", type="raw", cache="none", io="native")
        _sub(element, "source", file=disk.path)
        _sub(element, "target", dev=f"sd{chr(ord('a') + unit)}", bus="scsi")
        _sub(element, "serial", disk.serial)
        _sub(element, "shareable")
        _sub(element, "address", type="drive", controller=0, bus=0, target=0, unit=unit)


def _link(devices: ET.Element, spec: DomainSpec) -> None:
    _sub(devices, "controller", type="virtio-serial", index=0)
    channel = _sub(devices, "channel", type="unix")
    source = _sub(channel, "source", mode="bind" if spec.link_listen else "connect", path=spec.link_socket)
    if not spec.link_listen:
        _sub(source, "reconnect", enabled="yes", timeout=1)
    _sub(channel, "target", type="virtio", name=LINK_PORT_NAME)


def _devices(root: ET.Element, spec: DomainSpec) -> None:
    devices = _sub(root, "devices")
    _sub(devices, "emulator", spec.emulator)
    if spec.root_image:
        root = _sub(devices, "disk", type="file", device="disk")
        _sub(root, "driver", name="qemu", type="raw")
        _sub(root, "source", file=spec.root_image)
        _sub(root, "target", dev="vda", bus="virtio")
        _sub(root, "readonly")
    else:
        fs = _sub(devices, "filesystem", type="mount", accessmode="passthrough", multidevs="remap")
        _sub(fs, "driver", type="path")
        _sub(fs, "source", dir="/")
        _sub(fs, "target", dir="hostroot")
        _sub(fs, "readonly")
    if spec.state_dir:
        state = _sub(devices, "filesystem", type="mount", accessmode="passthrough")
        _sub(state, "driver", type="path")
        _sub(state, "source", dir=spec.state_dir)
        _sub(state, "target", dir="tcstate")
    nvdimm = _sub(devices, "memory", model="nvdimm", access="shared")
    _sub(_sub(nvdimm, "source"), "path", spec.nvram_path)
    target = _sub(nvdimm, "target")
    _sub(target, "size", spec.nvram_size_mib, unit="MiB")
    _sub(target, "node", 0)
    _disks(devices, spec)
    _link(devices, spec)
    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=spec.console_log, append="off")
    _sub(serial, "target", port=0)
    _sub(devices, "memballoon", model="none")


def _network(root: ET.Element, spec: DomainSpec) -> None:
    # libvirt 9.0 forwards ports only with passt; QEMU's own slirp does it with hostfwd.
    netdev = (f"user,id=nbdnet,net=10.0.2.0/24,host=10.0.2.2,"
              f"hostfwd=tcp:127.0.0.1:{spec.nbd_host_port}-{GUEST_ADDRESS}:{GUEST_NBD_PORT}")
    commandline = _sub(root, f"{{{QEMU_NS}}}commandline")
    for value in ["-netdev", netdev, "-device", "virtio-net-pci,netdev=nbdnet,addr=0x10"]:
        _sub(commandline, f"{{{QEMU_NS}}}arg", value=value)


def domain_xml(spec: DomainSpec) -> str:
    assert spec.controller in ("a", "b"), spec.controller
    assert spec.domain_type in ("qemu", "kvm"), spec.domain_type
    root = ET.Element("domain", type=spec.domain_type)
    _sub(root, "name", spec.name)
    if spec.uuid:
        _sub(root, "uuid", spec.uuid)
    total_mib = spec.memory_mib + spec.nvram_size_mib
    _sub(root, "maxMemory", 2048 + spec.nvram_size_mib, slots=2, unit="MiB")
    _sub(root, "memory", total_mib, unit="MiB")
    _sub(root, "currentMemory", spec.memory_mib, unit="MiB")
    _sub(root, "vcpu", 1)
    _os(root, spec)
    _sub(root, "clock", offset="utc")
    _sub(root, "on_poweroff", "destroy")
    _sub(root, "on_reboot", "destroy")
    _sub(root, "on_crash", "destroy")
    _devices(root, spec)
    _network(root, spec)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode")
