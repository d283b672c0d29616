"""`twincache top` on a real pair, driven through a real pseudo-terminal.

The command runs as a child on the far side of a pty (as in a terminal
window, 60 rows by 200 columns), against two controller processes with their
metrics endpoints on loopback, while fio writes through the owner's NBD
socket. The test reads what the terminal received, strips the escape codes,
splits it into frames at the header line and reads the tables by their own
header rows; it types q or Ctrl-C like a person would.
"""
import os
import pty
import re
import select
import signal
import subprocess
import sys
import termios
import time

import pytest

from fixtures.pair import MiB, PairHandle, make_pair, run
from hal.cli.top_data import quantile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TC = [sys.executable, "-m", "hal.cli"]
HEADER = "twincache top  "
ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>78]|\r")
# Dirty lines stay in the cache while the test looks: no idle destage, a high watermark.
KEEP_DIRTY = {"idle_flush_ms": 600_000, "high_watermark": 0.9, "low_watermark": 0.5}


def child_env():
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return dict(env, PYTHONPATH=REPO, TERM="xterm-256color")


class Terminal:
    """A child process whose stdin, stdout and stderr are a pseudo-terminal, and what it printed."""

    def __init__(self, argv, rows=60, cols=200):
        import fcntl
        import struct
        pid, fd = pty.fork()
        if pid == 0:                                    # the child: its own session, the pty its terminal
            try:
                fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
                os.chdir(REPO)
                os.execve(sys.executable, TC + list(argv), child_env())
            finally:
                os._exit(127)
        self.pid, self.fd, self.raw, self.status = pid, fd, b"", None

    def text(self) -> str:
        return ESCAPES.sub("", self.raw.decode(errors="replace"))

    def frames(self) -> list:
        return [HEADER + part for part in self.text().split(HEADER)[1:]]

    def pump(self, timeout_s):
        ready, _, _ = select.select([self.fd], [], [], timeout_s)
        if ready:
            try:
                self.raw += os.read(self.fd, 1 << 16)
            except OSError:                             # EIO: the child is gone and its output read
                time.sleep(timeout_s)

    def wait_frame(self, predicate, timeout_s, what):
        """The first frame after the ones seen so far for which predicate holds."""
        seen = len(self.frames())
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.pump(0.1)
            done = self.frames()[seen:-1]               # the last may still be arriving
            for frame in done:
                if predicate(frame):
                    return frame
            seen += len(done)
        raise AssertionError(f"no frame with {what} within {timeout_s} s; the last:\n{self.frames()[-1:]}")

    def type(self, keys: bytes):
        os.write(self.fd, keys)

    def wait_exit(self, timeout_s=30.0) -> int:     # 10 s was too short on a loaded CI machine
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.pump(0.05)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
                self.pump(0.05)
                return self.status
        raise AssertionError(f"top did not exit within {timeout_s} s")

    def close(self):
        if self.status is None:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.fd)


def table(frame, first_column) -> dict:
    """The rows of the table whose header row starts with first_column: {(col0, col1): {header: cell}}."""
    lines = frame.splitlines()
    rows = {}
    for i, line in enumerate(lines):
        if line.split()[:1] == [first_column]:
            names = line.split()
            for row in lines[i + 1:]:
                cells = row.split()
                if not cells or set(row.strip()) == {"─"}:
                    if rows:
                        break
                    continue
                if len(cells) != len(names):
                    break
                rows[(cells[0], cells[1])] = dict(zip(names, cells))
            return rows
    raise AssertionError(f"no table {first_column} in:\n{frame}")


def controllers(frame):
    return {key[0]: row for key, row in table(frame, "CTRL").items()}


def luns(frame):
    return table(frame, "LUN")


def number(cell):
    return 0.0 if cell == "-" else float(cell)


def fio_writes(uri, seconds):
    return subprocess.Popen(["fio", "--name=top", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
                             "--size=4M", "--iodepth=4", "--time_based", f"--runtime={seconds}",
                             "--output=/dev/null"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def mpair(tmp_path):
    pair = make_pair(tmp_path, luns=2, lun_size_bytes=16 * MiB, nvram_size_bytes=16 * MiB, cache=KEEP_DIRTY,
                     metrics=True)
    pair.wait_settled(owners={"lun0": "a", "lun1": "b"})
    yield pair
    pair.stop_all()


@pytest.mark.needs("fio")
def test_top_shows_writes_on_the_owner_an_ownership_move_and_its_events(mpair):
    pair = mpair
    writer = fio_writes(pair.uri("a", 0), 12)
    term = Terminal(["top", "--dir", str(pair.dir), "--interval", "0.5"])
    try:
        busy = term.wait_frame(lambda f: number(luns(f)[("lun0", "a")]["w/s"]) > 0, 20, "writes on a's lun0")
        for frame in (busy, term.wait_frame(lambda f: True, 5, "a next frame")):
            ctl, lun = controllers(frame), luns(frame)
            assert ctl["a"]["STATE"] == ctl["b"]["STATE"] == "up", frame
            assert ctl["a"]["LINK"] == ctl["b"]["LINK"] == "mirrored", frame
            assert number(ctl["a"]["w/s"]) > 0 and number(ctl["a"]["wMB/s"]) > 0, frame
            assert number(ctl["b"]["w/s"]) == 0, frame               # b owns no LUN fio writes to
            assert ctl["a"]["p50"].endswith("s") and ctl["a"]["p99"].endswith("s"), frame
            assert int(lun[("lun0", "a")]["DIRTY"]) > 0 and int(ctl["b"]["MIRROR"]) > 0, frame
            assert (lun[("lun0", "a")]["OWNERSHIP"], lun[("lun0", "b")]["OWNERSHIP"]) == ("owner", "partner")
            assert (lun[("lun1", "a")]["OWNERSHIP"], lun[("lun1", "b")]["OWNERSHIP"]) == ("partner", "owner")
            assert lun[("lun1", "b")]["GEN"].isdigit(), frame
        generation = int(luns(busy)[("lun1", "b")]["GEN"])     # 1, or more if a start under load took a claim
        term.wait_frame(lambda f: re.fullmatch(r"[\d.]+(us|ms)", controllers(f)["a"]["RTT"]), 10, "a's link RTT")
        run(TC + ["ownership", "move", "lun1", "--to", "a", "--dir", str(pair.dir)], cwd=REPO,
            env=child_env())
        moved = term.wait_frame(lambda f: luns(f)[("lun1", "a")]["OWNERSHIP"] == "owner", 10, "lun1 owned by a")
        assert luns(moved)[("lun1", "b")]["OWNERSHIP"] == "partner"
        assert int(luns(moved)[("lun1", "a")]["GEN"]) == generation + 1, moved
        events = moved[moved.index("events, both controllers"):]
        assert re.search(rf"\d\d:\d\d:\d\d\.\d{{3}}\s+b\s+handover\s+lun=1 to=a generation={generation + 1}",
                         events), events
        term.type(b"q")
        assert term.wait_exit() == 0
        assert "Traceback" not in term.text()
        attrs = termios.tcgetattr(term.fd)                        # the terminal's modes, as top left them
        assert attrs[3] & termios.ECHO and attrs[3] & termios.ICANON
    finally:
        term.close()
        writer.wait(timeout=60)
    assert writer.returncode == 0, writer.stderr.read()


def assert_fits(frame, rows, cols):
    lines = frame.rstrip("\n").splitlines()
    assert len(lines) < rows and max(len(line.rstrip()) for line in lines) <= cols, frame
    assert not re.search(r"\d…", frame), frame          # a figure is left out whole, never cut short


def test_top_in_80_columns_shows_a_stopped_then_killed_controller_and_ctrl_c_quits(mpair):
    pair = mpair
    term = Terminal(["top", "--dir", str(pair.dir), "--interval", "0.5"], rows=24, cols=80)
    try:
        up = term.wait_frame(lambda f: controllers(f)["b"]["STATE"] == "up", 20, "b up")
        assert_fits(up, 24, 80)
        assert {"LINK", "RTT", "w/s", "p99", "DIRTY"} <= set(controllers(up)["a"]) and "HOSTS" not in controllers(up)["a"]
        assert re.search(r"\n\d\d:\d\d:\d\d\.\d{3}  [ab] ", up), up      # events fill the lines left
        pair.kill("b", signal.SIGSTOP)                            # there, and not answering
        stuck = term.wait_frame(lambda f: controllers(f)["b"]["STATE"] == "unreachable", 10, "b unreachable")
        assert_fits(stuck, 24, 80)
        assert controllers(stuck)["a"]["STATE"] == "up" and "b: unreachable: timed out" in stuck, stuck
        pair.kill("b")
        down = term.wait_frame(lambda f: controllers(f)["b"]["STATE"] == "down", 5, "b down")
        assert_fits(down, 24, 80)
        assert controllers(down)["a"]["STATE"] == "up" and controllers(down)["b"]["LINK"] == "-"
        assert luns(down)[("lun0", "b")]["OWNERSHIP"] == "down"
        assert "b: stopped" in down
        # a takes b's LUN over and owns both alone ("solo": no partner to mirror to).
        took = term.wait_frame(lambda f: luns(f)[("lun1", "a")]["OWNERSHIP"] == "solo", 30, "a taking lun1 over")
        assert controllers(took)["b"]["STATE"] == "down" and controllers(took)["a"]["LINK"] == "down"
        assert int(luns(took)[("lun1", "a")]["GEN"]) >= 2
        assert re.search(r"\s+a\s+takeover\s+lun=1 generation=", took), took
        term.type(b"\x03")                                        # Ctrl-C, through the terminal's line discipline
        assert term.wait_exit() == 0
        assert "Traceback" not in term.text() and "KeyboardInterrupt" not in term.text()
    finally:
        term.close()


def test_top_once_piped_is_one_plain_frame_with_both_controllers_down(tmp_path):
    from hal.tools.pair import LocalPair
    LocalPair(tmp_path / "pair").create(luns=1, lun_size_bytes=16 * MiB, nvram_size_bytes=8 * MiB)
    out = run(TC + ["top", "--dir", str(tmp_path / "pair"), "--once", "--interval", "0.1"], cwd=REPO,
              env=child_env())
    assert out.stdout.count("twincache top") == 1 and "\x1b" not in out.stdout and out.stderr == ""
    ctl = controllers(out.stdout)
    assert ctl["a"]["STATE"] == ctl["b"]["STATE"] == "down"
    assert luns(out.stdout)[("lun0", "a")]["OWNERSHIP"] == "down"
    assert "a: stopped" in out.stdout and "(no events yet)" in out.stdout
    two = run(TC + ["top", "--dir", str(tmp_path / "pair"), "--frames", "2", "--interval", "0.1", "--events", "0"],
              cwd=REPO, env=child_env())
    assert two.stdout.count("twincache top") == 2 and "events" not in two.stdout


def test_top_killed_with_sigterm_gives_the_terminal_back(tmp_path):
    from hal.tools.pair import LocalPair
    LocalPair(tmp_path / "pair").create(luns=1, lun_size_bytes=16 * MiB, nvram_size_bytes=8 * MiB)
    term = Terminal(["top", "--dir", str(tmp_path / "pair"), "--interval", "0.2"], rows=24, cols=80)
    try:
        term.wait_frame(lambda f: controllers(f)["a"]["STATE"] == "down", 20, "a first frame")
        attrs = termios.tcgetattr(term.fd)
        assert not attrs[3] & termios.ECHO and not attrs[3] & termios.ICANON       # keys one by one
        os.kill(term.pid, signal.SIGTERM)
        assert term.wait_exit() == 128 + signal.SIGTERM and "Traceback" not in term.text()
        attrs = termios.tcgetattr(term.fd)
        assert attrs[3] & termios.ECHO and attrs[3] & termios.ICANON, "the terminal was left in cbreak mode"
    finally:
        term.close()


def test_top_on_a_log_variant_pair_leaves_both_controllers_running(tmp_path):
    # Its link round trip is asked on the control socket, where a ping used to kill a log source.
    from hal.runtime.control import request
    pair = PairHandle(tmp_path / "pair")
    try:
        pair.up(luns=1, lun_size_bytes=16 * MiB, nvram_size_bytes=16 * MiB, mode="replica", replica_variant="log",
                metrics=True)
        assert "error" in request(pair.control_path("a"), {"cmd": "ping"})
        out = run(TC + ["top", "--dir", str(pair.dir), "--frames", "2", "--interval", "0.3"], cwd=REPO,
                  env=child_env())
        last = out.stdout.split("twincache top")[-1]
        assert controllers(last)["a"]["STATE"] == controllers(last)["b"]["STATE"] == "up", out.stdout
        assert pair.pid("a") and pair.pid("b")
    finally:
        pair.stop_all()


def test_quantile_reads_histogram_buckets_like_prometheus():
    inf = float("inf")
    assert quantile(0.5, [(0.001, 0), (0.002, 10), (inf, 10)]) == pytest.approx(0.0015)
    assert quantile(0.99, [(0.001, 90), (0.01, 100), (inf, 100)]) == pytest.approx(0.0091)
    assert quantile(0.99, [(0.001, 50), (5.0, 50), (inf, 100)]) == 5.0       # beyond the last bound
    assert quantile(0.5, [(0.001, 0), (inf, 0)]) is None                   # nothing answered
