"""Run every benchmark, print each figure against its target, and write BENCHMARKS.md.

    python -m benchmarks.run            # the full run, about 13 minutes on 2 cores
    python -m benchmarks.run --quick    # one throughput window, fewer files: about 6 minutes

Phase 1 runs the cases that mostly wait on the API side by side, each with its own sandbox and
daemon (throughput at 60 and 600 requests/minute and 0.2, 2 and 5 s latency, the naive client
beside each, the limit across start-up/pause/restart, idle CPU). Phase 2 runs the cases that
load the machine one at a time (reaction, 100,000 files at start-up, files dropped while
running, memory over many files). See BENCHMARKS.md for what each figure means.

A figure is printed only if it was measured: a value missing from a case's result, or NaN
(what the cases put where they could not measure), turns its row into "not measured", is
named on stderr, and the run exits 2 (1 when every figure was measured but some missed
their target).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.common import KEY, REPO, unique_png
from watchfolder.sandbox import Sandbox

RATES = (60, 600)
LATENCIES = (0.2, 2.0, 5.0)
SETTLE = 2.0  # the default settle_seconds

Case = tuple[str, dict[str, Any]]


def plan(quick: bool) -> tuple[list[Case], list[Case]]:
    """(side-by-side cases, one-at-a-time cases)."""
    windows = 1 if quick else 3
    parallel: list[Case] = []
    for rpm in RATES:
        for latency in LATENCIES:
            needed = latency * rpm / 60
            # The smallest concurrency above latency x rate: the API's answer always takes a
            # little longer than `latency` (the sandbox's own work, the transfer).
            parallel.append(("throughput", {"rpm": rpm, "latency": latency,
                                            "concurrency": math.floor(needed + 1e-9) + 1,
                                            "windows": windows}))
            if not quick and needed >= 1 and abs(needed - round(needed)) < 1e-9:
                # Exactly latency x rate: no headroom at all, Little's law at its edge.
                parallel.append(("throughput", {"rpm": rpm, "latency": latency,
                                                "concurrency": round(needed),
                                                "windows": windows, "boundary": True,
                                                "naive": False}))
    parallel.append(("limit_safety", {"rpm": 60, "latency": 0.2, "concurrency": 8,
                                      "batch": 40, "pause": 25, "timeout": 240}))
    parallel.append(("idle", {"seconds": 30 if quick else 60, "inboxes": 4}))
    serial: list[Case] = [
        ("reaction", {"files": 20 if quick else 60, "settle": SETTLE}),
        ("startup", {"files": 100_000}),
        ("drop", {"files": 10_000, "timeout": 900}),
        ("drop", {"files": 10_000, "queue_limit": 1024, "timeout": 900}),
        ("memory", {"files": 8_000 if quick else 20_000, "first": 2_000, "batch": 200,
                    "timeout": 1800}),
    ]
    if quick:
        serial = [c for c in serial if not (c[0] == "drop" and "queue_limit" not in c[1])]
    return parallel, serial


def run_case(case: Case, profile: str | None) -> dict[str, Any]:
    name, params = case
    if profile:
        params = {**params, "profile": profile}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "benchmarks.cases", name, json.dumps(params)],
                          cwd=REPO, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        print(f"  {name} {params}: FAILED (exit {done.returncode})\n{done.stderr[-3000:]}",
              file=sys.stderr, flush=True)
        return {"case": name, "params": params, "error": done.stderr[-3000:]}
    result: dict[str, Any] = json.loads(lines[-1])
    result["seconds"] = time.monotonic() - started
    print(f"  done: {name} {_short(params)} ({result['seconds']:.0f} s)", flush=True)
    return result


def _short(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items() if k not in ("profile", "timeout"))


def sandbox_overhead() -> float:
    """Median milliseconds of one sandbox answer at latency 0: what `latency` does not count."""
    import requests

    with Sandbox(rpm=0) as api, requests.Session() as session:
        times = []
        for n in range(50):
            started = time.perf_counter()
            session.post(api.url, headers={"x-api-key": KEY}, timeout=10,
                         files={"image_file": ("a.png", unique_png(n), "image/png")})
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


# -- the report ----------------------------------------------------------------------------------

def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


class MissingSample(ValueError):
    """A value a row needs was not measured."""


def check_measured(value: Any, where: str = "result") -> None:
    """Raise MissingSample for any NaN or infinite number anywhere in `value`."""
    if isinstance(value, float) and not math.isfinite(value):
        raise MissingSample(f"{where} was not measured")
    if isinstance(value, dict):
        for key, item in value.items():
            check_measured(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            check_measured(item, f"{where}[{index}]")


def rows(results: list[dict[str, Any]]
         ) -> tuple[list[list[str]], list[list[str]], list[str], list[str]]:
    """(targets table, throughput detail table, misses, rows not measured with why)."""
    table: list[list[str]] = []
    detail: list[list[str]] = []
    misses: list[str] = []
    unmeasured: list[str] = []

    def add(figure: str, target: str, measured: str, ok: bool) -> None:
        table.append([figure, target, measured, _met(ok)])
        if not ok:
            misses.append(figure)

    for r in results:
        name = f"{r['case']} {_short(r['params'])}"
        if "error" in r:
            add(name, "-", "the case failed: see the log", False)
            continue
        try:
            check_measured(r["result"])
            _case_rows(r, add, detail)
        except (MissingSample, KeyError) as exc:
            why = str(exc) if isinstance(exc, MissingSample) else f"no {exc} in the result"
            unmeasured.append(f"{name}: {why}")
            add(name, "-", f"**not measured** ({why})", False)
    return table, detail, misses, unmeasured


def _case_rows(r: dict[str, Any], add: Callable[[str, str, str, bool], None],
               detail: list[list[str]]) -> None:
    """Add the rows of one case's result; MissingSample or KeyError if a value is missing."""
    p, x = r["params"], r["result"]
    if r["case"] == "throughput":
        edge = " (no headroom)" if p.get("boundary") else ""
        ok = x["fraction"] >= 0.98 and x["status_429"] == 0 and x["max_window"] <= p["rpm"]
        add(f"Throughput {p['rpm']}/min, latency {p['latency']:g} s, "
            f"concurrency {p['concurrency']}{edge}",
            f"≥ 98% of {p['rpm']}/min, no 429, ≤ {p['rpm']} in any 60 s",
            f"{x['rate']:.1f}/min = {_pct(x['fraction'])} over {x['counted']:,} requests, "
            f"429s: {x['status_429']}, max {x['max_window']} in 60 s", ok)
        if not p.get("boundary"):
            detail.append([f"{p['rpm']}", f"{p['latency']:g} s", f"{p['concurrency']}",
                           f"{x['rate']:.1f} ({_pct(x['fraction'])})",
                           f"{x['naive_rate']:.1f} ({_pct(x['naive_fraction'])})",
                           f"{x['ratio']:.1f}x", f"{x['status_429']} / {x['naive_429']}",
                           f"{x['first_minute']}", f"{x['cpu_ms_per_request']:.1f}"])
    elif r["case"] == "limit_safety":
        ok = x["max_window"] <= p["rpm"] and x["status_429"] == 0 and x["processed"]
        add(f"Limit at start-up, after a {p['pause']} s pause and across a restart "
            f"({p['rpm']}/min, concurrency {p['concurrency']}, {x['files']} files)",
            f"≤ {p['rpm']} in any 60 s, no 429",
            f"max {x['max_window']} in 60 s, 429s: {x['status_429']}, "
            f"{x['requests']} requests, all processed: {x['processed']}", ok)
    elif r["case"] == "reaction":
        limit = p["settle"] + 0.1
        add(f"Reaction: rename into inbox → upload starts ({x['files']} files, "
            f"settle_seconds {p['settle']:g})", f"median ≤ {limit:.1f} s",
            f"median {x['median']:.3f} s (p95 {x['p95']:.3f}, max {x['max']:.3f})",
            x["median"] <= limit and x["uploaded"] == x["files"])
    elif r["case"] == "idle":
        add(f"Idle: {x['inboxes']} inboxes ({x['polling_inboxes']} polling every 2 s), "
            f"{x['seconds']:.0f} s", "< 0.1% of a core",
            f"{x['core_percent']:.3f}% of a core ({x['wakeups_per_s']:.1f} wake-ups/s, "
            f"{x['threads']} threads)", x["core_percent"] < 0.1)
    elif r["case"] == "startup":
        add(f"Start-up with {x['files']:,} files waiting: all discovered and queued",
            "≤ 10 s", f"{x['queued_s']:.1f} s from exec (scan {x['scan_s']:.1f} s, "
            f"settle {x['settle']:g} s)", x["queued_s"] <= 10)
        add(f"Start-up with {x['files']:,} files: memory with all queued",
            "< 200 MB RSS", f"{x['rss_mb']:.0f} MB (peak {x['hwm_mb']:.0f} MB)",
            x["hwm_mb"] < 200)
        add(f"Start-up with {x['files']:,} files: none missed", "0 missed",
            f"{x['missed']} missed, {x['extra']} extra", x["missed"] == 0 and x["extra"] == 0)
    elif r["case"] == "drop":
        forced = x["queue_limit"] is not None
        how = (f"inotify queue lowered to {x['queue_limit']:,} so it overflows" if forced
               else "default inotify queue")
        ok = x["all_processed"] and x["missed"] == 0 and x["errors"] == 0
        if forced:
            ok = ok and x["overflows"] >= 1 and x["rescans"] >= 1
        add(f"{x['files']:,} files dropped in {x['drop_s']:.1f} s while running ({how})",
            "all processed" + ("; overflow → rescan" if forced else ""),
            f"{x['archived']:,} processed in {x['seconds']:.0f} s, {x['missed']} missed; "
            f"{x['overflows']} overflow(s), {x['rescans']} rescan(s)", ok)
    elif r["case"] == "memory":
        if not x["rss_first_mb"] or not x["samples"]:
            raise MissingSample(f"no RSS sample (first {x['rss_first_mb']}, "
                                f"samples {x['samples']})")
        growth = x["growth_mb"] / x["rss_first_mb"]
        samples = dict(x["samples"])
        half = min(samples, key=lambda n: abs(n - x["files"] / 2))
        add(f"Memory over {x['files']:,} files: RSS at {x['first']:,} vs at {x['files']:,}",
            "no growth (≤ 5%)",
            f"{x['rss_first_mb']:.1f} → {x['rss_end_mb']:.1f} MB ({growth:+.1%}; "
            f"{x['rss_end_mb'] - samples[half]:+.1f} MB over the last "
            f"{x['files'] - half:,})", x["processed"] >= x["files"] and growth <= 0.05)


def _markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()} cores ({model}), {memory:.0f} GiB RAM, Linux "
            f"{platform.release()}, Python {platform.python_version()}")


DEFINITIONS = """\
## How each figure is measured

Everything runs for real: `python -m watchfolder run` in a child process (for the start-up
scan, the `Daemon` class itself in a child process, so the harness can see the moment the last
file is queued), real folders under `/tmp` on the machine's disk, tiny unique 64x48 PNGs
(unique, or watchfolder would reuse one result for identical content), and the loopback sandbox
(`watchfolder/sandbox.py`) with its `latency` and `rpm` knobs, one sandbox per daemon. Times
come from the sandbox's receipt time of each request (`time.monotonic()`, shared by every
process on the machine).

- **Throughput**: a backlog larger than the run can drain waits in the inbox at start. With
  L = `requests_per_minute` and t[i] the sandbox's receipt time of the i-th accepted request
  (from 0), rate = k·L / (t[(k+1)·L] - t[L]) per minute: the time k whole windows of L
  requests take, counted from the first request the limit held back (k = 3 in the full run,
  1 with `--quick`). The first window is left out because a sliding window lets the first L
  requests go as fast as the workers can send them, which says nothing about how fast a
  backlog drains; whole windows make the figure independent of how bursty the sending is
  within each window. watchfolder's limiter keeps a 60 s window plus a 0.5 s margin against
  network jitter, so its ceiling is 60/60.5 = 99.2% of the limit.
  *Max in 60 s* is the most requests the sandbox received in any 60-second window of the whole
  run, start-up included; the sandbox enforces the limit itself, so any excess shows as a 429.
- **Concurrency**: the main rows use the smallest concurrency above latency x rate (an answer
  always takes a little longer than `latency`: the sandbox's own work and the transfer, see
  *sandbox answer* above). The full run adds rows with concurrency exactly latency x rate
  (*no headroom*). There Little's law, rate = concurrency / time a request holds its slot,
  turns every millisecond beyond `latency` into lost throughput: the sandbox's own work, and
  watchfolder's durable writes while it holds the slot (the `sending` journal commit before
  the request, the spool file and the `fetched` commit after it, which is what bounds a crash
  to one lost credit per slot). At 0.2 s a few milliseconds are a few percent; at 2 s and
  5 s they vanish. `api.concurrency` counts requests: local work (reading, checking, outbox,
  archive) runs on spare workers and holds no slot.
- **Profiles**: `python -m benchmarks.run --profile DIR` attaches py-spy to each daemon
  (wall clock for throughput, CPU otherwise); `python -m benchmarks.profiles DIR/*.txt` says
  where the workers' time goes (slot held / waiting for the answer / own work, ...).
- **Naive client**: `benchmarks/naive.py`, the vendor's Python example in a loop over the
  folder: `requests.post(...)`, write the result, `time.sleep(60 / requests_per_minute)`. It
  runs at the same time against its own sandbox with the same knobs. It sends evenly, so its
  rate is simply the spacing of its requests after its first minute.
- **Sandbox settings**: the sandbox turns Nagle's algorithm off and listens with a backlog
  of 128, as production HTTP servers do. Found by this harness: with the stdlib defaults every
  answer took 40 ms more (delayed ACK), and a burst of new connections lost SYNs so a request
  reached the server a second after watchfolder's limiter counted it, more than the 0.5 s
  margin: that alone gave 429s at 600/min with 51 connections.
- **Limit at start-up, after a pause, across a restart**: 40 files at start-up (concurrency 8
  could send 40 a second), an idle pause, 40 more, a SIGTERM and restart of the daemon with 40
  more waiting. The restarted process must take the last minute's sends from the journal.
- **Reaction**: files renamed one at a time (0.5-1.5 s apart) into the inbox of a daemon with
  room under its limit; time from the `rename()` to the sandbox receiving the upload.
- **Start-up**: 100,000 files in the inbox before the daemon starts; time from starting the
  process until every file has been found, has settled (`settle_seconds`, 2 s by default,
  applies to files found at start-up too) and is in the job queue; VmRSS then and VmHWM (peak)
  from `/proc/<pid>/status`; *missed* compares the names the daemon holds with those written.
- **Dropped while running**: files renamed into the inbox of a running daemon as fast as
  Python can; the sandbox is unlimited (this measures intake and per-file work, not the API).
  The second row lowers `fs.inotify.max_queued_events` while the daemon creates its inotify
  instance (the kernel takes the limit then), so the queue overflows for certain: watchdog's
  overflow warning must turn into a rescan, and every file must still be processed.
- **Idle**: a daemon with 4 inboxes (3 inotify, 1 polling at the default 2 s
  `polling_interval_seconds`) and nothing to do; CPU from the sum of
  `/proc/<pid>/task/*/schedstat` (nanoseconds; the 10 ms ticks of `/proc/<pid>/stat` are too
  coarse for 0.1%) over the window, after 5 s of start-up.
- **Memory over many files**: files fed a few hundred at a time to one daemon (unlimited
  sandbox), VmRSS sampled as the archive fills.
"""


def render(results: list[dict[str, Any]], quick: bool, elapsed: float, overhead: float,
           command: str) -> str:
    table, detail, misses, _ = rows(results)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "# Benchmarks",
        "",
        f"Generated by `{command}` on {stamp}: a {'quick' if quick else 'full'} run that took "
        f"{elapsed / 60:.1f} minutes. Rerun it to refresh this file; every number below comes "
        "from that run.",
        "",
        f"**Machine:** {machine()}. **Sandbox answer** at latency 0: {overhead:.1f} ms "
        "(median, loopback).",
        "",
        "## Figures against targets",
        "",
        _markdown(["Figure", "Target", "Measured", ""], table),
        "",
        f"{len(table) - len(misses)} of {len(table)} targets met"
        + (f"; missed: {'; '.join(misses)}." if misses else "."),
        "",
        "## Throughput beside the naive client",
        "",
        "Requests per minute (share of the limit) in the steady state; *first minute* is what "
        "watchfolder sent in the minute after its first request (a sliding window allows the "
        "whole limit at once).",
        "",
        _markdown(["limit/min", "latency", "concurrency", "watchfolder", "naive loop",
                   "ratio", "429s (ours / naive)", "first minute", "CPU ms/request"], detail),
        "",
        DEFINITIONS,
    ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="one throughput window instead of three, fewer files (~6 min)")
    parser.add_argument("--only", metavar="CASES",
                        help="comma-separated case names (throughput, limit_safety, idle, "
                             "reaction, startup, drop, memory)")
    parser.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md",
                        help="where to write the report (default: %(default)s)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--profile", metavar="DIR",
                        help="attach py-spy to each daemon and write raw profiles to DIR")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also save raw results")
    args = parser.parse_args(argv)
    parallel, serial = plan(args.quick)
    if args.only:
        wanted = set(args.only.split(","))
        parallel = [c for c in parallel if c[0] in wanted]
        serial = [c for c in serial if c[0] in wanted]
    profile = str(Path(args.profile).resolve()) if args.profile else None
    command = "python -m benchmarks.run" + (" --quick" if args.quick else "")
    print(f"watchfolder benchmarks on {machine()}", flush=True)
    started = time.monotonic()
    overhead = sandbox_overhead()
    results: list[dict[str, Any]] = []
    if parallel:
        print(f"phase 1: {len(parallel)} cases side by side", flush=True)
        with ThreadPoolExecutor(len(parallel)) as pool:
            results += list(pool.map(lambda case: run_case(case, profile), parallel))
    if serial:
        print(f"phase 2: {len(serial)} cases one at a time", flush=True)
        results += [run_case(case, profile) for case in serial]
    elapsed = time.monotonic() - started
    report = render(results, args.quick, elapsed, overhead, command)
    print()
    print(report.split("## How each figure")[0].rstrip())
    if args.json:
        args.json.write_text(json.dumps(results, indent=1), encoding="utf-8")
    if not args.no_write:
        args.out.write_text(report + "\n", encoding="utf-8")
        print(f"\nwritten to {args.out}")
    _, _, misses, unmeasured = rows(results)
    for row in unmeasured:
        print(f"benchmarks: NOT MEASURED: {row}", file=sys.stderr, flush=True)
    if unmeasured:
        return 2
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
