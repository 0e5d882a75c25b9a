"""The life of one file: a worker takes a job, runs the step for its journal state, journals
the transition the step returns, and goes on, until the file is finished or parked.

    queued ──prepare───────────────► sending ──send──► fetched ──store──► stored ──finish──► done
      │ └─prepare (studio)─► proxied ─admit─┘ │         ▲ │  (every output placed)       ▲
      │                        ▲              │         │ └─(spool lost)─► queued        │
      │      park ◄────────────┴──────────────┤         │                                │
      │  (429, account pause, budget, transient error, a crash while sending: back to    │
      │   proxied when the proxy exists, else to queued; retried later)                  │
      ├──(an earlier answer for the same content: reused)┘                                │
      ├──(finished in place by another daemon sharing the inbox)──────────────────────────┘
      └──(refused here or by the API, out of attempts; or from fetched)──► failing ─fail─► failed
    queued, sending (claim lost to another daemon), failing ──► gone (the file vanished)
    with `review: true`: fetched ──► review ──(a person approves)──► approved ──store──► stored
                                        └──(rejects)──► failing (reason `rejected`)

The steps (steps/) are functions of the `Context` (context.py) and the `Work` item
(work.py) returning an `Advance` (the next state and the fields to journal with it) or a
`Park` (back to the queue after a delay, or until an identical file's result is stored).
The loop in `_live` journals every transition *before* the next step has its effect, and an
`Advance`'s `then` (unlinking a spent spool file, the hand-off) runs only after the commit,
so after a crash at any instant the next start resumes each file from its last state
without a second result, a lost original, or a hand-off of a file the journal does not call
final (`AfterCommit.hand_off_pending` finishes one a crash interrupted).

Two lanes, each its own queue and workers: `main` (requests and light steps) and `local`
(heavy local image work: a studio file's proxy, full-resolution or encoded outputs).
`LANES` says which lane each state's step needs; the loop moves the job there before the
step runs, so no step ever runs on the wrong lane, nor twice. A studio file's route is
learned by `prepare` on the main lane (from the header) and journaled first, then the file
moves to the local lane for its proxy.

`api.concurrency` counts requests, not workers: a request holds one of the `RequestSlots`
from before the limiter is asked, while a few spare workers do the light steps of other
files. When the slot ends depends on who could take the file over after a crash:

- one host (no coordination store): once the answer is journaled `fetched`. The answer is in
  this host's spool, which its next start adopts, so a crash costs at most one credit per
  slot (the requests `sending`, or a `fetched` not yet on disk: the slot's next request
  fsyncs it with its own `sending` before it goes), and the slot sends again while the
  answer is placed. The spool has its own bound: at most 2 x `api.concurrency` answers,
  requests in flight counted.
- several hosts (`coordination.url`): when its answer is placed and the original archived.
  Should this daemon die, the daemon that takes the file over pays for the answer again (the
  spool died with it), so a crash costs at most one credit per slot whether its request was
  in flight or answered; the held slots are the spool's bound (one answer per slot).

Either way a job counted by the slots (`Job.holds_slot`: in flight, or its answer in the
spool) is parked on the local lane, whose workers never wait for a slot, and requests wait
(logged once by `RequestSlots`) while the spool is at its bound.

The local lane's workers and how far ahead proxies are made: lanes.py.

A folder we must write to that is missing or unwritable parks the job (no request is spent
while the outbox is unusable), and is reported once until it recovers. An inbox the intake
found missing or unreadable (`ctx.inbox_paused`) holds its files where they are, except a
request already going out; a read error of an original is the source's (steps/source.py). A
state_dir that refuses a write (full, failing) pauses sending (`ctx.state`, pipeline/state.py):
a transition the journal refused is kept (`_unjournaled`) and journaled first when the job
runs again, and no worker dies of it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from functools import partial

import structlog

from watchfolder import failpoints
from watchfolder.config.settings import Config, InboxConfig
from watchfolder.coordination.coordinator import Coordinator
from watchfolder.coordination.limits import Limiter
from watchfolder.errors import (
    AccountError,
    CoordinationUnavailable,
    DestinationError,
    StateUnavailable,
)
from watchfolder.imaging import compose
from watchfolder.intake.settle import Signature
from watchfolder.journal.db import (
    APPROVED,
    DONE,
    FAILING,
    FETCHED,
    FINAL,
    PROXIED,
    QUEUED,
    REVIEW,
    SENDING,
    STORED,
    FileRecord,
    Journal,
)
from watchfolder.pipeline import outputs
from watchfolder.pipeline.budget import BudgetReached
from watchfolder.pipeline.client import ApiClient
from watchfolder.pipeline.context import Context
from watchfolder.pipeline.jobqueue import Job, JobQueue
from watchfolder.pipeline.lanes import (
    PROXY_WORKERS,
    ProxyBound,
    answer_work,
    local_split,
    proxy_work,
    spare_workers,
)
from watchfolder.pipeline.pause import ALL, Pause
from watchfolder.pipeline.state import STATE_RECHECK_SECONDS
from watchfolder.pipeline.steps import run_step
from watchfolder.pipeline.steps.finish import hand_off
from watchfolder.pipeline.steps.source import INBOX_RECHECK_SECONDS
from watchfolder.pipeline.tally import Tally
from watchfolder.pipeline.work import (
    LOCAL,
    MAIN,
    Advance,
    Park,
    Work,
)

log = structlog.get_logger("watchfolder")


def _heavy_outputs(record: FileRecord, inbox: InboxConfig) -> str | None:
    return LOCAL if outputs.heavy(record.route, inbox, 0, record.reused()) else None


# A request is counted by the slots from before the limiter is asked until the file is
# finished: in flight, then as an answer in the spool until it is placed and the original
# archived (with several hosts still holding its slot, so a daemon that dies costs a taker at
# most one credit per slot; see RequestSlots).
ANSWER_UNFINISHED = (SENDING, FETCHED, STORED)
ANSWER_WAITING = (FETCHED, STORED)  # parked in these, a job stays counted


# The lane each state's step needs (None: a light step, run on whichever lane the job is).
LANES: dict[str, Callable[[FileRecord, InboxConfig], str | None]] = {
    QUEUED: lambda record, inbox: LOCAL if record.route == "studio" else MAIN,
    PROXIED: lambda record, inbox: MAIN,
    SENDING: lambda record, inbox: MAIN,
    FETCHED: _heavy_outputs,
    STORED: lambda record, inbox: None,
    FAILING: lambda record, inbox: None,
    REVIEW: lambda record, inbox: None,
    APPROVED: _heavy_outputs,
}


class Pipeline:
    """The worker pool and the loop that drives each file through its steps."""

    def __init__(self, config: Config, journal: Journal, client: ApiClient,
                 limiter: Limiter, coordinator: Coordinator, *,
                 release: Callable[[Job, Signature | None], None],
                 on_account_problem: Callable[[AccountError | BudgetReached], None] | None = None,
                 cores: int | None = None) -> None:
        self.ctx = ctx = Context(config, journal, client, limiter, coordinator,
                                 on_account_problem=on_account_problem)
        self.journal, self.limiter, self.coordinator = journal, limiter, coordinator
        self.release = release
        self.queue = ctx.queue
        # Local work spends no credit: no pause holds it. Selective: a proxy waits while
        # enough proxies wait to be sent (`ProxyBound`).
        self.local = JobQueue(selective=True)
        self.proxies = ProxyBound(lambda: self.ctx.slots.size, self.local.wake)
        self.local_workers, self.vips_threads = local_split(cores or os.cpu_count() or 2)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        # Transitions whose effect is done but which the journal refused (a full disk): job
        # key → Advance, journaled first when the job runs again (an answer spooled, a
        # result placed are never redone).
        self._unjournaled: dict[tuple[int, str], Advance] = {}
        self.tally = Tally()
        self.after_commit = AfterCommit(ctx)

    @property
    def config(self) -> Config:
        return self.ctx.config

    @property
    def pause(self) -> Pause:
        """The one pause: read by status and metrics, set per inbox by a person (`set`)."""
        return self.ctx.pause

    @property
    def inboxes(self) -> tuple[InboxConfig, ...]:
        return self.ctx.config.inboxes

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        compose.configure(self.vips_threads)
        self.after_commit.hand_off_pending(self.journal, self.inboxes)
        concurrency = self.ctx.slots.size
        lanes: list[tuple[str, JobQueue, Callable[[Job], bool] | None]]
        lanes = [(MAIN, self.queue, None)] * (concurrency + spare_workers(concurrency))
        # The local lane's priorities: its own worker for proxies (a request waits for each),
        # the others for what holds a slot (a composite, an answer to place); each takes the
        # other kind when none of its own waits, so no core idles while work waits.
        lanes += [(LOCAL, self.local, answer_work)] * self.local_workers
        lanes += [(LOCAL, self.local, proxy_work)] * PROXY_WORKERS
        for n, (lane, queue, prefer) in enumerate(lanes):
            accept = self.proxies.may_start if lane == LOCAL else None
            thread = threading.Thread(target=self._work, args=(lane, queue, prefer, accept),
                                      name=f"watchfolder-{lane}-worker-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Take no new jobs; requests in flight may finish (see `join`)."""
        self.ctx.stopping.set()
        self.queue.close()
        self.local.close()
        self.ctx.slots.wake()

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

    def snapshot(self, pending: Callable[[], int]) -> dict[str, object]:
        """The counters; `pending` (the intake's files not yet finished) is read in the same
        instant as done and failed, so a file is counted in one of them (`Tally.counts`)."""
        pause = self.ctx.pause.state()
        held: dict[str, str] = pause["inboxes"]  # type: ignore[assignment]
        tally = self.tally
        done, failed, unfinished = tally.counts(pending)
        return {"waiting": len(self.queue) + len(self.local), "in_flight": tally.in_flight,
                "done": done, "failed": failed, "pending": unfinished, "reused": tally.reused,
                "credits": self.ctx.credits.remaining,
                "paused": pause["paused"] or held.get(ALL), "paused_inboxes": held,
                **self.ctx.budget.snapshot()}

    # -- the worker loop: one file's life -----------------------------------------------------

    def _work(self, lane: str, queue: JobQueue, prefer: Callable[[Job], bool] | None = None,
              accept: Callable[[Job], bool] | None = None) -> None:
        while (job := queue.get(prefer=prefer, accept=accept)) is not None:
            with self.tally.busy():
                try:
                    self._live(job, lane)
                except Exception:  # a bug outside a step: the worker lives, the file waits
                    log.exception("file.internal_error", inbox=str(self.inboxes[job.index].path),
                                  file=job.rel)
                    queue.put_later(job, max(1.0, self.config.retry.backoff_seconds))

    def _live(self, job: Job, lane: str = MAIN) -> None:
        """Run the file's steps, each on the lane it needs, until it is finished or parked."""
        work = self._begin(job, lane)
        if work is None:
            return
        record = work.record
        try:
            while record.state not in FINAL:
                needs = LANES[record.state](record, work.inbox)
                if needs not in (None, work.lane):
                    self._lane(needs).put(job, front=needs == MAIN)  # a request waits
                    return
                outcome = self._unjournaled.pop(job.key, None) or run_step(self.ctx, work)
                if isinstance(outcome, Park):
                    if outcome.changes.get("state", record.state) not in ANSWER_WAITING \
                            and job.key not in self.ctx.kept_answers:
                        self._release_slot(job)  # back to the queue: no answer is waiting
                    self._park(work, outcome)
                    return
                if not self._commit(work, outcome):
                    return
        except BaseException:
            self._release_slot(job)  # the job is lost to this run: never keep its slot
            self.proxies.note(record, lost=True)
            raise
        self._release_slot(job)
        self._finished(work)

    def _begin(self, job: Job, lane: str) -> Work | None:
        """The job's `Work`, or None when it cannot go on now (put back, or gone)."""
        if job.index in self.ctx.inbox_paused and not job.holds_slot:
            # Not even its claim: that folder is on the share.
            if job.record is not None and job.record.state != PROXIED:
                self.proxies.note(job.record, lost=True)  # no proxy made meanwhile
            self._lane(lane).put_later(job, INBOX_RECHECK_SECONDS)
            return None
        work = self._open(job, lane)
        if work is None:
            if job.record is not None:
                self.proxies.note(job.record, lost=True)
            return None
        record = work.record
        if record.state == PROXIED:
            self.proxies.note(record)  # resumed with its proxy made: it counts
        if not job.holds_slot and record.state in ANSWER_WAITING and record.spool:
            # An answer a previous run left in the spool holds a slot like any other.
            self.ctx.slots.adopt()
            job.holds_slot = job.answered = True
        return work

    def _commit(self, work: Work, outcome: Advance) -> bool:
        """Journal the transition, then what follows it; False if the journal refused it (the
        job is parked until the state disk takes writes again)."""
        job, record = work.job, work.record
        before = record.state
        # An answer's `fetched`: fsynced by the next request's `sending` (the slot's next
        # request goes without a second fsync), else by `store` before it makes anything.
        owed = before == SENDING and outcome.state == FETCHED
        try:
            self.journal.update(record, state=outcome.state, sent=outcome.sent,
                                remember=outcome.remember, owed=owed, **outcome.changes)
        except StateUnavailable as exc:
            self.ctx.state.failed(exc)
            if outcome.state != SENDING:
                # Its effect is done (an answer spooled, a result placed): kept here and
                # journaled first when the disk lets us; its slot stays held.
                self._unjournaled[job.key] = outcome
            else:
                self._release_slot(job)  # not journaled as sending: no request made
            self._park(work, Park(STATE_RECHECK_SECONDS))
            return False
        self.proxies.note(record)
        if job.holds_slot and not job.answered and record.state in ANSWER_WAITING:
            job.answered = True
            self.ctx.slots.answered()
        if record.state != before:
            failpoints.hit(record.state)
        if record.state not in ANSWER_UNFINISHED:
            self._release_slot(job)  # the file is finished (or no answer will come)
        if outcome.then is not None:
            self.after_commit.run(work, outcome.then)
        return True

    def _open(self, job: Job, lane: str) -> Work | None:
        """The job's journal record, created for a new file; None if the file is gone."""
        inbox = self.inboxes[job.index]
        coordinator = self.coordinator
        try:
            # One daemon per file, also across hosts sharing the inbox: no claim, no work.
            claim = coordinator.claim(inbox.path, job.rel)
        except CoordinationUnavailable:
            # The store or the claims folder: back soon. A slot it holds stays held (its answer
            # still waits), so it waits on the local lane like any parked slot holder.
            (self.local if job.holds_slot else self.queue).put_later(job, 5.0)
            return None
        if claim is None:
            # Another daemon holds it (or the store's grace after a loss runs); look again in a
            # while (its holder may die). Taken over, its answer is the taker's to pay for.
            self._release_slot(job)
            self.queue.put_later(job, coordinator.claim_wait())
            return None
        try:
            record = job.record or self.journal.active(str(inbox.path), job.rel)
            if record is None:
                try:
                    st = (inbox.path / job.rel).lstat()
                except FileNotFoundError:
                    coordinator.release(inbox.path, job.rel)
                    self.release(job, None)
                    return None
                except OSError:  # EACCES, EIO: there, but not to be looked at now
                    self._lane(lane).put_later(job, INBOX_RECHECK_SECONDS)
                    return None
                record = self.journal.create(str(inbox.path), job.rel, st.st_size,
                                             st.st_mtime_ns, inbox.settings_key)
        except StateUnavailable as exc:
            self.ctx.state.failed(exc)  # it keeps its claim and waits
            self._lane(LOCAL if job.holds_slot else lane).put_later(job, STATE_RECHECK_SECONDS)
            return None
        except Exception:
            log.exception("file.internal_error", inbox=str(inbox.path), file=job.rel)
            self._release_slot(job)
            coordinator.release(inbox.path, job.rel)
            self.release(job, None)
            return None
        job.record = record
        return Work(job, record, inbox, lane)

    def _lane(self, lane: str) -> JobQueue:
        return self.local if lane == LOCAL else self.queue

    def _park(self, work: Work, park: Park) -> None:
        if park.changes:
            try:
                self.journal.update(work.record, **park.changes)
            except StateUnavailable as exc:
                # Memory keeps the journal's state too (an update applies only once written):
                # the file resumes from it, and what was to be noted is found again.
                self.ctx.state.failed(exc)
        self.proxies.note(work.record)
        job = work.job
        job.probe = False
        if park.twin or park.held:
            return  # Twins holds it until the first copy is finished; a person, until judged
        # A job holding a request slot never waits for a main worker: those may all be
        # waiting for its slot.
        lane = LANES[work.record.state](work.record, work.inbox) or work.lane
        queue = self._lane(LOCAL if job.holds_slot else lane)
        if park.delay > 0:
            queue.put_later(job, park.delay)
        else:
            queue.put(job, front=park.front)

    def _finished(self, work: Work) -> None:
        job, record, inbox = work.job, work.record, work.inbox
        if job.identity is not None:
            for twin in self.ctx.twins.release(job.identity, job):
                self.queue.put(twin)
        kept = None
        if record.state == DONE and inbox.archive is None:
            kept = (record.size, record.mtime_ns)
        self.coordinator.release(inbox.path, job.rel)
        self.tally.finished(work, self.ctx.metrics, release=partial(self.release, job, kept))

    # -- bookkeeping --------------------------------------------------------------------------

    def _release_slot(self, job: Job) -> None:
        if job.holds_slot:
            job.holds_slot = False
            self.ctx.slots.release(answered=job.answered)
            job.answered = False


class AfterCommit:
    """What follows a commit (`Advance.then`). The transition stands whatever happens here: a
    hand-off an unusable outbox refused (reported once by Destinations) is tried again from
    the main loop; a bug is logged and its hand-off stays pending for the next start."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._refused: list[Work] = []  # hand-offs a folder refused, tried again
        self._lock = threading.Lock()

    def run(self, work: Work, then: Callable[[], object]) -> None:
        try:
            then()
        except DestinationError:
            with self._lock:
                self._refused.append(work)
        except Exception as exc:
            log.exception("file.internal_error", **work.log_fields(), error=type(exc).__name__)

    def hand_off_pending(self, journal: Journal, inboxes: tuple[InboxConfig, ...]) -> None:
        """Finish the hand-offs a crash interrupted after their final commit."""
        where = {str(inbox.path): index for index, inbox in enumerate(inboxes)}
        for record in journal.handoffs_pending():
            index = where.get(record.inbox)
            if index is not None:  # else it waits until its inbox is configured again
                work = Work(Job(index, record.rel, record=record), record, inboxes[index])
                self.run(work, partial(hand_off, self.ctx, work))

    def catch_up(self) -> None:
        """From the main loop: make the journal durable when a commit waits for it (no
        request made an fsync since: a stored file's spooled answer, an answer in review), a
        flush the disk refuses said as the state_dir's outage, whose end a probe says even
        when nothing waits to be sent; then try again the hand-offs an unusable outbox
        refused."""
        try:
            self.ctx.journal.commits.settle()
        except StateUnavailable as exc:
            self.ctx.state.failed(exc)  # said once; what waits for the flush waits on
        else:
            self.ctx.state.ready()  # while paused, a probe (at most every second)
        with self._lock:
            waiting, self._refused = self._refused, []
        for work in waiting:
            self.run(work, partial(hand_off, self.ctx, work))
