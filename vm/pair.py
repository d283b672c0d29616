"""The VM pair's lifecycle through libvirt-python.

`VmPair` owns two controller domains (A and B), their NVRAM backing files,
the shared disk array files, the link socket and the console logs, all under
one run directory (default `<cache>/pair`). It defines and starts domains,
waits for console markers, power-cuts with `destroy()`, restarts, and
undefines. A guest is told what to run by `start(name, command=...)`: the
command is shell text, placed base64-encoded on the kernel command line, run
by the guest init after `TWINCACHE-READY` with the repository as the working
directory.

Rules: every wait has a host-side timeout and fails with the console tail;
the connection URI is configurable (private libvirtd, qemu:///system,
qemu+ssh://...); files are created here, never by libvirt.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import shutil
import time

import libvirt

from vm import assets
from vm.domain import Disk, DomainSpec, domain_xml
from vm.events import EventStream, ensure_event_loop

NAMES = ("a", "b")
BOOT_TIMEOUT_S = 120.0


LAYOUT_KEYS = ("prefix", "nbd_host_ports", "disk_count", "disk_size_mib", "nvram_size_mib", "link_relay")


def load_layout(run_dir) -> dict:
    """The layout `save_layout` wrote in `run_dir`, or {} for a pair never prepared there."""
    try:
        layout = json.loads((pathlib.Path(run_dir) / "pair.json").read_text())
    except FileNotFoundError:
        return {}
    layout = {key: layout[key] for key in LAYOUT_KEYS if key in layout}
    if "nbd_host_ports" in layout:
        layout["nbd_host_ports"] = tuple(layout["nbd_host_ports"])
    return layout


class VmError(RuntimeError):
    """A VM operation failed; the message carries the console tail."""


@dataclasses.dataclass
class PairConfig:
    uri: str
    cache_dir: pathlib.Path = assets.DEFAULT_CACHE_DIR
    run_dir: pathlib.Path | None = None          # default <cache_dir>/pair
    prefix: str = "twincache"                    # domains are <prefix>-a, <prefix>-b
    nvram_size_mib: int = 64
    disk_count: int = 3
    disk_size_mib: int = 64
    memory_mib: int = 512
    nbd_host_ports: tuple = (11809, 11810)       # 127.0.0.1 ports forwarded to A's and B's NBD
    domain_type: str = "qemu"
    root_image: str = ""                         # vm/image.py image as the guest root (default: host / over 9p)
    link_relay: bool = False                     # B connects to <run_dir>/link-relay.sock, a host relay to A's socket

    def __post_init__(self):
        self.cache_dir = pathlib.Path(self.cache_dir)
        self.run_dir = pathlib.Path(self.run_dir or self.cache_dir / "pair")


class VmPair:
    def __init__(self, config: PairConfig):
        self.config = config
        self.run_dir = config.run_dir
        ensure_event_loop()        # must precede the connection, or no events arrive
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)   # errors surface as exceptions
        try:
            self.conn = libvirt.open(config.uri)
        except libvirt.libvirtError as exc:
            raise VmError(f"cannot connect to {config.uri}: {exc}") from None
        self.events = EventStream(self.conn)
        self._assets: assets.BootAssets | None = None

    # --- files ------------------------------------------------------------------------------

    def domain_name(self, name: str) -> str:
        assert name in NAMES, name
        return f"{self.config.prefix}-{name}"

    def nvram_path(self, name: str) -> pathlib.Path:
        return self.run_dir / name / "nvram.img"

    def state_dir(self, name: str) -> pathlib.Path:
        """The guest's /var/lib/twincache (controller state_dir parent), shared writable."""
        return self.run_dir / name / "state"

    def console_path(self, name: str) -> pathlib.Path:
        return self.run_dir / name / "console.log"

    def link_socket(self) -> pathlib.Path:
        """The socket A's chardev binds."""
        return self.run_dir / "link.sock"

    def link_connect_socket(self) -> pathlib.Path:
        """The socket B's chardev connects to: A's, or a relay's (which a test can cut)."""
        return self.run_dir / "link-relay.sock" if self.config.link_relay else self.link_socket()

    def disks(self) -> list[Disk]:
        return [Disk(str(self.run_dir / "disks" / f"disk{i}.img"), self.disk_serial(i))
                for i in range(self.config.disk_count)]

    def disk_serial(self, index: int) -> str:
        return f"{self.config.prefix}-d{index}"

    def nbd_address(self, name: str) -> tuple[str, int]:
        return "127.0.0.1", self.config.nbd_host_ports[NAMES.index(name)]

    def prepare(self, fresh: bool = False) -> None:
        """Build the boot assets and create the NVRAM and disk files (zeroed, state dirs emptied, when fresh)."""
        self._assets = assets.ensure_assets(self.config.cache_dir)
        (self.run_dir / "disks").mkdir(parents=True, exist_ok=True)
        self.save_layout()
        for name in NAMES:
            if fresh:                  # old events would answer a new boot's waits
                shutil.rmtree(self.state_dir(name), ignore_errors=True)
            self.state_dir(name).mkdir(parents=True, exist_ok=True)
        files = [(self.nvram_path(n), self.config.nvram_size_mib) for n in NAMES]
        files += [(pathlib.Path(d.path), self.config.disk_size_mib) for d in self.disks()]
        for path, size_mib in files:
            path.parent.mkdir(parents=True, exist_ok=True)
            if fresh or not path.exists() or path.stat().st_size != size_mib << 20:
                with open(path, "wb") as f:
                    f.truncate(size_mib << 20)

    def save_layout(self) -> None:
        """<run_dir>/pair.json: what `twincache vm ... --run-dir DIR` needs to find this pair again
        (domain prefix, NBD ports, disk count, link relay)."""
        layout = {key: getattr(self.config, key) for key in LAYOUT_KEYS}
        (self.run_dir / "pair.json").write_text(json.dumps(layout, indent=1) + "\n")

    # --- domains ----------------------------------------------------------------------------

    def spec(self, name: str, command: str = "", after: str = "stay") -> DomainSpec:
        if self._assets is None:
            self._assets = assets.ensure_assets(self.config.cache_dir)
        return DomainSpec(
            name=self.domain_name(name), controller=name, kernel=str(self._assets.kernel),
            initrd=str(self._assets.initrd), nvram_path=str(self.nvram_path(name)),
            nvram_size_mib=self.config.nvram_size_mib, disks=self.disks(),
            link_socket=str(self.link_socket() if name == "a" else self.link_connect_socket()),
            link_listen=(name == "a"),
            console_log=str(self.console_path(name)), nbd_host_port=self.nbd_address(name)[1],
            memory_mib=self.config.memory_mib, domain_type=self.config.domain_type,
            command=command, after=after, state_dir=str(self.state_dir(name)),
            root_image=str(self.config.root_image or ""))

    def define(self, name: str, command: str = "", after: str = "stay") -> libvirt.virDomain:
        spec = self.spec(name, command, after)
        if existing := self.domain(name):
            spec.uuid = existing.UUIDString()
        return self.conn.defineXML(domain_xml(spec))

    def domain(self, name: str) -> libvirt.virDomain | None:
        try:
            return self.conn.lookupByName(self.domain_name(name))
        except libvirt.libvirtError:
            return None

    def is_running(self, name: str) -> bool:
        dom = self.domain(name)
        return bool(dom and dom.isActive())

    def start(self, name: str, command: str = "", after: str = "stay") -> float:
        """(Re)define the domain with this guest command and power it on; returns the start time."""
        if self.is_running(name):
            raise VmError(f"{self.domain_name(name)} is already running")
        dom = self.define(name, command, after)
        started_s = time.monotonic()
        try:
            dom.create()
        except libvirt.libvirtError as exc:
            raise VmError(f"{self.domain_name(name)} did not start: {exc}") from None
        return started_s

    def power_cut(self, name: str, timeout_s: float = 30.0) -> None:
        """Pull the plug: destroy() kills QEMU at once, and wait for the stopped event."""
        mark = self.events.mark()
        dom = self.domain(name)
        if dom is None or not dom.isActive():
            raise VmError(f"{self.domain_name(name)} is not running")
        try:
            dom.destroy()
        except libvirt.libvirtError:
            if dom.isActive():
                raise
            return                 # it stopped by itself in the meantime
        self.events.wait(self.domain_name(name), "stopped", since=mark, timeout_s=timeout_s)

    def restart(self, name: str, command: str = "", after: str = "stay",
                timeout_s: float = BOOT_TIMEOUT_S) -> float:
        """Power-cut if running, start again and wait for TWINCACHE-READY; returns the boot seconds."""
        if self.is_running(name):
            self.power_cut(name)
        started_s = self.start(name, command, after)
        self.wait_ready(name, timeout_s)
        return time.monotonic() - started_s

    def down(self) -> None:
        """Power off both domains (a destroy: the guests hold nothing the host needs)."""
        for name in NAMES:
            if self.is_running(name):
                self.power_cut(name)

    def undefine(self) -> None:
        self.down()
        for name in NAMES:
            dom = self.domain(name)
            if dom is not None:
                dom.undefine()

    def close(self) -> None:
        self.events.close()
        self.conn.close()

    # --- the console ------------------------------------------------------------------------

    def console(self, name: str) -> str:
        try:
            return self.console_path(name).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, name: str, pattern: str, timeout_s: float = BOOT_TIMEOUT_S) -> re.Match:
        """Wait until the console log of this boot matches `pattern` (a regex)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        while True:
            text = self.console(name)
            if match := regex.search(text):
                return match
            if "TWINCACHE-FATAL" in text or not self.is_running(name):
                raise VmError(f"{self.domain_name(name)} stopped or failed before {pattern!r}:\n"
                              + _tail(text))
            if time.monotonic() > deadline:
                raise VmError(f"{self.domain_name(name)}: no {pattern!r} on the console within "
                              f"{timeout_s:.0f} s:\n" + _tail(text))
            time.sleep(0.1)

    def wait_ready(self, name: str, timeout_s: float = BOOT_TIMEOUT_S) -> None:
        self.wait_for(name, rf"{assets.READY_MARKER} name={name}\b", timeout_s)

    def status(self) -> dict[str, str]:
        out = {}
        for name in NAMES:
            dom = self.domain(name)
            out[name] = "undefined" if dom is None else ("running" if dom.isActive() else "shut off")
        return out


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.splitlines()[-lines:])
