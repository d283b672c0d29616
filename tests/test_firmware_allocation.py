"""Block status (base:allocation) in the firmware, driven exactly with the in-memory pair.

The rule under test: a range is a hole only if neither the disk nor the cache
holds it, so an acknowledged write is never reported as a hole, whatever the
order of the disk's answer and the destage. Through the non-owner the owner is
asked over the link; anything but a good answer there is "all data".
"""
import pytest

from firmware.allocation import STATE_DATA, STATE_HOLE_ZERO, allocation_runs
from fixtures.mempair import MemPair

BS = 4096
LUN = 1 << 20          # the MemPair's LUN size
HOLE, DATA = STATE_HOLE_ZERO, STATE_DATA


@pytest.mark.parametrize("ranges, runs", [
    ([], [(LUN, HOLE)]),
    ([(0, LUN)], [(LUN, DATA)]),
    ([(BS, 2 * BS)], [(BS, HOLE), (BS, DATA), (LUN - 2 * BS, HOLE)]),
    ([(2 * BS, 3 * BS), (0, BS), (BS, 2 * BS)], [(3 * BS, DATA), (LUN - 3 * BS, HOLE)]),   # joined
    ([(0, 2 * BS), (BS, 3 * BS)], [(3 * BS, DATA), (LUN - 3 * BS, HOLE)]),                  # overlapping
    ([(-BS, BS), (LUN - BS, LUN + BS)], [(BS, DATA), (LUN - 2 * BS, HOLE), (BS, DATA)]),    # clipped
])
def test_allocation_runs(ranges, runs):
    assert allocation_runs(0, LUN, ranges) == runs


def test_allocation_runs_of_a_window():
    assert allocation_runs(BS, 2 * BS, [(0, BS + 512)]) == [(512, DATA), (2 * BS - 512, HOLE)]


def pair(**kw):
    p = MemPair(idle_flush_ms=kw.pop("idle_flush_ms", 10**9), high_watermark=0.9, low_watermark=0.8, **kw)
    p.connect()
    return p


def status(p, i, offset=0, length=LUN, lun=0):
    p.block_status(i, "s", lun, offset, length)
    p.deliver()
    return p.replies.pop("s")


def test_a_written_line_not_yet_destaged_is_data_though_the_disk_has_a_hole():
    p = pair()
    p.write(0, "w", 0, 8 * BS, b"d" * BS)
    p.deliver()
    assert p.replies["w"] == (0, None) and p.written[0] == []      # acknowledged, only in NVRAM
    assert status(p, 0) == (0, [(8 * BS, HOLE), (BS, DATA), (LUN - 9 * BS, HOLE)])


def test_a_partly_written_line_is_data_all_through():
    p = pair()
    p.write(0, "w", 0, 8 * BS + 512, b"p" * 512)
    p.deliver()
    assert status(p, 0) == (0, [(8 * BS, HOLE), (BS, DATA), (LUN - 9 * BS, HOLE)])


def test_a_destaged_line_is_data_from_the_disk():
    p = pair(idle_flush_ms=50)
    p.write(0, "w", 0, 8 * BS, b"d" * 2 * BS)
    p.deliver()
    p.tick(100)                                     # idle: destage everything
    assert p.ctrl[0].cache.dirty_lines == 0 and p.written[0] == [(8 * BS, 10 * BS)]
    assert status(p, 0) == (0, [(8 * BS, HOLE), (2 * BS, DATA), (LUN - 10 * BS, HOLE)])


def test_a_line_destaged_after_the_disk_answered_is_still_data():
    """The disk is asked while the line is only in the cache; the destage lands and the line
    leaves the cache before that (stale) answer arrives. The line counted when asked."""
    p = pair(idle_flush_ms=50)
    p.write(0, "w", 0, 4 * BS, b"r" * BS)
    p.deliver()
    p.extents_held = []
    p.block_status(0, "s", 0, 0, LUN)
    assert "s" not in p.replies and len(p.extents_held) == 1      # the answer says: all hole
    p.tick(100)
    p.deliver()
    assert p.ctrl[0].cache.dirty_lines == 0 and p.written[0] == [(4 * BS, 5 * BS)]
    p.release_extents()
    assert p.replies["s"] == (0, [(4 * BS, HOLE), (BS, DATA), (LUN - 5 * BS, HOLE)])


def test_a_disk_that_cannot_answer_means_all_data():
    p = pair()
    p.extents_error = 5
    assert status(p, 0) == (0, [(LUN, DATA)])
    assert p.ctrl[0].stats["block_status_all_data"] == 1


def test_the_non_owner_asks_the_owner_over_the_link():
    p = pair()
    p.write(1, "w", 0, 16 * BS, b"f" * BS)         # b is not lun0's owner: forwarded
    p.deliver()
    assert status(p, 1, 8 * BS, 16 * BS) == (0, [(8 * BS, HOLE), (BS, DATA), (7 * BS, HOLE)])
    assert p.ctrl[1].stats["block_status_forwarded"] == 1 and p.ctrl[0].stats["block_status"] == 1


def test_the_non_owner_with_the_link_down_answers_all_data():
    p = pair()
    p.write(0, "w", 0, 0, b"x" * BS)
    p.deliver()
    p.disconnect()
    # With fencing off (MemPair), b still knows a owns lun0: it can only say "all data".
    assert status(p, 1) == (0, [(LUN, DATA)])


def test_an_owner_that_does_not_know_the_op_means_all_data():
    p = pair()
    owner = p.ctrl[0]
    owner.allocation.ask = lambda req, lun, offset, length: owner._reply(req, 22)   # an older owner
    assert status(p, 1) == (0, [(LUN, DATA)])
    assert p.ctrl[1].stats["block_status_all_data"] == 1


@pytest.mark.parametrize("offset, length", [(0, 0), (512, LUN), (100, 512), (0, LUN + BS)])
def test_bad_ranges_are_einval(offset, length):
    p = pair()
    assert status(p, 0, offset, length) == (22, None)
