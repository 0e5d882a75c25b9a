"""The original in the inbox, as the steps look at it: there, gone, away with its folder, or
unreadable for now (issue 19).

- A file not found is gone only if its inbox folder is still there: when the whole folder is
  away (a share unmounted, its permissions taken), `InboxAway` is raised and the file waits.
- A read error of the file itself (EIO, ESTALE, EACCES) is `SourceUnreadable`: retried with
  backoff (`source.unreadable`); an attempt counts only before a request was made for it, and
  after `retry.max_attempts` it fails as `unreadable`; once its answer is here it waits for
  its original (no second request, never in errors and done at once).
- A verdict on the content that a failing read can fake ("corrupt", "not an image") is
  confirmed by a second look; making an output that reads the original fails on the source,
  not on the outbox, when the outbox takes writes.
- A file finished while its original was away (done, not archived) that comes back with the
  same content is only archived (`finished_unarchived`): never sent again, never a `-1` twin.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path

import pyvips
import structlog

from watchfolder.errors import InputRejected, SourceUnreadable
from watchfolder.files import layout
from watchfolder.files.place import sha256_file
from watchfolder.imaging.inspect import inspect_source, verify_decodes
from watchfolder.journal.db import QUEUED, FileRecord
from watchfolder.pipeline.context import Context
from watchfolder.pipeline.work import Outcome, Park, Work, failing, sha_or_none

log = structlog.get_logger("watchfolder")

INBOX_RECHECK_SECONDS = 0.5  # a job of a paused inbox looks again this often
# Errors of reading a file that say the disk or the share failed, not the content.
SOURCE_ERRNOS = (errno.EIO, errno.ESTALE, errno.EACCES, errno.ENXIO, errno.ENODEV)
# Verdicts on a file's content that a failing read can fake: confirmed by a second look.
DECODE_VERDICTS = ("corrupt", "not_an_image", "unsupported_format", "empty")


class InboxAway(Exception):
    """A file was not found because its whole inbox folder is away (the driver parks it)."""


def source_stat(ctx: Context, work: Work) -> os.stat_result | None:
    """The original's lstat; None if it is gone. Raises SourceUnreadable for any other error
    (there, but it cannot be looked at now) and InboxAway when it is missing because its
    whole inbox folder is."""
    try:
        return work.src.lstat()
    except (FileNotFoundError, NotADirectoryError):
        if ctx.inbox_away(work.job.index):
            raise InboxAway(str(work.inbox.path)) from None
        return None
    except OSError as exc:
        raise SourceUnreadable(work.src, exc) from exc


def readable(work: Work) -> None:
    """Read the whole original; raises SourceUnreadable if that fails."""
    try:
        sha256_file(work.src)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise SourceUnreadable(work.src, exc) from exc


def decodes_again(work: Work, verdict: InputRejected) -> None:
    """Confirm a damaged-content verdict by a second look: a failing disk can make one decode
    fail (libvips reads garbage) and the next work. Raises SourceUnreadable when the second
    look finds the file fine."""
    if verdict.reason not in DECODE_VERDICTS:
        return
    try:
        source = inspect_source(work.src, studio=work.inbox.studio, verify=False)
        if source.route == "fast":
            verify_decodes(work.src, source)
    except (InputRejected, OSError):
        return  # the same verdict (or the disk again): it stands
    raise SourceUnreadable(work.src, OSError(errno.EIO, "a read failed: the file decoded on "
                                                        "a second look"))


def produce_from(work: Work, produce: Callable[[Path], object], temp: Path) -> object:
    """Make one output into `temp`. An I/O error reading the original (for its pixels or its
    metadata) while the outbox takes writes is SourceUnreadable, not the outbox's."""
    try:
        return produce(temp)
    except OSError as exc:
        if exc.errno in SOURCE_ERRNOS and writable(temp.parent):
            raise SourceUnreadable(work.src, exc) from exc
        raise
    except pyvips.Error as exc:
        # The original decoded before it was sent and has not changed since (or it would not
        # be read here): libvips failing on it now is the disk (an EIO on its first bytes
        # reads as "not a known file format"). It waits for a good read.
        if str(work.src) in str(exc):
            raise SourceUnreadable(work.src, OSError(errno.EIO, "libvips could not read "
                                                     "it")) from exc
        raise


def writable(folder: Path) -> bool:
    """Does `folder` take a small write right now (a probe file, removed at once)?"""
    probe = layout.temp_beside(folder / "probe")  # a temp name: a crash's is cleared at start
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"\0")
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError:
        return False
    return True


def unreadable(ctx: Context, work: Work, exc: SourceUnreadable) -> Outcome:
    """The outcome of a read error of the original: retried later; an attempt counts only
    before a request was made for it."""
    record, retry = work.record, ctx.config.retry
    log.warning("source.unreadable", **work.log_fields(), errno=exc.errno,
                code=errno.errorcode.get(exc.errno or 0, "?"), error=exc.message,
                state=record.state)
    if work.job.index in ctx.inbox_paused or ctx.inbox_away(work.job.index):
        # The whole folder is away (its permissions taken, its share gone): a pause of the
        # inbox, not this file's try. Asked now: the intake's next look may be a second off.
        return Park(INBOX_RECHECK_SECONDS)
    if record.state != QUEUED:
        return Park(ctx.queue.retry_delay(2, retry.backoff_seconds, retry.max_backoff_seconds))
    attempts = record.attempts + 1
    if attempts >= retry.max_attempts:
        return failing("unreadable", f"gave up after {attempts} attempts: {exc.message}",
                       attempts=attempts)
    return Park(ctx.queue.retry_delay(attempts, retry.backoff_seconds, retry.max_backoff_seconds),
                changes={"attempts": attempts, "reason": "unreadable", "message": exc.message})


def finished_unarchived(ctx: Context, work: Work, sha: str) -> FileRecord | None:
    """This very file (same name, content and settings) finished here before, but its
    original vanished before it could be archived (a share that went away and came back),
    and its outputs are still intact: it is only archived now."""
    if work.inbox.archive is None:
        return None  # kept in place: the intake knows those by their signature
    earlier = ctx.journal.finished_unarchived(str(work.inbox.path), work.job.rel, sha,
                                              work.inbox.settings_key)
    if earlier is None or earlier.id == work.record.id or not earlier.outputs:
        return None
    for entry in json.loads(earlier.outputs):
        if entry is None or sha_or_none(Path(entry[0])) != entry[1]:
            return None
    return earlier
