"""The ASGI section of ``python -m benchmarks.compare``: what a request pays for each middleware.

Every stack is driven in this process, without sockets or an HTTP client: one asyncio task calls
the ASGI application directly with a scope built beforehand, a ``receive`` that hands over a small
JSON body once, and a ``send`` that only looks at the status. Time is the process's CPU time
(``time.process_time_ns``), which other processes on a shared machine do not inflate. So what
differs between two stacks is only what their middlewares do.

Stacks (each one a fresh application, built once and warmed up):

- *bare ASGI app*: the harness and an app that answers a fixed JSON body (the floor);
- *Starlette endpoint*: a minimal ``Starlette`` app, one ``Route`` answering a ``JSONResponse``
  (the scale every added cost is divided by);
- each middleware wrapped around that Starlette app, ttlstore's and its peers' (``slowapi``
  for rate limiting; ``asgi-idempotency-header`` and ``fastapi-idempotency`` for idempotency),
  the idempotency ones on a new key per request and on a replay of a completed key;
- both ttlstore middlewares together (new keys).

A request that runs the endpoint pays *added* = stack - Starlette endpoint; a replay does not run
the endpoint, so it pays added = stack - bare app. The ratio is added / Starlette endpoint, the
scale of issue 12. Samples are interleaved round-robin across stacks as in the other sections,
and each figure is the median µs per request over the rounds.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import importlib.metadata
import itertools
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

BODY = json.dumps({"item": "book", "quantity": 2}).encode()
ANSWER = json.dumps({"order": 1, "status": "created"}).encode()
CLIENTS = 1_000  # distinct client addresses, cycled: each its own rate-limit bucket
STARLETTE = "Starlette endpoint"
BARE = "bare ASGI app"
COMPILED = "ttlstore compiled"

# Targets of issue 12: added cost / Starlette endpoint, and against the peer in the same run.
RATIO_LIMITS = {
    f"ttlstore{build} {stack}": limit
    for build in ("", " compiled")
    for stack, limit in (
        ("RateLimitMiddleware", 0.2),
        ("IdempotencyMiddleware, new key", 0.5),
        ("IdempotencyMiddleware, replay", 0.3),
        ("both, new key", 0.7),
    )
}
PEER_SHARE = 1 / 3


class Missing(Exception):
    """A peer is not installed."""


# ---------------------------------------------------------------------- the harness


class _Feed:
    """``receive`` and ``send`` for one request at a time; counts response statuses and keeps
    the last response's headers."""

    __slots__ = ("headers", "sent", "statuses")

    def __init__(self) -> None:
        self.sent = False
        self.statuses: dict[int, int] = {}
        self.headers: Any = ()

    async def receive(self) -> dict[str, Any]:
        if self.sent:
            return {"type": "http.disconnect"}
        self.sent = True
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status = message["status"]
            self.statuses[status] = self.statuses.get(status, 0) + 1
            self.headers = message["headers"]


def _scopes(n: int, keys: Sequence[bytes] | None, start: int) -> list[dict[str, Any]]:
    """``n`` POST /orders scopes as a server hands them over, each its own dict (apps write to
    their scope), with an ``Idempotency-Key`` from ``keys`` (cycled) if given."""
    scopes = []
    for i in range(start, start + n):
        headers = [
            (b"host", b"api.example"),
            (b"user-agent", b"bench/1.0"),
            (b"accept", b"*/*"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(BODY)).encode()),
        ]
        if keys is not None:
            headers.append((b"idempotency-key", keys[i % len(keys)]))
        scopes.append(
            {
                "type": "http",
                "asgi": {"version": "3.0", "spec_version": "2.3"},
                "http_version": "1.1",
                "method": "POST",
                "scheme": "http",
                "path": "/orders",
                "raw_path": b"/orders",
                "query_string": b"",
                "root_path": "",
                "headers": headers,
                "client": (f"10.0.{i % CLIENTS // 250}.{i % 250}", 50_000),
                "server": ("10.1.0.1", 80),
                "state": {},
            }
        )
    return scopes


async def _drive(app: Any, scopes: list[dict[str, Any]], feed: _Feed) -> int:
    receive, send = feed.receive, feed.send
    t0 = time.process_time_ns()
    for scope in scopes:
        feed.sent = False
        await app(scope, receive, send)
    return time.process_time_ns() - t0


# ---------------------------------------------------------------------- the stacks


async def _bare(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    await send(
        {
            "type": "http.response.start",
            "status": 201,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(ANSWER)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": ANSWER, "more_body": False})


def _starlette(middleware: Sequence[Any] = ()) -> Any:
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def create_order(request: Any) -> Any:
        return JSONResponse({"order": 1, "status": "created"}, status_code=201)

    return Starlette(
        routes=[Route("/orders", create_order, methods=["POST"])], middleware=middleware
    )


def _package(compiled: bool) -> str:
    """The ttlstore build to import: this source, or the mypyc-compiled copy of it."""
    if not compiled:
        return "ttlstore"
    from benchmarks import _compiled

    try:
        return _compiled.load()
    except _compiled.Unavailable as error:
        raise Missing(str(error)) from error


def _ttl_limiter(compiled: bool = False) -> Any:
    ratelimit = importlib.import_module(f"{_package(compiled)}.ratelimit")
    return ratelimit.TokenBucketLimiter(limits=[ratelimit.Limit.per(1_000, 60)])


def _ttl_ratelimit(app: Any, compiled: bool = False) -> Any:
    asgi = importlib.import_module(f"{_package(compiled)}.asgi")
    return asgi.RateLimitMiddleware(app, _ttl_limiter(compiled))


def _ttl_idempotency(app: Any, compiled: bool = False) -> Any:
    package = _package(compiled)
    asgi = importlib.import_module(f"{package}.asgi")
    idempotency = importlib.import_module(f"{package}.idempotency")
    return asgi.IdempotencyMiddleware(app, idempotency.IdempotencyStore())


def _slowapi() -> Any:
    try:
        from slowapi import Limiter
        from slowapi.middleware import SlowAPIASGIMiddleware
        from slowapi.util import get_remote_address
        from starlette.middleware import Middleware
    except ImportError as error:
        raise Missing(str(error)) from error
    app = _starlette([Middleware(SlowAPIASGIMiddleware)])
    app.state.limiter = Limiter(
        key_func=get_remote_address, default_limits=["1000/minute"], headers_enabled=True
    )
    return app


def _asgi_idempotency_header() -> Any:
    try:
        from idempotency_header_middleware import IdempotencyHeaderMiddleware
        from idempotency_header_middleware.backends.memory import MemoryBackend
    except ImportError as error:
        raise Missing(str(error)) from error
    return IdempotencyHeaderMiddleware(_starlette(), backend=MemoryBackend())


def _fastapi_idempotency() -> Any:
    try:
        from fastapi_idempotency import IdempotencyMiddleware
        from starlette.middleware import Middleware
    except ImportError as error:
        raise Missing(str(error)) from error
    return _starlette([Middleware(IdempotencyMiddleware)])


@dataclass(frozen=True)
class Stack:
    name: str
    build: Callable[[], Any]
    #: ``new``: a fresh idempotency key per request; ``replay``: keys completed in warm-up;
    #: None: no key.
    keys: str | None = None
    #: What its added cost is measured from (None: it is a reference row).
    base: str | None = STARLETTE
    #: The status every request must get.
    status: int = 201
    #: The distribution that must be installed (peers), for the version column.
    distribution: str | None = None
    #: The peer this ttlstore stack is held to (added at most a third of the peer's).
    peer: str | None = None


def _ttlstore_stacks(compiled: bool) -> tuple[Stack, ...]:
    """ttlstore's four stacks, on the pure package or on the compiled copy of it."""
    build = COMPILED if compiled else "ttlstore"
    return (
        Stack(
            f"{build} RateLimitMiddleware",
            lambda: _ttl_ratelimit(_starlette(), compiled),
            peer="slowapi",
            distribution="ttlstore",
        ),
        Stack(
            f"{build} IdempotencyMiddleware, new key",
            lambda: _ttl_idempotency(_starlette(), compiled),
            keys="new",
            peer="asgi-idempotency-header, new key",
            distribution="ttlstore",
        ),
        Stack(
            f"{build} IdempotencyMiddleware, replay",
            lambda: _ttl_idempotency(_starlette(), compiled),
            keys="replay",
            base=BARE,
            peer="asgi-idempotency-header, replay",
            distribution="ttlstore",
        ),
        Stack(
            f"{build} both, new key",
            lambda: _ttl_ratelimit(_ttl_idempotency(_starlette(), compiled), compiled),
            keys="new",
            distribution="ttlstore",
        ),
    )


STACKS: tuple[Stack, ...] = (
    Stack(BARE, lambda: _bare, base=None),
    Stack(STARLETTE, _starlette, base=None, distribution="starlette"),
    *_ttlstore_stacks(compiled=False),
    *_ttlstore_stacks(compiled=True),
    Stack("slowapi", _slowapi, distribution="slowapi"),
    Stack(
        "asgi-idempotency-header, new key",
        _asgi_idempotency_header,
        keys="new",
        distribution="asgi-idempotency-header",
    ),
    Stack(
        "asgi-idempotency-header, replay",
        _asgi_idempotency_header,
        keys="replay",
        base=BARE,
        distribution="asgi-idempotency-header",
    ),
    Stack(
        "fastapi-idempotency, new key",
        _fastapi_idempotency,
        keys="new",
        distribution="fastapi-idempotency",
    ),
    Stack(
        "fastapi-idempotency, replay",
        _fastapi_idempotency,
        keys="replay",
        base=BARE,
        distribution="fastapi-idempotency",
    ),
)


# ---------------------------------------------------------------------- running


@dataclass
class _Trial:
    stack: Stack
    app: Any
    feed: _Feed = field(default_factory=_Feed)
    counter: itertools.count[int] = field(default_factory=itertools.count)
    samples_us: list[float] = field(default_factory=list)
    replay_keys: list[bytes] = field(default_factory=list)

    def scopes(self, n: int) -> list[dict[str, Any]]:
        start = next(self.counter) * n
        if self.stack.keys == "new":
            keys = [b'"k-%d"' % i for i in range(start, start + n)]
            return _scopes(n, keys, 0)
        if self.stack.keys == "replay":
            return _scopes(n, self.replay_keys, start)
        return _scopes(n, None, start)


def _version(distribution: str | None) -> str | None:
    if distribution is None:
        return None
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


async def _warm(trial: _Trial, requests: int) -> None:
    if trial.stack.keys == "replay":
        # Complete one key per client once; every measured request replays one of them, sent
        # by the same client (fastapi-idempotency scopes keys by client address).
        trial.replay_keys = [b'"replay-%d"' % i for i in range(CLIENTS)]
        await _drive(trial.app, _scopes(len(trial.replay_keys), trial.replay_keys, 0), trial.feed)
        trial.feed.statuses.clear()
    await _drive(trial.app, trial.scopes(requests), trial.feed)
    statuses = trial.feed.statuses
    if set(statuses) != {trial.stack.status}:
        raise RuntimeError(f"{trial.stack.name} answered {statuses}, not {trial.stack.status}")
    replayed = any(bytes(name).lower() == b"idempotent-replayed" for name, _ in trial.feed.headers)
    if replayed != (trial.stack.keys == "replay"):
        raise RuntimeError(f"{trial.stack.name}: replayed is {replayed} on the last request")


def measure(
    requests: int = 5_000,
    repeats: int = 5,
    stacks: Sequence[Stack] = STACKS,
    log: TextIO | None = None,
    compiled: bool = True,
) -> dict[str, Any]:
    """Time every stack (µs per request, interleaved rounds) and return the report section.

    ``compiled=False`` leaves out the stacks on the compiled copy (whose first build takes
    half a minute).
    """
    if not compiled:
        stacks = [stack for stack in stacks if not stack.name.startswith(COMPILED)]
    rows: dict[str, dict[str, Any]] = {}
    trials: list[_Trial] = []
    for stack in stacks:
        row: dict[str, Any] = {
            "name": stack.name,
            "base": stack.base,
            "peer": stack.peer,
            "version": _version(stack.distribution),
            "status": "ok",
            "reason": None,
        }
        rows[stack.name] = row
        try:
            trials.append(_Trial(stack, stack.build()))
        except Missing as error:
            row.update(status="missing", reason=str(error))
        except Exception as error:
            row.update(status="error", reason=f"{type(error).__name__}: {error}")
    loop = asyncio.new_event_loop()
    try:
        for trial in list(trials):
            try:
                loop.run_until_complete(_warm(trial, min(requests, 500)))
            except Exception as error:
                rows[trial.stack.name].update(
                    status="error", reason=f"{type(error).__name__}: {error}"
                )
                trials.remove(trial)
        for round_ in range(repeats):
            shift = round_ % len(trials) if trials else 0
            for trial in trials[shift:] + trials[:shift]:
                scopes = trial.scopes(requests)
                # Every stack shares this process, and some peers keep every key forever: a
                # full collection during one stack's sample would walk the others' heaps too.
                # Frozen, they are left out; what this sample allocates is still collected.
                gc.collect()
                gc.freeze()
                try:
                    elapsed = loop.run_until_complete(_drive(trial.app, scopes, trial.feed))
                finally:
                    gc.unfreeze()
                trial.samples_us.append(elapsed / requests / 1e3)
            if log is not None:
                print(f"asgi: round {round_ + 1}/{repeats}", file=log, flush=True)
    finally:
        loop.close()
    for trial in trials:
        row = rows[trial.stack.name]
        wrong = {s: c for s, c in trial.feed.statuses.items() if s != trial.stack.status}
        if wrong:
            row.update(status="error", reason=f"answered {wrong}")
            continue
        samples = sorted(trial.samples_us)
        row.update(median=statistics.median(samples), min=samples[0], max=samples[-1])
    _added(rows)
    return {
        "requests": requests,
        "repeats": repeats,
        "rows": list(rows.values()),
        "targets": _targets(rows),
        "limiter_acquire_us": _acquire_alone(requests, repeats),
    }


def _acquire_alone(requests: int, repeats: int) -> float:
    """µs per ``acquire`` of the limiter RateLimitMiddleware uses here, called directly on the
    same client addresses: the part of the middleware's cost that is the limiter's."""
    limiter = _ttl_limiter()
    acquire = limiter.acquire
    clients = [f"10.0.{i // 250}.{i % 250}" for i in range(CLIENTS)]
    samples = []
    for _ in range(repeats):
        keys = clients * max(1, requests // CLIENTS)
        t0 = time.process_time_ns()
        for key in keys:
            acquire(key, 1)
        samples.append((time.process_time_ns() - t0) / len(keys) / 1e3)
    return statistics.median(samples)


def _added(rows: dict[str, dict[str, Any]]) -> None:
    scale = rows.get(STARLETTE, {}).get("median")
    for row in rows.values():
        base = rows.get(row["base"] or "", {}).get("median")
        if "median" in row and base is not None and scale:
            row["added"] = row["median"] - base
            row["ratio"] = row["added"] / scale


def _targets(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for name, limit in RATIO_LIMITS.items():
        if name not in rows:  # a stack left out of this run
            continue
        ratio = rows[name].get("ratio")
        out.append(
            {
                "target": f"{name}: added / Starlette endpoint",
                "value": ratio,
                "limit": limit,
                "met": ratio is not None and ratio <= limit,
            }
        )
    for row in rows.values():
        peer = rows.get(row["peer"] or "")
        if peer is None:
            continue
        ours, theirs = row.get("added"), peer.get("added")
        share = ours / theirs if ours is not None and theirs else None
        out.append(
            {
                "target": f"{row['name']}: added / {peer['name']}'s added",
                "value": share,
                "limit": PEER_SHARE,
                "met": share is not None and share <= PEER_SHARE,
            }
        )
    return out


# ---------------------------------------------------------------------- the report


def markdown(section: dict[str, Any] | None) -> list[str]:
    """The "ASGI middlewares" section of ``latest.md``."""
    if not section:
        return []
    out = [
        "",
        "## ASGI middlewares (in-process, no sockets)",
        "",
        f"µs per POST (small JSON body), median over {section['repeats']} interleaved rounds of "
        f"{section['requests']:,} requests (min-max in brackets), one asyncio task calling the "
        "app directly. Every middleware wraps the same minimal Starlette endpoint. **added**: "
        "stack minus the Starlette endpoint (a replay, which does not run the endpoint: minus "
        "the bare app); **ratio**: added / the Starlette endpoint's own figure.",
        "",
        "| stack | version | µs/request | added µs | ratio |",
        "|---|---|---:|---:|---:|",
    ]
    for row in section["rows"]:
        if row["status"] != "ok":
            out.append(
                f"| {row['name']} | {row['version'] or '—'} | {row['status']}: "
                f"{row['reason']} | — | — |"
            )
            continue
        added = f"{row['added']:.1f}" if "added" in row else ""
        ratio = f"{row['ratio']:.2f}" if "ratio" in row else ""
        out.append(
            f"| {row['name']} | {row['version'] or '—'} | {row['median']:.1f} "
            f"({row['min']:.1f}-{row['max']:.1f}) | {added} | {ratio} |"
        )
    acquire = section.get("limiter_acquire_us")
    if acquire is not None:
        out += [
            "",
            f"Of the rate limiter's figure, {acquire:.1f} µs is `TokenBucketLimiter.acquire` "
            "itself (called directly on the same keys in the same run); the rest is the "
            "middleware. Peers as configured here: slowapi with `headers_enabled=True` (its "
            "`X-RateLimit-*` headers) and `limits`' fixed window in memory; "
            "asgi-idempotency-header stores JSON bodies only, keeps every key forever (no "
            "bound, no TTL for claims), checks no fingerprint and has no tenant scope; "
            "fastapi-idempotency (a `BaseHTTPMiddleware`) keys by client address, fingerprints "
            "the request and runs a lease heartbeat task per request.",
        ]
    out += ["", "| target (issue 12) | value | limit | met |", "|---|---:|---:|---|"]
    for target in section["targets"]:
        value = "—" if target["value"] is None else f"{target['value']:.2f}"
        met = "yes" if target["met"] else "**no**"
        out.append(f"| {target['target']} | {value} | {target['limit']:.2f} | {met} |")
    return out


def main() -> None:
    import sys

    requests = int(sys.argv[1]) if len(sys.argv) > 1 else 5_000
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    section = measure(requests, repeats, log=sys.stderr)
    print("\n".join(markdown(section)))


if __name__ == "__main__":
    main()
