"""The client a user writes from the vendor's example: one request after another, then a sleep.

It is the vendor's Python snippet (`requests.post(url, files={'image_file': ...},
headers={'x-api-key': ...})`, write `r.content`) put in a `for` loop over a folder, with
`time.sleep(60 / requests_per_minute)` after each file so that it can never exceed the limit.
That is the honest baseline: it is correct, simple, and what watchfolder replaces.
"""

from __future__ import annotations

import threading
from pathlib import Path

import requests


def naive_loop(url: str, key: str, inbox: Path, outbox: Path, requests_per_minute: int,
               stop: threading.Event) -> int:
    """Process the files of `inbox` one by one until done or `stop`; return files done."""
    outbox.mkdir(parents=True, exist_ok=True)
    done = 0
    for path in sorted(inbox.iterdir()):
        if stop.is_set():
            break
        with path.open("rb") as image_file_object:
            try:
                r = requests.post(url,
                                  files={"image_file": (path.name, image_file_object,
                                                        "image/png")},
                                  headers={"x-api-key": key}, timeout=120)
            except requests.RequestException:
                break  # the sandbox was stopped under us: the run is over
        if r.ok:
            (outbox / path.name).write_bytes(r.content)
            done += 1
        if stop.wait(60 / requests_per_minute):  # "respect the rate limit"
            break
    return done
