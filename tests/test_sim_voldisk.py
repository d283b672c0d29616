"""The crash model every in-memory rig shares (hal/sim/voldisk.py): disks with a volatile write
cache, NVRAM stores lost unless persisted, and rigs that refuse actions they do not know."""
import random

import pytest

from firmware import actions as A
from fixtures.mem_replica import MemReplicaPair
from fixtures.memlog import MemLog
from fixtures.mempair import MemPair
from hal.interpret import METHODS, UnknownAction
from hal.sim.ha import Sim
from hal.sim.voldisk import VolatileDisk


def test_a_write_is_visible_at_once_and_durable_only_after_a_flush_issued_after_it():
    d = VolatileDisk(4096)
    d.write(0, 0, b"a" * 512)
    mark = d.flush_mark()
    d.write(0, 512, b"b" * 512)                 # completes after the flush was issued
    assert d[:1024] == b"a" * 512 + b"b" * 512 and d.durable[:1024] == bytes(1024)
    d.flush_done(mark)
    assert d.durable[:1024] == b"a" * 512 + bytes(512)
    d.crash(0, random.Random(1), worst=True)
    assert d[:1024] == b"a" * 512 + bytes(512)  # the unflushed write is gone


def test_a_crash_decides_only_the_crashed_writers_writes_and_replays_from_its_seed():
    def run(seed):
        d = VolatileDisk(64 * 512)
        for n in range(16):
            d.write(n % 2, (n % 8) * 2048, bytes([n + 1]) * 4096)
        d.crash(0, random.Random(seed))
        return bytes(d), d.stats
    assert run(7) == run(7) and run(7) != run(8)
    d = VolatileDisk(4096)
    d.write(1, 0, b"x" * 512)
    d.write(0, 512, b"y" * 512)
    d.crash(0, random.Random(0), worst=True)
    assert d[:1024] == b"x" * 512 + bytes(512) and len(d.unflushed) == 1


def test_crash_fates_cover_keep_lose_tear_and_reorder():
    seen = set()
    for seed in range(40):
        d = VolatileDisk(8 * 512)
        d.write(0, 0, b"1" * 4096)
        d.write(0, 0, b"2" * 4096)
        d.crash(0, random.Random(seed))
        seen.add(bytes(d[0:1]) + bytes(d[4095:4096]))
    # old data, either version, and a mix (a torn or partly reordered pair of writes)
    assert {b"\0\0", b"11", b"22"} <= seen and len(seen) > 3


def test_the_interpreter_knows_every_action_the_firmware_has():
    actions = {cls for cls in vars(A).values()
               if isinstance(cls, type) and issubclass(cls, A.Action) and cls is not A.Action}
    assert actions == set(METHODS)


def test_every_rig_and_the_simulator_raise_on_an_action_they_do_not_know():
    bogus = type("Bogus", (A.Action,), {"__slots__": ()})()
    sim = Sim(1, "ha", 10, None)
    with pytest.raises(UnknownAction):
        sim.execute(0, [bogus])
    with pytest.raises(UnknownAction):
        sim.execute(0, [A.DiskExtents(1, 0, 0, 4096)])     # its hosts never ask for block status
    p = MemPair()
    with pytest.raises(UnknownAction):
        p.run(0, [bogus])
    q = MemReplicaPair()
    with pytest.raises(UnknownAction):
        q.run(0, [bogus])
    with pytest.raises(UnknownAction):
        q.run(0, [A.RecordRead(1, 0)])         # replica mode has no reservation records
    r = MemLog()
    with pytest.raises(UnknownAction):
        r.run(("dst", None), [bogus])


@pytest.mark.parametrize("rig", ["pair", "replica", "log"])
def test_every_rig_loses_stores_it_was_not_asked_to_persist(rig):
    if rig == "log":
        r = MemLog()
        nvram, crash, boot = r.dst_nvram, r.crash_destination, r.boot_destination
    else:
        r = MemPair() if rig == "pair" else MemReplicaPair()
        nvram, crash, boot = r.nvram[1], (lambda worst: r.crash(1, worst)), (lambda: r.boot(1))
    at = len(nvram.mem) - 8192
    nvram.mem[at:at + 4] = b"keep"
    r.run(("dst", None) if rig == "log" else 1, [A.Persist(at, 4)])
    nvram.mem[at + 4096:at + 4100] = b"lose"
    crash(worst=True)
    assert nvram.mem[at:at + 4] == b"keep" and nvram.mem[at + 4096:at + 4100] == bytes(4)
    boot()


def test_an_older_unflushed_write_never_lands_over_a_newer_one_of_the_other_writer():
    """Shared disks (ha): a's write was replaced in the disk's cache by b's newer one; whatever of
    b's landed at b's crash, a's crash later cannot bring a's older bytes back over it."""
    fates = set()
    for seed in range(30):
        d = VolatileDisk(4096)
        d.write(0, 0, b"a" * 1024)                  # a's
        d.write(1, 0, b"b" * 1024)                  # b's, newer, over it
        d.crash(1, random.Random(seed))
        landed = [d.durable[i * 512:(i + 1) * 512] == b"b" * 512 for i in range(2)]
        assert all(d[i * 512:(i + 1) * 512] == (b"b" if landed[i] else b"a") * 512 for i in range(2))
        d.crash(0, random.Random(seed + 100))
        assert all(d[i * 512:(i + 1) * 512] == b"b" * 512 for i in range(2) if landed[i])
        fates.add(tuple(landed))
    assert len(fates) > 1
