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

import functools
import math
from collections.abc import Callable

import http_sf

from ttlstore._ratelimit_run import (
    SF_INTEGER_MAX,
    RateLimitRun,
    client_host,
    ratelimit_field,
)
from ttlstore.asgi._http import ASGIApp, Scope
from ttlstore.ratelimit import AsyncLimiter, Limit, Limiter

__all__ = ["RateLimitMiddleware", "client_host", "ratelimit_field"]

KeyFunction = Callable[[Scope], str | None]


def _item(name: str, **params: int) -> http_sf.ItemType:
    """A Structured Field Item: the policy name as a String, with Integer parameters."""
    return (name, {key: min(value, SF_INTEGER_MAX) for key, value in params.items()})


class RateLimitMiddleware(RateLimitRun):
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
        # The policy does not change between requests: serialise it once. This also checks
        # every name (a bad one fails here, at startup, not on the first request).
        limits = tuple(limiter.limits)
        policy: http_sf.ListType = [
            _item(_name(policy_name, limit), q=limit.capacity, w=max(1, math.ceil(limit.window)))
            for limit in limits
        ]
        super().__init__(
            app,
            limiter,
            key,
            headers,
            (b"ratelimit-policy", http_sf.ser(policy).encode("ascii")),
            {id(limit): _serialised_name(policy_name, limit) for limit in limits},
            functools.partial(_serialised_name, policy_name),
            limits,
        )


def _name(policy_name: str, limit: Limit) -> str:
    return policy_name if limit.name is None else limit.name


def _serialised_name(policy_name: str, limit: Limit) -> bytes:
    return http_sf.ser(_name(policy_name, limit)).encode("ascii")
