"""The simulator's fault plan and schedule, and the phases of one run.

`FaultPlan` decides, from the run's seed, which faults are switched on for
this run and how hard they hit (FoundationDB's buggify: a fault site is
enabled per run, then fires with a seeded probability), plus the firmware
knobs that shape the run (heartbeat, watermarks, windows, transport).

`FaultSchedule` runs the phases: boot and connect; the workload with
faults injected at seeded intervals (crash and restart of one controller,
power cut of both, partition one-way or both ways and heal, a paused
controller, a vanishing disk, a slow peer, and with fencing an ownership
move through the CLI path); with fencing, fault plans aimed at it: pauses
placed at a controller's reservation-record I/O (right after it is submitted,
or right before its completion is delivered, so the controller acts on a
read that is old by its own clock), slow record I/O for a while, a crash and
restart of a controller while one of its LUNs is CLAIMING or REPLAYING, and
two scenarios run undisturbed with the link cut (record writes of an owner
alone failing, its reads working or not; a watcher's claims slow to land),
each once early and then as a fault kind; then the final phase: heal
everything, restart what is down, wait until the pair is mirrored and quiet
(with fencing: every LUN settled as owner on one side, partner on the other),
check mirrors and what a failover would find, read every LUN back through
both controllers, cut the power of both, recover, and read back again.
"""
from firmware.ha.ownership import OWNING, Own
from firmware.formats.messages import MsgType

from hal.sim.check import SimFailure, check_mirror_equal

LEGIT_SITES = {"nvram_store_corrupt": 0.02}     # faults the firmware must handle
# Deliberately broken fencing variants (buggify sites in firmware/ha/fencing.py, firmware/ha/takeover.py).
FENCE_SITES = ("fence_skip_lease_check", "takeover_no_wait", "claim_no_settle", "skip_fencing_reread")
SETTLE_LIMIT_US = 60_000_000
HEARTBEAT = MsgType.HEARTBEAT


class FaultPlan:
    def __init__(self, rng, broken=None, fencing=True):
        on = lambda p=0.5: rng.random() < p     # noqa: E731 - a per-run switch
        self.reliable = on(0.7)
        self.clients = rng.randint(2, 8)
        self.think_us = rng.choice((200, 2_000, 20_000))
        self.heartbeat_ms = rng.choice((10, 20, 50))
        self.idle_flush_ms = rng.choice((5, 50, 500))
        self.high_watermark = rng.choice((0.2, 0.5, 0.8))
        self.destage_inflight_max = rng.choice((1, 4, 64))
        self.data_window_bytes = rng.choice((64 << 10, 1 << 20))
        self.p_link_loss = rng.choice((0.0005, 0.002, 0.01)) if not self.reliable else 0.0
        self.p_link_corrupt = rng.choice((0.001, 0.01)) if on(0.3) else 0.0
        self.p_disk_eio = rng.choice((0.001, 0.02)) if on(0.3) else 0.0
        self.kinds = [k for k, p in (("crash", 0.6), ("power_cut", 0.3), ("partition", 0.5),
                                     ("pause", 0.4), ("vanish", 0.2), ("slow", 0.3)) if on(p)]
        self.fault_interval_us = rng.choice((20_000, 100_000, 400_000))
        # Fencing knobs: short, so takeovers happen within a run; the firmware needs
        # takeover_wait_ms > lease_ms + renew_interval_ms.
        self.renew_ms = rng.choice((10, 20, 50))
        self.lease_ms = self.renew_ms * rng.choice((2, 4, 8))
        self.takeover_wait_ms = self.lease_ms + self.renew_ms + rng.choice((10, self.renew_ms, self.lease_ms))
        if fencing and on(0.4):
            self.kinds.append("move")
        self.settle_limit_us = SETTLE_LIMIT_US   # virtual time allowed for each phase to finish
        self.buggify = {site: p for site, p in LEGIT_SITES.items() if on(0.3)}
        if broken == "skip_pen_validation":      # only visible together with bad NVRAM stores
            self.buggify["nvram_store_corrupt"] = 0.05
        if broken:
            self.buggify[broken] = 1.0 if broken != "skip_persist_metadata" else 0.3
            self.kinds = sorted(set(self.kinds) | {"crash"} | ({"pause", "partition"} if fencing else set()))
        self._fencing_plans(on, rng, broken in FENCE_SITES, fencing)

    def _fencing_plans(self, on, rng, forced, fencing):
        """Faults aimed at fencing, drawn after every other knob (a seed keeps its other knobs);
        a broken fencing variant gets all of them. p_record_pause: per record I/O, the chance its
        controller is paused right after submitting it or right before hearing its completion;
        p_claim_crash: per LUN entering CLAIMING or REPLAYING, the chance its controller crashes
        (and restarts) before the claim is through; "slow_record", "isolate_eio" and
        "isolate_slow_claims" are fault kinds."""
        self.p_record_pause = self.p_claim_crash = 0.0
        if not fencing:
            return
        if on(0.5) or forced:
            self.p_record_pause = rng.choice((0.02, 0.05, 0.1))
        if on(0.4) or forced:
            self.p_claim_crash = rng.choice((0.1, 0.25))
        if on(0.4) or forced:
            self.kinds.append("slow_record")
        if on(0.4) or forced:
            self.kinds += ["isolate_eio", "isolate_slow_claims"]


class FaultSchedule:
    def __init__(self, sim):
        self.sim = sim
        self.rng = sim.rng["fault"]
        self.counts = {}
        self.active = True
        self.armed = False                  # fencing fault plans fire once the workload runs
        self.quiet_until_us = 0             # a fencing scenario runs undisturbed until then
        self.on_solo = self.on_watch = None # the controller whose record path fails at its solo, slows at its watch
        self.waiting = []                   # scenarios waiting for both controllers to run, in turn
        self.scenarios_due = 0              # early scenarios not yet started
        self.scenario = None                # the kind of the last scenario started
        self.record_pause_next_us = 0       # no pause at record I/O before this

    def run(self):
        sim = self.sim
        for i in range(2):
            sim.boot(i)
        sim.reconnect()
        sim.run_until(lambda: all(n.ctrl.mirroring for n in sim.nodes), sim.plan.settle_limit_us, "first mirroring")
        self.armed = True
        for c in range(sim.plan.clients):
            sim.at(sim.now_us + c, -1, sim.client_next, c)
        if sim.plan.kinds:
            sim.at(sim.now_us + sim.plan.fault_interval_us, -1, self.inject)
        scenarios = [k for k in ("isolate_eio", "isolate_slow_claims") if k in sim.plan.kinds]
        sim.rng["fence"].shuffle(scenarios)
        for kind in scenarios:              # each once early; the workload lasts until they are over
            sim.at(sim.now_us + sim.rng["fence"].randint(0, 100_000), -1, getattr(self, "_" + kind))
        self.scenarios_due = len(scenarios)
        sim.at(sim.now_us + 100_000, -1, self.sample_failover)
        w = sim.workload
        # The bound grows with the workload: under a plan with a fault every 20 ms a 1,000-step run
        # makes its progress (700 operations in the first 60 s) but not within one 300-step bound
        # (seed 870379 at 1000 steps).
        limit_us = sim.plan.settle_limit_us * max(1, w.ops_max // 300)
        sim.run_until(lambda: w.issued >= w.ops_max and not w.outstanding and not self.scenarios_due
                      and sim.now_us >= self.quiet_until_us, limit_us, "the end of the workload")
        self.final()

    # -- injection ------------------------------------------------------------

    def inject(self):
        if not self.active:
            return
        sim, rng = self.sim, self.rng
        kind = rng.choice(sim.plan.kinds)
        if sim.now_us >= self.quiet_until_us:
            getattr(self, "_" + kind)()
            self.counts[kind] = self.counts.get(kind, 0) + 1
        interval_us = sim.plan.fault_interval_us
        sim.at(sim.now_us + rng.randint(interval_us // 2, 2 * interval_us), -1, self.inject)

    def _later(self, lo_us, hi_us, fn, *args):
        self.sim.at(self.sim.now_us + self.rng.randint(lo_us, hi_us), -1, fn, *args)

    def _crash(self):
        sim = self.sim
        alive = [n.id for n in sim.nodes if n.alive]
        if len(alive) < 2:
            return
        i = self.rng.choice(alive)
        sim.check_failover(i)              # the partner must hold what i acknowledged
        sim.crash(i, "crash")
        self._later(1_000, 300_000, sim.restart, i)

    def _power_cut(self):
        sim = self.sim
        for n in sim.nodes:
            if n.alive:
                sim.crash(n.id, "power cut")
        self._later(1_000, 300_000, self._power_on)

    def _power_on(self):
        for i in range(2):
            self.sim.restart(i)

    def _partition(self):
        sim = self.sim
        dirs = self.rng.choice(([0], [1], [0, 1]))
        sim.link.partition(dirs)
        self._later(1_000, 50 * sim.plan.heartbeat_ms * 1000, self._heal)

    def _heal(self):
        sim = self.sim
        if self.active and sim.now_us < self.quiet_until_us:
            return                          # a fencing scenario keeps its link cut until it ends
        for t, dst, conn, chunk in sim.link.heal(sim.now_us):
            sim.at(t, dst, sim._deliver, dst, conn, chunk)

    def _pause(self):
        sim = self.sim
        n = sim.nodes[self.rng.randrange(2)]
        if n.alive and all(m.paused_until_us <= sim.now_us for m in sim.nodes):
            pause_ms = 20 * sim.plan.heartbeat_ms
            if sim.fencing and self.rng.random() < 0.5:   # long enough for the partner to take over
                p = sim.plan
                pause_ms = 2 * (6 * p.heartbeat_ms + p.takeover_wait_ms + p.lease_ms + p.renew_ms)
            n.paused_until_us = sim.now_us + self.rng.randint(1_000, pause_ms * 1000)

    def _vanish(self):
        lun = self.rng.randrange(len(self.sim.lun_sizes))
        self.sim.disks.vanished.add(lun)
        self._later(1_000, 200_000, self.sim.disks.vanished.discard, lun)

    def _slow(self):
        d = self.rng.randrange(2)
        self.sim.link.slow[d] = self.rng.choice((10, 100))
        self._later(1_000, 300_000, self._unslow, d)

    def _unslow(self, d):
        self.sim.link.slow[d] = 1

    def _takeover_ms(self):
        """Long enough for the partner to notice, watch the record, claim and settle."""
        p = self.sim.plan
        return 6 * p.heartbeat_ms + p.takeover_wait_ms + p.lease_ms + p.renew_ms + 20

    def _isolate(self, duration_ms):
        """Cut the link both ways for `duration_ms` (a record-path fault alone moves no LUN)."""
        self.sim.link.partition([0, 1])
        self.sim.at(self.sim.now_us + duration_ms * 1000, -1, self._heal)

    def _slow_record(self):
        """One controller's path to the reservation records (or both) slows to lease_ms/4..lease_ms/2
        per write, and per read unless only writes are slow, for a while, often with the link
        cut: a read and the renewal written after it still land within a lease, so before a
        claimant's read-back (the argument in firmware/ha/fencing.py assumes it)."""
        sim, p, rng = self.sim, self.sim.plan, self.rng
        slow = (p.lease_ms * 250, p.lease_ms * 500)
        for d in rng.choice(([0], [1], [0, 1])):
            sim.disks.record_latency_us[d] = slow
            sim.disks.record_write_only[d] = rng.random() < 0.5
        duration_ms = rng.randint(self._takeover_ms() // 2, 2 * self._takeover_ms())
        if rng.random() < 0.5:
            self._isolate(duration_ms)
        sim.at(sim.now_us + duration_ms * 1000, -1, self._unslow_record)

    def _unslow_record(self):
        self.sim.disks.record_latency_us = [None, None]

    def _retry_scenario(self):
        kind = self.waiting.pop(0)
        getattr(self, "_" + kind)()
        if self.waiting and self.waiting[0] != kind:
            self.sim.at(self.sim.now_us + 50_000, -1, self._retry_scenario)

    def _scenario(self, kind):
        """Cut the link for long enough that a LUN changes hands, and let nothing else happen
        meanwhile; return the controller that owns a LUN (the one the scenario aims at). Only with
        both controllers up and running and no scenario under way: else try again 50 ms later."""
        sim = self.sim
        if not self.active:
            return None
        if sim.now_us < self.quiet_until_us or not all(n.alive and n.paused_until_us <= sim.now_us
                                                       for n in sim.nodes):
            if kind not in self.waiting:    # each kind waits once, in turn
                self.waiting.append(kind)
                if len(self.waiting) == 1:
                    sim.at(sim.now_us + 50_000, -1, self._retry_scenario)
            return None
        self.scenarios_due = max(0, self.scenarios_due - 1)
        self.scenario = kind
        duration_ms = self.rng.randint(2 * self._takeover_ms(), 3 * self._takeover_ms())
        self.quiet_until_us = sim.now_us + duration_ms * 1000
        sim.link.partition([0, 1])
        sim.at(self.quiet_until_us, -1, self._scenario_end)
        owners = [n.id for n in sim.nodes
                  if any(f.state in (Own.OWNER, Own.SOLO) for f in n.ctrl.ownership.fence)]
        return self.rng.choice(owners or [0, 1])

    def _scenario_end(self):
        self.quiet_until_us = 0
        self._heal()
        disks = self.sim.disks
        self.on_solo = self.on_watch = None
        disks.record_write_eio = [False, False]
        disks.record_read_eio = [False, False]
        disks.record_latency_us = [None, None]

    def _isolate_eio(self):
        """The link is cut and, once a LUN of controller i went solo, i's record writes fail for the
        rest of the scenario, and now and then its record reads too. Reads working, its renewals
        alone give it leases its partner cannot see (what the claim's settle covers); failing,
        it must stop serving once its lease runs out, while the partner takes over."""
        i = self._scenario("isolate_eio")
        if i is not None:
            self.on_solo = i

    def went_solo(self, i):
        disks = self.sim.disks
        if self.on_solo == i:
            self.on_solo = None
            self.counts["record_eio"] = self.counts.get("record_eio", 0) + 1
            disks.record_write_eio[i] = True
            disks.record_read_eio[i] = self.sim.rng["fence"].random() < 0.3   # the whole path is gone

    def _isolate_slow_claims(self):
        """The link is cut and, once a LUN of controller i began watching its owner, i's record
        writes (its claims) take lease_ms/4..lease_ms/2 for the rest of the scenario."""
        i = self._scenario("isolate_slow_claims")
        if i is not None:
            self.on_watch = 1 - i       # the partner of an owner: it watches, then claims

    def began_watching(self, i):
        p, disks = self.sim.plan, self.sim.disks
        if self.on_watch == i:
            self.on_watch = None
            self.counts["slow_claims"] = self.counts.get("slow_claims", 0) + 1
            disks.record_latency_us[i] = (p.lease_ms * 250, p.lease_ms * 500)
            disks.record_write_only[i] = True

    def record_io(self, i, lun):
        """Controller i submitted a record I/O for `lun`, or is about to hear of one: maybe pause it
        right now; long enough for the partner to take the LUN over only if i owns it (an owner
        renewing: it then acts on a read older than its lease), shorter than a lease otherwise."""
        sim, p = self.sim, self.sim.plan
        rng = sim.rng["fence"]
        if not (self.active and self.armed and p.p_record_pause and rng.random() < p.p_record_pause):
            return
        n = sim.nodes[i]
        if not n.alive or any(m.paused_until_us > sim.now_us for m in sim.nodes) or (
                sim.now_us < self.quiet_until_us and self.scenario == "isolate_eio"):
            return                          # (pauses would only hide the leases that scenario is about)
        if sim.now_us < self.record_pause_next_us:
            return                          # the pair runs a while between them: a pause is not a death
        if rng.random() < 0.3 or n.ctrl.ownership.fence[lun].state not in OWNING:
            pause_ms = rng.randint(1, p.lease_ms)      # the re-read guard does not fire
        else:                               # long enough for the partner to take over meanwhile
            pause_ms = rng.randint(self._takeover_ms(), 2 * self._takeover_ms())
        n.paused_until_us = sim.now_us + pause_ms * 1000
        self.record_pause_next_us = n.paused_until_us + self._takeover_ms() * 500
        self.counts["record_pause"] = self.counts.get("record_pause", 0) + 1

    def claim_began(self, i):
        """A LUN of controller i entered CLAIMING or REPLAYING: maybe crash i before it is through."""
        sim, p = self.sim, self.sim.plan
        rng = sim.rng["fence"]
        if self.active and self.armed and p.p_claim_crash and rng.random() < p.p_claim_crash:
            delay_us = rng.randint(0, (p.lease_ms + p.renew_ms) * 1000)
            sim.at(sim.now_us + delay_us, -1, self._crash_in_claim, i, sim.nodes[i].epoch)

    def _crash_in_claim(self, i, epoch):
        sim = self.sim
        n = sim.nodes[i]
        if not self.active or not n.alive or n.epoch != epoch:
            return
        if not any(f.state in (Own.CLAIMING, Own.REPLAYING) for f in n.ctrl.ownership.fence):
            return
        sim.check_failover(i)
        sim.crash(i, "crash inside a claim")
        self.counts["claim_crash"] = self.counts.get("claim_crash", 0) + 1
        self._later(1_000, 300_000, sim.restart, i)

    def _move(self):
        sim = self.sim
        i, lun = self.rng.randrange(2), self.rng.randrange(len(sim.lun_sizes))
        sim.at(sim.now_us, i, sim.move, i, lun)

    def sample_failover(self):
        """Now and then, check what a failover would find, as if the owner died this instant."""
        sim = self.sim
        if not self.active:
            return
        sim.check_failover(self.rng.randrange(2))
        sim.at(sim.now_us + self.rng.randint(20_000, 300_000), -1, self.sample_failover)

    # -- the end --------------------------------------------------------------

    def final(self):
        sim = self.sim
        self.active = False
        sim.plan.buggify.pop("nvram_store_corrupt", None)
        sim.disks.faults.p_read_eio = sim.disks.faults.p_write_eio = 0.0
        sim.disks.vanished.clear()
        sim.link.slow = [1, 1]
        sim.disks.record_latency_us = [None, None]
        self._scenario_end()
        lf = sim.link.faults
        lf.p_drop = lf.p_dup = lf.p_reorder = lf.p_corrupt = 0.0
        self._heal()
        if sim.link.up and sim.link.damaged:
            # A corrupted chunk on a stream is a frame lost, and the controllers notice only at the
            # next frame after it, which may be a read of the read-back (seeds 980270, 981182, a
            # heartbeat lost 2 ms before this phase). That fault is still on: end it here.
            i = next((n.id for n in sim.nodes if n.alive and n.conn == sim.link.conn), None)
            if i is not None:
                sim._link_reset(i, "the final phase starts on a clean connection")
                sim.at(sim.now_us + 100, i, sim._link_fin, i, sim.link.conn)
        # A paused controller's events wait in the queue until its pause ends; clearing the
        # pause would not bring them back, and the partner would time the link out in the
        # middle of the read-back (seed 241). Let the pause run out instead.
        resume_us = max(n.paused_until_us for n in sim.nodes)
        sim.run_until(lambda: sim.now_us >= resume_us, sim.plan.settle_limit_us, "the end of a pause")
        self._power_on()
        self.settle("mirrored and quiet after the workload")
        self.readback("read back after the workload")
        self._power_cut()
        self._power_on()
        self.settle("mirrored and quiet after a power cut of both")
        self.readback("read back after a power cut of both")

    def settle(self, what):
        sim = self.sim

        def quiet():
            nodes = sim.nodes
            if not all(n.alive for n in nodes) or not sim.link.up:
                return False
            # Heartbeats never stop; every other frame sent has been received and acknowledged.
            # Batched, flush-begin and flush-done references wait for a tick or other frames to
            # ride with: quiet once they went too.
            return all(n.ctrl.mirroring and not n.ctrl.pending and not n.ctrl.forwarder.inflight
                       and not n.ctrl.flush_begin_refs and not n.ctrl.flush_done_refs
                       and all(e.type == HEARTBEAT for e in n.ctrl.link.unacked)
                       and not n.ctrl.link.data_queue and not n.ctrl.mirror.group
                       and not n.ctrl.mirror.undecided for n in nodes) and (
                not sim.fencing or settled(nodes))

        def settled(nodes):
            """Every LUN owned on one side and partnered on the other, nothing held, no record I/O."""
            a, b = nodes[0].ctrl.ownership.fence, nodes[1].ctrl.ownership.fence
            return all({fa.state, fb.state} == {Own.OWNER, Own.PARTNER} and not fa.held and not fb.held
                       for fa, fb in zip(a, b))
        sim.run_until(quiet, sim.plan.settle_limit_us, what)
        for o in range(2):
            owner, partner = sim.nodes[o], sim.nodes[1 - o]
            check_mirror_equal(owner.ctrl, partner.ctrl, owner.nvram.mem, partner.nvram.mem)
            if not sim.check_failover(o):
                raise SimFailure(f"{what}: controller {'ab'[o]} is not mirrored")

    def readback(self, what):
        """Read every LUN through both controllers and check it against the model."""
        sim, w = self.sim, self.sim.workload
        w.ops_max = w.issued + 2 * len(sim.lun_sizes) * (sim.lun_sizes[0] // (256 << 10))
        for node in range(2):
            for lun, size in enumerate(sim.lun_sizes):
                for offset in range(0, size, 256 << 10):
                    req = w.readback_request(node, lun, offset, 256 << 10, sim.now_us)
                    sim.at(sim.now_us + 1, node, sim._host_request, req)
        sim.run_until(lambda: not w.outstanding, sim.plan.settle_limit_us, what)
