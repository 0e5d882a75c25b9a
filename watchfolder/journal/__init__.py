"""The journal: the durable record of each file's state (SQLite in `state_dir`).

- `db`: the `Journal` and its records; the only module that knows the schema.
- `reset`: `watchfolder reset-journal`: move a damaged journal aside and rebuild it.
"""
