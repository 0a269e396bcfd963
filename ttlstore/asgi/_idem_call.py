"""The compiled half of :class:`~ttlstore.asgi.IdempotencyMiddleware`: what every request runs.

mypyc compiles this module (setup.py ``COMPILED``); :mod:`ttlstore.asgi.idempotency` adds the
constructor with its argument checks (interpreted in every build, so bad arguments get this
package's messages, not mypyc's) and the documentation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from ttlstore._mypyc import mypyc_attr
from ttlstore.asgi._http import ASGIApp, Receive, Scope, Send, send_problem
from ttlstore.asgi._idem_key import MAX_KEY_LENGTH, Fingerprinter, parse_idempotency_key, quoted_key
from ttlstore.asgi._idem_run import BodyTooLarge, Run, Shared, read_body
from ttlstore.idempotency import Busy, InProgress, Mismatch, Outcome, Replay, Started
from ttlstore.records import StoredResponse

__all__ = ["MiddlewareCore"]

# A 409's Retry-After is at most a day, even for a backend configured with a longer lease.
_RETRY_AFTER_MAX = 86_400

# Retry-After on 503, and on a 409 whose owner runs in this process: a held key frees as soon
# as its request ends, usually well before its lease, so a short hint serves clients better.
_RETRY_AFTER = (b"retry-after", b"1")
_REPLAYED = (b"idempotent-replayed", b"true")

# Prefix of every lookup key this middleware builds, so that a store it shares with
# @idempotent (whose keys start with a function's name) never mixes the two.
_NAMESPACE = "asgi"
_UNSCOPED = f"{_NAMESPACE}\x00\x00"  # the lookup prefix without a tenant callable


@mypyc_attr(allow_interpreted_subclasses=True)
class MiddlewareCore:
    """State and request path of an IdempotencyMiddleware; see there."""

    __slots__ = (
        "_fingerprints",
        "_header",
        "_header_name",
        "_max_body",
        "_required",
        "_shared",
        "_tenant_of",
        "app",
    )

    def __init__(
        self,
        app: ASGIApp,
        fingerprints: dict[str, Fingerprinter],
        header: str,
        required: bool,
        tenant: Callable[[Scope], str] | None,
        max_body: int,
        shared: Shared,
    ) -> None:
        """Set up from arguments IdempotencyMiddleware checked."""
        self.app = app
        self._fingerprints = fingerprints
        self._header_name = header
        self._header = header.lower().encode("ascii")
        self._required = required
        self._tenant_of = tenant
        self._max_body = max_body
        self._shared = shared

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        fingerprinter = self._fingerprints.get(scope["method"])
        if fingerprinter is None:
            await self.app(scope, receive, send)
            return
        # One pass over the request's headers. Names are compared as given: ASGI servers
        # hand them over lower-cased (Starlette's own Headers relies on that too).
        wanted = self._header
        raw: bytes | None = None
        declared: bytes | None = None
        for name, value in scope["headers"]:
            if name == wanted:
                # Several lines combine with ", " (RFC 9110), which no key survives.
                raw = value if raw is None else raw + b", " + value
            elif name == b"content-length":
                declared = value
        if raw is None:
            if self._required:
                await self._problem(send, 400, "Missing idempotency key", "is required")
            else:
                await self.app(scope, receive, send)
            return
        plain = quoted_key(raw)  # what clients send: "key"; the rest is parsed in full
        key = raw[1:-1].decode("ascii") if plain is not None else parse_idempotency_key(raw)
        if key is None:
            detail = f"must be a quoted string or a token of 1 to {MAX_KEY_LENGTH} characters"
            await self._problem(send, 400, "Malformed idempotency key", detail)
            return
        limit = self._max_body
        try:
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise BodyTooLarge
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                body: bytes | None = message.get("body", b"")  # the usual one-message body
                if len(body) > limit:  # type: ignore[arg-type]
                    raise BodyTooLarge
                if type(body) is not bytes:
                    body = bytes(body)  # type: ignore[arg-type]
            else:
                body = await read_body(receive, message, limit)
        except BodyTooLarge:
            detail = f"allows request bodies of at most {limit} bytes"
            await self._problem(send, 413, "Request body too large", detail)
            return
        if body is None:
            return  # the client is gone before anything ran: nothing to claim or answer
        if self._tenant_of is None:
            lookup = _UNSCOPED + key
        else:
            lookup = f"{_NAMESPACE}\x00{self._tenant(scope)}\x00{key}"
        print_ = fingerprinter(
            scope.get("raw_path") or scope["path"].encode("utf-8"),
            scope.get("query_string", b""),
            body,
        )
        shared = self._shared
        try:
            store = shared.sync_store
            if store is not None:
                outcome = store.begin(lookup, print_)
            else:
                outcome = await shared.async_store.begin(lookup, print_)
        except Exception as error:
            shared.failed(error, "on begin()")
            await send_problem(send, 503, "Idempotency store unavailable", headers=[_RETRY_AFTER])
            return
        if type(outcome) is Started or isinstance(outcome, Started):
            # Inline rather than a call: one coroutine less on every first request.
            token = outcome.token
            run = Run(shared, lookup, token, body, receive, send)
            running = shared.running
            running[lookup] = token
            try:
                await self.app(scope, run.receive, run.send)
            finally:
                if running.get(lookup) == token:
                    del running[lookup]
                if not run.settled:  # no complete body was sent: the retry must run again
                    pending = run.settle(False)
                    if pending is not None:
                        await pending
        elif isinstance(outcome, Replay):
            response = outcome.result
            if type(response) is not StoredResponse:
                response = _check_stored(response)
            body = response.body
            headers = [*response.headers, _REPLAYED]
            for name, _ in response.headers:
                if name == b"content-length" or name.lower() == b"content-length":
                    break
            else:
                headers.append((b"content-length", b"%d" % len(body)))
            await send(
                {"type": "http.response.start", "status": response.status, "headers": headers}
            )
            await send({"type": "http.response.body", "body": body, "more_body": False})
        else:
            await self._answer(send, lookup, outcome)

    async def _answer(self, send: Send, lookup: str, outcome: Outcome[Any]) -> None:
        """Every outcome but ``Started`` and ``Replay``: a problem response."""
        if isinstance(outcome, InProgress):
            detail = "belongs to a request that is still being processed; retry later"
            retry = self._retry_after(lookup, outcome)
            await self._problem(send, 409, "Request in progress", detail, [retry])
        elif isinstance(outcome, Mismatch):
            detail = "was already used for a different request (method, path, query or body)"
            await self._problem(send, 422, "Idempotency key reused", detail)
        elif isinstance(outcome, Busy):
            detail = "cannot be claimed now: too many requests are in progress"
            await self._problem(send, 503, "Too many requests in progress", detail, [_RETRY_AFTER])
        else:
            raise TypeError(f"store.begin() answered {outcome!r}, which is no Outcome")

    def _retry_after(self, lookup: str, outcome: InProgress) -> tuple[bytes, bytes]:
        """``Retry-After`` for a 409: 1 s when this middleware runs the owner (it ends soon),
        else the seconds left of the owner's lease, rounded up, when the backend says."""
        left = outcome.retry_after
        if lookup in self._shared.running or left is None or not left > 1:
            return _RETRY_AFTER
        return (b"retry-after", b"%d" % math.ceil(min(left, _RETRY_AFTER_MAX)))

    def _tenant(self, scope: Scope) -> str:
        assert self._tenant_of is not None
        tenant = self._tenant_of(scope)
        if not isinstance(tenant, str):
            raise TypeError(f"tenant callable must return a str, got {tenant!r}")
        return tenant

    async def _problem(
        self,
        send: Send,
        status: int,
        title: str,
        detail: str,
        headers: Iterable[tuple[bytes, bytes]] = (),
    ) -> None:
        """A problem response whose detail starts with the header's name."""
        await send_problem(send, status, title, f"{self._header_name} {detail}", headers)


def _check_stored(response: object) -> StoredResponse:
    if not isinstance(response, StoredResponse):
        raise TypeError(f"the idempotency store holds {response!r}, not a StoredResponse")
    return response
