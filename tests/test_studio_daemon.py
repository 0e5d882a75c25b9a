"""Studio originals through the real daemon and the sandbox: one request each, a proxy within
the API's limits, and a full-resolution cut-out of the original's own pixels, checked by
pixels, bit depth, profile bytes and the sandbox's mask scaled up."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import pillow_heif
import pytest
import pyvips
from PIL import Image, ImageOps

from tests.conftest import LogCapture, Running, Studio, make_image, wait_for
from tests.faults import DaemonProcess, wal_flushes_fail
from tests.test_images_studio import (
    answer_for,
    blob,
    check_alpha,
    max_difference_where_opaque,
    read,
    shot,
    vips_of,
)
from watchfolder.dev.samples import adobe_rgb_profile, adobe_rgb_tiff, camera_jpeg
from watchfolder.dev.sandbox import Sandbox
from watchfolder.files.layout import proxy_name
from watchfolder.imaging.compose import make_proxy
from watchfolder.imaging.inspect import MAX_BYTES, MAX_PIXELS, inspect_source
from watchfolder.journal.db import FETCHED, Journal


def _camera(path: Path) -> None:
    path.write_bytes(camera_jpeg(6000, 4300, orientation=6))  # 25.8 MP, stored sideways


def _rotated(path: Path) -> None:
    path.write_bytes(camera_jpeg(600, 400, orientation=8))


def _tiff16(path: Path) -> None:
    path.write_bytes(adobe_rgb_tiff(900, 600))


def _cmyk(path: Path) -> None:
    cmyk = vips_of(shot()).icc_transform("cmyk", input_profile="srgb", embedded=False)
    cmyk.jpegsave(str(path), Q=95)


def _heic(path: Path) -> None:
    pillow_heif.from_pillow(shot(640, 480)).save(str(path), quality=92)


def _upright(path: Path) -> pyvips.Image:
    if path.suffix == ".heic":
        return vips_of(pillow_heif.open_heif(str(path)).to_pillow())
    if path.suffix == ".jpg" and read(path).interpretation != "cmyk":
        with Image.open(path) as stored:
            return vips_of(ImageOps.exif_transpose(stored))
    return read(path)


CASES = [
    ("R5_0001.jpg", _camera, (6000, 4300), "uchar", True),
    ("turned.jpg", _rotated, (600, 400), "uchar", True),
    ("retouch.tif", _tiff16, (900, 600), "ushort", True),
    ("print.jpg", _cmyk, (480, 360), "uchar", False),
    ("phone.heic", _heic, (640, 480), "uchar", True),
]


@pytest.mark.parametrize(("name", "make", "size", "depth", "same_colours"), CASES,
                         ids=[case[0] for case in CASES])
def test_a_studio_original_becomes_a_full_resolution_cut_out_for_one_credit(
        tmp_path: Path, sandbox: Sandbox, log_lines: LogCapture, name: str,
        make: Callable[[Path], None], size: tuple[int, int], depth: str,
        same_colours: bool) -> None:
    studio = Studio(tmp_path, sandbox.url)
    original = tmp_path / name
    make(original)
    kept = tmp_path / "kept" / name  # the archive moves it; keep a copy to compare with
    kept.parent.mkdir()
    kept.write_bytes(original.read_bytes())
    original.rename(studio.inbox / name)
    with Running(studio.config()):
        wait_for(lambda: log_lines.events("file.done"), timeout=60, what="the file done")
    [done] = log_lines.events("file.done")
    assert sandbox.count() == 1 and sandbox.count(200) == 1, "exactly one request"
    [proxy_line] = log_lines.events("file.proxy")
    assert proxy_line["file"] == name

    # What was sent is the proxy the library makes of this original: within the API's limits.
    source = inspect_source(kept)
    proxy = make_proxy(kept, source, tmp_path / "proxy.jpg")
    [request] = sandbox.requests
    assert request.sha256 == hashlib.sha256((tmp_path / "proxy.jpg").read_bytes()).hexdigest()
    assert proxy.width * proxy.height <= MAX_PIXELS and request.size <= MAX_BYTES
    answer = answer_for(tmp_path / "proxy.jpg", tmp_path / "answer.png")

    stem = Path(name).stem
    assert studio.files(studio.outbox) == [f"{stem}.png"]
    assert done["result"] == str(studio.outbox / f"{stem}.png")
    out = read(studio.outbox / f"{stem}.png")
    assert (out.width, out.height) == size, "the original's upright size"
    assert out.format == depth and out.bands == 4
    peak = 65535 if depth == "ushort" else 255
    alpha = check_alpha(out, answer, peak)
    if same_colours:
        assert max_difference_where_opaque(out[0:3], _upright(kept), alpha, peak) == 0
    if source.icc is not None and source.colour != "cmyk":
        assert blob(out, "icc-profile-data") == source.icc
    assert studio.files(studio.archive) == [name]
    assert list((studio.root / "state" / "spool").iterdir()) == [], "proxy and answer gone"


def test_a_16bit_tiff_can_come_out_as_a_16bit_tiff(tmp_path: Path, sandbox: Sandbox,
                                                  log_lines: LogCapture) -> None:
    studio = Studio(tmp_path, sandbox.url, inbox={"output_format": "tiff"})
    _tiff16(studio.inbox / "retouch.tif")
    with Running(studio.config()):
        wait_for(lambda: log_lines.events("file.done"), timeout=60, what="done")
    assert studio.files(studio.outbox) == ["retouch.tif"]
    out = read(studio.outbox / "retouch.tif")
    assert (out.width, out.height, out.bands, out.format) == (900, 600, 4, "ushort")
    assert blob(out, "icc-profile-data") == adobe_rgb_profile()
    assert sandbox.requests[0].accept == "image/png", "the alpha comes from a PNG answer"


def test_the_fast_path_is_unchanged_and_carries_the_capture_metadata(
        tmp_path: Path, sandbox: Sandbox, log_lines: LogCapture) -> None:
    studio = Studio(tmp_path, sandbox.url)
    shot(320, 240).save(studio.root / "plain.jpg", "JPEG", quality=92,
                        exif=_exif_with_copyright())
    (studio.root / "plain.jpg").rename(studio.inbox / "plain.jpg")
    make_image(studio.inbox / "small.png")
    with Running(studio.config()):
        wait_for(lambda: len(log_lines.events("file.done")) == 2, what="both done")
    assert log_lines.events("file.proxy") == [], "nothing went by the studio path"
    assert sandbox.count(200) == 2
    with Image.open(studio.outbox / "plain.png") as result:
        assert result.size == (320, 240) and result.mode == "RGBA"
        assert result.getexif()[0x8298] == "(c) Watchfolder Studio"


def test_an_inbox_without_the_studio_path_refuses_what_the_api_cannot_take(
        tmp_path: Path, sandbox: Sandbox, log_lines: LogCapture) -> None:
    studio = Studio(tmp_path, sandbox.url, inbox={"studio": False})
    _tiff16(studio.inbox / "retouch.tif")
    with Running(studio.config()):
        wait_for(lambda: log_lines.events("file.failed"), what="failed")
    assert studio.reason("retouch.tif")["reason"] == "unsupported_format"
    assert sandbox.count() == 0


def _exif_with_copyright() -> Image.Exif:
    exif = Image.Exif()
    exif[0x8298] = "(c) Watchfolder Studio"
    return exif


def test_a_proxy_is_deleted_only_once_its_answers_fetched_is_on_disk(
        tmp_path: Path, sandbox: Sandbox) -> None:
    """An answer's `fetched` is only written to the WAL; the next fsync makes it durable
    (issue 17). Until then a power cut could roll the file back to `sending`, and the proxy
    is what would be sent again: it is deleted only once `fetched` is on disk, and nothing is
    made of the answer before. Here every flush of the WAL fails (a real EIO, from the shim)
    from the moment the sandbox answers."""
    studio = Studio(tmp_path, sandbox.url)
    _tiff16(studio.inbox / "retouch.tif")
    state = studio.root / "state"
    switch = tmp_path / "flush-fails"
    answered: list[int] = []

    def refuse_flushes(record: object) -> None:  # on the sandbox's thread, before it answers
        answered.append(1)
        switch.touch()

    sandbox.on_request = refuse_flushes
    daemon = DaemonProcess(studio.write_config(),
                           env=wal_flushes_fail(tmp_path, state, switch))
    try:
        daemon.wait_event("state.unavailable", timeout=60)
        journal = Journal.for_reading(state, live=True)
        assert journal is not None
        try:
            wait_for(lambda: [r.state for r in journal.unfinished()] == [FETCHED], timeout=10,
                     what="the answer spooled and journaled (in the WAL)")
            [record] = journal.unfinished()
        finally:
            journal.close()
        proxy = state / "spool" / proxy_name(record.id)
        # The daemon retries while the flushes fail (every STATE_RECHECK_SECONDS, 1 s).
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            assert proxy.exists(), "deleted while its answer's fetched could still be undone"
            assert studio.files(studio.outbox) == [], "made of an answer not yet durable"
            time.sleep(0.05)
        switch.unlink()
        daemon.wait_event("file.done", timeout=60)
        daemon.wait_event("state.recovered", timeout=15)  # the main loop's probe, at latest
    finally:
        code = daemon.stop()
    assert code == 0, "".join(daemon.raw)[-2000:]
    assert not proxy.exists() and list((state / "spool").iterdir()) == []
    out = read(studio.outbox / "retouch.png")
    assert (out.width, out.height, out.bands) == (900, 600, 4)
    assert len(answered) == 1 and sandbox.count(200) == 1, "one request, paid once"


def test_proxies_are_made_no_further_ahead_than_the_request_slots(
        tmp_path: Path, sandbox: Sandbox, log_lines: LogCapture) -> None:
    """A backlog's proxies wait in the spool only as many as the requests that can go next
    (issue 17): the rest are made as slots free, so the spool stays bounded and the local
    workers are free for the composites that finish files."""
    studio = Studio(tmp_path, sandbox.url, api={"concurrency": 1})
    sandbox.latency = 2.0  # the first request stays in flight while we look
    for n in range(5):
        (studio.inbox / f"shot{n}.tif").write_bytes(adobe_rgb_tiff(300 + n, 200))
    with Running(studio.config()):
        wait_for(lambda: len(log_lines.events("file.proxy")) >= 2, timeout=30,
                 what="the proxy in flight and the one next in line")
        time.sleep(1.0)  # a proxy takes milliseconds: more would have been made by now
        assert sandbox.count() == 0, "the first request is still in flight"
        assert len(log_lines.events("file.proxy")) == 2, "one sent, one waiting: no more"
        sandbox.latency = 0.0
        wait_for(lambda: len(log_lines.events("file.done")) == 5, timeout=60, what="all done")
    assert sandbox.count(200) == 5 and len(log_lines.events("file.proxy")) == 5
    assert list((studio.root / "state" / "spool").iterdir()) == []


def test_a_studio_answer_that_does_not_decode_is_asked_for_again(
        tmp_path: Path, sandbox: Sandbox, log_lines: LogCapture) -> None:
    """A studio answer is decoded once, by the composite on the local lane (send checks its
    size, end and CRCs only, issue 17): one whose pixel data does not decode is refused
    there as send refuses a bad answer, an attempt counted, and asked for again; nothing is
    made of it."""
    studio = Studio(tmp_path, sandbox.url)
    sandbox.add_faults("undecodable")
    _tiff16(studio.inbox / "retouch.tif")
    with Running(studio.config()):
        wait_for(lambda: log_lines.events("file.done"), timeout=60, what="the file done")
    [retry] = log_lines.events("file.retry")
    assert retry["reason"] == "bad_result" and retry["attempt"] == 1
    assert "does not decode completely" in retry["message"]
    assert sandbox.count(200) == 2, "the refused answer, then the good one"
    assert len(log_lines.events("file.proxy")) == 2, "a new proxy for the second request"
    out = read(studio.outbox / "retouch.png")
    assert (out.width, out.height) == (900, 600) and out.bands == 4
    assert list((studio.root / "state" / "spool").iterdir()) == []


def test_studio_answers_that_never_decode_fail_the_file_after_the_attempts(
        tmp_path: Path, sandbox: Sandbox, log_lines: LogCapture) -> None:
    studio = Studio(tmp_path, sandbox.url)
    sandbox.add_faults("undecodable", "undecodable", "undecodable")
    _tiff16(studio.inbox / "retouch.tif")
    with Running(studio.config()):
        wait_for(lambda: (studio.errors / "retouch.tif.error.json").exists(), timeout=60,
                 what="the file in errors")
    reason = studio.reason("retouch.tif")
    assert reason["reason"] == "bad_result"
    assert "gave up after 3 attempts" in reason["message"]
    assert "does not decode completely" in reason["message"]
    assert sandbox.count(200) == 3, "max_attempts requests, no more"
    assert os.listdir(studio.outbox) == []
    assert list((studio.root / "state" / "spool").iterdir()) == []
