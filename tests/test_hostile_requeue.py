"""How `requeue` words what it did: a dry run says what it would do, never "requeued".

The outcomes come from real failures (a daemon run against the sandbox); `report()` is what
the command prints.
"""

from __future__ import annotations

from tests.conftest import Studio
from tests.test_status import _fail_twice_under_one_name
from watchfolder.dev.sandbox import Sandbox
from watchfolder.files.requeue import report, requeue


def test_dry_run_and_real_run_say_what_they_did(studio: Studio, sandbox: Sandbox) -> None:
    config_path = _fail_twice_under_one_name(studio, sandbox)
    config = studio.config()
    shot, other = studio.errors / "sub" / "shot.png", studio.errors / "sub" / "shot-1.png"
    target = studio.inbox / "sub" / "shot.png"

    dry = report(requeue(config, dry_run=True), dry_run=True, config=config_path)
    assert dry[0] == f"would requeue {shot} -> {target}"
    assert dry[1].startswith(f"skipped {other} -> {target}: the inbox already has a file")
    assert dry[2] == "would requeue 1 file, skipped 1 (dry run: nothing was moved)"
    assert dry[3] == f"To move them: watchfolder requeue --config {config_path}"
    assert not [line for line in dry if "requeued" in line], dry
    assert len(studio.files(studio.errors)) == 4, "a dry run moves nothing"

    done = report(requeue(config), dry_run=False, config=config_path)
    assert done[0] == f"requeued {shot} -> {target}"
    assert done[2] == "requeued 1 file, skipped 1"
    assert done[3] == ("Once what each skipped line says is fixed: "
                       f"watchfolder requeue --config {config_path}")
    assert not [line for line in done if "would" in line or "FILE" in line], done
    assert studio.files(studio.inbox) == ["sub/shot.png"]


def test_counts_are_worded_for_one_and_many(studio: Studio, sandbox: Sandbox) -> None:
    _fail_twice_under_one_name(studio, sandbox)
    (studio.errors / "sub" / "shot-1.png").rename(studio.errors / "sub" / "shot-2.png")
    (studio.errors / "sub" / "shot-1.png.error.json").unlink()  # goes back by its own name
    given = [studio.errors / "sub" / "shot.png", studio.errors / "sub" / "shot-2.png"]
    lines = report(requeue(studio.config(), given), dry_run=False)
    assert lines[-1] == "requeued 2 files"
