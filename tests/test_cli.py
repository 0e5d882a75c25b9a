"""The command line as users and scripts run it: a real subprocess, real exit codes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tests.conftest import KEY, Running, Studio, make_image, run_watchfolder, wait_for
from watchfolder.dev.sandbox import Sandbox

ROOT = Path(__file__).resolve().parent.parent


watchfolder = run_watchfolder


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "watchfolder", *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def events(stderr: str, name: str) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [e for e in lines if e.get("event") == name]


# -- --once exit codes ------------------------------------------------------------------------


def test_once_exits_0_when_all_succeed(studio: Studio, sandbox: Sandbox) -> None:
    for n in range(3):
        make_image(studio.inbox / f"f{n}.png", seed=n)
    done = watchfolder("run", "--config", str(studio.write_config()), "--once")
    assert done.returncode == 0, done.stderr
    assert len(studio.files(studio.archive)) == 3
    assert len(events(done.stderr, "file.done")) == 3
    assert len(events(done.stderr, "ready")) == 1
    assert all(line.startswith("{") for line in done.stderr.splitlines()), "JSON lines only"


def test_once_exits_1_when_some_failed(studio: Studio, sandbox: Sandbox) -> None:
    make_image(studio.inbox / "good.png")
    (studio.inbox / "bad.png").write_text("not an image")
    done = watchfolder("run", "--config", str(studio.write_config()), "--once")
    assert done.returncode == 1, done.stderr
    assert studio.files(studio.errors) == ["bad.png", "bad.png.error.json"]
    assert studio.files(studio.archive) == ["good.png"]


def test_once_exits_3_on_an_account_problem_keeping_files(studio: Studio,
                                                          sandbox: Sandbox) -> None:
    sandbox.keys = ["the-only-valid-key"]
    for n in range(3):
        make_image(studio.inbox / f"f{n}.png", seed=n)
    done = watchfolder("run", "--config", str(studio.write_config()), "--once")
    assert done.returncode == 3, done.stderr
    assert len(studio.files(studio.inbox)) == 3
    assert studio.files(studio.errors) == []
    assert KEY not in done.stderr + done.stdout
    assert len(events(done.stderr, "account.paused")) == 1


def test_once_with_an_empty_inbox_exits_at_once(studio: Studio) -> None:
    done = watchfolder("run", "--config", str(studio.write_config()), "--once", timeout=20)
    assert done.returncode == 0, done.stderr


# -- signals ----------------------------------------------------------------------------------


def test_sigterm_lets_requests_in_flight_finish(studio: Studio, sandbox: Sandbox) -> None:
    sandbox.latency = 1.0
    for n in range(3):
        make_image(studio.inbox / f"f{n}.png", seed=n)
    proc = start("run", "--config", str(studio.write_config()))
    head = wait_ready(proc)
    wait_for(lambda: "sending" in studio.states(), what="a request in flight")
    assert sandbox.requests == [], "each answer takes 1 s: none has come back yet"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=15)
    stderr = head + stderr
    assert proc.returncode == 0, stderr
    done = len(studio.files(studio.archive))
    waiting = len(studio.files(studio.inbox))
    assert done >= 1, "the request in flight finished"
    assert done + waiting == 3, "nothing lost"
    assert done == len(studio.files(studio.outbox))


def wait_ready(proc: subprocess.Popen[str]) -> str:
    """Read the daemon's log until its `ready` line; return what was read."""
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if '"event": "ready"' in line:
            return "".join(seen)
    pytest.fail("the daemon exited before it was ready:\n" + "".join(seen))


def hung_daemon(tmp_path: Path, sandbox: Sandbox, shutdown_timeout: float
                ) -> tuple[Studio, subprocess.Popen[str], str]:
    """A daemon subprocess whose one request hangs; returns it with its log so far."""
    studio = Studio(tmp_path, sandbox.url, shutdown_timeout_seconds=shutdown_timeout,
                    api={"timeout_seconds": 60})
    sandbox.hang_seconds = 30
    sandbox.add_faults("hang")
    make_image(studio.inbox / "stuck.png")
    proc = start("run", "--config", str(studio.write_config()))
    head = wait_ready(proc)
    wait_for(lambda: "sending" in studio.states(), what="the hanging request")
    return studio, proc, head


def test_sigterm_abandons_a_hung_request_within_the_bound(tmp_path: Path,
                                                          sandbox: Sandbox) -> None:
    studio, proc, head = hung_daemon(tmp_path, sandbox, shutdown_timeout=1)
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=15)
    stderr = head + stderr
    assert proc.returncode == 0, stderr
    assert time.monotonic() - began < 5
    assert studio.files(studio.inbox) == ["stuck.png"], "the file waits for the next start"
    assert events(stderr, "stop.abandoned")
    again = watchfolder("run", "--config", str(studio.write_config()), "--once")
    assert again.returncode == 0, again.stderr
    assert studio.files(studio.archive) == ["stuck.png"]


# -- check-config and usage ------------------------------------------------------------------


def test_check_config_prints_the_effective_config_without_the_key(studio: Studio) -> None:
    done = watchfolder("check-config", "--config", str(studio.write_config()))
    assert done.returncode == 0, done.stderr
    assert KEY not in done.stdout + done.stderr
    shown = yaml.safe_load(done.stdout)
    assert shown["api"]["key"].startswith("<set")
    assert shown["inboxes"][0]["path"] == str(studio.inbox)
    assert shown["retry"]["max_attempts"] == 3


def test_check_config_reports_every_problem_with_its_path(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    config = {
        "api": {"key": "${WATCHFOLDER_TEST_UNSET_VAR}", "concurrency": 0, "timout": 3},
        "inboxes": [
            {"path": "in", "outbox": "out", "errors": "err", "output_format": "gif"},
            {"path": "missing", "outbox": "nowhere/deeper/out", "errors": "err2"},
        ],
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    done = watchfolder("check-config", "--config", str(path))
    assert done.returncode == 2
    err = done.stderr
    assert "api.key: environment variable WATCHFOLDER_TEST_UNSET_VAR is not set" in err
    assert "api.concurrency: must be at least 1" in err
    assert "api.timout: unknown key (did you mean 'timeout_seconds'?)" in err
    assert "inboxes[0].output_format: must be one of png, webp, jpeg" in err
    assert "inboxes[1].path: folder" in err and "does not exist" in err
    assert "inboxes[1].outbox: parent folder" in err
    assert "6 configuration problems" in err


def test_run_with_a_bad_config_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("inboxes: []\n")
    done = watchfolder("run", "--config", str(path))
    assert done.returncode == 2
    assert "inboxes: must be a non-empty list" in done.stderr


def test_missing_config_file_names_the_fix(tmp_path: Path) -> None:
    done = watchfolder("run", "--config", str(tmp_path / "nope.yaml"))
    assert done.returncode == 2
    assert "file not found" in done.stderr and "daemon.yaml.example" in done.stderr


def test_usage_errors_exit_2() -> None:
    assert watchfolder("run").returncode == 2  # --config is required
    assert watchfolder().returncode == 2
    assert watchfolder("frobnicate").returncode == 2


def test_help_lists_the_commands() -> None:
    shown = watchfolder("--help").stdout
    for word in ("run", "check-config", "sandbox", "exit codes"):
        assert word in shown


def test_shipped_example_config_is_valid(tmp_path: Path) -> None:
    shutil.copy(ROOT / "daemon.yaml.example", tmp_path / "daemon.yaml")
    (tmp_path / "studio" / "inbox").mkdir(parents=True)
    done = watchfolder("check-config", "--config", str(tmp_path / "daemon.yaml"),
                       env={"CLIPDROP_API_KEY": "example-key"})
    assert done.returncode == 0, done.stderr
    assert "example-key" not in done.stdout


def test_key_file_and_systemd_credential(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "key").write_text("from-a-file\n")
    base = {"inboxes": [{"path": "in", "outbox": "out", "errors": "err"}]}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**base, "api": {"key_file": "key"}}))
    done = watchfolder("check-config", "--config", str(path))
    assert done.returncode == 0, done.stderr
    assert "key_file" in done.stdout and "from-a-file" not in done.stdout
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "clipdrop-api-key").write_text("from-systemd")
    path.write_text(yaml.safe_dump(base))
    done = watchfolder("check-config", "--config", str(path),
                       env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert done.returncode == 0, done.stderr
    assert "systemd credential" in done.stdout and "from-systemd" not in done.stdout
    done = watchfolder("check-config", "--config", str(path), env={"CREDENTIALS_DIRECTORY": ""})
    assert done.returncode == 2
    assert "api.key: no API key" in done.stderr


def test_a_key_file_that_is_not_text_is_a_configuration_problem(tmp_path: Path) -> None:
    # The API key and the webhook secret are read from files by the same code: a binary file
    # is reported with its path (it used to end check-config with a traceback).
    (tmp_path / "in").mkdir()
    (tmp_path / "key").write_bytes(b"sk-\xff\xfe-not-text")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"api": {"key_file": "key"}, "inboxes": [
        {"path": "in", "outbox": "out", "errors": "err"}]}))
    done = watchfolder("check-config", "--config", str(path))
    assert done.returncode == 2, done.stderr
    assert (f"api.key_file: cannot read key file {tmp_path / 'key'}: UnicodeDecodeError"
            in done.stderr)
    assert "Traceback" not in done.stderr and "not-text" not in done.stderr


def test_inline_key_readable_by_others_is_warned(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"api": {"key": "inline-secret"}, "inboxes": [
        {"path": "in", "outbox": "out", "errors": "err"}]}))
    path.chmod(0o644)
    done = watchfolder("check-config", "--config", str(path))
    assert "other users can read it" in done.stderr
    assert "inline-secret" not in done.stderr + done.stdout
    path.chmod(0o600)
    assert "other users" not in watchfolder("check-config", "--config", str(path)).stderr


def test_a_second_signal_forces_the_exit(tmp_path: Path, sandbox: Sandbox) -> None:
    # a graceful stop would wait up to 60 s for the hanging request
    studio, proc, _ = hung_daemon(tmp_path, sandbox, shutdown_timeout=60)
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=15)
    assert proc.returncode == 128 + signal.SIGTERM
    assert time.monotonic() - began < 5
    assert studio.files(studio.inbox) == ["stuck.png"], "forced, yet nothing lost"


BUSY_MAIN_THREAD = """
import sqlite3
from watchfolder.cli import _SignalState

class Stops:
    def request_stop(self):
        print("graceful stop", flush=True)

    def request_reload(self):
        pass

_SignalState(Stops()).install()
print("ready", flush=True)
# about a second in one C call: Python runs no signal handler until it returns
sqlite3.connect(":memory:").execute(
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 5000000) "
    "SELECT count(*) FROM c").fetchall()
print("survived", flush=True)
"""


def test_a_second_signal_forces_the_exit_while_the_main_thread_is_busy() -> None:
    # Two signals that reach Python before its main thread runs a handler run that handler
    # once: a daemon slow to get the CPU took "stop now" for a graceful stop (a flake of the
    # test above, under load). Each signal is counted as it arrives.
    proc = subprocess.Popen([sys.executable, "-c", BUSY_MAIN_THREAD], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert out == "graceful stop\n", "the first asked for a stop, at once; nothing after"


def test_run_once_on_a_terminal_shows_a_live_progress_line(studio: Studio) -> None:
    import pty
    import select

    for n in range(3):
        make_image(studio.inbox / f"p{n}.png", seed=n)
    config = studio.write_config()
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "watchfolder", "run", "--config",
                                str(config), "--once"], stdin=follower, stdout=follower,
                               stderr=follower, close_fds=True)
    os.close(follower)
    seen = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 30)
        if not ready:
            break
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    assert process.wait(timeout=30) == 0
    os.close(leader)
    text = seen.decode("utf-8", "replace")
    # On a failure, every log line (a file's delay shows in its `ms`) and the last redraws.
    logged = [line for line in text.replace("\r", "\n").splitlines() if line.startswith("{")]
    assert "3/3 done" in text, "\n".join(logged) + "\n" + text[-600:]
    assert "file.done" in text, "log lines still show, above the progress line"


def test_the_progress_counts_never_count_a_file_twice(studio: Studio) -> None:
    # The progress line's total is done + failed + waiting. A finished file stayed "waiting"
    # until the intake next looked (up to a second), so the total read 4 for 3 files and,
    # kept as a running maximum, ended "3/4 done". Sampled as fast as we can while 6 files go.
    for n in range(6):
        make_image(studio.inbox / f"c{n}.png", seed=n)
    with Running(studio.config()) as daemon:
        seen = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            snap = daemon.snapshot()
            seen.append(snap["done"] + snap["failed"] + snap["pending"])
            if snap["done"] == 6 and snap["pending"] == 0:
                break
    assert seen[-1] == 6, seen[-20:]
    assert max(seen) == 6, f"a file counted twice: totals {sorted(set(seen))}"


def test_run_once_without_a_terminal_prints_no_progress(studio: Studio) -> None:
    make_image(studio.inbox / "p.png")
    done = watchfolder("run", "--config", str(studio.write_config()), "--once")
    assert done.returncode == 0, done.stderr
    assert " done |" not in done.stderr
    for line in done.stderr.splitlines():
        json.loads(line)  # JSON lines only


def test_a_key_in_the_wrong_section_says_where_it_belongs(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "settle_seconds": 3, "api": {"key": KEY, "level": "debug"},
        "inboxes": [{"path": "in", "outbox": "out", "errors": "err", "rescan_seconds": 5}]}))
    done = watchfolder("check-config", "--config", str(path))
    assert done.returncode == 2
    assert "settle_seconds: unknown key (it belongs under inboxes[])" in done.stderr
    assert "api.level: unknown key (it belongs under log)" in done.stderr
    assert "inboxes[0].rescan_seconds: unknown key (it belongs under the top level)" in done.stderr
    assert "rescan_seconds'?" not in done.stderr
    assert "check-config --config" not in done.stderr, "check-config does not suggest itself"
    run = watchfolder("run", "--config", str(path))
    assert f"watchfolder check-config --config {path}" in run.stderr


def test_the_version_is_the_releases_from_one_place(studio: Studio) -> None:
    import tomllib  # 3.11+, as the test machines run

    from watchfolder import __version__

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"], "pyproject must read the version, not repeat it"
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "watchfolder.__version__"}
    assert __version__ == "0.2.0"  # the release the 0.2 features shipped in
    assert watchfolder("--version").stdout.strip() == f"watchfolder {__version__}"
    (studio.inbox / "bad.png").write_text("not an image")
    done = watchfolder("run", "--config", str(studio.write_config()), "--once")
    assert done.returncode == 1, done.stderr
    reason = json.loads((studio.errors / "bad.png.error.json").read_text())
    assert reason["watchfolder"] == __version__


def test_libvips_warnings_never_reach_the_console_raw(studio: Studio, sandbox: Sandbox) -> None:
    # A damaged JPEG makes libvips warn ("VIPS-WARNING **: error in tile ...") from its own
    # threads; the reason file already says why the file failed.
    noisy = Image.effect_noise((800, 600), 90).convert("RGB")
    whole = studio.root / "whole.jpg"
    noisy.save(whole, "JPEG")
    (studio.inbox / "cut.jpg").write_bytes(whole.read_bytes()[:whole.stat().st_size // 2])
    make_image(studio.inbox / "good.png")
    done = watchfolder("run", "--config", str(studio.write_config()), "--once")
    assert done.returncode == 1, done.stderr
    assert "VIPS" not in done.stderr
    assert all(line.startswith("{") for line in done.stderr.splitlines()), done.stderr
    reason = json.loads((studio.errors / "cut.jpg.error.json").read_text())
    assert reason["reason"] == "corrupt"
    assert "premature end" in reason["message"].lower(), reason
