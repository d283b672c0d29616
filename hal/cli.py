"""The `twincache` command line: a stable contract for people and scripts.

Each group of subcommands lives in its own module with a `register(sub)`
function; this table names them so `hal` does not import `vm` or `board`
until their commands run. Errors a user can cause end in one line on stderr
and exit status 2 (bad input) or 1 (the operation failed).
"""
import argparse
import importlib
import sys

COMMAND_MODULES = [
    "hal.cli_controller",    # controller run, pair up/down, status, events, ownership
    "hal.cli_nvram",         # nvram dump
    "hal.cli_metrics",       # metrics
    "board.cli",             # bundle keygen|build|verify|inspect, board agent|flash
    "vm.cli",                # vm ...
]


class UsageError(Exception):
    """Bad input from the user: printed without a traceback, exit status 2."""


class CommandFailed(Exception):
    """The operation could not be done: printed without a traceback, exit status 1."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twincache", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue      # that group is not built yet
            raise
        module.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except UsageError as exc:
        print(f"twincache: {exc}", file=sys.stderr)
        return 2
    except CommandFailed as exc:
        print(f"twincache: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Run as `python -m hal.cli`: use the hal.cli module the subcommands import,
    # so their UsageError is the one caught here.
    from hal.cli import main as _main
    sys.exit(_main())
