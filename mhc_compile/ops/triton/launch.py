"""Kernel launches with little host work: ``launch(kernel, grid, *args, **kwargs)``.

``kernel[grid](*args, **kwargs)`` runs Triton's Python launcher on every call: it binds and
specialises each argument, builds a cache key and looks the compiled kernel up, tens of
microseconds of host time, which batch-1 decode pays about 40 times a token. Here the
first launch of each *call form* goes through that launcher and keeps the compiled kernel
it returns; later launches of the same form call that compiled kernel's own launcher, with
the same arguments, stream, metadata and hooks as Triton's ``JITFunction.run`` passes it.

A call form is finer than what Triton specialises on: the device; each tensor's dtype,
device type and whether its address is 16-byte aligned; the type and value of every other
positional argument (integers, floats, flags); and the value of every keyword argument
(constexprs and launch options). So a form is only ever launched by the kernel Triton
itself compiled for it.

The direct launch is used only where Triton's launcher would launch at once: real tensors,
outside tracing (``wrap_triton`` disabled, as in the eager fast path and inside
``triton_op`` for plain tensors), compiled ``JITFunction`` kernels (not the interpreter),
and a Triton whose ``JITFunction.run`` launches the way this module repeats (checked once,
from its source). Anything else takes ``wrap_triton(kernel)[grid](...)``; the results are
the same either way.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

MAX_FORMS = 256  # call forms kept per kernel (decode and training use a handful)
PLAIN_TENSORS = (Tensor, torch.nn.Parameter)  # no fakes, no subclasses (ops.library's eager path too)
# JITFunction.run's own launch, whitespace-normalised: the direct path repeats it exactly
_TRITON_LAUNCH = ("kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata, "
                  "launch_metadata, knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, "
                  "*bound_args.values())")


def _direct_launch_supported() -> bool:
    """Whether this Triton's ``JITFunction.run`` launches a compiled kernel as :class:`_Forms` does."""
    try:
        from triton.runtime.jit import JITFunction

        source = " ".join(inspect.getsource(JITFunction.run).split())
    except Exception:  # noqa: BLE001 - no source, no Triton: Triton's launcher every time
        return False
    return _TRITON_LAUNCH in source and "return kernel" in source


try:
    from torch._library.triton import is_wrap_triton_enabled
    from torch._subclasses.fake_tensor import is_fake
    from torch.fx.experimental.proxy_tensor import get_proxy_mode
    from torch.library import wrap_triton
    from triton import knobs
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    DIRECT = _direct_launch_supported()
except ImportError:  # pragma: no cover - another Triton or torch: Triton's launcher every time
    DIRECT = False


class _Forms:
    """The compiled kernels of one ``JITFunction`` by call form, and its parameter order."""

    def __init__(self, kernel: Any) -> None:
        params = inspect.signature(kernel.fn).parameters
        self.names = list(params)
        self.defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
        self.compiled: dict[tuple, tuple] = {}  # form -> (compiled kernel, the parameters passed by keyword)

    def keyword_names(self, args: tuple, kwargs: dict) -> tuple:
        """The parameters after the positional ones, each ``(name, default)``."""
        return tuple((k, self.defaults.get(k)) for k in self.names[len(args):])

    @staticmethod
    def values(args: tuple, kwargs: dict, keyword_names: tuple) -> tuple:
        """Every kernel parameter's value, in the kernel's order (what Triton's binder returns)."""
        return (*args, *[kwargs[k] if k in kwargs else d for k, d in keyword_names])


_FORMS: dict[Any, _Forms] = {}


def _form(device: int, args: tuple, kwargs: dict) -> tuple:
    """The call form of a launch (see the module docstring). Tensors other than plain
    tensors and parameters enter by identity, and :func:`launch` never keeps their forms."""
    return (device, *[(a.dtype, a.data_ptr() & 15 == 0, a.is_cuda) if a.__class__ in PLAIN_TENSORS else (a.__class__, a)
                      for a in args], *kwargs.items())


def _plain(args: tuple) -> bool:
    """Whether every tensor argument is a plain CUDA tensor or parameter (no fakes, no subclasses)."""
    return all(a.__class__ in PLAIN_TENSORS and a.is_cuda for a in args if isinstance(a, Tensor))


def _interpreted_on_fakes(kernel: Any, args: tuple) -> bool:
    """Whether ``kernel`` is Triton's interpreter (``TRITON_INTERPRET=1``) given fake tensors.

    Dynamo runs an op's body on fake tensors for its outputs' shapes only, which the
    interpreter cannot do (it reads the data): such a launch is skipped, so that a CPU
    ``torch.compile(..., backend="eager")`` works. Tracing the body into a graph
    (AOTAutograd, Inductor, export) would lose the kernel (``wrap_triton`` passes
    interpreted kernels through): that is refused."""
    if isinstance(kernel, JITFunction) or not any(isinstance(a, Tensor) and is_fake(a) for a in args):
        return False
    if get_proxy_mode() is not None:
        raise RuntimeError(
            "Triton's interpreter (TRITON_INTERPRET=1) runs the kernels eagerly and cannot be traced into a "
            "graph: use torch.compile(..., backend='eager') with the interpreter, or run the kernels on a GPU")
    return True


def launch(kernel: Any, grid: tuple, *args: Any, **kwargs: Any) -> None:
    """``wrap_triton(kernel)[grid](*args, **kwargs)``, launched directly where it can be
    (see the module docstring)."""
    if not DIRECT or is_wrap_triton_enabled() or not isinstance(kernel, JITFunction):
        if _interpreted_on_fakes(kernel, args):
            return
        wrap_triton(kernel)[grid](*args, **kwargs)
        return
    device = driver.active.get_current_device()
    key = _form(device, args, kwargs)
    forms = _FORMS.get(kernel)
    if forms is None:
        forms = _FORMS[kernel] = _Forms(kernel)
    entry = forms.compiled.get(key)
    if entry is None:
        compiled = kernel[grid](*args, **kwargs)  # Triton's launcher: compiles or finds, and launches
        if compiled is not None and _plain(args):
            if len(forms.compiled) >= MAX_FORMS:
                forms.compiled.clear()
            forms.compiled[key] = (compiled, forms.keyword_names(args, kwargs))
        return
    compiled, keyword_names = entry
    stream = driver.active.get_current_stream(device)
    values = forms.values(args, kwargs, keyword_names)
    grid_1 = grid[1] if len(grid) > 1 else 1
    grid_2 = grid[2] if len(grid) > 2 else 1
    compiled.run(grid[0], grid_1, grid_2, stream, compiled.function, compiled.packed_metadata,
                 compiled.launch_metadata(grid, stream, *values),
                 knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *values)


__all__ = ["launch", "DIRECT", "MAX_FORMS", "PLAIN_TENSORS"]
