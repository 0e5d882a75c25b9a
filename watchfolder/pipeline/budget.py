"""The daily credit budget (`api.max_credits_per_day`): credits are the studio's money.

The day runs from local midnight. What counts is every request sent (journaled with its send
time, so the spend survives a restart); a request the API did not charge still counts, so the
budget is never overspent. When the day's budget is taken, sending pauses with reason
`budget`: files wait, nothing fails; it resumes by itself at midnight, or when a reload raises
the limit. Time is injectable for tests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta

from watchfolder.errors import WatchfolderError


class BudgetReached(WatchfolderError):
    """Today's `api.max_credits_per_day` is spent: the queue pauses until midnight."""

    reason = "budget"

    def __init__(self, limit: int, resets_at: datetime) -> None:
        self.message = (f"today's budget of {limit} credits is spent "
                        f"(api.max_credits_per_day); sending resumes at "
                        f"{resets_at:%Y-%m-%d %H:%M}, or raise the budget and reload")
        super().__init__(self.message)


def midnight_after(moment: datetime) -> datetime:
    """The next local midnight after `moment` (a DST change moves it, as a clock does)."""
    day = (moment + timedelta(days=1)).date()
    return datetime(day.year, day.month, day.day).astimezone()


class Budget:
    """Requests sent today against the limit; `take` reserves one, or says no."""

    def __init__(self, limit: int | None, sent_since: Callable[[float], int],
                 now: Callable[[], datetime] = lambda: datetime.now().astimezone()) -> None:
        self.limit = limit
        self._sent_since = sent_since
        self._now = now
        self._lock = threading.Lock()
        self._resets_at = midnight_after(now())
        self._spent = sent_since(self._day_start())

    def _day_start(self) -> float:
        return (self._resets_at - timedelta(days=1)).timestamp()

    def _roll(self) -> None:
        if self._now() >= self._resets_at:
            self._resets_at = midnight_after(self._now())
            self._spent = self._sent_since(self._day_start())

    def set_limit(self, limit: int | None) -> None:
        """A reload's `api.max_credits_per_day`."""
        with self._lock:
            self.limit = limit

    def take(self) -> bool:
        """Count one request now, or False when today's budget is spent."""
        with self._lock:
            self._roll()
            if self.limit is not None and self._spent >= self.limit:
                return False
            self._spent += 1
            return True

    def open(self) -> bool:
        """Whether a request could be sent now (after midnight, or a raised limit)."""
        with self._lock:
            self._roll()
            return self.limit is None or self._spent < self.limit

    def reached(self) -> BudgetReached:
        return BudgetReached(self.limit or 0, self._resets_at)

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            self._roll()
            return {"spent_today": self._spent, "budget": self.limit,
                    "budget_resets_at": self._resets_at.isoformat(timespec="seconds")}

    def seconds_to_reset(self) -> float:
        return max(1.0, self._resets_at.timestamp() - time.time())
