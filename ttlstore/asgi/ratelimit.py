"""RateLimitMiddleware: per-client rate limiting for any ASGI app, with the IETF RateLimit fields.

Headers follow draft-ietf-httpapi-ratelimit-headers-10, serialised as Structured Fields with
``http_sf`` (the ``asgi`` extra). For a token bucket the fields read:

- ``RateLimit-Policy: "name";q=<capacity>;w=<window>``, one item per limit, where ``window`` is
  ``capacity / rate`` rounded up to whole seconds: the time an empty bucket takes to refill, so
  "q per w" is the sustained rate and q the largest burst.
- ``RateLimit: "name";r=<remaining>;t=<seconds>`` for the binding limit of this request, where
  ``t`` is the whole seconds (rounded up) until ``r`` next grows: the draft's "time until
  additional quota is made available". Quota comes back one token at a time, so ``t`` is not
  the time until the bucket is full.
- A refusal is ``429`` with ``Retry-After``: the whole seconds (rounded up) until the same
  request would pass, never below ``t``, and an ``application/problem+json`` body.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import http_sf

from ttlstore._errors import BackendUnavailable
from ttlstore._faults import FaultLog
from ttlstore.asgi._http import ASGIApp, Message, Receive, Scope, Send, send_problem
from ttlstore.ratelimit import AsyncLimiter, Decision, Limit, Limiter

__all__ = ["RateLimitMiddleware", "client_host", "ratelimit_field"]

KeyFunction = Callable[[Scope], str | None]

logger = logging.getLogger("ttlstore")

# The largest Structured Field Integer (15 digits). A window or a wait beyond it (over 31
# million years, which a Limit allows) is sent as this: the fields must always serialise.
_SF_INTEGER_MAX = 999_999_999_999_999

_ceil = math.ceil

# The most (remaining, reset, limit) response fields a middleware keeps formatted.
_FIELDS_KEPT = 1024


def client_host(scope: Scope) -> str | None:
    """The peer address of the connection (``scope["client"][0]``), or None if unknown.

    Behind a reverse proxy every request comes from the proxy: pass a key function that reads
    the client from ``X-Forwarded-For`` instead, and only when that proxy is trusted to set it
    (otherwise any client picks its own key, and its own fresh bucket, per request).
    """
    client = scope.get("client")
    return None if client is None else str(client[0])


def _item(name: str, **params: int) -> http_sf.ItemType:
    """A Structured Field Item: the policy name as a String, with Integer parameters."""
    return (name, {key: min(value, _SF_INTEGER_MAX) for key, value in params.items()})


def ratelimit_field(name: bytes, remaining: int, reset: int) -> bytes:
    """The ``RateLimit`` field value for one limit, as ``http_sf`` serialises it.

    ``name`` is the policy name already serialised as a Structured Field String
    (``http_sf.ser(name)``, computed once per limit); ``remaining`` and ``reset`` are
    non-negative ints, capped at the largest Structured Field Integer. Equal to
    ``http_sf.ser([(name, {"r": remaining, "t": reset})])`` (a property test checks it),
    at a twentieth of its cost.
    """
    return b"%s;r=%d;t=%d" % (
        name,
        remaining if remaining < _SF_INTEGER_MAX else _SF_INTEGER_MAX,
        reset if reset < _SF_INTEGER_MAX else _SF_INTEGER_MAX,
    )


class RateLimitMiddleware:
    """Refuse requests over the limit with 429; advertise the limits on every response.

    :param app: the ASGI app to guard.
    :param limiter: any :class:`~ttlstore.ratelimit.Limiter` or
        :class:`~ttlstore.ratelimit.AsyncLimiter` (whose ``acquire`` is awaited).
    :param key: ``key(scope)`` names the client's bucket; None lets the request through
        unlimited. Default: :func:`client_host` (see there about proxies). A request without
        a client address (a Unix socket, some test clients) then passes unlimited, and a
        warning on the ``ttlstore`` logger says so, once per middleware.
    :param headers: add ``RateLimit-Policy`` and ``RateLimit`` to every response, allowed or
        not. ``Retry-After`` is always sent with a 429.
    :param policy_name: the policy name in those fields for a limit without a ``name``
        (non-empty printable ASCII: it is sent as a Structured Field String).

    Only ``http`` requests are limited; ``websocket`` and ``lifespan`` pass through. Each
    request costs one token.
    """

    def __init__(
        self,
        app: ASGIApp,
        limiter: Limiter | AsyncLimiter,
        *,
        key: KeyFunction = client_host,
        headers: bool = True,
        policy_name: str = "default",
    ) -> None:
        if not callable(key):
            raise TypeError(f"key must be callable, got {key!r}")
        if not callable(getattr(limiter, "acquire", None)):
            raise TypeError(f"limiter must have an acquire(key, cost) method, got {limiter!r}")
        if not isinstance(headers, bool):
            raise TypeError(f"headers must be a bool, got {headers!r}")
        if not isinstance(policy_name, str):
            raise TypeError(f"policy_name must be a str, got {policy_name!r}")
        # It travels as a Structured Field String: printable ASCII only.
        if not policy_name or not all(" " <= ch <= "~" for ch in policy_name):
            raise ValueError(f"policy_name must be non-empty printable ASCII, got {policy_name!r}")
        self.app = app
        self.limiter = limiter
        self._key = key
        self._headers = headers
        self._policy_name = policy_name
        self._warned_no_client = False
        self._acquire = limiter.acquire
        self._awaited = inspect.iscoroutinefunction(limiter.acquire)
        self._faults = FaultLog("RateLimitMiddleware: the limiter failed")
        # The policy does not change between requests: serialise it once. This also checks
        # every name (a bad one fails here, at startup, not on the first request).
        policy: http_sf.ListType = [
            _item(self._name(limit.name), q=limit.capacity, w=max(1, math.ceil(limit.window)))
            for limit in limiter.limits
        ]
        self._policy_field = (b"ratelimit-policy", http_sf.ser(policy).encode("ascii"))
        # Each limit's name as a serialised String, for the per-request RateLimit field, by
        # the id of the limit (which _limits keeps alive, so no id is reused).
        self._limits = tuple(limiter.limits)
        self._serialised = {id(limit): self._serialised_name(limit) for limit in self._limits}
        self._fields: dict[tuple[int, int, int], tuple[tuple[bytes, bytes], ...]] = {}

    def _new_fields(
        self, remaining: int, reset: int, limit: Limit
    ) -> tuple[tuple[bytes, bytes], ...]:
        """The response fields for a decision, kept for the next request that repeats it.

        Most requests repeat one of a few (remaining, reset) pairs per limit, so the fields
        are looked up rather than formatted (a lookup took 54 ns against 360 ns to format
        them, timeit, CPython 3.11); the table is emptied when it reaches _FIELDS_KEPT
        entries, so it stays bounded.
        """
        name = self._serialised.get(id(limit))
        fields = (
            self._policy_field,
            (
                b"ratelimit",
                # A Limit the limiter does not list: serialise its name now, keep nothing.
                ratelimit_field(name or self._serialised_name(limit), remaining, reset),
            ),
        )
        if name is not None:
            if len(self._fields) >= _FIELDS_KEPT:
                self._fields.clear()
            self._fields[remaining, reset, id(limit)] = fields
        return fields

    def _name(self, name: str | None) -> str:
        return self._policy_name if name is None else name

    def _serialised_name(self, limit: Limit) -> bytes:
        return http_sf.ser(self._name(limit.name)).encode("ascii")

    @property
    def faults(self) -> int:
        """Limiter faults met so far (each answered 503); logged at most every 10 s."""
        return self._faults.count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key = self._key(scope)
        if key is None:
            if self._key is client_host and not self._warned_no_client:
                self._warned_no_client = True
                logger.warning(
                    "RateLimitMiddleware: a request has no client address (scope['client'] "
                    "is None, as behind a Unix socket), so requests without one are NOT rate "
                    "limited; pass key= a function of the ASGI scope that names the client "
                    "(an API key, or X-Forwarded-For set by a trusted proxy). "
                    "Logged once per middleware."
                )
            await self.app(scope, receive, send)
            return
        try:
            result: Any = self._acquire(key, 1)
            # A Decision is a tuple; anything else from a sync-looking acquire may be awaitable.
            if self._awaited or (not isinstance(result, tuple) and inspect.isawaitable(result)):
                result = await result
            decision: Decision = result
        except BackendUnavailable as error:
            # A shared limiter whose on_error policy is "raise": neither allow nor refuse.
            # Counted, and logged once per interval: an outage fails every request.
            self._faults.log(error)
            await send_problem(
                send, 503, "Rate limiter unavailable", headers=[(b"retry-after", b"1")]
            )
            return
        allowed, remaining, retry_after, _, refill_after, limit, degraded = decision
        reset = _ceil(refill_after)
        fields: tuple[tuple[bytes, bytes], ...] = ()
        # A degraded decision (a shared limiter's on_error policy answered without its
        # backend) knows nothing of the bucket: advertise no state it does not have.
        if self._headers and degraded is None:
            fields = self._fields.get((remaining, reset, id(limit))) or self._new_fields(
                remaining, reset, limit
            )
        if not allowed:
            # The draft: Retry-After SHOULD NOT point earlier than the reset parameter.
            retry = max(_ceil(retry_after), reset)
            await send_problem(
                send,
                429,
                "Too Many Requests",
                f"Rate limit exceeded; retry after {retry} s.",
                headers=[(b"retry-after", b"%d" % retry), *fields],
            )
            return
        if not fields:
            await self.app(scope, receive, send)
            return

        # A plain function handing back send's awaitable: as a coroutine of its own it added
        # a frame per message (750 instructions per request more, callgrind, CPython 3.11).
        def send_with_fields(message: Message) -> Awaitable[None]:
            if message["type"] == "http.response.start":
                # A copy: the app may reuse its message objects.
                message = {**message, "headers": [*message.get("headers", ()), *fields]}
            return send(message)

        await self.app(scope, receive, send_with_fields)
