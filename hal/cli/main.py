"""The `twincache` command line: a stable contract for people and scripts.

Each group of subcommands lives in its own module with a `register(sub)`
function; this table names them so `hal` does not import `vm` or `board`
until their commands run. Errors a user can cause end in one line on stderr
and exit status 2 (bad input) or 1 (the operation failed), never a
traceback: argparse's complaints too, a pair that is not there, an OS error
on a path, and a missing optional dependency (named with the extra that
brings it). A closed stdout (`twincache events --dir D | head -1`) ends the
command quietly with status 141, as SIGPIPE would.
"""
import argparse
import importlib
import os
import sys

from hal.cli.errors import CommandFailed, UsageError

COMMAND_MODULES = [
    "hal.cli.controller",    # controller run, pair up/down, status, events, ownership, promote, demote
    "hal.cli.nvram",         # nvram dump
    "hal.cli.provision",     # provision (pair key, disk labels)
    "hal.cli.metrics",       # metrics
    "hal.cli.top",           # top
    "board.cli",             # bundle keygen|build|verify|inspect, board agent|flash
    "vm.cli",                # vm ...
]

# Optional modules -> the extra of pyproject.toml that brings them (a test keeps the two in step).
OPTIONAL_MODULES = {"cryptography": "board", "usb": "board", "libvirt": "vm",
                    "matplotlib": "dev", "rich": "top"}
EXIT_BROKEN_PIPE = 128 + 13     # what a shell reports for a process ended by SIGPIPE


class Parser(argparse.ArgumentParser):
    """argparse, with its complaint on one line (the usage is one `--help` away)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="twincache", description=__doc__.splitlines()[0])
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


def missing_module_message(exc: ModuleNotFoundError) -> str:
    top = (exc.name or "").partition(".")[0]
    extra = OPTIONAL_MODULES.get(top)
    if extra is None:
        return f"the Python module {top or exc.name!r} is missing (a broken install? reinstall twincache)"
    return f"this command needs the {top!r} module: install twincache[{extra}] (pip install 'twincache[{extra}]')"


def _quiet_stdout():
    """stdout's reader is gone: point fd 1 at /dev/null so the exit-time flush cannot complain."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv=None) -> int:
    from hal.tools.pair import PairError
    try:
        args = build_parser().parse_args(argv)     # inside: `--help | head -1` closes the pipe too
        status = args.func(args) or 0
        sys.stdout.flush()
        return status
    except UsageError as exc:
        return _fail(exc, 2)
    except (CommandFailed, PairError) as exc:
        return _fail(exc, 1)
    except ModuleNotFoundError as exc:
        return _fail(missing_module_message(exc), 1)
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(f"{where}{exc.strerror or exc}", 1)
    except KeyboardInterrupt:
        return 130


def _fail(message, status: int) -> int:
    print(f"twincache: {message}", file=sys.stderr)
    return status

