"""A loop turn's host requests in one call (`host_requests`): the same outcome as one by one.

The runtime hands the firmware every request one read of a connection brought, as a batch of
HostRequest records (firmware/requests.py), and carries out one action list. Each test runs the
same requests both ways on identical rigs and compares what the hosts got back, what went over
the link and what NVRAM holds.
"""
import pytest

from firmware.requests import BLOCK_STATUS, FLUSH, READ, TRIM, WRITE, ZEROES, HostRequest
from fixtures.mempair import MemPair
from hal.sim.logrig import MemLog

BS = 4096
MIB = 1 << 20


def _mixed():
    """Requests of every kind, on both LUNs (lun1 is the partner's: forwarded), some refused."""
    return [
        HostRequest(WRITE, "w0", 0, 0, b"a" * 2 * BS, False),
        HostRequest(WRITE, "w1", 1, 8 * BS, b"b" * BS, True),          # the partner's LUN, FUA
        HostRequest(READ, "r0", 0, BS, BS, False),                     # the second block of w0
        HostRequest(ZEROES, "z0", 0, 16 * BS, 3 * BS, False),
        HostRequest(WRITE, "w2", 0, BS + 512, b"c" * 1024, False),     # unaligned, over w0
        HostRequest(TRIM, "t0", 0, 0, BS, False),
        HostRequest(TRIM, "t1", 0, MIB - 512, BS, False),             # past the end: EINVAL
        HostRequest(FLUSH, "f0", 0, 0, 0, False),
        HostRequest(BLOCK_STATUS, "b0", 0, 0, 32 * BS, False),
        HostRequest(READ, "r1", 0, 0, 4 * BS, False),
        HostRequest(WRITE, "bad", 0, MIB - 512, b"d" * BS, False),     # past the end: ENOSPC
        HostRequest(READ, "r2", 1, 8 * BS, BS, False),                 # forwarded
    ]


def _pair(fencing):
    p = MemPair(fencing=fencing, idle_flush_ms=10**9, high_watermark=0.9, low_watermark=0.8)
    p.connect()
    for _ in range(50 if fencing else 1):      # with fencing, the LUNs settle on their owners
        p.tick(10)
    p.deliver()
    return p


def _entry_point(ctrl, h):
    """The same request through the entry point for its kind."""
    if h.kind == WRITE:
        return ctrl.host_write(h.req, h.lun, h.offset, h.arg, h.fua)
    if h.kind == READ:
        return ctrl.host_read(h.req, h.lun, h.offset, h.arg)
    if h.kind == ZEROES:
        return ctrl.host_write_zeroes(h.req, h.lun, h.offset, h.arg, h.fua)
    if h.kind == TRIM:
        return ctrl.host_trim(h.req, h.lun, h.offset, h.arg)
    if h.kind == FLUSH:
        return ctrl.host_flush(h.req, h.lun)
    return ctrl.host_block_status(h.req, h.lun, h.offset, h.arg)


@pytest.mark.parametrize("fencing", [False, True])
def test_a_batch_gets_what_the_same_requests_one_by_one_get(fencing):
    batched, single = _pair(fencing), _pair(fencing)
    batched.run(0, batched.ctrl[0].host_requests(_mixed()))
    for h in _mixed():
        single.run(0, _entry_point(single.ctrl[0], h))
    assert list(batched.wire[1]) == list(single.wire[1])
    batched.deliver()
    single.deliver()
    assert set(batched.replies) == {h.req for h in _mixed()}
    assert batched.replies == single.replies
    assert batched.replies["bad"][0] == 28 and batched.replies["t1"][0] == 22
    assert batched.replies["r1"][1][BS + 512:BS + 1536] == b"c" * 1024
    assert bytes(batched.nv[0]) == bytes(single.nv[0]) and bytes(batched.nv[1]) == bytes(single.nv[1])


def test_a_write_and_a_read_of_it_in_one_batch():
    p = _pair(False)
    p.run(0, p.ctrl[0].host_requests([HostRequest(WRITE, "w", 0, 0, b"x" * BS, False),
                                       HostRequest(READ, "r", 0, 0, BS, False)]))
    p.deliver()
    assert p.replies == {"w": (0, None), "r": (0, b"x" * BS)}


def test_a_request_of_an_unknown_kind_is_refused_loudly():
    p = _pair(False)
    with pytest.raises(ValueError, match="kind 'q'"):
        p.ctrl[0].host_requests([HostRequest("q", "x", 0, 0, BS, False)])


def test_the_log_variant_takes_a_batch_one_by_one():
    rig = MemLog(sources=1)
    rig.connect(0)
    src = rig.src[0]
    rig.run(("src", 0), src.host_requests([HostRequest(WRITE, "w", 0, 0, b"l" * BS, False),
                                           HostRequest(FLUSH, "f", 0, 0, 0, False),
                                           HostRequest(READ, "r", 0, 0, BS, False),
                                           HostRequest(TRIM, "t", 0, 0, BS, False)]))
    rig.deliver()
    assert rig.replies["w"][0] == 0 and rig.replies["r"] == (0, b"l" * BS)
    assert rig.replies["f"][0] == 0 and rig.replies["t"][0] == 0
    with pytest.raises(ValueError, match="does not take"):
        src.host_requests([HostRequest(BLOCK_STATUS, "b", 0, 0, BS, False)])
    dst = rig.dst
    rig.run(("dst", None), dst.host_requests([HostRequest(WRITE, "dw", 0, 0, b"x" * BS, False)]))
    assert rig.replies["dw"][0] == 1                # EPERM: an image volume is read-only
