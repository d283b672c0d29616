"""A host VM through a failover: a QEMU guest whose disk is lun0 of the local pair.

What README.md tells a host VM to do, done by a whole guest: QEMU (TCG) with
`-blockdev driver=nbd,server.type=unix,server.path=<a or b>/nbd.sock,
export=lun0,reconnect-delay=20` and `-device virtio-blk-pci,werror=stop,
rerror=stop`. The guest (vm/hostguest.py) writes 64 KiB blocks with O_DIRECT
and a flush, block i at offset i * 64 KiB filled with byte i % 255 + 1, and
prints a console line per write it saw acknowledged. After KILL_AT writes
the owner, controller a, is SIGKILLed; b takes lun0 over; `pair up`
restarts a on its NVRAM (and a soon gets lun0 back: failback).

- On a's path QEMU reconnects to the restarted a. The returning a answers
  EIO until it has met b, so the guest may pause (BLOCK_IO_ERROR, STOP,
  `query-status` io-error) if QEMU reconnects inside that window; it is
  resumed with QMP `cont` once a forwards (its `ownership_state` event for
  lun0 says `partner`).
- On b's path (the survivor's) there is no disconnect, but b refuses lun0
  with EIO until it has taken it over: the guest pauses and is resumed once
  b's `takeover` event comes.

The `cont` is what an operator (or a management layer) does. Then the
guest goes on to its last write, and every write it reported reads back
through b and through a. Printed: the stall (from the kill to the next
write the guest saw completed) and the time the guest was paused.

Checked by hand (guest_through_failover's arguments) that the test fails
when the host VM lacks what README.md says it needs: with `werror=report`
(and `reconnect-delay=0` on a's path) the guest's writes fail with EIO
(`TCGUEST-FAILED ... Input/output error` from its dd); on either path
without the `cont` the guest stays paused (io-error) and never finishes
(with `reconnect-delay=0` on a's path it pauses at the kill); and with
`reconnect-delay=0` and `werror=stop` on a's path the guest pauses at the
kill, before any controller could serve, which the checks also refuse.
"""
import dataclasses
import threading
import time

import pytest

from fixtures.hostvm import HostVm
from fixtures.qmp import QmpError
from fixtures.pair import make_pair, run
from fixtures.vm import session_lock
from vm import hostguest

BLOCK_BYTES = 64 << 10
WRITES = 200                   # 12.5 MiB: blocks 0..199 of a 16 MiB LUN
KILL_AT = 60
RECONNECT_DELAY_S = 20
BOOT_TIMEOUT_S = 180.0
FINISH_TIMEOUT_S = 120.0


@dataclasses.dataclass
class Outcome:
    path: str                   # the controller whose socket the guest's disk is on
    killed_at: float
    took_over_at: float         # b's takeover event
    serving_at: float           # the restarted a's serving event
    forwards_at: float          # the restarted a forwards lun0 to b
    ready_at: float             # the guest's path serves lun0 again: resumed from here on
    wrote: dict                 # block -> time the test saw the guest's line
    failed: list                # the guest's TCGUEST-FAILED lines
    done: bool
    conts: list                 # times the test sent `cont`
    pauses: list                # (STOP ts, RESUME ts or None)
    io_errors: list             # BLOCK_IO_ERROR events
    ownership: list             # lun0's ownership_state events since the kill, both controllers
    status: dict                # query-status at the end
    console: str


def path_ready(pair, path: str, since: float):
    """When the guest's path serves lun0 again after the kill of a, or None: the restarted a
    once it forwards to b, b once it has taken over."""
    if path == "a":
        events = [e for e in pair.events("a", "ownership_state") if e.get("lun") == 0
                  and e.get("new") == "partner" and e["ts"] >= since]
    else:
        events = [e for e in pair.events("b", "takeover") if e.get("lun") == 0 and e["ts"] >= since]
    return events[0]["ts"] if events else None


class Resumer(threading.Thread):
    """What an operator does: `cont` a guest paused on an I/O error, once its path serves again."""

    def __init__(self, vm, ready, enabled: bool):
        super().__init__(daemon=True)
        self.vm, self.ready, self.enabled = vm, ready, enabled
        self.conts, self.stopping, self.error = [], threading.Event(), None

    def run(self):
        try:
            while not self.stopping.wait(0.1):
                status = query_status(self.vm)
                if status["status"] == "exited":
                    return
                if self.enabled and status["status"] == "io-error" and self.ready() is not None:
                    self.conts.append(time.time())
                    self.vm.qmp.execute("cont")
        except Exception as exc:               # reported by the test, not lost in the thread
            self.error = exc


def guest_through_failover(pair, workdir, boot, *, path="a", reconnect_delay_s=RECONNECT_DELAY_S,
                           werror="stop", resume=True) -> Outcome:
    """Boot the guest on `path`'s socket, SIGKILL a after KILL_AT acknowledged writes, let b
    take over and restart a, resume the guest whenever it is paused on an I/O error once its
    path serves again, and wait for the guest's last write."""
    vm = HostVm(workdir, boot, nbd_socket=pair.socket_path(path), export="lun0",
                reconnect_delay_s=reconnect_delay_s, werror=werror, writes=WRITES,
                block_bytes=BLOCK_BYTES)
    try:
        vm.wait_lines(hostguest.READY, 1, BOOT_TIMEOUT_S)
        vm.wait_lines(hostguest.WROTE, KILL_AT, 60)
        killed_at = time.time()
        pair.kill("a")
        resumer = Resumer(vm, lambda: path_ready(pair, path, killed_at), resume)
        resumer.start()
        took_over = pair.wait_event("b", "takeover", timeout_s=30, since=killed_at, lun=0)["ts"]
        pair.up()                      # restarts a on its NVRAM, as the README says
        serving = pair.wait_event("a", "serving", since=killed_at)["ts"]
        forwards = pair.wait_event("a", "ownership_state", timeout_s=30, since=killed_at, lun=0,
                                   new="partner")["ts"]
        deadline = time.monotonic() + FINISH_TIMEOUT_S
        while not vm.matching(hostguest.DONE) and not vm.closed and time.monotonic() < deadline:
            time.sleep(0.1)
        resumer.stopping.set()
        resumer.join(30)
        assert resumer.error is None, resumer.error
        return outcome(pair, vm, path, killed_at, took_over, serving, forwards, resumer.conts)
    finally:
        vm.close()


def outcome(pair, vm, path, killed_at, took_over, serving, forwards, conts) -> Outcome:
    stops = [e["ts"] for e in vm.qmp.events_named("STOP")]
    resumes = [e["ts"] for e in vm.qmp.events_named("RESUME")]
    ownership = sorted((e for name in ("a", "b") for e in pair.events(name, "ownership_state")
                        if e.get("lun") == 0 and e["ts"] >= killed_at), key=lambda e: e["ts"])
    return Outcome(path, killed_at, took_over, serving, forwards, path_ready(pair, path, killed_at),
                   wrote={int(line.split()[1]): t for t, line in vm.matching(hostguest.WROTE)},
                   failed=[line for _, line in vm.matching(hostguest.FAILED)],
                   done=bool(vm.matching(hostguest.DONE)), conts=conts,
                   pauses=[(s, next((r for r in resumes if r >= s), None)) for s in stops],
                   io_errors=vm.qmp.events_named("BLOCK_IO_ERROR"), ownership=ownership,
                   status=query_status(vm), console=vm.console_tail())


def query_status(vm) -> dict:
    try:
        return vm.qmp.execute("query-status")
    except QmpError:                   # the guest powered off after its last write
        return {"status": "exited", "running": False}


def read_back(uri: str, blocks: list[int]):
    cmds = []
    for i in blocks:
        cmds += ["-c", f"read -P {hostguest.pattern(i)} {i * BLOCK_BYTES} {BLOCK_BYTES}"]
    return run(["qemu-io", "-f", "raw", *cmds, uri], check=False, timeout=300)


def describe(o: Outcome) -> str:
    after = min(((t, i) for i, t in o.wrote.items() if t > o.killed_at), default=(float("nan"), None))
    paused = sum((r or time.time()) - s for s, r in o.pauses)
    return (f"host VM on {o.path}'s socket, SIGKILL of a after {KILL_AT} writes: stall "
            f"{after[0] - o.killed_at:.2f} s (kill to the guest's next completed write, block {after[1]}); "
            f"paused {len(o.pauses)} time(s), {paused:.2f} s in all ({len(o.io_errors)} BLOCK_IO_ERROR, "
            f"{len(o.conts)} cont); kill to takeover {o.took_over_at - o.killed_at:.2f} s, to a serving "
            f"again {o.serving_at - o.killed_at:.2f} s, to a forwarding {o.forwards_at - o.killed_at:.2f} s")


def refusing(o: Outcome) -> tuple[float, float]:
    """When the guest's path could answer but had to refuse lun0: the restarted a from serving
    until it has met b; b from the kill until its takeover."""
    return (o.serving_at, o.forwards_at) if o.path == "a" else (o.killed_at, o.took_over_at)


def check(pair, o: Outcome) -> None:
    """The guest wrote everything, saw no failure, stalled while its path could not serve, paused
    (if at all) only while its path refused lun0 and was resumed after each pause, and every
    write it saw completed reads back through b and through a."""
    assert not o.failed, f"the guest saw writes fail: {o.failed}\n{o.console}"
    assert o.done and sorted(o.wrote) == list(range(WRITES)), \
        f"the guest did not finish its writes (status {o.status}):\n{o.console}"
    # Nothing completed while the guest's path could not serve lun0: the write in flight waited
    # in QEMU's NBD client (reconnect-delay) or paused the guest.
    first, last = refusing(o)
    early = [i for i, t in o.wrote.items() if o.killed_at + 0.5 < t < last]
    assert not early, f"writes {early} completed before {o.path} could serve lun0 again"
    assert all(r is not None for _, r in o.pauses), o.pauses
    assert all(first - 0.01 <= e["ts"] <= o.ready_at + 0.5 for e in o.io_errors), \
        (first, o.ready_at, o.io_errors, o.ownership)
    assert all(t > o.ready_at for t in o.conts)
    for name in ("b", "a"):
        out = read_back(pair.uri(name), sorted(o.wrote))
        assert out.returncode == 0 and "Pattern verification failed" not in out.stdout + out.stderr, \
            (name, out.stdout[-2000:], out.stderr[-2000:])
        assert out.stdout.count(f"read {BLOCK_BYTES}/{BLOCK_BYTES} bytes") == WRITES, name


@pytest.mark.slow
@pytest.mark.parametrize("path", ["a", "b"])
def test_host_vm_on_lun0_rides_through_sigkill_of_the_owner_every_acked_write_reads_back(tmp_path, host_vm_boot,
                                                                                         path):
    with session_lock():                   # one TCG guest set at a time on these 2 cores
        pair = make_pair(tmp_path, luns=1, lun_size_bytes=16 << 20)
        try:
            pair.wait_settled(owners={"lun0": "a"})
            o = guest_through_failover(pair, tmp_path / "vm", host_vm_boot, path=path)
            print("\n" + describe(o))
            print("\n".join(f"  {e['ts'] - o.killed_at:+.3f} {e['controller']} {e.get('old')} -> {e.get('new')}"
                            for e in o.ownership))
            check(pair, o)
        finally:
            pair.stop_all()
