"""Summarise the raw py-spy profiles that `python -m benchmarks.run --profile DIR` writes.

    python -m benchmarks.profiles DIR/throughput-600rpm-0.2s-c2.txt

Throughput profiles are wall-clock (waiting threads included) and are split by what the
workers do: holding a request slot (and, within it, waiting for the answer versus
watchfolder's own work), waiting for a slot, local work outside the slot, waiting for a job.
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


def _slot_part(inner: list[str]) -> str:
    names = " ".join(inner)
    if "HTTPResponse._read_status" in names:
        return "waiting for the answer (API latency + the server's own work)"
    if "ApiClient.remove_background" in names:
        return "HTTP client: building, sending, reading the body"
    if "Journal.update" in names:
        return "journal commit (sending / fetched, fsync)"
    if "write_atomic" in names:
        return "spool write (fsync of file and folder)"
    if "inspect_result" in names:
        return "decoding the result (Pillow)"
    return inner[0] if inner else "other"


def workers(path: Path) -> str:
    """Where the worker threads' wall-clock time goes."""
    outer: Counter[str] = Counter()
    held: Counter[str] = Counter()
    total = 0
    for frames, count in _stacks(path):
        if not any("watchfolder-worker" in f for f in frames):
            continue
        total += count
        short = [f.split(" (")[0] for f in frames]
        if "Pipeline._request" in short:
            outer["holding a request slot"] += count
            held[_slot_part(frames[short.index("Pipeline._request") + 1:])] += count
        elif "RequestSlots.acquire" in short:
            outer["waiting for a request slot"] += count
        elif "JobQueue.get" in short:
            outer["waiting for a job"] += count
        else:
            outer["local work outside the slot (journal, outbox, archive)"] += count
    if not total:
        return "no worker samples"
    lines = [f"{total} worker samples (wall clock)"]
    lines += [f"  {100 * n / total:5.1f}%  {what}" for what, n in outer.most_common()]
    slot = outer["holding a request slot"]
    if slot:
        lines.append("  of the time a slot is held:")
        lines += [f"    {100 * n / slot:5.1f}%  {what}" for what, n in held.most_common(6)]
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
