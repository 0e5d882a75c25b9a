"""The shared rate limit, pause and registry (issue 13), on a real redis-server.

Windows are shrunk (1-2 s instead of 60) through the constructor; the store is really killed
and restarted. The limit is checked in the store's own clock: a witness thread copies the
store's window of send times before they expire.
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from tests.conftest import KEY, LogCapture, RedisServer, run_watchfolder, wait_for
from watchfolder.config.settings import ConfigError, StoreUrl, parse_config
from watchfolder.coordination.claims import Holder
from watchfolder.coordination.coordinator import (
    Coordinator,
    adopt_empty_store,
    hosts_report,
    key_id,
)
from watchfolder.coordination.limits import LocalLimiter, SharedPause
from watchfolder.coordination.shared_limit import SharedRateLimiter
from watchfolder.coordination.store import Store

WINDOW = 2.0
MARGIN = 0.05


class Shared:
    """Limiters of several "hosts" sharing one store and one key, and a witness of the window."""

    def __init__(self, url: str, *, window: float = WINDOW, adopt: bool = True) -> None:
        self.url = StoreUrl(url)
        self.api_key = f"key-{secrets.token_hex(8)}"
        self.window = window
        self.stores: list[Store] = []
        self.seen: dict[str, float] = {}  # member → store time (s) of every send
        self._stop = threading.Event()
        self._witness: threading.Thread | None = None
        if adopt:
            adopt_empty_store(self.url, self.api_key)

    def limiter(self, limit: int, **kw: Any) -> SharedRateLimiter:
        """A limiter of a new host; bursts unspread unless `spread` is given."""
        store = Store(self.url)
        self.stores.append(store)
        return SharedRateLimiter(store, key_id(self.api_key), secrets.token_hex(4), limit,
                                 window=self.window, margin=MARGIN, retry_every=0.05,
                                 **{"spread": 0.0, **kw})

    def watch(self) -> None:
        """Copy the store's window every 0.2 s (entries live `window + margin`)."""
        client = redis.Redis.from_url(self.url.reveal(), decode_responses=True,
                                      socket_timeout=1, socket_connect_timeout=1)
        name = f"watchfolder:{{{key_id(self.api_key)}}}:sends"

        def run() -> None:
            try:
                while not self._stop.wait(0.2):
                    try:
                        for member, score in client.zrange(name, 0, -1, withscores=True):
                            self.seen[member] = score / 1e6
                    except redis.ConnectionError:
                        continue  # killed on purpose by the test
            finally:
                client.close()

        self._witness = threading.Thread(target=run, name="test-witness")
        self._witness.start()

    def busiest_window(self) -> int:
        """The most sends the store granted in any `window` seconds (by its clock)."""
        times = sorted(self.seen.values())
        most, start = 0, 0
        for end, t in enumerate(times):
            while t - times[start] >= self.window:
                start += 1
            most = max(most, end - start + 1)
        return most

    def close(self) -> None:
        self._stop.set()
        if self._witness is not None:
            self._witness.join()
        for store in self.stores:
            store.close()


@pytest.fixture
def shared(redis_server: RedisServer) -> Iterator[Shared]:
    made = Shared(redis_server.url)
    yield made
    made.close()


def hammer(limiters: list[SharedRateLimiter], seconds: float, threads_each: int = 3) -> list[float]:
    """Workers on every limiter acquire as fast as granted for `seconds`; grant times."""
    stop = threading.Event()
    granted: list[float] = []
    lock = threading.Lock()

    def work(limiter: SharedRateLimiter) -> None:
        while limiter.acquire(stop):
            with lock:
                granted.append(time.monotonic())

    workers = [threading.Thread(target=work, args=(limiter,), name="test-acquirer")
               for limiter in limiters for _ in range(threads_each)]
    for worker in workers:
        worker.start()
    time.sleep(seconds)
    stop.set()
    for worker in workers:
        worker.join()
    return granted


# -- the window ----------------------------------------------------------------------------------


def test_hosts_together_never_exceed_the_limit_in_any_window(shared: Shared) -> None:
    limiters = [shared.limiter(10) for _ in range(3)]
    shared.watch()
    granted = hammer(limiters, 2.6 * WINDOW)
    time.sleep(0.3)  # the witness's last look
    assert shared.busiest_window() == 10
    # Used, too: three windows' worth (the first at once, then one per window + margin).
    assert len(granted) >= 30
    assert len(shared.seen) == len(granted)


def test_the_smallest_limit_among_hosts_holds(shared: Shared) -> None:
    generous, careful = shared.limiter(10), shared.limiter(4)
    careful.refresh()  # registered, though it sends nothing
    shared.watch()
    granted = hammer([generous], 1.5 * WINDOW)
    time.sleep(0.3)
    assert shared.busiest_window() == 4
    assert generous.applied == 4
    assert len(granted) <= 8
    careful.leave()  # stopped: its limit no longer counts
    time.sleep(WINDOW + MARGIN)
    assert [generous.try_acquire() for _ in range(10)] == [0.0] * 10
    assert generous.applied == 10
    assert generous.try_acquire() > 0


def test_bursts_are_spread_over_half_a_window(shared: Shared) -> None:
    a, b = shared.limiter(10, spread=0.5), shared.limiter(10, spread=0.5)
    shared.watch()
    granted = hammer([a, b], WINDOW)
    time.sleep(0.3)
    times = sorted(shared.seen.values())
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert min(gaps) >= 0.5 * WINDOW / 10 - 0.001  # 0.1 s apart at least, in the store's clock
    assert 9 <= len(granted) <= 10  # the limit's worth in about half a window


def test_a_429_holds_every_host(shared: Shared) -> None:
    a, b = shared.limiter(100), shared.limiter(100)
    assert a.rate_limited(0.6) == 0.6
    assert 0.4 < b.try_acquire() <= 0.6
    time.sleep(0.65)
    assert b.try_acquire() == 0.0
    a.backoff = 0.2
    assert a.rate_limited(None) == 0.2  # no Retry-After: this host's backoff, shared hold
    assert a.rate_limited(None) == 0.4
    assert b.try_acquire() > 0.2
    a.succeeded()
    time.sleep(0.45)
    assert a.rate_limited(None) == 0.2  # a success reset the backoff


# -- the account pause ---------------------------------------------------------------------------


def test_one_hosts_402_pauses_all_with_one_probe_per_interval(shared: Shared) -> None:
    a, b = shared.limiter(100, pause_poll=0.1), shared.limiter(100, pause_poll=0.1)
    seen_by_b: list[SharedPause | None] = []
    b.on_pause_change = seen_by_b.append
    assert a.pause("no_credits", 0.5, status=402, message="no credits left")
    assert not a.pause("no_credits", 0.5, status=402, message="again")  # already paused
    assert a.paused() is not None
    b.refresh()
    pause = b.paused()
    assert pause is not None and (pause.reason, pause.status) == ("no_credits", 402)
    assert type(pause.account_error()).__name__ == "CreditsExhausted"
    assert seen_by_b == [pause]
    assert a.try_acquire() > 0 and b.try_acquire() > 0  # nothing until the probe is due
    time.sleep(0.55)
    first, second = b.try_acquire(), a.try_acquire()
    assert first == 0.0  # b sends the probe ...
    assert second > 0  # ... and nobody else until the next interval
    b.succeeded()  # the probe was accepted: everyone resumes
    assert b.paused() is None
    assert seen_by_b == [pause, None]
    assert a.try_acquire() == 0.0
    assert a.paused() is None


def test_a_resume_elsewhere_reaches_a_waiting_host(shared: Shared) -> None:
    a, b = shared.limiter(100, pause_poll=0.1), shared.limiter(100, pause_poll=0.1)
    a.pause("key_refused", 30, status=403, message="invalid api key")
    stop = threading.Event()
    result: list[bool] = []
    waiter = threading.Thread(target=lambda: result.append(b.acquire(stop)), name="test-wait")
    waiter.start()
    time.sleep(0.3)
    assert not result  # paused for 30 s
    assert a.resume()
    waiter.join(timeout=5)
    assert result == [True]


# -- the store goes away -------------------------------------------------------------------------


def test_store_killed_sends_wait_logged_once_then_resume(redis_server: RedisServer,
                                                        log_lines: LogCapture) -> None:
    shared = Shared(redis_server.url, window=1.0)
    try:
        limiter = shared.limiter(100)
        assert limiter.try_acquire() == 0.0
        redis_server.kill()
        stop = threading.Event()
        results: list[float] = []
        lock = threading.Lock()

        def send() -> None:
            if limiter.acquire(stop):
                with lock:
                    results.append(time.monotonic())

        waiting = [threading.Thread(target=send, name="test-wait") for _ in range(3)]
        for thread in waiting:
            thread.start()
        time.sleep(0.6)
        assert results == []  # nothing is sent while the store is away
        assert len(log_lines.events("coordination.unreachable")) == 1
        redis_server.start()  # empty: its window of sends is lost
        restarted = time.monotonic()
        for thread in waiting:
            thread.join(timeout=10)
        assert len(results) == 3
        # ... and none before the lost sends were out of any window.
        assert min(results) - restarted >= 1.0 - 0.1
        assert len(log_lines.events("coordination.unreachable")) == 1
        assert len(log_lines.events("coordination.recovered")) == 1
        assert len(log_lines.events("coordination.store_reset")) == 1
        assert log_lines.events("coordination.unreachable")[0]["level"] == "warning"
    finally:
        shared.close()


def _until_second_fraction(fraction: float) -> None:
    """Sleep until the wall clock's fraction of a second is `fraction` (the store's clock is
    this machine's)."""
    time.sleep((fraction - time.time() % 1.0) % 1.0)


@pytest.mark.parametrize("aligned", [False, True], ids=["anytime", "before_a_whole_second"])
def test_a_store_restarted_empty_does_not_let_hosts_burst(redis_server: RedisServer,
                                                          aligned: bool) -> None:
    # Aligned: the store says how long it has been up in whole seconds (`uptime_in_seconds`,
    # the difference of two truncated clocks): started at x.95 and asked at x+1.05, it says 1,
    # which would date the loss at x.05, 0.9 s before it happened, and sends made just before
    # the loss would share a window with the first sends after the hold.
    shared = Shared(redis_server.url)
    try:
        a, b = shared.limiter(5), shared.limiter(5)
        shared.watch()
        if aligned:
            _until_second_fraction(0.55)
        assert [a.try_acquire() for _ in range(5)].count(0.0) == 5  # the window is full
        if aligned:
            _until_second_fraction(0.9)  # the witness saw them
            redis_server.restart()  # up again before the whole second, or just after it
            _until_second_fraction(0.1)  # asked after the whole second
        else:
            time.sleep(0.4)  # the witness saw them
            redis_server.restart()
        granted = hammer([a, b], WINDOW + 1.0, threads_each=2)
        time.sleep(0.3)
        assert granted, "never resumed"
        assert shared.busiest_window() == 5
    finally:
        shared.close()


def test_a_fresh_store_holds_a_window_unless_adopted(redis_server: RedisServer) -> None:
    # First use of a store up for longer than a window: nothing says when sends were lost.
    client = redis.Redis.from_url(redis_server.url)
    wait_for(lambda: client.info("server")["uptime_in_seconds"] >= 2, what="uptime")
    client.close()
    unknown = Shared(redis_server.url, window=1.0, adopt=False)
    adopted = Shared(redis_server.url, window=1.0)
    try:
        assert unknown.limiter(10).try_acquire() > 0.9
        assert adopted.limiter(10).try_acquire() == 0.0
    finally:
        unknown.close()
        adopted.close()


def test_the_store_sees_only_a_hash_of_the_key(redis_server: RedisServer) -> None:
    shared = Shared(redis_server.url)
    try:
        limiter = shared.limiter(10)
        limiter.try_acquire()
        limiter.pause("no_credits", 1, status=402, message="m")
        client = redis.Redis.from_url(redis_server.url, decode_responses=True)
        names = client.keys("*")
        dump = "".join(names) + "".join(str(client.dump(name)) for name in names)
        client.close()
        assert names and shared.api_key not in dump
    finally:
        shared.close()


# -- configuration -------------------------------------------------------------------------------


def config_with(tmp_path: Path, coordination: dict[str, Any] | None = None,
                **api: Any) -> Any:
    (tmp_path / "in").mkdir(parents=True, exist_ok=True)
    raw: dict[str, Any] = {"api": {"key": KEY, **api}, "state_dir": "state",
                           "inboxes": [{"path": "in", "outbox": "out", "errors": "err"}]}
    if coordination is not None:
        raw["coordination"] = coordination
    return parse_config(raw, base_dir=tmp_path)


def test_config_without_the_section_has_no_store(tmp_path: Path) -> None:
    config = config_with(tmp_path)
    assert config.coordination.url is None
    assert config.coordination.lease_seconds == 60
    assert config.redacted()["coordination"] == {"url": None, "lease_seconds": 60.0}


def test_the_store_password_is_a_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://watch:s3cret-pa55word@10.0.0.5:6379/2")
    config = config_with(tmp_path, {"url": "${REDIS_URL}", "lease_seconds": 30})
    url = config.coordination.url
    assert url.reveal() == "redis://watch:s3cret-pa55word@10.0.0.5:6379/2"
    shown = "redis://watch:***@10.0.0.5:6379/2"
    assert config.redacted()["coordination"] == {"url": shown, "lease_seconds": 30.0}
    assert "s3cret" not in repr(config) and "s3cret" not in str(url)


def test_check_config_never_prints_the_store_password(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    path = tmp_path / "daemon.yaml"
    path.write_text("api: {key: test-key-0123456789}\n"
                    "coordination: {url: 'rediss://:hunter2hunter2@store.lan:6380/0'}\n"
                    "inboxes: [{path: in, outbox: out, errors: err}]\n")
    done = run_watchfolder("check-config", "--config", str(path))
    assert done.returncode == 0, done.stderr
    assert "hunter2" not in done.stdout + done.stderr
    assert "rediss://:***@store.lan:6380/0" in done.stdout


@pytest.mark.parametrize(("coordination", "problem"), [
    ({"url": "http://10.0.0.5:6379"}, "coordination.url: must be a redis:// or rediss:// URL"),
    ({"url": "redis://:pw-secret-123@:6379"}, "coordination.url: names no host"),
    ({"url": "redis://host:port/0"}, "coordination.url: has an invalid port"),
    ({"url": "redis://host/zero"}, "coordination.url: the path must be a database number"),
    ({"url": "redis://host/0?ssl=1"}, "coordination.url: takes no ?options"),
    ({"lease_seconds": 2}, "coordination.lease_seconds: must be at least 5"),
    ({"lease": 60}, "coordination.lease: unknown key (did you mean 'lease_seconds'?)"),
])
def test_config_problems_are_named(tmp_path: Path, coordination: dict[str, Any],
                                   problem: str) -> None:
    with pytest.raises(ConfigError) as raised:
        config_with(tmp_path, coordination)
    assert any(p.startswith(problem) for p in raised.value.problems), raised.value.problems
    assert "pw-secret" not in str(raised.value)


# -- the coordinator -----------------------------------------------------------------------------


def test_without_a_store_the_coordinator_claims_on_the_share(tmp_path: Path) -> None:
    config = config_with(tmp_path)
    coordinator = Coordinator.from_config(config, lease_seconds=1)
    assert coordinator.store is None
    assert isinstance(coordinator.limiter, LocalLimiter)
    coordinator.start()
    try:
        inbox = config.inboxes[0].path
        claim = coordinator.claim(inbox, "a.png")
        assert claim is not None
        assert coordinator.claim(inbox, "a.png") is claim  # idempotent: a parked file
        assert coordinator.claims_held == 1
        assert coordinator.hosts()["hosts"][0]["claims"] == 1
        time.sleep(1.5)  # the thread renews it past its lease
        # Another daemon (its own state_dir, so its own instance) on the same inbox.
        other = Coordinator.from_config(config, lease_seconds=1,
                                        holder=Holder.this_process("other-daemon"))
        assert other.claim(inbox, "a.png") is None
        other.stop()
    finally:
        coordinator.stop()  # hands the file back
    assert list((inbox / ".watchfolder-claims").glob("*.claim")) == []


def test_hosts_sharing_a_store_show_in_status(tmp_path: Path, redis_server: RedisServer) -> None:
    config = config_with(tmp_path, {"url": redis_server.url})
    adopt_empty_store(StoreUrl(redis_server.url), KEY)
    inbox = config.inboxes[0].path
    first = Coordinator.from_config(config, lease_seconds=1)
    second = Coordinator.from_config(config, lease_seconds=1,
                                     holder=Holder.this_process("second-daemon"))
    stranger = Coordinator.from_config(config_with(tmp_path / "x", {"url": redis_server.url},
                                                   key="another-key-0123456789"))
    for coordinator in (first, second, stranger):
        coordinator.start()
    try:
        assert first.claim(inbox, "a.png") is not None
        assert first.claim(inbox, "b.png") is not None
        assert second.claim(inbox, "c.png") is not None
        assert second.claim(inbox, "a.png") is None
        first.beat()
        second.beat()
        hosts = first.hosts()["hosts"]
        assert sorted(h["claims"] for h in hosts) == [1, 2]  # the other key's daemon: not ours
        assert {h["pid"] for h in hosts} == {first.holder.pid}
        report = hosts_report(config)
        assert report is not None
        assert sorted(h["claims"] for h in report["hosts"]) == [1, 2]
        first.stop()
        assert [h["claims"] for h in second.hosts()["hosts"]] == [1]
        assert second.claim(inbox, "a.png") is not None  # handed back at stop
    finally:
        first.stop()
        second.stop()
        stranger.stop()
    assert hosts_report(config_with(tmp_path / "y")) is None


def test_status_reports_an_unreachable_store_without_logging(tmp_path: Path,
                                                            log_lines: LogCapture) -> None:
    from tests.conftest import free_port

    url = f"redis://:n0t-to-be-seen@127.0.0.1:{free_port()}/0"
    report = hosts_report(config_with(tmp_path, {"url": url}))
    assert report is not None and report["hosts"] == [] and "unreachable" in report
    assert "n0t-to-be-seen" not in str(report)
    assert log_lines.getvalue() == ""


def test_an_unreachable_store_is_logged_without_its_password(tmp_path: Path,
                                                             log_lines: LogCapture) -> None:
    from tests.conftest import free_port

    url = f"redis://:n0t-to-be-seen@127.0.0.1:{free_port()}/0"
    coordinator = Coordinator.from_config(config_with(tmp_path, {"url": url}), lease_seconds=1)
    coordinator.start()
    try:
        assert coordinator.limiter.try_acquire() > 0
        assert len(log_lines.events("coordination.unreachable")) == 1
    finally:
        coordinator.stop()
    assert "n0t-to-be-seen" not in log_lines.getvalue()


def test_a_store_user_without_info_rights_still_coordinates(redis_server: RedisServer,
                                                            tmp_path: Path) -> None:
    admin = redis.Redis.from_url(redis_server.url)
    admin.acl_setuser("wf", enabled=True, passwords=["+pw-0123456789"], keys=["*"],
                      categories=["+@all", "-@dangerous"])  # INFO is @dangerous
    admin.close()
    url = f"redis://wf:pw-0123456789@127.0.0.1:{redis_server.port}/0"
    shared = Shared(url, window=1.0)
    try:
        limiter = shared.limiter(3)
        assert [limiter.try_acquire() for _ in range(3)] == [0.0] * 3
        assert limiter.try_acquire() > 0
        config = config_with(tmp_path, {"url": url})
        adopt_empty_store(StoreUrl(url), KEY)  # the grace after a loss is the key's (reset.py)
        coordinator = Coordinator.from_config(config, lease_seconds=1)
        try:
            assert coordinator.claim(config.inboxes[0].path, "a.png") is not None
        finally:
            coordinator.stop()
    finally:
        shared.close()


# -- the first file after a store loss (issue 20) -------------------------------------------------


@pytest.mark.parametrize("lease", [60.0, 120.0])
def test_the_first_file_on_a_fresh_store_waits_one_window_whatever_the_lease(
        redis_server: RedisServer, tmp_path: Path, log_lines: LogCapture, lease: float) -> None:
    # A store just started, never used by this key: the claim grace and the send hold run
    # from its start, together, so the first file goes at start + window + margin, not after a
    # lease and then a window more (121 s with lease 60 and the vendor's window).
    window = 2.0
    started = time.monotonic()  # the store started a moment before: this bound is the looser
    config = config_with(tmp_path, {"url": redis_server.url, "lease_seconds": lease},
                         requests_per_minute=10)
    coordinator = Coordinator.from_config(config, window=window)
    inbox = config.inboxes[0].path
    stop = threading.Event()
    try:
        # What the pipeline does with a file: claim it (or look again when told), then send.
        while coordinator.claim(inbox, "a.png") is None:
            assert time.monotonic() - started < 30, "the claim never came"
            time.sleep(coordinator.claim_wait())
        assert coordinator.limiter.acquire(stop)
        sent = time.monotonic() - started
    finally:
        coordinator.stop()
    # The store tells its uptime in whole seconds: its start is known to a second, late (safe).
    assert window <= sent <= window + 0.5 + 1.0 + 0.4, f"sent {sent:.2f} s after the store started"
    # Said once, when the wait began (at the first refused claim), with the wait that was left.
    resets = log_lines.events("coordination.store_reset")
    assert len(resets) == 1
    assert window + 0.5 - 0.4 <= resets[0]["hold_s"] <= window + 0.5 + 1.0


def test_coordination_adopt_lets_a_new_store_be_used_at_once(redis_server: RedisServer,
                                                            tmp_path: Path) -> None:
    client = redis.Redis.from_url(redis_server.url)
    wait_for(lambda: client.info("server")["uptime_in_seconds"] >= 2, what="uptime")
    client.close()
    config = config_with(tmp_path, {"url": redis_server.url, "lease_seconds": 60})
    path = tmp_path / "daemon.yaml"
    path.write_text(yaml.safe_dump({"api": {"key": KEY}, "state_dir": "state",
                                    "coordination": {"url": redis_server.url},
                                    "inboxes": [{"path": "in", "outbox": "out",
                                                 "errors": "err"}]}), encoding="utf-8")
    path.chmod(0o600)
    done = run_watchfolder("coordination", "adopt", "--config", str(path))
    assert done.returncode == 0, done.stderr
    assert "adopted" in done.stdout and KEY not in done.stdout + done.stderr
    coordinator = Coordinator.from_config(config, window=1.0)
    try:
        assert coordinator.claim(config.inboxes[0].path, "a.png") is not None
        assert coordinator.limiter.try_acquire() == 0.0
    finally:
        coordinator.stop()
    redis_server.kill()
    down = run_watchfolder("coordination", "adopt", "--config", str(path))
    assert down.returncode == 1 and "does not answer" in down.stderr


def test_coordination_adopt_needs_a_store(tmp_path: Path) -> None:
    path = tmp_path / "daemon.yaml"
    path.write_text(yaml.safe_dump({"api": {"key": KEY}, "state_dir": "state",
                                    "inboxes": [{"path": "in", "outbox": "out",
                                                 "errors": "err"}]}), encoding="utf-8")
    (tmp_path / "in").mkdir()
    done = run_watchfolder("coordination", "adopt", "--config", str(path))
    assert done.returncode == 2 and "no coordination.url" in done.stderr


def test_a_store_new_to_the_key_counts_its_minute_from_the_daemons_start(
        redis_server: RedisServer, tmp_path: Path, log_lines: LogCapture) -> None:
    # Up for longer than a window, never used with this key: nothing says when sends were
    # lost, so the hold runs a window from the first daemon's start, not from the first file.
    window = 2.0
    client = redis.Redis.from_url(redis_server.url)
    wait_for(lambda: client.info("server")["uptime_in_seconds"] >= 3, timeout=10, what="uptime")
    client.close()
    config = config_with(tmp_path, {"url": redis_server.url, "lease_seconds": 60})
    coordinator = Coordinator.from_config(config, window=window)
    stop = threading.Event()
    try:
        coordinator.start()
        started = time.monotonic()
        assert log_lines.events("coordination.store_reset"), "said at the start"
        time.sleep(1.5)  # the first file comes later
        while coordinator.claim(config.inboxes[0].path, "a.png") is None:
            time.sleep(coordinator.claim_wait())
        assert coordinator.limiter.acquire(stop)
        sent = time.monotonic() - started
    finally:
        coordinator.stop()
    assert window <= sent <= window + 0.5 + 0.4
