"""One folder must never stop the daemon: filesystem errors during a scan are per path.

The deep trees are real: folders nested past PATH_MAX, made one level at a time relative to
the previous level's descriptor (a path to them cannot even be spelled).
"""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

from tests.conftest import LogCapture, Running, Studio, make_image, wait_for
from watchfolder import logs
from watchfolder.dev.sandbox import Sandbox
from watchfolder.intake.watcher import ScanErrors, Watcher, scan

PATH_MAX = os.pathconf("/", "PC_PATH_MAX")


def make_deep_tree(top: Path, levels: int = 25, name: str = "d" * 200) -> None:
    """`top/name/name/...` past PATH_MAX, with a file at the bottom."""
    top.mkdir(parents=True, exist_ok=True)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir(name, dir_fd=fd)
            inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        leaf = os.open("lost.png", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.close(leaf)
    finally:
        os.close(fd)
    assert len(str(top)) + levels * (len(name) + 1) > PATH_MAX


def test_a_folder_deeper_than_path_max_is_reported_once_and_the_scan_goes_on(
        tmp_path: Path, log_lines: LogCapture) -> None:
    root = tmp_path / "inbox"
    make_deep_tree(root / "a-deep")
    make_deep_tree(root / "z-deep")
    for rel in ("top.png", "m/mid.png", "zz/last.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    errors = ScanErrors()
    for _ in range(3):  # rescans say nothing new
        found = sorted(p.relative_to(root).as_posix() for p in scan(root, recursive=True,
                                                                   errors=errors))
        assert found == ["m/mid.png", "top.png", "zz/last.png"]
    reported = log_lines.events("scan.error")
    assert len(reported) == 2, reported
    for event in reported:
        assert event["errno"] == errno.ENAMETOOLONG and event["code"] == "ENAMETOOLONG"
        assert event["during"] == "scandir" and event["level"] == "warning"
        assert len(event["path"]) > PATH_MAX - 200
        assert event["path"].startswith(str(root))
    assert {Path(e["path"]).relative_to(root).parts[0] for e in reported} == {"a-deep", "z-deep"}


def test_scan_errors_are_said_once_per_path_until_it_works_again(
        tmp_path: Path, log_lines: LogCapture) -> None:
    errors = ScanErrors(limit=2)
    stale = OSError(errno.ESTALE, "Stale file handle")
    errors.report(tmp_path / "share", stale, "scandir")
    errors.report(tmp_path / "share", stale, "scandir")
    errors.report(tmp_path / "share", OSError(errno.EIO, "Input/output error"), "scandir")
    errors.cleared(tmp_path / "share")
    errors.report(tmp_path / "share", stale, "scandir")
    said = [(e["event"], e.get("code")) for e in log_lines.events()
            if e["event"].startswith("scan.")]
    assert said == [("scan.error", "ESTALE"), ("scan.error", "EIO"), ("scan.recovered", None),
                    ("scan.error", "ESTALE")]
    # Beyond its limit the reporter remembers nothing more, so it repeats rather than grows.
    errors.report(tmp_path / "b", stale, "lstat")
    errors.report(tmp_path / "c", stale, "lstat")
    errors.report(tmp_path / "c", stale, "lstat")
    assert [e["path"] for e in log_lines.events("scan.error")][-3:] == [
        str(tmp_path / "b"), str(tmp_path / "c"), str(tmp_path / "c")]


def test_the_daemon_starts_and_works_beside_a_folder_deeper_than_path_max(
        studio: Studio, sandbox: Sandbox, log_lines: LogCapture) -> None:
    # The start-up scan ran on the main thread and raised out of Daemon.start(): the service
    # never started until someone removed the folder; later rescans killed the intake thread.
    make_deep_tree(studio.inbox / "export")
    make_image(studio.inbox / "before.png", seed=1)
    make_image(studio.inbox / "nested" / "before.png", seed=2)
    with Running(studio.config()) as daemon:
        wait_for(lambda: len(studio.files(studio.archive)) == 2, what="the start-up files")
        # Not something that happens, but something that must not: the intake rescans the
        # deep folder every 0.5 s (rescan_seconds in the studio); give it a few rescans.
        time.sleep(2.0)
        assert daemon.intake is not None and daemon.intake.alive()
        assert not daemon.problems()
        make_image(studio.inbox / "after.png", seed=3)
        wait_for(lambda: len(studio.files(studio.archive)) == 3, what="a file dropped later")
    assert studio.files(studio.archive) == ["after.png", "before.png", "nested/before.png"]
    assert len(log_lines.events("scan.error")) == 1, "once, not at every rescan"


INOTIFY_QUEUE = Path("/proc/sys/fs/inotify/max_queued_events")


def test_an_inotify_overflow_asks_for_a_rescan_whatever_the_log_level(
        tmp_path: Path, log_lines: LogCapture) -> None:
    """The kernel drops events when its inotify queue is full; watchdog tells the handler
    (EventsLostEvent) and the watcher asks for a rescan, recursive inbox or not, and with
    `log.level: error` too (watchdog's own warning is then not even logged). The queue is
    made one event long while the watch is set up (the limit is taken when the inotify
    instance is made; lowering it needs root), then restored at once: watchdog's reader
    drains the kernel's queue on a thread of its own, and at 16 events it kept up with the
    writes in 3 runs of 10 on a quiet machine."""
    logs.configure("json", "error", stream=log_lines)
    studio = Studio(tmp_path, "http://127.0.0.1:9", inbox={"recursive": False})
    inbox = studio.config().inboxes[0]
    seen: list[Path] = []
    overflows = threading.Event()
    watcher = Watcher((inbox,), lambda _index, path, _moved: seen.append(path), overflows.set)
    assert os.access(INOTIFY_QUEUE, os.W_OK), "this test lowers max_queued_events: run as root"
    original = INOTIFY_QUEUE.read_text().strip()
    INOTIFY_QUEUE.write_text("1")
    try:
        watcher.start()
    finally:
        INOTIFY_QUEUE.write_text(original)
    try:
        for n in range(400):
            (inbox.path / f"f{n}.png").write_bytes(b"x")
        assert overflows.wait(10), "no rescan was asked for after the queue overflowed"
    finally:
        watcher.stop()


def test_writes_and_the_claims_folder_wake_the_intake_only_for_what_it_uses(
        tmp_path: Path) -> None:
    """A file written in place in 200 writes is handed over when it is created and when its
    writer closes it, not once per write; churn in a hidden folder (the claims folder, where
    the daemon writes a claim, its link and its clock file for every file it sends) is not
    handed over at all, though the watch is recursive."""
    studio = Studio(tmp_path, "http://127.0.0.1:9")
    inbox = studio.config().inboxes[0]
    seen: list[Path] = []
    watcher = Watcher((inbox,), lambda _index, path, _moved: seen.append(path), lambda: None)
    claims = inbox.path / ".watchfolder-claims"
    claims.mkdir()
    watcher.start()
    try:
        with (inbox.path / "big.png").open("wb", buffering=0) as handle:
            for _ in range(200):
                handle.write(b"x" * 1024)
        for n in range(50):
            (claims / f".new.{n}").write_bytes(b"{}")
            os.link(claims / f".new.{n}", claims / f"{n}.claim")
            (claims / f".new.{n}").unlink()
        (inbox.path / "last.png").write_bytes(b"x")
        wait_for(lambda: inbox.path / "last.png" in seen, what="the last file's events")
        time.sleep(0.2)  # anything still on its way from the claims folder
    finally:
        watcher.stop()
    assert [p for p in seen if p.parent != inbox.path] == [], "claims folder handed over"
    big = [p for p in seen if p.name == "big.png"]
    assert 1 <= len(big) <= 3, f"big.png handed over {len(big)} times for 200 writes"


def _watched_inodes() -> set[int]:
    """The inodes this process's inotify instances watch (the kernel's own list)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:inotify":
                continue
            info = Path(f"/proc/self/fdinfo/{fd}").read_text()
        except OSError:
            continue  # closed meanwhile
        for line in info.splitlines():
            if line.startswith("inotify"):
                fields = dict(part.split(":", 1) for part in line.split()[1:])
                found.add(int(fields["ino"], 16))
    return found


def test_hidden_folders_are_not_watched_until_renamed_into_place(tmp_path: Path) -> None:
    """No kernel watch is put on a hidden or temporary folder below the inbox (the claims
    folder takes a claim, its link and the clock file per file processed: each an event for
    watchdog's threads to build and drop); an ordinary folder is watched, and a hidden one
    renamed to an ordinary name is watched from then on, its new files handed over."""
    studio = Studio(tmp_path, "http://127.0.0.1:9")
    inbox = studio.config().inboxes[0]
    seen: list[Path] = []
    claims, upload = inbox.path / ".watchfolder-claims", inbox.path / "shoot.partial"
    sub = inbox.path / "sub"
    for folder in (claims, upload, sub, sub / ".cache"):
        folder.mkdir()
    before = _watched_inodes()
    watcher = Watcher((inbox,), lambda _index, path, _moved: seen.append(path), lambda: None)
    watcher.start()
    try:
        watched = _watched_inodes() - before
        inode = {folder: folder.stat().st_ino
                 for folder in (inbox.path, claims, upload, sub, sub / ".cache")}
        assert inode[inbox.path] in watched and inode[sub] in watched
        assert inode[claims] not in watched, "the claims folder has a kernel watch"
        assert inode[upload] not in watched and inode[sub / ".cache"] not in watched
        upload.rename(inbox.path / "shoot")
        wait_for(lambda: inode[upload] in _watched_inodes(), what="the renamed folder's watch")
        (inbox.path / "shoot" / "a.png").write_bytes(b"x")
        wait_for(lambda: inbox.path / "shoot" / "a.png" in seen, what="a file in it")
    finally:
        watcher.stop()
