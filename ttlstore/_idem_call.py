"""The compiled half of :class:`~ttlstore.asgi.IdempotencyMiddleware`: what every request runs.

mypyc compiles this module (setup.py ``COMPILED``), problem responses included (their ASGI
plumbing comes from :mod:`ttlstore._asgi_base`, not ``ttlstore.asgi``, which needs http_sf);
:mod:`ttlstore.asgi.idempotency` adds the constructor with its argument checks (interpreted in
every build, so bad arguments get this package's messages, not mypyc's) and the documentation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Final

from ttlstore._asgi_base import ASGIApp, Receive, Scope, Send, send_problem
from ttlstore._idem_api import Busy, InProgress, Mismatch, Outcome, Replay, Started
from ttlstore._idem_core import claim
from ttlstore._idem_read import MAX_KEY_LENGTH, Fingerprinter, plain_key
from ttlstore._idem_run import BodyTooLarge, Run, Shared, read_body
from ttlstore._mypyc import mypyc_attr
from ttlstore.records import StoredResponse

__all__ = ["MAX_KEY_LENGTH", "MiddlewareCore"]

# Imported classes read on every request, bound to Finals: compiled, a Final is a C static,
# where an imported name is a dictionary lookup in the module's globals on each read.
_STARTED: Final = Started
_REPLAY: Final = Replay
_STORED_RESPONSE: Final = StoredResponse

_REPLAYED: Final = (b"idempotent-replayed", b"true")

# A 409's Retry-After is at most a day, even for a backend configured with a longer lease.
_RETRY_AFTER_MAX: Final = 86_400

# Retry-After on 503, and on a 409 whose owner runs in this process: a held key frees as soon
# as its request ends, usually well before its lease, so a short hint serves clients better.
_RETRY_AFTER: Final = (b"retry-after", b"1")

# Prefix of every lookup key this middleware builds, so that a store it shares with
# @idempotent (whose keys start with a function's name) never mixes the two.
_NAMESPACE: Final = "asgi"
_UNSCOPED: Final = f"{_NAMESPACE}\x00\x00"  # the lookup prefix without a tenant callable


@mypyc_attr(allow_interpreted_subclasses=True)
class MiddlewareCore:
    """State and request path of an IdempotencyMiddleware; see there."""

    __slots__ = (
        "_fingerprints",
        "_header",
        "_header_name",
        "_max_body",
        "_max_body_digits",
        "_parse_key",
        "_required",
        "_shared",
        "_tenant_of",
        "app",
    )

    def __init__(
        self,
        app: ASGIApp,
        fingerprints: dict[str, Fingerprinter],
        parse_key: Callable[[bytes], str | None],
        header: str,
        required: bool,
        # Returns object: a compiled call checks a declared str itself, with mypyc's message.
        tenant: Callable[[Scope], object] | None,
        max_body: int,
        shared: Shared,
    ) -> None:
        """Set up from arguments IdempotencyMiddleware checked."""
        self.app = app
        self._fingerprints = fingerprints
        self._parse_key = parse_key
        self._header_name = header
        self._header = header.lower().encode("ascii")
        self._required = required
        self._tenant_of = tenant
        self._max_body = max_body
        # A declared length with fewer digits is within max_body: no int() of it.
        self._max_body_digits = len(str(max_body))
        self._shared = shared

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Read as a dict (see client_host in ttlstore._ratelimit_run); passed on as given.
        request = scope if type(scope) is dict else dict(scope)
        if request["type"] != "http":
            await self.app(scope, receive, send)
            return
        fingerprinter = self._fingerprints.get(request["method"])
        if fingerprinter is None:
            await self.app(scope, receive, send)
            return
        # One pass over the request's headers. Names are compared as given: ASGI servers
        # hand them over lower-cased (Starlette's own Headers relies on that too).
        wanted = self._header
        # Any, as a server hands them: the compiled build must not refuse a bytes-like value
        # with mypyc's own TypeError where the interpreted one takes it.
        raw: Any = None
        declared: Any = None
        for name, value in request["headers"]:
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
        # What clients send, "key", read here; the rest (and a bytes-like value) in full.
        key = plain_key(raw) if type(raw) is bytes else None
        if key is None:
            key = self._parse_key(raw)
        if key is None:
            detail = f"must be a quoted string or a token of 1 to {MAX_KEY_LENGTH} characters"
            await self._problem(send, 400, "Malformed idempotency key", detail)
            return
        limit = self._max_body
        try:
            if (
                declared is not None
                and len(declared) >= self._max_body_digits
                and declared.isdigit()
                and int(declared) > limit
            ):
                raise BodyTooLarge
            message = await receive()
            first = message if type(message) is dict else dict(message)
            if first["type"] == "http.request" and not first.get("more_body", False):
                chunk: Any = first.get("body", b"")  # the usual one-message body
                if len(chunk) > limit:
                    raise BodyTooLarge
                body: bytes | None = chunk if type(chunk) is bytes else bytes(chunk)
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
            request.get("raw_path") or request["path"].encode("utf-8"),
            request.get("query_string", b""),
            body,
        )
        shared = self._shared
        # Any: whatever a backend answers is checked below with this package's messages, not
        # cast (with mypyc's) by the compiled build.
        outcome: Any
        try:
            core = shared.core
            store = shared.sync_store
            if core is not None:
                outcome = claim(core, lookup, print_)  # a token, a record, or an Outcome
            elif store is not None:
                outcome = store.begin(lookup, print_)
            else:
                outcome = await shared.async_store.begin(lookup, print_)
        except Exception as error:
            shared.failed(error, "on begin()")
            await send_problem(send, 503, "Idempotency store unavailable", headers=[_RETRY_AFTER])
            return
        token: Any = None
        if type(outcome) is str:
            token = outcome  # a claim's token, from claim(), which builds no Started
        elif isinstance(outcome, _STARTED):
            token = outcome.token
        if token is not None:
            # Inline rather than a call: one coroutine less on every first request.
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
            return
        # A replay: from claim(), the record itself, (fingerprint, status, headers, body) for
        # a stored response (IdempotencyCore.complete flattens it); else a Replay.
        response: tuple[Any, Any, Any]
        if type(outcome) is tuple:
            response = outcome[1:] if len(outcome) == 4 else _check_stored(outcome[1])
        elif isinstance(outcome, _REPLAY):
            result: object = outcome.result
            response = result if type(result) is _STORED_RESPONSE else _check_stored(result)
        else:
            await self._answer(send, lookup, outcome)
            return
        status, stored, body = response
        headers = [*stored, _REPLAYED]
        for name, _ in stored:
            if name == b"content-length" or name.lower() == b"content-length":
                break
        else:
            headers.append((b"content-length", b"%d" % len(body)))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

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

    def _tenant(self, scope: Scope) -> str:
        assert self._tenant_of is not None
        tenant = self._tenant_of(scope)
        if not isinstance(tenant, str):
            raise TypeError(f"tenant callable must return a str, got {tenant!r}")
        return tenant


def _check_stored(response: object) -> StoredResponse:
    if not isinstance(response, StoredResponse):
        raise TypeError(f"the idempotency store holds {response!r}, not a StoredResponse")
    return response
