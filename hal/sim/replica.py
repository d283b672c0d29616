"""Deterministic simulation of replica mode's bitmap variant (firmware/replica/controller.py).

One root seed drives the rig's shape (ack level, record range size), the host
workload (hal/sim/workload.py's FloorHosts) and the faults. The unchanged
ReplicaControllers run on the in-memory replica pair (hal/sim/replicarig.py);
frames wait on the wire and are delivered a few at a time, so
acknowledgements, crashes and cuts interleave.

Faults: crash (a power cut, or a kill of the process: see _crash; the rig's
disks have a volatile write cache) and restart of the secondary (quick
resync), disks that hang and resume (reads, writes and flushes park; both
sides' or only the secondary's, in an NVRAM that half the seeds make smaller
than the LUNs, so its cache fills and copies wait for free blocks), crash
of the primary followed either by its restart or by promotion of the secondary
(the old primary returns as secondary, or as the other half of a split
brain, resolved by policy), link cut and reconnect, time passing (destage,
destaged-range messages).

Checkers (separate from the workload):
  - no session ends on a protocol error (nothing here corrupts a frame);
  - a read at the primary returns, for every sector, the latest acknowledged
    write or a newer one already issued;
  - after a promotion, the new primary holds every write acknowledged through
    the secondary (writes the old primary acknowledged alone, link down, are
    exempt: that is what a promotion gives up);
  - at the end, healed, resynced and settled: both sides read the same bytes,
    and the primary's match the model.
A failing run returns its replay command, `inv sim --mode replica --variant bitmap --seed N`.
The sector stamps and the model are ha mode's (hal/sim/check.py), read by the floor rule.
"""
import hashlib
import random

from hal.sim.check import Model, SimFailure, SimResult, verdict
from hal.sim.replicarig import MemReplicaPair
from hal.sim.workload import FloorHosts

LUN_BYTES = 256 * 1024
LUNS = 2
# Deliberately broken firmware variants, each with the probability its site fires at:
# replica_skip_copy: the primary acknowledges a write it never copied to the peer;
# replica_skip_persist: an NVRAM persist is not issued (its stores may be lost at a crash);
# replica_destage_no_flush: destaged lines are freed and announced without a disk flush (the
# site is destage_no_flush in the destage code replica mode shares with ha: firmware/destage.py).
BROKEN_P = {"replica_skip_copy": 1.0, "replica_skip_persist": 0.3, "replica_destage_no_flush": 1.0}
BROKEN_SITES = tuple(BROKEN_P)
SITE_OF = {"replica_destage_no_flush": "destage_no_flush"}


class ReplicaSim:
    def __init__(self, seed, steps=300, broken=None):
        assert broken is None or broken in BROKEN_SITES, broken
        self.seed, self.steps, self.broken = seed, steps, broken
        rng = self.rng = random.Random(seed)
        # crash fates and broken sites draw from their own streams: the schedule stays the seed's
        self.buggify_rng = random.Random(seed * 2 + 1)
        self.side_rng = random.Random(seed * 5 + 3)
        # Half the seeds get an NVRAM smaller than both LUNs, so the secondary's cache fills (a
        # restarted secondary's resync copies then wait for free blocks). Drawn from its own
        # stream: the schedule stays the seed's.
        nvram_size = random.Random(seed * 3 + 2).choice([2 << 20, 768 << 10])
        self.rig = MemReplicaPair(seed=seed * 2, luns=LUNS, lun_size=LUN_BYTES, nvram_size=nvram_size,
                                  ack=rng.choice(["cache", "nvram", "disk"]),
                                  range_bytes=rng.choice([4096, 16384, 65536]),
                                  idle_flush_ms=rng.choice([50, 500]),
                                  buggify=self._buggify if broken else None)
        self.model = Model()
        # what the hosts send (hal/sim/workload.py); a secondary or a resync target may refuse a read
        self.hosts = FloorHosts(rng, [LUN_BYTES] * LUNS, self.model, errors_allowed=True, where="the primary")
        self.primary = 0                  # where the hosts send their I/O
        self.down = {}                    # what is down -> step it comes back
        self.killed = set()               # controllers whose process died, power still on
        self.notes_seen = [0, 0]
        self.trace = hashlib.sha256()
        self.stats = {"writes": 0, "reads": 0, "acked": 0, "shipped_acks": 0, "crashes": 0, "cuts": 0,
                      "promotions": 0, "split_brains": 0, "frames": 0, "stalls": 0}
        self.rig.connect()

    def _buggify(self, site):
        return (site == SITE_OF.get(self.broken, self.broken)
                and self.buggify_rng.random() < BROKEN_P[self.broken])

    # -- replies ---------------------------------------------------------------------

    def _collect(self, shipped=False):
        self._check_sessions()
        replies = self.rig.replies
        for req in list(replies):
            err, data = replies.pop(req)
            self.trace.update(repr((req, err)).encode())
            if self.hosts.replied(req, err, data, 0 if shipped else None) is not None:
                self.stats["acked"] += 1
                self.stats["shipped_acks"] += shipped

    def _check_sessions(self):
        """Nothing on this wire corrupts a frame, so a session ended on a protocol error is the
        firmware's own fault (a resync's copies waiting for free blocks were refused as host
        writes, and every resync into a full cache ended so)."""
        for i in range(2):
            notes = self.rig.notes[i]
            for kind, fields in notes[self.notes_seen[i]:]:
                if kind == "link_down" and fields.get("reason", "").startswith("protocol error"):
                    raise SimFailure(f"controller {'ab'[i]} ended the session on a frame nothing "
                                        f"corrupted: {fields['reason']}")
            self.notes_seen[i] = len(notes)

    def _run(self, i, actions, shipped=False):
        self.rig.run(i, actions)
        self._collect(shipped)

    def _alive(self, i):
        return self.rig.ctrl[i] is not None

    # -- workload ----------------------------------------------------------------------

    def write(self):
        r, p = self.rig, self.primary
        h = self.hosts.write()
        # answered inside host_requests while the pair is synced claims the copy is at the peer
        claims = r.ctrl[p].sync == "synced"
        self._run(p, r.ctrl[p].host_requests([h]), shipped=claims)
        self.stats["writes"] += 1

    def read(self):
        r, p = self.rig, self.primary
        self._run(p, r.ctrl[p].host_requests([self.hosts.read()]))
        self.stats["reads"] += 1

    def deliver(self, n):
        r = self.rig
        for _ in range(n):
            busy = [i for i in range(2) if r.wire[i] and self._alive(i)]
            if not busy:
                return
            i = self.rng.choice(busy)
            self.stats["frames"] += 1
            frame = r.wire[i].popleft()
            # replies at the primary caused by the peer's frames are acknowledged through it
            self._run(i, r.ctrl[i].link_frame(frame, r.now_ms), shipped=i == self.primary)

    def tick(self):
        r = self.rig
        r.now_ms += 20
        for i in range(2):
            if self._alive(i):
                self._run(i, r.ctrl[i].tick(r.now_ms))

    # -- faults --------------------------------------------------------------------------

    def fault(self, step):
        rng, r = self.rng, self.rig
        kind = rng.choice(["crash_secondary", "crash_primary", "cut", "stall"])
        p, s = self.primary, 1 - self.primary
        if kind == "crash_secondary" and self._alive(s):
            self._crash(s)
            self._collect()
            self.down[("boot", s)] = step + rng.randrange(1, 30)
            self.stats["crashes"] += 1
        elif kind == "crash_primary" and self._alive(p) and self._alive(s) and not any(
                k == "boot" for k, _ in self.down):       # with the link up, or cut (then: split brain)
            self._crash(p)
            self._collect()
            self._forget()
            self.stats["crashes"] += 1
            self._unstall()                               # a promotion reads the whole LUN
            if rng.random() < 0.5 and r.ctrl[s].status()["role"] == "secondary" and self._promote(s):
                self.down[("boot", p)] = step + rng.randrange(5, 40)
            else:
                self.down[("boot", p)] = step + rng.randrange(1, 20)
        elif kind == "cut" and self._alive(0) and self._alive(1) and r.ctrl[0].link.state != "down":
            r.disconnect()
            self._collect()
            self.down[("connect", None)] = step + rng.randrange(1, 30)
            self.stats["cuts"] += 1
        elif kind == "stall" and r.stalled is None:
            # Each side has its own disks: half the stalls hang only the secondary's, whose cache
            # then fills while the primary goes on (copies wait there for free blocks).
            r.stall((s,) if self.side_rng.random() < 0.5 else (0, 1))
            self.down[("stall", None)] = step + rng.randrange(1, 10)
            self.stats["stalls"] += 1

    def _unstall(self):
        if self.rig.stalled is not None:
            self.down.pop(("stall", None), None)
            self.rig.unstall()
            self._collect()

    def _crash(self, i):
        """A crash is a power cut of the controller (NVRAM stores not persisted and disk writes not
        flushed meet their fate) or, half the time, a kill of its process (they wait in NVRAM and
        the disks' caches); a killed controller's power goes too before its restart half the
        time, else the next power cut decides. Drawn from the rig's crash stream."""
        r = self.rig
        power = r.rng.random() < 0.5
        r.crash(i, power=power)
        if not power:
            self.killed.add(i)

    def _boot(self, i):
        r = self.rig
        if i in self.killed:
            self.killed.discard(i)
            if r.rng.random() < 0.5:
                r.power_cut(i)
        r.boot(i)

    def _promote(self, s):
        r = self.rig
        self._run(s, r.ctrl[s].promote())
        if r.ctrl[s].status()["role"] != "primary":
            return False
        self.stats["promotions"] += 1
        self.primary = s
        # the new primary must hold every write acknowledged through it
        self.check_all(s, self.model.newest_shipped, "the promoted secondary")
        self.model.newest_acked = dict(self.model.newest_shipped)
        return True

    def _forget(self):
        self.hosts.forget()

    def heal(self, step, everything=False):
        r = self.rig
        for what, when in sorted(self.down.items(), key=lambda kv: kv[1]):
            if when > step and not everything:
                continue
            del self.down[what]
            kind, i = what
            if kind == "stall":
                self.rig.unstall()
                self._collect()
                continue
            if kind == "boot":
                self._boot(i)
                self._collect()
            if all(self._alive(j) for j in range(2)) and ("connect", None) not in self.down:
                r.connect()
                self._collect(shipped=True)
                self._maybe_resolve()

    def _maybe_resolve(self):
        """A split brain after a promotion: discard the side that is not serving the hosts."""
        r = self.rig
        if any(self._alive(i) and r.ctrl[i].sync == "split-brain" for i in range(2)):
            self.stats["split_brains"] += 1
            victim = "ab"[1 - self.primary]
            for i in range(2):
                self._run(i, r.ctrl[i].resolve(f"discard-{victim}"))
            r.connect()
            self._collect(shipped=True)

    def check_all(self, i, floor, what):
        r = self.rig
        for lun in range(LUNS):
            req = self.hosts.new_req("check")
            r.run(i, r.ctrl[i].host_read(req, lun, 0, LUN_BYTES))
            err, data = r.replies.pop(req, (None, None))
            if err or data is None:
                raise SimFailure(f"{what}: reading lun{lun} failed ({err})")
            self.model.check_floor(what, data, lun, 0, floor)

    # -- the run -----------------------------------------------------------------------

    def run(self) -> SimResult:
        failure = verdict(self._whole)
        flags = "--mode replica --variant bitmap" + (f" --broken {self.broken}" if self.broken else "")
        return SimResult(self.seed, self.steps, failure, self.trace.hexdigest()[:16], self.stats, flags)

    def _whole(self):
        self._steps()
        self._finish()

    def _steps(self):
        rng, r = self.rng, self.rig
        for step in range(self.steps):
            self.heal(step)
            roll = rng.random()
            serving = self._alive(self.primary) and r.ctrl[self.primary].status()["role"] == "primary"
            if roll < 0.04:
                self.fault(step)
            elif roll < 0.55 and serving:
                self.write()
            elif roll < 0.7 and serving:
                self.read()
            elif roll < 0.9:
                self.deliver(rng.randrange(1, 8))
            else:
                self.tick()

    def _finish(self):
        r = self.rig
        self.heal(10 ** 9, everything=True)
        for i in range(2):
            if not self._alive(i):
                self._boot(i)
                self._collect()
        r.connect()
        self._collect(shipped=True)
        self._maybe_resolve()
        for _ in range(600):
            self.deliver(50)
            self.tick()
            if all(r.ctrl[i].sync == "synced" for i in range(2)) and not r.wire[0] and not r.wire[1] \
                    and not self.hosts.unanswered():
                break
        states = [r.ctrl[i].sync for i in range(2)]
        if states != ["synced", "synced"]:
            raise SimFailure(f"not synced after healing: {states}")
        if self.hosts.unanswered():
            raise SimFailure(f"{len(self.hosts.unanswered())} host writes never answered "
                             f"after healing (e.g. {self.hosts.unanswered()[:3]})")
        p = self.primary
        self.check_all(p, self.model.newest_acked, "the primary at the end")
        for lun in range(LUNS):
            got = []
            for i in (p, 1 - p):
                req = ("final", i, lun)
                r.run(i, r.ctrl[i].host_read(req, lun, 0, LUN_BYTES))
                got.append(r.replies.pop(req, (None, None)))
            if got[0] != got[1]:
                raise SimFailure(f"lun{lun}: the two sides differ after the resync "
                                    f"(errors {got[0][0]}, {got[1][0]})")


def run_replica_seed(seed, steps=300, broken=None) -> SimResult:
    return ReplicaSim(seed, steps, broken).run()
