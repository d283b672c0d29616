"""The replica-mode (NVRAM-log variant) simulator: a sweep, replay, broken variants, found bugs.

hal/sim/log.py drives the unchanged LogSource/LogDestination on the in-memory
rig with crashes of either end, link cuts, hung disks and disasters, and
checks reads, the recovered image after a disaster, and source == image ==
model at the end.
"""
import pytest

from hal.sim.log import BROKEN_SITES, run_log_seed

SWEEP_SEEDS = 300
STEPS = 300
BROKEN_SEEDS = 40


@pytest.mark.parametrize("chunk", range(3))
def test_sweep_replica_log_variant(chunk):
    per = SWEEP_SEEDS // 3
    failures = []
    for seed in range(chunk * per, (chunk + 1) * per):
        result = run_log_seed(seed, STEPS)
        if not result.ok:
            failures.append(f"{result.failure.splitlines()[0][:300]}\n  replay: {result.replay}")
    assert not failures, "\n".join(failures)


def test_same_seed_same_trace():
    a, b = run_log_seed(11, STEPS), run_log_seed(11, STEPS)
    assert a.ok and a.trace_hash == b.trace_hash and a.stats == b.stats
    assert run_log_seed(12, STEPS).trace_hash != a.trace_hash


def test_runs_exercise_the_faults():
    totals = {}
    for seed in range(30):
        for k, v in run_log_seed(seed, STEPS).stats.items():
            totals[k] = totals.get(k, 0) + v
    for kind in ("crashes", "cuts", "stalls", "disasters", "shipped_acks"):
        assert totals[kind] > 0, totals
    assert totals["acked"] > totals["shipped_acks"] > 0      # both kinds of acknowledgement happen


@pytest.mark.parametrize("broken", BROKEN_SITES)
def test_broken_variant_is_caught(broken):
    """Measured over seeds 0-99 at 300 steps: log_ack_before_ship 100 (17 before the destination
    was checked at each acknowledgement), log_skip_resend 81, log_reuse_unshipped 84,
    log_skip_persist 52, log_destage_no_flush 99 caught."""
    caught = [seed for seed in range(BROKEN_SEEDS) if not run_log_seed(seed, STEPS, broken).ok]
    assert caught, f"the replica simulator missed {broken} in {BROKEN_SEEDS} seeds"


@pytest.mark.parametrize("seed", [19, 33, 53])
def test_file_ring_full_after_a_wrap_is_not_taken_for_empty(seed):
    """Found by the simulator (seeds 19, 33, 53, ...): the destination's file ring, wrapped so its
    tail reached its head exactly, took tail == head for an empty ring and filed the next record
    over the oldest one not yet applied; the next consistency point applied another request's data
    to the image. Fixed in LogDestination._place: the ring is judged wrapped by where its newest
    record lies, not by comparing tail and head."""
    result = run_log_seed(seed, STEPS)
    assert result.ok, result.failure.splitlines()[0]


def test_recover_applies_entries_filed_after_it_was_called():
    """Found by a 1000-step sweep (seed 310084): the destination's file ring was full when the run
    ended, so the last acknowledged entry waited in its NVRAM; recover() applied only what was
    filed when it was called, and the entry, filed once that consistency point freed the ring,
    was never applied: the image lacked an acknowledged write. Fixed in LogDestination.recover:
    it recovers through the last entry stored (acknowledged), applied as it is filed."""
    result = run_log_seed(310084, 1000)
    assert result.ok, result.failure.splitlines()[0]


def test_file_header_written_when_a_consistency_point_empties_the_ring_at_its_end():
    """Found by a sweep (seed 412026, also failing on older trees): a consistency point applied
    every record of a file ring whose last record ended exactly at the file's end, and recorded
    head_offset == the file's size, a header the destination's own recovery rejects ("head outside
    the file"). Seq 70 (version 49) was then filed at the ring's start, flushed, acknowledged and
    dropped from NVRAM; the destination was killed, restarted, fell back to the older header slot
    (applied 59) whose head pointed at records the new lap had overwritten, and lost it. Fixed in
    LogDestination._cp_step and _write_header (a head is where a record starts: the ring's end
    is its start, LF.ring_offset; a header is written only if it reads back as written) and in
    logfile.parse_header_untrusted (a head at the end, as the old firmware wrote, is the start)."""
    result = run_log_seed(412026, STEPS)
    assert result.ok, result.failure.splitlines()[0]
