"""One frame of `twincache top`, drawn with rich from two rounds of samples (hal/top_data.py).

Three sections: one row per controller, one row per LUN and controller, and
the most recent events of both, oldest first. Every cell but an event's
details is one word (no spaces), so a frame stays readable when piped and a
script can split a row on whitespace. A figure that cannot be known (no earlier sample yet, metrics
off, the controller down) is "-", never 0.
"""
from __future__ import annotations

import dataclasses
import datetime
import json

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from .top_data import NAMES, Rates, Sample, rates

HEADER = "twincache top"
EVENT_SKIP_FIELDS = ("ts", "controller", "kind")


@dataclasses.dataclass
class Frame:
    directory: str
    interval_s: float
    wall_s: float                       # time.time() of the samples, for the clock in the header
    cur: dict                           # name -> Sample
    prev: dict                          # name -> Sample of the round before (or missing)
    events: list                        # event dicts, oldest first
    live: bool = False                  # drawn in place on a terminal: say how to quit
    luns: tuple = ()                    # the pair's LUNs (pair.json), shown even while both are down


def render(frame: Frame):
    parts = [_header(frame), _controllers(frame), _luns(frame), _events(frame)]
    notes = _notes(frame)
    if notes:
        parts.append(notes)
    return Group(*parts)


def _header(frame):
    clock = datetime.datetime.fromtimestamp(frame.wall_s).strftime("%Y-%m-%d %H:%M:%S")
    text = Text(HEADER, style="bold")
    text.append(f"  {frame.directory}  every {frame.interval_s:g} s  {clock}")
    if frame.live:
        text.append("  (q quits)", style="dim")
    return text


def _table(title, *columns):
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1), title=title,
                  title_justify="left", title_style="bold")
    for name in columns:
        left = name in ("CTRL", "LUN", "STATE", "ROLE", "LINK", "OWNERSHIP", "DISK")
        table.add_column(name, justify="left" if left else "right", no_wrap=True, overflow="ellipsis")
    return table


RATE_COLUMNS = ("r/s", "w/s", "rMB/s", "wMB/s", "p50", "p99")


def _controllers(frame):
    table = _table("controllers", "CTRL", "STATE", "PID", "ROLE", "LINK", "RTT", "GEN", *RATE_COLUMNS, "DIRTY", "MIRROR", "HOSTS")
    for name in NAMES:
        s = frame.cur[name]
        if s.status is None:
            table.add_row(name, Text("down", style="bold red"), *["-"] * 14)
            continue
        st = s.status
        link = str(st.get("link", "-"))
        table.add_row(name, Text("up", style="green"), str(st.get("pid", "-")), str(st.get("role", "-")),
                      Text(link, style="green" if link in ("mirrored", "shipping") else "yellow"),
                      _duration(s.link_rtt_s), _int(st.get("generation")),
                      *_rate_cells(rates(frame.prev.get(name), s)),
                      _int(st.get("dirty_blocks")), _int(st.get("mirror_blocks")), _int(st.get("nbd_clients")))
    return table


def _luns(frame):
    table = _table("LUNs (one row per controller)", "LUN", "CTRL", "OWNERSHIP", "GEN", *RATE_COLUMNS, "DIRTY", "DISK")
    luns = sorted(set(frame.luns) | {lun for s in frame.cur.values() for lun in _lun_names(s)}, key=_lun_order)
    for lun in luns:
        for name in NAMES:
            s = frame.cur[name]
            if s.status is None:
                table.add_row(lun, name, Text("down", style="red"), *["-"] * 9)
                continue
            info = (s.status.get("luns") or {}).get(lun, {})
            state = str(info.get("state", "-"))
            disk = ((s.status.get("disks") or {}).get(lun) or {}).get("state", "-")
            table.add_row(lun, name, Text(state, style="bold" if state == "owner" else ""),
                          _int(info.get("generation")), *_rate_cells(rates(frame.prev.get(name), s, lun)),
                          _int(info.get("dirty_lines")),
                          Text(str(disk), style="" if disk in ("ok", "-") else "bold red"))
    return table


def _lun_names(sample: Sample):
    st = sample.status or {}
    names = set(st.get("luns") or {}) | set(st.get("exports") or {})
    if sample.counters is not None:
        names |= {lun for lun, _op in sample.counters.requests if lun}
    return names


def _lun_order(name):
    digits = name[3:] if name.startswith("lun") else ""
    return (0, int(digits), name) if digits.isdigit() else (1, 0, name)


def _events(frame):
    table = _table("events, both controllers, latest last", "TIME", "CTRL", "EVENT", "DETAILS")
    table.columns[0].justify = "left"
    table.columns[2].justify = "left"
    table.columns[3].justify = "left"
    for e in frame.events:
        try:
            when = datetime.datetime.fromtimestamp(float(e.get("ts", 0))).strftime("%H:%M:%S.%f")[:-3]
        except (TypeError, ValueError, OverflowError):
            when = "-"
        details = " ".join(f"{k}={_field(v)}" for k, v in e.items() if k not in EVENT_SKIP_FIELDS)
        table.add_row(when, str(e.get("controller", "-")), str(e.get("kind", "-")), details)
    if not frame.events:
        table.add_row("-", "-", "(no events yet)", "")
    return table


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
    return [f"{r.r_iops:.0f}", f"{r.w_iops:.0f}", f"{r.r_mbs:.1f}", f"{r.w_mbs:.1f}",
            _duration(r.p50_s), _duration(r.p99_s)]


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
