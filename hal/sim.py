"""The deterministic simulator: two unchanged Controllers, hosts and faults on virtual time.

Owns the scheduler: one event queue ordered by (virtual time, sequence),
driven from one root seed; every component gets its own random.Random
seeded from it, so a seed replays byte for byte (the trace hash proves it).
Events belong to a controller incarnation (a crash bumps its epoch and its
pending events die) and wait while their controller is paused. Actions are
carried out in order; disk completions come back later as events, never
inside the list that asked for them.

The fault schedule and the final phase live in hal/sim_faults.py, the
checkers in hal/sim_check.py, the hosts in hal/sim_workload.py. A failing run
raises nothing: `run()` returns a SimResult whose `replay` is the command
that reproduces it (`inv sim --seed N --mode ha --steps K`).
"""
import hashlib
import heapq
import random
import traceback

from firmware import actions as A
from firmware.cache import LUN_SHIFT, SECTOR_BYTES
from firmware.controller import Controller, Params, format_nvram, nvram_is_blank

from . import sim_check as C
from .sim_check import Model, SimFailure
from .sim_clock import VirtualClock
from .sim_disk import DiskFaults, SimDiskArray
from .sim_faults import FaultPlan, FaultSchedule
from .sim_link import LinkFaults, SimLink
from .sim_nvram import SimNvram
from .sim_workload import Workload

KEY = bytes(range(32))
PAIR_ID = bytes.fromhex("5151c0de5151c0de5151c0de5151c0de")
TICK_US = 10_000
LUNS = 4
LUN_BYTES = 512 * 1024
NVRAM_BYTES = 2 << 20
# Deliberately broken firmware variants (buggify sites in firmware/controller.py) the
# checkers must catch: tests/test_sim.py asserts each is caught within a few seeds.
BROKEN_SITES = ("ack_before_mirror", "skip_pen_validation", "skip_persist_metadata", "read_skip_cache")


class Node:
    __slots__ = ("id", "nvram", "ctrl", "epoch", "alive", "paused_until_us", "down_since_us", "conn")

    def __init__(self, id):
        self.id = id
        self.nvram = SimNvram(NVRAM_BYTES)
        self.ctrl = None
        self.epoch = 0
        self.alive = False
        self.paused_until_us = 0
        self.down_since_us = 0
        self.conn = -1                     # the link connection this controller's session runs on


class SimResult:
    def __init__(self, seed, mode, steps, broken, ok, failure, trace_hash, stats):
        self.seed = seed
        self.ok = ok
        self.failure = failure
        self.trace_hash = trace_hash
        self.stats = stats
        flags = f" --broken {broken}" if broken else ""
        self.replay = f"inv sim --seed {seed} --mode {mode} --steps {steps}{flags}"

    def __repr__(self):
        return f"SimResult(seed={self.seed}, ok={self.ok}, hash={self.trace_hash[:16]})"


class Sim:
    def __init__(self, seed, mode="ha", steps=300, broken=None, overrides=None):
        if mode != "ha":
            raise ValueError(f"mode {mode!r}: only ha mode exists in the firmware so far")
        assert broken is None or broken in BROKEN_SITES, broken
        self.seed, self.mode, self.steps, self.broken = seed, mode, steps, broken
        root = random.Random(seed)
        self.rng = {name: random.Random(root.getrandbits(64))
                    for name in ("plan", "sched", "nvram", "disk", "link", "work", "fault", "buggify")}
        self.plan = FaultPlan(self.rng["plan"], broken)
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
        self.params = [self._params(i) for i in range(2)]
        self.nodes = [Node(0), Node(1)]
        self.notes = {}
        self.faults = FaultSchedule(self)

    def _params(self, i):
        p = self.plan
        return Params(i, PAIR_ID, self.lun_sizes, mode=self.mode, reliable_transport=p.reliable,
                      heartbeat_interval_ms=p.heartbeat_ms, heartbeat_timeout_ms=p.heartbeat_ms * 6,
                      idle_flush_ms=p.idle_flush_ms, high_watermark=p.high_watermark,
                      low_watermark=p.high_watermark / 2, destage_inflight_max=p.destage_inflight_max,
                      data_window_bytes=p.data_window_bytes, buggify=self._buggify)

    def _buggify(self, site):
        """FoundationDB-style: a site enabled for this run fires with its seeded probability."""
        p = self.plan.buggify.get(site)
        return p is not None and self.rng["buggify"].random() < p

    @property
    def now_us(self):
        return self.clock.now_us

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
                self.seq += 1
                heapq.heappush(self.queue, (n.paused_until_us, self.seq, node, epoch, fn, args))
                return
        self.events += 1
        self.trace.update(b"%d %d %s;" % (t, node, fn.__name__.encode()))
        fn(*args)

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
        n.ctrl = Controller(self.params[i], nv, KEY, self.now_us // 1000)
        n.alive = True
        self._instrument(n)
        self.execute(i, n.ctrl.start())
        self.at(self.now_us + TICK_US, i, self._tick, i)

    def _instrument(self, n):
        """No split brain: only a LUN's owner may install a write for it (static ownership)."""
        cache, install = n.ctrl.cache, n.ctrl.cache.install

        def checked_install(line):
            if line.lun % 2 != n.id:
                raise SimFailure(f"split brain: controller {'ab'[n.id]} installed a write for "
                                 f"lun{line.lun}, owned by {'ab'[line.lun % 2]}")
            return install(line)
        cache.install = checked_install

    def crash(self, i, why):
        """Controller i loses power now: in-flight disk writes and unpersisted NVRAM meet their fate."""
        n = self.nodes[i]
        assert n.alive
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
        n = self.nodes[i]
        for act in actions:
            kind = act.__class__
            if kind is A.Persist:
                n.nvram.persist(act.offset, act.length)
            elif kind is A.Transmit:
                for t, dst, conn, chunk in self.link.transmit(i, act.buffers, self.now_us):
                    self.at(t, dst, self._deliver, dst, conn, chunk)
            elif kind is A.HostReply:
                self._host_reply(i, act)
            elif kind is A.DiskWrite or kind is A.DiskRead:
                self._disk_io(i, n, act, kind is A.DiskWrite)
            elif kind is A.LinkReset:
                self._link_reset(i, act.reason)
            elif kind is A.Notify:
                self.notes[act.kind] = self.notes.get(act.kind, 0) + 1
            else:
                raise SimFailure(f"controller {'ab'[i]} asked for an unknown action {act!r}")

    def _disk_io(self, i, n, act, write):
        if write and act.lun % 2 != i:
            raise SimFailure(f"split brain: controller {'ab'[i]} wrote the disk of lun{act.lun}")
        io, latency_us = self.disks.submit(i, n.epoch, act, write)
        self.at(self.now_us + latency_us, i, self._disk_done, i, io)

    def _disk_done(self, i, io):
        error, data = self.disks.complete(io)
        self.execute(i, self.nodes[i].ctrl.disk_done(io.op, error, data))

    def _tick(self, i):
        ctrl = self.nodes[i].ctrl
        self.execute(i, ctrl.tick(self.now_us // 1000))
        C.check_bounds(ctrl, self.disks.ios_inflight(i))
        self.at(self.now_us + TICK_US, i, self._tick, i)

    # -- the link -------------------------------------------------------------

    def _deliver(self, i, conn, chunk):
        link, ctrl = self.link, self.nodes[i].ctrl
        for frame in link.receive(i, conn, chunk):
            if link.conn != conn:
                return                      # this controller reset the connection meanwhile
            self.execute(i, ctrl.link_frame(frame, self.now_us // 1000))

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
        self.execute(i, n.ctrl.link_connected(nonce, self.now_us // 1000))

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
        owner, partner = self.nodes[req.lun % 2], self.nodes[1 - req.lun % 2]
        if i == owner.id and not owner.ctrl.link.up or not partner.alive:
            return                          # completed degraded: one NVRAM copy is the promise
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
        for lun in range(o, LUNS, 2):
            buf = C.lun_image(self.disks.disks[lun], lun, image, nv)
            self.model.check(f"failover image of lun{lun} from {'ab'[1 - o]}'s mirror", lun, 0, buf,
                             self.now_us, self.now_us)
        return True

    def check_restart(self, i):
        """A restarted controller recovered every write acknowledged before it went down."""
        n = self.nodes[i]
        lines = C.primary_lines(n.ctrl)
        for lun in range(i, LUNS, 2):
            buf = C.lun_image(self.disks.disks[lun], lun, lines, n.nvram.mem)
            self.model.check(f"lun{lun} as recovered by {'ab'[i]} after restart", lun, 0, buf,
                             n.down_since_us, self.now_us)

    def describe(self):
        parts = []
        for n in self.nodes:
            if not n.alive:
                parts.append(f"{'ab'[n.id]}: down")
                continue
            s = n.ctrl.status()
            parts.append(f"{'ab'[n.id]}: link {s['link']} dirty {s['dirty_blocks']} free {s['free_blocks']} "
                         f"pending {s['pending_mirror_writes']} waiting {s['waiting_writes']}"
                         f"{' paused' if n.paused_until_us > self.now_us else ''}")
        return "; ".join(parts) + f"; outstanding host requests {len(self.workload.outstanding)}"

    # -- a whole run ----------------------------------------------------------

    def run(self) -> SimResult:
        failure = None
        try:
            self.faults.run()
        except SimFailure as exc:
            failure = f"{exc}"
        except Exception:                  # the firmware itself blew up: a bug too
            failure = "firmware or simulator raised:\n" + traceback.format_exc()
        stats = dict(events=self.events, sim_ms=self.now_us // 1000, ops=self.workload.issued,
                     **{f"host_{k}": v for k, v in self.workload.stats.items()},
                     **{f"disk_{k}": v for k, v in self.disks.stats.items()},
                     **{f"link_{k}": v for k, v in self.link.stats.items()},
                     **{f"fault_{k}": v for k, v in self.faults.counts.items()},
                     **{f"note_{k}": v for k, v in self.notes.items()})
        return SimResult(self.seed, self.mode, self.steps, self.broken, failure is None, failure,
                         self.trace.hexdigest(), stats)


def run_seed(seed, mode="ha", steps=300, broken=None) -> SimResult:
    return Sim(seed, mode, steps, broken).run()
