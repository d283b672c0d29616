"""An in-memory log-shipping rig: sources and one destination, unchanged firmware, in one process.

Used by the firmware tests (through fixtures/memlog.py) and by the replica-mode
simulator (hal/sim_log.py), which adds the fault schedule and the checkers.

NVRAM and disks are bytearrays, each link is two queues of whole frames,
disk I/O completes at once (or parks while `stall` is set, like a hung
disk). Firmware tests of replica mode's NVRAM-log variant drive exact
sequences with it: crash and restart of either end, link cuts, torn entries.
"""
import collections

from firmware import actions as A
from firmware.controller import Params, format_nvram, nvram_is_blank
from firmware.formats import frame as F
from firmware.logship import DEST_ID, SOURCE_ID, FeedParams, LogDestination, LogParams, LogSource

KEY = bytes(range(32))
SECTOR = 512


def pair_id(k):
    return bytes([0x70 + k]) * 16


class MemLog:
    """sources[k] is a LogSource with its own volume (LUN disks); the destination holds, per
    source, image disks and a journal disk."""

    def __init__(self, sources=1, luns=2, lun_size=1 << 20, nvram_size=2 << 20, journal_bytes=4 << 20,
                 cp_interval_ms=10**9, log_partition_bytes=None, broken=None):
        self.n = sources
        self.luns = luns
        self.lun_size = lun_size
        self.journal_bytes = journal_bytes
        self.now_ms = 0
        self.src_nv = [bytearray(nvram_size) for _ in range(sources)]
        self.dst_nv = bytearray(nvram_size)
        self.src_disks = [[bytearray(lun_size) for _ in range(luns)] for _ in range(sources)]
        self.dst_disks = []
        self.feeds = []
        for k in range(sources):
            images = list(range(len(self.dst_disks), len(self.dst_disks) + luns))
            self.dst_disks += [bytearray(lun_size) for _ in range(luns)]
            self.dst_disks.append(bytearray(journal_bytes))
            self.feeds.append(FeedParams(k, pair_id(k), KEY, [lun_size] * luns, images, images[-1] + 1,
                                         journal_bytes, partition=k, name=f"s{k}"))
        buggify = (lambda site: site == broken) if broken else None
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
        for k in range(sources):
            self.boot_source(k)
        self.boot_destination()

    def _format(self, nv, controller_id, pid):
        if nvram_is_blank(memoryview(nv)):
            from firmware.formats import nvram as N
            fields = N.plan_layout(len(nv), 4096, controller_id, pid,
                                   log_partition_bytes=self.log_partition_bytes)
            nv[0:256] = N.build_superblock(fields)

    def boot_source(self, k):
        self._format(self.src_nv[k], SOURCE_ID, pair_id(k))
        self.src[k] = LogSource(self.params[k], memoryview(self.src_nv[k]), KEY, self.now_ms)
        self.run(("src", k), self.src[k].start())

    def boot_destination(self):
        self._format(self.dst_nv, DEST_ID, bytes(16))
        self.dst = LogDestination(LogParams(bytes(16), [], buggify=self.params[0].buggify), self.feeds, memoryview(self.dst_nv), self.now_ms)
        self.run(("dst", None), self.dst.start())

    def crash_source(self, k):
        self._settle_parked(("src", k))
        self.src[k] = None
        self._cut(k)

    def crash_destination(self):
        self._settle_parked(("dst", None))
        self.dst = None
        for k in range(self.n):
            self._cut(k)

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
        done = collections.deque()
        self._run(who, actions, done)
        while done:
            ctrl = self._ctrl(who)
            if ctrl is None:
                return
            self._run(who, ctrl.disk_done(*done.popleft()), done)

    def _run(self, who, actions, done):
        side, k = who
        disks = self._disks(who)
        for act in actions:
            kind = act.__class__
            if kind is A.Transmit:
                link = k if side == "src" else act.link
                if self.connected[link]:
                    wire = self.wire_to_dst[link] if side == "src" else self.wire_to_src[link]
                    wire.extend(F.split_frames(b"".join(bytes(b) for b in act.buffers)))
            elif kind is A.HostReply:
                self.replies[act.req] = (act.error, bytes(act.data) if act.data is not None else None)
            elif self.stalled is not None and kind in (A.DiskWrite, A.DiskFlush, A.DiskRead):
                self.stalled.append((who, self._ctrl(who), act))
            elif kind is A.DiskRead:
                done.append((act.op, 0, bytearray(disks[act.lun][act.offset:act.offset + act.length])))
            elif kind is A.DiskWrite:
                disks[act.lun][act.offset:act.offset + len(act.data)] = act.data
                done.append((act.op, 0, None))
            elif kind is A.DiskFlush:
                done.append((act.op, 0, None))
            elif kind is A.Notify:
                self.notes[who].append((act.kind, act.fields))
            elif kind is A.LinkReset:
                self._cut(k if side == "src" else act.link)

    def _settle_parked(self, who):
        """A controller dies: its parked disk writes land now (a power cut comes after them, never
        in the middle of the next incarnation's I/O); nothing of it completes."""
        if self.stalled is None:
            return
        keep = []
        for entry in self.stalled:
            w, _ctrl, act = entry
            if w != who:
                keep.append(entry)
            elif act.__class__ is A.DiskWrite:
                self._disks(w)[act.lun][act.offset:act.offset + len(act.data)] = act.data
        self.stalled = keep

    def stall(self):
        self.stalled = []

    def unstall(self):
        stalled, self.stalled = self.stalled, None
        for who, ctrl, act in stalled:
            if self._ctrl(who) is ctrl:
                self.run(who, [act])
            elif act.__class__ is A.DiskWrite:      # its controller died: the write still lands
                disks = self._disks(who)
                disks[act.lun][act.offset:act.offset + len(act.data)] = act.data

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
