"""`python -m fuzz --target T [--seconds S | --runs N] [--replay FILE...]`: one target, one process.

Runs atheris (libFuzzer) over the target with the code under test instrumented
for coverage, seeded from fuzz/seeds/<target>/ plus a working corpus
(--corpus, new inputs land there). Prints the inputs run and inputs/s every
--report seconds and at the end; a crash stops the run, prints the traceback
and writes the input to --artifacts (exit status 1). --replay runs inputs
once, without atheris.
"""
import argparse
import importlib
import os
import sys
import time

from . import TARGETS

HERE = os.path.dirname(os.path.abspath(__file__))
INSTRUMENTED = ("firmware", "hal", "construct", "cobs")


def _load(target):
    return importlib.import_module(f"fuzz.{target}")


def _report(target, count, started, final=False):
    elapsed = max(time.monotonic() - started, 1e-9)
    tag = "done" if final else "progress"
    print(f"fuzz {target}: {tag}: {count} inputs in {elapsed:.0f} s, {count / elapsed:.0f} inputs/s",
          flush=True)


def replay(target, paths) -> int:
    one_input = _load(target).one_input
    for path in paths:
        with open(path, "rb") as f:
            one_input(f.read())
        print(f"fuzz {target}: {path}: no crash")
    return 0


def run(args) -> int:
    import atheris
    with atheris.instrument_imports(include=list(INSTRUMENTED)):
        one_input = _load(args.target).one_input
    started = time.monotonic()
    state = {"count": 0, "next": started + args.report}
    deadline = started + args.seconds if args.seconds else None

    def test_one_input(data):
        state["count"] += 1
        now = time.monotonic()
        if now >= state["next"]:
            state["next"] = now + args.report
            _report(args.target, state["count"], started)
        if (deadline and now >= deadline) or (args.runs and state["count"] > args.runs):
            state["count"] -= 1
            _report(args.target, state["count"], started, final=True)
            sys.stdout.flush()
            os._exit(0)       # libFuzzer's own exit skips Python's: report first, then leave
        one_input(data)

    os.makedirs(args.corpus, exist_ok=True)
    os.makedirs(args.artifacts, exist_ok=True)
    seeds = os.path.join(HERE, "seeds", args.target)
    argv = [sys.argv[0], args.corpus] + ([seeds] if os.path.isdir(seeds) else []) + [
            f"-artifact_prefix={os.path.join(args.artifacts, args.target)}-",
            f"-max_len={args.max_len}", f"-rss_limit_mb={args.rss_limit_mb}",
            f"-timeout={args.timeout}", "-print_final_stats=1"]
    if args.seed is not None:
        argv.append(f"-seed={args.seed}")
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__.splitlines()[0])
    p.add_argument("--target", choices=TARGETS, required=True)
    p.add_argument("--seconds", type=float, default=0, help="stop after this long (0: no limit)")
    p.add_argument("--runs", type=int, default=0, help="stop after this many inputs (0: no limit)")
    p.add_argument("--corpus", default="", help="working corpus directory (default: a temporary one)")
    p.add_argument("--artifacts", default="fuzz-artifacts", help="where crashing inputs are written")
    p.add_argument("--report", type=float, default=30, help="seconds between progress lines")
    p.add_argument("--max-len", type=int, default=8192)
    p.add_argument("--rss-limit-mb", type=int, default=1536, help="more memory than this is a crash")
    p.add_argument("--timeout", type=int, default=10, help="seconds one input may take before it is a crash")
    p.add_argument("--seed", type=int, default=None, help="libFuzzer's random seed")
    p.add_argument("--replay", nargs="*", help="run these inputs once (no atheris needed)")
    args = p.parse_args(argv)
    if args.replay is not None:
        return replay(args.target, args.replay)
    if not args.corpus:
        import tempfile
        args.corpus = tempfile.mkdtemp(prefix=f"fuzz-{args.target}-")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
