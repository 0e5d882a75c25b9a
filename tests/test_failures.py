"""Fault injection: every API outcome, bad input and a broken destination, against the real
daemon and the sandbox answering each status."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import KEY, LogCapture, Running, Studio, make_image, wait_for
from watchfolder.dev.sandbox import Sandbox

# -- bad input is caught locally, for free ---------------------------------------------------


def _truncated_jpeg(path: Path) -> None:
    make_image(path, fmt="JPEG", size=(400, 300))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _gif(path: Path) -> None:
    Image.new("RGB", (20, 20), "red").save(path, "GIF")


def _too_many_pixels(path: Path) -> None:
    Image.new("1", (5001, 5001)).save(path, "PNG")  # 25.01 MP, a few KB


def _too_large(path: Path) -> None:
    from PIL.PngImagePlugin import PngInfo

    padding = PngInfo()
    padding.add_text("padding", "x" * 30_000_001)  # a valid PNG over 30 MB, read strictly
    Image.new("RGB", (64, 48), "red").save(path, "PNG", pnginfo=padding)


@pytest.mark.parametrize(("name", "write", "reason", "studio_path"), [
    ("empty.png", lambda p: p.write_bytes(b""), "empty", True),
    ("notes.jpg", lambda p: p.write_text("not an image at all"), "not_an_image", True),
    ("anim.gif", _gif, "unsupported_format", True),
    # Over the API's limits: the studio path takes them; an inbox without it refuses them.
    ("huge.png", _too_many_pixels, "too_many_pixels", False),
    ("big.png", _too_large, "too_large", False),
    ("cut.jpg", _truncated_jpeg, "corrupt", True),
])
def test_bad_input_goes_to_errors_without_a_request(tmp_path: Path, sandbox: Sandbox,
                                                    name: str, write: object,
                                                    reason: str, studio_path: bool) -> None:
    studio = Studio(tmp_path, sandbox.url, inbox={"studio": studio_path})
    write(studio.inbox / name)  # type: ignore[operator]
    with Running(studio.config()):
        wait_for(lambda: studio.files(studio.errors) == [name, f"{name}.error.json"],
                 what=f"{name} in errors")
    report = studio.reason(name)
    assert report["reason"] == reason
    assert report["status"] is None
    assert report["attempts"] == 0
    assert report["source"] == str(studio.inbox / name)
    assert report["failed_at"].endswith("+00:00")
    assert len(report["message"]) > 10
    assert sandbox.count() == 0


# -- each API status has its policy ------------------------------------------------------------


def test_400_fails_the_file_with_the_api_message(studio: Studio, sandbox: Sandbox) -> None:
    sandbox.add_faults(400)
    make_image(studio.inbox / "bad.png")
    with Running(studio.config()):
        wait_for(lambda: (studio.errors / "bad.png.error.json").exists())
    report = studio.reason("bad.png")
    assert report["status"] == 400
    assert report["reason"] == "api_rejected"
    assert report["message"]  # the sandbox's own words
    assert sandbox.count() == 1


def test_406_fails_the_file_and_names_the_format(tmp_path: Path, sandbox: Sandbox,
                                                 log_lines: LogCapture) -> None:
    studio = Studio(tmp_path, sandbox.url, inbox={"output_format": "webp"})
    sandbox.add_faults(406)
    make_image(studio.inbox / "a.png")
    with Running(studio.config()):
        wait_for(lambda: (studio.errors / "a.png.error.json").exists())
    assert studio.reason("a.png")["reason"] == "format_not_acceptable"
    warnings = log_lines.events("api.format_refused")
    assert len(warnings) == 1 and warnings[0]["output_format"] == "webp"


@pytest.mark.parametrize("fault", [500, 502, 503, "500-empty", "500-html", "reset",
                                   "truncated", "garbage", "wrong-size", "undecodable"])
def test_transient_faults_are_retried(studio: Studio, sandbox: Sandbox, fault: object) -> None:
    sandbox.add_faults(fault, fault)  # type: ignore[arg-type]
    make_image(studio.inbox / "shot.png")
    with Running(studio.config()):
        wait_for(lambda: studio.files(studio.archive) == ["shot.png"], what="recovery")
    assert sandbox.count() == 3
    with Image.open(studio.outbox / "shot.png") as result:
        result.load()
        assert result.size == (160, 120)
    assert studio.files(studio.errors) == []


def test_a_hanging_server_times_out_and_is_retried(tmp_path: Path, sandbox: Sandbox) -> None:
    studio = Studio(tmp_path, sandbox.url, api={"timeout_seconds": 0.5})
    sandbox.hang_seconds = 3
    sandbox.add_faults("hang")
    make_image(studio.inbox / "shot.png")
    with Running(studio.config()):
        wait_for(lambda: studio.files(studio.archive) == ["shot.png"], what="retry after hang")
    assert sandbox.count() == 2


def test_transient_faults_give_up_after_max_attempts(studio: Studio, sandbox: Sandbox) -> None:
    sandbox.add_faults(500, 500, 500, 500)
    make_image(studio.inbox / "doomed.png")
    with Running(studio.config()):
        wait_for(lambda: (studio.errors / "doomed.png.error.json").exists())
    report = studio.reason("doomed.png")
    assert report["reason"] == "server_error"
    assert report["status"] == 500
    assert report["attempts"] == 3
    assert sandbox.count() == 3
    assert studio.files(studio.outbox) == []


@pytest.mark.parametrize("fault", [429, "429-date", "429-none"])
def test_429_holds_everything_and_is_never_a_failure(tmp_path: Path, sandbox: Sandbox,
                                                      fault: object) -> None:
    # max_attempts 1: had a 429 counted as an attempt, the file would fail.
    studio = Studio(tmp_path, sandbox.url, retry={"max_attempts": 1, "backoff_seconds": 0.5,
                                                        "max_backoff_seconds": 1})
    sandbox.add_faults(fault, fault)  # type: ignore[arg-type]
    make_image(studio.inbox / "shot.png")
    with Running(studio.config()):
        wait_for(lambda: studio.files(studio.archive) == ["shot.png"], what="success")
    times = [r.time for r in sandbox.requests]
    assert len(times) == 3
    assert times[1] - times[0] >= 0.45, "the limiter waited before the next request"
    assert studio.files(studio.errors) == []


def test_credits_run_out_mid_batch_then_resume(studio: Studio, sandbox: Sandbox,
                                               log_lines: LogCapture) -> None:
    sandbox.set_credits(KEY, 3)
    for n in range(8):
        make_image(studio.inbox / f"f{n}.png", seed=n)
    with Running(studio.config()) as daemon:
        wait_for(lambda: len(studio.files(studio.archive)) == 3, what="three done")
        wait_for(lambda: daemon.pipeline and daemon.pipeline.queue.paused, what="paused")
        wait_for(lambda: sandbox.count(402) >= 3, what="probes while paused")
        assert len(studio.files(studio.inbox)) == 5, "files wait in the inbox"
        assert studio.files(studio.errors) == [], "no file fails for an account problem"
        sandbox.set_credits(KEY, 100)
        wait_for(lambda: len(studio.files(studio.archive)) == 8, what="resume by itself")
    assert len(log_lines.events("account.paused")) == 1, "logged loudly once"
    assert len(log_lines.events("account.resumed")) == 1
    assert studio.files(studio.errors) == []


@pytest.mark.parametrize("status", [401, 403])
def test_key_problems_pause_without_failing_files(studio: Studio, sandbox: Sandbox,
                                                  status: int) -> None:
    sandbox.add_faults(status, status, status)
    for n in range(3):
        make_image(studio.inbox / f"f{n}.png", seed=n)
    with Running(studio.config()) as daemon:
        wait_for(lambda: daemon.pipeline and daemon.pipeline.queue.paused, what="paused")
        wait_for(lambda: len(studio.files(studio.archive)) == 3, what="resumed after probes")
    assert studio.files(studio.errors) == []


def test_revoked_key_pauses_until_it_works_again(studio: Studio, sandbox: Sandbox) -> None:
    sandbox.keys = ["another-key"]
    make_image(studio.inbox / "a.png")
    with Running(studio.config()):
        wait_for(lambda: sandbox.count(403) >= 2, what="probes with the refused key")
        assert studio.files(studio.inbox) == ["a.png"]
        sandbox.keys = [KEY]
        wait_for(lambda: studio.files(studio.archive) == ["a.png"], what="resume")


# -- destinations that break under the running daemon ------------------------------------------


def test_outbox_deleted_while_running_then_back(studio: Studio, sandbox: Sandbox,
                                                log_lines: LogCapture) -> None:
    with Running(studio.config()):
        make_image(studio.inbox / "first.png")
        wait_for(lambda: studio.files(studio.archive) == ["first.png"])
        shutil.rmtree(studio.outbox)
        make_image(studio.inbox / "second.png", seed=2)
        wait_for(lambda: log_lines.events("destination.unavailable"), what="a loud report")
        assert sandbox.count() == 1, "no credit is spent while the outbox is gone"
        assert studio.files(studio.inbox) == ["second.png"]
        studio.outbox.mkdir()
        wait_for(lambda: "second.png" in studio.files(studio.archive), what="recovery")
    assert log_lines.events("destination.recovered")
    assert studio.files(studio.outbox) == ["second.png"]


def test_errors_folder_missing_keeps_the_file_waiting(studio: Studio, sandbox: Sandbox,
                                                      log_lines: LogCapture) -> None:
    with Running(studio.config()):
        shutil.rmtree(studio.errors)
        (studio.inbox / "bad.png").write_text("nope")
        reported = wait_for(lambda: log_lines.events("destination.unavailable"),
                            what="the missing errors folder reported")
        assert reported[0]["folder"] == str(studio.errors)
        assert (studio.inbox / "bad.png").exists(), "the file waits in the inbox"
        studio.errors.mkdir()
        wait_for(lambda: (studio.errors / "bad.png.error.json").exists(), timeout=15)
    assert not (studio.inbox / "bad.png").exists()


def test_results_are_validated_before_anything_is_written(studio: Studio,
                                                          sandbox: Sandbox) -> None:
    sandbox.add_faults("garbage", "wrong-size", "truncated")
    make_image(studio.inbox / "shot.png")
    with Running(studio.config()):
        wait_for(lambda: (studio.errors / "shot.png.error.json").exists())
    assert studio.reason("shot.png")["reason"] in ("bad_result", "transport_error")
    assert studio.files(studio.outbox) == []
    assert os.listdir(studio.outbox) == []


def test_a_fast_path_answer_that_does_not_decode_is_refused_before_anything_is_made(
        studio: Studio, sandbox: Sandbox, log_lines: LogCapture) -> None:
    """Send checks an answer's size, end and CRCs; its complete decode is checked by store,
    off the path to the slot's next request, before anything is made of it: an answer whose
    pixel data does not decode is refused each time (an attempt counted), and after the
    attempts the file fails with nothing in the outbox and nothing left in the spool."""
    sandbox.add_faults("undecodable", "undecodable", "undecodable")
    make_image(studio.inbox / "shot.png")
    with Running(studio.config()):
        wait_for(lambda: (studio.errors / "shot.png.error.json").exists())
    reason = studio.reason("shot.png")
    assert reason["reason"] == "bad_result" and reason["attempts"] == 3
    assert "does not decode completely" in reason["message"]
    assert [event["attempt"] for event in log_lines.events("file.retry")] == [1, 2]
    assert sandbox.count(200) == 3, "max_attempts requests, no more"
    assert os.listdir(studio.outbox) == []
    assert list((studio.root / "state" / "spool").iterdir()) == []


def test_error_report_never_holds_the_key(studio: Studio, sandbox: Sandbox,
                                          log_lines: LogCapture) -> None:
    sandbox.add_faults(500, 500, 500)
    make_image(studio.inbox / "x.png")
    with Running(studio.config()):
        wait_for(lambda: (studio.errors / "x.png.error.json").exists())
    assert KEY not in (studio.errors / "x.png.error.json").read_text()
    assert KEY not in log_lines.getvalue()


def test_jpeg_result_has_no_alpha_but_right_size(tmp_path: Path, sandbox: Sandbox) -> None:
    studio = Studio(tmp_path, sandbox.url, inbox={"output_format": "jpeg"})
    make_image(studio.inbox / "a.webp", fmt="WEBP")
    with Running(studio.config()):
        wait_for(lambda: studio.files(studio.outbox) == ["a.jpg"])
    with Image.open(io.BytesIO((studio.outbox / "a.jpg").read_bytes())) as image:
        assert image.format == "JPEG" and image.size == (160, 120)


def test_wrong_endpoint_pauses_instead_of_failing_every_file(studio: Studio,
                                                             sandbox: Sandbox) -> None:
    sandbox.add_faults(404, 404)
    for n in range(3):
        make_image(studio.inbox / f"f{n}.png", seed=n)
    with Running(studio.config()) as daemon:
        wait_for(lambda: daemon.pipeline and daemon.pipeline.queue.paused, what="paused")
        assert daemon.pipeline is not None and daemon.pipeline.queue.paused is not None
        assert daemon.pipeline.queue.paused.reason == "endpoint_missing"
        wait_for(lambda: len(studio.files(studio.archive)) == 3, what="resumed")
    assert studio.files(studio.errors) == []


def test_inbox_deleted_while_running_is_watched_again(tmp_path: Path, sandbox: Sandbox,
                                                      log_lines: LogCapture) -> None:
    studio = Studio(tmp_path, sandbox.url, rescan_seconds=0.2)
    with Running(studio.config()) as daemon:
        shutil.rmtree(studio.inbox)
        wait_for(lambda: log_lines.events("inbox.missing"), what="the loss reported")
        studio.inbox.mkdir()
        wait_for(lambda: log_lines.events("inbox.back"), what="the return noticed")
        wait_for(lambda: daemon.watcher is not None and daemon.watcher.alive(),
                 what="a live watch again")
        make_image(studio.inbox / "after.png")
        wait_for(lambda: studio.files(studio.archive) == ["after.png"], what="processing")


def test_low_credits_are_warned_once(tmp_path: Path, sandbox: Sandbox,
                                     log_lines: LogCapture) -> None:
    studio = Studio(tmp_path, sandbox.url, api={"low_credits_warning": 8, "concurrency": 1})
    sandbox.set_credits(KEY, 10)
    for n in range(5):
        make_image(studio.inbox / f"f{n}.png", seed=n)
    with Running(studio.config()):
        wait_for(lambda: len(studio.files(studio.archive)) == 5, what="five done")
    warnings = log_lines.events("credits.low")
    assert len(warnings) == 1
    assert warnings[0]["credits_remaining"] == 7
    assert sorted(e["credits_remaining"] for e in log_lines.events("file.done")) == [5, 6, 7, 8, 9]
