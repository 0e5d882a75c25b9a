"""Prometheus metrics scraped over real HTTP from a daemon working against the sandbox."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import KEY, Running, Studio, make_image, wait_for
from watchfolder import __version__
from watchfolder.dev.sandbox import Sandbox
from watchfolder.errors import StartupError
from watchfolder.service.daemon import Daemon

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(daemon: Daemon) -> tuple[str, Samples]:
    assert daemon.metrics is not None and daemon.metrics.address is not None
    response = requests.get(f"http://{daemon.metrics.address}/metrics", timeout=5)
    assert response.status_code == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return response.text, samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def test_metrics_are_scraped_over_http(tmp_path: Path, sandbox: Sandbox) -> None:
    sandbox.set_credits(None, 50)
    studio = Studio(tmp_path, sandbox.url, metrics={"listen": "127.0.0.1:0"},
                    api={"concurrency": 1})
    sandbox.add_faults("500-empty")  # the first request fails once, then succeeds
    make_image(studio.inbox / "a.png", seed=1)
    make_image(studio.inbox / "b.png", seed=2)
    (studio.inbox / "c.png").write_text("not an image")  # refused locally: no request
    inbox = str(studio.inbox)
    with Running(studio.config()) as daemon:
        wait_for(lambda: len(studio.files(studio.archive)) == 2
                 and len(studio.files(studio.errors)) == 2, what="three files finished")
        # A file is archived before its worker has logged and counted it: wait for the
        # counters of all three, then read every figure from one scrape.
        wait_for(lambda: value(scrape(daemon)[1], "watchfolder_in_flight") == 0
                 and value(scrape(daemon)[1], "watchfolder_files_total", inbox=inbox,
                           outcome="done") == 2, what="the workers' bookkeeping")
        body, samples = scrape(daemon)
        assert value(samples, "watchfolder_files_total", inbox=inbox, outcome="done") == 2
        assert value(samples, "watchfolder_files_total", inbox=inbox, outcome="failed") == 1
        assert value(samples, "watchfolder_failures_total", inbox=inbox,
                     reason="not_an_image") == 1
        assert value(samples, "watchfolder_api_responses_total", status="200") == 2
        assert value(samples, "watchfolder_api_responses_total", status="500") == 1
        assert value(samples, "watchfolder_api_request_duration_seconds_count") == 3
        assert value(samples, "watchfolder_api_request_duration_seconds_bucket",
                     le="+Inf") == 3
        assert value(samples, "watchfolder_credits_remaining") == 48
        assert value(samples, "watchfolder_queue_depth") == 0
        assert value(samples, "watchfolder_in_flight") == 0
        assert value(samples, "watchfolder_paused") == 0
        assert value(samples, "watchfolder_healthy") == 1
        assert value(samples, "watchfolder_info", version=__version__) == 1
        assert KEY not in body

        sandbox.keys = ["another-key"]  # ours is refused now: the queue pauses
        make_image(studio.inbox / "d.png", seed=3)
        wait_for(lambda: value(scrape(daemon)[1], "watchfolder_paused") == 1, what="pause")
        body, samples = scrape(daemon)
        assert value(samples, "watchfolder_paused_reason", reason="key_refused") == 1
        assert value(samples, "watchfolder_api_responses_total", status="403") == 1
        assert value(samples, "watchfolder_queue_depth") == 1
        assert KEY not in body
        address = daemon.metrics.address if daemon.metrics else None
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://{address}/metrics", timeout=2)


def test_a_metrics_port_in_use_stops_the_start(tmp_path: Path, sandbox: Sandbox) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        studio = Studio(tmp_path, sandbox.url, metrics={"listen": f"127.0.0.1:{port}"})
        with pytest.raises(StartupError) as raised:
            Daemon(studio.config()).start()
    assert raised.value.problems[0].startswith(f"metrics.listen: cannot listen on "
                                               f"127.0.0.1:{port}")
    studio.data.pop("metrics")
    with Running(studio.config()):
        pass  # the failed start let go of the state_dir


def test_reload_turns_metrics_on_and_off(studio: Studio, sandbox: Sandbox) -> None:
    with Running(studio.config()) as daemon:
        assert daemon.metrics is None
        make_image(studio.inbox / "before.png")
        wait_for(lambda: studio.files(studio.archive) == ["before.png"], what="before.png")
        assert daemon.pipeline is not None
        pipeline = daemon.pipeline
        wait_for(lambda: pipeline.tally.in_flight == 0, what="the worker")
        studio.data["metrics"] = {"listen": "127.0.0.1:0"}
        daemon.reload(studio.config())
        make_image(studio.inbox / "after.png", seed=1)
        wait_for(lambda: len(studio.files(studio.archive)) == 2, what="after.png")

        def done_count() -> float | None:
            return value(scrape(daemon)[1], "watchfolder_files_total",
                         inbox=str(studio.inbox), outcome="done")

        # The move to the archive comes just before the file is counted: wait for the count.
        wait_for(lambda: done_count() is not None, what="after.png counted")
        assert done_count() == 1, "counted from the moment metrics were turned on"
        address = daemon.metrics.address if daemon.metrics else None
        studio.data.pop("metrics")
        daemon.reload(studio.config())
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://{address}/metrics", timeout=2)
