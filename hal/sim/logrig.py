"""An in-memory log-shipping rig: sources and one destination, unchanged firmware, in one process.

Used by the firmware tests (through fixtures/memlog.py) and by the replica-mode
simulator (hal/sim/log.py), which adds the fault schedule and the checkers.

Each link is two queues of whole frames, disk I/O completes at once (or
parks while `stall` is set, like a hung disk). Firmware tests of replica
mode's NVRAM-log variant drive exact sequences with it: crash and restart of
either end, link cuts, torn entries.

NVRAM and disks crash as hal/sim/voldisk.py says: a crash of an end loses
(keeps, or tears) its NVRAM stores it did not persist and its disk writes no
flush covered, decided by the rig's own random.Random(seed). `src_nv[k]` and
`dst_nv` are the NVRAMs' memory; the disks are what reads see.
"""
import collections
import random

from firmware import actions as A
from firmware.params import nvram_is_blank
from firmware.formats import frame as F
from firmware.logship.common import DEST_ID, LogParams, SOURCE_ID
from firmware.logship.destination import LogDestination
from firmware.logship.feed import FeedParams
from firmware.logship.source import LogSource

from hal.interpret import Effects, interpreter
from hal.sim.voldisk import VolatileDisk, new_nvram, power_on

KEY = bytes(range(32))
SECTOR = 512


def pair_id(k):
    return bytes([0x70 + k]) * 16


class MemLog:
    """sources[k] is a LogSource with its own volume (LUN disks); the destination holds, per
    source, image disks and a journal disk."""

    def __init__(self, sources=1, luns=2, lun_size=1 << 20, nvram_size=2 << 20, journal_bytes=4 << 20,
                 cp_interval_ms=10**9, log_partition_bytes=None, broken=None, buggify=None, seed=0):
        self.n = sources
        self.luns = luns
        self.lun_size = lun_size
        self.journal_bytes = journal_bytes
        self.now_ms = 0
        self.rng = random.Random(seed)            # crash fates only
        self.src_nvram = [new_nvram(nvram_size) for _ in range(sources)]
        self.dst_nvram = new_nvram(nvram_size)
        self.src_nv = [n.mem for n in self.src_nvram]
        self.dst_nv = self.dst_nvram.mem
        self.src_disks = [[VolatileDisk(lun_size) for _ in range(luns)] for _ in range(sources)]
        self.dst_disks = []
        self.feeds = []
        for k in range(sources):
            images = list(range(len(self.dst_disks), len(self.dst_disks) + luns))
            self.dst_disks += [VolatileDisk(lun_size) for _ in range(luns)]
            self.dst_disks.append(VolatileDisk(journal_bytes))
            self.feeds.append(FeedParams(k, pair_id(k), KEY, [lun_size] * luns, images, images[-1] + 1,
                                         journal_bytes, partition=k, name=f"s{k}"))
        if buggify is None and broken:
            buggify = lambda site: site == broken      # noqa: E731
        self.params = [LogParams(pair_id(k), [lun_size] * luns, source_id=k, cp_interval_ms=cp_interval_ms,
                                 buggify=buggify) for k in range(sources)]
        self.log_partition_bytes = log_partition_bytes
        self.src = [None] * sources
        self.dst = None
        self.wire_to_dst = [collections.deque() for _ in range(sources)]
        self.wire_to_src = [collections.deque() for _ in range(sources)]
        self.connected = [False] * sources
        self.replies = {}
        self.notes = collections.defaultdict(list)
        self.stalled = None
        self.held_flushes = None      # a list while flushes are held: (who, ctrl, op, disk, mark)
        self._ends = {}               # who -> LogEnd
        for k in range(sources):
            self.boot_source(k)
        self.boot_destination()

    def _format(self, nvram, controller_id, pid):
        power_on(nvram)
        nv = nvram.mem
        if nvram_is_blank(memoryview(nv)):
            from firmware.formats import nvram as N
            fields = N.plan_layout(len(nv), 4096, controller_id, pid,
                                   log_partition_bytes=self.log_partition_bytes)
            nv[0:256] = N.build_superblock(fields)
            nvram.persist(0, 256)

    def boot_source(self, k):
        self._format(self.src_nvram[k], SOURCE_ID, pair_id(k))
        self.src[k] = LogSource(self.params[k], self.src_nvram[k].buffer, KEY, self.now_ms)
        self.run(("src", k), self.src[k].start())

    def boot_destination(self):
        self._format(self.dst_nvram, DEST_ID, bytes(16))
        self.dst = LogDestination(LogParams(bytes(16), [], buggify=self.params[0].buggify), self.feeds,
                                  self.dst_nvram.buffer, self.now_ms)
        self.run(("dst", None), self.dst.start())

    def crash_source(self, k, worst=False, power=True):
        """Source k loses power: its parked I/O, unpersisted NVRAM stores and unflushed disk writes
        meet their fate (worst: every store and write that can be lost is). power=False: only its
        process dies (a kill); NVRAM and the disks' caches keep everything until a power cut."""
        self._settle_parked(("src", k))
        self.src[k] = None
        if power:
            self.power_cut(("src", k), worst)
        self._cut(k)

    def crash_destination(self, worst=False, power=True):
        self._settle_parked(("dst", None))
        self.dst = None
        if power:
            self.power_cut(("dst", None), worst)
        for k in range(self.n):
            self._cut(k)

    def power_cut(self, who, worst=False):
        """The power of ("src", k) or ("dst", None) goes (its process is dead already, or dies now)."""
        assert self._ctrl(who) is None
        side, k = who
        nvram = self.src_nvram[k] if side == "src" else self.dst_nvram
        nvram.crash(self.rng, *((0.0, 1.0) if worst else ()))
        for disk in self._disks(who):
            disk.crash(who, self.rng, worst)

    def _cut(self, k):
        self.wire_to_dst[k].clear()
        self.wire_to_src[k].clear()
        self.connected[k] = False
        if self.src[k] is not None and self.src[k].link.state != "down":
            self.run(("src", k), self.src[k].link_disconnected("cut"))
        if self.dst is not None and self.dst.feeds[k].link.state != "down":
            self.run(("dst", None), self.dst.link_disconnected("cut", link=k))

    def cut(self, k=0):
        self._cut(k)

    def connect(self, k=0):
        self.wire_to_dst[k].clear()         # a new connection: nothing of the old one arrives on it
        self.wire_to_src[k].clear()
        self.connected[k] = True
        self.run(("src", k), self.src[k].link_connected(bytes([1]) * 32, self.now_ms))
        self.run(("dst", None), self.dst.link_connected(bytes([2]) * 32, self.now_ms, link=k))
        self.deliver()

    def _ctrl(self, who):
        side, k = who
        return self.src[k] if side == "src" else self.dst

    def _disks(self, who):
        side, k = who
        return self.src_disks[k] if side == "src" else self.dst_disks

    def run(self, who, actions):
        end = self._ends.get(who)
        if end is None:
            end = self._ends[who] = LogEnd(self, who)
        done, outer = collections.deque(), end.done
        end.done = done
        try:
            end.execute(actions)
            while done:
                ctrl = self._ctrl(who)
                if ctrl is None:
                    return
                end.execute(ctrl.disk_done(*done.popleft()))
        finally:
            end.done = outer

    def _settle_parked(self, who):
        """A controller dies: its parked disk writes reach the disk's cache now (the power cut then
        decides their fate, never in the middle of the next incarnation's I/O); nothing of it
        completes, and its parked flushes never happen."""
        if self.stalled is None:
            return
        keep = []
        for entry in self.stalled:
            w, _ctrl, act, _mark = entry
            if w != who:
                keep.append(entry)
            elif act.__class__ is A.DiskWrite:
                self._disks(w)[act.lun].write(w, act.offset, act.data)
        self.stalled = keep

    def hold_flushes(self):
        """Disk flushes from now on neither complete nor make anything durable until release_flushes()
        (writes and reads go on)."""
        self.held_flushes = []

    def release_flushes(self):
        held, self.held_flushes = self.held_flushes, None
        for who, ctrl, op, disk, mark in held:
            if self._ctrl(who) is ctrl:     # a crashed controller's flush never completes
                disk.flush_done(mark)
                self.run(who, ctrl.disk_done(op, 0, None))

    def stall(self):
        self.stalled = []

    def unstall(self):
        stalled, self.stalled = self.stalled, None
        for who, ctrl, act, mark in stalled:
            if self._ctrl(who) is not ctrl:         # its controller died: _settle_parked saw to it
                continue
            if act.__class__ is A.DiskFlush:
                self._disks(who)[act.lun].flush_done(mark)
                self.run(who, ctrl.disk_done(act.op, 0, None))
            else:
                self.run(who, [act])

    def deliver(self, limit=1_000_000):
        while limit and any(self.wire_to_dst[k] or self.wire_to_src[k] for k in range(self.n)):
            for k in range(self.n):
                if self.wire_to_dst[k] and self.dst is not None:
                    self.run(("dst", None), self.dst.link_frame(self.wire_to_dst[k].popleft(), self.now_ms, link=k))
                    limit -= 1
                if self.wire_to_src[k] and self.src[k] is not None:
                    self.run(("src", k), self.src[k].link_frame(self.wire_to_src[k].popleft(), self.now_ms))
                    limit -= 1

    def tick(self, ms=10):
        self.now_ms += ms
        for k in range(self.n):
            if self.src[k] is not None:
                self.run(("src", k), self.src[k].tick(self.now_ms))
        if self.dst is not None:
            self.run(("dst", None), self.dst.tick(self.now_ms))
        self.deliver()

    def write(self, k, req, lun, offset, data):
        self.run(("src", k), self.src[k].host_write(req, lun, offset, data))
        self.deliver()

    def read(self, k, req, lun, offset, length):
        self.run(("src", k), self.src[k].host_read(req, lun, offset, length))
        return self.replies[req]

    def recover(self, name=None):
        self.run(("dst", None), self.dst.recover(name))

    def image(self, k, lun):
        return bytes(self.dst_disks[self.feeds[k].image_disks[lun]])

    def volume(self, k, lun):
        return bytes(self.src_disks[k][lun])

    def kinds(self, who):
        return [kind for kind, _ in self.notes[who]]


class LogEnd(Effects):
    """What one end's actions do in the rig: `who` is ("src", k) or ("dst", None). The log
    variant has no reservation records: asked for one, the base class refuses it."""

    def __init__(self, rig, who):
        self.rig, self.who_is = rig, who
        self.side, self.k = who
        self.who = f"{self.side} {self.k}"
        self.disks = rig._disks(who)
        self.nvram = rig.src_nvram[self.k] if self.side == "src" else rig.dst_nvram
        self.done = None                    # the completions of the run going on
        self.execute = interpreter(self)

    def persist(self, act):
        self.nvram.persist(act.offset, act.length)

    def transmit(self, act):
        rig = self.rig
        link = self.k if self.side == "src" else act.link
        if rig.connected[link]:
            wire = rig.wire_to_dst[link] if self.side == "src" else rig.wire_to_src[link]
            wire.extend(F.split_frames(b"".join(bytes(b) for b in act.buffers)))

    def host_reply(self, act):
        self.rig.replies[act.req] = (act.error, bytes(act.data) if act.data is not None else None)

    def _parked(self, act):
        """A hung disk: a flush covers the writes completed when it is issued, not when the disk resumes."""
        rig = self.rig
        if rig.stalled is None:
            return False
        mark = self.disks[act.lun].flush_mark() if act.__class__ is A.DiskFlush else None
        rig.stalled.append((self.who_is, rig._ctrl(self.who_is), act, mark))
        return True

    def disk_read(self, act):
        if not self._parked(act):
            self.done.append((act.op, 0, bytearray(self.disks[act.lun][act.offset:act.offset + act.length])))

    def disk_write(self, act):
        if not self._parked(act):
            self.disks[act.lun].write(self.who_is, act.offset, act.data)
            self.done.append((act.op, 0, None))

    def disk_flush(self, act):
        if self._parked(act):
            return
        rig, disk = self.rig, self.disks[act.lun]
        if rig.held_flushes is not None:
            rig.held_flushes.append((self.who_is, rig._ctrl(self.who_is), act.op, disk, disk.flush_mark()))
            return
        disk.flush_done(disk.flush_mark())
        self.done.append((act.op, 0, None))

    def notify(self, act):
        self.rig.notes[self.who_is].append((act.kind, act.fields))

    def link_reset(self, act):
        self.rig._cut(self.k if self.side == "src" else act.link)
