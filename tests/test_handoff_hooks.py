"""Hooks run as real subprocesses: environment, stdin, failures, timeouts, the parallel bound."""

from __future__ import annotations

import contextlib
import json
import sys
import textwrap
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import LogCapture, wait_for
from watchfolder.config.handoff import HookSettings
from watchfolder.config.settings import Secret
from watchfolder.handoff.hooks import HookRunner
from watchfolder.handoff.manifest import OutputFacts, SourceFacts, build_manifest, manifest_json

API_KEY = "api-key-0123456789"


def script(tmp_path: Path, name: str, body: str) -> list[str]:
    """A Python hook in tmp_path; its argv."""
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return [sys.executable, str(path)]


def done(tmp_path: Path, name: str = "a.jpg", n: int = 1) -> dict[str, Any]:
    source = tmp_path / "inbox" / name
    outputs = [OutputFacts(path=str(tmp_path / "outbox" / f"{Path(name).stem}_{i}.png"),
                           format="png", width=10, height=8, sha256="ab" * 32)
               for i in range(n)]
    return build_manifest(manifest_id=f"id-{name}", event="done",
                          source=SourceFacts(path=str(source), sha256="cd" * 32, width=10,
                                             height=8),
                          outputs=outputs, credits_spent=1, credits_remaining=99,
                          finished_at=datetime.now(timezone.utc).astimezone())


def failed(tmp_path: Path) -> dict[str, Any]:
    return build_manifest(manifest_id="id-bad", event="failed",
                          source=SourceFacts(path=str(tmp_path / "inbox" / "bad.jpg")),
                          credits_spent=0, credits_remaining=None,
                          finished_at=datetime.now(timezone.utc).astimezone(),
                          reason="undecodable", message="not an image")


@contextlib.contextmanager
def running(runner: HookRunner) -> Iterator[HookRunner]:
    runner.start()
    try:
        yield runner
    finally:
        assert runner.join(10), "hook threads did not end"


def gone(pid: int) -> bool:
    """The process has ended (a zombie waiting for a reaper counts as ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


DUMP = """
    import json, os, sys
    from pathlib import Path
    out = Path(sys.argv[1])
    facts = {"env": {k: v for k, v in os.environ.items() if k.startswith("WATCHFOLDER_")},
             "stdin": sys.stdin.read(), "api_key": os.environ.get("HANDOFF_API_KEY"),
             "plain": os.environ.get("HANDOFF_PLAIN"), "session": os.getsid(0) == os.getpid()}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(facts))
    tmp.rename(out)
"""


def test_hook_gets_the_facts_in_its_environment_and_the_manifest_on_stdin(
        tmp_path: Path, log_lines: LogCapture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HANDOFF_API_KEY", API_KEY)
    monkeypatch.setenv("HANDOFF_PLAIN", "kept")
    monkeypatch.setenv("WATCHFOLDER_EVENT", "stale")  # ours win over an inherited one
    dump = script(tmp_path, "dump", DUMP)
    settings = HookSettings(on_done=(*dump, str(tmp_path / "done.json")),
                            on_failed=(*dump, str(tmp_path / "failed.json")))
    manifest, bad = done(tmp_path, "été.jpg", n=2), failed(tmp_path)
    manifest_path = tmp_path / "outbox" / "été.json"
    with running(HookRunner(settings, withhold=[Secret(API_KEY)])) as runner:
        assert runner.submit(manifest, manifest_path)
        assert runner.submit(bad)
        seen = json.loads(wait_for((tmp_path / "done.json").exists, what="done hook") and
                          (tmp_path / "done.json").read_text())
        seen_failed = json.loads(wait_for((tmp_path / "failed.json").exists, what="failed hook")
                                 and (tmp_path / "failed.json").read_text())
        wait_for(lambda: len(log_lines.events("hook.done")) == 2, what="two hook.done")

    assert seen["env"] == {
        "WATCHFOLDER_EVENT": "done",
        "WATCHFOLDER_ID": "id-été.jpg",
        "WATCHFOLDER_SOURCE": str(tmp_path / "inbox" / "été.jpg"),
        "WATCHFOLDER_OUTPUTS": json.dumps([o["path"] for o in manifest["outputs"]],
                                          ensure_ascii=False),
        "WATCHFOLDER_MANIFEST": str(manifest_path),
    }
    assert json.loads(seen["env"]["WATCHFOLDER_OUTPUTS"])[1].endswith("été_1.png")
    assert seen["stdin"].encode() == manifest_json(manifest)
    assert seen["api_key"] is None, "a secret reached the hook's environment"
    assert seen["plain"] == "kept"
    assert seen["session"], "the hook must lead its own session (so its group can be killed)"

    assert seen_failed["env"]["WATCHFOLDER_EVENT"] == "failed"
    assert seen_failed["env"]["WATCHFOLDER_OUTPUTS"] == "[]"
    assert "WATCHFOLDER_MANIFEST" not in seen_failed["env"]  # not written for a failed file
    assert json.loads(seen_failed["stdin"])["reason"] == "undecodable"
    events = log_lines.events("hook.done")
    assert {e["hook_event"] for e in events} == {"done", "failed"}
    assert all(e["exit_status"] == 0 and e["hook"] == sys.executable for e in events)


def test_an_event_without_a_hook_runs_nothing(tmp_path: Path) -> None:
    runner = HookRunner(HookSettings(on_done=(sys.executable, "-c", "")))
    with running(runner):
        assert not runner.submit(failed(tmp_path))
        assert runner.waiting() == 0


def test_a_failing_hook_is_logged_with_its_status_and_stderr_and_retried(
        tmp_path: Path, log_lines: LogCapture) -> None:
    runs = tmp_path / "runs.txt"
    argv = script(tmp_path, "fail", f"""
        import sys
        with open({str(runs)!r}, "a") as f:
            f.write("run\\n")
        print("starting", flush=True)
        sys.stderr.write("noise\\n" * 1000 + "publish: shop refused the upload\\n")
        sys.exit(3)
    """)
    source = tmp_path / "inbox" / "a.jpg"
    source.parent.mkdir()
    source.write_bytes(b"original")
    settings = HookSettings(on_done=tuple(argv), retries=2)
    with running(HookRunner(settings, backoff_seconds=0.01, max_backoff_seconds=0.05)) as runner:
        runner.submit(done(tmp_path))
        gave_up = wait_for(lambda: log_lines.events("hook.gave_up"), what="hook.gave_up")

    assert runs.read_text().splitlines() == ["run"] * 3  # one run and two retries
    failures = log_lines.events("hook.failed")
    assert [e["attempt"] for e in failures] == [1, 2, 3]
    assert all(e["exit_status"] == 3 for e in failures)
    tail = failures[0]["stderr_tail"]
    assert tail.endswith("publish: shop refused the upload")
    assert len(tail) <= 2000
    assert len(log_lines.events("hook.retry")) == 2
    assert gave_up[0]["tries"] == 3 and gave_up[0]["level"] == "error"
    assert source.read_bytes() == b"original"  # a failed hook never touches the file


def test_a_hook_that_cannot_start_is_a_failure_too(tmp_path: Path, log_lines: LogCapture) -> None:
    settings = HookSettings(on_done=(str(tmp_path / "missing"),), retries=1)
    with running(HookRunner(settings, backoff_seconds=0.01)) as runner:
        runner.submit(done(tmp_path))
        wait_for(lambda: log_lines.events("hook.gave_up"), what="hook.gave_up")
    failures = log_lines.events("hook.failed")
    assert len(failures) == 2
    assert failures[0]["exit_status"] is None
    assert "No such file" in failures[0]["error"]


HANG = """
    import os, signal, subprocess, sys, time
    from pathlib import Path
    child = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    out = Path(sys.argv[1])
    out.with_suffix(".tmp").write_text(f"{os.getpid()} {child.pid}")
    out.with_suffix(".tmp").rename(out)
    sys.stderr.write("still working\\n")
    sys.stderr.flush()
    time.sleep(600)
"""


def test_a_hanging_hook_is_killed_with_its_children_after_the_timeout(
        tmp_path: Path, log_lines: LogCapture) -> None:
    pids = tmp_path / "pids.txt"
    argv = (*script(tmp_path, "hang", HANG), str(pids))
    settings = HookSettings(on_done=argv, timeout_seconds=1.0, retries=0)
    with running(HookRunner(settings, kill_grace_seconds=0.2)) as runner:
        runner.submit(done(tmp_path))
        wait_for(pids.exists, what="the hook to start its child")
        hook_pid, child_pid = map(int, pids.read_text().split())
        wait_for(lambda: log_lines.events("hook.gave_up"), what="hook.gave_up")
    # The child ignores SIGTERM: only the SIGKILL to the whole group ends it.
    wait_for(lambda: gone(hook_pid) and gone(child_pid), what="hook and child to be gone")
    timeout = log_lines.events("hook.timeout")
    assert len(timeout) == 1
    assert timeout[0]["timeout_s"] == 1.0
    assert timeout[0]["stderr_tail"] == "still working"


def test_stop_kills_running_hooks_at_the_deadline_and_drops_waiting_ones(
        tmp_path: Path, log_lines: LogCapture) -> None:
    pids = tmp_path / "pids.txt"
    argv = (*script(tmp_path, "hang", HANG), str(pids))
    settings = HookSettings(on_done=argv, timeout_seconds=600, max_parallel=1)
    runner = HookRunner(settings, kill_grace_seconds=0.2)
    runner.start()
    try:
        runner.submit(done(tmp_path, "a.jpg"))
        runner.submit(done(tmp_path, "b.jpg"))
        wait_for(pids.exists, what="the first hook to start")
        hook_pid, child_pid = map(int, pids.read_text().split())
        assert runner.waiting() == 1  # the second waits for the only slot
    finally:
        assert runner.join(0.5), "stop must not wait for a hook's own timeout"
    wait_for(lambda: gone(hook_pid) and gone(child_pid), what="hook and child to be gone")
    assert [e["id"] for e in log_lines.events("hook.killed")] == ["id-a.jpg"]
    assert [e["id"] for e in log_lines.events("hook.dropped")] == ["id-b.jpg"]
    assert not runner.submit(done(tmp_path, "c.jpg"))  # stopped: nothing new starts


def test_at_most_max_parallel_hooks_run_at_once_and_submit_never_blocks(
        tmp_path: Path, log_lines: LogCapture) -> None:
    marks, seen, release = tmp_path / "running", tmp_path / "seen.txt", tmp_path / "release"
    marks.mkdir()
    argv = script(tmp_path, "slow", f"""
        import os, time
        from pathlib import Path
        marks = Path({str(marks)!r})
        mark = marks / str(os.getpid())
        mark.touch()
        with open({str(seen)!r}, "a") as f:
            f.write(f"{{len(list(marks.iterdir()))}}\\n")
        while not Path({str(release)!r}).exists():
            time.sleep(0.02)
        mark.unlink()
    """)
    settings = HookSettings(on_done=tuple(argv), max_parallel=3)
    with running(HookRunner(settings)) as runner:
        # All eight are handed over while the first three block: submit does not wait.
        assert all(runner.submit(done(tmp_path, f"{n}.jpg")) for n in range(8))
        wait_for(lambda: seen.exists() and len(seen.read_text().split()) == 3,
                 what="three hooks running")
        wait_for(lambda: runner.running() == 3, what="the runner to count three running")
        assert runner.waiting() == 5
        release.touch()
        wait_for(lambda: len(log_lines.events("hook.done")) == 8, what="all eight hooks")
    counts = [int(n) for n in seen.read_text().split()]
    assert len(counts) == 8
    assert max(counts) <= 3
