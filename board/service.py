"""The board's controller service: start, stop, and the health check that decides rollback.

The service command and the health probe come from the agent config
(`[service]`), so a board can run the controller however it must. Health
means: the service process is still running, and an NBD handshake succeeds
on the endpoint in the bundle's controller config ([nbd] unix or tcp)
within `health_timeout_s`: the server's NBDMAGIC + IHAVEOPT greeting,
NBD_OPT_LIST naming at least one export, then NBD_OPT_ABORT. The process
must then stay up for `settle_s` more. With `health = "process"` only the
process check is made (for services that serve no NBD).
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import socket
import struct
import subprocess
import sys
import time
import tomllib

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
# The protocol's numbers come from the host port's declaration of them (hal/host/nbd.py).
from hal.host.nbd import (NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_NO_ZEROES, NBD_OPT_ABORT,  # noqa: E402
                     NBD_OPT_LIST, NBD_REP_ACK, NBD_REP_FLAG_ERROR as NBD_REP_ERROR_BIT,
                     NBD_REP_MAGIC, NBD_REP_SERVER)
NBD_REPLIES_MAX = 4096          # exports listed before we call the server broken
NBD_REPLY_DATA_MAX_BYTES = 65536

# {twincache} is the console script of the slot's venv if it has one, else the agent's own.
DEFAULT_COMMAND = ["{twincache}", "controller", "run", "--config", "{config}"]


class HealthError(Exception):
    """The controller is not serving; the message says what was seen."""


@dataclasses.dataclass
class ServiceConfig:
    command: list = dataclasses.field(default_factory=lambda: list(DEFAULT_COMMAND))
    health: str = "nbd"             # "nbd" or "process"
    health_timeout_s: float = 20.0
    settle_s: float = 1.0           # the process must stay up this long after the probe
    stop_timeout_s: float = 5.0
    install: bool = False           # make a venv in the slot and pip-install its wheels offline


def load_service_config(doc: dict, where: str) -> ServiceConfig:
    section = doc.get("service", {})
    cfg = ServiceConfig()
    for field in dataclasses.fields(ServiceConfig):
        if field.name not in section:
            continue
        value = section[field.name]
        default = getattr(cfg, field.name)
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not type(default):
            raise ValueError(f"{where}: [service] {field.name} = {value!r} must be {type(default).__name__}")
        setattr(cfg, field.name, value)
    if cfg.health not in ("nbd", "process"):
        raise ValueError(f"{where}: [service] health = {cfg.health!r}: choose nbd or process")
    return cfg


class Service:
    """One running controller process, in its own session so a stop takes its children too."""

    def __init__(self, cfg: ServiceConfig, slot_dir, config_path, cwd, log_path):
        self.cfg = cfg
        self.config_path = pathlib.Path(config_path)
        self.log_path = pathlib.Path(log_path)
        venv_bin = pathlib.Path(slot_dir) / "venv" / "bin"
        bindir = venv_bin if (venv_bin / "python").exists() else pathlib.Path(sys.executable).parent
        subs = {"python": str(bindir / "python") if bindir == venv_bin else sys.executable,
                "twincache": str(bindir / "twincache"), "config": str(config_path), "slot": str(slot_dir)}
        argv = [part.format(**subs) for part in cfg.command]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self):
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(self.cfg.stop_timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def exit_message(self) -> str:
        tail = self.log_path.read_bytes()[-400:].decode("utf8", "replace").strip().splitlines()
        last = tail[-1] if tail else "(no output)"
        return f"service exited with status {self.proc.returncode}: {last}"

    def check_health(self, now=time.monotonic, sleep=time.sleep) -> str:
        """Return a one-line description of a healthy service, or raise HealthError."""
        deadline = now() + self.cfg.health_timeout_s
        endpoint = nbd_endpoint(self.config_path) if self.cfg.health == "nbd" else None
        last = "no probe made"
        while now() < deadline:
            if not self.alive():
                raise HealthError(self.exit_message())
            if endpoint is None:
                break
            try:
                exports = nbd_probe(endpoint, timeout_s=min(2.0, self.cfg.health_timeout_s))
                last = f"NBD on {endpoint[1]} lists {len(exports)} export(s): {', '.join(exports)[:80]}"
                break
            except HealthError as exc:
                last = str(exc)
                sleep(0.1)
        else:
            raise HealthError(f"not serving within {self.cfg.health_timeout_s:g} s: {last}")
        sleep(self.cfg.settle_s)
        if not self.alive():
            raise HealthError(self.exit_message())
        return last if endpoint else f"process {self.proc.pid} up"


def nbd_endpoint(config_path) -> tuple:
    """("unix", path) or ("tcp", (host, port)) from the controller config's [nbd] section."""
    try:
        doc = tomllib.loads(pathlib.Path(config_path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise HealthError(f"{config_path}: cannot read the NBD endpoint ({exc})") from None
    nbd = doc.get("nbd", {}) if isinstance(doc.get("nbd", {}), dict) else {}
    if isinstance(nbd.get("unix"), str) and nbd["unix"]:
        return ("unix", nbd["unix"])
    if isinstance(nbd.get("tcp"), str) and ":" in nbd["tcp"]:
        host, _, port = nbd["tcp"].rpartition(":")
        if port.isdigit():
            return ("tcp", (host.strip("[]"), int(port)))
    raise HealthError(f"{config_path}: [nbd] names no unix socket or tcp address")


def nbd_probe(endpoint: tuple, timeout_s: float = 2.0) -> list:
    """Run the fixed-newstyle NBD handshake and NBD_OPT_LIST; return the export names."""
    family = socket.AF_UNIX if endpoint[0] == "unix" else socket.AF_INET6 if ":" in endpoint[1][0] \
        else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(endpoint[1])
            return _nbd_list(sock)
    except (OSError, struct.error) as exc:
        raise HealthError(f"NBD {endpoint[1]}: {exc or type(exc).__name__}") from None


def _nbd_list(sock) -> list:
    greeting = _recv_exact(sock, 18)
    if greeting[:8] != NBDMAGIC or greeting[8:16] != IHAVEOPT:
        raise HealthError(f"not an NBD newstyle server (greeting {greeting[:16]!r})")
    (flags,) = struct.unpack(">H", greeting[16:])
    if not flags & NBD_FLAG_FIXED_NEWSTYLE:
        raise HealthError("the NBD server does not offer fixed newstyle negotiation")
    sock.sendall(struct.pack(">I", NBD_FLAG_FIXED_NEWSTYLE | (flags & NBD_FLAG_NO_ZEROES)))
    sock.sendall(IHAVEOPT + struct.pack(">II", NBD_OPT_LIST, 0))
    exports = []
    for _ in range(NBD_REPLIES_MAX):
        rtype, data = _nbd_reply(sock, NBD_OPT_LIST)
        if rtype == NBD_REP_ACK:
            break
        if rtype & NBD_REP_ERROR_BIT:
            raise HealthError(f"NBD_OPT_LIST refused: reply type 0x{rtype:08x} {data[:80]!r}")
        if rtype == NBD_REP_SERVER:
            (name_len,) = struct.unpack(">I", data[:4])
            exports.append(data[4:4 + name_len].decode("utf8", "replace"))
    else:
        raise HealthError(f"NBD_OPT_LIST sent more than {NBD_REPLIES_MAX} replies")
    if not exports:
        raise HealthError("NBD server lists no export")
    sock.sendall(IHAVEOPT + struct.pack(">II", NBD_OPT_ABORT, 0))
    _abort_ack(sock)
    return exports


def _nbd_reply(sock, option: int):
    magic, opt, rtype, length = struct.unpack(">QIII", _recv_exact(sock, 20))
    if magic != NBD_REP_MAGIC or opt != option:
        raise HealthError(f"bad NBD option reply (magic 0x{magic:x}, option {opt})")
    if length > NBD_REPLY_DATA_MAX_BYTES:
        raise HealthError(f"NBD option reply of {length} bytes")
    return rtype, _recv_exact(sock, length)


def _abort_ack(sock):
    # The server SHOULD ack NBD_OPT_ABORT and may just close; either ends the probe well.
    try:
        _nbd_reply(sock, NBD_OPT_ABORT)
    except (OSError, HealthError, struct.error):
        pass


def _recv_exact(sock, count: int) -> bytes:
    buf = bytearray()
    while len(buf) < count:
        chunk = sock.recv(count - len(buf))
        if not chunk:
            raise HealthError(f"NBD server closed the connection after {len(buf)} of {count} bytes")
        buf += chunk
    return bytes(buf)
