"""Failed logins and failed tokens, counted per client address and per account name."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class FailedLogins:
    """Failed authentications per key (a client address or an account name): after ``limit``
    within ``window`` seconds the key is refused (429) until the window has passed, right
    credential or not. Guessing a password or a token is not a rate anyone gets."""

    def __init__(
        self, limit: int = 10, window: float = 60.0, clock: Callable[[], float] = time.monotonic
    ):
        self.limit, self.window, self.clock = limit, window, clock
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, key: str) -> deque[float]:
        times = self._failures.get(key)
        if times is None:
            return deque()
        horizon = self.clock() - self.window
        while times and times[0] <= horizon:
            times.popleft()
        if not times:
            del self._failures[key]
        return times

    def locked(self, key: str) -> bool:
        return len(self._recent(key)) >= self.limit

    def failed(self, key: str) -> None:
        self._recent(key)
        self._failures.setdefault(key, deque()).append(self.clock())
        if len(self._failures) > 10_000:  # bounded: forget the oldest keys
            self._failures.pop(next(iter(self._failures)))
