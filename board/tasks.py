"""invoke tasks for dev boards: `inv board.provision`, `board.bundle`, `board.flash`, `board.console`, `board.health`.

Loaded by tasks.py as the `board` collection. They wrap the `twincache
bundle` and `twincache board` commands, so a lab script and a person do
the same thing.
"""
import os
import pathlib
import sys
import time

from invoke import task

ROOT = pathlib.Path(__file__).resolve().parent.parent
TWINCACHE = os.path.join(os.path.dirname(sys.executable), "twincache")


def _dependencies():
    """The names of the project's runtime dependencies, from pyproject.toml (one list to keep)."""
    import re
    import tomllib
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {_normal(re.split(r"[<>=!~; \[]", d, maxsplit=1)[0]) for d in deps}


def _normal(name):
    return name.strip().lower().replace("_", "-")


@task(help={"config": "the board's controller config (TOML), the one its bundles carry",
            "force": "relabel disks that hold data (another pair's label, or non-zero bytes)",
            "dry_run": "say what would be done, write nothing"})
def provision(c, config, force=False, dry_run=False):
    """Once, on a new board: create its pair key and label its disks (`twincache provision`)."""
    c.run(f"{TWINCACHE} provision --config {config}" + (" --force" if force else "")
          + (" --dry-run" if dry_run else ""))


@task(help={"key": "Ed25519 private key (make one with `twincache bundle keygen KEY`)",
            "config": "the board's controller config (TOML)", "out": "bundle file to write",
            "wheels": "directory for the wheels (default build/wheels)", "build_id": "default: the version"})
def bundle(c, key, config, out="build/twincache.tcb", wheels="build/wheels", build_id=""):
    """Build the twincache wheel and its pinned dependency wheels, then a signed bundle."""
    wheel_dir = ROOT / wheels
    wheel_dir.mkdir(parents=True, exist_ok=True)
    c.run(f"{sys.executable} -m pip wheel --no-deps -w {wheel_dir} {ROOT}")
    pins = c.run(f"{sys.executable} -m pip freeze", hide=True).stdout.splitlines()
    wanted = _dependencies()
    pinned = [line for line in pins if _normal(line.split("==")[0]) in wanted]
    c.run(f"{sys.executable} -m pip wheel --no-deps -w {wheel_dir} " + " ".join(pinned))
    ours = sorted(wheel_dir.glob("twincache-*.whl"))[-1]
    deps = " ".join(f"--dep {p}" for p in sorted(wheel_dir.glob("*.whl")) if p != ours)
    bid = f"--build-id {build_id}" if build_id else ""
    c.run(f"{TWINCACHE} bundle build --key {key} --config {config} --wheel {ours} {deps} {bid} -o {out}")


@task(help={"bundle": "the signed bundle", "serial": "serial device or pyserial URL of the board agent",
            "usb": "VID:PID[,ALT] of a USB DFU bootloader", "baud": "serial baud rate"})
def flash(c, bundle, serial="", usb="", baud=115200, force=False):
    """Flash a bundle over the serial agent or USB DFU."""
    if bool(serial) == bool(usb):
        sys.exit("board.flash: give --serial or --usb")
    how = f"--serial {serial} --baud {baud}" if serial else f"--usb {usb}"
    c.run(f"{TWINCACHE} board flash {bundle} {how}{' --force' if force else ''}", pty=sys.stdout.isatty())


@task(help={"port": "serial device or pyserial URL", "baud": "baud rate",
            "log": "append the timestamped console to this file"})
def console(c, port, baud=115200, log=""):
    """A serial console: every line printed with a timestamp (and logged); what you type is sent."""
    import threading

    import serial
    conn = serial.serial_for_url(port, baudrate=baud, timeout=0.1)
    sink = open(log, "a", buffering=1) if log else None
    threading.Thread(target=_send_stdin, args=(conn,), daemon=True).start()
    buf = b""
    try:
        while True:
            buf += conn.read(conn.in_waiting or 1)
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                _emit(line.decode("utf8", "replace").rstrip("\r"), sink)
    except KeyboardInterrupt:
        pass
    finally:
        conn.close()
        if sink:
            sink.close()


def _emit(line: str, sink):
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime()) + f".{int(time.time() * 1000) % 1000:03d}"
    text = f"{stamp} {line}"
    print(text, flush=True)
    if sink:
        sink.write(text + "\n")


def _send_stdin(conn):
    for line in sys.stdin:
        conn.write(line.encode())


@task(help={"serial": "serial device or pyserial URL of the board agent", "nbd": "probe this NBD unix socket "
            "or host:port directly instead", "baud": "serial baud rate"})
def health(c, serial="", nbd="", baud=115200):
    """The board's slot, build and health (from the agent), or an NBD probe of a controller."""
    if nbd:
        from board.service import HealthError, nbd_probe
        host, _, port = nbd.rpartition(":")
        endpoint = ("tcp", (host, int(port))) if port.isdigit() and host else ("unix", nbd)
        try:
            print(f"NBD {nbd}: exports {nbd_probe(endpoint)}")
        except HealthError as exc:
            sys.exit(f"NBD {nbd}: unhealthy: {exc}")
        return
    if not serial:
        sys.exit("board.health: give --serial or --nbd")
    from board.flash_serial import FlashError, health as board_health
    try:
        info = board_health(serial, baud)
    except (FlashError, OSError) as exc:
        sys.exit(f"board.health: {exc}")
    print(" ".join(f"{k}={v}" for k, v in info.items()))
    if info["health"] != "healthy":
        sys.exit(1)
