"""PEP 517 build backend: setuptools, plus mypy (which ships mypyc) for a compiled wheel.

Only a wheel build asks for mypy, and only when it may compile (CPython, ``TTLSTORE_PURE``
unset): an editable install, an sdist and an opted-out wheel need nothing but setuptools.
setup.py decides the rest (a C compiler must work too) and falls back to pure Python.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403 - every hook setuptools offers, as it offers it

MYPYC = "mypy>=1.11"


def _may_compile() -> bool:
    pure = os.environ.get("TTLSTORE_PURE", "").strip() not in ("", "0")
    return not pure and sys.implementation.name == "cpython"


def get_requires_for_build_wheel(config_settings: dict[str, Any] | None = None) -> list[str]:
    """setuptools' requirements for a wheel, and mypy when the wheel may be compiled."""
    requires = list(_setuptools.get_requires_for_build_wheel(config_settings))
    if _may_compile():
        requires.append(MYPYC)
    return requires
