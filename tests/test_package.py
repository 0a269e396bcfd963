"""First contact: what a new user meets before reading any code."""

from __future__ import annotations

import importlib
import inspect
import re
import subprocess
import sys

import pytest

PUBLIC_MODULES = [
    "ttlstore",
    "ttlstore.store",
    "ttlstore.sweeper",
    "ttlstore.memo",
    "ttlstore.idempotency",
    "ttlstore.ratelimit",
    "ttlstore.records",
    "ttlstore.testing",
    "ttlstore.asgi",
    "ttlstore.redis",
    "ttlstore.metrics",
]


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)


@pytest.mark.parametrize(
    ("module", "dependency", "extra"),
    [
        ("ttlstore.asgi", "http_sf", "asgi"),
        ("ttlstore.redis", "redis", "redis"),
        ("ttlstore.metrics", "prometheus_client", "metrics"),
    ],
)
def test_an_optional_module_without_its_dependency_names_its_extra(
    module: str, dependency: str, extra: str
) -> None:
    run = _run(f"import sys; sys.modules[{dependency!r}] = None; import {module}")
    assert run.returncode != 0
    assert f"pip install 'ttlstore[{extra}]'" in run.stderr
    assert "ModuleNotFoundError" not in run.stderr.splitlines()[-1]


def _public_callables() -> list[tuple[str, object]]:
    found: list[tuple[str, object]] = []
    for name in PUBLIC_MODULES:
        module = importlib.import_module(name)
        for attr in getattr(module, "__all__", ()):
            value = getattr(module, attr)
            if inspect.isclass(value) and issubclass(value, BaseException):
                continue  # exceptions take whatever Exception takes
            if inspect.isclass(value):
                found.append((f"{name}.{attr}", value))
                found += [
                    (f"{name}.{attr}.{meth}", fn)
                    for meth, fn in vars(value).items()
                    if not meth.startswith("_") and inspect.isfunction(fn)
                ]
            elif inspect.isfunction(value):
                found.append((f"{name}.{attr}", value))
    return found


@pytest.mark.parametrize(("name", "obj"), _public_callables(), ids=lambda v: str(v)[:60])
def test_no_private_type_in_a_public_signature(name: str, obj: object) -> None:
    signature = inspect.signature(obj)  # type: ignore[arg-type]
    annotations = [str(p.annotation) for p in signature.parameters.values()]
    annotations.append(str(signature.return_annotation))
    private = [a for a in annotations if re.search(r"(?<![\w.])_[A-Za-z]\w*", a)]
    assert private == [], f"{name} exposes a private type: {private}"


def test_the_readme_s_public_names_import() -> None:
    from ttlstore.asgi import (  # noqa: F401
        IdempotencyMiddleware,
        RateLimitMiddleware,
        StoredResponse,
        get_header,
    )
    from ttlstore.records import Raised, Returned  # noqa: F401
    from ttlstore.redis import (  # noqa: F401
        AsyncRedisIdempotencyStore,
        AsyncRedisTokenBucketLimiter,
        Codec,
        JsonCodec,
        PickleCodec,
        RedisIdempotencyStore,
        RedisTokenBucketLimiter,
    )
    from ttlstore.testing import FakeClock, RedisServer  # noqa: F401

    assert StoredResponse is importlib.import_module("ttlstore.records").StoredResponse
