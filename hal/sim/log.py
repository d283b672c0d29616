"""Deterministic simulation of replica mode's NVRAM-log variant (firmware/logship/).

One root seed drives everything: the rig's shape (sources, partition and file
sizes, consistency-point timer), the host workload (hal/sim/workload.py's
FloorHosts) and the faults. The
unchanged LogSource and LogDestination run on the in-memory rig
(hal/sim/logrig.py); frames wait on the wires and are delivered a few at a
time, so acknowledgements, crashes and cuts interleave.

Faults: crash (a power cut or a kill of the process: see _crash; the rig's
disks have a volatile write cache) and restart of a source or of the
destination, link cut and reconnect, disks that hang and resume (writes,
flushes and reads park), and once per run perhaps a disaster: a source lost for good, after which the
destination recovers its image from the file.

Checkers (separate from the workload):
  - a read at a source returns, for every sector, the latest acknowledged
    write or a newer one already issued;
  - a write acknowledged through the destination is held there at that
    instant (image, file or NVRAM), and still after a restart of the
    destination;
  - after a disaster, the recovered image holds every write acknowledged as
    shipped (acknowledged through the destination's ack) or a newer one;
    writes acknowledged by a source alone (link down: degraded) are exempt;
  - at the end, with everything healed and recovered, each surviving source
    and its image agree byte for byte and match the model;
  - bounded queues: waiting writes, early entries;
  - no session ends on a protocol error (nothing here corrupts a frame).
A failing run returns the replay command, `inv sim --mode replica --variant log --seed N`.
The sector stamps and the model are ha mode's (hal/sim/check.py), read by the floor rule.
"""
import hashlib
import random

from firmware.logship.common import SECTOR

from hal.sim.check import Model, SimFailure, SimResult, sector_key, verdict
from hal.sim.logrig import MemLog
from hal.sim.workload import FloorHosts

# Deliberately broken firmware variants, each with the probability its site fires at:
# log_skip_persist: an NVRAM persist of either end is not issued;
# log_destage_no_flush: applying a partition, filing and a consistency point skip their disk flushes.
BROKEN_P = {"log_ack_before_ship": 1.0, "log_skip_resend": 1.0, "log_reuse_unshipped": 1.0,
            "log_skip_persist": 0.3, "log_destage_no_flush": 1.0}
BROKEN_SITES = tuple(BROKEN_P)
LUN_BYTES = 128 * 1024


class LogSim:
    def __init__(self, seed, steps=300, broken=None):
        assert broken is None or broken in BROKEN_SITES, broken
        self.seed, self.steps, self.broken = seed, steps, broken
        rng = self.rng = random.Random(seed)
        # crash fates and broken sites draw from their own streams: the schedule stays the seed's
        self.buggify_rng = random.Random(seed * 2 + 1)
        self.rig = MemLog(sources=rng.choice([1, 1, 2]), luns=2, lun_size=LUN_BYTES, nvram_size=1 << 20,
                          seed=seed * 2, buggify=self._buggify if broken else None,
                          journal_bytes=rng.choice([96 * 1024, 256 * 1024, 1 << 20]),
                          log_partition_bytes=rng.choice([16 * 1024, 32 * 1024, 64 * 1024]),
                          cp_interval_ms=rng.choice([30, 200, 10 ** 9]))
        self.model = Model()
        # what the hosts send (hal/sim/workload.py); a source refuses no read in range
        self.hosts = FloorHosts(rng, [LUN_BYTES] * 2, self.model, errors_allowed=False, where="source {}")
        self.lost = set()          # sources lost for good (disaster)
        self.down = {}             # what is down -> step it comes back
        self.killed = set()        # ends whose process died, power still on: ("src", k), ("dst", None)
        self.notes_seen = {}
        self.trace = hashlib.sha256()
        self.stats = {"writes": 0, "reads": 0, "acked": 0, "shipped_acks": 0, "crashes": 0, "cuts": 0,
                      "stalls": 0, "disasters": 0, "frames": 0}
        for k in range(self.rig.n):
            self.rig.connect(k)

    def _buggify(self, site):
        return site == self.broken and self.buggify_rng.random() < BROKEN_P[site]

    # -- driving the rig, classifying host replies -------------------------------------

    def _check_sessions(self):
        """Nothing on these wires corrupts a frame, so a session ended on a protocol error is the
        firmware's own fault (or the rig's: frames of an old connection once arrived on a new one)."""
        for who, notes in self.rig.notes.items():
            for kind, fields in notes[self.notes_seen.get(who, 0):]:
                if kind == "link_down" and fields.get("reason", "").startswith("protocol error"):
                    raise SimFailure(f"{who} ended the session on a frame nothing corrupted: "
                                        f"{fields['reason']}")
            self.notes_seen[who] = len(notes)

    def _collect(self, shipped_k=None):
        """Take the replies the last call produced; shipped_k: they came from source k's
        destination acks (acknowledged through the destination)."""
        self._check_sessions()
        replies = self.rig.replies
        for req in list(replies):
            err, data = replies.pop(req)
            self.trace.update(repr((req, err)).encode())
            w = self.hosts.replied(req, err, data, shipped_k)
            if w is not None:
                self.stats["acked"] += 1
                shipped = shipped_k == w.source
                self.stats["shipped_acks"] += shipped
                if shipped:
                    self._check_held(w.source, w.lun, w.first, w.count, w.version)

    def _check_held(self, k, lun, first, count, version):
        """A write acknowledged through the destination is held there now: in its image, its file
        or its NVRAM (what a recovery at this instant would apply), at this version or newer."""
        view = self._held_view(k, lun, first * SECTOR, (first + count) * SECTOR)
        if view is not None:
            base = sector_key(lun, first, k)
            floor = {key: version for key in range(base, base + count)}
            self._check_view(view, k, lun, first, floor, "write acknowledged through the destination")

    def _check_destination(self):
        """After a restart of the destination: it still holds every write it acknowledged."""
        for k in range(self.rig.n):
            for lun in range(self.rig.luns):
                view = self._held_view(k, lun, 0, LUN_BYTES)
                if view is not None:
                    self._check_view(view, k, lun, 0, self.model.newest_shipped, "the restarted destination")

    def _check_view(self, view, k, lun, first, floor, what):
        what = f"{what}, at the destination (source {k})"
        self.model.check_floor(what, view, lun, first, floor, source=k)

    def _held_view(self, k, lun, lo, hi):
        """Bytes [lo, hi) of source k's LUN as the destination holds them: image, then the file's
        records not yet applied, then the entries in its NVRAM; None while it is not ready."""
        r = self.rig
        if r.dst is None or not r.dst.feeds[k].ready:
            return None
        feed = r.dst.feeds[k]
        view = bytearray(r.image(k, lun)[lo:hi])
        journal = r.dst_disks[feed.p.journal_disk]
        for entries, media in ((feed.records, journal), (feed.staged, r.dst_nv)):
            for e in entries:
                a, b = max(lo, e.offset), min(hi, e.offset + e.length)
                if e.lun == lun and a < b:
                    view[a - lo:b - lo] = media[e.data_off + a - e.offset:e.data_off + b - e.offset]
        return view

    def _live(self):
        return [k for k in range(self.rig.n) if k not in self.lost and self.rig.src[k] is not None]

    def write(self, k):
        r = self.rig
        h = self.hosts.write(k)
        src = r.src[k]
        claims_shipped = src.status()["link"] == "shipping"
        r.run(("src", k), src.host_requests([h]))
        # a reply inside host_requests while shipping claims the destination has it (it must not)
        self._collect(shipped_k=k if claims_shipped else None)
        self.stats["writes"] += 1

    def read(self, k):
        r = self.rig
        r.run(("src", k), r.src[k].host_requests([self.hosts.read(k)]))
        self._collect()
        self.stats["reads"] += 1

    def deliver(self, n):
        r = self.rig
        for _ in range(n):
            busy = [(k, d) for k in range(r.n) for d, w in (("dst", r.wire_to_dst[k]), ("src", r.wire_to_src[k]))
                    if w]
            if not busy:
                return
            k, d = self.rng.choice(busy)
            self.stats["frames"] += 1
            if d == "dst":
                frame = r.wire_to_dst[k].popleft()
                if r.dst is not None:
                    r.run(("dst", None), r.dst.link_frame(frame, r.now_ms, link=k))
                self._collect()
            else:
                frame = r.wire_to_src[k].popleft()
                if r.src[k] is not None:
                    r.run(("src", k), r.src[k].link_frame(frame, r.now_ms))
                self._collect(shipped_k=k)

    def tick(self):
        r = self.rig
        r.now_ms += 10
        for k in range(r.n):
            if r.src[k] is not None:
                r.run(("src", k), r.src[k].tick(r.now_ms))
                self._collect()
        if r.dst is not None:
            r.run(("dst", None), r.dst.tick(r.now_ms))
            self._collect()

    # -- faults ------------------------------------------------------------------------

    def fault(self, step):
        rng, r = self.rng, self.rig
        kind = rng.choice(["crash_src", "crash_dst", "cut", "stall", "stall"])
        if kind == "crash_src" and self._live():
            k = rng.choice(self._live())
            self._crash(('src', k))
            self._collect()
            self._forget_requests(k)
            self.down[("src", k)] = step + rng.randrange(1, 20)
        elif kind == "crash_dst" and r.dst is not None:
            self._unstall()
            self._crash(('dst', None))
            self._collect()
            self.down[("dst", None)] = step + rng.randrange(1, 20)
        elif kind == "cut":
            live = [k for k in self._live() if r.connected[k]]
            if live:
                k = rng.choice(live)
                r.cut(k)
                self._collect()
                self.down[("cut", k)] = step + rng.randrange(1, 30)
        elif kind == "stall" and r.stalled is None:
            r.stall()
            self.down[("stall", None)] = step + rng.randrange(1, 10)
        else:
            return
        self.stats["crashes" if kind.startswith("crash") else kind + "s"] += 1

    def _crash(self, who):
        """A crash is a power cut of that end (NVRAM stores not persisted and disk writes not
        flushed meet their fate) or, half the time, a kill of its process (they wait in NVRAM and
        the disks' caches); a killed end's power goes too before its restart half the time, else
        the next power cut decides. Drawn from the rig's crash stream."""
        r = self.rig
        power = r.rng.random() < 0.5
        if who[0] == "src":
            r.crash_source(who[1], power=power)
        else:
            r.crash_destination(power=power)
        if not power:
            self.killed.add(who)

    def _before_boot(self, who):
        if who in self.killed:
            self.killed.discard(who)
            if self.rig.rng.random() < 0.5:
                self.rig.power_cut(who)

    def _forget_requests(self, k):
        """A crashed source never answers what it held: those writes stay issued, unacknowledged."""
        self.hosts.forget(k)

    def _unstall(self):
        r = self.rig
        if r.stalled is None:
            return
        r.unstall()
        self._collect()

    def heal(self, step, everything=False):
        r = self.rig
        for what, when in sorted(self.down.items(), key=lambda kv: kv[1]):
            if when > step and not everything:
                continue
            del self.down[what]
            side, k = what
            if side == "src" and k not in self.lost:
                self._before_boot(what)
                r.boot_source(k)
                self._collect()
                if r.dst is not None:
                    r.connect(k)
                    self._collect()
            elif side == "dst":
                self._before_boot(what)
                r.boot_destination()
                self._collect()
                self._check_destination()
                for j in self._live():
                    if ("cut", j) not in self.down:
                        r.connect(j)
                        self._collect()
            elif side == "cut" and r.src[k] is not None and r.dst is not None and k not in self.lost:
                r.connect(k)
                self._collect()
            elif side == "stall":
                self._unstall()

    def disaster(self):
        """A source is lost for good; the destination recovers its image from the file."""
        r = self.rig
        k = self.rng.choice(self._live())
        self.lost.add(k)
        self.stats["disasters"] += 1
        self._unstall()
        r.crash_source(k)
        self._collect()
        self._forget_requests(k)
        if r.dst is None:
            self.down.pop(("dst", None), None)
            self._before_boot(("dst", None))
            r.boot_destination()
            self._collect()
        self.heal(10 ** 9, everything=False)
        r.recover(f"s{k}")
        self._collect()
        self._check_image(k, self.model.newest_shipped, "image after the disaster at its source")

    def _check_image(self, k, floor, what):
        r = self.rig
        for lun in range(r.luns):
            img = r.image(k, lun)
            self.model.check_floor(what, img, lun, 0, floor, source=k)

    # -- the run -----------------------------------------------------------------------

    def run(self) -> SimResult:
        failure = verdict(self._run)
        flags = "--mode replica --variant log" + (f" --broken {self.broken}" if self.broken else "")
        return SimResult(self.seed, self.steps, failure, self.trace.hexdigest()[:16], self.stats, flags)

    def _run(self):
        rng = self.rng
        disaster_at = rng.randrange(self.steps // 2, self.steps) if rng.random() < 0.3 else None
        for step in range(self.steps):
            self.heal(step)
            live = [k for k in self._live()]
            roll = rng.random()
            if roll < 0.04:
                self.fault(step)
            elif step == disaster_at and live:
                self.disaster()
            elif roll < 0.55 and live:
                self.write(rng.choice(live))
            elif roll < 0.7 and live and self.rig.stalled is None:
                self.read(rng.choice(live))
            elif roll < 0.9:
                self.deliver(rng.randrange(1, 8))
            else:
                self.tick()
            self._check_bounds()
        self._finish()

    def _check_bounds(self):
        r = self.rig
        for k in self._live():
            if len(r.src[k].waiting) > r.src[k].params.waiting_max:
                raise SimFailure(f"source {k}: {len(r.src[k].waiting)} waiting writes")
        if r.dst is not None:
            for f in r.dst.feeds:
                if len(f.early) > 4096:
                    raise SimFailure(f"destination: {len(f.early)} early entries from {f.p.name}")

    def _finish(self):
        """Heal everything, let it settle, recover every image; sources, images and model agree."""
        r = self.rig
        self.heal(10 ** 9, everything=True)
        if r.stalled is not None:
            self._unstall()
        for k in self._live():
            if not r.connected[k]:
                r.connect(k)
                self._collect()
        for _ in range(2000):
            self.deliver(50)
            self.tick()
            if not any(r.wire_to_dst[k] or r.wire_to_src[k] for k in range(r.n)) and not any(
                    r.src[k].pending or r.src[k].waiting for k in self._live()):
                break
        if self.hosts.unanswered():
            raise SimFailure(f"{len(self.hosts.unanswered())} host writes never answered "
                             f"after healing (e.g. {self.hosts.unanswered()[:3]})")
        r.recover()
        self._collect()
        for k in self._live():
            self._check_image(k, self.model.newest_acked, f"image of source {k} at the end")
            for lun in range(r.luns):
                req = ("final", k, lun)
                r.run(("src", k), r.src[k].host_read(req, lun, 0, LUN_BYTES))
                err, data = r.replies.pop(req)
                if err or data != r.image(k, lun):
                    diff = next((i for i in range(0, LUN_BYTES, SECTOR)
                                 if data is None or data[i:i + SECTOR] != r.image(k, lun)[i:i + SECTOR]), None)
                    raise SimFailure(f"source {k} lun{lun} and its image differ (first at byte {diff})")


def run_log_seed(seed, steps=300, broken=None) -> SimResult:
    return LogSim(seed, steps, broken).run()
