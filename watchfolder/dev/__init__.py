"""Tools that are not the daemon: for trying it, testing it and measuring it.

- `sandbox`: a local stand-in for the Clipdrop API.
- `samples`: generated studio-style product shots.
- `demo`: `watchfolder demo`, the whole product in one command.
"""
