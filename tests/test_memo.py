"""@cached on sync functions and methods: keys, expiry, single flight, stale-while-revalidate."""

from __future__ import annotations

import dataclasses
import gc
import logging
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ttlstore import TTLStore, cached
from ttlstore.memo import RECENT_HITS, CacheInfo
from ttlstore.testing import FakeClock


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll until ``condition()`` holds: for threads to reach a point, not for timing."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.001)


class Counted:
    """A function that records its calls."""

    def __init__(self, result: Callable[..., Any] = lambda *a, **k: (a, k)) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.result = result

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs))
        return self.result(*args, **kwargs)


# ---------------------------------------------------------------------- keys


def test_equal_hashes_are_different_keys() -> None:
    assert hash(-1) == hash(-2)

    @cached
    def ident(x: int) -> int:
        return x

    assert [ident(-1), ident(-2), ident(-1), ident(-2)] == [-1, -2, -1, -2]
    assert ident.cache_info().misses == 2


def test_keyword_order_and_defaults_do_not_matter() -> None:
    calls = []

    @cached
    def f(a: int, b: int = 2, *, c: int = 3) -> int:
        calls.append((a, b, c))
        return a + b + c

    assert f(1) == f(a=1) == f(1, 2) == f(1, b=2, c=3) == f(c=3, b=2, a=1) == 6
    assert calls == [(1, 2, 3)]
    assert f(1, c=4) == 7
    assert len(calls) == 2


def test_var_args_and_var_kwargs_are_part_of_the_key() -> None:
    calls = []

    @cached
    def f(*args: object, **kwargs: int) -> tuple[Any, ...]:
        calls.append(1)
        return args, tuple(sorted(kwargs.items()))

    assert f(1, 2, x=1, y=2) == f(1, 2, y=2, x=1)
    assert len(calls) == 1
    assert f(1, 2) != f(1, 2, x=1)
    assert f((1, 2)) == (((1, 2),), ())  # a tuple argument is not its elements
    assert len(calls) == 4


def test_untyped_equal_arguments_share_typed_keep_apart() -> None:
    untyped = cached(Counted(lambda x: type(x).__name__))
    assert untyped(1) == "int"
    assert untyped(1.0) == "int"  # equal arguments: one entry
    typed_calls = Counted(lambda x: type(x).__name__)

    @cached(typed=True)
    def typed(x: object) -> str:
        return str(typed_calls(x))

    assert typed(1) == "int"
    assert typed(1.0) == "float"
    assert typed(True) == "bool"
    assert len(typed_calls.calls) == 3


def test_unhashable_argument_names_the_function() -> None:
    @cached
    def lookup(x: Any) -> Any:
        return x

    with pytest.raises(TypeError, match=r"lookup\(\) got an unhashable argument"):
        lookup([1, 2])
    with pytest.raises(TypeError, match=r"lookup\(\) got an unhashable argument"):
        lookup.cache_invalidate({})


def test_an_argument_whose_eq_raises_type_error_keeps_its_error() -> None:
    class Odd:
        def __hash__(self) -> int:
            return 1

        def __eq__(self, other: object) -> bool:
            raise TypeError("odd comparison")

    f = cached(lambda x, y: 1)
    f(Odd(), 1)
    with pytest.raises(TypeError, match="odd comparison"):
        f(Odd(), 1)


def test_key_function_replaces_the_default_key() -> None:
    calls = Counted(lambda user, request_id: user)
    f = cached(key=lambda user, request_id: user)(calls)
    assert f("ann", 1) == "ann"
    assert f("ann", 2) == "ann"
    assert f(user="bob", request_id=3) == "bob"
    assert len(calls.calls) == 2
    assert f.cache_invalidate("ann", 99)
    assert f("ann", 4) == "ann"
    assert len(calls.calls) == 3


def test_a_callable_without_a_signature_gets_the_generic_key() -> None:
    cached_max: Any = cached(max)  # max has no signature inspect can read
    assert cached_max(3, 1) == 3
    assert cached_max(3, 1) == 3
    assert cached_max(1, 2, key=lambda x: -x) == 1
    assert cached_max.cache_info().hits == 1
    with pytest.raises(TypeError, match="unhashable"):
        cached_max([1, 5])


def test_a_mutable_default_still_caches_calls_that_give_the_argument() -> None:
    def f(x: int, seen: list[int] = []) -> int:  # noqa: B006 (the case under test)
        return x

    g = cached(f)
    assert g(1) == 1 == g(1)
    assert g.cache_info().hits == 1


def test_wrapper_looks_like_the_function() -> None:
    @cached(ttl=5)
    def documented(a: int, b: str = "x") -> str:
        """The docstring."""
        return b * a

    assert documented.__name__ == "documented"
    assert documented.__doc__ == "The docstring."
    assert documented.__wrapped__.__name__ == "documented"
    import inspect

    assert inspect.signature(documented) == inspect.signature(documented.__wrapped__)
    assert documented.cache_parameters() == {
        "maxsize": 128,
        "ttl": 5,
        "typed": False,
        "sliding": False,
        "stale": None,
    }


# ---------------------------------------------------------------------- expiry and bounds


def test_ttl_expires_with_the_clock(clock: FakeClock) -> None:
    calls = Counted(lambda x: len(calls.calls))
    f = cached(ttl=10, clock=clock)(calls)
    assert f("a") == 1
    clock.advance(9.999)
    assert f("a") == 1
    clock.advance(0.001)
    assert f("a") == 2
    assert f.cache_info().misses == 2


def test_no_ttl_never_expires(clock: FakeClock) -> None:
    calls = Counted(lambda x: x)
    f = cached(4, clock=clock)(calls)
    f(1)
    clock.advance(1e9)
    f(1)
    assert len(calls.calls) == 1


def test_maxsize_bounds_the_store_and_keeps_recent_hits(clock: FakeClock) -> None:
    calls = Counted(lambda x: x)

    @cached(3, ttl=100, clock=clock)
    def f(x: int) -> int:
        return int(calls(x))

    for x in (1, 2, 3):
        f(x)
    f(1)  # a hit: 1 is now the most recently used
    f(4)  # evicts 2, the least recently used
    assert len(f.cache_store) == 3
    assert sorted(f.cache_store) == [(1,), (3,), (4,)]
    f(1)
    assert len(calls.calls) == 4
    f(2)
    assert len(calls.calls) == 5


def test_recency_buffer_is_bounded() -> None:
    f = cached(10)(lambda x: x)
    f(1)
    for _ in range(RECENT_HITS * 10):
        f(1)
    assert f.cache_info().hits == RECENT_HITS * 10
    # the buffer never holds more than RECENT_HITS keys, whatever the number of hits
    f(2)
    assert f.cache_info().currsize == 2


def test_sliding_renews_on_hit(clock: FakeClock) -> None:
    calls = Counted(lambda x: x)
    f = cached(ttl=10, sliding=True, clock=clock)(calls)
    f(1)
    for _ in range(5):
        clock.advance(8)
        f(1)
    assert len(calls.calls) == 1
    clock.advance(10)
    f(1)
    assert len(calls.calls) == 2


def test_store_changes_reach_the_cache(clock: FakeClock) -> None:
    calls = Counted(lambda x: len(calls.calls))

    @cached(ttl=10, clock=clock)
    def f(x: int) -> Any:
        return calls(x)

    assert f(1) == 1
    f.cache_store.pop((1,))
    assert f(1) == 2
    f.cache_store.clear()
    assert f(1) == 3
    f.cache_store[(1,)] = "set by hand"
    assert f(1) == "set by hand"
    clock.advance(10)
    assert f.cache_store.expire() == 1
    assert f(1) == 4


# ---------------------------------------------------------------------- controls


def test_cache_info_is_exact_after_a_scripted_sequence(clock: FakeClock) -> None:
    f = cached(2, ttl=10, clock=clock)(lambda x: x)
    f(1)  # miss
    f(1)  # hit
    f(2)  # miss
    f(2)  # hit
    f(1)  # hit
    f(3)  # miss, evicts 2
    f(2)  # miss, evicts 1? no: 1 was used after 2, so 3's write evicted 2; this evicts 1
    clock.advance(10)
    f(3)  # miss (expired)
    assert f.cache_info() == CacheInfo(hits=3, misses=5, maxsize=2, currsize=1)
    assert f.cache_invalidate(3)
    assert not f.cache_invalidate(3)
    assert f.cache_info() == CacheInfo(hits=3, misses=5, maxsize=2, currsize=0)
    f(4)
    f.cache_clear()
    assert f.cache_info() == CacheInfo(hits=0, misses=0, maxsize=2, currsize=0)
    f(4)
    assert f.cache_info() == CacheInfo(hits=0, misses=1, maxsize=2, currsize=1)


def test_invalidate_takes_the_call_arguments() -> None:
    @cached
    def f(a: int, b: int = 0) -> int:
        return a + b

    f(1, 2)
    f(3)
    assert f.cache_invalidate(1, b=2)
    assert not f.cache_invalidate(1, 3)
    assert f.cache_invalidate(a=3, b=0)
    assert f.cache_info().currsize == 0


# ---------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"maxsize": 0}, ValueError, "maxsize must be a positive int, got 0"),
        ({"maxsize": -3}, ValueError, "maxsize"),
        ({"maxsize": None}, TypeError, "maxsize must be a positive int, got None"),
        ({"maxsize": 2.5}, TypeError, "maxsize"),
        ({"ttl": -1}, ValueError, "ttl must be a positive finite number of seconds, got -1"),
        ({"ttl": 0}, ValueError, "ttl"),
        ({"ttl": "5"}, TypeError, "ttl"),
        ({"stale": 5}, ValueError, "stale=5 needs a ttl"),
        ({"ttl": 5, "stale": -1}, ValueError, "stale must be"),
        ({"key": "user_id"}, TypeError, "key must be callable or None, got 'user_id'"),
        ({"typed": 1}, TypeError, "typed must be a bool"),
        ({"typed": True, "key": hash}, ValueError, "typed=True applies to the default key"),
        ({"sliding": True}, ValueError, "sliding=True needs a ttl"),
        ({"ttl": 5, "sliding": True, "stale": 1}, ValueError, "do not combine"),
        ({"clock": 5}, TypeError, "clock must be callable"),
        ({"store": {}}, TypeError, "store must be a TTLStore"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        cached(**kwargs)


def test_store_conflicts_are_named() -> None:
    store: TTLStore[Any, Any] = TTLStore(10, ttl=5)
    with pytest.raises(TypeError, match="maxsize=10 conflicts with store="):
        cached(10, store=store)
    with pytest.raises(TypeError, match=r"clock=.* conflicts with store="):
        cached(store=store, clock=time.monotonic)
    with pytest.raises(TypeError, match="sliding=True conflicts with store="):
        cached(store=store, sliding=True)
    with pytest.raises(ValueError, match="stale=1 needs a ttl"):
        cached(store=TTLStore(10), stale=1)


def test_generators_are_refused_at_decoration() -> None:
    def numbers() -> Iterator[int]:
        yield 1

    async def stream() -> Any:
        yield 1

    with pytest.raises(TypeError, match=r"cannot cache .*numbers\(\): a generator"):
        cached(numbers)
    with pytest.raises(TypeError, match=r"cannot cache .*stream\(\): a generator"):
        cached(ttl=5)(stream)
    not_callable: Any = 42
    with pytest.raises(TypeError, match="cached needs a callable"):
        cached(ttl=5)(not_callable)


# ---------------------------------------------------------------------- a store of one's own


def test_functions_sharing_a_store_keep_apart(clock: FakeClock) -> None:
    store: TTLStore[Any, Any] = TTLStore(100, ttl=10, clock=clock)
    double = cached(store=store)(lambda x: 2 * x)
    square = cached(store=store, ttl=50)(lambda x: x * x)
    assert double(3) == 6
    assert square(3) == 9
    assert double(3) == 6
    assert len(store) == 2
    clock.advance(10)
    assert len(store) == 1  # double's entry had the store's TTL, square's its own
    double(4)
    square.cache_clear()
    assert len(store) == 1
    assert double.cache_info().hits == 1
    assert double.cache_store is store


def test_store_with_stale_and_its_default_ttl(clock: FakeClock) -> None:
    store: TTLStore[Any, Any] = TTLStore(10, ttl=10, clock=clock)
    release = threading.Event()
    calls = Counted(lambda x: (release.wait(10), len(calls.calls))[1])
    f = cached(store=store, stale=5)(calls)
    release.set()
    assert f(1) == 1
    assert store.ttl(next(iter(store))) == 15  # ttl + stale
    clock.advance(11)
    assert f(1) == 1  # stale: served, refresh started
    _wait_for(lambda: f.cache_info().refreshes == 1 and f(1) == 2)


# ---------------------------------------------------------------------- single flight (threads)


def test_200_threads_missing_one_key_cause_one_call(clock: FakeClock) -> None:
    release = threading.Event()
    calls = Counted(lambda x: (release.wait(10), x * 2)[1])
    f = cached(ttl=60, clock=clock)(calls)
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(f(21))) for _ in range(200)]
    for thread in threads:
        thread.start()
    _wait_for(lambda: f.cache_info().misses == 200)
    release.set()
    for thread in threads:
        thread.join()
    assert results == [42] * 200
    assert len(calls.calls) == 1
    assert f.cache_info().misses == 200


def test_an_exception_reaches_every_waiter_and_is_not_cached() -> None:
    release = threading.Event()
    attempts = []

    @cached(ttl=60)
    def flaky(x: int) -> int:
        attempts.append(x)
        release.wait(10)
        if len(attempts) == 1:
            raise ConnectionError("backend down")
        return x

    errors: list[BaseException] = []

    def call() -> None:
        try:
            flaky(1)
        except ConnectionError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(20)]
    for thread in threads:
        thread.start()
    _wait_for(lambda: flaky.cache_info().misses == 20)
    release.set()
    for thread in threads:
        thread.join()
    assert len(errors) == 20
    assert len({id(e) for e in errors}) == 1  # the one exception of the one call
    assert attempts == [1]
    assert flaky(1) == 1  # not cached: the next call retries
    assert attempts == [1, 1]


def test_self_recursion_is_an_error_not_a_deadlock() -> None:
    @cached
    def loop(x: int) -> int:
        return loop(x) + 1

    with pytest.raises(RuntimeError, match=r"loop\(\) asked for its own key \(1,\)"):
        loop(1)
    assert loop.cache_info().currsize == 0

    @cached
    def fib(n: int) -> int:  # recursion on other keys is fine
        return n if n < 2 else fib(n - 1) + fib(n - 2)

    assert fib(80) == 23416728348467685


def test_invalidate_during_a_computation_keeps_its_result_out() -> None:
    started, release = threading.Event(), threading.Event()

    @cached
    def slow(x: int) -> int:
        started.set()
        release.wait(10)
        return x

    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(slow(1)))
    thread.start()
    started.wait(10)
    assert not slow.cache_invalidate(1)
    release.set()
    thread.join()
    assert result == [1]  # the caller still gets it
    assert slow.cache_info().currsize == 0  # the store does not


# ---------------------------------------------------------------------- stale-while-revalidate


def test_stale_serves_the_old_value_while_one_refresh_runs(clock: FakeClock) -> None:
    release = threading.Event()
    version = [0]

    def compute(x: int) -> tuple[int, int]:
        version[0] += 1
        if version[0] > 1:
            release.wait(10)
        return x, version[0]

    calls = Counted(compute)
    f = cached(ttl=10, stale=5, clock=clock)(calls)
    assert f(1) == (1, 1)
    clock.advance(10)  # stale now
    reads = [f(1) for _ in range(50)]  # none of them waits for the refresh
    assert reads == [(1, 1)] * 50
    _wait_for(lambda: len(calls.calls) == 2)
    assert f.cache_info().refreshes == 1
    release.set()
    _wait_for(lambda: f(1) == (1, 2))
    info = f.cache_info()
    assert (info.refreshes, info.refresh_errors, info.misses) == (1, 0, 1)
    assert info.stale_hits >= 50
    assert len(calls.calls) == 2
    clock.advance(9)
    assert f(1) == (1, 2)  # fresh for ttl from the refresh
    assert len(calls.calls) == 2


def test_a_failed_refresh_is_logged_and_the_old_value_served_until_ttl_plus_stale(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    fail = [False]

    @cached(ttl=10, stale=5, clock=clock)
    def fetch(x: int) -> str:
        if fail[0]:
            raise ConnectionError("upstream down")
        return f"v{clock.now}"

    assert fetch(1) == "v1000.0"
    fail[0] = True
    clock.advance(12)
    with caplog.at_level(logging.ERROR, logger="ttlstore"):
        assert fetch(1) == "v1000.0"
        _wait_for(lambda: fetch.cache_info().refresh_errors == 1)
    assert "refresh of test_a_failed_refresh" in caplog.text
    assert "upstream down" in caplog.text
    for _ in range(10):  # no second refresh for this value: quiet during an outage
        assert fetch(1) == "v1000.0"
    clock.advance(2.999)
    assert fetch(1) == "v1000.0"
    info = fetch.cache_info()
    assert (info.refreshes, info.refresh_errors) == (1, 1)
    clock.advance(0.001)  # ttl + stale: gone; the next call computes as a miss
    with pytest.raises(ConnectionError):
        fetch(1)
    fail[0] = False
    assert fetch(1) == "v1015.0"


# ---------------------------------------------------------------------- methods


class Service:
    def __init__(self, value: int) -> None:
        self.value = value
        self.calls = 0

    @cached(ttl=60)
    def get(self, x: int) -> tuple[int, int]:
        self.calls += 1
        return self.value, x

    @staticmethod
    @cached
    def static_inner(x: int) -> int:
        return x * 3

    @cached
    @staticmethod
    def static_outer(x: int) -> int:
        return x * 4

    @classmethod
    @cached
    def class_inner(cls, x: int) -> tuple[str, int]:
        return cls.__name__, x

    @cached
    @classmethod
    def class_outer(cls, x: int) -> tuple[str, int]:
        return cls.__name__, x


def test_methods_do_not_keep_instances_alive() -> None:
    service = Service(1)
    assert service.get(5) == (1, 5)
    ref = weakref.ref(service)
    del service
    gc.collect()
    assert ref() is None


def test_instances_never_share_entries_even_when_equal() -> None:
    @dataclasses.dataclass
    class Point:
        x: int

        @cached
        def norm(self) -> int:
            return abs(self.x)

    a, b = Point(1), Point(1)
    assert a == b
    a.norm()
    b.norm()
    assert Point.norm.cache_info().misses == 2  # unhashable (eq dataclass) and kept apart
    one, two = Service(1), Service(2)
    assert one.get(1) == (1, 1)
    assert two.get(1) == (2, 1)
    assert one.get(1) == (1, 1)
    assert (one.calls, two.calls) == (1, 1)


def test_a_new_instance_at_a_dead_ones_address_sees_none_of_its_entries() -> None:
    seen_ids = set()
    reused = 0
    for value in range(300):
        service = Service(value)
        reused += id(service) in seen_ids
        seen_ids.add(id(service))
        assert service.get(0) == (value, 0)
        del service
    assert reused > 0  # CPython reused addresses: the case under test happened


def test_static_and_class_methods_in_either_order() -> None:
    service = Service(0)
    assert Service.static_inner(2) == service.static_inner(2) == 6
    assert Service.static_outer(2) == service.static_outer(2) == 8
    # mypy does not bind cls through a classmethod of a callable object: check at run time.
    owner: Any = Service
    assert owner.class_inner(2) == service.class_inner(2) == ("Service", 2)
    assert owner.class_outer(2) == service.class_outer(2) == ("Service", 2)
    assert Service.static_inner.cache_info().hits == 1
    assert Service.static_outer.cache_info().hits == 1


def test_method_controls_take_the_instance_first() -> None:
    service = Service(7)
    service.get(1)
    service.get(1)
    assert Service.get.cache_info().hits >= 1
    assert Service.get.cache_invalidate(service, 1)
    assert not Service.get.cache_invalidate(service, 1)
    assert not Service.get.cache_invalidate(Service(8), 1)  # never seen: nothing to drop
    service.get(1)
    assert service.calls == 2


def test_method_of_a_class_without_weakrefs_is_refused_clearly() -> None:
    class Slotted:
        __slots__ = ("v",)

        def __init__(self) -> None:
            self.v = 1

        @cached
        def get(self) -> int:
            return self.v

    with pytest.raises(TypeError, match=r"Slotted.get\(\) needs instances that support weak"):
        Slotted().get()


def test_method_key_function_is_called_without_self() -> None:
    class Repo:
        @cached(key=lambda user, request: user)
        def load(self, user: str, request: int) -> str:
            return f"{user}:{request}"

    repo = Repo()
    assert repo.load("ann", 1) == "ann:1"
    assert repo.load("ann", 2) == "ann:1"
    assert Repo().load("ann", 3) == "ann:3"


# ---------------------------------------------------------------------- imports


def test_caching_a_sync_function_imports_no_asyncio() -> None:
    script = textwrap.dedent(
        """
        import sys
        import ttlstore
        before = "asyncio" in sys.modules
        from ttlstore import cached

        @cached(ttl=5)
        def f(x):
            return x

        f(1)
        print(before, "asyncio" in sys.modules, "ttlstore._memo_async" in sys.modules)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.split()
    # Once `import ttlstore` itself leaves asyncio out (issue 11), this is the strict check.
    assert out[1:] == [out[0], "False"]


def test_memo_and_store_alone_import_no_asyncio() -> None:
    """memo.py and what it imports, loaded without the package's other modules."""
    script = textwrap.dedent(
        """
        import sys, types, pathlib, importlib
        import ttlstore  # the package __init__ runs here: forget all it loaded
        root = pathlib.Path(ttlstore.__file__).parent
        loaded = [m for m in sys.modules if m.startswith(("asyncio", "ttlstore"))]
        for name in loaded:
            del sys.modules[name]
        package = types.ModuleType("ttlstore")
        package.__path__ = [str(root)]
        sys.modules["ttlstore"] = package
        memo = importlib.import_module("ttlstore.memo")

        @memo.cached(ttl=5)
        def f(x):
            return x

        f(1)
        print("asyncio" in sys.modules)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["False"]


def test_exported_from_the_package() -> None:
    import ttlstore

    assert ttlstore.cached is cached
    assert "cached" in ttlstore.__all__
