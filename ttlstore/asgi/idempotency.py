"""IdempotencyMiddleware: at-most-once POST and PATCH for any ASGI app (``Idempotency-Key``).

:class:`IdempotencyMiddleware` implements the ``Idempotency-Key`` request header (IETF draft
*The Idempotency-Key HTTP Header Field*, Stripe's behaviour) on any
:class:`~ttlstore.idempotency.IdempotencyBackend`. Needs the ``asgi`` extra (``http-sf``).
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
from collections.abc import Callable, Collection, Coroutine, Iterable
from typing import Any, cast

import http_sf

from ttlstore._checks import positive_int
from ttlstore._errors import BackendUnavailable
from ttlstore._faults import FaultLog
from ttlstore.asgi._http import ASGIApp, Message, Receive, Scope, Send, send_problem
from ttlstore.idempotency import (
    AsyncIdempotencyBackend,
    Busy,
    IdempotencyBackend,
    InProgress,
    Mismatch,
    Outcome,
    Replay,
    Started,
    as_async_backend,
    is_async_backend,
)
from ttlstore.records import StoredResponse

__all__ = [
    "DEFAULT_MAX_BODY",
    "DEFAULT_MAX_RESPONSE",
    "DEFAULT_STORE_STATUSES",
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

MAX_KEY_LENGTH = 255
"""Longest idempotency key accepted, in characters."""

# A 409's Retry-After is at most a day, even for a backend configured with a longer lease.
_RETRY_AFTER_MAX = 86_400

# Retry-After on 503, and on a 409 whose owner runs in this process: a held key frees as soon
# as its request ends, usually well before its lease, so a short hint serves clients better.
_RETRY_AFTER = (b"retry-after", b"1")
_REPLAYED = (b"idempotent-replayed", b"true")

# RFC 9110 token characters: a bare key such as a UUID that does not parse as a structured
# field item (one starting with a digit parses as an Integer or fails) is accepted as a token.
_TCHARS = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

# A String of printable ASCII without escapes: what http_sf parses to exactly the characters
# between the quotes. Together with _TCHARS this is every key a client actually sends.
_PLAIN_STRING = re.compile(rb'"([ !#-\[\]-~]*)"')

# Prefix of every lookup key this middleware builds, so that a store it shares with
# @idempotent (whose keys start with a function's name) never mixes the two.
_NAMESPACE = "asgi"

_LENGTH = struct.Struct(">Q").pack
_blake2b = hashlib.blake2b


def parse_idempotency_key(value: bytes) -> str | None:
    """The key carried by an ``Idempotency-Key`` field value, or None if it is malformed.

    Accepts an RFC 9651 String (``"abc"``, parsed by ``http_sf``), a Token (``abc``), or any
    bare run of RFC 9110 token characters (``8e03978e-40d5``); parameters are ignored, as none
    are defined for this field. The key must have 1 to :data:`MAX_KEY_LENGTH` characters.
    Several field lines, combined with commas, are malformed. O(len(value)).

    A plain quoted string (printable ASCII, no escapes) and a bare run of token characters
    are read directly; anything else goes through ``http_sf``. Both paths give the same
    answer for every value (a property test compares them).
    """
    stripped = value.strip(b" \t")
    plain = _PLAIN_STRING.fullmatch(stripped)
    if plain is not None:
        raw = plain.group(1)
    elif _TCHARS.fullmatch(stripped) is not None:
        raw = stripped
    else:
        return _parse_structured(stripped)
    return raw.decode("ascii") if 1 <= len(raw) <= MAX_KEY_LENGTH else None


def _parse_structured(stripped: bytes) -> str | None:
    """:func:`parse_idempotency_key` by ``http_sf``, for every value the fast paths skip."""
    try:
        parsed = http_sf.parse(bytes(stripped), tltype="item")
    except http_sf.StructuredFieldError:
        parsed = None
    item = parsed[0] if isinstance(parsed, tuple) else None
    if isinstance(item, str):
        key = item
    elif isinstance(item, http_sf.Token):
        key = str(item)
    elif _TCHARS.fullmatch(stripped):
        key = stripped.decode("ascii")
    else:
        return None
    return key if 1 <= len(key) <= MAX_KEY_LENGTH else None


def fingerprint(method: str, path: bytes, query: bytes, body: bytes) -> str:
    """BLAKE2b-128 (hex) over method, path, query and body, each prefixed with its length as 8
    big-endian bytes, so that none can bleed into the next. O(len(body)).

    A cryptographic hash, so two requests share a fingerprint only by design; BLAKE2b rather
    than SHA-256 because it costs a third less on the small bodies an API sees.
    """
    verb = method.encode("ascii")
    digest = _blake2b(
        b"".join(
            (
                _LENGTH(len(verb)),
                verb,
                _LENGTH(len(path)),
                path,
                _LENGTH(len(query)),
                query,
                _LENGTH(len(body)),
            )
        ),
        digest_size=16,
    )
    digest.update(body)
    return digest.hexdigest()


class _BodyTooLarge(Exception):
    """The request body outgrew ``max_body`` while it was being read."""


async def _read_body(receive: Receive, message: Message, limit: int) -> bytes | None:
    """The whole request body, starting from its first ``message``; None if the client
    disconnected first.

    Raises :class:`_BodyTooLarge` as soon as more than ``limit`` bytes have arrived, so at
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
                raise _BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
        message = await receive()


class _Shared:
    """What every run of one middleware shares: the store (sync, or async), the response
    limit, the statuses to store, and the fault logs."""

    __slots__ = ("async_store", "faults", "late", "limit", "statuses", "sync_store")

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
        self.limit = limit
        self.statuses = statuses
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


class _Run:
    """One request run by its key's owner: hands the app the body already read, forwards the
    response as it streams by while keeping a copy of at most ``limit`` bytes of headers and
    body, and ends the claim exactly once.

    The response itself is never held back. A response that outgrows the limit, has a status
    not to be stored, or uses a message the copy cannot capture (trailers,
    ``http.response.pathsend``) drops its copy and releases the key.
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
        "storable",
        "token",
    )

    def __init__(
        self, shared: _Shared, lookup: str, token: str, body: bytes, receive: Receive, send: Send
    ) -> None:
        self.shared = shared
        self.lookup = lookup
        self.token = token
        self.body: bytes | None = body
        self.receive_rest = receive
        self.send_on = send
        self.status = 0
        self.headers: tuple[tuple[bytes, bytes], ...] = ()
        self.chunks: list[bytes] = []
        self.size = 0
        self.storable = True
        self.settled = False

    async def receive(self) -> Message:
        """The body read before the claim, then the server's own messages (a disconnect)."""
        body = self.body
        if body is not None:
            self.body = None
            return {"type": "http.request", "body": body, "more_body": False}
        return await self.receive_rest()

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            if self.storable:
                chunk = message.get("body", b"")
                self.size += len(chunk)
                if self.size > self.shared.limit:
                    self.drop()
                else:
                    self.chunks.append(chunk if type(chunk) is bytes else bytes(chunk))
            if not message.get("more_body", False) and not self.settled:
                # Store before the last chunk leaves: a client that disconnects now and
                # retries gets the replay, not a second execution.
                pending = self.settle(True)
                if pending is not None:
                    await pending
        elif kind == "http.response.start":
            self.start(message)
        else:
            self.drop()
        await self.send_on(message)

    def start(self, message: Message) -> None:
        self.status = status = int(message["status"])
        copied = []
        size = 0
        for name, value in message.get("headers", ()):
            if type(name) is not bytes:
                name = bytes(name)
            if type(value) is not bytes:
                value = bytes(value)
            copied.append((name, value))
            size += len(name) + len(value)
        # An immutable copy: the app may reuse its list.
        self.headers = tuple(copied)
        # Headers count against the limit too: a record's size is what it holds.
        self.size = size
        shared = self.shared
        if status not in shared.statuses or message.get("trailers", False) or size > shared.limit:
            self.drop()

    def drop(self) -> None:
        self.storable = False
        self.chunks.clear()

    def settle(self, keep: bool) -> Coroutine[Any, Any, None] | None:
        """End the claim: store the copy (``keep`` and storable) or release the key. Done here
        for a sync store; for an async one, the coroutine to await. A store fault is logged:
        the response is the app's and goes out regardless, and the lease ends the claim."""
        self.settled = True
        response = (
            StoredResponse(self.status, self.headers, b"".join(self.chunks))
            if keep and self.storable and self.status
            else None
        )
        shared = self.shared
        store = shared.sync_store
        if store is None:
            return self._settle_async(response)
        try:
            if response is None:
                store.release(self.lookup, self.token)
            elif not store.complete(self.lookup, self.token, response):
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


def _is_token(text: str) -> bool:
    """Whether ``text`` is an RFC 9110 token (a method or a header field name)."""
    return text.isascii() and _TCHARS.fullmatch(text.encode("ascii")) is not None


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
        if not _is_token(method):
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
        "_header",
        "_header_name",
        "_max_body",
        "_methods",
        "_required",
        "_running",
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
        if not _is_token(header):
            raise ValueError(f"header must be a header field name, got {header!r}")
        if not isinstance(required, bool):
            raise TypeError(f"required must be a bool, got {required!r}")
        if tenant is not None and not callable(tenant):
            raise TypeError(f"tenant must be a callable(asgi_scope) -> str or None, got {tenant!r}")
        self.app = app
        self._methods = _check_methods(methods)
        self._header_name = header
        self._header = header.lower().encode("ascii")
        self._required = required
        self._tenant_of = tenant
        self._max_body = positive_int("max_body", max_body)
        self._shared = _Shared(
            store, positive_int("max_response", max_response), _check_statuses(store_statuses)
        )
        # Lookup key -> token of every request this middleware is running now: a 409 for one
        # of them says "retry in 1 s", since its owner is alive and ends it soon.
        self._running: dict[str, str] = {}

    @property
    def faults(self) -> int:
        """Store faults met so far (each answered 503 or logged); logged at most every 10 s."""
        return self._shared.faults.count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in self._methods:
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
        key = parse_idempotency_key(raw)
        if key is None:
            detail = f"must be a quoted string or a token of 1 to {MAX_KEY_LENGTH} characters"
            await self._problem(send, 400, "Malformed idempotency key", detail)
            return
        try:
            if declared is not None and declared.isdigit() and int(declared) > self._max_body:
                raise _BodyTooLarge
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                body: bytes | None = message.get("body", b"")  # the usual one-message body
                if len(body) > self._max_body:  # type: ignore[arg-type]
                    raise _BodyTooLarge
                if type(body) is not bytes:
                    body = bytes(body)  # type: ignore[arg-type]
            else:
                body = await _read_body(receive, message, self._max_body)
        except _BodyTooLarge:
            detail = f"allows request bodies of at most {self._max_body} bytes"
            await self._problem(send, 413, "Request body too large", detail)
            return
        if body is None:
            return  # the client is gone before anything ran: nothing to claim or answer
        tenant = "" if self._tenant_of is None else self._tenant(scope)
        lookup = f"{_NAMESPACE}\x00{tenant}\x00{key}"
        print_ = fingerprint(
            scope["method"],
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
        if isinstance(outcome, Started):
            # Inline rather than a call: one coroutine less on every first request.
            token = outcome.token
            run = _Run(shared, lookup, token, body, receive, send)
            running = self._running
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
        if lookup in self._running or left is None or not left > 1:
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
