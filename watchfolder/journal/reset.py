"""`watchfolder reset-journal`: move a damaged journal aside and rebuild what the folders tell.

A power cut or a failing disk can leave the journal unreadable; the daemon then refuses to
start (exit 2) rather than guess. This command, run while the daemon is stopped:

- renames `journal.sqlite3` (and its `-wal`/`-shm`) to `journal.sqlite3.broken-<time>` and the
  spool to `spool.broken-<time>`: nothing is deleted, a paid result can still be recovered;
- starts a new journal and fills in what the folders show for certain: a file kept in place
  (inbox without `archive`) that already has every output in its outbox (the one result in
  `output_format`, PNG, WEBP, JPEG or TIFF, or each output of the inbox's recipe, under the
  name its template gives) is recorded as done, so it is not sent again; an archived original
  with all its outputs is recorded as reusable results, so the same content dropped again
  costs nothing.

Everything else in the inboxes simply waits again and is processed as new.
"""

from __future__ import annotations

import time
from pathlib import Path

from watchfolder.config.settings import EXTENSIONS, Config, InboxConfig
from watchfolder.errors import StartupError
from watchfolder.files import layout
from watchfolder.files.layout import JOURNAL_NAME, SPOOL
from watchfolder.files.place import sha256_file
from watchfolder.intake.settle import signature_of
from watchfolder.intake.watcher import scan
from watchfolder.journal.db import DONE, Journal, encode_outputs, output_identity
from watchfolder.service.lock import daemon_running


def reset_journal(config: Config) -> list[str]:
    """Do it; return what was done, one line each, for people."""
    state = config.state_dir
    running, pid = daemon_running(state)
    if running:
        raise StartupError(f"a watchfolder daemon (pid {pid or '?'}) is running with "
                           f"state_dir {state}: stop it first")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    done: list[str] = []
    for name in (JOURNAL_NAME, f"{JOURNAL_NAME}-wal", f"{JOURNAL_NAME}-shm", SPOOL):
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
            results = _results_for(inbox, rel, path) if path.is_file() else None
            if results is None:
                continue
            record = journal.create(str(inbox.path), rel, *signature_of(path.lstat()),
                                    inbox.settings_key)
            placed = _placed(results)
            journal.update(record, state=DONE, result=placed[0][0], result_sha=placed[0][1],
                           outputs=encode_outputs(placed))
            kept += 1
    else:
        for path in scan(inbox.archive, recursive=True):
            rel = path.relative_to(inbox.archive).as_posix()
            results = _results_for(inbox, rel, path) if path.is_file() else None
            if results is None:
                continue
            identity = f"{sha256_file(path)}|{inbox.settings_key}"
            record = journal.create(str(inbox.path), rel, 0, 0, inbox.settings_key)
            placed = _placed(results)
            journal.update(record, state=DONE, archive=str(path), result=placed[0][0],
                           result_sha=placed[0][1], outputs=encode_outputs(placed),
                           remember=[(output_identity(identity, index), name, sha)
                                     for index, (name, sha) in enumerate(placed)])
            reusable += 1
    return [f"{inbox.path}: {kept} file(s) kept in place recorded as done, {reusable} "
            f"archived result(s) recorded for reuse"]


def _placed(results: list[Path]) -> list[tuple[str, str]]:
    """(path, sha256) of each output, by recipe position."""
    return [(str(result), sha256_file(result)) for result in results]


def _results_for(inbox: InboxConfig, rel: str, original: Path) -> list[Path] | None:
    """Every output made for `rel` (by recipe position), found under the names the daemon
    gives them; None unless each one is there."""
    results = []
    for spec in layout.output_specs(inbox):
        # With no recipe the result is in `output_format`, or the API's answer as it is
        # when the original changed after it was sent.
        extensions = (spec.ext,) if inbox.outputs else (
            EXTENSIONS[inbox.output_format], *layout.ANSWER_EXTENSIONS)
        sha = sha256_file(original) if "{hash}" in spec.name else ""
        root = layout.output_root(inbox, spec)
        found = next((path for ext in dict.fromkeys(extensions)
                      for path in sorted(root.glob(layout.output_pattern(
                          inbox, spec, rel, ext, sha256=sha))) if path.is_file()), None)
        if found is None:
            return None
        results.append(found)
    return results
