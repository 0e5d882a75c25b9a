"""Claims (issue 13): one daemon per file, on the share and in the store; done marks.

Real folders, a real redis-server, real processes racing; leases shrunk to about a second.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import LogCapture, RedisServer, wait_for
from watchfolder.config.settings import StoreUrl
from watchfolder.coordination.claims import CLAIMS_FOLDER, Holder, rel_hash
from watchfolder.coordination.coordinator import adopt_empty_store, key_id
from watchfolder.coordination.done_marks import DoneMarks
from watchfolder.coordination.share_claims import ShareClaims
from watchfolder.coordination.store import Store
from watchfolder.coordination.store_claims import StoreClaims
from watchfolder.errors import CoordinationUnavailable

LEASE = 1.0
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    folder = tmp_path / "inbox"
    folder.mkdir()
    return folder


STORE_KEY = "any key"  # the API key whose epoch dates the store's last loss (reset.py)


class Backends:
    """Makes claim backends of either kind, closing what it made."""

    def __init__(self, url: str | None) -> None:
        self.url = url
        self.stores: list[Store] = []
        if url is not None:
            adopt_empty_store(StoreUrl(url), STORE_KEY)  # a store in use for long

    def make(self, lease: float = LEASE, instance: str = "") -> ShareClaims | StoreClaims:
        holder = Holder.this_process(instance)
        share = ShareClaims(holder, lease)
        if self.url is None:
            return share
        store = Store(StoreUrl(self.url))
        self.stores.append(store)
        return StoreClaims(store, holder, lease, share, key=key_id(STORE_KEY))

    def close(self) -> None:
        for store in self.stores:
            store.close()


@pytest.fixture(params=["share", "store"])
def backends(request: pytest.FixtureRequest) -> Iterator[Backends]:
    url = None
    if request.param == "store":
        url = request.getfixturevalue("redis_server").url
    made = Backends(url)
    yield made
    made.close()


# -- both mechanisms -----------------------------------------------------------------------------


def test_a_claim_is_exclusive_until_released(backends: Backends, inbox: Path) -> None:
    a, b = backends.make(), backends.make()
    held = a.claim(inbox, "shoot/1.png")
    assert held is not None
    assert b.claim(inbox, "shoot/1.png") is None
    assert b.claim(inbox, "shoot/2.png") is not None  # another file: free
    held.release()
    assert b.claim(inbox, "shoot/1.png") is not None


def test_a_renewed_claim_outlives_its_lease(backends: Backends, inbox: Path) -> None:
    a, b = backends.make(), backends.make()
    held = a.claim(inbox, "slow.png")
    assert held is not None
    deadline = time.monotonic() + 2.2 * LEASE
    while time.monotonic() < deadline:  # a slow answer: the holder keeps renewing
        assert held.renew()
        assert b.claim(inbox, "slow.png") is None
        time.sleep(LEASE / 4)
    assert not held.lost


def test_an_expired_claim_is_taken_over_and_its_holder_finds_it_lost(
        backends: Backends, inbox: Path, log_lines: LogCapture) -> None:
    a, b = backends.make(), backends.make()
    held = a.claim(inbox, "dead.png")
    assert held is not None
    assert b.claim(inbox, "dead.png") is None
    time.sleep(LEASE + 0.3)  # a's daemon died: nobody renews
    taken = b.claim(inbox, "dead.png")
    assert taken is not None
    assert [e["file"] for e in log_lines.events("claim.taken_over")] == ["dead.png"]
    assert not held.renew()
    assert held.lost
    assert log_lines.events("claim.lost")
    held.release()  # a lost claim's release must not free the new holder's
    assert a.claim(inbox, "dead.png") is None


def test_the_same_share_mounted_at_two_places_is_one_inbox(backends: Backends,
                                                          tmp_path: Path, inbox: Path) -> None:
    other_mount = tmp_path / "mnt-studio"
    other_mount.symlink_to(inbox)
    a, b = backends.make(), backends.make()
    assert a.claim(inbox, "x.png") is not None
    assert b.claim(other_mount, "x.png") is None


@contextlib.contextmanager
def racing(inbox: Path, go: Path, rels: list[str], count: int, url: str | None,
           lease: float = 30) -> Iterator[Callable[[], list[list[str]]]]:
    """`count` claim_worker processes waiting for `go`; yields a function that starts the race
    and returns what each process won. The processes are killed however the test ends."""
    extra = ["--url", url] if url else []
    processes = [subprocess.Popen(
        [sys.executable, "-m", "tests.claim_worker", "race", str(inbox), "--go", str(go),
         "--lease", str(lease), *extra, *rels],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(count)]

    def race() -> list[list[str]]:
        time.sleep(1.0)  # let every interpreter start and wait for the go
        go.touch()
        won = []
        for process in processes:
            assert process.stdout is not None
            won.append(json.loads(process.stdout.readline() or "null"))
        return won

    try:
        yield race
    finally:
        for process in processes:
            process.kill()
            process.communicate(timeout=30)


def test_processes_racing_for_the_same_files_win_each_exactly_once(
        backends: Backends, inbox: Path, tmp_path: Path) -> None:
    rels = [f"race/{i:03d}.png" for i in range(40)]
    with racing(inbox, tmp_path / "go", rels, 4, backends.url) as race:
        won = race()
    assert None not in won, "a racer failed"
    everything = [rel for got in won for rel in got]
    assert sorted(everything) == rels, "a file won twice or by nobody"


def test_processes_racing_to_take_over_one_dead_claim_one_wins(
        backends: Backends, inbox: Path, tmp_path: Path) -> None:
    dead = backends.make()
    assert dead.claim(inbox, "orphan.png") is not None
    if isinstance(dead, ShareClaims):
        # Not renewed for ten seconds, by the share's own clock.
        path = inbox / CLAIMS_FOLDER / f"{rel_hash('orphan.png')}.claim"
        old = time.time() - 10
        os.utime(path, (old, old))
        lease = 1.0
    else:
        time.sleep(LEASE + 0.2)
        lease = 30.0
    with racing(inbox, tmp_path / "go", ["orphan.png"], 5, backends.url, lease) as race:
        won = race()
    assert None not in won, "a racer failed"
    assert sum(len(got) for got in won) == 1, won


def test_a_killed_holder_keeps_its_claims_for_a_lease_then_they_are_taken_over(
        backends: Backends, inbox: Path) -> None:
    extra = ["--url", backends.url] if backends.url else []
    holder = subprocess.Popen(
        [sys.executable, "-m", "tests.claim_worker", "hold", str(inbox), "--lease", str(LEASE),
         *extra, "a.png", "b.png"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        other = backends.make()
        time.sleep(2 * LEASE)  # alive: its coordinator renews
        assert other.claim(inbox, "a.png") is None
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        killed = time.monotonic()
        taken = wait_for(lambda: other.claim(inbox, "a.png"), timeout=10, what="takeover")
        assert time.monotonic() - killed >= LEASE / 3  # not before the lease ran out
        assert taken is not None
        assert other.claim(inbox, "b.png") is not None
    finally:
        holder.kill()
        holder.wait(timeout=10)
        if holder.stdout is not None:
            holder.stdout.close()


def test_a_restarted_daemon_takes_its_own_claims_back_at_once(backends: Backends,
                                                              inbox: Path) -> None:
    extra = ["--url", backends.url] if backends.url else []
    before = subprocess.Popen(
        [sys.executable, "-m", "tests.claim_worker", "hold", str(inbox), "--lease", "30",
         "--instance", "studio-a:1234", *extra, "a.png"], cwd=ROOT, stdout=subprocess.PIPE,
        text=True)
    try:
        assert before.stdout is not None
        assert before.stdout.readline().strip() == "held"
        # Same instance but alive (two daemons must never share a state_dir): not taken.
        assert backends.make(instance="studio-a:1234").claim(inbox, "a.png") is None
        before.send_signal(signal.SIGKILL)  # a crash; the lease has 30 s to run
        before.wait(timeout=10)
    finally:
        before.kill()
        before.wait(timeout=10)
        if before.stdout is not None:
            before.stdout.close()
    assert backends.make(instance="studio-b:9999").claim(inbox, "a.png") is None
    again = backends.make(instance="studio-a:1234")  # the same daemon, restarted
    assert again.claim(inbox, "a.png") is not None


def test_confirm_before_paying_sees_a_takeover_at_once(backends: Backends, inbox: Path) -> None:
    from watchfolder.coordination.coordinator import Coordinator
    from watchfolder.coordination.limits import LocalLimiter

    mine = backends.make()
    coordinator = Coordinator(holder=mine.holder, limiter=LocalLimiter(60), claims=mine,
                              marks=DoneMarks(mine.holder), lease_seconds=LEASE)
    assert coordinator.claim(inbox, "slow.png") is not None
    assert coordinator.confirm(inbox, "slow.png")
    time.sleep(LEASE + 0.3)  # a wait in the limiter outlasted the lease (the store was away)
    assert backends.make().claim(inbox, "slow.png") is not None  # taken over meanwhile
    assert coordinator.holds(inbox, "slow.png")  # the thread has not noticed yet ...
    assert not coordinator.confirm(inbox, "slow.png")  # ... the check before paying has
    assert not coordinator.confirm(inbox, "other.png")  # never claimed here



def test_confirm_right_after_the_claim_is_no_second_write(inbox: Path) -> None:
    """A claim made or renewed less than a beat ago (a third of the lease) cannot have been
    taken over (that needs a whole lease without a renewal): the check before paying does not
    rewrite it, which was one claim file rewrite per request on the fast path. Older, it is
    renewed before paying, as before."""
    from watchfolder.coordination.coordinator import Coordinator
    from watchfolder.coordination.limits import LocalLimiter

    mine = Backends(None).make()
    coordinator = Coordinator(holder=mine.holder, limiter=LocalLimiter(60), claims=mine,
                              marks=DoneMarks(mine.holder), lease_seconds=LEASE)
    assert coordinator.claim(inbox, "quick.png") is not None
    path = inbox / CLAIMS_FOLDER / f"{rel_hash('quick.png')}.claim"
    made = path.read_bytes()
    assert coordinator.confirm(inbox, "quick.png")
    assert path.read_bytes() == made, "rewritten right after it was made"
    time.sleep(coordinator.interval + 0.05)  # a beat later (the coordinator's thread is off)
    assert coordinator.confirm(inbox, "quick.png")
    renewed = path.read_bytes()
    assert renewed != made, "not renewed before paying, a beat after it was made"
    assert coordinator.confirm(inbox, "quick.png")  # just renewed: not again
    assert path.read_bytes() == renewed

# -- on the share --------------------------------------------------------------------------------


def test_a_released_claim_file_is_written_again_for_the_next_claim(inbox: Path) -> None:
    """Releasing a claim renames its file to a private spare instead of unlinking it, and the
    next claim is written into that file: the names come and go as before, but no inode is
    allocated or freed per file (on ext4 without a journal every freed inode slows the next
    minutes' allocations). Closing leaves no trace."""
    mine, other = Backends(None).make(), Backends(None).make()
    assert isinstance(mine, ShareClaims)
    folder = inbox / CLAIMS_FOLDER
    first = mine.claim(inbox, "a.png")
    assert first is not None
    inode = (folder / f"{rel_hash('a.png')}.claim").stat().st_ino
    mine.release(first)
    assert not (folder / f"{rel_hash('a.png')}.claim").exists()
    assert other.claim(inbox, "a.png") is not None  # released: anyone may take it
    second = mine.claim(inbox, "b.png")
    assert second is not None
    path = folder / f"{rel_hash('b.png')}.claim"
    assert path.stat().st_ino == inode, "a new inode for the next claim"
    held = json.loads(path.read_text())
    assert held["file"] == "b.png" and held["nonce"] == second.token
    assert path.stat().st_nlink == 1  # its private name is gone
    assert other.claim(inbox, "b.png") is None  # held, whole
    mine.release(second)
    mine.close()
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith("clock.")) == \
        [f"{rel_hash('a.png')}.claim"], "spares left behind"


def test_a_claim_file_names_its_holder_and_lease(inbox: Path) -> None:
    claims = ShareClaims(Holder("studio-a", 4242, "d1"), 60)
    held = claims.claim(inbox, "a.png")
    assert held is not None
    path = inbox / CLAIMS_FOLDER / f"{rel_hash('a.png')}.claim"
    body = json.loads(path.read_text())
    assert (body["host"], body["pid"], body["daemon"], body["file"], body["lease_seconds"]) == (
        "studio-a", 4242, "d1", "a.png", 60)
    before = path.stat().st_mtime_ns
    time.sleep(0.02)
    assert held.renew()
    assert path.stat().st_mtime_ns > before  # renewal rewrites it: the share stamps the time
    held.release()
    assert not path.exists()
    claims.close()


def test_without_hard_links_claims_hold_and_an_empty_claim_dies_soon(inbox: Path) -> None:
    a, b = ShareClaims(Holder.this_process(), 60), ShareClaims(Holder.this_process(), 60)
    a._links = b._links = False  # a share that refuses hard links: O_CREAT|O_EXCL
    assert a.claim(inbox, "a.png") is not None
    assert b.claim(inbox, "a.png") is None
    # Its creator died between the create and the write: dead after 5 s, not a whole lease.
    empty = inbox / CLAIMS_FOLDER / f"{rel_hash('c.png')}.claim"
    empty.touch()
    assert b.claim(inbox, "c.png") is None
    old = time.time() - 6
    os.utime(empty, (old, old))
    assert b.claim(inbox, "c.png") is not None
    a.close()
    b.close()


def test_a_single_daemon_leaves_no_trace_in_the_inbox(inbox: Path) -> None:
    claims = ShareClaims(Holder.this_process(), LEASE)
    held = claims.claim(inbox, "a.png")
    assert held is not None
    held.release()
    claims.close()
    assert list(inbox.iterdir()) == []


def test_the_sweep_removes_only_what_dead_daemons_left(inbox: Path) -> None:
    claims = ShareClaims(Holder.this_process(), LEASE)
    live = claims.claim(inbox, "live.png")
    stale = claims.claim(inbox, "deleted-while-claimed.png")
    assert live is not None and stale is not None
    folder = inbox / CLAIMS_FOLDER
    lock = folder / f"{rel_hash('x.png')}.abc.takeover"
    lock.touch()
    dead_clock = folder / "clock.deadbeef"
    dead_clock.touch()
    old = time.time() - 10
    for path in (lock, dead_clock, folder / f"{rel_hash('deleted-while-claimed.png')}.claim"):
        os.utime(path, (old, old))
    claims.sweep(inbox)
    assert not lock.exists()
    assert not dead_clock.exists()
    assert not (folder / f"{rel_hash('deleted-while-claimed.png')}.claim").exists()
    assert (folder / f"{rel_hash('live.png')}.claim").exists()
    claims.close()


def test_a_claims_folder_removed_by_hand_is_made_again(inbox: Path) -> None:
    import shutil

    claims = ShareClaims(Holder.this_process(), LEASE)
    assert claims.claim(inbox, "a.png") is not None
    shutil.rmtree(inbox / CLAIMS_FOLDER)
    assert claims.claim(inbox, "b.png") is not None
    claims.close()


def test_an_unusable_claims_folder_says_so(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "inbox"
    not_a_folder.mkdir()
    (not_a_folder / CLAIMS_FOLDER).write_text("in the way")
    with pytest.raises(CoordinationUnavailable, match="claims folder"):
        ShareClaims(Holder.this_process(), LEASE).claim(not_a_folder, "a.png")


# -- in the store --------------------------------------------------------------------------------


def test_store_claims_wait_while_the_store_is_down(redis_server: RedisServer,
                                                   inbox: Path) -> None:
    made = Backends(redis_server.url)
    try:
        claims = made.make()
        redis_server.kill()
        with pytest.raises(CoordinationUnavailable, match="does not answer"):
            claims.claim(inbox, "a.png")
        redis_server.start()
        # Back, after the grace that follows a reset (see below).
        assert wait_for(lambda: claims.claim(inbox, "a.png"), timeout=5, what="the claim")
    finally:
        made.close()


def test_after_the_store_restarts_empty_live_holders_keep_their_files(
        redis_server: RedisServer, inbox: Path, log_lines: LogCapture) -> None:
    made = Backends(redis_server.url)
    try:
        a, b = made.make(), made.make()
        held = a.claim(inbox, "a.png")
        assert held is not None
        redis_server.restart()  # empty: the claim is gone from the store
        assert b.claim(inbox, "a.png") is None  # nobody claims before holders renewed
        assert held.renew()  # re-created by its holder
        # The grace ends (one lease after the store started, give or take its second) ...
        assert wait_for(lambda: held.renew() and b.claim(inbox, "new.png"), timeout=5,
                        what="the end of the grace")
        assert b.claim(inbox, "a.png") is None  # ... and the file is still a's
        assert not log_lines.events("claim.lost")
    finally:
        made.close()


# -- done marks ----------------------------------------------------------------------------------


def test_a_done_mark_matches_only_the_same_content(inbox: Path) -> None:
    marks = DoneMarks(Holder("studio-a", 7, "d"))
    rel = "sub/caf\udce9.png"  # not UTF-8 on disk
    assert marks.find(inbox, rel, 10, 123, "ab" * 32) is None
    marks.mark(inbox, rel, 10, 123, "ab" * 32, "/out/sub/cafe.png")
    found = marks.find(inbox, rel, 10, 123, "ab" * 32)
    assert found is not None
    assert (found.host, found.pid, found.result) == ("studio-a", 7, "/out/sub/cafe.png")
    assert marks.find(inbox, rel, 11, 123, "ab" * 32) is None  # replaced: new work
    assert marks.find(inbox, rel, 10, 124, "ab" * 32) is None
    assert marks.find(inbox, rel, 10, 123, "cd" * 32) is None
    assert DoneMarks(Holder.this_process()).find(inbox, rel, 10, 123, "ab" * 32) is not None


def test_a_daemons_instance_is_kept_in_its_state_dir(tmp_path: Path) -> None:
    from watchfolder.coordination.claims import instance_id

    first = instance_id(tmp_path / "state")
    assert first == instance_id(tmp_path / "state")
    assert first != instance_id(tmp_path / "another-state")


def test_a_restart_removes_the_half_made_claims_of_its_previous_life(inbox: Path) -> None:
    before = ShareClaims(Holder.this_process("studio-a:1"), LEASE)
    before.folder(inbox).ensure()
    leftover = inbox / CLAIMS_FOLDER / f"{before.folder(inbox).new_prefix}abc"
    leftover.write_text("{}")  # killed between writing and linking a claim
    other = ShareClaims(Holder.this_process("studio-b:2"), LEASE).folder(inbox)
    stranger = inbox / CLAIMS_FOLDER / f"{other.new_prefix}abc"
    stranger.write_text("{}")
    again = ShareClaims(Holder.this_process("studio-a:1"), LEASE)
    assert again.claim(inbox, "a.png") is not None
    assert not leftover.exists()
    assert stranger.exists()  # another daemon's: the sweep's, two leases on


def test_a_takeover_lock_left_by_a_previous_life_does_not_block_its_restart(
        inbox: Path) -> None:
    # The hang of test_sigkill_at_many_instants_loses_nothing: a daemon killed between taking
    # the takeover lock of its own previous life's claim and removing it; the next start found
    # the lock, judged "someone else is taking it over" and left the file for two leases.
    def hold(*env: tuple[str, str]) -> int:
        worker = subprocess.run(
            [sys.executable, "-m", "tests.claim_worker", "hold", str(inbox), "--lease", "30",
             "--instance", "studio-a:1234", "a.png"], cwd=ROOT, capture_output=True,
            text=True, timeout=60, env={**os.environ, **dict(env)}, stdin=subprocess.DEVNULL)
        return worker.returncode

    first = subprocess.Popen(
        [sys.executable, "-m", "tests.claim_worker", "hold", str(inbox), "--lease", "30",
         "--instance", "studio-a:1234", "a.png"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout is not None
        assert first.stdout.readline().strip() == "held"
    finally:
        first.kill()
        first.wait(timeout=10)
        if first.stdout is not None:
            first.stdout.close()
    # The second life dies inside its takeover, holding the lock.
    assert hold(("WATCHFOLDER_FAILPOINT", "takeover-locked")) == -signal.SIGKILL
    assert list((inbox / CLAIMS_FOLDER).glob("*.takeover"))
    again = ShareClaims(Holder.this_process("studio-a:1234"), 30.0)  # the third life
    assert again.claim(inbox, "a.png") is not None
    assert not list((inbox / CLAIMS_FOLDER).glob("*.takeover"))
    # Another daemon's lock is not ours to remove: the lease and the sweep decide.
    first = subprocess.Popen(
        [sys.executable, "-m", "tests.claim_worker", "hold", str(inbox), "--lease", "30",
         "--instance", "studio-b:1", "b.png"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout is not None
        assert first.stdout.readline().strip() == "held"
    finally:
        first.kill()
        first.wait(timeout=10)
        if first.stdout is not None:
            first.stdout.close()
    claim = inbox / CLAIMS_FOLDER / f"{rel_hash('b.png')}.claim"
    nonce = json.loads(claim.read_text())["nonce"]
    stranger = claim.with_name(f"{rel_hash('b.png')}.{nonce}.takeover")
    stranger.write_text(json.dumps({"host": "elsewhere", "pid": 1, "daemon": "x",
                                    "instance": "elsewhere:1", "nonce": "n"}))
    old = time.time() - 3600
    os.utime(claim, (old, old))  # its lease ran out long ago
    assert ShareClaims(Holder.this_process("studio-a:1234"), 30.0).claim(inbox, "b.png") is None
    assert stranger.exists()
