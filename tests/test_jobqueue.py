"""The job queue (order, timers, the account pause and its probes) and the request slots,
driven by an injected clock and random source: nothing here sleeps."""

from __future__ import annotations

import random
import threading

from tests.conftest import LogCapture
from watchfolder.coordination.ratelimit import backoff
from watchfolder.errors import CreditsExhausted
from watchfolder.pipeline.jobqueue import Job, JobQueue, RequestSlots
from watchfolder.pipeline.pause import Pause


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def names(queue: JobQueue, count: int) -> list[str]:
    found = []
    for _ in range(count):
        job = queue.get(timeout=0)
        found.append("-" if job is None else job.rel)
    return found


def test_ready_jobs_come_in_order_and_front_goes_first() -> None:
    queue = JobQueue(clock=Clock())
    for rel in ("a", "b"):
        queue.put(Job(0, rel))
    queue.put(Job(0, "urgent"), front=True)
    assert names(queue, 4) == ["urgent", "a", "b", "-"]


def test_a_parked_job_is_ready_exactly_when_its_time_comes() -> None:
    clock = Clock()
    queue = JobQueue(clock=clock)
    queue.put_later(Job(0, "late"), 30.0)
    queue.put_later(Job(0, "soon"), 10.0)
    assert len(queue) == 2
    clock.now += 9.99
    assert names(queue, 1) == ["-"]
    clock.now += 0.01
    assert names(queue, 2) == ["soon", "-"]
    clock.now += 20.0
    assert names(queue, 1) == ["late"]
    assert len(queue) == 0


def test_paused_queue_hands_out_one_probe_per_interval_until_resumed() -> None:
    clock = Clock()
    pause = Pause(clock=clock)
    queue = JobQueue(clock=clock, pause=pause)
    for rel in ("a", "b", "c"):
        queue.put(Job(0, rel))
    assert pause.pause(CreditsExhausted("no credits", 402), probe_in=60.0) is True
    assert pause.pause(CreditsExhausted("no credits", 402), probe_in=60.0) is False
    assert names(queue, 1) == ["-"], "nothing before the first probe is due"
    clock.now += 60.0
    probe = queue.get(timeout=0)
    assert probe is not None and probe.rel == "a" and probe.probe
    assert names(queue, 1) == ["-"], "one probe per interval, whatever became of the last"
    clock.now += 59.0
    assert names(queue, 1) == ["-"]
    clock.now += 1.0
    assert names(queue, 1) == ["b"]
    pause.probe_now()
    assert names(queue, 1) == ["c"], "probe_now lets the next probe go at once"
    queue.put(Job(0, "d"))
    queue.put(Job(0, "e"))
    assert pause.resume() is True
    assert names(queue, 3) == ["d", "e", "-"]
    assert pause.resume() is False


def test_a_refusal_after_probe_now_does_not_put_the_probe_off() -> None:
    # A reload with a new key makes the probe due at once; a request sent with the old key
    # and refused only now must not push that probe a whole interval away.
    clock = Clock()
    pause = Pause(clock=clock)
    queue = JobQueue(clock=clock, pause=pause)
    queue.put(Job(0, "a"))
    pause.pause(CreditsExhausted("no credits", 402), probe_in=120.0)
    pause.probe_now()
    assert pause.pause(CreditsExhausted("no credits", 402), probe_in=120.0) is False
    assert names(queue, 1) == ["a"], "the probe the reload made due still goes at once"
    assert names(queue, 1) == ["-"]
    pause.pause(CreditsExhausted("no credits", 402), probe_in=120.0)  # the probe refused too
    clock.now += 119.0
    assert names(queue, 1) == ["-"], "then one probe per interval again"



def test_get_blocks_until_a_put_and_close_releases_waiters() -> None:
    queue = JobQueue()
    got: list[Job | None] = []
    waiter = threading.Thread(target=lambda: got.append(queue.get()))
    waiter.start()
    queue.put(Job(0, "x"))
    waiter.join(5)
    assert [job.rel for job in got if job] == ["x"]
    waiter = threading.Thread(target=lambda: got.append(queue.get()))
    waiter.start()
    queue.close()
    waiter.join(5)
    assert not waiter.is_alive() and got[-1] is None


def test_retry_delay_is_full_jitter_below_the_doubling_ceiling() -> None:
    queue = JobQueue(clock=Clock(), rng=random.Random(7))
    for attempt in range(1, 12):
        ceiling = backoff(attempt, 2.0, 300.0)
        delays = [queue.retry_delay(attempt, 2.0, 300.0) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) > 0.8 * ceiling and min(delays) < 0.2 * ceiling, "spread, not fixed"
    assert backoff(1, 2.0, 300.0) == 2.0 and backoff(3, 2.0, 300.0) == 8.0
    assert backoff(20, 2.0, 300.0) == 300.0
    # the server's Retry-After is a floor
    assert all(queue.retry_delay(1, 2.0, 300.0, at_least=45.0) == 45.0 for _ in range(50))


def test_same_seed_same_delays() -> None:
    first = JobQueue(rng=random.Random(3))
    second = JobQueue(rng=random.Random(3))
    assert ([first.retry_delay(4, 1.0, 60.0) for _ in range(5)]
            == [second.retry_delay(4, 1.0, 60.0) for _ in range(5)])


def test_request_slots_bound_and_stop() -> None:
    slots = RequestSlots(2)
    stop = threading.Event()
    assert slots.acquire(stop) and slots.acquire(stop)
    assert slots.free == 0
    results: list[bool] = []
    waiter = threading.Thread(target=lambda: results.append(slots.acquire(stop)))
    waiter.start()
    slots.release()
    waiter.join(5)
    assert results == [True] and slots.free == 0
    waiter = threading.Thread(target=lambda: results.append(slots.acquire(stop)))
    waiter.start()
    stop.set()
    slots.wake()
    waiter.join(5)
    assert results == [True, False], "a stop releases a waiter without a slot"
    slots.release()
    slots.release()
    assert slots.free == 2


def test_a_preferred_job_goes_first_and_a_refused_one_waits_for_a_wake() -> None:
    queue = JobQueue(clock=Clock(), selective=True)
    for rel in ("composite-1", "proxy-1", "composite-2"):
        queue.put(Job(0, rel))
    proxy_first = queue.get(timeout=0, prefer=lambda job: job.rel.startswith("proxy"))
    assert proxy_first is not None and proxy_first.rel == "proxy-1"
    # No preferred job left: the next in line, so no worker idles while work waits.
    other = queue.get(timeout=0, prefer=lambda job: job.rel.startswith("proxy"))
    assert other is not None and other.rel == "composite-1"

    allowed = threading.Event()
    got: list[Job | None] = []
    waiter = threading.Thread(target=lambda: got.append(
        queue.get(timeout=5, accept=lambda job: allowed.is_set())))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and not got, "a refused job is left in the queue"
    allowed.set()
    queue.wake()
    waiter.join(5)
    assert [job.rel for job in got if job] == ["composite-2"]


def test_a_selective_queue_wakes_the_worker_that_accepts_the_new_job() -> None:
    queue = JobQueue(selective=True)
    got: dict[str, Job | None] = {}
    waiters = {kind: threading.Thread(target=lambda kind=kind: got.__setitem__(
        kind, queue.get(timeout=30, accept=lambda job, kind=kind: job.rel == kind)))
        for kind in ("proxy", "composite")}
    for waiter in waiters.values():
        waiter.start()
        waiter.join(0.2)  # asleep in get, the proxy's worker first
    # The first waiter woken alone would refuse this one and sleep again, behind the other.
    queue.put(Job(0, "composite"))
    waiters["composite"].join(0.2)
    queue.put(Job(0, "proxy"))
    for waiter in waiters.values():
        waiter.join(2)  # long before their timeout: woken by the put of their own job
    assert {kind: job.rel for kind, job in got.items() if job} == {
        "proxy": "proxy", "composite": "composite"}, "each woke for its own job"


def test_requests_wait_while_every_slot_holds_an_answer_and_say_so_once(
        log_lines: LogCapture) -> None:
    slots = RequestSlots(2)
    stop = threading.Event()
    slots.adopt()  # an answer an earlier run left in the spool counts from the start
    assert slots.acquire(stop) and slots.free == 0
    slots.answered()  # the second request's answer arrives: the spool is at its bound
    got: list[bool] = []

    def request() -> None:
        got.append(slots.acquire(stop))

    for _ in range(2):  # two requests wait in one episode: said once
        waiter = threading.Thread(target=request)
        waiter.start()
        waiter.join(0.2)
        assert waiter.is_alive(), "no request while both answers wait to be placed"
        slots.release(answered=True)  # one placed: the waiting request goes
        waiter.join(5)
        slots.answered()  # its answer arrives in turn
    assert got == [True, True]
    assert [e["reason"] for e in log_lines.events("requests.waiting")] == ["spool_full"]
    assert not log_lines.events("requests.resumed")
    slots.release(answered=True)
    slots.release(answered=True)
    assert slots.acquire(stop), "a free slot at once: the episode is over"
    assert len(log_lines.events("requests.resumed")) == 1
    assert len(log_lines.events("requests.waiting")) == 1


def _waits(slots: RequestSlots, stop: threading.Event) -> threading.Thread:
    """A request asking for a slot, still waiting after 0.2 s (asserted)."""
    waiter = threading.Thread(target=slots.acquire, args=(stop,))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive(), "the request waits"
    return waiter


def test_one_host_ends_a_slot_at_its_answer_and_bounds_the_spool_apart(
        log_lines: LogCapture) -> None:
    """Without several hosts an answer in the spool holds no request slot (a restart adopts
    it): the slot sends again at once; the spool's own bound, 2 x size answers with requests
    in flight counted, holds requests back when answers are placed too slowly."""
    slots = RequestSlots(2, hold_answers=False)
    stop = threading.Event()
    assert slots.acquire(stop) and slots.acquire(stop)
    waiter = _waits(slots, stop)  # two requests in flight: the limit of requests
    slots.answered()  # an answer journaled: its slot is free, the waiting request goes
    waiter.join(5)
    assert not waiter.is_alive()
    assert not log_lines.events("requests.waiting"), "waiting for a slot is not the spool"
    slots.answered()
    assert slots.acquire(stop)
    # In the spool 2 answers, 2 requests in flight: at the bound (4), though a slot is free
    # once one is answered.
    slots.answered()
    waiter = _waits(slots, stop)
    assert [e["reason"] for e in log_lines.events("requests.waiting")] == ["spool_full"]
    slots.release(answered=True)  # one placed: the request goes
    waiter.join(5)
    assert not waiter.is_alive()
    slots.release()  # a request that ended without an answer (a retry later)
    slots.answered()
    assert slots.free == 1, "3 answers in the spool: room for one more request, not two"
    slots.release(answered=True)
    assert slots.free == 2 and slots.acquire(stop)
    assert len(log_lines.events("requests.resumed")) == 1


def test_one_host_counts_answers_a_previous_run_left_against_the_spool() -> None:
    slots = RequestSlots(1, hold_answers=False)
    stop = threading.Event()
    for _ in range(2):
        slots.adopt()
    assert slots.free == 0, "the spool holds 2 answers, its bound"
    waiter = _waits(slots, stop)
    slots.release(answered=True)
    waiter.join(5)
    assert not waiter.is_alive()
