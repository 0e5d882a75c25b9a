"""The daemon end to end: real folders, real watchdog observers, the sandbox on loopback."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import LogCapture, Running, Studio, make_image, wait_for
from watchfolder.coordination.claims import CLAIMS_FOLDER
from watchfolder.dev.sandbox import Sandbox


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def alpha_at(path: Path, xy: tuple[int, int]) -> int:
    with Image.open(path) as image:
        return image.convert("RGBA").getpixel(xy)[3]  # type: ignore[index]


def test_files_dropped_while_running_end_in_outbox_and_archive(studio: Studio,
                                                                sandbox: Sandbox) -> None:
    names = ["plain.png", "with space.jpg", "sub dir/ünï cødé.webp", "a/b/c/deep.JPG"]
    with Running(studio.config()):
        for index, name in enumerate(names):
            make_image(studio.inbox / name, fmt={"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[
                name.rsplit(".", 1)[1].lower()], seed=index)
        wait_for(lambda: len(studio.files(studio.archive)) == 4, what="four archived files")
    assert studio.files(studio.outbox) == sorted(
        ["plain.png", "with space.png", "sub dir/ünï cødé.png", "a/b/c/deep.png"])
    assert studio.files(studio.archive) == sorted(names)
    assert studio.files(studio.inbox) == []
    assert studio.files(studio.errors) == []
    assert sandbox.count(200) == 4
    result = studio.outbox / "with space.png"
    assert alpha_at(result, (0, 0)) == 0, "the backdrop is knocked out"
    assert alpha_at(result, (80, 60)) == 255, "the subject stays opaque"


def test_files_present_at_start_are_processed(studio: Studio, sandbox: Sandbox) -> None:
    for n in range(5):
        make_image(studio.inbox / f"early-{n}.png", seed=n)
    with Running(studio.config()):
        wait_for(lambda: len(studio.files(studio.archive)) == 5, what="start-up scan")
    assert len(studio.files(studio.outbox)) == 5


@pytest.mark.parametrize(("output_format", "accept", "ext", "pil_format"), [
    ("png", "image/png", "png", "PNG"),
    ("webp", "image/webp", "webp", "WEBP"),
    ("jpeg", "image/jpg", "jpg", "JPEG"),
])
def test_output_formats(tmp_path: Path, sandbox: Sandbox, output_format: str, accept: str,
                        ext: str, pil_format: str) -> None:
    studio = Studio(tmp_path, sandbox.url, inbox={"output_format": output_format})
    make_image(studio.inbox / "shot.jpg", fmt="JPEG")
    with Running(studio.config()):
        wait_for(lambda: studio.files(studio.outbox) == [f"shot.{ext}"], what="the result")
    with Image.open(studio.outbox / f"shot.{ext}") as result:
        assert result.format == pil_format
        assert result.size == (160, 120)
    assert sandbox.requests[-1].accept == accept


def test_request_follows_the_contract(studio: Studio, sandbox: Sandbox) -> None:
    # A PNG whose name says JPEG: the bytes decide the MIME type, and they go up unchanged.
    source = make_image(studio.inbox / "mislabelled.jpg", fmt="PNG")
    original = source.read_bytes()
    studio.data["inboxes"][0]["transparency_handling"] = "discard_alpha_layer"
    with Running(studio.config()):
        wait_for(lambda: studio.files(studio.archive), what="the file to finish")
    record = sandbox.requests[-1]
    assert record.content_type == "image/png"
    assert record.filename == "mislabelled.jpg"
    assert record.transparency_handling == "discard_alpha_layer"
    assert record.sha256 == hashlib.sha256(original).hexdigest()
    assert record.key == "test-key-0123456789"


def test_name_collisions_never_overwrite(studio: Studio, sandbox: Sandbox) -> None:
    studio.outbox.mkdir()
    studio.archive.mkdir()
    (studio.outbox / "shot.png").write_bytes(b"someone else's file")
    (studio.archive / "shot.png").write_bytes(b"an older original")
    make_image(studio.inbox / "shot.png", seed=1)
    make_image(studio.inbox / "shot.jpg", fmt="JPEG", seed=2)
    with Running(studio.config()):
        wait_for(lambda: len(studio.files(studio.archive)) == 3, what="both archived")
    assert studio.files(studio.outbox) == ["shot-1.png", "shot-2.png", "shot.png"]
    assert (studio.outbox / "shot.png").read_bytes() == b"someone else's file"
    assert (studio.archive / "shot.png").read_bytes() == b"an older original"
    assert sorted(studio.files(studio.archive)) == ["shot-1.png", "shot.jpg", "shot.png"]


def test_keep_in_place_is_not_sent_again(tmp_path: Path, sandbox: Sandbox) -> None:
    studio = Studio(tmp_path, sandbox.url, inbox={"archive": None})
    make_image(studio.inbox / "keep.png")
    with Running(studio.config()):
        wait_for(lambda: studio.files(studio.outbox) == ["keep.png"], what="the result")
        wait_for(lambda: sandbox.count() == 1)
    assert studio.files(studio.inbox) == ["keep.png"]
    # A restart, and several rescans, do not send it again.
    with Running(studio.config()) as daemon:
        wait_for(lambda: daemon.intake is not None and daemon.intake.alive())
        make_image(studio.inbox / "other.png", seed=3)
        wait_for(lambda: len(studio.files(studio.outbox)) == 2, what="the second file")
    assert sandbox.count() == 2
    assert studio.files(studio.inbox) == ["keep.png", "other.png"]


def test_polling_observer_sees_new_files(tmp_path: Path, sandbox: Sandbox) -> None:
    studio = Studio(tmp_path, sandbox.url, inbox={"polling": True},
                    rescan_seconds=3600)  # only the polling observer can find the file
    with Running(studio.config()) as daemon:
        assert daemon.watcher is not None and daemon.watcher.alive()
        make_image(studio.inbox / "nfs.png")
        wait_for(lambda: studio.files(studio.archive) == ["nfs.png"], what="polling pick-up")


def test_inotify_sees_files_renamed_into_the_inbox(tmp_path: Path, sandbox: Sandbox) -> None:
    studio = Studio(tmp_path, sandbox.url, rescan_seconds=3600)  # events only, no rescan
    staging = tmp_path / "staging"
    with Running(studio.config()):
        make_image(staging / "moved.png")
        (staging / "moved.png").rename(studio.inbox / "moved.png")
        wait_for(lambda: studio.files(studio.archive) == ["moved.png"], what="moved-in file")
        make_image(staging / "folder" / "inner.png")
        (staging / "folder").rename(studio.inbox / "folder")
        wait_for(lambda: "folder/inner.png" in studio.files(studio.archive),
                 what="a folder moved in with a file inside")


def test_temporary_names_wait_until_renamed(studio: Studio, sandbox: Sandbox) -> None:
    with Running(studio.config()):
        for name in ("upload.jpg.part", ".hidden.png", "~$lock.png", "dl.crdownload",
                     "x.TMP"):
            make_image(studio.inbox / name, fmt="JPEG")
        make_image(studio.inbox / "marker.png")
        wait_for(lambda: studio.files(studio.archive) == ["marker.png"], what="the marker")
        wait_for(lambda: sandbox.count() == 1)
        (studio.inbox / "upload.jpg.part").rename(studio.inbox / "upload.jpg")
        wait_for(lambda: "upload.jpg" in studio.files(studio.archive), what="renamed file")
    assert sandbox.count() == 2
    # (the claims folder is the daemons' own: one file, one daemon)
    left = sorted(p.name for p in studio.inbox.iterdir() if p.name != CLAIMS_FOLDER)
    assert left == [".hidden.png", "dl.crdownload", "x.TMP", "~$lock.png"]


def test_a_file_is_sent_only_once_complete(tmp_path: Path, sandbox: Sandbox) -> None:
    studio = Studio(tmp_path, sandbox.url, inbox={"settle_seconds": 0.4})
    complete = make_image(tmp_path / "complete.png", size=(400, 300)).read_bytes()
    target = studio.inbox / "slow.png"
    with Running(studio.config()):
        with target.open("wb") as handle:  # a slow copy: a chunk every 0.1 s
            for start in range(0, len(complete), len(complete) // 8 + 1):
                handle.write(complete[start:start + len(complete) // 8 + 1])
                handle.flush()
                threading_pause(0.1)
        wait_for(lambda: studio.files(studio.archive) == ["slow.png"], what="the slow file")
    assert sandbox.count() == 1
    assert sandbox.requests[0].sha256 == hashlib.sha256(complete).hexdigest()


def threading_pause(seconds: float) -> None:
    """Let real time pass for a writer that is still writing (not a wait for the daemon)."""
    import threading

    threading.Event().wait(seconds)


def test_same_content_again_costs_no_request(studio: Studio, sandbox: Sandbox,
                                             log_lines: LogCapture) -> None:
    make_image(studio.inbox / "first.png", seed=7)
    content = (studio.inbox / "first.png").read_bytes()
    with Running(studio.config()):
        wait_for(lambda: studio.files(studio.archive) == ["first.png"], what="first")
        (studio.inbox / "elsewhere").mkdir()
        (studio.inbox / "elsewhere" / "copy.png").write_bytes(content)
        wait_for(lambda: "elsewhere/copy.png" in studio.files(studio.archive), what="copy")
    # ...and after a restart too.
    with Running(studio.config()):
        (studio.inbox / "third.png").write_bytes(content)
        wait_for(lambda: "third.png" in studio.files(studio.archive), what="third")
    assert sandbox.count() == 1
    first = (studio.outbox / "first.png").read_bytes()
    assert (studio.outbox / "elsewhere" / "copy.png").read_bytes() == first
    assert (studio.outbox / "third.png").read_bytes() == first
    reused = [e for e in log_lines.events("file.done") if e["reused"]]
    assert len(reused) == 2


def test_a_changed_setting_is_a_new_result(tmp_path: Path, sandbox: Sandbox) -> None:
    studio = Studio(tmp_path, sandbox.url)
    make_image(studio.inbox / "one.png", seed=9)
    content = (studio.inbox / "one.png").read_bytes()
    with Running(studio.config()):
        wait_for(lambda: studio.files(studio.archive) == ["one.png"])
    studio.data["inboxes"][0]["output_format"] = "webp"
    with Running(studio.config()):
        (studio.inbox / "two.png").write_bytes(content)
        wait_for(lambda: "two.webp" in studio.files(studio.outbox), what="a webp result")
    assert sandbox.count() == 2


def test_identical_files_dropped_together_cost_one_request(studio: Studio,
                                                           sandbox: Sandbox) -> None:
    make_image(studio.root / "same.png", seed=11)
    content = (studio.root / "same.png").read_bytes()
    for n in range(4):
        (studio.inbox / f"dup-{n}.png").write_bytes(content)
    with Running(studio.config()):
        wait_for(lambda: len(studio.files(studio.archive)) == 4, what="four duplicates")
    assert sandbox.count() == 1
    assert len(studio.files(studio.outbox)) == 4


def test_symlinks_are_never_followed_out_of_the_inbox(tmp_path: Path, studio: Studio,
                                                      sandbox: Sandbox) -> None:
    outside = make_image(tmp_path / "secret" / "private.png")
    before = outside.read_bytes()
    (studio.inbox / "link.png").symlink_to(outside)
    (studio.inbox / "linkdir").symlink_to(outside.parent, target_is_directory=True)
    with Running(studio.config()):
        wait_for(lambda: len(studio.files(studio.errors)) >= 2 and
                 (studio.errors / "linkdir").is_symlink(), what="links moved to errors")
    assert sandbox.count() == 0
    assert outside.read_bytes() == before
    assert (studio.errors / "link.png").is_symlink()
    assert studio.reason("link.png")["reason"] == "symlink"
    assert studio.reason("linkdir")["reason"] == "symlink"
    assert not os.path.lexists(studio.inbox / "link.png")


def test_two_inboxes_with_their_own_settings(tmp_path: Path, sandbox: Sandbox) -> None:
    second = tmp_path / "second"
    (second / "in").mkdir(parents=True)
    studio = Studio(tmp_path, sandbox.url, extra_inboxes=[{
        "path": "second/in", "outbox": "second/out", "errors": "second/err",
        "output_format": "webp", "settle_seconds": 0.1}])
    with Running(studio.config()):
        make_image(studio.inbox / "a.png")
        make_image(second / "in" / "b.png", seed=1)
        wait_for(lambda: (second / "out" / "b.webp").exists(), what="second inbox")
        wait_for(lambda: studio.files(studio.archive) == ["a.png"], what="first inbox")
    assert (second / "in" / "b.png").exists(), "no archive: the original stays"
    assert studio.files(studio.outbox) == ["a.png"]


def test_ready_and_summary_lines(studio: Studio, sandbox: Sandbox, log_lines: LogCapture) -> None:
    sandbox.set_credits(None, 50)
    make_image(studio.inbox / "one.png")
    with Running(studio.config()):
        wait_for(lambda: log_lines.events("file.done"), what="file.done")
    ready = log_lines.events("ready")
    assert len(ready) == 1 and ready[0]["files_found"] == 1
    done = log_lines.events("file.done")[0]
    assert done["file"] == "one.png"
    assert done["inbox"] == str(studio.inbox)
    assert done["attempts"] == 1
    assert done["credits_remaining"] == 49
    assert isinstance(done["ms"], int)


def test_result_extension_follows_what_the_api_returned(tmp_path: Path,
                                                        sandbox: Sandbox) -> None:
    # An already cut-out PNG with output_format webp: in return_input_if_non_opaque mode the
    # API hands the PNG back as it is, so the result must be named .png, not .webp.
    studio = Studio(tmp_path, sandbox.url, inbox={"output_format": "webp"})
    image = Image.new("RGBA", (64, 48), (255, 0, 0, 255))
    image.putpixel((0, 0), (0, 0, 0, 0))
    image.save(studio.inbox / "cutout.png")
    with Running(studio.config()):
        wait_for(lambda: studio.files(studio.archive) == ["cutout.png"], what="the file")
    assert studio.files(studio.outbox) == ["cutout.png"]
    assert (studio.outbox / "cutout.png").read_bytes() == (studio.archive / "cutout.png"
                                                           ).read_bytes()


def test_hidden_folders_are_not_entered(studio: Studio, sandbox: Sandbox) -> None:
    make_image(studio.inbox / ".sync" / "inside.png")
    make_image(studio.inbox / "visible" / "shown.png", seed=1)
    with Running(studio.config()):
        wait_for(lambda: studio.files(studio.archive) == ["visible/shown.png"])
    assert sandbox.count() == 1
    assert (studio.inbox / ".sync" / "inside.png").exists()


def test_a_file_replaced_while_it_is_sent_is_processed_again(tmp_path: Path,
                                                             sandbox: Sandbox,
                                                             log_lines: LogCapture) -> None:
    studio = Studio(tmp_path, sandbox.url)
    sandbox.latency = 1.0
    make_image(studio.inbox / "shot.png", seed=1)
    with Running(studio.config()):
        wait_for(lambda: studio.states() == ["sending"], what="the request in flight")
        make_image(studio.inbox / "shot.png", size=(200, 100), seed=2)  # a new version
        wait_for(lambda: len(studio.files(studio.outbox)) == 2, what="both versions")
        wait_for(lambda: studio.files(studio.archive) == ["shot.png"], what="the archive")
    assert log_lines.events("file.changed")
    assert studio.files(studio.outbox) == ["shot-1.png", "shot.png"]
    with Image.open(studio.archive / "shot.png") as archived:
        assert archived.size == (200, 100), "the archive holds the version that was processed"
    assert sandbox.count(200) == 2


def test_a_file_removed_while_waiting_is_forgotten(studio: Studio, sandbox: Sandbox,
                                                   log_lines: LogCapture) -> None:
    sandbox.set_credits(None, 0)
    make_image(studio.inbox / "gone.png")
    with Running(studio.config()) as daemon:
        wait_for(lambda: daemon.pipeline and daemon.pipeline.queue.paused, what="paused")
        (studio.inbox / "gone.png").unlink()
        sandbox.set_credits(None, 10)
        wait_for(lambda: log_lines.events("file.gone"), what="file.gone")
    assert studio.files(studio.errors) == []
    assert studio.files(studio.outbox) == []
    assert sandbox.count(200) == 0


def test_a_file_renamed_into_place_is_sent_without_the_settle_wait(
        tmp_path: Path, sandbox: Sandbox) -> None:
    settle = 3.0
    studio = Studio(tmp_path, sandbox.url, inbox={"settle_seconds": settle},
                    rescan_seconds=60)
    staging = tmp_path / "staging"  # another folder on the same filesystem
    # Each way a sender completes a file by renaming it: (temporary path, final name).
    renames = [
        (studio.inbox / ".rsync.jpg.Xa81Qz", "rsync.jpg"),            # rsync
        (studio.inbox / "part.png.part", "part.png"),                 # *.part
        (studio.inbox / "browser.png.crdownload", "browser.png"),     # Chrome
        (studio.inbox / ".syncthing.sync.png.tmp", "sync.png"),       # Syncthing
        (staging / "moved.png", "moved.png"),                         # a move from elsewhere
    ]
    with Running(studio.config()):
        delays = {}
        for seed, (temp, name) in enumerate(renames):
            make_image(temp, fmt="JPEG" if name.endswith(".jpg") else "PNG", seed=seed)
            before = sandbox.count()
            renamed = time.monotonic()
            temp.rename(studio.inbox / name)
            wait_for(lambda n=before: sandbox.count() > n, timeout=2 * settle, what=name)
            delays[name] = sandbox.requests[-1].time - renamed
            assert sandbox.requests[-1].filename == name
        # Written in place, a file still waits for its size and mtime to hold still.
        written = time.monotonic()
        (studio.inbox / "in-place.png").write_bytes(
            make_image(staging / "source.png", seed=9).read_bytes())
        wait_for(lambda: sandbox.count() == len(renames) + 1, timeout=3 * settle,
                 what="the file written in place")
        in_place = sandbox.requests[-1].time - written
        wait_for(lambda: len(studio.files(studio.archive)) == len(renames) + 1, what="archive")
    # Generous bounds (a loaded 2-core machine) that the settle wait could never meet.
    assert all(delay < settle / 3 for delay in delays.values()), delays
    assert in_place >= settle * 0.9, in_place


def test_a_polling_inbox_keeps_the_settle_wait_for_renamed_files(
        tmp_path: Path, sandbox: Sandbox) -> None:
    settle = 1.5
    studio = Studio(tmp_path, sandbox.url, rescan_seconds=60,
                    inbox={"settle_seconds": settle, "polling": True})
    temp = make_image(studio.inbox / ".share.png.tmp")
    with Running(studio.config()):
        threading_pause(0.3)  # the polling observer's first listing holds the temp file
        renamed = time.monotonic()
        temp.rename(studio.inbox / "share.png")
        wait_for(lambda: sandbox.count() == 1, timeout=4 * settle, what="the renamed file")
        delay = sandbox.requests[-1].time - renamed
        wait_for(lambda: studio.files(studio.archive) == ["share.png"], what="archive")
    # A move polling infers from a listing proves nothing about a share's data.
    assert delay >= settle * 0.9, delay


def test_the_answer_streams_into_a_spool_name_made_before_the_request(
        studio: Studio, sandbox: Sandbox) -> None:
    """The answer's spool name exists (its folder fsynced) before the request goes: between
    the answer and the journal no rename and no folder fsync; a request that ends without
    an answer leaves no name behind."""
    spool = studio.root / "state" / "spool"
    seen: list[list[tuple[str, int]]] = []
    sandbox.on_request = lambda record: seen.append(
        sorted((path.name, path.stat().st_size) for path in spool.iterdir()))
    sandbox.add_faults(500)
    make_image(studio.inbox / "a.png", seed=1)
    with Running(studio.config()):
        wait_for(lambda: len(studio.files(studio.archive)) == 1, what="archived")
    assert sandbox.count(200) == 1 and len(seen) == 2
    # While each request waited for its answer: the empty answer file, nothing else.
    assert [[(name.split(".", 1)[1], size) for name, size in names] for names in seen] == \
        [[("png", 0)], [("png", 0)]]
    assert list(spool.iterdir()) == []


def test_spent_answers_files_are_written_again_and_gone_after_a_stop(studio: Studio,
                                                                     sandbox: Sandbox) -> None:
    """A stored file's spooled answer is not unlinked but kept as a spare and the next answer
    written into it (on ext4 without a journal each freed inode slows the next minutes' inode
    allocations): files sent one after the other reuse two inodes (the next answer's name is
    made before the request, while the last answer is still held); a stop leaves the spool
    empty."""
    spool = studio.root / "state" / "spool"
    inodes: set[int] = set()
    with Running(studio.config()):
        for n in range(6):
            make_image(studio.inbox / f"one-{n}.png", seed=n)
            wait_for(lambda n=n: len(studio.files(studio.archive)) == n + 1,
                     what=f"file {n} archived")
            # Its answer is let go once a later fsync covers `stored`: the next file's
            # `sending`, made after that file's answer name (which takes the spare before).
            inodes |= {p.stat().st_ino for p in spool.iterdir()}
    assert len(inodes) <= 2, f"{len(inodes)} inodes for six answers sent one after another"
    assert list(spool.iterdir()) == [], "left in the spool after a stop"
    assert sandbox.count(200) == 6


def test_one_host_makes_one_journal_fsync_per_request(studio: Studio, sandbox: Sandbox) -> None:
    """Between an answer and its slot's next request the journal is fsynced once: the
    request's `sending` fsync covers the answer's `fetched` (a backlog through one slot)."""
    studio.data["api"]["concurrency"] = 1
    count = 12
    for index in range(count):
        make_image(studio.inbox / f"f{index:02d}.png", seed=index)
    with Running(studio.config()) as daemon:
        assert daemon.journal is not None
        commits = daemon.journal.commits
        wait_for(lambda: len(studio.files(studio.archive)) == count, what="all archived")
        syncs = commits.syncs
    assert sandbox.count(200) == count
    # A `sending` and a `fetched` each fsynced would be 2 x count (24 measured so); more
    # than one per file come from the last answer (no request after it), the main loop's
    # settles, and a store that reaches its first output before the next request's fsync
    # (13 to 15 measured).
    assert syncs <= count + count // 2, syncs
