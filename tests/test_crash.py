"""Crash safety: SIGKILL the real daemon at many instants of a batch, restart, and check that
every file is in exactly one place, complete, with no duplicate result and no lost credit
beyond one per request that was in flight."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import Studio, make_image
from watchfolder.dev.sandbox import Sandbox

FILES = 40
CONCURRENCY = 4


def _run_and_kill(config: Path, rng: random.Random) -> None:
    """Start the daemon and SIGKILL it: mostly while it works, sometimes while it starts."""
    proc = subprocess.Popen([sys.executable, "-m", "watchfolder", "run", "--config",
                             str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stderr is not None
    if rng.random() < 0.2:
        time.sleep(rng.uniform(0.0, 0.4))  # during start-up and recovery
    else:
        for line in proc.stderr:
            if '"event": "ready"' in line:
                break
        time.sleep(rng.uniform(0.0, 0.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stderr.close()


def _all_paths(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() or p.is_symlink()]


@pytest.mark.slow
def test_sigkill_at_many_instants_loses_nothing(tmp_path: Path, sandbox: Sandbox) -> None:
    sandbox.latency = 0.2  # a batch spans many runs: kills land mid-batch
    studio = Studio(tmp_path, sandbox.url, api={"concurrency": CONCURRENCY},
                    inbox={"settle_seconds": 0.05})
    originals = {}
    for n in range(FILES):
        name = f"sub{n % 3}/img {n:02d}.png" if n % 2 else f"img {n:02d}.jpg"
        path = make_image(studio.inbox / name, fmt="PNG" if n % 2 else "JPEG", seed=n)
        originals[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    (studio.inbox / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    config = studio.write_config()

    rng = random.Random(1234)
    kills = 0
    for _ in range(25):
        _run_and_kill(config, rng)
        kills += 1
        if not any(studio.inbox.rglob("*.*")):
            break
    print(f"killed {kills} times; {sandbox.count(200)} results charged so far")

    final = subprocess.run([sys.executable, "-m", "watchfolder", "run", "--config",
                            str(config), "--once"], capture_output=True, text=True,
                           timeout=120, check=False)
    assert final.returncode in (0, 1), final.stderr  # 1 if the broken file failed in this run

    # Every original is in exactly one place, complete.
    assert studio.files(studio.inbox) == []
    assert sorted(studio.files(studio.archive)) == sorted(originals)
    for name, digest in originals.items():
        assert hashlib.sha256((studio.archive / name).read_bytes()).hexdigest() == digest
    assert studio.files(studio.errors) == ["broken.png", "broken.png.error.json"]
    # Exactly one complete result per original: no "-1" twin from a forgotten write.
    expected = sorted(str(Path(name).with_suffix(".png")) for name in originals)
    assert studio.files(studio.outbox) == expected
    for rel in expected:
        with Image.open(studio.outbox / rel) as result:
            result.load()
            assert result.size == (160, 120)
    # No partial or temporary file anywhere users look.
    for root in (studio.outbox, studio.archive, studio.errors, studio.inbox):
        hidden = [p for p in _all_paths(root) if p.name.startswith(".")]
        assert hidden == [], f"left-over temp files: {hidden}"
    # At most one extra charged request per request in flight at each kill.
    charged = sandbox.count(200)
    assert FILES <= charged <= FILES + kills * CONCURRENCY, (charged, kills)
    assert os.listdir(studio.root / "state" / "spool") == []
