"""watchfolder: a hot-folder daemon for the Clipdrop remove-background API."""

__version__ = "0.1.0"
