"""RateLimitMiddleware's per-request path: decide, answer 429 or pass on with the fields.

mypyc compiles this module with the core, so a request costs the compiled build no
interpreted frame here; :class:`ttlstore.asgi.ratelimit.RateLimitMiddleware`, always
interpreted, checks the arguments and serialises what is constant per limiter (with the
messages and signature users see, which a compiled ``__init__`` would pre-empt with mypyc's
own type errors). It imports nothing from ``ttlstore.asgi`` (see :mod:`ttlstore._asgi_base`).
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, Final

from ttlstore._asgi_base import (
    ASGIApp,
    Message,
    Receive,
    Scope,
    Send,
    keeps_methods,
    send_problem,
)
from ttlstore._bucket_steps import LimiterCore, acquire_fields
from ttlstore._errors import BackendUnavailable
from ttlstore._faults import FaultLog
from ttlstore._gcra import DecisionFields
from ttlstore._limits import Limit
from ttlstore._mypyc import mypyc_attr

__all__ = ["FIELDS_KEPT", "SF_INTEGER_MAX", "RateLimitRun", "client_host", "ratelimit_field"]

logger: Final = logging.getLogger("ttlstore")

# The largest Structured Field Integer (15 digits). A window or a wait beyond it (over 31
# million years, which a Limit allows) is sent as this: the fields must always serialise.
SF_INTEGER_MAX: Final = 999_999_999_999_999

# The most (remaining, reset, limit) response fields a middleware keeps formatted.
FIELDS_KEPT: Final = 1024

Fields = tuple[tuple[bytes, bytes], ...]


def client_host(scope: Scope) -> str | None:
    """The peer address of the connection (``scope["client"][0]``), or None if unknown.

    Behind a reverse proxy every request comes from the proxy: pass a key function that reads
    the client from ``X-Forwarded-For`` instead, and only when that proxy is trusted to set it
    (otherwise any client picks its own key, and its own fresh bucket, per request).
    """
    # A dict's own get (any other mapping copied first): compiled, Mapping.get is a call by
    # name with its arguments parsed (330 instructions, against 60).
    client = (scope if type(scope) is dict else dict(scope)).get("client")
    return None if client is None else str(client[0])


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
        remaining if remaining < SF_INTEGER_MAX else SF_INTEGER_MAX,
        reset if reset < SF_INTEGER_MAX else SF_INTEGER_MAX,
    )


# Subclassed by the interpreted RateLimitMiddleware (see the module's docstring).
@mypyc_attr(allow_interpreted_subclasses=True)
class RateLimitRun:
    """The state a RateLimitMiddleware's requests read, and the request itself."""

    def __init__(
        self,
        app: ASGIApp,
        limiter: Any,
        key: Callable[[Scope], str | None],
        headers: bool,
        policy_field: tuple[bytes, bytes],
        names: dict[int, bytes],
        serialise: Callable[[Limit], bytes],
        limits: tuple[Limit, ...],
    ) -> None:
        self.app = app
        self.limiter = limiter
        self._key = key
        self._headers = headers
        self._warned_no_client = False
        self._acquire: Callable[[str, int], Any] = limiter.acquire
        self._awaited = inspect.iscoroutinefunction(limiter.acquire)
        # An in-memory limiter whose acquire is LimiterCore's is called through
        # acquire_fields (no Decision built); one that overrides acquire (in its class or on
        # the instance), through acquire.
        own = keeps_methods(limiter, LimiterCore, ("acquire",))
        self._core: LimiterCore | None = limiter if own else None
        self._faults = FaultLog("RateLimitMiddleware: the limiter failed")
        self._policy_field = policy_field
        # Each limit's name as a serialised String, by the id of the limit (which _limits
        # keeps alive, so no id is reused); a name the table lacks comes from _serialise.
        self._limits = limits
        self._names = names
        self._serialise = serialise
        self._fields: dict[tuple[int, int, int], Fields] = {}

    @property
    def faults(self) -> int:
        """Limiter faults met so far (each answered 503); logged at most every 10 s."""
        return self._faults.count

    def _new_fields(self, remaining: int, reset: int, limit: Limit) -> Fields:
        """The response fields for a decision, kept for the next request that repeats it.

        Most requests repeat one of a few (remaining, reset) pairs per limit, so the fields
        are looked up rather than formatted (a lookup took 54 ns against 360 ns to format
        them, timeit, CPython 3.11); the table is emptied when it reaches FIELDS_KEPT
        entries, so it stays bounded.
        """
        name = self._names.get(id(limit))
        fields = (
            self._policy_field,
            (
                b"ratelimit",
                # A Limit the limiter does not list: serialise its name now, keep nothing.
                ratelimit_field(self._serialise(limit) if name is None else name, remaining, reset),
            ),
        )
        if name is not None:
            if len(self._fields) >= FIELDS_KEPT:
                self._fields.clear()
            self._fields[remaining, reset, id(limit)] = fields
        return fields

    def _warn_no_client(self) -> None:
        if self._key is client_host and not self._warned_no_client:
            self._warned_no_client = True
            logger.warning(
                "RateLimitMiddleware: a request has no client address (scope['client'] "
                "is None, as behind a Unix socket), so requests without one are NOT rate "
                "limited; pass key= a function of the ASGI scope that names the client "
                "(an API key, or X-Forwarded-For set by a trusted proxy). "
                "Logged once per middleware."
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key = self._key(scope)
        if key is None:
            self._warn_no_client()
            await self.app(scope, receive, send)
            return
        try:
            core = self._core
            if core is not None:
                decision: DecisionFields = acquire_fields(core, key)
            else:
                result: Any = self._acquire(key, 1)
                # A Decision is a tuple; anything else from a sync-looking acquire may be
                # awaitable.
                if self._awaited or (not isinstance(result, tuple) and inspect.isawaitable(result)):
                    result = await result
                decision = result
        except BackendUnavailable as error:
            # A shared limiter whose on_error policy is "raise": neither allow nor refuse.
            # Counted, and logged once per interval: an outage fails every request.
            self._faults.log(error)
            await send_problem(
                send, 503, "Rate limiter unavailable", headers=[(b"retry-after", b"1")]
            )
            return
        allowed, remaining, retry_after, _, refill_after, limit, degraded = decision
        reset = math.ceil(refill_after)
        fields: Fields = ()
        # A degraded decision (a shared limiter's on_error policy answered without its
        # backend) knows nothing of the bucket: advertise no state it does not have.
        if self._headers and degraded is None:
            fields = self._fields.get((remaining, reset, id(limit))) or self._new_fields(
                remaining, reset, limit
            )
        if not allowed:
            # The draft: Retry-After SHOULD NOT point earlier than the reset parameter.
            retry = max(math.ceil(retry_after), reset)
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
                # A copy (the app may reuse its message objects), read as a dict (see
                # client_host).
                start = message if type(message) is dict else dict(message)
                message = {**start, "headers": [*start.get("headers", ()), *fields]}
            return send(message)

        await self.app(scope, receive, send_with_fields)
