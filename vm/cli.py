"""`twincache vm ...`: the VM pair from the command line (and from vm/tasks.py).

    twincache vm setup                 boot assets + private libvirtd
    twincache vm up [--command CMD]    start A and B; return when both controllers serve NBD
    twincache vm status [--json] | console a [-f] | power-cut a | start a | down | teardown
    (each takes --run-dir DIR, default <cache>/pair, whose pair.json holds ports and names)
    twincache vm image [--dir D]       a self-contained debootstrap guest image

The libvirt URI is TWINCACHE_LIBVIRT_URI when set (qemu:///system,
qemu+ssh://...), else the private libvirtd's; the cache directory is
TWINCACHE_VM_CACHE or <repo>/.cache/vm; TWINCACHE_VM_ACCEL is tcg, kvm or
auto (default: a short KVM boot probe, cached per host boot, else TCG);
TWINCACHE_VM_IMAGE names a `vm image` image to boot instead of the host's
root (the controller config then travels on the kernel command line). `up` runs the controller runtime in
each guest when it is installed (`twincache controller run --config`), and
otherwise leaves the guests idle after TWINCACHE-READY.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

from vm import assets

NAMES = ("a", "b")
SERVE_TIMEOUT_S = 300.0      # boot, controller start and LUN settling under TCG take 20-60 s


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("TWINCACHE_VM_CACHE") or assets.DEFAULT_CACHE_DIR)


def _failed(message: str):
    from hal.cli.errors import CommandFailed
    return CommandFailed(message)


def open_pair(start_libvirtd: bool = False, run_dir=None):
    """The VM pair in `run_dir` (default <cache>/pair), with the layout it was prepared with."""
    from vm import libvirtd
    from vm.pair import PairConfig, VmPair, VmError, load_layout
    uri = os.environ.get("TWINCACHE_LIBVIRT_URI")
    try:
        if not uri:
            uri = libvirtd.start(cache_dir()) if start_libvirtd else libvirtd.uri(cache_dir())
        from vm import kvm
        accel = os.environ.get("TWINCACHE_VM_ACCEL", "auto")
        run_dir = pathlib.Path(run_dir or cache_dir() / "pair")
        return VmPair(PairConfig(uri=uri, cache_dir=cache_dir(), run_dir=run_dir,
                                 root_image=os.environ.get("TWINCACHE_VM_IMAGE", ""),
                                 domain_type=kvm.domain_type(accel, cache_dir()), **load_layout(run_dir)))
    except (libvirtd.LibvirtdError, VmError, assets.AssetError) as exc:
        raise _failed(f"vm: {exc} (run `twincache vm setup` first?)") from None


def guest_command(pair, name: str, override: str | None, saved: bool = False) -> str:
    """The command a guest runs: an override, the one `up` saved, the controller runtime, or none."""
    if override is not None:
        return override
    saved = pair.run_dir / name / "command.sh" if saved else None
    if saved and saved.exists():
        return saved.read_text()
    if importlib.util.find_spec("hal.cli.controller") is None:
        return ""
    from vm import guest
    guest.provision(pair)
    if pair.config.root_image:
        return guest.self_contained_command(pair, name)
    return guest.controller_command(guest.write_controller_config(pair, name), name)


def cmd_setup(args) -> None:
    try:
        found = assets.ensure_assets(cache_dir())
    except assets.AssetError as exc:
        raise _failed(f"vm setup: {exc}") from None
    print(f"kernel {found.kernel}\ninitrd {found.initrd}")
    pair = open_pair(start_libvirtd=True)
    print(f"libvirt {pair.config.uri}")
    pair.close()


def cmd_up(args) -> None:
    pair = open_pair(start_libvirtd=True, run_dir=args.run_dir)
    up(pair, args.command, args.fresh, args.timeout)
    _print_status(pair)


def up(pair, command: str | None = None, fresh: bool = False, timeout_s: float = SERVE_TIMEOUT_S,
       out=print) -> float:
    """Start whichever guest is not running; return once both controllers serve NBD (or, with a
    `command` of the caller's, once both guests reached it). Returns the seconds it took."""
    pair.prepare(fresh=fresh)
    t0 = time.monotonic()
    controllers = True
    for name in NAMES:
        guest = guest_command(pair, name, command)
        controllers = controllers and command is None and bool(guest)
        (pair.run_dir / name / "command.sh").write_text(guest)
        if not pair.is_running(name):
            pair.start(name, guest)
            out(f"vm: {pair.domain_name(name)} started")
    if not controllers:
        for name in NAMES:
            pair.wait_ready(name)
        out(f"vm pair ready in {time.monotonic() - t0:.1f} s (guests run their command)")
        return time.monotonic() - t0
    from vm import serving
    serving.wait_serving(pair, timeout_s, out)
    out(f"vm pair serving NBD in {time.monotonic() - t0:.1f} s")
    return time.monotonic() - t0


def cmd_start(args) -> None:
    pair = open_pair(start_libvirtd=True, run_dir=args.run_dir)
    pair.start(args.name, guest_command(pair, args.name, args.command, saved=True))
    pair.wait_ready(args.name)
    _print_status(pair)


def cmd_power_cut(args) -> None:
    pair = open_pair(run_dir=args.run_dir)
    pair.power_cut(args.name)
    print(f"{pair.domain_name(args.name)}: power cut (destroyed)")


def cmd_status(args) -> None:
    pair = open_pair(run_dir=args.run_dir)
    if args.json:
        from vm import serving
        print(json.dumps(serving.status_report(pair)))
        return
    _print_status(pair)


def _print_status(pair) -> None:
    for name, state in pair.status().items():
        host, port = pair.nbd_address(name)
        print(f"{pair.domain_name(name)}: {state}  nbd {host}:{port}  console {pair.console_path(name)}")


def cmd_console(args) -> None:
    pair = open_pair(run_dir=args.run_dir)
    path = pair.console_path(args.name)
    if not args.follow:
        sys.stdout.write(pair.console(args.name))
        return
    os.execvp("tail", ["tail", "-n", "+1", "-F", str(path)])


def cmd_down(args) -> None:
    pair = open_pair(run_dir=args.run_dir)
    pair.down()
    _print_status(pair)


def cmd_teardown(args) -> None:
    from vm import libvirtd
    if os.environ.get("TWINCACHE_LIBVIRT_URI") or libvirtd.read_pid(cache_dir()):
        pair = open_pair(run_dir=args.run_dir)
        pair.undefine()
        pair.close()
    if libvirtd.stop(cache_dir()):
        print("vm: private libvirtd stopped")


def cmd_image(args) -> None:
    from vm import image
    try:
        print(image.build_image(pathlib.Path(args.dir or cache_dir() / "image"), size=args.size))
    except (image.ImageError, subprocess.CalledProcessError) as exc:
        raise _failed(f"vm image: {exc}") from None


def _guard(func):
    """VM and libvirt failures end as one line and exit status 1."""
    def run(args):
        import libvirt
        from vm.pair import VmError
        try:
            return func(args)
        except (VmError, TimeoutError, libvirt.libvirtError) as exc:
            raise _failed(f"vm {args.vm_command}: {exc}") from None
    return run


def register(sub) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--run-dir", help="the pair's run directory (default <cache>/pair)")
    vm = sub.add_parser("vm", help="the libvirt VM pair").add_subparsers(dest="vm_command", required=True)
    simple = [("setup", cmd_setup, "boot assets and the private libvirtd"),
              ("down", cmd_down, "destroy both guests"), ("teardown", cmd_teardown, "undefine, stop libvirtd")]
    for name, func, text in simple:
        vm.add_parser(name, help=text, parents=[common]).set_defaults(func=_guard(func))
    status = vm.add_parser("status", help="domain states, NBD exports", parents=[common])
    status.add_argument("--json", action="store_true", help="the shape of `twincache status --json`")
    status.set_defaults(func=_guard(cmd_status))
    up = vm.add_parser("up", help="start both guests, return when their controllers serve NBD", parents=[common])
    up.add_argument("--command", help="shell text each guest runs instead of the controller")
    up.add_argument("--fresh", action="store_true", help="zero the NVRAM and disk files first")
    up.add_argument("--timeout", type=float, default=SERVE_TIMEOUT_S, help="seconds to wait for NBD")
    up.set_defaults(func=_guard(cmd_up))
    start = vm.add_parser("start", help="start one guest", parents=[common])
    start.add_argument("name", choices=NAMES)
    start.add_argument("--command")
    start.set_defaults(func=_guard(cmd_start))
    cut = vm.add_parser("power-cut", help="destroy one guest at once", parents=[common])
    cut.add_argument("name", choices=NAMES)
    cut.set_defaults(func=_guard(cmd_power_cut))
    console = vm.add_parser("console", help="a guest's console log", parents=[common])
    console.add_argument("name", choices=NAMES)
    console.add_argument("-f", "--follow", action="store_true")
    console.set_defaults(func=_guard(cmd_console))
    image = vm.add_parser("image", help="build a self-contained guest image (debootstrap)")
    image.add_argument("--dir")
    image.add_argument("--size", default="2G")
    image.set_defaults(func=_guard(cmd_image))
