"""What the workers did, for status, metrics and the exit code: files in their hands, done,
failed and reused, and the one summary line each finished file gets."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import structlog

from watchfolder.journal.db import DONE, FAILED
from watchfolder.pipeline.work import Work

if TYPE_CHECKING:
    from watchfolder.service.metrics import Metrics

log = structlog.get_logger("watchfolder")


class Tally:
    """Counts kept by the workers, read by other threads."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.done = 0
        self.failed = 0
        self.reused = 0
        self._lock = threading.Lock()

    @contextmanager
    def busy(self) -> Iterator[None]:
        """A worker has a file in its hands."""
        with self._lock:
            self.in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self.in_flight -= 1

    def finished(self, work: Work, metrics: Metrics | None,
                 release: Callable[[], None]) -> None:
        """Count a file that reached a final state, hand it back (`release`: the intake stops
        counting it as waiting) in the same instant as seen by `counts`, and log its one
        summary line."""
        record = work.record
        reused = bool(record.reuse_from)
        ms = round((time.monotonic() - work.job.seen) * 1000)
        with self._lock:
            if record.state == DONE:
                self.done += 1
                self.reused += reused
            elif record.state == FAILED:
                self.failed += 1
            release()
        if record.state == DONE:
            log.info("file.done", **work.log_fields(), result=record.result,
                     archived=record.archive, attempts=record.attempts,
                     reused=reused, credits_remaining=record.credits, ms=ms)
        elif record.state == FAILED:
            log.error("file.failed", **work.log_fields(), reason=record.reason,
                      status=record.status, message=record.message, attempts=record.attempts,
                      moved_to=record.error_path, ms=ms)
        if metrics is not None:
            metrics.file_finished(str(work.inbox.path), record.state, reason=record.reason,
                                  reused=reused)

    def counts(self, waiting: Callable[[], int]) -> tuple[int, int, int]:
        """(done, failed, waiting()) at one instant: a file being finished is counted either as
        waiting or as finished, never as both nor neither (the progress line's total)."""
        with self._lock:
            return self.done, self.failed, waiting()
