"""The life of one file: a worker takes a job, runs the step for its journal state, and applies
what the step returns, until the file is finished or parked.

    queued ──prepare──► sending ──send──► fetched ──store──► stored ──finish──► done
      │  ▲                 │                ▲ │
      │  └─── park ◄───────┤ (429, pause, transient error: back to queued, retried later;
      │                    │  a `sending` left by a crash is sent again)
      │ (an earlier answer for the same content: reused) ───┘ │ (spool lost: ask again)
      │                    │                                  ▼
      └───(refused locally, by the API, or out of attempts)──► failing ──fail──► failed
    queued, failing ──► gone (the file vanished from the inbox)

Each step is a method taking the `Work` item (job, journal record, inbox) and returning an
`Advance` (the next state and the fields to journal with it) or a `Park` (back to the queue
after a delay, or until an identical file's result is stored). The loop in `_live` journals
every transition *before* the next step has its effect, so after a crash at any instant the
next start resumes each file from its last state without a second result or a lost original.

`api.concurrency` counts requests, not workers: a request holds one of the `RequestSlots`
from before the limiter is asked until its answer is journaled, while a few spare workers do
the local steps of other files, so local work never leaves a slot idle at the rate limit.

Policies, per the API contract:
- a transient failure (5xx, reset, timeout, broken 200) parks the job with exponential backoff
  and full jitter, so it holds no worker and no request slot;
- a 429 holds the shared limiter and puts the job back at the front, costing no attempt;
- an account problem (401/402/403/404) pauses the queue: nothing is sent but one probe every
  `retry.pause_seconds`; the first accepted request resumes everything;
- a folder we must write to that is missing or unwritable parks the job (no request is spent
  while the outbox is unusable), and is reported once until it recovers.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import structlog

from watchfolder import __version__, failpoints
from watchfolder.client import ApiClient, ApiResult
from watchfolder.config import Config, InboxConfig
from watchfolder.errors import (
    AccountError,
    ApiError,
    DestinationError,
    FileRejected,
    FormatNotAcceptable,
    InputRejected,
    RateLimited,
    Retryable,
)
from watchfolder.images import ImageInfo, inspect_input, inspect_result
from watchfolder.jobqueue import Job, JobQueue, RequestSlots
from watchfolder.journal import (
    DONE,
    FAILED,
    FAILING,
    FETCHED,
    FINAL,
    GONE,
    QUEUED,
    SENDING,
    STORED,
    FileRecord,
    Journal,
)
from watchfolder.logs import readable
from watchfolder.outbox import (
    NAME_MAX,
    REASON_SUFFIX,
    Destinations,
    copy_into,
    move_into,
    same_file,
    sha256_file,
    write_atomic,
)
from watchfolder.ratelimit import RateLimiter
from watchfolder.settle import Signature

if TYPE_CHECKING:
    from watchfolder.metrics import Metrics

log = structlog.get_logger("watchfolder")

MAX_READ = 32 * 1024 * 1024  # more than the API takes: enough to say how much too large


# -- what a step returns --------------------------------------------------------------------------


@dataclass(frozen=True)
class Advance:
    """Journal `state` with `changes`, then run the step for the new state."""

    state: str
    changes: Mapping[str, Any] = field(default_factory=dict)
    sent: bool = False  # a request goes out: journal its send time too (the rate limit)
    remember: tuple[str, str, str] | None = None  # (identity, result, sha256) for reuse
    then: Callable[[], object] | None = None  # done once the transition is committed


@dataclass(frozen=True)
class Park:
    """Journal `changes`, then put the job back in the queue.

    After `delay` seconds (at the `front` for a retry that cost no attempt), or, with
    `twin`, only when the identical file ahead of it is finished.
    """

    delay: float = 0.0
    front: bool = False
    twin: bool = False
    changes: Mapping[str, Any] = field(default_factory=dict)


Outcome = Advance | Park


def failing(reason: str, message: str, status: int | None = None, *,
            attempts: int | None = None) -> Advance:
    changes: dict[str, Any] = {"reason": reason, "message": message, "status": status}
    if attempts is not None:
        changes["attempts"] = attempts
    return Advance(FAILING, changes)


@dataclass
class Work:
    """One file in the hands of a worker: its job, its journal record, its inbox."""

    job: Job
    record: FileRecord
    inbox: InboxConfig
    data: bytes | None = None  # what `prepare` read, for `send` (never across a park)
    info: ImageInfo | None = None
    holds_slot: bool = False

    @property
    def src(self) -> Path:
        return self.inbox.path / self.job.rel

    def log_fields(self) -> dict[str, str]:
        return {"inbox": str(self.inbox.path), "file": self.job.rel}


class Twins:
    """Identical files (same content, same settings) in flight: only the first is sent.

    The others wait here, holding no worker, until the first finishes; then they run again
    and reuse its stored result (or, if it failed, one of them is sent).
    """

    def __init__(self) -> None:
        self._owners: dict[str, tuple[int, str]] = {}
        self._waiting: dict[str, list[Job]] = {}
        self._lock = threading.Lock()

    def claim(self, identity: str, job: Job) -> bool:
        """True if `job` is the one to send; False if it now waits for the owner."""
        with self._lock:
            owner = self._owners.setdefault(identity, job.key)
            if owner == job.key:
                return True
            self._waiting.setdefault(identity, []).append(job)
            return False

    def release(self, identity: str, job: Job) -> list[Job]:
        """The owner is finished: the jobs that waited for it."""
        with self._lock:
            if self._owners.get(identity) != job.key:
                return []
            del self._owners[identity]
            return self._waiting.pop(identity, [])


class Pipeline:
    """The worker pool and the steps of a file's life. Owns no folders' discovery."""

    def __init__(self, config: Config, journal: Journal, client: ApiClient,
                 limiter: RateLimiter, *, release: Callable[[Job, Signature | None], None],
                 on_account_problem: Callable[[AccountError], None] | None = None) -> None:
        self.config = config
        self.journal = journal
        self.client = client
        self.limiter = limiter
        self.release = release
        self.on_account_problem = on_account_problem
        self.queue = JobQueue()
        self.slots = RequestSlots(config.api.concurrency)
        self.destinations = Destinations()
        self.twins = Twins()
        self.stopping = threading.Event()
        self.metrics: Metrics | None = None  # set by the daemon when metrics are served
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._format_warned: set[str] = set()
        self._credits_warned = False
        self.in_flight = 0
        self.done = 0
        self.failed = 0
        self.reused = 0
        self.credits: int | None = None
        self._steps: dict[str, Callable[[Work], Outcome]] = {
            QUEUED: self._prepare, SENDING: self._send, FETCHED: self._store,
            STORED: self._finish, FAILING: self._fail}

    @property
    def inboxes(self) -> tuple[InboxConfig, ...]:
        return self.config.inboxes

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        concurrency = self.slots.size
        for n in range(concurrency + spare_workers(concurrency)):
            thread = threading.Thread(target=self._work, name=f"watchfolder-worker-{n}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Take no new jobs; requests in flight may finish (see `join`)."""
        self.stopping.set()
        self.queue.close()
        self.slots.wake()

    def join(self, timeout: float) -> bool:
        """Wait up to `timeout` s for workers; False if some are still busy (abandoned)."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def alive(self) -> bool:
        return bool(self._threads) and all(thread.is_alive() for thread in self._threads)

    def submit(self, job: Job) -> None:
        self.queue.put(job)

    def snapshot(self) -> dict[str, object]:
        paused = self.queue.paused
        return {"waiting": len(self.queue), "in_flight": self.in_flight, "done": self.done,
                "failed": self.failed, "reused": self.reused, "credits": self.credits,
                "paused": f"{paused.reason}: {paused.message}" if paused else None}

    # -- the worker loop: one file's life -----------------------------------------------------

    def _work(self) -> None:
        while (job := self.queue.get()) is not None:
            with self._busy():
                self._live(job)

    def _live(self, job: Job) -> None:
        """Run the file's steps until it is finished or parked."""
        work = self._open(job)
        if work is None:
            return
        record = work.record
        try:
            while record.state not in FINAL:
                outcome = self._step(work)
                if isinstance(outcome, Park):
                    self._park(work, outcome)
                    return
                self.journal.update(record, state=outcome.state, sent=outcome.sent,
                                    remember=outcome.remember, **outcome.changes)
                failpoints.hit(outcome.state)
                if record.state != SENDING:
                    self._release_slot(work)  # the answer is journaled (or none will come)
                if outcome.then is not None:
                    outcome.then()
        finally:
            self._release_slot(work)
        self._finished(work)

    def _step(self, work: Work) -> Outcome:
        try:
            return self._steps[work.record.state](work)
        except DestinationError:
            # Reported once by Destinations; the file waits, no request is spent meanwhile.
            back = {"state": QUEUED} if work.record.state == SENDING else {}
            return Park(min(self.config.retry.pause_seconds, 30.0), changes=back)
        except Exception as exc:  # noqa: BLE001 - a bug must not kill the worker nor lose the file
            return self._internal_error(work, exc)

    def _open(self, job: Job) -> Work | None:
        """The job's journal record, created for a new file; None if the file is gone."""
        inbox = self.inboxes[job.index]
        try:
            record = job.record or self.journal.active(str(inbox.path), job.rel)
            if record is None:
                try:
                    st = (inbox.path / job.rel).lstat()
                except FileNotFoundError:
                    self.release(job, None)
                    return None
                record = self.journal.create(str(inbox.path), job.rel, st.st_size,
                                             st.st_mtime_ns, inbox.settings_key)
        except Exception:
            log.exception("file.internal_error", inbox=str(inbox.path), file=job.rel)
            self.release(job, None)
            return None
        job.record = record
        return Work(job, record, inbox)

    def _park(self, work: Work, park: Park) -> None:
        if park.changes:
            self.journal.update(work.record, **park.changes)
        job = work.job
        job.probe = False
        if park.twin:
            return  # Twins holds it until the first copy is finished
        if park.delay > 0:
            self.queue.put_later(job, park.delay)
        else:
            self.queue.put(job, front=park.front)

    def _finished(self, work: Work) -> None:
        job, record, inbox = work.job, work.record, work.inbox
        if job.identity is not None:
            for twin in self.twins.release(job.identity, job):
                self.queue.put(twin)
        ms = round((time.monotonic() - job.seen) * 1000)
        with self._lock:
            if record.state == DONE:
                self.done += 1
                self.reused += bool(record.reuse_from)
            elif record.state == FAILED:
                self.failed += 1
        if record.state == DONE:
            log.info("file.done", **work.log_fields(), result=record.result,
                     archived=record.archive, attempts=record.attempts,
                     reused=bool(record.reuse_from), credits_remaining=record.credits, ms=ms)
        elif record.state == FAILED:
            log.error("file.failed", **work.log_fields(), reason=record.reason,
                      status=record.status, message=record.message, attempts=record.attempts,
                      moved_to=record.error_path, ms=ms)
        if self.metrics is not None:
            self.metrics.file_finished(str(inbox.path), record.state, reason=record.reason,
                                       reused=bool(record.reuse_from))
        kept = None
        if record.state == DONE and inbox.archive is None:
            kept = (record.size, record.mtime_ns)
        self.release(job, kept)

    # -- step: queued → sending | fetched (reused) | failing | gone -----------------------------

    def _prepare(self, work: Work) -> Outcome:
        """Read and check the file; reuse an earlier answer, or take a slot and a send time."""
        if self.stopping.is_set():
            return Park()
        if not _inside(work.inbox.path, work.src.parent):
            # Reached through a linked folder: it lives outside the inbox; never touch it.
            log.warning("file.outside_inbox", **work.log_fields())
            return Advance(GONE)
        try:
            read = self._read(work)
            if read is None:
                return self._gone(work, "removed from the inbox before it was processed")
            data, st = read
            info = inspect_input(data)
        except InputRejected as exc:
            return failing(exc.reason, exc.message)
        sha = hashlib.sha256(data).hexdigest()
        seen = {"sha256": sha, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        identity = work.job.identity = f"{sha}|{work.inbox.settings_key}"
        earlier = self._earlier_result(identity)
        if earlier is not None:
            path, result_sha = earlier
            return Advance(FETCHED, {**seen, "reuse_from": path, "spool": None,
                                     "result_sha": result_sha})
        if not self.twins.claim(identity, work.job):
            return Park(twin=True, changes=seen)
        # No request while the answer would have nowhere to go (an RGBA image of the input's
        # size bounds what the outbox must hold).
        self.destinations.check(work.inbox.outbox, "outbox", info.width * info.height * 4)
        if work.inbox.archive is not None:
            self.destinations.check(work.inbox.archive, "archive")
        if not self.slots.acquire(self.stopping):
            return Park()
        work.holds_slot = True
        if not self.limiter.acquire(self.stopping):
            return Park()
        work.data, work.info = data, info
        return Advance(SENDING, seen, sent=True)

    def _read(self, work: Work) -> tuple[bytes, os.stat_result] | None:
        """The file's bytes and stat, read without following links; None if it is gone."""
        src = work.src
        try:
            st = src.lstat()
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(st.st_mode):
            raise InputRejected("symlink", "the file is a symbolic link; watchfolder never "
                                "follows links out of the inbox. Put the file itself in the "
                                "inbox.")
        if not stat.S_ISREG(st.st_mode):
            raise InputRejected("not_a_file", "not a regular file (a device, socket or pipe); "
                                "only image files can be processed")
        try:
            fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise InputRejected("unreadable", f"cannot read the file: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as handle:
            st = os.fstat(handle.fileno())
            return handle.read(MAX_READ), st

    def _earlier_result(self, identity: str) -> tuple[str, str] | None:
        """An outbox file made earlier for the same content and settings, still intact."""
        found = self.journal.find_result(identity)
        if found is None or _sha_or_none(Path(found[0])) != found[1]:
            return None
        return found

    def _gone(self, work: Work, hint: str, **facts: Any) -> Advance:
        log.warning("file.gone", **work.log_fields(), hint=hint, **facts)
        return Advance(GONE)

    # -- step: sending → fetched | failing | queued (parked) ----------------------------------

    def _send(self, work: Work) -> Outcome:
        """One request; its answer goes to the spool, fsynced, before it is journaled."""
        record, inbox = work.record, work.inbox
        if work.data is None or work.info is None:
            # Journaled as sending by a run that never finished the request: send it again
            # (the one credit a crash can cost per request in flight).
            return Advance(QUEUED)
        info = work.info
        back = {"state": QUEUED}
        try:
            result = self._call_api(
                work.data, filename=_sendable(PurePosixPath(work.job.rel).name), mime=info.mime,
                output_format=inbox.output_format, transparency=inbox.transparency_handling)
            ext = inspect_result(result.content, info.width, info.height)
        except RateLimited as exc:
            delay = self.limiter.rate_limited(
                None if exc.delay is None
                else min(exc.delay, self.config.retry.retry_after_cap_seconds))
            log.warning("api.rate_limited", delay_s=round(delay, 2),
                        retry_after=exc.delay is not None)
            return Park(front=True, changes=back)
        except AccountError as exc:
            self._account_problem(exc, work.job)
            return Park(front=True, changes=back)
        except FileRejected as exc:
            if isinstance(exc, FormatNotAcceptable):
                self._warn_format_refused(inbox)
            return failing(exc.reason, exc.message, exc.status, attempts=record.attempts + 1)
        except Retryable as exc:
            return self._retry(work, exc)
        failpoints.hit("answered")
        self.limiter.succeeded()
        # Only the probe was sent while paused; an older request's success says nothing
        # about the account now.
        if work.job.probe and self.queue.resume():
            self.journal.set_meta("paused", None)
            log.warning("account.resumed", hint="the API accepts requests again")
        spool = self.journal.spool_dir / f"{record.id}.{ext}"
        write_atomic(result.content, spool)
        failpoints.hit("spooled")
        self._note_credits(result.credits_remaining)
        return Advance(FETCHED, {"spool": str(spool),
                                 "result_sha": hashlib.sha256(result.content).hexdigest(),
                                 "credits": result.credits_remaining,
                                 "attempts": record.attempts + 1})

    def _call_api(self, data: bytes, **options: Any) -> ApiResult:
        """The API call, timed and counted by status for the metrics."""
        started = time.monotonic()
        status: int | None = None
        try:
            result = self.client.remove_background(data, **options)
            status = 200
        except ApiError as exc:
            status = exc.status
            raise
        finally:
            if self.metrics is not None:
                self.metrics.api_response(status, time.monotonic() - started)
        return result

    def _retry(self, work: Work, exc: ApiError) -> Outcome:
        record = work.record
        attempts = record.attempts + 1
        retry = self.config.retry
        if attempts >= retry.max_attempts:
            return failing(exc.reason, f"gave up after {attempts} attempts: {exc.message}",
                           exc.status, attempts=attempts)
        wish = getattr(exc, "delay", None)
        delay = self.queue.retry_delay(
            attempts, retry.backoff_seconds, retry.max_backoff_seconds,
            at_least=0.0 if wish is None else min(wish, retry.retry_after_cap_seconds))
        log.info("file.retry", **work.log_fields(), reason=exc.reason, status=exc.status,
                 attempt=attempts, retry_in_s=round(delay, 2), message=exc.message)
        return Park(delay, changes={"state": QUEUED, "attempts": attempts,
                                    "reason": exc.reason, "message": exc.message,
                                    "status": exc.status})

    def _account_problem(self, exc: AccountError, job: Job) -> None:
        pause = self.config.retry.pause_seconds
        newly = self.queue.pause(exc, pause)
        self.journal.set_meta("paused", f"{exc.reason}: {exc.message}")
        if newly:
            log.error("account.paused", reason=exc.reason, status=exc.status,
                      message=exc.message, probe_every_s=pause,
                      hint=_ACCOUNT_HINTS.get(exc.reason, ""))
        else:
            log.debug("account.still_paused", reason=exc.reason, probe=job.probe)
        if self.on_account_problem is not None:
            self.on_account_problem(exc)

    def _warn_format_refused(self, inbox: InboxConfig) -> None:
        with self._lock:
            new = inbox.output_format not in self._format_warned
            self._format_warned.add(inbox.output_format)
        if new:
            log.warning("api.format_refused", output_format=inbox.output_format,
                        inbox=str(inbox.path),
                        hint="the API refused this output_format; set another one")

    def _note_credits(self, credits: int | None) -> None:
        if credits is None:
            return
        self.credits = credits
        # For `watchfolder status`, also after a stop (records finish out of order).
        self.journal.set_meta("credits", json.dumps({"remaining": credits, "at": time.time()}))
        threshold = self.config.api.low_credits_warning
        if credits < threshold and not self._credits_warned:
            self._credits_warned = True
            log.warning("credits.low", credits_remaining=credits, threshold=threshold,
                        hint="top up the Clipdrop account before it runs out")
        elif credits >= threshold:
            self._credits_warned = False

    # -- step: fetched → stored ---------------------------------------------------------------

    def _store(self, work: Work) -> Outcome:
        """Copy the answer (spooled, or an earlier identical result) into the outbox."""
        record, inbox = work.record, work.inbox
        source = Path(record.spool or record.reuse_from or "")
        chosen = Path(record.result) if record.result else None

        def ours(path: Path) -> bool:
            return _sha_or_none(path) == record.result_sha

        if not source.is_file() and not (chosen is not None and ours(chosen)):
            # The spool or the reused result vanished (cleaned up by hand): ask again.
            return Advance(QUEUED, {"spool": None, "reuse_from": None, "result": None})
        rel = PurePosixPath(work.job.rel)
        target = inbox.outbox.joinpath(*rel.parent.parts, rel.stem + source.suffix)
        placed = self.destinations.place(
            inbox.outbox, "outbox", target, chosen, ours=ours,
            claim=lambda name: self.journal.update(record, result=str(name)),
            put=lambda name: copy_into(source, name), need=source.stat().st_size)
        failpoints.hit("result-placed")
        spool = Path(record.spool) if record.spool else None
        # Forget the spool in the same commit: a crash before the unlink leaves an orphan that
        # the next start removes, never a reference that keeps it forever.
        return Advance(STORED, {"spool": None},
                       remember=(f"{record.sha256}|{record.settings}", str(placed),
                                 record.result_sha or ""),
                       then=None if spool is None else lambda: spool.unlink(missing_ok=True))

    # -- step: stored → done ------------------------------------------------------------------

    def _finish(self, work: Work) -> Outcome:
        """Move the original to the archive (or leave it in place, remembered as done)."""
        record, archive, src = work.record, work.inbox.archive, work.src
        if os.path.lexists(src) and self._replaced(work):
            log.warning("file.changed", **work.log_fields(),
                        hint="replaced while processing; the new version is processed next")
            # Done for the content that was sent; the new content under this name is new work
            # (size -1: no signature of a kept file matches it, now or after a restart).
            return Advance(DONE, {"size": -1})
        if archive is not None and os.path.lexists(src):
            chosen = Path(record.archive) if record.archive else None
            self.destinations.place(
                archive, "archive", archive / work.job.rel, chosen,
                ours=lambda name: _moved(src, name),
                claim=lambda name: self.journal.update(record, archive=str(name)),
                put=lambda name: move_into(src, name))
            failpoints.hit("archived")
        return Advance(DONE)

    @staticmethod
    def _replaced(work: Work) -> bool:
        """The file at the source's path is not the content that was sent (by size and mtime,
        then by hash: some tools replace a file keeping both)."""
        record = work.record
        try:
            st = work.src.lstat()
        except FileNotFoundError:
            return False
        if (st.st_size, st.st_mtime_ns) != (record.size, record.mtime_ns):
            return True
        return stat.S_ISREG(st.st_mode) and _sha_or_none(work.src) != record.sha256

    # -- step: failing → failed | gone --------------------------------------------------------

    def _fail(self, work: Work) -> Outcome:
        """Move the file to errors, then write its reason beside it."""
        record, inbox, src = work.record, work.inbox, work.src
        chosen = Path(record.error_path) if record.error_path else None
        if not os.path.lexists(src) and (chosen is None or not os.path.lexists(chosen)):
            return self._gone(work, "removed from the inbox before it was moved to errors",
                              reason=record.reason, message=record.message)

        placed = self.destinations.place(
            inbox.errors, "errors", inbox.errors / work.job.rel, chosen,
            ours=lambda name: not os.path.lexists(src) or _moved(src, name),
            claim=lambda name: self.journal.update(record, error_path=str(name)),
            put=lambda name: move_into(src, name), also_free=(REASON_SUFFIX,))
        failpoints.hit("error-moved")
        self.destinations.guard(inbox.errors, write_atomic, _reason(record, src, placed),
                                Path(f"{placed}{REASON_SUFFIX}"))
        failpoints.hit("reason-written")
        return Advance(FAILED)

    # -- bugs ---------------------------------------------------------------------------------

    def _internal_error(self, work: Work, exc: Exception) -> Outcome:
        record = work.record
        log.exception("file.internal_error", **work.log_fields(), error=type(exc).__name__)
        attempts = record.attempts + 1
        if attempts >= self.config.retry.max_attempts and record.state in (QUEUED, SENDING):
            return failing("internal_error", f"watchfolder failed on this file: "
                           f"{type(exc).__name__}: {exc}", attempts=attempts)
        back: dict[str, Any] = {"attempts": attempts}
        if record.state == SENDING:
            back["state"] = QUEUED
        return Park(self.config.retry.backoff_seconds * attempts, changes=back)

    # -- bookkeeping --------------------------------------------------------------------------

    @contextmanager
    def _busy(self) -> Iterator[None]:
        with self._lock:
            self.in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self.in_flight -= 1

    def _release_slot(self, work: Work) -> None:
        if work.holds_slot:
            work.holds_slot = False
            self.slots.release()


def spare_workers(concurrency: int) -> int:
    """Workers beyond `concurrency`, for the local steps; each holds at most one file's bytes."""
    return max(2, concurrency // 4)


def _reason(record: FileRecord, src: Path, placed: Path) -> bytes:
    """The `.error.json` beside a failed file: why, and where it came from."""
    report: dict[str, Any] = {
        "reason": record.reason,
        "message": record.message and readable(record.message),
        "status": record.status,
        "attempts": record.attempts,
        "source": readable(str(src)),
        "failed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inbox": readable(record.inbox),
        "file": readable(record.rel),
        "sha256": record.sha256,
        "watchfolder": __version__,
    }
    raw = os.fsencode(record.rel)
    if readable(record.rel) != record.rel:
        report["file_bytes"] = raw.hex()  # the exact name, for requeue
    if placed.name != src.name and len(os.fsencode(src.name + REASON_SUFFIX)) > NAME_MAX:
        report["renamed"] = (f"the name is too long for the errors folder with "
                             f"'{REASON_SUFFIX}' after it: shortened to {readable(placed.name)}")
    return (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode()


_ACCOUNT_HINTS = {
    "key_missing": "set api.key, api.key_file or the systemd credential, then reload",
    "key_refused": "the key is invalid or revoked: put a valid key in place and reload",
    "no_credits": "add credits to the Clipdrop account; processing resumes by itself",
    "endpoint_missing": "check api.url in the configuration",
}


def _inside(root: Path, folder: Path) -> bool:
    real_root = os.path.realpath(root)
    real = os.path.realpath(folder)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def _sendable(name: str) -> str:
    """The name for the request's multipart header, which must be UTF-8."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _moved(src: Path, dest: Path) -> bool:
    """True if `src` was moved to `dest` (a crash may have left both names: finish the move)."""
    if not same_file(src, dest):
        return False
    src.unlink()
    return True


def _sha_or_none(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except OSError:
        return None
