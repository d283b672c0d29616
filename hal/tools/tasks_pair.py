"""invoke tasks for the local pair: pair.up, pair.down, pair.status, demo, bench.

`add_to(ns)` adds them to the root collection of tasks.py.
"""
import json
import os
import sys

from invoke import Collection, task

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_DIR = os.path.join(ROOT, "run", "pair")
TC = [sys.executable, "-m", "hal.cli"]


def _tc(c, args, **kw):
    return c.run(" ".join(TC + args), **kw)


@task(help={"dir": "where the pair lives (default ./run/pair)", "luns": "number of LUNs (default 2)",
            "lun_size": "size of each LUN (default 256M)", "link": "unix (default) or tcp", "json": "print JSON"})
def up(c, dir=DEFAULT_DIR, luns=None, lun_size=None, link=None, json=False):
    """Start a local controller pair serving NBD (the main job); restart what is not running."""
    # Only the options given: an existing pair restarts as it was made (pair up refuses a contradiction).
    given = {"--luns": luns, "--lun-size": lun_size, "--link": link}
    args = ["pair", "up", "--dir", dir] + [w for k, v in given.items() if v is not None for w in (k, str(v))]
    _tc(c, args + (["--json"] if json else []))
    if not json:
        print(f"\nstatus:   inv pair.status --dir {dir}\ntop:      twincache top --dir {dir}"
              f"\nevents:   twincache events --dir {dir} -f"
              f"\nmetrics:  twincache metrics --dir {dir}\nstop:     inv pair.down --dir {dir}")


@task(help={"dir": "where the pair lives"})
def down(c, dir=DEFAULT_DIR):
    """Stop the local pair."""
    _tc(c, ["pair", "down", "--dir", dir])


@task(help={"dir": "where the pair lives", "json": "print JSON"})
def status(c, dir=DEFAULT_DIR, json=False):
    """Show role, link, LUNs, dirty/free/mirror blocks and generation per controller."""
    _tc(c, ["status", "--dir", dir] + (["--json"] if json else []))


@task(help={"dir": "scratch directory for the demo pair"})
def demo(c, dir=os.path.join(ROOT, "run", "demo")):
    """Write through NBD, SIGKILL the owner, show the partner's mirror holds it, restart, read back."""
    from hal.tools import demo as D
    D.run(dir)


@task(help={"rounds": "rounds per target (min 3)", "seconds": "seconds per fio run",
            "out": "report directory", "quick": "one short round, for a smoke test"})
def bench(c, rounds=3, seconds=5, out=os.path.join(ROOT, "bench-report"), quick=False):
    """fio against twincache, nbdkit and a qemu-storage-daemon sync mirror; ratios and a report."""
    from hal.tools import bench as B
    B.main(rounds=1 if quick else max(3, rounds), seconds=2 if quick else seconds, out_dir=out)


def add_to(ns):
    pair = Collection("pair")
    for t in (up, down, status):
        pair.add_task(t)
    ns.add_collection(pair)
    ns.add_task(demo)
    ns.add_task(bench)
