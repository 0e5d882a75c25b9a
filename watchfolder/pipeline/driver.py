"""The life of one file: a worker takes a job, runs the step for its journal state, and applies
what the step returns, until the file is finished or parked.

    queued ──prepare───────────────► sending ──send──► fetched ──store──► stored ──finish──► done
      │ └─prepare (studio)─► proxied ─admit─┘ │         ▲ │  (every output placed)       ▲
      │                        ▲              │         │ └─(spool lost)─► queued        │
      │      park ◄────────────┴──────────────┤         │                                │
      │  (429, account pause, budget, transient error: back to queued or proxied, retried │
      │   later; a `sending` left by a crash is sent again)                              │
      ├──(an earlier answer for the same content: reused)┘                                │
      ├──(finished in place by another daemon sharing the inbox)──────────────────────────┘
      └──(refused here or by the API, out of attempts; or from fetched)──► failing ─fail─► failed
    queued, sending (claim lost to another daemon), failing ──► gone (the file vanished)

Each step is a method taking the `Work` item (job, journal record, inbox) and returning an
`Advance` (the next state and the fields to journal with it) or a `Park` (back to the queue
after a delay, or until an identical file's result is stored). The loop in `_live` journals
every transition *before* the next step has its effect, so after a crash at any instant the
next start resumes each file from its last state without a second result or a lost original.

`api.concurrency` counts requests, not workers: a request holds one of the `RequestSlots`
from before the limiter is asked until its answer is placed and the original archived (parked
meanwhile, the job waits on the local lane, whose workers never wait for a slot), while a few
spare workers do the local steps of other files. A received answer keeps its slot because,
should this daemon die, the daemon that takes the file over pays for it again: so a crash
costs at most one credit per slot, whether its request was in flight or answered.

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
import io
import json
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import structlog
from PIL import Image

from watchfolder import __version__, failpoints
from watchfolder.config.settings import Config, InboxConfig
from watchfolder.coordination.coordinator import Coordinator
from watchfolder.coordination.limits import Limiter, SharedPause
from watchfolder.errors import (
    AccountError,
    ApiError,
    CoordinationUnavailable,
    DestinationError,
    FileRejected,
    FormatNotAcceptable,
    InputRejected,
    RateLimited,
    Retryable,
)
from watchfolder.files.place import (
    NAME_MAX,
    REASON_SUFFIX,
    Destinations,
    fsync_dir,
    move_into,
    same_file,
    sha256_file,
    write_atomic,
)
from watchfolder.handoff.manifest import (
    manifest_json,
)
from watchfolder.imaging.compose import make_proxy
from watchfolder.imaging.inspect import inspect_result, inspect_source, verify_decodes
from watchfolder.intake.settle import Signature
from watchfolder.journal.db import (
    DONE,
    FAILED,
    FAILING,
    FETCHED,
    FINAL,
    GONE,
    PROXIED,
    QUEUED,
    SENDING,
    STORED,
    FileRecord,
    Journal,
)
from watchfolder.logs import readable
from watchfolder.pipeline import outputs
from watchfolder.pipeline.budget import Budget, BudgetReached
from watchfolder.pipeline.client import ApiClient, ApiResult, max_result_bytes
from watchfolder.pipeline.jobqueue import Job, JobQueue, RequestSlots

if TYPE_CHECKING:
    from watchfolder.handoff.wiring import HandOff
    from watchfolder.service.metrics import Metrics

log = structlog.get_logger("watchfolder")


# -- what a step returns --------------------------------------------------------------------------


@dataclass(frozen=True)
class Advance:
    """Journal `state` with `changes`, then run the step for the new state."""

    state: str
    changes: Mapping[str, Any] = field(default_factory=dict)
    sent: bool = False  # a request goes out: journal its send time too (the rate limit)
    remember: Sequence[tuple[str, str, str]] = ()  # (identity, result, sha256) for reuse
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
    lane: str | None = None  # MAIN or LOCAL: the queue to go to (None: the one it came from)


Outcome = Advance | Park


def failing(reason: str, message: str, status: int | None = None, *,
            attempts: int | None = None) -> Advance:
    changes: dict[str, Any] = {"reason": reason, "message": message, "status": status}
    if attempts is not None:
        changes["attempts"] = attempts
    return Advance(FAILING, changes)


# A request slot is held from before the limiter is asked until the file is finished: its
# answer, once received, stays counted until it is placed and the original archived, so a
# daemon that dies costs a taker at most one credit per slot (see RequestSlots).
ANSWER_UNFINISHED = (SENDING, FETCHED, STORED)
ANSWER_WAITING = (FETCHED, STORED)  # parked in these, a job keeps its slot
MAIN, LOCAL = "main", "local"  # the lanes: requests and light steps / heavy local image work


@dataclass(frozen=True)
class Payload:
    """What one request sends: the original's bytes (fast path) or its proxy's (studio)."""

    data: bytes
    mime: str
    width: int
    height: int


@dataclass
class Work:
    """One file in the hands of a worker: its job, its journal record, its inbox."""

    job: Job
    record: FileRecord
    inbox: InboxConfig
    lane: str = MAIN
    payload: Payload | None = None  # made by `prepare`, sent by `send` (never across a park)

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
                 limiter: Limiter, coordinator: Coordinator, *,
                 release: Callable[[Job, Signature | None], None],
                 on_account_problem: Callable[[AccountError | BudgetReached], None] | None = None
                 ) -> None:
        self.config = config
        self.journal = journal
        self.client = client
        self.limiter = limiter
        self.coordinator = coordinator
        # Another daemon sharing the key paused it (a 402 there), or resumed it.
        limiter.on_pause_change = self._shared_pause_changed
        self.release = release
        self.on_account_problem = on_account_problem
        self.queue = JobQueue()
        # Heavy local image work (proxies, full-resolution cut-outs) has its own lane and
        # workers, as many as the cores allow: big files compose there while small files
        # keep the request slots busy. Proxies go first, so requests are never held back.
        self.local = JobQueue()
        self.local_workers = max(1, (os.cpu_count() or 2) - 1)
        self.slots = RequestSlots(config.api.concurrency)
        self.destinations = Destinations()
        self.twins = Twins()
        self.budget = Budget(config.api.max_credits_per_day, journal.sends_since)
        self.stopping = threading.Event()
        self.metrics: Metrics | None = None  # set by the daemon when metrics are served
        self.handoff: HandOff | None = None  # set by the daemon when hooks or a webhook are
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
            QUEUED: self._prepare, PROXIED: self._admit_proxy, SENDING: self._send,
            FETCHED: self._store, STORED: self._finish, FAILING: self._fail}

    @property
    def inboxes(self) -> tuple[InboxConfig, ...]:
        return self.config.inboxes

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        concurrency = self.slots.size
        lanes = [(MAIN, self.queue)] * (concurrency + spare_workers(concurrency))
        lanes += [(LOCAL, self.local)] * self.local_workers
        for n, (lane, queue) in enumerate(lanes):
            thread = threading.Thread(target=self._work, args=(lane, queue),
                                      name=f"watchfolder-{lane}-worker-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Take no new jobs; requests in flight may finish (see `join`)."""
        self.stopping.set()
        self.queue.close()
        self.local.close()
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
        return {"waiting": len(self.queue) + len(self.local), "in_flight": self.in_flight,
                "done": self.done, "failed": self.failed, "reused": self.reused,
                "credits": self.credits,
                "paused": f"{paused.reason}: {paused.message}" if paused else None,
                **self.budget.snapshot()}

    # -- the worker loop: one file's life -----------------------------------------------------

    def _work(self, lane: str, queue: JobQueue) -> None:
        while (job := queue.get()) is not None:
            with self._busy():
                self._live(job, lane)

    def _live(self, job: Job, lane: str = MAIN) -> None:
        """Run the file's steps until it is finished or parked."""
        work = self._open(job, lane)
        if work is None:
            return
        record = work.record
        try:
            while record.state not in FINAL:
                outcome = self._step(work)
                if isinstance(outcome, Park):
                    if outcome.changes.get("state", record.state) not in ANSWER_WAITING:
                        self._release_slot(job)  # back to the queue: no answer is waiting
                    self._park(work, outcome)
                    return
                self.journal.update(record, state=outcome.state, sent=outcome.sent,
                                    remember=outcome.remember, **outcome.changes)
                failpoints.hit(outcome.state)
                if record.state not in ANSWER_UNFINISHED:
                    self._release_slot(job)  # the file is finished (or no answer will come)
                if outcome.then is not None:
                    outcome.then()
        except BaseException:
            self._release_slot(job)  # the job is lost to this run: never keep its slot
            raise
        self._release_slot(job)
        self._finished(work)

    def _step(self, work: Work) -> Outcome:
        try:
            return self._steps[work.record.state](work)
        except DestinationError:
            # Reported once by Destinations; the file waits, no request is spent meanwhile.
            back = {"state": QUEUED} if work.record.state == SENDING else {}
            return Park(min(self.config.retry.pause_seconds, 30.0), changes=back)
        except CoordinationUnavailable:
            # The store or the claims folder (reported once by them): the file waits.
            back = {"state": QUEUED} if work.record.state == SENDING else {}
            return Park(5.0, changes=back)
        except Exception as exc:  # noqa: BLE001 - a bug must not kill the worker nor lose the file
            return self._internal_error(work, exc)

    def _open(self, job: Job, lane: str) -> Work | None:
        """The job's journal record, created for a new file; None if the file is gone."""
        inbox = self.inboxes[job.index]
        try:
            # One daemon per file, also across hosts sharing the inbox: no claim, no work.
            claim = self.coordinator.claim(inbox.path, job.rel)
        except CoordinationUnavailable:
            # The store or the claims folder: back soon. A slot it holds stays held (its answer
            # still waits), so it waits on the local lane like any parked slot holder.
            (self.local if job.holds_slot else self.queue).put_later(job, 5.0)
            return None
        if claim is None:
            # Another daemon holds it (or the store's grace after a loss runs); look again in a
            # while (its holder may die). Taken over, its answer is the taker's to pay for.
            self._release_slot(job)
            self.queue.put_later(job, self.coordinator.claim_wait())
            return None
        try:
            record = job.record or self.journal.active(str(inbox.path), job.rel)
            if record is None:
                try:
                    st = (inbox.path / job.rel).lstat()
                except FileNotFoundError:
                    self.coordinator.release(inbox.path, job.rel)
                    self.release(job, None)
                    return None
                record = self.journal.create(str(inbox.path), job.rel, st.st_size,
                                             st.st_mtime_ns, inbox.settings_key)
        except Exception:
            log.exception("file.internal_error", inbox=str(inbox.path), file=job.rel)
            self._release_slot(job)
            self.coordinator.release(inbox.path, job.rel)
            self.release(job, None)
            return None
        job.record = record
        return Work(job, record, inbox, lane)

    def _park(self, work: Work, park: Park) -> None:
        if park.changes:
            self.journal.update(work.record, **park.changes)
        job = work.job
        job.probe = False
        if park.twin:
            return  # Twins holds it until the first copy is finished
        # A job holding a request slot never waits for a main worker: those may all be
        # waiting for its slot.
        local = (park.lane or work.lane) == LOCAL or job.holds_slot
        queue = self.local if local else self.queue
        if park.delay > 0:
            queue.put_later(job, park.delay)
        else:
            queue.put(job, front=park.front)

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
        self.coordinator.release(inbox.path, job.rel)
        self.release(job, kept)

    # -- step: queued → sending | proxied | fetched (reused) | failing | gone -------------------

    def _prepare(self, work: Work) -> Outcome:
        """Check the file; reuse an earlier answer, or make what will be sent.

        The fast path (a file the API takes as it is) goes straight to a request; the studio
        path makes a proxy first, on the local lane.
        """
        if self.stopping.is_set():
            return Park()
        if not _inside(work.inbox.path, work.src.parent):
            # Reached through a linked folder: it lives outside the inbox; never touch it.
            log.warning("file.outside_inbox", **work.log_fields())
            return Advance(GONE)
        record, inbox, src = work.record, work.inbox, work.src
        try:
            st = self._check_file(work)
            if st is None:
                return self._gone(work, "removed from the inbox before it was processed")
            source = inspect_source(src, studio=inbox.studio, verify=False)
            if source.route == "studio" and work.lane != LOCAL:
                return Park(lane=LOCAL, changes={"route": "studio"})
            if source.route == "fast":
                verify_decodes(src, source)
                data = self._read(work)
                sha = hashlib.sha256(data).hexdigest()
            else:
                sha = sha256_file(src)
        except InputRejected as exc:
            return failing(exc.reason, exc.message)
        except FileNotFoundError:
            return self._gone(work, "removed from the inbox before it was processed")
        except OSError as exc:
            return failing("unreadable", f"cannot read the file: {exc.strerror or exc}")
        seen = {"sha256": sha, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                "route": source.route}
        identity = work.job.identity = f"{sha}|{inbox.settings_key}"
        if inbox.archive is None and self.coordinator.done_elsewhere(
                inbox.path, work.job.rel, st.st_size, st.st_mtime_ns, sha):
            return Advance(DONE, seen)  # finished in place by another daemon: kept, not resent
        earlier = self._earlier_results(identity, len(inbox.outputs) or 1)
        if earlier is not None:
            return Advance(FETCHED, {**seen, "reuse_from": json.dumps(earlier), "spool": None})
        if not self.twins.claim(identity, work.job):
            return Park(twin=True, changes=seen)
        if source.route == "fast":
            width, height = source.width, source.height
            return self._admit(work, Payload(data, source.mime, width, height), seen,
                               need=width * height * 4)
        proxy = self.journal.spool_dir / f"{record.id}.proxy.jpg"
        try:
            made = make_proxy(src, source, proxy)
        except InputRejected as exc:
            return failing(exc.reason, exc.message)
        log.info("file.proxy", **work.log_fields(), why=source.reason,
                 original=f"{source.upright[0]}x{source.upright[1]}",
                 proxy=f"{made.width}x{made.height}", bytes=made.size)
        return Advance(PROXIED, {**seen, "proxy": str(proxy)})

    def _check_file(self, work: Work) -> os.stat_result | None:
        """The file's stat if it is a regular file of ours; None if it is gone."""
        try:
            st = work.src.lstat()
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(st.st_mode):
            raise InputRejected("symlink", "the file is a symbolic link; watchfolder never "
                                "follows links out of the inbox. Put the file itself in the "
                                "inbox.")
        if not stat.S_ISREG(st.st_mode):
            raise InputRejected("not_a_file", "not a regular file (a device, socket or pipe); "
                                "only image files can be processed")
        return st

    @staticmethod
    def _read(work: Work) -> bytes:
        """The file's bytes (a fast-path file: at most 30 MB), read without following links."""
        fd = os.open(work.src, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as handle:
            return handle.read()

    # -- step: proxied → sending --------------------------------------------------------------

    def _admit_proxy(self, work: Work) -> Outcome:
        """Send the proxy made on the local lane (requests are the main lane's work)."""
        if work.lane != MAIN:
            return Park(lane=MAIN, front=True)
        if self.stopping.is_set():
            return Park()
        proxy = Path(work.record.proxy or "")
        try:
            data = proxy.read_bytes()
            with Image.open(io.BytesIO(data)) as header:
                width, height = header.size
        except (OSError, ValueError):
            # The spool was cleaned by hand (or the proxy is damaged): make it again.
            return Advance(QUEUED, {"proxy": None})
        return self._admit(work, Payload(data, "image/jpeg", width, height), {},
                           need=2 * work.record.size + width * height * 4)

    def _admit(self, work: Work, payload: Payload, changes: Mapping[str, Any], *,
               need: int) -> Outcome:
        """Take a request slot and a send time: the request goes out next."""
        if work.lane == LOCAL:
            # Local workers never wait for a slot: the jobs holding the slots need them.
            return Park(lane=MAIN, front=True, changes=changes)
        # No request while its answer would have nowhere to go (`need`: about what the
        # outbox must hold).
        self.destinations.check(work.inbox.outbox, "outbox", need)
        if work.inbox.archive is not None:
            self.destinations.check(work.inbox.archive, "archive")
        if not self.slots.acquire(self.stopping):
            return Park(changes=changes)
        work.job.holds_slot = True
        if not self.limiter.acquire(self.stopping):
            return Park(changes=changes)
        # The waits above may have outlasted a lease: ask the claim itself, right before paying.
        if not self.coordinator.confirm(work.inbox.path, work.job.rel):
            log.warning("claim.lost", **work.log_fields(),
                        hint="another daemon took the file over; it is not sent from here")
            return Advance(GONE, changes)
        if not self.budget.take():
            self._budget_spent()
            return Park(front=True, changes=changes)
        work.payload = payload
        return Advance(SENDING, changes, sent=True)

    def _earlier_results(self, identity: str, count: int) -> list[str] | None:
        """The outputs made earlier for the same content and settings, if all are intact."""
        found = []
        for index in range(count):
            entry = self.journal.find_result(_output_identity(identity, index))
            if entry is None or _sha_or_none(Path(entry[0])) != entry[1]:
                return None
            found.append(entry[0])
        return found

    def _gone(self, work: Work, hint: str, **facts: Any) -> Advance:
        log.warning("file.gone", **work.log_fields(), hint=hint, **facts)
        return Advance(GONE)

    # -- step: sending → fetched | failing | queued (parked) ----------------------------------

    def _send(self, work: Work) -> Outcome:
        """One request; its answer is streamed to the spool, fsynced, before it is journaled."""
        record, inbox, payload = work.record, work.inbox, work.payload
        if payload is None:
            # Journaled as sending by a run that never finished the request: send it again
            # (the one credit a crash can cost per request in flight).
            return Advance(PROXIED if record.proxy else QUEUED)
        back = {"state": PROXIED if record.proxy else QUEUED}
        # The studio path composes from the answer's alpha: it asks for PNG; so does a TIFF
        # output, made locally.
        asked = "png" if record.route == "studio" or inbox.output_format == "tiff" \
            or inbox.outputs else inbox.output_format
        part = self.journal.spool_dir / f".{record.id}.part"
        try:
            result = self._call_api(
                payload.data, filename=_sendable(PurePosixPath(work.job.rel).name),
                mime=payload.mime, dest=part,
                max_bytes=max_result_bytes(payload.width, payload.height, len(payload.data)),
                output_format=asked, transparency=inbox.transparency_handling)
            ext = inspect_result(part, payload.width, payload.height)
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
            part.unlink(missing_ok=True)
            return self._retry(work, exc, back)
        except OSError as exc:  # the spool's disk: full, or gone
            part.unlink(missing_ok=True)
            self.destinations.failed(self.journal.spool_dir, exc)
        failpoints.hit("answered")
        self.limiter.succeeded()
        # Only the probe was sent while paused; an older request's success says nothing
        # about the account now.
        if work.job.probe and self.queue.resume():
            self.journal.set_meta("paused", None)
            log.warning("account.resumed", hint="the API accepts requests again")
        spool = self.journal.spool_dir / f"{record.id}.{ext}"
        part.replace(spool)
        fsync_dir(spool.parent)
        failpoints.hit("spooled")
        self._note_credits(result.credits_remaining)
        proxy = Path(record.proxy) if record.proxy else None
        return Advance(FETCHED, {"spool": str(spool), "result_sha": result.sha256,
                                 "credits": result.credits_remaining,
                                 "attempts": record.attempts + 1, "proxy": None},
                       then=None if proxy is None else lambda: proxy.unlink(missing_ok=True))

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

    def _retry(self, work: Work, exc: ApiError, back: Mapping[str, Any]) -> Outcome:
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
        return Park(delay, changes={**back, "attempts": attempts, "reason": exc.reason,
                                    "message": exc.message, "status": exc.status})

    def _account_problem(self, exc: AccountError, job: Job) -> None:
        pause = self.config.retry.pause_seconds
        newly = self.queue.pause(exc, pause)
        self.limiter.pause(exc.reason, pause, status=exc.status, message=exc.message)
        self.journal.set_meta("paused", f"{exc.reason}: {exc.message}")
        if newly:
            log.error("account.paused", reason=exc.reason, status=exc.status,
                      message=exc.message, probe_every_s=pause,
                      hint=_ACCOUNT_HINTS.get(exc.reason, ""))
        else:
            log.debug("account.still_paused", reason=exc.reason, probe=job.probe)
        if self.on_account_problem is not None:
            self.on_account_problem(exc)

    def _shared_pause_changed(self, pause: SharedPause | None) -> None:
        """Another daemon sharing the key paused it, or a probe resumed it: follow."""
        if pause is not None:
            error = pause.account_error()
            if self.queue.pause(error, self.config.retry.pause_seconds):
                self.journal.set_meta("paused", f"{error.reason}: {error.message}")
                log.error("account.paused", reason=error.reason, status=error.status,
                          message=error.message, by=f"{pause.host} (pid {pause.pid})",
                          hint=_ACCOUNT_HINTS.get(error.reason, ""))
            if self.on_account_problem is not None:
                self.on_account_problem(error)
        elif not isinstance(self.queue.paused, BudgetReached) and self.queue.resume():
            self.journal.set_meta("paused", None)
            log.warning("account.resumed", hint="the API accepts requests again")

    def _budget_spent(self) -> None:
        """Pause sending until midnight (or a reload that raises the budget): files wait."""
        reached = self.budget.reached()
        if self.queue.pause(reached, self.budget.seconds_to_reset()):
            self.journal.set_meta("paused", f"{reached.reason}: {reached.message}")
            log.warning("budget.reached", budget=self.budget.limit, message=reached.message,
                        hint="raise api.max_credits_per_day and reload to go on today")
        if self.on_account_problem is not None:
            self.on_account_problem(reached)  # a --once run stops, its files waiting

    def check_budget(self) -> None:
        """Resume a budget pause once the day turned or the limit was raised (main loop)."""
        paused = self.queue.paused
        if isinstance(paused, BudgetReached) and self.budget.open() and self.queue.resume():
            self.journal.set_meta("paused", None)
            log.warning("budget.resumed", budget=self.budget.limit)

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
        """Make every output of the recipe from the one answer (spooled, or earlier identical
        results) and put each in its outbox; each is journaled, so after a crash only the
        missing ones are made, none twice."""
        record, inbox = work.record, work.inbox
        reused = _reused(record.reuse_from)
        answer = Path(record.spool or (reused[0] if reused else ""))
        count = len(inbox.outputs) or 1
        placed: list[list[str] | None] = json.loads(record.outputs or "null") or [None] * count
        done = [entry is not None and _sha_or_none(Path(entry[0])) == entry[1]
                for entry in placed]
        if not all(done) and not (answer.is_file() and all(Path(r).is_file() for r in reused)):
            # The spool or the reused results vanished (cleaned up by hand): ask again.
            return Advance(QUEUED, {"spool": None, "reuse_from": None, "outputs": None})
        for index in range(count):
            if done[index]:
                continue  # placed before a crash
            if work.lane != LOCAL and outputs.heavy(record.route, inbox, index, reused):
                return Park(lane=LOCAL)
            unchanged = self._unchanged(work)
            if not unchanged and not reused:
                log.warning("file.changed", **work.log_fields(),
                            hint="the original changed or vanished after it was sent: the "
                                 "result is the API's answer as it is")
            maker = outputs.maker(record, inbox, work.job.rel, answer, index, reused,
                                  unchanged=unchanged)
            entry = placed[index]

            def claim(name: Path, digest: str, index: int = index) -> None:
                placed[index] = [str(name), digest]
                first = placed[0]
                self.journal.update(record, outputs=json.dumps(placed),
                                    result=first[0] if first else None,
                                    result_sha=first[1] if first else None)

            def ours(name: Path, entry: list[str] | None = entry) -> bool:
                return entry is not None and _sha_or_none(name) == entry[1]

            try:
                path, sha = self.destinations.place_new(
                    maker.root, "outbox", maker.target, Path(entry[0]) if entry else None,
                    produce=maker.produce, claim=claim, ours=ours, need=maker.need,
                    adopt_identical=not reused)
            except InputRejected as exc:  # the original no longer decodes, or too large
                return failing(exc.reason, exc.message)         # for the asked format
            placed[index] = [str(path), sha]
            failpoints.hit("result-placed")
        spool = Path(record.spool) if record.spool else None
        identity = f"{record.sha256}|{record.settings}"
        # Forget the spool in the same commit: a crash before the unlink leaves an orphan that
        # the next start removes, never a reference that keeps it forever.
        return Advance(STORED, {"spool": None},
                       remember=[(_output_identity(identity, index), entry[0], entry[1])
                                 for index, entry in enumerate(placed) if entry],
                       then=None if spool is None else lambda: spool.unlink(missing_ok=True))

    @staticmethod
    def _unchanged(work: Work) -> bool:
        """The original is still the file that was sent (by size and mtime)."""
        try:
            st = work.src.lstat()
        except FileNotFoundError:
            return False
        return (st.st_size, st.st_mtime_ns) == (work.record.size, work.record.mtime_ns)

    # -- step: stored → done ------------------------------------------------------------------

    def _finish(self, work: Work) -> Outcome:
        """Move the original to the archive (or leave it in place, remembered as done)."""
        record, archive, src = work.record, work.inbox.archive, work.src
        changes: dict[str, Any] = {}
        if os.path.lexists(src) and self._replaced(work):
            log.warning("file.changed", **work.log_fields(),
                        hint="replaced while processing; the new version is processed next")
            # Done for the content that was sent; the new content under this name is new work
            # (size -1: no signature of a kept file matches it, now or after a restart).
            changes["size"] = -1
        elif archive is not None and os.path.lexists(src):
            chosen = Path(record.archive) if record.archive else None
            self.destinations.place(
                archive, "archive", archive / work.job.rel, chosen,
                ours=lambda name: _moved(src, name),
                claim=lambda name: self.journal.update(record, archive=str(name)),
                put=lambda name: move_into(src, name))
            failpoints.hit("archived")
        elif archive is None:
            # Marked before the journal says done: a crash in between must not let another
            # daemon sharing the inbox send it again once the lease runs out.
            self.coordinator.mark_done(work.inbox.path, work.job.rel, record.size,
                                       record.mtime_ns, record.sha256 or "", record.result)
        return Advance(DONE, changes, then=self._hand_off(work, "done"))

    def _hand_off(self, work: Work, event: str) -> Callable[[], object] | None:
        """Tell the next tool: the manifest file and the done marker (done files, when the
        inbox asks for them), the webhook (queued durably, before the journal says final);
        returns the hooks' start, for once the final state is journaled."""
        inbox, handoff = work.inbox, self.handoff
        wanted = event == "done" and (inbox.manifest or inbox.done_marker)
        if not wanted and handoff is None:
            return None
        manifest = outputs.manifest_for(work.record, work.src, event)
        body = manifest_json(manifest)
        owner = manifest["id"].encode()
        manifest_path = None
        if event == "done" and inbox.manifest:
            manifest_path = self.destinations.replace_own(
                inbox.outbox, outputs.sidecar(work.record, inbox, work.job.rel, ".json"), body,
                owner)
        if event == "done" and inbox.done_marker:
            self.destinations.replace_own(
                inbox.outbox, outputs.sidecar(work.record, inbox, work.job.rel, ".done"),
                owner + b"\n", owner)
            failpoints.hit("marked")
        if handoff is None:
            return None
        handoff.announce(manifest["id"], body)
        return partial(handoff.run_hooks, manifest, manifest_path, body)

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
        if record.proxy:
            Path(record.proxy).unlink(missing_ok=True)  # never sent, never needed again
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
        return Advance(FAILED, then=self._hand_off(work, "failed"))

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

    def _release_slot(self, job: Job) -> None:
        if job.holds_slot:
            job.holds_slot = False
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


def _output_identity(identity: str, index: int) -> str:
    """A result's key for reuse: the content and settings, and which output of the recipe."""
    return identity if index == 0 else f"{identity}#{index}"


def _reused(reuse_from: str | None) -> list[str]:
    """The earlier results a record reuses (0.1 journaled one path, not a JSON list)."""
    if not reuse_from:
        return []
    return json.loads(reuse_from) if reuse_from.startswith("[") else [reuse_from]


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
