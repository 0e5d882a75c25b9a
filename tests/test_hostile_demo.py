"""`watchfolder demo` run again, and stopped with Ctrl-C, as a new user does it.

Real subprocesses: the demo's own sandbox and daemon, real folders, a real SIGINT.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import make_image

REPO = Path(__file__).resolve().parents[1]


def demo(folder: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "watchfolder", "demo", "--dir", str(folder),
                           "--rpm", "600", *extra], capture_output=True, text=True,
                          timeout=120, check=False)


def test_demo_run_again_keeps_every_file_of_the_users(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    first = demo(folder, "--once")
    assert first.returncode == 0, first.stdout + first.stderr
    # What a user does between two runs: drops an image in (as the demo invites), keeps a
    # note in the outbox, edits one of the cut-outs, files an original of their own.
    make_image(folder / "inbox" / "mine.png", seed=7)
    (folder / "outbox" / "notes.txt").write_text("mine")
    edited = folder / "outbox" / "red-mug on white.png"
    edited.write_bytes(edited.read_bytes() + b"edited")
    make_image(folder / "archive" / "old" / "kept.png", seed=8)
    kept = {p: p.read_bytes() for p in (edited, folder / "outbox" / "notes.txt",
                                        folder / "archive" / "old" / "kept.png")}
    mine = (folder / "inbox" / "mine.png").read_bytes()

    again = demo(folder, "--once")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "kept     4 file(s) of yours" in again.stdout
    for path, data in kept.items():
        assert path.read_bytes() == data, f"{path} was touched"
    assert (folder / "archive" / "mine.png").read_bytes() == mine, "processed like the samples"
    assert (folder / "outbox" / "mine.png").exists()
    assert "your files       1 done, 0 failed" in again.stdout
    # The demo's own files were replaced, not piled up: one copy of each sample's results
    # (the edited cut-out's name was taken, so the new one sits beside it).
    outbox = sorted(p.name for p in (folder / "outbox").iterdir())
    assert outbox == sorted(["blue-box on grey.png", "mine.png", "notes.txt",
                             "camera-sideways.png", "retouch-adobe-rgb-16bit.png",
                             "orange-bottle on green.png", "purple-pair on grey.png",
                             "red-mug on white.png", "red-mug on white-1.png",
                             "teal-ball on white.png"])
    assert sorted(p.name for p in (folder / "errors").iterdir()) == [
        "broken.jpg", "broken.jpg.error.json"]
    assert list((folder / "inbox").iterdir()) == []

    third = demo(folder, "--once")  # the user's files stay the user's, run after run
    assert third.returncode == 0, third.stdout + third.stderr
    assert (folder / "archive" / "mine.png").read_bytes() == mine
    assert all(path.read_bytes() == data for path, data in kept.items())


def test_demo_refuses_to_drop_a_sample_over_a_users_file(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    assert demo(folder, "--once").returncode == 0
    theirs = make_image(folder / "inbox" / "broken.jpg", fmt="JPEG", seed=3).read_bytes()
    refused = demo(folder, "--once")
    assert refused.returncode != 0
    assert "broken.jpg" in refused.stderr and "--dir" in refused.stderr
    assert str(folder / "inbox") in refused.stderr
    assert (folder / "inbox" / "broken.jpg").read_bytes() == theirs


class Output:
    """A child's stdout, read as it comes, without a thread."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.proc, self.fd, self.text = proc, proc.stdout.fileno(), ""

    def wait_for(self, needle: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.fd], [], [], max(0.0, left))
            chunk = os.read(self.fd, 65536) if ready else b""
            if not chunk:
                pytest.fail(f"no {needle!r} in time; the demo said:\n{self.text}")
            self.text += chunk.decode("utf-8", "replace")

    def rest(self) -> str:
        while chunk := os.read(self.fd, 65536):
            self.text += chunk.decode("utf-8", "replace")
        return self.text


@pytest.mark.parametrize(("good", "code"), [(True, 0), (False, 1)])
def test_ctrl_c_exits_by_how_every_file_ended_the_users_too(tmp_path: Path, good: bool,
                                                             code: int) -> None:
    folder = tmp_path / "demo"
    proc = subprocess.Popen([sys.executable, "-m", "watchfolder", "demo", "--dir",
                             str(folder), "--rpm", "600"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        output = Output(proc)
        output.wait_for("Ctrl-C to stop")
        staged = tmp_path / "mine.png"
        if good:
            make_image(staged, seed=5)
        else:
            staged.write_bytes(b"not an image at all")
        staged.rename(folder / "inbox" / "mine.png")
        output.wait_for("done    mine.png" if good else "failed  mine.png")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == code, output.rest()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def test_the_demo_folder_is_ignored_by_git() -> None:
    ignored = (REPO / ".gitignore").read_text().splitlines()
    assert "watchfolder-demo/" in ignored
