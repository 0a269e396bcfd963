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

import enum
import functools
import inspect
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, ParamSpec, Protocol, SupportsFloat, TypeVar, overload

from ttlstore._checks import positive_int, positive_seconds, ttl_or_none
from ttlstore._memo_compile import Name, compile_wrapper, is_method, shape_of
from ttlstore._memo_state import RECENT_HITS, Memo
from ttlstore.store import DEFAULT_TTL, StoreDefault, TTLStore

__all__ = ["RECENT_HITS", "CacheInfo", "CachedFunction", "aget_or_set", "cached"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")


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
    memo = Memo(
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
        memo.prefix = Name(f"<{name}>")  # functions sharing a store keep their entries apart
    shape = shape_of(func)
    method = kind is None and is_method(func, shape)
    miss: Callable[..., Any] = memo.miss
    is_async = inspect.iscoroutinefunction(func)
    if is_async:
        from ttlstore import _memo_async  # asyncio only once an async function is cached

        miss = _memo_async.bind_miss(memo)
    wrapper, keyof = compile_wrapper(
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

    def cache_info() -> CacheInfo:
        """The counters since the last ``cache_clear()``, and the store's size."""
        return CacheInfo(**memo.counts())

    def cache_parameters() -> dict[str, Any]:
        """The parameters of the cache, as ``functools.lru_cache`` reports its own."""
        return {
            "maxsize": memo.store.maxsize,
            "ttl": options.ttl,
            "typed": options.typed,
            "sliding": options.sliding,
            "stale": options.stale,
        }

    wrapper.cache_info = cache_info
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


async def aget_or_set(
    store: TTLStore[K, V],
    key: K,
    factory: Callable[[], Awaitable[V]],
    ttl: SupportsFloat | StoreDefault | None = DEFAULT_TTL,
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
    if ttl is DEFAULT_TTL:
        write = functools.partial(store.set, key)
    else:
        write = functools.partial(store.set, key, ttl=ttl_or_none("ttl", ttl))
    return await _memo_async.get_or_set(store, key, factory, write)
