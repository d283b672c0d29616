"""invoke task for the deterministic simulator: `inv sim`.

`add_to(ns)` adds it to the root collection of tasks.py.
  inv sim --seed N [--mode ha] [--steps K] [--broken SITE]   replay one seed
  inv sim --seeds 1000 [--start S] [--mode ha|replica] [--variant bitmap|log] [--steps K]   sweep
  add --static for static ownership (lun % 2, fencing off); fencing is the default
"""
from invoke import task


@task(help={"seed": "replay this one seed (prints its trace hash)", "seeds": "sweep this many seeds",
            "start": "first seed of a sweep", "mode": "ha or replica", "variant": "replica mode: bitmap (default) or log",
            "steps": "host operations per run", "broken": "a deliberately broken firmware variant",
            "static": "static ownership (lun % 2), fencing off"})
def sim(c, seed=None, seeds=100, start=0, mode="ha", variant="bitmap", steps=300, broken=None, static=False):
    """Deterministic simulation of the pair with faults; failures print their replay command."""
    from hal import sim_cli
    argv = ["--mode", mode, "--variant", variant, "--steps", str(steps)]
    argv += ["--seed", str(seed)] if seed is not None else ["--seeds", str(seeds), "--start", str(start)]
    argv += ["--broken", broken] if broken else []
    argv += ["--static"] if static else []
    code = sim_cli.main(argv)
    if code:
        raise SystemExit(code)


def add_to(ns):
    ns.add_task(sim)
