"""Test doubles shared by several test modules (no tests here): an ASGI app that counts
executions, an async idempotency backend standing in for Redis, a mapping that is not a dict,
and a reader of the fault lines a component logs."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from typing import Any

from ttlstore.asgi import Message, Receive, Scope, Send
from ttlstore.idempotency import IdempotencyStore, Outcome


class CountingApp:
    """A raw ASGI app that counts executions.

    ``/status/<code>`` answers that status; ``/stream/<n>`` streams n chunks of ``chunk``;
    ``/boom`` raises. Everything else answers 201 with a JSON echo. When ``gate`` is set,
    each execution waits on it after signalling ``entered``.
    """

    def __init__(self) -> None:
        self.calls = 0
        self.entered = asyncio.Event()
        self.gate: asyncio.Event | None = None
        self.chunk = b"0123456789"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self.calls += 1
        n = self.calls
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        path: str = scope["path"]
        if path == "/boom":
            raise RuntimeError("handler failed")
        if path.startswith("/stream/"):
            await send(start_message(200, n))
            chunks = int(path.rsplit("/", 1)[1])
            for i in range(chunks):
                more = i < chunks - 1
                await send({"type": "http.response.body", "body": self.chunk, "more_body": more})
            return
        status = int(path.rsplit("/", 1)[1]) if path.startswith("/status/") else 201
        payload = json.dumps(
            {"n": n, "method": scope["method"], "path": path, "body": body.decode()}
        ).encode()
        await send(start_message(status, n, len(payload)))
        await send({"type": "http.response.body", "body": payload})


def start_message(status: int, n: int, length: int | None = None) -> Message:
    headers = [(b"content-type", b"application/json"), (b"x-execution", str(n).encode())]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    return {"type": "http.response.start", "status": status, "headers": headers}


class AsyncStore:
    """An AsyncIdempotencyBackend over an IdempotencyStore, standing in for Redis."""

    def __init__(self, store: IdempotencyStore) -> None:
        self.store = store
        self.calls = 0

    async def begin(self, key: str, fingerprint: str) -> Outcome[Any]:
        self.calls += 1
        await asyncio.sleep(0)  # a real round trip suspends
        return self.store.begin(key, fingerprint)

    async def complete(self, key: str, token: str, result: Any) -> bool:
        await asyncio.sleep(0)
        return self.store.complete(key, token, result)

    async def release(self, key: str, token: str) -> bool:
        await asyncio.sleep(0)
        return self.store.release(key, token)


def fault_counts(records: Iterable[logging.LogRecord], component: str) -> list[int]:
    """The fault count each line of ``component`` reports (``FaultLog``: one line per interval,
    with the faults since the line before), in order."""
    counts = []
    for record in records:
        message = record.getMessage()
        if message.startswith(component):
            found = re.search(r"\((\d+) time\(s\) since the last report", message)
            assert found is not None, message
            counts.append(int(found.group(1)))
    return counts


async def asgi_call(app: Any, scope: Scope, body: bytes = b"") -> list[Message]:
    """One request straight through an ASGI ``app`` (no HTTP client): the messages it sent."""
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


class NotADict(MutableMapping[str, Any]):
    """A scope or message that is a mapping but not a dict. ASGI servers hand over dicts, and
    the compiled middlewares read those natively; any other mapping must read the same."""

    def __init__(self, items: Mapping[str, Any]) -> None:
        self._items = dict(items)

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._items[key] = value

    def __delitem__(self, key: str) -> None:
        del self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)
