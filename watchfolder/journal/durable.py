"""Making the journal's commits survive a power loss (see `journal.db`'s "Durability").

The journal's connection writes each commit to SQLite's WAL (synchronous=NORMAL): the
kernel keeps it when the process dies. `GroupCommit` forces the WAL to disk for the commits
that must also survive a power loss, outside the journal's lock: one fdatasync covers every
commit written before it, whoever wrote it, so workers committing at once share one.

    commits = GroupCommit(journal_path)   # its -wal file, open for the fsyncs
    commits.written()                     # after each commit, under the journal's lock
    commits.sync(commits.count)           # return once that commit is on disk
    commits.when_durable(effect)          # effect runs once every commit so far is on disk
    commits.settle()                      # the fsync, if an effect waits for one
    commits.owe(key)                      # the last commit's fsync left to the next one
    commits.settle_owed(key)              # return once it is on disk
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

from watchfolder.errors import StateUnavailable
from watchfolder.files.atomic import fsync_dir


class GroupCommit:
    """The commits of one connection and which of them are known to be on disk."""

    def __init__(self, path: Path | None) -> None:
        """`path`: the journal, open in WAL mode and read once (its `-wal` exists as long as
        it is open); None for a journal opened read-only (nothing to sync)."""
        self.path = path
        self._wal: int | None = None
        self.every_commit = False  # synchronous=FULL: each commit is on disk when made
        if path is not None:
            try:
                self._wal = os.open(f"{path}-wal", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                # No WAL (a filesystem without the shared memory it needs): SQLite keeps a
                # rollback journal, and the caller syncs every commit instead.
                self.every_commit = True
            else:
                # The -wal's name, once; and what a run that died left in the WAL without an
                # fsync (`Journal.update`'s `owed`) is on disk before this run acts on it. A
                # disk that refuses stops the start (StateUnavailable: the daemon names the
                # file and why).
                try:
                    fsync_dir(path.parent)
                    os.fdatasync(self._wal)
                except OSError as exc:
                    os.close(self._wal)
                    raise StateUnavailable(f"cannot write the journal {path}: {exc}") from exc
        self.count = 0  # commits written to the WAL through this connection
        self._durable = 0  # of those, how many are known to be on disk
        self.syncs = 0  # fsyncs made (for tests and benchmarks)
        self.lock = threading.Lock()  # held while an fsync runs
        # (commit number, effect): what waits until that commit is on disk.
        self._waiting: list[tuple[int, Callable[[], object]]] = []
        # key (a record's id) -> its commit whose fsync was left to the next one (`owe`)
        self._owed: dict[int, int] = {}

    def written(self) -> None:
        """Count a commit (the caller holds the journal's lock: counts follow the WAL)."""
        self.count += 1

    def sync(self, commit: int) -> None:
        """Return once commit number `commit` (and every one before it) is on disk.

        A caller whose commit an fsync already under way covers waits for that one; the
        next fsync covers all the commits made while the last one ran. Raises
        StateUnavailable when the disk refuses it (the commit may then be lost to a power
        loss: the caller goes on as if it had not been made, so no request follows it).
        """
        with self.lock:
            if self.every_commit:
                self._durable = self.count
            if self._durable >= commit:
                return
            written = self.count  # every commit counted is already in the WAL
            if self._wal is None:
                raise StateUnavailable(f"cannot write the journal {self.path}: it is closed")
            try:
                os.fdatasync(self._wal)
            except OSError as exc:
                raise StateUnavailable(f"cannot write the journal {self.path}: {exc}") from exc
            self._durable = written
            self.syncs += 1
            ready = [effect for number, effect in self._waiting if number <= written]
            self._waiting = [entry for entry in self._waiting if entry[0] > written]
        for effect in ready:
            _quietly(effect)

    def when_durable(self, effect: Callable[[], object]) -> None:
        """Call `effect` once every commit made so far is on disk: right away if it is, else
        after the next fsync, in the thread that makes it (at the latest at `settle`). An
        `OSError` it raises is dropped: the effect must be one a next start makes again (a
        spool file deleted: `remove_orphans`)."""
        with self.lock:
            if self._durable < self.count and not self.every_commit:
                self._waiting.append((self.count, effect))
                return
        _quietly(effect)

    def owe(self, key: int) -> None:
        """Leave the fsync of the commit just written for `key` (at least that commit) to the
        next one, whoever makes it: another commit's, `settle_owed(key)` before anything is
        made of it, or the main loop's `settle` within its turn."""
        with self.lock:
            # Those a later fsync covered and nobody settled (a result rejected in review)
            # are let go here: the table holds about the answers in the spool.
            self._owed = {owed: n for owed, n in self._owed.items() if n > self._durable}
            self._owed[key] = self.count
        self.when_durable(_nothing)

    def settle_owed(self, key: int) -> None:
        """Return once the commit `owe(key)` left is on disk (at once when a later fsync
        covered it, as it mostly has). Raises StateUnavailable as `sync` does."""
        commit = self._owed.get(key)
        if commit is not None:
            self.sync(commit)
            self._owed.pop(key, None)

    def settle(self) -> None:
        """Make every commit so far durable if some effect waits for it (`when_durable`)."""
        if self._waiting:
            self.sync(self.count)

    def close(self) -> None:
        """Settle, then let go of the WAL (the caller closes the connection after)."""
        with contextlib.suppress(StateUnavailable):
            self.settle()
        if self._wal is not None:
            os.close(self._wal)
            self._wal = None


def _nothing() -> None:
    """An effect that only asks for the next fsync (`settle`)."""


def _quietly(effect: Callable[[], object]) -> None:
    with contextlib.suppress(OSError):
        effect()
