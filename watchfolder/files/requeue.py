"""`watchfolder requeue`: put failed files back in their inbox once the cause is fixed.

A failed file sits in its inbox's errors folder (possibly renamed `x-1.png` when the name was
taken) next to `x-1.png.error.json`, whose `inbox` and `file` say where it came from. Requeue
moves it back to `inbox/<file>` and removes the reason file; the daemon then sees a new file
and processes it like any other (the journal keeps the old failure as history).

Rules:
- never overwrite: if the inbox already has a file at that path, the file is skipped and
  reported (rename or remove the one in the inbox, then requeue again). The move itself is a
  no-clobber link, so a file dropped at the same instant is not overwritten either;
- the reason file is removed only after the move, so an interrupted requeue is finished by the
  next one (the file is found in the inbox with the reason's sha256);
- `file` from the reason file must stay inside the inbox (no absolute path, no `..`);
- without a reason file (deleted by hand), a file goes back to its place relative to the errors
  folder, when exactly one configured inbox uses that errors folder.

The daemon need not be stopped: it picks the files up as it would any new file.

`report()` words the outcomes for a person: "would requeue" in a dry run, "requeued" in a
real one, and the command to run again with the real configuration path.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from watchfolder.config.settings import Config, InboxConfig
from watchfolder.files.layout import REASON_SUFFIX, reason_file
from watchfolder.files.place import move_into, sha256_file


@dataclass(frozen=True)
class Outcome:
    """What happened to one file in errors."""

    source: Path
    target: Path | None
    requeued: bool
    message: str


def requeue(config: Config, paths: Iterable[Path] = (), *, dry_run: bool = False) -> list[Outcome]:
    """Requeue the given files (moved files or their reason files), or everything in errors."""
    roots = _error_roots(config)
    pairs: dict[Path, Path] = {}  # moved file → its reason file (which may not exist)
    outcomes: list[Outcome] = []
    given = list(paths)
    if given:
        for raw in given:
            path = Path(os.path.normpath(Path(raw).absolute()))  # links are not followed
            moved = (path.with_name(path.name[:-len(REASON_SUFFIX)])
                     if path.name.endswith(REASON_SUFFIX) else path)
            if _root_of(moved, roots) is None:
                outcomes.append(Outcome(path, None, False, "not inside any configured errors "
                                        "folder: " + ", ".join(str(r) for r in roots)))
                continue
            if not os.path.lexists(moved) and not _reason_path(moved).exists():
                outcomes.append(Outcome(path, None, False, "no such file in errors"))
                continue
            pairs.setdefault(moved, _reason_path(moved))
    else:
        reasons = [reason for root in roots for reason in root.rglob("*" + REASON_SUFFIX)
                   if not reason.name.startswith(".")]
        # In the order they failed: of two failures under one name, the first goes back
        # first (the other waits in errors until its place in the inbox is free again).
        for reason in sorted(reasons, key=_failed_when):
            pairs.setdefault(reason.with_name(reason.name[:-len(REASON_SUFFIX)]), reason)
    claimed: set[Path] = set()  # targets taken during this run (what a dry run would take)
    for moved, reason in pairs.items():
        found = _root_of(moved, roots)
        assert found is not None
        outcome = _requeue_one(moved, reason, found, roots[found], claimed, dry_run=dry_run)
        if outcome.requeued and outcome.target is not None:
            claimed.add(outcome.target)
        outcomes.append(outcome)
    return outcomes


def report(outcomes: list[Outcome], *, dry_run: bool, config: Path | None = None) -> list[str]:
    """The lines to print: one per file, then a summary; `config` (the file the command was
    given) is named in the hint to run again."""
    lines = []
    for outcome in outcomes:
        arrow = f" -> {outcome.target}" if outcome.target else ""
        if not outcome.requeued:
            lines.append(f"skipped {outcome.source}{arrow}: {outcome.message}")
        elif dry_run:
            lines.append(f"would requeue {outcome.source}{arrow}")
        else:
            lines.append(f"requeued {outcome.source}{arrow}" + (
                "" if outcome.message == "requeued" else f": {outcome.message}"))
    done = sum(1 for outcome in outcomes if outcome.requeued)
    skipped = len(outcomes) - done
    summary = (f"would requeue {_files(done)}" if dry_run else f"requeued {_files(done)}")
    if skipped:
        summary += f", skipped {skipped}"
    if dry_run:
        summary += " (dry run: nothing was moved)"
    lines.append(summary)
    again = f"watchfolder requeue --config {config}" if config else "watchfolder requeue"
    if dry_run and done:
        lines.append(f"To move them: {again}")
    elif skipped:
        lines.append(f"Once what each skipped line says is fixed: {again}")
    return lines


def _files(count: int) -> str:
    return f"{count} file" if count == 1 else f"{count} files"


def _error_roots(config: Config) -> dict[Path, list[InboxConfig]]:
    roots: dict[Path, list[InboxConfig]] = {}
    for inbox in config.inboxes:
        roots.setdefault(inbox.errors, []).append(inbox)
    return roots


def _root_of(path: Path, roots: dict[Path, list[InboxConfig]]) -> Path | None:
    for root in roots:
        if root in path.parents:
            return root
    return None


def _failed_when(reason: Path) -> tuple[int, str]:
    try:
        return reason.stat().st_mtime_ns, str(reason)
    except OSError:
        return 0, str(reason)


def _reason_path(moved: Path) -> Path:
    return reason_file(moved)


def _read_reason(reason: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(reason.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _requeue_one(moved: Path, reason: Path, root: Path, inboxes: list[InboxConfig],
                 claimed: set[Path], *, dry_run: bool) -> Outcome:
    report = _read_reason(reason)
    where = _destination(moved, root, inboxes, report)
    if isinstance(where, str):
        return Outcome(moved, None, False, where)
    target = where
    if not os.path.lexists(moved):
        # Only the reason file is left: an earlier requeue moved the file and was interrupted,
        # or the file was removed by hand.
        sha = (report or {}).get("sha256")
        if sha and target.is_file() and _sha_or_none(target) == sha:
            if not dry_run:
                reason.unlink(missing_ok=True)
            return Outcome(moved, target, True, "already back in the inbox; reason file "
                                                "removed")
        return Outcome(moved, target, False, "the file is no longer in errors (only its "
                                             "reason file is); nothing to requeue")
    if os.path.lexists(target) or target in claimed:
        return Outcome(moved, target, False, "the inbox already has a file at this path; "
                                             "rename or remove it, then requeue again")
    if dry_run:
        return Outcome(moved, target, True, "nothing moved (dry run)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        placed = move_into(moved, target)
    except OSError as exc:
        return Outcome(moved, target, False, f"cannot move it: {exc.strerror or exc}")
    if not placed:
        return Outcome(moved, target, False, "the inbox already has a file at this path; "
                                             "rename or remove it, then requeue again")
    reason.unlink(missing_ok=True)
    _prune_empty(moved.parent, root)
    return Outcome(moved, target, True, "requeued")


def _destination(moved: Path, root: Path, inboxes: list[InboxConfig],
                 report: dict[str, Any] | None) -> Path | str:
    """Where the file goes back to, or why it cannot."""
    rel: str | None = None
    inbox: InboxConfig | None = None
    if report is not None:
        rel = report.get("file") if isinstance(report.get("file"), str) else None
        inbox = next((i for i in inboxes if str(i.path) == report.get("inbox")), None)
    if inbox is None:
        if len(inboxes) != 1:
            return (f"cannot tell which inbox it came from ({len(inboxes)} inboxes share "
                    f"{root}, and its reason file does not name one of them)")
        inbox = inboxes[0]
    if rel is None:
        rel = moved.relative_to(root).as_posix()
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts:
        return f"its reason file names an unsafe path {rel!r}; move it back by hand"
    return inbox.path.joinpath(*pure.parts)


def _sha_or_none(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except OSError:
        return None


def _prune_empty(folder: Path, root: Path) -> None:
    """Remove the subfolders of errors that the move left empty (never the root itself)."""
    while folder != root and root in folder.parents:
        with contextlib.suppress(OSError):
            folder.rmdir()  # fails, as it should, when something is still there
        if folder.exists():
            return
        folder = folder.parent
