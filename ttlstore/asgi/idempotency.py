"""IdempotencyMiddleware: at-most-once POST and PATCH for any ASGI app (``Idempotency-Key``).

:class:`IdempotencyMiddleware` implements the ``Idempotency-Key`` request header (IETF draft
*The Idempotency-Key HTTP Header Field*, Stripe's behaviour) on any
:class:`~ttlstore.idempotency.IdempotencyBackend`. Needs the ``asgi`` extra (``http-sf``). The
key parser and the fingerprint live in :mod:`ttlstore.asgi._idem_key`, one owner's run in
:mod:`ttlstore.asgi._idem_run`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable
from typing import Any

from ttlstore._checks import positive_int
from ttlstore.asgi._http import ASGIApp, Receive, Scope, Send, send_problem
from ttlstore.asgi._idem_key import (
    MAX_KEY_LENGTH,
    Fingerprinter,
    fingerprint,
    is_token,
    parse_idempotency_key,
    quoted_key,
)
from ttlstore.asgi._idem_run import BodyTooLarge, Run, Shared, read_body
from ttlstore.idempotency import (
    AsyncIdempotencyBackend,
    Busy,
    IdempotencyBackend,
    InProgress,
    Mismatch,
    Outcome,
    Replay,
    Started,
)
from ttlstore.records import StoredResponse

__all__ = [
    "DEFAULT_MAX_BODY",
    "DEFAULT_MAX_RESPONSE",
    "DEFAULT_STORE_STATUSES",
    "MAX_KEY_LENGTH",
    "IdempotencyMiddleware",
    "fingerprint",
    "parse_idempotency_key",
]

DEFAULT_MAX_BODY = 1 << 20
"""Largest request body (bytes) accepted with an idempotency key: 1 MiB."""

DEFAULT_MAX_RESPONSE = 64 << 10
"""Largest response body (bytes) stored for replay: 64 KiB (5 000 records: at most ~330 MB)."""

DEFAULT_STORE_STATUSES: frozenset[int] = frozenset(range(200, 500)) - {401, 408, 425, 429}
"""Statuses whose responses are stored and replayed: every 2xx, 3xx and 4xx except those that
say the request was not acted on and invite a retry as it is (401 Unauthorized, 408 Request
Timeout, 425 Too Early, 429 Too Many Requests). A 5xx is not stored: it usually means the
handler failed before its effect was committed, or a dependency was down, so the retry should
run again rather than replay the failure for the record's whole TTL. Pass
``store_statuses=range(100, 600)`` for Stripe's behaviour (every executed result is stored)."""

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


def _check_statuses(statuses: object) -> frozenset[int]:
    if isinstance(statuses, (str, bytes)) or not isinstance(statuses, Iterable):
        raise TypeError(f"store_statuses must be a collection of ints, got {statuses!r}")
    result = frozenset(statuses)
    for status in result:
        if isinstance(status, bool) or not isinstance(status, int):
            raise TypeError(f"store_statuses must hold ints, got {status!r}")
        if not 100 <= status <= 599:
            raise ValueError(f"store_statuses must hold HTTP statuses 100..599, got {status!r}")
    return result


def _check_methods(methods: object) -> frozenset[str]:
    if isinstance(methods, (str, bytes)) or not isinstance(methods, Iterable):
        raise TypeError(f"methods must be a collection of method names, got {methods!r}")
    result = frozenset(methods)
    for method in result:
        if not isinstance(method, str):
            raise TypeError(f"methods must hold HTTP method names (str), got {method!r}")
        if not is_token(method):
            raise ValueError(f"methods must hold HTTP method names, got {method!r}")
    return frozenset(method.upper() for method in result)


class IdempotencyMiddleware:
    """ASGI middleware: a request with an ``Idempotency-Key`` runs at most once per key.

    For the ``methods`` given, a request carrying the ``header``:

    * runs normally the first time; its response (status, headers, body) is stored if its
      status is in ``store_statuses`` and its headers and body fit ``max_response`` bytes,
      else the key is released and a retry runs again;
    * with the same key and the same method, path, query and body, gets the stored response
      back, with ``Idempotent-Replayed: true``, and does not run;
    * while the first is still running: 409 with ``Retry-After: 1`` if this middleware runs it
      (it ends soon), else the seconds left of its lease, rounded up, as the store tells them
      (another replica's request, or a backend that knows no lease: 1);
    * with the same key and a different request: 422;
    * with a malformed key (not a structured-field string or token of 1..255 characters): 400,
      and so is a missing key when ``required=True``;
    * with a body over ``max_body`` bytes: 413, and the app does not run. A request that asks
      for at-most-once execution is refused rather than quietly run unprotected;
    * when the store's in-flight table is full, or the store fails: 503, ``Retry-After: 1``.
      Store faults are counted (:attr:`faults`) and logged at most once per 10 s.

    Errors are ``application/problem+json``. Requests without the header, other methods, and
    non-HTTP scopes pass through untouched.

    Responses stream to the client as the app sends them; only a copy of at most
    ``max_response`` body bytes is kept, and the result is stored before the last chunk is
    forwarded, so a client that drops the connection at the end can still retry and replay.

    :param store: an :class:`~ttlstore.idempotency.IdempotencyStore` or any sync or async
        backend (sync ones are called inline on the event loop, so must not block).
    :param tenant: ``tenant(asgi_scope) -> str`` names the client (tenant, API key) so that one
        client can never receive another's stored response. The default puts every client in
        one namespace: right only for single-tenant services.
    """

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
        store: IdempotencyBackend[StoredResponse] | AsyncIdempotencyBackend[StoredResponse],
        *,
        methods: Iterable[str] = ("POST", "PATCH"),
        header: str = "Idempotency-Key",
        required: bool = False,
        tenant: Callable[[Scope], str] | None = None,
        max_body: int = DEFAULT_MAX_BODY,
        max_response: int = DEFAULT_MAX_RESPONSE,
        store_statuses: Collection[int] = DEFAULT_STORE_STATUSES,
    ) -> None:
        if not callable(app):
            raise TypeError(f"app must be an ASGI application, got {app!r}")
        if not isinstance(header, str):
            raise TypeError(f"header must be a header field name (str), got {header!r}")
        if not is_token(header):
            raise ValueError(f"header must be a header field name, got {header!r}")
        if not isinstance(required, bool):
            raise TypeError(f"required must be a bool, got {required!r}")
        if tenant is not None and not callable(tenant):
            raise TypeError(f"tenant must be a callable(asgi_scope) -> str or None, got {tenant!r}")
        self.app = app
        # Method -> its fingerprint function: which methods are guarded, and their hash
        # states set up once.
        self._fingerprints = {method: Fingerprinter(method) for method in _check_methods(methods)}
        self._header_name = header
        self._header = header.lower().encode("ascii")
        self._required = required
        self._tenant_of = tenant
        self._max_body = positive_int("max_body", max_body)
        self._shared = Shared(
            store, positive_int("max_response", max_response), _check_statuses(store_statuses)
        )

    @property
    def faults(self) -> int:
        """Store faults met so far (each answered 503 or logged); logged at most every 10 s."""
        return self._shared.faults.count

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
