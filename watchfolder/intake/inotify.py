"""The inotify observer of a native inbox, which does not watch folders the intake ignores.

Watchdog's recursive inotify watch puts a kernel watch on every folder below the inbox, hidden
ones included, and turns each of their events into an event object that goes through two of
its threads before our handler drops it (`_Handler._hidden`). The busiest such folder is the
daemon's own: `.watchfolder-claims`, where every file processed creates, writes and links a
claim file (and the clock file is rewritten): three to four events per file, most of
watchdog's work at 600 files a minute. A folder with a hidden or temporary name (`is_ignored`)
below the inbox is therefore not watched at all: the intake never enters one (README: hidden
folders are not entered, and the scans skip them too). Renamed to an ordinary name, it is
watched from then on (watchdog watches a folder moved in as it arrives) and its files are
reported then, as before.
"""

from __future__ import annotations

import os

from watchdog.observers.api import DEFAULT_OBSERVER_TIMEOUT
from watchdog.observers.inotify import InotifyFullEmitter, InotifyObserver, InotifyWatchGroup

from watchfolder.intake.settle import is_ignored


def below_ignored(root: bytes, path: bytes) -> bool:
    """`path` is a folder below `root` with a hidden or temporary name on its way."""
    prefix = root.rstrip(b"/") + b"/"
    if not path.startswith(prefix):
        return False
    return any(is_ignored(os.fsdecode(part)) for part in path[len(prefix):].split(b"/") if part)


class _VisibleWatchGroup(InotifyWatchGroup):
    """Watchdog's recursive watch, less the folders below the root that the intake ignores."""

    def _add_callback(self, path: bytes) -> None:
        if path != self.path and below_ignored(self.path, path):
            return
        super()._add_callback(path)


class _VisibleEmitter(InotifyFullEmitter):
    def on_thread_start(self) -> None:
        # As InotifyEmitter.on_thread_start, with the group above.
        self._inotify = _VisibleWatchGroup(
            self._inotify_fd,
            os.fsencode(self.watch.path),
            is_recursive=self.watch.is_recursive,
            event_mask=self.get_event_mask_from_filter(),
            follow_symlink=self.watch.follow_symlink,
        )


class VisibleInotifyObserver(InotifyObserver):
    """An inotify observer with full events (a move in from an unwatched folder stays a move)
    that leaves hidden and temporary folders below the watched one unwatched."""

    def __init__(self, *, timeout: float = DEFAULT_OBSERVER_TIMEOUT) -> None:
        super().__init__(timeout=timeout, generate_full_events=True)
        self._emitter_class = _VisibleEmitter
