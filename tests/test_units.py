"""The pure parts, driven by an injected clock: no sleeping, no threads."""

from __future__ import annotations

import email.utils
import threading
import time
from pathlib import Path

import pytest
import structlog

from tests.conftest import Studio, wait_for
from watchfolder.config.settings import Secret
from watchfolder.coordination.ratelimit import RateLimiter
from watchfolder.errors import (
    CreditsExhausted,
    EndpointMissing,
    FileRejected,
    FormatNotAcceptable,
    KeyMissing,
    KeyRefused,
    RateLimited,
    ServerError,
)
from watchfolder.files.place import candidates
from watchfolder.files.spares import EMPTY_ABOVE, Spares
from watchfolder.intake.loop import Intake
from watchfolder.intake.settle import SettleTracker, is_ignored
from watchfolder.journal.db import Journal
from watchfolder.pipeline.client import error_for, parse_retry_after
from watchfolder.pipeline.jobqueue import Job


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_limiter_never_exceeds_the_limit_in_any_window() -> None:
    clock = Clock()
    limiter = RateLimiter(5, window=60.0, margin=0.5, clock=clock)
    sent = []
    for _ in range(400):  # drive a backlog: take slots as soon as they are offered
        wait = limiter.try_acquire()
        if wait == 0.0:
            sent.append(clock.now)
        else:
            clock.now += wait
    assert len(sent) >= 30
    for i, t in enumerate(sent):
        assert sum(1 for u in sent[i:] if u < t + 60.0) <= 5
    # ...and it is not slower than it must be: 5 per 60.5 s in the steady state
    assert sent[-1] - sent[0] <= (len(sent) / 5) * 60.5


def test_limiter_counts_sends_from_before_a_restart() -> None:
    clock = Clock()
    limiter = RateLimiter(3, clock=clock)
    limiter.preload([10.0, 20.0, 30.0])  # three sends 10-30 s ago
    wait = limiter.try_acquire()
    assert wait == pytest.approx(60.5 - 30.0)


def test_limiter_429_holds_everyone_and_backs_off_without_retry_after() -> None:
    clock = Clock()
    limiter = RateLimiter(100, backoff=2.0, max_backoff=10.0, clock=clock)
    assert limiter.rate_limited(7.0) == 7.0
    assert limiter.try_acquire() == pytest.approx(7.0)
    assert [limiter.rate_limited(None) for _ in range(5)] == [2.0, 4.0, 8.0, 10.0, 10.0]
    limiter.succeeded()
    assert limiter.rate_limited(None) == 2.0


def test_limiter_acquire_returns_false_when_stopped() -> None:
    limiter = RateLimiter(1)
    stop = threading.Event()
    assert limiter.acquire(stop) is True
    stop.set()
    assert limiter.acquire(stop) is False


def test_settle_needs_two_equal_looks_settle_seconds_apart() -> None:
    clock = Clock()
    tracker = SettleTracker(clock)
    sizes = {"a": (10, 1)}
    tracker.watch("a", sizes["a"], 2.0)
    clock.now += 1.0
    assert tracker.check_due(sizes.get) == ([], [])
    clock.now += 1.0
    sizes["a"] = (20, 2)  # still growing at the first look
    assert tracker.check_due(sizes.get) == ([], [])
    assert tracker.next_due() == pytest.approx(clock.now + 2.0)
    clock.now += 2.0
    assert tracker.check_due(sizes.get) == (["a"], [])
    assert len(tracker) == 0


def test_settle_drops_files_that_vanish() -> None:
    clock = Clock()
    tracker = SettleTracker(clock)
    tracker.watch("gone", (1, 1), 0.5)
    clock.now += 1
    assert tracker.check_due(lambda key: None) == ([], ["gone"])
    assert tracker.next_due() is None


def test_settle_forget_then_watch_again_uses_the_new_deadline() -> None:
    clock = Clock()
    tracker = SettleTracker(clock)
    tracker.watch("a", (1, 1), 5.0)
    tracker.forget("a")
    clock.now += 1
    tracker.watch("a", (1, 1), 5.0)
    clock.now += 4.5  # the old deadline passed, the new one not
    assert tracker.check_due(lambda key: (1, 1)) == ([], [])
    clock.now += 0.5
    assert tracker.check_due(lambda key: (1, 1)) == (["a"], [])


@pytest.mark.parametrize(("name", "ignored"), [
    ("photo.jpg", False), ("PHOTO.JPG", False), ("my shot.png", False),
    (".DS_Store", True), (".hidden.png", True), ("x.jpg.part", True), ("x.JPG.PART", True),
    ("x.crdownload", True), ("x.tmp", True), ("~$draft.png", True), ("backup.png~", True),
    ("Thumbs.db", True), ("x.partial", True),
])
def test_ignored_names(name: str, ignored: bool) -> None:
    assert is_ignored(name) is ignored


def test_candidates_follow_the_collision_rule(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_text("")
    (tmp_path / "x-1.png").write_text("")
    (tmp_path / "x-2.png.error.json").write_text("")
    names = candidates(tmp_path / "x.png", also_free=("", ".error.json"))
    assert next(names).name == "x-3.png"


def test_retry_after_forms() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("5", now=now) == 5.0
    assert parse_retry_after(" 2.5 ", now=now) == 2.5
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after(date, now=now) == pytest.approx(30, abs=1)
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None


@pytest.mark.parametrize(("status", "kind"), [
    (400, FileRejected), (401, KeyMissing), (402, CreditsExhausted), (403, KeyRefused),
    (404, EndpointMissing), (406, FormatNotAcceptable), (413, FileRejected), (429, RateLimited),
    (500, ServerError), (503, ServerError), (408, ServerError),
])
def test_every_status_maps_to_its_policy(status: int, kind: type) -> None:
    error = error_for(status, "message", "3")
    assert type(error) is kind
    assert error.status == status


def test_secret_never_prints_itself() -> None:
    secret = Secret("sk-very-secret")
    assert "very" not in repr(secret) and "very" not in str(secret)
    assert "very" not in f"{secret} {[secret]} {({'k': secret})}"
    assert secret.reveal() == "sk-very-secret"


def test_logs_scrub_the_key_but_not_every_letter_of_a_toy_key() -> None:
    import io

    from watchfolder import logs

    stream = io.StringIO()
    logs.configure("json", "info", stream=stream)
    logs.add_secret("sk-live-0123456789abcdef")
    logs.add_secret("k")
    structlog.get_logger("t").info("probe", url="https://clipdrop-api.co/x",
                                   oops="header sk-live-0123456789abcdef leaked")
    line = stream.getvalue()
    assert "sk-live-0123456789abcdef" not in line and "header *** leaked" in line
    assert "https://clipdrop-api.co/x" in line, "a one-letter key must not blank every k"
    logs.configure("json", "warning")



def test_finished_files_do_not_wake_the_intake_and_each_is_looked_at_again(
        tmp_path: Path) -> None:
    """A worker releasing a finished file sends the intake no message (a wake-up from the
    worker's thread, per file, was the workers' largest line in a GIL profile): the intake
    takes the released files in batches while files are in the pipeline, and each path is
    still looked at again: a file dropped under a finished one's name is taken, one kept in
    place is not sent again, and the intake sees the pipeline empty."""
    studio = Studio(tmp_path, "http://127.0.0.1:9")
    config = studio.config()
    inbox = config.inboxes[0].path
    journal = Journal(tmp_path / "state")
    taken: list[Job] = []
    idle = threading.Event()
    intake = Intake(config, journal, taken.append, on_idle=idle.set)
    jobs = [Job(0, f"{n}.png") for n in range(100)]
    for job in jobs:
        (inbox / job.rel).write_bytes(b"x")
        intake.adopt(job)
    taken.clear()
    for job in jobs[:50]:  # archived: gone from the inbox
        (inbox / job.rel).unlink()
    for job in jobs:
        kept = None
        if job.rel == "60.png":  # finished in place: the same file is not taken again
            st = (inbox / job.rel).stat()
            kept = (st.st_size, st.st_mtime_ns)
        intake.release(job, kept)
    assert intake.messages.qsize() == 0, "a message per released file"
    (inbox / "7.png").write_bytes(b"new")  # dropped again under a finished file's name
    expected = {f"{n}.png" for n in range(50, 100)} - {"60.png"} | {"7.png"}
    intake.start(None)
    try:
        wait_for(lambda: {job.rel for job in taken} >= expected, what="the files taken again")
        assert not idle.is_set(), "files in the pipeline: not idle"
        for job in list(taken):  # archived this time
            (inbox / job.rel).unlink()
            intake.release(job, None)
        (inbox / "60.png").unlink()
        assert intake.pending == 0, "a released file stops counting at once"
        assert idle.wait(5), "the intake saw the pipeline empty"
    finally:
        intake.stop()
        journal.close()
    assert sorted(job.rel for job in taken) == sorted(expected)
    assert intake.pending == 0


def test_the_intake_looks_for_releases_less_often_while_none_come(tmp_path: Path) -> None:
    """Files parked for hours (a review, a pause, tomorrow's budget) do not keep the intake
    waking ten times a second: while no file comes back it looks less and less often, down to
    once every PROBE_SECONDS, and a release is still taken."""
    studio = Studio(tmp_path, "http://127.0.0.1:9")
    config = studio.config()
    journal = Journal(tmp_path / "state")
    idle = threading.Event()
    intake = Intake(config, journal, lambda job: None, on_idle=idle.set)
    job = Job(0, "parked.png")
    (config.inboxes[0].path / job.rel).write_bytes(b"x")
    intake.adopt(job)
    intake.start(None)
    try:
        assert intake._thread is not None and intake._thread.native_id is not None
        status = Path(f"/proc/self/task/{intake._thread.native_id}/status")

        def wake_ups() -> int:
            return int(next(line.split()[1] for line in status.read_text().splitlines()
                            if line.startswith("voluntary_ctxt_switches:")))
        before = wake_ups()
        time.sleep(3.0)
        # At RELEASE_SECONDS throughout: 30; backing off: 0.1, 0.2, 0.4, 0.8, then 1 s.
        assert wake_ups() - before <= 10, wake_ups() - before
        (config.inboxes[0].path / job.rel).unlink()  # archived
        idle.clear()
        intake.release(job, None)
        assert idle.wait(3), "the release taken"
    finally:
        intake.stop()
        journal.close()


def test_spares_keep_inodes_bounded_and_empty_large_ones(tmp_path: Path) -> None:
    spares = Spares(tmp_path, keep=2)
    small, large = tmp_path / "1.png", tmp_path / "2.png"
    small.write_bytes(b"s" * 100)
    large.write_bytes(b"l" * (EMPTY_ABOVE + 1))
    inodes = {small.stat().st_ino, large.stat().st_ino}
    assert spares.keep(small) and spares.keep(large)
    third = tmp_path / "3.png"
    third.write_bytes(b"t")
    assert not spares.keep(third), "more spares than asked for"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".spare.0", ".spare.1", "3.png"]
    fourth = tmp_path / "4.png"
    fourth.write_bytes(b"f")
    spares.let_go(fourth)
    assert not fourth.exists(), "let go with no room for a spare: removed"
    assert (tmp_path / ".spare.1").stat().st_size == 0, "a large spare holds its bytes"
    dest = tmp_path / ".9.part"
    spares.take(dest)
    assert dest.stat().st_ino in inodes
    (tmp_path / ".spare.0").unlink()  # removed meanwhile (a spare is nobody's data)
    spares.take(tmp_path / ".10.part")
    assert not (tmp_path / ".10.part").exists()
    spares.drop()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".9.part", "3.png"]
