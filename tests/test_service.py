"""watchfolder as a systemd service: sd_notify over a real datagram socket standing in for
systemd, the watchdog, reload on a real SIGHUP, and the shipped unit file."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import KEY, LogCapture, Running, Studio, make_image, wait_for
from watchfolder.config.settings import CREDENTIAL_NAME
from watchfolder.dev.sandbox import Sandbox
from watchfolder.errors import ConfigError, StartupError
from watchfolder.pipeline.jobqueue import Job
from watchfolder.service.daemon import Daemon
from watchfolder.service.notify import Notifier
from watchfolder.service.runloop import supervise

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "watchfolder.service"


# -- stand-ins: systemd's notify socket, a daemon subprocess -----------------------------------


class SystemdStandIn:
    """A real AF_UNIX datagram socket where systemd's would be; collects what the daemon says."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.messages: list[str] = []

    def env(self, watchdog_usec: int | None = None) -> dict[str, str]:
        env = {"NOTIFY_SOCKET": self.address}
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        return env

    def receive(self, timeout: float) -> list[str]:
        """Every datagram arriving within `timeout` s (appended to `messages`, returned)."""
        got = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                got.append(self.sock.recv(4096).decode())
            except TimeoutError:
                break
        self.messages.extend(got)
        return got

    def wait_for(self, pattern: str, timeout: float = 15.0, after: int = 0) -> str:
        """The first message from index `after` on matching `pattern` (a regex)."""
        deadline = time.monotonic() + timeout
        index = after
        while True:
            while index < len(self.messages):
                if re.search(pattern, self.messages[index], re.MULTILINE):
                    return self.messages[index]
                index += 1
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no {pattern!r} from the daemon within {timeout}s; got "
                            f"{self.messages[after:]}")
            self.sock.settimeout(left)
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd() -> Iterator[SystemdStandIn]:
    folder = tempfile.mkdtemp(prefix="wf-", dir="/tmp")  # AF_UNIX paths are short
    stand_in = SystemdStandIn(str(Path(folder) / "notify"))
    yield stand_in
    stand_in.close()
    shutil.rmtree(folder)


class DaemonProcess:
    """`watchfolder run` as a real subprocess; a thread reads its JSON log lines as they come."""

    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "watchfolder", "run", "--config", str(config)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, env={**os.environ, **(env or {})})
        self.lines: list[dict[str, Any]] = []
        self.text: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="test-log-reader")
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.text.append(line)
                if line.startswith("{"):
                    self.lines.append(json.loads(line))
                self._cond.notify_all()

    def events(self, name: str) -> list[dict[str, Any]]:
        with self._cond:
            return [e for e in self.lines if e.get("event") == name]

    def wait_event(self, name: str, count: int = 1, timeout: float = 15.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [e for e in self.lines if e.get("event") == name]
                if len(found) >= count:
                    return found[count - 1]
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    pytest.fail(f"no {name!r} (x{count}) in the daemon's log:\n"
                                + "".join(self.text))
                self._cond.wait(min(left, 0.2))

    def send(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._reader.join(5)
            if self.proc.stderr is not None:
                self.proc.stderr.close()
        return code

    @property
    def log(self) -> str:
        with self._cond:
            return "".join(self.text)

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def kinds(messages: list[str]) -> str:
    """Each message's first field name; runs of STATUS and WATCHDOG shown as one `...`."""
    out: list[str] = []
    for message in messages:
        kind = message.split("=", 1)[0]
        if kind in ("STATUS", "WATCHDOG"):
            kind = "..."
        if not (kind == "..." and out and out[-1] == "..."):
            out.append(kind)
    return " ".join(out)


# -- the protocol ------------------------------------------------------------------------------


def test_notifier_is_a_no_op_without_notify_socket() -> None:
    notifier = Notifier.from_environment({})
    assert not notifier.enabled
    assert notifier.ping_interval is None
    assert notifier.ready("x") is False
    assert notifier.watchdog() is False


def test_notifier_speaks_to_path_and_abstract_sockets(systemd: SystemdStandIn) -> None:
    abstract = SystemdStandIn(f"@watchfolder-test-{uuid.uuid4().hex}")
    try:
        for stand_in in (systemd, abstract):
            notifier = Notifier.from_environment(stand_in.env(watchdog_usec=3_000_000))
            assert notifier.ping_interval == 1.5
            assert notifier.ready("3 waiting")
            assert notifier.watchdog()
            assert notifier.reloading()
            assert notifier.stopping()
            notifier.close()
            got = stand_in.receive(0.3)
            assert got[0] == "READY=1\nSTATUS=3 waiting"
            assert got[1] == "WATCHDOG=1"
            assert re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=\d+\nSTATUS=.*", got[2])
            assert got[3] == "STOPPING=1"
    finally:
        abstract.close()


def test_watchdog_settings_are_read_from_the_environment() -> None:
    me = str(os.getpid())
    read = Notifier.from_environment
    assert read({"WATCHDOG_USEC": "30000000"}).ping_interval == 15.0
    assert read({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": me}).ping_interval == 15.0
    assert read({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}).ping_interval is None
    assert read({"WATCHDOG_USEC": "0"}).ping_interval is None


def test_a_vanished_notify_socket_does_not_stop_the_daemon(log_lines: LogCapture) -> None:
    notifier = Notifier("/nonexistent/notify.sock", watchdog_seconds=1.0)
    assert notifier.ready() is False
    assert notifier.watchdog() is False
    notifier.close()
    assert len(log_lines.events("notify.failed")) == 1, "said once, not at every ping"


# -- a real daemon under the stand-in ----------------------------------------------------------


def test_notify_messages_in_order_over_a_daemon_life(studio: Studio, sandbox: Sandbox,
                                                     systemd: SystemdStandIn) -> None:
    for n in range(2):
        make_image(studio.inbox / f"f{n}.png", seed=n)
    config = studio.write_config()
    with DaemonProcess(config, systemd.env(watchdog_usec=400_000)) as daemon:
        systemd.wait_for(r"^READY=1")
        daemon.wait_event("ready")  # logged before READY=1 is sent, in the same thread
        systemd.wait_for(r"^STATUS=0 waiting, 0 in flight, 2 done, 0 failed, (\d+|\?) credits$")
        pings = len(systemd.messages)
        systemd.receive(1.0)
        assert sum(m == "WATCHDOG=1" for m in systemd.messages[pings:]) >= 3, \
            "a ping every 0.2 s (half of WATCHDOG_USEC)"
        mark = len(systemd.messages)
        daemon.send(signal.SIGHUP)
        systemd.wait_for(r"^RELOADING=1", after=mark)
        systemd.wait_for(r"^READY=1", after=mark)
        daemon.wait_event("reload.done")
        assert daemon.stop() == 0
    systemd.receive(0.3)
    sequence = kinds(systemd.messages)
    assert re.fullmatch(r"\.\.\. READY \.\.\. RELOADING READY \.\.\. STOPPING", sequence), \
        sequence
    assert systemd.messages[0].startswith("STATUS=starting")
    assert all(KEY not in m for m in systemd.messages)


def test_no_ready_when_the_daemon_cannot_start(tmp_path: Path, sandbox: Sandbox,
                                               systemd: SystemdStandIn) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        studio = Studio(tmp_path, sandbox.url, metrics={"listen": f"127.0.0.1:{port}"})
        done = subprocess.run([sys.executable, "-m", "watchfolder", "run", "--config",
                               str(studio.write_config())], capture_output=True, text=True,
                              timeout=30, env={**os.environ, **systemd.env()}, check=False)
    assert done.returncode == 2, done.stderr
    assert f"metrics.listen: cannot listen on 127.0.0.1:{port}" in done.stderr
    systemd.receive(0.2)
    assert not any(m.startswith("READY=1") for m in systemd.messages)
    assert systemd.messages[-1].startswith("STATUS=not started: metrics.listen")


# -- the watchdog ------------------------------------------------------------------------------


class _FatalJob(Job):
    """Stands in for a bug that kills a worker: reading its record raises what no
    `except Exception` catches."""

    @property  # type: ignore[override]
    def record(self) -> None:
        raise SystemExit("simulated fatal bug in a worker")

    @record.setter
    def record(self, value: object) -> None:
        pass


class Supervised:
    """A daemon in this process with `supervise` on a thread, notifying the stand-in."""

    def __init__(self, daemon: Daemon, systemd: SystemdStandIn, watchdog: float) -> None:
        self.daemon = daemon
        self.notifier = Notifier(systemd.address, watchdog_seconds=watchdog)
        self.thread = threading.Thread(target=supervise, args=(daemon, self.notifier),
                                       kwargs={"status_seconds": 0.2}, name="test-supervise")

    def __enter__(self) -> Supervised:
        self.daemon.start()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.daemon.request_stop()
        self.thread.join(10)
        self.daemon.stop()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_watchdog_pings_stop_when_a_worker_dies(studio: Studio, systemd: SystemdStandIn,
                                                log_lines: LogCapture) -> None:
    with Supervised(Daemon(studio.config()), systemd, watchdog=0.2) as run:
        systemd.wait_for("^READY=1")
        systemd.receive(0.5)
        assert systemd.messages.count("WATCHDOG=1") >= 3
        assert run.daemon.pipeline is not None
        run.daemon.pipeline.queue.put(_FatalJob(0, "boom.png"))
        wait_for(lambda: run.daemon.problems(), what="the dead worker to be noticed")
        systemd.wait_for("^STATUS=.*UNHEALTHY: a worker thread died")
        mark = len(systemd.messages)
        systemd.receive(0.6)  # six ping intervals
        assert "WATCHDOG=1" not in systemd.messages[mark:]
        assert not run.daemon.healthy()
    assert len(log_lines.events("watchdog.withheld")) == 1
    assert log_lines.events("watchdog.withheld")[0]["problems"] == ["a worker thread died"]


def test_watchdog_keeps_pinging_while_an_inbox_folder_is_missing(
        studio: Studio, systemd: SystemdStandIn) -> None:
    with Supervised(Daemon(studio.config()), systemd, watchdog=0.2) as run:
        systemd.wait_for("^READY=1")
        shutil.rmtree(studio.inbox)  # unmounted, say: the intake reports it, nothing is dead
        mark = len(systemd.messages)
        systemd.receive(2.5)  # longer than the grace a lost watch gets (2 rescans + 1 s)
        assert systemd.messages[mark:].count("WATCHDOG=1") >= 5
        assert run.daemon.healthy()
        studio.inbox.mkdir()
        make_image(studio.inbox / "back.png")
        wait_for(lambda: studio.files(studio.archive) == ["back.png"], what="the inbox back")
        assert run.daemon.healthy()


# -- reload ----------------------------------------------------------------------------------


def test_reload_adds_an_inbox_and_changes_limits_without_losing_queued_files(
        tmp_path: Path, sandbox: Sandbox, systemd: SystemdStandIn) -> None:
    sandbox.latency = 0.25
    studio = Studio(tmp_path, sandbox.url, api={"concurrency": 1})
    for n in range(6):
        make_image(studio.inbox / f"a{n}.png", seed=n)
    config = studio.write_config()
    second = tmp_path / "second"
    (second / "inbox").mkdir(parents=True)
    with DaemonProcess(config, systemd.env()) as daemon:
        systemd.wait_for("^READY=1")
        daemon.wait_event("file.done")  # the others are queued behind the one worker
        studio.data["api"]["requests_per_minute"] = 3000
        studio.data["inboxes"].append({"path": "second/inbox", "outbox": "second/outbox",
                                       "errors": "second/errors", "settle_seconds": 0.1})
        studio.write_config()
        daemon.send(signal.SIGHUP)
        done = daemon.wait_event("reload.done")
        assert done["added"] == [str(second / "inbox")]
        assert done["requests_per_minute"] == 3000
        assert done["removed"] == [] and done["changed"] == []
        make_image(second / "inbox" / "b.png", seed=9)
        wait_for(lambda: len(studio.files(studio.archive)) == 6, timeout=20, what="inbox A")
        wait_for(lambda: studio.files(second / "outbox") == ["b.png"], what="inbox B")
        assert daemon.stop() == 0
    assert studio.files(studio.inbox) == [] and studio.files(studio.errors) == []
    assert sandbox.count() == 7, "every queued file sent exactly once"
    assert "needs_restart" not in daemon.log


def test_reload_rejects_an_invalid_config_and_keeps_running(studio: Studio, sandbox: Sandbox,
                                                            systemd: SystemdStandIn) -> None:
    config = studio.write_config()
    good = config.read_text()
    with DaemonProcess(config, systemd.env()) as daemon:
        systemd.wait_for("^READY=1")
        config.write_text(good.replace("settle_seconds", "setle_seconds")
                          + "rescan_seconds: soon\n")
        mark = len(systemd.messages)
        daemon.send(signal.SIGHUP)
        rejected = daemon.wait_event("reload.rejected")
        assert any("rescan_seconds: must be a number" in p for p in rejected["problems"])
        assert any("setle_seconds: unknown key" in p for p in rejected["problems"])
        systemd.wait_for("^RELOADING=1", after=mark)
        systemd.wait_for(r"^READY=1\nSTATUS=.*last reload rejected", after=mark)
        make_image(studio.inbox / "still.png")
        wait_for(lambda: studio.files(studio.archive) == ["still.png"],
                 what="the old configuration still at work")
        assert daemon.stop() == 0
    assert studio.files(studio.outbox) == ["still.png"]
    assert KEY not in daemon.log


def test_an_old_keys_refusal_answered_after_the_resume_does_not_pause_again(
        tmp_path: Path, sandbox: Sandbox) -> None:
    # A request sent with the revoked key is answered (403) only after the reload's probe has
    # resumed the queue: its refusal predates the new key and must not hold the files for a
    # whole probe interval (a flake of the test below, under load).
    studio = Studio(tmp_path, sandbox.url, api={"key": "revoked-key-0000"},
                    retry={"pause_seconds": 120}, inbox={"settle_seconds": 0.1})
    sandbox.latency = 4.0
    config = studio.write_config()
    with DaemonProcess(config) as daemon:
        daemon.wait_event("ready")
        make_image(studio.inbox / "slow.png", seed=1)
        wait_for(lambda: studio.states() == ["sending"], what="the slow request")
        time.sleep(1.0)  # in the sandbox, waiting its 4 s
        sandbox.latency = 0.0
        make_image(studio.inbox / "quick.png", seed=2)
        daemon.wait_event("account.paused")
        studio.data["api"]["key"] = KEY
        studio.write_config()
        daemon.send(signal.SIGHUP)
        daemon.wait_event("account.resumed")
        wait_for(lambda: len(studio.files(studio.archive)) == 2, timeout=20,
                 what="both files sent with the new key")
        assert daemon.stop() == 0
    assert len(daemon.events("account.paused")) == 1
    assert daemon.events("account.refusal_outdated"), "the old key's late 403"


def test_reload_with_a_working_key_resumes_a_paused_queue_at_once(
        tmp_path: Path, sandbox: Sandbox) -> None:
    studio = Studio(tmp_path, sandbox.url, api={"key": "revoked-key-0000"},
                    retry={"pause_seconds": 120})
    for n in range(3):
        make_image(studio.inbox / f"p{n}.png", seed=n)
    config = studio.write_config()
    with DaemonProcess(config) as daemon:
        daemon.wait_event("account.paused")
        studio.data["api"]["key"] = KEY
        studio.write_config()
        began = time.monotonic()
        daemon.send(signal.SIGHUP)
        assert daemon.wait_event("reload.done")["probing"] is True
        wait_for(lambda: len(studio.files(studio.archive)) == 3, what="the queue resumed")
        assert time.monotonic() - began < 10, "resumed by the reload, not the 120 s probe"
        daemon.wait_event("account.resumed")
        assert daemon.stop() == 0
    assert KEY not in daemon.log and "revoked-key-0000" not in daemon.log


def test_reload_switches_a_removed_inbox_off_and_back_on(tmp_path: Path, sandbox: Sandbox,
                                                         log_lines: LogCapture) -> None:
    other = {"path": "other/in", "outbox": "other/out", "errors": "other/err",
             "settle_seconds": 0.1}
    (tmp_path / "other" / "in").mkdir(parents=True)
    studio = Studio(tmp_path, sandbox.url, extra_inboxes=[other])
    with Running(studio.config()) as daemon:
        studio.data["inboxes"] = [other]  # the first inbox goes away
        studio.data["state_dir"] = "elsewhere"
        studio.data["api"]["concurrency"] = 2
        daemon.reload(studio.config())
        make_image(studio.inbox / "ignored.png")
        make_image(tmp_path / "other" / "in" / "o.png", seed=1)
        wait_for(lambda: studio.files(tmp_path / "other" / "out") == ["o.png"], what="o.png")
        time.sleep(1.0)  # two rescans: the removed inbox is not scanned any more
        assert studio.files(studio.inbox) == ["ignored.png"]
        assert daemon.healthy(), "an inbox switched off is not a dead watch"
        studio.data["inboxes"].insert(0, Studio(tmp_path, sandbox.url).data["inboxes"][0])
        daemon.reload(studio.config())
        wait_for(lambda: studio.files(studio.archive) == ["ignored.png"], what="back on")
        assert daemon.config.state_dir == tmp_path / "state", "state_dir needs a restart"
        assert daemon.config.api.concurrency == 4
    first, second = log_lines.events("reload.done")
    assert first["removed"] == [str(studio.inbox)]
    assert second["added"] == [str(studio.inbox)]
    restart = log_lines.events("reload.needs_restart")
    assert restart and restart[0]["settings"] == ["state_dir", "api.concurrency"]


def test_reload_refuses_unusable_folders_and_changes_nothing(studio: Studio,
                                                             tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file where a folder should be")
    with Running(studio.config()) as daemon:
        before = daemon.config
        # Parsing already refuses this one; built by hand, it stands for a folder that went
        # bad between parsing and applying, where the reload's own folder check stops it.
        inbox = dataclasses.replace(before.inboxes[0], outbox=tmp_path / "blocker" / "out")
        with pytest.raises(ConfigError) as raised:
            daemon.reload(dataclasses.replace(before, inboxes=(inbox,)))
        assert raised.value.problems[0].startswith("inboxes[0].outbox: cannot create")
        assert daemon.config is before
        make_image(studio.inbox / "x.png")
        wait_for(lambda: studio.files(studio.archive) == ["x.png"], what="still running")


def test_one_daemon_per_state_dir(studio: Studio) -> None:
    with Running(studio.config()):
        with pytest.raises(StartupError) as raised:
            Daemon(studio.config()).start()
        assert "another watchfolder daemon" in raised.value.problems[0]
        assert str(os.getpid()) in raised.value.problems[0]
    with Running(studio.config()):
        pass  # released at stop


# -- the unit file -----------------------------------------------------------------------------


def _unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_file_is_notify_reloadable_and_hardened() -> None:
    unit = _unit_settings()
    expected = {
        "Type": "notify", "Restart": "on-failure", "ProtectSystem": "strict",
        "NoNewPrivileges": "true", "PrivateTmp": "true", "CapabilityBoundingSet": "",
        "StateDirectory": "watchfolder",
        "User": "watchfolder", "ExecReload": "/bin/kill -HUP $MAINPID",
    }
    for key, value in expected.items():
        assert unit.get(key) == [value], key
    assert unit["ReadWritePaths"] and unit["WatchdogSec"]
    assert unit["SystemCallFilter"][0] == "@system-service"
    assert unit["LoadCredential"][0].startswith(f"{CREDENTIAL_NAME}:")
    assert "Environment" not in unit and "EnvironmentFile" not in unit, "no key in the env"
    assert "run --config" in unit["ExecStart"][0]
    assert "2" in unit["RestartPreventExitStatus"][0].split()


def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "install systemd (systemd-analyze): .ci/run does, as root"
    # verify insists the ExecStart= binary exists: point it at this interpreter.
    text = UNIT.read_text().replace("/opt/watchfolder/bin/watchfolder",
                                    f"{sys.executable} -m watchfolder")
    unit = tmp_path / "watchfolder.service"
    unit.write_text(text)
    done = subprocess.run([analyze, "verify", "--man=no", str(unit)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr  # unknown keys and bad values only warn


def test_a_full_notify_socket_never_blocks_and_state_changes_wait_their_turn(
        tmp_path: Path, log_lines: LogCapture) -> None:
    import socket as socket_module

    path = str(tmp_path / "notify.sock")
    with socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_DGRAM) as systemd:
        systemd.bind(path)  # PID 1, too busy to read: its queue fills up
        notifier = Notifier(path, watchdog_seconds=1.0)
        started = time.monotonic()
        for _ in range(5000):
            notifier.watchdog()
        assert not notifier.ready("ready after all")  # the queue is full: held, not sent
        assert time.monotonic() - started < 5, "a full queue never blocks the sender"
        assert log_lines.events("notify.busy")
        systemd.setblocking(False)
        received = []
        with contextlib.suppress(BlockingIOError):
            while True:
                received.append(systemd.recv(4096))
        assert notifier.status("later") is True  # the held READY=1 goes first
        assert systemd.recv(4096).startswith(b"READY=1")
        assert systemd.recv(4096) == b"STATUS=later"
        notifier.close()
