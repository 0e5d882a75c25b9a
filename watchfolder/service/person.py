"""What a person does to a running daemon from outside the pipeline's own flow (the web view's
buttons): pause and resume inboxes through the pipeline's one pause (journaled by it, so it
survives a restart), and judge the results held for review. One action at a time
(`Daemon.person_lock`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from watchfolder.journal.db import APPROVED, FAILING, REVIEW
from watchfolder.pipeline.jobqueue import Job
from watchfolder.pipeline.pause import ALL

if TYPE_CHECKING:
    from watchfolder.service.daemon import Daemon

log = structlog.get_logger("watchfolder")


def pause_inboxes(daemon: Daemon, paths: list[str] | None, who: str | None) -> None:
    """Pause these inboxes (`who` paused them: `web`), or resume them (`who` None); None
    means every inbox. Their files wait in the inbox, nothing fails; work a worker already
    took finishes."""
    assert daemon.pipeline is not None
    pause = daemon.pipeline.pause
    active = [str(inbox.path) for index, inbox in enumerate(daemon.config.inboxes)
              if index not in daemon.inactive]
    with daemon.person_lock:
        if paths is None and who is not None:
            pause.set(None, who)
        elif paths is None:
            for path in [None, *active]:
                pause.clear(path)
        elif who is not None:
            for path in paths:
                pause.set(path, who)
        else:
            held: dict[str, str] = pause.state()["inboxes"]  # type: ignore[assignment]
            everyone = held.get(ALL, "").removeprefix("paused by ") or None
            if everyone is not None:
                # Resuming one inbox of a pause of all: the others stay paused, each now.
                pause.clear(None)
                for path in active:
                    if path not in paths:
                        pause.set(path, everyone)
            for path in paths:
                pause.clear(path)
    if who is None:
        log.info("inbox.resumed", inboxes=paths or active)
    else:
        log.info("inbox.paused", inboxes=paths or active, reason=f"paused by {who}")


def judge(daemon: Daemon, record_id: int, *, approve: bool, who: str) -> bool:
    """A person's judgement of a result held for review (`inboxes[].review`): approved, its
    outputs are placed, the original archived and the file handed on exactly as without
    review; rejected, the original goes to errors (`rejected`) with the cut-out beside it.
    False when the record is not (or no longer) waiting for review in a configured inbox."""
    journal, pipeline = daemon.journal, daemon.pipeline
    assert journal is not None and pipeline is not None
    with daemon.person_lock:  # two clicks on one entry judge it once
        record = journal.record(record_id)
        index = next((i for i, inbox in enumerate(daemon.config.inboxes)
                      if record is not None and str(inbox.path) == record.inbox
                      and i not in daemon.inactive), None)
        if record is None or record.state != REVIEW or index is None:
            return False
        if approve:
            journal.update(record, state=APPROVED)
        else:
            journal.update(record, state=FAILING, reason="rejected", status=None,
                           message=f"rejected in review by {who}")
    log.info("file.approved" if approve else "file.rejected", inbox=record.inbox,
             file=record.rel, by=who)
    # The job held in review is in no queue: this one takes the file on from its new state.
    pipeline.submit(Job(index, record.rel, record=record))
    return True
