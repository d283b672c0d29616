"""The libvirt domain event stream, for fixtures that wait on guest state.

libvirt delivers domain events only to a client that runs an event loop:
`virEventRegisterDefaultImpl()` before the first connection is opened, then a
thread calling `virEventRunDefaultImpl()` forever. `EventStream` does both
once per process and records every lifecycle event of a connection, so a
test can say `events.wait("twincache-a", "stopped", since=mark)`.

Rules: every wait has a timeout; events are kept in order with a sequence
number so a waiter only sees events after its mark.
"""
from __future__ import annotations

import dataclasses
import threading
import time

import libvirt

_loop_lock = threading.Lock()
_loop_thread: threading.Thread | None = None

LIFECYCLE = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined",
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "started",
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "suspended",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "pmsuspended",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
}
STOPPED_DETAIL = {
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED: "destroyed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED: "migrated",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SAVED: "saved",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED: "failed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT: "from_snapshot",
}


def ensure_event_loop() -> None:
    """Register libvirt's default event loop and run it in a daemon thread (once)."""
    global _loop_thread
    with _loop_lock:
        if _loop_thread is not None:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        _loop_thread = threading.Thread(target=run, name="libvirt-events", daemon=True)
        _loop_thread.start()


@dataclasses.dataclass(frozen=True)
class DomainEvent:
    seq: int
    domain: str
    event: str        # "started", "stopped", ...
    detail: str       # for "stopped": "destroyed", "shutdown", "crashed", ...; else the number
    at_s: float       # time.monotonic()


class EventStream:
    """Every lifecycle event of one connection, in order."""

    def __init__(self, conn: libvirt.virConnect):
        self._cond = threading.Condition()
        self._events: list[DomainEvent] = []
        self._conn = conn
        self._callback_id = conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None)

    def _on_lifecycle(self, _conn, dom, event, detail, _opaque) -> None:
        name = LIFECYCLE.get(event, str(event))
        detail_name = STOPPED_DETAIL.get(detail, str(detail)) if name == "stopped" else str(detail)
        with self._cond:
            self._events.append(DomainEvent(len(self._events), dom.name(), name, detail_name,
                                            time.monotonic()))
            self._cond.notify_all()

    def mark(self) -> int:
        """A position; `wait(..., since=mark)` sees only later events."""
        with self._cond:
            return len(self._events)

    def events(self, domain: str | None = None) -> list[DomainEvent]:
        with self._cond:
            return [e for e in self._events if domain is None or e.domain == domain]

    def wait(self, domain: str, event: str, since: int = 0, timeout_s: float = 30.0) -> DomainEvent:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for e in self._events[since:]:
                    if e.domain == domain and e.event == event:
                        return e
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [(e.domain, e.event, e.detail) for e in self._events[since:]]
                    raise TimeoutError(f"{domain}: no {event!r} event within {timeout_s:.0f} s; saw {seen}")
                self._cond.wait(left)

    def close(self) -> None:
        try:
            self._conn.domainEventDeregisterAny(self._callback_id)
        except libvirt.libvirtError:
            pass
