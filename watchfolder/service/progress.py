"""A live progress line for `run --once` on a terminal (tqdm), and nothing when not on one.

The line shows files done (with the failed among them) of those found so far, how many are in
flight, whether sending waits on the rate limit, and tqdm's estimate of the time left. Log lines
still appear: they are written above the live line instead of through it.
"""

from __future__ import annotations

import shutil
from typing import Any, TextIO

from tqdm import tqdm


class ProgressLine:
    def __init__(self, stream: TextIO) -> None:
        # A terminal that reports no size (0x0, some ptys) still gets a full line.
        size = shutil.get_terminal_size((100, 24))
        self._bar = tqdm(total=0, file=stream, unit="file", ncols=size.columns,
                         nrows=size.lines, leave=True,
                         bar_format="{desc} {n_fmt}/{total_fmt} done |{bar:20}| "
                                    "{elapsed}<{remaining}{postfix}")
        self._bar.set_description_str("watchfolder")

    def update(self, snapshot: dict[str, Any]) -> None:
        finished = int(snapshot.get("done", 0)) + int(snapshot.get("failed", 0))
        pending = int(snapshot.get("pending", 0))
        # Found so far: finished plus still waiting (one instant of both, `Tally.counts`). A
        # file that vanishes before it is sent leaves the total.
        self._bar.total = finished + pending
        self._bar.n = finished
        parts = [f"{snapshot.get('in_flight', 0)} in flight"]
        if snapshot.get("failed"):
            parts.append(f"{snapshot['failed']} failed")
        wait = float(snapshot.get("rate_wait_s") or 0.0)
        if wait > 0:
            parts.append(f"rate limit: next in {wait:.0f}s")
        if snapshot.get("paused"):
            parts.append("PAUSED")
        self._bar.set_postfix_str(", ".join(parts), refresh=False)
        self._bar.refresh()

    def stream(self) -> TextIO:
        """A text stream for the logs that writes above the live line."""
        return _Above(self._bar)  # type: ignore[return-value]  # the part of TextIO logs use

    def close(self) -> None:
        self._bar.close()


class _Above:
    """Just enough of a TextIO for structlog's PrintLogger and logging's StreamHandler."""

    def __init__(self, bar: tqdm[Any]) -> None:
        self._bar = bar

    def write(self, text: str) -> int:
        if text.strip():
            self._bar.write(text.rstrip("\n"), file=self._bar.fp)
        return len(text)

    def flush(self) -> None:
        """Lines are written whole."""

    def isatty(self) -> bool:
        return True
