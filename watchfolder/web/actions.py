"""What the page's buttons do, once `app` has checked that the request may act: pause and
resume inboxes (the pipeline's one pause), retry failed files (what `watchfolder requeue`
does for them), and judge results held for review. Each returns where the page goes next.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from watchfolder.files.requeue import requeue
from watchfolder.service import person
from watchfolder.web.paths import Refused, safe_rel

if TYPE_CHECKING:
    from watchfolder.service.daemon import Daemon

log = structlog.get_logger("watchfolder")

NAMES = ("pause", "resume", "pause-all", "resume-all", "retry", "retry-all", "approve",
         "reject")
WHO = "web"  # the pause's reason reads `paused by web`


def act(daemon: Daemon, name: str, form: dict[str, str]) -> str:
    """Do what the button `name` asks with the form's fields; return the page to show."""
    if name in ("pause-all", "resume-all"):
        person.pause_inboxes(daemon, None, WHO if name == "pause-all" else None)
        return "/"
    if name == "retry-all":
        return _retry_all(daemon, confirmed=form.get("confirm") == "yes")
    if name in ("approve", "reject"):
        record_id = number(form.get("id"))
        if record_id is None or not person.judge(daemon, record_id,
                                                 approve=name == "approve", who=WHO):
            return "/?note=review-gone#review"
        return "/#review"
    inboxes = daemon.config.inboxes
    index = number(form.get("inbox"))
    if index is None or not 0 <= index < len(inboxes):
        return "/?note=unknown-inbox"
    inbox = inboxes[index]
    if name in ("pause", "resume"):
        person.pause_inboxes(daemon, [str(inbox.path)], WHO if name == "pause" else None)
        return "/"
    try:
        pure = safe_rel(form.get("file", ""))
    except Refused:
        return "/?note=not-found"
    outcomes = requeue(daemon.config, [inbox.errors.joinpath(*pure.parts)])
    log.info("web.retry", file=str(pure), requeued=all(o.requeued for o in outcomes))
    return "/" if all(outcome.requeued for outcome in outcomes) else "/?note=retry-skipped"


def _retry_all(daemon: Daemon, *, confirmed: bool) -> str:
    if not confirmed:
        return "/?confirm=retry-all"  # the page asks: a second button, `Confirm`
    outcomes = requeue(daemon.config)
    log.info("web.retry_all", requeued=sum(o.requeued for o in outcomes),
             skipped=sum(not o.requeued for o in outcomes))
    return "/" if all(outcome.requeued for outcome in outcomes) else "/?note=retry-skipped"


def number(text: str | None) -> int | None:
    """A whole number from a form or query field, or None."""
    if text is None or not text.strip().isdigit():
        return None
    return int(text)
