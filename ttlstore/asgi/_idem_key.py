"""The two things IdempotencyMiddleware reads from a request: its key and its fingerprint.

The key parser keeps ``http_sf`` as the parser of record and reads only what clients actually
send (a plain quoted string, a bare run of token characters) directly; a property test holds
both paths equal on generated values. The fingerprint is BLAKE2b-128 over the length-prefixed
method, path, query and body.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Callable
from typing import Any

import http_sf

from ttlstore._idem_call import MAX_KEY_LENGTH

__all__ = [
    "MAX_KEY_LENGTH",
    "Fingerprinter",
    "fingerprint",
    "is_token",
    "parse_idempotency_key",
    "quoted_key",
]

# RFC 9110 token characters: a bare key such as a UUID that does not parse as a structured
# field item (one starting with a digit parses as an Integer or fails) is accepted as a token.
_TCHARS = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

# A String of 1 to MAX_KEY_LENGTH printable ASCII characters without escapes: what http_sf
# parses to exactly the characters between the quotes, and a key of an accepted length.
# Together with _TCHARS this is every key a client actually sends.
_PLAIN_STRING = re.compile(rb'"([ !#-\[\]-~]{1,%d})"' % MAX_KEY_LENGTH)

quoted_key: Callable[[bytes], re.Match[bytes] | None] = _PLAIN_STRING.fullmatch
"""Match a field value that is exactly a plain quoted key (no whitespace around it); its
group 1 is the key, equal to what :func:`parse_idempotency_key` answers (a property test
compares both with ``http_sf``). None for anything else, which :func:`parse_idempotency_key`
then reads. O(len(value))."""


def parse_idempotency_key(value: bytes) -> str | None:
    """The key carried by an ``Idempotency-Key`` field value, or None if it is malformed.

    Accepts an RFC 9651 String (``"abc"``, parsed by ``http_sf``), a Token (``abc``), or any
    bare run of RFC 9110 token characters (``8e03978e-40d5``); parameters are ignored, as none
    are defined for this field. The key must have 1 to :data:`MAX_KEY_LENGTH` characters.
    Several field lines, combined with commas, are malformed. O(len(value)).

    A plain quoted string (printable ASCII, no escapes) and a bare run of token characters
    are read directly; anything else goes through ``http_sf``. Both paths give the same
    answer for every value (a property test compares them).
    """
    stripped = value.strip(b" \t")
    plain = _PLAIN_STRING.fullmatch(stripped)
    if plain is not None:
        return plain.group(1).decode("ascii")
    if _TCHARS.fullmatch(stripped) is not None:
        return stripped.decode("ascii") if len(stripped) <= MAX_KEY_LENGTH else None
    return _parse_structured(stripped)


def _parse_structured(stripped: bytes) -> str | None:
    """:func:`parse_idempotency_key` by ``http_sf``, for every value the fast paths skip."""
    try:
        parsed = http_sf.parse(bytes(stripped), tltype="item")
    except http_sf.StructuredFieldError:
        parsed = None
    item = parsed[0] if isinstance(parsed, tuple) else None
    if isinstance(item, str):
        key = item
    elif isinstance(item, http_sf.Token):
        key = str(item)
    elif _TCHARS.fullmatch(stripped):
        key = stripped.decode("ascii")
    else:
        return None
    return key if 1 <= len(key) <= MAX_KEY_LENGTH else None


def is_token(text: str) -> bool:
    """Whether ``text`` is an RFC 9110 token (a method or a header field name)."""
    return text.isascii() and _TCHARS.fullmatch(text.encode("ascii")) is not None


_LENGTH = struct.Struct(">Q").pack
_blake2b = hashlib.blake2b

# The length prefixes of short paths and query strings, packed once: indexing costs a fifth
# of a pack() call. About 10 KB of bytes objects, shared by every middleware.
_SHORT = 256
_LENGTHS = tuple(_LENGTH(n) for n in range(_SHORT))


# How many (path, query) hash states one Fingerprinter keeps; the table is cleared when full,
# so a service with unbounded distinct paths pays the set-up again but never holds more.
_STATES = 128


class Fingerprinter:
    """:func:`fingerprint` for one method: the hash state after the method, path and query is
    kept for the last few (path, query) pairs, so a request to a path seen before pays a state
    copy and the body's hashing only. Building the prefix of length-prefixed parts costs as
    much as hashing a small body. O(len(body)); O(1) memory (:data:`_STATES` states)."""

    __slots__ = ("_start", "_states")

    def __init__(self, method: str) -> None:
        verb = method.encode("ascii")
        self._start = _blake2b(_LENGTH(len(verb)) + verb, digest_size=16)
        # path (with an empty query), or (path, query) -> the state after both.
        self._states: dict[object, Any] = {}

    def __call__(self, path: bytes, query: bytes, body: bytes) -> str:
        states = self._states
        where: object = (path, query) if query else path
        state = states.get(where)
        if state is None:
            state = self._start.copy()
            n, m = len(path), len(query)
            state.update(
                (_LENGTHS[n] if n < _SHORT else _LENGTH(n))
                + path
                + (_LENGTHS[m] if m < _SHORT else _LENGTH(m))
                + query
            )
            if len(states) >= _STATES:
                states.clear()
            states[where] = state
        digest = state.copy()
        n = len(body)
        # Two updates: less than joining even a short body, and a long one is not copied.
        digest.update(_LENGTHS[n] if n < _SHORT else _LENGTH(n))
        digest.update(body)
        return digest.hexdigest()


def fingerprint(method: str, path: bytes, query: bytes, body: bytes) -> str:
    """BLAKE2b-128 (hex) over method, path, query and body, each prefixed with its length as 8
    big-endian bytes, so that none can bleed into the next. O(len(body)).

    A cryptographic hash, so two requests share a fingerprint only by design; BLAKE2b rather
    than SHA-256 because it costs a third less on the small bodies an API sees.
    """
    return Fingerprinter(method)(path, query, body)
