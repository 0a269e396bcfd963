"""Generated wrappers of cached functions: keys from the signature, and per-instance tokens.

The wrapper of each cached function is compiled from the function's own signature, so the key
is the tuple of every parameter's value after binding and a hit costs one dict lookup and one
clock read (see :mod:`ttlstore.memo`). A method's key starts with a token of its instance.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import threading
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ttlstore._memo_state import Memo

_MISSING: Any = object()
# Separates positional from keyword arguments in a fallback key; never an argument itself.
_KWMARK: Any = object()


# ---------------------------------------------------------------------- per-instance tokens

# A cached method keys its entries by a token of the instance, never the instance itself: the
# store then holds no reference to it, and instances that compare equal stay apart. Tokens are
# never reused; the weakref callback forgets an instance's token when it dies, before CPython
# can hand its id() to a new object, so a newcomer at the same address gets a fresh token.
_tokens: dict[int, int] = {}
_token_refs: dict[int, weakref.ref[Any]] = {}
_token_counter = itertools.count(1)
# Reentrant: a collection during _register (it allocates) may run _forget on this thread.
_token_lock = threading.RLock()


def _forget(ident: int, ref: weakref.ref[Any]) -> None:
    with _token_lock:
        if _token_refs.get(ident) is ref:
            del _token_refs[ident]
            del _tokens[ident]


def _register(obj: object, name: str) -> int:
    """The token of ``obj``, made on first use."""
    ident = id(obj)
    with _token_lock:
        token = _tokens.get(ident)
        if token is not None:
            return token
        try:
            ref = weakref.ref(obj, functools.partial(_forget, ident))
        except TypeError:
            raise TypeError(
                f"cached method {name}() needs instances that support weak references (it "
                f"must not keep them alive); {type(obj).__qualname__} does not: add "
                "'__weakref__' to its __slots__"
            ) from None
        token = next(_token_counter)
        _tokens[ident] = token
        _token_refs[ident] = ref
        return token


_token_of = _tokens.get

# ---------------------------------------------------------------------- wrapper generation


class Name:
    """A default value shown in generated source by the name it is passed under."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_RESERVED = "_ttlstore_"


def _kwkey(kwargs: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(sorted(kwargs.items())) if kwargs else ()


def _kwtypes(kwargs: dict[str, Any]) -> tuple[type, ...]:
    return tuple(type(value) for _, value in sorted(kwargs.items()))


def _types(values: tuple[Any, ...]) -> tuple[type, ...]:
    return tuple(map(type, values))


@dataclass(frozen=True)
class Shape:
    """A function's signature as the pieces of generated source that use it."""

    params: str  # the parameter list, defaults by name
    parts: tuple[str, ...]  # the key's parts, one per parameter
    types: tuple[str, ...]  # the parts' types, for typed=True
    call_args: tuple[str, ...]  # positional arguments to call the function with
    call_kwargs: tuple[str, ...]  # keyword arguments, as dict display items
    defaults: dict[str, Any]  # the defaults, by the names ``params`` uses
    self_name: str | None  # the first parameter, when it is named self or cls

    def call(self, skip_first: bool = False) -> tuple[str, str]:
        """A tuple display of the positional arguments and a dict display of the keywords."""
        args = self.call_args[1:] if skip_first else self.call_args
        comma = "," if len(args) == 1 else ""
        return f"({', '.join(args)}{comma})", "{" + ", ".join(self.call_kwargs) + "}"


_ARGS, _KWARGS = f"{_RESERVED}args", f"{_RESERVED}kwargs"
_FALLBACK = Shape(
    params=f"*{_ARGS}, **{_KWARGS}",
    parts=(),
    types=(),
    call_args=(f"*{_ARGS}",),
    call_kwargs=(f"**{_KWARGS}",),
    defaults={},
    self_name=None,
)


def shape_of(func: Callable[..., Any]) -> Shape:
    """The generated-source pieces for ``func``'s signature (the fallback if unreadable)."""
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return _FALLBACK
    params = []
    parts: list[str] = []
    types: list[str] = []
    call_args: list[str] = []
    call_kwargs: list[str] = []
    defaults: dict[str, Any] = {}
    for index, param in enumerate(signature.parameters.values()):
        name = param.name
        if name.startswith(_RESERVED):
            return _FALLBACK
        default = param.default
        if default is not param.empty:
            try:
                hash(default)
            except TypeError:
                return _FALLBACK  # a mutable default: only keys that omit it would work
            defaults[f"{_RESERVED}d{index}"] = default
            default = Name(f"{_RESERVED}d{index}")
        params.append(param.replace(default=default, annotation=param.empty))
        kind = param.kind
        if kind is param.VAR_POSITIONAL:
            parts.append(name)
            types.append(f"{_RESERVED}types({name})")
            call_args.append(f"*{name}")
        elif kind is param.VAR_KEYWORD:
            parts.append(f"{_RESERVED}kwkey({name})")
            types.append(f"{_RESERVED}kwtypes({name})")
            call_kwargs.append(f"**{name}")
        else:
            parts.append(name)
            types.append(f"type({name})")
            if kind is param.KEYWORD_ONLY:
                call_kwargs.append(f"{name!r}: {name}")
            else:
                call_args.append(name)
    first = next(iter(signature.parameters.values()), None)
    self_name = None
    if first is not None and first.kind in (first.POSITIONAL_ONLY, first.POSITIONAL_OR_KEYWORD):
        self_name = first.name if first.name in ("self", "cls") else None
    source = str(signature.replace(parameters=params, return_annotation=signature.empty))
    return Shape(
        params=source[1:-1],
        parts=tuple(parts),
        types=tuple(types),
        call_args=tuple(call_args),
        call_kwargs=tuple(call_kwargs),
        defaults=defaults,
        self_name=self_name,
    )


def is_method(func: Callable[..., Any], shape: Shape) -> bool:
    """Defined in a class body with a first parameter named self or cls: cached per instance."""
    qualname = getattr(func, "__qualname__", "")
    scope = qualname.rpartition(".")[0]
    return shape.self_name is not None and bool(scope) and not scope.endswith("<locals>")


def _key_source(shape: Shape, typed: bool, custom: bool, method: bool, prefixed: bool) -> str:
    """The key expression of a generated function."""
    r = _RESERVED
    if custom:
        args, kwargs = shape.call(skip_first=method)
        parts = [f"{r}keyfn(*{args}, **{kwargs})"]
    elif shape is _FALLBACK:
        key = f"(({_ARGS} + ({r}kwmark,) + {r}kwkey({_KWARGS})) if {_KWARGS} else {_ARGS})"
        if typed:
            key = f"({key} + {r}types({_ARGS}) + {r}kwtypes({_KWARGS}))"
        if not prefixed:
            return key
        parts = [key]
    else:
        skip = 1 if method else 0
        parts = list(shape.parts[skip:])
        if typed:
            parts += shape.types[skip:]
    if method:
        parts.insert(0, f"{r}t")
    if prefixed:
        parts.insert(0, f"{r}prefix")
    return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"


def compile_wrapper(
    memo: Memo,
    shape: Shape,
    *,
    method: bool,
    typed: bool,
    keyfn: Callable[..., Hashable] | None,
    is_async: bool,
    miss: Callable[..., Any],
) -> tuple[Any, Callable[..., Any]]:
    """Generate (the cached wrapper, its key function) from the function's signature."""
    r = _RESERVED
    namespace: dict[str, Any] = {
        **shape.defaults,
        f"{r}prefix": memo.prefix,
        f"{r}tokget": _token_of,
        f"{r}register": _register,
        f"{r}name": memo.name,
        f"{r}keyfn": keyfn,
        f"{r}kwmark": _KWMARK,
        f"{r}kwkey": _kwkey,
        f"{r}kwtypes": _kwtypes,
        f"{r}types": _types,
        f"{r}missing": _MISSING,
        f"{r}miss": miss,
        f"{r}unhashable": memo.unhashable,
        f"{r}clock": memo.clock,
        f"{r}recent": memo.recent.append,
        f"{r}hit": memo.hits.__next__,
        f"{r}sget": memo.store.get,
        f"{r}fget": None if memo.front is None else memo.front.get,
    }
    key = _key_source(shape, typed, keyfn is not None, method, memo.prefix is not None)
    token = ""
    if method:
        token = (
            f"    {r}t = {r}tokget(id({shape.self_name}))\n"
            f"    if {r}t is None:\n"
            f"        {r}t = {r}register({shape.self_name}, {r}name)\n"
        )
    await_ = "await " if is_async else ""
    args, kwargs = shape.call()
    call = f"return {await_}{r}miss({r}k, {args}, {kwargs})"
    if memo.front is not None:
        fresh = f"{r}r is not None" + (f" and {r}r[1] > {r}clock()" if memo.ttl is not None else "")
        body = (
            f"    try:\n"
            f"        {r}r = {r}fget({r}k)\n"
            f"    except TypeError as {r}e:\n"
            f"        raise {r}unhashable({r}e, {r}k) from None\n"
            f"    if {fresh}:\n"
            f"        {r}recent({r}k)\n"
            f"        {r}hit()\n"
            f"        return {r}r[0]\n"
            f"    {call}\n"
        )
    elif memo.stale is None:
        body = (
            f"    try:\n"
            f"        {r}r = {r}sget({r}k, {r}missing)\n"
            f"    except TypeError as {r}e:\n"
            f"        raise {r}unhashable({r}e, {r}k) from None\n"
            f"    if {r}r is not {r}missing:\n"
            f"        {r}hit()\n"
            f"        return {r}r\n"
            f"    {call}\n"
        )
    else:  # every call needs the entry's age: the miss path reads it
        body = f"    {call}\n"
    # The key function never makes a token: an instance never seen has nothing cached.
    keyof_token = token.replace(f"{r}register({shape.self_name}, {r}name)", "None")
    define = "async def" if is_async else "def"
    source = (
        f"{define} {r}wrapper({shape.params}):\n{token}    {r}k = {key}\n{body}"
        f"def {r}keyof({shape.params}):\n{keyof_token}    return {key}\n"
    )
    exec(compile(source, f"<ttlstore.cached {memo.name}>", "exec"), namespace)
    return namespace[f"{r}wrapper"], namespace[f"{r}keyof"]
