"""One adapter per library compared by ``python -m benchmarks.compare``.

An adapter says how to build a store and how to read and write one key, as a line of source code
(the way ``timeit`` takes a statement). The workloads paste these lines into one loop template, so
every library is timed by the same loop and each one is called the way its users call it: no
wrapper function or ``functools.partial`` sits between the loop and the library (a partial alone
costs ~75 ns, more than a whole cachebox read). Everything a library needs per call (a bound
method, a TTL argument) is bound once before the clock starts.

To add a peer: subclass :class:`Adapter`, fill in the class attributes and :meth:`Adapter.make`,
and append an instance to :data:`ADAPTERS`. A peer whose module does not import is reported as
missing. Rate limiters (a later issue) get adapters of another ``kind`` and their own workloads.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import platform
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar, cast

Clock = Callable[[], float]
#: A compiled timed loop: ``loop(store, keys, writes, value) -> elapsed ns``.
Loop = Callable[[Any, Sequence[str], Sequence[bool], int], int]

#: TTL of every entry in the timing workloads: long enough that nothing expires during a run.
TTL = 3600.0
#: The value stored under every key (a small int: shared, allocates nothing).
VALUE = 1


class Unsupported(Exception):
    """This library cannot run this workload; the message says why (it goes into the table)."""


@dataclass(frozen=True)
class Op:
    """One operation as source code.

    ``body`` runs once per key with ``c`` (the store), ``k`` (the key) and ``v`` (the value) in
    scope; ``bind`` runs once before timing starts: bind methods and constants to locals there.
    Globals available to ``bind``: ``TTL`` (seconds, float), ``TTL_TD`` (a ``timedelta``),
    ``mono`` (``time.monotonic``). The mixed workload runs the get and set ``bind`` both, so a
    name bound by both must mean the same thing.
    """

    body: str
    bind: str = ""


def _indent(code: str, spaces: int) -> str:
    pad = " " * spaces
    return "\n".join(pad + line for line in code.strip("\n").splitlines())


_SIMPLE_LOOP = """\
def loop(c, keys, writes, v):
{bind}
    _t0 = _ns()
    for k in keys:
{body}
    return _ns() - _t0
"""

_MIXED_LOOP = """\
def loop(c, keys, writes, v):
{bind}
    _t0 = _ns()
    for k, w in zip(keys, writes):
        if w:
{set_body}
        else:
{get_body}
    return _ns() - _t0
"""

_NAMESPACE: dict[str, object] = {
    "_ns": time.perf_counter_ns,
    "TTL": TTL,
    "TTL_TD": timedelta(seconds=TTL),
    "mono": time.monotonic,
}


def compile_loop(name: str, body: Op, other: Op | None = None) -> Loop:
    """Compile a timed loop over ``keys`` running ``body`` per key.

    With ``other`` the loop is the mixed one: ``writes[i]`` true runs ``body`` (the write),
    false runs ``other`` (the read).
    """
    if other is None:
        src = _SIMPLE_LOOP.format(bind=_indent(body.bind or "pass", 4), body=_indent(body.body, 8))
    else:
        bind = "\n".join(b for b in (body.bind, other.bind) if b) or "pass"
        src = _MIXED_LOOP.format(
            bind=_indent(bind, 4), set_body=_indent(body.body, 12), get_body=_indent(other.body, 12)
        )
    namespace = dict(_NAMESPACE)
    exec(compile(src, f"<loop {name}>", "exec"), namespace)
    return cast(Loop, namespace["loop"])


#: The loop with nothing in it: what every ns/op figure includes besides the library call.
EMPTY_LOOP: Loop = compile_loop("empty", Op("pass"))


class Library:
    """A library in the comparison: how to tell that it is present, and its version."""

    kind: ClassVar[str]
    name: ClassVar[str]
    #: Module imported to decide whether the library is present.
    module: ClassVar[str]
    #: Distribution whose version is reported (``None``: the Python version).
    distribution: ClassVar[str | None] = None

    def load(self) -> None:
        """Import the library; raises (any exception) when it is missing, too old or broken."""
        importlib.import_module(self.module)

    def version(self) -> str:
        if self.distribution is None:
            return platform.python_version()
        try:
            return importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"


class Adapter(Library):
    """How to drive one library. Subclasses set the class attributes and :meth:`make`."""

    kind: ClassVar[str] = "store"
    #: Eviction policy, as the table shows it.
    policy: ClassVar[str] = "LRU"
    #: False when a read does not refresh recency (FIFO-like eviction): marked in the table.
    read_refreshes: ClassVar[bool] = True
    #: Whether one instance may be shared by threads without an external lock.
    threadsafe: ClassVar[bool] = True
    #: Part of the state lives in native (Rust) memory, which tracemalloc does not see.
    native: ClassVar[bool] = False
    #: A reference point (``dict``, the inline floor), not a peer.
    reference: ClassVar[bool] = False
    #: False: no size bound (no set-with-eviction).
    bounded: ClassVar[bool] = True
    #: False: no clock can be injected, so bulk expiry cannot be timed deterministically.
    injectable_clock: ClassVar[bool] = False
    #: Why bulk expiry is skipped when ``injectable_clock`` is false.
    no_expiry_reason: ClassVar[str] = "no injectable clock"
    get_op: ClassVar[Op]
    set_op: ClassVar[Op]
    #: Quirks worth a footnote.
    notes: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self._loops: dict[str, Loop] = {}

    # -- the store ------------------------------------------------------------------------------
    def make(self, maxsize: int, ttl: float = TTL, clock: Clock | None = None) -> Any:
        """A new store bounded to ``maxsize`` entries whose entries live ``ttl`` seconds.

        ``clock`` is given only by the bulk-expiry workload, and only when
        ``injectable_clock`` is true.
        """
        raise NotImplementedError

    def fill(self, store: Any, keys: Sequence[str]) -> None:
        """Insert ``keys`` (value :data:`VALUE`, default TTL) the way a user would."""
        self.loop("set")(store, keys, (), VALUE)

    def expire(self, store: Any) -> int:
        """Reclaim every due entry now; return how many were reclaimed."""
        raise Unsupported(self.no_expiry_reason)

    def close(self, store: Any) -> None:
        """Release whatever the store holds besides memory (threads, timers)."""

    # -- timed loops ----------------------------------------------------------------------------
    def loop(self, which: str) -> Loop:
        """The compiled loop ``"get"``, ``"set"`` or ``"mixed"`` (cached)."""
        loop = self._loops.get(which)
        if loop is None:
            name = f"{self.name} {which}"
            if which == "get":
                loop = compile_loop(name, self.get_op)
            elif which == "set":
                loop = compile_loop(name, self.set_op)
            elif which == "mixed":
                loop = compile_loop(name, self.set_op, self.get_op)
            else:
                raise ValueError(f"unknown loop {which!r}")
            self._loops[which] = loop
        return loop


# -- ttlstore -----------------------------------------------------------------------------------


class _TTLStore(Adapter):
    module = "ttlstore"
    distribution = "ttlstore"
    injectable_clock = True
    get_op = Op("get(k)", "get = c.get")
    set_op = Op("set_(k, v)", "set_ = c.set")
    tsafe: ClassVar[bool]

    def load(self) -> None:
        from ttlstore import TTLStore  # noqa: F401

    def make(self, maxsize: int, ttl: float = TTL, clock: Clock | None = None) -> Any:
        from ttlstore import TTLStore

        if clock is None:
            return TTLStore(maxsize, ttl, threadsafe=self.tsafe)
        return TTLStore(maxsize, ttl, clock=clock, threadsafe=self.tsafe)

    def expire(self, store: Any) -> int:
        reclaimed: int = store.expire()
        return reclaimed


class TTLStoreSafe(_TTLStore):
    name = "ttlstore"
    tsafe = True
    threadsafe = True


class TTLStoreUnsafe(_TTLStore):
    name = "ttlstore(threadsafe=False)"
    tsafe = False
    threadsafe = False


class TTLStoreMetrics(TTLStoreSafe):
    """The thread-safe store registered with ``ttlstore.metrics`` (``compare --metrics``)."""

    name = "ttlstore + metrics"
    notes = (
        "the thread-safe store registered with `ttlstore.metrics` on a private prometheus_client "
        "registry (scraped once, when made): metrics are read at scrape time, so the hot path "
        "must time as the plain store does",
    )

    def load(self) -> None:
        import ttlstore.metrics  # noqa: F401

    def make(self, maxsize: int, ttl: float = TTL, clock: Clock | None = None) -> Any:
        from prometheus_client import CollectorRegistry, generate_latest

        from ttlstore.metrics import register

        store = super().make(maxsize, ttl, clock)
        registry = CollectorRegistry()
        register({"bench": store}, registry=registry)
        if b'ttlstore_store_writes_total{name="bench"}' not in generate_latest(registry):
            raise RuntimeError("the registered store is missing from the scrape")
        # The registry (and the collector in it) lives as long as the store, no longer.
        _REGISTRIES[id(store)] = registry
        weakref.finalize(store, _REGISTRIES.pop, id(store), None)
        return store


#: Registries of the stores TTLStoreMetrics made, by id(store); each goes with its store.
_REGISTRIES: dict[int, Any] = {}


class TTLStoreControl(TTLStoreSafe):
    """The plain store again (``compare --metrics``): how far two identical columns differ."""

    name = "ttlstore (A/A control)"
    notes = ("the plain thread-safe store once more: its change is the run's noise",)


# -- cachetools ---------------------------------------------------------------------------------


class CachetoolsTTL(Adapter):
    name = "cachetools.TTLCache"
    module = "cachetools"
    distribution = "cachetools"
    threadsafe = False
    injectable_clock = True
    get_op = Op("get(k)", "get = c.get")
    set_op = Op("c[k] = v")
    notes = ("not thread-safe: callers add their own lock (not included here)",)

    def make(self, maxsize: int, ttl: float = TTL, clock: Clock | None = None) -> Any:
        from cachetools import TTLCache

        return TTLCache(maxsize, ttl, timer=clock or time.monotonic)

    def expire(self, store: Any) -> int:
        return len(store.expire())


class CachetoolsTLRU(CachetoolsTTL):
    name = "cachetools.TLRUCache"
    notes = (
        "per-entry deadline from a Python `ttu(key, value, now)` callback; heap-based expiry",
        "not thread-safe: callers add their own lock (not included here)",
    )

    def make(self, maxsize: int, ttl: float = TTL, clock: Clock | None = None) -> Any:
        from cachetools import TLRUCache

        def ttu(_key: object, _value: object, now: float) -> float:
            return now + ttl

        return TLRUCache(maxsize, ttu, timer=clock or time.monotonic)


# -- cachebox (Rust) ----------------------------------------------------------------------------


class CacheboxTTL(Adapter):
    name = "cachebox.TTLCache"
    module = "cachebox"
    distribution = "cachebox"
    policy = "FIFO"
    read_refreshes = False
    native = True
    get_op = Op("get(k)", "get = c.get")
    set_op = Op("c[k] = v")
    notes = ("one TTL for the whole cache, no per-entry TTL; reads the wall clock",)

    def make(self, maxsize: int, ttl: float = TTL, clock: Clock | None = None) -> Any:
        from cachebox import TTLCache

        return TTLCache(maxsize, ttl)


class CacheboxVTTL(Adapter):
    name = "cachebox.VTTLCache"
    module = "cachebox"
    distribution = "cachebox"
    policy = "soonest deadline"
    read_refreshes = False
    native = True
    get_op = Op("get(k)", "get = c.get")
    set_op = Op("insert(k, v, ttl)", "insert = c.insert\nttl = TTL")
    notes = (
        "evicts the entry whose deadline comes first, not the least recently used one: with one "
        "TTL for all entries that is FIFO",
    )

    def make(self, maxsize: int, ttl: float = TTL, clock: Clock | None = None) -> Any:
        from cachebox import VTTLCache

        return VTTLCache(maxsize)


# -- theine (Rust core) -------------------------------------------------------------------------


class Theine(Adapter):
    name = "theine.Cache"
    module = "theine"
    distribution = "theine"
    policy = "W-TinyLFU"
    native = True
    get_op = Op("get(k)", "get = c.get")
    set_op = Op("tset(k, v, ttl_td)", "tset = c.set\nttl_td = TTL_TD")
    notes = (
        "`get` returns `(value, found)`; TTL is a `timedelta` per `set`; reads "
        "`time.monotonic_ns()` directly; admission may refuse a new key when full; "
        "a shared background thread advances its timer wheel once a second",
    )

    def make(self, maxsize: int, ttl: float = TTL, clock: Clock | None = None) -> Any:
        from theine import Cache

        return Cache(maxsize)

    def close(self, store: Any) -> None:
        store.close()


# -- cacheout -----------------------------------------------------------------------------------


class _Cacheout(Adapter):
    module = "cacheout"
    distribution = "cacheout"
    injectable_clock = True
    get_op = Op("get(k)", "get = c.get")
    set_op = Op("cset(k, v)", "cset = c.set")
    notes = (
        "every insert of a new key runs `delete_expired()`, which copies the whole expiry dict: "
        "O(n) per insert; `fill` therefore writes its internal dicts directly (same end state)",
    )
    cls_name: ClassVar[str]

    def make(self, maxsize: int, ttl: float = TTL, clock: Clock | None = None) -> Any:
        cls = getattr(importlib.import_module("cacheout"), self.cls_name)
        if clock is None:
            return cls(maxsize=maxsize, ttl=ttl)
        return cls(maxsize=maxsize, ttl=ttl, timer=clock)

    def fill(self, store: Any, keys: Sequence[str]) -> None:
        data = store._cache
        expire_times = store._expire_times
        deadline = store.timer() + store.ttl
        if len(data) + len(keys) > store.maxsize:
            raise ValueError("direct fill would overflow the cache")
        for key in keys:
            data[key] = VALUE
            expire_times[key] = deadline

    def expire(self, store: Any) -> int:
        reclaimed: int = store.delete_expired()
        return reclaimed


class CacheoutCache(_Cacheout):
    name = "cacheout.Cache"
    cls_name = "Cache"
    policy = "FIFO"
    read_refreshes = False


class CacheoutLRU(_Cacheout):
    name = "cacheout.LRUCache"
    cls_name = "LRUCache"


# -- expiringdict -------------------------------------------------------------------------------


class ExpiringDict(Adapter):
    name = "expiringdict.ExpiringDict"
    module = "expiringdict"
    distribution = "expiringdict"
    policy = "FIFO"
    read_refreshes = False
    get_op = Op("get(k)", "get = c.get")
    set_op = Op("c[k] = v")
    notes = ("reads `time.time()` directly; no method to reclaim expired entries",)

    def make(self, maxsize: int, ttl: float = TTL, clock: Clock | None = None) -> Any:
        impl = importlib.import_module("expiringdict").ExpiringDict  # untyped package
        return impl(max_len=maxsize, max_age_seconds=ttl)


# -- references ---------------------------------------------------------------------------------


class Dict(Adapter):
    name = "dict"
    module = "builtins"
    policy = "none (unbounded)"
    threadsafe = False
    reference = True
    bounded = False
    get_op = Op("get(k)", "get = c.get")
    set_op = Op("c[k] = v")

    no_expiry_reason = "reference: no expiry"

    def make(self, maxsize: int, ttl: float = TTL, clock: Clock | None = None) -> Any:
        return {}


class _Floor(OrderedDict[str, tuple[int, float]]):
    """The store of the inline floor: an ``OrderedDict`` of ``(value, deadline)`` + its bound."""

    __slots__ = ("maxsize",)

    def __init__(self, maxsize: int) -> None:
        super().__init__()
        self.maxsize = maxsize


class InlineFloor(Adapter):
    """What any pure-Python TTL+LRU store must do per call, written inline in the loop."""

    name = "OrderedDict inline floor"
    module = "collections"
    threadsafe = False
    reference = True
    get_op = Op(
        "e = oget(k)\nif e is not None and now() < e[1]:\n    mtoe(k)",
        "oget = c.get\nmtoe = c.move_to_end\nnow = mono",
    )
    set_op = Op(
        "c[k] = (v, now() + ttl)\nmove(k)\nif len(c) > bound:\n    popitem(False)",
        "move = c.move_to_end\npopitem = c.popitem\nbound = c.maxsize\nnow = mono\nttl = TTL",
    )
    notes = (
        "OrderedDict lookup + `move_to_end` + one `time.monotonic()` per call, no lock, no "
        "expiry index: the floor a pure-Python TTL+LRU store can approach",
    )

    no_expiry_reason = "reference: no expiry index"

    def make(self, maxsize: int, ttl: float = TTL, clock: Clock | None = None) -> Any:
        return _Floor(maxsize)


#: Every library compared, in table order. ttlstore (threadsafe) first: it is the ratio's base.
ADAPTERS: tuple[Adapter, ...] = (
    TTLStoreSafe(),
    TTLStoreUnsafe(),
    CachetoolsTTL(),
    CachetoolsTLRU(),
    CacheboxTTL(),
    CacheboxVTTL(),
    Theine(),
    CacheoutCache(),
    CacheoutLRU(),
    ExpiringDict(),
    Dict(),
    InlineFloor(),
)

#: The adapter every ratio is taken against.
BASELINE = TTLStoreSafe.name

#: Timed beside the baseline with ``--metrics``; not peers, so not in ADAPTERS by default.
METRICS_ADAPTERS: tuple[Adapter, ...] = (TTLStoreMetrics(), TTLStoreControl())
