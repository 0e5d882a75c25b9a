"""The intake thread: which paths are in the pipeline, and when a new one is complete.

It owns three things, and nothing else touches them (messages arrive on one queue):
- `known`: every path settling, queued or being worked on, so no file is taken twice;
- the `SettleTracker` of files still being written (a file renamed or moved into place skips
  it: see `watcher`);
- `kept`: files finished in keep-in-place mode (no archive), by signature, so they are not
  sent again; a changed file (new size or mtime) under the same name is new work.

Files the workers finish come back as releases (`release`): a worker only adds the file to
a list, and the intake takes the whole list every `RELEASE_SECONDS` while files are in the
pipeline (and whenever something else wakes it). While none come back (files parked for a
review, a pause or tomorrow's budget), it looks less and less often, down to once every
`PROBE_SECONDS`. A message per file woke the intake from
the worker's thread, which, holding the GIL, was then often preempted by the thread it woke:
the workers' largest single line in a GIL profile (0.1 ms per file).

It is fed by watchdog events, by the start-up scan, by a rescan every `rescan_seconds` (a
safety net for dropped events) and by an immediate rescan when inotify reports an overflow. A
reload is a message too: the running thread takes the new configuration, the files to resume
and the new watches, and rescans.

Every `PROBE_SECONDS` (while watching) it also looks at each inbox folder (`InboxFolders`,
folders.py): one missing or unreadable pauses that inbox until it is back. A folder that is
another one now, or whose watch died with the mount it was on (`Watcher.lost`: a share
unmounted and mounted again between two looks), is watched again at once and rescanned
(`inbox.remounted`): new files must not wait for the next rescan.
"""

from __future__ import annotations

import queue
import stat
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import structlog

from watchfolder.config.settings import Config
from watchfolder.intake.folders import InboxFolders
from watchfolder.intake.settle import (
    SettleTracker,
    Signature,
    is_ignored,
    signature,
    signature_of,
)
from watchfolder.intake.watcher import SCAN_ERRORS, Watcher, scan
from watchfolder.journal.db import Journal
from watchfolder.pipeline.jobqueue import Job

log = structlog.get_logger("watchfolder")

_STOP = ("stop",)
PROBE_SECONDS = 1.0  # how often each inbox folder is looked at while watching (at most)
# How soon a finished file's path is looked at again (a new file under its name, `--once`
# seeing the pipeline empty) while files are in the pipeline.
RELEASE_SECONDS = 0.1


class Intake:
    def __init__(self, config: Config, journal: Journal, submit: Callable[[Job], None], *,
                 on_idle: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 paused: set[int] | None = None) -> None:
        self.config = config
        # Inboxes whose folder is missing or unreadable right now (`folders`): the pipeline
        # holds their files. Only this thread writes it; adding and removing an int are atomic.
        self.paused: set[int] = paused if paused is not None else set()
        # Only while probes run to end a pause: a --once run (no watches) never un-pauses.
        self.folders = InboxFolders(lambda: self.config.inboxes, self.paused,
                                    pausing=lambda: self.watcher is not None)
        self.journal = journal
        self.on_idle = on_idle
        self.submit = submit
        self.clock = clock
        self.tracker = SettleTracker(clock)
        self.known: set[tuple[int, str]] = set()  # the intake thread's alone
        # How many are known, published by the intake thread for readers on other threads
        # (`pending`), under `_released_lock`: a set being changed cannot be read from there.
        self._published = 0
        self.kept: dict[tuple[int, str], Signature] = {}
        self._remember_kept(range(len(config.inboxes)))
        self.messages: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        # Files finished by the workers, taken by the intake in batches (`release`): (key, kept).
        self._released: list[tuple[tuple[int, str], Signature | None]] = []
        self._released_lock = threading.Lock()
        self._release_wait = RELEASE_SECONDS  # doubled (to PROBE_SECONDS) while none come
        # Slots of inboxes a reload removed: their queued jobs finish, nothing new is taken.
        self.inactive: set[int] = set()
        self._thread: threading.Thread | None = None
        self.watcher: Watcher | None = None

    # -- called from other threads ------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Files known and not yet finished: found, settling, queued or in the workers'
        hands. A released file stops counting at its `release`, not when this thread next
        looks, so a file is never counted both here and as finished (see `Tally.finished`)."""
        with self._released_lock:
            return max(0, self._published - len(self._released))

    def offer(self, index: int, path: Path, at_once: bool = False) -> None:
        """A candidate path; `at_once` when it was renamed or moved into place (complete by
        construction: no settle wait)."""
        self.messages.put(("path", index, path, at_once))

    def request_rescan(self) -> None:
        self.messages.put(("rescan",))

    def release(self, job: Job, kept: Signature | None) -> None:
        """The workers are done with this file (`kept`: its signature, finished in place); the
        intake looks at its path again within `RELEASE_SECONDS`, woken by no one."""
        with self._released_lock:
            self._released.append((job.key, kept))

    def reconfigure(self, config: Config, inactive: set[int], watcher: Watcher | None,
                    resume: Iterable[Job], added: Iterable[int]) -> Future[int]:
        """Switch the running thread to `config` (a reload); the future gives files found.

        `resume` are unfinished journal jobs of the `added` inboxes (jobs this process already
        holds are skipped); inboxes are rescanned at once.
        """
        reply: Future[int] = Future()
        self.messages.put(("reconfigure", config, set(inactive), watcher, list(resume),
                           list(added), reply))
        return reply

    # -- life cycle ---------------------------------------------------------------------------

    def adopt(self, job: Job) -> None:
        """Count a job recovered from the journal as known (before `start`)."""
        self.known.add(job.key)
        self._publish()
        self.submit(job)

    def scan_all(self) -> int:
        """Scan every inbox now, in the caller's thread (before `start`); return files found."""
        before = len(self.known)
        for index in range(len(self.config.inboxes)):
            if index not in self.inactive:
                self.folders.probe(index, quiet=True)
                self._scan_inbox(index)
        self._update_idle()
        return len(self.known) - before

    def start(self, watcher: Watcher | None) -> None:
        self.watcher = watcher
        self._thread = threading.Thread(target=self._run, name="watchfolder-intake", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.messages.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the loop -----------------------------------------------------------------------------

    def _run(self) -> None:
        next_rescan = self.clock() + self.config.rescan_seconds
        next_probe = self.clock() + self._probe_seconds()
        while True:
            now = self.clock()
            due = self.tracker.next_due()
            wake = min(next_rescan, next_probe) if self.watcher is not None else float("inf")
            if due is not None:
                wake = min(wake, due)
            if self.known:  # some may be released meanwhile: look for them in a while
                wake = min(wake, now + self._release_wait)
            timeout = None if wake == float("inf") else max(0.0, wake - now)
            try:
                message = self.messages.get(timeout=timeout)
            except queue.Empty:
                message = None
            if message == _STOP:
                return
            if message is not None:
                self._handle(message)
            if self._take_released():
                self._release_wait = RELEASE_SECONDS
            elif message is None:  # a look for nothing: the next one later
                self._release_wait = min(2 * self._release_wait, PROBE_SECONDS)
            complete, vanished = self.tracker.check_due(self._look)
            for key in complete:
                self.submit(Job(*_key(key)))
            self.known.difference_update(_key(key) for key in vanished)
            if self.watcher is not None and self.clock() >= next_rescan:
                self._rescan()
                next_rescan = self.clock() + self.config.rescan_seconds
                next_probe = self.clock() + self._probe_seconds()
            elif self.watcher is not None and self.clock() >= next_probe:
                self._probe_all()
                next_probe = self.clock() + self._probe_seconds()
            self._update_idle()

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "path":
            _, index, path, at_once = message
            self._consider(index, path, at_once=at_once)
        elif kind == "rescan":
            log.warning("intake.rescan", why="inotify queue overflowed; events were lost")
            self._rescan()
        elif kind == "reconfigure":
            _, config, inactive, watcher, resume, added, reply = message
            self.config, self.inactive, self.watcher = config, inactive, watcher
            for index in [*added, *inactive]:  # another folder in that slot, or none
                self.folders.forget(index)
            self._remember_kept(added)
            for job in resume:
                if job.key not in self.known:
                    self.adopt(job)
            before = len(self.known)
            for index in range(len(config.inboxes)):
                if index not in inactive:
                    self._scan_inbox(index)
            reply.set_result(len(self.known) - before)

    def _take_released(self) -> bool:
        """Look again at the paths of the files released since the last look; False: none."""
        with self._released_lock:
            released, self._released = self._released, []
            self.known.difference_update(key for key, _ in released)
            self._published = len(self.known)
        # A path is looked at as it is now, so a release taken after a later event for the
        # same path loses nothing: that event's file is found here.
        for key, kept in released:
            index, rel = key
            if kept is not None:
                self.kept[key] = kept
            # Something may have been dropped under the same name meanwhile.
            self._consider(index, self.config.inboxes[index].path / rel)
        return bool(released)

    def _remember_kept(self, indexes: Iterable[int]) -> None:
        """Load the files finished in place (no archive) of these inboxes from the journal."""
        for index in indexes:
            inbox = self.config.inboxes[index]
            if inbox.archive is None:
                kept = self.journal.kept_in_place(str(inbox.path)).get(str(inbox.path), {})
                for rel, signature in kept.items():
                    self.kept.setdefault((index, rel), signature)

    def _probe_seconds(self) -> float:
        return min(PROBE_SECONDS, self.config.rescan_seconds)

    def _rescan(self) -> None:
        for index in range(len(self.config.inboxes)):
            if index in self.inactive:
                continue
            looked = self.folders.probe(index)
            if looked is None:
                continue
            if self.watcher is not None and (looked == "changed" or self.watcher.lost(index)
                                             or not self.watcher.healthy(index)):
                self.watcher.watch(index)
            self._scan_inbox(index)

    def _probe_all(self) -> None:
        """Look at every inbox folder; one that came back or is another one now is watched
        again and rescanned at once."""
        for index in range(len(self.config.inboxes)):
            if index in self.inactive:
                continue
            looked = self.folders.probe(index)
            if looked == "same" and self.watcher is not None and self.watcher.lost(index):
                # Unmounted and mounted again between two looks: the same device and inode,
                # but the watch died with the old mount.
                log.warning("inbox.remounted", inbox=str(self.config.inboxes[index].path),
                            hint="its watch died with the mount it was on: watched again "
                                 "and rescanned")
                looked = "changed"
            if looked == "changed":
                if self.watcher is not None:
                    self.watcher.watch(index)
                self._scan_inbox(index)

    def _scan_inbox(self, index: int) -> None:
        inbox = self.config.inboxes[index]
        for path in scan(inbox.path, recursive=inbox.recursive):
            self._consider(index, path)

    def _consider(self, index: int, path: Path, *, at_once: bool = False) -> None:
        if index in self.inactive or index >= len(self.config.inboxes):
            return  # a new watch's event ahead of its reload message: the reload rescans
        inbox = self.config.inboxes[index]
        try:
            parts = path.relative_to(inbox.path).parts
        except ValueError:
            return
        if not parts or any(is_ignored(part) for part in parts):
            return
        if len(parts) > 1 and not inbox.recursive:
            return
        key = (index, "/".join(parts))
        if key in self.known:
            if at_once and key in self.tracker:
                # Seen being written, now replaced by a file renamed over it: complete.
                self.tracker.forget(key)
                self.submit(Job(index, key[1]))
            return
        try:
            st = path.lstat()
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:  # a name too long, a stale NFS handle, an I/O error: this path's
            SCAN_ERRORS.report(path, exc, "lstat")
            return
        if stat.S_ISDIR(st.st_mode):
            # A folder moved in brings files that produced no events of their own.
            if inbox.recursive:
                for inner in scan(path, recursive=True):
                    self._consider(index, inner, at_once=at_once)
            return
        signature = signature_of(st)
        if self.kept.get(key) == signature:
            return
        self.known.add(key)
        if not stat.S_ISREG(st.st_mode) or at_once:
            # A link or a device: explained in errors at once. A file renamed into place:
            # its writer finished before the rename, so there is nothing to wait for.
            self.submit(Job(index, key[1]))
            return
        self.tracker.watch(key, signature, inbox.settle_seconds)

    def _look(self, key: Hashable) -> Signature | None:
        index, rel = _key(key)
        return signature(self.config.inboxes[index].path / rel)

    def _publish(self) -> None:
        with self._released_lock:
            self._published = len(self.known)

    def _update_idle(self) -> None:
        self._publish()
        if not self.known and self.on_idle is not None:
            self.on_idle()


def _key(key: Hashable) -> tuple[int, str]:
    """The tracker stores any hashable; ours are always (inbox index, rel)."""
    assert isinstance(key, tuple)
    return int(key[0]), str(key[1])
