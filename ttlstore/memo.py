"""Memoization on a TTLStore: ``@cached`` for functions, async functions and methods.

One call per key however many threads (or tasks) miss it at once; an exception reaches every
waiter and is never cached; a method never keeps its instance alive; keys are argument tuples,
never bare hashes; ``stale=`` serves the old value while one background refresh runs.

How a call is served (the hit path is the product, so it is generated per function):

- **Keys.** The wrapper is compiled from the function's own signature, so the key is the tuple
  of every parameter's value after binding: ``f(1)``, ``f(x=1)`` and ``f(1, y=<default>)`` are
  one entry, keyword order never matters, and no ``**kwargs`` dict is built per call. A
  signature that cannot be read falls back to ``(*args, **kwargs)`` keys.
- **Front index.** With its own store (the default) and fixed deadlines, hits are served from a
  dict of ``key -> (value, fresh-until)`` that mirrors the store: one dict lookup and one clock
  read, no lock. The store stays the owner: it bounds, expires and evicts, and its ``on_remove``
  callback drops the mirror entry. Recency reaches the store through a lossy buffer of the last
  :data:`RECENT_HITS` hit keys, applied (once per key) at the next miss, as Caffeine's read
  buffer does. With ``store=`` (a store this module cannot hook) or ``sliding=True``, every
  call reads the store itself.
- **Single flight.** A miss claims the key under one lock; later callers of the same key wait
  for that one call. The async half lives in :mod:`ttlstore._memo_async`, imported only when an
  ``async def`` is decorated or :func:`aget_or_set` is called: this module never imports
  asyncio.
"""

from __future__ import annotations

import collections
import enum
import functools
import inspect
import itertools
import logging
import math
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar, overload

from ttlstore._checks import positive_int, positive_seconds, ttl_or_none
from ttlstore.store import TTLStore

if TYPE_CHECKING:
    from ttlstore import _memo_async

__all__ = ["RECENT_HITS", "CacheInfo", "CachedFunction", "aget_or_set", "cached"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")

logger = logging.getLogger("ttlstore")

#: Hit keys remembered between two misses to refresh the store's recency order (lossy).
RECENT_HITS = 128

_MISSING: Any = object()
_INF = math.inf
# Separates positional from keyword arguments in a fallback key; never an argument itself.
_KWMARK: Any = object()


class _Default(enum.Enum):
    """Markers for "argument not given", shown in signatures as what they stand for."""

    MAXSIZE = "128"
    TTL = "None"
    CLOCK = "time.monotonic"

    def __repr__(self) -> str:
        return self.value


DEFAULT_MAXSIZE = 128


@dataclass(frozen=True, slots=True)
class CacheInfo:
    """A snapshot of a cached function's counters.

    ``hits``: calls answered from the cache (stale answers included); ``misses``: calls that
    found nothing and ran or waited for the one computation of their key; ``stale_hits``: hits
    served past ``ttl`` while a refresh was due; ``refreshes`` / ``refresh_errors``: background
    refreshes started / failed. ``currsize`` is the backing store's live size.
    """

    hits: int
    misses: int
    maxsize: int
    currsize: int
    stale_hits: int = 0
    refreshes: int = 0
    refresh_errors: int = 0


class CachedFunction(Protocol[P, R]):
    """What ``@cached`` returns: the function, plus the cache's controls.

    Read through an instance it binds as a function does (the arguments after ``self`` are
    then not checked); read through the class it is itself, controls included.
    """

    __wrapped__: Callable[P, R]
    __name__: str
    __qualname__: str
    cache_store: TTLStore[Any, Any]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R: ...

    @overload
    def __get__(self, instance: None, owner: type[Any], /) -> CachedFunction[P, R]: ...
    @overload
    def __get__(self, instance: object, owner: type[Any] | None = None, /) -> Callable[..., R]: ...

    def cache_info(self) -> CacheInfo: ...

    def cache_clear(self) -> None: ...

    def cache_invalidate(self, *args: Any, **kwargs: Any) -> bool: ...

    def cache_parameters(self) -> dict[str, Any]: ...


def _count_value(counter: itertools.count[int]) -> int:
    """The next value of an ``itertools.count`` without advancing it (its repr is count(N))."""
    return int(repr(counter)[6:-1])


# ---------------------------------------------------------------------- per-instance tokens

# A cached method keys its entries by a token of the instance, never the instance itself: the
# store then holds no reference to it, and instances that compare equal stay apart. Tokens are
# never reused; the weakref callback forgets an instance's token when it dies, before CPython
# can hand its id() to a new object, so a newcomer at the same address gets a fresh token.
_tokens: dict[int, int] = {}
_token_refs: dict[int, weakref.ref[Any]] = {}
_token_counter = itertools.count(1)
# Reentrant: a collection during _register (it allocates) may run _forget on this thread.
_token_lock = threading.RLock()


def _forget(ident: int, ref: weakref.ref[Any]) -> None:
    with _token_lock:
        if _token_refs.get(ident) is ref:
            del _token_refs[ident]
            del _tokens[ident]


def _register(obj: object, name: str) -> int:
    """The token of ``obj``, made on first use."""
    ident = id(obj)
    with _token_lock:
        token = _tokens.get(ident)
        if token is not None:
            return token
        try:
            ref = weakref.ref(obj, functools.partial(_forget, ident))
        except TypeError:
            raise TypeError(
                f"cached method {name}() needs instances that support weak references (it "
                f"must not keep them alive); {type(obj).__qualname__} does not: add "
                "'__weakref__' to its __slots__"
            ) from None
        token = next(_token_counter)
        _tokens[ident] = token
        _token_refs[ident] = ref
        return token


_token_of = _tokens.get


# ---------------------------------------------------------------------- the state of one cache


class _Flight:
    """One computation of a key in progress, which other threads of the key wait on.

    ``done`` is a lock the owner holds until the result is in: a waiter acquires and releases
    it (far cheaper to make than a ``threading.Event``, and a miss makes one).
    """

    __slots__ = ("discard", "done", "error", "owner", "value")

    def __init__(self) -> None:
        self.done = threading.Lock()
        self.done.acquire()
        self.owner = threading.get_ident()
        self.value: Any = None
        self.error: BaseException | None = None
        # Set by cache_invalidate/cache_clear: the result still reaches the waiters, but is
        # not stored (it may predate what made the caller invalidate).
        self.discard = False


class _Refresh(enum.Enum):
    RUNNING = "running"  # claimed, its thread or task not started yet
    FAILED = "failed"


def _alive(handle: Any) -> bool:
    """Whether a refresh thread or task can still finish."""
    is_alive = getattr(handle, "is_alive", None)
    if is_alive is not None:
        return bool(is_alive())
    return not handle.done() and not handle.get_loop().is_closed()


class _Memo:
    """Everything one cached function shares between its wrapper, its misses and its controls."""

    def __init__(
        self,
        func: Callable[..., Any],
        name: str,
        own_store: bool,
        front: bool,
        write_ttl: float | None,
        write_default: bool,
        ttl: float | None,
        stale: float | None,
        clock: Callable[[], float],
    ) -> None:
        self.func = func
        self.name = name
        self.store: TTLStore[Any, Any]  # set by cached(): the store's callback needs this memo
        self.own_store = own_store
        self.front: dict[Hashable, tuple[Any, float]] | None = {} if front else None
        self.recent: collections.deque[Hashable] = collections.deque(maxlen=RECENT_HITS)
        self.write_ttl = write_ttl
        self.write_default = write_default  # write with the store's default TTL
        self.ttl = ttl
        self.stale = stale
        self.clock = clock
        self.lock = threading.Lock()
        self.flights: dict[Hashable, _Flight] = {}
        # The async half keeps its flights here (made on first use).
        self.async_flights: _memo_async.Flights | None = None
        self.refreshing: dict[Hashable, Any] = {}
        self.prefix: object | None = None  # set when the store may be shared
        self.hits = itertools.count()
        self.misses = itertools.count()
        self.stale_hits = itertools.count()
        self.refreshes = itertools.count()
        self.refresh_errors = itertools.count()
        self.base = (0, 0, 0, 0, 0)

    # -------------------------------------------------------------- store and front

    def on_remove(self, key: Hashable, value: Any, cause: object) -> None:
        """The own store's removal callback: keep the front index a subset of the store."""
        front = self.front
        if front is not None:
            record = front.get(key)
            # Identity: a newer record for the key (written after this removal) must stay.
            if record is not None and record[0] is value:
                front.pop(key, None)
        if self.refreshing.get(key) is _Refresh.FAILED:
            self.refreshing.pop(key, None)

    def write(self, key: Hashable, value: Any) -> None:
        """Store a computed value, and mirror it in the front index."""
        front = self.front
        now = self.clock()  # read before the store's: the front must never outlive the store
        if self.write_default:
            self.store.set(key, value)
        else:
            self.store.set(key, value, self.write_ttl)
        if self.refreshing.get(key) is _Refresh.FAILED:
            self.refreshing.pop(key, None)
        if front is not None:
            record = (value, _INF if self.ttl is None else now + self.ttl)
            front[key] = record
            # Evicted between the set and the line above: no callback will come for it now.
            if key not in self.store and front.get(key) is record:
                front.pop(key, None)

    def drain(self) -> None:
        """Apply the recent hits to the store's recency order (each key once, oldest first)."""
        recent = self.recent
        keys = []
        try:
            while True:
                keys.append(recent.popleft())
        except IndexError:
            pass
        get = self.store.get
        for key in reversed(list(dict.fromkeys(reversed(keys)))):
            get(key)

    def lookup(self, key: Hashable, count: bool = True) -> tuple[bool, Any, bool]:
        """Read the store: ``(found, value, stale)``; a fresh value refills the front index.

        A value found counts as a hit if ``count`` (a caller that joined a flight has been
        counted as a miss already).
        """
        store = self.store
        value = store.get(key, _MISSING)
        if value is _MISSING:
            return False, None, False
        if count:
            next(self.hits)
        stale = self.stale
        if stale is None and self.front is None:
            return True, value, False
        now = self.clock()
        try:
            left = store.ttl(key)
        except KeyError:  # gone in between: still a fine answer for this call
            return True, value, False
        fresh_left = _INF if left is None else left - (stale or 0.0)
        if fresh_left > 0:
            if self.front is not None:
                self.front[key] = (value, now + fresh_left)
            return True, value, False
        if count:
            next(self.stale_hits)
        return True, value, True

    def count_miss(self) -> None:
        next(self.misses)

    # -------------------------------------------------------------- the sync miss

    def miss(self, key: Hashable, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A call the hit path did not answer: read the store, else compute once per key."""
        if self.recent:
            self.drain()
        if self.stale is not None:  # the hot path cannot tell a stale entry: look here
            try:
                found, value, stale = self.lookup(key)
            except TypeError as exc:
                raise self.unhashable(exc, key) from None
            if found:
                if stale:
                    self.refresh_in_thread(key, args, kwargs)
                return value
        lock = self.lock
        lock.acquire()
        flight = self.flights.get(key)
        owner = flight is None
        if flight is None:
            flight = self.flights[key] = _Flight()
        lock.release()
        if not owner:
            if flight.owner == threading.get_ident():
                raise RuntimeError(
                    f"{self.name}() asked for its own key {key!r} while computing it "
                    "(recursion through a cached function would wait on itself)"
                )
            next(self.misses)
            flight.done.acquire()
            flight.done.release()
            if flight.error is not None:
                raise flight.error
            return flight.value
        next(self.misses)
        try:
            # The store may hold what the hot path did not see: a value written by hand, one
            # the front index let go, or a flight's that landed just before this claim.
            found, value, _ = self.lookup(key, count=False)
            if not found:
                value = self.func(*args, **kwargs)
                if not flight.discard:
                    self.write(key, value)
        except BaseException as exc:
            flight.error = exc
            raise
        else:
            flight.value = value
            return value
        finally:
            lock.acquire()
            if self.flights.get(key) is flight:
                del self.flights[key]
            lock.release()
            flight.done.release()

    def unhashable(self, exc: TypeError, key: Hashable) -> TypeError:
        """The error for a key that cannot be hashed, naming the function."""
        try:
            hash(key)
        except TypeError:
            return TypeError(
                f"{self.name}() got an unhashable argument ({exc}); a cached function needs "
                "hashable arguments, or a key= function that makes a hashable key"
            )
        return exc  # raised by an argument's own __eq__: not ours to rename

    # -------------------------------------------------------------- stale-while-revalidate

    def claim_refresh(self, key: Hashable) -> bool:
        """Whether the caller starts the one refresh of ``key`` (then marked as running).

        No new refresh while one runs, nor after one failed: the old value is then served
        until it expires, and the next call computes it as a miss.
        """
        with self.lock:
            refreshing = self.refreshing
            mark = refreshing.get(key)
            if mark is not None and (not isinstance(mark, _Refresh) and _alive(mark)):
                return False
            if mark is _Refresh.RUNNING or mark is _Refresh.FAILED:
                return False
            if len(refreshing) >= self.store.maxsize:
                # Marks of keys the store no longer holds (a store= store tells no one of its
                # removals) and of refreshes whose loop is gone: drop them, so the marks stay
                # bounded by the store.
                for old, old_mark in list(refreshing.items()):
                    if isinstance(old_mark, _Refresh):
                        gone = old_mark is _Refresh.FAILED and old not in self.store
                    else:
                        gone = not _alive(old_mark)
                    if gone:
                        del refreshing[old]
            refreshing[key] = _Refresh.RUNNING
        next(self.refreshes)
        return True

    def refresh_started(self, key: Hashable, handle: object) -> None:
        """Remember the thread or task of a claimed refresh, to tell later if it still runs."""
        with self.lock:
            if self.refreshing.get(key) is _Refresh.RUNNING:
                self.refreshing[key] = handle

    def refresh_done(self, key: Hashable, error: BaseException | None) -> None:
        """Record the end of a refresh; a failure is logged, counted and not retried."""
        with self.lock:
            if self.refreshing.get(key) is not _Refresh.FAILED:
                self.refreshing.pop(key, None)
            if error is not None:
                self.refreshing[key] = _Refresh.FAILED
        if error is not None:
            logger.error(
                "refresh of %s() for key %r failed; the old value is served until it expires",
                self.name,
                key,
                exc_info=error,
            )
            next(self.refresh_errors)

    def refresh_in_thread(self, key: Hashable, args: tuple[Any, ...], kwargs: Any) -> None:
        if not self.claim_refresh(key):
            return
        thread = threading.Thread(
            target=self.refresh_sync,
            args=(key, args, kwargs),
            name=f"ttlstore refresh {self.name}",
            daemon=True,
        )
        thread.start()
        self.refresh_started(key, thread)

    def refresh_sync(self, key: Hashable, args: tuple[Any, ...], kwargs: Any) -> None:
        error: BaseException | None = None
        try:
            self.write(key, self.func(*args, **kwargs))
        except Exception as exc:
            error = exc
        finally:
            self.refresh_done(key, error)

    # -------------------------------------------------------------- controls

    def info(self) -> CacheInfo:
        values = (
            _count_value(self.hits),
            _count_value(self.misses),
            _count_value(self.stale_hits),
            _count_value(self.refreshes),
            _count_value(self.refresh_errors),
        )
        hits, misses, stale_hits, refreshes, errors = (
            value - base for value, base in zip(values, self.base, strict=True)
        )
        return CacheInfo(
            hits=hits,
            misses=misses,
            maxsize=self.store.maxsize,
            currsize=len(self.store),
            stale_hits=stale_hits,
            refreshes=refreshes,
            refresh_errors=errors,
        )

    def clear(self) -> None:
        """Drop every entry of this function and reset the counters."""
        with self.lock:
            for flight in self.flights.values():
                flight.discard = True
            self.refreshing = {k: v for k, v in self.refreshing.items() if v is _Refresh.RUNNING}
        if self.async_flights is not None:
            self.async_flights.discard_all()
        if self.own_store:
            self.store.clear()
        else:
            prefix = self.prefix
            for key in list(self.store.keys()):
                if type(key) is tuple and key and key[0] is prefix:
                    self.store.pop(key, None)
        if self.front is not None:
            self.front.clear()
        self.recent.clear()
        self.base = (
            _count_value(self.hits),
            _count_value(self.misses),
            _count_value(self.stale_hits),
            _count_value(self.refreshes),
            _count_value(self.refresh_errors),
        )

    def invalidate(self, key: Hashable) -> bool:
        """Drop the entry of ``key``; a computation of it in flight is not stored."""
        try:
            hash(key)
        except TypeError as exc:
            raise self.unhashable(exc, key) from None
        with self.lock:
            flight = self.flights.get(key)
            if flight is not None:
                flight.discard = True
        if self.async_flights is not None:
            self.async_flights.discard(key)
        removed = self.store.pop(key, _MISSING) is not _MISSING
        if self.front is not None:
            self.front.pop(key, None)
        return removed


# ---------------------------------------------------------------------- wrapper generation


class _Name:
    """A default value shown in generated source by the name it is passed under."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_RESERVED = "_ttlstore_"


def _kwkey(kwargs: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(sorted(kwargs.items())) if kwargs else ()


def _kwtypes(kwargs: dict[str, Any]) -> tuple[type, ...]:
    return tuple(type(value) for _, value in sorted(kwargs.items()))


def _types(values: tuple[Any, ...]) -> tuple[type, ...]:
    return tuple(map(type, values))


@dataclass(frozen=True)
class _Shape:
    """A function's signature as the pieces of generated source that use it."""

    params: str  # the parameter list, defaults by name
    parts: tuple[str, ...]  # the key's parts, one per parameter
    types: tuple[str, ...]  # the parts' types, for typed=True
    call_args: tuple[str, ...]  # positional arguments to call the function with
    call_kwargs: tuple[str, ...]  # keyword arguments, as dict display items
    defaults: dict[str, Any]  # the defaults, by the names ``params`` uses
    self_name: str | None  # the first parameter, when it is named self or cls

    def call(self, skip_first: bool = False) -> tuple[str, str]:
        """A tuple display of the positional arguments and a dict display of the keywords."""
        args = self.call_args[1:] if skip_first else self.call_args
        comma = "," if len(args) == 1 else ""
        return f"({', '.join(args)}{comma})", "{" + ", ".join(self.call_kwargs) + "}"


_ARGS, _KWARGS = f"{_RESERVED}args", f"{_RESERVED}kwargs"
_FALLBACK = _Shape(
    params=f"*{_ARGS}, **{_KWARGS}",
    parts=(),
    types=(),
    call_args=(f"*{_ARGS}",),
    call_kwargs=(f"**{_KWARGS}",),
    defaults={},
    self_name=None,
)


def _shape(func: Callable[..., Any]) -> _Shape:
    """The generated-source pieces for ``func``'s signature (the fallback if unreadable)."""
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return _FALLBACK
    params = []
    parts: list[str] = []
    types: list[str] = []
    call_args: list[str] = []
    call_kwargs: list[str] = []
    defaults: dict[str, Any] = {}
    for index, param in enumerate(signature.parameters.values()):
        name = param.name
        if name.startswith(_RESERVED):
            return _FALLBACK
        default = param.default
        if default is not param.empty:
            try:
                hash(default)
            except TypeError:
                return _FALLBACK  # a mutable default: only keys that omit it would work
            defaults[f"{_RESERVED}d{index}"] = default
            default = _Name(f"{_RESERVED}d{index}")
        params.append(param.replace(default=default, annotation=param.empty))
        kind = param.kind
        if kind is param.VAR_POSITIONAL:
            parts.append(name)
            types.append(f"{_RESERVED}types({name})")
            call_args.append(f"*{name}")
        elif kind is param.VAR_KEYWORD:
            parts.append(f"{_RESERVED}kwkey({name})")
            types.append(f"{_RESERVED}kwtypes({name})")
            call_kwargs.append(f"**{name}")
        else:
            parts.append(name)
            types.append(f"type({name})")
            if kind is param.KEYWORD_ONLY:
                call_kwargs.append(f"{name!r}: {name}")
            else:
                call_args.append(name)
    first = next(iter(signature.parameters.values()), None)
    self_name = None
    if first is not None and first.kind in (first.POSITIONAL_ONLY, first.POSITIONAL_OR_KEYWORD):
        self_name = first.name if first.name in ("self", "cls") else None
    source = str(signature.replace(parameters=params, return_annotation=signature.empty))
    return _Shape(
        params=source[1:-1],
        parts=tuple(parts),
        types=tuple(types),
        call_args=tuple(call_args),
        call_kwargs=tuple(call_kwargs),
        defaults=defaults,
        self_name=self_name,
    )


def _is_method(func: Callable[..., Any], shape: _Shape) -> bool:
    """Defined in a class body with a first parameter named self or cls: cached per instance."""
    qualname = getattr(func, "__qualname__", "")
    scope = qualname.rpartition(".")[0]
    return shape.self_name is not None and bool(scope) and not scope.endswith("<locals>")


def _key_source(shape: _Shape, typed: bool, custom: bool, method: bool, prefixed: bool) -> str:
    """The key expression of a generated function."""
    r = _RESERVED
    if custom:
        args, kwargs = shape.call(skip_first=method)
        parts = [f"{r}keyfn(*{args}, **{kwargs})"]
    elif shape is _FALLBACK:
        key = f"(({_ARGS} + ({r}kwmark,) + {r}kwkey({_KWARGS})) if {_KWARGS} else {_ARGS})"
        if typed:
            key = f"({key} + {r}types({_ARGS}) + {r}kwtypes({_KWARGS}))"
        if not prefixed:
            return key
        parts = [key]
    else:
        skip = 1 if method else 0
        parts = list(shape.parts[skip:])
        if typed:
            parts += shape.types[skip:]
    if method:
        parts.insert(0, f"{r}t")
    if prefixed:
        parts.insert(0, f"{r}prefix")
    return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"


def _compile(
    memo: _Memo,
    shape: _Shape,
    *,
    method: bool,
    typed: bool,
    keyfn: Callable[..., Hashable] | None,
    is_async: bool,
    miss: Callable[..., Any],
) -> tuple[Any, Callable[..., Any]]:
    """Generate (the cached wrapper, its key function) from the function's signature."""
    r = _RESERVED
    namespace: dict[str, Any] = {
        **shape.defaults,
        f"{r}prefix": memo.prefix,
        f"{r}tokget": _token_of,
        f"{r}register": _register,
        f"{r}name": memo.name,
        f"{r}keyfn": keyfn,
        f"{r}kwmark": _KWMARK,
        f"{r}kwkey": _kwkey,
        f"{r}kwtypes": _kwtypes,
        f"{r}types": _types,
        f"{r}missing": _MISSING,
        f"{r}miss": miss,
        f"{r}unhashable": memo.unhashable,
        f"{r}clock": memo.clock,
        f"{r}recent": memo.recent.append,
        f"{r}hit": memo.hits.__next__,
        f"{r}sget": memo.store.get,
        f"{r}fget": None if memo.front is None else memo.front.get,
    }
    key = _key_source(shape, typed, keyfn is not None, method, memo.prefix is not None)
    token = ""
    if method:
        token = (
            f"    {r}t = {r}tokget(id({shape.self_name}))\n"
            f"    if {r}t is None:\n"
            f"        {r}t = {r}register({shape.self_name}, {r}name)\n"
        )
    await_ = "await " if is_async else ""
    args, kwargs = shape.call()
    call = f"return {await_}{r}miss({r}k, {args}, {kwargs})"
    if memo.front is not None:
        fresh = f"{r}r is not None" + (f" and {r}r[1] > {r}clock()" if memo.ttl is not None else "")
        body = (
            f"    try:\n"
            f"        {r}r = {r}fget({r}k)\n"
            f"    except TypeError as {r}e:\n"
            f"        raise {r}unhashable({r}e, {r}k) from None\n"
            f"    if {fresh}:\n"
            f"        {r}recent({r}k)\n"
            f"        {r}hit()\n"
            f"        return {r}r[0]\n"
            f"    {call}\n"
        )
    elif memo.stale is None:
        body = (
            f"    try:\n"
            f"        {r}r = {r}sget({r}k, {r}missing)\n"
            f"    except TypeError as {r}e:\n"
            f"        raise {r}unhashable({r}e, {r}k) from None\n"
            f"    if {r}r is not {r}missing:\n"
            f"        {r}hit()\n"
            f"        return {r}r\n"
            f"    {call}\n"
        )
    else:  # every call needs the entry's age: the miss path reads it
        body = f"    {call}\n"
    # The key function never makes a token: an instance never seen has nothing cached.
    keyof_token = token.replace(f"{r}register({shape.self_name}, {r}name)", "None")
    define = "async def" if is_async else "def"
    source = (
        f"{define} {r}wrapper({shape.params}):\n{token}    {r}k = {key}\n{body}"
        f"def {r}keyof({shape.params}):\n{keyof_token}    return {key}\n"
    )
    exec(compile(source, f"<ttlstore.cached {memo.name}>", "exec"), namespace)
    return namespace[f"{r}wrapper"], namespace[f"{r}keyof"]


# ---------------------------------------------------------------------- the decorator


def _unwrap_kind(func: Any) -> tuple[Any, type | None]:
    """A staticmethod or classmethod given to ``cached`` is cached inside and re-wrapped."""
    if isinstance(func, (staticmethod, classmethod)):
        return func.__func__, type(func)
    return func, None


@dataclass(frozen=True)
class _Options:
    """``cached``'s checked arguments."""

    maxsize: int
    ttl: float | None  # seconds an entry is fresh; None: no expiry
    stale: float | None
    sliding: bool
    typed: bool
    key: Callable[..., Hashable] | None
    store: TTLStore[Any, Any] | None
    ttl_given: bool
    clock: Callable[[], float]

    @property
    def store_ttl(self) -> float | None:
        """The TTL an entry is stored for: fresh, then stale."""
        return None if self.ttl is None else self.ttl + (self.stale or 0.0)


def _options(
    maxsize: Any,
    ttl: Any,
    key: Any,
    typed: Any,
    sliding: Any,
    stale: Any,
    store: Any,
    clock: Any,
) -> _Options:
    if store is None:
        size = DEFAULT_MAXSIZE if maxsize is _Default.MAXSIZE else positive_int("maxsize", maxsize)
    else:
        if not isinstance(store, TTLStore):
            raise TypeError(f"store must be a TTLStore, got {store!r}")
        if maxsize is not _Default.MAXSIZE:
            raise TypeError(
                f"maxsize={maxsize!r} conflicts with store=: the store's maxsize "
                f"({store.maxsize}) applies"
            )
        if sliding is not False:
            raise TypeError(
                f"sliding={sliding!r} conflicts with store=: make the store sliding instead"
            )
        if clock is not _Default.CLOCK:
            raise TypeError(f"clock={clock!r} conflicts with store=: the store's clock applies")
        size = store.maxsize
    ttl_given = ttl is not _Default.TTL
    if ttl_given:
        entry_ttl = ttl_or_none("ttl", ttl)
    else:
        entry_ttl = None if store is None else store.default_ttl
    if key is not None and not callable(key):
        raise TypeError(f"key must be callable or None, got {key!r}")
    if not isinstance(typed, bool):
        raise TypeError(f"typed must be a bool, got {typed!r}")
    if key is not None and typed:
        raise ValueError("typed=True applies to the default key only; key= decides types itself")
    if not isinstance(sliding, bool):
        raise TypeError(f"sliding must be a bool, got {sliding!r}")
    if sliding and entry_ttl is None:
        raise ValueError("sliding=True needs a ttl: a read renews the deadline to now + ttl")
    stale_s: float | None = None
    if stale is not None:
        stale_s = positive_seconds("stale", stale)
        if entry_ttl is None:
            raise ValueError(f"stale={stale!r} needs a ttl: a value turns stale once ttl passed")
        if sliding:
            raise ValueError(
                "stale= and sliding=True do not combine: stale counts from the computation, "
                "sliding from the last read"
            )
    timer = time.monotonic if clock is _Default.CLOCK else clock
    if not callable(timer):
        raise TypeError(f"clock must be callable, got {clock!r}")
    return _Options(size, entry_ttl, stale_s, sliding, typed, key, store, ttl_given, timer)


def _decorate(options: _Options, target: Any) -> Any:
    func, kind = _unwrap_kind(target)
    if not callable(func):
        raise TypeError(f"cached needs a callable, got {func!r}")
    name = getattr(func, "__qualname__", None) or repr(func)
    if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
        raise TypeError(
            f"cannot cache {name}(): a generator is consumed once, so a cached one would be "
            "empty on every hit; cache a function that returns a list or tuple instead"
        )
    own = options.store is None
    memo = _Memo(
        func,
        name,
        own_store=own,
        front=own and not options.sliding,
        write_ttl=options.store_ttl,
        write_default=own or (not options.ttl_given and options.stale is None),
        ttl=options.ttl,
        stale=options.stale,
        clock=options.clock,
    )
    if options.store is None:
        memo.store = TTLStore(
            options.maxsize,
            options.store_ttl,
            sliding=options.sliding,
            clock=options.clock,
            on_remove=memo.on_remove,
        )
    else:
        memo.store = options.store
        memo.prefix = _Name(f"<{name}>")  # functions sharing a store keep their entries apart
    shape = _shape(func)
    method = kind is None and _is_method(func, shape)
    miss: Callable[..., Any] = memo.miss
    is_async = inspect.iscoroutinefunction(func)
    if is_async:
        from ttlstore import _memo_async  # asyncio only once an async function is cached

        miss = _memo_async.bind_miss(memo)
    wrapper, keyof = _compile(
        memo,
        shape,
        method=method,
        typed=options.typed,
        keyfn=options.key,
        is_async=is_async,
        miss=miss,
    )
    functools.update_wrapper(wrapper, func)
    token_at = 1 if memo.prefix is not None else 0

    def cache_invalidate(*args: Any, **kwargs: Any) -> bool:
        """Drop the entry these arguments map to (for a method: ``self`` first); whether
        there was one."""
        cache_key = keyof(*args, **kwargs)
        if method and cache_key[token_at] is None:
            return False  # an instance never seen has nothing cached
        return memo.invalidate(cache_key)

    def cache_parameters() -> dict[str, Any]:
        """The parameters of the cache, as ``functools.lru_cache`` reports its own."""
        return {
            "maxsize": memo.store.maxsize,
            "ttl": options.ttl,
            "typed": options.typed,
            "sliding": options.sliding,
            "stale": options.stale,
        }

    wrapper.cache_info = memo.info
    wrapper.cache_clear = memo.clear
    wrapper.cache_invalidate = cache_invalidate
    wrapper.cache_parameters = cache_parameters
    wrapper.cache_store = memo.store
    return wrapper if kind is None else kind(wrapper)


class _Decorator(Protocol):
    """What ``cached(...)`` returns: a decorator that keeps a staticmethod or classmethod one."""

    @overload
    def __call__(self, func: staticmethod[P, R], /) -> staticmethod[P, R]: ...  # type: ignore[overload-overlap]
    @overload
    def __call__(self, func: classmethod[T, P, R], /) -> classmethod[T, P, R]: ...
    @overload
    def __call__(self, func: Callable[P, R], /) -> CachedFunction[P, R]: ...


@overload
def cached(maxsize: staticmethod[P, R], /) -> staticmethod[P, R]: ...  # type: ignore[overload-overlap]
@overload
def cached(maxsize: classmethod[T, P, R], /) -> classmethod[T, P, R]: ...
@overload
def cached(maxsize: Callable[P, R], /) -> CachedFunction[P, R]: ...
@overload
def cached(
    maxsize: int = ...,
    ttl: float | None = ...,
    *,
    key: Callable[..., Hashable] | None = ...,
    typed: bool = ...,
    sliding: bool = ...,
    stale: float | None = ...,
    store: TTLStore[Any, Any] | None = ...,
    clock: Callable[[], float] = ...,
) -> _Decorator: ...
def cached(
    maxsize: Any = _Default.MAXSIZE,
    ttl: Any = _Default.TTL,
    *,
    key: Callable[..., Hashable] | None = None,
    typed: bool = False,
    sliding: bool = False,
    stale: float | None = None,
    store: TTLStore[Any, Any] | None = None,
    clock: Any = _Default.CLOCK,
) -> Any:
    """Memoize a function, an ``async def`` function or a method on a bounded TTL store.

    :param maxsize: the most entries kept (default 128); least recently used go first.
    :param ttl: seconds an entry lives after it is computed; ``None``: until evicted. With
        ``store=``, the store's default TTL unless given here.
    :param key: ``key(*args, **kwargs) -> hashable`` replaces the default key (the bound
        arguments); a method's is called without ``self``.
    :param typed: arguments of different types are cached apart (``f(1)`` and ``f(1.0)``).
    :param sliding: a hit renews the entry's deadline (time-to-idle).
    :param stale: seconds past ``ttl`` during which a call returns the old value at once and
        starts one background refresh (a thread, or a task for ``async def``).
    :param store: a :class:`TTLStore` to keep the entries in (to share, sweep or inspect it);
        it brings its own maxsize, clock and sliding. By default the function gets its own.
    :param clock: seconds from a monotonic source, for the function's own store (tests).

    Usable bare (``@cached``) or called (``@cached(1000, ttl=60)``). A hit costs one dict
    lookup and one clock read; a miss costs the call plus O(1) store work.
    """
    if callable(maxsize) or isinstance(maxsize, (staticmethod, classmethod)):
        defaults = (_Default.MAXSIZE, _Default.TTL, None, False, False, None, None, _Default.CLOCK)
        return _decorate(_options(*defaults), maxsize)
    options = _options(maxsize, ttl, key, typed, sliding, stale, store, clock)
    return functools.partial(_decorate, options)


# ---------------------------------------------------------------------- aget_or_set


class _Unset(enum.Enum):
    UNSET = "<store default>"

    def __repr__(self) -> str:
        return self.value


async def aget_or_set(
    store: TTLStore[K, V],
    key: K,
    factory: Callable[[], Awaitable[V]],
    ttl: float | _Unset | None = _Unset.UNSET,
) -> V:
    """The async ``TTLStore.get_or_set``: the live value of ``key``, or ``await factory()`` once.

    Tasks of one event loop that miss ``key`` together await one ``factory()`` call, run as a
    task of its own: its exception reaches each of them and nothing is stored; cancelling one
    waiter leaves the call running for the others, cancelling every waiter cancels it. A task
    that asks for the key it is computing gets ``RuntimeError``. Tasks of another event loop
    (another thread) share a call of their own: no task or future crosses loops. ``ttl``
    defaults to the store's. O(1) plus the one call.
    """
    from ttlstore import _memo_async

    if not isinstance(store, TTLStore):
        raise TypeError(f"store must be a TTLStore, got {store!r}")
    if not callable(factory):
        raise TypeError(f"factory must be callable, got {factory!r}")
    if isinstance(ttl, _Unset):
        write = functools.partial(store.set, key)
    else:
        write = functools.partial(store.set, key, ttl=ttl_or_none("ttl", ttl))
    return await _memo_async.get_or_set(store, key, factory, write)
