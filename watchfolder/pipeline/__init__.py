"""The pipeline: each file's life from queued to done or failed, and what it needs.

- `driver`: the worker pool, the loop that runs a file's steps (journaling each transition
  before the next step acts) and the table from state to lane.
- `lanes`: the local lane's workers and how far ahead proxies are made.
- `tally`: the workers' counts and the one line per finished file.
- `steps/`: the step runner (`run_step`: a step's known exceptions become parks) and the
  steps by concern (prepare, admit, send, store, finish with fail and
  hand-off; source: the original gone, away with its folder, or unreadable), functions of
  the context and the work item.
- `context`: what the steps need (journal, client, limiter, slots, destinations, budget,
  pause, state guard, the inboxes paused by the intake), the one writer of a reload's
  settings.
- `state`: the state_dir's health (a journal or spool write refused pauses sending).
- `work`: the work item and what a step returns.
- `pause`: the one pause (account, budget, shared, by a person per inbox), persisted.
- `jobqueue`: the ready and delayed jobs, handed out as the pause allows; the request slots.
- `budget`: the daily credit budget.
- `client`: the Clipdrop API, one call: bytes in, a result file or a typed error out.
- `deadline`: the bound on a whole request (a watchdog thread that shuts its socket down).
- `outputs`: making one file's outputs from the API's one answer, and its manifest.
"""
