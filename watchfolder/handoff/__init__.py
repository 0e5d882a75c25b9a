"""Hand-off: telling the next tool that a file is finished.

- `manifest`: what one processing of one file produced, as one JSON document.
- `delivery`: hooks (local commands) and the signed webhook.
"""
