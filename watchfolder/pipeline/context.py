"""What the steps need, in one object: the journal, the API client, the limiter, the
coordinator, the request slots, the destinations, the budget, the one `Pause`, the full-size
cut-outs held for recipes, and the reactions to a pause (an account problem, a spent budget,
another daemon's pause).

`config` and `client` are swapped by a reload from the main thread while workers read them:
`reconfigure` is their one writer, under the context's lock, and a step reads each once.
The credits last reported by the API are `Credits`' alone.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import structlog

from watchfolder.config.settings import Config
from watchfolder.coordination.coordinator import Coordinator
from watchfolder.coordination.limits import Limiter, SharedPause
from watchfolder.errors import AccountError, StateUnavailable
from watchfolder.files.place import Destinations
from watchfolder.journal.db import Journal
from watchfolder.pipeline.budget import Budget, BudgetReached
from watchfolder.pipeline.client import ApiClient, ApiResult
from watchfolder.pipeline.jobqueue import JobQueue, RequestSlots
from watchfolder.pipeline.outputs import SharedCutouts
from watchfolder.pipeline.pause import Pause
from watchfolder.pipeline.state import StateGuard
from watchfolder.pipeline.work import Payload, Twins

if TYPE_CHECKING:
    from watchfolder.handoff.wiring import HandOff
    from watchfolder.service.metrics import Metrics

log = structlog.get_logger("watchfolder")

KEPT_ANSWERS_MAX_BYTES = 256 << 20

ACCOUNT_HINTS = {
    "key_missing": "set api.key, api.key_file or the systemd credential, then reload",
    "key_refused": "the key is invalid or revoked: put a valid key in place and reload",
    "no_credits": "add credits to the Clipdrop account; processing resumes by itself",
    "endpoint_missing": "check api.url in the configuration",
}


class Credits:
    """The credits the API reported last, and whether the low-credits warning is out."""

    def __init__(self, journal: Journal) -> None:
        self._journal = journal
        self._lock = threading.Lock()
        self.remaining: int | None = None
        self._warned = False

    def note(self, credits: int | None, threshold: int) -> None:
        if credits is None:
            return
        with self._lock:
            self.remaining = credits
            warn = credits < threshold and not self._warned
            self._warned = credits < threshold
            # For `watchfolder status`, also after a stop (records finish out of order); a
            # disk that refuses it only delays the note (the pipeline's guard says so).
            with contextlib.suppress(StateUnavailable):
                self._journal.notes.set_credits(credits)
        if warn:
            log.warning("credits.low", credits_remaining=credits, threshold=threshold,
                        hint="top up the Clipdrop account before it runs out")


class Context:
    """The parts a step works with; `config` and `client` change only through `reconfigure`."""

    def __init__(self, config: Config, journal: Journal, client: ApiClient,
                 limiter: Limiter, coordinator: Coordinator, *,
                 on_account_problem: Callable[[AccountError | BudgetReached], None] | None
                 ) -> None:
        self._lock = threading.Lock()
        self._config = config
        self._client = client
        self.journal = journal
        self.limiter = limiter
        self.coordinator = coordinator
        self.on_account_problem = on_account_problem
        self.pause = Pause(journal)
        # Several hosts (a coordination store) hold a slot until the file is finished: a
        # taker pays again for answers that died in a dead host's spool (RequestSlots).
        self.slots = RequestSlots(config.api.concurrency,
                                  hold_answers=coordinator.store is not None)
        self.destinations = Destinations()
        self.twins = Twins()
        # Full-size cut-outs shared by a recipe's outputs, held in memory (outputs.py).
        self.cutouts = SharedCutouts()
        self.budget = Budget(config.api.max_credits_per_day, journal.sends_since)
        self.credits = Credits(journal)
        self.stopping = threading.Event()
        # The state_dir (journal, spool): a failed write pauses sending (pipeline/state.py).
        self.state = StateGuard(journal.path.parent, partial(_probe_state, journal))
        # Slots of inboxes whose folder is missing or unreadable: filled by the intake, which
        # also answers, when a file is not found, whether its whole folder is away right now.
        self.inbox_paused: set[int] = set()
        self.inbox_away: Callable[[int], bool] = lambda index: index in self.inbox_paused
        # Answers paid for that the spool refused (a full disk): job key → (result, payload),
        # at most KEPT_ANSWERS_MAX_BYTES of them, spooled when the disk takes them.
        self.kept_answers: dict[tuple[int, str], tuple[ApiResult, Payload]] = {}
        self.kept_lock = threading.Lock()
        self.metrics: Metrics | None = None  # set by the daemon when metrics are served
        self.handoff: HandOff | None = None  # set by the daemon when hooks or a webhook are
        self.queue = JobQueue(pause=self.pause, held=self._held)  # requests: paused
        # Another daemon sharing the key paused it (a 402 there), or resumed it.
        limiter.on_pause_change = self.shared_pause_changed
        self._format_warned: set[str] = set()

    @property
    def config(self) -> Config:
        with self._lock:
            return self._config

    @property
    def client(self) -> ApiClient:
        with self._lock:
            return self._client

    def reconfigure(self, config: Config, client: ApiClient | None = None) -> None:
        """A reload's new settings (and client, when the key or URL changed), all at once."""
        with self._lock:
            self._config = config
            if client is not None:
                self._client = client
        self.limiter.set_limit(config.api.requests_per_minute)
        self.limiter.set_backoff(config.retry.backoff_seconds, config.retry.max_backoff_seconds)
        self.budget.set_limit(config.api.max_credits_per_day)
        error = self.pause.error
        if isinstance(error, BudgetReached):
            self.check_budget()  # a raised budget resumes at once, logged as a budget's end
        elif error is not None:
            self.pause.probe_now()  # the new key or URL may be what fixes the pause

    def _held(self, job: object) -> bool:
        index = getattr(job, "index", None)
        inboxes = self.config.inboxes
        if index is None or index >= len(inboxes):
            return False
        return self.pause.held(str(inboxes[index].path)) is not None

    # -- pauses -------------------------------------------------------------------------------

    def account_problem(self, exc: AccountError, *, probe: bool, sent_after: int) -> None:
        """Pause sending (here and, through the limiter, on every host sharing the key).

        `sent_after` is `pause.resumes` read before the request: a refusal of a request sent
        before the pause was last lifted (an old key's, answered after a reload's probe
        succeeded) says nothing about the account now, and would hold every file for a whole
        probe interval. Its file is simply sent again."""
        if sent_after != self.pause.resumes:
            log.info("account.refusal_outdated", reason=exc.reason, status=exc.status,
                     hint="a request sent before the pause was lifted: sent again")
            return
        seconds = self.config.retry.pause_seconds
        newly = self.pause.pause(exc, seconds)
        self.limiter.pause(exc.reason, seconds, status=exc.status, message=exc.message)
        if newly:
            log.error("account.paused", reason=exc.reason, status=exc.status,
                      message=exc.message, probe_every_s=seconds,
                      hint=ACCOUNT_HINTS.get(exc.reason, ""))
        else:
            log.debug("account.still_paused", reason=exc.reason, probe=probe)
        if self.on_account_problem is not None:
            self.on_account_problem(exc)

    def accepted(self, *, probe: bool) -> None:
        """A request was answered: the limiter's backoff resets; a probe's answer resumes."""
        self.limiter.succeeded()
        # Only the probe was sent while paused; an older request's success says nothing
        # about the account now.
        if probe and self.pause.resume():
            log.warning("account.resumed", hint="the API accepts requests again")

    def shared_pause_changed(self, shared: SharedPause | None) -> None:
        """Another daemon sharing the key paused it, or a probe resumed it: follow."""
        if shared is not None:
            error = shared.account_error()
            if self.pause.pause(error, self.config.retry.pause_seconds):
                log.error("account.paused", reason=error.reason, status=error.status,
                          message=error.message, by=f"{shared.host} (pid {shared.pid})",
                          hint=ACCOUNT_HINTS.get(error.reason, ""))
            if self.on_account_problem is not None:
                self.on_account_problem(error)
        elif self.pause.resume(kind=AccountError):
            log.warning("account.resumed", hint="the API accepts requests again")

    def budget_spent(self) -> None:
        """Pause sending until midnight (or a reload that raises the budget): files wait."""
        reached = self.budget.reached()
        if self.pause.pause(reached, self.budget.seconds_to_reset()):
            log.warning("budget.reached", budget=self.budget.limit, message=reached.message,
                        hint="raise api.max_credits_per_day and reload to go on today")
        if self.on_account_problem is not None:
            self.on_account_problem(reached)  # a --once run stops, its files waiting

    def check_budget(self) -> None:
        """Resume a budget pause once the day turned or the limit was raised."""
        if isinstance(self.pause.error, BudgetReached) and self.budget.open() \
                and self.pause.resume(kind=BudgetReached):
            log.warning("budget.resumed", budget=self.budget.limit)

    def warn_format_refused(self, output_format: str, inbox: str) -> None:
        with self._lock:
            new = output_format not in self._format_warned
            self._format_warned.add(output_format)
        if new:
            log.warning("api.format_refused", output_format=output_format, inbox=inbox,
                        hint="the API refused this output_format; set another one")


def _probe_state(journal: Journal) -> None:
    """The write that must work for sending to go on again: a journal commit, and its flush
    (a disk that takes writes but refuses to flush them would lose a `sending`). Raises
    StateUnavailable when the disk refuses either."""
    journal.notes.set("state_checked", None)
    journal.commits.sync(journal.commits.count)
