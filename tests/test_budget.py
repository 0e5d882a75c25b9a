"""The daily credit budget: a pause, not a failure; it survives a restart and lifts at
midnight or when a reload raises it."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timedelta
from pathlib import Path

from tests.conftest import LogCapture, Running, Studio, make_image, run_watchfolder, wait_for
from watchfolder.dev.sandbox import Sandbox
from watchfolder.pipeline.budget import Budget, midnight_after


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 26, 23, 50).astimezone()

    def __call__(self) -> datetime:
        return self.now


def test_the_budget_counts_the_day_and_renews_at_midnight() -> None:
    clock = Clock()
    sent: list[float] = [clock.now.timestamp() - 60]  # one request earlier today
    budget = Budget(3, lambda since: sum(1 for t in sent if t >= since), now=clock)
    assert budget.take() and budget.take()
    assert not budget.take() and not budget.open()
    assert budget.snapshot()["spent_today"] == 3
    assert budget.reached().reason == "budget"
    clock.now += timedelta(minutes=11)  # past midnight: yesterday's requests do not count
    assert budget.open() and budget.snapshot()["spent_today"] == 0
    budget.limit = 1
    assert budget.take() and not budget.take()
    budget.limit = None
    assert budget.take()
    assert midnight_after(clock.now).hour == 0


def test_a_spent_budget_pauses_and_a_reload_that_raises_it_resumes(
        tmp_path: Path, sandbox: Sandbox, log_lines: LogCapture) -> None:
    # The reload itself ends the pause: no turn of the main loop is needed. It used to send a
    # probe, as for a refused key, whose answer was logged as the account coming back.
    studio = Studio(tmp_path, sandbox.url, api={"max_credits_per_day": 2, "concurrency": 1})
    for n in range(4):
        make_image(studio.inbox / f"f{n}.png", seed=n)
    with Running(studio.config()) as daemon:
        wait_for(lambda: log_lines.events("budget.reached"), what="the budget reached")
        wait_for(lambda: len(log_lines.events("file.done")) == 2, what="two done")
        assert sandbox.count() == 2 and studio.files(studio.errors) == []
        report = json.loads(run_watchfolder("status", "--config", str(studio.write_config()),
                                            "--json").stdout)
        assert report["spent_today"] == 2 and report["paused"].startswith("budget:")
        assert report["budget"]["max_credits_per_day"] == 2
        daemon.reload(dataclasses.replace(daemon.config, api=dataclasses.replace(
            daemon.config.api, max_credits_per_day=4)))
        wait_for(lambda: len(log_lines.events("file.done")) == 4, what="all four done")
        assert log_lines.events("budget.resumed")
        assert not log_lines.events("account.resumed")
    assert sandbox.count() == 4


def test_the_spend_survives_a_restart(tmp_path: Path, sandbox: Sandbox,
                                      log_lines: LogCapture) -> None:
    studio = Studio(tmp_path, sandbox.url, api={"max_credits_per_day": 1})
    make_image(studio.inbox / "a.png", seed=1)
    with Running(studio.config()):
        wait_for(lambda: log_lines.events("file.done"), what="a done")
    make_image(studio.inbox / "b.png", seed=2)
    with Running(studio.config()):
        wait_for(lambda: log_lines.events("budget.reached"), what="the budget, after restart")
    assert sandbox.count() == 1 and studio.files(studio.inbox) == ["b.png"]
    once = run_watchfolder("run", "--config", str(studio.write_config()), "--once")
    assert once.returncode == 3, "a --once run stops on the budget, its files waiting"
