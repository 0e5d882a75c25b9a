"""The steps of a file's life, one per journal state, by concern. Each takes the `Context`
and the `Work` item and returns an `Advance` or a `Park` (work.py); none picks its lane (the
driver's table does) or touches the queue.

- `prepare`: queued → sending | proxied | fetched (reused) | done | failing | gone
- `admit`: proxied → sending, and the admission every request passes
- `send`: sending → fetched | failing (or back to proxied / queued)
- `store`: fetched → stored
- `finish`: stored → done, failing → failed | gone, and the hand-off after either
- `source`: the original as the steps look at it: gone, away with its inbox folder, or
  unreadable for now (retried), and a file finished while its share was away
- `review`: a result held for a person (`inboxes[].review`); approved, `store` goes on
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog

from watchfolder.errors import (
    CoordinationUnavailable,
    DestinationError,
    SourceUnreadable,
    StateUnavailable,
)
from watchfolder.journal.db import (
    APPROVED,
    FAILING,
    FETCHED,
    PROXIED,
    QUEUED,
    REVIEW,
    SENDING,
    STORED,
)
from watchfolder.pipeline.context import Context
from watchfolder.pipeline.state import STATE_RECHECK_SECONDS
from watchfolder.pipeline.steps.admit import admit_proxy
from watchfolder.pipeline.steps.finish import fail, finish
from watchfolder.pipeline.steps.prepare import prepare
from watchfolder.pipeline.steps.review import await_review
from watchfolder.pipeline.steps.send import send
from watchfolder.pipeline.steps.source import INBOX_RECHECK_SECONDS, InboxAway, unreadable
from watchfolder.pipeline.steps.store import store
from watchfolder.pipeline.work import Outcome, Park, Work, back_from_sending, failing

log = structlog.get_logger("watchfolder")

Step = Callable[[Context, Work], Outcome]

STEPS: dict[str, Step] = {QUEUED: prepare, PROXIED: admit_proxy, SENDING: send,
                          FETCHED: store, STORED: finish, FAILING: fail,
                          REVIEW: await_review, APPROVED: store}


def run_step(ctx: Context, work: Work) -> Outcome:
    """The step for the record's state; what it raises that is known becomes a park (or a
    failure), so no worker dies of a step and no file is lost to a bug."""
    state = work.record.state
    if work.job.index in ctx.inbox_paused and state != SENDING:
        return Park(INBOX_RECHECK_SECONDS)  # its folder is away: touch none of its files
    try:
        return STEPS[state](ctx, work)
    except SourceUnreadable as exc:
        return unreadable(ctx, work, exc)
    except InboxAway:
        return Park(INBOX_RECHECK_SECONDS)  # its folder is away: it waits, nothing is gone
    except StateUnavailable as exc:  # a journal write inside a step (an output's name)
        ctx.state.failed(exc)
        return Park(STATE_RECHECK_SECONDS)
    except DestinationError:
        # Reported once by Destinations; the file waits, no request is spent meanwhile.
        back = back_from_sending(work.record) if state == SENDING else {}
        return Park(min(ctx.config.retry.pause_seconds, 30.0), changes=back)
    except CoordinationUnavailable:
        # The store or the claims folder (reported once by them): the file waits.
        return Park(5.0, changes=back_from_sending(work.record) if state == SENDING else {})
    except Exception as exc:  # noqa: BLE001 - a bug must not kill the worker nor lose the file
        return internal_error(ctx, work, exc)


def internal_error(ctx: Context, work: Work, exc: Exception) -> Outcome:
    record = work.record
    log.exception("file.internal_error", **work.log_fields(), error=type(exc).__name__)
    attempts = record.attempts + 1
    if attempts >= ctx.config.retry.max_attempts and record.state in (QUEUED, SENDING):
        return failing("internal_error", f"watchfolder failed on this file: "
                       f"{type(exc).__name__}: {exc}", attempts=attempts)
    back: dict[str, Any] = {"attempts": attempts}
    if record.state == SENDING:
        back.update(back_from_sending(record))
    return Park(ctx.config.retry.backoff_seconds * attempts, changes=back)
