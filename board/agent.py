"""The board agent: runs on the board, serves the flashing protocol, supervises the controller.

`twincache board agent --port DEV --slots DIR` answers one host at a time on
a serial line (firmware/formats/flashproto.py over board/serial_link.py). It
writes a new bundle into the inactive A/B slot (board/slots.py), verifies
its hash, signature and target, switches the boot slot, restarts the
controller service and runs its health check (board/service.py). A slot
that fails the check is rolled back by the agent itself, without the host.

The agent config (TOML, optional):

    [agent]
    device = "board0"          # name reported in HELLO
    target = "board"           # bundles for another target kind are refused
    block_size_max = 4096
    max_bundle_size = "64M"
    [service]                  # see board/service.py
    command = ["{twincache}", "controller", "run", "--config", "{config}"]   # also {python}, {slot}
    health = "nbd"
    health_timeout_s = 20
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
import signal
import subprocess
import sys
import time
import tomllib

import serial

from firmware.formats import FormatError
from firmware.formats import flashproto as proto
from hal.runtime.config import ConfigError, parse_size

from . import bundle as bundles
from .service import HealthError, Service, ServiceConfig, load_service_config
from .serial_link import FrameLink, open_port
from .slots import SlotError, SlotStore

log = logging.getLogger("twincache.agent")

HEALTH = {"healthy": proto.Health.HEALTHY, "unhealthy": proto.Health.UNHEALTHY,
          "rolled_back": proto.Health.ROLLED_BACK, "no_firmware": proto.Health.NO_FIRMWARE}
VERIFY_STATUS = {"signature": proto.Status.BAD_SIGNATURE, "target": proto.Status.WRONG_TARGET,
                 "format": proto.Status.BAD_BUNDLE}


@dataclasses.dataclass
class AgentConfig:
    device: str = "board0"
    target: str = "board"
    block_size_max: int = proto.BLOCK_SIZE_MAX_BYTES
    max_bundle_bytes: int = 64 << 20
    service: ServiceConfig = dataclasses.field(default_factory=ServiceConfig)


def load_agent_config(path) -> AgentConfig:
    if path is None:
        return AgentConfig()
    try:
        doc = tomllib.loads(pathlib.Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the agent config ({exc})") from None
    a = doc.get("agent", {})
    cfg = AgentConfig(device=str(a.get("device", "board0")), target=str(a.get("target", "board")),
                      service=load_service_config(doc, str(path)))
    cfg.block_size_max = int(a.get("block_size_max", proto.BLOCK_SIZE_MAX_BYTES))
    if not 16 <= cfg.block_size_max <= proto.BLOCK_SIZE_MAX_BYTES:
        raise ValueError(f"{path}: [agent] block_size_max must be 16..{proto.BLOCK_SIZE_MAX_BYTES}")
    try:
        cfg.max_bundle_bytes = parse_size(a.get("max_bundle_size", "64M"), f"{path}: [agent] max_bundle_size")
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    return cfg


class Agent:
    """The protocol handlers and the slot/service logic; the serial loop is `serve`."""

    def __init__(self, link: FrameLink, store: SlotStore, public_key, cfg: AgentConfig):
        self.link = link
        self.store = store
        self.public_key = public_key
        self.cfg = cfg
        self.target = bundles.parse_target(cfg.target)
        self.service: Service | None = None
        self.verified = None          # (blob, VerifiedBundle) of the complete transfer
        self.handlers = {
            proto.MsgType.HELLO: self._hello, proto.MsgType.BEGIN: self._begin,
            proto.MsgType.BLOCK: self._block, proto.MsgType.VERIFY: self._verify,
            proto.MsgType.ACTIVATE: self._activate,
        }

    # -- the loop --------------------------------------------------------------

    def serve(self, should_stop=lambda: False):
        while not should_stop():
            try:
                message = self.link.receive(timeout_s=0.5)
            except FormatError as exc:
                self._bad_frame(exc)
                continue
            if message is not None:
                self.handle(*message)

    def handle(self, msg_type, seq: int, body):
        handler = self.handlers.get(msg_type)
        if handler is None:
            log.warning("unexpected %s from the host", msg_type.name)
            self.link.send(proto.MsgType.ERROR, seq, status=proto.Status.BAD_REQUEST,
                           message=f"the agent does not serve {msg_type.name}")
            return
        handler(seq, body)

    def _bad_frame(self, exc):
        expected = self.store.transfer.next_block if self.store.transfer else 0
        log.warning("damaged frame (%s): NAK, expecting block %d", exc, expected)
        self.link.send(proto.MsgType.BLOCK_NAK, proto.SEQ_UNKNOWN, expected=expected,
                       reason=proto.NakReason.BAD_FRAME)

    # -- handlers ---------------------------------------------------------------

    def _hello(self, seq, body):
        state = self.store.state()
        info = self.store.slot_info(state["active"])
        self.link.send(proto.MsgType.HELLO_REPLY, seq, protocol_version=proto.PROTOCOL_VERSION,
                       target_kind=int(self.target),
                       active_slot=proto.SLOT_NONE if state["active"] is None else "ab".index(state["active"]),
                       health=int(self.current_health()), block_size_max=self.cfg.block_size_max,
                       reserved=bytes(2), device=self.cfg.device[:32],
                       active_sha256=bytes.fromhex(info.get("sha256", "")) or bytes(32),
                       active_build_id=info.get("build_id", "")[:32])

    def current_health(self) -> proto.Health:
        state = self.store.state()
        if state["active"] is None:
            return proto.Health.NO_FIRMWARE
        if self.service is not None and not self.service.alive():
            return proto.Health.UNHEALTHY   # it died after its health check passed
        return HEALTH.get(state["health"], proto.Health.UNKNOWN)

    def _begin(self, seq, body):
        self.verified = None
        if not 16 <= body.block_size <= self.cfg.block_size_max:
            return self._begin_reply(seq, proto.Status.BAD_REQUEST, 0, 0)
        try:
            t = self.store.begin(body.sha256, body.total_size, body.block_size)
        except SlotError as exc:
            log.warning("BEGIN refused: %s", exc)
            return self._begin_reply(seq, proto.Status.TOO_LARGE, 0, 0)
        log.info("BEGIN %d bytes sha256 %s: %s at block %d of %d", t.size, t.sha256.hex()[:16],
                 "resuming" if t.next_block else "starting", t.next_block, t.block_count)
        self._begin_reply(seq, proto.Status.OK, t.next_block, t.block_count)

    def _begin_reply(self, seq, status, next_block, block_count):
        self.link.send(proto.MsgType.BEGIN_REPLY, seq, status=status, reserved=bytes(3),
                       next_block=next_block, block_count=block_count)

    def _block(self, seq, body):
        t = self.store.transfer
        if t is None:
            return self._nak(seq, 0, proto.NakReason.NO_TRANSFER)
        if body.index < t.next_block:
            return self.link.send(proto.MsgType.BLOCK_ACK, seq, index=body.index)  # a resend
        if body.index > t.next_block or body.index >= t.block_count:
            return self._nak(seq, t.next_block, proto.NakReason.OUT_OF_ORDER)
        if len(body.data) != t.block_length(body.index):
            return self._nak(seq, t.next_block, proto.NakReason.BAD_FRAME)
        self.store.write_block(body.index, body.data)
        self.link.send(proto.MsgType.BLOCK_ACK, seq, index=body.index)

    def _nak(self, seq, expected, reason):
        log.warning("block NAK: expecting %d (%s)", expected, reason.name)
        self.link.send(proto.MsgType.BLOCK_NAK, seq, expected=expected, reason=reason)

    def _verify(self, seq, body):
        status, message = self._check_transfer()
        self.link.send(proto.MsgType.VERIFY_REPLY, seq, status=status, message=message)

    def _check_transfer(self):
        if self.verified is not None:
            return proto.Status.OK, f"build {self.verified[1].build_id} verified"
        if self.store.transfer is None:
            return proto.Status.NO_TRANSFER, "no bundle has been sent"
        if not self.store.transfer.complete:
            return proto.Status.INCOMPLETE, f"block {self.store.transfer.next_block} has not arrived"
        try:
            blob = self.store.received_bytes()
            verified = bundles.verify(blob, self.public_key, self.target, where="received bundle")
        except SlotError as exc:
            self.store.clear_transfer()
            return proto.Status.HASH_MISMATCH, str(exc)
        except bundles.BundleError as exc:
            log.warning("bundle refused: %s", exc)
            self.store.clear_transfer()   # useless now; the next BEGIN starts afresh
            return VERIFY_STATUS.get(exc.kind, proto.Status.BAD_BUNDLE), str(exc)
        self.verified = (blob, verified)
        log.info("verified build %s (sha256 %s)", verified.build_id, verified.sha256.hex()[:16])
        return proto.Status.OK, f"build {verified.build_id} verified"

    def _activate(self, seq, body):
        status, message = self._check_transfer()
        if status != proto.Status.OK:
            return self._activate_reply(seq, status, message)
        blob, verified = self.verified
        slot = self.store.inactive()
        try:
            self._install(slot, blob, verified)
        except (OSError, SlotError, subprocess.CalledProcessError) as exc:
            return self._activate_reply(seq, proto.Status.FAILED, f"installing slot {slot}: {exc}")
        self.store.clear_transfer()
        self.verified = None
        self.stop_service()
        self.store.switch(slot)
        log.info("switched to slot %s (build %s); health check", slot, verified.build_id)
        ok, detail = self.start_and_check()
        if ok:
            return self._activate_reply(seq, proto.Status.OK, detail)
        self._activate_reply(seq, proto.Status.ROLLED_BACK, self.roll_back(detail))

    def _activate_reply(self, seq, status, message):
        state = self.store.state()
        slot = proto.SLOT_NONE if state["active"] is None else "ab".index(state["active"])
        self.link.send(proto.MsgType.ACTIVATE_REPLY, seq, status=status, slot=slot,
                       health=int(self.current_health()), reserved=0, message=message[:1000])

    # -- slots and the service ---------------------------------------------------

    def _install(self, slot, blob, verified):
        slot_dir = self.store.install(slot, blob, verified)
        if self.cfg.service.install:
            # The slot gets its own environment, so the old slot keeps running what it had.
            subprocess.run([sys.executable, "-m", "venv", str(slot_dir / "venv")], check=True)
            wheels = sorted(str(p) for p in (slot_dir / "wheels").glob("*.whl"))
            subprocess.run([str(slot_dir / "venv" / "bin" / "pip"), "install", "--no-index",
                            "--find-links", str(slot_dir / "wheels"), *wheels], check=True)

    def start_and_check(self) -> tuple[bool, str]:
        """Start the active slot's service and run its health check; record the result."""
        slot = self.store.state()["active"]
        slot_dir = self.store.slot_dir(slot)
        self.service = Service(self.cfg.service, slot_dir, slot_dir / "config.toml",
                               cwd=self.store.root, log_path=slot_dir / "service.log")
        try:
            detail = self.service.check_health()
        except HealthError as exc:
            log.warning("slot %s failed its health check: %s", slot, exc)
            self.store.confirm("unhealthy")
            return False, str(exc)
        log.info("slot %s healthy: %s", slot, detail)
        self.store.confirm("healthy")
        return True, f"slot {slot} healthy: {detail}"

    def roll_back(self, reason: str) -> str:
        self.stop_service()
        failed = self.store.state()["active"]
        previous = self.store.rollback(reason)
        if previous is None:
            return f"slot {failed} failed its health check ({reason}); no previous slot to roll back to"
        ok, detail = self.start_and_check()
        log.warning("rolled back from slot %s to slot %s", failed, previous)
        return (f"slot {failed} failed its health check ({reason}); rolled back to slot {previous}"
                f" ({detail if ok else 'which is not healthy either: ' + detail})")

    def stop_service(self):
        if self.service is not None:
            self.service.stop()
            self.service = None

    def boot(self):
        """What the agent does at start: finish an interrupted switch, start the active slot."""
        state = self.store.state()
        if state["pending"]:
            log.warning("slot %s was switched to but never passed its health check", state["active"])
            self.store.rollback("the agent restarted before the health check passed")
        if self.store.state()["active"] is not None:
            self.start_and_check()


def run(port_url: str, slots_dir, public_key_path, baud: int = 115200, config_path=None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s agent %(levelname)s %(message)s")
    cfg = load_agent_config(config_path)
    public_key = bundles.load_public_key(public_key_path)
    store = SlotStore(slots_dir, cfg.max_bundle_bytes)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    agent = Agent(None, store, public_key, cfg)
    agent.boot()
    try:
        while not stopping:
            try:
                agent.link = FrameLink(open_port(port_url, baud), port_url)
                log.info("listening on %s at %d baud, slots in %s", port_url, baud, slots_dir)
                agent.serve(should_stop=lambda: bool(stopping))
            except (OSError, serial.SerialException) as exc:
                log.warning("serial port: %s; reopening in 1 s", exc)
                time.sleep(1)
    finally:
        agent.stop_service()
    return 0
