"""What a simulated controller's actions do: hal/interpret.py's Effects for the simulator.

Each action goes into the simulator's virtual world (hal/sim/ha.py): NVRAM
persists, link bytes on the simulated wire, disk and record I/O submitted to
the simulated disks and landing later, host replies to the workload's model,
notes to the fault schedule and the rule checks. DiskExtents is not carried
out: the simulated hosts never ask for block status.
"""
from firmware.ha.ownership import Own, SERVING

from hal.interpret import Effects
from hal.sim.check import SimFailure


class NodeEffects(Effects):
    def __init__(self, sim, i):
        self.sim, self.i = sim, i
        self.who = f"controller {'ab'[i]}"

    def persist(self, act):
        self.sim.nodes[self.i].nvram.persist(act.offset, act.length)

    def transmit(self, act):
        sim, i = self.sim, self.i
        if sim.nodes[i].conn != sim.link.conn:
            return                          # its session's connection is gone: the socket is closed
        for t, dst, conn, chunk in sim.link.transmit(i, act.buffers, sim.now_us):
            sim.at(t, dst, sim._deliver, dst, conn, chunk)

    def host_reply(self, act):
        self.sim._host_reply(self.i, act)

    def disk_read(self, act):
        self.sim._disk_io(self.i, self.sim.nodes[self.i], act, False)

    def disk_write(self, act):
        self.sim._disk_io(self.i, self.sim.nodes[self.i], act, True)

    def disk_flush(self, act):
        """Makes this controller's writes that completed before it durable."""
        sim, i = self.sim, self.i
        io, latency_us = sim.disks.submit_flush(i, sim.nodes[i].epoch, act)
        sim.at(sim.now_us + latency_us, -1, sim._disk_land, i, io)

    def record_read(self, act):
        self._record_io(act, False)

    def record_write(self, act):
        sim, i = self.sim, self.i
        sim._check_quiet_claim(i, sim.nodes[i].ctrl, act)
        self._record_io(act, True)

    def _record_io(self, act, write):
        sim, i = self.sim, self.i
        io, latency_us = sim.disks.submit_record(i, sim.nodes[i].epoch, act, write)
        sim.at(sim.now_us + latency_us, -1, sim._disk_land, i, io)
        sim.faults.record_io(i, act.lun)    # a pause right after the submission

    def link_reset(self, act):
        self.sim._link_reset(self.i, act.reason)

    def notify(self, act):
        sim, i, kind = self.sim, self.i, act.kind
        sim.notes[kind] = sim.notes.get(kind, 0) + 1
        if kind == "ownership_state":
            fields = act.fields
            old, new = fields["old"], fields["new"]
            if new in SERVING and sim.split is not None:
                sim._began_serving(i, sim.nodes[i].ctrl, fields)
            if old == Own.CLAIMING and new == Own.REPLAYING:
                sim._check_claim_settled(i, sim.nodes[i].ctrl, fields["lun"])
            if new in (Own.CLAIMING, Own.REPLAYING):
                sim.faults.claim_began(i)
            elif new == Own.WATCHING:
                sim.faults.began_watching(i)
        elif kind == "solo":
            sim.faults.went_solo(i)
        elif kind == "link_down" and sim.nodes[i].ctrl.stats["ownership_protocol_errors"]:
            # Both peers here are honest firmware: an ownership message its receiver's state
            # refuses is a bug of the protocol, not a fault (a reset hides it: both go solo).
            raise SimFailure(f"{self.who}: {act.fields['reason']}")
