"""Turning a folder's life into candidate paths: watchdog events plus scans.

The event handler runs on watchdog's observer thread, so it only hands the path over (a slow or
raising handler would stall or kill event delivery). Scans cover what events cannot: files
present at start-up, events the kernel dropped (inotify queue overflow) and network shares
where inotify is blind (those use the polling observer).

A file renamed into place is complete by construction, so its event says so (`at_once`): a
watchdog moved event whose source had a temporary or hidden name (rsync's `.name.XXXXXX`,
`*.part`, `*.crdownload`, Syncthing's `.syncthing.*.tmp`), lay outside the inbox, or is unknown
(inotify's IN_MOVED_TO without a matching IN_MOVED_FROM: a move from a folder we do not watch;
the inotify observer is built with `generate_full_events` so those arrive as moves, not as
creations). Created, modified and closed events, and every event of the polling observer (it
infers moves from listings), keep the settle rule.

An inotify watch dies with the mount it is on: a share unmounted (even lazily, even mounted again
at once, with the same device and inode numbers) leaves watchdog's observer running but deaf.
Watchdog does not say so; a `RootSentinel` per native watch (a tiny inotify instance of our own
on the inbox folder itself) does: `Watcher.lost(index)` is true once the folder was unmounted,
deleted or moved, and the intake then watches it again.

A filesystem error is the problem of one path, never of the scan: a folder nested deeper than
PATH_MAX (ENAMETOOLONG), a stale NFS handle (ESTALE), an I/O error on a share (EIO), a folder
we may not read. Each is logged once as `scan.error` with the path and the errno (not again
at every rescan, until the path works again), and the scan goes on with the rest.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

import structlog
from watchdog.events import (
    EVENT_TYPE_CLOSED,
    EVENT_TYPE_CREATED,
    EVENT_TYPE_MODIFIED,
    EVENT_TYPE_MOVED,
    DirCreatedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    EventsLostEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver
from watchdog.utils import platform

from watchfolder.config.settings import InboxConfig
from watchfolder.intake.settle import is_ignored

if platform.is_linux():  # the daemon targets Linux; the module still imports elsewhere
    from watchfolder.intake.inotify import VisibleInotifyObserver

_INTERESTING = {EVENT_TYPE_CREATED, EVENT_TYPE_MOVED, EVENT_TYPE_MODIFIED, EVENT_TYPE_CLOSED}
# The same, as watchdog's filter: inotify is then asked for these alone. Without it every open
# and listing of an inbox folder (the intake's probe each second, a scan, another program)
# comes back as events that wake watchdog's threads and ours for nothing. An overflow is
# always reported by the kernel; the filter must let its event through.
# Not "modified" (IN_MODIFY, IN_ATTRIB), on inotify: a file written in place is noticed when
# it is created and again when its writer closes it (IN_CLOSE_WRITE), which is all the settle
# rule needs, while IN_MODIFY comes once per write() (hundreds for one big copy) and with
# every write of the daemon's own claim and clock files in `.watchfolder-claims`; a folder's
# "modified" only repeats the events of the files in it. A change of metadata alone (touch,
# chmod) waits for the next rescan. Polling infers a rewrite from a listing only as
# "modified", and costs inotify nothing: it keeps them.
_EVENT_FILTER = [FileCreatedEvent, DirCreatedEvent, FileMovedEvent, DirMovedEvent,
                 FileClosedEvent, EventsLostEvent]
_POLLING_FILTER = [*_EVENT_FILTER, FileModifiedEvent, DirModifiedEvent]

log = structlog.get_logger("watchfolder")


class ScanErrors:
    """Says each failing path once: a rescan every minute must not repeat the same line.

    A path is said again only after it worked in between (`cleared`) or with another errno.
    At most `limit` paths are remembered, so a share full of broken entries cannot grow it
    without bound (past that, errors are still logged, every time).
    """

    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self._said: dict[str, int | None] = {}
        self._lock = threading.Lock()

    def report(self, path: Path | str, exc: OSError, during: str) -> None:
        key = str(path)
        with self._lock:
            if key in self._said and self._said[key] == exc.errno:
                return
            if len(self._said) < self.limit:
                self._said[key] = exc.errno
        log.warning("scan.error", path=key, errno=exc.errno,
                    code=errno.errorcode.get(exc.errno or 0, "?"),
                    error=exc.strerror or str(exc), during=during,
                    hint="this path is skipped; the rest of the folder is read as usual")

    def cleared(self, path: Path | str) -> None:
        """`path` works now: its next error is worth a line again."""
        if not self._said:  # the usual case, without taking the lock
            return
        with self._lock:
            if self._said.pop(str(path), None) is not None:
                log.info("scan.recovered", path=str(path))


SCAN_ERRORS = ScanErrors()
"""The process's reporter: scans of the daemon, its rescans and its watches share it."""

# Gone or replaced since it was listed: a race with the user, not an error.
_VANISHED = (FileNotFoundError, NotADirectoryError)


def scan(root: Path, *, recursive: bool, errors: ScanErrors = SCAN_ERRORS,
         ignored: list[str] | None = None) -> Iterator[Path]:
    """Every non-ignored entry below `root` that is not a folder we descend into.

    Symlinks are yielded (never followed) so they can be explained in errors; folders are
    walked only when `recursive`, hidden and temporary folders never. Never raises OSError:
    a folder or entry that cannot be read is reported to `errors` and skipped. The paths of
    ignored entries (dot-files such as macOS `._*` and `.DS_Store`, temp names) are appended
    to `ignored` when given.
    """
    stack = [root]
    while stack:
        folder = stack.pop()
        for entry in _entries(folder, errors):
            if is_ignored(entry.name):
                if ignored is not None:
                    ignored.append(entry.path)
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=False)  # may lstat (DT_UNKNOWN: NFS, XFS)
            except _VANISHED:
                continue
            except OSError as exc:
                errors.report(entry.path, exc, "lstat")
                continue
            if is_dir:
                if recursive:
                    stack.append(Path(entry.path))
                continue
            yield Path(entry.path)


def _entries(folder: Path, errors: ScanErrors) -> list[os.DirEntry[str]]:
    """The entries of one folder; what could be listed before an error, if one comes."""
    entries: list[os.DirEntry[str]] = []
    try:
        with os.scandir(folder) as listing:
            entries.extend(listing)  # may fail midway (EIO): keep what came before
    except _VANISHED:
        return entries
    except OSError as exc:
        errors.report(folder, exc, "scandir")
        return entries
    errors.cleared(folder)
    return entries


Deliver = Callable[[int, Path, bool], None]
"""(inbox index, path, at_once): at_once when the file was renamed or moved into place."""


def renamed_into_place(source: str, root: Path) -> bool:
    """True when a move from `source` ("" when unknown) into the inbox at `root` brings a
    complete file: the source lay outside the inbox, or one of its names below the inbox was
    a temporary or hidden one. A rename between two ordinary names inside the inbox is not
    enough: the writer may still hold the file open under its new name."""
    if not source:
        return True
    try:
        parts = Path(source).relative_to(root).parts
    except ValueError:
        return True
    return any(is_ignored(part) for part in parts)


_IN_DELETE_SELF, _IN_MOVE_SELF, _IN_UNMOUNT = 0x400, 0x800, 0x2000  # <sys/inotify.h>
_libc = ctypes.CDLL(None, use_errno=True)


class RootSentinel:
    """Our own inotify watch on one folder, for what happens to the folder itself: unmounted,
    deleted, moved (the kernel then also ends the watch: IN_IGNORED). Reading it never
    blocks. Linux only, like the native observer it stands beside."""

    def __init__(self, path: Path) -> None:
        fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        mask = _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_UNMOUNT
        if _libc.inotify_add_watch(fd, os.fsencode(path), mask) < 0:
            code = ctypes.get_errno()
            os.close(fd)
            raise OSError(code, os.strerror(code), str(path))
        self.fd = fd
        self._fired = False

    def fired(self) -> bool:
        """True once anything happened to the folder itself (it stays true)."""
        if not self._fired:
            try:
                self._fired = bool(os.read(self.fd, 4096))
            except BlockingIOError:
                pass
            except OSError:
                self._fired = True  # closed under us: treat as lost, a new watch replaces it
        return self._fired

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Handler(FileSystemEventHandler):
    def __init__(self, index: int, root: Path, deliver: Deliver, *, renames: bool,
                 on_overflow: Callable[[], None]) -> None:
        self.index = index
        self.root = root
        self.deliver = deliver
        self.renames = renames  # whether a move may skip the settle wait
        self.on_overflow = on_overflow
        self._root_prefix = str(root).rstrip(os.sep) + os.sep

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in _INTERESTING:
            return
        if event.event_type == EVENT_TYPE_MOVED:
            if event.dest_path and not self._hidden(event.dest_path):
                self.deliver(self.index, Path(os.fsdecode(event.dest_path)),
                             self.renames and renamed_into_place(os.fsdecode(event.src_path),
                                                                 self.root))
        elif event.src_path and not self._hidden(event.src_path):
            self.deliver(self.index, Path(os.fsdecode(event.src_path)), False)

    def _hidden(self, path: bytes | str) -> bool:
        """Below a hidden or temporary name (the claims folder, a download in progress): the
        intake ignores it, so it is not handed over (a queue message and a wake-up each)."""
        text = os.fsdecode(path)
        root = self._root_prefix
        if not text.startswith(root):
            return False
        return any(is_ignored(part) for part in Path(text[len(root):]).parts)

    def on_events_lost(self, event: EventsLostEvent) -> None:
        # The kernel's inotify queue overflowed (watchdog has restored its watches by now):
        # what was dropped is found by rescanning.
        self.on_overflow()


class Watcher:
    """Watchdog observers for every inbox: native inotify, or polling for network shares."""

    def __init__(self, inboxes: tuple[InboxConfig, ...], deliver: Deliver,
                 on_overflow: Callable[[], None], *, inactive: Collection[int] = ()) -> None:
        self.inboxes = inboxes
        self.inactive = frozenset(inactive)  # slots of inboxes a reload removed: not watched
        self.deliver = deliver
        self._observers: list[BaseObserver] = []
        self._watched: dict[int, BaseObserver] = {}
        self.on_overflow = on_overflow
        self._sentinels: dict[int, RootSentinel] = {}
        # watch() runs on the intake's thread (a lost watch restored), stop() on the main
        # thread (a reload, a stop): once stopped, nothing is watched any more.
        self._lock = threading.Lock()
        self._stopped = False

    def start(self) -> None:
        for index in range(len(self.inboxes)):
            if index not in self.inactive:
                self.watch(index)

    def watch(self, index: int) -> bool:
        """(Re)schedule one inbox; False when its folder is missing or cannot be watched right
        now (an OSError is reported once; the inbox's rescans go on meanwhile), or when this
        watcher was stopped."""
        with self._lock:
            if self._stopped:
                return False
            return self._watch(index)

    def _watch(self, index: int) -> bool:
        inbox = self.inboxes[index]
        try:
            if not inbox.path.is_dir():
                return False
        except OSError as exc:  # ESTALE, EIO: Path.is_dir() lets those through
            SCAN_ERRORS.report(inbox.path, exc, "watch")
            return False
        observer: BaseObserver
        if inbox.polling:
            observer = PollingObserver(timeout=inbox.polling_interval_seconds)
        elif platform.is_linux():
            # Full events: a move in from an unwatched folder stays a move (with no source)
            # instead of becoming a creation, so it can skip the settle wait. Hidden folders
            # (our claims folder above all) are not watched: intake/inotify.py.
            observer = VisibleInotifyObserver()
        else:
            observer = Observer()
        observer.daemon = True
        try:
            # Polling compares listings: on a share, a "move" it infers from a reused inode
            # proves nothing about the data, so those files keep the settle rule.
            handler = _Handler(index, inbox.path, self.deliver, renames=not inbox.polling,
                               on_overflow=self.on_overflow)
            observer.schedule(handler, str(inbox.path), recursive=inbox.recursive,
                              event_filter=_POLLING_FILTER if inbox.polling else _EVENT_FILTER)
            observer.start()  # starts the emitters here, in our thread: inotify limits raise
        except OSError as exc:
            SCAN_ERRORS.report(inbox.path, exc, "watch")
            if observer.is_alive():
                observer.stop()
                observer.join(timeout=5)
            return False
        old = self._watched.pop(index, None)
        if old is not None:
            self._stop([old])
        self._watched[index] = observer
        self._observers.append(observer)
        previous = self._sentinels.pop(index, None)
        if previous is not None:
            previous.close()
        if not inbox.polling:  # a polling observer lists the folder anew each time anyway
            try:
                self._sentinels[index] = RootSentinel(inbox.path)
            except OSError as exc:  # out of inotify instances: the rescans cover it
                SCAN_ERRORS.report(inbox.path, exc, "watch")
        return True

    def lost(self, index: int) -> bool:
        """The folder this inbox's native watch is on was unmounted, deleted or moved since:
        the watch is deaf now, though its threads live."""
        sentinel = self._sentinels.get(index)
        return sentinel is not None and sentinel.fired()

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
        with self._lock:
            self._stopped = True
            self._stop(list(self._observers))
            self._watched.clear()
            for sentinel in self._sentinels.values():
                sentinel.close()
            self._sentinels.clear()
