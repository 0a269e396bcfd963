"""The ASGI section of the comparison (benchmarks/_asgi.py) in a tiny run: correctness only."""

from __future__ import annotations

import importlib.util

from benchmarks import _asgi


def test_every_stack_is_measured_or_said_missing() -> None:
    # The compiled stacks' first build takes half a minute: `benchmarks.compare` in CI runs them.
    section = _asgi.measure(requests=60, repeats=1, compiled=False)
    rows = {row["name"]: row for row in section["rows"]}
    pure = [stack.name for stack in _asgi.STACKS if not stack.name.startswith(_asgi.COMPILED)]
    assert list(rows) == pure
    ratio_limits = [name for name in _asgi.RATIO_LIMITS if name in rows]
    assert len(ratio_limits) == len(_asgi.RATIO_LIMITS) // 2
    for name, row in rows.items():
        if row["status"] == "missing":
            assert row["reason"]
            continue
        assert row["status"] == "ok", (name, row["reason"])
        assert row["min"] <= row["median"] <= row["max"]
        if row["base"] is not None:
            assert "added" in row and "ratio" in row
    # ttlstore's own stacks need nothing beyond the bench extra's starlette.
    if importlib.util.find_spec("starlette") is not None:
        assert all(rows[name]["status"] == "ok" for name in ratio_limits)
    assert {t["target"].split(":")[0] for t in section["targets"]} >= set(ratio_limits)
    assert section["limiter_acquire_us"] > 0
    text = "\n".join(_asgi.markdown(section))
    assert "## ASGI middlewares" in text
    for name in ratio_limits:
        assert f"| {name} |" in text


def test_a_stack_answering_wrongly_is_an_error_not_a_figure() -> None:
    async def teapot(scope: object, receive: object, send: object) -> None:
        await _asgi._bare(scope, receive, send)

    wrong = _asgi.Stack("wrong status", lambda: teapot, status=418)
    section = _asgi.measure(requests=20, repeats=1, stacks=(*_asgi.STACKS[:2], wrong))
    (row,) = [row for row in section["rows"] if row["name"] == "wrong status"]
    assert row["status"] == "error" and "418" in row["reason"]
