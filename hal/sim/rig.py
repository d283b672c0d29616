"""What the two-controller in-memory rigs share: fixtures/mempair.py (ha mode) and
hal/sim/replicarig.py (replica mode, bitmap variant).

The link is two queues of whole frames and disk I/O completes at once. A rig whose
controllers batch their link output (the replica rig, as production) ends each turn
with flush_link(). Each controller's
actions go through its side's Effects (hal/interpret.py); a side collects the disk
completions of the run going on, and they are fed back after the whole list, in order.
A subclass sets `controller_class`, `nvram`, `params`, `ctrl`, `wire`, `sides`, `replies` and
`now_ms`.
"""
import collections

from firmware.params import format_nvram, nvram_is_blank

from hal.sim.voldisk import power_on

KEY = bytes(range(32))                  # the pair key both rigs' controllers share


class PairRig:
    controller_class = None             # the subclass's: Controller or ReplicaController

    def boot(self, i):
        """Controller i powers on: its NVRAM as the last power cut left it (formatted if blank)."""
        nvram = self.nvram[i]
        power_on(nvram)
        nv = nvram.buffer
        if nvram_is_blank(nv):
            for offset, length in format_nvram(nv, self.params[i]):
                nvram.persist(offset, length)
        self.ctrl[i] = self.controller_class(self.params[i], nv, KEY, self.now_ms)
        self.wire[i].clear()
        self.run(i, self.ctrl[i].start())

    def run(self, i, actions):
        """Carry out actions in order; disk completions are fed back after the whole list. With
        batched link output (production's setting) the outermost run ends the loop turn as the
        runtime does: flush_link() hands over the turn's frames and starts its destage flushes."""
        side = self.sides[i]
        done, outer = collections.deque(), side.done
        side.done = done
        try:
            side.execute(actions)
            while True:
                while done:
                    ctrl = self.ctrl[i]
                    if ctrl is None:
                        return
                    side.execute(ctrl.disk_done(*done.popleft()))
                ctrl = self.ctrl[i]
                if outer is not None or ctrl is None or not ctrl.params.batch_link_output:
                    return
                side.execute(ctrl.flush_link())
                if not done:
                    return
        finally:
            side.done = outer

    def disconnect(self):
        self.wire[0].clear()
        self.wire[1].clear()
        for i in range(2):
            if self.ctrl[i] is not None and self.ctrl[i].link.state != "down":
                self.run(i, self.ctrl[i].link_disconnected("cut"))

    def deliver(self, limit=1_000_000):
        while (self.wire[0] or self.wire[1]) and limit:
            for i in range(2):
                if self.wire[i] and self.ctrl[i] is not None:
                    self.run(i, self.ctrl[i].link_frame(self.wire[i].popleft(), self.now_ms))
                    limit -= 1

    def write(self, i, req, lun, offset, data, fua=False):
        self.run(i, self.ctrl[i].host_write(req, lun, offset, data, fua))

    def read(self, i, req, lun, offset, length):
        self.run(i, self.ctrl[i].host_read(req, lun, offset, length))
        return self.replies.get(req)

    def tick(self, ms, steps=1):
        for _ in range(steps):
            self.now_ms += ms
            for i in range(2):
                if self.ctrl[i] is not None:
                    self.run(i, self.ctrl[i].tick(self.now_ms))
            self.deliver()
