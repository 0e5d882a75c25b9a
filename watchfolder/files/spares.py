"""Spare files: a spent file of ours renamed to a private name, to be written again, instead
of unlinked and its successor created anew.

On ext4 without a journal (the machine these figures are measured on), every inode freed is
skipped, one by one, by each inode allocation of the next minutes in its block group (the
kernel's `recently_deleted` check reads the freed inode's table entry each time): at a few
hundred files a second, creating the spool's answer files cost a tenth of the daemon's CPU.
A spare keeps its inode: the next answer is written into it (renamed to the answer's name
first), so no inode is allocated or freed per file.

    spares = Spares(folder)   # its spares are `.spare.<n>` there, at most `keep` of them
    spares.keep(spent)        # renamed to a spare (emptied when large); False: unlink it
    spares.let_go(spent)      # kept as a spare, else unlinked
    spares.take(dest)         # a spare renamed to `dest`, when there is one
    spares.pop()              # a spare to write into where it is (share claims), or None
    spares.drop()             # remove them all (the journal's close)
    spares.forget()           # let them go unremoved (their folder is gone)

The spool's spares are `.spare.<n>`; a claims folder's carry its daemon's private prefix
(coordination/share_claims.py), so that only this daemon's restart or sweep removes them.

A spare is nobody's data: a stop removes them, and a start that finds one (a crash) removes
it with the other orphans.
"""

from __future__ import annotations

import itertools
import os
import threading
from pathlib import Path

SPARE_PREFIX = ".spare."
KEEP = 32  # spares at most per folder: about the files in flight at once
# A spare larger than this is emptied when kept (a studio answer: tens of MB held for nothing).
EMPTY_ABOVE = 1 << 20


class Spares:
    """The spare files of one folder of ours."""

    def __init__(self, folder: Path, keep: int = KEEP, prefix: str = SPARE_PREFIX,
                 empty_above: int | None = EMPTY_ABOVE) -> None:
        self.folder = folder
        self.keep_at_most = keep
        # None: never emptied, nor even looked at (a claim: small, and on a share a stat is a
        # round trip to the server).
        self.empty_above = empty_above
        self._free: list[Path] = []
        self._names = (folder / f"{prefix}{n}" for n in itertools.count())
        self._lock = threading.Lock()

    def keep(self, spent: Path) -> bool:
        """Rename `spent` to a spare; False when enough are kept or it could not be (the
        caller unlinks it). Raises nothing."""
        with self._lock:
            if len(self._free) >= self.keep_at_most:
                return False
            spare = next(self._names)
        try:
            if self.empty_above is not None and spent.stat().st_size > self.empty_above:
                os.truncate(spent, 0)
            spent.rename(spare)
        except OSError:
            return False
        with self._lock:
            self._free.append(spare)
        return True

    def let_go(self, spent: Path) -> None:
        """A spent file of ours: kept as a spare, else removed. Raises nothing."""
        if not self.keep(spent):
            spent.unlink(missing_ok=True)

    def pop(self) -> Path | None:
        """A spare, no longer counted here (the caller writes into it where it is, or lets
        it go); None when there is none."""
        with self._lock:
            return self._free.pop() if self._free else None

    def take(self, dest: Path) -> None:
        """Rename a spare to `dest` (which is then written over), if there is one."""
        while (spare := self.pop()) is not None:
            try:
                spare.rename(dest)
            except OSError:
                continue  # removed meanwhile: the next one, or none
            return

    def forget(self) -> None:
        """Let every spare go without removing it (its folder is gone with it)."""
        with self._lock:
            self._free = []

    def drop(self) -> None:
        """Remove every spare (a stop: no spent file is left behind)."""
        with self._lock:
            free, self._free = self._free, []
        for spare in free:
            spare.unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self._free)
