"""The controller's dealings with its partner over the link.

Owns the link entry points (link_connected, link_frame, link_disconnected),
the dispatch of partner messages to their named resources (claims 1.3), the
partner side of mirroring (persist into the mirror segment, ack), the
owner's mirror resynchronisation after the link comes up, and the degraded
mode while it is down: writes still pending a mirror ack complete from this
controller's NVRAM alone, forwarded requests fail with EIO, and the pair is
mirrored again only when the resync is done. And forwarding: host requests for
a LUN the partner owns go to it (firmware/forwarding.py keeps the window), and
the requests it forwards to us are carried out here, or refused with ESTALE
once the LUN is no longer ours.
"""
from . import actions as A
from .formats import FormatError
from .formats import frame as F
from .formats import messages as M
from .formats import nvram as N
from .forwarding import ForwardEntry
from .link import LinkProtocolError, unpack_body
from .owners import FenceError
from . import mirrorsync as MS
from .mirror import MirrorError
from .requests import Forwarded

EIO, EINVAL, ESTALE = 5, 22, 116
T = M.MsgType


class PeerMixin:
    # The link entry points take the link's index like the log destination's (firmware/logship/),
    # so a runtime drives N link ports one way; a pair has one link, 0.

    def link_connected(self, nonce, now_ms, link=0):
        """A transport to the partner exists (the runtime supplies a fresh random nonce)."""
        _only_link(link)
        self.now_ms = now_ms
        if self.link.state != "down":
            self._link_failed("a new connection replaced the old one")
        self.link.connected(nonce, now_ms)
        return self._take()

    def link_disconnected(self, reason, link=0):
        _only_link(link)
        if self.link.state != "down":
            self._link_failed(reason, reset=False)
        return self._take()

    def link_frame(self, frame, now_ms, link=0):
        """One whole frame from the framer."""
        return self.link_frames((frame,), now_ms, link)

    def link_frames(self, frames, now_ms, link=0):
        """Whole frames from one read of the link: handled in order, answered together."""
        _only_link(link)
        self.now_ms = now_ms
        link = self.link
        for frame in frames:
            if link.state == "down":
                break
            was_up = link.up
            try:
                msg = link.receive(frame, now_ms)
                if not was_up and link.up:
                    self._on_link_up()
                if msg is not None:
                    if msg.type != T.MIRROR_WRITE and self.acks_owed:
                        self._send_mirror_ack()     # whatever answers this comes after the ack
                    self._dispatch(msg)
            except (LinkProtocolError, FormatError, MirrorError) as exc:
                self.stats["link_errors"] += 1
                self._link_failed(f"protocol error: {exc}")
            except FenceError as exc:           # an authenticated peer's message our state refuses
                self.stats["link_errors"] += 1
                self.stats["ownership_protocol_errors"] += 1
                self._link_failed(f"ownership protocol error: {exc}")
        if self.acks_owed and link.up:
            self._send_mirror_ack()
        return self._take()

    def link_is_up(self, link=0) -> bool:
        """The session on the link authenticated and serves."""
        _only_link(link)
        return self.link.up

    # -- link output ----------------------------------------------------------

    def _send_mirror(self, lun, ctx, seq, generation, first, count, part):
        """One MIRROR_WRITE carrying blocks [first, first + len(part)) of write `seq` (count blocks)."""
        seg, entry = self.primary, M.MIRROR_BLOCK.pack
        entries = b"".join([entry(line.block, line.lba, crc, line.bitmap.to_bytes(16, "big"))
                            for line, crc in part])
        head = M.MIRROR_WRITE_HEAD.pack(lun, ctx, seq, generation, count, first, len(part), 0,
                                        self.block_size)
        self.link.send(M.MsgType.MIRROR_WRITE, M.Resource.MIRROR,
                       (head, entries, *[seg.data(line.block) for line, _crc in part]))

    def flush_link(self):
        """With batch_link_output: the link frames of everything handled since the last call.

        The runtime calls it once per loop turn, so the frames of a turn go out together.
        Flush-begin and flush-done references ride along with other frames and go out
        on their own only at a tick or when many are waiting: they only tell the
        partner what it may free (a late flush-done costs nothing, the owner's next
        write to the block frees the copy anyway), so they need not wake it.
        """
        self._start_flushes()
        link = self.link
        if (self.refs_due or link.control_queue or link.data_queue
                or len(self.flush_begin_refs) + len(self.flush_done_refs) >= M.BLOCK_REFS_MAX):
            self._queue_refs()
        elif link.state != "down":
            buffers = link.take_output()
            if buffers:
                self.out.append(A.Transmit(buffers))
        out, self.out = self.out, []
        return out

    def _queue_refs(self):
        self.refs_due = False
        if self.link.up:
            if self.flush_begin_refs:
                self._send_refs(M.MsgType.FLUSH_BEGIN, self.flush_begin_refs)
            if self.flush_done_refs:
                self._send_refs(M.MsgType.FLUSH_DONE, self.flush_done_refs)
        self.flush_begin_refs = []
        self.flush_done_refs = []
        if self.link.state != "down":
            buffers = self.link.take_output()
            if buffers:
                self.out.append(A.Transmit(buffers))

    def _send_refs(self, msg_type, refs):
        step = M.BLOCK_REFS_MAX
        for i in range(0, len(refs), step):
            self.link.send(msg_type, M.Resource.CACHE_META, M.pack_block_refs(refs[i:i + step]))

    def _send_mirror_ack(self):
        """One cumulative MIRROR_ACK for every write committed since the last one."""
        self.link.send(T.MIRROR_ACK, M.Resource.MIRROR, M.MIRROR_ACK.pack(self.ack_seq, 0, self.acks_owed, 0),
                       lane=F.LANE_CONTROL, flags=F.FLAG_RESPONSE)
        self.acks_owed = 0

    def _link_failed(self, reason, reset=True):
        """The session is over: complete what waited on the partner, go degraded."""
        self.out.append(A.Notify("link_down", reason=reason))
        if reset:
            self.out.append(A.LinkReset(reason))
        self.link.disconnected()
        self.acks_owed = 0
        self.flush_begin_refs = []
        pending = self.sync_pending
        self._mirroring_event("link_down")
        if pending:
            self._unpin_resync(mirrored=False)
        for r in self.mirror.abandon_group():
            self._persist(r)
        pending, self.pending = self.pending, {}
        for seq in sorted(pending):
            self.ownership.cut_off(pending[seq])
        self._fail_forwards()
        self.ownership.link_down()
        self._pump()

    def _on_link_up(self):
        self.link_session += 1
        peer = self.link.peer
        self.out.append(A.Notify("link_up", peer=peer.controller_id, peer_generation=peer.generation))
        if peer.block_size_bytes != self.block_size or peer.primary_blocks != self.mirror.segment.blocks:
            raise LinkProtocolError(f"peer cache geometry {peer.primary_blocks} x {peer.block_size_bytes} B "
                                    f"does not match this mirror segment")
        self._mirroring_event("link_up")

    def _mirroring_event(self, event):
        """The one place the mirroring table moves (firmware/mirrorsync.py), on the link's
        events and on ownership's (a LUN went solo, a takeover finished); a move that calls for
        it starts sending every line."""
        before = self.sync_state
        self.sync_state = MS.next_state(before, event)
        if (before, event) in MS.STARTS_A_RESYNC:
            self._start_resync()

    def _start_resync(self):
        """Send every live line to the partner's mirror; mirrored again when it answers SYNC_DONE."""
        lines = self.ownership.lines_to_resync()
        lines.sort(key=lambda line: line.seq)
        body = M.Sync.build(dict(generation=self.generation, blocks=len(lines), reserved=0))
        self.link.send(T.SYNC_BEGIN, M.Resource.MIRROR, body)
        probe = M.PING_STRUCT.pack(0)
        for n, line in enumerate(lines):
            if n and n % RESYNC_PROBE_LINES == 0:
                # A progress probe in order with the lines: its answer says the partner has the first n.
                self.link.send(T.PING, M.Resource.MIRROR, probe, tag=n)
            line.pins += 1          # the queued frame views the block until SYNC_DONE is answered
            crc = N.crc32c(self.primary.data(line.block))
            # Each copy carries the LUN's generation its line was written and first mirrored at:
            # stamped with our own (1 after a restart), a copy of an acknowledged write looked
            # older than a SOLO record at that generation, and the partner's claim voided it (seed
            # 1700244 at 300 steps).
            self._send_mirror(line.lun, M.CTX_FIRST | M.CTX_LAST | M.CTX_RESYNC, line.seq, line.generation,
                              0, 1, [(line, crc)])
            if line.flushing:
                self._send_refs(T.FLUSH_BEGIN, [(line.block, line.seq)])
        self.link.send(T.SYNC_DONE, M.Resource.MIRROR, body, tag=1)
        self.resync_lines = lines
        self.resync_progress = {"lines_total": len(lines), "lines_transferred": 0,
                                "lines_remaining": len(lines)}
        self.out.append(A.Notify("resync_start", lines=len(lines)))

    def _resync_transferred(self, n):
        progress = self.resync_progress
        if progress is None or n <= progress["lines_transferred"]:
            return
        progress["lines_transferred"] = n
        progress["lines_remaining"] = progress["lines_total"] - n
        self.out.append(A.Notify("resync_progress", lines_transferred=n,
                                 lines_remaining=progress["lines_remaining"]))

    def _unpin_resync(self, mirrored):
        lines, self.resync_lines = self.resync_lines, []
        if mirrored:
            self._resync_transferred(len(lines))
        self.resync_progress = None
        for line in lines:
            line.mirrored = line.mirrored or mirrored
            line.pins -= 1
            self.write_path.maybe_free(line)

    def _dispatch(self, msg):
        handler = DISPATCH.get(msg.type)
        if handler is None:
            raise LinkProtocolError(f"unexpected message type {msg.type}")
        getattr(self, handler)(msg)

    # -- partner side: the mirror segment -----------------------------------

    def _on_mirror_write(self, msg):
        p = msg.payload
        head, entry = M.MIRROR_WRITE_HEAD, M.MIRROR_BLOCK
        if len(p) < head.size:
            raise MirrorError(f"mirror write of {len(p)} bytes is shorter than its head")
        lun, ctx, seq, generation, gc, first, count, _r, block_size = head.unpack_from(p)
        if lun >= len(self.params.lun_sizes):
            raise MirrorError(f"mirror write for lun{lun}, which this pair does not have")
        data_at = head.size + count * entry.size
        if block_size != self.block_size or len(p) != data_at + count * block_size:
            raise MirrorError(f"mirror write of {count} blocks of {block_size} bytes is {len(p)} bytes")
        entries = [(cache_id, lba, crc, int.from_bytes(bitmap, "big"))
                   for cache_id, lba, crc, bitmap in entry.iter_unpack(p[head.size:data_at])]
        persists, committed = self.mirror.write(lun, seq, generation, first, gc, entries, p[data_at:],
                                                self.ownership.mirror_replaying)
        if not ctx & M.CTX_RESYNC:
            self.ownership.mirror_written_at(lun, generation)
        out = self.out
        offset, size = persists[0]
        for o, n in persists[1:]:               # adjacent ranges share one Persist, order kept
            if o == offset + size:
                size += n
            else:
                out.append(A.Persist(offset, size))
                offset, size = o, n
        out.append(A.Persist(offset, size))
        if committed is not None and ctx & M.CTX_RESYNC:
            self.ownership.resync_copy_stored(lun)
        if committed is not None and not ctx & M.CTX_RESYNC:
            self.ack_seq = committed            # acknowledged with the next cumulative MIRROR_ACK
            self.acks_owed += 1
            if self.acks_owed == 0xFFFF:        # the count field's limit
                self._send_mirror_ack()
        self.stats["mirror_writes_received"] += 1
        self.stats["mirror_blocks_received"] += count

    def _on_flush_refs(self, msg):
        refs = M.parse_block_refs_untrusted(msg.payload, "flush message")
        persists = (self.mirror.flush_begin(refs) if msg.type == T.FLUSH_BEGIN
                    else self.mirror.flush_done(refs))
        for r in persists:
            self._persist(r)

    def _on_sync(self, msg):
        if msg.flags & F.FLAG_RESPONSE:            # our resync is done: mirrored again
            state = self.sync_state
            self._mirroring_event("sync_done")
            if state in (MS.RESYNC_AGAIN, MS.RESEND_AGAIN):    # resent from the start (mirrorsync.py)
                self._unpin_resync(mirrored=state == MS.RESEND_AGAIN)   # a resend: mirrored all along
                self._start_resync()
                return
            if state in (MS.RESENDING, MS.RESYNCING):
                self._unpin_resync(mirrored=True)
            if state == MS.RESYNCING:           # a resend's end (resending) re-reads nothing
                self.out.append(A.Notify("mirrored", generation=self.generation))
                self.ownership.resync_ended()
            return
        if msg.type == T.SYNC_BEGIN:
            # Every block is unconfirmed until resent; what is kept is decided at SYNC_DONE, by
            # the LUN's state then (see mirror_undecided).
            for r in self.mirror.sync_begin():
                self._persist(r)
        else:
            own = self.ownership
            for r in self.mirror.sync_done(own.mirror_owned_by_peer, own.mirror_undecided, own.mirror_ours):
                self._persist(r)
            self.link.send(T.SYNC_DONE, M.Resource.MIRROR, bytes(msg.payload), lane=F.LANE_CONTROL,
                           flags=F.FLAG_RESPONSE, tag=msg.tag)

    # -- owner side -----------------------------------------------------------

    def _on_mirror_ack(self, msg):
        """Cumulative: every write up to `seq` sent in this session is in the partner's NVRAM.

        The partner commits groups in the order they arrive and they are sent in
        seq order, so `pending` (in seq order) is acknowledged from its front.
        """
        seq, status, count, _r = unpack_body(msg, M.MIRROR_ACK)
        if status:
            raise LinkProtocolError(f"partner refused mirror write {seq}: error {status}")
        pending = self.pending
        done = []
        for pseq in pending:
            if pseq > seq:
                break
            done.append(pseq)
        if len(done) != count or not done or done[-1] != seq:
            raise LinkProtocolError(f"mirror ack for {count} writes up to {seq} does not match "
                                    f"the {len(done)} pending up to it")
        for pseq in done:
            self.write_path.finish(pending.pop(pseq), mirrored=True, pump=False)
        self._pump()

    def _on_ping(self, msg):
        """Answer to the mailbox that asked: ADMIN (a round trip) or MIRROR (a resync progress probe)."""
        self.link.send(T.PONG, msg.resource, bytes(msg.payload), lane=F.LANE_CONTROL,
                       tag=msg.tag, flags=F.FLAG_RESPONSE)

    def _on_pong(self, msg):
        if msg.resource == M.Resource.MIRROR:
            self._resync_transferred(msg.tag)
            return
        (sent_ns,) = unpack_body(msg, M.PING_STRUCT)
        self.out.append(A.Notify("pong", tag=msg.tag, sent_ns=sent_ns))

    def ping(self, tag, sent_ns):
        """Send a control-lane round trip (admin, and the reserved-credit test)."""
        if self.link.up:
            self.link.send(T.PING, M.Resource.ADMIN, M.PING_STRUCT.pack(sent_ns), lane=F.LANE_CONTROL, tag=tag)
        return self._take()

    def _on_error(self, msg):
        body = M.parse_body_untrusted(T.ERROR, msg.payload, "ERROR")
        raise LinkProtocolError(f"partner reported error {body.code}: {body.message}")

    def _on_ignored(self, msg):
        self.stats[f"ignored_{msg.type}"] += 1

    def _on_ownership(self, msg):
        self.ownership.on_message(msg)


    # -- forwarding: host requests for the owner, and the partner's for us ------------

    def _forward(self, req, op, lun, offset, length, data, fua):
        """Send a host request to the owner (firmware/forwarding.py), or fail it at once."""
        entry = ForwardEntry(req, op, lun, offset, length, bytes(data) if data is not None else None, fua)
        error = self.forwarder.forward(entry)
        if error:
            self._reply(req, error)

    def _fail_forwards(self):
        """The link is down: every forwarded request in flight or waiting fails with EIO."""
        for entry in self.forwarder.fail_all():
            self._reply(entry.req, EIO)

    def _on_io_request(self, msg):
        op, fua, lun, offset, length = unpack_body(msg, M.IO_REQUEST_HEAD, exact=False)
        data = msg.payload[M.IO_REQUEST_HEAD.size:]
        req = Forwarded(msg.tag, op, self.link_session)
        if not self.ownership.owns(lun) if 0 <= lun < len(self.params.lun_sizes) else True:
            self._reply(req, ESTALE)            # ownership moved: the sender retries where it now is
        elif op == M.IoOp.WRITE:
            self.write_path.host_write(req, lun, offset, data, bool(fua))
        elif op == M.IoOp.READ:
            self.write_path.host_read(req, lun, offset, length)
        elif op == M.IoOp.WRITE_ZEROES and not data:
            self.write_path.host_write_zeroes(req, lun, offset, length, bool(fua))
        elif op == M.IoOp.FLUSH:
            self._reply(req, 0)
        elif op == M.IoOp.BLOCK_STATUS and not data:
            self.allocation.ask(req, lun, offset, length)
        else:
            self._reply(req, EINVAL)

    def _on_io_reply(self, msg):
        # Checked before the request leaves the window, so a bad reply still fails it at the reset.
        (error,) = unpack_body(msg, M.IO_REPLY_HEAD, exact=False)
        entry = self.forwarder.answered(msg.tag)
        req, op, lun, offset, length, data, fua = (entry.req, entry.op, entry.lun, entry.offset, entry.length,
                                                   entry.data, entry.fua)
        if op == M.IoOp.BLOCK_STATUS:
            self.allocation.forwarded_done(req, lun, offset, length, error, msg.payload)
            return
        if error == ESTALE and self.ownership.owns(lun):     # ownership came here meanwhile: do it here
            if op == M.IoOp.WRITE:
                self.write_path.host_write(req, lun, offset, data, fua)
            elif op == M.IoOp.WRITE_ZEROES:
                self.write_path.host_write_zeroes(req, lun, offset, length, fua)
            else:
                self.write_path.host_read(req, lun, offset, length)
            return
        if error == ESTALE:
            error = EIO
        data = bytes(msg.payload[M.IO_REPLY_HEAD.size:]) if len(msg.payload) > 4 else None
        self._reply(req, error, data)      # req may be a part, or a request the partner forwarded here

def _only_link(link):
    if link != 0:
        raise ValueError(f"a pair has one link, 0, not {link}")


RESYNC_PROBE_LINES = 32       # a resync asks the partner how far it got after every this many lines

DISPATCH = {
    T.MIRROR_WRITE: "_on_mirror_write",
    T.MIRROR_ACK: "_on_mirror_ack",
    T.FLUSH_BEGIN: "_on_flush_refs",
    T.FLUSH_DONE: "_on_flush_refs",
    T.SYNC_BEGIN: "_on_sync",
    T.SYNC_DONE: "_on_sync",
    T.IO_REQUEST: "_on_io_request",
    T.IO_REPLY: "_on_io_reply",
    T.PING: "_on_ping",
    T.PONG: "_on_pong",
    T.ERROR: "_on_error",
    T.METADATA: "_on_ignored",
    T.OWNERSHIP_REQUEST: "_on_ownership",
    T.OWNERSHIP_GRANT: "_on_ownership",
}
