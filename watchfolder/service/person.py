"""What a person does to a running daemon from outside the pipeline's own flow (the web view's
buttons): pause and resume inboxes through the pipeline's one pause (journaled by it, so it
survives a restart). One action at a time (`Daemon.person_lock`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

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
