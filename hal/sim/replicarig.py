"""An in-memory replica pair: two ReplicaControllers, each with its own disks.

Like fixtures/mempair.py (a link of two frame queues, disk I/O completing at
once), but in replica mode: every controller owns its disks. uuids come from
a seeded counter per controller and boot, so runs repeat exactly. Used by the
firmware tests (fixtures/mem_replica.py) and the bitmap-variant simulator
(hal/sim/replica.py).

NVRAM and disks crash as hal/sim/voldisk.py says: `crash(i)` loses (keeps,
or tears) controller i's NVRAM stores it did not persist and its disk writes
no flush covered, decided by the rig's own random.Random(seed). `nv[i]` is
the NVRAM's memory; `disks[i][lun]` what reads see.
"""
import collections
import random

from firmware import actions as A
from firmware.params import Params
from firmware.replica.controller import ReplicaController, ReplicaSettings
from firmware.formats.frame import split_frames as _split

from hal.interpret import Effects, interpreter
from hal.sim.rig import PairRig
from hal.sim.voldisk import VolatileDisk, new_nvram

PAIR_ID = bytes.fromhex("0123456789abcdef0123456789abcdef")


def split_frames(buffers):
    return _split(b"".join(bytes(b) for b in buffers))


class MemReplicaPair(PairRig):
    controller_class = ReplicaController

    def __init__(self, luns=2, lun_size=1 << 20, nvram_size=4 << 20, block_size=4096, ack="cache",
                 range_bytes=64 << 10, auto_promote_after_ms=0, resync_rate_bytes_s=0, seed=0, **params):
        self.lun_size = lun_size
        self.rng = random.Random(seed)            # crash fates only
        self.nvram = [new_nvram(nvram_size) for _ in range(2)]
        self.nv = [n.mem for n in self.nvram]
        self.disks = [[VolatileDisk(lun_size) for _ in range(luns)] for _ in range(2)]
        self.boots = [0, 0]
        self.uuid_counter = [0, 0]
        self.settings = dict(ack=ack, range_bytes=range_bytes, auto_promote_after_ms=auto_promote_after_ms,
                             resync_rate_bytes_s=resync_rate_bytes_s)
        self.params = [self._params(i, luns, lun_size, block_size, params) for i in range(2)]
        self.ctrl = [None, None]
        self.wire = [collections.deque(), collections.deque()]
        self.replies = {}
        self.notes = [[], []]
        self.now_ms = 0
        self.disk_writes = [0, 0]
        self.held_flushes = None          # a list while flushes are held: (i, ctrl, op, disk, mark)
        self.stalled = None               # a list while the disks hang: (i, ctrl, act, flush mark)
        self.stalled_sides = (0, 1)       # whose disks hang
        self.sides = [ReplicaSide(self, i) for i in range(2)]
        for i in range(2):
            self.boot(i)

    def _params(self, i, luns, lun_size, block_size, params):
        def new_uuid():
            self.uuid_counter[i] += 1
            return (0xA0 + i) << 56 | self.boots[i] << 32 | self.uuid_counter[i]
        settings = ReplicaSettings(new_uuid, **self.settings)
        params = dict(dict(batch_link_output=True), **params)      # production's setting
        return Params(i, PAIR_ID, [lun_size] * luns, mode="replica", block_size_bytes=block_size,
                      replica=settings, **params)

    def boot(self, i):
        self.boots[i] += 1                  # new generation identifiers name the boot
        super().boot(i)

    def crash(self, i, worst=False, power=True):
        """Controller i loses power: unpersisted NVRAM stores and unflushed disk writes meet their
        fate (worst: all of them are lost). power=False: only its process dies (a kill); NVRAM and
        the disks' caches keep everything, and a later power cut decides it."""
        self._settle_parked(i)
        self.ctrl[i] = None
        if power:
            self.power_cut(i, worst)
        self.wire[0].clear()
        self.wire[1].clear()
        if self.ctrl[1 - i] is not None and self.ctrl[1 - i].link.state != "down":
            self.run(1 - i, self.ctrl[1 - i].link_disconnected("peer crashed"))

    def power_cut(self, i, worst=False):
        """The power of controller i goes (its process is dead already, or dies now)."""
        assert self.ctrl[i] is None
        self.nvram[i].crash(self.rng, *((0.0, 1.0) if worst else ()))
        for disk in self.disks[i]:
            disk.crash(i, self.rng, worst)

    def stall(self, sides=(0, 1)):
        """The disks of `sides` hang: reads, writes and flushes park, unanswered, until unstall()."""
        self.stalled, self.stalled_sides = [], tuple(sides)

    def unstall(self):
        stalled, self.stalled = self.stalled, None
        for i, ctrl, act, mark in stalled:
            if self.ctrl[i] is not ctrl:            # its controller died: _settle_parked saw to it
                continue
            if act.__class__ is A.DiskFlush:
                self.disks[i][act.lun].flush_done(mark)
                self.run(i, ctrl.disk_done(act.op, 0, None))
            else:
                self.run(i, [act])

    def _settle_parked(self, i):
        """Controller i dies: its parked writes reach the disk's cache (the power cut, if any, then
        decides their fate); none completes, and its parked flushes never happen."""
        if self.stalled is None:
            return
        keep = []
        for entry in self.stalled:
            j, _ctrl, act, _mark = entry
            if j != i:
                keep.append(entry)
            elif act.__class__ is A.DiskWrite:
                self.disks[i][act.lun].write(i, act.offset, act.data)
        self.stalled = keep

    def hold_flushes(self):
        """Disk flushes from now on neither complete nor make anything durable until release_flushes()."""
        self.held_flushes = []

    def release_flushes(self):
        held, self.held_flushes = self.held_flushes, None
        for i, ctrl, op, disk, mark in held:
            if self.ctrl[i] is ctrl:        # a crashed controller's flush never completes
                disk.flush_done(mark)
                self.run(i, ctrl.disk_done(op, 0, None))

    def connect(self):
        for i in range(2):
            if self.ctrl[i].link.state != "down":
                self.run(i, self.ctrl[i].link_disconnected("reconnect"))
        self.wire[0].clear()                  # a new connection: nothing of the old one arrives
        self.wire[1].clear()
        for i in range(2):
            self.run(i, self.ctrl[i].link_connected(bytes([i + 1]) * 32, self.now_ms))
        self.deliver()

    def settle(self, ms=2000):
        """Let both destage everything (idle flush) and the record messages flow."""
        self.tick(100, steps=ms // 100)

    def events(self, i, kind):
        return [f for k, f in self.notes[i] if k == kind]

    def state(self, i):
        return self.ctrl[i].sync


class ReplicaSide(Effects):
    """What controller i's actions do in the rig: its own NVRAM and disks, a queue to the peer.
    Replica mode has no reservation records: asked for one, the base class refuses it."""

    def __init__(self, rig, i):
        self.rig, self.i = rig, i
        self.who = f"controller {'ab'[i]}"
        self.done = None                    # the completions of the run going on
        self.execute = interpreter(self)

    def persist(self, act):
        self.rig.nvram[self.i].persist(act.offset, act.length)

    def transmit(self, act):
        self.rig.wire[1 - self.i].extend(split_frames(act.buffers))

    def host_reply(self, act):
        self.rig.replies[act.req] = (act.error, bytes(act.data) if act.data is not None else None)

    def _parked(self, act):
        """The disks of a stalled side hang: the write's data is taken now (DMA); a flush covers
        what completed before it."""
        rig, i = self.rig, self.i
        if rig.stalled is None or i not in rig.stalled_sides:
            return False
        mark = rig.disks[i][act.lun].flush_mark() if act.__class__ is A.DiskFlush else None
        if act.__class__ is A.DiskWrite:
            act = A.DiskWrite(act.op, act.lun, act.offset, bytes(act.data))
        rig.stalled.append((i, rig.ctrl[i], act, mark))
        return True

    def disk_read(self, act):
        if not self._parked(act):
            disk = self.rig.disks[self.i][act.lun]
            self.done.append((act.op, 0, bytearray(disk[act.offset:act.offset + act.length])))

    def disk_write(self, act):
        if not self._parked(act):
            rig, i = self.rig, self.i
            rig.disks[i][act.lun].write(i, act.offset, act.data)
            rig.disk_writes[i] += 1
            self.done.append((act.op, 0, None))

    def disk_flush(self, act):
        if self._parked(act):
            return
        rig, i = self.rig, self.i
        disk = rig.disks[i][act.lun]
        if rig.held_flushes is not None:
            rig.held_flushes.append((i, rig.ctrl[i], act.op, disk, disk.flush_mark()))
            return
        disk.flush_done(disk.flush_mark())
        self.done.append((act.op, 0, None))

    def notify(self, act):
        self.rig.notes[self.i].append((act.kind, act.fields))

    def link_reset(self, act):
        self.rig.disconnect()
