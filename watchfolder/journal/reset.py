"""`watchfolder reset-journal`: move a damaged journal aside and rebuild what the folders tell.

A power cut or a failing disk can leave the journal unreadable; the daemon then refuses to
start (exit 2) rather than guess. This command, run while the daemon is stopped:

- renames `journal.sqlite3` (and its `-wal`/`-shm`) to `journal.sqlite3.broken-<time>` and the
  spool to `spool.broken-<time>`: nothing is deleted, a paid result can still be recovered;
- starts a new journal and fills in what the folders show for certain: a file kept in place
  (inbox without `archive`) that already has its result in the outbox is recorded as done, so
  it is not sent again; an archived original with its result in the outbox is recorded as a
  reusable result, so the same content dropped again costs nothing.

Everything else in the inboxes simply waits again and is processed as new.
"""

from __future__ import annotations

import time
from pathlib import Path, PurePosixPath

from watchfolder.config.settings import Config, InboxConfig
from watchfolder.errors import StartupError
from watchfolder.files.place import sha256_file
from watchfolder.intake.watcher import scan
from watchfolder.journal.db import DONE, JOURNAL_NAME, Journal
from watchfolder.service.lock import daemon_running

RESULT_SUFFIXES = (".png", ".webp", ".jpg")


def reset_journal(config: Config) -> list[str]:
    """Do it; return what was done, one line each, for people."""
    state = config.state_dir
    running, pid = daemon_running(state)
    if running:
        raise StartupError(f"a watchfolder daemon (pid {pid or '?'}) is running with "
                           f"state_dir {state}: stop it first")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    done: list[str] = []
    for name in (JOURNAL_NAME, f"{JOURNAL_NAME}-wal", f"{JOURNAL_NAME}-shm", "spool"):
        old = state / name
        if old.exists():
            aside = old.with_name(f"{old.name}.broken-{stamp}")
            old.rename(aside)
            done.append(f"moved {old} aside to {aside}")
    journal = Journal(state)
    try:
        for inbox in config.inboxes:
            done += _rebuild(journal, inbox)
    finally:
        journal.close()
    return done


def _rebuild(journal: Journal, inbox: InboxConfig) -> list[str]:
    kept = reusable = 0
    if inbox.archive is None:
        for path in scan(inbox.path, recursive=inbox.recursive):
            rel = path.relative_to(inbox.path).as_posix()
            result = _result_for(inbox, rel)
            if result is None or not path.is_file():
                continue
            st = path.lstat()
            record = journal.create(str(inbox.path), rel, st.st_size, st.st_mtime_ns,
                                    inbox.settings_key)
            journal.update(record, state=DONE, result=str(result))
            kept += 1
    else:
        for path in scan(inbox.archive, recursive=True):
            rel = path.relative_to(inbox.archive).as_posix()
            result = _result_for(inbox, rel)
            if result is None or not path.is_file():
                continue
            identity = f"{sha256_file(path)}|{inbox.settings_key}"
            record = journal.create(str(inbox.path), rel, 0, 0, inbox.settings_key)
            journal.update(record, state=DONE, archive=str(path), result=str(result),
                           remember=[(identity, str(result), sha256_file(result))])
            reusable += 1
    return [f"{inbox.path}: {kept} file(s) kept in place recorded as done, {reusable} "
            f"archived result(s) recorded for reuse"]


def _result_for(inbox: InboxConfig, rel: str) -> Path | None:
    """The outbox file made for `rel` (its mirrored name with a result's extension), if any."""
    path = PurePosixPath(rel)
    for suffix in RESULT_SUFFIXES:
        candidate = inbox.outbox.joinpath(*path.parent.parts, path.stem + suffix)
        if candidate.is_file():
            return candidate
    return None
