"""sending → fetched | failing, or parked back to `proxied`/`queued`: one request, its answer
streamed to the spool and fsynced before it is journaled.

The answer is checked here (its declared size, nothing after its end, a PNG's CRCs) but for
its complete decode, which `store` checks first (off the path from an answer to the slot's
next request), refusing it the same way.

The answer streams into its spool name (`answer_file`), which `admit` created, its folder
fsynced, before the request slot was waited for: between the answer and the journal only the
file's own fsync remains (a rename and the spool folder's fsync only for an answer in another
format than asked). Until `fetched` no record points at the file: a crash leaves an orphan
the next start removes, never an answer taken for complete.

Policies, per the API contract: a transient failure parks the file with exponential backoff
and full jitter (no worker, no slot held); a 429 holds the limiter and puts the file back at
the front, costing no attempt; an account problem pauses sending (the context's pause).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import structlog

from watchfolder import failpoints
from watchfolder.config.settings import EXTENSIONS, InboxConfig
from watchfolder.errors import (
    AccountError,
    ApiError,
    FileRejected,
    FormatNotAcceptable,
    RateLimited,
    Retryable,
)
from watchfolder.files import layout
from watchfolder.files.atomic import fsync_dir
from watchfolder.imaging.answers import inspect_result
from watchfolder.journal.db import FETCHED, FileRecord
from watchfolder.pipeline.client import ApiResult, Form, form, max_result_bytes
from watchfolder.pipeline.context import KEPT_ANSWERS_MAX_BYTES, Context
from watchfolder.pipeline.state import STATE_RECHECK_SECONDS
from watchfolder.pipeline.work import (
    Advance,
    Outcome,
    Park,
    Payload,
    Work,
    back_from_sending,
    failing,
)

log = structlog.get_logger("watchfolder")


def send(ctx: Context, work: Work) -> Outcome:
    """One request; its answer is streamed to the spool, fsynced, before it is journaled."""
    record, inbox, payload = work.record, work.inbox, work.payload
    back = back_from_sending(record)
    with ctx.kept_lock:
        kept = ctx.kept_answers.pop(work.job.key, None)
    if kept is not None:
        return _spool_kept(ctx, work, *kept)
    request = work.form
    if payload is None or request is None:
        # Journaled as sending by a run that never finished the request: send it again
        # (the one credit a crash can cost per request in flight).
        return Advance(back["state"])
    config = ctx.config
    part = answer_file(ctx, record, inbox)
    if not part.exists():  # not made by admit (never in practice): streamed in beside it
        part = ctx.journal.spool_dir / layout.part_name(record.id)
    resumes = ctx.pause.resumes
    try:
        result = _call_api(
            ctx, request, dest=part,
            max_bytes=max_result_bytes(payload.width, payload.height, len(payload.data)))
        if result.spool_error is not None:
            return _keep_answer(ctx, work, result, payload)
        # A small answer is checked from the bytes received, not read back.
        ext = inspect_result(part if result.body is None else result.body,
                             payload.width, payload.height, decode=False)
    except RateLimited as exc:
        part.unlink(missing_ok=True)  # none of these left an answer in it
        delay = ctx.limiter.rate_limited(
            None if exc.delay is None else min(exc.delay, config.retry.retry_after_cap_seconds))
        log.warning("api.rate_limited", delay_s=round(delay, 2),
                    retry_after=exc.delay is not None)
        return Park(front=True, changes=back)
    except AccountError as exc:
        part.unlink(missing_ok=True)
        ctx.account_problem(exc, probe=work.job.probe, sent_after=resumes)
        return Park(front=True, changes=back)
    except FileRejected as exc:
        part.unlink(missing_ok=True)
        if isinstance(exc, FormatNotAcceptable):
            ctx.warn_format_refused(inbox.output_format, str(inbox.path))
        return failing(exc.reason, exc.message, exc.status, attempts=record.attempts + 1)
    except Retryable as exc:
        part.unlink(missing_ok=True)
        return _retry(ctx, work, exc, back)
    except OSError as exc:  # the spool's disk: full, or gone (room was checked before)
        part.unlink(missing_ok=True)
        ctx.state.failed(exc)
        return Park(STATE_RECHECK_SECONDS, changes=back)
    _answered(ctx, work, result)
    return _spooled(ctx, work, result, part, ext)


def request_for(work: Work, payload: Payload) -> Form:
    """The request that sends `payload` for `work`'s file (encoded by `admit` before the
    request slot is waited for)."""
    return form(payload.data, filename=_sendable(PurePosixPath(work.job.rel).name),
                mime=payload.mime, output_format=asked_format(work.record, work.inbox),
                transparency=work.inbox.transparency_handling)


def asked_format(record: FileRecord, inbox: InboxConfig) -> str:
    """The format the request asks for: the studio path composes from the answer's alpha,
    it asks for PNG; so does a TIFF output or a recipe, made locally."""
    if record.route == "studio" or inbox.output_format == "tiff" or inbox.outputs:
        return "png"
    return inbox.output_format


def answer_file(ctx: Context, record: FileRecord, inbox: InboxConfig) -> Path:
    """The spool name the answer to `record`'s request streams into."""
    return ctx.journal.spool_dir / layout.answer_name(
        record.id, EXTENSIONS[asked_format(record, inbox)])


def _answered(ctx: Context, work: Work, result: ApiResult) -> None:
    """A request was answered with a result (paid for)."""
    failpoints.hit("answered")
    ctx.accepted(probe=work.job.probe)
    ctx.credits.note(result.credits_remaining, ctx.config.api.low_credits_warning)


def _keep_answer(ctx: Context, work: Work, result: ApiResult, payload: Payload) -> Outcome:
    """The spool refused an answer that was paid for: keep it in memory (bounded) until the
    disk takes it; the file stays `sending`, in the journal and here, and keeps its slot."""
    _answered(ctx, work, result)
    assert result.spool_error is not None and result.body is not None
    ctx.state.failed(result.spool_error)
    with ctx.kept_lock:
        held = sum(len(answer.body or b"") for answer, _ in ctx.kept_answers.values())
        if held + len(result.body) <= KEPT_ANSWERS_MAX_BYTES:
            ctx.kept_answers[work.job.key] = (result, payload)
            return Park(STATE_RECHECK_SECONDS)
    log.warning("answer.dropped", **work.log_fields(), bytes=len(result.body),
                hint="the spool cannot take it and memory for kept answers is full: the "
                     "file is sent again later")
    return Park(STATE_RECHECK_SECONDS, changes=back_from_sending(work.record))


def _spool_kept(ctx: Context, work: Work, result: ApiResult, payload: Payload) -> Outcome:
    """Write an answer kept in memory to the spool, now that it may have room."""
    part = ctx.journal.spool_dir / layout.part_name(work.record.id)
    try:
        with part.open("wb") as handle:
            handle.write(result.body or b"")
            handle.flush()
            os.fsync(handle.fileno())
        ext = inspect_result(part, payload.width, payload.height, decode=False)
    except OSError as exc:
        part.unlink(missing_ok=True)
        with ctx.kept_lock:
            ctx.kept_answers[work.job.key] = (result, payload)
        ctx.state.failed(exc)
        return Park(STATE_RECHECK_SECONDS)
    except Retryable as exc:
        part.unlink(missing_ok=True)
        return _retry(ctx, work, exc, back_from_sending(work.record))
    return _spooled(ctx, work, result, part, ext)


def _spooled(ctx: Context, work: Work, result: ApiResult, part: Path, ext: str) -> Outcome:
    """The answer is in `part`, checked, with its spool name (given here if it has another);
    journaled next."""
    record = work.record
    spool = ctx.journal.spool_dir / layout.answer_name(record.id, ext)
    if part != spool:  # streamed in beside it, or another format than asked
        part.replace(spool)
        fsync_dir(spool.parent)
    failpoints.hit("spooled")
    proxy = Path(record.proxy) if record.proxy else None
    return Advance(FETCHED, {"spool": str(spool), "result_sha": result.sha256,
                             "credits": result.credits_remaining,
                             "attempts": record.attempts + 1, "proxy": None},
                   then=None if proxy is None else lambda: ctx.journal.commits.when_durable(
                       lambda: proxy.unlink(missing_ok=True)))  # once `fetched` is on disk


def _call_api(ctx: Context, request: Form, **options: Any) -> ApiResult:
    """The API call, timed and counted by status for the metrics."""
    started = time.monotonic()
    status: int | None = None
    try:
        result = ctx.client.post(request, **options)
        status = 200
    except ApiError as exc:
        status = exc.status
        raise
    finally:
        if ctx.metrics is not None:
            ctx.metrics.api_response(status, time.monotonic() - started)
    return result


def _retry(ctx: Context, work: Work, exc: ApiError, back: Mapping[str, Any]) -> Outcome:
    record = work.record
    attempts = record.attempts + 1
    retry = ctx.config.retry
    if attempts >= retry.max_attempts:
        return failing(exc.reason, f"gave up after {attempts} attempts: {exc.message}",
                       exc.status, attempts=attempts)
    wish = getattr(exc, "delay", None)
    delay = ctx.queue.retry_delay(
        attempts, retry.backoff_seconds, retry.max_backoff_seconds,
        at_least=0.0 if wish is None else min(wish, retry.retry_after_cap_seconds))
    log.info("file.retry", **work.log_fields(), reason=exc.reason, status=exc.status,
             attempt=attempts, retry_in_s=round(delay, 2), message=exc.message)
    return Park(delay, changes={**back, "attempts": attempts, "reason": exc.reason,
                                "message": exc.message, "status": exc.status})


def _sendable(name: str) -> str:
    """The name for the request's multipart header, which must be UTF-8."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
