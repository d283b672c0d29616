"""The simulator's virtual clock: time moves only when the scheduler says so.

Faults injected: none by itself; the scheduler jumps it forward to the next
event, so a paused controller or a slow link costs no real time. Time is
kept in integer microseconds (link latency is sub-millisecond); the firmware
sees milliseconds through `monotonic_ms()`, as from the real clock.
"""
from hal.backends.interfaces import Clock


class VirtualClock(Clock):
    def __init__(self, start_us: int = 0):
        self.now_us = start_us

    def monotonic_ns(self) -> int:
        return self.now_us * 1000

    def monotonic_ms(self) -> int:
        return self.now_us // 1000

    def advance_to(self, t_us: int):
        assert t_us >= self.now_us, f"time runs backwards: {t_us} < {self.now_us}"
        self.now_us = t_us
