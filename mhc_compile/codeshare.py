"""One function object for equal generated functions, so ``torch.compile`` compiles a block once.

Each converted block runs two generated functions: the binder of its
:class:`~mhc_compile.runtime.BlockForward` and the forward of its rewritten ``GraphModule``.
Dynamo caches compiled code per Python code object and guards on its identity, so blocks
whose generated functions are equal but separately ``exec``-ed recompile once per block;
past ``torch._dynamo.config.recompile_limit`` (8) the remaining blocks run eagerly. Identical
decoder layers generate equal code, and :func:`shared_function` hands them all the first
such function, so regional compilation (``layer.compile()`` on every layer) compiles one
graph for all of them, as it does for the unconverted model.
"""

from __future__ import annotations

from types import FunctionType
from typing import Any, Hashable

_SHARED: dict[Hashable, FunctionType] = {}


def _identity(value: Any) -> Hashable:
    """Identity of a global or default; a dict (the binder's defaults) by its items' identities."""
    if isinstance(value, dict):
        return ("dict", tuple((k, id(v)) for k, v in value.items()))
    return id(value)


def shared_function(fn: FunctionType) -> FunctionType:
    """``fn``, or an earlier function with equal code, globals and defaults (same objects).

    Two functions are interchangeable when their code objects compare equal (same
    bytecode, constants and names) and every global the code names and every default is
    the same object. The cache keeps the first function (and so those objects) alive,
    which keeps the identities in its key valid. Closures are never shared.
    """
    if fn.__closure__:
        return fn
    code = fn.__code__
    key = (
        code,
        tuple((name, _identity(fn.__globals__[name])) for name in code.co_names if name in fn.__globals__),
        tuple(_identity(d) for d in fn.__defaults__ or ()),
        tuple((k, _identity(v)) for k, v in (fn.__kwdefaults__ or {}).items()),
    )
    return _SHARED.setdefault(key, fn)


__all__ = ["shared_function"]
