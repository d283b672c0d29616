"""The host side of serial flashing: `twincache board flash BUNDLE --serial DEV|URL`.

Talks to the board agent (board/agent.py) with the protocol in
firmware/formats/flashproto.py. One block is in flight at a time: the board
acks each block, and a NAK (a damaged frame, a block out of order) or a
timeout makes the flasher resend from the block the board names. Requests
carry a sequence number starting at a random value, so a flasher started
after a cut ignores replies meant for the one that was killed, then
resumes at the block the board reports. A board that already runs the
bundle's build (same SHA-256, healthy) is left alone.
"""
from __future__ import annotations

import dataclasses
import hashlib
import random
import sys
import time

from firmware.formats import FormatError
from firmware.formats import flashproto as proto

from . import bundle as bundles
from .serial_link import FrameLink, open_port

HELLO_TIMEOUT_S = 1.0
HELLO_TRIES = 5
RETRIES_MAX = 20              # resends of one block before giving up
VERIFY_TIMEOUT_S = 60.0


class FlashError(Exception):
    """The board refused the bundle or stopped answering; one line for the user."""


@dataclasses.dataclass
class FlashResult:
    skipped: bool
    slot: str
    health: str
    message: str
    resumed_at_block: int = 0
    blocks_resent: int = 0
    bytes_sent: int = 0
    seconds: float = 0.0


class Progress:
    """A progress bar with rate and ETA on a tty; plain lines (at most 4 a second) otherwise."""

    def __init__(self, total_bytes: int, out=sys.stderr, now=time.monotonic):
        self.total = total_bytes
        self.out = out
        self.now = now
        self.start = now()
        self.start_done = None
        self.last = 0.0
        self.tty = hasattr(out, "isatty") and out.isatty()

    def update(self, done_bytes: int, block: int, blocks: int, force: bool = False):
        if self.start_done is None:
            self.start_done = done_bytes   # bytes already on the board before this session
        t = self.now()
        if not force and t - self.last < (0.1 if self.tty else 0.25):
            return
        self.last = t
        rate = (done_bytes - self.start_done) / max(t - self.start, 1e-6)
        eta = (self.total - done_bytes) / rate if rate > 0 else float("inf")
        pct = 100.0 * done_bytes / max(self.total, 1)
        text = (f"{pct:5.1f}% block {block}/{blocks} {_human(rate)}/s "
                f"ETA {_clock(eta)}")
        if self.tty:
            bar = "#" * int(pct / 100 * 30)
            self.out.write(f"\r[{bar:<30}] {text}")
            if force:
                self.out.write("\n")
        else:
            self.out.write(f"progress {text}\n")
        self.out.flush()


def _human(rate: float) -> str:
    return f"{rate / 1024:.1f} KiB" if rate < 1 << 20 else f"{rate / (1 << 20):.2f} MiB"


def _clock(seconds: float) -> str:
    if seconds == float("inf"):
        return "--:--"
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


class SerialFlasher:
    def __init__(self, link: FrameLink, baud: int, out=sys.stderr, block_size: int = proto.BLOCK_SIZE_DEFAULT_BYTES,
                 activate_timeout_s: float = 120.0):
        self.link = link
        self.out = out
        self.block_size = block_size
        self.activate_timeout_s = activate_timeout_s
        self.seq = random.randrange(0, proto.SEQ_UNKNOWN)
        # Time for the longest frame on the wire at this baud (10 bits a byte), and slack for the board.
        self.block_timeout_s = 0.5 + 2 * proto.FRAME_MAX_BYTES * 10 / baud

    def say(self, text: str):
        self.out.write(text + "\n")
        self.out.flush()

    def _next_seq(self) -> int:
        self.seq = (self.seq + 1) % proto.SEQ_UNKNOWN
        return self.seq

    def wait_for(self, want, seq: int, timeout_s: float, accept_nak: bool = False):
        """The reply of type `want` to request `seq` (or a NAK), or None after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = self.link.receive(left)
            except FormatError:
                continue      # a damaged reply: the timeout makes us ask again
            if message is None:
                return None
            msg_type, rseq, body = message
            if msg_type == proto.MsgType.ERROR and rseq == seq:
                raise FlashError(f"board: {body.message}")
            if msg_type == want and rseq == seq:
                return body
            if accept_nak and msg_type == proto.MsgType.BLOCK_NAK and rseq in (seq, proto.SEQ_UNKNOWN):
                return body
        return None

    def request(self, msg_type, want, timeout_s: float, tries: int = 1, **fields):
        for _ in range(tries):
            seq = self._next_seq()
            self.link.send(msg_type, seq, **fields)
            body = self.wait_for(want, seq, timeout_s)
            if body is not None:
                return body
        raise FlashError(f"no {want.name} from the board after {tries} tries of {timeout_s:g} s")

    def hello(self):
        self.link.discard_input()
        hello = self.request(proto.MsgType.HELLO, proto.MsgType.HELLO_REPLY, HELLO_TIMEOUT_S,
                             tries=HELLO_TRIES, protocol_version=proto.PROTOCOL_VERSION, reserved=bytes(3))
        if hello.protocol_version != proto.PROTOCOL_VERSION:
            raise FlashError(f"the board speaks flash protocol {hello.protocol_version}, "
                             f"this host {proto.PROTOCOL_VERSION}")
        return hello

    def flash(self, blob: bytes, force: bool = False) -> FlashResult:
        info = bundles.inspect(blob)      # refuse a truncated or corrupt bundle before sending it
        sha = hashlib.sha256(blob).digest()
        hello = self.hello()
        self.say(f"board {hello.device!r}: slot {_slot(hello.active_slot)}, build "
                 f"{hello.active_build_id or '-'}, {proto.Health(hello.health).name.lower()}")
        if not force and hello.active_sha256 == sha and hello.health == proto.Health.HEALTHY:
            self.say(f"board already runs build {info['build_id']} (sha256 {sha.hex()[:16]}): nothing to flash")
            return FlashResult(True, _slot(hello.active_slot), "healthy", "already running this build")
        block_size = min(self.block_size, hello.block_size_max)
        started = time.monotonic()
        result = self._transfer(blob, sha, block_size)
        self._verify()
        reply = self.request(proto.MsgType.ACTIVATE, proto.MsgType.ACTIVATE_REPLY, self.activate_timeout_s)
        result.seconds = time.monotonic() - started
        result.slot, result.health = _slot(reply.slot), proto.Health(reply.health).name.lower()
        result.message = reply.message
        if reply.status == proto.Status.ROLLED_BACK:
            raise FlashError(f"activation failed, the board rolled back: {reply.message}")
        if reply.status != proto.Status.OK:
            raise FlashError(f"activation refused ({proto.Status(reply.status).name}): {reply.message}")
        return result

    def _verify(self):
        reply = self.request(proto.MsgType.VERIFY, proto.MsgType.VERIFY_REPLY, VERIFY_TIMEOUT_S)
        if reply.status != proto.Status.OK:
            raise FlashError(f"the board refused the bundle ({proto.Status(reply.status).name}): {reply.message}")
        self.say(f"board: {reply.message}")

    def _transfer(self, blob: bytes, sha: bytes, block_size: int) -> FlashResult:
        begin = self.request(proto.MsgType.BEGIN, proto.MsgType.BEGIN_REPLY, HELLO_TIMEOUT_S * 3, tries=3,
                             total_size=len(blob), sha256=sha, block_size=block_size, reserved=bytes(2))
        if begin.status != proto.Status.OK:
            raise FlashError(f"the board refused the transfer ({proto.Status(begin.status).name})")
        if begin.next_block:
            self.say(f"resuming at block {begin.next_block} of {begin.block_count} "
                     f"({begin.next_block * block_size} bytes already on the board)")
        result = FlashResult(False, "", "", "", resumed_at_block=begin.next_block)
        progress = Progress(len(blob), self.out)
        index, tries = begin.next_block, 0
        while index < begin.block_count:
            data = blob[index * block_size:(index + 1) * block_size]
            seq = self._next_seq()
            self.link.send(proto.MsgType.BLOCK, seq, index=index, data=data)
            result.bytes_sent += len(data)
            reply = self.wait_for(proto.MsgType.BLOCK_ACK, seq, self.block_timeout_s, accept_nak=True)
            index, tries = self._after_block(index, reply, tries, result)
            progress.update(min(index * block_size, len(blob)), index, begin.block_count,
                            force=index == begin.block_count)
        return result

    def _after_block(self, index: int, reply, tries: int, result: FlashResult):
        """The next block to send after the board's answer to block `index`."""
        if reply is not None and "index" in reply and reply.index == index:
            return index + 1, 0
        if tries + 1 > RETRIES_MAX:
            raise FlashError(f"block {index}: no ack after {RETRIES_MAX} resends; is the agent running?")
        result.blocks_resent += 1
        if reply is None:
            self.say(f"block {index}: no ack in {self.block_timeout_s:.2f} s, resending")
            return index, tries + 1
        if "expected" in reply:
            why = proto.NakReason(reply.reason).name if reply.reason in proto.NakReason.__members__.values() \
                else reply.reason
            self.say(f"block {index}: board NAK ({why}), resending block {reply.expected}")
            return min(reply.expected, index), tries + 1
        return index, tries + 1


def _slot(value: int) -> str:
    return "none" if value == proto.SLOT_NONE else "ab"[value]


def health(url: str, baud: int, out=sys.stderr) -> dict:
    """Ask the agent for its slot, build and health (for `inv board.health`)."""
    with open_port(url, baud) as port:
        hello = SerialFlasher(FrameLink(port, url), baud, out).hello()
    return {"device": hello.device, "slot": _slot(hello.active_slot), "build_id": hello.active_build_id,
            "sha256": hello.active_sha256.hex(), "health": proto.Health(hello.health).name.lower()}


def flash(bundle_path, url: str, baud: int = 115200, out=sys.stderr, block_size: int = proto.BLOCK_SIZE_DEFAULT_BYTES,
          force: bool = False, activate_timeout_s: float = 120.0) -> FlashResult:
    with open(bundle_path, "rb") as f:
        blob = f.read()
    with open_port(url, baud) as port:
        flasher = SerialFlasher(FrameLink(port, url), baud, out, block_size, activate_timeout_s)
        return flasher.flash(blob, force=force)
