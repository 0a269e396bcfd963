"""mypyc's class options, importable without mypy installed (interpreted in every build).

``mypyc_attr`` is read by mypyc at compile time; at run time it is the real decorator when
``mypy_extensions`` is installed and a no-op otherwise, so the package has no runtime
dependency either way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

__all__ = ["mypyc_attr"]

T = TypeVar("T")

try:
    from mypy_extensions import mypyc_attr
except ImportError:  # pragma: no cover - the dev and CI environments have it

    def mypyc_attr(*attrs: str, **kwattrs: object) -> Callable[[T], T]:  # type: ignore[misc,unused-ignore]
        """Stand-in for ``mypy_extensions.mypyc_attr``: returns the class unchanged."""

        def decorate(cls: T) -> T:
            return cls

        return decorate
