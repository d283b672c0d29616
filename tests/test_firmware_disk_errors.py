"""A LUN's disk failing writes, in the firmware, driven exactly with the in-memory pair.

The disk of one LUN answers every write with EIO while the test says so.
What is checked: destage retries back off per LUN (and only that LUN's),
errors are reported coalesced, the LUN goes degraded after the bound (its
writes get EIO, never a wait; reads are served; nothing acknowledged is
dropped), and it recovers by itself when the disk works again. A takeover
claim whose record write fails says so and backs off.
"""
from firmware import actions as A
from firmware.ha.ownership import Own
from fixtures.mempair import MemPair, PairSide

BS = 4096
EIO = 5


class FailingDiskPair(MemPair):
    """A MemPair whose disks fail writes on command: data writes of LUNs in `failing`,
    reservation-record writes of LUNs in `record_failing`."""

    def __init__(self, **kw):
        self.failing, self.record_failing = set(), set()
        self.bad = []                   # (lun, start, end): data writes touching these bytes fail
        self.attempts = []              # (now_ms, lun, ok) of every data write
        super().__init__(**kw)

    def _bad(self, act):
        return act.__class__ is A.DiskWrite and any(
            lun == act.lun and act.offset < end and start < act.offset + len(act.data) for lun, start, end in self.bad)

    def notes_of(self, i, kind):
        return [fields for k, fields in self.notes[i] if k == kind]

    def run_for(self, ms, step_ms=10):
        for _ in range(ms // step_ms):
            self.tick(step_ms)


class FailingSide(PairSide):
    def disk_write(self, act):
        p = self.pair
        ok = act.lun not in p.failing and not p._bad(act)
        p.attempts.append((p.now_ms, act.lun, ok))
        if ok:
            super().disk_write(act)
        else:
            self.done.append((act.op, EIO, None))

    def disk_flush(self, act):
        p = self.pair
        if act.lun in p.failing:
            p.attempts.append((p.now_ms, act.lun, False))
            self.done.append((act.op, EIO, None))
        else:
            super().disk_flush(act)

    def record_write(self, act):
        if act.lun in self.pair.record_failing:
            self.done.append((act.op, EIO, None))
        else:
            super().record_write(act)


FailingDiskPair.side_class = FailingSide


def pair(**kw):
    p = FailingDiskPair(idle_flush_ms=50, **kw)
    p.connect()
    return p


def fill(p, lun, lines, tag="w", byte=0x11):
    for n in range(lines):
        p.write(0, (tag, lun, n), lun, n * BS, bytes([byte + n % 7]) * BS)
        p.deliver()
    assert all(p.replies[(tag, lun, n)] == (0, None) for n in range(lines))


def retry_rounds(p, lun):
    """The start times of the rounds of failed writes to `lun` (a round: writes at one instant)."""
    return sorted({t for t, l, ok in p.attempts if l == lun and not ok})


def test_destage_retries_of_a_failing_lun_back_off_and_the_other_lun_destages_on():
    p = pair(disk_retry_initial_ms=200, disk_retry_max_ms=3200, degraded_after_ms=10**9)
    p.failing.add(0)
    fill(p, 0, 8)
    fill(p, 1, 8, byte=0x51)
    p.run_for(12_000)
    rounds = retry_rounds(p, 0)
    gaps = [b - a for a, b in zip(rounds, rounds[1:])]
    assert gaps[:6] == [200, 400, 800, 1600, 3200, 3200], gaps
    assert not p.ctrl[0].cache.wbq                      # waiting for the retry, out of every pump's way
    # lun1's lines went to disk meanwhile, all of them, and once each
    assert p.disks[1][:8 * BS] == b"".join(bytes([0x51 + n % 7]) * BS for n in range(8))
    assert p.ctrl[0].cache.dirty_lines == 8            # lun0's lines stay dirty in NVRAM


def test_backoff_starts_over_after_a_write_that_succeeds():
    p = pair(disk_retry_initial_ms=200, disk_retry_max_ms=3200, degraded_after_ms=10**9)
    p.failing.add(0)
    fill(p, 0, 4)
    p.run_for(4_000)
    p.failing.clear()
    p.run_for(4_000)                                    # the next retry lands: the disk works
    assert p.ctrl[0].cache.dirty_lines == 0
    p.failing.add(0)
    p.attempts.clear()
    fill(p, 0, 4, tag="again")
    p.run_for(1_000)
    rounds = retry_rounds(p, 0)
    assert [b - a for a, b in zip(rounds, rounds[1:])][:2] == [200, 400]


def test_a_failing_disk_is_reported_once_per_lun_per_interval_with_counts_and_offsets():
    p = pair(degraded_after_ms=10**9, disk_retry_max_ms=200)       # a retry round every 200 ms
    p.failing.add(0)
    fill(p, 0, 100)
    p.run_for(60_000)
    reports = p.notes_of(0, "disk_error")
    failed = p.ctrl[0].stats["destage_errors"]
    assert failed > 350                                 # 100 lines, then a probe every 200 ms
    assert len(reports) <= 62                           # one a second, not one per line per retry
    assert all(r["lun"] == 0 and r["errno"] == EIO and r["count"] >= 1 for r in reports)
    assert reports[0]["first_offset"] == 0
    assert all(0 <= r["first_offset"] <= 99 * BS and 0 <= r["last_offset"] <= 99 * BS for r in reports)
    pending = p.ctrl[0].disk_health.luns[0].burst.count
    assert sum(r["count"] for r in reports) + pending == failed


def test_reports_of_many_failing_luns_stay_a_few_per_second_in_all():
    p = pair(luns=12, degraded_after_ms=10**9, disk_retry_max_ms=200)      # a retry round every 200 ms
    mine = [lun for lun in range(12) if lun % 2 == 0]    # a owns the even LUNs
    p.failing.update(mine)
    for lun in mine:
        fill(p, lun, 20)
    p.run_for(30_000)
    reports = [(t, k) for t, (k, _f) in enumerate(p.notes[0]) if k == "disk_error"]
    assert len(reports) <= 4 * 31
    by_lun = {lun: len([f for f in p.notes_of(0, "disk_error") if f["lun"] == lun]) for lun in mine}
    assert all(n >= 12 for n in by_lun.values()), by_lun         # every LUN gets its turn


def test_one_bad_spot_holds_back_only_its_own_line_and_the_lun_recovers_when_it_heals():
    """Line 5 of an extent of 12 cannot be written: one probe a retry finds the good lines,
    each probe that lands brings the others back, and only the bad line stays dirty. With
    nothing else of the LUN to write, the bound runs out and it degrades (no write has
    succeeded since); once the spot takes writes again, it recovers."""
    p = pair(degraded_after_ms=5_000)
    p.bad.append((0, 5 * BS, 6 * BS))
    fill(p, 0, 12)
    p.run_for(4_000)
    assert [line.lba * 512 for line in p.ctrl[0].cache.lines.values()] == [5 * BS]
    good = b"".join(bytes([0x11 + n % 7]) * BS for n in range(12))
    assert p.disks[0][:5 * BS] == good[:5 * BS] and p.disks[0][6 * BS:12 * BS] == good[6 * BS:]
    p.run_for(6_000)
    assert p.notes_of(0, "lun_degraded")
    assert all(f["first_offset"] == f["last_offset"] == 5 * BS for f in p.notes_of(0, "disk_error")[-3:])
    assert len([k for k, _f in p.notes[0] if k.startswith(("disk_", "lun_"))]) <= 14
    p.bad.clear()
    p.run_for(6_000)
    assert p.notes_of(0, "lun_recovered") and p.ctrl[0].cache.dirty_lines == 0
    assert p.disks[0][:12 * BS] == good


def test_a_lun_failing_past_the_bound_is_degraded_its_writes_get_eio_and_reads_are_served():
    p = pair(degraded_after_ms=2_000)
    p.failing.add(0)
    fill(p, 0, 16)
    p.run_for(1_000)
    assert not p.notes_of(0, "lun_degraded")
    p.write(0, "before", 0, 64 * BS, b"b" * BS)         # not degraded yet: cached as usual
    p.deliver()
    assert p.replies["before"] == (0, None)
    p.run_for(1_100)
    (degraded,) = p.notes_of(0, "lun_degraded")
    assert degraded["lun"] == 0 and degraded["failing_ms"] >= 2_000
    assert p.ctrl[0].status()["disks"]["lun0"]["state"] == "degraded"
    assert p.ctrl[0].status()["disks"]["lun1"]["state"] == "ok"
    p.write(0, "new", 0, 200 * BS, b"n" * BS)
    assert p.replies["new"] == (EIO, None)              # at once: no wait, no hang
    p.write(1, "forwarded", 0, 201 * BS, b"f" * BS)     # through the partner: the owner refuses
    p.deliver()
    assert p.replies["forwarded"] == (EIO, None)
    p.write(0, "other lun", 1, 0, b"o" * BS)
    p.deliver()
    assert p.replies["other lun"] == (0, None)
    p.read(0, "r", 0, 0, 16 * BS)                       # every acknowledged write still reads back
    assert p.replies["r"] == (0, b"".join(bytes([0x11 + n % 7]) * BS for n in range(16)))
    p.read(1, "r64", 0, 64 * BS, BS)
    p.deliver()
    assert p.replies["r64"] == (0, b"b" * BS)
    assert p.ctrl[0].cache.dirty_lines == 17            # kept in NVRAM, both copies
    assert len(p.ctrl[1].mirror.view) == 17


def test_writes_waiting_for_blocks_fail_with_eio_when_the_lun_goes_degraded():
    p = FailingDiskPair(luns=3, nvram_size=1 << 20, lun_size=4 << 20, idle_flush_ms=50, degraded_after_ms=2_000)
    p.connect()
    p.failing.add(0)
    capacity = p.ctrl[0].cache.capacity
    for n in range(capacity + 8):                       # more than the cache holds: the last wait
        p.write(0, ("w", n), 0, n * BS, bytes([n % 251]) * BS)
        p.deliver()
    waiting = [n for n in range(capacity + 8) if ("w", n) not in p.replies]
    assert waiting and len(p.ctrl[0].write_path.waiting) == len(waiting)
    p.write(0, "lun2", 2, 0, b"2" * BS)                 # a healthy LUN's write (a owns lun2) queues too
    p.run_for(2_100)
    assert p.notes_of(0, "lun_degraded")
    assert all(p.replies[("w", n)] == (EIO, None) for n in waiting)
    assert not p.ctrl[0].write_path.waiting
    # The cache is all lun0's lines: lun2's write could never get a block. EIO, not a hang.
    assert p.replies["lun2"] == (EIO, None)
    p.write(0, "lun2 again", 2, 0, b"2" * BS)
    assert p.replies["lun2 again"] == (EIO, None)
    acked = [n for n in range(capacity + 8) if p.replies[("w", n)] == (0, None)]
    p.failing.clear()                                   # the disk heals: everything acked lands
    p.run_for(6_000)
    assert p.notes_of(0, "lun_recovered")
    assert p.ctrl[0].cache.dirty_lines == 0
    assert all(p.disks[0][n * BS:(n + 1) * BS] == bytes([n % 251]) * BS for n in acked)
    p.write(0, "lun2 after", 2, 0, b"2" * BS)
    p.deliver()
    assert p.replies["lun2 after"] == (0, None)


def test_a_degraded_lun_recovers_by_itself_when_a_destage_write_succeeds():
    p = pair(degraded_after_ms=2_000, disk_retry_max_ms=1_000)
    p.failing.add(0)
    fill(p, 0, 16)
    p.run_for(3_000)
    assert p.notes_of(0, "lun_degraded")
    healed_at = p.now_ms
    p.failing.clear()
    p.run_for(1_200)                                    # within one retry at the cap
    (recovered,) = p.notes_of(0, "lun_recovered")
    assert recovered["lun"] == 0 and recovered["errors"] > 0
    assert p.ctrl[0].status()["disks"]["lun0"] == {"state": "ok"}
    assert p.now_ms - healed_at <= 1_200
    assert p.disks[0][:16 * BS] == b"".join(bytes([0x11 + n % 7]) * BS for n in range(16))
    p.write(0, "after", 0, 100 * BS, b"a" * BS)
    p.deliver()
    assert p.replies["after"] == (0, None)


def fenced_pair(**kw):
    p = FailingDiskPair(fencing=True, idle_flush_ms=10**9, high_watermark=0.9, low_watermark=0.8, **kw)
    p.connect()
    for _ in range(5):
        p.tick(10)
    return p


def test_a_claim_whose_record_write_fails_says_so_and_backs_off():
    p = fenced_pair()
    p.crash(0)
    p.record_failing.add(0)
    p.run_for(20_000)
    claims = [t for t, (k, f) in enumerate(p.notes[1]) if k == "takeover_claim" and f["lun"] == 0]
    abandoned = p.notes_of(1, "takeover_abandoned")
    assert abandoned and all("record write failed (errno 5)" in a["reason"] for a in abandoned)
    assert not [a for a in abandoned if "renewed" in a["reason"]]
    failed = p.notes_of(1, "reservation_write_failed")
    assert failed and failed[0]["lun"] == 0 and failed[0]["errno"] == EIO and "CLAIMED" in failed[0]["record"]
    # Backing off: fewer claims than one per 1.4 s, and further apart as they go.
    assert 3 <= len(claims) <= 20_000 // 2_000
    p.record_failing.clear()
    p.run_for(8_000)                                    # the disk works again: the claim goes through
    assert p.ctrl[1].ownership.fence[0].state == Own.SOLO
