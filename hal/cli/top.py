"""CLI: `twincache top --dir DIR`, a refreshing view of a local pair (like `iostat -x 1`).

Each refresh samples both controllers (hal/cli/top_data.py) and draws a frame
(hal/cli/top_view.py). On a terminal the frame is redrawn in place and q or
Ctrl-C quits, leaving the last frame on the screen and the terminal as it
was; piped, frames follow one another as plain text, and a closed pipe ends
the command quietly (status 141, like every command). `--once` prints one
frame, its rates over one interval, for scripts. A controller that is down
is drawn as down; the view goes on.
"""
import os
import select
import signal
import sys
import time

from hal.cli.errors import UsageError

INTERVAL_MIN_S = 0.1
PIPE_WIDTH = 132                # columns of a frame that is not going to a terminal (unless $COLUMNS)


def register(sub):
    t = sub.add_parser("top", help="a live view of a local pair: I/O rates, latency, dirty blocks, link, "
                                   "ownership, recent events",
                       description="A refreshing view of both controllers of the pair under DIR: per "
                                   "controller and LUN, reads and writes per second, MB/s, latency p50/p99 "
                                   "(from the metrics endpoints), dirty blocks, link state and round trip, "
                                   "ownership and generation; and the most recent events. q or Ctrl-C quits.")
    t.add_argument("--dir", required=True)
    t.add_argument("--interval", type=float, default=1.0, metavar="S", help="seconds between refreshes (default 1)")
    t.add_argument("--once", action="store_true", help="print one frame (rates over one interval) and exit")
    t.add_argument("--frames", type=int, metavar="N", help="exit after N frames")
    t.add_argument("--events", type=int, default=8, metavar="N", help="at most N recent events (default 8; fewer when the terminal is short)")
    t.set_defaults(func=cmd_top)


def cmd_top(args):
    import rich  # noqa: F401  (first: without it, the error names the extra that brings it)
    from hal.tools.pair import LocalPair, PairError
    if not args.interval >= INTERVAL_MIN_S:
        raise UsageError(f"--interval {args.interval:g}: give at least {INTERVAL_MIN_S} seconds")
    if args.frames is not None and args.frames < 1:
        raise UsageError(f"--frames {args.frames}: give 1 or more")
    if args.events < 0:
        raise UsageError(f"--events {args.events}: give 0 or more")
    pair = LocalPair(args.dir)
    try:
        pair.meta()
    except PairError as exc:
        raise UsageError(str(exc)) from None
    frames = 1 if args.once else args.frames
    # A polite kill (timeout, kill PID) leaves through the with-block too, so the terminal gets its
    # echo and line editing back; the status is still what SIGTERM's is.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    # Ctrl-C quits even when this process was started with SIGINT ignored, as a non-interactive
    # shell starts what it puts in the background (and so a CI job's tests): Python then leaves
    # SIGINT ignored, and a live view could not be left (two CI runs).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with Screen(live=not args.once) as screen:
            _loop(pair, args, frames, screen)
    except KeyboardInterrupt:
        pass                    # Ctrl-C is how a live view is left: not an error
    return 0


def _loop(pair, args, frames, screen):
    from hal.cli.top_data import NAMES, EventTail, take_sample
    from hal.cli.top_view import Frame, render
    timeout_s = max(0.5, min(2.0, args.interval))
    tail = EventTail(pair.dir, args.events) if args.events else None
    luns = tuple(f"lun{i}" for i in range(int(pair.meta().get("luns", 0))))
    prev = {}
    if args.once:               # rates need an earlier sample: take it, one interval before the frame
        prev = {name: take_sample(pair, name, timeout_s) for name in NAMES}
        time.sleep(args.interval)
    shown = 0
    while True:
        started = time.monotonic()
        cur = {name: take_sample(pair, name, timeout_s) for name in NAMES}
        frame = Frame(str(pair.dir), args.interval, time.time(), cur, prev, tail.poll() if tail else None,
                      live=screen.live is not None, luns=luns)
        screen.show(render(frame, screen.console))
        prev = cur
        shown += 1
        if frames is not None and shown >= frames:
            return
        if screen.wait_for_quit(args.interval - (time.monotonic() - started)):
            return


class Screen:
    """Where frames go: redrawn in place on a terminal (rich's Live), or printed one after another.
    On a terminal stdin is read key by key (no echo) while the view runs, and restored after."""

    def __init__(self, live: bool):
        from rich.console import Console

        class QuietConsole(Console):
            def on_broken_pipe(self):
                self.quiet = True       # the reader left: hand it to the CLI's closed-pipe exit
                raise BrokenPipeError(32, "the reader of stdout is gone")

        tty = sys.stdout.isatty()
        width = None if tty else int(os.environ.get("COLUMNS", "0") or 0) or PIPE_WIDTH
        self.console = QuietConsole(highlight=False, width=width)
        self.live = None
        if live and self.console.is_terminal:
            from rich.live import Live
            self.live = Live(console=self.console, auto_refresh=False, redirect_stdout=False,
                             redirect_stderr=False)
        self.stdin_fd = sys.stdin.fileno() if live and sys.stdin is not None and sys.stdin.isatty() else None
        self.saved_tty = None
        self.printed = 0

    def __enter__(self):
        if self.stdin_fd is not None:
            import termios
            import tty
            self.saved_tty = termios.tcgetattr(self.stdin_fd)
            tty.setcbreak(self.stdin_fd)        # keys arrive one by one; Ctrl-C still interrupts
        if self.live is not None:
            self.live.start()
        return self

    def __exit__(self, *exc):
        try:
            if self.live is not None:
                self.live.stop()
        finally:
            if self.saved_tty is not None:
                import termios
                termios.tcsetattr(self.stdin_fd, termios.TCSADRAIN, self.saved_tty)
        return False

    def show(self, renderable):
        if self.live is not None:
            self.live.update(renderable, refresh=True)
            return
        if self.printed:
            self.console.print()
        self.console.print(renderable)
        self.printed += 1

    def wait_for_quit(self, timeout_s: float) -> bool:
        """Sleep for timeout_s; True as soon as q is pressed."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self.stdin_fd is None:
                time.sleep(left)
                continue
            ready, _, _ = select.select([self.stdin_fd], [], [], left)
            if ready:
                data = os.read(self.stdin_fd, 64)
                if not data:
                    self.stdin_fd = None        # stdin closed: go on until Ctrl-C or --frames
                elif b"q" in data.lower():
                    return True
