"""Seeds the simulator found that show a real firmware problem, kept as regression tests.

Each test names the seed and the diagnosis; xfail until the firmware is fixed.
"""
import pytest

from hal.sim import Sim


def test_lossy_link_heavy_loss_fast_heartbeat_makes_progress():
    """Seed 1, lossy transport, 5% drop and duplication, heartbeat every 10 ms, no other faults.

    Diagnosis: heartbeats take sequence numbers and so join the go-back-N
    backlog; the sender retransmits only after rto_ms (250 ms) without any
    progress, and the receiver drops everything after a gap, so each round
    recovers about 1/p frames while 25 heartbeats are added: unacked grows
    without bound, a mirror write stays unacked and its host write hangs
    (not a safety violation: the session neither fails nor completes).

    Fixed in firmware/link.py: heartbeats are unsequenced (like acks), and an
    ack that moves nothing triggers a rate-limited go-back-N at once.
    """
    sim = Sim(1, steps=120, overrides=dict(reliable=False, p_link_loss=0.05, p_link_corrupt=0.0,
                                          p_disk_eio=0.0, kinds=[], heartbeat_ms=10, buggify={},
                                          settle_limit_us=10_000_000))
    result = sim.run()
    assert result.ok, f"{result.failure.splitlines()[0]}\n  replay: see this test"
