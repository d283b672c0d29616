"""invoke task for the deterministic simulator: `inv sim`.

`add_to(ns)` adds it to the root collection of tasks.py.
  inv sim --seed N [--mode ha] [--steps K] [--broken SITE]   replay one seed
  inv sim --seeds 1000 [--start S] [--mode ha|replica] [--variant bitmap|log] [--steps K]   sweep
  add --static for static ownership (lun % 2, fencing off); fencing is the default
  add --unbatched for link output per entry-point call (how the seeds kept before ran)
"""
from invoke import task


@task(help={"seed": "replay this one seed (prints its trace hash)", "seeds": "sweep this many seeds",
            "start": "first seed of a sweep", "mode": "ha or replica", "variant": "replica mode: bitmap (default) or log",
            "steps": "host operations per run", "broken": "a deliberately broken firmware variant",
            "static": "static ownership (lun % 2), fencing off", "jobs": "worker processes for a sweep",
            "unbatched": "ha: link output per entry-point call, not per loop turn"})
def sim(c, seed=None, seeds=100, start=0, mode="ha", variant="bitmap", steps=300, broken=None, static=False,
        jobs=1, unbatched=False):
    """Deterministic simulation of the pair with faults; failures print their replay command."""
    from hal.sim import cli as sim_cli
    argv = ["--mode", mode, "--variant", variant, "--steps", str(steps)]
    argv += ["--seed", str(seed)] if seed is not None else ["--seeds", str(seeds), "--start", str(start)]
    argv += ["--broken", broken] if broken else []
    argv += ["--static"] if static else []
    argv += ["--unbatched"] if unbatched else []
    argv += ["--jobs", str(jobs)]
    code = sim_cli.main(argv)
    if code:
        raise SystemExit(code)


@task(help={"seeds": "seeds per variant", "start": "first seed", "steps": "host operations per run",
            "jobs": "worker processes", "broken": "only this variant"})
def sim_catch(c, seeds=100, start=0, steps=300, jobs=1, broken=None):
    """Catch rate of every deliberately broken firmware variant, every mode: the simulator's reach."""
    from hal.sim import cli as sim_cli
    argv = ["--catch", "--seeds", str(seeds), "--start", str(start), "--steps", str(steps), "--jobs", str(jobs)]
    sim_cli.main(argv + (["--broken", broken] if broken else []))


def add_to(ns):
    ns.add_task(sim)
    ns.add_task(sim_catch)
