"""Operating-system faults (issue 19): a share that vanishes and returns, an inbox whose
permissions are taken away for a while, inbox files that cannot be read, a full state disk.
Real loop mounts and tmpfs, real modes, real errnos (an LD_PRELOAD shim), the real daemon in a
subprocess against the sandbox; see tests/faults.py."""

from __future__ import annotations

import hashlib
import io
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import structlog.testing
from PIL import Image

from tests.conftest import KEY, Studio, make_image, run_watchfolder, wait_for
from tests.faults import (
    DaemonProcess,
    LoopMount,
    Tmpfs,
    eio_shim,
    fill,
    loop_mount,
    tmpfs,
    wal_flushes_fail,
    without_dac_override,
)
from watchfolder.dev.sandbox import Sandbox
from watchfolder.errors import StateUnavailable
from watchfolder.journal.db import DONE, QUEUED, SENDING, Journal
from watchfolder.pipeline.state import PROBE_SECONDS, StateGuard

__all__ = ["loop_mount", "tmpfs"]  # the fixtures, used by name

FILES = 12


def _with_exif(path: Path) -> Path:
    """The image again, with an EXIF camera make (metadata a result carries)."""
    with Image.open(path) as image:
        exif = Image.Exif()
        exif[0x010F] = "watchfolder test camera"
        data = io.BytesIO()
        image.save(data, "JPEG", quality=95, exif=exif.tobytes())
    path.write_bytes(data.getvalue())
    return path


def _no_twins(studio: Studio, names: list[str]) -> None:
    """Each original archived once, each with exactly one result: no `-1` copies."""
    assert studio.files(studio.inbox) == []
    assert studio.files(studio.archive) == sorted(names)
    assert studio.files(studio.outbox) == sorted(str(Path(n).with_suffix(".png")) for n in names)


def test_a_share_that_vanishes_and_returns_is_watched_again_and_nothing_is_sent_twice(
        tmp_path: Path, sandbox: Sandbox, loop_mount: Callable[..., LoopMount]) -> None:
    share = loop_mount(tmp_path / "inbox")
    sandbox.latency = 0.4  # a batch spans seconds: the share drops with answers in flight
    studio = Studio(tmp_path, sandbox.url, api={"concurrency": 2}, rescan_seconds=60,
                    inbox={"settle_seconds": 0.2})
    names = [f"img {n:02d}.png" for n in range(FILES)]
    digests = {}
    for n, name in enumerate(names):
        digests[name] = hashlib.sha256(make_image(studio.inbox / name, seed=n).read_bytes())
    daemon = DaemonProcess(studio.write_config())
    try:
        daemon.wait_event("ready")
        daemon.wait_event("file.done", 3)
        share.vanish()
        time.sleep(2.0)  # longer than the answers in flight: they arrive while it is away
        share.come_back()
        wait_for(lambda: len(studio.files(studio.archive)) == FILES, timeout=30,
                 what="every original archived")
        # The watch is back on the share as it is now: a new file goes at ~settle time, not at
        # the next rescan (a minute away).
        dropped = time.monotonic()
        make_image(studio.inbox / "late.png", seed=99)
        wait_for(lambda: (studio.archive / "late.png").exists(), timeout=10,
                 what="the new file archived")
        took = time.monotonic() - dropped
        assert took < 5.0, took
        # Gone and back between two looks: the same device and inode, but another mount,
        # and the old watches died with the old one.
        share.vanish()
        share.come_back()
        daemon.wait_event("inbox.remounted", timeout=5)
        dropped = time.monotonic()
        make_image(studio.inbox / "later.png", seed=98)
        wait_for(lambda: (studio.archive / "later.png").exists(), timeout=10,
                 what="the file after a quick remount archived")
        took = time.monotonic() - dropped
        assert took < 5.0, took
    finally:
        code = daemon.stop()
    assert code == 0
    assert daemon.raw == [], "".join(daemon.raw)  # no traceback, nothing printed raw
    assert daemon.events("file.internal_error") == []
    assert daemon.events("claim.taken_over") == []
    assert daemon.events("claim.lost") == []
    _no_twins(studio, [*names, "late.png", "later.png"])
    for name, digest in digests.items():
        assert hashlib.sha256((studio.archive / name).read_bytes()).hexdigest() == \
            digest.hexdigest()
    assert sandbox.count(200) == FILES + 2  # nothing paid twice


def _stopped(pid: int) -> bool:
    """Whether process `pid` is stopped (SIGSTOP)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] == "T"


def test_a_share_that_drops_while_an_original_is_archived_keeps_no_copy_of_it(
        tmp_path: Path, sandbox: Sandbox, loop_mount: Callable[..., LoopMount]) -> None:
    # The original is copied to the archive (another file system), then the share drops
    # before it is unlinked: its path names the bare mount point now. Unlinked by that path,
    # it stayed on the share and was sent again (an "-1" twin) when the share came back (a
    # flake of the test above).
    share = loop_mount(tmp_path / "inbox")
    studio = Studio(tmp_path, sandbox.url, inbox={"settle_seconds": 0.1})
    make_image(studio.inbox / "img.png")
    daemon = DaemonProcess(studio.write_config(),
                           env={"WATCHFOLDER_FAILPOINT": "moved-linked:1:stop"})
    try:
        wait_for(lambda: _stopped(daemon.proc.pid), timeout=30,
                 what="the daemon stopped with the original in the archive and the inbox")
        assert studio.files(studio.inbox) == studio.files(studio.archive) == ["img.png"]
        share.vanish()
        assert studio.files(studio.inbox) == [], "the bare mount point"
        daemon.proc.send_signal(signal.SIGCONT)
        daemon.wait_event("file.done")
        share.come_back()
        assert studio.files(studio.inbox) == [], "the original left the share"
    finally:
        code = daemon.stop()
    assert code == 0
    assert studio.files(studio.archive) == ["img.png"]
    assert studio.files(studio.outbox) == ["img.png"]
    assert sandbox.count(200) == 1


def test_an_inbox_made_unreadable_for_a_while_is_a_pause_of_that_inbox(
        tmp_path: Path, sandbox: Sandbox) -> None:
    sandbox.latency = 0.3
    studio = Studio(tmp_path, sandbox.url, api={"concurrency": 2}, rescan_seconds=0.5,
                    inbox={"settle_seconds": 0.2})
    names = [f"img {n:02d}.png" for n in range(FILES)]
    for n, name in enumerate(names):
        make_image(studio.inbox / name, seed=n)
    # Root reads a mode-000 folder anyway: the daemon runs without the capabilities that allow
    # it, as a service user would.
    daemon = DaemonProcess(studio.write_config(), prefix=without_dac_override())
    try:
        daemon.wait_event("ready")
        daemon.wait_event("file.done", 3)
        studio.inbox.chmod(0o000)
        daemon.wait_event("inbox.unreadable", timeout=10)
        time.sleep(3.0)
        studio.inbox.chmod(0o755)
        daemon.wait_event("inbox.back", timeout=10)
        wait_for(lambda: len(studio.files(studio.archive)) == FILES, timeout=30,
                 what="every original archived")
    finally:
        code = daemon.stop()
    assert code == 0
    assert daemon.raw == [], "".join(daemon.raw)
    assert len(daemon.events("inbox.unreadable")) == 1
    assert daemon.events("file.internal_error") == []
    assert daemon.events("claim.taken_over") == []
    assert daemon.events("claim.lost") == []
    assert studio.files(studio.errors) == []
    _no_twins(studio, names)
    assert sandbox.count(200) == FILES


def test_a_claims_folder_that_cannot_be_made_is_said_once_and_the_files_wait(
        tmp_path: Path, sandbox: Sandbox) -> None:
    # Each file is claimed in <inbox>/.watchfolder-claims before anything is done with it.
    # A file in its place (or a read-only share) made every file wait in silence, for ever.
    studio = Studio(tmp_path, sandbox.url, retry={"pause_seconds": 0.3})
    blocker = studio.inbox / ".watchfolder-claims"
    blocker.write_bytes(b"not a folder")
    for n in range(3):
        make_image(studio.inbox / f"w{n}.png", seed=n)
    daemon = DaemonProcess(studio.write_config())
    try:
        daemon.wait_event("claims.unavailable", timeout=10)
        time.sleep(6.0)  # the files look again every 5 s: not said again
        assert sandbox.count() == 0
        assert sorted(studio.files(studio.inbox)) == ["w0.png", "w1.png", "w2.png"]
        blocker.unlink()
        daemon.wait_event("claims.recovered", timeout=10)
        wait_for(lambda: len(studio.files(studio.archive)) == 3, timeout=15,
                 what="every original archived once the folder can be made")
    finally:
        code = daemon.stop()
    assert code == 0
    said = daemon.events("claims.unavailable")
    assert len(said) == 1, said
    assert str(blocker) in said[0]["message"] and str(blocker) in said[0]["hint"]
    assert len(daemon.events("claims.recovered")) == 1
    assert sandbox.count(200) == 3


def test_an_inbox_file_that_cannot_be_read_is_retried_then_fails_as_unreadable(
        tmp_path: Path, sandbox: Sandbox) -> None:
    # Three files on a bad sector for good (every open or read below bad/ fails with EIO).
    studio = Studio(tmp_path, sandbox.url, inbox={"recursive": True})
    good = [f"img {n}.png" for n in range(4)]
    bad = [f"bad/img {n}.png" for n in range(3)]
    for n, name in enumerate([*good, *bad]):
        make_image(studio.inbox / name, seed=n)
    shim = eio_shim(tmp_path)
    daemon = DaemonProcess(studio.write_config(), once=True, env={
        "LD_PRELOAD": str(shim), "WATCHFOLDER_FAULT_BELOW": str(studio.inbox / "bad")})
    code = daemon.stop(timeout=60) if daemon.proc.wait(timeout=60) is not None else None
    assert code == 1, "".join(daemon.raw)  # some files failed
    assert daemon.raw == [], "".join(daemon.raw)
    assert studio.files(studio.archive) == sorted(good)
    assert studio.files(studio.errors) == sorted(
        [*bad, *(f"{name}.error.json" for name in bad)])
    for name in bad:
        reason = studio.reason(name)
        assert reason["reason"] == "unreadable", reason
        assert reason["attempts"] == 3, reason  # retry.max_attempts
    unreadable = daemon.events("source.unreadable")
    assert len(unreadable) >= 3 * 2 and {e["errno"] for e in unreadable} == {5}
    for wrong in ("file.changed", "destination.unavailable", "file.internal_error"):
        assert daemon.events(wrong) == [], wrong
    assert sandbox.count(200) == len(good)  # nothing was sent for an unreadable file
    assert sandbox.count() == len(good)


def test_a_start_on_a_full_state_dir_exits_2_naming_it(
        tmp_path: Path, sandbox: Sandbox, tmpfs: Callable[[Path, int], Tmpfs]) -> None:
    state = tmp_path / "state"
    tmpfs(state, 2048)
    studio = Studio(tmp_path, sandbox.url)
    make_image(studio.inbox / "a.png")
    config = studio.write_config()
    filler = fill(state)
    refused = run_watchfolder("run", "--config", str(config), "--once")
    assert refused.returncode == 2, refused.stderr
    assert "Traceback" not in refused.stderr
    assert str(state) in refused.stderr and "full" in refused.stderr, refused.stderr
    assert "free" in refused.stderr  # how much it needs
    assert sandbox.count() == 0
    assert studio.files(studio.inbox) == ["a.png"]
    filler.unlink()  # space freed: the next start (systemd's restart) carries on
    done = run_watchfolder("run", "--config", str(config), "--once")
    assert done.returncode == 0, done.stderr
    assert studio.files(studio.archive) == ["a.png"]


def test_a_journal_write_on_a_full_disk_changes_nothing_and_says_so(
        tmp_path: Path, tmpfs: Callable[[Path, int], Tmpfs]) -> None:
    state = tmp_path / "state"
    tmpfs(state, 1024)
    journal = Journal(state)
    record = journal.create("/inbox", "a.png", 1, 1, "s")
    filler = fill(state)
    big = "x" * 200_000  # more than any slack the WAL file keeps
    with pytest.raises(StateUnavailable) as raised:
        for _ in range(20):
            journal.update(record, state=SENDING, sent=True, message=big)
            journal.update(record, state=QUEUED, message=None)
    assert "cannot rollback" not in str(raised.value)
    assert str(state) in str(raised.value)
    seen = record.state
    with pytest.raises(StateUnavailable):
        journal.notes.set("paused", big)
    assert record.state == seen and record.message in (big, None)  # memory follows the disk
    filler.unlink()  # space again: the same journal goes on
    journal.update(record, state=DONE, message=None)
    journal.notes.set("paused", None)
    journal.close()
    again = Journal(state)
    assert [r.state for r in again.unfinished()] == []
    assert len(again.recent_send_ages(3600.0)) == again.sends_since(0)  # readable, whole
    again.close()


def test_a_journal_write_that_works_on_a_still_full_disk_is_not_a_recovery(
        tmp_path: Path, tmpfs: Callable[[Path, int], Tmpfs]) -> None:
    # A placed result's spool file, deleted, frees a few kilobytes on a full state_dir: the
    # journal's next write then works although the room for an answer is not there. Said as
    # a recovery, the next answer's refusal would be a second outage (a flake of the test
    # below, under load).
    state = tmp_path / "state"
    tmpfs(state, 2048)
    answer = state / "answer.png"
    answer.write_bytes(b"\0" * 65536)
    filler = fill(state)
    now = [0.0]
    probes: list[float] = []
    guard = StateGuard(state, probe=lambda: probes.append(now[0]), clock=lambda: now[0])
    guard.failed(StateUnavailable("disk full"))
    answer.unlink()
    with structlog.testing.capture_logs() as logged:
        now[0] += PROBE_SECONDS
        assert not guard.ready()
        assert guard.down is not None, "64 KB free is not the room an answer needs"
        filler.unlink()
        now[0] += PROBE_SECONDS
        assert guard.ready()
    assert guard.down is None and probes == [2 * PROBE_SECONDS]
    assert [entry["event"] for entry in logged] == ["state.recovered"]


def test_a_disk_that_refuses_flushes_is_one_outage_and_nothing_is_sent_meanwhile(
        tmp_path: Path, sandbox: Sandbox) -> None:
    """A disk that takes the journal's writes but refuses to flush them (a real EIO on the
    WAL's fdatasync alone, from the shim) loses what a `sending` promises: nothing is sent
    while it lasts, and it is one outage, said once, however many commits still work (each
    was once said as a recovery, and the next flush as a new outage: one pair a second)."""
    sandbox.latency = 0.3
    studio = Studio(tmp_path, sandbox.url, api={"concurrency": 2},
                    inbox={"settle_seconds": 0.1})
    names = [f"img {n:02d}.png" for n in range(6)]
    for n, name in enumerate(names):
        make_image(studio.inbox / name, seed=n)
    state = studio.root / "state"
    switch = tmp_path / "flush-fails"
    outage: list[float] = []
    first = threading.Lock()  # two answers can leave at once, on two handler threads

    def refuse_flushes_once(record: object) -> None:  # before the first answer leaves
        with first:
            if not outage:
                switch.touch()
                outage.append(time.monotonic())

    sandbox.on_request = refuse_flushes_once
    daemon = DaemonProcess(studio.write_config(),
                           env=wal_flushes_fail(tmp_path, state, switch))
    try:
        daemon.wait_event("state.unavailable", timeout=30)
        time.sleep(4.0)  # files wait to be sent; the daemon probes every second meanwhile
        outage.append(time.monotonic())  # before: a request after it may follow a flush
        switch.unlink()
        daemon.wait_event("state.recovered", timeout=10)
        wait_for(lambda: len(studio.files(studio.archive)) == len(names), timeout=30,
                 what="every original archived")
    finally:
        code = daemon.stop()
    assert code == 0
    assert daemon.raw == [], "".join(daemon.raw)
    assert len(daemon.events("state.unavailable")) == 1, "one outage, said once"
    assert len(daemon.events("state.recovered")) == 1
    began, ended = outage
    assert not [r for r in sandbox.requests if began < r.time < ended], "sent meanwhile"
    assert sandbox.count(200) == len(names), "each paid once"
    _no_twins(studio, names)


def test_a_flush_refused_when_only_the_main_loop_makes_one_is_said_too(
        tmp_path: Path, sandbox: Sandbox) -> None:
    """An answer waiting for review makes no request after it and nothing of it: only the
    main loop's catch-up flushes its `fetched`. A disk that refuses that flush is the
    state_dir's outage, said (it was dropped in silence), and its end is said by the main
    loop's probe although nothing waits to be sent."""
    studio = Studio(tmp_path, sandbox.url, inbox={"settle_seconds": 0.1, "review": True})
    make_image(studio.inbox / "a.png")
    state = studio.root / "state"
    switch = tmp_path / "flush-fails"
    sandbox.on_request = lambda record: switch.touch()  # before the answer leaves
    daemon = DaemonProcess(studio.write_config(),
                           env=wal_flushes_fail(tmp_path, state, switch))
    try:
        daemon.wait_event("file.review", timeout=30)
        daemon.wait_event("state.unavailable", timeout=15)
        [refused] = daemon.events("state.unavailable")
        assert "Input/output error" in refused["error"]
        switch.unlink()
        daemon.wait_event("state.recovered", timeout=15)
    finally:
        code = daemon.stop()
    assert code == 0
    assert daemon.raw == [], "".join(daemon.raw)
    assert sandbox.count(200) == 1 and studio.files(studio.outbox) == []


def test_a_state_dir_that_fills_mid_batch_is_a_pause_and_nothing_is_paid_twice(
        tmp_path: Path, sandbox: Sandbox, tmpfs: Callable[[Path, int], Tmpfs]) -> None:
    state = tmp_path / "state"
    tmpfs(state, 4096)
    sandbox.latency = 0.3  # answers in flight when the disk fills
    studio = Studio(tmp_path, sandbox.url, api={"concurrency": 2},
                    inbox={"settle_seconds": 0.1})
    names = [f"img {n:02d}.png" for n in range(FILES)]
    for n, name in enumerate(names):
        make_image(studio.inbox / name, seed=n)
    daemon = DaemonProcess(studio.write_config())
    try:
        daemon.wait_event("ready")
        daemon.wait_event("file.done", 3)
        filler = fill(state)
        daemon.wait_event("state.unavailable", timeout=10)
        time.sleep(2.0)
        filler.unlink()
        daemon.wait_event("state.recovered", timeout=10)
        wait_for(lambda: len(studio.files(studio.archive)) == FILES, timeout=30,
                 what="every original archived")
    finally:
        code = daemon.stop()
    assert code == 0
    assert daemon.raw == [], "".join(daemon.raw)  # no traceback
    assert len(daemon.events("state.unavailable")) == 1
    for wrong in ("watchdog.withheld", "file.internal_error", "destination.unavailable"):
        assert daemon.events(wrong) == [], wrong
    assert studio.files(studio.errors) == []
    _no_twins(studio, names)
    assert sandbox.count(200) == FILES  # no credit paid twice


def test_a_degrading_disk_after_upload_never_ends_a_file_twice(
        tmp_path: Path, sandbox: Sandbox) -> None:
    # Once every file is sent, a third of the reads of inbox files fail (EIO): a disk that
    # degrades while the answers are on their way. The originals carry EXIF, so the original
    # is read again after its answer (its metadata goes into the result): a file with none
    # is read only once, before it is sent, and the faults would never be met.
    sandbox.latency = 1.0
    sandbox.credits = 1000  # taken when a request arrives: tells how many were sent
    studio = Studio(tmp_path, sandbox.url, api={"concurrency": FILES},
                    retry={"max_attempts": 4, "backoff_seconds": 0.02,
                           "max_backoff_seconds": 0.1})
    names = [f"img {n:02d}.jpg" for n in range(FILES)]
    for n, name in enumerate(names):
        _with_exif(make_image(studio.inbox / name, fmt="JPEG", seed=n))
    switch = tmp_path / "degraded"
    daemon = DaemonProcess(studio.write_config(), env={
        "LD_PRELOAD": str(eio_shim(tmp_path)), "WATCHFOLDER_FAULT_BELOW": str(studio.inbox),
        "WATCHFOLDER_FAULT_RATE": "0.3", "WATCHFOLDER_FAULT_SWITCH": str(switch)})
    try:
        wait_for(lambda: 1000 - (sandbox.credits_left(KEY) or 0) >= FILES, timeout=30,
                 what="every file sent")
        switch.touch()
        wait_for(lambda: len(studio.files(studio.archive)) == FILES, timeout=60,
                 what="every original archived")
    finally:
        code = daemon.stop()
    assert code == 0
    assert daemon.raw == [], "".join(daemon.raw)
    for wrong in ("file.changed", "destination.unavailable", "file.internal_error",
                  "file.failed"):
        assert daemon.events(wrong) == [], (wrong, daemon.events(wrong)[:2])
    assert daemon.events("source.unreadable")  # the faults did happen
    assert studio.files(studio.errors) == []  # never in errors and done at once
    _no_twins(studio, names)
    assert sandbox.count(200) == FILES  # nothing paid twice
