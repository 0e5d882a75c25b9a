"""Intake: noticing files and deciding when one is complete and ours to take.

- `watcher`: watchdog events plus scans → candidate paths.
- `settle`: the settle rule (size and mtime stable) and the names we leave alone.
- `folders`: is each inbox folder there, readable, and the one it was (pauses an inbox).
- `loop`: the intake thread: which paths are in the pipeline, and handing complete ones on.
"""
