"""Reconnect backoff: exponential delays between link connection attempts.

The delay doubles from `initial_ms` up to `max_ms` and returns to
`initial_ms` on `reset()` (call it once a connection is up). Jitter, if
wanted, comes from a `random.Random` handed in, so runs stay reproducible.
"""
from __future__ import annotations

import random


class Backoff:
    def __init__(self, initial_ms: int = 10, max_ms: int = 1000, rng: random.Random | None = None):
        assert 0 < initial_ms <= max_ms
        self.initial_ms = initial_ms
        self.max_ms = max_ms
        self.attempts = 0
        self._rng = rng
        self._next_ms = initial_ms

    def next_delay_ms(self) -> int:
        """The delay before the next attempt; each call doubles the following one."""
        delay_ms = self._next_ms
        self._next_ms = min(self._next_ms * 2, self.max_ms)
        self.attempts += 1
        if self._rng is not None:
            # Up to a quarter less, so two controllers restarting together do not stay in step.
            delay_ms -= self._rng.randrange(delay_ms // 4 + 1)
        return delay_ms

    def reset(self) -> None:
        self._next_ms = self.initial_ms
        self.attempts = 0
