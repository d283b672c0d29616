"""Takeover in ha mode: watching a silent owner's record, claiming, replaying the mirror.

The half of the ownership state machine (firmware/ha/fencing.py: the table, the
lease rules and the argument for them) that runs on the partner of a LUN's
owner once the link is gone: it watches the reservation record for
`takeover_wait_ms` of silence, writes a claim (state CLAIMED), reads it back
after the settle time, replays its mirror segment's lines of the LUN and
serves. The old owner's side of a claim is here too: lines it holds, unused,
while a claim is not yet confirmed.
"""
from .. import actions as A
from ..cache import SECTOR_BYTES
from .ownership import Own, REPLAY_RETRY_MS
from ..formats import reservation as R


class ReplayOp:
    """Writing one of the partner's mirror blocks (or a line of ours held under its claim) to
    disk during a takeover."""
    __slots__ = ("lun", "index", "remaining", "error", "line", "block")

    def __init__(self, lun, index, remaining, line=None, block=None):
        self.lun = lun
        self.index = index
        self.remaining = remaining
        self.error = 0
        self.line = line
        self.block = block


class ReplayRound:
    """The replay writes of one round that completed, waiting for the flush of their LUN."""
    __slots__ = ("lun", "entries")

    def __init__(self, lun, entries):
        self.lun = lun
        self.entries = entries


class TakeoverMixin:
    def _resume_claim(self, f, rec):
        """Our claim (CLAIMED: its replay not done) that this incarnation never replayed: we
        went down between claim and replay. The old owner dropped its lines when it saw the
        claim, so our mirror holds the only other copy of its acknowledged writes: confirm the
        claim and replay, as if just written. Served straight away, it lost them (seeds 32, 182)."""
        self._note("takeover_resumed", lun=f.lun, generation=rec.generation)
        f.pending_write, f.claim_written_ms = rec, self.ctrl.now_ms
        f.claim_stale = False
        f.claim_over_generation = rec.generation - 2      # (a claim made again after a late one: older)
        return Own.CLAIMING

    def _drop_lines(self, f, rec, reason):
        """Stop using this LUN's cached lines: `rec` names another owner, whose data is newer.

        Under a claim not yet confirmed (CLAIMED: the claimant's replay is not done) the lines are held, not freed: the claimant replays its mirror copy of them,
        which lives in the partner's blocks with the same numbers, and a block we reused would
        overwrite that copy before the replay (seed 32: an acknowledged write lost). Held lines
        stay DIRTY in NVRAM (after a restart they are held again) until a record shows the
        claim confirmed, or our own claim writes them out."""
        lines = [line for line in self.cache.lines.values() if line.lun == f.lun]
        for line in lines:
            self.cache.remove_current(line)
        if self._claim_unconfirmed(rec):
            f.held_lines.extend(lines)
            f.held_generation = rec.generation
        else:
            self.ctrl._forget_lines(lines, rec is not None)
        if lines:
            self._note("lines_dropped", lun=f.lun, lines=len(lines), reason=reason,
                       held=self._claim_unconfirmed(rec))

    def _claim_unconfirmed(self, rec) -> bool:
        return rec is not None and rec.owner != self.id and rec.state == R.LunState.CLAIMED

    def _settle_held(self, f, rec):
        """A record read while we hold lines: forget them once the claim is confirmed; take them
        back only if our own older record landed over the claim, which its claimant then
        abandoned (nobody served the LUN meanwhile). A record naming us at a newer generation
        came from a grant after the claimant served: the held lines are older than its writes
        (seed 7119 at 300 steps: taken back after a failback, write 103 came back over 156).
        Our own claim's replay (CLAIMING, REPLAYING) deals with them itself."""
        if (not f.held_lines or rec is None or self._claim_unconfirmed(rec)
                or f.state in (Own.CLAIMING, Own.REPLAYING)):
            return
        held, f.held_lines = f.held_lines, []
        if rec.owner == self.id and rec.generation < f.held_generation:
            for line in held:
                if line.dead:           # destaged and flushed since we held it: on disk, block freed
                    continue
                line.current = True
                self.cache.install(line)
        else:
            self.ctrl._forget_lines(held, True)

    def _to_watching(self, f):
        # The owner may have moved the LUN to a new generation without our reading the record (it
        # went solo and back while its resync to us was pending): its mirror writes said so.
        f.mirror_generation = max(f.generation, f.peer_generation)
        f.void_mirror = 0               # mirrored up to the link drop: our copy is the partner's data
        f.last_seen, f.last_change_ms = None, self.ctrl.now_ms
        f.renew_due_ms = self.ctrl.now_ms
        self._read_record(f)

    def _watch_anew(self, f):
        """The session ended: an owner on its link lease holds it until at most lease_ms past
        the newest frame of its that we acknowledged, before now; the quiet time starts now."""
        f.last_change_ms = self.ctrl.now_ms

    def _watch_record(self, f, rec):
        key = rec.key() if rec is not None else None
        if rec is not None and rec.owner == self.id:
            return self._st_record(f, rec)          # it is ours (we claimed it earlier)
        if key != f.last_seen or self.link.up:
            # With the session up (watching while our resync runs) the owner may serve on its
            # link lease, which moves no record: a quiet record proves nothing, so the quiet
            # time counts from when the session ends (seed 37: both served lun0).
            f.last_seen, f.last_change_ms = key, self.ctrl.now_ms
            if self._voids_mirror(f, rec):
                f.void_mirror = max(f.void_mirror, rec.generation)
            return Own.WATCHING
        if f.read_start_ms - f.last_change_ms < self.params.takeover_wait_ms and not self.buggify("takeover_no_wait"):
            return Own.WATCHING         # quiet is what our reads saw, up to the start of this one
        if not self._fresh(f):
            self._read_record(f)        # answered after a pause shorter than a lease: look again
            return Own.WATCHING
        if not self.disk_health.may_claim(f.lun, self.ctrl.now_ms):
            return Own.WATCHING         # our last claim's write failed: back off (firmware/diskhealth.py)
        # Two above what we read: the owner may bump its generation once (solo) between our
        # read and our claim landing; a claim at + 1 named that same generation, and a claim
        # that landed over the bump then served it too (seed 676: both served generation 9).
        generation = (rec.generation if rec else f.generation) + 2
        self._note("takeover_claim", lun=f.lun, generation=generation,
                   silent_ms=self.ctrl.now_ms - f.last_change_ms)
        if f.void_mirror:
            self._void_mirror(f, f.void_mirror)   # before the claim: after a restart, what is left is replayed
        self._write_claim(f, generation)
        f.claim_over_generation = generation - 2
        return Own.CLAIMING

    def _fresh(self, f) -> bool:
        """Is the record read just answered fresh enough to claim on, by our own clock now (begun
        less than renew_interval_ms, at most lease_ms / 2, ago: firmware/ha/fencing.py step 3)? A
        read that landed during a pause shorter than lease_ms passes the re-read guard of
        _record_done, and a claim taken on it named two above a generation the owner had left
        twice meanwhile (restarted and bumped each time): both served one generation."""
        p = self.params
        return self.ctrl.now_ms - f.read_start_ms < min(p.renew_interval_ms, p.lease_ms // 2)

    def _write_claim(self, f, generation):
        self._write_record(f, self._new_record(f, self.id, generation, R.LunState.CLAIMED))
        f.claim_read_ms = f.read_start_ms
        f.claim_written_ms = None
        f.claim_stale = False

    def _claim_landed(self, f):
        """Our claim's write is over (landed, or failed and maybe landed). It can land after a second
        bump of the owner only if it completed lease_ms or more after the read it was decided on
        began (an owner bumps again no sooner than that after its last bump completed, also
        across a restart: firmware/ha/fencing.py _fencing_record). Such a claim may share the
        owner's generation: it is not settled on; a fresh read decides (_claim_record)."""
        if self.ctrl.now_ms - f.claim_read_ms >= self.params.lease_ms:
            f.claim_stale = True
            self._note("takeover_claim_late", lun=f.lun, generation=f.pending_write.generation)
            self._read_record(f)
            return
        f.claim_written_ms = self.ctrl.now_ms

    def _voids_mirror(self, f, rec) -> bool:
        """Does `rec` make our mirror copy of the LUN old data? Yes once its owner went on alone
        (SOLO: it destaged first and writes through since) or moved it to another generation
        than the one it mirrored to us at; not under a claim still CLAIMED, whose claimant has
        destaged nothing (seed 419). Every record we take note of is judged by this, also the
        one that ends our own claim. A SOLO record at the generation the owner mirrored to us at
        voids nothing: SOLO is written at a generation only before mirroring at it (a takeover's
        end, or a bump to the next one), and the MIRRORED rewrite after it may not have landed
        when the owner died (seed 93 at 120 steps: an owner mirrored three writes at generation
        3 and died; its record still said SOLO at 3, and the partner voided its copies)."""
        return rec is not None and not self._claim_unconfirmed(rec) and (
            rec.generation != f.mirror_generation
            or rec.state == R.LunState.SOLO and f.peer_generation < rec.generation)

    def _claim_written(self, f):
        self._claim_landed(f)

    def _claim_tick(self, f):
        settle = 0 if self.buggify("claim_no_settle") else self.params.lease_ms + self.params.renew_interval_ms
        written = f.claim_written_ms
        if written is not None and self.ctrl.now_ms - written >= settle and not f.io_inflight:
            self._read_record(f)

    def _claim_record(self, f, rec):
        claimed = f.pending_write
        if f.claim_stale and rec is not None and rec.key() == claimed.key():
            # Our late claim is what the record holds: claim again, two above it, on this read.
            if self._fresh(f):
                self._write_claim(f, claimed.generation + 2)
            else:
                self._read_record(f)
            return Own.CLAIMING
        if rec is None or rec.key() != claimed.key():
            self._note("takeover_abandoned", lun=f.lun, reason=self._abandon_reason(f, rec))
            self._abandon_mirror(f, rec)
            if rec is not None and rec.owner != self.id:
                # Our own lines of the LUN (from before the claim we were overruling) are judged by
                # the record that beat us, as a fenced owner's are: held under a claim still
                # CLAIMED, forgotten otherwise. Kept in the cache, a later claim of ours replayed
                # them over the owner's write-through (seed 1012966 at 300 steps: b, restarted in
                # its claim, lost it to a's, and its next claim wrote write 8 over write 151).
                self._drop_lines(f, rec, "claim abandoned")
            f.last_seen, f.last_change_ms = (rec.key() if rec else None), self.ctrl.now_ms
            if self.link.up:
                # The link came up during the claim (CLAIMING ignores link_up): the record
                # decides now. Left WATCHING, we would claim again over an owner that, with
                # the link up, renews no record (VM pair: both owned lun1 at generations 2, 3).
                self._read_record(f)
                return Own.STARTING
            return Own.WATCHING
        f.record, f.generation = rec, rec.generation
        f.lease_until_ms = f.read_start_ms + self.params.lease_ms
        return self._start_replay(f)

    def _abandon_reason(self, f, rec):
        """Why the record read back is not our claim. Taken for a renewal by the owner, a claim
        whose own write had failed was tried again every 1.4 s, each time reported as a live
        owner (a disk failing writes): the record unchanged since we watched it says otherwise."""
        errno = self.disk_health.record_write_errno(f.lun)
        if not errno:
            return "the owner renewed over our claim"
        if (rec.key() if rec is not None else None) == f.last_seen:
            return f"our claim's record write failed (errno {errno}); the record is unchanged"
        return f"our claim's record write failed (errno {errno}) and the record changed"

    def _abandon_mirror(self, f, rec):
        """A claim given up on its read-back judges the mirror lines it kept against the record
        that beat it, as a watch read would: that record is now the last seen, so no later read
        with its key judges them again. Kept, they waited for a later claim, which replayed
        them over the owner's newer write-through (an owner that went SOLO renewed over our
        claim). The lines were judged valid against the record we claimed over, and copies the
        owner mirrored to us since, at its generation, are its live data (seed 742602 at 300
        steps: the link came back during our claim, the owner mirrored at 4, and our abandon
        voided those copies with the old ones)."""
        f.mirror_generation = max(f.claim_over_generation, f.peer_generation)
        if self._voids_mirror(f, rec):
            f.void_mirror = 0
            self._void_mirror(f, rec.generation)

    def _mirror_blocks_of(self, f):
        return [(i, b) for i, b in enumerate(self.mirror.blocks) if b is not None and b.lun == f.lun]

    def _void_mirror(self, f, below):
        """The owner went on alone (or ownership moved) since our copies mirrored at generations
        `below` were made: they are old data. Copies it mirrored at the record's generation or a
        newer one came after (SOLO is written at a generation before mirroring at it) and are its
        live data (seed 905875 at 300 steps: watching while our resync ran, we noted the owner's
        MIRRORED record at 2 as a move from the 1 we had copies at, and the claim voided a write
        it had mirrored to us at 2 and acknowledged)."""
        blocks = [(i, b) for i, b in self._mirror_blocks_of(f) if b.generation < below]
        for i, _b in blocks:
            self.ctrl._persist(self.mirror._free(i))
        self._note("mirror_void", lun=f.lun, blocks=len(blocks))

    def _free_stale_mirror(self, f):
        """The LUN is ours, not by a claim still to replay: copies of it in our mirror are the old
        owner's lines that it destaged before it released the LUN, their flush-done lost with the
        link (a power cut right after a handover). Kept, no resync ever voids them (we own the
        LUN), and a later claim would replay them over newer data (seed 269)."""
        blocks = self._mirror_blocks_of(f)
        for i, _b in blocks:
            self.ctrl._persist(self.mirror._free(i))
        if blocks:
            self._note("mirror_stale", lun=f.lun, blocks=len(blocks))

    def _start_replay(self, f):
        """Write the partner's mirrored lines of this LUN to disk, skipping flushed ones (claims 5.13).

        A block leaves the mirror only once its replay write succeeded; one that failed is
        written again in the next round, REPLAY_RETRY_MS later. Given up on, it was lost: the
        takeover served the LUN from a disk without it (seed 159)."""
        f.replay_left = 0
        f.replay_written = []
        f.replay_failed = False
        f.replay_retry_ms = None
        f.replay_complete = False
        f.solo_after_ms = None
        own = [line for line in self.cache.lines.values() if line.lun == f.lun]
        for line in own:                # ours from before a claim by the partner we now overrule
            self.cache.remove_current(line)
        f.held_lines.extend(own)
        held_keys = {line.key for line in f.held_lines}
        # A held line whose destage flush completed after we held it is on disk, and its block
        # was freed then and may hold another line's data now: never written out again (seed
        # 861604 at 300 steps: b's claim replayed a reused block over write-zeroes). Its key
        # still keeps the partner's older copy from being replayed over it.
        f.held_lines = [line for line in f.held_lines if not line.dead]
        for i, b in sorted(self._mirror_blocks_of(f), key=lambda ib: ib[1].seq):
            if b.key in held_keys:      # the partner's copy is older than our held version
                self.ctrl._persist(self.mirror._free(i))
            else:
                self._replay_block(f, i, b)
        for line in f.held_lines:
            self._replay_run(f, None, line, self.primary.data(line.block), line.lba, line.bitmap)
        if not f.replay_left:
            return self._replayed(f)
        return Own.REPLAYING

    def _replay_tick(self, f):
        """Renew the claim while the replay runs, and read the record before a retry round: a
        partner may have claimed the LUN meanwhile (a pause); a round started without looking
        landed under the old generation after the new owner's writes (seed 996). Without the
        renewals, a replay longer than takeover_wait_ms looked dead to an old owner that came
        back with the link down, and it claimed the LUN over the replay."""
        if f.replay_retry_ms is not None and self.ctrl.now_ms >= f.replay_retry_ms and not f.io_inflight:
            self._read_record(f)        # due until the record comes back: a failed read is retried
        else:
            self._renew_if_due(f)
        return None

    def _replay_record(self, f, rec):
        if rec is not None and rec.owner == self.id and rec.generation == f.generation and (
                rec.state in (R.LunState.CLAIMED, R.LunState.SOLO)):
            f.lease_until_ms = f.read_start_ms + self.params.lease_ms
            if f.replay_complete:
                if rec.state == R.LunState.SOLO:
                    if f.solo_after_ms is None:           # our SOLO landed though its write failed
                        f.solo_after_ms = self.ctrl.now_ms + self.params.lease_ms
                    if f.read_start_ms >= f.solo_after_ms:
                        f.solo_after_ms = None
                        return self._takeover_done(f)
                self._write_record(f, self._renewal(f, rec, rec.generation, R.LunState.SOLO))
                return Own.REPLAYING
            if f.replay_retry_ms is not None and self.ctrl.now_ms >= f.replay_retry_ms and not f.replay_left:
                return self._start_replay(f)
            self._write_record(f, self._renewal(f, rec, rec.generation, R.LunState.CLAIMED))
            return Own.REPLAYING
        self._note("takeover_abandoned", lun=f.lun, reason="claimed over during the replay")
        return self._fenced(f, rec)

    def _replay_written(self, f):
        if f.pending_write.state == R.LunState.SOLO:
            # Serve only on a read begun lease_ms after our SOLO landed, still showing it, as after
            # a solo bump (firmware/ha/fencing.py step 3): a claim decided on our CLAIMED record just
            # before lands within lease_ms, and then fences us before we wrote anything through
            # that its replay of older held lines would overwrite (seed 700558 at 300 steps: a
            # slow claim landed after our SOLO and replayed write 14 over our write-through 154).
            if f.solo_after_ms is None:
                f.solo_after_ms = f.renew_due_ms = self.ctrl.now_ms + self.params.lease_ms
            return None
        if f.replay_complete:             # a renewal of the claim landed after the replay ended
            self._read_record(f)
        return None

    def _replay_block(self, f, index, block):
        self._replay_run(f, index, None, self.mirror.segment.data(index), block.lba, block.bitmap, block)

    def _replay_run(self, f, index, line, view, lba, bitmap, block=None):
        from ..cache import dirty_runs, SECTOR_BYTES
        runs = list(dirty_runs(bitmap, 0, self.mirror.sectors_per_line))
        op = self.ctrl._disk_op(ReplayOp(f.lun, index, len(runs), line, block))
        f.replay_left += 1
        base = lba * SECTOR_BYTES
        for s, e in runs:
            self._act(A.DiskWrite(op, f.lun, base + s * SECTOR_BYTES,
                                  view[s * SECTOR_BYTES:e * SECTOR_BYTES]))

    def _replay_done(self, entry, error):
        """A replay write completed: the block waits for the flush that ends the round before it
        leaves the mirror (freed on a completed write alone, a power cut of the disk's cache
        lost it with the only other copy gone)."""
        f = self.fence[entry.lun]
        if error:
            lba = entry.line.lba if entry.line is not None else self.mirror.blocks[entry.index].lba
            self.ctrl._disk_write_failed(f.lun, lba * SECTOR_BYTES, error)    # reported coalesced
            f.replay_failed = True
        else:
            f.replay_written.append(entry)
        f.replay_left -= 1
        if f.replay_left == 0:
            written, f.replay_written = f.replay_written, []
            if written:
                self.ctrl._after_flush(f.lun, ReplayRound(f.lun, written))
            else:
                self._replay_round_end(f)

    def _replay_durable(self, rnd, error):
        """The flush after a replay round: free what it made durable, or replay it all again."""
        f = self.fence[rnd.lun]
        if error:
            self.ctrl._disk_write_failed(f.lun, None, error)     # the flush failed: reported coalesced
            f.replay_failed = True
        else:
            for entry in rnd.entries:
                if entry.line is not None:
                    if entry.line in f.held_lines:
                        f.held_lines.remove(entry.line)
                        self.ctrl._forget_lines([entry.line], True)
                elif self.mirror.blocks[entry.index] is entry.block:   # not overwritten since
                    self.ctrl._persist(self.mirror._free(entry.index))
        self._replay_round_end(f)

    def _replay_round_end(self, f):
        if f.state == Own.REPLAYING and not f.replay_left:
            if f.replay_failed:     # the next round waits for the disk's backoff too
                f.replay_retry_ms = max(self.ctrl.now_ms + REPLAY_RETRY_MS,
                                        self.disk_health.retry_at_ms(f.lun))
            else:
                self._own_event(f, "replayed")

    def _replayed(self, f):
        """The replay is done: publish it (the record goes from CLAIMED to SOLO) before serving.
        A claimant that served while its record still said CLAIMED let its partner take the
        record for a claim that had served nothing and keep an older mirror copy, which that
        partner's own takeover then replayed over the served writes (seed 10302 at 300 steps).
        The SOLO record follows a fresh read, like every renewal."""
        f.replay_complete = True
        f.replayed_generation = f.generation
        self._read_record(f)              # in flight already: its completion leads here again
        return Own.REPLAYING

    def _takeover_done(self, f):
        self._note("takeover", lun=f.lun, generation=f.generation)
        f.renew_due_ms = self.ctrl.now_ms + self.params.renew_interval_ms
        if self.link.up and self.ctrl.mirroring:      # the partner came back meanwhile: settle with it
            self.ctrl._mirroring_event("takeover")     # firmware/mirrorsync.py: resending
            self._read_record(f)
            return Own.STARTING
        return Own.SOLO
