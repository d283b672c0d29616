"""When the VM pair's controllers serve, and what `twincache vm status --json` reports.

A guest's TWINCACHE-READY marker only says its init reached the command; the
controller then takes 10-30 s under TCG to start, and until it listens, the
user-mode network forward accepts a host connection and closes it at once
(a client sees "Failed to read initial magic"). So `wait_serving` waits, per
guest, for three things in turn: the console marker, a real NBD handshake
through the forward that lists the expected exports, and (where the guests'
event logs are readable here) every LUN settled on one owner with the other
controller its partner, as `pair up` waits for a mirrored local pair.

Rules: every wait has one overall deadline and fails with a `VmError` that
names what was missing and the console tail; progress goes to `out` at each
step and every PROGRESS_INTERVAL_S meanwhile. The guests' control sockets are
not reachable from the host: roles and link state come from their events.
"""
from __future__ import annotations

import json
import time

from hal.host import nbd
from vm import assets
from vm.pair import NAMES, VmError, _tail

PROGRESS_INTERVAL_S = 10.0
PROBE_TIMEOUT_S = 3.0
POLL_INTERVAL_S = 0.5


def export_names(pair) -> list[str]:
    """The controller's exports: one LUN per shared disk (hal/runtime/loop.py names them lunN)."""
    return [f"lun{i}" for i in range(pair.config.disk_count)]


def export_uris(pair, name: str) -> dict[str, str]:
    host, port = pair.nbd_address(name)
    return {lun: nbd.nbd_uri_tcp(host, port, lun) for lun in export_names(pair)}


def probe_exports(pair, name: str, timeout_s: float = PROBE_TIMEOUT_S) -> list[str]:
    """A real NBD handshake (fixed newstyle, NBD_OPT_LIST) through the forward; raises on failure."""
    from board.service import nbd_probe
    return nbd_probe(("tcp", pair.nbd_address(name)), timeout_s=timeout_s)


def read_events(pair, name: str) -> list[dict] | None:
    """The controller's events since its last start, or None if its log is not readable here."""
    path = pair.state_dir(name) / name / "events.jsonl"
    try:
        lines = path.read_text().splitlines(keepends=True)
    except FileNotFoundError:
        return None
    events = []
    for line in lines:
        if line.endswith("\n"):          # a line still being written is read next time
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
    starts = [i for i, e in enumerate(events) if e.get("kind") == "serving"]
    return events[starts[-1]:] if starts else []


def lun_states(events: list[dict]) -> dict[str, str]:
    """{lunN: ownership state} from a controller's last `ownership_state` event per LUN."""
    return {f"lun{e['lun']}": e["new"] for e in events if e.get("kind") == "ownership_state"}


def link_state(events: list[dict]) -> str:
    kinds = [e["kind"] for e in events if e.get("kind") in ("link_up", "link_down")]
    return {"link_up": "up", "link_down": "down"}.get(kinds[-1], "unknown") if kinds else "unknown"


def settled(pair) -> bool | None:
    """True when every LUN has one owner and the other controller is its partner; None when
    the events cannot be read here (a remote libvirt host)."""
    events = {name: read_events(pair, name) for name in NAMES}
    if any(e is None for e in events.values()):
        return None
    states = {name: lun_states(e) for name, e in events.items()}
    return all({states["a"].get(lun), states["b"].get(lun)} == {"owner", "partner"}   # None sorts with no str
               for lun in export_names(pair))


class _Waiter:
    """One guest's progress towards serving: booting -> booted -> serving."""

    def __init__(self, pair, name: str):
        self.pair, self.name = pair, name
        self.step, self.last_error = "booting", ""

    def advance(self) -> None:
        if self.step == "booting" and self._marker():
            self.step = "booted"
        if self.step == "booted":
            try:
                found = probe_exports(self.pair, self.name)
            except Exception as exc:          # HealthError or OSError: not serving yet
                self.last_error = str(exc)
                return
            missing = set(export_names(self.pair)) - set(found)
            if missing:
                self.last_error = f"exports {sorted(found)} lack {sorted(missing)}"
                return
            self.step = "serving"

    def _marker(self) -> bool:
        text = self.pair.console(self.name)
        if "TWINCACHE-FATAL" in text or not self.pair.is_running(self.name):
            raise VmError(f"{self.pair.domain_name(self.name)} stopped or failed before serving NBD:\n"
                          + _tail(text))
        return f"{assets.READY_MARKER} name={self.name}" in text


def wait_serving(pair, timeout_s: float, out=print, names=NAMES) -> float:
    """Until each guest's controller answers an NBD handshake listing its LUNs and the LUNs
    have settled (owner and partner); returns the seconds waited."""
    t0 = time.monotonic()
    deadline, next_note = t0 + timeout_s, t0 + PROGRESS_INTERVAL_S
    waiters = [_Waiter(pair, name) for name in names]
    seen = {w.name: w.step for w in waiters}
    while True:
        for w in waiters:
            w.advance()
            if w.step != seen[w.name]:
                seen[w.name] = w.step
                out(f"vm: {w.name}: {_describe(pair, w)} after {time.monotonic() - t0:.1f} s")
        if all(w.step == "serving" for w in waiters) and settled(pair) is not False:
            return time.monotonic() - t0
        now = time.monotonic()
        if now > deadline:
            raise VmError(_timeout_message(pair, waiters, timeout_s))
        if now > next_note:
            next_note = now + PROGRESS_INTERVAL_S
            out(f"vm: waiting ({now - t0:.0f} s): " + ", ".join(_pending(pair, w) for w in waiters))
        time.sleep(POLL_INTERVAL_S)


def _describe(pair, w: _Waiter) -> str:
    host, port = pair.nbd_address(w.name)
    return {"booted": "booted (TWINCACHE-READY), waiting for its controller",
            "serving": f"controller serves NBD on {host}:{port}"}[w.step]


def _pending(pair, w: _Waiter) -> str:
    if w.step == "serving":
        return f"{w.name} serving" + ("" if settled(pair) else ", LUN ownership not settled yet")
    return f"{w.name} {w.step}" + (f" ({w.last_error})" if w.last_error else "")


def _timeout_message(pair, waiters: list, timeout_s: float) -> str:
    late = [w for w in waiters if w.step != "serving"]
    if not late:
        states = {name: lun_states(read_events(pair, name) or []) for name in NAMES}
        return f"the controllers serve NBD but LUN ownership did not settle within {timeout_s:.0f} s: {states}"
    w = late[0]
    host, port = pair.nbd_address(w.name)
    what = "no TWINCACHE-READY marker" if w.step == "booting" else \
        f"its controller does not serve NBD on {host}:{port} (last probe: {w.last_error})"
    return (f"{pair.domain_name(w.name)}: {what} within {timeout_s:.0f} s; console tail:\n"
            + _tail(pair.console(w.name)))


def status_report(pair, probe: bool = True) -> dict:
    """`vm status --json`: {"controllers": [...]}, the shape of the local pair's `status --json`
    (name, role, link, owned_luns, exports as NBD URIs) plus the domain's state."""
    controllers = []
    for name, state in pair.status().items():
        host, port = pair.nbd_address(name)
        entry = {"name": name, "controller": name, "domain": pair.domain_name(name), "state": state,
                 "nbd": f"{host}:{port}", "exports": export_uris(pair, name),
                 "console": str(pair.console_path(name))}
        entry["serving"] = state == "running" and probe and _serves(pair, name)
        entry.update(_roles(pair, name, state))
        controllers.append(entry)
    return {"controllers": controllers}


def _serves(pair, name: str) -> bool:
    try:
        probe_exports(pair, name)
    except Exception:
        return False
    return True


def _roles(pair, name: str, state: str) -> dict:
    events = read_events(pair, name) if state == "running" else None
    if events is None:
        return {"role": None, "link": "unknown", "owned_luns": [], "luns": {}}
    luns = lun_states(events)
    owned = sorted(lun for lun, s in luns.items() if s in ("owner", "solo"))
    return {"role": "owner" if owned else "partner", "link": link_state(events), "owned_luns": owned,
            "luns": {lun: {"state": s} for lun, s in sorted(luns.items())}}
