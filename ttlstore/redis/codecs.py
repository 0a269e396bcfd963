"""Codecs of the Redis idempotency store: :class:`JsonCodec` (default), :class:`PickleCodec`.

A custom codec implements :class:`Codec`; the envelopes it may meet (``StoredResponse``,
``Returned``, ``Raised``) live in :mod:`ttlstore.records`, which needs no optional dependency.
"""

from __future__ import annotations

import base64
import json
import pickle
from typing import Any, Protocol

from ttlstore.records import Raised, Returned, StoredResponse

__all__ = ["Codec", "JsonCodec", "PickleCodec"]


class Codec(Protocol):
    """Turns stored idempotency results into bytes and back."""

    def encode(self, result: Any) -> bytes:
        """``result`` as bytes; ``TypeError`` if this codec cannot carry it."""
        ...

    def decode(self, data: bytes) -> Any:
        """The result that :meth:`encode` turned into ``data``."""
        ...


def _same_json(a: object, b: object) -> bool:
    """Whether ``b`` (decoded JSON) is ``a`` exactly, types included (no tuple -> list)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        assert isinstance(b, list)
        return len(a) == len(b) and all(map(_same_json, a, b))
    if isinstance(a, dict):
        assert isinstance(b, dict)
        return a.keys() == b.keys() and all(_same_json(v, b[k]) for k, v in a.items())
    return a == b


class JsonCodec:
    """The default codec: JSON, safe to read whoever wrote it.

    Carries a ``StoredResponse`` (headers as Latin-1, body as base64), and values that JSON
    gives back unchanged (``None``, bool, int, float, str, and lists and str-keyed dicts of
    them), bare or as ``@idempotent`` return values. Anything else, a tuple, a stored exception
    (``store_errors=True``), is refused with ``TypeError`` rather than returned altered.
    """

    __slots__ = ()

    def encode(self, result: Any) -> bytes:
        """``result`` as ASCII JSON; ``TypeError`` if JSON would not give it back unchanged."""
        if isinstance(result, StoredResponse):
            doc: dict[str, Any] = {
                "t": "response",
                "status": result.status,
                "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in result.headers],
                "body": base64.b64encode(result.body).decode("ascii"),
            }
        elif isinstance(result, Raised):
            raise TypeError(
                f"JsonCodec cannot store the exception {result.error!r} (store_errors=True); "
                "use codec=PickleCodec() if only trusted code can write to this Redis"
            )
        elif isinstance(result, Returned):
            doc = {"t": "returned", "value": self._exact(result.value)}
        else:
            doc = {"t": "json", "value": self._exact(result)}
        return json.dumps(doc, separators=(",", ":")).encode("ascii")

    @staticmethod
    def _exact(value: Any) -> Any:
        try:
            back = json.loads(json.dumps(value, allow_nan=False))
        except (TypeError, ValueError):
            back = _NOT_JSON
        if not _same_json(value, back):
            raise TypeError(
                f"JsonCodec cannot store {value!r}: JSON would not give it back unchanged; "
                "return JSON types (dict with str keys, list, str, int, float, bool, None) "
                "or pass another codec"
            )
        return value

    def decode(self, data: bytes) -> Any:
        """The result :meth:`encode` wrote; ``ValueError`` for data it did not write."""
        doc = json.loads(data)
        kind = doc.get("t") if isinstance(doc, dict) else None
        if kind == "json":
            return doc["value"]
        if kind == "returned":
            return Returned(doc["value"])
        if kind == "response":
            headers = tuple((n.encode("latin-1"), v.encode("latin-1")) for n, v in doc["headers"])
            return StoredResponse(doc["status"], headers, base64.b64decode(doc["body"]))
        raise ValueError(f"JsonCodec did not write {data[:80]!r}")

    def __repr__(self) -> str:
        return "JsonCodec()"


_NOT_JSON = object()


class PickleCodec:
    """Any picklable result, exceptions included (base64 text, so decoded clients work).

    **Unsafe unless only trusted code can write to the Redis server**: unpickling runs
    whatever the bytes say, so anyone who can write a key runs code in every replica that
    replays it. Opt in with ``codec=PickleCodec()``.
    """

    __slots__ = ("protocol",)

    def __init__(self, protocol: int = pickle.HIGHEST_PROTOCOL) -> None:
        if isinstance(protocol, bool) or not isinstance(protocol, int):
            raise TypeError(f"protocol must be an int, got {protocol!r}")
        if not 0 <= protocol <= pickle.HIGHEST_PROTOCOL:
            raise ValueError(f"protocol must be 0..{pickle.HIGHEST_PROTOCOL}, got {protocol!r}")
        self.protocol = protocol

    def encode(self, result: Any) -> bytes:
        """``result`` pickled and base64-encoded; ``TypeError`` if it cannot be pickled."""
        try:
            data = pickle.dumps(result, self.protocol)
        except Exception as error:
            raise TypeError(f"PickleCodec cannot pickle {result!r}: {error}") from error
        return base64.b64encode(data)

    def decode(self, data: bytes) -> Any:
        """The unpickled result (runs code: trusted writers only)."""
        return pickle.loads(base64.b64decode(data))

    def __repr__(self) -> str:
        return f"PickleCodec(protocol={self.protocol})"
