"""Failover, fencing and failback in ha mode, on real processes.

Faults: SIGKILL of the owner under load, SIGSTOP of the owner past the
takeover time, the link cut (closed) and blocked (silent) through a relay,
restarts on stale and on wiped NVRAM, and many cycles in a row.
"""
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from fixtures.pair import LoggedWriter, make_pair, qemu_io, read_block_via, run, verified
from hal.host import nbd

pytestmark = pytest.mark.needs("qemu-io")


@pytest.fixture
def proxied_pair(tmp_path):
    pair = make_pair(tmp_path, link_proxy=True)
    pair.wait_settled()
    yield pair
    pair.stop_all()
    pair.proxy.close()


def test_owner_killed_under_load_survivor_serves_every_acknowledged_write(local_pair):
    local_pair.wait_settled()
    writer = LoggedWriter(local_pair.socket_path("b"), 0, blocks=4096, depth=16)
    rng = random.Random(5)
    writer.run(2000, rng)
    t = threading.Thread(target=writer.run, args=(60000, rng))
    t.start()
    time.sleep(0.3)
    killed_at = time.time()
    local_pair.kill("a")
    t.join(timeout=60)
    took = local_pair.wait_event("b", "takeover", since=killed_at, lun=0)
    # How fast is for `inv bench` (failover_times, about 1.9 s here): under a loaded CI machine
    # this run took 2.0014 s. The bound here only says the takeover came as a takeover, not after
    # some other wait (takeover_wait_ms is 900 ms, lease_ms 400 ms).
    assert took["ts"] - killed_at < 10.0, "failover took longer than 10 s"
    # No restart: the survivor alone serves every acknowledged write, with no stale read.
    assert writer.check(read_block_via(local_pair, "b", 0)) == []
    assert writer.acked and max(writer.acked.values()) > 2000


@pytest.mark.needs("fio")
def test_fio_verify_through_the_survivor_after_a_takeover(local_pair):
    uri_b = local_pair.uri("b", 0)
    fio = ["fio", "--name=v", "--ioengine=nbd", f"--uri={uri_b}", "--rw=randwrite", "--bs=4k",
           "--size=8M", "--iodepth=8", "--verify=crc32c", "--verify_state_save=0", "--output-format=json"]
    run(fio + ["--do_verify=0"])                             # written through b, owned by a
    local_pair.kill("a")
    local_pair.wait_event("b", "takeover", lun=0)
    run(fio + ["--verify_only"])                             # every block reads back from b
    out = qemu_io(uri_b, "write -P 0x3c 9M 64k", "read -P 0x3c 9M 64k")
    assert verified(out)


def test_link_cut_both_alive_exactly_one_controller_accepts_writes(proxied_pair):
    pair = proxied_pair
    cut_at = time.time()
    pair.proxy.cut()
    pair.wait_event("a", "link_down", since=cut_at)
    time.sleep(1.5)                                          # well past the takeover wait
    assert verified(qemu_io(pair.uri("a", 0), "write -P 0x41 0 64k", "read -P 0x41 0 64k"))
    refused = qemu_io(pair.uri("b", 0), "write -P 0x42 0 64k", check=False)
    assert refused.returncode != 0 and "Input/output error" in refused.stdout + refused.stderr
    assert verified(qemu_io(pair.uri("b", 1), "write -P 0x43 0 64k", "read -P 0x43 0 64k"))
    refused = qemu_io(pair.uri("a", 1), "write -P 0x44 0 64k", check=False)
    assert refused.returncode != 0
    assert not pair.events("b", "takeover") and not pair.events("a", "takeover")
    pair.proxy.heal()
    pair.wait_settled(owners={"lun0": "a", "lun1": "b"})
    assert verified(qemu_io(pair.uri("b", 0), "read -P 0x41 0 64k"))


def test_link_blocked_silently_is_found_by_heartbeat_and_still_no_split_brain(proxied_pair):
    pair = proxied_pair
    blocked_at = time.time()
    pair.proxy.block()
    pair.wait_event("b", "link_down", since=blocked_at, timeout_s=10)
    pair.wait_event("a", "link_down", since=blocked_at, timeout_s=10)
    time.sleep(1.2)
    assert verified(qemu_io(pair.uri("a", 0), "write -P 0x51 0 4k"))
    assert qemu_io(pair.uri("b", 0), "write -P 0x52 0 4k", check=False).returncode != 0
    assert not pair.events("b", "takeover")
    pair.proxy.cut()
    pair.proxy.heal()
    pair.wait_settled(owners={"lun0": "a"})


def test_paused_owner_never_writes_after_losing_the_reservation(local_pair):
    pair = local_pair
    pair.wait_settled()
    cache = {"before": qemu_io(pair.uri("a", 0), "write -P 0x71 0 1M")}   # dirty in a, mirrored in b
    assert cache
    paused_at = time.time()
    os.kill(pair.pid("a"), signal.SIGSTOP)
    pair.wait_event("b", "takeover", since=paused_at, lun=0)
    assert verified(qemu_io(pair.uri("b", 0), "read -P 0x71 0 1M"))         # replayed from b's mirror
    assert verified(qemu_io(pair.uri("b", 0), "write -P 0x72 0 1M"))        # b's newer data
    late = subprocess.Popen(["qemu-io", "-f", "raw", "-c", "write -P 0x73 0 4k", pair.uri("a", 0)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(0.5)
    resumed_at = time.time()
    os.kill(pair.pid("a"), signal.SIGCONT)
    out, _ = late.communicate(timeout=30)
    fenced = pair.wait_event("a", "fenced", since=resumed_at, lun=0)
    assert fenced["record_owner"] == 1
    time.sleep(1.0)                                # room for any stale destage to happen (none may)
    pair.wait_settled()
    # Whatever a answered its late client, b's data was never overwritten by a's old lines.
    data = qemu_io(pair.uri("b", 0), "read -P 0x72 4k 1020k")
    assert verified(data)
    first = qemu_io(pair.uri("b", 0), "read -P 0x72 0 4k", check=False)
    if "wrote 4096" in out and "error" not in out.lower():
        # a acknowledged the late write only after it was fenced: as the partner, it forwarded it.
        assert verified(qemu_io(pair.uri("b", 0), "read -P 0x73 0 4k"))
    else:
        assert verified(first)


@pytest.mark.parametrize("wipe", [False, True], ids=["stale-nvram", "wiped-nvram"])
def test_failback_to_a_returning_controller(local_pair, wipe):
    pair = local_pair
    pair.wait_settled()
    assert verified(qemu_io(pair.uri("a", 0), "write -P 0x21 0 2M"))
    pair.kill("a")
    pair.wait_event("b", "takeover", lun=0)
    assert verified(qemu_io(pair.uri("b", 0), "write -P 0x22 1M 1M"))
    if wipe:
        os.unlink(pair.nvram_path("a"))
    up_at = time.time() - 1
    pair.up()
    pair.wait_settled(owners={"lun0": "a", "lun1": "b"})
    # the survivor rebuilt the returning controller's mirror segment (its progress reporting is
    # tested line by line in tests/test_firmware_write_path.py: here it destaged eagerly while alone)
    pair.wait_event("b", "resync_start", since=up_at)
    for name in ("a", "b"):
        assert verified(qemu_io(pair.uri(name, 0), "read -P 0x21 0 1M", "read -P 0x22 1M 1M"))
    status = pair.status("a")
    assert status["link"] == "mirrored" and status["owned_luns"] == ["lun0"]


def test_a_restart_slower_than_the_takeover_wait_claims_nothing_from_a_live_partner(local_pair):
    """A returning controller whose recovery outlasts takeover_wait_ms reads the live partner's
    records afterwards: it must count their silence from then, not from before recovery, and
    get its LUN back by a failback grant. Under TCG a VM controller once claimed every LUN over
    its live partner this way (fixtures/slow_start.py reproduces the slow recovery here)."""
    pair = local_pair
    pair.wait_settled()
    assert verified(qemu_io(pair.uri("a", 0), "write -P 0x31 0 1M"))
    pair.kill("a")
    pair.wait_event("b", "takeover", lun=0)
    restarted_at = time.time()
    log = open(pair.dir / "a" / "controller.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "fixtures.slow_start", "--config", str(pair.config_path("a")),
                             "--recovery-ms", "1500"], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            start_new_session=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    log.close()
    (pair.dir / "a" / "pid").write_text(str(proc.pid))
    pair._procs["a"] = proc
    granted = pair.wait_event("a", "ownership", since=restarted_at, lun=0, owner="a")
    pair.wait_settled(owners={"lun0": "a", "lun1": "b"})
    claims = [e for e in pair.events("a") if e["ts"] >= restarted_at and e["kind"].startswith("takeover")]
    assert claims == [], f"a claimed LUNs its live partner held: {claims}"
    assert not [e for e in pair.events("b", "fenced") if e["ts"] >= restarted_at]
    assert granted["generation"] > 0
    for name in ("a", "b"):
        assert verified(qemu_io(pair.uri(name, 0), "read -P 0x31 0 1M"))


def test_ownership_move_by_cli_keeps_the_data(local_pair):
    pair = local_pair
    pair.wait_settled()
    assert verified(qemu_io(pair.uri("a", 0), "write -P 0x31 0 512k"))
    tc = [sys.executable, "-m", "hal.cli"]
    out = run(tc + ["ownership", "move", "lun0", "--to", "b", "--dir", str(pair.dir)])
    assert "lun0 is owned by b" in out.stdout
    assert pair.lun_states()["b"]["lun0"] == "owner" and pair.lun_states()["a"]["lun0"] == "partner"
    assert verified(qemu_io(pair.uri("a", 0), "read -P 0x31 0 512k", "write -P 0x32 0 4k"))
    run(tc + ["ownership", "move", "lun0", "--to", "a", "--dir", str(pair.dir)])
    assert verified(qemu_io(pair.uri("b", 0), "read -P 0x32 0 4k", "read -P 0x31 4k 508k"))
    bad = run(tc + ["ownership", "move", "lunX", "--to", "a", "--dir", str(pair.dir)], check=False)
    assert bad.returncode == 2 and "is not a LUN" in bad.stderr


def test_twenty_failover_and_failback_cycles_under_load_lose_nothing(local_pair):
    pair = local_pair
    pair.wait_settled()
    rng = random.Random(20)
    writer = LoggedWriter(pair.socket_path("b"), 0, blocks=1024, depth=8)
    for cycle in range(20):
        victim = "a" if cycle % 2 == 0 else "b"
        survivor = "b" if victim == "a" else "a"
        writer.reconnect(pair.socket_path(survivor))       # the host writes through the survivor
        # Writes across the kill, the takeover and the restart: 3 s, not a count (on the LUN
        # the survivor took over alone each write waits for a disk flush).
        t = threading.Thread(target=writer.run, args=(100000, rng), kwargs={"seconds": 3})
        t.start()
        time.sleep(0.3)
        pair.kill(victim)
        time.sleep(0.5)
        pair.up()
        t.join(timeout=60)
        pair.wait_settled(owners={"lun0": "a", "lun1": "b"}, timeout_s=30)
        assert writer.check(read_block_via(pair, survivor, 0)) == [], f"cycle {cycle}"
    assert writer.check(read_block_via(pair, "a", 0)) == []
    assert len(writer.acked) > 500


def test_an_owner_idle_past_its_lease_still_serves(local_pair):
    # An idle link carried no sequenced frame, so the owner's link lease ran out and every
    # request after a quiet second was held forever (seen on the VM pair, where tests pause).
    local_pair.wait_settled()
    time.sleep(1.5)
    assert verified(qemu_io(local_pair.uri("a", 0), "write -P 0x61 0 4k", "read -P 0x61 0 4k"))
    assert verified(qemu_io(local_pair.uri("b", 0), "read -P 0x61 0 4k"))
