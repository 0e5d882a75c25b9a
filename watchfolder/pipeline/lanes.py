"""The local lane's workers: how many, what each prefers, and how far ahead proxies are made.

Heavy local image work (a studio file's proxy, full-resolution or encoded outputs) has a lane
of its own so it never holds the request slots' workers. `local_split` of the cores but one
prefer the work on answers (composites, placements: their files hold a request slot), and
`PROXY_WORKERS` more prefer proxies, so a proxy never queues behind composites; each takes
the other kind when none of its own waits. `ProxyBound` lets a proxy be made only while fewer
proxies than request slots are being made or wait to be sent: further ahead they would only
fill the spool.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

from watchfolder.journal.db import PROXIED, QUEUED, FileRecord
from watchfolder.pipeline.jobqueue import Job


def proxy_work(job: Job) -> bool:
    """A studio file waiting on the local lane for its proxy (queued: nothing sent yet)."""
    return job.record is not None and job.record.state == QUEUED


def answer_work(job: Job) -> bool:
    """Local work on an answer (a composite, a placement): its file holds a request slot."""
    return not proxy_work(job)


# One local worker prefers proxies: a request waits for each, so a studio file landing
# while composites run is sent at once instead of behind them (issue 17).
PROXY_WORKERS = 1


def local_split(cores: int) -> tuple[int, int]:
    """(local workers, libvips threads each) for `cores`: one core is left to requests and
    small files, the rest shared so workers x threads stays within it."""
    budget = max(1, cores - 1)
    workers = max(1, round(math.sqrt(budget)))
    return workers, max(1, budget // workers)


def spare_workers(concurrency: int) -> int:
    """Workers beyond `concurrency`, for the light steps; each holds at most one file's bytes."""
    return max(2, concurrency // 4)


class ProxyBound:
    """The proxies being made or waiting to be sent, at most `size()` of them."""

    def __init__(self, size: Callable[[], int], wake: Callable[[], None]) -> None:
        self._size = size
        self._wake = wake  # a local worker may take a proxy again
        self._proxied: set[int] = set()  # record ids
        self._lock = threading.Lock()

    def may_start(self, job: Job) -> bool:
        """Whether a local worker may take `job` now: any answer's work; a proxy only while
        fewer proxies than request slots wait to be sent. Proxies made further ahead would
        only fill the spool: the held slots let requests go no faster than answers are
        placed (see `RequestSlots`)."""
        if not proxy_work(job) or job.record is None:
            return True
        with self._lock:
            if job.record.id in self._proxied:
                return True  # counted already (put back before its step ran)
            if len(self._proxied) >= self._size():
                return False
            # Taken as soon as accepted: counted now, so two workers cannot both take the
            # last place (the count drops if the proxy is not made after all).
            self._proxied.add(job.record.id)
            return True

    def note(self, record: FileRecord, *, lost: bool = False) -> None:
        """Count `record` among the proxies waiting to be sent, or no longer (a proxy being
        made, counted by `may_start`, until its step returns)."""
        with self._lock:
            if record.state == PROXIED and not lost:
                self._proxied.add(record.id)
                return
            if record.id not in self._proxied:
                return
            self._proxied.discard(record.id)
        self._wake()
