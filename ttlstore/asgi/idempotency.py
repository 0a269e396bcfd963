"""IdempotencyMiddleware: at-most-once POST and PATCH for any ASGI app (``Idempotency-Key``).

:class:`IdempotencyMiddleware` implements the ``Idempotency-Key`` request header (IETF draft
*The Idempotency-Key HTTP Header Field*, Stripe's behaviour) on any
:class:`~ttlstore.idempotency.IdempotencyBackend`. Needs the ``asgi`` extra (``http-sf``).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Collection, Iterable

import http_sf

from ttlstore._checks import positive_int
from ttlstore._errors import BackendUnavailable
from ttlstore.asgi._http import (
    ASGIApp,
    Message,
    Receive,
    Scope,
    Send,
    get_header,
    send_problem,
)
from ttlstore.idempotency import (
    AsyncIdempotencyBackend,
    Busy,
    IdempotencyBackend,
    InProgress,
    Mismatch,
    Replay,
    Started,
    as_async_backend,
)
from ttlstore.records import StoredResponse

__all__ = [
    "DEFAULT_MAX_BODY",
    "DEFAULT_MAX_RESPONSE",
    "DEFAULT_STORE_STATUSES",
    "IdempotencyMiddleware",
    "parse_idempotency_key",
]

logger = logging.getLogger("ttlstore")

# ====================================================================== idempotency

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

# Retry-After on 409 and 503: a held key frees as soon as its request ends, usually well before
# its lease, so a short hint serves clients better than the lease's worst case.
_RETRY_AFTER = (b"retry-after", b"1")

# RFC 9110 token characters: a bare key such as a UUID that does not parse as a structured
# field item (one starting with a digit parses as an Integer or fails) is accepted as a token.
_TCHARS = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

# Prefix of every lookup key this middleware builds, so that a store it shares with
# @idempotent (whose keys start with a function's name) never mixes the two.
_NAMESPACE = "asgi"


def parse_idempotency_key(value: bytes) -> str | None:
    """The key carried by an ``Idempotency-Key`` field value, or None if it is malformed.

    Accepts an RFC 9651 String (``"abc"``, parsed by ``http_sf``), a Token (``abc``), or any
    bare run of RFC 9110 token characters (``8e03978e-40d5``); parameters are ignored, as none
    are defined for this field. The key must have 1 to :data:`MAX_KEY_LENGTH` characters.
    Several field lines, combined with commas, are malformed. O(len(value)).
    """
    stripped = value.strip(b" \t")
    try:
        parsed = http_sf.parse(stripped, tltype="item")
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


def _field_value(scope: Scope, name: bytes) -> bytes | None:
    """All lines of header ``name`` combined with ", " as RFC 9110 does, or None. O(h)."""
    values = [bytes(value) for key, value in scope.get("headers", ()) if key.lower() == name]
    return b", ".join(values) if values else None


def _fingerprint(scope: Scope, body: bytes) -> str:
    """SHA-256 over method, path, query and body, each length-prefixed so none can bleed into
    the next. The raw path is used when the server gives it: ``/a%2Fb`` is not ``/a/b``."""
    path = scope.get("raw_path") or scope["path"].encode("utf-8")
    digest = hashlib.sha256()
    for part in (scope["method"].encode("ascii"), path, scope.get("query_string", b""), body):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def _declared_length(scope: Scope) -> int | None:
    """The request's Content-Length, or None if absent or not a plain decimal number."""
    value = get_header(scope, b"content-length")
    return int(value) if value is not None and value.isdigit() else None


class _BodyTooLarge(Exception):
    """The request body outgrew ``max_body`` while it was being read."""


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None if the client disconnected first.

    Raises :class:`_BodyTooLarge` as soon as more than ``limit`` bytes have arrived, so at
    most ``limit`` bytes (plus one chunk) are ever held.
    """
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        if message["type"] != "http.request":
            continue
        chunk = bytes(message.get("body", b""))
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replaying(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the app the already-read body, then defers to the server's."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive_body() -> Message:
        if pending:
            return pending.pop()
        return await receive()  # http.disconnect, for apps that watch for it

    return receive_body


class _Recorder:
    """Keeps a copy of a response as it streams by, up to ``limit`` bytes of headers and body.

    The response itself is never held back: each message is forwarded as it comes. A response
    that outgrows the limit, has a status not to be stored, or uses a message the recorder
    cannot capture (trailers, ``http.response.pathsend``) drops its copy and is not stored.
    """

    __slots__ = ("chunks", "headers", "limit", "size", "status", "statuses", "storable")

    def __init__(self, limit: int, statuses: frozenset[int]) -> None:
        self.limit = limit
        self.statuses = statuses
        self.status: int | None = None
        self.headers: tuple[tuple[bytes, bytes], ...] = ()
        self.chunks: list[bytes] = []
        self.size = 0
        self.storable = True

    def see(self, message: Message) -> bool:
        """Record ``message``; return whether it is the last one of the response body."""
        kind = message["type"]
        if kind == "http.response.start":
            self.status = int(message["status"])
            self.headers = tuple((bytes(k), bytes(v)) for k, v in message.get("headers", ()))
            # Headers count against the limit too: a record's size is what it holds.
            self.size = sum(len(k) + len(v) for k, v in self.headers)
            if (
                self.status not in self.statuses
                or message.get("trailers", False)
                or self.size > self.limit
            ):
                self._drop()
            return False
        if kind == "http.response.body":
            if self.storable:
                chunk = bytes(message.get("body", b""))
                self.size += len(chunk)
                if self.size > self.limit:
                    self._drop()
                else:
                    self.chunks.append(chunk)
            return not message.get("more_body", False)
        self._drop()
        return False

    def _drop(self) -> None:
        self.storable = False
        self.chunks.clear()

    def response(self) -> StoredResponse | None:
        """The recorded response if it may be stored, else None."""
        if not self.storable or self.status is None:
            return None
        return StoredResponse(self.status, self.headers, b"".join(self.chunks))


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
    * while the first is still running: 409, ``Retry-After: 1``;
    * with the same key and a different request: 422;
    * with a malformed key (not a structured-field string or token of 1..255 characters): 400,
      and so is a missing key when ``required=True``;
    * with a body over ``max_body`` bytes: 413, and the app does not run. A request that asks
      for at-most-once execution is refused rather than quietly run unprotected;
    * when the store's in-flight table is full, or the store fails: 503, ``Retry-After: 1``.

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
        "_max_response",
        "_methods",
        "_required",
        "_statuses",
        "_store",
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
        self._store = as_async_backend(store, name="store")
        self._methods = _check_methods(methods)
        self._header_name = header
        self._header = header.lower().encode("ascii")
        self._required = required
        self._tenant_of = tenant
        self._max_body = positive_int("max_body", max_body)
        self._max_response = positive_int("max_response", max_response)
        self._statuses = _check_statuses(store_statuses)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in self._methods:
            await self.app(scope, receive, send)
            return
        raw = _field_value(scope, self._header)
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
        declared = _declared_length(scope)
        try:
            if declared is not None and declared > self._max_body:
                raise _BodyTooLarge
            body = await _read_body(receive, self._max_body)
        except _BodyTooLarge:
            detail = f"allows request bodies of at most {self._max_body} bytes"
            await self._problem(send, 413, "Request body too large", detail)
            return
        if body is None:
            return  # the client is gone before anything ran: nothing to claim or answer
        lookup = f"{_NAMESPACE}\x00{self._tenant(scope)}\x00{key}"
        try:
            outcome = await self._store.begin(lookup, _fingerprint(scope, body))
        except Exception as error:
            if isinstance(error, BackendUnavailable):
                # Expected while a shared backend is down: one line, not a traceback a request.
                logger.warning("IdempotencyMiddleware: %s", error)
            else:
                logger.exception("IdempotencyMiddleware: the store failed on begin()")
            await send_problem(send, 503, "Idempotency store unavailable", headers=[_RETRY_AFTER])
            return
        if isinstance(outcome, Started):
            await self._run(scope, _replaying(body, receive), send, lookup, outcome.token)
        elif isinstance(outcome, Replay):
            await _send_replay(send, outcome.result)
        elif isinstance(outcome, InProgress):
            detail = "belongs to a request that is still being processed; retry later"
            await self._problem(send, 409, "Request in progress", detail, [_RETRY_AFTER])
        elif isinstance(outcome, Mismatch):
            detail = "was already used for a different request (method, path, query or body)"
            await self._problem(send, 422, "Idempotency key reused", detail)
        elif isinstance(outcome, Busy):
            detail = "cannot be claimed now: too many requests are in progress"
            await self._problem(send, 503, "Too many requests in progress", detail, [_RETRY_AFTER])
        else:
            raise TypeError(f"store.begin() answered {outcome!r}, which is no Outcome")

    def _tenant(self, scope: Scope) -> str:
        if self._tenant_of is None:
            return ""
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

    async def _run(
        self, scope: Scope, receive: Receive, send: Send, lookup: str, token: str
    ) -> None:
        """Run the app as the key's owner; store or release the claim exactly once."""
        recorder = _Recorder(self._max_response, self._statuses)
        store = self._store
        settled = False

        async def settle(response: StoredResponse | None) -> None:
            nonlocal settled
            if settled:
                return
            settled = True
            try:
                if response is None:
                    await store.release(lookup, token)
                elif not await store.complete(lookup, token, response):
                    logger.warning(
                        "IdempotencyMiddleware: the claim on %r ran out before the response "
                        "was complete (lease shorter than the request?); it was not stored",
                        lookup,
                    )
            except Exception:
                # The response is the app's and goes out regardless; the lease ends the claim.
                logger.exception("IdempotencyMiddleware: the store failed to end a claim")

        async def send_recording(message: Message) -> None:
            if recorder.see(message):
                # Store before the last chunk leaves: a client that disconnects now and
                # retries gets the replay, not a second execution.
                await settle(recorder.response())
            await send(message)

        try:
            await self.app(scope, receive, send_recording)
        finally:
            await settle(None)  # no complete body was sent: the retry must run again


async def _send_replay(send: Send, response: object) -> None:
    """Send a stored response again, marked ``Idempotent-Replayed: true``."""
    if not isinstance(response, StoredResponse):
        raise TypeError(f"the idempotency store holds {response!r}, not a StoredResponse")
    headers = list(response.headers)
    if not any(name.lower() == b"content-length" for name, _ in headers):
        headers.append((b"content-length", str(len(response.body)).encode("ascii")))
    headers.append((b"idempotent-replayed", b"true"))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body, "more_body": False})
