"""review: a result held for a person (`inboxes[].review: true`).

`store` sends a file of such an inbox here instead of placing its outputs: the answer stays in
the spool (one request, as always) and nothing is placed, archived or handed on. The job is
held by no queue and no worker; the daemon's `review` (the web view's Approve / Reject)
journals `approved` (store goes on as for `fetched`) or `failing` with reason `rejected`
(finish's `fail` puts the cut-out beside the original) and submits the file again. A restart
resumes it here, with no second request.
"""

from __future__ import annotations

from watchfolder.pipeline.context import Context
from watchfolder.pipeline.work import Outcome, Park, Work


def await_review(ctx: Context, work: Work) -> Outcome:
    """Wait for a person: held, not queued."""
    return Park(held=True)
