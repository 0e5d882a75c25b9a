"""The wall clock steps between two runs (issue 19, "Time"): the rate limit holds in real time
and the queue never waits on send times that the clock now puts in the future.

The daemon runs as a real process under a tiny LD_PRELOAD shim, compiled here with gcc, that
moves only CLOCK_REALTIME (`clock_gettime`, `gettimeofday`, `time`) by `TEST_CLOCK_SHIFT`
seconds, as an NTP step does; the monotonic clock, which every wait uses, is untouched
(libfaketime breaks Python's threading waits).
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import Studio, make_image, wait_for
from tests.test_service import DaemonProcess
from watchfolder.dev.sandbox import Sandbox
from watchfolder.journal.db import BOOT_ID, JOURNAL_NAME, Journal

SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>

static long long shift(void) {
    const char *s = getenv("TEST_CLOCK_SHIFT");
    return s ? atoll(s) : 0;
}

int clock_gettime(clockid_t id, struct timespec *ts) {
    static int (*real)(clockid_t, struct timespec *) = 0;
    if (!real) real = (int (*)(clockid_t, struct timespec *))dlsym(RTLD_NEXT, "clock_gettime");
    int r = real(id, ts);
    if (r == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE)) ts->tv_sec += shift();
    return r;
}

int gettimeofday(struct timeval *restrict tv, void *restrict tz) {
    (void)tz;
    struct timespec ts;
    int r = clock_gettime(CLOCK_REALTIME, &ts);
    if (r == 0 && tv) { tv->tv_sec = ts.tv_sec; tv->tv_usec = ts.tv_nsec / 1000; }
    return r;
}

time_t time(time_t *out) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (out) *out = ts.tv_sec;
    return ts.tv_sec;
}
"""


@pytest.fixture(scope="module")
def clock_shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.fail("a C compiler is needed for the clock shim: `apt-get install gcc`")
    folder = tmp_path_factory.mktemp("clock-shim")
    (folder / "shift.c").write_text(SHIM, encoding="ascii")
    built = folder / "shift.so"
    subprocess.run([gcc, "-shared", "-fPIC", "-O2", "-o", str(built), str(folder / "shift.c"),
                    "-ldl"], check=True, capture_output=True)
    return built


def stepped(shim: Path, seconds: int) -> dict[str, str]:
    return {"LD_PRELOAD": str(shim), "TEST_CLOCK_SHIFT": str(seconds)}


def test_the_shim_moves_only_the_wall_clock(clock_shim: Path) -> None:
    probe = ("import time, threading; e = threading.Event(); m = time.monotonic(); "
             "e.wait(0.2); print(time.time(), time.monotonic() - m)")
    env = {**stepped(clock_shim, 3600), "PATH": "/usr/bin:/bin"}
    import sys

    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                         text=True, check=True, timeout=10).stdout.split()
    assert abs(float(out[0]) - time.time() - 3600) < 5
    assert 0.15 < float(out[1]) < 2


def test_a_wall_clock_step_between_runs_neither_bursts_nor_stalls(
        tmp_path: Path, sandbox: Sandbox, clock_shim: Path) -> None:
    limit = 4
    studio = Studio(tmp_path, sandbox.url, api={"requests_per_minute": limit})
    config = studio.write_config()
    for n in range(limit):
        make_image(studio.inbox / f"a{n}.png", seed=n)
    with DaemonProcess(config, env=stepped(clock_shim, 0)) as first:
        first.wait_event("file.done", count=limit, timeout=30)  # the minute's allowance, spent
    first_sent = min(r.time for r in sandbox.requests)

    # An hour ahead: the journaled sends look an hour old, but they are seconds old.
    with DaemonProcess(config, env=stepped(clock_shim, 3600)) as ahead:
        ahead.wait_event("ready")
        for n in range(2):
            make_image(studio.inbox / f"b{n}.png", seed=10 + n)
        wait_for(lambda: len(studio.states()) == limit + 2, what="b0 and b1 taken in")
        time.sleep(2.0)  # long enough for a request: none may go
        assert sandbox.count() == limit, "the step forward let a burst through"

    # Then an hour behind: the journaled sends lie an hour in the future. The waiting files go
    # once the first minute's sends are out of the window, not an hour later.
    with DaemonProcess(config, env=stepped(clock_shim, -3600)):
        wait_for(lambda: sandbox.count(200) == limit + 2,
                 timeout=max(5.0, first_sent + 60.5 + 10 - time.monotonic()),
                 what="the waiting files sent after the first minute")
    later = sorted(r.time for r in sandbox.requests)[limit:]
    assert min(later) >= first_sent + 60.0, "the limit held in real time"
    assert sandbox.max_in_window(60.0) <= limit
    assert studio.files(studio.outbox) == sorted([f"a{n}.png" for n in range(limit)]
                                                 + ["b0.png", "b1.png"])


def test_sends_of_another_boot_or_in_the_future_count_one_window_at_most(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.close()
    with contextlib.closing(sqlite3.connect(tmp_path / JOURNAL_NAME)) as db:
        now = time.time()
        db.executemany("INSERT INTO sends (t, boot, mono) VALUES (?, ?, ?)", [
            (now - 10, "another-boot", 1.0),  # aged by the wall clock
            (now + 3600, "another-boot", 2.0),  # the wall clock puts it in the future: just sent
            (now + 3600, BOOT_ID, time.monotonic() - 5),  # this boot: the monotonic clock says
            (now - 3600, BOOT_ID, time.monotonic() - 20),  # ... whatever the wall clock says
            (now - 30, BOOT_ID, time.monotonic() - 600),  # long gone
            (now - 20, None, None),  # journaled by 0.2: the wall clock
        ])
        db.commit()
    journal = Journal(tmp_path)
    try:
        ages = sorted(journal.recent_send_ages(60.0))
    finally:
        journal.close()
    assert [round(age) for age in ages] == [0, 5, 10, 20, 20]
