"""A clock the tests move by hand, for the circuit breaker (no real sleeps racing it)."""

from __future__ import annotations


class FakeClock:
    """Monotonic seconds that advance only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
