"""The ha write path in the firmware, driven exactly with the in-memory pair.

Each test states the topology and the fault: holding-pen validation, atomic
multi-block mirroring, torn NVRAM records, destage with flush-begin/done,
degraded writes and the resync after the link returns.
"""
import pytest

from firmware.formats import nvram as N
from firmware.formats import messages as M
from fixtures.mempair import MemPair

BS = 4096


def mirror_blocks(pair, i):
    return {k: pair.ctrl[i].mirror.blocks[b].seq for k, b in pair.ctrl[i].mirror.view.items()}


def primary_lines(pair, i):
    return {k: line.seq for k, line in pair.ctrl[i].cache.lines.items()}


def idle_pair(**kw):
    p = MemPair(idle_flush_ms=10**9, high_watermark=0.9, low_watermark=0.8, **kw)
    p.connect()
    return p


def test_write_is_acked_only_after_the_partner_persisted_the_mirror():
    p = idle_pair()
    p.write(0, "w", 0, 0, b"x" * BS)
    assert "w" not in p.replies                     # the mirror frame is still on the wire
    p.deliver()
    assert p.replies["w"] == (0, None)
    assert mirror_blocks(p, 1) == primary_lines(p, 0)


def test_holding_pen_deletes_every_mirror_request_when_the_data_is_invalid():
    """Claims 2.5: a 3-block write whose 2nd block lands corrupt in NVRAM sends nothing."""
    fired = []

    def buggify(site):
        if site == "nvram_store_corrupt":
            fired.append(site)
            return len(fired) == 2
        return False
    p = idle_pair(buggify=buggify)
    p.write(0, "w", 0, 0, b"y" * 3 * BS)
    assert p.replies["w"] == (5, None)              # EIO, at once
    assert not p.wire[1]                            # no mirror request left the pen
    assert p.ctrl[0].cache.dirty_lines == 0 and len(p.ctrl[0].cache.free) == p.ctrl[0].cache.capacity
    p.write(0, "again", 0, 0, b"y" * 3 * BS)
    p.deliver()
    assert p.replies["again"] == (0, None) and len(mirror_blocks(p, 1)) == 3


def test_multi_block_write_goes_to_the_partner_in_one_message():
    p = idle_pair()
    p.write(0, "w", 0, 0, b"1" * 4 * BS)
    assert [f[3] for f in p.wire[1]] == [M.MsgType.MIRROR_WRITE]
    p.deliver()
    assert p.replies["w"] == (0, None) and len(mirror_blocks(p, 1)) == 4
    assert p.ctrl[1].stats["mirror_writes_received"] == 1


def test_multi_block_write_is_all_or_nothing_at_the_partner_across_its_crash():
    p = idle_pair(mirror_message_bytes_max=2 * BS)  # a 4-block write travels in two messages
    p.write(0, "old", 0, 0, b"1" * 4 * BS)
    p.deliver()
    p.write(0, "new", 0, 0, b"2" * 4 * BS)
    frames = list(p.wire[1])
    p.wire[1].clear()
    mirror_writes = [f for f in frames if f[3] == M.MsgType.MIRROR_WRITE]
    assert len(mirror_writes) == 2
    for f in mirror_writes[:1]:                     # half of the group reaches b, then b dies
        p.run(1, p.ctrl[1].link_frame(f, 0))
    p.crash(1)
    p.boot(1)
    recovered = [n for n in p.notes[1] if n[0] == "recovered"][-1][1]
    assert recovered["mirror_blocks"] == 4          # the old version, whole
    assert all(b.seq == 1 for b in p.ctrl[1].mirror.blocks if b is not None)
    dropped = [n for n in p.notes[1] if n[0] == "nvram_dropped"]
    assert len(dropped) == 2 and all("incomplete write" in n[1]["reason"] for n in dropped)


def test_torn_primary_descriptor_is_reported_and_never_served():
    p = idle_pair()
    p.write(0, "w", 0, 0, b"z" * BS)
    p.deliver()
    block = p.ctrl[0].cache.lines[0].block
    offset = p.ctrl[0].primary.desc_base + block * N.DESC_SIZE_BYTES
    p.crash(0)
    p.nv[0][offset + 10] ^= 0xFF                    # tear the record
    p.boot(0)
    dropped = [n[1] for n in p.notes[0] if n[0] == "nvram_dropped"]
    assert any("descriptor CRC32C mismatch" in d["reason"] and f"offset {offset}" in d["reason"]
               for d in dropped)
    p.read(0, "r", 0, 0, BS)
    assert p.replies["r"] == (0, bytes(BS))         # the disk's zeros, not the torn record's data


def test_destage_sends_flush_begin_then_flush_done_and_frees_both_copies():
    p = MemPair(idle_flush_ms=50)
    p.connect()
    p.write(0, "w", 0, 8 * BS, b"d" * 2 * BS)
    p.deliver()
    assert len(mirror_blocks(p, 1)) == 2
    p.tick(100)                                     # idle: destage everything
    assert p.disks[0][8 * BS:10 * BS] == b"d" * 2 * BS
    assert mirror_blocks(p, 1) == {} and p.ctrl[0].cache.dirty_lines == 0
    stats = p.ctrl[1].stats
    assert stats["mirror_blocks_received"] == 2 and stats["mirror_writes_received"] == 1
    assert p.ctrl[1].mirror.counts()["mirror_blocks"] == 0


def test_destage_frees_nothing_and_sends_no_flush_done_before_the_disk_flush():
    """A completed disk write may still be in the disk's volatile cache: both NVRAM copies stay
    until a flush of the LUN says durable; one flush covers the whole destage round."""
    p = MemPair(idle_flush_ms=50)
    p.connect()
    for k in range(4):
        p.write(0, f"w{k}", 0, (8 + 2 * k) * BS, bytes([k + 1]) * BS)
    p.deliver()
    p.stall_flushes()
    p.tick(100)                                     # idle: destage everything, writes complete
    assert p.disks[0][8 * BS:9 * BS] == b"\x01" * BS
    p.deliver()
    assert len(p.stalled_flushes) == 1              # one flush in flight per LUN
    assert len(mirror_blocks(p, 1)) == 4 and p.ctrl[0].cache.dirty_lines == 4
    p.resume_flushes()
    p.deliver()
    assert mirror_blocks(p, 1) == {} and p.ctrl[0].cache.dirty_lines == 0
    # The round's four writes share one flush: it waits until none of the LUN's is in flight.
    assert p.ctrl[0].stats["disk_flushes"] == 1


def test_a_failed_flush_keeps_the_lines_dirty_and_destages_them_again():
    p = MemPair(idle_flush_ms=50)
    p.connect()
    p.write(0, "w", 0, 0, b"x" * BS)
    p.deliver()
    p.stall_flushes()
    p.tick(100)
    p.resume_flushes(error=5)
    p.deliver()
    assert len(mirror_blocks(p, 1)) == 1 and p.ctrl[0].cache.dirty_lines == 1
    assert p.ctrl[0].stats["flush_errors"] == 1
    p.tick(1000)                                    # retried after the error pause: flushed now
    p.deliver()
    assert mirror_blocks(p, 1) == {} and p.ctrl[0].cache.dirty_lines == 0


def test_rewrite_goes_to_a_new_block_and_frees_the_old_one_only_after_the_mirror_ack():
    p = idle_pair()
    p.write(0, "v1", 0, 0, b"1" * BS)
    p.deliver()
    old_block = p.ctrl[0].cache.lines[0].block
    p.write(0, "v2", 0, 0, b"2" * BS)
    assert old_block not in p.ctrl[0].cache.free    # still the only safe copy at the partner
    p.deliver()
    assert old_block in p.ctrl[0].cache.free
    p.read(1, "r", 0, 0, BS)
    p.deliver()
    assert p.replies["r"] == (0, b"2" * BS)


def test_degraded_writes_then_resync_make_the_mirror_whole_again():
    p = idle_pair()
    p.write(0, "a", 0, 0, b"a" * BS)
    p.deliver()
    p.disconnect()
    p.write(0, "b", 0, BS, b"b" * BS)               # acked from a's NVRAM alone
    assert p.replies["b"] == (0, None)
    p.write(1, "fwd", 0, 2 * BS, b"c" * BS)         # b cannot reach lun0's owner: EIO
    assert p.replies["fwd"] == (5, None)
    p.connect()
    assert p.ctrl[0].mirroring
    assert mirror_blocks(p, 1) == primary_lines(p, 0)


def test_cache_full_writes_wait_for_destage_and_none_is_lost():
    p = MemPair(nvram_size=1 << 20, lun_size=2 << 20, high_watermark=0.5, low_watermark=0.25)
    p.connect()
    capacity = p.ctrl[0].cache.capacity
    assert capacity * 3 * BS < 2 << 20
    for i in range(capacity * 3):
        p.write(0, ("w", i), 0, i * BS, bytes([i % 251]) * BS)
        p.deliver()
    assert all(p.replies[("w", i)] == (0, None) for i in range(capacity * 3))
    for i in range(0, capacity * 3, 7):
        p.read(0, ("r", i), 0, i * BS, BS)
        assert p.replies[("r", i)] == (0, bytes([i % 251]) * BS)


def test_forwarded_io_reaches_the_owner_and_comes_back():
    p = idle_pair()
    p.write(1, "w", 0, 0, b"f" * 2 * BS)            # b is not lun0's owner
    p.deliver()
    assert p.replies["w"] == (0, None) and p.ctrl[1].stats["forwarded"] == 1
    assert len(primary_lines(p, 0)) == 2 and primary_lines(p, 1) == {}
    p.read(1, "r", 0, BS, BS)
    p.deliver()
    assert p.replies["r"] == (0, b"f" * BS)


@pytest.mark.parametrize("garbage", [b"", b"\x00" * 10, bytes(range(256)) * 3])
def test_malformed_frames_reset_the_link_and_the_controller_keeps_serving(garbage):
    from firmware.formats import frame as F
    p = idle_pair()
    sender = p.ctrl[0].link.auth                    # sealed as a would: the parser is what refuses it
    bad = b"".join(F.encode_frame(M.MsgType.FLUSH_DONE, 0, 1, 2, p.ctrl[1].link.rx_expected, 0, 0, garbage,
                                  auth=(sender.tx, sender.tx_seq)))
    p.run(1, p.ctrl[1].link_frame(bad, 0))
    assert [n for n in p.notes[1] if n[0] == "link_down"]
    p.write(1, "w", 1, 0, b"k" * BS)                # b still serves its own LUN
    assert p.replies["w"] == (0, None)


def test_resync_after_the_link_returns_reports_lines_transferred_and_remaining():
    """Failback progress: the resync's probes (PING to the MIRROR mailbox, in order with the lines)
    come back as resync_progress events and in status(), counting up to every line, then mirrored."""
    p = idle_pair()
    p.disconnect()
    p.stall_disks()                                  # the degraded owner's eager destage cannot finish
    lines = 100
    for n in range(lines):
        p.write(0, ("w", n), 0, n * BS, bytes([n]) * BS)
    assert p.ctrl[0].status()["resync"] is None
    for i in range(2):
        p.run(i, p.ctrl[i].link_connected(bytes([i + 1]) * 32, p.now_ms))
    seen = []
    while p.wire[0] or p.wire[1]:
        p.deliver(limit=8)
        sync = p.ctrl[0].status()["resync"]
        if sync is not None:
            assert sync["lines_total"] == lines
            assert sync["lines_transferred"] + sync["lines_remaining"] == lines
            seen.append(sync["lines_transferred"])
    assert seen and seen[0] < lines and seen == sorted(seen)
    progress = [f for kind, f in p.notes[0] if kind == "resync_progress"]
    assert [f["lines_transferred"] for f in progress] == [32, 64, 96, 100]
    assert progress[-1]["lines_remaining"] == 0
    assert p.ctrl[0].mirroring and p.ctrl[0].status()["resync"] is None
    assert mirror_blocks(p, 1) == primary_lines(p, 0)
    p.resume_disks()


def test_destage_writes_adjacent_whole_lines_as_one_extent_and_partial_lines_alone():
    p = MemPair(idle_flush_ms=50, destage_extent_bytes_max=3 * BS)
    p.connect()
    p.write(0, "seq", 0, 8 * BS, b"s" * 4 * BS)           # lines 8..11, whole
    p.write(0, "part", 0, 20 * BS + 512, b"p" * 1024)     # line 20, sectors 1-2 only
    p.deliver()
    p.tick(100)                                            # idle: destage everything
    assert p.disks[0][8 * BS:12 * BS] == b"s" * 4 * BS
    assert p.disks[0][20 * BS:21 * BS] == bytes(512) + b"p" * 1024 + bytes(BS - 1536)
    assert p.disk_writes == 3                              # lines 8-10, line 11, line 20's run
    assert p.ctrl[0].stats["destage_writes"] == 3 and p.ctrl[0].stats["destaged"] == 5
    assert mirror_blocks(p, 1) == {} and p.ctrl[0].cache.dirty_lines == 0


def test_destage_extent_never_takes_a_line_another_extent_holds():
    """Line 5 is older than line 4: 5 starts an extent, then 4's extent must stop before 5."""
    p = MemPair(idle_flush_ms=50)
    p.connect()
    p.write(0, "five", 0, 5 * BS, b"5" * BS)
    p.write(0, "four", 0, 4 * BS, b"4" * BS)
    p.deliver()
    p.tick(100)
    assert p.disks[0][4 * BS:6 * BS] == b"4" * BS + b"5" * BS
    assert p.ctrl[0].stats["destaged"] == 2 and p.ctrl[0].cache.dirty_lines == 0


def test_mirror_writes_of_one_link_read_get_one_cumulative_ack():
    p = idle_pair()
    for k in range(5):
        p.write(0, f"w{k}", 0, k * 3 * BS, bytes([k]) * 2 * BS)
    frames = list(p.wire[1])
    p.wire[1].clear()
    p.run(1, p.ctrl[1].link_frames(frames, 0))     # one read of the link brought all five
    acks = [f for f in p.wire[0] if f[3] == M.MsgType.MIRROR_ACK]
    assert len(acks) == 1
    seq, status, count, _ = M.MIRROR_ACK.unpack_from(acks[0], 28)
    assert (status, count) == (0, 5) and seq == max(p.ctrl[0].pending)
    p.deliver()
    assert all(p.replies[f"w{k}"] == (0, None) for k in range(5)) and not p.ctrl[0].pending


def test_batched_link_output_waits_for_flush_link_and_refs_ride_along():
    p = MemPair(idle_flush_ms=10**9, high_watermark=0.9, low_watermark=0.8, batch_link_output=True)
    p.connect()
    for _ in range(6):                                 # hello, auth, resync: a few round trips
        for i in range(2):
            p.run(i, p.ctrl[i].flush_link())
        p.deliver()
    assert p.ctrl[0].mirroring and p.ctrl[1].mirroring
    acts = p.ctrl[0].host_write("w", 0, 0, b"x" * BS)
    assert not [a for a in acts if type(a).__name__ == "Transmit"]
    p.run(0, p.ctrl[0].flush_link())
    assert [f[3] for f in p.wire[1]] == [M.MsgType.MIRROR_WRITE]
    p.run(1, p.ctrl[1].link_frames(list(p.wire[1]), 0))
    p.wire[1].clear()
    p.run(1, p.ctrl[1].flush_link())
    p.run(0, p.ctrl[0].link_frames(list(p.wire[0]), 0))
    p.wire[0].clear()
    assert p.replies["w"] == (0, None)
    p.ctrl[0].flush_done_refs.append((7, 1))          # alone, a ref does not wake the partner
    p.run(0, p.ctrl[0].flush_link())
    assert not p.wire[1]
    p.run(0, p.ctrl[0].tick(0))                        # at the tick it goes
    p.run(0, p.ctrl[0].flush_link())
    assert [f[3] for f in p.wire[1]] == [M.MsgType.FLUSH_DONE]


def test_write_zeroes_through_the_partner_travels_as_one_range():
    """Issue 15: zeroes for the partner's LUN go over the link as offset and length, not data."""
    p = idle_pair(lun_size=4 << 20)
    p.write(0, "ones", 0, 0, b"\x01" * 2 * BS)
    p.deliver()
    p.run(1, p.ctrl[1].host_write_zeroes("z", 0, 0, 4 << 20))
    sent = sum(len(f) for f in p.wire[0])
    assert sent < 256 and p.ctrl[1].stats["forwarded"] == 1
    p.deliver()
    for _ in range(100):
        if "z" in p.replies:
            break
        p.tick(10)
    assert p.replies["z"] == (0, None)
    p.read(1, "r", 0, 0, 2 * BS)
    p.deliver()
    assert p.replies["r"] == (0, bytes(2 * BS))


def test_write_zeroes_goes_into_the_cache_a_few_pieces_at_a_time():
    p = idle_pair(lun_size=4 << 20, zero_pieces_inflight_max=2)
    p.run(0, p.ctrl[0].host_write_zeroes("z", 0, 0, 4 << 20))
    assert len(p.ctrl[0].pending) <= 2              # 1 MiB pieces waiting for their mirror ack
    assert sum(len(f) for f in p.wire[1]) < 2 * (1 << 20) + 4096
    for _ in range(100):
        if "z" in p.replies:
            break
        p.deliver()
        p.tick(10)
    assert p.replies["z"] == (0, None)


def test_forwarded_requests_beyond_the_window_wait_and_go_in_order():
    p = idle_pair(forward_inflight_max=2)
    for i in range(5):
        p.write(1, ("w", i), 0, i * BS, bytes([i + 1]) * BS)
    st = p.ctrl[1].status()
    assert (st["forwarded_inflight"], st["forwarded_waiting"]) == (2, 3)
    p.deliver()
    assert all(p.replies[("w", i)] == (0, None) for i in range(5))
    assert p.ctrl[1].status()["forwarded_waiting"] == 0
    p.read(1, "r", 0, 0, 5 * BS)
    p.deliver()
    assert p.replies["r"] == (0, b"".join(bytes([i + 1]) * BS for i in range(5)))


def test_forwarded_requests_waiting_fail_with_the_link():
    p = idle_pair(forward_inflight_max=1)
    for i in range(3):
        p.write(1, ("w", i), 0, i * BS, b"w" * BS)
    p.disconnect()
    assert all(p.replies[("w", i)] == (5, None) for i in range(3))
    assert p.ctrl[1].status()["forwarded_waiting"] == 0


def test_write_zeroes_pieces_are_bounded_across_requests():
    p = idle_pair(lun_size=4 << 20, zero_pieces_inflight_max=2)
    for i in range(4):
        p.run(0, p.ctrl[0].host_write_zeroes(("z", i), 0, i << 20, 1 << 20))
    assert len(p.ctrl[0].pending) <= 2 and p.ctrl[0].write_path.zeroes.inflight == 2
    for _ in range(100):
        if all(("z", i) in p.replies for i in range(4)):
            break
        p.deliver()
        p.tick(10)
    assert all(p.replies[("z", i)] == (0, None) for i in range(4))
    assert p.ctrl[0].write_path.zeroes.inflight == 0 and not p.ctrl[0].write_path.zeroes.jobs


def test_a_forwarded_request_is_answered_only_in_the_link_session_it_came_in():
    # b held a read a forwarded while lun settled; a crashed, its next session reused the tag, and
    # b's answer to the old request (another read's 48 KiB) answered a's new 256 KiB read (seed
    # 831457 at 300 steps). An answer from an ended session is dropped: the forwarder failed it.
    from firmware.requests import Forwarded
    from firmware.formats import frame as F
    from fixtures.mempair import split_frames
    p = idle_pair()
    a = p.ctrl[0]
    old = Forwarded(7, M.IoOp.READ, a.link_session)
    p.disconnect()
    p.connect()
    assert a.link_session == old.session + 1
    a._reply(old, 0, bytearray(BS))
    a._reply(Forwarded(8, M.IoOp.READ, a.link_session), 0, bytearray(BS))
    sent = [F.parse_header_untrusted(f) for f in split_frames(a.link.take_output())]
    replies = [h.tag for h in sent if h.type == M.MsgType.IO_REPLY]
    assert replies == [8]


def test_a_mirror_write_altered_on_the_wire_never_reaches_the_partners_nvram():
    """Someone on the cable flips a data byte of a MIRROR_WRITE and fixes the CRC: the partner
    refuses the frame by its MAC, before the mirror is touched, and counts it; the session
    starts over (a socket has no retransmission) and the resync sends the true data."""
    from firmware.formats import frame as F
    p = idle_pair()
    p.write(0, "w", 0, 0, b"x" * BS)
    frames = list(p.wire[1])
    (k,) = [n for n, f in enumerate(frames) if F.parse_header_untrusted(f).type == M.MsgType.MIRROR_WRITE]
    body = bytearray(frames[k][:-4])
    at = body.find(b"x" * BS)
    body[at] = ord("X")
    p.wire[1][k] = bytes(body) + F.TRAILER_STRUCT.pack(F.crc32c(bytes(body)))
    p.deliver()
    assert p.ctrl[1].link.stats["auth_failures"] == 1
    assert bytes(p.nv[1]).find(b"X" + b"x" * (BS - 1)) < 0       # nowhere in b's NVRAM
    for _ in range(40):                                          # a gives up on the unacknowledged frame
        p.tick(100)
        if "w" in p.replies:
            break
    assert p.replies["w"] == (0, None)
    p.connect()
    for _ in range(20):
        p.tick(100)
    assert mirror_blocks(p, 1) == primary_lines(p, 0)
    assert bytes(p.nv[1]).find(b"X" + b"x" * (BS - 1)) < 0
    p.read(1, "r", 0, 0, BS)
    p.deliver()
    assert p.replies["r"] == (0, b"x" * BS)
