"""A sliding-window rate limiter shared by every worker in the process.

The vendor may count any 60-second window, so a token bucket (which allows a full bucket
plus a steady stream inside one minute) is not enough: we keep the send times of the last
window and never let more than `limit` fall inside it. A small `margin` widens our window so
that network jitter cannot make the server see two of our requests closer than we sent them.

429s slow everything down: `rate_limited()` blocks all sends until the server's Retry-After
(capped) or, when it gave none, an exponential backoff that resets on the next success.

The class never sleeps and owns no thread; `acquire` waits on the caller's stop event.
Time comes from `clock` so tests drive it without sleeping.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable


def backoff(attempt: int, base: float, cap: float) -> float:
    """The longest wait before the `attempt`-th retry: base, 2 x base, 4 x base, ... up to cap."""
    return min(cap, base * 2 ** (attempt - 1))


class Strikes:
    """Consecutive 429s without Retry-After, and the hold each calls for: the one backoff rule
    of every limiter, local or shared. A success starts the count again."""

    def __init__(self) -> None:
        self._count = 0
        self._lock = threading.Lock()

    def delay(self, retry_after: float | None, base: float, cap: float) -> float:
        """The hold after a 429: the server's `retry_after` (already capped by the caller), or
        without one base, 2 x base, ... up to `cap` for each 429 in a row."""
        if retry_after is not None:
            return max(0.0, retry_after)
        with self._lock:
            self._count += 1
            return backoff(self._count, base, cap)

    def clear(self) -> None:
        with self._lock:
            self._count = 0


def acquire_with(try_acquire: Callable[[], float], stop: threading.Event) -> bool:
    """Ask `try_acquire` until it grants (True), waiting as long as it says between asks, or
    until `stop` is set (False). The loop of every limiter, local or shared."""
    while True:
        wait = try_acquire()
        if wait <= 0.0:
            return True
        if stop.wait(wait):
            return False


class Tunable:
    """What a reload changes in a limiter, local or shared: written under the limiter's lock."""

    _lock: threading.Lock
    limit: int
    backoff: float
    max_backoff: float

    def set_limit(self, limit: int) -> None:
        with self._lock:
            self.limit = limit

    def set_backoff(self, base: float, cap: float) -> None:
        """The backoff after a 429 without Retry-After (a reload's `retry` settings)."""
        with self._lock:
            self.backoff, self.max_backoff = base, cap


class RateLimiter(Tunable):
    def __init__(self, limit: int, *, window: float = 60.0, margin: float = 0.5,
                 backoff: float = 2.0, max_backoff: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self.margin = margin
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.clock = clock
        self._sent: deque[float] = deque()
        self._blocked_until = 0.0
        self._strikes = Strikes()  # consecutive 429s without Retry-After
        self._lock = threading.Lock()

    def preload(self, ages: Iterable[float]) -> None:
        """Count sends from before a restart: `ages` are seconds since each was sent."""
        now = self.clock()
        with self._lock:
            for age in sorted(ages, reverse=True):
                self._sent.append(now - age)

    def try_acquire(self) -> float:
        """Take a slot and return 0.0, or return how long to wait before asking again."""
        now = self.clock()
        with self._lock:
            span = self.window + self.margin
            while self._sent and self._sent[0] <= now - span:
                self._sent.popleft()
            if now < self._blocked_until:
                return self._blocked_until - now
            if len(self._sent) >= self.limit:
                return self._sent[len(self._sent) - self.limit] + span - now
            self._sent.append(now)
            return 0.0

    def wait_time(self) -> float:
        """How long the next request would wait now (0.0: it could go at once); takes nothing."""
        now = self.clock()
        with self._lock:
            span = self.window + self.margin
            if now < self._blocked_until:
                return self._blocked_until - now
            recent = [t for t in self._sent if t > now - span]
            if len(recent) >= self.limit:
                return recent[len(recent) - self.limit] + span - now
            return 0.0

    def acquire(self, stop: threading.Event) -> bool:
        """Block until a slot is ours (True) or `stop` is set (False)."""
        return acquire_with(self.try_acquire, stop)

    def rate_limited(self, retry_after: float | None) -> float:
        """The server said 429: hold every send; return the delay applied.

        `retry_after` is the server's wish, already capped by the caller; without one we back
        off exponentially (up to `max_backoff`) until a request succeeds again.
        """
        delay = self._strikes.delay(retry_after, self.backoff, self.max_backoff)
        with self._lock:
            self._blocked_until = max(self._blocked_until, self.clock() + delay)
        return delay

    def succeeded(self) -> None:
        self._strikes.clear()
