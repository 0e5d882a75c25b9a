"""Files on disk: putting them in place without ever showing a partial file or clobbering one.

- `place`: placing results, archived originals and failed files with their reason files.
- `atomic`: writing an image file so readers see all of it or nothing.
- `requeue`: `watchfolder requeue`: failed files back to their inbox.
"""
