"""The pipeline: each file's life from queued to done or failed, and what it needs.

- `driver`: the worker pool and the loop that runs a file's steps, journaling each
  transition before the next step acts.
- `jobqueue`: the ready and delayed jobs, the account pause, the request slots.
- `budget`: the daily credit budget.
- `client`: the Clipdrop API, one call: bytes in, a result file or a typed error out.
- `outputs`: making one file's outputs from the API's one answer, and its manifest.
"""
