"""Replica mode, NVRAM-log variant (claims 4), driven exactly with the in-memory rig.

Each test names the topology and the fault: acknowledgement only once the
destination stored the request, consistency points on a full partition and
on the timer, reads of logged data, link cuts, crashes of either end, torn
entries, frames that arrive early, the file's ring wrapping, fan-in, and
recovery of the image after a disaster at the source.
"""
import hashlib

import pytest

from firmware.formats import logfile as LF
from firmware.formats import messages as M
from firmware.link import Delivered
from fixtures.memlog import MemLog

KiB = 1024


def block(tag, n=4 * KiB):
    return bytes([tag & 0xFF]) * n


def small(**kw):
    """Log partitions of 64 KiB: a consistency point every ~15 writes of 4 KiB."""
    kw.setdefault("log_partition_bytes", 64 * KiB)
    return MemLog(**kw)


def test_write_is_acknowledged_only_once_the_destination_stored_it():
    r = small()
    r.connect()
    r.run(("src", 0), r.src[0].host_write("w", 0, 0, block(1)))
    assert "w" not in r.replies                          # in the source's NVRAM, not yet shipped
    r.deliver()
    assert r.replies["w"] == (0, None)
    assert r.dst.feeds[0].expected == 2                  # the destination holds seq 1


def test_full_partition_is_a_consistency_point_on_both_sides():
    r = small()
    r.connect()
    for n in range(40):
        r.write(0, ("w", n), n % 2, n * 4 * KiB, block(n))
    assert all(r.replies[("w", n)] == (0, None) for n in range(40))
    kinds = r.kinds(("src", 0))
    assert kinds.count("consistency_point") >= 2
    src_cp = max(f["last_seq"] for k, f in r.notes[("src", 0)] if k == "consistency_point")
    dst = r.dst.feeds[0]
    assert dst.applied_seq == src_cp
    # the image holds exactly what the source's volume holds up to the consistency point
    for n in range(40):
        lun, off = n % 2, n * 4 * KiB
        if n + 1 <= src_cp:
            assert r.image(0, lun)[off:off + 4 * KiB] == block(n)
            assert r.volume(0, lun)[off:off + 4 * KiB] == block(n)
    # filed requests left the destination's NVRAM
    assert dst.filed_seq == 40 and not dst.staged


def test_reads_at_the_source_see_logged_requests_not_yet_applied():
    r = small()
    r.connect()
    r.write(0, "a", 0, 8 * KiB, block(7, 8 * KiB))
    r.write(0, "b", 0, 12 * KiB, block(9))              # overlaps the first: the newer wins
    assert r.volume(0, 0)[8 * KiB:16 * KiB] == bytes(8 * KiB)   # nothing applied yet
    err, data = r.read(0, "r", 0, 4 * KiB, 16 * KiB)
    assert err == 0 and data == bytes(4 * KiB) + block(7) + block(9) + bytes(4 * KiB)


def test_timer_consistency_point_applies_a_partly_filled_partition():
    r = small(cp_interval_ms=100)
    r.connect()
    r.write(0, "a", 1, 0, block(3))
    assert r.image(0, 1)[:4 * KiB] == bytes(4 * KiB)
    for _ in range(12):
        r.tick(10)
    assert r.volume(0, 1)[:4 * KiB] == block(3)
    assert r.image(0, 1)[:4 * KiB] == block(3)


def test_link_cut_source_serves_alone_then_resends_in_order():
    r = small()
    r.connect()
    r.write(0, "a", 0, 0, block(1))
    r.cut()
    for n in range(5):
        r.write(0, ("d", n), 0, (n + 1) * 4 * KiB, block(10 + n))
        assert r.replies[("d", n)] == (0, None)          # degraded: acknowledged from the source's NVRAM
    assert r.src[0].status()["unshipped_entries"] == 5
    r.connect()
    assert r.dst.feeds[0].expected == 7
    assert r.src[0].status()["unshipped_entries"] == 0
    assert ("log_resume", {"after_seq": 1, "entries": 5}) in r.notes[("src", 0)]
    r.recover("s0")
    for n in range(5):
        assert r.image(0, 0)[(n + 1) * 4 * KiB:(n + 2) * 4 * KiB] == block(10 + n)


def test_frames_arriving_early_wait_so_the_file_stays_in_sequence_order():
    r = small()
    r.connect()
    feed = r.dst.feeds[0]

    def ship(seq, tag):
        data = block(tag)
        body = (M.LOG_SHIP_HEAD.pack(0, 0, 1) + M.LOG_ENTRY_HEAD.pack(seq, 0, 0, seq * 8, __import__(
            "crc32c").crc32c(data), len(data)) + data)
        r.run(("dst", None), r.dst._dispatch(0, Delivered(M.MsgType.LOG_SHIP, 0, M.Resource.REPLICATION, 0,
                                                          memoryview(body))) or r.dst._take())

    ship(3, 0x33)
    ship(2, 0x22)
    assert feed.expected == 1 and len(feed.early) == 2 and feed.filed_seq == 0   # nothing stored or acked
    ship(1, 0x11)
    assert feed.expected == 4 and feed.filed_seq == 3
    assert [rec.seq for rec in feed.records] == [1, 2, 3]
    offsets = [rec.data_off for rec in feed.records]
    assert offsets == sorted(offsets)
    ship(2, 0x99)                                        # a duplicate is dropped
    assert r.dst.stats["duplicates"] == 1 and len(feed.records) == 3


def test_destination_crash_refiles_from_nvram_and_finds_its_file_again():
    r = small()
    r.connect()
    for n in range(20):
        r.write(0, ("w", n), 0, n * 4 * KiB, block(n))
    r.stall()                                            # the next entries reach its NVRAM, not the file
    for n in range(20, 24):
        r.write(0, ("w", n), 0, n * 4 * KiB, block(n))
    assert all(r.replies[("w", n)] == (0, None) for n in range(24))
    r.stalled = None                                     # the destination dies with its disks hung
    r.crash_destination()
    r.boot_destination()
    feed = r.dst.feeds[0]
    assert feed.ready and feed.filed_seq == 24 and feed.expected == 25
    r.connect()
    r.write(0, "after", 1, 0, block(0xAA))
    assert r.replies["after"] == (0, None)
    r.recover("s0")
    for n in range(24):
        assert r.image(0, 0)[n * 4 * KiB:(n + 1) * 4 * KiB] == block(n)
    assert r.image(0, 1)[:4 * KiB] == block(0xAA)


def test_source_crash_reapplies_its_log_and_resumes_where_the_destination_stands():
    r = small()
    r.connect()
    for n in range(30):
        r.write(0, ("w", n), 1, n * 4 * KiB, block(n))
    r.crash_source(0)
    r.boot_source(0)
    src = r.src[0]
    assert src.next_seq == 31
    err, data = r.read(0, "r", 1, 0, 30 * 4 * KiB)
    assert err == 0 and data == b"".join(block(n) for n in range(30))
    r.connect()
    r.write(0, "x", 1, 0, block(0x77))
    assert r.replies["x"] == (0, None) and r.dst.feeds[0].expected == 32


def test_torn_entry_at_the_source_is_dropped_on_restart_and_never_shipped():
    r = small()
    r.connect()
    r.write(0, "a", 0, 0, block(1))
    src = r.src[0]
    part = src.active
    r.cut()
    r.write(0, "b", 0, 4 * KiB, block(2))
    entry = part.entries[-1]
    r.crash_source(0)
    r.src_nv[0][entry.data_off + 100] ^= 0xFF            # the power cut tore the last entry's data
    r.boot_source(0)
    assert r.src[0].next_seq == 2
    assert ("recovered", {"role": "source", "next_seq": 2, "torn_entries": 1, "logged_entries": 1}) in \
        r.notes[("src", 0)]
    r.connect()
    assert r.dst.feeds[0].expected == 2


def test_disaster_at_the_source_the_destination_recovers_every_acknowledged_write():
    r = small()
    r.connect()
    acked = {}
    for n in range(50):
        off = (n * 7 % 64) * 4 * KiB
        r.write(0, ("w", n), 0, off, block(n))
        if r.replies.get(("w", n)) == (0, None):
            acked[off] = block(n)
    r.crash_source(0)                                    # the source site is gone
    assert r.dst.feeds[0].applied_seq < 50               # the image stands at the last consistency point
    r.recover("s0")
    image = r.image(0, 0)
    for off, data in acked.items():
        assert image[off:off + 4 * KiB] == data
    assert r.dst.feeds[0].applied_seq == 50


def test_fan_in_two_sources_keep_their_own_file_and_image():
    r = small(sources=2)
    r.connect(0)
    r.connect(1)
    for n in range(20):
        r.write(0, ("a", n), 0, n * 4 * KiB, block(0x10))
        r.write(1, ("b", n), 0, n * 4 * KiB, block(0x20))
    r.recover()
    assert r.image(0, 0)[:80 * KiB] == block(0x10, 80 * KiB)
    assert r.image(1, 0)[:80 * KiB] == block(0x20, 80 * KiB)
    st = r.dst.status()["sources"]
    assert st["s0"]["filed_seq"] == st["s1"]["filed_seq"] == 20


def test_the_file_ring_wraps_and_a_restarted_destination_follows_the_wrap():
    r = small(journal_bytes=160 * KiB)
    r.connect()
    expect = bytearray(1 << 20)
    for n in range(120):
        off = (n % 100) * 4 * KiB
        r.write(0, ("w", n), 0, off, block(n))
        assert r.replies[("w", n)] == (0, None)
        expect[off:off + 4 * KiB] = block(n)
    feed = r.dst.feeds[0]
    assert feed.cp_count > 3 and r.dst.stats["journal_wraps"] >= 2
    r.crash_destination()
    r.boot_destination()
    r.connect()
    r.recover("s0")
    assert hashlib.sha256(r.image(0, 0)).digest() == hashlib.sha256(expect).digest()


def test_big_write_is_split_into_entries_and_acknowledged_once():
    r = small()
    r.connect()
    data = bytes(range(256)) * 1024                      # 256 KiB: several partitions' worth
    r.write(0, "big", 0, 0, data)
    assert r.replies["big"] == (0, None)
    r.recover("s0")
    assert r.image(0, 0)[:len(data)] == data
    err, back = r.read(0, "r", 0, 0, len(data))
    assert err == 0 and back == data


def test_destination_exports_are_read_only():
    r = small()
    r.run(("dst", None), r.dst.host_write("w", 0, 0, block(1)))
    assert r.replies["w"][0] == 1                        # EPERM
    r.run(("dst", None), r.dst.host_read("r", 0, 0, 4 * KiB))
    assert r.replies["r"] == (0, bytes(4 * KiB))


def test_bad_host_requests_get_einval_and_nothing_is_logged():
    r = small()
    r.connect()
    r.write(0, "oob", 0, (1 << 20) - 512, block(1))
    r.write(0, "odd", 0, 100, block(1, 512))
    assert r.replies["oob"][0] == 22 and r.replies["odd"][0] == 22
    assert r.src[0].next_seq == 1


def test_malformed_log_frames_reset_the_link_and_nothing_is_stored_or_lost():
    r = small()
    r.connect()
    r.write(0, "a", 0, 0, block(1))
    good = M.LOG_SHIP_HEAD.pack(0, 0, 1) + M.LOG_ENTRY_HEAD.pack(2, 0, 0, 8, 0xDEADBEEF, 4096) + block(2)
    bad_bodies = [good,                                   # data failing its CRC
                  good[:40],                              # cut short
                  M.LOG_SHIP_HEAD.pack(7, 0, 0),          # another source's entries on this link
                  M.LOG_SHIP_HEAD.pack(0, 0, 1) + M.LOG_ENTRY_HEAD.pack(2, 9, 0, 0, 0, 0)]   # no lun9
    for body in bad_bodies:
        src = r.src[0]
        src.link.send(M.MsgType.LOG_SHIP, M.Resource.REPLICATION, body)
        r.run(("src", 0), src._take())
        r.deliver()
        assert r.dst.feeds[0].link.state == "down" and r.dst.stats["link_errors"] >= 1
        assert r.dst.feeds[0].expected == 2               # nothing of it stored
        r.connect()
        assert r.src[0].status()["link"] == "shipping"
    r.write(0, "b", 0, 4 * KiB, block(3))
    assert r.replies["b"] == (0, None)
    r.recover("s0")
    assert r.image(0, 0)[:8 * KiB] == block(1) + block(3)


def test_record_torn_in_the_file_is_refiled_from_the_destination_nvram():
    """The destination dies while filing: half a record reached the journal disk, no flush came.
    The entries are still in its NVRAM (they leave it only once filed and flushed); on restart the
    file scan stops at the torn record and the entries are filed again at the same place."""
    r = small()
    r.connect()
    for n in range(3):
        r.write(0, ("w", n), 0, n * 4 * KiB, block(n))
    r.stall()
    r.write(0, "x", 0, 3 * 4 * KiB, block(0x5A))
    assert r.replies["x"] == (0, None)                   # stored in the destination's NVRAM
    (who, _ctrl, act), = [(w, c, a) for w, c, a, _m in r.stalled
                          if a.__class__.__name__ == "DiskWrite" and w[0] == "dst"]
    journal = r.dst_disks[r.feeds[0].journal_disk]
    half = bytes(act.data)[:len(act.data) // 2]
    journal.land(act.offset, half)                       # the first half lands, then the power goes
    r.stalled = None
    r.crash_destination()
    r.boot_destination()
    feed = r.dst.feeds[0]
    assert feed.filed_seq == 4 and [rec.seq for rec in feed.records] == [1, 2, 3, 4]
    assert feed.records[-1].data_off == act.offset + LF.RECORD_ALIGN   # refiled where it tore
    r.recover("s0")
    assert r.image(0, 0)[:16 * KiB] == block(0) + block(1) + block(2) + block(0x5A)


def test_torn_entry_in_the_destination_nvram_was_never_acknowledged_and_is_resent():
    r = small()
    r.connect()
    r.write(0, "a", 0, 0, block(1))
    r.stall()
    src = r.src[0]
    r.run(("src", 0), src.host_write("b", 0, 4 * KiB, block(2)))
    # the destination takes the frame and dies before its persist completed (the bytes tear) and
    # before its ack left
    while r.wire_to_dst[0]:
        r.run(("dst", None), r.dst.link_frame(r.wire_to_dst[0].popleft(), r.now_ms, link=0))
    assert "b" not in r.replies
    feed = r.dst.feeds[0]
    entry = feed.part.entries[-1]
    r.stalled = None
    r.wire_to_src[0].clear()
    r.crash_destination()
    r.dst_nv[entry.data_off + 7] ^= 0xFF                 # the power cut tore the entry
    r.boot_destination()
    assert r.dst.feeds[0].expected == 2                  # seq 2 is gone from its NVRAM
    r.connect()                                          # the source resends it
    assert r.dst.feeds[0].expected == 3
    r.recover("s0")
    assert r.image(0, 0)[:8 * KiB] == block(1) + block(2)


def test_a_full_file_ring_holds_back_filing_until_a_consistency_point_frees_it():
    """The ring wraps until its tail meets its head: that is full, not empty; filing waits for
    the next consistency point and nothing unapplied is overwritten (the simulator found this)."""
    r = small(journal_bytes=4 * KiB + 4 * 4608)           # room for four 4 KiB records
    r.connect()
    for n in range(4):
        r.write(0, ("w", n), 0, n * 4 * KiB, block(n))
    feed = r.dst.feeds[0]
    assert feed.filed_seq == 4
    src = r.src[0]                                        # a consistency point through seq 2
    src.link.send(M.MsgType.CONSISTENCY_POINT, M.Resource.REPLICATION, M.CONSISTENCY_POINT.pack(0, 0, 0, 2))
    r.run(("src", 0), src._take())
    r.deliver()
    assert feed.applied_seq == 2
    for n in range(4, 7):                                 # 5 and 6 wrap into the freed space, 7 waits
        r.write(0, ("w", n), 0, n * 4 * KiB, block(n))
    assert feed.filed_seq == 6 and len(feed.staged) == 1 and r.dst.stats["journal_full"] >= 1
    positions = [rec.data_off for rec in feed.records]
    assert len(set(positions)) == len(positions) == 4
    r.recover("s0")                                       # applies 3..6, frees the ring, files 7
    r.recover("s0")
    assert feed.filed_seq == 7 and feed.applied_seq == 7
    assert r.image(0, 0)[:28 * KiB] == b"".join(block(n) for n in range(7))


def test_recover_applies_entries_waiting_in_nvram_for_a_full_file_ring():
    """Found by the simulator (seed 310084 at 1000 steps): recover() applied what was filed when
    it was called; an acknowledged entry waiting in NVRAM for room in the full ring was filed once
    that consistency point freed the room, but never applied, and the image lacked it."""
    r = small(journal_bytes=4 * KiB + 4 * 4608)           # room for four 4 KiB records
    r.connect()
    for n in range(5):                                    # the fifth waits in NVRAM: the ring is full
        r.write(0, ("w", n), 0, n * 4 * KiB, block(n))
    feed = r.dst.feeds[0]
    assert feed.filed_seq == 4 and [e.seq for e in feed.staged] == [5]
    assert r.replies[("w", 4)] == (0, None)
    r.recover("s0")
    assert feed.filed_seq == 5 and feed.applied_seq == 5
    assert r.image(0, 0)[:20 * KiB] == b"".join(block(n) for n in range(5))


def test_a_write_that_waits_for_a_partition_keeps_its_own_copy_of_the_data():
    """Found on real processes (the destination killed under load): a write that waited for a free
    partition kept a view of the host's buffer, which the NBD connection reuses for the next
    request; when it was logged later it carried another request's data."""
    r = small()
    r.cut()                                              # nothing is acknowledged: partitions fill
    buf = bytearray(block(0x11))
    for n in range(200):
        r.run(("src", 0), r.src[0].host_write(("w", n), 0, n * 4 * KiB, block(n)))
        if r.src[0].waiting:
            break
    waiting_at = n + 1
    r.run(("src", 0), r.src[0].host_write("late", 0, 255 * 4 * KiB, buf))
    assert r.src[0].waiting
    buf[:] = block(0x99)                                 # the connection reuses its buffer
    r.connect()                                          # acks free partitions; waiting writes go in
    assert r.replies["late"] == (0, None)
    r.recover("s0")
    assert r.image(0, 0)[255 * 4 * KiB:256 * 4 * KiB] == block(0x11)
    assert waiting_at < 200


# -- durability: nothing leaves NVRAM before a disk flush says the disk has it ---------------

def test_destination_drops_filed_entries_from_nvram_only_after_the_file_flush():
    """The file's records are written, their flush is held: the entries stay in the destination's
    NVRAM. A power cut drops every unflushed record; the restart files them again from NVRAM."""
    r = small()
    r.connect()
    r.hold_flushes()
    for n in range(3):
        r.write(0, ("w", n), 0, n * 4 * KiB, block(n))
    feed = r.dst.feeds[0]
    assert [e.seq for e in feed.staged] == [1, 2, 3] and feed.filed_seq == 0
    r.crash_destination(worst=True)
    r.held_flushes = None
    r.boot_destination()
    assert r.dst.feeds[0].filed_seq == 3
    r.recover("s0")
    assert r.image(0, 0)[:12 * KiB] == block(0) + block(1) + block(2)


def test_source_marks_a_partition_applied_only_after_the_volume_flush():
    """A consistency point's volume writes are done, their flush is held: the partition is not
    APPLIED and nothing tells the destination. A power cut drops the writes; the restart applies
    the partition again from NVRAM."""
    r = small(cp_interval_ms=100)
    r.connect()
    r.write(0, "a", 1, 0, block(3))
    r.hold_flushes()
    for _ in range(12):
        r.tick(10)
    src = r.src[0]
    assert r.volume(0, 1)[:4 * KiB] == block(3) and src.cp_through == 0 and src.applying is not None
    assert r.dst.feeds[0].applied_seq == 0
    r.crash_source(0, worst=True)
    r.held_flushes = None
    assert r.volume(0, 1)[:4 * KiB] == bytes(4 * KiB)
    r.boot_source(0)
    assert r.src[0].cp_through == 1 and r.volume(0, 1)[:4 * KiB] == block(3)


def test_consistency_point_records_its_header_only_after_the_image_flush():
    """The image writes of a consistency point are done, their flush held: the file header still
    says nothing is applied, and the records stay. After a power cut that drops the image writes,
    recovery applies them again."""
    r = small()
    r.connect()
    r.write(0, "a", 1, 0, block(5))
    r.hold_flushes()
    r.recover("s0")                                      # a consistency point through seq 1
    feed = r.dst.feeds[0]
    assert r.image(0, 1)[:4 * KiB] == block(5)
    assert feed.cp is not None and feed.applied_seq == 0 and len(feed.records) == 1
    r.crash_destination(worst=True)
    r.held_flushes = None
    r.boot_destination()
    assert r.dst.feeds[0].applied_seq == 0
    r.recover("s0")
    assert r.image(0, 1)[:4 * KiB] == block(5)


def test_destination_restarted_after_a_kill_flushes_before_it_trusts_its_file():
    """The destination's process dies with a file record written but not flushed: it is in the
    disk's cache, visible. The restart must not drop the entry from NVRAM on the strength of a
    record a later power cut can still take: it flushes its disks before it reads them."""
    r = small()
    r.connect()
    r.hold_flushes()
    r.write(0, "w", 0, 0, block(1))
    assert r.replies["w"] == (0, None) and r.dst.feeds[0].filed_seq == 0
    r.crash_destination(power=False)
    r.held_flushes = None                                # the dead process's flush never completes
    r.boot_destination()
    assert r.dst.feeds[0].filed_seq == 1 and not r.dst.feeds[0].staged
    r.crash_destination(worst=True)                      # now the power goes
    r.boot_destination()
    assert r.dst.feeds[0].filed_seq == 1
    r.recover("s0")
    assert r.image(0, 0)[:4 * KiB] == block(1)


# -- the file header: what a consistency point writes is what a restart reads ----------------

def _ring_emptied_at_its_very_end():
    """Four 4 KiB records fill the file ring to its last byte; a consistency point applies them
    all, so the head it records is where the next record goes: the ring's start, not its end."""
    r = small(journal_bytes=4 * KiB + 4 * 4608, cp_interval_ms=30)
    r.connect()
    for n in range(4):
        r.write(0, ("w", n), 0, n * 4 * KiB, block(n))
    feed = r.dst.feeds[0]
    assert feed.filed_seq == 4 and feed.tail == feed.p.journal_bytes     # the last record ends the ring
    r.tick(50)                                            # the timer: a consistency point through 4
    assert feed.applied_seq == 4 and not feed.records
    return r


def test_a_consistency_point_that_empties_the_ring_at_its_end_records_a_head_a_restart_accepts():
    """Found by the simulator (seed 412026): a consistency point applied every record of a file
    whose tail sat exactly at the ring's end and recorded head_offset == the file's size, a header
    its own recovery rejects ("head outside the file"). The next write was filed at the ring's
    start, flushed, acknowledged and dropped from NVRAM; the restarted destination fell back to
    the older header slot, whose head pointed at records of the previous lap, and lost it."""
    r = _ring_emptied_at_its_very_end()
    feed = r.dst.feeds[0]
    journal = r.dst_disks[feed.p.journal_disk]
    at = LF.header_slot_offset(feed.cp_count)
    written = LF.FileHeader.parse(bytes(journal[at:at + LF.HEADER_BYTES]))
    assert (written.applied_seq, written.head_offset, written.head_seq) == (4, LF.DATA_START, 5)
    hdr = LF.newest_header_untrusted(bytes(journal[:LF.HEADER_BYTES * LF.HEADER_SLOTS]))
    assert (hdr.applied_seq, hdr.cp_count) == (4, feed.cp_count)
    r.write(0, ("w", 4), 0, 4 * 4 * KiB, block(4))        # filed at the ring's start
    assert r.replies[("w", 4)] == (0, None)
    assert feed.filed_seq == 5 and not feed.staged        # out of the destination's NVRAM
    r.crash_destination(worst=True)
    r.boot_destination()
    assert r.dst.feeds[0].filed_seq == 5 and r.dst.feeds[0].expected == 6
    r.recover("s0")
    assert r.image(0, 0)[:20 * KiB] == b"".join(block(n) for n in range(5))


def test_a_file_header_with_its_head_at_the_ring_end_is_read_as_the_ring_start():
    """A file written before that fix may hold the header with head_offset == the file's size: a
    restart reads it as the ring's start (where its writer put the next record) and follows the
    records there, instead of falling back to the older slot and losing them."""
    r = _ring_emptied_at_its_very_end()
    feed = r.dst.feeds[0]
    journal = r.dst_disks[feed.p.journal_disk]
    journal.land(LF.header_slot_offset(feed.cp_count), LF.build_header(
        0, feed.p.pair_id, feed.p.journal_bytes, 4, feed.p.journal_bytes, 5, feed.cp_count))
    r.write(0, ("w", 4), 0, 4 * 4 * KiB, block(4))
    assert r.replies[("w", 4)] == (0, None) and feed.filed_seq == 5 and not feed.staged
    r.crash_destination(worst=True)
    r.boot_destination()
    assert r.dst.feeds[0].filed_seq == 5 and r.dst.feeds[0].applied_seq == 4
    r.recover("s0")
    assert r.image(0, 0)[:20 * KiB] == b"".join(block(n) for n in range(5))


def test_the_destination_never_writes_a_file_header_its_recovery_would_not_read_back():
    """The rule behind seed 412026 checked where the header is built: a head outside the records'
    area, or one recovery would read as another place, stops the destination before it is on disk."""
    r = small()
    r.connect()
    dst, feed = r.dst, r.dst.feeds[0]
    for head in (feed.p.journal_bytes, feed.p.journal_bytes + LF.RECORD_ALIGN, LF.HEADER_BYTES):
        with pytest.raises(AssertionError, match="file header recovery would"):
            dst._write_header(feed, ("cp", feed), 0, head, 1, feed.cp_count + 1)


def test_the_consistency_point_steps_form_one_chain_and_each_has_its_step():
    """firmware/logship/feed.py: read, write (per wave), flush, header, header_flush, done."""
    from firmware.logship.destination import LogDestination
    from firmware.logship.feed import CP_ENTER, CP_NEXT
    chain, stage = [], "read"
    while stage != "done":
        chain.append(stage)
        stage = CP_NEXT[stage]
    assert chain == ["read", "write", "flush", "header", "header_flush"]
    assert set(CP_NEXT) == set(chain) and set(CP_ENTER) == set(chain[1:])
    assert all(callable(getattr(LogDestination, name)) for name in CP_ENTER.values())


# -- the partition table: every (state, event) pair ---------------------------------------------

def test_every_partition_state_and_event_pair_moves_as_the_table_says_or_is_refused():
    from firmware.logship.common import (APPLIED, EMPTY, FILLING, FULL, PART_EVENTS, PART_NEXT, PART_STATES,
                                         Partition, PartitionError)
    assert {s for s, _ in PART_NEXT} <= set(PART_STATES) and {e for _, e in PART_NEXT} <= set(PART_EVENTS)
    assert set(PART_NEXT.values()) <= set(PART_STATES)
    allowed = 0
    for state in PART_STATES:
        for event in PART_EVENTS:
            part = Partition(0, 0, 4096)
            part.state = state
            if (state, event) in PART_NEXT:
                part.move(event)
                assert part.state == PART_NEXT[(state, event)]
                allowed += 1
            else:
                with pytest.raises(PartitionError, match=f"{event} cannot happen in state {state}"):
                    part.move(event)
                assert part.state == state
    assert allowed == len(PART_NEXT)
    # the source's cycle: a partition is filled, closed, applied and reused, never skipping a step
    part = Partition(1, 0, 4096)
    for event, state in [("open", FILLING), ("close", FULL), ("applied", APPLIED), ("open", FILLING)]:
        part.move(event)
        assert part.state == state
    with pytest.raises(PartitionError):
        Partition(2, 0, 4096).move("applied")          # an empty partition has nothing to apply
    assert EMPTY == 0


def test_a_source_cycles_its_partitions_through_the_table_and_reuses_applied_ones(monkeypatch):
    """Driven through the real source with 64 KiB partitions: 120 writes fill, close, apply and
    reopen each partition several times (every move goes through the table, which refuses any
    other), and the partitions it reused had been applied."""
    from firmware.logship.common import APPLIED, FILLING, Partition
    r = small()
    r.connect()
    moves = []
    real_move = Partition.move

    def watched(part, event):
        before = part.state
        real_move(part, event)
        moves.append((part.index, before, event, part.state))
    monkeypatch.setattr(Partition, "move", watched)
    for n in range(120):
        r.write(0, ("w", n), n % 2, (n % 64) * 4 * KiB, block(n))
    assert all(r.replies[("w", n)] == (0, None) for n in range(120))
    reopened = [m for m in moves if m[2] == "open" and m[1] == APPLIED]
    assert len(reopened) >= len(r.src[0].log.parts)          # every partition went round at least once
    assert {m[3] for m in moves if m[2] == "open"} == {FILLING}
