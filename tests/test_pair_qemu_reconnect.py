"""A host's QEMU block layer riding through a failover: QEMU's own NBD client, reconnect-delay.

What README.md says a host VM gets, tested with the lightest real QEMU
component that runs QEMU's NBD client and its reconnect logic: one qemu-io
process (the same block layer as a VM's disk, opened with
`--image-opts driver=nbd,server.type=unix,...,reconnect-delay=N`) holds its
connection to controller a's socket and writes a verifiable pattern, one
64 KiB block after another, each a distinct pattern at a distinct offset.
While a write is in flight, the owner (a) is SIGKILLed; b takes lun0 over;
`pair up` restarts a on its NVRAM; QEMU reconnects to a's socket and
resends what was in flight, and the writes go on (the returning a forwards
them to b). Every write qemu-io saw acknowledged reads back through both
controllers. With `reconnect-delay=0` the same run fails the in-flight
write with EIO, which is what the delay is for (checked by hand, not here).

The returning a answers EIO until it has met b (it starts WATCHING lun0);
when QEMU reconnects inside that window, the test does what a device with
`werror=stop` and an operator's `cont` do: it submits the refused write
again once a forwards (its `ownership_state` event says `partner`), and
checks that every refusal fell inside that window. qemu-io has no device,
so this retry is the one part played by the test rather than by QEMU.

qemu-io runs on a pty so its answers arrive line by line, as they happen;
the stall (the in-flight write's latency) is printed.
"""
import os
import re
import select
import subprocess
import threading
import time
import tty

import pytest

from fixtures.pair import make_pair, run

BLOCK_BYTES = 64 << 10
WRITES = 120
KILL_AT = 40
RECONNECT_DELAY_S = 20
ANSWER_TIMEOUT_S = 60.0
ANSWER = re.compile(rb"(wrote \d+/\d+ bytes at offset (\d+)|write failed: [^\r\n]*)")


def pattern(i: int) -> int:
    return 1 + i % 255


class QemuIo:
    """An interactive qemu-io on a pty: one command at a time, its answer with a timestamp."""

    def __init__(self, image_opts: str):
        self.master, slave = os.openpty()
        tty.setraw(slave)                       # no echo: only qemu-io's own output comes back
        self.proc = subprocess.Popen(["qemu-io", "--image-opts", image_opts],
                                     stdin=slave, stdout=slave, stderr=slave, close_fds=True)
        os.close(slave)
        self.buf = b""

    def send(self, command: str) -> None:
        os.write(self.master, command.encode() + b"\n")

    def answer(self, timeout_s: float = ANSWER_TIMEOUT_S) -> bytes:
        """The next write answer: b'wrote ...' or b'write failed: ...'."""
        deadline = time.monotonic() + timeout_s
        while True:
            match = ANSWER.search(self.buf)
            if match:
                self.buf = self.buf[match.end():]
                return match.group(1)
            left = deadline - time.monotonic()
            assert left > 0 and self.proc.poll() is None, f"qemu-io gave no answer: {self.buf[-500:]!r}"
            if select.select([self.master], [], [], min(left, 0.5))[0]:
                self.buf += os.read(self.master, 65536)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.send("quit")
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()                # by its PID: the qemu-io this test started
                self.proc.wait()
        os.close(self.master)


def image_opts(socket_path, reconnect_delay_s: int) -> str:
    return (f"driver=nbd,server.type=unix,server.path={socket_path},export=lun0,"
            f"reconnect-delay={reconnect_delay_s}")


class Failover(threading.Thread):
    """Once `kill_at` writes are acknowledged: SIGKILL of a, b's takeover, `pair up` (a restarts).
    Times are wall-clock seconds, comparable with the controllers' event timestamps."""

    def __init__(self, pair, kill_at: int):
        super().__init__(daemon=True)
        self.pair, self.kill_at = pair, kill_at
        self.acked = 0
        self.killed_at = self.took_over_at = self.restarted_at = None
        self.takeover, self.error = None, None

    def run(self):
        try:
            while self.acked < self.kill_at:
                time.sleep(0.001)
            self.killed_at = time.time()
            self.pair.kill("a")
            self.takeover = self.pair.wait_event("b", "takeover", timeout_s=30, since=self.killed_at, lun=0)
            self.took_over_at = time.time()
            self.pair.up()                     # restarts a on its NVRAM, as the README says
            self.restarted_at = time.time()
        except Exception as exc:               # reported by the test, not lost in the thread
            self.error = exc


def write_through_a_failover(pair, delay_s: int, kill_at: int = KILL_AT):
    """Writes 0..WRITES-1 through a's socket, one after another, while `Failover` kills a and
    restarts it. A write the restarted a refuses is sent again once a forwards to b: what a
    device with werror=stop does on `cont`. Returns ({i: (sent, answered, answer)},
    {i: refused_at}, the Failover)."""
    qio = QemuIo(image_opts(pair.socket_path("a"), delay_s))
    failover, answers, refused = Failover(pair, kill_at), {}, {}
    failover.start()
    try:
        for i in range(WRITES):
            command = f"write -P {pattern(i)} {i * BLOCK_BYTES} {BLOCK_BYTES}"
            sent = time.time()
            qio.send(command)
            answer = qio.answer()
            if not answer.startswith(b"wrote") and failover.killed_at:
                refused[i] = time.time()       # the guest would pause here (werror=stop)
                pair.wait_event("a", "ownership_state", timeout_s=30, since=failover.killed_at,
                                lun=0, new="partner")
                qio.send(command)              # `cont`: the request is submitted again
                answer = qio.answer()
            answers[i] = (sent, time.time(), answer)
            failover.acked += 1
    finally:
        failover.join(60)
        qio.close()
    assert failover.error is None and failover.restarted_at, failover.error
    return answers, refused, failover


def read_back(uri: str, acked: list[int]):
    cmds = []
    for i in acked:
        cmds += ["-c", f"read -P {pattern(i)} {i * BLOCK_BYTES} {BLOCK_BYTES}"]
    return run(["qemu-io", "-f", "raw", *cmds, uri], check=False, timeout=300)


@pytest.mark.slow
@pytest.mark.needs("qemu-io")
def test_qemu_nbd_reconnect_delay_rides_through_sigkill_of_the_owner_every_acked_write_reads_back(tmp_path):
    pair = make_pair(tmp_path, luns=1, lun_size_bytes=16 << 20)
    try:
        pair.wait_settled(owners={"lun0": "a"})
        t0 = time.monotonic()
        answers, refused, failover = write_through_a_failover(pair, RECONNECT_DELAY_S)
        failed = {i: a for i, (_, _, a) in answers.items() if not a.startswith(b"wrote")}
        assert not failed, f"writes failed across the failover: {failed}"
        # The write in flight at the kill waited in QEMU's client through b's takeover and was
        # acknowledged once a was back: the reconnect, not luck, carried it.
        waited = [i for i, (sent, answered, _) in answers.items() if sent < failover.took_over_at < answered]
        assert waited, "no write was in flight across the outage"
        # What the restarted a refuses, it refuses only until it has met b (it starts WATCHING
        # lun0: b may own it); from then on it forwards.
        serving = pair.wait_event("a", "serving", since=failover.killed_at)["ts"]
        forwards = pair.wait_event("a", "ownership_state", since=failover.killed_at, lun=0, new="partner")["ts"]
        assert all(serving - 0.01 <= t <= forwards + 0.5 for t in refused.values()), (serving, forwards, refused)
        stall_s = max(answered - sent for sent, answered, _ in answers.values())
        print(f"\nqemu-io through a, SIGKILL of a after {KILL_AT} writes: writes {waited} waited for the "
              f"reconnect, {sorted(refused)} were refused by the returning a and sent again; longest "
              f"write {stall_s:.2f} s (kill to takeover {failover.took_over_at - failover.killed_at:.2f} s, "
              f"to a serving again {serving - failover.killed_at:.2f} s, to a forwarding "
              f"{forwards - failover.killed_at:.2f} s); takeover {failover.takeover}")
        acked = sorted(answers)
        # Read back once the pair has settled (lun0 owned by one, partnered by the other): a CI
        # run under load read through a while its LUN state still moved, and a read got EIO.
        pair.wait_settled()
        for name in ("b", "a"):
            out = read_back(pair.uri(name), acked)
            errors = [line for line in (out.stdout + out.stderr).splitlines() if "failed" in line]
            assert out.returncode == 0 and not errors, (name, len(errors), errors[:3], out.stderr[-2000:],
                                                        out.stdout[:1500], pair.diagnosis())
            assert out.stdout.count("read 65536/65536 bytes") == len(acked), name
    finally:
        pair.stop_all()
