"""Ownership and fencing in the firmware: the state table, and the lease rules, driven exactly.

The in-memory pair keeps its reservation records in a shared list (the shared
disks), so takeover, fencing of a paused owner and failback run here in
virtual time with no processes.
"""
import itertools

import pytest

from firmware.ha.ownership import EVENTS, FenceError, Own, STATES, TRANSITIONS, outcomes
from firmware import mirrorsync as MS
from firmware.formats import reservation as R
from fixtures.mempair import MemPair

BS = 4096


def fenced_pair(**kw):
    p = MemPair(fencing=True, idle_flush_ms=10**9, high_watermark=0.9, low_watermark=0.8, **kw)
    p.connect()
    for _ in range(5):
        p.tick(10)
    return p


def states(p, i):
    return [f.state for f in p.ctrl[i].ownership.fence]


def test_a_fresh_pair_settles_to_the_default_owners():
    p = fenced_pair()
    assert states(p, 0) == [Own.OWNER, Own.PARTNER] and states(p, 1) == [Own.PARTNER, Own.OWNER]
    rec = R.parse_record_untrusted(p.records[0])
    assert rec.owner == 0 and rec.generation >= 1


def arg_for(event, f):
    if event == "record":
        return (R.Record(f.lun, 1, 0, f.generation + 5, 0, 400, bytes(16)),)
    if event == "grant":
        return (f.generation + 1,)
    return ()


@pytest.mark.parametrize("state,event", list(itertools.product(STATES, EVENTS)))
def test_every_ownership_state_and_event_pair(state, event):
    p = fenced_pair()
    ctrl = p.ctrl[0]
    f = ctrl.ownership.fence[0]
    f.state = state
    f.pending_write = R.Record(0, 0, 0, f.generation, 1, 400, bytes(16))
    if (state, event) not in TRANSITIONS:
        with pytest.raises(FenceError):
            ctrl.ownership._own_event(f, event, *arg_for(event, f))
        return
    if event == "grant" and state != Own.PARTNER:
        # An owner hears a grant only after the record made it the owner: at that generation
        # it changes nothing; at another it is a protocol error.
        with pytest.raises(FenceError):
            ctrl.ownership._own_event(f, event, f.generation + 1)
        ctrl.ownership._own_event(f, event, f.generation)
        assert f.state == state
        return
    ctrl.ownership._own_event(f, event, *arg_for(event, f))
    assert f.state in outcomes(state, event)
    assert outcomes(state, event) <= set(STATES)


def test_an_outcome_the_ownership_table_does_not_list_is_refused():
    # The table lists every state a handler may choose; _own_event refuses any other, so a
    # handler that grows a new outcome fails at once (and the simulator's sweeps with it).
    p = fenced_pair()
    ctrl = p.ctrl[0]
    f = ctrl.ownership.fence[0]
    assert f.state == Own.OWNER and Own.SOLO not in outcomes(Own.OWNER, "tick")
    ctrl.ownership._linked_owner_tick = lambda f: Own.SOLO
    with pytest.raises(FenceError, match="tick in state owner led to solo"):
        ctrl.ownership._own_event(f, "tick")


def test_owner_killed_partner_takes_over_after_the_wait_and_replays_the_mirror():
    p = fenced_pair()
    p.write(0, "w", 0, 0, b"m" * 2 * BS)
    p.deliver()
    assert p.replies["w"] == (0, None)
    p.crash(0)
    for _ in range(int(p.params[1].takeover_wait_ms / 10) - 5):
        p.tick(10)
    assert p.ctrl[1].ownership.fence[0].state == Own.WATCHING       # not before the wait
    for _ in range(150):
        p.tick(10)
    assert p.ctrl[1].ownership.fence[0].state == Own.SOLO
    assert p.disks[0][:2 * BS] == b"m" * 2 * BS            # replayed from the mirror segment
    p.read(1, "r", 0, 0, 2 * BS)
    assert p.replies["r"] == (0, b"m" * 2 * BS)
    rec = R.parse_record_untrusted(p.records[0])
    assert rec.owner == 1


def test_partner_waits_while_the_owner_renews_alone_and_refuses_its_lun():
    p = fenced_pair()
    p.disconnect()                                          # link cut, both alive
    for _ in range(300):
        p.tick(10)
    assert p.ctrl[0].ownership.fence[0].state == Own.SOLO
    assert p.ctrl[1].ownership.fence[0].state == Own.WATCHING
    p.write(0, "owner", 0, 0, b"o" * BS)
    p.write(1, "other", 0, 0, b"x" * BS)
    assert p.replies["owner"] == (0, None) and p.replies["other"] == (5, None)
    assert p.disks[0][:BS] == b"o" * BS                     # solo: written through before the ack


def test_paused_owner_resumes_fenced_and_drops_its_stale_lines():
    p = fenced_pair()
    p.write(0, "old", 0, 0, b"1" * BS)
    p.deliver()
    paused = p.ctrl[0]
    p.ctrl[0] = None                                        # paused: gets no events at all
    p.wire[0].clear()
    p.wire[1].clear()
    p.run(1, p.ctrl[1].link_disconnected("peer silent"))
    for _ in range(200):
        p.tick(10)
    assert p.ctrl[1].ownership.fence[0].state == Own.SOLO
    p.write(1, "new", 0, 0, b"2" * BS)
    assert p.replies["new"] == (0, None)
    p.ctrl[0] = paused                                      # resumes, its clock far ahead
    paused.set_time(p.now_ms)
    assert paused.ownership.fence[0].state == Own.OWNER               # it still believes it owns lun0...
    p.write(0, "late", 0, 0, b"3" * BS)
    assert "late" not in p.replies                          # ...but its lease ran out: held
    p.run(0, paused.link_disconnected("peer closed"))       # first event after the pause
    assert paused.ownership.fence[0].state == Own.WATCHING
    assert p.replies["late"] == (5, None)
    assert ("fenced", ) == tuple(n[0] for n in p.notes[0] if n[0] == "fenced")
    assert p.disks[0][:BS] == b"2" * BS                     # the stale line never reached the disk


def test_a_claim_abandoned_while_the_link_came_up_rereads_the_record_and_becomes_partner():
    # Seen on the VM pair: A claimed lun1 before B booted, the link came up during the
    # claim (CLAIMING ignores link_up), B wrote over the claim, and A went back to WATCHING
    # with the link up; B, owner with the link up, renews no record, so A claimed again
    # after the wait and both owned lun1. Now the record decides once the claim is lost.
    p = fenced_pair()
    a, f = p.ctrl[0], p.ctrl[0].ownership.fence[1]
    assert f.state == Own.PARTNER and p.ctrl[1].ownership.fence[1].state == Own.OWNER
    f.state = Own.CLAIMING
    f.pending_write = R.Record(1, 0, R.LunState.CLAIMED, f.generation + 1, 0, 400, bytes(16))
    a.ownership._own_event(f, "record", R.parse_record_untrusted(p.records[1]))
    for _ in range(150):                                   # past the takeover wait
        p.tick(10)
    assert f.state == Own.PARTNER and p.ctrl[1].ownership.fence[1].state == Own.OWNER
    assert R.parse_record_untrusted(p.records[1]).owner == 1


def test_a_long_replay_renews_its_claim_so_a_returning_owner_waits_and_holds_its_lines():
    # A takeover's replay that outlasts takeover_wait_ms (a large mirror, slow disks) must look
    # alive to the old owner coming back with the link down: before the claim renewed during
    # the replay, the old owner claimed the LUN over it after the wait.
    p = fenced_pair()
    p.write(0, "w", 0, 0, b"m" * 2 * BS)
    p.deliver()
    assert p.replies["w"] == (0, None)
    p.crash(0)
    p.stall_disks()                                          # the replay's disk writes hang
    for _ in range(300):
        p.tick(10)
        if p.ctrl[1].ownership.fence[0].state == Own.REPLAYING:
            break
    assert p.ctrl[1].ownership.fence[0].state == Own.REPLAYING
    claim = R.parse_record_untrusted(p.records[0])
    assert (claim.owner, claim.state) == (1, R.LunState.CLAIMED)
    p.boot(0)                                                # back, with the link still down
    for _ in range(300):                                     # 3 s: far past the takeover wait
        p.tick(10)
    a = p.ctrl[0]
    assert a.ownership.fence[0].state == Own.WATCHING
    assert not [n for n in p.notes[0] if n[0] == "takeover_claim"]
    assert a.ownership.fence[0].held_lines                             # kept for the claimant's replay
    renewed = R.parse_record_untrusted(p.records[0])
    assert (renewed.owner, renewed.state, renewed.generation) == (1, R.LunState.CLAIMED, claim.generation)
    assert renewed.counter > claim.counter
    p.resume_disks()
    for _ in range(50):
        p.tick(10)
    assert p.ctrl[1].ownership.fence[0].state == Own.SOLO
    assert R.parse_record_untrusted(p.records[0]).state == R.LunState.SOLO
    assert p.disks[0][:2 * BS] == b"m" * 2 * BS              # replayed
    assert not a.ownership.fence[0].held_lines                         # the claim confirmed: forgotten
    p.read(1, "r", 0, 0, 2 * BS)
    assert p.replies["r"] == (0, b"m" * 2 * BS)


def test_a_cache_line_ownership_request_is_refused_and_changes_nothing():
    from firmware.formats import messages as M
    p = fenced_pair()
    p.write(0, "w", 0, 0, b"q" * BS)
    p.deliver()
    b = p.ctrl[1]
    body = M.Ownership.build(dict(lun=0, scope=1, reserved0=0, lba=8,
                                  generation=b.ownership.fence[0].generation, reserved=bytes(8)))
    b.link.send(M.MsgType.OWNERSHIP_REQUEST, M.Resource.OWNERSHIP, body, tag=7)
    p.run(1, b.flush_link())
    p.deliver()
    for _ in range(20):
        p.tick(10)
    assert ("ownership_refused", {"lun": 0, "scope": 1, "lba": 8,
                                  "reason": "only whole-LUN ownership is served"}) in p.notes[0]
    assert states(p, 0) == [Own.OWNER, Own.PARTNER] and states(p, 1) == [Own.PARTNER, Own.OWNER]
    assert not [n for n in p.notes[0] if n[0] == "handover_start"]
    p.read(1, "r", 0, 0, BS)                                # forwarded to a, still the owner
    p.deliver()
    assert p.replies["r"] == (0, b"q" * BS)


def _frozen(p, i, ticks):
    """Tick the pair with controller i stopped (no events at all), then let it run again."""
    stopped, p.ctrl[i] = p.ctrl[i], None
    for _ in range(ticks):
        p.tick(10)
    p.ctrl[i] = stopped
    stopped.set_time(p.now_ms)
    return stopped


def test_a_claim_abandoned_to_a_solo_owner_voids_the_mirror_it_kept():
    # b claimed lun0 on the record a wrote mirrored; a's renewal, read before the claim landed,
    # landed over it as a SOLO bump, so b's read-back abandoned the claim. The abandon took the
    # SOLO record as seen without judging the mirror by it: no later read showed a new key, and
    # b's next takeover replayed a's old mirrored line over a's newer write-through.
    p = fenced_pair()
    p.write(0, "old", 0, 0, b"1" * 2 * BS)
    p.deliver()
    assert p.replies["old"] == (0, None)
    mirrored = R.parse_record_untrusted(p.records[0])
    p.disconnect()
    b = _frozen(p, 1, 100)                                   # a destages and goes solo meanwhile
    assert p.ctrl[0].ownership.fence[0].state == Own.SOLO
    solo = R.parse_record_untrusted(p.records[0])
    assert solo.state == R.LunState.SOLO and solo.generation == mirrored.generation + 1
    f = b.ownership.fence[0]
    assert f.state == Own.WATCHING and b.ownership._mirror_blocks_of(f)
    f.state = Own.CLAIMING                                    # b's claim, decided on the mirrored record
    f.pending_write = R.Record(0, 1, R.LunState.CLAIMED, mirrored.generation + 2, 0, 400, p.params[1].pair_id)
    f.claim_written_ms = p.now_ms
    b.ownership._own_event(f, "record", solo)                           # its read-back shows a's SOLO record
    assert f.state == Own.WATCHING and not b.ownership._mirror_blocks_of(f)
    p.write(0, "new", 0, 0, b"2" * 2 * BS)                    # write-through, solo
    assert p.replies["new"] == (0, None)
    p.crash(0)
    for _ in range(300):
        p.tick(10)
    assert f.state == Own.SOLO
    p.read(1, "r", 0, 0, 2 * BS)
    assert p.replies["r"] == (0, b"2" * 2 * BS)


def test_a_claim_is_decided_only_on_a_read_fresh_when_acted_on():
    # b watched a crashed owner's record past the takeover wait; its last read landed while b
    # was paused (shorter than a lease, so the re-read guard let it through). Meanwhile a
    # restarted twice and bumped lun0 twice, g -> g+1 -> g+2 (written here as records: an owner
    # now bumps no sooner than lease_ms after its boot or last bump). Acting on the old read, b
    # claimed g+2: the generation a served at, the fencing token, was held by both.
    p = fenced_pair()
    p.disconnect()
    p.crash(0)
    b = p.ctrl[1]
    f = b.ownership.fence[0]
    for _ in range(30):
        p.tick(10)
    assert f.state == Own.WATCHING
    old = bytes(p.records[0])
    g = R.parse_record_untrusted(old).generation
    f.renew_due_ms = 10**9                                   # b reads only when this test says
    while p.now_ms - f.last_change_ms < p.params[1].takeover_wait_ms:
        p.tick(10)
    b.ownership._read_record(f)                                        # in flight: its answer will be `old`
    (read,) = [a for a in b._take() if a.__class__.__name__ == "RecordRead"]
    stopped, p.ctrl[1] = b, None                             # b paused, 300 ms < lease_ms
    for bump in (1, 2):
        for _ in range(15):
            p.tick(10)
        p.records[0] = R.build_record(R.Record(0, 0, R.LunState.SOLO, g + bump, 1, 400, p.params[0].pair_id))
    p.ctrl[1] = stopped
    b.set_time(p.now_ms)
    assert p.now_ms - f.read_start_ms < p.params[1].lease_ms
    p.run(1, b.disk_done(read.op, 0, bytearray(old)))        # the old answer, heard after the pause
    claims = [n[1]["generation"] for n in p.notes[1] if n[0] == "takeover_claim"]
    assert g + 2 not in claims
    rec = R.parse_record_untrusted(p.records[0])
    assert (rec.owner, rec.generation) == (0, g + 2)


def test_an_owner_that_bumped_serves_alone_only_after_a_claim_decided_before_it_would_have_landed():
    # The link is cut; a destages and bumps lun0 to SOLO at g+1. b's claim, decided on the record
    # a had written before (MIRRORED at g, so b keeps its mirror copy of a's lines), lands just
    # after the bump. Had a served write-through at g+1 meanwhile, b's replay of its mirror
    # would later overwrite that write. a serves alone only after a read begun lease_ms after
    # its bump still shows it: here that read shows b's claim, and a has written nothing.
    p = fenced_pair()
    p.write(0, "old", 0, 0, b"1" * BS)
    p.deliver()
    mirrored = R.parse_record_untrusted(p.records[0])
    p.ctrl[1] = None                                          # b stopped: its claim is written below
    p.wire[0].clear()
    p.run(0, p.ctrl[0].link_disconnected("cut"))
    f = p.ctrl[0].ownership.fence[0]
    for _ in range(100):
        p.tick(10)
        if R.parse_record_untrusted(p.records[0]).state == R.LunState.SOLO:
            break
    assert f.state == Own.FENCING and R.parse_record_untrusted(p.records[0]).generation == mirrored.generation + 1
    p.write(0, "new", 0, 0, b"2" * BS)                        # held: not solo yet
    assert "new" not in p.replies
    claim = R.Record(0, 1, R.LunState.CLAIMED, mirrored.generation + 2, 0, 400, p.params[1].pair_id)
    p.records[0] = R.build_record(claim)                     # b's claim lands over the bump
    for _ in range(60):
        p.tick(10)
    assert f.state == Own.WATCHING
    assert p.replies.get("new", (5, None))[0] != 0
    assert p.disks[0][:BS] != b"2" * BS                      # nothing written through at g+1


def test_lines_held_while_we_claim_their_lun_go_out_in_a_resync():
    # a's lines are held under b's claim; b dies, a claims lun0 over it and, while claiming,
    # resyncs with the restarted b, whose mirror has those lines. Not resent, they were freed by
    # the resync, and a crash of a inside its claim left b to take lun0 over without them.
    p = fenced_pair()
    p.write(0, "w", 0, 0, b"w" * 2 * BS)
    p.deliver()
    assert p.replies["w"] == (0, None)
    p.crash(0)
    p.stall_disks()                                          # b's replay hangs: its claim stays CLAIMED
    for _ in range(300):
        p.tick(10)
        if p.ctrl[1].ownership.fence[0].state == Own.REPLAYING:
            break
    p.boot(0)                                                # link down: a holds its lines under b's claim
    for _ in range(5):
        p.tick(10)
    assert p.ctrl[0].ownership.fence[0].held_lines
    p.crash(1)
    p.stalled_writes = []                                    # b's hung replay writes die with it
    for _ in range(300):
        p.tick(10)
        if p.ctrl[0].ownership.fence[0].state == Own.CLAIMING:
            break
    assert p.ctrl[0].ownership.fence[0].state == Own.CLAIMING
    p.boot(1)
    p.connect()
    for _ in range(3):
        p.tick(10)
    b = p.ctrl[1]
    assert b.ownership._mirror_blocks_of(b.ownership.fence[0])    # a's held lines are in b's mirror again
    p.resume_disks()


def test_the_owners_first_record_write_is_a_change_to_a_partner_that_read_none():
    # b booted with the link down and read no record at all (a fresh pair whose owner had yet
    # to write one); a then wrote lun0's first record: the default one, owner a, generation 1,
    # counter 0. b stood in that very record for the missing one, so the write looked like no
    # change and b claimed 200 ms after its own boot, 182 ms after a's write landed (seed
    # 700954): a's lease began at its read, so it could still be serving.
    p = MemPair(fencing=True, idle_flush_ms=10**9, high_watermark=0.9, low_watermark=0.8)
    p.crash(0)
    p.crash(1)
    p.records = [bytes(512) for _ in p.records]
    p.boot(1)
    b, wait = p.ctrl[1], p.params[1].takeover_wait_ms
    for _ in range(5):
        p.tick(10)
    assert b.ownership.fence[0].state == Own.WATCHING
    written_ms = p.now_ms
    p.records[0] = R.build_record(R.Record(0, 0, R.LunState.MIRRORED, 1, 0, p.params[0].lease_ms,
                                           p.params[0].pair_id))
    while not any(n[0] == "takeover_claim" and n[1]["lun"] == 0 for n in p.notes[1]):
        assert p.now_ms < written_ms + 10 * wait, "b never claimed the LUN of its silent partner"
        p.tick(10)
    assert p.now_ms - written_ms >= wait


def test_a_mirror_block_our_takeover_replays_is_not_overwritten_by_the_old_owner():
    # a claims lun1 and will replay its mirror copy of b's acknowledged write; b had freed that
    # block in its own cache (a newer version replaced it, cut off from its mirror ack and failed
    # when b was fenced) and reused it for another line. Written into a's mirror, that line took
    # the block of the write a's replay needed (seed 805035 at 300 steps). Refused whole now,
    # before anything changed: the session ends, and a's copy stays for the replay.
    from firmware.formats.nvram import crc32c
    from firmware.mirror import MirrorError
    p = fenced_pair()
    p.write(1, "w", 1, 8 * BS, b"x" * BS)
    p.deliver()
    assert p.replies["w"] == (0, None)
    a = p.ctrl[0]
    (block,) = a.mirror.view.values()
    data = b"y" * BS
    entries = [(block, 0, crc32c(data), (1 << 8) - 1)]
    a.mirror.write(0, 900, 1, 0, 1, entries, data, a.ownership.mirror_replaying)   # not taking over: b's call
    assert a.mirror.blocks[block].lun == 0
    p = fenced_pair()
    p.write(1, "w", 1, 8 * BS, b"x" * BS)
    p.deliver()
    a = p.ctrl[0]
    (block,) = a.mirror.view.values()
    a.ownership.fence[1].state = Own.CLAIMING
    with pytest.raises(MirrorError, match="our takeover replays"):
        a.mirror.write(0, 900, 1, 0, 1, entries, data, a.ownership.mirror_replaying)
    kept = a.mirror.blocks[block]
    assert (kept.lun, kept.lba) == (1, 8 * BS // 512) and a.mirror.view == {kept.key: block}
    assert not a.mirror.group


def test_a_copy_mirrored_at_the_owners_new_generation_outlives_a_void_noted_on_that_move():
    # a went solo at g+1 while b was cut off, then mirrored again at g+1. b had stayed watching
    # through that session (its own resync ran), its copies judged at g: it noted a's MIRRORED
    # record at g+1 as a move and voided at its claim every copy of lun0, also the write a had
    # mirrored to it at g+1 and acknowledged (seed 905875 at 300 steps). Copies made at the
    # record's generation came after it: only older ones are old data.
    p = fenced_pair()
    p.write(0, "old", 0, 0, b"1" * BS)
    p.deliver()
    g = R.parse_record_untrusted(p.records[0]).generation
    p.disconnect()
    b = _frozen(p, 1, 100)                                   # a destages, goes solo at g+1
    assert R.parse_record_untrusted(p.records[0]).generation == g + 1
    p.connect()
    for _ in range(30):
        p.tick(10)
    p.write(0, "new", 0, 0, b"2" * BS)                        # mirrored to b at g+1
    p.deliver()
    assert p.replies["new"] == (0, None)
    f = b.ownership.fence[0]
    assert len(b.ownership._mirror_blocks_of(f)) == 1 and f.peer_generation == g + 1
    p.crash(0)
    p.disconnect()
    f.mirror_generation, f.last_seen = g, None               # as judged when watching began, before the move
    for _ in range(300):
        p.tick(10)
    assert f.state == Own.SOLO
    assert [n for n in p.notes[1] if n[0] == "mirror_void" and n[1]["lun"] == 0] != []
    p.read(1, "r", 0, 0, BS)
    assert p.replies["r"] == (0, b"2" * BS)


def _bumped_then_cut_on_a_write(claim_lands):
    """a bumps lun0 to g+1 cut off from b, is mirrored again at g+1, then loses the link on a
    write whose mirror ack never came; the link comes back at once. If `claim_lands`, b's claim
    decided on a's record from before the bump (g, so two above it) lands meanwhile."""
    p = fenced_pair()
    a, b = p.ctrl[0], p.ctrl[1]
    f = a.ownership.fence[0]
    g = R.parse_record_untrusted(p.records[0]).generation
    p.ctrl[1] = None
    p.wire[0].clear()
    p.run(0, a.link_disconnected("cut"))
    while R.parse_record_untrusted(p.records[0]).state != R.LunState.SOLO:
        p.tick(10)
    bumped_ms = p.now_ms
    p.ctrl[1] = b
    b.set_time(p.now_ms)
    p.disconnect()
    p.connect()
    while f.state != Own.OWNER:
        p.tick(10)
    p.ctrl[1] = None
    p.write(0, "w", 0, 0, b"2" * BS)
    p.wire[0].clear()
    p.run(0, a.link_disconnected("cut"))
    assert f.acks
    p.ctrl[1] = b
    b.set_time(p.now_ms)
    p.disconnect()
    p.connect()
    for _ in range(5):
        p.tick(10)
    assert p.now_ms - bumped_ms < p.params[0].lease_ms
    early = p.replies.get("w")
    if claim_lands:
        p.records[0] = R.build_record(R.Record(0, 1, R.LunState.CLAIMED, g + 2, 0, 400, p.params[1].pair_id))
    for _ in range(60):
        p.tick(10)
    return early, p.replies.get("w")


def test_a_write_cut_off_from_its_mirror_ack_is_acknowledged_only_a_lease_after_a_bump():
    # a's bump to g+1 landed after b read g; b's claim at g+2, decided on that read, lands within
    # lease_ms of it. a's write, cut off from its mirror ack, is on disk but not in b's mirror:
    # acknowledged at a record read within that time, b's replay of its older copy then lost it
    # (seed 902844 at 300 steps). It waits for a read begun lease_ms after the bump, as serving
    # solo does: the claim fences a first, and the write fails.
    early, final = _bumped_then_cut_on_a_write(claim_lands=True)
    assert early is None
    assert final is not None and final[0] != 0
    early, final = _bumped_then_cut_on_a_write(claim_lands=False)
    assert early is None and final == (0, None)


def test_a_record_read_begun_before_a_grant_does_not_fence_the_new_owner():
    # b's record read of lun0 was in flight when a handed lun0 to b; its answer, a's record from
    # before the release, came after the grant. Taken as a newer owner's record, it fenced b,
    # which dropped the line of a write a had mirrored for it and acknowledged (seed 871927 at
    # 1000 steps: write 224, lost at the next failover). It is read again instead.
    p = fenced_pair()
    b = p.ctrl[1]
    f = b.ownership.fence[0]
    assert f.state == Own.PARTNER
    old = bytes(p.records[0])
    b.ownership._read_record(f)
    (read,) = [x for x in b._take() if x.__class__.__name__ == "RecordRead"]
    p.run(1, b.move_lun(0))
    for _ in range(20):
        p.tick(10)
        if f.state == Own.OWNER:
            break
    assert f.state == Own.OWNER and f.generation == R.parse_record_untrusted(old).generation + 1
    p.write(1, "w", 0, 0, b"3" * BS)
    p.deliver()
    assert p.replies["w"] == (0, None)
    assert p.now_ms - f.read_start_ms < p.params[1].lease_ms
    p.run(1, b.disk_done(read.op, 0, bytearray(old)))       # the answer from before the grant
    for _ in range(5):
        p.tick(10)
    assert f.state == Own.OWNER and not [n for n in p.notes[1] if n[0] == "fenced"]
    p.read(1, "r", 0, 0, BS)
    assert p.replies["r"] == (0, b"3" * BS)


def _power_cut_both_and_read_back(p, expected):
    """Both controllers lose power, boot, settle; lun0's first block reads `expected` (the newest
    acknowledged version, not an older one a restart replayed over it)."""
    p.crash(0)
    p.crash(1)
    p.boot(0)
    p.boot(1)
    for _ in range(100):
        p.tick(10)
    p.read(0, "r", 0, 0, BS)
    assert p.replies["r"] == (0, expected)


def test_an_old_version_waiting_for_its_replacement_is_forgotten_once_a_newer_one_is_on_disk():
    # a's write v2 over v1 lost its mirror ack with the link; a destaged v2 while fencing, and
    # the link came back within lease_ms of a's boot, so v2 waits to be acknowledged (and v1,
    # the version it replaced, stays in NVRAM with it). v3 was then acknowledged and destaged.
    # At a power cut v1 was the only version of its key left in NVRAM, and the restart replayed
    # it over v3 (seed 910743 at 300 steps). A durable destage forgets every older version.
    p = fenced_pair()
    a, b = p.ctrl[0], p.ctrl[1]
    f = a.ownership.fence[0]
    p.write(0, "v1", 0, 0, b"1" * BS)
    p.deliver()
    assert p.replies["v1"] == (0, None)
    p.ctrl[1] = None
    p.write(0, "v2", 0, 0, b"2" * BS)
    p.wire[0].clear()
    p.run(0, a.link_disconnected("cut"))
    p.ctrl[1] = b
    b.set_time(p.now_ms)
    p.disconnect()
    for _ in range(3):
        p.tick(10)
    assert f.state == Own.FENCING and f.acks and bytes(p.disks[0][:BS]) == b"2" * BS
    p.connect()
    for _ in range(100):
        if f.state == Own.OWNER:
            break
        p.tick(10)
    assert f.state == Own.OWNER and f.acks                   # v2 still waits: too soon after the boot
    p.write(0, "v3", 0, 0, b"3" * BS)
    p.deliver()
    assert p.replies["v3"] == (0, None)
    a.params.idle_flush_ms = 0
    for _ in range(5):
        p.tick(10)
    assert a.cache.dirty_lines == 0
    _power_cut_both_and_read_back(p, b"3" * BS)


def test_a_partner_asked_for_a_lun_the_record_says_it_owns_takes_it():
    # b's release record naming a landed after a, restarting, had read the record, and the grant
    # went with the session a's restart ended: a stayed partner; b read its release back, became
    # a partner too and asked for lun1 back, and a ignored a request for a LUN it did not own.
    # Nobody owned lun1 (seed 946666 at 300 steps). Asked, a partner reads the record.
    p = fenced_pair()
    a, b = p.ctrl[0], p.ctrl[1]
    fa, fb = a.ownership.fence[1], b.ownership.fence[1]
    assert (fa.state, fb.state) == (Own.PARTNER, Own.OWNER)
    g = R.parse_record_untrusted(p.records[1]).generation
    p.records[1] = R.build_record(R.Record(1, 0, R.LunState.MIRRORED, g + 1, 0, 400, p.params[1].pair_id))
    fb.state, fb.generation, fb.want_back, fb.last_change_ms = Own.PARTNER, g + 1, True, -10**6
    for _ in range(300):
        p.tick(10)
        if fb.state == Own.OWNER:
            break
    assert fb.state == Own.OWNER and fa.state == Own.PARTNER
    assert fb.generation > g + 1
    p.write(1, "w", 1, 0, b"4" * BS)
    p.deliver()
    assert p.replies["w"] == (0, None)


def test_an_old_version_under_a_forgotten_one_is_forgotten_once_a_newer_one_is_on_disk():
    # As above, but v2's destage flush was still out when v3 replaced it: v3's mirror ack made
    # v2 dead and forgotten first, and its link to v1 (still waiting for v2's ack) went with it.
    # v2's and v3's destage then forgot nothing, and the restart replayed v1 over v3 (seed
    # 961143 at 300 steps). The walk goes past forgotten versions.
    p = fenced_pair()
    a, b = p.ctrl[0], p.ctrl[1]
    f = a.ownership.fence[0]
    p.write(0, "v1", 0, 0, b"1" * BS)
    p.deliver()
    p.ctrl[1] = None
    p.write(0, "v2", 0, 0, b"2" * BS)
    p.wire[0].clear()
    p.stall_flushes()
    p.run(0, a.link_disconnected("cut"))
    p.ctrl[1] = b
    b.set_time(p.now_ms)
    p.disconnect()
    for _ in range(50):
        if p.stalled_flushes:
            break
        p.tick(10)
    assert f.state == Own.FENCING and f.acks and p.stalled_flushes
    p.connect()
    for _ in range(100):
        if f.state == Own.OWNER:
            break
        p.tick(10)
    assert f.state == Own.OWNER and f.acks
    p.write(0, "v3", 0, 0, b"3" * BS)
    p.deliver()
    assert p.replies["v3"] == (0, None)
    p.resume_flushes()
    a.params.idle_flush_ms = 0
    for _ in range(5):
        p.tick(10)
    assert a.cache.dirty_lines == 0
    _power_cut_both_and_read_back(p, b"3" * BS)


def test_a_held_line_destaged_since_is_not_resent_to_the_partner():
    # a's line was being destaged when b's claim made a hold it; the destage's flush then
    # completed, so the line is on disk, its block free and b's copy freed. b died in its claim,
    # a claimed lun0 in turn and resynced with the restarted b meanwhile: the dead held line went
    # out in the resync, and b's mirror kept it as a dirty line of a's that a no longer had (seed
    # 970864 at 1000 steps); b's next takeover would have replayed that old data.
    p = fenced_pair()
    a = p.ctrl[0]
    p.write(0, "w", 0, 0, b"w" * BS)
    p.deliver()
    assert p.replies["w"] == (0, None)
    p.stall_flushes()
    a.params.idle_flush_ms = 0
    p.tick(10)                                               # a's destage: written, its flush waits
    a.params.idle_flush_ms = 10**9
    line = next(iter(a.cache.lines.values()))
    assert line.flushing and p.stalled_flushes
    p.disconnect()
    _frozen(p, 0, 150)                                       # b claims lun0, its replay's flush waits
    assert p.ctrl[1].ownership.fence[0].state == Own.REPLAYING
    for _ in range(3):
        p.tick(10)                                           # a reads b's CLAIMED record: holds the line
    f = a.ownership.fence[0]
    assert f.held_lines == [line]
    ours = [s for s in p.stalled_flushes if s[0] == 0]
    p.stalled_flushes = [s for s in p.stalled_flushes if s[0] == 1]
    for i, act, mark in ours:                                # a's destage flush completes, b's does not
        p.disks[act.lun].flush_done(mark)
        p.run(0, a.disk_done(act.op, 0, None))
    assert line.dead and line in f.held_lines
    p.crash(1)
    p.stalled_flushes = None
    for _ in range(300):
        p.tick(10)
        if f.state in (Own.CLAIMING, Own.REPLAYING):
            break
    assert f.state in (Own.CLAIMING, Own.REPLAYING)
    p.boot(1)
    p.connect()
    for _ in range(300):
        p.tick(10)
        if f.state == Own.OWNER and not any(n.state == Own.STARTING for n in p.ctrl[1].ownership.fence):
            break
    assert f.state == Own.OWNER and not [k for k in a.cache.lines if k >> 40 == 0]
    b = p.ctrl[1]
    assert not b.ownership._mirror_blocks_of(b.ownership.fence[0])   # nothing of lun0 a no longer holds
    p.read(0, "r", 0, 0, BS)
    assert p.replies["r"] == (0, b"w" * BS)


def test_a_claim_abandoned_to_another_owner_judges_its_own_lines_of_the_lun():
    # b, restarted inside its claim of lun1, still had its own lines of lun1 from before a took
    # the LUN over; the read-back showed a's record, so b gave the claim up but kept the lines in
    # its cache. Its next claim replayed them over a's newer write-through (seed 1012966 at 300
    # steps: write 8 over write 151). Abandoning judges them by the record that won.
    p = fenced_pair()
    b = p.ctrl[1]
    p.write(1, "old", 1, 0, b"o" * BS)
    p.deliver()
    assert p.replies["old"] == (0, None)
    p.ctrl[1] = None                                         # b stops, its line of lun1 not destaged
    p.disconnect()
    for _ in range(300):
        p.tick(10)                                           # a claims lun1, replays, goes SOLO
    a = p.ctrl[0]
    assert a.ownership.fence[1].state == Own.SOLO
    p.write(0, "new", 1, 0, b"n" * BS)                       # write-through, alone
    assert p.replies["new"] == (0, None)
    solo = R.parse_record_untrusted(p.records[1])
    p.ctrl[1] = b
    b.set_time(p.now_ms)
    f = b.ownership.fence[1]
    assert any(line.lun == 1 for line in b.cache.lines.values())
    f.state = Own.CLAIMING                                   # b's claim, resumed after a restart
    f.pending_write = R.Record(1, 1, R.LunState.CLAIMED, solo.generation - 1, 0, 400, p.params[1].pair_id)
    f.claim_written_ms = p.now_ms
    p.run(1, b.link_disconnected("cut"))
    b.ownership._own_event(f, "record", solo)                          # its read-back shows a's SOLO record
    assert f.state == Own.WATCHING
    assert not any(line.lun == 1 for line in b.cache.lines.values()) and not f.held_lines
    p.crash(0)
    for _ in range(400):
        p.tick(10)
        if f.state == Own.SOLO:
            break
    assert f.state == Own.SOLO
    p.read(1, "r", 1, 0, BS)
    assert p.replies["r"] == (0, b"n" * BS)


def test_a_takeover_done_while_linked_resends_everything_and_keeps_serving():
    # a's claim of lun1 was abandoned to b's; a kept its copies of b's lines from before (their
    # verdict was deferred to a's own claim, then judged against b's claim still CLAIMED). b's
    # replay made those lines durable, and b finished its takeover with the link up: nothing
    # told a, whose mirror kept three copies b no longer held (seed 1201964 at 1,000 steps).
    # A takeover finished while linked resends everything; the partner frees what is not. The
    # pair stays mirrored meanwhile, and the resend's end re-reads no record (a full resync's
    # does, and hosts got EIO while b's LUNs re-read theirs).
    p = fenced_pair()
    a, b = p.ctrl[0], p.ctrl[1]
    p.write(1, "w", 1, 0, b"w" * BS)
    p.deliver()
    assert p.replies["w"] == (0, None)
    line = next(iter(b.cache.lines.values()))
    assert a.mirror.view.get(line.key) == line.block
    b.cache.remove_current(line)                 # on disk, its flush-done lost: a's copy is old now
    line.dead = True
    b.write_path.maybe_free(line)
    starts = sum(kind == "resync_start" for kind, _ in p.notes[1])
    f = b.ownership.fence[1]
    f.state = b.ownership._takeover_done(f)
    assert b.sync_state == MS.RESENDING and b.mirroring
    p.run(1, b._take())
    p.deliver()
    for _ in range(5):
        p.tick(10)
    assert sum(kind == "resync_start" for kind, _ in p.notes[1]) == starts + 1
    assert b.sync_state == MS.MIRRORED and f.state == Own.OWNER
    assert b.ownership.fence[0].state != Own.STARTING and a.ownership.fence[0].state == Own.OWNER
    assert line.key not in a.mirror.view


def test_a_restarted_owners_resync_copies_carry_the_generation_their_lines_were_written_at():
    # Seed 1700244 at 300 steps: a owned lun1 at generation 4 (its record still said SOLO at 4:
    # the MIRRORED rewrite had not landed) and mirrored write 132 to b at 4. A power cut; a came
    # back and resent its lines, each stamped with a's controller generation (1), not the LUN's.
    # a paused before the LUN settled; b claimed it and voided its copies below 4 (a SOLO owner's
    # old data), among them write 132's, acknowledged and nowhere else.
    p = fenced_pair()
    a, b = p.ctrl[0], p.ctrl[1]
    for who in (1, 0):                                      # a handover there and back: generation 3
        p.run(who, p.ctrl[who].move_lun(0))
        for _ in range(30):
            p.tick(10)
            if p.ctrl[who].ownership.fence[0].state == Own.OWNER:
                break
    f = p.ctrl[0].ownership.fence[0]
    assert f.state == Own.OWNER and f.generation == 3 and a.generation == 1
    p.write(0, "w", 0, 0, b"g" * BS)
    p.deliver()
    assert p.replies["w"] == (0, None)
    (block,) = [blk for blk in p.ctrl[1].mirror.blocks if blk is not None and blk.lun == 0]
    assert block.generation == 3
    p.stall_disks()                 # a's line is not destaged at the restart: it is resent below
    p.crash(0, power=False)                                 # a's process dies; its NVRAM stays
    p.boot(0)
    assert len(p.ctrl[0].cache.lines) == 1
    p.connect()
    for _ in range(3):
        p.tick(10)
    (block,) = [blk for blk in p.ctrl[1].mirror.blocks if blk is not None and blk.lun == 0]
    assert block.generation == 3                            # resent, still the generation it was written at


def test_a_grant_that_arrives_after_the_record_made_us_the_owner_changes_nothing():
    # VM pair in CI: a, asking for lun2 back, read the record while b's grant was on the wire;
    # b's release record named a, so a became the owner from it, and the grant that came next
    # ("grant not allowed in state owner") ended the link session: both LUNs went solo.
    p = fenced_pair()
    a, b = p.ctrl[0], p.ctrl[1]
    p.run(1, b.move_lun(0))
    for _ in range(30):
        p.tick(10)
        if b.ownership.fence[0].state == Own.OWNER:
            break
    f = a.ownership.fence[0]
    assert f.state == Own.PARTNER and b.ownership.fence[0].state == Own.OWNER
    p.run(0, a.move_lun(0))                                  # a asks for it back
    for _ in range(10):                                      # only b hears: it releases and grants
        while p.wire[1]:
            p.run(1, b.link_frame(p.wire[1].popleft(), p.now_ms))
        if b.ownership.fence[0].state == Own.PARTNER:
            break
        p.now_ms += 10
        p.run(1, b.tick(p.now_ms))
    assert b.ownership.fence[0].state == Own.PARTNER and p.wire[0]     # the grant is on its way to a
    a.ownership._read_record(f)                                         # a's own read lands first
    p.run(0, a._take())
    assert f.state == Own.OWNER
    p.deliver()                                               # then the grant
    for _ in range(5):
        p.tick(10)
    assert f.state == Own.OWNER and a.link.up
    assert not [n for n in p.notes[0] if n[0] == "link_down"]
    p.write(0, "w", 0, 0, b"n" * BS)
    p.deliver()
    assert p.replies["w"] == (0, None)


def test_a_second_takeover_done_during_a_resend_resends_again_still_mirrored():
    # Seed 1900132 at 300 steps: a's second takeover finished while the first one's resend ran;
    # sent through resync_again, the second resend became a full resync (not mirrored), whose
    # end re-read every LUN's record, and lun1, being handed back to b, refused that as a
    # protocol error: the session ended. A resend during a resend stays a resend.
    p = fenced_pair()
    b = p.ctrl[1]
    f = b.ownership.fence[1]
    before = len(p.notes[1])
    f.state = b.ownership._takeover_done(f)
    assert b.sync_state == MS.RESENDING
    f.state = b.ownership._takeover_done(f)                # another one, before the partner answered
    assert b.sync_state == MS.RESEND_AGAIN and b.mirroring
    p.run(1, b._take())
    p.deliver()
    assert b.sync_state == MS.MIRRORED and b.mirroring
    for _ in range(5):
        p.tick(10)
    notes = p.notes[1][before:]
    assert sum(kind == "resync_start" for kind, _ in notes) == 2
    assert not [n for n in notes if n[0] == "ownership_state" and n[1]["lun"] == 0]   # lun0 was not re-read
    assert b.ownership.fence[0].state == Own.PARTNER and f.state == Own.OWNER
