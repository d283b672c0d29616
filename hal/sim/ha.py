"""The deterministic simulator: two unchanged Controllers, hosts and faults on virtual time.

Owns the scheduler: one event queue ordered by (virtual time, sequence),
driven from one root seed; every component gets its own random.Random
seeded from it, so a seed replays byte for byte (the trace hash proves it).
Events belong to a controller incarnation (a crash bumps its epoch and its
pending events die) and wait while their controller is paused. Actions are
carried out in order; disk completions come back later as events, never
inside the list that asked for them.

The fault schedule and the final phase live in hal/sim/faults.py, the
checkers in hal/sim/check.py, the hosts in hal/sim/workload.py. A failing run
raises nothing: `run()` returns a SimResult whose `replay` is the command
that reproduces it (`inv sim --seed N --mode ha --steps K`).

Fencing (the default, `fencing=True`): ownership moves at runtime (takeover,
failback, `move_lun`), decided by the reservation records that live on the
simulated shared disks (hal/sim/disk.py); the scheduler carries out
RecordRead/RecordWrite like disk I/O and calls `set_time` before every event
it hands a controller, on that controller's own monotonic clock (a random
offset per boot: controllers never share a clock). Disk I/O lands on the disk
at its completion time even while its controller is paused; only the news
of it waits for the controller to resume (SIGSTOP stops the process, not the
disk). No split brain is judged by `SplitBrain` (hal/sim/check.py), fed with
every serving act, including every tick a LUN spends OWNER or SOLO under a
valid lease; step 2 of the fencing argument (a claim only on a record quiet
for takeover_wait_ms) is judged on the shared record as claims are written.
The fault plans aimed at fencing (hal/sim/faults.py) hook in here: pauses at
record I/O, crashes inside a claim, scenarios placed at a LUN going solo or
beginning to watch.
`fencing=False` runs the test-only static ownership (lun % 2, hal/sim/static.py), and its
split-brain check sees every serving act through the same hook.
"""
import functools
import hashlib
import heapq
import random

from firmware.cache import LUN_SHIFT, SECTOR_BYTES
from firmware.params import Params, format_nvram, nvram_is_blank
from firmware.ha.ownership import OWNING, Own
from firmware.formats import FormatError
from firmware.formats import reservation as R
from firmware.requests import Forwarded

import hal.sim.check as C
from hal.sim.check import Model, SimFailure, SimResult, SplitBrain
from hal.sim.clock import VirtualClock
from hal.interpret import interpreter
from hal.sim.disk import DiskFaults, SimDiskArray
from hal.sim.effects import NodeEffects
from hal.sim.faults import FENCE_SITES, FaultPlan, FaultSchedule
from hal.sim.link import LinkFaults, SimLink
from hal.sim.nvram import SimNvram
from hal.sim.static import controller_class
from hal.sim.workload import Req, Workload

KEY = bytes(range(32))
PAIR_ID = bytes.fromhex("5151c0de5151c0de5151c0de5151c0de")
TICK_US = 10_000
LUNS = 4
LUN_BYTES = 512 * 1024
NVRAM_BYTES = 2 << 20
# Deliberately broken firmware variants (buggify sites in firmware/controller.py and
# firmware/ha/fencing.py) the checkers must catch: tests/test_sim.py asserts each is caught
# within a few seeds. The fencing sites only exist with fencing on.
BROKEN_SITES = ("ack_before_mirror", "skip_pen_validation", "skip_persist_metadata",
                "read_skip_cache", "destage_no_flush") + FENCE_SITES


class Node:
    __slots__ = ("id", "nvram", "ctrl", "epoch", "alive", "paused_until_us", "down_since_us", "conn",
                 "clock_offset_ms", "owned_at_crash")

    def __init__(self, id):
        self.id = id
        self.nvram = SimNvram(NVRAM_BYTES)
        self.ctrl = None
        self.epoch = 0
        self.alive = False
        self.paused_until_us = 0
        self.down_since_us = 0
        self.conn = -1                     # the link connection this controller's session runs on
        self.clock_offset_ms = 0           # this incarnation's monotonic clock = virtual time + offset
        self.owned_at_crash = {}           # lun -> generation it served when it went down


class Sim:
    def __init__(self, seed, mode="ha", steps=300, broken=None, overrides=None, fencing=True, batched=True):
        if mode != "ha":
            raise ValueError(f"mode {mode!r}: this simulator runs ha mode; replica mode (the NVRAM-log "
                             f"variant) runs in hal/sim/log.py")
        assert broken is None or broken in BROKEN_SITES, broken
        assert fencing or broken not in FENCE_SITES, f"{broken} needs fencing on"
        self.seed, self.mode, self.steps, self.broken = seed, mode, steps, broken
        self.fencing = fencing
        self.batched = batched
        self.unflushed = set()             # controllers handed an event since their last flush_link
        root = random.Random(seed)
        self.rng = {name: random.Random(root.getrandbits(64))
                    for name in ("plan", "sched", "nvram", "disk", "link", "work", "fault", "buggify", "fence")}
        self.plan = FaultPlan(self.rng["plan"], broken, fencing)
        for name, value in (overrides or {}).items():     # scenario tests pin knobs and faults
            assert hasattr(self.plan, name), name
            setattr(self.plan, name, value)
        self.clock = VirtualClock()
        self.queue = []
        self.seq = 0
        self.trace = hashlib.blake2b(digest_size=16)
        self.events = 0
        self.lun_sizes = [LUN_BYTES] * LUNS
        self.model = Model()
        self.workload = Workload(self.rng["work"], self.lun_sizes, self.model,
                                 clients=self.plan.clients, ops_max=steps)
        self.disks = SimDiskArray(self.lun_sizes, self.rng["disk"], DiskFaults(
            p_read_eio=self.plan.p_disk_eio, p_write_eio=self.plan.p_disk_eio))
        self.link = SimLink(self.rng["link"], self.plan.reliable, LinkFaults(
            p_drop=self.plan.p_link_loss, p_dup=self.plan.p_link_loss, p_reorder=self.plan.p_link_loss / 2,
            p_corrupt=self.plan.p_link_corrupt))
        self.split = SplitBrain(LUNS) if fencing else None
        self.record_changes = [[] for _ in range(LUNS)]    # (t_us, writer) of record writes landing
        self.disks.on_apply = self._landed if fencing else None
        self.params = [self._params(i) for i in range(2)]
        self.nodes = [Node(0), Node(1)]
        self.executors = [interpreter(NodeEffects(self, i)) for i in range(2)]
        self.notes = {}
        self.faults = FaultSchedule(self)

    def _params(self, i):
        p = self.plan
        return Params(i, PAIR_ID, self.lun_sizes, mode=self.mode, reliable_transport=p.reliable,
                      heartbeat_interval_ms=p.heartbeat_ms, heartbeat_timeout_ms=p.heartbeat_ms * 6,
                      idle_flush_ms=p.idle_flush_ms, high_watermark=p.high_watermark,
                      low_watermark=p.high_watermark / 2, destage_inflight_max=p.destage_inflight_max,
                      data_window_bytes=p.data_window_bytes, buggify=self._buggify,
                      renew_interval_ms=p.renew_ms, lease_ms=p.lease_ms, takeover_wait_ms=p.takeover_wait_ms,
                      batch_link_output=self.batched,
                      on_serve=functools.partial(self._served if self.fencing else self._served_static, i))

    def _buggify(self, site):
        """FoundationDB-style: a site enabled for this run fires with its seeded probability."""
        p = self.plan.buggify.get(site)
        return p is not None and self.rng["buggify"].random() < p

    @property
    def now_us(self):
        return self.clock.now_us

    def ms(self, i):
        """Controller i's monotonic clock, in ms (what the firmware is told)."""
        return self.clock.now_us // 1000 + self.nodes[i].clock_offset_ms

    # -- the event queue ------------------------------------------------------

    def at(self, t_us, node, fn, *args):
        """Run fn(*args) at t_us; node >= 0 ties it to that controller's incarnation."""
        epoch = self.nodes[node].epoch if node >= 0 else 0
        self.seq += 1
        heapq.heappush(self.queue, (t_us, self.seq, node, epoch, fn, args))

    def step(self):
        t, _seq, node, epoch, fn, args = heapq.heappop(self.queue)
        self.clock.advance_to(t)
        if node >= 0:
            n = self.nodes[node]
            if epoch != n.epoch:
                return
            if n.paused_until_us > t:
                # On resume a process finds everything that arrived meanwhile ready at once, in no
                # particular order: host requests may be seen before the link's EOF. Link bytes keep
                # their order (one stream).
                jitter_us = 0 if fn == self._deliver else self.rng["sched"].randint(0, 300)
                self.seq += 1
                heapq.heappush(self.queue, (n.paused_until_us + jitter_us, self.seq, node, epoch, fn, args))
                return
            if n.ctrl is not None:
                n.ctrl.set_time(t // 1000 + n.clock_offset_ms)   # leases are judged at this instant
        self.events += 1
        self.trace.update(b"%d %d %s;" % (t, node, fn.__name__.encode()))
        fn(*args)
        if self.unflushed:
            self._end_turn()

    def _end_turn(self):
        """The end of a loop turn, as the runtime has it (hal/runtime/loop.py `_flush`): a
        controller handed anything during this event sends the turn's link frames together and
        starts its batched destage flushes (batch_link_output, production's setting)."""
        for i in sorted(self.unflushed):
            ctrl = self.nodes[i].ctrl
            if ctrl is not None:
                self.executors[i](ctrl.flush_link())
        self.unflushed.clear()

    def run_until(self, done, limit_us, what):
        deadline = self.now_us + limit_us
        while not done():
            if not self.queue or self.queue[0][0] > deadline:
                raise SimFailure(f"no progress: {what} not reached within {limit_us // 1000} ms "
                                 f"of virtual time; {self.describe()}")
            self.step()

    # -- controllers ----------------------------------------------------------

    def boot(self, i):
        n = self.nodes[i]
        nv = n.nvram.buffer
        if nvram_is_blank(nv):
            for offset, length in format_nvram(nv, self.params[i]):
                n.nvram.persist(offset, length)
        n.clock_offset_ms = self.rng["sched"].randrange(1 << 30) if self.fencing else 0
        n.ctrl = controller_class(self.fencing)(self.params[i], nv, KEY, self.ms(i))
        n.alive = True
        self.execute(i, n.ctrl.start())
        self.at(self.now_us + TICK_US, i, self._tick, i)

    def _served_static(self, i, kind, req, lun):
        """Params.on_serve with static ownership: no split brain, only a LUN's owner (lun % 2)
        takes on its host I/O."""
        if lun % 2 != i:
            raise SimFailure(f"split brain: controller {'ab'[i]} served a {kind} for lun{lun}, "
                             f"owned by {'ab'[lun % 2]}")

    def _served(self, i, kind, req, lun):
        """Params.on_serve of controller i: it takes on a host request itself (hal/sim/check.py
        SplitBrain records it as a serving act at the LUN's generation)."""
        ctrl, other = self.nodes[i].ctrl, self.nodes[1 - i]
        host = req
        if req.__class__ is Forwarded:          # served here for the partner's host
            host = other.ctrl.forwarder.host_of(req.tag) if other.ctrl is not None else None
        if host.__class__ is Req:
            host.served = (i, kind)
        self.split.act(i, lun, ctrl.ownership.fence[lun].generation, self.now_us, f"{kind} {host or req}")

    def _landed(self, io, sectors):
        if io.record:
            changes = self.record_changes[io.lun]
            changes.append((self.now_us, io.ctrl))
            del changes[:-64]
            return
        if io.gen is not None:
            self.split.act(io.ctrl, io.lun, io.gen, self.now_us, f"a disk write landing at {io.offset}")

    def crash(self, i, why):
        """Controller i loses power now: in-flight disk writes and unpersisted NVRAM meet their fate."""
        n = self.nodes[i]
        assert n.alive
        if self.fencing:
            n.owned_at_crash = {f.lun: f.generation for f in n.ctrl.ownership.fence if f.state in OWNING}
        n.alive, n.ctrl, n.paused_until_us, n.down_since_us = False, None, 0, self.now_us
        n.epoch += 1
        self.disks.crash(i)
        counts = n.nvram.crash(self.rng["nvram"])
        self.trace.update(f"crash {i} {why} {sorted(counts.items())};".encode())
        for req in self.workload.node_down(i):    # the host gives up on them and goes on
            if req.client >= 0:
                self.at(self.now_us + 1_000, -1, self.client_next, req.client)
        if self.link.up:
            self.link.close()
            if self.rng["sched"].random() < 0.6:      # the OS closes the socket; a power cut does not
                self.at(self.now_us + 100, 1 - i, self._link_fin, 1 - i, self.link.conn)
            self.at(self.now_us + 50_000, -1, self.reconnect)

    def restart(self, i):
        n = self.nodes[i]
        if n.alive:
            return
        self.boot(i)
        self.check_restart(i)
        self.reconnect()

    # -- carrying out actions -------------------------------------------------

    def execute(self, i, actions):
        self.executors[i](actions)
        if self.batched:
            self.unflushed.add(i)

    def _check_quiet_claim(self, i, ctrl, act):
        """Step 2 of the argument in firmware/ha/fencing.py, judged on the shared record: a claim over
        the partner's record is decided on a read begun after the record had been quiet (no
        write of the partner landing) for takeover_wait_ms; the claimant saw every write that
        landed before its reads. A claim made again over our own late claim is not a new
        decision and is not judged."""
        rec = R.parse_record_untrusted(bytes(act.data), "claim")
        f = ctrl.ownership.fence[act.lun]
        if rec.state != R.LunState.CLAIMED or rec.counter or rec.owner != i or (
                f.claim_over_generation != rec.generation - 2):
            return
        read_us = (f.read_start_ms - self.nodes[i].clock_offset_ms) * 1000
        quiet_from_us = read_us - self.plan.takeover_wait_ms * 1000 + 1000     # ms rounding
        for t_us, writer in self.record_changes[act.lun]:
            if writer != i and quiet_from_us < t_us <= read_us:
                raise SimFailure(f"claim without the quiet time: controller {'ab'[i]} claimed lun{act.lun} "
                                 f"at {self.now_us} us on a read begun at {read_us} us, and "
                                 f"{'ab'[writer]}'s record write landed at {t_us} us")

    def _check_claim_settled(self, i, ctrl, lun):
        """Step 3 of the argument in firmware/ha/fencing.py, judged on the shared record: a claim is
        confirmed (its replay begins) on a read begun lease_ms + renew_interval_ms or more after
        the claim landed, when any lease the old owner could have granted itself has run out."""
        mine = [t_us for t_us, writer in self.record_changes[lun] if writer == i]
        if not mine:
            return
        f = ctrl.ownership.fence[lun]
        read_us = (f.read_start_ms - self.nodes[i].clock_offset_ms) * 1000
        settle_us = (self.plan.lease_ms + self.plan.renew_ms) * 1000 - 1000      # ms rounding
        landed_us = max(t for t in mine if t <= read_us) if any(t <= read_us for t in mine) else None
        if landed_us is not None and read_us - landed_us < settle_us:
            raise SimFailure(f"claim confirmed without the settle time: controller {'ab'[i]} read its "
                             f"claim of lun{lun} back at {read_us} us, {read_us - landed_us} us after it "
                             f"landed (lease + renew interval: {settle_us + 1000} us)")

    def _began_serving(self, i, ctrl, fields):
        """A LUN became OWNER or SOLO: if it holds a valid lease now, it accepts host I/O from this
        instant, a serving act, so an old owner serving afterwards is caught even if no host
        came to the new one yet. (A state entered with its lease already run out, e.g. after a
        pause, serves nothing until its next read of the record.)"""
        f = ctrl.ownership.fence[fields["lun"]]
        if f.generation == fields["generation"] and ctrl.ownership.serves(f.lun):
            self.split.act(i, f.lun, f.generation, self.now_us, f"began serving ({f.state})")

    def _disk_io(self, i, n, act, write):
        if write and not self.fencing and act.lun % 2 != i:
            raise SimFailure(f"split brain: controller {'ab'[i]} wrote the disk of lun{act.lun}")
        io, latency_us = self.disks.submit(i, n.epoch, act, write)
        if write and self.fencing:
            io.gen = n.ctrl.ownership.fence[act.lun].generation       # its fencing token, for SplitBrain
        self.at(self.now_us + latency_us, -1, self._disk_land, i, io)

    def _disk_land(self, i, io):
        """The disk finishes the I/O now, paused controller or not; the controller hears of it when it runs."""
        if io.done:
            return                          # its controller crashed: disks.crash() decided its fate
        error, data = self.disks.complete(io)
        if io.record and io.epoch == self.nodes[i].epoch:
            self.faults.record_io(i, io.lun)    # a pause right before the controller hears of it
        self.at(self.now_us, i, self._disk_done, i, io.op, error, data)

    def _disk_done(self, i, op, error, data):
        self.execute(i, self.nodes[i].ctrl.disk_done(op, error, data))

    def _tick(self, i):
        ctrl = self.nodes[i].ctrl
        self.execute(i, ctrl.tick(self.ms(i)))
        C.check_bounds(ctrl, self.disks.ios_inflight(i))
        if self.split is not None:
            self._holds_leases(i, ctrl)
        self.at(self.now_us + TICK_US, i, self._tick, i)

    def _holds_leases(self, i, ctrl):
        """Every tick a LUN spends OWNER or SOLO under a valid lease is a serving act: it would
        accept host I/O at this instant, whether or not a host comes (promise 4 is about that)."""
        for f in ctrl.ownership.fence:
            if ctrl.ownership.serves(f.lun):
                self.split.act(i, f.lun, f.generation, self.now_us, f"holds a lease ({f.state})")

    # -- the link -------------------------------------------------------------

    def _deliver(self, i, conn, chunk):
        link, ctrl = self.link, self.nodes[i].ctrl
        for frame in link.receive(i, conn, chunk):
            if link.conn != conn:
                return                      # this controller reset the connection meanwhile
            self.execute(i, ctrl.link_frame(frame, self.ms(i)))

    def _link_reset(self, i, reason):
        if not self.link.up or self.nodes[i].conn != self.link.conn:
            return                          # it closes a connection that is gone already
        self.link.close()
        self.trace.update(f"reset {i} {reason[:40]};".encode())
        if not self.link.blocked[i]:
            self.at(self.now_us + 100, 1 - i, self._link_fin, 1 - i, self.link.conn)
        self.at(self.now_us + self.rng["sched"].randint(5_000, 60_000), -1, self.reconnect)

    def _link_fin(self, i, conn):
        ctrl = self.nodes[i].ctrl
        if self.link.conn == conn and ctrl.link.state != "down":
            self.execute(i, ctrl.link_disconnected("peer closed the link"))

    def reconnect(self):
        """Connect when both controllers are up and the network lets a handshake through."""
        link = self.link
        if link.up:
            return
        if not all(n.alive for n in self.nodes) or any(link.blocked):
            self.at(self.now_us + 50_000, -1, self.reconnect)
            return
        link.connect()
        for i in range(2):
            self.at(self.now_us + 10, i, self._connected, i, link.conn)

    def _connected(self, i, conn):
        n = self.nodes[i]
        if self.link.conn != conn:
            return
        if n.ctrl.link.state != "down":     # the old socket is closed before the new one is used
            self.execute(i, n.ctrl.link_disconnected("replaced by a new connection"))
        n.conn = conn
        nonce = self.rng["sched"].getrandbits(256).to_bytes(32, "big")
        self.execute(i, n.ctrl.link_connected(nonce, self.ms(i)))

    # -- hosts ----------------------------------------------------------------

    def client_next(self, client):
        nodes = [n.id for n in self.nodes if n.alive]
        req = self.workload.issue(client, self.now_us, nodes)
        if req is None:
            if self.workload.issued < self.workload.ops_max:
                self.at(self.now_us + 20_000, -1, self.client_next, client)
            return
        self.at(self.now_us + self.rng["sched"].randint(5, 50), req.node, self._host_request, req)

    def _host_request(self, req):
        ctrl, kind = self.nodes[req.node].ctrl, req.kind
        if kind == "read":
            acts = ctrl.host_read(req, req.lun, req.offset, req.length)
        elif kind in ("write", "fua"):
            acts = ctrl.host_write(req, req.lun, req.offset, req.data, kind == "fua")
        elif kind == "zeroes":
            acts = ctrl.host_write_zeroes(req, req.lun, req.offset, req.length)
        elif kind == "trim":
            acts = ctrl.host_trim(req, req.lun, req.offset, req.length)
        else:
            acts = ctrl.host_flush(req, req.lun)
        self.execute(req.node, acts)

    def _host_reply(self, i, act):
        req = act.req
        self.trace.update(b"reply %d %d %d;" % (req.id, act.error, len(act.data or b"")))
        self.workload.replied(req, act.error, act.data, self.now_us)
        if req.rec is not None and not act.error:
            self.check_ack_mirrored(i, req)
        if req.client >= 0:
            think_us = self.rng["sched"].randint(0, self.plan.think_us)
            self.at(self.now_us + think_us, -1, self.client_next, req.client)

    # -- white-box checks -----------------------------------------------------

    def check_ack_mirrored(self, i, req):
        """A write acknowledged after its mirror ack is in the partner's persisted mirror (or on disk)."""
        if self.fencing:
            if req.served is None or req.served[1] != "write" or not self._mirrored_lun(req.served[0], req.lun):
                return                      # write-through, degraded, or ownership moved since
            owner, partner = self.nodes[req.served[0]], self.nodes[1 - req.served[0]]
        else:
            owner, partner = self.nodes[req.lun % 2], self.nodes[1 - req.lun % 2]
            if i == owner.id and not owner.ctrl.link.up or not partner.alive:
                return                      # completed degraded: one NVRAM copy is the promise
        mirror, nv = partner.ctrl.mirror, partner.nvram.shadow
        bs = mirror.segment.block_size
        disk, model, now = self.disks.disks[req.lun], self.model, self.now_us
        for off in range(req.offset, req.offset + req.length, SECTOR_BYTES):
            key = (req.lun << LUN_SHIFT) | off // bs
            block = mirror.view.get(key)
            s = off % bs // SECTOR_BYTES
            if block is not None and mirror.blocks[block].bitmap >> s & 1:
                at = mirror.segment.data_offset(block) + s * SECTOR_BYTES
                sec = nv[at:at + SECTOR_BYTES]
            else:
                sec = disk[off:off + SECTOR_BYTES]
            value = C.decode_sector(sec, req.lun, off // SECTOR_BYTES)
            model.check_value(f"mirror copy after the ack of {req}", req.lun, off // SECTOR_BYTES,
                              (req.lun << LUN_SHIFT) + off // SECTOR_BYTES, value, now, now)

    def check_failover(self, o):
        """What a failover to the partner would serve now: its persisted mirror over the disks."""
        owner, partner = self.nodes[o], self.nodes[1 - o]
        if not owner.alive or not owner.ctrl.mirroring or owner.ctrl.sync_pending:
            return False
        nv = partner.nvram.persisted
        image = C.mirror_image(nv)
        luns = range(o, LUNS, 2) if not self.fencing else [lun for lun in range(LUNS) if self._mirrored_lun(o, lun)]
        for lun in luns:
            buf = C.lun_image(self.disks.image_without(lun, o), lun, image, nv)
            self.model.check(f"failover image of lun{lun} from {'ab'[1 - o]}'s mirror", lun, 0, buf,
                             self.now_us, self.now_us)
        return True

    def check_restart(self, i):
        """A restarted controller recovered every write acknowledged before it went down."""
        n = self.nodes[i]
        lines = C.primary_lines(n.ctrl)
        for lun in range(i, LUNS, 2) if not self.fencing else self._still_owned(n):
            buf = C.lun_image(self.disks.disks[lun], lun, lines, n.nvram.mem)
            self.model.check(f"lun{lun} as recovered by {'ab'[i]} after restart", lun, 0, buf,
                             n.down_since_us, self.now_us)

    def _mirrored_lun(self, o, lun):
        """Fencing: o owns `lun` with its partner's mirror in use (a failover would replay it)."""
        owner, partner = self.nodes[o], self.nodes[1 - o]
        return (owner.alive and partner.alive and owner.ctrl.mirroring and not owner.ctrl.sync_pending
                and owner.ctrl.ownership.fence[lun].state == Own.OWNER
                and partner.ctrl.ownership.fence[lun].state == Own.PARTNER)

    def record(self, lun):
        """The reservation record on the simulated disk (None if blank or unreadable)."""
        try:
            return R.parse_record_untrusted(bytes(self.disks.records[lun]), "sim record")
        except FormatError:
            return None

    def _still_owned(self, n):
        """The LUNs n served when it went down that nobody took over meanwhile (the record is unchanged)."""
        luns = []
        for lun, generation in sorted(n.owned_at_crash.items()):
            rec = self.record(lun)
            if rec is not None and rec.owner == n.id and rec.generation == generation:
                luns.append(lun)
        return luns

    def move(self, i, lun):
        """The ownership CLI (hal/runtime/control.py _move): bring `lun` to controller i, guarded the same way."""
        ctrl = self.nodes[i].ctrl
        if ctrl is None or ctrl.owns(lun) or not ctrl.link.up:
            return
        self.execute(i, ctrl.move_lun(lun))

    def describe(self):
        parts = []
        for n in self.nodes:
            if not n.alive:
                parts.append(f"{'ab'[n.id]}: down")
                continue
            s = n.ctrl.status()
            parts.append(f"{'ab'[n.id]}: link {s['link']} dirty {s['dirty_blocks']} free {s['free_blocks']} "
                         f"pending {s['pending_mirror_writes']} waiting {s['waiting_writes']}"
                         f"{' paused' if n.paused_until_us > self.now_us else ''}"
                         + (" luns " + ",".join(f"{v['state']}/{v['generation']}/{v['held']}"
                                                for v in s["luns"].values()) if self.fencing else ""))
        return "; ".join(parts) + f"; outstanding host requests {len(self.workload.outstanding)}"

    # -- a whole run ----------------------------------------------------------

    def run(self) -> SimResult:
        failure = C.verdict(self.faults.run)
        stats = dict(events=self.events, sim_ms=self.now_us // 1000, ops=self.workload.issued,
                     **{f"host_{k}": v for k, v in self.workload.stats.items()},
                     **{f"disk_{k}": v for k, v in self.disks.stats.items()},
                     **{f"link_{k}": v for k, v in self.link.stats.items()},
                     **{f"fault_{k}": v for k, v in self.faults.counts.items()},
                     **{f"note_{k}": v for k, v in self.notes.items()})
        if self.split is not None:
            stats["serving_acts"] = self.split.acts
        flags = (f"--mode {self.mode}" + (f" --broken {self.broken}" if self.broken else "")
                 + ("" if self.fencing else " --static") + ("" if self.batched else " --unbatched"))
        return SimResult(self.seed, self.steps, failure, self.trace.hexdigest(), stats, flags)


def run_seed(seed, mode="ha", steps=300, broken=None, fencing=True, batched=True) -> SimResult:
    """batched=False: link output and destage flushes per entry-point call (the firmware's
    default), as the simulator ran before it took production's batched setting; the seeds
    kept from then replay with it."""
    return Sim(seed, mode, steps, broken, fencing=fencing, batched=batched).run()
