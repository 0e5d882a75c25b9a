"""Turning a folder's life into candidate paths: watchdog events plus scans.

The event handler runs on watchdog's observer thread, so it only hands the path over (a slow or
raising handler would stall or kill event delivery). Scans cover what events cannot: files
present at start-up, events the kernel dropped (inotify queue overflow) and network shares
where inotify is blind (those use the polling observer).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

from watchdog.events import (
    EVENT_TYPE_CLOSED,
    EVENT_TYPE_CREATED,
    EVENT_TYPE_MODIFIED,
    EVENT_TYPE_MOVED,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from watchfolder.config import InboxConfig
from watchfolder.settle import is_ignored

_INTERESTING = {EVENT_TYPE_CREATED, EVENT_TYPE_MOVED, EVENT_TYPE_MODIFIED, EVENT_TYPE_CLOSED}


def scan(root: Path, *, recursive: bool) -> Iterator[Path]:
    """Every non-ignored entry below `root` that is not a folder we descend into.

    Symlinks are yielded (never followed) so they can be explained in errors; folders are
    walked only when `recursive`, hidden and temporary folders never.
    """
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            continue
        except PermissionError:
            logging.getLogger("watchfolder").warning("cannot read folder %s", folder)
            continue
        for entry in entries:
            if is_ignored(entry.name):
                continue
            if entry.is_dir(follow_symlinks=False):
                if recursive:
                    stack.append(Path(entry.path))
                continue
            yield Path(entry.path)


class _Handler(FileSystemEventHandler):
    def __init__(self, index: int, deliver: Callable[[int, Path], None]) -> None:
        self.index = index
        self.deliver = deliver

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in _INTERESTING:
            return
        path = event.dest_path if event.event_type == EVENT_TYPE_MOVED else event.src_path
        if path:
            self.deliver(self.index, Path(os.fsdecode(path)))


class _OverflowSpy(logging.Handler):
    """watchdog rebuilds its watches after an inotify overflow but tells handlers nothing;
    its warning is the only signal, and what it means for us is: rescan now."""

    def __init__(self, on_overflow: Callable[[], None]) -> None:
        super().__init__(logging.WARNING)
        self.on_overflow = on_overflow

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self.on_overflow()


class Watcher:
    """Watchdog observers for every inbox: native inotify, or polling for network shares."""

    def __init__(self, inboxes: tuple[InboxConfig, ...], deliver: Callable[[int, Path], None],
                 on_overflow: Callable[[], None], *, inactive: Collection[int] = ()) -> None:
        self.inboxes = inboxes
        self.inactive = frozenset(inactive)  # slots of inboxes a reload removed: not watched
        self.deliver = deliver
        self._observers: list[BaseObserver] = []
        self._watched: dict[int, BaseObserver] = {}
        self._spy = _OverflowSpy(on_overflow)

    def start(self) -> None:
        logging.getLogger("watchdog.observers").addHandler(self._spy)
        for index in range(len(self.inboxes)):
            if index not in self.inactive:
                self.watch(index)

    def watch(self, index: int) -> bool:
        """(Re)schedule one inbox; False when its folder is missing right now."""
        inbox = self.inboxes[index]
        if not inbox.path.is_dir():
            return False
        observer: BaseObserver
        if inbox.polling:
            observer = PollingObserver(timeout=inbox.polling_interval_seconds)
        else:
            observer = Observer()
        observer.schedule(_Handler(index, self.deliver), str(inbox.path),
                          recursive=inbox.recursive)
        observer.daemon = True
        observer.start()
        old = self._watched.pop(index, None)
        if old is not None:
            self._stop([old])
        self._watched[index] = observer
        self._observers.append(observer)
        return True

    def healthy(self, index: int) -> bool:
        observer = self._watched.get(index)
        return observer is not None and observer.is_alive() and \
            all(emitter.is_alive() for emitter in observer.emitters)

    def alive(self) -> bool:
        return all(self.healthy(index) for index in range(len(self.inboxes))
                   if index not in self.inactive)

    def _stop(self, observers: list[BaseObserver]) -> None:
        for observer in observers:
            observer.stop()
        for observer in observers:
            observer.join(timeout=5)
            if observer in self._observers:
                self._observers.remove(observer)

    def stop(self) -> None:
        logging.getLogger("watchdog.observers").removeHandler(self._spy)
        self._stop(list(self._observers))
        self._watched.clear()
