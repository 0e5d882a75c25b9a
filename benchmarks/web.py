"""The web view's cost to the pipeline (issue 18), measured on the real daemon:

    python -m benchmarks.web                 # all three, about 4 minutes on 2 cores
    python -m benchmarks.web --only idle     # idle | watchers | thumbnail

- **idle**: a daemon with the web view on and no page open: its share of a core over
  `--idle-seconds` (target < 0.2 %), from the kernel's per-thread run times.
- **watchers**: a backlog drained at `--rpm` while five clients watch the overview as a browser
  does (the live stream, and every new thumbnail it names): the rate held, counted as the
  throughput case counts it (whole windows of `rpm` requests after the first, target ≥ 98 %).
- **thumbnail**: the first thumbnail of a 100 MP 16-bit TIFF (the studio cache's) in errors,
  asked over HTTP: time (target ≤ 1.5 s on 2 cores) and the daemon's resident memory above
  what it held before (target ≤ 150 MB; VmHWM after minus VmRSS before).

Prints one JSON line per case and a Markdown row for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import requests

from benchmarks import studio
from benchmarks.cases import workspace
from benchmarks.common import (
    DaemonProcess,
    cpu_seconds,
    names,
    status_kb,
    studio_config,
    task_totals,
    write_images,
)
from watchfolder.dev.sandbox import Sandbox

TOKEN = "bench-web-token-0123"  # noqa: S105 - a benchmark's own throwaway token
WATCHERS = 5


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _web_daemon(root: Path, url: str, rpm: int, concurrency: int) -> tuple[DaemonProcess, str]:
    port = _free_port()
    config = studio_config(root, url, rpm=rpm, concurrency=concurrency,
                           web={"listen": f"127.0.0.1:{port}", "token": TOKEN})
    return DaemonProcess(root, config), f"http://127.0.0.1:{port}"


def idle(seconds: float) -> dict[str, Any]:
    with workspace("web-idle") as root, Sandbox(rpm=60) as api:
        daemon, base = _web_daemon(root, api.url, 60, 8)
        daemon.start()
        assert requests.get(base + "/login", timeout=5).status_code == 200  # it serves
        time.sleep(5)  # start-up is not idleness
        (run0, sw0), t0 = task_totals(daemon.pid), time.monotonic()
        time.sleep(seconds)
        (run1, sw1), t1 = task_totals(daemon.pid), time.monotonic()
        daemon.stop()
    span = t1 - t0
    return {"case": "idle", "seconds": round(span, 1),
            "core_percent": round(100 * (run1 - run0) / span, 4),
            "wakeups_per_s": round((sw1 - sw0) / span, 1)}


class Watcher(threading.Thread):
    """One browser on the overview: the page, the live stream, each new picture it names."""

    def __init__(self, base: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.base, self.stop = base, stop
        self.events = 0
        self.pictures = 0
        self.seen: set[str] = set()
        self.first_event: float | None = None  # seconds from connecting
        self.error: str | None = None

    def run(self) -> None:
        try:
            self._watch()
        except requests.RequestException as exc:
            self.error = str(exc)

    def _watch(self) -> None:
        session = requests.Session()
        session.get(f"{self.base}/?token={TOKEN}", timeout=30)
        started = time.monotonic()
        with session.get(self.base + "/events", stream=True, timeout=(5, 120)) as stream:
            for line in stream.iter_lines(chunk_size=1, decode_unicode=True):
                if self.first_event is None and line and line.startswith("event:"):
                    self.first_event = time.monotonic() - started
                if self.stop.is_set():
                    return
                if line and line.startswith("event:"):
                    self.events += 1
                for src in re.findall(r'src="(/thumb/[^"]+)"', line or ""):
                    if src not in self.seen:
                        self.seen.add(src)
                        session.get(self.base + src, timeout=30)
                        self.pictures += 1


def watchers(rpm: int, latency: float, concurrency: int, windows: int) -> dict[str, Any]:
    need = (windows + 1) * rpm + 1
    with workspace("web-watchers") as root, Sandbox(rpm=rpm, latency=latency) as api:
        daemon, base = _web_daemon(root, api.url, rpm, concurrency)
        write_images(root / "inbox0", names("w", need + rpm))
        daemon.start()
        stop = threading.Event()
        clients = [Watcher(base, stop) for _ in range(WATCHERS)]
        for client in clients:
            client.start()
        deadline = time.monotonic() + (windows + 1) * 60.5 * 1.15 + 60
        while time.monotonic() < deadline and \
                sum(1 for r in api.requests if r.status == 200) < need:
            time.sleep(0.2)
        stop.set()
        daemon.stop()
        ok = sorted(r.time for r in api.requests if r.status == 200)
        too_many = sum(1 for r in api.requests if r.status == 429)
    last = min(len(ok), need) - 1
    rate = (last - rpm) / (ok[last] - ok[rpm]) * 60 if last > rpm else math.nan
    return {"case": "watchers", "rpm": rpm, "latency": latency, "concurrency": concurrency,
            "watchers": WATCHERS, "rate": round(rate, 2), "share": round(rate / rpm, 4),
            "requests": len(ok), "429s": too_many,
            "stream_events": sum(c.events for c in clients),
            "pictures_fetched": sum(c.pictures for c in clients),
            "first_event_s": [None if c.first_event is None else round(c.first_event, 2)
                              for c in clients],
            "errors": [c.error for c in clients if c.error]}


def thumbnail() -> dict[str, Any]:
    width, height, kind, orientation = studio.FULL["100 MP 16-bit TIFF"]
    (studio.CACHE / "studio").mkdir(parents=True, exist_ok=True)
    source = studio.make_input(studio.CACHE / "studio", "100 MP 16-bit TIFF", width, height,
                               kind, orientation)
    with workspace("web-thumb") as root, Sandbox(rpm=60) as api:
        daemon, base = _web_daemon(root, api.url, 60, 8)
        errors = root / "errors0"
        errors.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, errors / "big.tif")
        except OSError:
            shutil.copyfile(source, errors / "big.tif")
        (errors / "big.tif.error.json").write_text(json.dumps(
            {"reason": "api_rejected", "file": "big.tif", "inbox": str(root / "inbox0")}))
        daemon.start()
        session = requests.Session()
        session.get(f"{base}/?token={TOKEN}", timeout=10)
        time.sleep(2)
        rss0, hwm0 = status_kb(daemon.pid, "VmRSS"), status_kb(daemon.pid, "VmHWM")
        cpu0, started = cpu_seconds(daemon.pid), time.monotonic()
        answer = session.get(base + "/failed/0/thumb/big.tif", timeout=60)
        seconds, cpu = time.monotonic() - started, cpu_seconds(daemon.pid) - cpu0
        hwm1 = status_kb(daemon.pid, "VmHWM")
        started = time.monotonic()
        session.get(base + "/failed/0/thumb/big.tif", timeout=60)
        cached = time.monotonic() - started
        daemon.stop()
    return {"case": "thumbnail", "pixels": width * height, "status": answer.status_code,
            "type": answer.headers.get("content-type"), "seconds": round(seconds, 3),
            "cpu_seconds": round(cpu, 2), "load_average": os.getloadavg()[0],
            "cached_seconds": round(cached, 4),
            "rss_before_mb": round(rss0 / 1024, 1), "hwm_before_mb": round(hwm0 / 1024, 1),
            "more_resident_mb": round(max(0, hwm1 - rss0) / 1024, 1),
            "cores": os.cpu_count()}


def rows(result: dict[str, Any]) -> str:
    if result["case"] == "idle":
        met = result["core_percent"] < 0.2
        return (f"| Idle with the web view on, no page open ({result['seconds']:g} s) "
                f"| < 0.2% of a core | {result['core_percent']:.3f}% of a core "
                f"({result['wakeups_per_s']:g} wake-ups/s) | {'met' if met else '**missed**'} |")
    if result["case"] == "watchers":
        met = result["share"] >= 0.98 and result["429s"] == 0
        return (f"| Backlog at {result['rpm']}/min (latency {result['latency']:g} s, "
                f"concurrency {result['concurrency']}) while {result['watchers']} browsers "
                f"watch the overview live | ≥ 98% of {result['rpm']}/min, no 429 "
                f"| {result['rate']:.1f}/min = {100 * result['share']:.1f}% over "
                f"{result['requests']} requests, 429s: {result['429s']}; "
                f"{result['stream_events']} live updates, {result['pictures_fetched']} "
                f"thumbnails served | {'met' if met else '**missed**'} |")
    met = result["seconds"] <= 1.5 and result["more_resident_mb"] <= 150
    return (f"| Web view: first thumbnail of a 100 MP 16-bit TIFF ({result['cores']} cores) "
            f"| ≤ 1.5 s, ≤ 150 MB more resident | {result['seconds']:.2f} s "
            f"({result['cpu_seconds']:.2f} s of CPU, load average {result['load_average']:.1f}; "
            f"cached {1000 * result['cached_seconds']:.0f} ms), "
            f"+{result['more_resident_mb']:.0f} MB | {'met' if met else '**missed**'} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.web", description=__doc__)
    parser.add_argument("--only", choices=("idle", "watchers", "thumbnail"), action="append")
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--rpm", type=int, default=120)
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--windows", type=int, default=1)
    args = parser.parse_args(argv)
    chosen = args.only or ["idle", "watchers", "thumbnail"]
    found = []
    for case in chosen:
        if case == "idle":
            result = idle(args.idle_seconds)
        elif case == "watchers":
            result = watchers(args.rpm, args.latency, args.concurrency, args.windows)
        else:
            result = thumbnail()
        print(json.dumps(result), flush=True)
        found.append(result)
    for result in found:
        print(rows(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
