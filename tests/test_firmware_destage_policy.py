"""The destage policy on its own (firmware/destage_policy.py): when, and which lines first.

A real PrimaryCache with lines installed as the write path installs them; the policy only
decides, so each test reads its answer.
"""
from firmware.cache import Line, PrimaryCache, line_key
from firmware.destage_policy import DestagePolicy
from firmware.params import Params

BS = 4096
FULL = (1 << (BS // 512)) - 1


def _policy(blocks=10, extent_bytes=4 * BS, high=0.5, low=0.2):
    params = Params(0, bytes(16), [1 << 20, 1 << 20], block_size_bytes=BS, high_watermark=high,
                    low_watermark=low, destage_extent_bytes_max=extent_bytes)
    cache = PrimaryCache(blocks, BS)
    return DestagePolicy(params, cache, BS), cache


def _dirty(cache, lun, line_no, bitmap=FULL):
    block = cache.alloc()
    line = Line(block, line_key(lun, line_no), lun, line_no * BS // 512, 1, bitmap, True)
    cache.install(line)
    return line


def _destaged(cache, line):
    cache.remove_current(line)
    line.dead = True
    cache.release_block(line)


def test_it_starts_above_the_high_watermark_and_stops_below_the_low_one():
    policy, cache = _policy(blocks=10, high=0.5, low=0.2)
    lines = [_dirty(cache, 0, n) for n in range(4)]           # 40% used
    assert not policy.wanted(urgent=False)
    lines.append(_dirty(cache, 0, 10))                        # 50%: on
    assert policy.wanted(urgent=False)
    for line in lines[:2]:                                    # 30%: between the marks, still on
        _destaged(cache, line)
    assert policy.wanted(urgent=False)
    _destaged(cache, lines[2])                                # 20%: off
    assert not policy.wanted(urgent=False)


def test_urgent_starts_it_at_any_fill_but_an_empty_queue_wants_nothing():
    policy, cache = _policy()
    assert not policy.wanted(urgent=True)                     # nothing dirty
    _dirty(cache, 0, 0)
    assert policy.wanted(urgent=True)
    policy, cache = _policy()
    _dirty(cache, 0, 0)
    policy.start()                                            # a handover: now, whatever the marks
    assert policy.on and policy.wanted(urgent=False) is False  # 10% is below the low mark: off again


def test_adjacent_whole_lines_go_as_one_extent_up_to_the_bound():
    policy, cache = _policy(blocks=16, extent_bytes=3 * BS)
    for n in (0, 1, 2, 3, 4, 9):
        _dirty(cache, 0, n)
    extents = policy.extents(budget=10, flushing=set(), may_write=lambda lun: True)
    assert [[line.key & 0xFFFF for line in e] for e in extents] == [[0, 1, 2], [3, 4], [9]]


def test_a_partial_line_goes_alone_and_the_budget_bounds_the_extents():
    policy, cache = _policy(blocks=16)
    _dirty(cache, 0, 0, bitmap=0b1)                           # one sector dirty
    _dirty(cache, 0, 1)
    _dirty(cache, 1, 5)
    _dirty(cache, 1, 7)
    extents = policy.extents(budget=2, flushing=set(), may_write=lambda lun: True)
    assert [[line.key & 0xFFFF for line in e] for e in extents] == [[0], [1]]


def test_lines_still_being_written_and_disks_that_may_not_be_written_are_skipped():
    policy, cache = _policy(blocks=16)
    a = _dirty(cache, 0, 0)
    _dirty(cache, 0, 1)
    _dirty(cache, 0, 2)
    b = _dirty(cache, 1, 0)
    extents = policy.extents(budget=10, flushing={line_key(0, 1)}, may_write=lambda lun: lun == 0)
    assert [[line.key for line in e] for e in extents] == [[a.key], [line_key(0, 2)]]
    assert b.key not in {line.key for e in extents for line in e}
