"""Serial flashing end to end: the board agent and the flasher as real processes on two real ptys.

The cable between them (fixtures/board.py) is a relay between two pty pairs,
so a corrupted byte or a cut happens on the wire. The controller service is
the real `twincache controller run`; where it is not in the tree yet, the one
test that needs a healthy controller is skipped and the others hold.
"""
import hashlib
import json
import re
import signal
import socket
import subprocess
import threading
import time

import pytest
import serial

from board import slots as slotmod
from board.agent import Agent, AgentConfig
from board.bundle import load_public_key, verify
from board.serial_link import FrameLink
from board.service import HealthError, Service, ServiceConfig, nbd_probe
from firmware.formats import FormatError
from firmware.formats import flashproto as proto
from fixtures.board import (Board, SerialCable, board, controller_available,  # noqa: F401
                            controller_config, serial_cable)

CONTROLLER = controller_available()
needs_controller = pytest.mark.skipif(not CONTROLLER, reason="needs twincache controller run (issue 3)")


def state(b: Board) -> dict:
    return json.loads((b.slots / "state.json").read_text())


def slot_sha(b: Board, slot: str) -> str:
    return hashlib.sha256((b.slots / slot / "bundle.tcb").read_bytes()).hexdigest()


# -- framing on a real pyserial port ------------------------------------------------

def test_frames_cross_a_serial_loopback_whole_and_byte_by_byte():
    port = serial.serial_for_url("loop://", timeout=0.05)
    link = FrameLink(port, "loop")
    link.send(proto.MsgType.BLOCK, 7, index=3, data=bytes(range(256)) * 4)
    assert link.receive(1) == (proto.MsgType.BLOCK, 7, {"index": 3, "data": bytes(range(256)) * 4})
    raw = link.port
    encoded = bytearray()
    link.send(proto.MsgType.BLOCK_ACK, 9, index=1)
    encoded += raw.read(raw.in_waiting)
    for byte in encoded:      # one byte at a time: nothing until the delimiter
        raw.write(bytes([byte]))
        got = link.receive(0.01)
    assert got == (proto.MsgType.BLOCK_ACK, 9, {"index": 1})


def test_a_damaged_frame_is_reported_and_the_next_one_still_reads():
    port = serial.serial_for_url("loop://", timeout=0.05)
    link = FrameLink(port, "loop")
    link.send(proto.MsgType.BLOCK_ACK, 1, index=5)
    data = bytearray(port.read(port.in_waiting))
    data[4] ^= 0x10
    port.write(bytes(data))
    link.send(proto.MsgType.BLOCK_ACK, 2, index=6)
    with pytest.raises(FormatError):
        link.receive(1)
    assert link.receive(1) == (proto.MsgType.BLOCK_ACK, 2, {"index": 6})


# -- the NBD health probe and the service health check -------------------------------

@pytest.mark.needs("nbdkit")
def test_nbd_probe_lists_the_exports_of_a_real_nbd_server(tmp_path):
    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen(["nbdkit", "-f", "-U", str(sock), "memory", "1M"])
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert nbd_probe(("unix", str(sock))) == [""]
    finally:
        proc.terminate()
        proc.wait()


def test_nbd_probe_refuses_a_server_that_is_not_nbd(tmp_path):
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "s"))
    listener.listen(1)

    def serve():
        conn, _ = listener.accept()
        conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
        conn.close()
    threading.Thread(target=serve, daemon=True).start()
    with pytest.raises(HealthError, match="not an NBD newstyle server"):
        nbd_probe(("unix", str(tmp_path / "s")), timeout_s=2)
    listener.close()


@pytest.mark.needs("nbdkit")
def test_service_health_check_passes_for_a_serving_process_and_fails_when_it_dies(tmp_path):
    # nbdkit stands in as *a service that serves NBD* to test the health check itself;
    # the end-to-end flash tests run the real controller.
    cfg_path = tmp_path / "controller.toml"
    cfg_path.write_text(f'[nbd]\nunix = "{tmp_path / "nbd.sock"}"\n')
    cfg = ServiceConfig(command=["nbdkit", "-f", "-U", "{slot}/nbd.sock", "memory", "1M"],
                        health_timeout_s=5, settle_s=0.2)
    svc = Service(cfg, tmp_path, cfg_path, tmp_path, tmp_path / "svc.log")
    try:
        assert "lists 1 export" in svc.check_health()
    finally:
        svc.stop()
    dying = ServiceConfig(command=["nbdkit", "-f", "-U", "{slot}/nbd.sock", "no-such-plugin"],
                          health_timeout_s=5, settle_s=0.2)
    svc = Service(dying, tmp_path, cfg_path, tmp_path, tmp_path / "svc2.log")
    with pytest.raises(HealthError, match="service exited with status"):
        svc.check_health()


# -- end to end over the pty cable -------------------------------------------------

def test_full_flash_lands_the_verified_bundle_in_slot_a_and_runs_its_health_check(board):
    board.start_agent()
    bundle = board.make_bundle("b1.tcb", controller_config(board.root), "build-1", filler_bytes=24 << 10)
    r = board.flash(bundle)
    assert "board: build build-1 verified" in r.stderr, r.stderr
    assert "progress 100.0%" in r.stderr and "/s ETA" in r.stderr
    assert slot_sha(board, "a") == hashlib.sha256(bundle.read_bytes()).hexdigest()
    assert json.loads((board.slots / "a" / "build.json").read_text())["build_id"] == "build-1"
    assert (board.slots / "a" / "config.toml").read_text() == controller_config(board.root)
    assert "switched to slot a (build build-1); health check" in board.log()
    assert not (board.slots / "incoming" / "part").exists()
    if CONTROLLER:
        assert r.returncode == 0 and "slot a, healthy" in r.stdout, r.stderr


@needs_controller
def test_flash_healthy_controller_then_skip_the_same_build_then_flash_slot_b(board):
    board.start_agent()
    first = board.make_bundle("b1.tcb", controller_config(board.root), "build-1")
    r = board.flash(first)
    assert r.returncode == 0 and "slot a, healthy" in r.stdout, r.stderr
    r = board.flash(first)
    assert r.returncode == 0 and "nothing to flash" in r.stderr and "unchanged" in r.stdout
    second = board.make_bundle("b2.tcb", controller_config(board.root), "build-2")
    r = board.flash(second)
    assert r.returncode == 0 and "slot b, healthy" in r.stdout, r.stderr
    assert state(board)["active"] == "b" and state(board)["previous"] == "a"


def test_resume_after_the_flasher_is_killed_mid_transfer(tmp_path):
    cable = SerialCable(baud=460800)    # paced, so the transfer lasts long enough to cut
    b = Board(tmp_path, cable)
    try:
        b.start_agent()
        bundle = b.make_bundle("big.tcb", controller_config(tmp_path), "build-big", filler_bytes=96 << 10)
        flasher = subprocess.Popen(b.flash_cmd(bundle), stderr=subprocess.PIPE, text=True)
        killed_at = _kill_after_block(flasher, 20)
        assert killed_at >= 20
        r = b.flash(bundle)
        resumed = [line for line in r.stderr.splitlines() if line.startswith("resuming at block")]
        assert resumed, r.stderr
        assert int(resumed[0].split()[3]) >= killed_at
        assert "board: build build-big verified" in r.stderr
        assert slot_sha(b, "a") == hashlib.sha256(bundle.read_bytes()).hexdigest()
    finally:
        b.stop_agent()
        cable.close()


def _kill_after_block(proc, block: int) -> int:
    for line in proc.stderr:
        m = re.match(r"progress .* block (\d+)/", line)
        if m and int(m.group(1)) >= block:
            proc.send_signal(signal.SIGKILL)   # by the PID of the flasher this test started
            proc.wait()
            return int(m.group(1))
    proc.wait()
    raise AssertionError("the flasher finished before it could be killed")


def test_a_corrupted_block_is_caught_by_the_crc_and_resent(board):
    board.start_agent()
    bundle = board.make_bundle("b1.tcb", controller_config(board.root), "build-1")
    board.cable.corrupt_frame(4)        # blocks 0..2 pass, block 3 is damaged on the wire
    r = board.flash(bundle)
    assert board.cable.corrupted == 1
    assert "board NAK (BAD_FRAME), resending block 3" in r.stderr, r.stderr
    assert "damaged frame" in board.log()
    assert slot_sha(board, "a") == hashlib.sha256(bundle.read_bytes()).hexdigest()


def test_a_bundle_with_a_bad_signature_is_refused_and_nothing_changes(board):
    from board.bundle import keygen
    other_key, _ = keygen(board.root / "other.key")
    board.start_agent()
    bundle = board.make_bundle("evil.tcb", controller_config(board.root), "evil", key=other_key)
    r = board.flash(bundle)
    assert r.returncode == 1
    assert "refused the bundle (BAD_SIGNATURE)" in r.stderr and "bad signature" in r.stderr
    assert not (board.slots / "a").exists() and not (board.slots / "state.json").exists()
    assert not (board.slots / "incoming" / "part").exists()


def test_a_bundle_for_another_target_is_refused(board):
    board.start_agent()
    bundle = board.make_bundle("vm.tcb", controller_config(board.root), "vm-1", target="vm")
    r = board.flash(bundle)
    assert r.returncode == 1 and "WRONG_TARGET" in r.stderr and "built for vm" in r.stderr


def test_a_truncated_bundle_is_refused_before_sending(board):
    board.start_agent()
    bundle = board.make_bundle("b1.tcb", controller_config(board.root), "build-1")
    cut = board.root / "cut.tcb"
    cut.write_bytes(bundle.read_bytes()[:-100])
    r = board.flash(cut)
    assert r.returncode == 2 and "truncated bundle" in r.stderr


def test_the_agent_rolls_back_by_itself_when_the_new_slot_fails_its_health_check(board):
    good = board.make_bundle("good.tcb", controller_config(board.root), "good-1")
    _preinstall(board, good.read_bytes())          # a board already running slot a
    board.start_agent()
    broken = board.make_bundle("broken.tcb", controller_config(board.root, broken=True), "broken-1")
    r = board.flash(broken)
    assert r.returncode == 1
    assert "the board rolled back" in r.stderr and "rolled back to slot a" in r.stderr, r.stderr
    assert "slot b failed its health check (service exited with status" in r.stderr
    st = state(board)
    assert st["active"] == "a" and st["pending"] is False and "b" in st["failed"]
    assert slot_sha(board, "a") == hashlib.sha256(good.read_bytes()).hexdigest()
    if CONTROLLER:
        assert "choose one of a, b" in r.stderr      # the controller's own config error
        assert st["health"] == "healthy"


def _preinstall(b: Board, blob: bytes):
    store = slotmod.SlotStore(b.slots)
    v = verify(blob, load_public_key(b.pub))
    store.install("a", blob, v)
    store.switch("a")
    store.confirm("healthy")


def test_an_agent_restarted_mid_switch_rolls_back_at_boot(tmp_path):
    b_root = tmp_path
    cable = SerialCable()
    b = Board(b_root, cable)
    try:
        one = b.make_bundle("one.tcb", controller_config(tmp_path), "one")
        two = b.make_bundle("two.tcb", controller_config(tmp_path), "two")
        _preinstall(b, one.read_bytes())
        store = slotmod.SlotStore(b.slots)
        store.install("b", two.read_bytes(), verify(two.read_bytes(), load_public_key(b.pub)))
        store.switch("b")                         # the power went out before the health check
        agent = Agent(None, store, load_public_key(b.pub),
                      AgentConfig(service=ServiceConfig(health_timeout_s=3, settle_s=0.1)))
        agent.boot()
        agent.stop_service()
        st = store.state()
        assert st["active"] == "a" and "b" in st["failed"] and not st["pending"]
    finally:
        cable.close()
