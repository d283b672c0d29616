"""`twincache bundle ...` and `twincache board ...`: the board commands of the CLI.

    twincache bundle keygen KEY
    twincache bundle build --key KEY --config FILE.toml [--wheel W] [--dep D ...] -o OUT
    twincache bundle verify BUNDLE --pubkey KEY.pub [--target board]
    twincache bundle inspect BUNDLE [--json]
    twincache board agent --port DEV --slots DIR [--pubkey KEY.pub] [--agent-config FILE]
    twincache board flash BUNDLE --serial DEV|URL | --usb VID:PID[,ALT]

Heavy imports (cryptography, pyserial, pyusb) happen when a command runs,
so `twincache --help` stays fast and works without the `board` extra.
"""
from __future__ import annotations

import json
import pathlib
import sys

from hal.cli.errors import CommandFailed, UsageError


def register(sub):
    bundle = sub.add_parser("bundle", help="signed firmware bundles").add_subparsers(
        dest="bundle_command", required=True, metavar="ACTION")
    p = bundle.add_parser("keygen", help="make an Ed25519 signing key (KEY and KEY.pub)")
    p.add_argument("key")
    p.set_defaults(func=cmd_keygen)
    p = bundle.add_parser("build", help="build and sign a bundle")
    p.add_argument("--key", required=True, help="Ed25519 private key (PEM)")
    p.add_argument("--config", required=True, help="the board's controller config (TOML)")
    p.add_argument("--wheel", help="the twincache wheel")
    p.add_argument("--dep", action="append", default=[], help="a pinned dependency wheel (repeatable)")
    p.add_argument("--build-id", default="", help="default: the wheel's version, or 'dev'")
    p.add_argument("--target", default="board", help="board, vm or local (default board)")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=cmd_build)
    p = bundle.add_parser("verify", help="check a bundle's signature, hash and target")
    p.add_argument("bundle")
    p.add_argument("--pubkey", required=True)
    p.add_argument("--target", default=None)
    p.set_defaults(func=cmd_verify)
    p = bundle.add_parser("inspect", help="show a bundle's header and contents")
    p.add_argument("bundle")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)
    _register_board(sub)


def _register_board(sub):
    board = sub.add_parser("board", help="dev boards: the agent and flashing").add_subparsers(
        dest="board_command", required=True, metavar="ACTION")
    p = board.add_parser("agent", help="run the board agent (on the board)")
    p.add_argument("--port", required=True, help="serial device or pyserial URL")
    p.add_argument("--slots", required=True, help="the A/B slots directory")
    p.add_argument("--pubkey", help="trusted bundle key (default SLOTS/trusted.pub)")
    p.add_argument("--baud", type=int, default=115200)
    p.add_argument("--agent-config", help="agent TOML: [agent] and [service]")
    p.set_defaults(func=cmd_agent)
    p = board.add_parser("flash", help="flash a bundle onto a board")
    p.add_argument("bundle")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--serial", help="serial device or pyserial URL of the board agent")
    how.add_argument("--usb", help="VID:PID[,ALT] of a USB DFU device; ALT is a number or a name")
    p.add_argument("--baud", type=int, default=115200)
    p.add_argument("--block-size", type=int, default=1024)
    p.add_argument("--force", action="store_true", help="flash even if the board runs this build")
    p.add_argument("--activate-timeout", type=float, default=120.0, help="seconds to wait for the health check")
    p.set_defaults(func=cmd_flash)


def _read(path) -> bytes:
    try:
        return pathlib.Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from None


def cmd_keygen(args):
    from . import bundle
    try:
        private, public = bundle.keygen(args.key)
    except bundle.BundleError as exc:
        raise UsageError(str(exc)) from None
    print(f"private key {private} (keep it secret), public key {public} (give it to the boards)")


def cmd_build(args):
    from . import bundle
    from firmware.formats.bundle import EntryKind
    entries = [(EntryKind.CONFIG, pathlib.Path(args.config).name, _check_config(args.config))]
    if args.wheel:
        entries.append((EntryKind.WHEEL, pathlib.Path(args.wheel).name, _read(args.wheel)))
    entries += [(EntryKind.DEPENDENCY, pathlib.Path(d).name, _read(d)) for d in args.dep]
    build_id = args.build_id or (pathlib.Path(args.wheel).name.split("-")[1] if args.wheel else "dev")
    try:
        key = bundle.load_private_key(args.key)
        blob = bundle.build(key, entries, build_id, bundle.parse_target(args.target))
    except bundle.BundleError as exc:
        raise UsageError(str(exc)) from None
    pathlib.Path(args.output).write_bytes(blob)
    print(f"{args.output}: build {build_id}, {len(blob)} bytes, {len(entries)} entries")


def _check_config(path) -> bytes:
    """The config must at least be TOML; a bad value is the board's health check to catch."""
    import tomllib
    data = _read(path)
    try:
        tomllib.loads(data.decode("utf8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from None
    return data


def cmd_verify(args):
    from . import bundle
    try:
        target = bundle.parse_target(args.target) if args.target else None
        key = bundle.load_public_key(args.pubkey)
        v = bundle.verify(_read(args.bundle), key, target, where=args.bundle)
    except bundle.BundleError as exc:
        if exc.kind == "key":
            raise UsageError(str(exc)) from None
        raise CommandFailed(str(exc)) from None
    print(f"{args.bundle}: OK, build {v.build_id} for {v.target_kind.name.lower()}, sha256 {v.sha256.hex()}")


def cmd_inspect(args):
    from . import bundle
    try:
        info = bundle.inspect(_read(args.bundle), where=args.bundle)
    except bundle.BundleError as exc:
        raise CommandFailed(str(exc)) from None
    if args.json:
        print(json.dumps(info, indent=1))
        return
    for key in ("build_id", "target", "created_at", "key_id", "sha256", "size_bytes"):
        print(f"{key:12} {info[key]}")
    for e in info["entries"]:
        print(f"  {e['kind']:10} {e['size_bytes']:>10}  {e['name']}")


def cmd_agent(args):
    from . import agent, bundle
    pubkey = args.pubkey or str(pathlib.Path(args.slots) / "trusted.pub")
    try:
        return agent.run(args.port, args.slots, pubkey, args.baud, args.agent_config)
    except bundle.BundleError as exc:
        raise UsageError(str(exc)) from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def cmd_flash(args):
    if args.usb:
        return _flash_usb(args)
    from . import bundle, flash_serial
    try:
        r = flash_serial.flash(args.bundle, args.serial, args.baud, sys.stderr, args.block_size,
                               args.force, args.activate_timeout)
    except FileNotFoundError:
        raise UsageError(f"{args.bundle}: no such bundle") from None
    except bundle.BundleError as exc:
        raise UsageError(str(exc)) from None
    except (flash_serial.FlashError, OSError) as exc:
        raise CommandFailed(str(exc)) from None
    if not r.skipped:
        print(f"flashed: slot {r.slot}, {r.health}; {r.bytes_sent} bytes in {r.seconds:.1f} s"
              f"{f', resumed at block {r.resumed_at_block}' if r.resumed_at_block else ''}"
              f"{f', {r.blocks_resent} blocks resent' if r.blocks_resent else ''}: {r.message}")
    else:
        print(f"unchanged: slot {r.slot} already runs this build ({r.health})")


def parse_usb_spec(spec: str):
    """'VID:PID[,ALT]' -> (vid, pid, alt) with alt an int, a name, or None."""
    ids, _, alt = spec.partition(",")
    vid, sep, pid = ids.partition(":")
    try:
        vid_n, pid_n = int(vid, 16), int(pid, 16)
    except ValueError:
        raise UsageError(f"--usb {spec!r}: expected VID:PID[,ALT] in hex, like 0483:df11,0") from None
    if not sep or not (0 <= vid_n <= 0xFFFF and 0 <= pid_n <= 0xFFFF):
        raise UsageError(f"--usb {spec!r}: expected VID:PID[,ALT] in hex, like 0483:df11,0")
    return vid_n, pid_n, (int(alt) if alt.isdigit() else alt or None)


def _flash_usb(args, backend=None):
    from . import bundle, dfu
    vid, pid, alt = parse_usb_spec(args.usb)
    blob = _read(args.bundle)
    try:
        bundle.inspect(blob, where=args.bundle)
        r = dfu.flash(blob, vid, pid, alt, backend=backend, out=sys.stderr)
    except bundle.BundleError as exc:
        raise UsageError(str(exc)) from None
    except dfu.DfuError as exc:
        raise CommandFailed(str(exc)) from None
    print(f"flashed over USB DFU: {r}")
