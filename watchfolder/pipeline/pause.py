"""The one pause: why sending is held, for the whole daemon or for one inbox.

Reasons, each with one owner here:
- the account (401/402/403/404 from the API) and the daily budget: the process that saw them
  pauses; one probe every `probe_every` seconds is let through; a probe's success (or, for
  the budget, midnight or a reload raising the limit) resumes;
- shared: another daemon sharing the key paused it (the coordination store's pause, which
  this object follows and feeds: `limiter.pause` on an account problem);
- by a person: `set(inbox or None, who)` holds one inbox (or every inbox) with the reason
  `paused by <who>` until `clear`; it survives a restart.

It is persisted through the journal's meta table (`paused`: the account or budget reason, for
`watchfolder status`; `paused_by`: JSON {inbox or "*": who}), read by the job queue (what may
be handed out), the limiter (through `on_change`), status and metrics (`state()`).
Time is injectable (`clock=`), as the queue's.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from watchfolder.errors import StateUnavailable

if TYPE_CHECKING:
    from watchfolder.errors import AccountError
    from watchfolder.journal.db import Journal
    from watchfolder.pipeline.budget import BudgetReached

ALL = "*"  # the key of a person's pause of every inbox


def held_in(meta: dict[str, str | None]) -> dict[str, str]:
    """{inbox or "*": "paused by <who>"} from the journal's meta (for `watchfolder status`,
    which reads the journal, not the daemon)."""
    return {inbox: f"paused by {who}" for inbox, who in
            json.loads(meta.get("paused_by") or "{}").items()}


class Pause:
    """Every reason sending is held, and the probe timing of the account pause."""

    def __init__(self, journal: Journal | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._journal = journal
        self._lock = threading.Lock()
        self._error: AccountError | BudgetReached | None = None
        self._probe_at = 0.0
        self._probe_every = 0.0
        self._resumes = 0  # how many times the account or budget pause was lifted
        self._held: dict[str, str] = {}
        self._listeners: list[Callable[[], None]] = []
        if journal is not None:
            # An account or budget pause belongs to the process that saw it; a person's
            # pause is kept until that person (or another) clears it.
            journal.notes.set_paused(None)
            self._held = {inbox: held.removeprefix("paused by ")
                          for inbox, held in held_in(journal.notes.all()).items()}

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener` (no lock held) whenever a pause is lifted or a probe made due."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    # -- the account and budget pause ---------------------------------------------------------

    @property
    def error(self) -> AccountError | BudgetReached | None:
        """Why the whole daemon is paused (account or budget), or None."""
        with self._lock:
            return self._error

    def pause(self, error: AccountError | BudgetReached, probe_in: float) -> bool:
        """Hold sending but one probe every `probe_in` s; True if newly paused."""
        with self._lock:
            newly = self._error is None
            self._error = error
            self._probe_every = probe_in
            due = self.clock() + probe_in
            # Already paused, a refusal never puts off a probe already due sooner: a request
            # sent before a reload's new key, refused after it, must not delay its probe.
            self._probe_at = due if newly else min(self._probe_at, due)
        self._note(f"{error.reason}: {error.message}")
        return newly

    def resume(self, *, kind: type[Exception] | None = None) -> bool:
        """Lift the account or budget pause (only one of `kind` if given); True if it was."""
        with self._lock:
            was = self._error is not None and (kind is None or isinstance(self._error, kind))
            if was:
                self._error = None
                self._resumes += 1
        if was:
            self._note(None)
            self._changed()
        return was

    @property
    def resumes(self) -> int:
        """How many times the pause was lifted: read before a request, it tells whether a
        refusal of that request says anything about the account as it is now."""
        with self._lock:
            return self._resumes

    def probe_now(self) -> None:
        """While paused, let the next probe go at once (after a reload with a new key)."""
        with self._lock:
            self._probe_at = self.clock()
        self._changed()

    def take_probe(self, now: float) -> bool:
        """Whether a probe may go now; if so the next one is due one interval later,
        whatever becomes of this one (a 500, a bad file, a hang): never stuck."""
        with self._lock:
            if self._probe_at > now:
                return False
            self._probe_at = now + self._probe_every
            return True

    def probe_at(self) -> float:
        with self._lock:
            return self._probe_at

    # -- a person's pause ---------------------------------------------------------------------

    def set(self, inbox: str | None, who: str) -> None:
        """Hold `inbox` (every inbox if None) with the reason `paused by <who>`, durably."""
        with self._lock:
            self._held[inbox or ALL] = who
            held = dict(self._held)
        self._save(held)

    def clear(self, inbox: str | None) -> bool:
        """Lift a person's pause of `inbox` (of every inbox if None); True if there was one."""
        with self._lock:
            was = self._held.pop(inbox or ALL, None) is not None
            held = dict(self._held)
        if was:
            self._save(held)
            self._changed()
        return was

    def held(self, inbox: str) -> str | None:
        """`paused by <who>` if a person holds this inbox (or every inbox), else None."""
        with self._lock:
            who = self._held.get(inbox) or self._held.get(ALL)
        return None if who is None else f"paused by {who}"

    def _note(self, paused: str | None) -> None:
        """For `status`: a disk that refuses the write (full, failing) only loses the note;
        the pause itself holds in memory (the pipeline's state guard reports the disk)."""
        if self._journal is not None:
            with contextlib.suppress(StateUnavailable):
                self._journal.notes.set_paused(paused)

    def _save(self, held: dict[str, str]) -> None:
        if self._journal is not None:
            self._journal.notes.set("paused_by", json.dumps(held) if held else None)

    # -- readers ------------------------------------------------------------------------------

    def state(self) -> dict[str, object]:
        """`paused`: the whole daemon's reason ("<reason>: <message>"), or None; `inboxes`:
        {inbox or "*": "paused by <who>"}."""
        with self._lock:
            error = self._error
            held = {inbox: f"paused by {who}" for inbox, who in self._held.items()}
        return {"paused": f"{error.reason}: {error.message}" if error else None,
                "inboxes": held}
