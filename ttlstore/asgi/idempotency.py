"""IdempotencyMiddleware: at-most-once POST and PATCH for any ASGI app (``Idempotency-Key``).

:class:`IdempotencyMiddleware` implements the ``Idempotency-Key`` request header (IETF draft
*The Idempotency-Key HTTP Header Field*, Stripe's behaviour) on any
:class:`~ttlstore.idempotency.IdempotencyBackend`. Needs the ``asgi`` extra (``http-sf``). The
key parser lives in :mod:`ttlstore.asgi._idem_key`, the plain-key reader and the fingerprint
in :mod:`ttlstore._idem_read`, one owner's run in
:mod:`ttlstore._idem_run` and the request path, compiled in the compiled build, in
:mod:`ttlstore._idem_call`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable

from ttlstore._checks import positive_int
from ttlstore._idem_call import MiddlewareCore
from ttlstore._idem_run import Shared
from ttlstore.asgi._http import ASGIApp, Scope
from ttlstore.asgi._idem_key import (
    MAX_KEY_LENGTH,
    Fingerprinter,
    fingerprint,
    is_token,
    parse_idempotency_key,
)
from ttlstore.idempotency import (
    AsyncIdempotencyBackend,
    IdempotencyBackend,
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


class IdempotencyMiddleware(MiddlewareCore):
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

    # Every attribute is the compiled core's (ttlstore._idem_call), and so is __call__.
    __slots__ = ()

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
        super().__init__(
            app,
            # Method -> its fingerprint function: which methods are guarded, and their hash
            # states set up once.
            {method: Fingerprinter(method) for method in _check_methods(methods)},
            parse_idempotency_key,
            header,
            required,
            tenant,
            positive_int("max_body", max_body),
            Shared(
                store, positive_int("max_response", max_response), _check_statuses(store_statuses)
            ),
        )

    @property
    def faults(self) -> int:
        """Store faults met so far (each answered 503 or logged); logged at most every 10 s."""
        return self._shared.faults.count
