"""The mypyc-compiled core for the comparison, next to the pure one in the same process.

One process cannot import two builds of one package, and mypyc bakes module names into what
it compiles, so the comparison builds a renamed copy: ``ttlstore_compiled``, the same source
with the package name replaced (nothing else changes), compiled by the project's own setup.py
(the same modules and options as the wheel). It lands in ``.bench/compiled/<hash>/`` and is
reused while the source, the Python and mypy stay the same, so only the first run pays the
half-minute build; ``python -m benchmarks.compare`` therefore still does all set-up itself.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "ttlstore_compiled"
_WORD = re.compile(r"\bttlstore\b(?!_)")


class Unavailable(RuntimeError):
    """The compiled build could not be made here; the message says why."""


def _fingerprint(sources: list[Path]) -> str:
    digest = hashlib.sha256()
    try:
        mypy = importlib.metadata.version("mypy")
    except importlib.metadata.PackageNotFoundError:
        raise Unavailable("mypy (mypyc) is not installed: pip install 'ttlstore[bench]'") from None
    digest.update(f"{sys.version} {mypy}".encode())
    for path in sources:
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _sources() -> list[Path]:
    package = ROOT / "ttlstore"
    files = [p for p in sorted(package.rglob("*")) if p.is_file() and "__pycache__" not in p.parts]
    return [*(p for p in files if p.suffix not in (".so", ".pyd", ".pyc")), ROOT / "setup.py"]


def _renamed(text: str) -> str:
    return _WORD.sub(PACKAGE, text)


def _build(dest: Path, sources: list[Path]) -> None:
    work = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(work, ignore_errors=True)
    for path in sources:
        if path.name == "setup.py":
            target = work / "setup.py"
        else:
            target = work / PACKAGE / path.relative_to(ROOT / "ttlstore")
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".py":
            target.write_text(_renamed(path.read_text()))
        else:
            shutil.copyfile(path, target)
    env = {k: v for k, v in os.environ.items() if k != "TTLSTORE_PURE"}
    done = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    built = list((work / PACKAGE).glob("_core.*.so")) + list((work / PACKAGE).glob("_core.*.pyd"))
    if done.returncode != 0 or not built:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise Unavailable(f"mypyc build failed: {' / '.join(tail) or 'no extension built'}")
    shutil.rmtree(work / "build", ignore_errors=True)
    shutil.rmtree(dest, ignore_errors=True)
    work.rename(dest)
    # Builds of older sources are never used again: keep only this one.
    for other in dest.parent.iterdir():
        if other != dest:
            shutil.rmtree(other, ignore_errors=True)


def load(cache: Path = ROOT / ".bench" / "compiled") -> str:
    """Build (or reuse) ``ttlstore_compiled``, import it, and return its name.

    Raises :class:`Unavailable` with the reason when it cannot be built (no mypy, no C
    compiler) or when what imports is not compiled.
    """
    if PACKAGE not in sys.modules:
        sources = _sources()
        dest = cache / _fingerprint(sources)
        if not (dest / PACKAGE / "__init__.py").exists():
            _build(dest, sources)
        if str(dest) not in sys.path:
            sys.path.insert(0, str(dest))
    module = importlib.import_module(PACKAGE)
    if not module.compiled:
        raise Unavailable(f"{PACKAGE} imported from {module.__file__} is not compiled")
    return PACKAGE
