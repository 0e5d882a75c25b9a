"""Files on disk: putting them in place without ever showing a partial file or clobbering one.

- `layout`: every name the daemon writes (temp names, spool entries, reason files, sidecars).
- `place`: placing results, archived originals and failed files with their reason files.
- `atomic`: writing a file so readers see all of it or nothing (the one atomic writer).
- `requeue`: `watchfolder requeue`: failed files back to their inbox.
"""
