"""The two things IdempotencyMiddleware reads from a request: its key and its fingerprint.

The key parser keeps ``http_sf`` as the parser of record and reads only what clients actually
send (a plain quoted string, a bare run of token characters) directly; a property test holds
both paths equal on generated values. The fingerprint is BLAKE2b-128 over the length-prefixed
method, path, query and body. The plain quoted key and the fingerprint, which every request
reads, are :mod:`ttlstore._idem_read`'s (compiled with the core), re-exported here.
"""

from __future__ import annotations

import re

import http_sf

from ttlstore._idem_read import MAX_KEY_LENGTH, Fingerprinter, fingerprint, plain_key

__all__ = [
    "MAX_KEY_LENGTH",
    "Fingerprinter",
    "fingerprint",
    "is_token",
    "parse_idempotency_key",
    "plain_key",
]

# RFC 9110 token characters: a bare key such as a UUID that does not parse as a structured
# field item (one starting with a digit parses as an Integer or fails) is accepted as a token.
# Together with plain_key's quoted strings, this is every key a client actually sends.
_TCHARS = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


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
    # plain_key() takes bytes (compiled, it refuses anything else): copy a bytes-like value.
    plain = plain_key(stripped if type(stripped) is bytes else bytes(stripped))
    if plain is not None:
        return plain
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
