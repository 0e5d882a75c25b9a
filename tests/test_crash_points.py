"""SIGKILL at every step boundary of a file's life, deterministically (see failpoints.py),
then a restart: every file ends in exactly one place, complete, with exactly one result."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import Studio, make_image
from watchfolder.dev.sandbox import Sandbox

GOOD = 4
POINTS = ["sending", "answered", "spooled", "fetched", "result-placed", "stored",
          "moved-linked", "archived", "reason-written", "error-moved"]


def run(config: Path, *extra: str,
        failpoint: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WATCHFOLDER_FAILPOINT": failpoint or ""}
    return subprocess.run([sys.executable, "-m", "watchfolder", "run", "--config", str(config),
                           "--once", *extra], capture_output=True, text=True, timeout=60,
                          env=env, check=False)


@pytest.mark.parametrize("point", POINTS)
def test_crash_at_each_step_then_restart(tmp_path: Path, sandbox: Sandbox, point: str) -> None:
    studio = Studio(tmp_path, sandbox.url, api={"concurrency": 1})
    originals = {}
    for n in range(GOOD):
        path = make_image(studio.inbox / "sub" / f"img{n}.png", seed=n)
        originals[f"sub/img{n}.png"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (studio.inbox / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (studio.inbox / "sub" / "empty.png").write_bytes(b"")
    config = studio.write_config()

    crashed = run(config, failpoint=f"{point}:2")
    assert crashed.returncode == -9, f"the failpoint {point} was not reached: {crashed.stderr}"

    again = run(config)
    assert again.returncode in (0, 1), again.stderr
    assert studio.files(studio.inbox) == []
    assert studio.files(studio.errors) == ["broken.jpg", "broken.jpg.error.json",
                                           "sub/empty.png", "sub/empty.png.error.json"]
    assert studio.reason("broken.jpg")["reason"] == "corrupt"
    assert studio.reason("sub/empty.png")["reason"] == "empty"
    assert studio.files(studio.archive) == sorted(originals)
    for rel, digest in originals.items():
        assert hashlib.sha256((studio.archive / rel).read_bytes()).hexdigest() == digest
    assert studio.files(studio.outbox) == sorted(originals), "one result each, no '-1' twin"
    for rel in originals:
        with Image.open(studio.outbox / rel) as result:
            result.load()
    hidden = [p for root in (studio.outbox, studio.archive, studio.errors)
              for p in root.rglob(".*")]
    assert hidden == [], "no temp file left behind"
    # concurrency 1: at most the one request in flight at the crash is paid twice
    assert GOOD <= sandbox.count(200) <= GOOD + 1
    assert os.listdir(studio.root / "state" / "spool") == [], "no result left in the spool"
