"""The defects issue 16 found in the pipeline, each checked from outside: the hand-off
follows the final commit (and survives a crash after it), a kill while sending on the
studio path makes no second proxy, the result key survives a new settings field, the
local lane and libvips split the cores, and the one pause (a person's per inbox)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sqlite3
from pathlib import Path

import pytest
import pyvips

from tests.conftest import LogCapture, Running, Studio, make_image, run_watchfolder, wait_for
from tests.test_crash_points import run
from watchfolder.config.settings import InboxConfig, OutputConfig
from watchfolder.dev.samples import adobe_rgb_tiff
from watchfolder.dev.sandbox import Sandbox
from watchfolder.errors import CreditsExhausted
from watchfolder.journal.db import Journal
from watchfolder.pipeline.jobqueue import Job, JobQueue
from watchfolder.pipeline.lanes import local_split
from watchfolder.pipeline.pause import Pause


def journal_states(studio: Studio) -> dict[str, str]:
    path = studio.root / "state" / "journal.sqlite3"
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return dict(db.execute("SELECT rel, state FROM files ORDER BY id"))


def handed_on_studio(tmp_path: Path, url: str) -> Studio:
    studio = Studio(tmp_path, url, api={"concurrency": 1},
                    inbox={"manifest": True, "done_marker": True})
    make_image(studio.inbox / "a.png", seed=1)
    make_image(studio.inbox / "b.png", seed=2)
    return studio


def test_a_crash_during_the_hand_off_hands_on_nothing_the_journal_does_not_call_done(
        tmp_path: Path, sandbox: Sandbox) -> None:
    studio = handed_on_studio(tmp_path, sandbox.url)
    config = studio.write_config()
    crashed = run(config, failpoint="marked:1")  # right after the first done marker
    assert crashed.returncode == -9, crashed.stderr
    markers = [Path(name).stem for name in studio.files(studio.outbox) if name.endswith(".done")]
    assert markers, "the failpoint follows a marker"
    states = journal_states(studio)
    assert all(states[f"{stem}.png"] == "done" for stem in markers), \
        f"a done marker for a file the journal does not call done: {states}"

    again = run(config)
    assert again.returncode == 0, again.stderr
    assert studio.files(studio.outbox) == ["a.done", "a.json", "a.png", "b.done", "b.json",
                                           "b.png"]


def test_a_crash_after_the_done_commit_still_hands_off_at_the_next_start(
        tmp_path: Path, sandbox: Sandbox) -> None:
    studio = handed_on_studio(tmp_path, sandbox.url)
    config = studio.write_config()
    crashed = run(config, failpoint="done:1")  # committed done, nothing handed on yet
    assert crashed.returncode == -9, crashed.stderr
    assert "done" in journal_states(studio).values()

    again = run(config)
    assert again.returncode == 0, again.stderr
    assert studio.files(studio.outbox) == ["a.done", "a.json", "a.png", "b.done", "b.json",
                                           "b.png"]
    for stem in "ab":
        manifest = json.loads((studio.outbox / f"{stem}.json").read_text())
        assert (studio.outbox / f"{stem}.done").read_text().strip() == manifest["id"]
    assert 2 <= sandbox.count(200) <= 3, "at most the one request in flight is paid again"


def test_a_kill_while_sending_on_the_studio_path_makes_no_second_proxy(
        tmp_path: Path, sandbox: Sandbox) -> None:
    studio = Studio(tmp_path, sandbox.url, api={"concurrency": 1})
    (studio.inbox / "retouch.tif").write_bytes(adobe_rgb_tiff(240, 160))
    config = studio.write_config()
    crashed = run(config, failpoint="sending:1")
    assert crashed.returncode == -9, crashed.stderr
    again = run(config)
    assert again.returncode == 0, again.stderr
    assert studio.files(studio.outbox) == ["retouch.png"]
    proxies = [line for output in (crashed.stderr, again.stderr)
               for line in output.splitlines() if '"file.proxy"' in line]
    assert len(proxies) == 1, f"the proxy was made {len(proxies)} times"


def test_a_new_output_setting_at_its_default_keeps_the_result_key() -> None:
    inbox = InboxConfig(path=Path("/in"), outbox=Path("/out"), errors=Path("/err"),
                        outputs=(OutputConfig(format="jpeg", size=(300, 300)),))
    # The same settings in a later version whose OutputConfig has one more field.
    later = dataclasses.make_dataclass(
        "OutputConfig", [("sharpen", float, dataclasses.field(default=0.0))],
        bases=(OutputConfig,), frozen=True)
    again = dataclasses.replace(inbox, outputs=(later(format="jpeg", size=(300, 300)),))
    assert again.settings_key == inbox.settings_key
    assert inbox.settings_key.startswith("v1:")
    changed = dataclasses.replace(inbox, outputs=(later(format="jpeg", size=(300, 300),
                                                        sharpen=1.0),))
    assert changed.settings_key != inbox.settings_key, "a field that is set still counts"
    moved = dataclasses.replace(inbox, outputs=(OutputConfig(format="jpeg", size=(300, 300),
                                                             name="{stem}_x.{ext}"),))
    assert moved.settings_key == inbox.settings_key, "where an output goes is not what it is"


def test_results_journaled_under_the_old_key_are_still_reused(
        tmp_path: Path, sandbox: Sandbox) -> None:
    studio = Studio(tmp_path, sandbox.url, inbox={"outputs": [{"format": "png"},
                                                              {"name": "{stem}_w.{ext}",
                                                               "format": "webp"}]})
    make_image(studio.inbox / "a.png", seed=3)
    config = studio.write_config()
    assert run(config).returncode == 0
    inbox = studio.config().inboxes[0]
    path = studio.root / "state" / "journal.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        # As the previous version journaled them.
        db.execute("UPDATE results SET identity = replace(identity, ?, ?)",
                   (inbox.settings_key, inbox.legacy_settings_key))
        assert db.execute("SELECT COUNT(*) FROM results WHERE identity LIKE ?",
                          (f"%{inbox.legacy_settings_key}%",)).fetchone()[0] == 2
    make_image(studio.inbox / "again.png", seed=3)
    assert run(config).returncode == 0
    assert sandbox.count(200) == 1, "the same content under the old key costs nothing"
    assert {"again.png", "again_w.webp"} <= set(studio.files(studio.outbox))


@pytest.mark.parametrize("cores", [1, 2, 4, 8, 16, 64])
def test_local_workers_and_libvips_threads_split_the_cores(cores: int) -> None:
    workers, threads = local_split(cores)
    assert workers >= 1 and threads >= 1
    assert workers * threads <= max(1, cores - 1), "no oversubscription"
    if cores >= 8:
        assert workers > 1 and workers * threads >= (cores - 1) // 2, "the cores are used"


def test_a_persons_pause_holds_one_inbox_and_survives_a_restart(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    try:
        inboxes = ["/in/a", "/in/b"]
        pause = Pause(journal)
        queue = JobQueue(pause=pause, held=lambda job: pause.held(inboxes[job.index]) is not None)
        pause.set("/in/a", "web")
        for index, rel in ((0, "held.png"), (1, "free.png")):
            queue.put(Job(index, rel))
        free = queue.get(timeout=0)
        assert free is not None and free.rel == "free.png"
        assert queue.get(timeout=0) is None, "the paused inbox's file waits"
        assert pause.state()["inboxes"] == {"/in/a": "paused by web"}

        restarted = Pause(journal)  # a restart: the account pause is gone, a person's is not
        assert restarted.held("/in/a") == "paused by web"
        assert restarted.held("/in/b") is None
        pause.pause(CreditsExhausted("no credits", 402), probe_in=60.0)
        assert journal.notes.all().get("paused", "").startswith("no_credits")
        assert Pause(journal).error is None and journal.notes.all().get("paused") is None

        assert pause.clear("/in/a")
        pause.resume()
        held = queue.get(timeout=1)
        assert held is not None and held.rel == "held.png"
    finally:
        journal.close()


def test_a_persons_pause_holds_the_daemons_inbox_and_status_says_so(
        tmp_path: Path, sandbox: Sandbox, log_lines: LogCapture) -> None:
    studio = Studio(tmp_path, sandbox.url)
    config = studio.config()
    with Running(config) as daemon:
        assert daemon.pipeline is not None
        pause = daemon.pipeline.pause
        pause.set(str(studio.inbox), "web")
        make_image(studio.inbox / "held.png")
        wait_for(lambda: daemon.snapshot().get("waiting") == 1, what="the file held in the queue")
        report = json.loads(run_watchfolder("status", "--config", str(studio.write_config()),
                                            "--json").stdout)
        assert report["paused_inboxes"] == {str(studio.inbox): "paused by web"}
        assert sandbox.count() == 0 and not log_lines.events("file.done")
        pause.clear(str(studio.inbox))
        wait_for(lambda: log_lines.events("file.done"), what="the file after the pause")
    assert sandbox.count(200) == 1


def test_the_running_daemon_sets_libvips_threads_to_its_share(studio: Studio) -> None:
    with Running(studio.config()) as daemon:
        pipeline = daemon.pipeline
        assert pipeline is not None
        assert pyvips.concurrency_get() == pipeline.vips_threads
        cores = os.cpu_count() or 2
        assert pipeline.local_workers * pipeline.vips_threads <= max(1, cores - 1)
