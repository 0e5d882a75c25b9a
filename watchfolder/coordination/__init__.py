"""Coordination: several daemons sharing one API key or one inbox.

- `coordinator`: what a daemon agrees on with the others, and the thread that renews it.
- `ratelimit`: the sliding-window limiter of one process, and the backoff after a 429.
- `limits`: the limiter interface the pipeline uses, the account pause, the local limiter.
- `shared_limit`: the key's rate limit, 429 hold and pause, kept in the store.
- `reset`: after the store lost its data, one instant for the claim grace and the send hold.
- `claims`: what a claim is and who holds it; `share_claims` (files on the share) and
  `store_claims` (keys in the store) take them; `done_marks` remember files finished in place.
- `registry`: which daemons share the store, for `status`.
- `store`: the Redis/Valkey connection and what "unreachable" means.
"""
