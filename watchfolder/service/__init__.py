"""The service: the daemon's life and the windows into it.

- `daemon`: wiring journal, limiter, client, pipeline and intake; start, reload, stop.
- `runloop`: the main loop (watchdog pings, STATUS=, signals' requests) and its `Waker`.
- `reload`: what a reload decides before the daemon applies it.
- `recovery`: what a start puts right: folders, unfinished records, a crash's left-overs.
- `health`: watches that died and were not restored.
- `lock`: one daemon per state_dir.
- `allocator`: glibc's mmap and trim thresholds, fixed so freed big blocks leave the process.
- `notify`: the sd_notify protocol.
- `metrics`: Prometheus metrics.
- `status`: `watchfolder status` and the STATUS= line.
- `progress`: the progress line of `run --once` on a terminal.
- `web_view`: when the web view (web/) is served, and what a reload changes of it.
- `person`: what a person does from the web view: pause inboxes, judge results in review.
"""
