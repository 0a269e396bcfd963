"""The ASGI types and the problem response the middlewares share, outside ``ttlstore.asgi``.

The middlewares' compiled request paths import from here: ``ttlstore.asgi`` itself needs the
``asgi`` extra (http_sf), which the environment a wheel is built in does not have, and mypyc
checks a compiled module together with everything it imports. :mod:`ttlstore.asgi._http`
re-exports these names.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

__all__ = [
    "PROBLEM_JSON",
    "ASGIApp",
    "Headers",
    "Message",
    "Receive",
    "Scope",
    "Send",
    "keeps_methods",
    "problem_body",
    "send_problem",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

PROBLEM_JSON = b"application/problem+json"


def keeps_methods(obj: object, base: type, names: Iterable[str]) -> bool:
    """Whether ``obj`` is a ``base`` whose methods ``names`` are all ``base``'s own: none
    overridden, in its class or on the instance. A middleware calls such a limiter or store
    through its compiled core directly, and any other through its methods. O(len(names)).
    """
    if not isinstance(obj, base):
        return False
    own = getattr(obj, "__dict__", {})
    kind = type(obj)
    return all(getattr(kind, name) is getattr(base, name) and name not in own for name in names)


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
