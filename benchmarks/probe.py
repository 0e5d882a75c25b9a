"""The real `Daemon`, started exactly as `watchfolder run` starts it, in a process of its own,
with a thread that watches its queue: the start-up scan benchmark needs to know the moment the
last file is queued, which no log line or folder shows.

    python -m benchmarks.probe CONFIG EXPECTED_NAMES_FILE

Prints JSON lines on stdout: `ready` (Daemon.start() returned: watches set, scan done) and
`queued` (every file discovered, settled and in the job queue), each with its monotonic time,
VmRSS and VmHWM; then stops the daemon. Monotonic time is system-wide, so the parent compares
it with the moment it started this process.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from watchfolder import logs
from watchfolder.config.settings import load_config
from watchfolder.service.daemon import Daemon


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _say(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, "t": time.monotonic(), "rss_kb": _vm("VmRSS"),
                      "hwm_kb": _vm("VmHWM"), **fields}), flush=True)


def main(argv: list[str]) -> int:
    config = load_config(Path(argv[0]))
    expected = set(Path(argv[1]).read_text(encoding="utf-8").split())
    with Path(argv[2]).open("a", encoding="utf-8") as log:
        logs.configure(config.log.format, config.log.level, stream=log)
        _say("imported")
        daemon = Daemon(config)
        started = time.monotonic()
        daemon.start()
        assert daemon.pipeline is not None and daemon.intake is not None
        pipeline, intake = daemon.pipeline, daemon.intake
        _say("ready", start_s=time.monotonic() - started, known=len(intake.known),
             settling=len(intake.tracker))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            tally = pipeline.tally
            waiting = len(pipeline.queue) + tally.in_flight + tally.done + tally.failed
            if len(intake.tracker) == 0 and waiting >= len(expected):
                break
            time.sleep(0.02)  # coarse enough not to compete with the daemon for the GIL
        queued_at = time.monotonic()
        rss, hwm = _vm("VmRSS"), _vm("VmHWM")
        # What the intake holds (it is another thread's set: copy until a copy succeeds).
        while True:
            try:
                known = {rel for _, rel in list(intake.known)}
                break
            except RuntimeError:
                continue
        archived = {p.name for inbox in config.inboxes if inbox.archive
                    for p in inbox.archive.iterdir()}
        print(json.dumps({"event": "queued", "t": queued_at, "rss_kb": rss, "hwm_kb": hwm,
                          "in_queue": len(pipeline.queue), "in_flight": pipeline.tally.in_flight,
                          "done": pipeline.tally.done, "failed": pipeline.tally.failed,
                          "missed": len(expected - known - archived),
                          "extra": len(known - expected)}), flush=True)
        daemon.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
