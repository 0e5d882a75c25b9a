"""Files that never ended in 0.1 (issue: hostile folders): names that are not UTF-8, names too
long for a result or a reason file, a folder named like an earlier result, a reason file that
could describe the wrong file, and a replacement keeping size and mtime. Each must end in
outbox or errors, with one log line, not loop."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from PIL import Image

from tests.conftest import LogCapture, Running, Studio, make_image, wait_for
from watchfolder.dev.sandbox import Sandbox


def done_or_failed(log_lines: LogCapture) -> list[dict[str, object]]:
    return log_lines.events("file.done") + log_lines.events("file.failed")


def test_a_name_that_is_not_utf8_is_processed_and_shown_readably(
        studio: Studio, sandbox: Sandbox, log_lines: LogCapture) -> None:
    good = os.fsdecode(b"\xff\xfe photo.png")
    bad = os.fsdecode(b"caf\xe9.png")  # Latin-1, as an old Mac client writes it
    studio.inbox.joinpath(os.fsdecode(b"sub\xe9")).mkdir()
    make_image(studio.inbox / good)
    (studio.inbox / os.fsdecode(b"sub\xe9") / bad).write_bytes(b"")
    with Running(studio.config()):
        wait_for(lambda: len(done_or_failed(log_lines)) == 2, what="both files ended")
    assert os.listdir(os.fsencode(studio.outbox)) == [b"\xff\xfe photo.png"]
    assert os.listdir(os.fsencode(studio.archive)) == [b"\xff\xfe photo.png"]
    errors = os.fsencode(studio.errors / os.fsdecode(b"sub\xe9"))
    assert sorted(os.listdir(errors)) == [b"caf\xe9.png", b"caf\xe9.png.error.json"]
    reason = json.loads(Path(os.fsdecode(errors + b"/caf\xe9.png.error.json")).read_text())
    assert reason["reason"] == "empty"
    assert reason["file"] == "sub\\xe9/caf\\xe9.png"
    assert bytes.fromhex(reason["file_bytes"]) == b"sub\xe9/caf\xe9.png"
    assert [e["file"] for e in log_lines.events("file.done")] == ["\\xff\\xfe photo.png"]
    assert log_lines.events("file.internal_error") == []
    assert sandbox.count(200) == 1


def test_names_too_long_for_a_result_or_a_reason_are_shortened(
        tmp_path: Path, sandbox: Sandbox, log_lines: LogCapture) -> None:
    studio = Studio(tmp_path, sandbox.url, inbox={"output_format": "webp"})
    long_png = "p" * 251 + ".png"  # 255 bytes; its result is .webp, 256
    failing = "f" * 241 + ".png"  # 245 bytes; with .error.json, 256
    make_image(studio.root / "short.png").rename(studio.inbox / long_png)
    (studio.inbox / failing).write_bytes(b"not an image at all")
    with Running(studio.config()):
        wait_for(lambda: len(done_or_failed(log_lines)) == 2, what="both files ended")
    [result] = studio.files(studio.outbox)
    assert result.startswith("p" * 200) and result.endswith(".webp") and "~" in result
    assert len(result.encode()) <= 255
    with Image.open(studio.outbox / result) as image:
        assert image.format == "WEBP" and image.size == (160, 120)
    assert studio.files(studio.archive) == [long_png]
    names = studio.files(studio.errors)
    assert len(names) == 2 and names[1] == names[0] + ".error.json"
    assert names[0].startswith("f" * 200) and "~" in names[0]
    reason = studio.reason(names[0])
    assert reason["reason"] == "not_an_image" and "shortened" in reason["renamed"]
    assert reason["file"] == failing
    assert log_lines.events("destination.unavailable") == []


def test_a_folder_named_like_an_earlier_result_is_a_collision(
        studio: Studio, sandbox: Sandbox, log_lines: LogCapture) -> None:
    (studio.outbox).mkdir()
    (studio.outbox / "clash.png").write_bytes(b"an earlier result")
    make_image(studio.inbox / "clash.png" / "in.png")
    make_image(studio.inbox / "other.png", seed=2)
    with Running(studio.config()):
        wait_for(lambda: len(log_lines.events("file.done")) == 2, what="both done")
    assert studio.files(studio.outbox) == ["clash-1.png/in.png", "clash.png", "other.png"]
    assert (studio.outbox / "clash.png").read_bytes() == b"an earlier result"
    assert log_lines.events("destination.unavailable") == []


def test_a_reason_file_always_describes_the_file_beside_it(
        studio: Studio, sandbox: Sandbox, log_lines: LogCapture) -> None:
    studio.errors.mkdir()
    (studio.errors / "x.png").write_bytes(b"put here by hand, no reason file")
    (studio.errors / "y.png.error.json").write_text('{"reason": "orphan"}')
    (studio.inbox / "x.png").write_bytes(b"")
    (studio.inbox / "y.png").write_bytes(b"junk")
    with Running(studio.config()):
        wait_for(lambda: len(log_lines.events("file.failed")) == 2, what="both failed")
    assert studio.files(studio.errors) == ["x-1.png", "x-1.png.error.json", "x.png",
                                           "y-1.png", "y-1.png.error.json", "y.png.error.json"]
    assert studio.reason("x-1.png")["reason"] == "empty"
    assert studio.reason("y-1.png")["reason"] == "not_an_image"
    assert json.loads((studio.errors / "y.png.error.json").read_text()) == {"reason": "orphan"}


def test_a_replacement_with_the_same_size_and_mtime_is_processed_again(
        studio: Studio, sandbox: Sandbox, log_lines: LogCapture) -> None:
    sandbox.latency = 1.0
    first = make_image(studio.inbox / "same.png", seed=1)
    stamp = first.stat()
    with Running(studio.config()):
        wait_for(lambda: sandbox.count() >= 1 or sandbox.wait_idle(0) is False,
                 what="the request in flight")
        wait_for(lambda: "sending" in studio.states(), what="sending")
        other = studio.root / "other.png"
        make_image(other, seed=3)
        data = other.read_bytes()
        assert len(data) == stamp.st_size, "the test needs two images of one size"
        temp = studio.inbox / ".same.tmp"
        temp.write_bytes(data)
        os.utime(temp, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
        temp.rename(first)
        wait_for(lambda: len(log_lines.events("file.done")) == 2, timeout=20,
                 what="both versions done")
    assert log_lines.events("file.changed") != []
    assert studio.files(studio.archive) == ["same.png"]
    assert hashlib.sha256((studio.archive / "same.png").read_bytes()).hexdigest() == \
        hashlib.sha256(data).hexdigest(), "the archive holds the version it processed last"
    assert studio.files(studio.outbox) == ["same-1.png", "same.png"]
    assert sandbox.count(200) == 2


def test_a_rewrite_in_place_with_the_same_size_and_mtime_is_processed_again(
        studio: Studio, sandbox: Sandbox, log_lines: LogCapture) -> None:
    """Same inode, size and mtime: only the ctime (which no tool can set back) tells the
    original is not what was read and hashed, so the hash is skipped only when it agrees."""
    sandbox.latency = 1.0
    first = make_image(studio.inbox / "same.png", seed=1)
    stamp = first.stat()
    with Running(studio.config()):
        wait_for(lambda: "sending" in studio.states(), what="sending")
        other = studio.root / "other.png"
        make_image(other, seed=3)
        data = other.read_bytes()
        assert len(data) == stamp.st_size, "the test needs two images of one size"
        with first.open("r+b") as handle:  # in place: the inode stays
            handle.write(data)
        os.utime(first, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
        assert first.stat().st_ino == stamp.st_ino
        wait_for(lambda: len(log_lines.events("file.done")) == 2, timeout=20,
                 what="both versions done")
    assert log_lines.events("file.changed") != []
    assert studio.files(studio.archive) == ["same.png"]
