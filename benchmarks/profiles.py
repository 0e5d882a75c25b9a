"""Summarise the raw py-spy profiles that `python -m benchmarks.run --profile DIR` writes.

    python -m benchmarks.profiles DIR/throughput-600rpm-0.2s-c2.txt

Throughput profiles are wall-clock (waiting threads included) and are split by what the
main lane's workers do: waiting for a job or a request slot, within the slot (the limiter,
the answer, the spool, the client), the journal's commits, and the steps that follow an
answer (store, finish; on one host outside the slot).
Other profiles are CPU profiles: the functions that hold the most samples, inclusive.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"(.*?) \((.*?):\d+\)")


def _stacks(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = []
        for frame in stack.split(";"):
            match = _FRAME.match(frame)
            frames.append(f"{match.group(1)} ({Path(match.group(2)).name})" if match else frame)
        stacks.append((frames, int(count)))
    return stacks


def _worker_part(short: list[str]) -> str:
    """What a main-lane worker's sample is doing, by the step on its stack."""
    def has(name: str) -> bool:
        return name in short
    if has("JobQueue.get"):
        return "waiting for a job"
    if has("RequestSlots.acquire"):
        return "waiting for a request slot"
    if has("send"):
        if has("HTTPResponse.begin"):
            return "slot: waiting for the answer (latency + transfer)"
        if has("_write_file") or has("fsync_dir") or has("_spooled"):
            return "slot: the answer to the spool (write, fsync)"
        return "slot: HTTP client, checking the answer"
    if has("admit"):
        if any("Limiter.acquire" in name for name in short):
            return "slot: waiting for the rate limiter"
        return "slot: admission (claim, budget)"
    if has("Pipeline._commit"):
        return "journal commits (sending, fetched: in the slot; stored, done)"
    for step in ("store", "finish", "prepare"):
        if has(step):
            return f"{step} (one host: outside the slot)"
    return "other"


def workers(path: Path) -> str:
    """Where the main-lane workers' wall-clock time goes."""
    parts: Counter[str] = Counter()
    total = 0
    for frames, count in _stacks(path):
        if not any("watchfolder-main-worker" in f for f in frames):
            continue
        total += count
        parts[_worker_part([f.split(" (")[0] for f in frames])] += count
    if not total:
        return "no worker samples"
    lines = [f"{total} main-lane worker samples (wall clock)"]
    lines += [f"  {100 * n / total:5.1f}%  {what}" for what, n in parts.most_common()]
    return "\n".join(lines)


def hottest(path: Path, top: int = 25) -> str:
    """Functions by inclusive share of all samples."""
    inclusive: Counter[str] = Counter()
    total = 0
    for frames, count in _stacks(path):
        total += count
        for name in set(frames):
            if not name.startswith(("thread (", "process ")) and "threading.py" not in name:
                inclusive[name] += count
    lines = [f"{total} samples"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    for name in argv:
        path = Path(name)
        print(f"== {path.name}")
        print(workers(path) if path.name.startswith("throughput") else hottest(path))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
