"""The C allocator's thresholds for a long-running daemon (glibc only; elsewhere nothing).

glibc starts with blocks of 128 KiB and more mapped on their own (returned to the system when
freed) and raises that threshold to the size of each such block freed, up to 32 MiB, with
the trim threshold at twice it. pathlib interns every part of every path it parses (Python
3.10 to 3.13), so the table of interned strings fills with file names that die, and is
rebuilt at the same size (1.9 MB with the daemon's modules loaded) every few thousand
files, on whichever thread adds the name that fills it. Once the first rebuild has raised the
threshold above that size, each next table comes from the arena of the thread that rebuilt
it and stays there once freed, below the raised trim threshold. glibc gives threads up to 8
arenas per core, so the resident size rose by about 2 MB each time a thread whose arena had
not held one rebuilt the table: +6.3 % over 20,000 files, more with more files, while no
Python object and no byte in use grew (BENCHMARKS.md, "Issue 17: memory over 20,000 files").

`pin_thresholds` fixes the thresholds (which turns glibc's raising off): blocks of
`MMAP_THRESHOLD` and more are always mapped on their own and unmapped when freed.
"""

from __future__ import annotations

import ctypes
import os

# mallopt's parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# Above the blocks the daemon allocates per file and per request (under 100 KB), and the
# libvips buffers a 45 MP cut-out asks for most (200 to 540 KB, some 270 of them), so those
# are reused as before; below the interned strings' table at 2^16 entries (0.96 MB) and up.
MMAP_THRESHOLD = 512 * 1024
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # glibc's own ratio when it raises them

# An operator's own tuning of the allocator wins (glibc reads these at start).
OWN_TUNING = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def pin_thresholds() -> bool:
    """Fix glibc's mmap threshold at `MMAP_THRESHOLD` and its trim threshold at
    `TRIM_THRESHOLD` for this process; False (nothing changed) when the C library is not
    glibc or the environment sets the allocator's own tuning."""
    if any(name in os.environ for name in OWN_TUNING) or \
            "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this interpreter runs on
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False  # not glibc (musl's mallopt does nothing)
    mallopt = libc.mallopt
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
