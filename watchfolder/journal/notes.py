"""The journal's meta table: single values that outlive a run (why sending is paused, the
credits the API last reported, the pause's per-inbox holds), each with its typed accessor."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Credits:
    """The account's credits as last seen in an answer."""

    remaining: int
    at: float  # wall clock


class Notes:
    """Read and write the meta table through the journal's connection."""

    def __init__(self, query: Callable[..., list[tuple[Any, ...]]],
                 writing: Callable[[], AbstractContextManager[Any]]) -> None:
        self._query = query
        self._writing = writing

    def set_paused(self, reason: str | None) -> None:
        """Record why the queue is paused (`reason: message`), or that it is not (None)."""
        self._set_meta("paused", reason)

    def paused(self) -> str | None:
        """Why the queue was last recorded paused; None when it was not."""
        return self._meta("paused") or None

    def set_credits(self, remaining: int, at: float | None = None) -> None:
        """Record the credits an answer said were left (at `at`, wall clock; now if None)."""
        self._set_meta("credits", json.dumps(
            {"remaining": remaining, "at": time.time() if at is None else at}))

    def credits(self) -> Credits | None:
        """The credits last recorded; None when none were (or the value is unreadable)."""
        try:
            loaded = json.loads(self._meta("credits") or "null")
            return Credits(int(loaded["remaining"]), float(loaded["at"]))
        except (TypeError, ValueError, KeyError):
            return None

    def set(self, key: str, value: str | None) -> None:
        """A value the pipeline's pause keeps (per-inbox holds); `paused` and `credits` have
        their typed accessors above. Raises StateUnavailable when the disk refuses it."""
        self._set_meta(key, value)

    def all(self) -> dict[str, str | None]:
        return dict(self._query("SELECT k, v FROM meta"))  # type: ignore[arg-type]

    def _set_meta(self, key: str, value: str | None) -> None:
        """Raises StateUnavailable when the disk refuses the write."""
        with self._writing() as db:
            db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", (key, value))

    def _meta(self, key: str) -> str | None:
        rows = self._query("SELECT v FROM meta WHERE k = ?", (key,))
        return rows[0][0] if rows else None
