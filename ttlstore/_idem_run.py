"""One request run by its idempotency key's owner, and what every run of a middleware shares.

Part of :class:`ttlstore.asgi.IdempotencyMiddleware`: hands the app the body already read,
forwards the response while keeping a bounded copy, and ends the claim exactly once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Coroutine
from typing import Any, Final, cast

from ttlstore._asgi_base import Message, Receive, Send, keeps_methods
from ttlstore._errors import BackendUnavailable
from ttlstore._faults import FaultLog
from ttlstore._idem_api import (
    AsyncIdempotencyBackend,
    IdempotencyBackend,
    as_async_backend,
    is_async_backend,
)
from ttlstore._idem_core import ABSENT, IdempotencyCore, end_claim
from ttlstore.records import StoredResponse

__all__ = ["BodyTooLarge", "Run", "Shared", "own_core", "read_body"]

# Distinct header tuples a middleware shares between its stored responses.
_HEADER_SETS: Final = 256

# A StoredResponse built without its Python-level __new__ (what NamedTuple._make does too).
_as_response: Final = tuple.__new__
# StoredResponse as a Final: compiled, a C static rather than a lookup in the module's globals.
_STORED_RESPONSE: Final = StoredResponse


class BodyTooLarge(Exception):
    """The request body outgrew ``max_body`` while it was being read."""


async def read_body(receive: Receive, message: Message, limit: int) -> bytes | None:
    """The whole request body, starting from its first ``message``; None if the client
    disconnected first.

    Raises :class:`BodyTooLarge` as soon as more than ``limit`` bytes have arrived, so at
    most ``limit`` bytes (plus one chunk) are ever held.
    """
    chunks: list[bytes] = []
    size = 0
    while True:
        if message["type"] == "http.disconnect":
            return None
        if message["type"] == "http.request":
            chunk = bytes(message.get("body", b""))
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
        message = await receive()


def own_core(store: object) -> IdempotencyCore | None:
    """``store`` if it is an in-memory store whose ``begin``, ``complete`` and ``release`` are
    the core's own (none overridden, in a subclass or on the instance), else None.

    The middleware calls such a store through :func:`~ttlstore._idem_core.claim` and
    :func:`~ttlstore._idem_core.end_claim`, natively and without the outcome objects; any
    other store through its methods. O(1).
    """
    if keeps_methods(store, IdempotencyCore, ("begin", "complete", "release")):
        return cast(IdempotencyCore, store)
    return None


class Shared:
    """What every run of one middleware shares: the store (sync, or async), the response
    limit, the statuses to store, the keys running now, and the fault logs."""

    __slots__ = (
        "async_store",
        "core",
        "faults",
        "header_sets",
        "last_headers",
        "late",
        "limit",
        "running",
        "statuses",
        "sync_store",
    )

    def __init__(
        self,
        store: IdempotencyBackend[StoredResponse] | AsyncIdempotencyBackend[StoredResponse],
        limit: int,
        statuses: frozenset[int],
    ) -> None:
        # A sync backend (the in-memory store) is called inline, without a coroutine around
        # each call; an async one is awaited.
        self.sync_store: IdempotencyBackend[StoredResponse] | None = (
            None if is_async_backend(store, "store") else cast("IdempotencyBackend[Any]", store)
        )
        self.async_store = as_async_backend(store, name="store")
        self.core = own_core(store)
        self.limit = limit
        self.statuses = statuses
        # Lookup key -> token of every request this middleware is running now: a 409 for one
        # of them says "retry in 1 s", since its owner is alive and ends it soon.
        self.running: dict[str, str] = {}
        # Response headers as an app gave them -> their checked copy and size in bytes: most
        # responses repeat the same headers, so a record shares its copy (7 objects less for
        # Starlette's two headers) and a response skips copying. Bounded: cleared when full,
        # so unbounded variety costs the sharing, never memory.
        self.header_sets: dict[tuple[Any, ...], tuple[tuple[tuple[bytes, bytes], ...], int]] = {}
        # The last response's entry of that table: most responses repeat the one before, which
        # one comparison finds without hashing every name and value (1.4 k instructions per
        # response, callgrind, compiled). One attribute, so a reader never sees half of two.
        self.last_headers: tuple[tuple[tuple[bytes, bytes], ...], int] = ((), 0)
        self.faults = FaultLog("IdempotencyMiddleware: the idempotency store failed")
        self.late = FaultLog("IdempotencyMiddleware")

    def late_claim(self, lookup: str) -> None:
        self.late.log(
            f"the claim on {lookup!r} ran out before the response was complete (lease "
            "shorter than the request?); it was not stored"
        )

    def failed(self, error: Exception, action: str) -> None:
        # Expected while a shared backend is down: counted, and logged once per interval.
        self.faults.log(error, action, traceback=not isinstance(error, BackendUnavailable))


class Run:
    """One request run by its key's owner: hands the app the body already read, forwards the
    response as it streams by while keeping a copy of at most ``limit`` bytes of headers and
    body, and ends the claim exactly once.

    The response itself is never held back. A response that outgrows the limit, has a status
    not to be stored, or uses a message the copy cannot capture (trailers,
    ``http.response.pathsend``) drops its copy (``chunks`` becomes None) and releases the key.
    """

    __slots__ = (
        "body",
        "chunks",
        "headers",
        "lookup",
        "receive_rest",
        "send_on",
        "settled",
        "shared",
        "size",
        "status",
        "token",
    )

    def __init__(
        self, shared: Shared, lookup: str, token: str, body: bytes, receive: Receive, send: Send
    ) -> None:
        self.shared = shared
        self.lookup = lookup
        self.token = token
        self.body: bytes | None = body
        self.receive_rest = receive
        self.send_on = send
        self.status = 0
        self.headers: tuple[tuple[bytes, bytes], ...] = ()
        self.chunks: list[bytes] | None = []
        self.size = 0
        self.settled = False

    async def receive(self) -> Message:
        """The body read before the claim, then the server's own messages (a disconnect)."""
        body = self.body
        if body is not None:
            self.body = None
            return {"type": "http.request", "body": body, "more_body": False}
        return await self.receive_rest()

    def send(self, message: Message) -> Awaitable[None]:
        """Copy what is to be kept of ``message`` and forward it.

        Not a coroutine function: it answers the server's own awaitable, so each message
        passes through one coroutine less (an ASGI ``send`` need only return an awaitable).
        """
        # Read as a dict (see client_host in ttlstore._ratelimit_run); forwarded as given.
        sent = message if type(message) is dict else dict(message)
        kind = sent["type"]
        if kind == "http.response.body":
            chunks = self.chunks
            if chunks is not None:
                chunk = sent.get("body", b"")
                self.size += len(chunk)
                if self.size > self.shared.limit:
                    self.chunks = None
                else:
                    chunks.append(chunk if type(chunk) is bytes else bytes(chunk))
            if not sent.get("more_body", False) and not self.settled:
                # Store before the last chunk leaves: a client that disconnects now and
                # retries gets the replay, not a second execution.
                pending = self.settle(True)
                if pending is not None:
                    return self._send_after(pending, message)
        elif kind == "http.response.start":
            # Written out rather than a method: one call less on every first request.
            self.status = status = int(sent["status"])
            shared = self.shared
            header_sets = shared.header_sets
            given = sent.get("headers", ())
            known: tuple[tuple[tuple[bytes, bytes], ...], int] | None
            try:
                seen = tuple(given)
                known = shared.last_headers
                if seen != known[0]:
                    # Headers seen before, as given: their checked copy and size at one lookup.
                    known = header_sets.get(seen)
                    if known is not None:
                        shared.last_headers = known
            except TypeError:  # an unhashable header (a list, a bytearray): copy it below
                known = None
            if known is None:
                copied: list[tuple[bytes, bytes]] = []
                total = 0
                for name, value in given:
                    if type(name) is not bytes:
                        name = bytes(name)
                    if type(value) is not bytes:
                        value = bytes(value)
                    copied.append((name, value))
                    total += len(name) + len(value)
                # An immutable copy (the app may reuse its list), shared with every later
                # response with equal headers: a stored record holds none of its own.
                copy = tuple(copied)
                if len(header_sets) >= _HEADER_SETS:
                    header_sets.clear()
                known = (copy, total)
                header_sets[copy] = known
                shared.last_headers = known
            self.headers, size = known
            # Headers count against the limit too: a record's size is what it holds.
            self.size = size
            if status not in shared.statuses or sent.get("trailers", False) or size > shared.limit:
                self.chunks = None
        else:
            self.chunks = None
        return self.send_on(message)

    async def _send_after(self, pending: Awaitable[None], message: Message) -> None:
        """Forward ``message`` once an async store has ended the claim."""
        await pending
        await self.send_on(message)

    def settle(self, keep: bool) -> Coroutine[Any, Any, None] | None:
        """End the claim: store the copy (``keep`` and storable) or release the key. Done here
        for a sync store; for an async one, the coroutine to await. A store fault is logged:
        the response is the app's and goes out regardless, and the lease ends the claim."""
        self.settled = True
        chunks = self.chunks
        fields = (
            (self.status, self.headers, b"".join(chunks))
            if keep and chunks is not None and self.status
            else None
        )
        shared = self.shared
        core = shared.core
        store = shared.sync_store
        try:
            if core is not None:
                # Native, and the fields flattened into the record as a StoredResponse's are:
                # none is built (see own_core).
                kept: Any = ABSENT if fields is None else fields
                done = end_claim(core, self.lookup, self.token, kept, fields is not None)
            elif store is not None:
                done = (
                    store.release(self.lookup, self.token)
                    if fields is None
                    else store.complete(
                        self.lookup, self.token, _as_response(_STORED_RESPONSE, fields)
                    )
                )
            else:
                response = None if fields is None else _as_response(_STORED_RESPONSE, fields)
                return self._settle_async(response)
            if fields is not None and not done:
                shared.late_claim(self.lookup)
        except Exception as error:
            shared.failed(error, "to end a claim")
        return None

    async def _settle_async(self, response: StoredResponse | None) -> None:
        shared = self.shared
        store = shared.async_store
        try:
            if response is None:
                await store.release(self.lookup, self.token)
            elif not await store.complete(self.lookup, self.token, response):
                shared.late_claim(self.lookup)
        except Exception as error:
            shared.failed(error, "to end a claim")
