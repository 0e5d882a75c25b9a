"""The journal: the durable record of each file's state (SQLite in `state_dir`).

- `db`: the `Journal` and its records; the only module that knows the schema.
- `durable`: the fsyncs that make the commits guarding a credit survive a power loss,
  shared by the workers committing at once (group commit).
- `notes`: single values that outlive a run (the pause, the credits last reported).
- `sqlite`: opening the daemon's SQLite files (the journal, the webhook's queue) one way.
- `reset`: `watchfolder reset-journal`: move a damaged journal aside and rebuild it.
"""
