"""Wiring: journal, limiter, client, pipeline, intake and watchers; start, run, reload, stop.

`Daemon.start()` returns once every watch is set and the start-up scan is queued (the moment
systemd's READY=1 and the `ready` log line stand for); `runloop.supervise` then runs it until a
stop; `stop()` is the one shutdown sequence. What a start puts right (folders, unfinished
records, left-overs of a crash) is in `recovery`. Parsing argv, installing signal handlers and
exit codes belong to cli.py.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import errno
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from watchfolder import logs
from watchfolder.config.settings import Config
from watchfolder.coordination.coordinator import Coordinator
from watchfolder.errors import AccountError, StartupError, StateDirFull, StateUnavailable
from watchfolder.handoff.wiring import HandOff
from watchfolder.imaging import libraries
from watchfolder.intake.loop import Intake
from watchfolder.intake.watcher import Watcher
from watchfolder.journal.db import (
    Journal,
)
from watchfolder.pipeline.budget import BudgetReached
from watchfolder.pipeline.client import ApiClient
from watchfolder.pipeline.driver import Pipeline
from watchfolder.pipeline.jobqueue import Job
from watchfolder.service import web_view
from watchfolder.service.health import WatchLoss
from watchfolder.service.lock import DaemonLock
from watchfolder.service.recovery import (
    prepare_folders,
    remove_orphans,
    resume_jobs,
    still_in_place,
)
from watchfolder.service.reload import (
    client_changed,
    match_slots,
    pin_what_cannot_change,
    rebind_metrics,
)
from watchfolder.service.runloop import Waker

if TYPE_CHECKING:
    from watchfolder.service.metrics import Metrics
    from watchfolder.web.server import WebServer

log = structlog.get_logger("watchfolder")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ACCOUNT = 0, 1, 2, 3
# The room a start needs in state_dir: the journal's growth and its write-ahead log for a while
# (answers are spooled there too, but each is checked against the free space before sending).
STATE_MIN_FREE = 1 << 20


class Daemon:
    def __init__(self, config: Config, *, once: bool = False) -> None:
        self.config = config
        self.once = once
        self.account_error: AccountError | BudgetReached | None = None
        # Set when the caller should stop: a signal, or (--once) all work done or an account
        # problem.
        self.finished = threading.Event()
        self.journal: Journal | None = None
        self.pipeline: Pipeline | None = None
        self.intake: Intake | None = None
        self.watcher: Watcher | None = None
        self.client: ApiClient | None = None
        # The run loop waits on `wake`; stop and reload requests set it after their flag.
        self.wake = Waker()
        self.reload_requested = False
        self.metrics: Metrics | None = None
        self.handoff: HandOff | None = None
        self.coordinator: Coordinator | None = None
        self._lock: DaemonLock | None = None
        self._retired_clients: list[ApiClient] = []  # replaced by a reload, closed at stop
        self._watch_loss = WatchLoss()
        # Slots of inboxes a reload removed: their queued jobs finish, nothing new is taken.
        self.inactive: set[int] = set()
        self._next_prune = 0.0
        self.web: WebServer | None = None  # the web view (web.listen), when served
        self.person_lock = threading.Lock()  # a person's actions (service/person.py), one by one
        logs.add_secret(config.api.key.reveal())
        logs.add_secret(config.web.token.reveal())

    # -- start --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start everything, or (on any error) stop what was started and raise."""
        libraries.configure()  # process-wide, so here in the main thread, before any worker
        prepare_folders(self.config)
        check_state_space(self.config.state_dir)
        try:
            self._lock = DaemonLock.acquire(self.config.state_dir)
            try:
                self._start()
            except BaseException:
                # Hand-offs queued by an earlier run stay queued (durably): no wait for them.
                self._shut_down(handoff_seconds=0)
                raise
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise state_full(self.config.state_dir) from None
            raise
        except StateUnavailable as exc:  # the journal's first writes: nearly full, or EIO
            raise StartupError(f"{exc}; the next start carries on once it can be "
                               f"written") from None

    def _start(self) -> None:
        config = self.config
        self.metrics = rebind_metrics(None, config.metrics.listen, self.snapshot)
        self.web = web_view.bind(self, config)  # a taken address stops the start before work
        self.journal = journal = Journal(config.state_dir)
        self.client = ApiClient(config.api.url, config.api.key,
                                timeout=config.api.timeout_seconds,
                                connect_timeout=config.api.connect_timeout_seconds)
        # The key's rate limit and pause, and the claims that keep each file to one daemon
        # (shared through the coordination store, or claims on the share without one).
        self.coordinator = coordinator = Coordinator.from_config(config)
        limiter = coordinator.limiter
        limiter.preload(journal.recent_send_ages(60.0))
        coordinator.start()
        self.pipeline = Pipeline(config, journal, self.client, limiter, coordinator,
                                 release=self._release, on_account_problem=self._account_problem)
        self.pipeline.ctx.metrics = self.metrics
        if config.hooks or config.webhook:
            self.handoff = HandOff(config.state_dir, config.hooks, config.webhook,
                                   withhold=[config.api.key])
            self.handoff.start()
            self.pipeline.ctx.handoff = self.handoff
        self.intake = Intake(config, journal, self.pipeline.submit,
                             on_idle=self.request_stop if self.once else None,
                             paused=self.pipeline.ctx.inbox_paused)
        self.pipeline.ctx.inbox_away = self.intake.folders.away
        resumed = resume_jobs(journal, config.inboxes, range(len(config.inboxes)),
                              report_orphans=True)
        for job in resumed:
            self.intake.adopt(job)
        remove_orphans(journal)
        self.pipeline.start()
        if not self.once:
            self.watcher = Watcher(config.inboxes, self.intake.offer, self.intake.request_rescan)
            self.watcher.start()
        found = self.intake.scan_all()
        self.intake.start(self.watcher)
        self.wake.open()
        if self.web is not None:
            self.web.start()
        log.info("ready", inboxes=[str(i.path) for i in config.inboxes], files_found=found,
                 resumed=len(resumed), once=self.once, api_url=config.api.url,
                 requests_per_minute=config.api.requests_per_minute,
                 concurrency=config.api.concurrency)

    # -- callbacks from the pipeline ----------------------------------------------------------

    def _release(self, job: Job, kept: tuple[int, int] | None) -> None:
        assert self.intake is not None
        self.intake.release(job, kept)

    def _account_problem(self, error: AccountError | BudgetReached) -> None:
        self.account_error = error
        if self.once:
            self.request_stop()

    # -- running ------------------------------------------------------------------------------

    def housekeeping(self) -> None:
        """Every turn of the main loop: end a budget pause that is over, catch up after
        commits (`AfterCommit.catch_up`). At start and once a day: forget what the journal
        no longer needs."""
        if self.pipeline is not None:
            self.pipeline.ctx.check_budget()
            self.pipeline.after_commit.catch_up()
        now = time.monotonic()
        if self.journal is None or now < self._next_prune:
            return
        days = self.config.journal_retention_days
        try:
            forgotten = self.journal.prune(time.time() - days * 86400.0, still_in_place)
        except StateUnavailable:
            self._next_prune = now + 3600.0  # the disk is full or failing: later
            return
        self._next_prune = now + 86400.0
        if forgotten:
            log.info("journal.pruned", records=forgotten, older_than_days=days)

    def request_stop(self) -> None:
        """Ask `run`'s caller to stop (signal handlers call this; it only sets a flag)."""
        self.finished.set()
        self.wake.set()

    def request_reload(self) -> None:
        """Ask the run loop to re-read the configuration (SIGHUP; it only sets a flag)."""
        self.reload_requested = True
        self.wake.set()

    def snapshot(self) -> dict[str, Any]:
        """The pipeline's counters plus `healthy` (for STATUS= and metrics); {} before start."""
        if self.pipeline is None:
            return {}
        return {**self.pipeline.snapshot(lambda: self.intake.pending if self.intake else 0),
                "healthy": not self.problems(), "rate_wait_s": self.pipeline.limiter.wait_time(),
                "claims": self.coordinator.claims_held if self.coordinator else 0}

    def exit_code(self) -> int:
        if self.account_error is not None and self.once:
            return EXIT_ACCOUNT
        if self.once and self.pipeline is not None and self.pipeline.tally.failed:
            return EXIT_FAILED
        return EXIT_OK

    def healthy(self) -> bool:
        """Every thread that does work is alive (systemd's watchdog pings depend on this)."""
        return not self.problems()

    def problems(self) -> list[str]:
        """What is dead, in words; empty while every worker, the intake and the watches live.

        Not problems: an inbox folder that is missing (the intake reports it and watches it
        again when it is back), and a watch that died less than two rescans ago (the intake's
        rescan restores it). Only what does not heal by itself stops the watchdog pings.
        """
        found = []
        if not (self.pipeline and self.pipeline.alive()):
            found.append("a worker thread died")
        if not (self.intake and self.intake.alive()):
            found.append("the intake thread died")
        if self.handoff is not None and not self.handoff.alive():
            found.append("a hook or webhook thread died")
        if self.watcher is not None and self.intake is not None:
            found += self._watch_loss.unrestored(self.watcher, self.inactive,
                                                 self.config.rescan_seconds)
        return found

    def stop(self) -> bool:
        """Stop taking files, let requests in flight finish within the shutdown timeout.

        Returns False if some had to be abandoned (their files stay waiting, journal intact).
        """
        log.info("stopping", timeout_s=self.config.shutdown_timeout_seconds)
        clean = self._shut_down(handoff_seconds=self.config.shutdown_timeout_seconds)
        log.info("stopped", clean=clean)
        return clean

    def _shut_down(self, *, handoff_seconds: float) -> bool:
        """The one shutdown sequence, for a stop and for a start that failed half-way: stop
        taking files, let requests in flight finish within the shutdown timeout, give
        hand-offs `handoff_seconds`, then close everything that was started, in reverse.
        False if requests had to be abandoned (the journal is then left open: a worker may
        still write to it)."""
        if self.web is not None:
            self.web.stop()  # first: nothing can be asked of a daemon that is stopping
        if self.watcher is not None:
            self.watcher.stop()
        if self.intake is not None:
            self.intake.stop()
        clean = True
        if self.pipeline is not None:
            self.pipeline.stop()
            clean = self.pipeline.join(self.config.shutdown_timeout_seconds)
            if not clean:
                log.warning("stop.abandoned", in_flight=self.pipeline.tally.in_flight,
                            hint="their files stay in the inbox and are sent again next start")
        if self.handoff is not None:
            self.handoff.stop(handoff_seconds)
        if self.coordinator is not None:
            self.coordinator.stop()  # releases the claims of files handed back
        if self.client is not None:
            self.client.close()
        for client in self._retired_clients:
            client.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.journal is not None and clean:
            self.journal.close()
        if self._lock is not None:
            self._lock.release()
        self.wake.close()
        return clean

    # -- reload -------------------------------------------------------------------------------

    def reload(self, new: Config) -> None:
        """Apply a new, valid configuration without losing a queued file (SIGHUP).

        Jobs name their inbox by its slot (index), so slots never move while the process lives:
        a changed inbox is updated in its slot, a new one gets a new slot, a removed one is
        switched off (not watched or scanned; files already queued from it still finish; its
        unfinished journal records resume when it is configured again). The watches are
        replaced; the intake takes the new configuration as a message and rescans; the queue,
        the workers and the requests in flight carry on. What cannot change while running
        (state_dir, api.concurrency) keeps its old value and is reported. Raises ConfigError when
        the new folders are unusable, StartupError when the metrics or web address is taken;
        the running configuration stays.
        """
        pipeline, intake = self.pipeline, self.intake
        assert pipeline is not None and intake is not None
        old = self.config
        new, needs_restart = pin_what_cannot_change(old, new)
        prepare_folders(new)
        slots, inactive, added, changed = match_slots(old.inboxes, self.inactive, new.inboxes)
        removed = sorted(inactive - self.inactive)
        if new.metrics.listen != old.metrics.listen:
            self.metrics = pipeline.ctx.metrics = rebind_metrics(
                self.metrics, new.metrics.listen, self.snapshot)
        web = web_view.rebind(self, old, new)  # binds before letting the old go

        # Nothing below can fail on the configuration: commit.
        config = dataclasses.replace(new, inboxes=tuple(slots))
        self.config = config
        self.inactive = inactive
        self._watch_loss.clear()
        logs.add_secret(config.web.token.reveal())
        self.web = web_view.adopt(self.web, web, config)
        api = config.api
        client = None
        if client_changed(old.api, api):
            logs.add_secret(api.key.reveal())
            if self.client is not None:
                self._retired_clients.append(self.client)  # requests in flight still use it
            self.client = client = ApiClient(
                api.url, api.key, timeout=api.timeout_seconds,
                connect_timeout=api.connect_timeout_seconds)
        # One writer for what the workers read: config, client, limits, backoff, budget. Paused
        # by the account now, it sends a probe at once (the new key or URL may be what fixes
        # it); `probing` says so even if the probe is answered before the log line.
        probing = pipeline.queue.paused is not None
        pipeline.ctx.reconfigure(config, client)
        # The watches are replaced around the intake, which keeps running: events of a new
        # watch that arrive before the reload message are covered by the rescan it does.
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = Watcher(config.inboxes, intake.offer, intake.request_rescan,
                                   inactive=inactive)
            self.watcher.start()
        assert self.journal is not None
        resume = resume_jobs(self.journal, config.inboxes, added + changed)
        reply = intake.reconfigure(config, inactive, self.watcher, resume, added + changed)
        try:
            found: int | None = reply.result(timeout=max(60.0, config.rescan_seconds))
        except concurrent.futures.TimeoutError:
            found = None  # a long rescan of a slow share: it goes on in the intake thread
        log.info("reload.done", inboxes=[str(slots[i].path) for i in range(len(slots))
                                         if i not in inactive],
                 added=[str(slots[i].path) for i in added],
                 changed=[str(slots[i].path) for i in changed],
                 removed=[str(slots[i].path) for i in removed], files_found=found,
                 resumed=len(resume), requests_per_minute=api.requests_per_minute,
                 probing=probing)
        if needs_restart:
            log.warning("reload.needs_restart", settings=needs_restart,
                        hint="these keep their old value until watchfolder restarts")





def check_state_space(state_dir: Path, need: int = STATE_MIN_FREE) -> None:
    """Raise StateDirFull when the disk of `state_dir` has less than `need` bytes free."""
    try:
        st = os.statvfs(state_dir)
    except OSError:
        return  # prepare_folders made it; nothing to say here that opening will not
    if st.f_bavail * st.f_frsize < need:
        raise state_full(state_dir, need)


def state_full(state_dir: Path, need: int = STATE_MIN_FREE) -> StateDirFull:
    free = 0
    with contextlib.suppress(OSError):
        st = os.statvfs(state_dir)
        free = st.f_bavail * st.f_frsize
    return StateDirFull(
        f"the disk of state_dir {state_dir} is full: {free} bytes free, at least {need} "
        f"needed (the journal and the spool live there). Free some space there; the next "
        f"start carries on where this one would have")
