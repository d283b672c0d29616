"""The destination of log shipping: files each source's entries, applies them to the image
volumes at consistency points, recovers after a disaster."""
import collections

from .. import actions as A
from ..formats import FormatError
from ..formats import frame as F
from ..formats import logfile as LF
from ..formats import messages as M
from ..formats import nvram as N
from ..link import LinkProtocolError
from ..requests import one_by_one
from .common import (
    DEST_ID, EINVAL, EIO, EMPTY, EPERM, Entry, Log, LogParams, PART_HEAD, SECTOR, T, waves)
from .feed import CP_ENTER, CP_NEXT, ConsistencyPoint, Feed, SCAN_CHUNK_BYTES
from .session import Session


class LogDestination(Session):
    """The destination: stores shipped entries in NVRAM, files them, applies them at consistency points."""

    def __init__(self, params: LogParams, feeds, nv, now_ms=0):
        sb = self._init_common(params, nv, now_ms)
        if sb.controller_id != DEST_ID:
            raise FormatError(f"NVRAM belongs to controller {sb.controller_id}, not a destination")
        if len(feeds) > sb.log_partitions:
            raise FormatError(f"{len(feeds)} sources need {len(feeds)} NVRAM log partitions; "
                              f"this NVRAM has {sb.log_partitions}")
        self.log = Log(nv, sb)
        self.feeds = []
        self.by_disk = {}
        for i, fp in enumerate(feeds):
            link = self._make_link(fp.key, DEST_ID, LogParams(fp.pair_id, fp.lun_sizes, **{
                k: getattr(params, k) for k in ("heartbeat_interval_ms", "heartbeat_timeout_ms",
                                                "reliable_transport", "data_window_bytes")}))
            feed = Feed(fp, self.log.parts[fp.partition], link)
            self.feeds.append(feed)
            for lun, disk in enumerate(fp.image_disks):
                self.by_disk[disk] = (feed, lun)
        self.ops = {}
        self.next_op = 1
        for feed in self.feeds:
            self._recover(feed)

    # -- recovery: NVRAM partition, then the file on disk ---------------------------

    def _recover(self, feed):
        torn = self.log.scan(feed.part)
        if feed.part.state == EMPTY:
            self._reset_partition(feed, 1)
        feed.recovered_nvram = [e for e in feed.part.entries]
        self.out.append(A.Notify("recovering", source=feed.p.name, nvram_entries=len(feed.part.entries),
                                 torn_entries=torn))
        # After a kill of this process (not a power cut) the file may show records and a header
        # still in the disk's volatile cache: flush it before they are trusted to drop entries from
        # NVRAM, or a power cut later takes records whose entries are gone from here.
        self.out.append(A.DiskFlush(self._op(("boot_flush", feed)), feed.p.journal_disk))

    def _boot_flushed(self, feed, error):
        if error:
            self.out.append(A.Notify("journal_error", source=feed.p.name, error=error))
            return
        self.out.append(A.DiskRead(self._op(("header", feed)), feed.p.journal_disk, 0,
                                   LF.HEADER_BYTES * LF.HEADER_SLOTS))

    def _reset_partition(self, feed, first_seq):
        part = feed.part
        part.move("refill")
        part.first_seq, part.entries, part.used = first_seq, [], PART_HEAD
        self._persist(self.log.write_header(part))

    def _header_read(self, feed, error, data):
        if error:
            self.out.append(A.Notify("journal_error", source=feed.p.name, error=error))
            return
        try:
            hdr = LF.newest_header_untrusted(data, f"{feed.p.name} journal")
        except FormatError:
            hdr = None
        if hdr is None and any(data):
            # not blank, not valid: refuse rather than start over on top of records
            self.out.append(A.Notify("journal_header_invalid", source=feed.p.name,
                                     error="the source's file header is damaged; not serving this source"))
            return
        if hdr is None:
            feed.applied_seq, feed.cp_count = 0, 0
            feed.tail = LF.DATA_START
            self._write_header(feed, ("header_init", feed), 0, LF.DATA_START, 1, 0)
            return
        if hdr.source_id != feed.p.source_id or hdr.pair_id != feed.p.pair_id:
            self.out.append(A.Notify("journal_foreign", source=feed.p.name, found_source=hdr.source_id))
            return
        feed.applied_seq, feed.cp_count = hdr.applied_seq, hdr.cp_count
        feed.filed_seq = hdr.applied_seq
        feed.tail = hdr.head_offset
        feed.scan_at, feed.scan_wrapped = hdr.head_offset, False
        self._scan_next(feed)

    def _write_header(self, feed, what, applied_seq, head, head_seq, cp_count):
        """Write the file header of `cp_count` to its slot: only one this destination's recovery
        reads back as written. The header is what lets the destination drop entries and reuse the
        file: one that recovery rejects is silently replaced by the older slot, whose head points
        at records the next lap overwrites. Seed 412026 showed it: a consistency point emptied a
        ring whose last record ended the file, recorded head_offset == the file's size (rejected
        as outside the file), and the restarted destination lost the acknowledged entries filed
        after it. A head is a place a record starts (LF.ring_offset: the ring's end is its start);
        a header that still does not read back is a bug, stopped here before it is on disk."""
        data = LF.build_header(feed.p.source_id, feed.p.pair_id, feed.p.journal_bytes, applied_seq,
                               head, head_seq, cp_count)
        try:
            back = LF.parse_header_untrusted(data, f"{feed.p.name} journal")
        except FormatError as exc:
            raise AssertionError(f"a file header recovery would reject: {exc}") from None
        if (back.applied_seq, back.head_offset, back.head_seq, back.cp_count) != (applied_seq, head, head_seq,
                                                                                 cp_count):
            raise AssertionError(f"a file header recovery would read otherwise: head {head} read as "
                                 f"{back.head_offset}")
        self.out.append(A.DiskWrite(self._op(what), feed.p.journal_disk, LF.header_slot_offset(cp_count), data))

    def _scan_next(self, feed):
        end = feed.p.journal_bytes
        if feed.scan_at + LF.RECORD_ALIGN > end:
            self._scan_wrap_or_end(feed)
            return
        length = min(SCAN_CHUNK_BYTES, end - feed.scan_at)
        self.out.append(A.DiskRead(self._op(("scan", feed)), feed.p.journal_disk, feed.scan_at, length))

    def _scan_wrap_or_end(self, feed):
        if not feed.scan_wrapped and feed.scan_at != LF.DATA_START:
            feed.scan_wrapped = True
            feed.scan_at = LF.DATA_START
            self._scan_next(feed)
        else:
            self._scan_done(feed)

    def _scan_chunk(self, feed, error, data):
        """Follow records with the next sequence number; the first that is not ends this lap."""
        if error:
            self.out.append(A.Notify("journal_error", source=feed.p.name, error=error))
            return
        at = 0
        while True:
            e = LF.parse_entry_untrusted(data, at)
            if e is None or e[2] != feed.filed_seq + 1:
                break
            lun, length, seq, lba, crc = e
            size = LF.record_bytes(length)
            if at + size > len(data):                 # the record runs past this chunk: read on from it
                if feed.scan_at + at + size > feed.p.journal_bytes:
                    break
                feed.scan_at += at
                self.out.append(A.DiskRead(self._op(("scan", feed)), feed.p.journal_disk, feed.scan_at,
                                           max(size, min(SCAN_CHUNK_BYTES, feed.p.journal_bytes - feed.scan_at))))
                return
            if N.crc32c(data[at + LF.RECORD_ALIGN:at + LF.RECORD_ALIGN + length]) != crc:
                break                                 # torn: it was never filed (never flushed)
            feed.records.append(Entry(seq, lun, lba * SECTOR, length, feed.scan_at + at + LF.RECORD_ALIGN))
            feed.filed_seq = seq
            at += size
            feed.tail = feed.scan_at + at
        if at == len(data) and at:
            feed.scan_at += at
            self._scan_next(feed)
            return
        self._scan_wrap_or_end(feed)

    def _scan_done(self, feed):
        staged = [e for e in feed.recovered_nvram if e.seq > feed.filed_seq]
        feed.recovered_nvram = None
        if staged and staged[0].seq != feed.filed_seq + 1:
            self.out.append(A.Notify("journal_gap", source=feed.p.name, filed_seq=feed.filed_seq,
                                     first_staged=staged[0].seq))
        feed.staged.extend(staged)
        feed.expected = max([feed.filed_seq + 1] + [e.seq + 1 for e in staged])
        if not staged:                  # everything in NVRAM is filed: start the partition afresh
            self._reset_partition(feed, feed.expected)
        feed.ready = True
        self.out.append(A.Notify("recovered", role="destination", source=feed.p.name, filed_seq=feed.filed_seq,
                                 applied_seq=feed.applied_seq, staged=len(staged), records=len(feed.records)))
        self._file(feed)
        if feed.link.up:
            self._greet(feed)
        held, feed.held = feed.held, collections.deque()
        for msg in held:
            self._handle(feed, msg)

    # -- link ------------------------------------------------------------------------

    def _link(self, link):
        return self.feeds[link].link

    def _links(self):
        return ((i, f.link) for i, f in enumerate(self.feeds))

    def _link_fields(self, link):
        return {"source": self.feeds[link].p.name}

    def _link_up(self, link):
        feed = self.feeds[link]
        self.out.append(A.Notify("link_up", source=feed.p.name))
        if feed.ready:
            self._greet(feed)

    def _on_link_down(self, link):
        self.feeds[link].early.clear()

    def _greet(self, feed):
        self._ack(feed, tag=1)

    def _ack(self, feed, tag=0, msg_type=T.LOG_SHIP):
        body = M.LOG_ACK.pack(feed.p.source_id, 0, 0, feed.expected - 1, feed.filed_seq, feed.applied_seq)
        feed.link.send(msg_type, M.Resource.REPLICATION, body, lane=F.LANE_CONTROL, flags=F.FLAG_RESPONSE, tag=tag)

    def _dispatch(self, link, msg):
        feed = self.feeds[link]
        if msg.flags & F.FLAG_RESPONSE or msg.type not in (T.LOG_SHIP, T.CONSISTENCY_POINT):
            raise LinkProtocolError(f"a destination does not take message type {msg.type}")
        if not feed.ready:
            msg.payload = bytes(msg.payload)
            feed.held.append(msg)
            return
        self._handle(feed, msg)

    def _handle(self, feed, msg):
        if msg.type == T.CONSISTENCY_POINT:
            if len(msg.payload) != M.CONSISTENCY_POINT.size:
                raise FormatError(f"consistency point of {len(msg.payload)} bytes")
            sid, _p, _first, through = M.CONSISTENCY_POINT.unpack_from(msg.payload)
            if sid != feed.p.source_id:
                raise LinkProtocolError(f"consistency point for source {sid} on {feed.p.name}'s link")
            feed.cp_target = max(feed.cp_target, through)
            self.out.append(A.Notify("consistency_point_signal", source=feed.p.name, through_seq=through))
            self._pump_cp(feed)
            return
        for seq, lun, offset, data in self._parse_ship(feed, msg.payload):
            if seq < feed.expected:
                self.stats["duplicates"] += 1
            elif seq > feed.expected:
                feed.early[seq] = (lun, offset, bytes(data))
                self.stats["early"] += 1
            else:
                self._store(feed, seq, lun, offset, data)
        while feed.expected in feed.early and self._room(feed, len(feed.early[feed.expected][2])):
            lun, offset, data = feed.early.pop(feed.expected)
            self._store(feed, feed.expected, lun, offset, data)
        self._ack(feed)
        self._file(feed)

    def _parse_ship(self, feed, payload):
        """Entries of a LOG_SHIP body: [(seq, lun, offset, data)]; FormatError if malformed."""
        if len(payload) < M.LOG_SHIP_HEAD.size:
            raise FormatError("short LOG_SHIP")
        sid, _partition, count = M.LOG_SHIP_HEAD.unpack_from(payload)
        if sid != feed.p.source_id:
            raise LinkProtocolError(f"log entries of source {sid} on {feed.p.name}'s link")
        at, out = M.LOG_SHIP_HEAD.size, []
        sizes = feed.p.lun_sizes
        for _ in range(count):
            if len(payload) - at < M.LOG_ENTRY_HEAD.size:
                raise FormatError("LOG_SHIP entry header cut short")
            seq, lun, _flags, lba, crc, length = M.LOG_ENTRY_HEAD.unpack_from(payload, at)
            at += M.LOG_ENTRY_HEAD.size
            data = payload[at:at + length]
            at += length
            if len(data) != length or N.crc32c(data) != crc:
                raise FormatError(f"log entry {seq}: data cut short or failing its CRC")
            if lun >= len(sizes) or lba * SECTOR + length > sizes[lun] or length % SECTOR:
                raise FormatError(f"log entry {seq} outside lun{lun}")
            out.append((seq, lun, lba * SECTOR, data))
        if at != len(payload):
            raise FormatError("trailing bytes after LOG_SHIP entries")
        return out

    def _room(self, feed, length):
        part = feed.part
        if self.log.room(part, length):
            return True
        if not feed.staged and not feed.filing:    # all filed: the partition starts afresh
            self._reset_partition(feed, feed.expected)
            return self.log.room(part, length)
        return False

    def _store(self, feed, seq, lun, offset, data):
        if not self._room(feed, len(data)):
            feed.early[seq] = (lun, offset, bytes(data))     # waits (unacknowledged) for filing
            return
        self._persist(self.log.append(feed.part, seq, lun, offset, data))
        feed.staged.append(feed.part.entries[-1])
        feed.expected = seq + 1
        self.stats["entries_stored"] += 1

    # -- filing: NVRAM -> the source's file ---------------------------------------------

    def _place(self, feed, size):
        end = feed.p.journal_bytes
        if not feed.records:
            at = feed.tail if feed.tail + size <= end else LF.DATA_START
            return at if at + size <= end else None
        head = feed.records[0].data_off - LF.RECORD_ALIGN
        newest = feed.records[-1].data_off - LF.RECORD_ALIGN
        if newest >= head:                 # not wrapped: [head, tail) is in use
            if feed.tail + size <= end:
                return feed.tail
            return LF.DATA_START if LF.DATA_START + size <= head else None
        # wrapped: [head, end) and [DATA_START, tail) are in use (tail == head is full, not empty)
        return feed.tail if feed.tail + size <= head else None

    def _file(self, feed):
        if not feed.ready or feed.filing:
            return
        batch = []
        nv = self.nv
        for e in feed.staged:
            size = LF.record_bytes(e.length)
            at = self._place(feed, size)
            if at is None:
                self.stats["journal_full"] += 1
                break
            if at < feed.tail:
                self.stats["journal_wraps"] += 1
            record = LF.build_record(e.lun, e.seq, e.offset // SECTOR, nv[e.data_off:e.data_off + e.length])
            self.out.append(A.DiskWrite(self._op(("file", feed)), feed.p.journal_disk, at, record))
            feed.records.append(Entry(e.seq, e.lun, e.offset, e.length, at + LF.RECORD_ALIGN))
            feed.tail = at + size
            batch.append(e)
        feed.filing = len(batch)
        feed.filing_batch = batch

    def _filed_writes_done(self, feed):
        if self.params.buggify("log_destage_no_flush"):     # (a broken variant)
            self._filed(feed)
            return
        self.out.append(A.DiskFlush(self._op(("file_flush", feed)), feed.p.journal_disk))

    def _filed(self, feed):
        batch, feed.filing_batch = feed.filing_batch, []
        feed.filing = 0
        for e in batch:
            feed.staged.popleft()
            feed.filed_seq = e.seq
        self.stats["entries_filed"] += len(batch)
        if not feed.staged:
            # every stored entry is in the file: the NVRAM partition is emptied (claims 4.17)
            self._reset_partition(feed, feed.expected)
            while feed.expected in feed.early and self._room(feed, len(feed.early[feed.expected][2])):
                lun, offset, data = feed.early.pop(feed.expected)
                self._store(feed, feed.expected, lun, offset, data)
            if feed.link.up:
                self._ack(feed)
        self._pump_cp(feed)
        self._file(feed)

    # -- consistency points: the file -> the image volume ---------------------------------

    def recover(self, name=None):
        """After a disaster at the source: apply every request this side acknowledged to the image.

        Through the last one stored, not the last one filed: with the file ring full, entries wait
        in NVRAM for the space this very consistency point frees, and are applied as they are filed
        (recovering only what was filed when it was called left an acknowledged write out)."""
        for feed in self.feeds:
            if name is None or feed.p.name == name:
                feed.cp_target = max(feed.cp_target, feed.expected - 1)
                self.out.append(A.Notify("recover_start", source=feed.p.name, through_seq=feed.expected - 1,
                                         records=len(feed.records)))
                self._pump_cp(feed)
        return self._take()

    def _pump_cp(self, feed):
        if feed.cp is not None or not feed.ready:
            return
        through = min(feed.cp_target, feed.filed_seq)
        records = [r for r in feed.records if r.seq <= through]
        if not records:
            if feed.cp_target and feed.applied_seq >= feed.cp_target and feed.link.up:
                self._ack(feed, msg_type=T.CONSISTENCY_POINT)
            return
        feed.cp = ConsistencyPoint(records)
        for r in records:
            self.out.append(A.DiskRead(self._op(("cp_read", (feed, r))), feed.p.journal_disk, r.data_off, r.length))

    def _cp_step(self, feed):
        """The I/O of the consistency point's stage completed: on to the next step (CP_NEXT)."""
        cp = feed.cp
        if cp.error:
            self.out.append(A.Notify("consistency_point_failed", source=feed.p.name, error=cp.error))
            feed.cp = None                  # the records stay in the file; the next signal retries
            return
        if cp.stage == "write" and self._cp_write_wave(feed, cp):
            return                          # one wave at a time: the next one waits for this one
        while True:
            cp.stage = CP_NEXT[cp.stage]
            if cp.stage == "done":
                return self._cp_done(feed, cp)
            if getattr(self, CP_ENTER[cp.stage])(feed, cp):
                return                      # I/O in flight: its completion steps again

    def _cp_write_images(self, feed, cp):
        cp.waves = waves(cp.records)
        return self._cp_write_wave(feed, cp)

    def _cp_write_wave(self, feed, cp):
        if not cp.waves:
            return False
        wave = cp.waves.pop(0)
        cp.left = len(wave)
        for r in wave:
            self.out.append(A.DiskWrite(self._op(("cp", feed)), feed.p.image_disks[r.lun], r.offset, cp.data[r.seq]))
        return True

    def _cp_flush_images(self, feed, cp):
        if self.params.buggify("log_destage_no_flush"):     # (a broken variant)
            return False
        disks = sorted({feed.p.image_disks[r.lun] for r in cp.records})
        cp.left = len(disks)
        for d in disks:
            self.out.append(A.DiskFlush(self._op(("cp", feed)), d))
        return True

    def _cp_write_header(self, feed, cp):
        # the header moves the head past the applied records; they stay in feed.records (and
        # their file space unused) until the header is durable
        rest = list(feed.records)[len(cp.records):]
        # no record left: the head is where the next one goes, and a tail at the very end of
        # the ring means its start (seed 412026; see _write_header)
        head = rest[0].data_off - LF.RECORD_ALIGN if rest else LF.ring_offset(feed.tail, feed.p.journal_bytes)
        cp.left = 1
        self._write_header(feed, ("cp", feed), cp.through, head, cp.through + 1, feed.cp_count + 1)
        return True

    def _cp_flush_header(self, feed, cp):
        if self.params.buggify("log_destage_no_flush"):     # (a broken variant)
            return False
        cp.left = 1
        self.out.append(A.DiskFlush(self._op(("cp", feed)), feed.p.journal_disk))
        return True

    def _cp_done(self, feed, cp):
        for _ in cp.records:
            feed.records.popleft()
        feed.applied_seq = cp.through
        feed.cp_count += 1
        feed.cp = None
        self.stats["consistency_points"] += 1
        self.out.append(A.Notify("image_applied", source=feed.p.name, through_seq=feed.applied_seq,
                                 cp_count=feed.cp_count))
        if feed.link.up:
            self._ack(feed, msg_type=T.CONSISTENCY_POINT)
        self._pump_cp(feed)
        self._file(feed)

    def disk_done(self, op, error, data):
        kind, what = self.ops.pop(op)
        if kind == "boot_flush":
            self._boot_flushed(what, error)
        elif kind == "header":
            self._header_read(what, error, data)
        elif kind == "header_init":
            if error:
                self.out.append(A.Notify("journal_error", source=what.p.name, error=error))
            else:
                self._scan_done(what)
        elif kind == "scan":
            self._scan_chunk(what, error, data)
        elif kind == "file":
            feed = what
            if error:
                self.stats["disk_errors"] += 1
                feed.file_error = error
            feed.filing -= 1
            if feed.filing == 0:
                feed.filing = len(feed.filing_batch)
                if feed.file_error:         # write the batch again at the same places
                    feed.file_error = 0
                    self.out.append(A.Notify("journal_error", source=feed.p.name, error=error))
                    self._refile(feed)
                else:
                    self._filed_writes_done(feed)
        elif kind == "file_flush":
            if error:
                self._refile(what)
            else:
                self._filed(what)
        elif kind == "cp_read":
            feed, r = what
            cp = feed.cp
            cp.data[r.seq] = data
            cp.error = cp.error or error
            cp.left -= 1
            if cp.left == 0:
                self._cp_step(feed)
        elif kind == "cp":
            cp = what.cp
            cp.error = cp.error or error
            cp.left -= 1
            if cp.left == 0:
                self._cp_step(what)
        elif kind == "read":
            req = what
            self.out.append(A.HostReply(req, EIO) if error else A.HostReply(req, 0, data))
        return self._take()

    def _refile(self, feed):
        """A file write or flush failed: drop the batch's records and file it again."""
        batch = feed.filing_batch
        for _ in batch:
            r = feed.records.pop()
            feed.tail = r.data_off - LF.RECORD_ALIGN
        feed.filing, feed.filing_batch = 0, []
        self._file(feed)

    # -- hosts: the image volumes, read-only ---------------------------------------------------

    def host_requests(self, batch):
        """A loop turn's host requests (firmware/requests.py), in order: one action list."""
        return one_by_one(self, batch)

    def host_read(self, req, lun, offset, length):
        feed, image_lun = self.by_disk.get(lun, (None, 0))
        if feed is None or offset < 0 or offset + length > feed.p.lun_sizes[image_lun]:
            self.out.append(A.HostReply(req, EINVAL))
        else:
            self.out.append(A.DiskRead(self._op(("read", req)), lun, offset, length))
        return self._take()

    def host_write(self, req, lun, offset, data, fua=False):
        self.out.append(A.HostReply(req, EPERM))      # an image volume is read-only
        return self._take()

    def host_write_zeroes(self, req, lun, offset, length, fua=False):
        return self.host_write(req, lun, offset, b"")

    def host_trim(self, req, lun, offset, length):
        return self.host_write(req, lun, offset, b"")

    def host_flush(self, req, lun):
        self.out.append(A.HostReply(req))
        return self._take()

    def start(self):
        return self._take()

    def tick(self, now_ms):
        self.now_ms = now_ms
        self._tick_links(now_ms)
        return self._take()

    def _link_stats(self):
        """Every source's link counters added up (update keeps the zeros status shows)."""
        total = collections.Counter()
        for f in self.feeds:
            total.update(f.link.stats)
        return dict(total)

    def status(self):
        ready = all(f.ready and f.link.up for f in self.feeds)
        return {"mode": "replica", "replica_variant": "log", "role": "destination",
                "link": "shipping" if ready else "waiting",
                "sources": {f.p.name: {"link": f.link.state, "ready": f.ready, "stored_seq": f.expected - 1,
                                       "filed_seq": f.filed_seq, "applied_seq": f.applied_seq,
                                       "nvram_entries": len(f.staged), "file_records": len(f.records),
                                       "consistency_points": f.cp_count, "early": len(f.early),
                                       "link_stats": dict(f.link.stats)}
                            for f in self.feeds},
                "link_stats": self._link_stats(),
                "stats": dict(self.stats), "owned_luns": [], "generation": 1}
