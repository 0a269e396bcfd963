"""Plain-ASGI plumbing shared by the middlewares: types, header access, problem responses.

No framework is imported: the middlewares run under FastAPI, Starlette or Litestar alike.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

PROBLEM_JSON = b"application/problem+json"


def get_header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower-case bytes) in an ASGI ``scope``. O(h)."""
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value)
    return None


def problem_body(status: int, title: str, detail: str, **extra: Any) -> bytes:
    """An RFC 9457 problem document as JSON bytes."""
    doc: dict[str, Any] = {"type": "about:blank", "title": title, "status": status}
    if detail:
        doc["detail"] = detail
    doc.update(extra)
    return json.dumps(doc).encode()


async def send_problem(
    send: Send,
    status: int,
    title: str,
    detail: str = "",
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """Send a whole ``application/problem+json`` response through ``send``."""
    body = problem_body(status, title, detail)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", PROBLEM_JSON),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
