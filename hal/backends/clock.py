"""The real monotonic clock; the simulator passes its virtual clock instead."""
import time

from hal.backends.interfaces import Clock


class MonotonicClock(Clock):
    def monotonic_ns(self) -> int:
        return time.monotonic_ns()
