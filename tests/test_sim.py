"""The deterministic simulator: a bounded sweep, replay, broken variants, crash model units.

The sweep is what CI runs in ha mode (replica mode joins once the firmware
has it): with fencing (dynamic ownership, the default) and a shorter one with
static ownership. A failure message carries the replay command (`inv sim
--seed N`). Seeds that showed a firmware bug are kept, with their diagnosis, in
tests/test_sim_regressions.py.
"""
import random

import pytest

from firmware.params import Params
from hal.sim.ha import BROKEN_SITES, FENCE_SITES, Sim, run_seed
from hal.sim.check import Model, SimFailure, make_data
from hal.sim.disk import DiskFaults, SimDiskArray
from hal.sim.link import LinkFaults, SimLink
from hal.sim.nvram import SimNvram
from fixtures.mempair import split_frames

SWEEP_SEEDS = 300
STATIC_SEEDS = 150
SWEEP_STEPS = 120
CHUNKS = 3
BROKEN_SEEDS = 10
FENCE_BROKEN_SEEDS = 12        # each fencing variant is caught in 30 or more of 100 seeds at 300 steps
                               # (the fault plans aimed at fencing); the search stops at the first


def _sweep(seeds, fencing):
    failures = []
    for seed in seeds:
        result = run_seed(seed, "ha", SWEEP_STEPS, fencing=fencing)
        if not result.ok:
            failures.append(f"{result.failure.splitlines()[0][:400]}\n  replay: {result.replay}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_sweep_ha_fencing(chunk):
    """The default sweep: fencing on, ownership moves; split so a parallel runner can spread it."""
    per = SWEEP_SEEDS // CHUNKS
    _sweep(range(chunk * per, (chunk + 1) * per), fencing=True)


def test_sweep_ha_static_ownership():
    _sweep(range(STATIC_SEEDS), fencing=False)


@pytest.mark.parametrize("fencing", [True, False])
def test_same_seed_same_trace(fencing):
    a, b = run_seed(7, steps=150, fencing=fencing), run_seed(7, steps=150, fencing=fencing)
    assert a.ok and b.ok
    assert a.trace_hash == b.trace_hash and a.stats == b.stats
    assert run_seed(8, steps=150, fencing=fencing).trace_hash != a.trace_hash


def test_fencing_run_moves_ownership_and_counts_serving_acts():
    result = run_seed(7, steps=150)
    assert result.ok and result.stats["serving_acts"] > 0
    assert result.stats["disk_record_reads"] > 0 and result.stats["disk_record_writes"] > 0


@pytest.mark.parametrize("broken", [b for b in BROKEN_SITES if b not in FENCE_SITES])
def test_broken_variant_is_caught(broken):
    caught = [seed for seed in range(BROKEN_SEEDS) if not run_seed(seed, steps=200, broken=broken).ok]
    assert caught, f"the simulator missed the broken variant {broken} in {BROKEN_SEEDS} seeds"


def _caught_fencing(broken, seeds):
    """The first seed whose broken run fails while the same plan without the bug passes."""
    for seed in seeds:
        sim = Sim(seed, steps=150, broken=broken)
        plan = sim.plan
        same = dict(kinds=list(plan.kinds), p_record_pause=plan.p_record_pause, p_claim_crash=plan.p_claim_crash)
        result = sim.run()
        if not result.ok and Sim(seed, steps=150, overrides=same).run().ok:
            return seed, result.failure
    return None


@pytest.mark.parametrize("broken", FENCE_SITES)
def test_broken_fencing_variant_is_caught(broken):
    assert _caught_fencing(broken, range(FENCE_BROKEN_SEEDS)), \
        f"the simulator missed the broken variant {broken} in {FENCE_BROKEN_SEEDS} seeds"


def test_the_ha_simulator_sends_replica_mode_to_its_own_simulator():
    with pytest.raises(ValueError, match="this simulator runs ha mode"):
        run_seed(1, mode="replica")


# -- the crash model of the simulated NVRAM ---------------------------------------

def test_nvram_persisted_bytes_survive_every_crash():
    for seed in range(20):
        nv = SimNvram(64 * 1024)
        nv.buffer[0:8192] = b"\xaa" * 8192
        nv.persist(0, 8192)
        nv.buffer[8192:16384] = b"\xbb" * 8192          # never persisted
        nv.crash(random.Random(seed))
        assert bytes(nv.buffer[0:8192]) == b"\xaa" * 8192
        assert set(bytes(nv.buffer[8192:16384])) <= {0xaa, 0xbb, 0}


def test_nvram_unpersisted_sectors_are_kept_lost_or_torn():
    fates = set()
    for seed in range(30):
        nv = SimNvram(16 * 1024)
        nv.buffer[0:8192] = bytes(range(256)) * 32
        counts = nv.crash(random.Random(seed))
        fates |= {k for k, v in counts.items() if v}
        for s in range(16):
            sector = bytes(nv.buffer[s * 512:(s + 1) * 512])
            for w in range(0, 512, 8):                   # 8-byte granularity: each word old or new
                assert sector[w:w + 8] in (bytes(8), (bytes(range(256)) * 2)[w:w + 8])
        assert not list(nv.unpersisted_sectors())      # after a crash, memory is what persisted
    assert fates == {"keep", "lose", "tear"}


def test_nvram_store_after_persist_may_revert_to_persisted_value():
    nv = SimNvram(4096)
    nv.buffer[0:512] = b"\x01" * 512
    nv.persist(0, 512)
    nv.buffer[0:512] = b"\x02" * 512
    assert list(nv.unpersisted_sectors()) == [0]
    seen = set()
    for seed in range(20):
        copy = SimNvram(4096)
        copy.mem[:] = nv.mem
        copy.shadow[:] = nv.shadow
        copy.crash(random.Random(seed))
        seen |= set(bytes(copy.buffer[0:512]))
    assert seen == {1, 2}


# -- disks and link ----------------------------------------------------------------

class _Write:
    def __init__(self, op, lun, offset, data):
        self.op, self.lun, self.offset, self.data = op, lun, offset, data


def test_disk_write_inflight_at_crash_is_whole_absent_or_torn_by_sector():
    outcomes = set()
    for seed in range(40):
        disks = SimDiskArray([64 * 1024], random.Random(seed), DiskFaults())
        disks.submit(0, 0, _Write(1, 0, 0, b"\xff" * 8192), write=True)
        disks.crash(0)
        written = bytes(disks.disks[0][:8192])
        cut = written.find(b"\x00")
        cut = 8192 if cut < 0 else cut
        assert cut % 512 == 0 and written == b"\xff" * cut + bytes(8192 - cut)
        outcomes.add("whole" if cut == 8192 else "none" if cut == 0 else "torn")
    assert outcomes == {"whole", "none", "torn"}


def test_disk_cache_write_is_visible_at_once_and_durable_only_after_a_flush():
    disks = SimDiskArray([64 * 1024], random.Random(1), DiskFaults())
    io, _ = disks.submit(0, 0, _Write(1, 0, 0, b"\xaa" * 1024), write=True)
    assert disks.complete(io) == (0, None)
    assert disks.disks[0][:1024] == b"\xaa" * 1024 and disks.durable[0][:1024] == bytes(1024)
    io, _ = disks.submit(1, 0, _Write(2, 0, 4096, b"\xbb" * 512), write=True)
    disks.complete(io)
    flush, _ = disks.submit_flush(1, 0, _Write(3, 0, 0, b""))      # b's flush covers b's write only
    assert disks.complete(flush) == (0, None)
    assert disks.durable[0][4096:4608] == b"\xbb" * 512 and disks.durable[0][:1024] == bytes(1024)
    late, _ = disks.submit(0, 0, _Write(4, 0, 8192, b"\xcc" * 512), write=True)
    flush, _ = disks.submit_flush(0, 0, _Write(5, 0, 0, b""))
    disks.complete(late)                            # landed after the flush was issued: not covered
    disks.complete(flush)
    assert disks.durable[0][:1024] == b"\xaa" * 1024 and disks.durable[0][8192:8704] == bytes(512)


def test_disk_cache_an_older_unflushed_write_never_hides_a_newer_durable_one():
    """Seed 600438 at 300 steps: b's failed destage write (never flushed) of write 18 stayed in
    b's cache; a later wrote 43 there and flushed it; the failover image laid b's old write over it."""
    disks = SimDiskArray([64 * 1024], random.Random(3), DiskFaults())
    old, _ = disks.submit(1, 0, _Write(1, 0, 0, b"\x18" * 512), write=True)
    disks.complete(old)                             # b's write, never flushed
    new, _ = disks.submit(0, 0, _Write(2, 0, 0, b"\x43" * 512), write=True)
    disks.complete(new)
    flush, _ = disks.submit_flush(0, 0, _Write(3, 0, 0, b""))
    disks.complete(flush)
    assert disks.image_without(0, 0)[:512] == b"\x43" * 512
    disks.crash(0)                                  # rebuilds what reads see: still the newest
    assert disks.disks[0][:512] == b"\x43" * 512


def test_disk_cache_unflushed_writes_of_a_crashed_controller_are_kept_lost_or_torn():
    outcomes = set()
    for seed in range(60):
        disks = SimDiskArray([64 * 1024], random.Random(seed), DiskFaults())
        io, _ = disks.submit(0, 0, _Write(1, 0, 0, b"\xff" * 8192), write=True)
        disks.complete(io)
        other, _ = disks.submit(1, 0, _Write(2, 0, 16384, b"\xee" * 512), write=True)
        disks.complete(other)
        disks.crash(0)
        written = bytes(disks.disks[0][:8192])
        assert written == bytes(disks.durable[0][:8192])
        assert disks.disks[0][16384:16896] == b"\xee" * 512        # b's write is b's to lose
        cut = written.find(b"\x00")
        cut = 8192 if cut < 0 else cut
        assert cut % 512 == 0 and written == b"\xff" * cut + bytes(8192 - cut)
        outcomes.add("whole" if cut == 8192 else "none" if cut == 0 else "torn")
    assert outcomes == {"whole", "none", "torn"}


def _frames(count):
    from firmware.link import LinkSession
    a = LinkSession(0, bytes(16), bytes(32))
    a.connected(bytes(32), 0)
    for i in range(count - 1):
        a.send(3, 0, b"x" * 100, tag=i)
    return a.take_output()


@pytest.mark.parametrize("reliable", [True, False])
def test_link_corruption_is_caught_by_the_crc(reliable):
    link = SimLink(random.Random(1), reliable, LinkFaults(p_corrupt=1.0))
    link.connect()
    buffers = _frames(5)
    sent = split_frames(buffers)
    got = []
    for _t, dst, conn, chunk in link.transmit(0, buffers, 0):
        got += link.receive(dst, conn, chunk)
    assert len(got) < len(sent) and all(bytes(f) in sent for f in got)


def test_link_partition_holds_reliable_bytes_until_heal():
    link = SimLink(random.Random(1), True, LinkFaults())
    link.connect()
    link.partition([0])
    assert link.transmit(0, _frames(2), 0) == []
    deliveries = link.heal(1000)
    frames = [f for _t, dst, conn, chunk in deliveries for f in link.receive(dst, conn, chunk)]
    assert len(frames) == 2


def test_model_read_rule_real_time_order():
    m = Model()
    w1 = m.write_started(1, 0, 0, 512, 10)
    m.acked(w1, 20)
    w2 = m.write_started(2, 0, 0, 512, 30)
    assert m.allowed(0, 25, 26) == {1}                  # w2 not begun: only the latest acked
    assert m.allowed(0, 35, 40) == {1, 2}               # w2 in flight: either
    m.acked(w2, 50)
    assert m.allowed(0, 60, 61) == {2}                  # w1 overwritten before the read began
    with pytest.raises(SimFailure):
        m.check("read", 0, 0, make_data(1, 0, 0, 512), 60, 61)
    m.check("read", 0, 0, make_data(2, 0, 0, 512), 60, 61)


def test_model_floor_rule_of_replica_mode():
    """The same model, the replica simulators' rule: no older than the newest acknowledged write
    (or, for what a promotion or a disaster keeps, the newest acknowledged through the peer)."""
    m = Model()
    m.write_started(1, 0, 0, 1024, source=1)            # two sectors of source 1's lun0
    m.acked_for_floors(0, 0, 2, 1, shipped=True, source=1)
    m.write_started(2, 0, 512, 512, source=1)           # the second sector again
    m.acked_for_floors(0, 1, 1, 2, shipped=False, source=1)
    m.check_floor("new", make_data(1, 0, 0, 512) + make_data(2, 0, 512, 512), 0, 0, m.newest_acked, source=1)
    m.check_floor("shipped", make_data(1, 0, 0, 1024), 0, 0, m.newest_shipped, source=1)
    with pytest.raises(SimFailure, match="sector 1 holds write 1, needs 2"):
        m.check_floor("old", make_data(1, 0, 0, 1024), 0, 0, m.newest_acked, source=1)
    with pytest.raises(SimFailure, match="holds write 0"):
        m.check_floor("lost", bytes(1024), 0, 0, m.newest_shipped, source=1)
    with pytest.raises(SimFailure, match="needs 0"):    # source 0 never had write 1
        m.check_floor("other source", make_data(1, 0, 0, 512), 0, 0, {}, source=0)
    torn = bytearray(make_data(2, 0, 512, 512))
    torn[256:264] = make_data(1, 0, 512, 512)[256:264]
    with pytest.raises(SimFailure, match="no write put there"):
        m.check_floor("torn", make_data(1, 0, 0, 512) + bytes(torn), 0, 0, {}, source=1)


def test_params_accept_the_simulator_knobs():
    Params(0, bytes(16), [1 << 20], buggify=lambda site: False, reliable_transport=False)
