"""queued → sending | proxied | fetched (reused) | done (elsewhere) | failing | gone.

`prepare` checks the file and learns its route from its header (kept on the job: a file is
inspected once per run); a route the journal did not know yet is journaled first, so the
driver can move the file to the lane the route needs (a studio file's proxy is local work).
Then an earlier identical result is reused, an identical file in flight is waited for, or
what will be sent is made: the original's bytes (fast path), or a proxy (studio path).
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any

import structlog

from watchfolder.errors import InputRejected, SourceUnreadable
from watchfolder.files import layout
from watchfolder.files.place import sha256_file
from watchfolder.imaging.compose import make_proxy
from watchfolder.imaging.inspect import inspect_source, verify_decodes
from watchfolder.journal.db import (
    DONE,
    FETCHED,
    GONE,
    PROXIED,
    QUEUED,
    STORED,
    encode_reused,
    output_identity,
)
from watchfolder.pipeline.context import Context
from watchfolder.pipeline.steps.admit import admit
from watchfolder.pipeline.steps.source import (
    decodes_again,
    finished_unarchived,
    readable,
    source_stat,
)
from watchfolder.pipeline.work import (
    Advance,
    Outcome,
    Park,
    Payload,
    Work,
    failing,
    sha_or_none,
)

log = structlog.get_logger("watchfolder")


def prepare(ctx: Context, work: Work) -> Outcome:
    """Check the file; reuse an earlier answer, or make what will be sent."""
    if ctx.stopping.is_set():
        return Park()
    if not _inside(work.inbox.path, work.src.parent):
        # Reached through a linked folder: it lives outside the inbox; never touch it.
        log.warning("file.outside_inbox", **work.log_fields())
        return Advance(GONE)
    record, inbox, src, job = work.record, work.inbox, work.src, work.job
    try:
        st = _check_file(ctx, work)
        if st is None:
            return gone(work, "removed from the inbox before it was processed")
        if job.source is None or job.source_of != (st.st_size, st.st_mtime_ns):
            job.source = inspect_source(src, studio=inbox.studio, verify=False)
            job.source_of = (st.st_size, st.st_mtime_ns)
        source = job.source
        if source.route != (record.route or "fast"):
            return Advance(QUEUED, {"route": source.route})  # the driver picks the lane
        if source.route == "fast":
            # One read: the bytes checked are the bytes hashed and sent.
            data = _read(work)
            verify_decodes(src, source, data)
            sha = hashlib.sha256(data).hexdigest()
        else:
            sha = sha256_file(src)
    except InputRejected as exc:
        now = source_stat(ctx, work)
        if now is None:  # it failed to decode because it vanished
            return gone(work, "removed from the inbox before it was processed")
        if stat.S_ISREG(now.st_mode):
            readable(work)  # a read error (EIO) is the disk's fault, not the content's
            decodes_again(work, exc)
        return failing(exc.reason, exc.message)
    except FileNotFoundError:
        source_stat(ctx, work)  # raises InboxAway when its whole folder is away
        return gone(work, "removed from the inbox before it was processed")
    except OSError as exc:
        raise SourceUnreadable(src, exc) from exc
    seen = {"sha256": sha, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "route": source.route}
    job.read_as = unchanged_key(st)
    identity = job.identity = f"{sha}|{inbox.settings_key}"
    finished = finished_unarchived(ctx, work, sha)
    if finished is not None:
        log.info("file.back", **work.log_fields(), result=finished.result,
                 hint="finished before its original vanished (a share that went away): "
                      "archived now, not sent again")
        return Advance(STORED, {**seen, "result": finished.result,
                                "result_sha": finished.result_sha,
                                "outputs": finished.outputs, "credits": finished.credits})
    if inbox.archive is None and ctx.coordinator.done_elsewhere(
            inbox.path, job.rel, st.st_size, st.st_mtime_ns, sha):
        return Advance(DONE, seen)  # finished in place by another daemon: kept, not resent
    earlier = _earlier_results(ctx, [identity, f"{sha}|{inbox.legacy_settings_key}"],
                               len(inbox.outputs) or 1)
    if earlier is not None:
        return Advance(FETCHED, {**seen, "reuse_from": encode_reused(earlier), "spool": None})
    if not ctx.twins.claim(identity, job):
        return Park(twin=True, changes=seen)
    if source.route == "fast":
        width, height = source.width, source.height
        return admit(ctx, work, Payload(data, source.mime, width, height), seen,
                     need=width * height * 4)
    proxy = ctx.journal.spool_dir / layout.proxy_name(record.id)
    try:
        made = make_proxy(src, source, proxy)
    except InputRejected as exc:
        return failing(exc.reason, exc.message)
    log.info("file.proxy", **work.log_fields(), why=source.reason,
             original=f"{source.upright[0]}x{source.upright[1]}",
             proxy=f"{made.width}x{made.height}", bytes=made.size)
    return Advance(PROXIED, {**seen, "proxy": str(proxy)})


def unchanged_key(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """What must stay the same for a file to hold the bytes read earlier in this run."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def gone(work: Work, hint: str, **facts: Any) -> Advance:
    log.warning("file.gone", **work.log_fields(), hint=hint, **facts)
    return Advance(GONE)


def _check_file(ctx: Context, work: Work) -> os.stat_result | None:
    """The file's stat if it is a regular file of ours; None if it is gone."""
    st = source_stat(ctx, work)
    if st is None:
        return None
    if stat.S_ISLNK(st.st_mode):
        raise InputRejected("symlink", "the file is a symbolic link; watchfolder never "
                            "follows links out of the inbox. Put the file itself in the "
                            "inbox.")
    if not stat.S_ISREG(st.st_mode):
        raise InputRejected("not_a_file", "not a regular file (a device, socket or pipe); "
                            "only image files can be processed")
    return st


def _read(work: Work) -> bytes:
    """The file's bytes (a fast-path file: at most 30 MB), read without following links."""
    try:
        fd = os.open(work.src, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise SourceUnreadable(work.src, exc) from exc


def _earlier_results(ctx: Context, identities: list[str], count: int) -> list[str] | None:
    """The outputs made earlier for the same content and settings, if all are intact
    (under the result key of today, or the one an older version journaled)."""
    for identity in identities:
        found = []
        for index in range(count):
            entry = ctx.journal.find_result(output_identity(identity, index))
            if entry is None or sha_or_none(Path(entry[0])) != entry[1]:
                break
            found.append(entry[0])
        else:
            return found
    return None


def _inside(root: Path, folder: Path) -> bool:
    if folder == root:
        return True  # the inbox itself (a link to it or not): no lstat of every component
    real_root = os.path.realpath(root)
    real = os.path.realpath(folder)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)
