"""The ha pair's mirroring state table (firmware/mirrorsync.py), walked whole and driven through
the real paths of an in-memory pair."""
import itertools

import pytest

from firmware import mirrorsync as MS
from firmware.ha.ownership import Own
from fixtures.mempair import MemPair

BS = 4096


@pytest.mark.parametrize("state,event", list(itertools.product(MS.STATES, MS.EVENTS)))
def test_every_mirroring_state_and_event_pair(state, event):
    if (state, event) in MS.TRANSITIONS:
        assert MS.next_state(state, event) == MS.TRANSITIONS[(state, event)] in MS.STATES
    else:
        with pytest.raises(MS.MirrorSyncError, match=f"{event} cannot happen in state {state}"):
            MS.next_state(state, event)


def _connect_until(p, i, state):
    """Bring the link up frame by frame until controller i's mirroring is in `state`."""
    for j in range(2):
        p.run(j, p.ctrl[j].link_connected(bytes([j + 1]) * 32, p.now_ms))
    for n in range(400):
        if p.ctrl[i].sync_state == state:
            return
        j = n % 2
        if p.wire[j]:
            p.run(j, p.ctrl[j].link_frame(p.wire[j].popleft(), p.now_ms))
    raise AssertionError(f"controller {'ab'[i]} never got to {state}: {p.ctrl[i].sync_state}")


def test_a_lun_gone_solo_during_the_resync_makes_it_run_again():
    p = MemPair(fencing=True, idle_flush_ms=10**9, high_watermark=0.9, low_watermark=0.8)
    a = p.ctrl[0]
    assert a.sync_state == MS.DOWN and not a.mirroring
    p.connect()
    for _ in range(5):
        p.tick(10)
    assert a.sync_state == MS.MIRRORED and a.mirroring and not a.sync_pending
    p.write(0, "w", 0, 0, b"w" * BS)
    p.deliver()
    p.disconnect()
    assert a.sync_state == MS.DOWN
    f = a.ownership.fence[0]
    for _ in range(300):                     # a destages lun0, bumps it, then waits lease_ms to serve
        p.tick(10)
        if f.solo_after_ms is not None:
            break
    assert f.state != Own.SOLO and f.solo_after_ms is not None
    _connect_until(p, 0, MS.RESYNCING)
    assert a.sync_pending and not a.mirroring
    for _ in range(100):                      # the clock only: nothing of the partner arrives meanwhile
        p.now_ms += 10
        p.run(0, a.tick(p.now_ms))
        if f.state == Own.SOLO:
            break
    assert f.state == Own.SOLO and a.sync_state == MS.RESYNC_AGAIN
    p.deliver()                               # the first answer resends everything; the second mirrors
    for _ in range(5):
        p.tick(10)
    assert a.sync_state == MS.MIRRORED
    starts = [fields for kind, fields in p.notes[0] if kind == "resync_start"]
    assert len(starts) == 3                   # the first session's, and this one's twice
