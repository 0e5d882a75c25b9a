"""What a start (or a reload) finds and puts right: folders to create, unfinished journal
records to resume, spool files and temp files a crash left behind."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

import structlog

from watchfolder.config.settings import Config, InboxConfig
from watchfolder.errors import ConfigError
from watchfolder.files import layout
from watchfolder.files.place import folder_problem
from watchfolder.intake.settle import signature
from watchfolder.journal.db import (
    APPROVED,
    FAILING,
    FETCHED,
    PROXIED,
    REVIEW,
    SENDING,
    STORED,
    FileRecord,
    Journal,
)
from watchfolder.pipeline.jobqueue import Job

log = structlog.get_logger("watchfolder")


def resume_jobs(journal: Journal, inboxes: tuple[InboxConfig, ...],
                indexes: Iterable[int], *, report_orphans: bool = False) -> list[Job]:
    """Jobs for the unfinished journal records of these inboxes (after a crash or stop, or
    when a reload configures an inbox again); temp files a crash left are cleared."""
    wanted = {str(inboxes[index].path): index for index in indexes}
    jobs = []
    for record in journal.unfinished():
        index = wanted.get(record.inbox)
        if index is None:
            if report_orphans:
                log.warning("journal.orphan", inbox=record.inbox, file=record.rel,
                            state=record.state, hint="this inbox is no longer configured; "
                            "the file resumes when it is configured again")
            continue
        _clear_temp_files(inboxes[index], record)
        jobs.append(Job(index, record.rel, record=record))
    return jobs


def remove_orphans(journal: Journal) -> None:
    """Spool files no unfinished record points at (a crash before their unlink). A proxy
    is kept while its record may still send it: making it again costs seconds of CPU. A
    result waiting for review (or approved, or rejected and not yet in errors) keeps its
    answer: a review costs no second request, across restarts too."""
    unfinished = journal.unfinished()
    referenced = {record.spool for record in unfinished
                  if record.spool and record.state in (FETCHED, REVIEW, APPROVED, FAILING)}
    referenced |= {record.proxy for record in unfinished
                   if record.proxy and record.state in (PROXIED, SENDING)}
    for leftover in journal.spool_dir.iterdir():
        if str(leftover) not in referenced:
            leftover.unlink(missing_ok=True)


def prepare_folders(config: Config) -> None:
    """Create missing destination roots (their parents exist) and check we can write."""
    problems = []
    folders = [("state_dir", config.state_dir)]
    for index, inbox in enumerate(config.inboxes):
        folders += [(f"inboxes[{index}].{name}", folder) for name, folder in (
            ("path", inbox.path), ("outbox", inbox.outbox), ("errors", inbox.errors),
            ("archive", inbox.archive)) if folder is not None]
    for where, folder in folders:
        try:
            folder.mkdir(parents=where == "state_dir", exist_ok=True)
        except OSError as exc:
            problems.append(f"{where}: cannot create {folder}: {exc.strerror}")
            continue
        problem = folder_problem(folder, where.rsplit(".", 1)[-1])
        if problem is not None:
            problems.append(f"{where}: {problem} (fix its owner or group permissions)")
    if problems:
        raise ConfigError(problems)


def still_in_place(inbox: str, rel: str, size: int, mtime_ns: int) -> bool:
    """The file a kept-in-place record describes is still at its path, unchanged."""
    return signature(Path(inbox) / rel) == (size, mtime_ns)


def _clear_temp_files(inbox: InboxConfig, record: FileRecord) -> None:
    """Remove the hidden temp files a crash can leave where this file was being written: in
    every outbox its outputs and sidecars go to, the archive, or errors."""
    parent = PurePosixPath(record.rel).parent.parts
    if record.state in (FETCHED, APPROVED):
        folders = layout.output_folders(inbox, record.rel, record.sha256 or "*")
    else:
        root = {STORED: inbox.archive, FAILING: inbox.errors}.get(record.state)
        folders = [] if root is None else [root.joinpath(*parent)]
    for folder in folders:
        with contextlib.suppress(OSError):
            for entry in list(folder.iterdir()):
                if layout.is_temp(entry.name):
                    entry.unlink(missing_ok=True)
