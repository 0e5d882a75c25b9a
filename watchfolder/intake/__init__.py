"""Intake: noticing files and deciding when one is complete and ours to take.

- `watcher`: watchdog events plus scans → candidate paths.
- `settle`: the settle rule (size and mtime stable) and the names we leave alone.
- `loop`: the intake thread: which paths are in the pipeline, and handing complete ones on.
"""
