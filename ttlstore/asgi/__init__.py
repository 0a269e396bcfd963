"""Plain-ASGI middlewares for services; no framework import, so any ASGI framework hosts them.

They run under FastAPI, Starlette or Litestar alike, and pass non-HTTP scopes through. Needs
the ``asgi`` extra (``pip install 'ttlstore[asgi]'``, which brings ``http-sf``).

- :class:`IdempotencyMiddleware` (:mod:`ttlstore.asgi.idempotency`): the ``Idempotency-Key``
  request header on any idempotency backend;
- :class:`RateLimitMiddleware` (:mod:`ttlstore.asgi.ratelimit`): per-client token buckets with
  the IETF ``RateLimit-Policy`` / ``RateLimit`` fields.

The ASGI type aliases (``Scope``, ``Receive``, ``Send``, ``Message``, ``ASGIApp``) are exported
for code that wraps or tests the middlewares; :func:`get_header` reads a request header, as a
``tenant=`` or ``key=`` callable needs to.
"""

try:
    import http_sf  # noqa: F401  (checked here so the error names the extra)
except ImportError as error:  # the extra is missing
    raise ImportError(
        "ttlstore.asgi needs http-sf: install it with pip install 'ttlstore[asgi]'"
    ) from error

from ttlstore.asgi._http import ASGIApp, Message, Receive, Scope, Send, get_header
from ttlstore.asgi.idempotency import (
    DEFAULT_MAX_BODY,
    DEFAULT_MAX_RESPONSE,
    DEFAULT_STORE_STATUSES,
    IdempotencyMiddleware,
    parse_idempotency_key,
)
from ttlstore.asgi.ratelimit import RateLimitMiddleware, client_host
from ttlstore.records import StoredResponse

__all__ = [
    "DEFAULT_MAX_BODY",
    "DEFAULT_MAX_RESPONSE",
    "DEFAULT_STORE_STATUSES",
    "ASGIApp",
    "IdempotencyMiddleware",
    "Message",
    "RateLimitMiddleware",
    "Receive",
    "Scope",
    "Send",
    "StoredResponse",
    "client_host",
    "get_header",
    "parse_idempotency_key",
]
