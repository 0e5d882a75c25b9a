"""A separate process that claims files, for the claim tests (`python -m tests.claim_worker`).

    race INBOX --go FILE [--lease S] [--url URL] REL...
        wait for FILE to exist, try to claim every REL, print the ones won as JSON, and hold
        them (unrenewed) until stdin closes
    hold INBOX [--lease S] [--url URL] [--instance ID] REL...
        claim every REL with a running coordinator (its thread renews them), print "held",
        then wait to be killed
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from watchfolder import logs
from watchfolder.config.settings import StoreUrl
from watchfolder.coordination.claims import Holder
from watchfolder.coordination.coordinator import Coordinator, key_id
from watchfolder.coordination.done_marks import DoneMarks
from watchfolder.coordination.limits import LocalLimiter
from watchfolder.coordination.share_claims import ShareClaims
from watchfolder.coordination.store import Store
from watchfolder.coordination.store_claims import StoreClaims


def coordinator(inbox: Path, lease: float, url: str | None, instance: str) -> Coordinator:
    holder = Holder.this_process(instance)
    share = ShareClaims(holder, lease)
    store = Store(StoreUrl(url)) if url else None
    claims = (StoreClaims(store, holder, lease, share, key=key_id("any key"))
              if store is not None else share)
    return Coordinator(holder=holder, limiter=LocalLimiter(60), claims=claims,
                       marks=DoneMarks(holder), lease_seconds=lease, inboxes=[inbox], store=store)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("race", "hold"))
    parser.add_argument("inbox", type=Path)
    parser.add_argument("--go", type=Path)
    parser.add_argument("--lease", type=float, default=1.0)
    parser.add_argument("--url")
    parser.add_argument("--instance", default="")
    parser.add_argument("rels", nargs="*")
    args = parser.parse_intermixed_args()
    logs.configure("json", "info", stream=sys.stderr)  # stdout is for the test
    coord = coordinator(args.inbox, args.lease, args.url, args.instance)
    if args.mode == "race":
        assert args.go is not None
        while not args.go.exists():
            time.sleep(0.001)
        won = [rel for rel in args.rels if coord.claim(args.inbox, rel) is not None]
        print(json.dumps(won), flush=True)
        sys.stdin.read()  # hold the claims until the test has looked at all the processes
        return 0
    coord.start()
    for rel in args.rels:
        if coord.claim(args.inbox, rel) is None:
            print("not held", flush=True)
            return 1
    print("held", flush=True)
    while True:
        time.sleep(60)  # killed by the test


if __name__ == "__main__":
    sys.exit(main())
