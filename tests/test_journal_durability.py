"""The journal's commits: every one survives the process's death; those whose loss to a power
cut would cost a credit again are fsynced before `update` returns, the others are not, and
workers committing at once share one fsync (group commit); a stored file's answer is deleted
only once an fsync covers `stored`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from tests.conftest import wait_for
from tests.faults import eio_shim, wal_flushes_fail
from watchfolder.journal.db import (
    DONE,
    FETCHED,
    QUEUED,
    SENDING,
    STORED,
    Journal,
    must_survive_power_loss,
)
from watchfolder.journal.durable import GroupCommit


def _synced(journal: Journal, before: int) -> int:
    return journal.commits.syncs - before


def test_only_the_commits_that_guard_a_credit_are_fsynced(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    try:
        record = journal.create("/in", "a.jpg", 10, 1, "s")
        syncs = journal.commits.syncs
        assert _synced(journal, syncs) == 0, "a record created costs no credit if lost"
        # A fast-path file's life, commit by commit: (changes, sent, fsynced?)
        life = [
            ({"state": SENDING, "sha256": "a" * 64, "route": "fast"}, True, True),
            ({"state": FETCHED, "spool": str(tmp_path / "answer.png")}, False, True),
            ({"outputs": '[["/out/a.png", "b"]]', "result": "/out/a.png"}, False, False),
            # Its answer is deleted only once a later fsync covers it (below).
            ({"state": STORED, "spool": None}, False, False),
            ({"archive": "/archive/a.jpg"}, False, False),
            ({"state": DONE, "handoff": "pending"}, False, False),
            ({"handoff": None}, False, False),
        ]
        for changes, sent, fsynced in life:
            assert must_survive_power_loss(record, changes, sent) is fsynced, changes
            syncs = journal.commits.syncs
            journal.update(record, sent=sent, **changes)
            assert _synced(journal, syncs) == (1 if fsynced else 0), changes
        assert journal.record(record.id) == record
    finally:
        journal.close()


def test_going_back_to_the_queue_without_an_answer_is_not_fsynced(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    try:
        record = journal.create("/in", "b.jpg", 10, 1, "s")
        journal.update(record, state=SENDING, sent=True)
        syncs = journal.commits.syncs
        # A 429: nothing was paid; rolled back by a power cut, it is sent once after it.
        journal.update(record, state=QUEUED, attempts=1)
        assert journal.commits.syncs == syncs
        journal.update(record, state=FETCHED, spool=None, reuse_from='["/out/x.png"]')
        assert journal.commits.syncs == syncs + 1, "fetched is fsynced, also for a reused answer"
        journal.update(record, error_path="/errors/b.jpg")
        assert journal.commits.syncs == syncs + 2, "a failed file's name in errors is fsynced"
    finally:
        journal.close()


def test_concurrent_commits_share_one_fsync(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    try:
        records = [journal.create("/in", f"{n}.jpg", 10, 1, "s") for n in range(8)]
        start = journal.commits.syncs
        # Held here as an fsync under way holds it: the eight commits are written meanwhile,
        # and the first worker to get it makes one fsync that covers them all.
        with journal.commits.lock:
            workers = [threading.Thread(target=journal.update, args=(record,),
                                        kwargs={"state": SENDING, "sent": True})
                       for record in records]
            for worker in workers:
                worker.start()
            wait_for(lambda: journal.commits.count >= 2 * len(records),
                     what="the eight commits written")
        for worker in workers:
            worker.join(10)
        assert journal.commits.syncs == start + 1
        assert all(r.state == SENDING for r in records)
    finally:
        journal.close()


KILLED_AFTER_COMMIT = """
import os, signal, sys
from pathlib import Path
from watchfolder.journal.db import Journal, STORED
journal = Journal(Path(sys.argv[1]))
record = journal.create("/in", "c.jpg", 10, 1, "s")
journal.update(record, state=STORED, outputs='[["/out/c.png", "d"]]', result="/out/c.png")
assert journal.commits.syncs == 0
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_commit_not_fsynced_survives_the_process_being_killed(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", KILLED_AFTER_COMMIT, str(tmp_path)],
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
                          capture_output=True, check=False, timeout=60)
    assert done.returncode == -9, done.stderr
    journal = Journal(tmp_path)
    try:
        [record] = journal.unfinished()
        assert (record.state, record.result) == (STORED, "/out/c.png")
    finally:
        journal.close()


def test_a_stored_answer_is_deleted_only_once_an_fsync_covers_stored(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    try:
        answers = []
        for name in ("a", "b"):
            answer = journal.spool_dir / f"{name}.png"
            answer.write_bytes(b"paid for")
            record = journal.create("/in", f"{name}.jpg", 10, 1, "s")
            journal.update(record, state=SENDING, sent=True)
            journal.update(record, state=FETCHED, spool=str(answer))
            syncs = journal.commits.syncs
            journal.update(record, state=STORED, spool=None)
            journal.commits.when_durable(answer.unlink)
            assert answer.exists(), "a power cut could still undo stored: the answer stays"
            assert journal.commits.syncs == syncs
            answers.append((record, answer))
        # The next request's fsync covers both.
        journal.update(journal.create("/in", "c.jpg", 10, 1, "s"), state=SENDING, sent=True)
        assert not any(answer.exists() for _, answer in answers)
        # Nothing else commits: settle (the daemon's main loop, and close) makes the fsync.
        last = journal.spool_dir / "last.png"
        last.write_bytes(b"paid for")
        journal.update(answers[0][0], state=DONE)
        journal.commits.when_durable(last.unlink)
        assert last.exists()
        journal.commits.settle()
        assert not last.exists()
        journal.commits.when_durable(lambda: answers.clear())  # all durable: at once
        assert answers == []
    finally:
        journal.close()


def test_without_a_wal_every_commit_counts_as_on_disk(tmp_path: Path) -> None:
    # A journal whose filesystem refused WAL mode keeps a rollback journal with
    # synchronous=FULL: nothing is left to sync, nothing waits.
    path = tmp_path / "journal.sqlite3"
    path.write_bytes(b"")
    commits = GroupCommit(path)
    try:
        assert commits.every_commit
        commits.written()
        commits.sync(commits.count)
        assert commits.syncs == 0
        ran: list[int] = []
        commits.when_durable(lambda: ran.append(1))
        assert ran == [1]
    finally:
        commits.close()


def test_an_answers_fetched_is_made_durable_by_the_next_request_or_before_it_is_used(
        tmp_path: Path) -> None:
    """`owed`: an answer's `fetched` is written to the WAL only; the next request's `sending`
    fsync (before that request goes) covers it: one fsync between them, not two. Without a
    request after it, `settle_owed` (store, before anything is made of the answer) or the
    main loop's settle makes it durable."""
    journal = Journal(tmp_path)
    try:
        first = journal.create("/in", "a.jpg", 10, 1, "s")
        journal.update(first, state=SENDING, sent=True)
        syncs = journal.commits.syncs
        journal.update(first, state=FETCHED, spool=str(tmp_path / "a.png"), owed=True)
        covered: list[str] = []
        journal.commits.when_durable(lambda: covered.append("fetched"))
        assert journal.commits.syncs == syncs and covered == [], "written, not synced yet"
        assert journal.record(first.id) == first, "in the WAL: it survives the process"
        second = journal.create("/in", "b.jpg", 10, 1, "s")
        journal.update(second, state=SENDING, sent=True)
        assert journal.commits.syncs == syncs + 1, "one fsync for both commits"
        assert covered == ["fetched"], "on disk before the next request goes"
        journal.commits.settle_owed(first.id)
        assert journal.commits.syncs == syncs + 1, "store finds it on disk already"
        # The next answer, with no request after it: store makes it durable itself.
        journal.update(second, state=FETCHED, spool=str(tmp_path / "b.png"), owed=True)
        journal.commits.when_durable(lambda: covered.append("second"))
        journal.commits.settle_owed(second.id)
        assert covered == ["fetched", "second"] and journal.commits.syncs == syncs + 2
        journal.commits.settle_owed(second.id)
        assert journal.commits.syncs == syncs + 2, "once"
        # Nobody uses the answer for a while: the main loop's settle.
        third = journal.create("/in", "c.jpg", 10, 1, "s")
        journal.update(third, state=SENDING, sent=True)
        journal.update(third, state=FETCHED, spool=str(tmp_path / "c.png"), owed=True)
        syncs = journal.commits.syncs
        journal.commits.settle()
        assert journal.commits.syncs == syncs + 1
        # Covered and never settled (a result rejected in review): let go with the next one.
        fourth = journal.create("/in", "d.jpg", 10, 1, "s")
        journal.update(fourth, state=SENDING, sent=True)
        journal.update(fourth, state=FETCHED, spool=str(tmp_path / "d.png"), owed=True)
        assert set(journal.commits._owed) == {fourth.id}
    finally:
        journal.close()


FLUSH_FAILS = """
import json
import sys
from pathlib import Path
from watchfolder.errors import StateUnavailable
from watchfolder.journal.db import FETCHED, SENDING, Journal
state, switch = Path(sys.argv[1]), Path(sys.argv[2])
journal = Journal(state)
record = journal.create("/in", "a.jpg", 10, 1, "s")
switch.touch()  # from now on every fsync and fdatasync below state_dir fails (EIO)
seen = []
for step in ("sending", "fetched", "settle_owed"):
    try:
        if step == "sending":
            journal.update(record, state=SENDING, sent=True)
        elif step == "fetched":
            journal.update(record, state=FETCHED, owed=True)
        else:
            journal.commits.settle_owed(record.id)
        seen.append([step, "done", record.state])
    except StateUnavailable as exc:
        seen.append([step, str(exc), record.state])
print(json.dumps(seen))
"""


def test_a_flush_the_disk_refuses_is_never_taken_for_durable(tmp_path: Path) -> None:
    """An fdatasync of the WAL that fails (a real EIO, from an LD_PRELOAD shim over a real
    journal) raises StateUnavailable: a `sending` is not taken (memory keeps the state
    before it, and no request follows), and an answer's `fetched`, only written to the WAL,
    is refused by `commits.settle_owed`, so nothing is made of it."""
    state, switch = tmp_path / "state", tmp_path / "flush-fails"
    state.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]),
           "LD_PRELOAD": str(eio_shim(tmp_path)), "WATCHFOLDER_FAULT_BELOW": str(state),
           "WATCHFOLDER_FAULT_SWITCH": str(switch), "WATCHFOLDER_FAULT_SYNC": "1"}
    done = subprocess.run([sys.executable, "-c", FLUSH_FAILS, str(state), str(switch)],
                          env=env, capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    sending, fetched, settle = json.loads(done.stdout)
    assert sending[1].startswith("cannot write the journal") and "Input/output" in sending[1]
    assert sending[2] == QUEUED, "not taken: no request follows a sending the disk refused"
    assert fetched == ["fetched", "done", FETCHED], "only written to the WAL: no flush yet"
    assert settle[1].startswith("cannot write the journal"), "refused before it is used"


def test_a_start_whose_flush_of_the_wal_fails_is_refused(tmp_path: Path) -> None:
    """A start fdatasyncs what a killed run left in the WAL before it acts on it; a disk that
    refuses that flush (a real EIO, from the shim) stops the journal's opening with
    StateUnavailable, which the daemon's start reports, instead of going on."""
    state, switch = tmp_path / "state", tmp_path / "flush-fails"
    state.mkdir()
    Journal(state).close()
    switch.touch()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]),
           **wal_flushes_fail(tmp_path, state, switch)}
    opening = ("import sys; from pathlib import Path; from watchfolder.errors import "
               "StateUnavailable; from watchfolder.journal.db import Journal\n"
               "try:\n    Journal(Path(sys.argv[1]))\n"
               "except StateUnavailable as exc:\n    print(exc)")
    done = subprocess.run([sys.executable, "-c", opening, str(state)], env=env,
                          capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"cannot write the journal {state}"), done.stdout
    assert "Input/output error" in done.stdout
