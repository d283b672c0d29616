"""Running the simulator for people and CI: one seed, or a sweep with progress.

`python -m hal.sim.cli --seed N` replays one run and prints its trace hash
and stats; `--seeds K` sweeps seeds start..start+K-1, prints progress, every
failure with the exact replay command, and the speed (seeds per minute,
simulated host operations per second). `inv sim` (hal/tools/tasks_sim.py) calls
the same functions. Exit status 1 if any seed failed. Fencing (dynamic
ownership through reservation records) is on unless `--static` asks for the
old static ownership (lun % 2). `--mode replica` simulates replica mode:
`--variant bitmap` (hal/sim/replica.py, the default) or `--variant log`
(hal/sim/log.py). ha mode runs production's batched link output (one
flush_link per loop turn, as the runtime does); `--unbatched` runs the
firmware's per-call default, as the seeds kept from before it replay.
`--jobs N` runs seeds in N processes (the same results, in
seed order). `--catch` prints, for every deliberately broken variant of every
mode, in how many of the seeds the checkers caught it.
"""
import argparse
import multiprocessing
import sys
import time

from hal.sim.ha import BROKEN_SITES, run_seed
from hal.sim.log import BROKEN_SITES as LOG_BROKEN_SITES
from hal.sim.log import run_log_seed
from hal.sim.replica import BROKEN_SITES as REPLICA_BROKEN_SITES
from hal.sim.replica import run_replica_seed

VARIANT = {"variant": "bitmap"}          # replica mode: which variant's simulator (set by main)


def _run(seed, mode, steps, broken, fencing, variant=None, batched=True):
    if mode == "replica":
        if (variant or VARIANT["variant"]) == "log":
            return run_log_seed(seed, steps, broken)
        return run_replica_seed(seed, steps, broken)
    return run_seed(seed, mode, steps, broken, fencing, batched)


class _Done:
    """What a sweep keeps of one run (light enough to come back from a worker process)."""
    __slots__ = ("seed", "ok", "failure", "replay", "ops", "events")

    def __init__(self, seed, result):
        self.seed, self.ok, self.failure, self.replay = seed, result.ok, result.failure, result.replay
        st = result.stats
        self.ops = st.get("ops", st.get("writes", 0) + st.get("reads", 0))
        self.events = st.get("events", st.get("frames", 0))


def _job(args):
    seed, mode, steps, broken, fencing, variant, batched = args
    return _Done(seed, _run(seed, mode, steps, broken, fencing, variant, batched))


def _results(tasks, jobs):
    """Run the tasks, in this process or in `jobs` worker processes; yield results in order."""
    if jobs <= 1:
        yield from map(_job, tasks)
        return
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        yield from pool.imap(_job, tasks, chunksize=2)


def run_one(seed, mode="ha", steps=300, broken=None, out=sys.stdout, fencing=True, batched=True):
    result = _run(seed, mode, steps, broken, fencing, batched=batched)
    print(f"seed {seed}: {'ok' if result.ok else 'FAILED'}  trace {result.trace_hash}", file=out)
    print("  " + " ".join(f"{k}={v}" for k, v in sorted(result.stats.items())), file=out)
    if not result.ok:
        print(f"  {result.failure}\n  replay: {result.replay}", file=out)
    return result


def sweep(seeds, start=0, mode="ha", steps=300, broken=None, out=sys.stdout, progress_every=50, fencing=True,
          jobs=1, batched=True):
    """Run seeds start..start+seeds-1; return (failed results, summary dict)."""
    failed, ops, events = [], 0, 0
    t0 = time.perf_counter()
    tasks = [(seed, mode, steps, broken, fencing, VARIANT["variant"], batched)
             for seed in range(start, start + seeds)]
    for n, result in enumerate(_results(tasks, jobs), 1):
        ops += result.ops
        events += result.events
        if not result.ok:
            failed.append(result)
            print(f"seed {result.seed} FAILED: {result.failure.splitlines()[0][:300]}\n  replay: {result.replay}",
                  file=out, flush=True)
        if n % progress_every == 0 or n == seeds:
            elapsed = time.perf_counter() - t0
            print(f"[{n}/{seeds}] {len(failed)} failed, {elapsed:.1f} s, "
                  f"{60 * n / elapsed:.0f} seeds/min, {ops / elapsed:.0f} host ops/s, "
                  f"{events / elapsed:.0f} events/s", file=out, flush=True)
    elapsed = time.perf_counter() - t0
    summary = dict(seeds=seeds, failed=len(failed), seconds=round(elapsed, 2),
                   seeds_per_minute=round(60 * seeds / elapsed), host_ops_per_second=round(ops / elapsed),
                   events_per_second=round(events / elapsed))
    return failed, summary


def broken_variants():
    """(mode, variant, site) of every deliberately broken firmware variant."""
    return ([("ha", "bitmap", s) for s in BROKEN_SITES] + [("replica", "bitmap", s) for s in REPLICA_BROKEN_SITES]
            + [("replica", "log", s) for s in LOG_BROKEN_SITES])


def catch_rates(seeds=100, start=0, steps=300, jobs=1, out=sys.stdout, only=None, batched=True):
    """For each broken variant, in how many of seeds start..start+seeds-1 a checker caught it."""
    rates = {}
    for mode, variant, site in broken_variants():
        if only and site not in only:
            continue
        t0 = time.perf_counter()
        tasks = [(seed, mode, steps, site, True, variant, batched) for seed in range(start, start + seeds)]
        caught = [r.seed for r in _results(tasks, jobs) if not r.ok]
        rates[site] = len(caught)
        where = mode if mode == "ha" else f"replica/{variant}"
        print(f"{where:15} {site:28} caught in {len(caught):4}/{seeds} seeds "
              f"(first {caught[0] if caught else '-'}; {time.perf_counter() - t0:.0f} s)", file=out, flush=True)
    return rates


def main(argv=None):
    ap = argparse.ArgumentParser(prog="twincache-sim", description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, help="replay this one seed")
    ap.add_argument("--seeds", type=int, default=100, help="sweep this many seeds")
    ap.add_argument("--start", type=int, default=0, help="first seed of the sweep")
    ap.add_argument("--mode", default="ha", choices=("ha", "replica"))
    ap.add_argument("--steps", type=int, default=300, help="host operations per run")
    ap.add_argument("--variant", choices=("bitmap", "log"), default="bitmap",
                    help="replica mode: the bitmap variant or the NVRAM-log variant")
    ap.add_argument("--broken", choices=BROKEN_SITES + LOG_BROKEN_SITES + REPLICA_BROKEN_SITES,
                    help="run a deliberately broken firmware variant (log_*, replica_*: replica mode)")
    ap.add_argument("--static", action="store_true", help="static ownership (lun %% 2), fencing off")
    ap.add_argument("--unbatched", action="store_true",
                    help="ha mode: link output per entry-point call, not per loop turn (as kept seeds ran)")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes for a sweep")
    ap.add_argument("--catch", action="store_true",
                    help="catch rate of every broken variant over the seeds (--seeds, --start, --steps)")
    args = ap.parse_args(argv)
    if args.catch:
        catch_rates(args.seeds, args.start, args.steps, args.jobs, only=[args.broken] if args.broken else None,
                    batched=not args.unbatched)
        return 0
    VARIANT["variant"] = args.variant
    if args.broken:
        sites = BROKEN_SITES if args.mode == "ha" else (
            LOG_BROKEN_SITES if args.variant == "log" else REPLICA_BROKEN_SITES)
        if args.broken not in sites:
            ap.error(f"--broken {args.broken} belongs to another mode or variant")
    if args.seed is not None:
        return 0 if run_one(args.seed, args.mode, args.steps, args.broken, fencing=not args.static,
                            batched=not args.unbatched).ok else 1
    failed, summary = sweep(args.seeds, args.start, args.mode, args.steps, args.broken, fencing=not args.static,
                            jobs=args.jobs, batched=not args.unbatched)
    print(" ".join(f"{k}={v}" for k, v in summary.items()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
