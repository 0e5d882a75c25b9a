"""What the daemon is doing, as seen from outside: `watchfolder status` and the STATUS= line.

Everything comes from the journal (`state_dir/journal.sqlite3`), read-only, plus a look at
the folders, so the same command answers while the daemon runs and after it stopped:

- running or not: the daemon holds an exclusive `flock` on `state_dir/daemon.lock` for its
  whole life (which also keeps a second daemon off the same journal); the kernel drops it
  when the process dies, so a crash never leaves a stale "running";
- waiting / in flight: unfinished journal records (a request is in flight while its record
  is `sending` and the daemon runs);
- new: files in the inboxes the journal does not know yet (settling, or dropped while the
  daemon was stopped); done today / failed today: finished records since local midnight;
- the last failures with their reasons, files sitting in the errors folders, and from the
  journal's meta table the pause reason and the credits of the last successful request.

No status file is written by the daemon: there would be two sources of truth to keep in step.

Opening the journal must never change it. While it is live (the `-wal` file exists) it is
opened `mode=ro`; after a clean stop it is opened `immutable=1`, because a read-only open of a
WAL database would create `-wal`/`-shm` files owned by whoever runs `status` (root, say), which
the daemon's own user could then not write.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sqlite3
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from watchfolder.config import Config, load_config, parse_config
from watchfolder.errors import ConfigError
from watchfolder.journal import DONE, FAILED, FINAL, GONE, SENDING
from watchfolder.watcher import scan

LOCK_NAME = "daemon.lock"
JOURNAL_NAME = "journal.sqlite3"
RECENT_FAILURES = 5


# -- the daemon's lock ----------------------------------------------------------------------------


class DaemonLock:
    """Held by a running daemon: one daemon per state_dir, and "running" for `status`."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path

    @classmethod
    def acquire(cls, state_dir: Path) -> DaemonLock:
        """Take the lock or raise ConfigError naming the daemon that holds it."""
        path = state_dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            pid = _read_pid(path)
            raise ConfigError([f"state_dir: another watchfolder daemon (pid {pid or '?'}) is "
                               f"using {state_dir}; stop it first, or give this one its own "
                               f"state_dir"]) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return cls(fd, path)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def daemon_running(state_dir: Path) -> tuple[bool, int | None]:
    """(running, pid) by trying the daemon's lock, without creating anything."""
    path = state_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False, None
    except PermissionError:
        raise ConfigError([f"state_dir: {state_dir} is not readable by this user (run status "
                           f"as root, as the daemon's user or as a member of its group)"]) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        return True, _read_pid(path)
    finally:
        os.close(fd)  # also drops our shared lock at once
    return False, None


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


# -- configuration for the tools ------------------------------------------------------------------


def load_config_without_key(path: Path) -> Config:
    """The configuration as `status` and `requeue` need it: all of it but the API key.

    They never use the key, and the staff who run them usually cannot read it (it lives in a
    systemd credential) or do not have `${CLIPDROP_API_KEY}` set.
    """
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return load_config(path, require_key=False)  # raises with the usual explanation
    if isinstance(raw, dict) and isinstance(raw.get("api"), dict):
        raw = {**raw, "api": {k: v for k, v in raw["api"].items()
                              if k not in ("key", "key_file")}}
    return parse_config(raw, base_dir=path.resolve().parent, source=path, require_key=False)


# -- the one-line summary (systemd STATUS=) ------------------------------------------------------


def summary(snapshot: dict[str, Any]) -> str:
    """`3 waiting, 1 in flight, 40 done, 2 failed, 57 credits; PAUSED no_credits: ...`."""
    if not snapshot:
        return "starting"
    credits = snapshot.get("credits")
    text = (f"{snapshot.get('waiting', 0)} waiting, {snapshot.get('in_flight', 0)} in flight, "
            f"{snapshot.get('done', 0)} done, {snapshot.get('failed', 0)} failed, "
            f"{'? ' if credits is None else f'{credits} '}credits")
    paused = snapshot.get("paused")
    if paused:
        text += f"; PAUSED {_clip(str(paused), 120)}"
    return text


def _clip(text: str, length: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= length else text[:length - 1] + "…"


# -- the report -----------------------------------------------------------------------------------


def collect(config: Config, *, now: datetime | None = None) -> dict[str, Any]:
    """Everything `watchfolder status` shows, as plain data (what `--json` prints)."""
    now = (now or datetime.now()).astimezone()
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    running, pid = daemon_running(config.state_dir)
    journal_path = config.state_dir / JOURNAL_NAME
    inboxes: dict[str, dict[str, Any]] = {}
    for inbox in config.inboxes:
        inboxes[str(inbox.path)] = _inbox_entry(str(inbox.path), configured=True)
        inboxes[str(inbox.path)]["in_errors"] = _count_reasons(inbox.errors)
    report: dict[str, Any] = {
        "running": running,
        "pid": pid,
        "state_dir": str(config.state_dir),
        "journal": str(journal_path) if journal_path.exists() else None,
        "checked_at": now.isoformat(timespec="seconds"),
        "today_since": midnight.isoformat(timespec="seconds"),
        "paused": None,
        "credits": None,
        "recent_failures": [],
    }
    known: dict[str, set[str]] = {}
    kept: dict[str, dict[str, tuple[int, int]]] = {}
    if report["journal"] is not None:
        with contextlib.closing(_open_journal(journal_path, running)) as db:
            _read_journal(db, report, inboxes, known, kept, running, midnight.timestamp())
    for inbox in config.inboxes:
        entry = inboxes[str(inbox.path)]
        entry["new"] = _count_new(inbox.path, inbox.recursive, known.get(str(inbox.path), set()),
                                  kept.get(str(inbox.path), {}))
    report["inboxes"] = list(inboxes.values())
    for name in ("waiting", "in_flight", "new", "done_today", "failed_today", "gone_today",
                 "in_errors"):
        report[name] = sum(entry[name] for entry in inboxes.values())
    return report


def _inbox_entry(path: str, *, configured: bool) -> dict[str, Any]:
    return {"path": path, "configured": configured, "waiting": 0, "in_flight": 0, "new": 0,
            "done_today": 0, "failed_today": 0, "gone_today": 0, "in_errors": 0}


def _open_journal(path: Path, running: bool) -> sqlite3.Connection:
    live = running or Path(f"{path}-wal").exists()
    mode = "mode=ro" if live else "immutable=1"
    try:
        return sqlite3.connect(f"{path.as_uri()}?{mode}", uri=True, timeout=5)
    except sqlite3.Error as exc:
        raise ConfigError([f"state_dir: cannot read the journal {path}: {exc} (run status as "
                           f"the daemon's user or a member of its group)"]) from None


def _read_journal(db: sqlite3.Connection, report: dict[str, Any],
                  inboxes: dict[str, dict[str, Any]], known: dict[str, set[str]],
                  kept: dict[str, dict[str, tuple[int, int]]], running: bool,
                  since: float) -> None:
    marks = ", ".join("?" for _ in FINAL)
    try:
        for inbox, rel, state in db.execute(
                f"SELECT inbox, rel, state FROM files WHERE state NOT IN ({marks})",  # noqa: S608
                FINAL):
            entry = inboxes.setdefault(inbox, _inbox_entry(inbox, configured=False))
            # Only a running daemon has requests in flight; after a stop they wait to be resent.
            entry["in_flight" if running and state == SENDING else "waiting"] += 1
            known.setdefault(inbox, set()).add(rel)
        names = {DONE: "done_today", FAILED: "failed_today", GONE: "gone_today"}
        for inbox, state, count in db.execute(
                f"SELECT inbox, state, COUNT(*) FROM files WHERE state IN ({marks}) "  # noqa: S608
                "AND updated >= ? GROUP BY inbox, state", (*FINAL, since)):
            entry = inboxes.setdefault(inbox, _inbox_entry(inbox, configured=False))
            entry[names[state]] += count
        for inbox, rel, size, mtime_ns in db.execute(
                "SELECT inbox, rel, size, mtime_ns FROM files WHERE state = ? "
                "AND archive IS NULL", (DONE,)):
            kept.setdefault(inbox, {})[rel] = (size, mtime_ns)
        report["recent_failures"] = [
            {"inbox": inbox, "file": rel, "reason": reason, "message": message,
             "status": status, "moved_to": error_path, "at": _iso(updated)}
            for inbox, rel, reason, message, status, error_path, updated in db.execute(
                "SELECT inbox, rel, reason, message, status, error_path, updated FROM files "
                "WHERE state = ? ORDER BY updated DESC LIMIT ?", (FAILED, RECENT_FAILURES))]
        meta = dict(db.execute("SELECT k, v FROM meta").fetchall())
    except sqlite3.Error as exc:
        raise ConfigError([f"state_dir: cannot read the journal: {exc}"]) from None
    report["paused"] = meta.get("paused") or None
    with contextlib.suppress(TypeError, ValueError, KeyError):
        credits = json.loads(meta.get("credits") or "null")
        report["credits"] = {"remaining": int(credits["remaining"]),
                             "seen_at": _iso(float(credits["at"]))}


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


def _count_new(root: Path, recursive: bool, known: set[str],
               kept: dict[str, tuple[int, int]]) -> int:
    """Files in the inbox the journal has no unfinished record for (and not kept in place)."""
    count = 0
    for path in scan(root, recursive=recursive):
        rel = path.relative_to(root).as_posix()
        if rel in known:
            continue
        if rel in kept:
            with contextlib.suppress(OSError):
                st = path.lstat()
                if (st.st_size, st.st_mtime_ns) == kept[rel]:
                    continue
        count += 1
    return count


def _count_reasons(errors: Path) -> int:
    if not errors.is_dir():
        return 0
    return sum(1 for path in errors.rglob("*.error.json") if not path.name.startswith("."))


# -- rendering --------------------------------------------------------------------------------


def render(report: dict[str, Any]) -> str:
    """The report for people: a headline, then per inbox, then the last failures."""
    lines = []
    if report["running"]:
        lines.append(f"watchfolder is running (pid {report['pid'] or '?'}); "
                     f"state {report['state_dir']}")
    elif report["journal"] is None:
        lines.append(f"watchfolder is not running and has never run with state "
                     f"{report['state_dir']}")
    else:
        lines.append(f"watchfolder is not running; state {report['state_dir']}")
    credits = report["credits"]
    credit_text = (f"{credits['remaining']} credits (seen {_short_time(credits['seen_at'])})"
                   if credits else "credits unknown")
    lines.append(f"  {report['waiting']} waiting, {report['in_flight']} in flight, "
                 f"{report['new']} new in the inboxes; today {report['done_today']} done, "
                 f"{report['failed_today']} failed; {credit_text}")
    if report["paused"]:
        when = "" if report["running"] else " (when it stopped)"
        lines.append(f"  PAUSED{when}: {report['paused']}")
    lines.append("")
    for entry in report["inboxes"]:
        label = entry["path"] + ("" if entry["configured"] else " (no longer configured)")
        lines.append(f"{label}")
        lines.append(f"  {entry['waiting']} waiting, {entry['in_flight']} in flight, "
                     f"{entry['new']} new, {entry['done_today']} done today, "
                     f"{entry['failed_today']} failed today, {entry['in_errors']} in errors")
    if report["recent_failures"]:
        lines.append("")
        lines.append("last failures:")
        for failure in report["recent_failures"]:
            status = f" (HTTP {failure['status']})" if failure["status"] else ""
            lines.append(f"  {_short_time(failure['at'])}  {failure['file']}: "
                         f"{failure['reason']}{status}: {_clip(failure['message'] or '', 160)}")
    if report["in_errors"]:
        lines.append("")
        lines.append(f"{report['in_errors']} file(s) in errors; once the cause is fixed: "
                     f"watchfolder requeue --config FILE [PATH...]")
    return "\n".join(lines)


def _short_time(iso: str) -> str:
    when = datetime.fromisoformat(iso)
    now = datetime.now(when.tzinfo)
    if now - when < timedelta(hours=20) and when.date() == now.date():
        return when.strftime("%H:%M:%S")
    return when.strftime("%Y-%m-%d %H:%M")


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, ensure_ascii=False)
