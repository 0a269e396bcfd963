"""Plain-ASGI plumbing shared by the middlewares: types, header access, problem responses.

No framework is imported: the middlewares run under FastAPI, Starlette or Litestar alike. The
types and the problem response live in :mod:`ttlstore._asgi_base`, where the compiled request
paths can import them.
"""

from __future__ import annotations

from ttlstore._asgi_base import (
    PROBLEM_JSON,
    ASGIApp,
    Headers,
    Message,
    Receive,
    Scope,
    Send,
    problem_body,
    send_problem,
)

__all__ = [
    "PROBLEM_JSON",
    "ASGIApp",
    "Headers",
    "Message",
    "Receive",
    "Scope",
    "Send",
    "get_header",
    "problem_body",
    "send_problem",
]


def get_header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower-case bytes) in an ASGI ``scope``. O(h)."""
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value)
    return None
