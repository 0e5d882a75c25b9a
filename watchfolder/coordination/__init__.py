"""Coordination: several daemons sharing one API key or one inbox.

- `ratelimit`: the sliding-window limiter of one process, and backoff.
- `coordinator`: what a daemon agrees on with the others: the shared limiter, pause, hosts.
- `claims`: a daemon takes a file before it pays for it (share and store claims, done marks).
- `store`: the Redis/Valkey connection and what "unreachable" means.
"""
