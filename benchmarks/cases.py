"""The benchmark cases. Each runs in a process of its own and prints one JSON result line:

    python -m benchmarks.cases CASE '{"param": value, ...}'

run.py starts them (several at once where they do not disturb each other) and builds the
table. Every case makes its folders under a fresh temporary folder on the disk and removes
them afterwards; the sandbox runs in the case's process, the daemon in a child process.
The studio cases take their big inputs from a cache made once (benchmarks/studio.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchmarks import studio
from benchmarks.common import (
    KEY,
    REPO,
    DaemonProcess,
    Profiler,
    ReplaySandbox,
    count_between,
    count_files,
    cpu_seconds,
    cpu_split,
    folder_bytes,
    max_in_window,
    memory_kb,
    names,
    percentile,
    status_kb,
    studio_config,
    task_totals,
    unique_png,
    write_images,
)
from benchmarks.naive import naive_loop
from watchfolder.dev.sandbox import Sandbox

Result = dict[str, Any]
INOTIFY_QUEUE = Path("/proc/sys/fs/inotify/max_queued_events")


@contextlib.contextmanager
def workspace(name: str) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix=f"watchfolder-bench-{name}-", dir="/tmp"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _profile_path(params: dict[str, Any], name: str) -> Path | None:
    folder = params.get("profile")
    return Path(folder) / f"{name}.txt" if folder else None


def _wait(predicate: Callable[[], bool], timeout: float, every: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True


def _land(staging: Path, inbox: Path, name: str, final: str | None = None) -> float:
    """Drop one complete file the way a well-behaved sender does: rename it into the inbox
    (as `final` when given)."""
    os.rename(staging / name, inbox / (final or name))
    return time.monotonic()


# -- throughput --------------------------------------------------------------------------------

def throughput(params: dict[str, Any]) -> Result:
    """A backlog drained at the limit, and the naive loop beside it against its own sandbox.

    Rate = k x limit / (t[(k+1) x limit] - t[limit]), t[i] the sandbox's receipt time of the
    i-th accepted request (from 0): the time k whole windows of `limit` requests take, counted
    from the first request the limit held back. Whole windows make the figure independent of
    how bursty the sending is (a sliding window lets each window's requests go as fast as the
    workers can send them), and the first window, a burst by design, is left out.

    The daemon's CPU per request is given whole (start-up included) and after its `ready`
    line; `"profile": DIR` attaches py-spy, sampling waiting threads too unless `"wall":
    false` (then the samples are where the CPU goes).
    """
    rpm, latency, conc = params["rpm"], params["latency"], params["concurrency"]
    windows = params["windows"]
    name = f"throughput-{rpm}rpm-{latency:g}s-c{conc}"
    need = (windows + 1) * rpm + 1
    with workspace(name) as root, \
            Sandbox(rpm=rpm, latency=latency) as api, Sandbox(rpm=rpm, latency=latency) as api2:
        config = studio_config(root, api.url, rpm=rpm, concurrency=conc)
        write_images(root / "inbox0", names("w", need + rpm))
        daemon = DaemonProcess(root, config)
        stop = threading.Event()
        naive = None
        if params.get("naive", True):
            write_images(root / "naive-in", names("n", need), start=10_000_000)
            naive = threading.Thread(target=naive_loop, args=(
                api2.url, KEY, root / "naive-in", root / "naive-out", rpm, stop))
        daemon.start()
        # Start-up (imports, the scan of the backlog) counted apart: the figure per request
        # divides the whole process's CPU, start-up included, by the requests.
        startup_cpu = cpu_seconds(daemon.pid)
        if naive is not None:
            naive.start()
        profiler = Profiler(daemon.pid, _profile_path(params, name),
                            wall=params.get("wall", True), gil=params.get("gil", False))
        _wait(lambda: bool(api.requests), 120, 0.01)
        t1 = api.requests[0].time
        # 15% slack for a daemon slower than its limit; then the figure uses what came.
        deadline = t1 + (windows + 1) * 60.5 * 1.15 + 30
        _wait(lambda: sum(1 for r in api.requests if r.status == 200) >= need,
              deadline - time.monotonic(), 0.2)
        cpu = cpu_seconds(daemon.pid)
        user, system = cpu_split(daemon.pid)
        profiler.stop()
        stop.set()
        daemon.stop()
        if naive is not None:
            naive.join()
        ours = list(api.requests)
        theirs = list(api2.requests)
    ok = sorted(r.time for r in ours if r.status == 200)
    last = min(len(ok), need) - 1
    # The daemon's time per request outside the sandbox (Little's law at the slots' edge):
    # the k-th answer to leave frees a slot, which sends the (k + concurrency)-th request.
    answers = sorted(r.time + r.ms / 1000 for r in ours if r.status == 200)
    gaps = [1000 * (ok[k + conc] - answers[k]) for k in range(rpm, max(rpm, last - conc))]
    # NaN, never 0: fewer requests than one window is a figure not measured (run.py refuses it).
    rate = (last - rpm) / (ok[last] - ok[rpm]) * 60 if last > rpm else math.nan
    result = {
        "rpm": rpm, "latency": latency, "concurrency": conc, "windows": windows,
        "span_s": ok[last] - ok[rpm] if last > rpm else math.nan, "counted": max(0, last - rpm),
        "rate": rate, "fraction": rate / rpm,
        "gap_ms": statistics.median(gaps) if gaps else math.nan,
        "gap_ms_p90": statistics.quantiles(gaps, n=10)[-1] if len(gaps) > 1 else math.nan,
        "answer_ms": statistics.median(r.ms for r in ours if r.status == 200),
        "first_minute": count_between([r.time for r in ours], t1, t1 + 60),
        "max_window": max_in_window([r.time for r in ours]),
        "status_429": sum(1 for r in ours if r.status == 429),
        "errors": sum(1 for r in ours if r.status not in (200, 429)),
        "requests": len(ours), "cpu_ms_per_request": 1000 * cpu / max(1, len(ours)),
        "startup_cpu_s": startup_cpu,
        "cpu_ms_per_request_after_ready": 1000 * (cpu - startup_cpu) / max(1, len(ours)),
        # the same whole-process CPU, split: the interpreter's (user) and the kernel's (system)
        "user_ms_per_request": 1000 * user / max(1, len(ours)),
        "system_ms_per_request": 1000 * system / max(1, len(ours)),
    }
    if naive is not None:
        # The loop sends evenly: its rate is the spacing of its requests after the first
        # minute, over the same stretch of time.
        times = sorted(r.time for r in theirs if r.status == 200)
        steady = [t for t in times if t >= times[0] + 60]
        naive_rate = ((len(steady) - 1) / (steady[-1] - steady[0]) * 60
                      if len(steady) > 1 else math.nan)
        result.update(naive_rate=naive_rate, naive_fraction=naive_rate / rpm,
                      naive_429=sum(1 for r in theirs if r.status == 429),
                      ratio=rate / naive_rate if naive_rate else math.nan)
    return result


# -- the limit at start-up, after a pause and across a restart -----------------------------------

def limit_safety(params: dict[str, Any]) -> Result:
    """Bursts against the window: a backlog at start-up, a batch after an idle pause, then a
    restart with more waiting (the journal's send times must hold the new process back).

    With concurrency 8 and 0.2 s latency the workers could send 40 requests a second, so only
    the limiter stands between each burst and a 429.
    """
    rpm, latency, conc = params["rpm"], params["latency"], params["concurrency"]
    batch = params["batch"]
    with workspace("limit") as root, Sandbox(rpm=rpm, latency=latency) as api:
        config = studio_config(root, api.url, rpm=rpm, concurrency=conc)
        inbox, staging = root / "inbox0", root / "staging"
        write_images(inbox, names("a", batch))
        write_images(staging, names("b", batch) + names("c", batch), start=1_000_000)
        daemon = DaemonProcess(root, config)
        daemon.start()
        t0 = time.monotonic()
        _wait(lambda: len(api.requests) >= batch, 60)
        time.sleep(max(0.0, t0 + params["pause"] - time.monotonic()))  # idle: nothing to do
        for name in names("b", batch):
            _land(staging, inbox, name)
        time.sleep(10)
        daemon.stop()  # a restart with sends of the last minute in the journal
        for name in names("c", batch):
            _land(staging, inbox, name)
        daemon.start()
        total = 3 * batch
        finished = _wait(lambda: count_files(root / "archive0") >= total, params["timeout"], 0.5)
        daemon.stop()
        times = [r.time for r in api.requests]
        statuses = [r.status for r in api.requests]
    return {"rpm": rpm, "concurrency": conc, "latency": latency, "files": total,
            "processed": finished, "requests": len(times),
            "max_window": max_in_window(times), "status_429": statuses.count(429),
            "seconds": round(max(times) - min(times), 1) if times else 0.0}


# -- reaction ------------------------------------------------------------------------------------

def reaction(params: dict[str, Any]) -> Result:
    """Files landing in the inbox one at a time; time until the sandbox sees each upload.

    `how`: "moved" renames each file in from a folder outside the inbox (a move), "temp"
    renames it from an rsync-style temporary name inside the inbox (`.name.XXXXXX`): both
    complete by construction, sent at once. "in_place" writes each file under its final name
    (one write, as a copy does): it keeps the settle wait.
    """
    count, settle, how = params["files"], params["settle"], params.get("how", "moved")
    with workspace("reaction") as root, Sandbox(rpm=600, latency=0.2) as api:
        config = studio_config(root, api.url, rpm=600, concurrency=8)
        config["inboxes"][0]["settle_seconds"] = settle
        inbox, staging = root / "inbox0", root / "staging"
        files = names("r", count)
        write_images(staging, files)
        daemon = DaemonProcess(root, config)
        daemon.start()
        profiler = Profiler(daemon.pid, _profile_path(params, f"reaction-{how}"))
        rng = random.Random(5)
        landed = {}
        for name in files:
            if how == "temp":
                temp = inbox / f".{name}.{rng.randrange(16**6):06x}"
                os.rename(staging / name, temp)
                landed[name] = _land(inbox, inbox, temp.name, name)
            elif how == "in_place":
                (inbox / name).write_bytes((staging / name).read_bytes())
                landed[name] = time.monotonic()
            else:
                landed[name] = _land(staging, inbox, name)
            time.sleep(rng.uniform(0.5, 1.5))  # a steady trickle, well inside the limit
        _wait(lambda: len(api.requests) >= count, 60)
        profiler.stop()
        daemon.stop()
        seen = {r.filename: r.time for r in api.requests}
    delays = [seen[name] - landed[name] for name in files if name in seen]
    return {"files": count, "settle": settle, "how": how, "uploaded": len(delays),
            "median": statistics.median(delays), "p95": percentile(delays, 0.95),
            "max": max(delays), "min": min(delays)}


# -- idle ------------------------------------------------------------------------------------------

def idle(params: dict[str, Any]) -> Result:
    """Several inboxes (one on the polling observer), nothing to do: CPU and wake-ups."""
    seconds, inboxes = params["seconds"], params["inboxes"]
    with workspace("idle") as root, Sandbox(rpm=60) as api:
        config = studio_config(root, api.url, rpm=60, concurrency=8, inboxes=inboxes,
                               polling=(inboxes - 1,))
        daemon = DaemonProcess(root, config)
        daemon.start()
        profiler = Profiler(daemon.pid, _profile_path(params, "idle"))
        time.sleep(5)  # start-up is not idleness
        cpu0, (run0, sw0), t0 = cpu_seconds(daemon.pid), task_totals(daemon.pid), time.monotonic()
        time.sleep(seconds)
        cpu1, (run1, sw1), t1 = cpu_seconds(daemon.pid), task_totals(daemon.pid), time.monotonic()
        threads = len(list(Path(f"/proc/{daemon.pid}/task").iterdir()))
        profiler.stop()
        daemon.stop()
    span = t1 - t0
    return {"inboxes": inboxes, "polling_inboxes": 1, "seconds": round(span, 1),
            "core_percent": 100 * (run1 - run0) / span,
            "core_percent_ticks": 100 * (cpu1 - cpu0) / span,
            "wakeups_per_s": (sw1 - sw0) / span, "threads": threads}


# -- scale ---------------------------------------------------------------------------------------

def startup(params: dict[str, Any]) -> Result:
    """`count` files waiting at start-up: time until all are queued, memory, none missed."""
    count = params["files"]
    with workspace("startup") as root, Sandbox(rpm=60, latency=0.2) as api:
        config = studio_config(root, api.url, rpm=60, concurrency=8)
        files = names("s", count)
        write_images(root / "inbox0", files)
        (root / "expected.txt").write_text("\n".join(files), encoding="utf-8")
        daemon = DaemonProcess(root, config, argv=[sys.executable, "-m", "benchmarks.probe"])
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.probe", str(daemon.config_path),
             str(root / "expected.txt"), str(daemon.log_path)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
        profiler = None
        events = {}
        assert proc.stdout is not None
        for line in proc.stdout:
            event = json.loads(line)
            events[event["event"]] = event
            if event["event"] == "imported":
                profiler = Profiler(proc.pid, _profile_path(params, "startup"), rate=200)
        proc.wait()
        if profiler is not None:
            profiler.stop()
    ready, queued = events["ready"], events["queued"]
    return {"files": count, "settle": 2.0,
            "imports_s": events["imported"]["t"] - started,
            "ready_s": ready["t"] - started, "scan_s": ready["start_s"],
            "queued_s": queued["t"] - started, "after_settle_s": queued["t"] - ready["t"],
            "rss_mb": queued["rss_kb"] / 1024, "hwm_mb": queued["hwm_kb"] / 1024,
            "missed": queued["missed"], "extra": queued["extra"],
            "in_queue": queued["in_queue"], "done": queued["done"]}


def _unlimited(root: Path, url: str) -> dict[str, Any]:
    # The sandbox is unlimited here: this measures intake and the per-file work, not the API.
    return studio_config(root, url, rpm=1_000_000, concurrency=8)


def drop_while_running(params: dict[str, Any]) -> Result:
    """`count` files renamed into a running daemon's inbox at once; all must be processed.

    With `queue_limit`, fs.inotify.max_queued_events is lowered while the daemon creates its
    inotify instance (the limit is taken at creation), so the kernel queue overflows for
    certain and the overflow → rescan path is what delivers most files.
    """
    count, limit = params["files"], params.get("queue_limit")
    with workspace("drop") as root, Sandbox(rpm=0) as api:
        daemon = DaemonProcess(root, _unlimited(root, api.url))
        inbox, staging = root / "inbox0", root / "staging"
        files = names("d", count)
        write_images(staging, files)
        original = None
        if limit and os.access(INOTIFY_QUEUE, os.W_OK):
            original = INOTIFY_QUEUE.read_text().strip()
            INOTIFY_QUEUE.write_text(str(limit))
        try:
            daemon.start()
        finally:
            if original is not None:
                INOTIFY_QUEUE.write_text(original)
        startup_cpu = cpu_seconds(daemon.pid)
        profiler = Profiler(daemon.pid, _profile_path(params, f"drop-{limit or 'default'}"),
                            gil=params.get("gil", False))
        user0, system0 = cpu_split(daemon.pid)
        t0 = time.monotonic()
        for name in files:
            os.rename(staging / name, inbox / name)
        dropped = time.monotonic() - t0
        archive = root / "archive0"
        finished = _wait(lambda: count_files(archive) >= count, params["timeout"], 0.2)
        elapsed = time.monotonic() - t0
        cpu = cpu_seconds(daemon.pid) - startup_cpu  # less noisy than the wall time under load
        user, system = cpu_split(daemon.pid)
        profiler.stop()
        rss = status_kb(daemon.pid, "VmHWM") / 1024
        daemon.stop()
        events = daemon.read_events()
        result = {"files": count, "queue_limit": limit if original else None,
                  "drop_s": dropped, "all_processed": finished, "seconds": elapsed,
                  "archived": count_files(archive), "outbox": count_files(root / "outbox0"),
                  "errors": count_files(root / "errors0"),
                  "requests": sum(1 for r in api.requests if r.status == 200),
                  # watchdog's own warning, once per overflow (the spy turns it into a rescan)
                  "overflows": sum(1 for e in events
                                   if "events were lost" in str(e.get("event", ""))),
                  "rescans": sum(1 for e in events if e.get("event") == "intake.rescan"),
                  "hwm_mb": rss, "daemon_cpu_s": cpu, "cpu_ms_per_file": 1000 * cpu / count,
                  "user_ms_per_file": 1000 * (user - user0) / count,
                  "system_ms_per_file": 1000 * (system - system0) / count}
    result["missed"] = count - result["archived"]
    return result


class MissingSample(RuntimeError):
    """A figure the case was asked for was not measured: the case fails instead of guessing."""


def sample_points(first: int, count: int, intervals: int = 10) -> list[int]:
    """Archive counts at which to sample: `first`, then evenly spaced up to exactly `count`.

    The last point is `count` itself whatever the spacing: --quick's 2,000 and 8,000 with a
    fixed step of count // 10 = 800 put the points at 2,000 + 800k, past 8,000 without ever
    meeting it, so the end was never sampled and the report said "nan".
    """
    if not 0 < first <= count:
        raise ValueError(f"need 0 < first <= count, not first={first}, count={count}")
    intervals = max(1, min(intervals, count - first))
    return sorted({first + (count - first) * k // intervals for k in range(intervals + 1)})


def memory(params: dict[str, Any]) -> Result:
    """`count` files through one daemon, fed a few hundred at a time; RSS along the way, and
    the daemon's CPU per file (a change to the allocator must not buy memory with CPU)."""
    count, first, batch = params["files"], params["first"], params["batch"]
    points = sample_points(first, count)
    with workspace("memory") as root, Sandbox(rpm=0) as api:
        daemon = DaemonProcess(root, _unlimited(root, api.url))
        inbox, staging, archive = root / "inbox0", root / "staging", root / "archive0"
        files = names("m", count)
        write_images(staging, files)
        daemon.start()
        profiler = Profiler(daemon.pid, _profile_path(params, "memory"))
        t0 = time.monotonic()
        fed = 0
        samples: list[tuple[int, float]] = []
        deadline = t0 + params["timeout"]
        while time.monotonic() < deadline:
            done = count_files(archive)
            if points and done >= points[0]:  # one sample for every point passed since
                samples.append((done, status_kb(daemon.pid, "VmRSS") / 1024))
                points = [p for p in points if p > done]
            if done >= count:
                break
            if fed < count and count_files(inbox) < batch:
                for name in files[fed:fed + batch]:
                    os.rename(staging / name, inbox / name)
                fed = min(count, fed + batch)
            time.sleep(0.2)
        elapsed = time.monotonic() - t0
        hwm = status_kb(daemon.pid, "VmHWM") / 1024
        cpu = cpu_seconds(daemon.pid)  # since exec: start-up included, the same on both sides
        profiler.stop()
        daemon.stop()
        processed = count_files(archive)
    if not samples or samples[-1][0] < count:
        raise MissingSample(f"memory: RSS not sampled at {count:,} files ({processed:,} "
                            f"processed in {elapsed:.0f} s; samples at "
                            f"{[n for n, _ in samples]})")
    (at, at_first), at_end = samples[0], samples[-1][1]
    return {"files": count, "processed": processed, "seconds": elapsed,
            "first": at, "rss_first_mb": at_first, "rss_end_mb": at_end,
            "growth_mb": at_end - at_first, "hwm_mb": hwm, "cpu_ms_per_file": cpu / count * 1e3,
            "samples": [(n, round(mb, 1)) for n, mb in samples]}


# -- studio originals (issue 10) and output recipes (issue 11) -----------------------------------

JPEG45, TIFF100 = "45 MP JPEG", "100 MP 16-bit TIFF"
# Five outputs: the README's example recipe (the cut-out, a marketplace square on white, a web
# WEBP, the mask) and a 16-bit TIFF for retouchers.
RECIPE: list[dict[str, Any]] = [
    {"name": "{dir}/{stem}.{ext}", "format": "png"},
    {"name": "{dir}/{stem}_white.{ext}", "format": "jpeg", "background": "#ffffff",
     "crop": "subject", "margin": "5%", "size": "2000x2000"},
    {"name": "{dir}/{stem}_web.{ext}", "format": "webp", "max_size": 1600},
    {"name": "{dir}/{stem}_mask.{ext}", "format": "png", "mask": True},
    {"name": "{dir}/{stem}_retouch.{ext}", "format": "tiff"},
]


def studio_local(params: dict[str, Any]) -> Result:
    """Local work per file: inspect, proxy, full-size composite written as PNG; libvips (the
    daemon's code) beside the same work done with Pillow, each in a process of its own."""
    folder = studio.CACHE / "studio"
    found: dict[str, Any] = {}
    with workspace("local") as root:
        for name in params["inputs"]:
            original = studio.make_input(folder, name, *studio.FULL[name])
            answer, width, height = studio.make_answer(folder, original)
            sides = {side: studio.measure(side, original, answer, (width, height),
                                          root / f"out-{side}.png", None)
                     for side in ("vips", "pillow")}
            found[name] = {"input_mb": original.stat().st_size / 1e6,
                           "pixels": studio.FULL[name][0] * studio.FULL[name][1],
                           "proxy": [width, height], **sides}
    return {"inputs": found}


def recipe_local(params: dict[str, Any]) -> Result:
    """The outputs of one 45 MP file (or `input`, e.g. the 100 MP 16-bit TIFF) made from its
    answer: the default one output, then the five-output recipe (each `repeat` times,
    alternating; the fastest run of each counts)."""
    folder = studio.CACHE / "studio"
    name = params.get("input", JPEG45)
    original = studio.make_input(folder, name, *studio.FULL[name])
    answer, _, _ = studio.make_answer(folder, original)
    runs: dict[str, list[dict[str, Any]]] = {"one": [], "five": []}
    with workspace("recipe") as root:
        for _ in range(params["repeat"]):
            for label, outputs in (("one", None), ("five", RECIPE)):
                runs[label].append(studio.measure_recipe(original, answer, root / label,
                                                         outputs))
    one = min(runs["one"], key=lambda r: r["seconds"])
    five = min(runs["five"], key=lambda r: r["seconds"])
    return {"input": name, "repeat": params["repeat"], "one": one, "five": five,
            "ratio": five["seconds"] / one["seconds"], "cpu_ratio": five["cpu_s"] / one["cpu_s"],
            "all_seconds": {k: [round(r["seconds"], 2) for r in v] for k, v in runs.items()}}


def encoder_levels(params: dict[str, Any]) -> Result:
    """The full-size cut-out of one 45 MP file as PNG and as TIFF at each deflate level
    (`compression:`), and its 1600 px WEBP (the recipe's web output) at each encoder effort
    (`effort:`, `efforts`), each made and placed as the daemon does, in a process of its
    own: the size/time table each format's default is chosen from."""
    folder = studio.CACHE / "studio"
    original = studio.make_input(folder, JPEG45, *studio.FULL[JPEG45])
    answer, _, _ = studio.make_answer(folder, original)
    rows = []
    runs: list[tuple[str, int, dict[str, Any]]] = [
        (fmt, level, {"format": fmt, "compression": level})
        for fmt in ("png", "tiff") for level in params["levels"]]
    runs += [("webp", effort, {"format": "webp", "max_size": 1600, "effort": effort})
             for effort in params.get("efforts", [])]
    with workspace("levels") as root:
        for fmt, level, output in runs:
            run = studio.measure_recipe(original, answer, root / f"{fmt}{level}", [output])
            made = run["outputs"][0]
            rows.append({"format": fmt, "level": level, "seconds": run["seconds"],
                         "cpu_s": run["cpu_s"], "bytes": made["bytes"],
                         "size": made["size"]})
    return {"input": JPEG45, "rows": rows}


def _link_all(paths: list[Path], inbox: Path, names: list[str] | None = None) -> None:
    inbox.mkdir(parents=True, exist_ok=True)
    for n, path in enumerate(paths):
        os.link(path, inbox / (names[n] if names else path.name))


def peak_rss(params: dict[str, Any]) -> Result:
    """A backlog of 100 MP 16-bit TIFFs through `python -m watchfolder run` to the end: the
    daemon's VmHWM (RSS as the kernel counts it, mapped files included)."""
    count, conc = params["files"], params["concurrency"]
    files = studio.unique_copies(TIFF100, count)
    with workspace("rss") as root, \
            ReplaySandbox(rpm=params["rpm"], latency=params["latency"]) as api:
        config = studio_config(root, api.url, rpm=params["rpm"], concurrency=conc)
        inbox, archive = root / "inbox0", root / "archive0"
        _link_all(files, inbox)
        daemon = DaemonProcess(root, config)
        daemon.start()
        profiler = Profiler(daemon.pid, _profile_path(params, "peak-rss"))
        t0 = time.monotonic()
        deadline = t0 + params["timeout"]
        peak: dict[str, int] = {}
        peak_at = 0.0
        while count_files(archive) < count and time.monotonic() < deadline:
            now = memory_kb(daemon.pid)
            if now.get("VmRSS", 0) > peak.get("VmRSS", 0):
                peak, peak_at = now, time.monotonic() - t0
            time.sleep(0.1)
        elapsed = time.monotonic() - t0
        hwm = status_kb(daemon.pid, "VmHWM")
        profiler.stop()
        daemon.stop()
        processed, errors = count_files(archive), count_files(root / "errors0")
        requests = sum(1 for r in api.requests if r.status == 200)
    return {"files": count, "concurrency": conc, "processed": processed, "errors": errors,
            "requests": requests, "seconds": elapsed, "hwm_mb": hwm / 1024,
            "sampled_peak_mb": peak.get("VmRSS", 0) / 1024, "sampled_peak_at_s": peak_at,
            "sampled_anon_mb": peak.get("RssAnon", 0) / 1024,
            "sampled_file_mb": peak.get("RssFile", 0) / 1024}


def _backlog(inbox: Path, params: dict[str, Any]) -> int:
    """Put the case's files in the inbox; return how many are big (studio path).

    kind "trickle": none yet, the case lands 45 MP JPEGs one by one while it runs.
    """
    count = params["files"]
    if params["kind"] == "trickle":
        inbox.mkdir(parents=True, exist_ok=True)
        return count
    if params["kind"] == "jpeg45":
        _link_all(studio.unique_copies(JPEG45, count), inbox)
        return count
    # mix: one 100 MP TIFF in every `every` files, small PNGs between them
    every = params["every"]
    big = [n for n in range(count) if n % every == every - 1]
    _link_all(studio.unique_copies(TIFF100, len(big)), inbox,
              [f"m{n:06d}.tif" for n in big])
    for n in range(count):
        if n % every != every - 1:
            (inbox / f"m{n:06d}.png").write_bytes(unique_png(n))
    return len(big)


def _sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.monotonic()))


class _SpoolWatch(threading.Thread):
    """Samples the spool's size every `every` seconds; `peak` is the largest sample."""

    def __init__(self, spool: Path, every: float = 2.0) -> None:
        super().__init__(name="spool-watch", daemon=True)
        self.spool, self.every = spool, every
        self.stop = threading.Event()
        self.peak = self.answers = self.proxies = 0

    def run(self) -> None:
        while not self.stop.wait(self.every):
            self.peak = max(self.peak, folder_bytes(self.spool))
            try:
                names = os.listdir(self.spool)
            except FileNotFoundError:
                continue
            # `<id>.proxy.jpg` a proxy; `<id>.<ext>` an answer, made empty before its request
            # and streamed into (files/layout.py): an empty one is a request not yet answered
            # (it may still be waiting for its slot), no answer; hidden names are spares.
            proxies = sum(1 for n in names if n.endswith(".proxy.jpg"))
            self.proxies = max(self.proxies, proxies)
            self.answers = max(self.answers, sum(
                1 for n in names if not n.startswith(".") and not n.endswith(".proxy.jpg")
                and _size(self.spool / n) > 0))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


class _Lander(threading.Thread):
    """Lands `paths` in `inbox` one every `every` seconds (a hard link: complete at once)."""

    def __init__(self, paths: list[Path], inbox: Path, every: float) -> None:
        super().__init__(name="lander", daemon=True)
        self.paths, self.inbox, self.every = paths, inbox, every
        self.stop = threading.Event()
        self.landed = 0

    def run(self) -> None:
        start = time.monotonic()
        for n, path in enumerate(self.paths):
            if self.stop.wait(max(0.0, start + n * self.every - time.monotonic())):
                return
            os.link(path, self.inbox / path.name)
            self.landed += 1


def backlog_rate(params: dict[str, Any]) -> Result:
    """A backlog of studio files drained at `rpm`: the share of the limit the requests hold
    over whole minutes, after the first minute (a sliding window lets a burst go at first).

    Counted: the sandbox's accepted requests with receipt times in [t1 + 60 s, t1 + 60 s +
    `minutes`), t1 the first request's. The backlog is larger than that can drain; if it ran
    dry before the end the figure is not measured (NaN). Kind "trickle": instead of waiting
    at start, 45 MP JPEGs land one by one at the limit's pace (a studio copying a shoot in),
    so each new file's proxy meets the composites of the files before it.
    """
    rpm, latency, conc, minutes = (params["rpm"], params["latency"], params["concurrency"],
                                   params["minutes"])
    count = params["files"]
    name = f"backlog-{params['kind']}{'-recipe' if params.get('recipe') else ''}"
    api = ReplaySandbox(rpm=rpm, latency=latency)
    with workspace(name) as root, api:
        config = studio_config(root, api.url, rpm=rpm, concurrency=conc)
        if params.get("recipe"):
            config["inboxes"][0]["outputs"] = RECIPE
        inbox, archive = root / "inbox0", root / "archive0"
        big = _backlog(inbox, params)
        lander = None
        if params["kind"] == "trickle":
            lander = _Lander(studio.unique_copies(JPEG45, count), inbox, 60 / rpm)
        daemon = DaemonProcess(root, config)
        daemon.start(timeout=120)
        if lander is not None:
            lander.start()
        profiler = Profiler(daemon.pid, _profile_path(params, name), wall=True)
        spool_watch = _SpoolWatch(root / "state" / "spool")
        spool_watch.start()
        _wait(lambda: bool(api.requests), 300, 0.05)
        t1 = api.requests[0].time
        start, end = t1 + 60, t1 + 60 + 60 * minutes
        _sleep_until(start)
        cpu0, done0 = cpu_seconds(daemon.pid), count_files(archive)
        _sleep_until(end)
        cpu1, done1 = cpu_seconds(daemon.pid), count_files(archive)
        spool = folder_bytes(root / "state" / "spool")
        spool_watch.stop.set()
        spool_watch.join()
        hwm = status_kb(daemon.pid, "VmHWM")
        profiler.stop()
        if lander is not None:
            lander.stop.set()
            lander.join()
        daemon.stop()
        events = daemon.read_events()
        requests = list(api.requests)
        computed = api.computed
    landed = lander.landed if lander is not None else count
    accepted = [r for r in requests if r.status == 200]
    in_window = [r for r in accepted if start <= r.time < end]
    sent_by_end = sum(1 for r in accepted if r.time < end)
    # NaN, never a figure: a backlog that ran dry measures the backlog, not the daemon.
    rate = len(in_window) / minutes if sent_by_end < landed else math.nan
    return {
        "kind": params["kind"], "recipe": bool(params.get("recipe")), "files": count,
        "big_files": big, "minutes": minutes, "counted": len(in_window),
        "rate": rate, "fraction": rate / rpm,
        "big_in_window": sum(1 for r in in_window if (r.size or 0) >= 1_000_000),
        "status_429": sum(1 for r in requests if r.status == 429),
        "errors": sum(1 for r in requests if r.status not in (200, 429)),
        "max_window": max_in_window([r.time for r in requests]),
        "landed": landed, "left_at_end": landed - sent_by_end,
        "proxies": sum(1 for e in events if e.get("event") == "file.proxy"),
        "done_in_window": done1 - done0, "done_per_min": (done1 - done0) / minutes,
        "failed": sum(1 for e in events if e.get("event") == "file.failed"),
        "cores_used": (cpu1 - cpu0) / (end - start), "spool_gb_at_end": spool / 1e9,
        "spool_gb_peak": max(spool, spool_watch.peak) / 1e9,
        "spool_answers_peak": spool_watch.answers, "spool_proxies_peak": spool_watch.proxies,
        "hwm_mb": hwm / 1024, "sandbox_cutouts_computed": computed,
    }


def studio_cpu(params: dict[str, Any]) -> Result:
    """The daemon's CPU per studio file beside the same file's local work in isolation, in
    one case (issue 17: its overhead, everything but libvips' pixel work, ≤ 10 %).

    `files` 45 MP JPEGs are dropped into a running daemon at once (the API at 600/min and no
    latency: it never holds them back) and finished; the daemon's CPU seconds from just
    before the drop to the last file archived, divided by the files, is its CPU per file,
    whatever share of the cores it got (so the figure holds beside other load, where a
    rate does not). `repeat` isolated runs of studio_local's libvips child (inspect,
    proxy, composite as PNG; a process each) give the local work: the least CPU counts.
    """
    count = params["files"]
    folder = studio.CACHE / "studio"
    original = studio.make_input(folder, JPEG45, *studio.FULL[JPEG45])
    answer, width, height = studio.make_answer(folder, original)
    files = studio.unique_copies(JPEG45, count)
    with workspace("studio-cpu") as root, ReplaySandbox(rpm=600, latency=0.0) as api:
        config = studio_config(root, api.url, rpm=600, concurrency=8)
        inbox, archive = root / "inbox0", root / "archive0"
        inbox.mkdir(parents=True, exist_ok=True)
        daemon = DaemonProcess(root, config)
        daemon.start(timeout=120)
        profiler = Profiler(daemon.pid, _profile_path(params, "studio-cpu"))  # CPU samples
        cpu0, started = cpu_seconds(daemon.pid), time.monotonic()
        _link_all(files, inbox)
        finished = _wait(lambda: count_files(archive) >= count, params.get("timeout", 900), 0.2)
        cpu1, seconds = cpu_seconds(daemon.pid), time.monotonic() - started
        profiler.stop()
        daemon.stop()
        events = daemon.read_events()
        local = [studio.measure("vips", original, answer, (width, height),
                                root / "out-local.png", None)
                 for _ in range(params.get("repeat", 2))]
    if not finished:
        raise RuntimeError(f"only {count_files(archive)} of {count} files finished")
    per_file = (cpu1 - cpu0) / count
    best = min(local, key=lambda r: r["cpu"]["total"])
    return {"files": count, "seconds": seconds, "cores_used": (cpu1 - cpu0) / seconds,
            "cpu_s_per_file": per_file, "local_cpu_s": best["cpu"],
            "local_cpu_runs": [round(r["cpu"]["total"], 3) for r in local],
            "overhead": per_file / best["cpu"]["total"] - 1,
            "requests": len(api.requests), "proxies": sum(
                1 for e in events if e.get("event") == "file.proxy"),
            "failed": sum(1 for e in events if e.get("event") == "file.failed")}


CASES: dict[str, Callable[[dict[str, Any]], Result]] = {
    "throughput": throughput, "limit_safety": limit_safety, "reaction": reaction,
    "idle": idle, "startup": startup, "drop": drop_while_running, "memory": memory,
    "studio_local": studio_local, "recipe_local": recipe_local, "encoder_levels": encoder_levels,
    "studio_rss": peak_rss,
    "studio_rate": backlog_rate, "studio_mix": backlog_rate, "recipe_rate": backlog_rate,
    "studio_trickle": backlog_rate, "studio_cpu": studio_cpu,
}


def main(argv: list[str]) -> int:
    name, params = argv[0], json.loads(argv[1]) if len(argv) > 1 else {}
    result = CASES[name](params)
    print(json.dumps({"case": name, "params": params, "result": result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
