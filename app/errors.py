"""Error types that carry the HTTP status and the client-facing message.

Every error a client can cause is raised as a `ServingError` subclass; the HTTP layer
turns it into ``{"error_msg": ...}`` with the status it names. Messages keep MindSpore
Serving's wording (see PROTOCOL.md) so existing clients that match on text still work.
"""

from __future__ import annotations


class ServingError(Exception):
    """A failure whose message is safe to show the client."""

    status = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadRequest(ServingError):
    """Malformed URL, body or value (400)."""

    status = 400


class NotFound(ServingError):
    """Unknown servable, version or method (404)."""

    status = 404


class PayloadTooLarge(ServingError):
    """Body over ``max_msg_mb_size`` (413)."""

    status = 413


class InstanceError(ServingError):
    """One instance failed; the others go on. ``cause`` is the message without the
    instance's position, so instances failing alike can be reported once."""

    def __init__(self, message: str, status: int = 400, cause: str | None = None):
        super().__init__(message)
        self.status = status
        self.cause = cause or message


class ServableLoadError(RuntimeError):
    """A servable could not be loaded; raised at start-up, never on the request path."""
