"""Wiring: journal, limiter, client, pipeline, intake and watchers; start, stop, join.

`Daemon.start()` returns once every watch is set and the start-up scan is queued (the moment
systemd's READY=1 and the `ready` log line stand for). Parsing argv, signals and exit codes
belong to cli.py.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path, PurePosixPath

import structlog

from watchfolder import logs
from watchfolder.client import ApiClient
from watchfolder.config import Config, InboxConfig
from watchfolder.errors import AccountError, ConfigError
from watchfolder.intake import Intake
from watchfolder.journal import FAILING, FETCHED, STORED, Journal
from watchfolder.outbox import TEMP_PREFIX
from watchfolder.pipeline import Job, Pipeline
from watchfolder.ratelimit import RateLimiter
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
        logs.add_secret(config.api.key.reveal())

    # -- start --------------------------------------------------------------------------------

    def start(self) -> None:
        config = self.config
        prepare_folders(config)
        self.journal = journal = Journal(config.state_dir)
        self.client = ApiClient(config.api.url, config.api.key,
                                timeout=config.api.timeout_seconds,
                                connect_timeout=config.api.connect_timeout_seconds)
        limiter = RateLimiter(config.api.requests_per_minute, backoff=config.retry.backoff_seconds,
                              max_backoff=config.retry.max_backoff_seconds)
        now = time.time()
        limiter.preload(now - t for t in journal.recent_sends(60.0))
        self.pipeline = Pipeline(config, journal, self.client, limiter,
                                 release=self._release, on_account_problem=self._account_problem)
        self.intake = Intake(config, journal, self.pipeline.submit,
                             on_idle=self.finished.set if self.once else None)
        recovered = self._recover(journal)
        self.pipeline.start()
        if not self.once:
            self.watcher = Watcher(config.inboxes, self.intake.offer, self.intake.request_rescan)
            self.watcher.start()
        found = self.intake.scan_all()
        self.intake.start(self.watcher)
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
            if record.spool:
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
            self.finished.set()

    # -- running ------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask `run`'s caller to stop (signal handlers call this; it only sets a flag)."""
        self.finished.set()

    def exit_code(self) -> int:
        if self.account_error is not None and self.once:
            return EXIT_ACCOUNT
        if self.once and self.pipeline is not None and self.pipeline.failed:
            return EXIT_FAILED
        return EXIT_OK

    def healthy(self) -> bool:
        """Every thread that does work is alive (systemd's watchdog pings depend on this)."""
        return bool(self.pipeline and self.pipeline.alive() and self.intake
                    and self.intake.alive() and (self.watcher is None or self.watcher.alive()))

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
        if self.journal is not None and clean:
            self.journal.close()
        log.info("stopped", clean=clean)
        return clean


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
