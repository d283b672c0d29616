"""One frame of `twincache top`, drawn with rich from two rounds of samples (hal/cli/top_data.py).

Three sections: one row per controller, one row per LUN and controller, and
the most recent events of both, oldest first. Every cell but an event's
details is one word (no spaces), so a frame stays readable when piped and a
script can split a row on whitespace. A figure that cannot be known (no
earlier sample yet, metrics off, the controller down) is "-", never 0.
"""
from __future__ import annotations

import dataclasses
import datetime
import json

from rich import box
from rich.console import Group
from rich.cells import cell_len
from rich.table import Table
from rich.text import Text

from hal.cli.top_data import NAMES, Rates, Sample, rates

HEADER = "twincache top"
EVENT_SKIP_FIELDS = ("ts", "controller", "kind")


@dataclasses.dataclass
class Frame:
    directory: str
    interval_s: float
    wall_s: float                       # time.time() of the samples, for the clock in the header
    cur: dict                           # name -> Sample
    prev: dict                          # name -> Sample of the round before (or missing)
    events: list | None                 # event dicts, oldest first; None: no events section
    live: bool = False                  # redrawn on a terminal: events fit its height; say how to quit
    luns: tuple = ()                    # the pair's LUNs (pair.json), shown even while both are down


def render(frame: Frame, console):
    """The frame as a rich renderable, fitted to the console: columns that do not fit are left out
    (the least useful first), never cut; on a terminal the events get the lines that are left."""
    width = console.width
    parts = [_header(frame), _controllers(frame, width), _luns(frame, width)]
    notes = _notes(frame)
    if notes:
        parts.append(notes)
    events = frame.events
    if frame.live and events is not None:
        used = len(console.render_lines(Group(*parts), console.options.update(width=width), pad=False))
        room = console.height - used - EVENT_TABLE_LINES - 1       # the last line: the cursor's
        events = events[-room:] if room > 0 else None
    if events is not None:
        parts.append(_events(events))
    return Group(*parts)


def _header(frame):
    clock = datetime.datetime.fromtimestamp(frame.wall_s).strftime("%H:%M:%S")
    text = Text(HEADER, style="bold", no_wrap=True, overflow="ellipsis")
    text.append(f"  {clock}  every {frame.interval_s:g} s  {frame.directory}")
    if frame.live:
        text.append("  (q quits)", style="dim")
    return text


LEFT = ("CTRL", "LUN", "STATE", "ROLE", "LINK", "OWNERSHIP", "DISK", "TIME", "EVENT", "DETAILS")
COLUMN_GAP = 2
EVENT_TABLE_LINES = 3                   # title, header, rule


def _table(title, columns, rows, width=None, drop=()):
    """A table of one-line cells. Past `width`, columns in `drop` go, in that order, until it fits;
    the rest keep their full width (a figure cut short would be a wrong figure)."""
    need = {c: max([cell_len(c)] + [Text(str(r[i])).cell_len for r in rows]) for i, c in enumerate(columns)}
    keep = list(columns)
    for name in drop:
        if width is None or sum(need[c] for c in keep) + COLUMN_GAP * (len(keep) - 1) <= width:
            break
        keep.remove(name)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0), title=title,
                  title_justify="left", title_style="bold")
    for name in keep:
        table.add_column(name, justify="left" if name in LEFT else "right", no_wrap=True, overflow="ellipsis",
                         min_width=None if name == "DETAILS" else need[name])
    for row in rows:
        table.add_row(*[row[columns.index(name)] for name in keep])
    return table


RATE_COLUMNS = ("r/s", "w/s", "rMB/s", "wMB/s", "p50", "p99")
CONTROLLER_COLUMNS = ("CTRL", "STATE", "PID", "ROLE", "LINK", "RTT", "GEN", *RATE_COLUMNS, "DIRTY", "MIRROR", "HOSTS")
CONTROLLER_DROP = ("HOSTS", "PID", "ROLE", "MIRROR", "GEN", "rMB/s", "RTT", "r/s", "p50")
LUN_COLUMNS = ("LUN", "CTRL", "OWNERSHIP", "GEN", *RATE_COLUMNS, "DIRTY", "DISK")
LUN_DROP = ("DISK", "rMB/s", "GEN", "r/s", "p50")


def _controllers(frame, width=None):
    rows = []
    for name in NAMES:
        s = frame.cur[name]
        if s.status is None:
            rows.append([name, Text(_down_word(s), style="bold red")] + ["-"] * (len(CONTROLLER_COLUMNS) - 2))
            continue
        st = s.status
        link = str(st.get("link", "-"))
        rows.append([name, Text("up", style="green"), str(st.get("pid", "-")), str(st.get("role", "-")),
                     Text(link, style="green" if link in ("mirrored", "shipping") else "yellow"),
                     _duration(s.link_rtt_s), _int(st.get("generation")),
                     *_rate_cells(rates(frame.prev.get(name), s)),
                     _int(st.get("dirty_blocks")), _int(st.get("mirror_blocks")), _int(st.get("nbd_clients"))])
    return _table("controllers", CONTROLLER_COLUMNS, rows, width, CONTROLLER_DROP)


def _luns(frame, width=None):
    rows = []
    luns = sorted(set(frame.luns) | {lun for s in frame.cur.values() for lun in _lun_names(s)}, key=_lun_order)
    for lun in luns:
        for name in NAMES:
            s = frame.cur[name]
            if s.status is None:
                rows.append([lun, name, Text(_down_word(s), style="red")] + ["-"] * (len(LUN_COLUMNS) - 3))
                continue
            info = (s.status.get("luns") or {}).get(lun, {})
            state = str(info.get("state", "-"))
            disk = str(((s.status.get("disks") or {}).get(lun) or {}).get("state", "-"))
            rows.append([lun, name, Text(state, style="bold" if state == "owner" else ""),
                         _int(info.get("generation")), *_rate_cells(rates(frame.prev.get(name), s, lun)),
                         _int(info.get("dirty_lines")), Text(disk, style="" if disk in ("ok", "-") else "bold red")])
    return _table("LUNs (one row per controller)", LUN_COLUMNS, rows, width, LUN_DROP)


def _down_word(sample: Sample) -> str:
    """"down" when no process runs; "unreachable" when one does and does not answer (stopped, stuck)."""
    return "unreachable" if sample.down == "unreachable" else "down"


def _lun_names(sample: Sample):
    st = sample.status or {}
    names = set(st.get("luns") or {}) | set(st.get("exports") or {})
    if sample.counters is not None:
        names |= {lun for lun, _op in sample.counters.requests if lun}
    return names


def _lun_order(name):
    digits = name[3:] if name.startswith("lun") else ""
    return (0, int(digits), name) if digits.isdigit() else (1, 0, name)


def _events(events):
    rows = []
    for e in events:
        try:
            when = datetime.datetime.fromtimestamp(float(e.get("ts", 0))).strftime("%H:%M:%S.%f")[:-3]
        except (TypeError, ValueError, OverflowError):
            when = "-"
        details = " ".join(f"{k}={_field(v)}" for k, v in e.items() if k not in EVENT_SKIP_FIELDS)
        rows.append([when, str(e.get("controller", "-")), str(e.get("kind", "-")), details])
    if not events:
        rows.append(["-", "-", "(no events yet)", ""])
    return _table("events, both controllers, latest last", ("TIME", "CTRL", "EVENT", "DETAILS"), rows)


def _field(value):
    return value if isinstance(value, str) and " " not in value else json.dumps(value, separators=(",", ":"))


def _notes(frame):
    lines = []
    for name in NAMES:
        s = frame.cur[name]
        if s.status is None:
            lines.append(f"{name}: {s.down}: {s.error}" if s.error else f"{name}: {s.down}")
        elif s.metrics_error:
            lines.append(f"{name}: no metrics: {s.metrics_error}")
        elif s.counters is None:
            lines.append(f"{name}: metrics are off (no [metrics] listen): no rates or latencies")
        elif frame.prev.get(name) is None or rates(frame.prev[name], s) is None:
            lines.append(f"{name}: rates from the next refresh on")
    return Text("\n".join(lines), style="dim") if lines else None


def _rate_cells(r: Rates | None):
    if r is None:
        return ["-"] * len(RATE_COLUMNS)
    return [f"{r.r_iops:.0f}", f"{r.w_iops:.0f}", _mbs(r.r_mbs), _mbs(r.w_mbs), _duration(r.p50_s), _duration(r.p99_s)]


def _mbs(value):
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"      # 20 writes of 4 KiB a second still show


def _duration(seconds):
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f}us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f}ms"
    return f"{seconds:.2f}s"


def _int(value):
    return str(value) if isinstance(value, int) else "-"
