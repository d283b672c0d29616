"""Every `twincache` command fails with one line and no traceback, in a real subprocess.

The commands are read from the argparse parser, so a new command is covered
without touching this file: each gets bad input (paths under a regular file,
a libvirt URI nobody listens on) and must exit non-zero with one line on
stderr. A closed stdout pipe ends a command quietly, and a missing optional
module (made unimportable by a finder in the child's real import machinery)
is reported with the extra that brings it.
"""
import argparse
import os
import pathlib
import subprocess
import sys
import tomllib

import pytest

from hal.cli.main import OPTIONAL_MODULES, build_parser
from hal.tools.pair import LocalPair

REPO = pathlib.Path(__file__).resolve().parent.parent
TC = [sys.executable, "-m", "hal.cli"]
MiB = 1 << 20

# Where the generic bad input is not bad for a command, the command's own (none needed yet).
BAD_INPUT = {}


def leaf_commands(parser, prefix=()):
    """(command words, parser) for every runnable command under `parser`."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from leaf_commands(sub, prefix + (name,))
            return
    yield prefix, parser


def bad_argv(words, parser, bad):
    """The command with every argument it needs set to something that cannot work."""
    if words in BAD_INPUT:
        return list(words) + BAD_INPUT[words](bad)
    argv = list(words)
    required = {a for g in parser._mutually_exclusive_groups if g.required for a in g._group_actions[:1]}
    for action in parser._actions:
        value = str(list(action.choices)[0]) if action.choices else str(bad)
        if not action.option_strings:
            argv.append(value)
        elif action.required or action in required or action.dest == "dir":
            argv += [action.option_strings[0], value]
    return argv


def run_tc(args, tmp_path, **kw):
    env = dict(os.environ, PYTHONPATH=str(REPO), TWINCACHE_VM_CACHE=str(tmp_path / "file" / "vm"),
               TWINCACHE_LIBVIRT_URI=f"qemu+unix:///system?socket={tmp_path}/file/libvirt-sock")
    return subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=REPO, env=env, **kw)


def assert_one_line_error(result, what):
    err = result.stderr.strip()
    assert result.returncode != 0, f"{what}: exit 0\n{result.stdout}"
    assert "Traceback" not in result.stderr, f"{what}:\n{result.stderr}"
    assert len(err.splitlines()) == 1 and err.startswith("twincache"), f"{what}: stderr {result.stderr!r}"


COMMANDS = [words for words, _ in leaf_commands(build_parser())]


def test_every_command_is_enumerated():
    assert ("status",) in COMMANDS and ("pair", "up") in COMMANDS and ("bundle", "keygen") in COMMANDS
    assert ("vm", "status") in COMMANDS and ("nvram", "dump") in COMMANDS
    assert set(BAD_INPUT) <= set(COMMANDS)


@pytest.mark.parametrize("words", COMMANDS, ids=" ".join)
def test_command_with_bad_input_fails_in_one_line(words, tmp_path):
    (tmp_path / "file").write_text("a regular file: nothing can live under it\n")
    parser = dict(leaf_commands(build_parser()))[words]
    argv = bad_argv(words, parser, tmp_path / "file" / "x")
    assert_one_line_error(run_tc(TC + argv, tmp_path), " ".join(argv))


@pytest.mark.parametrize("argv", [["status", "--dir", "{tmp}/nothing"], ["events", "--dir", "{tmp}"],
                                  ["status"], ["pair", "up", "--dir", "{tmp}/p", "--lun-size", "lots"],
                                  ["ownership", "move", "lunx", "--to", "c", "--dir", "{tmp}"], ["frobnicate"],
                                  ["top", "--dir", "{tmp}/nothing"], ["top", "--dir", "{tmp}", "--once"],
                                  ["top", "--dir", "{tmp}", "--interval", "0"],
                                  ["top", "--dir", "{tmp}", "--frames", "0"]])
def test_usage_errors_exit_2(argv, tmp_path):
    argv = [a.format(tmp=tmp_path) for a in argv]
    result = run_tc(TC + argv, tmp_path)
    assert_one_line_error(result, " ".join(argv))
    assert result.returncode == 2


def test_no_pair_names_the_directory(tmp_path):
    result = run_tc(TC + ["events", "--dir", str(tmp_path)], tmp_path)
    assert result.stderr.strip() == (f"twincache: {tmp_path}: no pair here "
                                      f"(run `twincache pair up --dir {tmp_path}`)")


@pytest.fixture
def pair_with_many_events(tmp_path):
    """A pair's directory (never started) whose event files hold far more than a pipe buffer."""
    pair = LocalPair(tmp_path / "pair")
    pair.create(luns=1, lun_size_bytes=16 * MiB, nvram_size_bytes=8 * MiB)
    for n, name in enumerate("ab"):
        with open(pair.dir / name / "events.jsonl", "w") as f:
            for i in range(20000):
                f.write(f'{{"ts": {1000 + i + n / 2}, "controller": "{name}", "kind": "filler", "i": {i}}}\n')
    return pair


@pytest.mark.parametrize("command", [["events"], ["top", "--interval", "0.1"]], ids=" ".join)
def test_closed_pipe_exits_quietly(pair_with_many_events, command):
    proc = subprocess.Popen(TC + command + ["--dir", str(pair_with_many_events.dir)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.stdout.read(1)
    proc.stdout.close()                        # the reader goes away, like `| head -c1`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and err == "", err


def test_top_closed_pipe_exits_quietly(pair_with_many_events, tmp_path):
    # A pair whose controllers are not running: top draws them down, frame after frame.
    line = " ".join(TC) + f" top --dir {pair_with_many_events.dir} --interval 0.1 | head -n1"
    result = run_tc(["sh", "-c", line], tmp_path)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.startswith("twincache top ")


def test_closed_pipe_in_a_shell_pipeline(pair_with_many_events, tmp_path):
    line = " ".join(TC) + f" events --dir {pair_with_many_events.dir} | head -n1"
    result = run_tc(["sh", "-c", line], tmp_path)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert '"kind": "filler"' in result.stdout and len(result.stdout.splitlines()) == 1


BLOCK_MODULE = """
import sys
class Unimportable:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == {module!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Unimportable())
sys.modules.pop({module!r}, None)
from hal.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("module,argv,extra", [
    ("cryptography", ["bundle", "keygen", "{tmp}/key"], "board"),
    ("libvirt", ["vm", "status"], "vm"),
    ("rich", ["top", "--dir", "{tmp}"], "top"),
])
def test_missing_optional_module_names_the_extra(module, argv, extra, tmp_path):
    argv = [a.format(tmp=tmp_path) for a in argv]
    result = run_tc([sys.executable, "-c", BLOCK_MODULE.format(module=module), *argv], tmp_path)
    assert_one_line_error(result, " ".join(argv))
    assert f"install twincache[{extra}]" in result.stderr and module in result.stderr
    assert not (tmp_path / "key").exists()


def test_optional_modules_match_the_extras():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    dists = {"cryptography": "cryptography", "usb": "pyusb", "libvirt": "libvirt-python",
             "matplotlib": "matplotlib", "rich": "rich"}
    assert set(OPTIONAL_MODULES) == set(dists)
    for module, extra in OPTIONAL_MODULES.items():
        assert any(dep.startswith(dists[module]) for dep in extras[extra]), (module, extra)
