"""`watchfolder status` and `watchfolder requeue` as admins run them: real subprocesses, real
folders, a daemon running or stopped, the journal read without being changed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from tests.conftest import KEY, Running, Studio, make_image, run_watchfolder, wait_for
from tests.test_service import DaemonProcess
from watchfolder.dev.sandbox import Sandbox
from watchfolder.files.requeue import requeue


def watchfolder(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    # No key anywhere in the environment: status and requeue must not need it.
    return run_watchfolder(*args, cwd=cwd, timeout=30,
                           without=("CLIPDROP_API_KEY", "CREDENTIALS_DIRECTORY"))


def status_json(config: Path) -> dict[str, Any]:
    done = watchfolder("status", "--config", str(config), "--json")
    assert done.returncode == 0, done.stderr
    assert KEY not in done.stdout + done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


# -- status ------------------------------------------------------------------------------------


def test_status_while_running_shows_what_waits_and_why_it_is_paused(
        tmp_path: Path, sandbox: Sandbox) -> None:
    studio = Studio(tmp_path, sandbox.url, retry={"pause_seconds": 60})
    sandbox.keys = ["some-other-key"]  # ours is refused: 403, the queue pauses
    for n in range(3):
        make_image(studio.inbox / f"w{n}.png", seed=n)
    config = studio.write_config()
    with DaemonProcess(config) as daemon:
        daemon.wait_event("account.paused")
        wait_for(lambda: status_json(config)["waiting"] == 3, what="three files waiting")
        report = status_json(config)
        assert report["running"] is True
        assert report["pid"] == daemon.proc.pid
        assert report["paused"].startswith("key_refused: the API key is invalid or revoked")
        assert report["in_flight"] == 0 and report["done_today"] == 0
        assert report["inboxes"][0]["path"] == str(studio.inbox)
        assert report["inboxes"][0]["waiting"] == 3
        shown = watchfolder("status", "--config", str(config))
        assert shown.returncode == 0, shown.stderr
        assert f"watchfolder is running (pid {daemon.proc.pid})" in shown.stdout
        assert "3 waiting, 0 in flight" in shown.stdout
        assert "PAUSED: key_refused" in shown.stdout
        assert KEY not in shown.stdout
        assert daemon.stop() == 0
    after = status_json(config)
    assert after["running"] is False
    assert after["paused"].startswith("key_refused"), "the last pause is remembered"
    shown = watchfolder("status", "--config", str(config))
    assert "PAUSED (when it stopped): key_refused" in shown.stdout


def test_status_when_stopped_reads_the_journal_without_changing_it(
        studio: Studio, sandbox: Sandbox) -> None:
    sandbox.set_credits(None, 50)
    studio.data["api"]["concurrency"] = 1  # answers in order: the last one seen says 48
    make_image(studio.inbox / "sub" / "good.png")
    make_image(studio.inbox / "other.jpg", fmt="JPEG", seed=2)
    (studio.inbox / "broken.png").write_text("not an image")
    config = studio.write_config()
    done = watchfolder("run", "--config", str(config), "--once")
    assert done.returncode == 1, done.stderr
    make_image(studio.inbox / "later.png", seed=3)  # dropped while the daemon is stopped
    state = studio.root / "state"
    before = sorted(p.name for p in state.iterdir())
    report = status_json(config)
    assert sorted(p.name for p in state.iterdir()) == before, "no -wal/-shm left behind"
    assert report["running"] is False and report["pid"] is None
    assert (report["done_today"], report["failed_today"]) == (2, 1)
    assert (report["waiting"], report["in_flight"], report["new"]) == (0, 0, 1)
    assert report["in_errors"] == 1
    assert report["credits"]["remaining"] == 48
    failure = report["recent_failures"][0]
    assert (failure["file"], failure["reason"]) == ("broken.png", "not_an_image")
    assert failure["moved_to"] == str(studio.errors / "broken.png")
    shown = watchfolder("status", "--config", str(config)).stdout
    assert "watchfolder is not running" in shown
    assert "1 new in the inboxes; today 2 done, 1 failed; 48 credits" in shown
    assert "broken.png: not_an_image" in shown
    assert "watchfolder requeue" in shown


def test_status_before_the_first_run(studio: Studio) -> None:
    config = studio.write_config()
    make_image(studio.inbox / "first.png")
    report = status_json(config)
    assert report["journal"] is None and report["running"] is False
    assert report["new"] == 1 and report["credits"] is None
    assert "has never run" in watchfolder("status", "--config", str(config)).stdout
    assert not (studio.root / "state" / "journal.sqlite3").exists()


def test_status_with_a_bad_config_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("inboxes: []\n")
    done = watchfolder("status", "--config", str(path))
    assert done.returncode == 2
    assert "inboxes: must be a non-empty list" in done.stderr


# -- requeue -----------------------------------------------------------------------------------


def _fail_twice_under_one_name(studio: Studio, sandbox: Sandbox) -> Path:
    """Make `sub/shot.png` fail twice (a server error, no retry): errors holds shot.png and
    shot-1.png, each with its reason file."""
    studio.data["retry"]["max_attempts"] = 1
    config = studio.write_config()
    for seed in (1, 2):
        sandbox.add_faults("500-empty")
        make_image(studio.inbox / "sub" / "shot.png", seed=seed)
        done = watchfolder("run", "--config", str(config), "--once")
        assert done.returncode == 1, done.stderr
    assert studio.files(studio.errors) == ["sub/shot-1.png", "sub/shot-1.png.error.json",
                                           "sub/shot.png", "sub/shot.png.error.json"]
    return config


def test_requeue_puts_files_back_at_their_path_and_never_overwrites(
        studio: Studio, sandbox: Sandbox) -> None:
    config = _fail_twice_under_one_name(studio, sandbox)
    first = (studio.errors / "sub" / "shot.png").read_bytes()
    dry = watchfolder("requeue", "--config", str(config), "--dry-run")
    assert dry.returncode == 1, dry.stdout  # the second would collide with the first
    assert "(dry run: nothing was moved)" in dry.stdout
    assert len(studio.files(studio.errors)) == 4, "a dry run moves nothing"

    done = watchfolder("requeue", "--config", str(config))
    assert done.returncode == 1, done.stdout + done.stderr
    assert studio.files(studio.inbox) == ["sub/shot.png"]
    assert (studio.inbox / "sub" / "shot.png").read_bytes() == first
    assert studio.files(studio.errors) == ["sub/shot-1.png", "sub/shot-1.png.error.json"]
    assert "requeued 1 file, skipped 1" in done.stdout
    assert "the inbox already has a file at this path" in done.stdout

    again = watchfolder("run", "--config", str(config), "--once")  # the cause is gone now
    assert again.returncode == 0, again.stderr
    assert studio.files(studio.outbox) == ["sub/shot.png"]
    last = watchfolder("requeue", "--config", str(config),
                       str(studio.errors / "sub" / "shot-1.png.error.json"))
    assert last.returncode == 0, last.stdout
    assert studio.files(studio.inbox) == ["sub/shot.png"], "shot-1.png goes back as shot.png"
    assert studio.files(studio.errors) == [] and not (studio.errors / "sub").exists()


def test_requeue_by_path_and_outside_errors(studio: Studio, sandbox: Sandbox,
                                            tmp_path: Path) -> None:
    config = _fail_twice_under_one_name(studio, sandbox)
    (tmp_path / "elsewhere.png").write_text("x")
    done = watchfolder("requeue", "--config", str(config), "errors/sub/shot-1.png",
                       str(tmp_path / "elsewhere.png"), "errors/nope.png", cwd=studio.root)
    assert done.returncode == 1
    assert "requeued" in done.stdout and "not inside any configured errors folder" in done.stdout
    assert "no such file in errors" in done.stdout
    assert studio.files(studio.inbox) == ["sub/shot.png"]
    assert studio.files(studio.errors) == ["sub/shot.png", "sub/shot.png.error.json"]


def test_requeue_finishes_an_interrupted_requeue_and_refuses_unsafe_paths(
        studio: Studio, sandbox: Sandbox) -> None:
    _fail_twice_under_one_name(studio, sandbox)
    # Interrupted after the move, before the reason file went: the next requeue tidies up.
    (studio.errors / "sub" / "shot.png").rename(studio.inbox / "sub" / "shot.png")
    # A reason file edited to point out of the inbox is refused.
    reason = studio.errors / "sub" / "shot-1.png.error.json"
    data = json.loads(reason.read_text())
    reason.write_text(json.dumps({**data, "file": "../../etc/evil.png"}))
    outcomes = {o.source.name: o for o in requeue(studio.config())}
    assert outcomes["shot.png"].requeued, outcomes["shot.png"].message
    assert "already back in the inbox" in outcomes["shot.png"].message
    assert not outcomes["shot-1.png"].requeued
    assert "unsafe path" in outcomes["shot-1.png"].message
    assert studio.files(studio.errors) == ["sub/shot-1.png", "sub/shot-1.png.error.json"]
    assert not (studio.root / "etc").exists()


def test_a_requeued_file_is_processed_by_the_running_daemon(studio: Studio,
                                                            sandbox: Sandbox) -> None:
    sandbox.add_faults("500-empty")
    studio.data["retry"]["max_attempts"] = 1
    with Running(studio.config()):
        make_image(studio.inbox / "again.png")
        wait_for(lambda: "again.png" in studio.files(studio.errors), what="the failure")
        wait_for(lambda: "again.png.error.json" in studio.files(studio.errors),
                 what="the reason")
        (outcome,) = requeue(studio.config())
        assert outcome.requeued and outcome.target == studio.inbox / "again.png"
        wait_for(lambda: studio.files(studio.archive) == ["again.png"], what="the retry")
    assert studio.files(studio.outbox) == ["again.png"]
    assert studio.files(studio.errors) == []


def test_status_counts_files_ignored_for_their_names(studio: Studio) -> None:
    make_image(studio.inbox / "shot.png")
    (studio.inbox / "._shot.png").write_bytes(b"AppleDouble")
    (studio.inbox / ".DS_Store").write_bytes(b"finder")
    (studio.inbox / "sub").mkdir()
    (studio.inbox / "sub" / "upload.part").write_bytes(b"half")
    config = studio.write_config()
    done = watchfolder("status", "--config", str(config), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["new"] == 1 and report["ignored"] == 3
    assert report["inboxes"][0]["ignored"] == 3
    text = watchfolder("status", "--config", str(config)).stdout
    assert "3 ignored for their names" in text
