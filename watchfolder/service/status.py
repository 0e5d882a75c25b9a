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
  journal's meta table the pause reasons (the account's or budget's, and a person's per inbox,
  as `pause.Pause` persists them) and the credits of the last successful request.

No status file is written by the daemon: there would be two sources of truth to keep in step.

Opening the journal never changes it (see `Journal.for_reading`).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from watchfolder.config.settings import Config
from watchfolder.coordination.coordinator import hosts_report
from watchfolder.files import layout
from watchfolder.intake.settle import signature
from watchfolder.intake.watcher import scan
from watchfolder.journal.db import DONE, FAILED, GONE, REVIEW, SENDING, Journal
from watchfolder.pipeline.budget import midnight_after
from watchfolder.pipeline.pause import held_in
from watchfolder.service.lock import daemon_running

RECENT_FAILURES = 5


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
    inboxes: dict[str, dict[str, Any]] = {}
    for inbox in config.inboxes:
        inboxes[str(inbox.path)] = _inbox_entry(str(inbox.path), configured=True)
        inboxes[str(inbox.path)]["in_errors"] = _count_reasons(inbox.errors)
    report: dict[str, Any] = {
        "running": running,
        "pid": pid,
        "state_dir": str(config.state_dir),
        "journal": None,
        "checked_at": now.isoformat(timespec="seconds"),
        "today_since": midnight.isoformat(timespec="seconds"),
        "paused": None,
        "paused_inboxes": {},
        "credits": None,
        "spent_today": 0,
        "budget": {"max_credits_per_day": config.api.max_credits_per_day,
                   "resets_at": midnight_after(now).isoformat(timespec="seconds")},
        "recent_failures": [],
    }
    known: dict[str, set[str]] = {}
    kept: dict[str, dict[str, tuple[int, int]]] = {}
    journal = Journal.for_reading(config.state_dir, live=running)
    if journal is not None:
        report["journal"] = str(journal.path)
        try:
            _read_journal(journal, report, inboxes, known, running, midnight.timestamp())
            kept = journal.kept_in_place()
            report["spent_today"] = journal.sends_since(midnight.timestamp())
        finally:
            journal.close()
    for inbox in config.inboxes:
        entry = inboxes[str(inbox.path)]
        entry["new"], entry["ignored"] = _count_new(
            inbox.path, inbox.recursive, known.get(str(inbox.path), set()),
            kept.get(str(inbox.path), {}))
    report["inboxes"] = list(inboxes.values())
    report["coordination"] = hosts_report(config)
    for name in ("waiting", "in_flight", "review", "new", "ignored", "done_today",
                 "failed_today", "gone_today", "in_errors"):
        report[name] = sum(entry[name] for entry in inboxes.values())
    return report


def _inbox_entry(path: str, *, configured: bool) -> dict[str, Any]:
    return {"path": path, "configured": configured, "waiting": 0, "in_flight": 0, "new": 0,
            "ignored": 0, "done_today": 0, "failed_today": 0, "gone_today": 0, "in_errors": 0,
            "review": 0}


def _read_journal(journal: Journal, report: dict[str, Any],
                  inboxes: dict[str, dict[str, Any]], known: dict[str, set[str]],
                  running: bool, since: float) -> None:
    for inbox, rel, state in journal.unfinished_paths():
        entry = inboxes.setdefault(inbox, _inbox_entry(inbox, configured=False))
        # Only a running daemon has requests in flight; after a stop they wait to be resent.
        # A result held for a person (`review: true`) waits for them, not for the pipeline.
        entry["review" if state == REVIEW else
              "in_flight" if running and state == SENDING else "waiting"] += 1
        known.setdefault(inbox, set()).add(rel)
    names = {DONE: "done_today", FAILED: "failed_today", GONE: "gone_today"}
    for inbox, state, count in journal.finished_since(since):
        entry = inboxes.setdefault(inbox, _inbox_entry(inbox, configured=False))
        entry[names[state]] += count
    report["recent_failures"] = [
        {"inbox": r.inbox, "file": r.rel, "reason": r.reason, "message": r.message,
         "status": r.status, "moved_to": r.error_path, "at": _iso(r.updated)}
        for r in journal.recent_failures(RECENT_FAILURES)]
    report["paused"] = journal.notes.paused()
    report["paused_inboxes"] = held_in(journal.notes.all())
    credits = journal.notes.credits()
    if credits is not None:
        report["credits"] = {"remaining": credits.remaining, "seen_at": _iso(credits.at)}


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


def _count_new(root: Path, recursive: bool, known: set[str],
               kept: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """Files in the inbox the journal has no unfinished record for (and not kept in place),
    and files ignored for their names (dot-files like macOS `._*` and `.DS_Store`, temp names),
    which pile up unseen on SMB shares."""
    count = 0
    ignored: list[str] = []
    for path in scan(root, recursive=recursive, ignored=ignored):
        rel = path.relative_to(root).as_posix()
        if rel in known:
            continue
        if rel in kept and signature(path) == kept[rel]:
            continue
        count += 1
    return count, sum(1 for path in ignored if Path(path).name != layout.CLAIMS_FOLDER)


def _count_reasons(errors: Path) -> int:
    if not errors.is_dir():
        return 0
    return sum(1 for path in errors.rglob("*" + layout.REASON_SUFFIX)
               if not path.name.startswith("."))


# -- rendering --------------------------------------------------------------------------------


def render(report: dict[str, Any], config: Path | None = None) -> str:
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
    limit = report["budget"]["max_credits_per_day"]
    lines.append(f"  {report['spent_today']} request(s) sent today" + (
        f" of a budget of {limit}, renewed at {_short_time(report['budget']['resets_at'])}"
        if limit else ""))
    shared = report.get("coordination")
    if shared:
        hosts = ", ".join(f"{h['host']} (pid {h['pid']}, {h['claims']} claims)"
                          for h in shared["hosts"]) or "none"
        state = f"unreachable: {shared['unreachable']}" if shared.get("unreachable") else \
            f"daemons sharing the key: {hosts}"
        lines.append(f"  coordination {shared['store']}: {state}")
    if report["paused"]:
        when = "" if report["running"] else " (when it stopped)"
        lines.append(f"  PAUSED{when}: {report['paused']}")
    for inbox, held in report["paused_inboxes"].items():
        lines.append(f"  PAUSED {'every inbox' if inbox == '*' else inbox}: {held}")
    lines.append("")
    for entry in report["inboxes"]:
        label = entry["path"] + ("" if entry["configured"] else " (no longer configured)")
        lines.append(f"{label}")
        lines.append(f"  {entry['waiting']} waiting, {entry['in_flight']} in flight, "
                     + (f"{entry['review']} to review, " if entry["review"] else "")
                     + f"{entry['new']} new, {entry['done_today']} done today, "
                     f"{entry['failed_today']} failed today, {entry['in_errors']} in errors")
        if entry["ignored"]:
            lines.append(f"  {entry['ignored']} ignored for their names (hidden like ._* and "
                         f".DS_Store, or temporary); never processed, safe to delete")
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
                     f"watchfolder requeue --config {config or 'FILE'} [PATH...]")
    return "\n".join(lines)


def _short_time(iso: str) -> str:
    when = datetime.fromisoformat(iso)
    now = datetime.now(when.tzinfo)
    if now - when < timedelta(hours=20) and when.date() == now.date():
        return when.strftime("%H:%M:%S")
    return when.strftime("%Y-%m-%d %H:%M")


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, ensure_ascii=False)
