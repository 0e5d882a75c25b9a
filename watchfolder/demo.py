"""`watchfolder demo`: the whole product in one command, with no key and no credits.

Creates a demo folder (inbox, outbox, archive, errors, a config), starts the sandbox on a free
loopback port and the real daemon against it, drops generated studio shots plus one broken
file, and prints each file's fate as it happens. Then it keeps watching until Ctrl-C so the
user can drop their own images in; `--once` stops after the samples (for scripts and CI).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import threading
import time
from collections.abc import MutableMapping
from pathlib import Path
from types import FrameType
from typing import Any

import structlog
import yaml

from watchfolder import samples
from watchfolder.config import load_config
from watchfolder.daemon import Daemon
from watchfolder.sandbox import Sandbox

MARKER = ".watchfolder-demo"
EXPECTED_FAILURES = {"broken.jpg"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", type=Path, default=Path("watchfolder-demo"),
                        help="the demo folder to create (default: ./watchfolder-demo); "
                             "a previous demo folder there is replaced")
    parser.add_argument("--once", action="store_true",
                        help="process the samples, print where they went, and exit "
                             "(0 when every sample ended where it should)")
    parser.add_argument("--rpm", type=int, default=60,
                        help="the sandbox's and the daemon's requests per minute (default 60)")


class _Progress:
    """A structlog processor that turns the daemon's events into lines for a person."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.done: list[str] = []
        self.failed: dict[str, str] = {}
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)

    def _rel(self, path: str | None) -> str:
        if not path:
            return "?"
        try:
            return str(Path(path).relative_to(self.root))
        except ValueError:
            return path

    def __call__(self, _: Any, __: str, event: MutableMapping[str, Any]) -> Any:
        name = event.get("event")
        if name == "file.done":
            note = " (same content as before: reused, no request)" if event.get("reused") else ""
            print(f"  done    {event['file']}  ->  {self._rel(event.get('result'))}"
                  f"  ({event.get('ms', 0) / 1000:.1f} s){note}", flush=True)
            with self.changed:
                self.done.append(event["file"])
                self.changed.notify_all()
        elif name == "file.failed":
            print(f"  failed  {event['file']}  ->  {self._rel(event.get('moved_to'))}"
                  f"  ({event.get('reason')}: {event.get('message')})", flush=True)
            with self.changed:
                self.failed[event["file"]] = str(event.get("reason"))
                self.changed.notify_all()
        elif event.get("level") in ("warning", "error", "critical"):
            print(f"  {event.get('level')}: {name} {event.get('message') or ''}".rstrip(),
                  flush=True)
        raise structlog.DropEvent

    def wait_for(self, names: set[str], signals: list[int], timeout: float, *,
                 until_signal: bool = False) -> bool:
        """Wait until every name is done or failed (or a signal came); True if they are."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not signals and time.monotonic() < deadline:
                if not until_signal and names <= set(self.done) | set(self.failed):
                    return True
                # Short waits: the signal handler only appends to `signals`, it cannot notify.
                self.changed.wait(0.2)
        return names <= set(self.done) | set(self.failed)


def _prepare(folder: Path) -> None:
    if folder.exists():
        if not (folder / MARKER).exists() and any(folder.iterdir()):
            raise SystemExit(f"watchfolder demo: {folder} exists and is not a demo folder; "
                             f"choose another with --dir")
        shutil.rmtree(folder)
    for name in ("inbox", "outbox", "archive", "errors"):
        (folder / name).mkdir(parents=True)
    (folder / MARKER).write_text("created by `watchfolder demo`; safe to delete\n")


def run(args: argparse.Namespace) -> int:
    folder = args.dir.resolve()
    _prepare(folder)
    signals: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # Only record it: taking a lock here could deadlock with the interrupted main thread.
        signals.append(signum)

    with Sandbox(rpm=args.rpm, latency=0.3) as sandbox:
        config_path = folder / "daemon.yaml"
        config_path.write_text(yaml.safe_dump({
            "api": {"url": sandbox.url, "key": "demo-key", "requests_per_minute": args.rpm,
                    "concurrency": 4},
            "retry": {"pause_seconds": 10},
            "state_dir": "state",
            "inboxes": [{"path": "inbox", "outbox": "outbox", "archive": "archive",
                         "errors": "errors", "settle_seconds": 0.5}],
        }, sort_keys=False))
        config_path.chmod(0o600)
        config = load_config(config_path)
        progress = _Progress(folder)
        structlog.configure(processors=[structlog.processors.add_log_level, progress])

        print("watchfolder demo")
        print(f"  API      {sandbox.url}  (the built-in sandbox: a local stand-in that knocks "
              f"out plain backdrops; no key, no credits)")
        print(f"  folder   {folder}")
        print(f"  config   {config_path}  (run it yourself: watchfolder run --config "
              f"{config_path})")
        daemon = Daemon(config, once=args.once)
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            if args.once:  # --once scans at start: the samples must be there first
                names = _drop_samples(folder)
                daemon.start()
            else:
                daemon.start()
                names = _drop_samples(folder)
            finished = progress.wait_for(names, signals, timeout=300)
            _summary(folder, progress)
            if not args.once and not signals:
                print(f"\nStill watching {folder / 'inbox'}: drop your own images in "
                      f"(plain white, grey or green backdrops work best). Ctrl-C to stop.")
                while not signals:
                    progress.wait_for(set(), signals, timeout=0.5, until_signal=True)
        finally:
            daemon.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    expected = set(progress.failed) == EXPECTED_FAILURES and \
        set(progress.done) == names - EXPECTED_FAILURES
    return 0 if finished and expected else 1


def _drop_samples(folder: Path) -> set[str]:
    paths = samples.write_samples(folder / "inbox")
    print(f"\nDropped {len(paths)} sample images into inbox/ (one is broken on purpose):")
    return {p.name for p in paths}


def _summary(folder: Path, progress: _Progress) -> None:
    reports = sorted((folder / "errors").glob("*.error.json"))
    print(f"\n{len(progress.done)} cut-outs in   {folder / 'outbox'}")
    print(f"originals in     {folder / 'archive'}")
    for report in reports:
        print(f"error report     {report}")
    if sys.stdout.isatty():
        print("Open the outbox PNGs in an image viewer: the backdrops are transparent.")
