"""`watchfolder demo`: the whole product in one command, with no key and no credits.

Creates a demo folder (inbox, outbox, archive, errors, a config), starts the sandbox on a free
loopback port and the real daemon against it, drops generated studio shots plus one broken
file, and prints each file's fate as it happens. Then it keeps watching until Ctrl-C so the
user can drop their own images in; `--once` stops after the samples (for scripts and CI).

Run again on the same folder, the demo clears only what it made itself and keeps the user's
files (images dropped into the inbox and their cut-outs, originals and error reports):
`demo-files.json` in the folder lists every file the demo wrote or had the daemon produce from
a sample, with its SHA-256, and a file is removed only if it is listed and unchanged. The
demo's own journal (`state/`) and `daemon.yaml` are always replaced. Images the user left
in the inbox are processed with the samples and count towards the exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, MutableMapping
from pathlib import Path
from types import FrameType
from typing import Any

import structlog
import yaml

from watchfolder.config.settings import load_config
from watchfolder.dev import samples
from watchfolder.dev.sandbox import Sandbox
from watchfolder.files import layout
from watchfolder.files.place import move_into, sha256_file
from watchfolder.service.daemon import Daemon

MARKER = ".watchfolder-demo"
MANIFEST = "demo-files.json"
FOLDERS = ("inbox", "outbox", "archive", "errors")
EXPECTED_FAILURES = {"broken.jpg"}
WEB_PORT = 8470


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", type=Path, default=Path("watchfolder-demo"),
                        help="the demo folder to create (default: ./watchfolder-demo); run "
                             "again, it replaces what the demo made there and keeps your files")
    parser.add_argument("--once", action="store_true",
                        help="process the samples (and any image already in the inbox), print "
                             "where they went, and exit (0 when each sample ended where it "
                             "should and no other file failed)")
    parser.add_argument("--rpm", type=int, default=60,
                        help="the sandbox's and the daemon's requests per minute (default 60)")


class _Progress:
    """A structlog processor that turns the daemon's events into lines for a person."""

    def __init__(self, root: Path, manifest: Manifest | None = None) -> None:
        self.root = root
        self.manifest = manifest
        self.done: list[str] = []
        self.failed: dict[str, str] = {}
        self.studio: dict[str, str] = {}  # file → why it went by the studio path
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
        if name == "file.proxy":
            with self.lock:
                self.studio[event["file"]] = f"{event.get('why')}: a {event.get('proxy')} " \
                                             f"proxy was sent"
        elif name == "file.done":
            note = " (same content as before: reused, no request)" if event.get("reused") else ""
            with self.lock:
                why = self.studio.get(event["file"])
            if why:
                note += f"\n            studio path, full resolution ({why})"
            print(f"  done    {event['file']}  ->  {self._rel(event.get('result'))}"
                  f"  ({event.get('ms', 0) / 1000:.1f} s){note}", flush=True)
            self._made(event["file"], event.get("result"), event.get("archived"))
            with self.changed:
                self.done.append(event["file"])
                self.changed.notify_all()
        elif name == "file.failed":
            print(f"  failed  {event['file']}  ->  {self._rel(event.get('moved_to'))}"
                  f"  ({event.get('reason')}: {event.get('message')})", flush=True)
            moved = event.get("moved_to")
            self._made(event["file"], moved, moved and str(layout.reason_file(Path(moved))))
            with self.changed:
                self.failed[event["file"]] = str(event.get("reason"))
                self.changed.notify_all()
        elif event.get("level") in ("warning", "error", "critical"):
            print(f"  {event.get('level')}: {name} {event.get('message') or ''}".rstrip(),
                  flush=True)
        raise structlog.DropEvent

    def _made(self, name: str, *paths: str | None) -> None:
        """What the daemon made of one of our samples is ours to replace next time."""
        if self.manifest is not None and self.manifest.is_sample(name):
            self.manifest.add(*(Path(p) for p in paths if p))

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


class Manifest:
    """The files the demo made in its folder, with their SHA-256, kept up to date on disk.

    Written after each change (atomically), so a demo killed midway still knows most of what
    it made; anything it does not know is treated as the user's and kept.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / MANIFEST
        self.files: dict[str, str] = {}
        self.samples: set[str] = set()
        self._lock = threading.Lock()

    @classmethod
    def load(cls, folder: Path) -> Manifest:
        manifest = cls(folder)
        try:
            data = json.loads(manifest.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return manifest  # none yet (or an older demo's folder): nothing is known as ours
        files = data.get("files") if isinstance(data, dict) else None
        if isinstance(files, dict):
            manifest.files = {k: v for k, v in files.items()
                              if isinstance(k, str) and isinstance(v, str)}
        return manifest

    def is_sample(self, name: str) -> bool:
        return name in self.samples

    def add(self, *paths: Path) -> None:
        with self._lock:
            for path in paths:
                with contextlib.suppress(OSError, ValueError):  # gone already, or elsewhere
                    self.files[path.relative_to(self.folder).as_posix()] = sha256_file(path)
            self._save()

    def _save(self) -> None:
        text = json.dumps({"about": "files `watchfolder demo` made here; it replaces them "
                                    "when run again and keeps every other file",
                           "files": self.files}, indent=1, ensure_ascii=False)
        fd, temp = tempfile.mkstemp(dir=self.folder, prefix=f".{MANIFEST}.")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
        Path(temp).replace(self.path)

    def clear(self) -> list[str]:
        """Remove every listed file that is still as the demo left it; return the rest of
        the files in the demo's folders (the user's), relative to the folder."""
        for rel, digest in self.files.items():
            path = self.folder / rel
            with contextlib.suppress(OSError):
                if path.is_file() and not path.is_symlink() and sha256_file(path) == digest:
                    path.unlink()
        self.files = {}
        kept: list[str] = []
        for name in FOLDERS:
            kept += _prune_and_list(self.folder / name, self.folder)
        return sorted(kept)


def _prune_and_list(top: Path, folder: Path) -> list[str]:
    """Remove the empty folders below `top` (not `top`); list the files that remain."""
    remaining: list[str] = []
    for current, dirs, files in os.walk(top, topdown=False):
        remaining += [(Path(current) / f).relative_to(folder).as_posix() for f in files]
        for name in dirs:
            with contextlib.suppress(OSError):  # not empty: something of the user's is there
                (Path(current) / name).rmdir()
        remaining += [(Path(current) / d).relative_to(folder).as_posix() + "/"
                      for d in dirs if (Path(current) / d).is_symlink()]
    return remaining


def _prepare(folder: Path) -> tuple[Manifest, list[str]]:
    """Make the demo folder ready; return its manifest and the user's files kept in it."""
    if folder.exists():
        if not (folder / MARKER).exists() and any(folder.iterdir()):
            raise SystemExit(f"watchfolder demo: {folder} exists and is not a demo folder; "
                             f"choose another with --dir")
        manifest = Manifest.load(folder)
        kept = manifest.clear()
        shutil.rmtree(folder / "state", ignore_errors=True)  # the demo daemon's own journal
    else:
        manifest, kept = Manifest(folder), []
    for name in FOLDERS:
        (folder / name).mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text("created by `watchfolder demo`; safe to delete\n")
    manifest.add(folder / MARKER)
    return manifest, kept


def run(args: argparse.Namespace) -> int:
    folder = args.dir.resolve()
    manifest, kept = _prepare(folder)
    signals: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # Only record it: taking a lock here could deadlock with the interrupted main thread.
        signals.append(signum)

    with Sandbox(rpm=args.rpm, latency=0.3) as sandbox:
        config_path = folder / "daemon.yaml"
        # A token of its own each run, so the printed link is the only way to act from the page.
        token = secrets.token_urlsafe(18)
        config_path.write_text(yaml.safe_dump({
            "api": {"url": sandbox.url, "key": "demo-key", "requests_per_minute": args.rpm,
                    "concurrency": 4},
            "retry": {"pause_seconds": 10},
            "state_dir": "state",
            "inboxes": [{"path": "inbox", "outbox": "outbox", "archive": "archive",
                         "errors": "errors", "settle_seconds": 0.5}],
            "web": {"listen": f"127.0.0.1:{_web_port()}", "token": token},
        }, sort_keys=False))
        config_path.chmod(0o600)
        manifest.add(config_path)
        config = load_config(config_path)
        progress = _Progress(folder, manifest)
        structlog.configure(processors=[structlog.processors.add_log_level, progress])

        print("watchfolder demo")
        print(f"  API      {sandbox.url}  (the built-in sandbox: a local stand-in that knocks "
              f"out plain backdrops; no key, no credits)")
        print(f"  folder   {folder}")
        if kept:
            shown = ", ".join(kept[:5]) + (f" and {len(kept) - 5} more" if len(kept) > 5 else "")
            print(f"  kept     {len(kept)} file(s) of yours from before: {shown} (the demo "
                  f"replaced only what it had made)")
        print(f"  config   {config_path}  (run it yourself: `watchfolder sandbox --port "
              f"{sandbox.address[1]}` in one terminal, `watchfolder run --config "
              f"{config_path}` in another)")
        daemon = Daemon(config, once=args.once)
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            if args.once:  # --once scans at start: the samples must be there first
                names = _drop_samples(folder, manifest)
                daemon.start()
                _print_web(daemon, token)
            else:
                daemon.start()
                _print_web(daemon, token)
                names = _drop_samples(folder, manifest)
            finished = progress.wait_for(names, signals, timeout=300)
            if args.once and finished:  # the user's images left in the inbox, too
                _wait_idle(daemon, signals, timeout=300)
            _summary(folder, progress, names)
            if not args.once and not signals:
                print(f"\nStill watching {folder / 'inbox'}: drop your own images in "
                      f"(plain white, grey or green backdrops work best). Ctrl-C to stop.")
                while not signals:
                    progress.wait_for(set(), signals, timeout=0.5, until_signal=True)
        finally:
            daemon.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return 0 if finished and _ended_well(progress, names) else 1


def _web_port() -> int:
    """8470 when it is free, else any free port (another daemon or demo may hold 8470)."""
    for port in (WEB_PORT, 0):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(probe.getsockname()[1])
    raise SystemExit("watchfolder demo: no free loopback port for the web view")


def _print_web(daemon: Daemon, token: str) -> None:
    if daemon.web is not None:
        # On a line of its own, starting with `web`: the address to open, logged in.
        print(f"web      {daemon.web.url}?token={token}  (open it: the live web view)",
              flush=True)


def _ended_well(progress: _Progress, names: set[str]) -> bool:
    """Each sample ended where it should, and every other file (the user's) was done."""
    with progress.lock:
        done, failed = set(progress.done), set(progress.failed)
    return (failed & names == EXPECTED_FAILURES and names - EXPECTED_FAILURES <= done
            and not failed - names)


def _wait_idle(daemon: Daemon, signals: list[int], timeout: float) -> None:
    """--once: until the daemon has nothing left (it sets `finished` when idle)."""
    deadline = time.monotonic() + timeout
    # Short waits: the signal handler only appends to `signals`, it cannot set an event.
    while not signals and time.monotonic() < deadline and not daemon.finished.wait(0.2):
        pass


def _drop_samples(folder: Path, manifest: Manifest) -> set[str]:
    """Write the samples beside the inbox, then move each in without replacing anything: a
    file of the user's under a sample's name stops the demo (after nothing was touched)."""
    inbox = folder / "inbox"
    with tempfile.TemporaryDirectory(dir=folder, prefix=".samples-") as staging:
        paths = samples.write_samples(Path(staging), studio=True)
        names = {p.name for p in paths}
        manifest.samples = names
        taken = [p.name for p in paths if os.path.lexists(inbox / p.name)
                 and not _same_content(p, inbox / p.name)]
        if taken:
            raise SystemExit(f"watchfolder demo: {inbox} holds files of yours under the names "
                             f"of the demo's samples ({', '.join(sorted(taken))}); rename or "
                             f"move them, or run the demo in another folder with --dir")
        for path in paths:
            digest = sha256_file(path)
            # Not moved: the same sample is already there (left by a demo that was killed).
            move_into(path, inbox / path.name)
            manifest.files[f"inbox/{path.name}"] = digest
        manifest.add()
    print(f"\nDropped {len(paths)} sample images into inbox/ (one is broken on purpose):")
    return names


def _same_content(a: Path, b: Path) -> bool:
    try:
        return b.is_file() and not b.is_symlink() and sha256_file(a) == sha256_file(b)
    except OSError:
        return False


def _summary(folder: Path, progress: _Progress, names: Iterable[str]) -> None:
    reports = sorted((folder / "errors").glob("*" + layout.REASON_SUFFIX))
    print(f"\n{len(progress.done)} cut-outs in   {folder / 'outbox'}")
    print(f"originals in     {folder / 'archive'}")
    for report in reports:
        print(f"error report     {report}")
    with progress.lock:
        yours_done = set(progress.done) - set(names)
        yours_failed = set(progress.failed) - set(names)
    if yours_done or yours_failed:
        print(f"your files       {len(yours_done)} done, {len(yours_failed)} failed")
    with progress.lock:
        studio = sorted(progress.studio)
    if studio:
        print(f"studio path      {', '.join(studio)}: the API got a proxy, the cut-out is "
              f"full size from the original's own pixels")
    if sys.stdout.isatty():
        print("Open the outbox PNGs in an image viewer: the backdrops are transparent.")
