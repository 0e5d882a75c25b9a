"""Several real daemons on one inbox (issue 13): each file processed once, one request each, no
twins; a daemon killed mid-batch is finished by the others after its lease; the key's limit
is shared through a real redis-server."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import KEY, RedisServer, Studio, make_image, wait_for
from tests.test_service import DaemonProcess
from watchfolder.config.settings import StoreUrl
from watchfolder.coordination.coordinator import adopt_empty_store
from watchfolder.dev.sandbox import Sandbox


def host_config(studio: Studio, name: str, **extra: Any) -> Path:
    """One host's configuration: the shared folders, a state_dir of its own."""
    data = {**studio.data, "state_dir": f"state-{name}", **extra}
    path = studio.root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def start_hosts(studio: Studio, count: int, first: int = 0, **extra: Any) -> list[DaemonProcess]:
    hosts = [DaemonProcess(host_config(studio, f"host{n}", **extra))
             for n in range(first, first + count)]
    for host in hosts:
        host.wait_event("ready")
    return hosts


def stop(hosts: list[DaemonProcess]) -> None:
    for host in hosts:
        if host.proc.poll() is None:
            host.send(signal.SIGTERM)
    for host in hosts:
        host.stop(timeout=30)


def adopt_fresh(redis_server: RedisServer) -> None:
    """A store just started for the test: no daemon sent in the last minute, no hold."""
    adopt_empty_store(StoreUrl(redis_server.url), KEY)


def check_once(studio: Studio, sandbox: Sandbox, names: list[str], *, extra: int = 0) -> None:
    assert studio.files(studio.archive) == sorted(names)
    assert studio.files(studio.outbox) == sorted(names), "one result each, no '-1' twin"
    assert studio.files(studio.errors) == []
    assert len(names) <= sandbox.count(200) <= len(names) + extra


@pytest.mark.parametrize("store", [False, True], ids=["claims-on-the-share", "redis"])
def test_three_daemons_on_one_inbox_send_each_file_once(
        tmp_path: Path, sandbox: Sandbox, redis_server: RedisServer, store: bool) -> None:
    sandbox.latency = 0.05
    studio = Studio(tmp_path, sandbox.url)
    extra = {"coordination": {"url": redis_server.url, "lease_seconds": 5}} if store else {}
    adopt_fresh(redis_server)
    hosts = start_hosts(studio, 3, **extra)
    try:
        names = [f"shot{n:02d}.png" for n in range(24)]
        for n, name in enumerate(names):
            make_image(studio.inbox / name, seed=n)
        # Its log line comes after a file is archived: wait for the lines, not the files.
        wait_for(lambda: sum(len(host.events("file.done")) for host in hosts) >= len(names),
                 timeout=60, what="every file done")
        done = [len(host.events("file.done")) for host in hosts]
    finally:
        stop(hosts)
    check_once(studio, sandbox, names)
    assert sum(done) == len(names)


def test_a_killed_daemons_files_are_finished_by_the_others_after_its_lease(
        tmp_path: Path, sandbox: Sandbox, redis_server: RedisServer) -> None:
    sandbox.latency = 1.0  # requests in flight when the host dies
    studio = Studio(tmp_path, sandbox.url, api={"concurrency": 2})
    extra = {"coordination": {"url": redis_server.url, "lease_seconds": 5}}
    adopt_fresh(redis_server)
    victim = start_hosts(studio, 1, **extra)[0]
    names = [f"shot{n:02d}.png" for n in range(6)]
    try:
        for n, name in enumerate(names):
            make_image(studio.inbox / name, seed=n)
        victim.wait_event("file.done")  # it claimed them all and is mid-batch
        victim.send(signal.SIGKILL)
    finally:
        victim.stop(timeout=10)
    killed_at = time.monotonic()
    survivors = start_hosts(studio, 2, first=1, **extra)  # other hosts, other state_dirs
    try:
        wait_for(lambda: len(studio.files(studio.archive)) == len(names), timeout=60,
                 what="the survivors finish the dead host's files")
    finally:
        stop(survivors)
    assert time.monotonic() - killed_at >= 4, "taken over only once the lease ran out"
    # Paid again: the requests in flight at the kill (concurrency 2), and the answers the dead
    # host had received but not yet placed, since its spool died with it (at most as many:
    # a request slot is freed once its answer is journaled).
    check_once(studio, sandbox, names, extra=4)


def test_status_shows_the_daemons_sharing_the_key(tmp_path: Path, sandbox: Sandbox,
                                                  redis_server: RedisServer) -> None:
    import json

    from tests.conftest import run_watchfolder

    studio = Studio(tmp_path, sandbox.url)
    extra = {"coordination": {"url": redis_server.url, "lease_seconds": 5}}
    adopt_fresh(redis_server)
    hosts = start_hosts(studio, 2, **extra)
    try:
        done = run_watchfolder("status", "--config", str(host_config(studio, "host0", **extra)),
                               "--json")
        text = run_watchfolder("status", "--config", str(host_config(studio, "host0", **extra)))
    finally:
        stop(hosts)
    assert done.returncode == 0, done.stderr
    shared = json.loads(done.stdout)["coordination"]
    assert shared["store"] == redis_server.url
    pids = sorted(host["pid"] for host in shared["hosts"])
    assert pids == sorted(host.proc.pid for host in hosts)
    assert all(host["claims"] == 0 and host["host"] for host in shared["hosts"])
    assert "daemons sharing the key" in text.stdout


def journal_states(state_dir: Path) -> list[str]:
    """The journal's state of every file a host has seen (read-only; [] before its first)."""
    import contextlib
    import sqlite3

    path = state_dir / "journal.sqlite3"
    if not path.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
        try:
            return [state for (state,) in db.execute("SELECT state FROM files ORDER BY id")]
        except sqlite3.OperationalError:
            return []  # the schema is being made


def test_a_takeover_pays_only_for_the_request_slots_of_the_dead_host(
        tmp_path: Path, sandbox: Sandbox, redis_server: RedisServer) -> None:
    # Issue 20: an answer the dead host had received but not placed died with its spool, and
    # its request slot had already gone to new requests: the taker paid for all of them.
    sandbox.latency = 1.0
    studio = _one_slot_two_inboxes(tmp_path, sandbox)
    extra = {"coordination": {"url": redis_server.url, "lease_seconds": 5}}
    adopt_fresh(redis_server)
    # The failpoint kills the victim when a second answer arrives (if one ever does).
    victim = DaemonProcess(host_config(studio, "host0", **extra),
                           env={"WATCHFOLDER_FAILPOINT": "answered:2"})
    try:
        _x1_answered_into_the_spool_then_y0_y1(studio, victim)
        # A freed slot sends y0 at once and dies at its answer; a held one sends nothing.
        deadline = time.monotonic() + 4 * sandbox.latency + 2
        while victim.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if victim.proc.poll() is None:
            victim.send(signal.SIGKILL)
    finally:
        victim.stop(timeout=10)
    (tmp_path / "outbox-away").rename(studio.outbox)
    survivors = start_hosts(studio, 1, first=1, **extra)
    try:
        wait_for(lambda: len(studio.files(studio.archive)) == 1
                 and len(studio.files(tmp_path / "archive-y")) == 2, timeout=60,
                 what="the survivor finishes the dead host's files")
    finally:
        stop(survivors)
    assert studio.files(studio.outbox) == ["x1.png"], "one result, no '-1' twin"
    assert studio.files(tmp_path / "outbox-y") == ["y0.png", "y1.png"]
    # Three files, and one request slot (concurrency 1) of the dead host paid twice at most.
    assert sandbox.count(200) <= 3 + 1


def _one_slot_two_inboxes(tmp_path: Path, sandbox: Sandbox) -> Studio:
    """One request slot (concurrency 1) for the inbox and a second inbox, inbox-y."""
    other = {"path": "inbox-y", "outbox": "outbox-y", "errors": "errors-y",
             "archive": "archive-y", "settle_seconds": 0.1, "polling_interval_seconds": 0.1}
    studio = Studio(tmp_path, sandbox.url, api={"concurrency": 1}, extra_inboxes=[other])
    for folder in ("inbox-y", "outbox-y", "errors-y", "archive-y", "outbox", "archive"):
        (tmp_path / folder).mkdir(exist_ok=True)
    return studio


def _x1_answered_into_the_spool_then_y0_y1(studio: Studio, daemon: DaemonProcess) -> None:
    """x1 sent while its outbox is taken away (its answer will have nowhere to go: it waits
    in host0's spool), then y0 and y1 dropped into inbox-y."""
    daemon.wait_event("ready")
    make_image(studio.inbox / "x1.png", seed=1)
    wait_for(lambda: journal_states(studio.root / "state-host0") == ["sending"],
             what="x1's request on its way")
    studio.outbox.rename(studio.root / "outbox-away")
    daemon.wait_event("destination.unavailable")
    for n in range(2):
        make_image(studio.root / "inbox-y" / f"y{n}.png", seed=10 + n)


def test_one_host_sends_while_an_answer_waits_and_its_restart_pays_for_it_once(
        tmp_path: Path, sandbox: Sandbox) -> None:
    # Issue 17: without a coordination store no other host takes the file over, so an answer
    # in the spool needs no slot (the restart adopts it): the slot sends again at once, and a
    # kill still costs no credit for an answer received.
    sandbox.latency = 1.0
    studio = _one_slot_two_inboxes(tmp_path, sandbox)
    host = DaemonProcess(host_config(studio, "host0"))
    try:
        _x1_answered_into_the_spool_then_y0_y1(studio, host)
        wait_for(lambda: len(studio.files(tmp_path / "archive-y")) == 2, timeout=30,
                 what="the only slot sends y0 and y1 while x1's answer waits")
        assert journal_states(tmp_path / "state-host0")[0] == "fetched"
        host.send(signal.SIGKILL)
    finally:
        host.stop(timeout=10)
    (tmp_path / "outbox-away").rename(studio.outbox)
    restarted = start_hosts(studio, 1)  # the same state_dir: its spool, its claims
    try:
        wait_for(lambda: len(studio.files(studio.archive)) == 1, timeout=60,
                 what="x1 finished from the spool")
    finally:
        stop(restarted)
    assert studio.files(studio.outbox) == ["x1.png"]
    assert sandbox.count(200) == 3, "x1's answer was adopted from the spool, not paid again"
