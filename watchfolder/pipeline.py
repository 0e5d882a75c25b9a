"""Workers that carry each complete file through its journal states to outbox/archive/errors.

A `Job` is one file in one inbox. Workers take jobs from the `JobQueue` and advance them one
journal state at a time (see journal.py); each step is recorded before its effect, so any step
can be repeated after a crash without a second result or a lost original.

`api.concurrency` counts requests, not workers: a request holds one of the `RequestSlots`
from before the limiter is asked until its answer is journaled, while a few spare workers do
the local steps of other files (reading, journal commits, outbox and archive writes), so
local work never leaves a slot idle at the rate limit.

Policies, per the API contract:
- a transient failure (5xx, reset, timeout, broken 200) parks the job in the queue's timer
  heap with exponential backoff and full jitter, so it holds no worker and no request slot;
- a 429 holds the shared limiter and puts the job back at the front, costing no attempt;
- an account problem (401/402/403/404) pauses the queue: nothing is sent but one probe every
  `retry.pause_seconds`; the first accepted request resumes everything;
- a folder we must write to that is missing or unwritable parks the job (no request is spent
  while the outbox is unusable), and is reported once until it recovers.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import heapq
import itertools
import json
import os
import random
import stat
import threading
import time
from collections.abc import Callable, Iterator
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
    InputRejected,
    RateLimited,
    Retryable,
)
from watchfolder.images import inspect_input, inspect_result
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
from watchfolder.outbox import (
    candidates,
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


@dataclass
class Job:
    index: int  # which inbox
    rel: str  # path below the inbox, POSIX form
    record: FileRecord | None = None
    identity: str | None = None  # content hash + settings, once read
    probe: bool = False
    seen: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> tuple[int, str]:
        return (self.index, self.rel)


class JobQueue:
    """Ready jobs, jobs waiting for a retry time, and the account pause."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._cond = threading.Condition()
        self._ready: collections.deque[Job] = collections.deque()
        self._later: list[tuple[float, int, Job]] = []
        self._seq = itertools.count()
        self._closed = False
        self.paused: AccountError | None = None
        self._probe_at = 0.0
        self._probe_every = 0.0

    def put(self, job: Job, *, front: bool = False) -> None:
        with self._cond:
            if front:
                self._ready.appendleft(job)
            else:
                self._ready.append(job)
            self._cond.notify()

    def put_later(self, job: Job, delay: float) -> None:
        with self._cond:
            heapq.heappush(self._later, (self.clock() + delay, next(self._seq), job))
            self._cond.notify()

    def pause(self, error: AccountError, probe_in: float) -> bool:
        """Stop handing out jobs except one probe every `probe_in` s; True if newly paused."""
        with self._cond:
            newly = self.paused is None
            self.paused = error
            self._probe_every = probe_in
            self._probe_at = self.clock() + probe_in
            return newly

    def resume(self) -> bool:
        with self._cond:
            was = self.paused is not None
            self.paused = None
            self._cond.notify_all()
            return was

    def probe_now(self) -> None:
        """While paused, let the next probe go at once (after a reload with a new key)."""
        with self._cond:
            self._probe_at = self.clock()
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._ready) + len(self._later)

    def get(self) -> Job | None:
        """Block until a job may be worked on; None once the queue is closed."""
        with self._cond:
            while not self._closed:
                now = self.clock()
                while self._later and self._later[0][0] <= now:
                    self._ready.append(heapq.heappop(self._later)[2])
                wake = self._later[0][0] if self._later else None
                if self.paused is None:
                    if self._ready:
                        return self._ready.popleft()
                elif self._ready and self._probe_at <= now:
                    # The next probe is due one interval later whatever becomes of this one
                    # (it may hit a 500, turn out to be a bad file, or hang): never stuck.
                    self._probe_at = now + self._probe_every
                    job = self._ready.popleft()
                    job.probe = True
                    return job
                else:
                    wake = self._probe_at if wake is None else min(wake, self._probe_at)
                self._cond.wait(None if wake is None else max(0.0, wake - now))
            return None


class RequestSlots:
    """One slot per request that may be in flight (or answered but not yet journaled).

    Held from before the limiter is asked (a slot waited for after the limiter granted would
    send later than the limiter counted) until the answer is journaled, so at most `size`
    records are ever `sending`: what a crash can cost stays one credit per slot.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._free = size
        self._cond = threading.Condition()

    def acquire(self, stop: threading.Event) -> bool:
        """Block until a slot is ours (True) or `stop` is set (False)."""
        with self._cond:
            while self._free <= 0:
                if stop.is_set():
                    return False
                self._cond.wait()
            self._free -= 1
            return True

    def release(self) -> None:
        with self._cond:
            self._free += 1
            self._cond.notify()

    def wake(self) -> None:
        """Let every waiter look at its stop event again."""
        with self._cond:
            self._cond.notify_all()


def spare_workers(concurrency: int) -> int:
    """Workers beyond `concurrency`, for the local steps; each holds at most one file's bytes."""
    return max(2, concurrency // 4)


class _Parked(Exception):
    """The job went back to the queue; the worker moves on."""


class Pipeline:
    """The worker pool and the per-file steps. Owns no folders' discovery."""

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
        self.stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        # content identity → the job whose request will produce it
        self._identities: dict[str, tuple[int, str]] = {}
        self._bad_destinations: set[str] = set()
        self._format_warned: set[str] = set()
        self.in_flight = 0
        self.done = 0
        self.failed = 0
        self.reused = 0
        self.credits: int | None = None
        self._credits_warned = False
        self.metrics: Metrics | None = None  # set by the daemon when metrics are served

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

    # -- the worker loop ----------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            with self._lock:
                self.in_flight += 1
            try:
                self._advance(job)
            except _Parked:
                pass
            except Exception as exc:  # noqa: BLE001 - a bug must not kill the worker nor lose the file
                self._internal_error(job, exc)
            finally:
                with self._lock:
                    self.in_flight -= 1

    def _advance(self, job: Job) -> None:
        if job.record is None:
            job.record = self._open_record(job)
            if job.record is None:
                return
        steps = {QUEUED: self._send, SENDING: self._send, FETCHED: self._store,
                 STORED: self._finish, FAILING: self._fail}
        while job.record.state not in FINAL:
            steps[job.record.state](job)
        with self._lock:
            if job.identity is not None and self._identities.get(job.identity) == job.key:
                del self._identities[job.identity]
            if job.record.state == DONE:
                self.done += 1
            elif job.record.state == FAILED:
                self.failed += 1
        if self.metrics is not None:
            self.metrics.file_finished(str(self.inboxes[job.index].path), job.record.state,
                                       reason=job.record.reason,
                                       reused=bool(job.record.reuse_from))
        kept = None
        if job.record.state == DONE and self.inboxes[job.index].archive is None:
            kept = (job.record.size, job.record.mtime_ns)
        self.release(job, kept)

    def _open_record(self, job: Job) -> FileRecord | None:
        inbox = self.inboxes[job.index]
        existing = self.journal.active(str(inbox.path), job.rel)
        if existing is not None:
            return existing
        try:
            st = (inbox.path / job.rel).lstat()
        except FileNotFoundError:
            self.release(job, None)
            return None
        return self.journal.create(str(inbox.path), job.rel, st.st_size, st.st_mtime_ns,
                                   inbox.settings_key)

    def _park(self, job: Job, delay: float = 0.0, *, front: bool = False) -> None:
        job.probe = False
        if delay > 0:
            self.queue.put_later(job, delay)
        else:
            self.queue.put(job, front=front)
        raise _Parked

    # -- step: queued/sending → fetched | failing -----------------------------------------------

    def _send(self, job: Job) -> None:
        record = job.record
        assert record is not None
        inbox = self.inboxes[job.index]
        src = inbox.path / job.rel
        if self.stopping.is_set():
            self._back_to_queue(record)
            raise _Parked
        data = self._read_source(job, src)
        if data is None:
            return
        try:
            info = inspect_input(data)
        except InputRejected as exc:
            self._to_failing(record, exc.reason, exc.message)
            return
        sha = hashlib.sha256(data).hexdigest()
        identity = f"{sha}|{inbox.settings_key}"
        if record.sha256 != sha:
            self.journal.update(record, sha256=sha)
        if self._reuse(record, identity):
            return
        with self._lock:
            owner = self._identities.setdefault(identity, job.key)
        if owner != job.key:
            # The same content is on its way already: wait for that result and reuse it.
            self._park(job, 2.0)
        job.identity = identity
        with self._request_slot(record):
            self._request(job, data, info.mime, info.width, info.height)

    @contextlib.contextmanager
    def _request_slot(self, record: FileRecord) -> Iterator[None]:
        if not self.slots.acquire(self.stopping):
            self._back_to_queue(record)
            raise _Parked
        try:
            yield
        finally:
            self.slots.release()

    def _read_source(self, job: Job, src: Path) -> bytes | None:
        """The file's bytes, read without following links; None if the job ended here."""
        record = job.record
        assert record is not None
        inbox = self.inboxes[job.index]
        try:
            st = src.lstat()
        except FileNotFoundError:
            self.journal.update(record, state=GONE)
            log.warning("file.gone", inbox=str(inbox.path), file=job.rel,
                        hint="removed from the inbox before it was processed")
            return None
        if stat.S_ISLNK(st.st_mode):
            self._to_failing(record, "symlink", "the file is a symbolic link; watchfolder never "
                             "follows links out of the inbox. Put the file itself in the inbox.")
            return None
        if not stat.S_ISREG(st.st_mode):
            self._to_failing(record, "not_a_file", "not a regular file (a device, socket or "
                             "pipe); only image files can be processed")
            return None
        if not _inside(inbox.path, src.parent):
            # Reached through a linked folder: it lives outside the inbox; never touch it.
            self.journal.update(record, state=GONE)
            log.warning("file.outside_inbox", inbox=str(inbox.path), file=job.rel)
            return None
        try:
            fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            self.journal.update(record, state=GONE)
            return None
        except OSError as exc:
            self._to_failing(record, "unreadable", f"cannot read the file: {exc.strerror}")
            return None
        with os.fdopen(fd, "rb") as handle:
            st = os.fstat(handle.fileno())
            data = handle.read(32 * 1024 * 1024)
        if (record.size, record.mtime_ns) != (st.st_size, st.st_mtime_ns):
            self.journal.update(record, size=st.st_size, mtime_ns=st.st_mtime_ns)
        return data

    def _reuse(self, record: FileRecord, identity: str) -> bool:
        """Point the record at an earlier result for the same content and settings, if any."""
        found = self.journal.find_result(identity)
        if found is None:
            return False
        path, sha = Path(found[0]), found[1]
        try:
            if sha256_file(path) != sha:
                return False
        except OSError:
            return False
        self.journal.update(record, state=FETCHED, reuse_from=str(path), spool=None,
                            result_sha=sha)
        return True

    def _request(self, job: Job, data: bytes, mime: str, width: int, height: int) -> None:
        record = job.record
        assert record is not None
        inbox = self.inboxes[job.index]
        self._check_destinations(inbox)
        if not self.limiter.acquire(self.stopping):
            self._back_to_queue(record)
            raise _Parked
        self.journal.update(record, state=SENDING, sent=True)
        failpoints.hit("sending")
        try:
            result = self._call_api(
                data, filename=PurePosixPath(job.rel).name, mime=mime,
                output_format=inbox.output_format, transparency=inbox.transparency_handling)
            ext = inspect_result(result.content, width, height)
        except RateLimited as exc:
            delay = self.limiter.rate_limited(
                None if exc.delay is None
                else min(exc.delay, self.config.retry.retry_after_cap_seconds))
            log.warning("api.rate_limited", delay_s=round(delay, 2),
                        retry_after=exc.delay is not None)
            self._back_to_queue(record)
            self._park(job, front=True)
        except AccountError as exc:
            self._back_to_queue(record)
            self._account_problem(exc, job)
            self._park(job, front=True)
        except FileRejected as exc:
            if exc.status == 406 and inbox.output_format not in self._format_warned:
                self._format_warned.add(inbox.output_format)
                log.warning("api.format_refused", output_format=inbox.output_format,
                            inbox=str(inbox.path),
                            hint="the API refused this output_format; set another one")
            self._to_failing(record, exc.reason, exc.message, exc.status,
                             attempts=record.attempts + 1)
            return
        except Retryable as exc:
            self._retry_later(job, exc)
            return
        failpoints.hit("answered")
        self.limiter.succeeded()
        # Only the probe was sent while paused; an older request's success says nothing
        # about the account now.
        if job.probe and self.queue.resume():
            self.journal.set_meta("paused", None)
            log.warning("account.resumed", hint="the API accepts requests again")
        content_sha = hashlib.sha256(result.content).hexdigest()
        spool = self.journal.spool_dir / f"{record.id}.{ext}"
        write_atomic(result.content, spool)
        failpoints.hit("spooled")
        self.journal.update(record, state=FETCHED, spool=str(spool), result_sha=content_sha,
                            credits=result.credits_remaining, attempts=record.attempts + 1)
        failpoints.hit("fetched")
        self._note_credits(result.credits_remaining)

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

    def _retry_later(self, job: Job, exc: ApiError) -> None:
        record = job.record
        assert record is not None
        attempts = record.attempts + 1
        retry = self.config.retry
        if attempts >= retry.max_attempts:
            self._to_failing(record, exc.reason, f"gave up after {attempts} attempts: "
                             f"{exc.message}", exc.status, attempts=attempts)
            return
        ceiling = min(retry.max_backoff_seconds, retry.backoff_seconds * 2 ** (attempts - 1))
        delay = random.uniform(0, ceiling)  # full jitter
        wish = getattr(exc, "delay", None)
        if wish is not None:
            delay = max(delay, min(wish, retry.retry_after_cap_seconds))
        self.journal.update(record, state=QUEUED, attempts=attempts, reason=exc.reason,
                            message=exc.message, status=exc.status)
        log.info("file.retry", inbox=str(self.inboxes[job.index].path), file=job.rel,
                 reason=exc.reason, status=exc.status, attempt=attempts,
                 retry_in_s=round(delay, 2), message=exc.message)
        self._park(job, delay)

    def _back_to_queue(self, record: FileRecord) -> None:
        if record.state == SENDING:
            self.journal.update(record, state=QUEUED)

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

    def _check_destinations(self, inbox: InboxConfig) -> None:
        """Spend no request while the result or the original would have nowhere to go."""
        for name, folder in (("outbox", inbox.outbox), ("archive", inbox.archive)):
            if folder is None:
                continue
            if not folder.is_dir():
                self._destination_problem(folder, f"the {name} folder {folder} is missing "
                                                  f"(deleted or not mounted)")
            if not os.access(folder, os.W_OK | os.X_OK):
                self._destination_problem(folder, f"the {name} folder {folder} is not "
                                                  f"writable by this user")
            self._destination_ok(folder)

    def _destination_problem(self, folder: Path, message: str) -> None:
        with self._lock:
            new = str(folder) not in self._bad_destinations
            self._bad_destinations.add(str(folder))
        if new:
            log.error("destination.unavailable", folder=str(folder), message=message,
                      hint="files wait in the inbox until it is back")
        raise DestinationError(message)

    def _destination_ok(self, folder: Path) -> None:
        with self._lock:
            was_bad = str(folder) in self._bad_destinations
            self._bad_destinations.discard(str(folder))
        if was_bad:
            log.warning("destination.recovered", folder=str(folder))

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

    def _store(self, job: Job) -> None:
        record = job.record
        assert record is not None
        inbox = self.inboxes[job.index]
        source = Path(record.spool or record.reuse_from or "")
        chosen = Path(record.result) if record.result else None
        if chosen is not None and chosen.exists() and _sha_or_none(chosen) == record.result_sha:
            pass  # placed before a crash: it is ours, do not make a "-1" copy
        elif not source.is_file():
            # The spool or the reused result vanished (cleaned up by hand): ask again.
            self.journal.update(record, state=QUEUED, spool=None, reuse_from=None, result=None)
            return
        else:
            rel = PurePosixPath(job.rel)
            target = inbox.outbox.joinpath(*rel.parent.parts, rel.stem + source.suffix)
            self._prepare(inbox.outbox, target.parent, "outbox")
            order = [chosen] if chosen is not None and not chosen.exists() else []
            for candidate in itertools.chain(order, candidates(target)):
                self.journal.update(record, result=str(candidate))
                if self._guard(inbox.outbox, copy_into, source, candidate):
                    failpoints.hit("result-placed")
                    break
        spool = record.spool
        # Forget the spool in the same commit: a crash before the unlink leaves an orphan that
        # the next start removes, never a reference that keeps it forever.
        self.journal.update(record, state=STORED, spool=None)
        failpoints.hit("stored")
        assert record.result is not None and record.result_sha is not None and record.sha256
        self.journal.remember_result(f"{record.sha256}|{record.settings}", record.result,
                                     record.result_sha)
        if spool:
            Path(spool).unlink(missing_ok=True)

    # -- step: stored → done ------------------------------------------------------------------

    def _finish(self, job: Job) -> None:
        record = job.record
        assert record is not None
        inbox = self.inboxes[job.index]
        src = inbox.path / job.rel
        if inbox.archive is not None and os.path.lexists(src):
            st = src.lstat()
            if (st.st_size, st.st_mtime_ns) != (record.size, record.mtime_ns):
                log.warning("file.changed", inbox=str(inbox.path), file=job.rel,
                            hint="replaced while processing; the new version is processed next")
            else:
                self._archive(job, src)
        self.journal.update(record, state=DONE)
        if record.reuse_from:
            with self._lock:
                self.reused += 1
        log.info("file.done", inbox=str(inbox.path), file=job.rel, result=record.result,
                 archived=record.archive, attempts=record.attempts,
                 reused=bool(record.reuse_from), credits_remaining=record.credits,
                 ms=round((time.monotonic() - job.seen) * 1000))

    def _archive(self, job: Job, src: Path) -> None:
        record = job.record
        assert record is not None and self.inboxes[job.index].archive is not None
        archive = self.inboxes[job.index].archive
        assert archive is not None
        chosen = Path(record.archive) if record.archive else None
        if chosen is not None and os.path.lexists(chosen) and same_file(src, chosen):
            src.unlink()  # linked before a crash; finish the move
            return
        target = archive / job.rel
        self._prepare(archive, target.parent, "archive")
        order = [chosen] if chosen is not None and not os.path.lexists(chosen) else []
        for candidate in itertools.chain(order, candidates(target)):
            self.journal.update(record, archive=str(candidate))
            if self._guard(archive, move_into, src, candidate):
                failpoints.hit("archived")
                return

    # -- step: failing → failed ---------------------------------------------------------------

    def _to_failing(self, record: FileRecord, reason: str, message: str,
                    status: int | None = None, *, attempts: int | None = None) -> None:
        changes: dict[str, Any] = {"state": FAILING, "reason": reason, "message": message,
                                      "status": status}
        if attempts is not None:
            changes["attempts"] = attempts
        self.journal.update(record, **changes)

    def _fail(self, job: Job) -> None:
        record = job.record
        assert record is not None
        inbox = self.inboxes[job.index]
        src = inbox.path / job.rel
        chosen = Path(record.error_path) if record.error_path else None
        if not os.path.lexists(src):
            if chosen is None or not os.path.lexists(chosen):
                self.journal.update(record, state=GONE)
                log.warning("file.gone", inbox=str(inbox.path), file=job.rel,
                            reason=record.reason, message=record.message)
                return
            self._write_reason(record, src, chosen)  # moved before a crash; the reason too
        elif chosen is not None and os.path.lexists(chosen) and same_file(src, chosen):
            src.unlink()  # linked before a crash, its reason written before that: finish it
        else:
            target = inbox.errors / job.rel
            self._prepare(inbox.errors, target.parent, "errors")
            order = [chosen] if chosen is not None and not os.path.lexists(chosen) else []
            for candidate in itertools.chain(order, candidates(target,
                                                               also_free=(".error.json",))):
                self.journal.update(record, error_path=str(candidate))
                self._write_reason(record, src, candidate)
                failpoints.hit("reason-written")
                if self._guard(inbox.errors, move_into, src, candidate):
                    failpoints.hit("error-moved")
                    break
        self.journal.update(record, state=FAILED)
        log.error("file.failed", inbox=str(inbox.path), file=job.rel, reason=record.reason,
                  status=record.status, message=record.message, attempts=record.attempts,
                  moved_to=record.error_path, ms=round((time.monotonic() - job.seen) * 1000))

    def _write_reason(self, record: FileRecord, src: Path, dest: Path) -> None:
        report = {
            "reason": record.reason,
            "message": record.message,
            "status": record.status,
            "attempts": record.attempts,
            "source": str(src),
            "failed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "inbox": record.inbox,
            "file": record.rel,
            "sha256": record.sha256,
            "watchfolder": __version__,
        }
        data = (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode()
        self._guard(dest.parent, write_atomic, data, Path(f"{dest}.error.json"))

    # -- folder helpers -----------------------------------------------------------------------

    def _prepare(self, root: Path, folder: Path, name: str) -> None:
        """Create `folder` below `root`; never recreate a missing root (it may be a mount)."""
        if not root.is_dir():
            self._destination_problem(root, f"the {name} folder {root} is missing "
                                            f"(deleted or not mounted)")
        self._guard(root, folder.mkdir, parents=True, exist_ok=True)

    def _guard(self, root: Path, action: Callable[..., object], *args: object,
               **kwargs: object) -> object:
        """Run a filesystem action; an OSError becomes a reported DestinationError."""
        try:
            result = action(*args, **kwargs)
        except OSError as exc:
            self._destination_problem(root, f"cannot write in {root}: "
                                            f"{exc.strerror or exc} ({type(exc).__name__})")
        self._destination_ok(root)
        return result

    def _internal_error(self, job: Job, exc: Exception) -> None:
        record = job.record
        if isinstance(exc, DestinationError):
            self._park_quietly(job, min(self.config.retry.pause_seconds, 30.0))
            return
        log.exception("file.internal_error", inbox=str(self.inboxes[job.index].path),
                      file=job.rel, error=type(exc).__name__)
        if record is None:
            self.release(job, None)
            return
        attempts = record.attempts + 1
        if attempts >= self.config.retry.max_attempts and record.state in (QUEUED, SENDING):
            self._to_failing(record, "internal_error", f"watchfolder failed on this file: "
                             f"{type(exc).__name__}: {exc}", attempts=attempts)
        else:
            self.journal.update(record, attempts=attempts)
        self._park_quietly(job, self.config.retry.backoff_seconds * attempts)

    def _park_quietly(self, job: Job, delay: float) -> None:
        with contextlib.suppress(_Parked):
            self._park(job, delay)

    def snapshot(self) -> dict[str, object]:
        paused = self.queue.paused
        return {"waiting": len(self.queue), "in_flight": self.in_flight, "done": self.done,
                "failed": self.failed, "reused": self.reused, "credits": self.credits,
                "paused": f"{paused.reason}: {paused.message}" if paused else None}


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


def _sha_or_none(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except OSError:
        return None
