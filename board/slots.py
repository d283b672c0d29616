"""The board's A/B slots directory: the incoming transfer, two installed slots, boot state.

    DIR/state.json        {"active", "previous", "pending", "health", "failed"}
    DIR/incoming/part     the bundle being received, written block by block
    DIR/incoming/transfer.json   its SHA-256, size, block size and a checkpoint
    DIR/a/, DIR/b/        bundle.tcb, config.toml, wheels/, build.json, service.log

A new bundle always goes to the inactive slot, so the running one is never
touched. `pending` is set when a slot is switched to and cleared when its
health check passes: an agent that finds it set at start rolls back, as a
bootloader's boot counter would. state.json is replaced by rename, so a
power cut leaves the old state or the new one.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil

from firmware.formats import bundle as fmt

SLOTS = ("a", "b")
CHECKPOINT_BLOCKS = 32        # fsync the part file and record progress this often


class SlotError(Exception):
    """The slots directory cannot do what was asked."""


class Transfer:
    """One incoming bundle: blocks arrive in order; `next_block` is the first one missing."""

    def __init__(self, path: pathlib.Path, sha256: bytes, size: int, block_size: int, next_block: int = 0):
        self.path = path
        self.sha256 = sha256
        self.size = size
        self.block_size = block_size
        self.block_count = max(1, -(-size // block_size))
        self.next_block = next_block

    def block_length(self, index: int) -> int:
        return min(self.block_size, self.size - index * self.block_size)

    @property
    def complete(self) -> bool:
        return self.next_block >= self.block_count


class SlotStore:
    def __init__(self, root, max_bundle_bytes: int = 64 << 20):
        self.root = pathlib.Path(root)
        self.max_bundle_bytes = max_bundle_bytes
        self.incoming = self.root / "incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.transfer = self._load_transfer()

    # -- boot state --------------------------------------------------------

    def state(self) -> dict:
        try:
            return json.loads((self.root / "state.json").read_text())
        except FileNotFoundError:
            return {"active": None, "previous": None, "pending": False, "health": "no_firmware", "failed": {}}

    def save_state(self, state: dict):
        _write_atomic(self.root / "state.json", json.dumps(state, indent=1).encode())

    def slot_dir(self, slot: str) -> pathlib.Path:
        assert slot in SLOTS
        return self.root / slot

    def inactive(self) -> str:
        return "b" if self.state()["active"] == "a" else "a"

    def slot_info(self, slot: str | None) -> dict:
        if slot is None:
            return {}
        try:
            return json.loads((self.slot_dir(slot) / "build.json").read_text())
        except FileNotFoundError:
            return {}

    # -- the incoming transfer --------------------------------------------

    def begin(self, sha256: bytes, size: int, block_size: int) -> Transfer:
        if size > self.max_bundle_bytes:
            raise SlotError(f"bundle of {size} bytes exceeds the slot size {self.max_bundle_bytes}")
        t = self.transfer
        if t and (t.sha256, t.size, t.block_size) == (sha256, size, block_size):
            return t          # the same bundle again: resume where it stopped
        part = self.incoming / "part"
        with open(part, "wb") as f:
            f.truncate(size)
        self.transfer = Transfer(part, sha256, size, block_size)
        self._checkpoint()
        return self.transfer

    def write_block(self, index: int, data: bytes):
        t = self.transfer
        assert t is not None and index == t.next_block and len(data) == t.block_length(index)
        fd = os.open(t.path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, index * t.block_size)
            if (index + 1) % CHECKPOINT_BLOCKS == 0 or index + 1 == t.block_count:
                os.fsync(fd)  # the checkpoint must never promise blocks that are not on disk
        finally:
            os.close(fd)
        t.next_block = index + 1
        if t.next_block % CHECKPOINT_BLOCKS == 0 or t.complete:
            self._checkpoint()

    def received_bytes(self) -> bytes:
        t = self.transfer
        if t is None or not t.complete:
            raise SlotError("the transfer is not complete")
        blob = t.path.read_bytes()
        if hashlib.sha256(blob).digest() != t.sha256:
            raise SlotError("the received bundle does not match the SHA-256 given at BEGIN")
        return blob

    def clear_transfer(self):
        self.transfer = None
        for name in ("part", "transfer.json"):
            (self.incoming / name).unlink(missing_ok=True)

    def _checkpoint(self):
        t = self.transfer
        record = {"sha256": t.sha256.hex(), "size": t.size, "block_size": t.block_size,
                  "next_block": t.next_block}
        _write_atomic(self.incoming / "transfer.json", json.dumps(record).encode())

    def _load_transfer(self) -> Transfer | None:
        try:
            r = json.loads((self.incoming / "transfer.json").read_text())
            return Transfer(self.incoming / "part", bytes.fromhex(r["sha256"]), r["size"],
                            r["block_size"], r["next_block"])
        except (FileNotFoundError, ValueError, KeyError):
            return None

    # -- installing and switching -------------------------------------------

    def install(self, slot: str, blob: bytes, verified) -> pathlib.Path:
        """Unpack a verified bundle into `slot` (which must not be the active one)."""
        assert slot != self.state()["active"]
        final = self.slot_dir(slot)
        staging = self.root / f".{slot}.new"
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "wheels").mkdir(parents=True)
        _write_atomic(staging / "bundle.tcb", blob)
        for kind, name, data in verified.entries:
            target = staging / "config.toml" if kind == fmt.EntryKind.CONFIG else \
                staging / "wheels" / pathlib.PurePath(name).name
            target.write_bytes(data)
        info = {"build_id": verified.build_id, "sha256": verified.sha256.hex(),
                "created_at_s": verified.created_at_s}
        _write_atomic(staging / "build.json", json.dumps(info).encode())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        return final

    def switch(self, slot: str):
        state = self.state()
        state.update(previous=state["active"], active=slot, pending=True, health="unknown")
        self.save_state(state)

    def confirm(self, health: str):
        state = self.state()
        state.update(pending=False, health=health)
        self.save_state(state)

    def rollback(self, reason: str) -> str | None:
        """Make the previous slot active again; return it (None if there was none)."""
        state = self.state()
        failed = state["active"]
        state["failed"][failed] = {"sha256": self.slot_info(failed).get("sha256", ""), "reason": reason}
        state.update(active=state["previous"], previous=None, pending=False, health="rolled_back")
        self.save_state(state)
        return state["active"]


def _write_atomic(path: pathlib.Path, data: bytes):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
