"""The web view for the studio floor (issue 18): a live page served by the running daemon.

- `server`: uvicorn in a thread of the daemon, bound at start, stopped first at shutdown.
- `app`: the routes, the security headers and the live stream (server-sent events).
- `auth`: Host, token login and same-site checks (`Gate`).
- `views`: what the page shows, read from the daemon's snapshot, `status` and the journal.
- `actions`: what its buttons do: pause, retry, review.
- `files`, `paths`: which files a picture or download may open, and opening them safely.
- `thumbs`: libvips thumbnails, cached by content, a few at a time.
- `templates/`, `static/`: Jinja2 templates, the stylesheet, vendored htmx, review.js.
"""
