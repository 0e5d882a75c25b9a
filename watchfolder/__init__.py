"""watchfolder: a hot-folder daemon for the Clipdrop remove-background API."""

import os

# The release, and the only place it is written: pyproject.toml reads it at build time; reason
# files, manifests, metrics, the User-Agent and --version all report it.
__version__ = "0.2.0"

# libvips prints its warnings ("VIPS-WARNING **: error in tile ...") raw on stderr, from its own
# threads (pyvips's forwarding to logging is removed by imaging/libraries.py: it leaks a thread
# object per warning). Every failure they announce reaches us as an exception with the same
# text, which the reason file carries; so they are silenced. libvips reads this at its start,
# when pyvips is first imported: hence here, before any module imports pyvips.
os.environ.setdefault("VIPS_WARNING", "0")
