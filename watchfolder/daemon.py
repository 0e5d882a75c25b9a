"""Wiring: journal, limiter, client, pipeline, intake and watchers; start, stop, join.

`Daemon.start()` returns once every watch is set and the start-up scan is queued (the moment
systemd's READY=1 and the `ready` log line stand for). Parsing argv, signals and exit codes
belong to cli.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import socket
import threading
import time
from pathlib import Path, PurePosixPath
from typing import Any

import structlog

from watchfolder import logs
from watchfolder.client import ApiClient
from watchfolder.config import Config, InboxConfig
from watchfolder.errors import AccountError, ConfigError
from watchfolder.intake import Intake
from watchfolder.journal import FAILING, FETCHED, STORED, Journal
from watchfolder.metrics import Metrics
from watchfolder.outbox import TEMP_PREFIX
from watchfolder.pipeline import Job, Pipeline
from watchfolder.ratelimit import RateLimiter
from watchfolder.status import DaemonLock
from watchfolder.watcher import Watcher

log = structlog.get_logger("watchfolder")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ACCOUNT = 0, 1, 2, 3


class Daemon:
    def __init__(self, config: Config, *, once: bool = False) -> None:
        self.config = config
        self.once = once
        self.account_error: AccountError | None = None
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
        self._lock: DaemonLock | None = None
        self._retired_clients: list[ApiClient] = []  # replaced by a reload, closed at stop
        self._watch_lost: dict[int, float] = {}  # inbox slot → when its watch was seen dead
        logs.add_secret(config.api.key.reveal())

    # -- start --------------------------------------------------------------------------------

    def start(self) -> None:
        config = self.config
        prepare_folders(config)
        self._lock = DaemonLock.acquire(config.state_dir)
        if config.metrics.listen:
            self.metrics = Metrics(self.snapshot)
            try:
                self.metrics.serve(config.metrics.listen)
            except ConfigError:
                self._lock.release()
                raise
        self.journal = journal = Journal(config.state_dir)
        journal.set_meta("paused", None)  # a pause belongs to the process that saw it
        self.client = ApiClient(config.api.url, config.api.key,
                                timeout=config.api.timeout_seconds,
                                connect_timeout=config.api.connect_timeout_seconds)
        limiter = RateLimiter(config.api.requests_per_minute, backoff=config.retry.backoff_seconds,
                              max_backoff=config.retry.max_backoff_seconds)
        now = time.time()
        limiter.preload(now - t for t in journal.recent_sends(60.0))
        self.pipeline = Pipeline(config, journal, self.client, limiter,
                                 release=self._release, on_account_problem=self._account_problem)
        self.pipeline.metrics = self.metrics
        self.intake = Intake(config, journal, self.pipeline.submit,
                             on_idle=self.request_stop if self.once else None)
        recovered = self._recover(journal)
        self.pipeline.start()
        if not self.once:
            self.watcher = Watcher(config.inboxes, self.intake.offer, self.intake.request_rescan)
            self.watcher.start()
        found = self.intake.scan_all()
        self.intake.start(self.watcher)
        self.wake.open()
        log.info("ready", inboxes=[str(i.path) for i in config.inboxes], files_found=found,
                 resumed=recovered, once=self.once, api_url=config.api.url,
                 requests_per_minute=config.api.requests_per_minute,
                 concurrency=config.api.concurrency)

    def _recover(self, journal: Journal) -> int:
        """Put every unfinished file back in the queue; clear temp files a crash left."""
        assert self.intake is not None
        by_path = {str(inbox.path): index for index, inbox in enumerate(self.config.inboxes)}
        referenced: set[str] = set()
        count = 0
        for record in journal.unfinished():
            if record.spool and record.state == FETCHED:
                referenced.add(record.spool)
            index = by_path.get(record.inbox)
            if index is None:
                log.warning("journal.orphan", inbox=record.inbox, file=record.rel,
                            state=record.state, hint="this inbox is no longer configured; "
                            "the file resumes when it is configured again")
                continue
            _clear_temp_files(self.config.inboxes[index], record.rel, record.state)
            self.intake.adopt(Job(index, record.rel, record=record))
            count += 1
        for leftover in journal.spool_dir.iterdir():
            if str(leftover) not in referenced:
                leftover.unlink(missing_ok=True)
        return count

    # -- callbacks from the pipeline ----------------------------------------------------------

    def _release(self, job: Job, kept: tuple[int, int] | None) -> None:
        assert self.intake is not None
        self.intake.release(job, kept)

    def _account_problem(self, error: AccountError) -> None:
        self.account_error = error
        if self.once:
            self.request_stop()

    # -- running ------------------------------------------------------------------------------

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
        return {**self.pipeline.snapshot(), "healthy": not self.problems()}

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
        watcher, intake = self.watcher, self.intake
        if watcher is not None and intake is not None:
            now = time.monotonic()
            for index, inbox in enumerate(watcher.inboxes):
                if index in intake.inactive or watcher.healthy(index) or not inbox.path.is_dir():
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
        log.info("stopped", clean=clean)
        return clean

    # -- reload -------------------------------------------------------------------------------

    def reload(self, new: Config) -> None:
        """Apply a new, valid configuration without losing a queued file (SIGHUP).

        Jobs name their inbox by its slot (index), so slots never move while the process lives:
        a changed inbox is updated in its slot, a new one gets a new slot, a removed one is
        switched off (not watched or scanned; files already queued from it still finish; its
        unfinished journal records resume when it is configured again). Only the intake and
        the watches are stopped and started around the swap; the queue, the workers and the
        requests in flight carry on. What cannot change while running (state_dir,
        api.concurrency) keeps its old value and is reported. Raises ConfigError when the new
        folders or the metrics address are unusable; the running configuration stays.
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
            elif index in intake.inactive:
                slots[index] = inbox
                added.append(index)  # configured again
            elif slots[index] != inbox:
                slots[index] = inbox
                changed.append(index)
            inactive.discard(index)
        removed = sorted(inactive - intake.inactive)
        if new.metrics.listen != old.metrics.listen:
            if new.metrics.listen:
                if self.metrics is None:
                    self.metrics = Metrics(self.snapshot)
                self.metrics.serve(new.metrics.listen)  # binds before letting the old go
                pipeline.metrics = self.metrics
            elif self.metrics is not None:
                self.metrics.close()

        # Nothing below can fail on the configuration: commit.
        if self.watcher is not None:
            self.watcher.stop()
        intake.stop()
        config = dataclasses.replace(new, inboxes=tuple(slots))
        self.config = pipeline.config = intake.config = config
        intake.inactive = inactive
        self._watch_lost.clear()
        api, before = config.api, old.api
        if (api.url, api.key, api.timeout_seconds, api.connect_timeout_seconds) != (
                before.url, before.key, before.timeout_seconds, before.connect_timeout_seconds):
            logs.add_secret(api.key.reveal())
            if self.client is not None:
                self._retired_clients.append(self.client)  # requests in flight still use it
            self.client = pipeline.client = ApiClient(
                api.url, api.key, timeout=api.timeout_seconds,
                connect_timeout=api.connect_timeout_seconds)
        pipeline.limiter.set_limit(api.requests_per_minute)
        pipeline.limiter.backoff = config.retry.backoff_seconds
        pipeline.limiter.max_backoff = config.retry.max_backoff_seconds
        resumed = self._adopt(added + changed)
        found = intake.scan_all()
        if not self.once:
            self.watcher = Watcher(config.inboxes, intake.offer, intake.request_rescan,
                                   inactive=inactive)
            self.watcher.start()
        intake.start(self.watcher)
        if pipeline.queue.paused is not None:
            pipeline.queue.probe_now()  # the new key or URL may be what fixes the pause
        log.info("reload.done", inboxes=[str(slots[i].path) for i in range(len(slots))
                                         if i not in inactive],
                 added=[str(slots[i].path) for i in added],
                 changed=[str(slots[i].path) for i in changed],
                 removed=[str(slots[i].path) for i in removed], files_found=found,
                 resumed=resumed, requests_per_minute=api.requests_per_minute,
                 probing=pipeline.queue.paused is not None)
        if needs_restart:
            log.warning("reload.needs_restart", settings=needs_restart,
                        hint="these keep their old value until watchfolder restarts")

    def _adopt(self, indexes: list[int]) -> int:
        """Queue unfinished journal records of inboxes (re)configured by a reload.

        Records of files this process already holds are skipped (the intake knows them);
        the others were left by an earlier run when their inbox was not configured.
        """
        intake, journal = self.intake, self.journal
        assert intake is not None and journal is not None
        inboxes = self.config.inboxes
        kept_in_place = [i for i in indexes if inboxes[i].archive is None]
        for index in kept_in_place:
            for rel, signature in journal.kept_in_place(str(inboxes[index].path)).items():
                intake.kept.setdefault((index, rel), signature)
        wanted = {str(inboxes[index].path): index for index in indexes}
        count = 0
        for record in journal.unfinished():
            slot = wanted.get(record.inbox)
            if slot is None or (slot, record.rel) in intake.known:
                continue
            _clear_temp_files(inboxes[slot], record.rel, record.state)
            intake.adopt(Job(slot, record.rel, record=record))
            count += 1
        return count


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
    try:
        config.state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        problems.append(f"state_dir: cannot create {config.state_dir}: {exc.strerror}")
    else:
        if not os.access(config.state_dir, os.W_OK | os.X_OK):
            problems.append(f"state_dir: {config.state_dir} is not writable by this user")
    for index, inbox in enumerate(config.inboxes):
        folders = {"path": inbox.path, "outbox": inbox.outbox, "errors": inbox.errors,
                   "archive": inbox.archive}
        for name, folder in folders.items():
            if folder is None:
                continue
            try:
                folder.mkdir(exist_ok=True)
            except OSError as exc:
                problems.append(f"inboxes[{index}].{name}: cannot create {folder}: "
                                f"{exc.strerror}")
                continue
            if not os.access(folder, os.W_OK | os.X_OK):
                problems.append(f"inboxes[{index}].{name}: {folder} is not writable by this "
                                f"user (fix its owner or group permissions)")
    if problems:
        raise ConfigError(problems)


def _clear_temp_files(inbox: InboxConfig, rel: str, state: str) -> None:
    """Remove the hidden temp files a crash can leave where this file was being written."""
    parent = PurePosixPath(rel).parent.parts
    roots: dict[str, Path | None] = {FETCHED: inbox.outbox, STORED: inbox.archive,
                                     FAILING: inbox.errors}
    root = roots.get(state)
    if root is not None:
        folder = root.joinpath(*parent)
        with contextlib.suppress(OSError):
            for entry in list(folder.iterdir()):
                if entry.name.startswith(TEMP_PREFIX) and entry.name.endswith(".tmp"):
                    entry.unlink(missing_ok=True)
