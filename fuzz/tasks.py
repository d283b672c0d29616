"""invoke task for the fuzzers: `inv fuzz`.

`add_to(ns)` adds it to the root collection of tasks.py.
  inv fuzz --target nbd|link|formats|nvram|all --minutes M   (all: one target after another)
  inv fuzz --target T --runs N                               (stop after N inputs instead)
  inv fuzz --target T --replay FILE                          (run one input, no atheris needed)
Needs the `fuzz` extra (atheris). Prints inputs run and inputs/s as it goes and
at the end; a crash stops a target, prints its traceback and leaves the input
under --artifacts; its working corpus stays under --corpus/<target>.
"""
import os
import re
import subprocess
import sys
import time

from invoke import task

TARGETS = ("nbd", "link", "formats", "nvram")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DONE = re.compile(r"fuzz (\w+): done: (\d+) inputs in (\d+) s, (\d+) inputs/s")
_UNITS = re.compile(r"stat::number_of_executed_units: +(\d+)")     # libFuzzer's count, after a crash


def run_target(target, seconds=0.0, runs=0, corpus="", artifacts="fuzz-artifacts", report=30,
               extra=(), quiet=False):
    """Run one target in its own process; return (exit status, inputs, seconds, output lines)."""
    cmd = [sys.executable, "-m", "fuzz", "--target", target, "--report", str(report),
           "--artifacts", artifacts, *extra]
    cmd += ["--seconds", str(seconds)] if seconds else []
    cmd += ["--runs", str(runs)] if runs else []
    cmd += ["--corpus", os.path.join(corpus, target)] if corpus else []
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, inputs = [], 0
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        keep = line.startswith("fuzz ") or not line.startswith(("#", "INFO:", "WARNING:"))
        if keep and not quiet:
            print(line, end="", flush=True)
        match = _DONE.match(line) or _UNITS.match(line)
        if match:
            inputs = int(match.group(2 if match.re is _DONE else 1))
    status = proc.wait()
    return status, inputs, time.monotonic() - started, lines


@task(help={"target": "nbd, link, formats, nvram or all", "minutes": "per target", "runs": "inputs per target",
            "corpus": "working corpora go to CORPUS/<target> (default: temporary)",
            "artifacts": "where crashing inputs are written", "replay": "run this input once"})
def fuzz(c, target="all", minutes=1.0, runs=0, corpus="", artifacts="fuzz-artifacts", replay=""):
    """Coverage-guided fuzzing (atheris) of the NBD engine, the link, the formats and NVRAM recovery."""
    targets = TARGETS if target == "all" else (target,)
    if target not in TARGETS + ("all",):
        raise SystemExit(f"fuzz: no target {target!r}; choose from {', '.join(TARGETS)} or all")
    if replay:
        from . import __main__ as runner
        raise SystemExit(runner.main(["--target", target, "--replay", replay]))
    results = []
    for name in targets:
        status, inputs, seconds, _ = run_target(name, 0 if runs else float(minutes) * 60, runs, corpus, artifacts)
        results.append((name, status, inputs, seconds))
    print("\nfuzz summary:")
    for name, status, inputs, seconds in results:
        verdict = "ok" if status == 0 else f"CRASH (exit {status}, input under {artifacts})"
        print(f"  {name:8} {inputs:>10} inputs {seconds / 60:6.1f} min {inputs / max(seconds, 1e-9):8.0f} inputs/s  {verdict}")
    if any(status for _, status, _, _ in results):
        raise SystemExit(1)


def add_to(ns):
    ns.add_task(fuzz)
