"""Wiring: journal, limiter, client, pipeline, intake and watchers; start, run, reload, stop.

`Daemon.start()` returns once every watch is set and the start-up scan is queued (the moment
systemd's READY=1 and the `ready` log line stand for). `supervise` is the main loop: it pings
the watchdog, keeps STATUS= current, and does what signal handlers asked for (they only set
flags). Parsing argv, installing signal handlers and exit codes belong to cli.py.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import select
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import structlog

from watchfolder import logs
from watchfolder.config.settings import Config, InboxConfig
from watchfolder.coordination.coordinator import Coordinator
from watchfolder.errors import AccountError, ConfigError
from watchfolder.files import layout
from watchfolder.files.place import folder_problem
from watchfolder.handoff.wiring import HandOff
from watchfolder.imaging import libraries
from watchfolder.intake.loop import Intake
from watchfolder.intake.settle import signature
from watchfolder.intake.watcher import Watcher
from watchfolder.journal.db import (
    FAILING,
    FETCHED,
    PROXIED,
    SENDING,
    STORED,
    FileRecord,
    Journal,
)
from watchfolder.pipeline.budget import BudgetReached
from watchfolder.pipeline.client import ApiClient
from watchfolder.pipeline.driver import Pipeline
from watchfolder.pipeline.jobqueue import Job
from watchfolder.service import status
from watchfolder.service.lock import DaemonLock
from watchfolder.service.metrics import Metrics
from watchfolder.service.notify import Notifier

log = structlog.get_logger("watchfolder")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ACCOUNT = 0, 1, 2, 3
STATUS_SECONDS = 5.0  # how often STATUS= may change at most, when no watchdog asks for more


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
        self._watch_lost: dict[int, float] = {}  # inbox slot → when its watch was seen dead
        # Slots of inboxes a reload removed: their queued jobs finish, nothing new is taken.
        self.inactive: set[int] = set()
        self._next_prune = 0.0
        logs.add_secret(config.api.key.reveal())

    # -- start --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start everything, or (on any error) stop what was started and raise."""
        libraries.configure()  # process-wide, so here in the main thread, before any worker
        prepare_folders(self.config)
        self._lock = DaemonLock.acquire(self.config.state_dir)
        try:
            self._start()
        except BaseException:
            # Hand-offs queued by an earlier run stay queued (durably): no wait for them.
            self._shut_down(handoff_seconds=0)
            raise

    def _start(self) -> None:
        config = self.config
        if config.metrics.listen:
            self.metrics = Metrics(self.snapshot)
            self.metrics.serve(config.metrics.listen)
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
                             on_idle=self.request_stop if self.once else None)
        resumed = self._resume(range(len(config.inboxes)), report_orphans=True)
        for job in resumed:
            self.intake.adopt(job)
        self._remove_orphans(journal)
        self.pipeline.start()
        if not self.once:
            self.watcher = Watcher(config.inboxes, self.intake.offer, self.intake.request_rescan)
            self.watcher.start()
        found = self.intake.scan_all()
        self.intake.start(self.watcher)
        self.wake.open()
        log.info("ready", inboxes=[str(i.path) for i in config.inboxes], files_found=found,
                 resumed=len(resumed), once=self.once, api_url=config.api.url,
                 requests_per_minute=config.api.requests_per_minute,
                 concurrency=config.api.concurrency)

    def _resume(self, indexes: range | list[int], *, report_orphans: bool = False) -> list[Job]:
        """Jobs for the unfinished journal records of these inboxes (after a crash or stop, or
        when a reload configures an inbox again); temp files a crash left are cleared."""
        journal = self.journal
        assert journal is not None
        inboxes = self.config.inboxes
        wanted = {str(inboxes[index].path): index for index in indexes}
        jobs = []
        for record in journal.unfinished():
            index = wanted.get(record.inbox)
            if index is None:
                if report_orphans:
                    log.warning("journal.orphan", inbox=record.inbox, file=record.rel,
                                state=record.state, hint="this inbox is no longer configured; "
                                "the file resumes when it is configured again")
                continue
            _clear_temp_files(inboxes[index], record)
            jobs.append(Job(index, record.rel, record=record))
        return jobs

    @staticmethod
    def _remove_orphans(journal: Journal) -> None:
        """Spool files no unfinished record points at (a crash before their unlink). A proxy
        is kept while its record may still send it: making it again costs seconds of CPU."""
        referenced = {record.spool for record in journal.unfinished()
                      if record.spool and record.state == FETCHED}
        referenced |= {record.proxy for record in journal.unfinished()
                       if record.proxy and record.state in (PROXIED, SENDING)}
        for leftover in journal.spool_dir.iterdir():
            if str(leftover) not in referenced:
                leftover.unlink(missing_ok=True)

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
        """Every turn of the main loop: end a budget pause that is over, try again the
        hand-offs a folder refused. At start and once a day: forget what the journal no
        longer needs."""
        if self.pipeline is not None:
            self.pipeline.check_budget()
            self.pipeline.retry_hand_offs()
        now = time.monotonic()
        if self.journal is None or now < self._next_prune:
            return
        self._next_prune = now + 86400.0
        days = self.config.journal_retention_days
        forgotten = self.journal.prune(time.time() - days * 86400.0, still_in_place)
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
        pending = self.intake.pending if self.intake is not None else 0
        return {**self.pipeline.snapshot(), "healthy": not self.problems(),
                "pending": pending, "rate_wait_s": self.pipeline.limiter.wait_time(),
                "claims": self.coordinator.claims_held if self.coordinator else 0}

    def exit_code(self) -> int:
        if self.account_error is not None and self.once:
            return EXIT_ACCOUNT
        if self.once and self.pipeline is not None and self.pipeline.failed:
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
        watcher, intake = self.watcher, self.intake
        if watcher is not None and intake is not None:
            now = time.monotonic()
            for index, inbox in enumerate(watcher.inboxes):
                if index in self.inactive or watcher.healthy(index) or not inbox.path.is_dir():
                    self._watch_lost.pop(index, None)
                    continue
                lost = self._watch_lost.setdefault(index, now)
                if now - lost > 2 * self.config.rescan_seconds + 1:
                    found.append(f"the watch on {inbox.path} stopped and was not restored")
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
        if self.watcher is not None:
            self.watcher.stop()
        if self.intake is not None:
            self.intake.stop()
        clean = True
        if self.pipeline is not None:
            self.pipeline.stop()
            clean = self.pipeline.join(self.config.shutdown_timeout_seconds)
            if not clean:
                log.warning("stop.abandoned", in_flight=self.pipeline.in_flight,
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
        the new folders are unusable, StartupError when the metrics address is taken; the
        running configuration stays.
        """
        pipeline, intake = self.pipeline, self.intake
        assert pipeline is not None and intake is not None
        old = self.config
        needs_restart = [name for name, before, after in (
            ("state_dir", old.state_dir, new.state_dir),
            ("api.concurrency", old.api.concurrency, new.api.concurrency)) if before != after]
        new = dataclasses.replace(new, state_dir=old.state_dir, api=dataclasses.replace(
            new.api, concurrency=old.api.concurrency))
        prepare_folders(new)
        slots = list(old.inboxes)
        inactive = set(range(len(slots)))
        added: list[int] = []
        changed: list[int] = []
        for inbox in new.inboxes:
            index = next((i for i, slot in enumerate(slots) if slot.path == inbox.path), None)
            if index is None:
                index = len(slots)
                slots.append(inbox)
                added.append(index)
            elif index in self.inactive:
                slots[index] = inbox
                added.append(index)  # configured again
            elif slots[index] != inbox:
                slots[index] = inbox
                changed.append(index)
            inactive.discard(index)
        removed = sorted(inactive - self.inactive)
        if new.metrics.listen != old.metrics.listen:
            if new.metrics.listen:
                if self.metrics is None:
                    self.metrics = Metrics(self.snapshot)
                self.metrics.serve(new.metrics.listen)  # binds before letting the old go
                pipeline.ctx.metrics = self.metrics
            elif self.metrics is not None:
                self.metrics.close()

        # Nothing below can fail on the configuration: commit.
        config = dataclasses.replace(new, inboxes=tuple(slots))
        self.config = config
        self.inactive = inactive
        self._watch_lost.clear()
        api, before = config.api, old.api
        client = None
        if (api.url, api.key, api.timeout_seconds, api.connect_timeout_seconds) != (
                before.url, before.key, before.timeout_seconds, before.connect_timeout_seconds):
            logs.add_secret(api.key.reveal())
            if self.client is not None:
                self._retired_clients.append(self.client)  # requests in flight still use it
            self.client = client = ApiClient(
                api.url, api.key, timeout=api.timeout_seconds,
                connect_timeout=api.connect_timeout_seconds)
        # One writer for what the workers read: config, client, limits, backoff, budget (and a
        # probe at once if paused: the new key or URL may be what fixes the pause).
        pipeline.reconfigure(config, client)
        # The watches are replaced around the intake, which keeps running: events of a new
        # watch that arrive before the reload message are covered by the rescan it does.
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = Watcher(config.inboxes, intake.offer, intake.request_rescan,
                                   inactive=inactive)
            self.watcher.start()
        resume = self._resume(added + changed)
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
                 probing=pipeline.queue.paused is not None)
        if needs_restart:
            log.warning("reload.needs_restart", settings=needs_restart,
                        hint="these keep their old value until watchfolder restarts")


def supervise(daemon: Daemon, notifier: Notifier,
              reload: Callable[[], bool] | None = None, *,
              status_seconds: float = STATUS_SECONDS,
              on_tick: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Run the main loop of a started daemon until a stop is requested.

    `reload` re-reads the configuration and returns whether it was applied; None (--once)
    ignores reload requests. Signal handlers only set the daemon's flags; everything they
    ask for happens here, in the main thread. `on_tick` gets the snapshot at every turn (the
    progress line of `run --once` on a terminal).
    """
    tick = min(status_seconds, notifier.ping_interval or status_seconds)
    note: str | None = None
    shown: str | None = _summary(daemon, note)
    withheld = False
    notifier.ready(shown)
    while True:
        daemon.housekeeping()
        problems = daemon.problems()
        if not problems:
            notifier.watchdog()
            if withheld:
                withheld = False
                log.warning("watchdog.resumed", hint="every thread is alive again")
        elif not withheld:
            withheld = True
            log.critical("watchdog.withheld", problems=problems,
                         hint="systemd restarts the service when its WatchdogSec= expires; "
                              "without systemd, restart watchfolder")
        if on_tick is not None:
            on_tick(daemon.snapshot())
        text = _summary(daemon, note, problems)
        if text != shown:
            notifier.status(text)
            shown = text
        daemon.wake.wait(tick)  # drains what woke it: nothing to clear
        if daemon.finished.is_set():
            break
        if daemon.reload_requested:
            daemon.reload_requested = False
            if reload is None:
                log.warning("reload.ignored", why="--once runs do not reload")
                continue
            notifier.reloading()
            note = None if reload() else "last reload rejected, see the log"
            shown = _summary(daemon, note)
            notifier.ready(shown)
    snapshot = daemon.snapshot()
    notifier.stopping(f"stopping: {snapshot.get('in_flight', 0)} in flight, "
                      f"{snapshot.get('waiting', 0)} waiting")
    notifier.close()


def _summary(daemon: Daemon, note: str | None, problems: list[str] | None = None) -> str:
    parts = [status.summary(daemon.snapshot())]
    if problems:
        parts.append("UNHEALTHY: " + "; ".join(problems))
    if note:
        parts.append(note)
    return "; ".join(parts)


class Waker:
    """Wakes the main loop from a signal handler or another thread.

    A `threading.Event` is not safe here: its `set()` takes a lock that the interrupted main
    thread may be holding inside `wait()`, and the handler would deadlock. This is the
    self-pipe trick (as asyncio does it): `set()` is one non-blocking send, no lock.
    """

    def __init__(self) -> None:
        self._pair: tuple[socket.socket, socket.socket] | None = None
        self._early = False  # set() before open(): e.g. --once found nothing to do

    def open(self) -> None:
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        self._pair = (reader, writer)
        if self._early:
            self.set()

    def set(self) -> None:
        pair = self._pair
        if pair is None:
            self._early = True
            return
        with contextlib.suppress(OSError):  # full (a wake is pending anyway) or closed
            pair[1].send(b"\0")

    def wait(self, timeout: float) -> bool:
        """Block until `set()` or `timeout`; True if woken."""
        pair = self._pair
        if pair is None:
            time.sleep(timeout)
            return False
        ready, _, _ = select.select([pair[0]], [], [], timeout)
        with contextlib.suppress(OSError):
            while pair[0].recv(4096):
                pass
        return bool(ready)

    def close(self) -> None:
        pair, self._pair = self._pair, None
        if pair is not None:
            for sock in pair:
                sock.close()


def prepare_folders(config: Config) -> None:
    """Create missing destination roots (their parents exist) and check we can write."""
    problems = []
    folders = [("state_dir", config.state_dir)]
    for index, inbox in enumerate(config.inboxes):
        folders += [(f"inboxes[{index}].{name}", folder) for name, folder in (
            ("path", inbox.path), ("outbox", inbox.outbox), ("errors", inbox.errors),
            ("archive", inbox.archive)) if folder is not None]
    for where, folder in folders:
        try:
            folder.mkdir(parents=where == "state_dir", exist_ok=True)
        except OSError as exc:
            problems.append(f"{where}: cannot create {folder}: {exc.strerror}")
            continue
        problem = folder_problem(folder, where.rsplit(".", 1)[-1])
        if problem is not None:
            problems.append(f"{where}: {problem} (fix its owner or group permissions)")
    if problems:
        raise ConfigError(problems)


def still_in_place(inbox: str, rel: str, size: int, mtime_ns: int) -> bool:
    """The file a kept-in-place record describes is still at its path, unchanged."""
    return signature(Path(inbox) / rel) == (size, mtime_ns)


def _clear_temp_files(inbox: InboxConfig, record: FileRecord) -> None:
    """Remove the hidden temp files a crash can leave where this file was being written: in
    every outbox its outputs and sidecars go to, the archive, or errors."""
    parent = PurePosixPath(record.rel).parent.parts
    if record.state == FETCHED:
        folders = layout.output_folders(inbox, record.rel, record.sha256 or "*")
    else:
        root = {STORED: inbox.archive, FAILING: inbox.errors}.get(record.state)
        folders = [] if root is None else [root.joinpath(*parent)]
    for folder in folders:
        with contextlib.suppress(OSError):
            for entry in list(folder.iterdir()):
                if layout.is_temp(entry.name):
                    entry.unlink(missing_ok=True)
