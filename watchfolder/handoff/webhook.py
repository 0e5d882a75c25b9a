"""The webhook's wire: one signed POST of a manifest, and the error when there is no answer.

Each body is signed (`X-Watchfolder-Signature: sha256=<HMAC-SHA256 of the body>`) with the
configured secret and carries its id in `X-Watchfolder-Delivery`. The durable queue that
retries deliveries is deliveries.py; the settings are `WebhookSettings` (config/handoff.py).

Exceptions (see errors.py for the rest of the tree):

    WatchfolderError
    └── WebhookUnreachable   no HTTP answer (refused, reset, timeout, TLS); carries only the
                             kind of failure, never the URL or the secret
"""

from __future__ import annotations

import hmac
from hashlib import sha256

import requests

from watchfolder import __version__
from watchfolder.config.handoff import WebhookSettings
from watchfolder.config.secret import Secret
from watchfolder.errors import WatchfolderError

USER_AGENT = f"watchfolder/{__version__}"
SIGNATURE_HEADER = "X-Watchfolder-Signature"
DELIVERY_HEADER = "X-Watchfolder-Delivery"


class WebhookUnreachable(WatchfolderError):
    """The receiver gave no HTTP answer; `error` names the kind (e.g. ConnectTimeout)."""

    reason = "webhook_unreachable"

    def __init__(self, error: str) -> None:
        self.error = error
        super().__init__(f"webhook request failed: {error}")



def signature(secret: Secret, body: bytes) -> str:
    """The `X-Watchfolder-Signature` value: `sha256=` and the hex HMAC-SHA256 of `body`."""
    return "sha256=" + hmac.new(secret.reveal().encode("utf-8"), body, sha256).hexdigest()


class WebhookClient:
    """One keep-alive session that POSTs signed bodies; used by one thread at a time."""

    def __init__(self, settings: WebhookSettings) -> None:
        self._settings = settings
        self._session = requests.Session()
        self._session.headers["User-Agent"] = USER_AGENT

    def post(self, delivery_id: str, body: bytes) -> int:
        """Send `body` once; return the HTTP status, or raise WebhookUnreachable."""
        settings = self._settings
        headers = {"Content-Type": "application/json", DELIVERY_HEADER: delivery_id,
                   SIGNATURE_HEADER: signature(settings.secret, body)}
        try:
            response = self._session.post(
                settings.url, data=body, headers=headers, allow_redirects=False,
                timeout=(settings.connect_timeout_seconds, settings.timeout_seconds))
            response.close()
        except requests.RequestException as exc:
            # from None: the request (URL, signed headers) must not ride along in a traceback.
            raise WebhookUnreachable(type(exc).__name__) from None
        return response.status_code

    def close(self) -> None:
        self._session.close()

