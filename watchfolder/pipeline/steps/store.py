"""fetched → stored: every output of the recipe made from the one answer (spooled, or earlier
identical results) and placed in its outbox, each journaled as it is placed, so after a crash
only the missing ones are made, none twice; when the full-size cut-out is held in memory,
the outputs that read it (every output of the recipe, small ones included) are made two at
a time once the others are placed (`encode_together`: the first reader computes the
cut-out while the next waits for it). The outputs written are kept on the job for the
manifest (nothing is read again).

An answer's complete decode is checked here first (send checked all but that, so the slot's
next request does not wait for it); a studio answer's one decode is both that check and the
composite's alpha. One that does not decode is refused as send refuses a bad answer (an
attempt counted) and asked for again (back to `queued`).

No output is placed (nor the original archived) before the answer's `fetched` is on disk:
send's commit of it is only written to the WAL, and the slot's next request has mostly
fsynced it by then with its own `sending` (`Journal.update`'s `owed`)."""

from __future__ import annotations

import dataclasses
import threading
from functools import partial
from pathlib import Path

import structlog

from watchfolder import failpoints
from watchfolder.errors import BadResult, InputRejected
from watchfolder.imaging.answers import answer_decodes
from watchfolder.imaging.compose import Output, answer_mask
from watchfolder.journal.db import (
    FETCHED,
    QUEUED,
    REVIEW,
    STORED,
    encode_outputs,
    output_identity,
)
from watchfolder.pipeline import outputs
from watchfolder.pipeline.context import Context
from watchfolder.pipeline.steps.source import produce_from, source_stat
from watchfolder.pipeline.work import (
    Advance,
    Outcome,
    Park,
    Work,
    failing,
    sha_or_none,
)

log = structlog.get_logger("watchfolder")


def store(ctx: Context, work: Work) -> Outcome:
    """Make and place every output not placed yet; forget the spool with the last one. An
    inbox with `review: true` holds a fresh answer for a person first (steps/review.py)."""
    record, inbox, job = work.record, work.inbox, work.job
    if record.spool and Path(record.spool).is_file() and \
            (record.route == "studio" or record.state == FETCHED):
        try:
            # The answer's complete decode: its check (send checked all but that); a studio
            # answer's is kept in memory for the composite's alpha. Before review, so nobody
            # judges a corrupt answer; before any output, so none is made of one.
            if record.route == "studio":
                answer_mask(Path(record.spool))
            else:
                answer_decodes(Path(record.spool))
        except BadResult as exc:
            return _ask_again(ctx, work, exc)
    if record.state == FETCHED and inbox.review:
        # One request, as always; nothing placed, archived or handed on until a person
        # approves (APPROVED comes back here) or rejects (FAILING).
        log.info("file.review", **work.log_fields(), route=record.route)
        return Advance(REVIEW)
    earlier = record.reused()
    answer = Path(record.spool or (earlier[0] if earlier else ""))
    count = len(inbox.outputs) or 1
    placed: list[tuple[str, str] | None] = record.placed() or [None] * count
    done = [entry is not None and sha_or_none(Path(entry[0])) == entry[1] for entry in placed]
    if not all(done) and not (answer.is_file() and all(Path(r).is_file() for r in earlier)):
        # The spool or the reused results vanished (cleaned up by hand): ask again.
        return Advance(QUEUED, {"spool": None, "reuse_from": None, "outputs": None})
    made: list[Output | None] = job.outputs or [None] * count
    job.outputs = made
    claiming = threading.Lock()  # outputs encoded at once journal the list one at a time

    def place_one(index: int, maker: outputs.Maker) -> Outcome | None:
        """Make and place output `index`; a failing outcome when it cannot be made."""
        entry = placed[index]
        wrote: list[object] = []

        def claim(name: Path, digest: str) -> None:
            # Once an output is placed a power cut must not undo the answer's `fetched`; by
            # now the slot's next request has mostly fsynced it with its own `sending`.
            ctx.journal.commits.settle_owed(record.id)
            with claiming:
                placed[index] = (str(name), digest)
                first = placed[0]
                ctx.journal.update(record, outputs=encode_outputs(placed),
                                   result=first[0] if first else None,
                                   result_sha=first[1] if first else None)

        def ours(name: Path) -> bool:
            return entry is not None and sha_or_none(name) == entry[1]

        def produce(dest: Path) -> object:
            made = produce_from(work, maker.produce, dest)
            wrote.append(made)
            return made  # a Written carries its hash: place_new need not read it back

        try:
            path, sha = ctx.destinations.place_new(
                maker.root, "outbox", maker.target, Path(entry[0]) if entry else None,
                produce=produce, claim=claim, ours=ours, need=maker.need,
                adopt_identical=not earlier)
        except InputRejected as exc:  # the original no longer decodes, or too large
            return failing(exc.reason, exc.message)
        with claiming:
            placed[index] = (str(path), sha)
        if wrote and isinstance(wrote[-1], Output):
            made[index] = dataclasses.replace(wrote[-1], path=path)
        failpoints.hit("result-placed")
        return None

    together: list[tuple[int, outputs.Maker]] = []
    for index in range(count):
        if done[index]:
            continue  # placed before a crash
        unchanged = _unchanged(ctx, work)
        if not unchanged and not earlier:
            log.warning("file.changed", **work.log_fields(),
                        hint="the original changed or vanished after it was sent: the "
                             "result is the API's answer as it is")
        source = job.source if job.source_of == (record.size, record.mtime_ns) else None
        maker = outputs.maker(record, inbox, job.rel, answer, index, earlier,
                              unchanged=unchanged, source=source, cutouts=ctx.cutouts)
        if maker.together:
            together.append((index, maker))  # after the others, two at a time
            continue
        failed = place_one(index, maker)
        if failed is not None:
            ctx.cutouts.forget_file(record)
            return failed
    failed = next((outcome for outcome in outputs.encode_together(
        [partial(place_one, index, maker) for index, maker in together]) if outcome), None)
    if failed is not None:
        ctx.cutouts.forget_file(record)
        return failed
    # Every output may have been placed before a crash: still before the original is archived.
    ctx.journal.commits.settle_owed(record.id)
    spool = Path(record.spool) if record.spool else None
    identity = f"{record.sha256}|{record.settings}"
    ctx.cutouts.forget_file(record)  # its last reader removed it, unless placed earlier
    # Forget the spool in the same commit: a crash before the unlink leaves an orphan that
    # the next start removes, never a reference that keeps it forever. Let go once a fsync
    # covers `stored` (the next request's, say): a power cut that undid it finds the answer.
    # Let go means kept as a spare (renamed, written over by a later answer), else unlinked.
    return Advance(STORED, {"spool": None},
                   remember=[(output_identity(identity, index), entry[0], entry[1])
                             for index, entry in enumerate(placed) if entry],
                   then=None if spool is None else lambda: ctx.journal.commits.when_durable(
                       lambda: ctx.journal.spool_spares.let_go(spool)))


def _ask_again(ctx: Context, work: Work, exc: BadResult) -> Outcome:
    """An answer that does not decode: refused as send refuses one on arrival (the same
    BadResult, an attempt counted, after `retry.max_attempts` the file fails), then asked for
    again (a studio file from a new proxy: the one sent was removed with the answer's
    arrival)."""
    record, retry = work.record, ctx.config.retry
    attempts = record.attempts  # this request was counted when its answer was spooled
    if attempts >= retry.max_attempts:
        return failing(exc.reason, f"gave up after {attempts} attempts: {exc.message}",
                       exc.status, attempts=attempts)  # fail() removes the spooled answer
    delay = ctx.queue.retry_delay(attempts, retry.backoff_seconds, retry.max_backoff_seconds)
    log.info("file.retry", **work.log_fields(), reason=exc.reason, status=exc.status,
             attempt=attempts, retry_in_s=round(delay, 2), message=exc.message)
    # Removed before it is forgotten: a crash in between finds the spool gone, and store
    # asks again all the same.
    Path(record.spool or "").unlink(missing_ok=True)
    return Park(delay, changes={"state": QUEUED, "spool": None, "reason": exc.reason,
                                "message": exc.message, "status": exc.status})


def _unchanged(ctx: Context, work: Work) -> bool:
    """The original is still the file that was sent (by size and mtime). Raises
    SourceUnreadable when it cannot be looked at (that is not a change), InboxAway when its
    folder is away."""
    st = source_stat(ctx, work)
    if st is None:
        return False
    return (st.st_size, st.st_mtime_ns) == (work.record.size, work.record.mtime_ns)
