"""The performance targets of issue 4, checked against a run's results.

Each target bounds a ratio of medians measured in the same run: ``subject / peer <= limit(n)``.
A target with several workloads or peers reports its worst ratio. Targets are reported by the
comparison command, never asserted in tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

TIMED = ("get-hit", "get-miss", "set-update", "set-evict", "mixed", "expire")
PURE_PYTHON_PEERS = (
    "cachetools.TTLCache",
    "cachetools.TLRUCache",
    "expiringdict.ExpiringDict",
    "cacheout.Cache",
    "cacheout.LRUCache",
)
MEMORY = "memory"


def _at(limits: dict[int, float]) -> Callable[[int], float | None]:
    return limits.get


def _small_large(small: float, large: float) -> Callable[[int], float | None]:
    def limit(n: int) -> float | None:
        if n <= 1_000:
            return small
        if n >= 100_000:
            return large
        return None

    return limit


def _always(value: float) -> Callable[[int], float | None]:
    return lambda _n: value


@dataclass(frozen=True)
class Target:
    text: str
    subject: str
    peers: tuple[str, ...]
    workloads: tuple[str, ...]
    limit: Callable[[int], float | None]


TARGETS: tuple[Target, ...] = (
    Target(
        "threadsafe=False get-hit within 1.3x of the inline floor at n <= 1 000, 1.5x from 100 000",
        "ttlstore(threadsafe=False)",
        ("OrderedDict inline floor",),
        ("get-hit",),
        _small_large(1.3, 1.5),
    ),
    Target(
        "faster than every pure-Python TTL peer on every operation",
        "ttlstore",
        PURE_PYTHON_PEERS,
        TIMED,
        _always(1.0),
    ),
    Target(
        "at least 3x faster than cachetools.TTLCache on get-hit, get-miss, mixed at n = 1 000",
        "ttlstore",
        ("cachetools.TTLCache",),
        ("get-hit", "get-miss", "mixed"),
        _at({1_000: 1 / 3}),
    ),
    Target(
        "at least 2x faster than cachetools.TTLCache on set-evict at n = 1 000",
        "ttlstore",
        ("cachetools.TTLCache",),
        ("set-evict",),
        _at({1_000: 1 / 2}),
    ),
    Target(
        "threadsafe=False within 3x of cachebox.VTTLCache on get-hit and mixed at n = 1 000, "
        "2x at 1 000 000",
        "ttlstore(threadsafe=False)",
        ("cachebox.VTTLCache",),
        ("get-hit", "mixed"),
        _at({1_000: 3.0, 1_000_000: 2.0}),
    ),
    Target(
        "bulk expiry per entry no slower than cachetools.TLRUCache",
        "ttlstore",
        ("cachetools.TLRUCache",),
        ("expire",),
        _always(1.0),
    ),
    Target(
        "memory per entry (traced) at most cachetools.TTLCache's",
        "ttlstore",
        ("cachetools.TTLCache",),
        (MEMORY,),
        _always(1.0),
    ),
)


COMPILED = "ttlstore compiled"
COMPILED_UNLOCKED = "ttlstore compiled(threadsafe=False)"


def _compiled_twin(target: Target) -> Target:
    """The same issue-4 target, judged for the mypyc-compiled build."""
    subject = target.subject.replace("ttlstore", COMPILED, 1)
    return Target(
        f"{target.text} (compiled)", subject, target.peers, target.workloads, target.limit
    )


#: Issue 16: what the compiled core must reach, in the same run.
COMPILED_TARGETS: tuple[Target, ...] = (
    Target(
        "compiled threadsafe=False get-hit within 1.3x of the inline floor at n = 1 000",
        COMPILED_UNLOCKED,
        ("OrderedDict inline floor",),
        ("get-hit",),
        _at({1_000: 1.3}),
    ),
    Target(
        "compiled threadsafe=False get-hit and mixed within 2x of cachebox.VTTLCache at n = 1 000",
        COMPILED_UNLOCKED,
        ("cachebox.VTTLCache",),
        ("get-hit", "mixed"),
        _at({1_000: 2.0}),
    ),
    Target(
        "compiled at least 5x faster than cachetools.TTLCache on get-hit at n = 1 000",
        COMPILED,
        ("cachetools.TTLCache",),
        ("get-hit",),
        _at({1_000: 1 / 5}),
    ),
    Target(
        "compiled at least 3x faster than cachetools.TTLCache on set-evict at n = 1 000",
        COMPILED,
        ("cachetools.TTLCache",),
        ("set-evict",),
        _at({1_000: 1 / 3}),
    ),
    *(_compiled_twin(target) for target in TARGETS),
)

ALL_TARGETS = TARGETS + COMPILED_TARGETS


def check(
    report: dict[str, Any], targets: tuple[Target, ...] = ALL_TARGETS
) -> list[dict[str, Any]]:
    """One row per target and size: the worst ratio found, its limit, whether it is met."""
    medians: dict[tuple[str, str, int], float] = {
        (c["workload"], c["library"], c["n"]): c["median"]
        for c in report["results"]
        if c["status"] == "ok"
    }
    memory = report.get("memory")
    if memory:
        for row in memory["results"]:
            if row["status"] == "ok":
                medians[(MEMORY, row["library"], memory["n"])] = row["bytes_per_entry"]
    sizes = sorted({key[2] for key in medians})
    rows = []
    for target in targets:
        for n in sizes:
            limit = target.limit(n)
            if limit is None:
                continue
            worst: tuple[float, str, str] | None = None
            for workload in target.workloads:
                mine = medians.get((workload, target.subject, n))
                for peer in target.peers:
                    theirs = medians.get((workload, peer, n))
                    if mine is None or not theirs:
                        continue
                    ratio = mine / theirs
                    if worst is None or ratio > worst[0]:
                        worst = (ratio, workload, peer)
            if worst is None:
                continue
            rows.append(
                {
                    "target": target.text,
                    "subject": target.subject,
                    "n": n,
                    "ratio": worst[0],
                    "workload": worst[1],
                    "peer": worst[2],
                    "limit": limit,
                    "met": worst[0] <= limit,
                }
            )
    return rows
