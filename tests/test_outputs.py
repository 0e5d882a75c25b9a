"""Output recipes and hand-off through the real daemon: several outputs from one request,
manifests and done markers (with the first output's -N), reuse, hooks and a signed webhook."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sys
import threading
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from PIL import Image

from tests.conftest import LogCapture, Running, Studio, make_image, wait_for
from tests.test_crash_points import run
from watchfolder.dev.sandbox import Sandbox

RECIPE = [
    {"format": "png"},
    {"name": "{dir}/{stem}_white.{ext}", "format": "jpeg", "background": "#ffffff",
     "crop": "subject", "margin": "10%", "size": "300x300"},
    {"name": "{dir}/{stem}_web.{ext}", "format": "webp", "max_size": 80},
    {"name": "masks/{dir}/{stem}_mask.{ext}", "format": "png", "mask": True},
]


def _load(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image.copy()


def recipe_studio(tmp_path: Path, url: str, **extra: Any) -> Studio:
    return Studio(tmp_path, url, inbox={"outputs": RECIPE, "manifest": True,
                                        "done_marker": True}, **extra)


def test_one_request_makes_every_output_of_the_recipe(tmp_path: Path, sandbox: Sandbox,
                                                      log_lines: LogCapture) -> None:
    studio = recipe_studio(tmp_path, sandbox.url)
    make_image(studio.inbox / "shoot" / "shot.png", size=(200, 150))
    original = _load(studio.inbox / "shoot" / "shot.png").convert("RGB")
    with Running(studio.config()):
        wait_for(lambda: log_lines.events("file.done"), what="done")
    assert sandbox.count() == 1
    assert studio.files(studio.outbox) == [
        "masks/shoot/shot_mask.png", "shoot/shot.done", "shoot/shot.json", "shoot/shot.png",
        "shoot/shot_web.webp", "shoot/shot_white.jpg"]
    cut = _load(studio.outbox / "shoot" / "shot.png")
    assert cut.size == (200, 150) and cut.mode == "RGBA"
    alpha = cut.getchannel("A")

    white = _load(studio.outbox / "shoot" / "shot_white.jpg")
    assert white.size == (300, 300) and white.mode == "RGB"
    for corner in ((1, 1), (298, 1), (1, 298), (298, 298)):
        assert all(v >= 250 for v in white.getpixel(corner)), "pure white background"
    # The subject (a disc, 100x75, plus 10% margin) fills the canvas's width: its centre
    # pixel is the original's colour within JPEG's rounding.
    centre = white.getpixel((150, 150))
    expected = original.getpixel((100, 75))
    assert max(abs(a - b) for a, b in zip(centre, expected, strict=True)) <= 6

    web = _load(studio.outbox / "shoot" / "shot_web.webp")
    assert web.size == (80, 60) and web.mode == "RGBA"
    mask = _load(studio.outbox / "masks" / "shoot" / "shot_mask.png")
    assert mask.mode == "L" and mask.size == (200, 150)
    assert mask.tobytes() == alpha.tobytes(), "the mask is the cut-out's alpha"

    manifest = json.loads((studio.outbox / "shoot" / "shot.json").read_text())
    assert manifest["version"] == 1 and manifest["event"] == "done"
    assert manifest["source"]["path"] == str(studio.inbox / "shoot" / "shot.png")
    assert (manifest["source"]["width"], manifest["source"]["height"]) == (200, 150)
    assert manifest["credits_spent"] == 1
    listed = {Path(o["path"]).name: o for o in manifest["outputs"]}
    assert sorted(listed) == ["shot.png", "shot_mask.png", "shot_web.webp", "shot_white.jpg"]
    for output in manifest["outputs"]:
        assert hashlib.sha256(Path(output["path"]).read_bytes()).hexdigest() == output["sha256"]
    assert (listed["shot_white.jpg"]["format"], listed["shot_white.jpg"]["width"]) == ("jpeg",
                                                                                       300)
    marker = (studio.outbox / "shoot" / "shot.done").read_text().strip()
    assert marker == manifest["id"]


def test_collisions_and_the_same_content_again(tmp_path: Path, sandbox: Sandbox,
                                               log_lines: LogCapture) -> None:
    studio = recipe_studio(tmp_path, sandbox.url)
    studio.outbox.mkdir()
    (studio.outbox / "shot.png").write_bytes(b"somebody else's file")
    make_image(studio.inbox / "shot.png")
    with Running(studio.config()):
        wait_for(lambda: log_lines.events("file.done"), what="first done")
        make_image(studio.inbox / "again.png")  # the same content under another name
        wait_for(lambda: len(log_lines.events("file.done")) == 2, what="second done")
    assert sandbox.count() == 1, "the same content costs nothing"
    names = studio.files(studio.outbox)
    assert {"shot-1.png", "shot-1.json", "shot-1.done", "shot.png"} <= set(names)
    assert {"again.png", "again_white.jpg", "again_web.webp", "again.json",
            "again.done"} <= set(names)
    assert (studio.outbox / "shot.png").read_bytes() == b"somebody else's file"
    again = json.loads((studio.outbox / "again.json").read_text())
    first = json.loads((studio.outbox / "shot-1.json").read_text())
    assert again["credits_spent"] == 0 and first["credits_spent"] == 1
    assert again["id"] != first["id"]
    assert [o["sha256"] for o in again["outputs"]] == [o["sha256"] for o in first["outputs"]]


@pytest.mark.parametrize("point", ["result-placed", "stored", "marked"])
def test_a_crash_between_outputs_makes_none_twice_and_none_missing(
        tmp_path: Path, sandbox: Sandbox, point: str) -> None:
    studio = recipe_studio(tmp_path, sandbox.url, api={"concurrency": 1})
    make_image(studio.inbox / "a.png", seed=1)
    make_image(studio.inbox / "b.png", seed=2)
    config = studio.write_config()
    crashed = run(config, failpoint=f"{point}:2")
    assert crashed.returncode == -9, crashed.stderr
    again = run(config)
    assert again.returncode == 0, again.stderr
    expected = [f"{stem}{tail}" for stem in "ab" for tail in (
        ".png", "_white.jpg", "_web.webp", ".json", ".done")]
    expected += ["masks/a_mask.png", "masks/b_mask.png"]
    assert studio.files(studio.outbox) == sorted(expected)
    assert 2 <= sandbox.count(200) <= 3


@pytest.mark.parametrize("nth", [2, 3])
def test_a_crash_while_outputs_are_encoded_together_makes_none_twice_and_none_missing(
        tmp_path: Path, sandbox: Sandbox, nth: int) -> None:
    from watchfolder.dev.samples import adobe_rgb_tiff

    # A studio file (16-bit): the PNG makes the cut-out, held in memory; the TIFF, the mask
    # and the crop read it and are encoded two at a time. Killed as the 2nd or the 3rd
    # output is placed (one of those made together, another maybe half-written).
    studio = Studio(tmp_path, sandbox.url, api={"concurrency": 1}, inbox={"outputs": [
        {"format": "png"},
        {"name": "{dir}/{stem}_retouch.{ext}", "format": "tiff"},
        {"name": "{dir}/{stem}_mask.{ext}", "format": "png", "mask": True},
        {"name": "{dir}/{stem}_white.{ext}", "format": "jpeg", "background": "#ffffff",
         "crop": "subject", "margin": "10%"}]})
    (studio.inbox / "shot.tif").write_bytes(adobe_rgb_tiff(900, 600))
    config = studio.write_config()
    crashed = run(config, failpoint=f"result-placed:{nth}")
    assert crashed.returncode == -9, crashed.stderr
    placed = studio.files(studio.outbox)
    assert nth <= len(placed) <= nth + 1, placed  # one more may be placed beside it
    again = run(config)
    assert again.returncode == 0, again.stderr
    assert studio.files(studio.outbox) == ["shot.png", "shot_mask.png", "shot_retouch.tif",
                                           "shot_white.jpg"]
    assert sandbox.count(200) == 1, "the spooled answer made the rest"
    assert list((studio.root / "state" / "spool").iterdir()) == [], "nothing kept behind"


def test_hooks_get_the_manifest_and_the_facts(tmp_path: Path, sandbox: Sandbox,
                                              log_lines: LogCapture) -> None:
    dump = tmp_path / "hook.py"
    dump.write_text(
        "import json, os, sys\n"
        "data = {k: v for k, v in os.environ.items() if k.startswith('WATCHFOLDER_')}\n"
        "data['stdin'] = sys.stdin.read()\n"
        f"out = {str(tmp_path)!r} + '/ran-' + data['WATCHFOLDER_EVENT'] + '.json'\n"
        "open(out, 'w').write(json.dumps(data))\n")
    hooks = {"on_done": [sys.executable, str(dump)], "on_failed": [sys.executable, str(dump)]}
    studio = Studio(tmp_path, sandbox.url, hooks=hooks, inbox={"manifest": True})
    make_image(studio.inbox / "good.png")
    (studio.inbox / "bad.png").write_bytes(b"")
    with Running(studio.config()):
        wait_for(lambda: (tmp_path / "ran-done.json").exists()
                 and (tmp_path / "ran-failed.json").exists(), what="both hooks ran")
    done = json.loads((tmp_path / "ran-done.json").read_text())
    assert done["WATCHFOLDER_SOURCE"] == str(studio.inbox / "good.png")
    assert json.loads(done["WATCHFOLDER_OUTPUTS"]) == [str(studio.outbox / "good.png")]
    assert done["WATCHFOLDER_MANIFEST"] == str(studio.outbox / "good.json")
    assert json.loads(done["stdin"]) == json.loads((studio.outbox / "good.json").read_text())
    failed = json.loads((tmp_path / "ran-failed.json").read_text())
    manifest = json.loads(failed["stdin"])
    assert manifest["event"] == "failed" and manifest["reason"] == "empty"
    assert manifest["outputs"] == [] and "WATCHFOLDER_MANIFEST" not in failed
    assert not (studio.outbox / "bad.json").exists(), "a failure has no manifest in the outbox"


class _Receiver(BaseHTTPRequestHandler):
    seen: ClassVar[list[tuple[dict[str, str], bytes]]] = []
    fail_first = 0

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).seen.append((dict(self.headers), body))
        status = 500 if type(self).fail_first > 0 else 200
        type(self).fail_first -= 1
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        """Quiet."""


def test_a_signed_webhook_survives_a_500_and_a_restart(tmp_path: Path, sandbox: Sandbox) -> None:
    _Receiver.seen = []
    _Receiver.fail_first = 1
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        os.environ["WATCHFOLDER_TEST_SECRET"] = "s3cret-value-for-tests"
        studio = Studio(tmp_path, sandbox.url,
                        webhook={"url": url, "secret": "${WATCHFOLDER_TEST_SECRET}"})
        make_image(studio.inbox / "one.png")
        with Running(studio.config()):
            wait_for(lambda: len(_Receiver.seen) == 1, what="the first try, answered 500")
        assert _Receiver.fail_first == 0
        with Running(studio.config()):  # a restart: the delivery was journaled, not lost
            wait_for(lambda: len(_Receiver.seen) == 2, timeout=15, what="the retry")
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
        os.environ.pop("WATCHFOLDER_TEST_SECRET", None)
    ids = {json.loads(body)["id"] for _, body in _Receiver.seen}
    assert len(ids) == 1 and len(_Receiver.seen) == 2, "the same id, twice: 500 then 200"
    assert json.loads(_Receiver.seen[0][1])["event"] == "done"
    for headers, body in _Receiver.seen:
        digest = hmac.new(b"s3cret-value-for-tests", body, hashlib.sha256).hexdigest()
        assert headers["X-Watchfolder-Signature"] == f"sha256={digest}"


def test_a_restart_clears_temp_files_in_every_output_folder(tmp_path: Path,
                                                            sandbox: Sandbox) -> None:
    """A crash while an output was being written leaves a hidden temp file beside its name,
    in whichever outbox and folder the output's template names: the restart removes it."""
    (tmp_path / "thumbs").mkdir()
    studio = Studio(tmp_path, sandbox.url, api={"concurrency": 1}, inbox={"outputs": [
        {"format": "png"},
        {"name": "masks/{dir}/{stem}_mask.{ext}", "format": "png", "mask": True},
        {"name": "{date}/{stem}-{hash}.{ext}", "format": "webp", "outbox": "thumbs"}]})
    make_image(studio.inbox / "sub" / "a.png", seed=1)
    config = studio.write_config()
    crashed = run(config, failpoint="fetched:1")
    assert crashed.returncode == -9, crashed.stderr
    day = datetime.now().astimezone().strftime("%Y-%m-%d")
    left = [folder / ".watchfolder-0123456789ab.tmp" for folder in (
        studio.outbox / "sub", studio.outbox / "masks" / "sub", tmp_path / "thumbs" / day)]
    for temp in left:
        temp.parent.mkdir(parents=True, exist_ok=True)
        temp.write_bytes(b"half an output")
    again = run(config)
    assert again.returncode == 0, again.stderr
    assert [temp for temp in left if temp.exists()] == []
    assert studio.files(studio.outbox) == ["masks/sub/a_mask.png", "sub/a.png"]
    assert len(studio.files(tmp_path / "thumbs")) == 1
    assert sandbox.count(200) == 1


@pytest.mark.parametrize("in_memory", [True, False])
def test_a_studio_recipe_shares_one_cut_out_and_leaves_nothing_behind(
        tmp_path: Path, sandbox: Sandbox, log_lines: LogCapture, monkeypatch: pytest.MonkeyPatch,
        in_memory: bool) -> None:
    import pyvips

    from watchfolder.dev.samples import adobe_rgb_profile, adobe_rgb_tiff
    from watchfolder.pipeline import outputs

    if not in_memory:  # as a cut-out too big to hold in memory is kept: beside the answer
        monkeypatch.setattr(outputs, "SHARED_IN_MEMORY", 0)
    studio = Studio(tmp_path, sandbox.url, inbox={"outputs": [
        {"format": "png"},
        {"name": "{dir}/{stem}_retouch.{ext}", "format": "tiff"},
        {"name": "{dir}/{stem}_mask.{ext}", "format": "png", "mask": True}]})
    (studio.inbox / "shot.tif").write_bytes(adobe_rgb_tiff(900, 600))  # 16-bit: studio path
    with Running(studio.config()) as daemon:
        wait_for(lambda: log_lines.events("file.done"), timeout=60, what="done")
    assert sandbox.count() == 1
    assert studio.files(studio.outbox) == ["shot.png", "shot_mask.png", "shot_retouch.tif"]
    png, tif, mask = (pyvips.Image.new_from_file(str(studio.outbox / name)).copy_memory()
                      for name in ("shot.png", "shot_retouch.tif", "shot_mask.png"))
    assert (png.width, png.height, png.bands, png.format) == (900, 600, 4, "ushort")
    assert (png - tif).abs().max() == 0, "the same cut-out in both formats"
    assert (mask - png[3]).abs().max() == 0 and mask.bands == 1
    for image in (png, tif):
        assert bytes(image.get("icc-profile-data")) == adobe_rgb_profile()
    assert list((studio.root / "state" / "spool").iterdir()) == [], "nothing kept behind"
    assert daemon.pipeline is not None
    assert not [key for key in daemon.pipeline.ctx.cutouts.held()
                if str(key).startswith(str(studio.root))]
