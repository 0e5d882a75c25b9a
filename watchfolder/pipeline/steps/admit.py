"""proxied → sending, and the admission every request passes (`admit`): room for its
answer, a request slot, the rate limit, the claim still ours, the day's budget."""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog
from PIL import Image

from watchfolder.files.atomic import fsync_dir
from watchfolder.journal.db import GONE, QUEUED, SENDING
from watchfolder.pipeline.client import max_result_bytes
from watchfolder.pipeline.context import Context
from watchfolder.pipeline.state import STATE_RECHECK_SECONDS
from watchfolder.pipeline.steps.send import answer_file, request_for
from watchfolder.pipeline.work import Advance, Outcome, Park, Payload, Work

log = structlog.get_logger("watchfolder")


def admit_proxy(ctx: Context, work: Work) -> Outcome:
    """Send the proxy made on the local lane."""
    if ctx.stopping.is_set():
        return Park()
    proxy = Path(work.record.proxy or "")
    try:
        data = proxy.read_bytes()
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
    except (OSError, ValueError):
        # The spool was cleaned by hand (or the proxy is damaged): make it again.
        return Advance(QUEUED, {"proxy": None})
    return admit(ctx, work, Payload(data, "image/jpeg", width, height), {},
                 need=2 * work.record.size + width * height * 4)


def admit(ctx: Context, work: Work, payload: Payload, changes: Mapping[str, Any], *,
          need: int) -> Outcome:
    """Take a request slot and a send time: the request goes out next."""
    # No request while its answer could not be kept: the journal cannot be written, or the
    # spool has no room for the answer (as large as its pixels uncompressed: the bound a
    # hostile answer is cut at is far above what a real one weighs).
    answer = min(max_result_bytes(payload.width, payload.height, len(payload.data)),
                 payload.width * payload.height * 4 + (64 << 10))
    if not ctx.state.ready() or not ctx.state.room_for(ctx.journal.spool_dir, answer):
        return Park(STATE_RECHECK_SECONDS, changes=changes)
    # No request while its answer would have nowhere to go (`need`: about what the
    # outbox must hold).
    ctx.destinations.check(work.inbox.outbox, "outbox", need)
    if work.inbox.archive is not None:
        ctx.destinations.check(work.inbox.archive, "archive")
    # The answer's spool name, made before the slot is waited for: the folder's fsync is then
    # no part of the time between an answer and the next request. A spent answer's file is
    # taken when there is one (no inode allocated: files/spares.py), emptied.
    spool = answer_file(ctx, work.record, work.inbox)
    spares = ctx.journal.spool_spares
    try:
        spares.take(spool)
        spool.open("wb").close()
        fsync_dir(spool.parent)
    except OSError as exc:
        spool.unlink(missing_ok=True)
        ctx.state.failed(exc)
        return Park(STATE_RECHECK_SECONDS, changes=changes)
    # The request too, so it goes the moment it has a slot.
    request = request_for(work, payload)
    outcome = _take_slot(ctx, work, changes)
    if isinstance(outcome, Park) or outcome.state != SENDING:
        spares.let_go(spool)  # no request: nothing will stream into it
        return outcome
    work.payload, work.form = payload, request
    return outcome


def _take_slot(ctx: Context, work: Work, changes: Mapping[str, Any]) -> Outcome:
    """A request slot, a send time, the claim confirmed, the day's budget: `sending`."""
    if not ctx.slots.acquire(ctx.stopping):
        return Park(changes=changes)
    work.job.holds_slot = True
    if not ctx.limiter.acquire(ctx.stopping):
        return Park(changes=changes)
    # The waits above may have outlasted a lease: ask the claim itself, right before paying.
    if not ctx.coordinator.confirm(work.inbox.path, work.job.rel):
        log.warning("claim.lost", **work.log_fields(),
                    hint="another daemon took the file over; it is not sent from here")
        return Advance(GONE, changes)
    if not ctx.budget.take():
        ctx.budget_spent()
        return Park(front=True, changes=changes)
    return Advance(SENDING, changes, sent=True)
