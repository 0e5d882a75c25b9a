"""The files waiting for a worker: ready jobs, jobs waiting for a retry time, and the request
slots that bound how many requests are in flight.

- `JobQueue.get` hands out ready jobs in order; a job parked with a delay (`put_later`,
  `retry_later`) becomes ready when its time comes, holding no worker meanwhile.
- A queue given the `Pause` (pause.py, the main lane's: requests) reads it: while the account
  or budget pause holds, nothing is handed out but one probe every `probe_in` seconds, and a
  job of an inbox a person paused waits (the others go on).
- `RequestSlots` counts requests in flight (what a crash can cost: one credit per slot) and
  answers received and not yet placed, so the spool stays bounded: requests wait while it is
  full (back-pressure, logged once per episode as `requests.waiting reason=spool_full`, then
  `requests.resumed`). With several hosts an answer keeps its slot until it is placed.
- A `selective` queue lets its workers prefer some jobs and leave others for later
  (`get(prefer=, accept=)`): the local lane's proxies and composites.

Time and the jitter's random source are injectable, so all of this is tested without sleeping.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from watchfolder.coordination.ratelimit import backoff
from watchfolder.pipeline.pause import Pause

if TYPE_CHECKING:
    from watchfolder.errors import AccountError
    from watchfolder.imaging.compose import Output
    from watchfolder.imaging.inspect import Source
    from watchfolder.journal.db import FileRecord
    from watchfolder.pipeline.budget import BudgetReached

log = structlog.get_logger("watchfolder")

@dataclass
class Job:
    """One file of one inbox, as it travels through the queue."""

    index: int  # which inbox (its slot in the configuration, stable across reloads)
    rel: str  # path below the inbox, POSIX form
    record: FileRecord | None = None  # known once opened (or resumed from the journal)
    identity: str | None = None  # content hash + settings, once read
    probe: bool = False  # handed out as the probe of a paused queue
    holds_slot: bool = False  # one of the RequestSlots, from its request until it is finished
    answered: bool = False  # its slot's answer is in the spool (counted by RequestSlots)
    # What was learned about the file in this run, kept across parks and lane changes so
    # nothing is inspected twice; a restart learns it again.
    source: Source | None = None
    source_of: tuple[int, int] | None = None  # (size, mtime_ns) of the file `source` read
    # (device, inode, size, mtime_ns, ctime_ns) of the file when it was read and hashed: the
    # same five later prove it unchanged without hashing it again (no tool sets a ctime).
    read_as: tuple[int, int, int, int, int] | None = None
    outputs: list[Output | None] | None = None  # by recipe position, as written
    seen: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> tuple[int, str]:
        return (self.index, self.rel)


class JobQueue:
    """Ready jobs and jobs waiting for a retry time, handed out as the `Pause` allows."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None, *, pause: Pause | None = None,
                 held: Callable[[Job], bool] = lambda job: False,
                 selective: bool = False) -> None:
        self.clock = clock
        self.rng = rng or random.Random()
        self._cond = threading.Condition()
        self._ready: collections.deque[Job] = collections.deque()
        self._later: list[tuple[float, int, Job]] = []
        self._seq = itertools.count()
        self._closed = False
        self.pause = pause
        self._held = held  # whether a person paused the job's inbox (with `pause`)
        # Workers that refuse some jobs (`get(accept=)`): a new job wakes them all, since the
        # one woken alone might refuse it while another would take it.
        self._selective = selective
        if pause is not None:
            pause.on_change(self._wake)

    @property
    def paused(self) -> AccountError | BudgetReached | None:
        """The account or budget pause this queue follows, if any."""
        return None if self.pause is None else self.pause.error

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def put(self, job: Job, *, front: bool = False) -> None:
        with self._cond:
            if front:
                self._ready.appendleft(job)
            else:
                self._ready.append(job)
            self._notify()

    def _notify(self) -> None:
        if self._selective:
            self._cond.notify_all()
        else:
            self._cond.notify()

    def wake(self) -> None:
        """Let every waiting worker look at the ready jobs again (an `accept` changed)."""
        self._wake()

    def put_later(self, job: Job, delay: float) -> None:
        with self._cond:
            heapq.heappush(self._later, (self.clock() + delay, next(self._seq), job))
            self._notify()

    def retry_delay(self, attempt: int, base: float, cap: float, *,
                    at_least: float = 0.0) -> float:
        """How long to park a job before its `attempt`-th retry: exponential, full jitter.

        `at_least` is the server's wish (Retry-After), already capped by the caller.
        """
        return max(self.rng.uniform(0, backoff(attempt, base, cap)), at_least)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._ready) + len(self._later)

    def get(self, timeout: float | None = None, *,
            prefer: Callable[[Job], bool] | None = None,
            accept: Callable[[Job], bool] | None = None) -> Job | None:
        """Block until a job may be worked on; None once closed (or after `timeout` s).

        With `prefer`, the first ready job it accepts is taken before the jobs ahead of it
        (a lane's strict priority); any other job otherwise, so no job waits for an idle
        worker. A job `accept` refuses is left for now: whatever changes its answer calls
        `wake`. A queue whose workers pass `accept` must be made `selective`."""
        deadline = None if timeout is None else self.clock() + timeout
        with self._cond:
            while not self._closed:
                now = self.clock()
                while self._later and self._later[0][0] <= now:
                    self._ready.append(heapq.heappop(self._later)[2])
                wake = self._later[0][0] if self._later else None
                pause = self.pause
                if pause is None or pause.error is None:
                    job = self._take(prefer, accept)
                    if job is not None:
                        return job
                else:
                    probe_at = pause.probe_at()
                    if probe_at <= now and self._ready:
                        job = self._take()
                        if job is not None and pause.take_probe(now):
                            job.probe = True
                            return job
                        if job is not None:
                            self._ready.appendleft(job)
                    elif probe_at > now:  # else: due, but every ready job is held: a put
                        wake = probe_at if wake is None else min(wake, probe_at)  # wakes us
                if deadline is not None:
                    if now >= deadline:
                        return None
                    wake = deadline if wake is None else min(wake, deadline)
                self._cond.wait(None if wake is None else max(0.0, wake - now))
            return None

    def _take(self, prefer: Callable[[Job], bool] | None = None,
              accept: Callable[[Job], bool] | None = None) -> Job | None:
        """The first ready job not held by a person's pause of its inbox, nor refused by
        `accept` (the first that `prefer` accepts, if any)."""
        if prefer is not None:
            for index, job in enumerate(self._ready):
                if prefer(job) and not self._held(job) and (accept is None or accept(job)):
                    del self._ready[index]
                    return job
        for index, job in enumerate(self._ready):
            if not self._held(job) and (accept is None or accept(job)):
                del self._ready[index]
                return job
        return None


class RequestSlots:
    """The request slots (`size`: requests in flight at most) and the spool's bound on answers
    received and not yet placed, in one of two rules.

    A slot is taken before the limiter is asked (a slot waited for after the limiter granted
    would send later than the limiter counted). When it ends:

    - `hold_answers` (several hosts share the inbox, a coordination store configured): at the
      file's end (its answer placed, its original archived), so at most `size` records are
      ever `sending`, `fetched` or `stored`: what a crash can cost stays one credit per slot,
      also when another daemon takes the files over (the dead daemon's spool died with it).
      The held slots are the spool's bound too: `size` answers.
    - otherwise (one host): once its answer is journaled as `fetched` (`answered`). The
      answer is safe in this host's own spool (a restart adopts it), so a crash still costs
      at most one credit per slot (the `sending` records), and the next request goes while
      the answer is placed. The spool's bound is its own: at most `2 x size` answers,
      requests in flight counted (each will be one), so a request waits when the spool would
      pass it.

    Either way a request that waits because the spool is full is logged once per episode
    (`requests.waiting reason=spool_full`, then `requests.resumed`).
    """

    def __init__(self, size: int, *, hold_answers: bool = True) -> None:
        self.size = size
        self.hold_answers = hold_answers
        self.bound = size if hold_answers else 2 * size  # answers in the spool, in flight too
        self._flying = 0  # requests not yet answered (slots taken and not ended)
        self._answered = 0  # answers in the spool, waiting to be placed
        self._full = False  # in an episode of requests waiting for answers to be placed
        self._cond = threading.Condition()

    @property
    def free(self) -> int:
        """Requests that could go now."""
        with self._cond:
            return self._room()

    def _room(self) -> int:
        held = self._flying + (self._answered if self.hold_answers else 0)
        return max(0, min(self.size - held, self.bound - self._flying - self._answered))

    def _spool_full(self) -> bool:
        """Whether answers waiting to be placed, not requests in flight, hold requests back."""
        if self.hold_answers:
            return self._answered >= self.size
        return self._flying < self.size and self._flying + self._answered >= self.bound

    def acquire(self, stop: threading.Event) -> bool:
        """Block until a slot is ours (True) or `stop` is set (False)."""
        with self._cond:
            if self._room() > 0 and self._full:
                self._full = False
                log.info("requests.resumed")
            while self._room() <= 0:
                if stop.is_set():
                    return False
                if not self._full and self._spool_full():
                    # The spool's bound: said once per episode; no credit is spent until an
                    # answer is placed.
                    self._full = True
                    log.info("requests.waiting", reason="spool_full", answers=self._answered,
                             bound=self.bound)
                self._cond.wait()
            self._flying += 1
            return True

    def adopt(self) -> None:
        """Count an answer a previous run left in the spool (even beyond the bound: new
        requests then wait until enough are placed)."""
        with self._cond:
            self._answered += 1

    def answered(self) -> None:
        """A slot's answer is in the spool now, waiting to be placed (journaled `fetched`).
        Without `hold_answers` this ends the slot: the next request may go."""
        with self._cond:
            self._flying -= 1
            self._answered += 1
            if not self.hold_answers:
                self._cond.notify()

    def release(self, *, answered: bool = False) -> None:
        """The file is finished (`answered`: its answer was counted), or its request ended
        with no answer."""
        with self._cond:
            if answered:
                self._answered -= 1
            else:
                self._flying -= 1
            self._cond.notify()

    def wake(self) -> None:
        """Let every waiter look at its stop event again."""
        with self._cond:
            self._cond.notify_all()
