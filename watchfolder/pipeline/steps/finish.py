"""stored → done, failing → failed | gone, and the hand-off that follows either.

The hand-off (the manifest file and the done marker when the inbox asks for them, the
webhook's durable enqueue, the hooks) happens only after the journal committed the final
state, so nothing is handed on that the journal does not call final. The final commit also
journals `handoff = "pending"` when there is something to hand on; the hand-off clears it
when it is complete, and `handoffs_pending` lets the next start finish one a crash
interrupted (each part is idempotent: a sidecar of ours is replaced, the webhook is queued
once per id; a hook may run again).
"""

from __future__ import annotations

import json
import os
import stat
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import structlog

from watchfolder import __version__, failpoints
from watchfolder.config.settings import EXTENSIONS
from watchfolder.errors import SourceUnreadable
from watchfolder.files import layout
from watchfolder.files.atomic import write_atomic
from watchfolder.files.layout import REASON_SUFFIX
from watchfolder.files.place import NAME_MAX, move_into, sha256_file
from watchfolder.handoff.manifest import manifest_json
from watchfolder.journal.db import DONE, FAILED, FileRecord
from watchfolder.logs import readable
from watchfolder.pipeline import outputs
from watchfolder.pipeline.context import Context
from watchfolder.pipeline.steps.prepare import gone, unchanged_key
from watchfolder.pipeline.steps.source import source_stat
from watchfolder.pipeline.work import Advance, Outcome, Work, moved

log = structlog.get_logger("watchfolder")

PENDING = "pending"
REJECTED = "rejected"  # the reason of a result a person rejected in review


def finish(ctx: Context, work: Work) -> Outcome:
    """Move the original to the archive (or leave it in place, remembered as done)."""
    record, archive, src = work.record, work.inbox.archive, work.src
    changes: dict[str, Any] = {"handoff": PENDING if _hands_on(ctx, work, DONE) else None}
    there = source_stat(ctx, work) is not None  # unreadable or away: it waits, not gone
    if there and _replaced(ctx, work):
        log.warning("file.changed", **work.log_fields(),
                    hint="replaced while processing; the new version is processed next")
        # Done for the content that was sent; the new content under this name is new work
        # (size -1: no signature of a kept file matches it, now or after a restart).
        changes["size"] = -1
    elif archive is not None and there:
        chosen = Path(record.archive) if record.archive else None
        ctx.destinations.place(
            archive, "archive", archive / work.job.rel, chosen,
            ours=lambda name: moved(src, name),
            claim=lambda name: ctx.journal.update(record, archive=str(name)),
            put=lambda name: move_into(src, name))
        failpoints.hit("archived")
    elif archive is None:
        # Marked before the journal says done: a crash in between must not let another
        # daemon sharing the inbox send it again once the lease runs out.
        ctx.coordinator.mark_done(work.inbox.path, work.job.rel, record.size,
                                  record.mtime_ns, record.sha256 or "", record.result)
    return Advance(DONE, changes, then=lambda: hand_off(ctx, work))


def fail(ctx: Context, work: Work) -> Outcome:
    """Move the file to errors, then write its reason beside it."""
    record, inbox, src = work.record, work.inbox, work.src
    if record.proxy:
        Path(record.proxy).unlink(missing_ok=True)  # never sent, never needed again
    ctx.cutouts.forget_file(record)  # a store that raised half-way kept its cut-out
    chosen = Path(record.error_path) if record.error_path else None
    if source_stat(ctx, work) is None and (chosen is None or not os.path.lexists(chosen)):
        return gone(work, "removed from the inbox before it was moved to errors",
                    reason=record.reason, message=record.message)

    placed = ctx.destinations.place(
        inbox.errors, "errors", inbox.errors / work.job.rel, chosen,
        ours=lambda name: not os.path.lexists(src) or moved(src, name),
        claim=lambda name: ctx.journal.update(record, error_path=str(name)),
        put=lambda name: move_into(src, name), also_free=(REASON_SUFFIX,))
    failpoints.hit("error-moved")
    ctx.destinations.guard(inbox.errors, write_atomic, _reason(record, src, placed),
                           Path(f"{placed}{REASON_SUFFIX}"))
    failpoints.hit("reason-written")
    spool = Path(record.spool) if record.spool else None
    if record.reason == REJECTED and spool is not None and spool.is_file():
        # The cut-out a person rejected in review, beside its original, for retouching by hand.
        first = inbox.outputs[0] if inbox.outputs else None
        fmt = first.format if first else inbox.output_format
        ctx.destinations.guard(inbox.errors, write_atomic, outputs.rejected_cutout(spool, fmt),
                               placed.with_name(f"{placed.stem}.rejected.{EXTENSIONS[fmt]}"))

    def then() -> None:
        if spool is not None:
            spool.unlink(missing_ok=True)  # forgotten with the final commit
        hand_off(ctx, work)

    return Advance(FAILED, {"handoff": PENDING if _hands_on(ctx, work, FAILED) else None,
                            "spool": None}, then=then)


def _hands_on(ctx: Context, work: Work, state: str) -> bool:
    wanted = state == DONE and (work.inbox.manifest or work.inbox.done_marker)
    return bool(wanted) or ctx.handoff is not None


def hand_off(ctx: Context, work: Work) -> None:
    """Tell the next tool about a final (done or failed) file, once: the manifest file and
    the done marker (done files, when the inbox asks for them), the webhook (queued
    durably), the hooks; then journal that it is handed on."""
    record, inbox, handoff = work.record, work.inbox, ctx.handoff
    if record.handoff is None:
        return
    event = "done" if record.state == DONE else "failed"
    source = work.job.source
    upright = source.upright if source is not None and \
        work.job.source_of == (record.size, record.mtime_ns) else None
    manifest = outputs.manifest_for(record, work.src, event, work.job.outputs, upright)
    body = manifest_json(manifest)
    owner = manifest["id"].encode()
    manifest_path = None
    if event == "done" and inbox.manifest:
        sidecar = outputs.sidecar(record, inbox, work.job.rel, layout.MANIFEST_SUFFIX)
        manifest_path = ctx.destinations.replace_own(inbox.outbox, sidecar, body, owner)
    if event == "done" and inbox.done_marker:
        ctx.destinations.replace_own(
            inbox.outbox, outputs.sidecar(record, inbox, work.job.rel, layout.DONE_SUFFIX),
            owner + b"\n", owner)
        failpoints.hit("marked")
    if handoff is not None:
        handoff.announce(manifest["id"], body)
        handoff.run_hooks(manifest, manifest_path, body)
    ctx.journal.update(record, handoff=None)


def _replaced(ctx: Context, work: Work) -> bool:
    """The file at the source's path is not the content that was sent (by size and mtime,
    then by hash: some tools replace a file keeping both; not hashed again when this run
    read it and its inode, size, mtime and ctime are unchanged since). A read error is not
    a change: SourceUnreadable, looked at again later."""
    record = work.record
    st = source_stat(ctx, work)
    if st is None:
        return False
    if (st.st_size, st.st_mtime_ns) != (record.size, record.mtime_ns):
        return True
    if not stat.S_ISREG(st.st_mode):
        return False
    if work.job.read_as is not None and work.job.read_as == unchanged_key(st):
        return False  # a rewrite in place moves the ctime, a replacement the inode
    try:
        return sha256_file(work.src) != record.sha256
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise SourceUnreadable(work.src, exc) from exc


def _reason(record: FileRecord, src: Path, placed: Path) -> bytes:
    """The `.error.json` beside a failed file: why, and where it came from."""
    report: dict[str, Any] = {
        "reason": record.reason,
        "message": record.message and readable(record.message),
        "status": record.status,
        "attempts": record.attempts,
        "source": readable(str(src)),
        "failed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inbox": readable(record.inbox),
        "file": readable(record.rel),
        "sha256": record.sha256,
        "watchfolder": __version__,
    }
    raw = os.fsencode(record.rel)
    if readable(record.rel) != record.rel:
        report["file_bytes"] = raw.hex()  # the exact name, for requeue
    if placed.name != src.name and len(os.fsencode(src.name + REASON_SUFFIX)) > NAME_MAX:
        report["renamed"] = (f"the name is too long for the errors folder with "
                             f"'{REASON_SUFFIX}' after it: shortened to {readable(placed.name)}")
    return (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode()
