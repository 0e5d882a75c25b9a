"""Deciding when a file is complete and whether it is ours to take.

`SettleTracker` holds files that are still being written: a file is complete once its size and
mtime are unchanged for `settle_seconds` across two looks. It is pure: the caller supplies the
stat function's results and the clock, so tests need no sleeps.

`is_ignored` names the files that are somebody's work in progress (dot-files, `*.part`, ...):
they are left alone until renamed into place.
"""

from __future__ import annotations

import heapq
import os
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path

IGNORED_SUFFIXES = (".tmp", ".temp", ".part", ".partial", ".crdownload", ".download",
                    ".swp", ".filepart", "~")
IGNORED_PREFIXES = (".", "~$", "~lock.")
IGNORED_NAMES = ("thumbs.db", "desktop.ini", "icon\r")

Signature = tuple[int, int]  # (size, mtime_ns)


def signature_of(st: os.stat_result) -> Signature:
    """What says a file is still the same file: its size and mtime (to the nanosecond).

    The one rule for "unchanged": settling, a file kept in place (done, not sent again), the
    original still being the content that was sent."""
    return (st.st_size, st.st_mtime_ns)


def signature(path: Path) -> Signature | None:
    """The signature of the file at `path` (not following a link); None if it cannot be
    read (gone, or not reachable)."""
    try:
        return signature_of(os.lstat(path))
    except OSError:
        return None


def is_ignored(name: str) -> bool:
    """True for temporary and hidden names that an upload or an editor is still using."""
    lower = name.lower()
    return (lower.startswith(IGNORED_PREFIXES) or lower.endswith(IGNORED_SUFFIXES)
            or lower in IGNORED_NAMES)


@dataclass
class _Entry:
    signature: Signature
    since: float
    settle: float
    due: float = 0.0


class SettleTracker:
    """Files seen but not yet complete, ordered by when each is next due for a look."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._entries: dict[Hashable, _Entry] = {}
        self._due: list[tuple[float, int, Hashable]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def watch(self, key: Hashable, signature: Signature, settle: float) -> None:
        """Start tracking `key` (no-op if already tracked: its next look will see changes)."""
        if key in self._entries:
            return
        now = self.clock()
        entry = self._entries[key] = _Entry(signature, now, settle)
        self._push(entry, now + settle, key)

    def forget(self, key: Hashable) -> None:
        self._entries.pop(key, None)

    def next_due(self) -> float | None:
        while self._due and not self._current(self._due[0]):
            heapq.heappop(self._due)
        return self._due[0][0] if self._due else None

    def check_due(self, look: Callable[[Hashable], Signature | None]
                  ) -> tuple[list[Hashable], list[Hashable]]:
        """Look again at every file that is due; return (complete, vanished) keys.

        `look(key)` returns the current signature, or None when the file is gone.
        """
        now = self.clock()
        complete: list[Hashable] = []
        vanished: list[Hashable] = []
        while self._due and self._due[0][0] <= now:
            item = heapq.heappop(self._due)
            if not self._current(item):
                continue  # forgotten, or superseded by a later look
            key = item[2]
            entry = self._entries[key]
            current = look(key)
            if current is None:
                del self._entries[key]
                vanished.append(key)
            elif current == entry.signature and now - entry.since >= entry.settle:
                del self._entries[key]
                complete.append(key)
            else:
                if current != entry.signature:
                    entry.signature, entry.since = current, now
                self._push(entry, max(now, entry.since + entry.settle), key)
        return complete, vanished

    def _current(self, item: tuple[float, int, Hashable]) -> bool:
        entry = self._entries.get(item[2])
        return entry is not None and entry.due == item[0]

    def _push(self, entry: _Entry, due: float, key: Hashable) -> None:
        entry.due = due
        self._seq += 1
        heapq.heappush(self._due, (due, self._seq, key))
