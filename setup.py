"""Build script: the core compiled with mypyc where possible, pure Python everywhere else.

Everything else about the package is in pyproject.toml. A wheel build (``pip wheel .``,
``python -m build``) compiles the modules in :data:`COMPILED` when mypyc imports and a C
compiler works, and builds the pure-Python wheel otherwise, saying why. ``TTLSTORE_PURE=1``
asks for the pure wheel. Editable installs (``pip install -e .``) are always pure, so the dev
loop needs no rebuild. ``ttlstore.compiled`` tells at run time which build is loaded.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from setuptools import setup

#: The modules mypyc compiles: the store's state, methods and steps, its deadline index, the
#: argument checks on its hot paths and the token-bucket arithmetic. The rest stays interpreted
#: in every build: it gains nothing measurable, or it holds user-facing classes whose own
#: argument checks mypyc would pre-empt with its own messages (README, "Compiled core").
COMPILED = (
    "ttlstore/_core.py",
    "ttlstore/_steps.py",
    "ttlstore/_writes.py",
    "ttlstore/_flights.py",
    "ttlstore/_deadlines.py",
    "ttlstore/_checks.py",
    "ttlstore/_gcra.py",
    "ttlstore/_bucket_steps.py",
    "ttlstore/_slot_core.py",
    "ttlstore/_ratelimit_run.py",
    "ttlstore/_idem_core.py",
    "ttlstore/_idem_run.py",
    "ttlstore/_idem_call.py",
    "ttlstore/_idem_read.py",
)

#: Commands that build binaries. Anything else (sdist, egg_info, editable_wheel, develop)
#: needs no compiler and stays pure.
_BUILDS = {"bdist_wheel", "build", "build_ext"}


def _note(message: str) -> None:
    print(f"ttlstore setup: {message}", file=sys.stderr)


def _compiler_works() -> bool:
    """Whether a C compiler can build a trivial extension source here."""
    from setuptools._distutils.ccompiler import new_compiler
    from setuptools._distutils.sysconfig import customize_compiler

    compiler = new_compiler()
    customize_compiler(compiler)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp, "probe.c")
        source.write_text("int ttlstore_probe(void) { return 0; }\n")
        try:
            compiler.compile([str(source)], output_dir=tmp)
        except Exception as exc:  # CompileError, or no compiler executable at all
            _note(f"no working C compiler ({exc.__class__.__name__}: {exc})")
            return False
    return True


def _ext_modules() -> list[object]:
    """mypyc's extensions for this build, or none (a pure wheel), with the reason printed."""
    if not _BUILDS.intersection(sys.argv[1:]):
        return []
    if os.environ.get("TTLSTORE_PURE", "").strip() not in ("", "0"):
        _note("TTLSTORE_PURE is set: building the pure-Python wheel")
        return []
    if sys.implementation.name != "cpython":
        _note(f"mypyc needs CPython, not {sys.implementation.name}: building pure Python")
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        _note("mypyc is not installed: building the pure-Python wheel")
        return []
    if not _compiler_works():
        _note("building the pure-Python wheel")
        return []
    _note(f"compiling {', '.join(COMPILED)} with mypyc")
    return list(mypycify(list(COMPILED), opt_level="3", debug_level="0"))


setup(ext_modules=_ext_modules())
