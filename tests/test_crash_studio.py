"""SIGKILL at every step boundary of the studio path (proxy, request, answer, full-resolution
cut-out, archive), then a restart: every file ends once, full size, no twin, and at most the
one request in flight at the crash is paid again."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Studio, make_image
from tests.test_crash_points import run
from tests.test_images_studio import read
from watchfolder.dev.samples import adobe_rgb_tiff, camera_jpeg
from watchfolder.dev.sandbox import Sandbox

POINTS = ["proxied", "sending", "answered", "spooled", "fetched", "result-placed", "stored",
          "archived"]


@pytest.mark.parametrize("point", POINTS)
def test_crash_on_the_studio_path_then_restart(tmp_path: Path, sandbox: Sandbox,
                                               point: str) -> None:
    studio = Studio(tmp_path, sandbox.url, api={"concurrency": 1})
    (studio.inbox / "turned.jpg").write_bytes(camera_jpeg(300, 200, orientation=6))
    (studio.inbox / "retouch.tif").write_bytes(adobe_rgb_tiff(240, 160))
    make_image(studio.inbox / "plain.png")
    config = studio.write_config()

    crashed = run(config, failpoint=f"{point}:2")
    assert crashed.returncode == -9, f"the failpoint {point} was not reached: {crashed.stderr}"
    again = run(config)
    assert again.returncode == 0, again.stderr

    assert studio.files(studio.inbox) == []
    assert studio.files(studio.errors) == []
    assert studio.files(studio.archive) == ["plain.png", "retouch.tif", "turned.jpg"]
    assert studio.files(studio.outbox) == ["plain.png", "retouch.png", "turned.png"], \
        "one result each, no '-1' twin"
    sizes = {name: (read(studio.outbox / name).width, read(studio.outbox / name).height)
             for name in ("retouch.png", "turned.png")}
    assert sizes == {"retouch.png": (240, 160), "turned.png": (300, 200)}  # upright
    hidden = [p for root in (studio.outbox, studio.archive) for p in root.rglob(".*")]
    assert hidden == [], "no temp file left behind"
    assert 3 <= sandbox.count(200) <= 4
    assert os.listdir(studio.root / "state" / "spool") == [], "no proxy or answer left"


def test_a_restart_keeps_the_proxies_of_proxied_files(tmp_path: Path, sandbox: Sandbox) -> None:
    """A file that stopped `proxied` (its proxy made and journaled, not yet sent) is sent
    with that proxy after a restart: the start-up clean-up of the spool keeps it."""
    studio = Studio(tmp_path, sandbox.url, api={"concurrency": 1})
    (studio.inbox / "retouch.tif").write_bytes(adobe_rgb_tiff(240, 160))
    config = studio.write_config()

    crashed = run(config, failpoint="proxied:1")
    assert crashed.returncode == -9, f"the failpoint was not reached: {crashed.stderr}"
    assert [e for e in _events(crashed.stderr) if e["event"] == "file.proxy"]
    assert studio.states() == ["proxied"]
    again = run(config)
    assert again.returncode == 0, again.stderr
    assert [e["event"] for e in _events(again.stderr) if e["event"] == "file.proxy"] == [], \
        "the proxy was made again"
    assert studio.files(studio.outbox) == ["retouch.png"]
    assert sandbox.count(200) == 1
    assert os.listdir(studio.root / "state" / "spool") == []


def _events(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
