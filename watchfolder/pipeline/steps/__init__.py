"""The steps of a file's life, one per journal state, by concern. Each takes the `Context`
and the `Work` item and returns an `Advance` or a `Park` (work.py); none picks its lane (the
driver's table does) or touches the queue.

- `prepare`: queued → sending | proxied | fetched (reused) | done | failing | gone
- `admit`: proxied → sending, and the admission every request passes
- `send`: sending → fetched | failing (or back to proxied / queued)
- `store`: fetched → stored
- `finish`: stored → done, failing → failed | gone, and the hand-off after either
- `source`: the original as the steps look at it: gone, away with its inbox folder, or
  unreadable for now (retried), and a file finished while its share was away
"""

from __future__ import annotations

from collections.abc import Callable

from watchfolder.journal.db import FAILING, FETCHED, PROXIED, QUEUED, SENDING, STORED
from watchfolder.pipeline.context import Context
from watchfolder.pipeline.steps.admit import admit_proxy
from watchfolder.pipeline.steps.finish import fail, finish
from watchfolder.pipeline.steps.prepare import prepare
from watchfolder.pipeline.steps.send import send
from watchfolder.pipeline.steps.store import store
from watchfolder.pipeline.work import Outcome, Work

Step = Callable[[Context, Work], Outcome]

STEPS: dict[str, Step] = {QUEUED: prepare, PROXIED: admit_proxy, SENDING: send,
                          FETCHED: store, STORED: finish, FAILING: fail}
