"""Process-wide settings of libvips, made once, explicitly, by whoever runs the imaging code.

Importing an imaging module changes nothing outside it. The daemon calls `configure()` at
start, in the main thread before any worker exists (tests and benchmarks that use imaging
directly call it too):

- libvips's operation cache is off: it would keep decoded images alive (memory), and would
  answer a second open of a path with the first file's pixels even after the file was
  replaced.
- libvips's log no longer goes through pyvips's Python callback: libvips calls it from its
  own worker threads when a damaged file makes it warn, and each such thread then stays
  registered as a `threading._DummyThread` for good. Failures reach us as exceptions with
  the same text, so the log goes to GLib's default handler (stderr) instead. pyvips has no
  public way to do this; its private `_remove_log_handler` is used when it exists.

Pillow's decompression-bomb guard stays on: the one place that opens a studio-sized file
with Pillow (metadata's TIFF directory reader) does it without decoding pixels, through the
TIFF plugin directly, after libvips checked the header against our own pixel limit.
"""

from __future__ import annotations

import functools

import pyvips


@functools.cache
def configure() -> None:
    """Apply the settings above (once per process; later calls do nothing)."""
    pyvips.cache_set_max(0)
    pyvips.cache_set_max_mem(0)
    pyvips.cache_set_max_files(0)
    remove_log_handler = getattr(pyvips, "_remove_log_handler", None)
    if remove_log_handler is not None:
        remove_log_handler()
