"""A damaged journal stops the start with a clear fix; reset-journal rebuilds from the folders;
finished records are forgotten after `journal_retention_days` (keep-in-place files are not)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.conftest import Running, Studio, make_image, run_watchfolder, wait_for
from watchfolder.dev.sandbox import Sandbox
from watchfolder.journal.db import FETCHED, Journal
from watchfolder.pipeline.outputs import SHARED_SUFFIX
from watchfolder.service.recovery import remove_orphans, still_in_place


def test_a_damaged_journal_exits_2_naming_the_file_and_the_fix(studio: Studio,
                                                              sandbox: Sandbox) -> None:
    config = studio.write_config()
    make_image(studio.inbox / "a.png")
    first = run_watchfolder("run", "--config", str(config), "--once")
    assert first.returncode == 0, first.stderr
    journal = studio.root / "state" / "journal.sqlite3"
    data = bytearray(journal.read_bytes())
    data[100:4096] = os.urandom(3996)  # the header survives, the pages do not: a power cut
    journal.write_bytes(bytes(data))
    for extra in ("-wal", "-shm"):
        Path(f"{journal}{extra}").unlink(missing_ok=True)
    broken = run_watchfolder("run", "--config", str(config), "--once")
    assert broken.returncode == 2, broken.stderr
    assert str(journal) in broken.stderr and "damaged" in broken.stderr
    assert f"watchfolder reset-journal --config {config}" in broken.stderr
    assert "Traceback" not in broken.stderr


def test_reset_journal_keeps_what_the_folders_show(tmp_path: Path, sandbox: Sandbox) -> None:
    studio = Studio(tmp_path, sandbox.url, inbox={"archive": None})
    config = studio.write_config()
    for n in range(3):
        make_image(studio.inbox / f"kept{n}.png", seed=n)
    assert run_watchfolder("run", "--config", str(config), "--once").returncode == 0
    assert sandbox.count(200) == 3
    state = studio.root / "state"
    (state / "journal.sqlite3").write_bytes(b"this is not a database at all" * 100)
    done = run_watchfolder("reset-journal", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert "3 file(s) kept in place recorded as done" in done.stdout
    assert [p.name for p in state.iterdir() if ".broken-" in p.name]
    make_image(studio.inbox / "new.png", seed=9)
    again = run_watchfolder("run", "--config", str(config), "--once")
    assert again.returncode == 0, again.stderr
    assert sandbox.count(200) == 4, "only the new file was sent"
    assert studio.files(studio.outbox) == ["kept0.png", "kept1.png", "kept2.png", "new.png"]


def test_reset_journal_refuses_while_the_daemon_runs(studio: Studio) -> None:
    config = studio.write_config()
    with Running(studio.config()):
        done = run_watchfolder("reset-journal", "--config", str(config))
    assert done.returncode == 2 and "stop it first" in done.stderr


def test_retention_forgets_finished_records_but_not_files_kept_in_place(
        tmp_path: Path, sandbox: Sandbox) -> None:
    studio = Studio(tmp_path, sandbox.url, inbox={"archive": None},
                    extra_inboxes=[{"path": "in2", "outbox": "out2", "errors": "err2",
                                    "archive": "arch2", "settle_seconds": 0.1}])
    (tmp_path / "in2").mkdir()
    make_image(studio.inbox / "stays.png")
    make_image(studio.inbox / "leaves.png", seed=1)
    make_image(tmp_path / "in2" / "archived.png", seed=2)
    (tmp_path / "in2" / "bad.png").write_bytes(b"")
    with Running(studio.config()):
        wait_for(lambda: len(studio.states()) == 4 and "queued" not in studio.states()
                 and set(studio.states()) <= {"done", "failed"}, what="all finished")
    (studio.inbox / "leaves.png").unlink()
    journal = Journal(studio.root / "state")
    try:
        forgotten = journal.prune(time.time() + 1, still_in_place)
        assert forgotten == 3
        assert journal.kept_in_place() == {
            str(studio.inbox): {"stays.png": _signature(studio.inbox / "stays.png")}}
        assert journal.find_result("nothing") is None
    finally:
        journal.close()
    before = sandbox.count(200)
    with Running(studio.config()):
        time.sleep(0.5)  # a rescan or two: a forgotten kept file would be sent again
    assert sandbox.count(200) == before


def _signature(path: Path) -> tuple[int, int]:
    st = path.stat()
    return (st.st_size, st.st_mtime_ns)


def test_reset_journal_finds_tiff_results_and_recipe_outputs(tmp_path: Path,
                                                            sandbox: Sandbox) -> None:
    """Files kept in place whose results are TIFFs or a recipe's outputs (one in an output
    outbox of its own, one named with the day and the content's hash) are recorded as done:
    a restart after the reset spends nothing."""
    studio = Studio(tmp_path, sandbox.url, inbox={"archive": None, "output_format": "tiff"},
                    extra_inboxes=[{
                        "path": "in2", "outbox": "out2", "errors": "err2",
                        "settle_seconds": 0.1, "outputs": [
                            {"format": "png"},
                            {"name": "{dir}/{stem}_white.{ext}", "format": "jpeg",
                             "background": "#ffffff"},
                            {"name": "{date}/{stem}-{hash}.{ext}", "format": "webp",
                             "outbox": "thumbs"}]}])
    (tmp_path / "in2").mkdir()
    (tmp_path / "thumbs").mkdir()
    config = studio.write_config()
    for n in range(2):
        make_image(studio.inbox / "sub" / f"kept{n}.png", seed=n)
        make_image(tmp_path / "in2" / f"recipe{n}.png", seed=5 + n)
    assert run_watchfolder("run", "--config", str(config), "--once").returncode == 0
    assert sandbox.count(200) == 4
    assert studio.files(studio.outbox) == ["sub/kept0.tif", "sub/kept1.tif"]
    assert len(studio.files(tmp_path / "thumbs")) == 2
    (studio.root / "state" / "journal.sqlite3").write_bytes(b"not a database" * 100)
    done = run_watchfolder("reset-journal", "--config", str(config))
    assert done.returncode == 0, done.stderr
    again = run_watchfolder("run", "--config", str(config), "--once")
    assert again.returncode == 0, again.stderr
    assert sandbox.count(200) == 4, "nothing was sent again"
    assert done.stdout.count("2 file(s) kept in place recorded as done") == 2, done.stdout
    assert studio.files(studio.outbox) == ["sub/kept0.tif", "sub/kept1.tif"]
    assert len(studio.files(tmp_path / "out2")) == 4


def test_a_start_clears_a_shared_cut_out_a_crash_left_but_keeps_its_answer(tmp_path: Path) -> None:
    # A recipe's full-size cut-out kept on disk for the file's other outputs (outputs.py)
    # lives beside the spooled answer; a crash before its last reader leaves it there.
    journal = Journal(tmp_path)
    try:
        record = journal.create("inbox", "shot.tif", 1, 1, "v1:{}")
        answer = journal.spool_dir / f"{record.id}.png"
        answer.write_bytes(b"answer")
        journal.update(record, state=FETCHED, spool=str(answer))
        left = answer.with_name(f"{answer.name}.0123456789abcdef{SHARED_SUFFIX}")
        left.write_bytes(b"pixels")
        remove_orphans(journal)
        assert sorted(journal.spool_dir.iterdir()) == [answer]
    finally:
        journal.close()
