"""The connection sides' per-token work as compiled CPU code (``csrc/connection_cpu.cpp``).

Eager PyTorch pays a few microseconds per op whatever the tensor size, and a connection's
per-token math (the coefficient activations, 20 Sinkhorn-Knopp iterations and their
backward, the aggregate, the stream mix) is a few hundred small ops. On the CPU, where the
Triton kernels don't run, :mod:`mhc_compile.ops.cpu` calls these instead: one pass over the
tokens for each side and direction, threaded with ``at::parallel_for``.

The source is built on first use with ``torch.utils.cpp_extension`` (a C++ compiler and
``ninja``; about 20 s, cached by PyTorch in ``TORCH_EXTENSIONS_DIR``, by default under
``~/.cache/torch_extensions``). Where it cannot be built, one warning says why and the CPU
ops run their whole-tensor formulation, which computes the same results more slowly.
``MHC_CPU_KERNELS=0`` turns the compiled code off (the whole-tensor ops run, no build, no
warning).
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import threading
import warnings
from typing import Optional

import torch
from torch import Tensor

SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "connection_cpu.cpp")
MAX_STREAMS = 16  # kMaxStreams of the source: per-token scratch on the stack
ENV_SWITCH = "MHC_CPU_KERNELS"
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def enabled() -> bool:
    """False where ``MHC_CPU_KERNELS`` is ``0``, ``false``, ``no`` or ``off``."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


# The vector instructions the build may use, by what PyTorch detected on this machine; the
# capability is part of the extension's name, so that a cache shared by different machines
# never loads code built for instructions the CPU lacks.
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}


def _capability() -> str:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 (older builds, other architectures)
        return "DEFAULT"


def _put_ninja_on_path() -> None:
    """PyTorch's builder runs ``ninja`` from PATH; the ``ninja`` package installs it next to the
    interpreter's scripts, which are not on PATH in a virtual environment that is not activated."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


_BUILD_LOCK = threading.Lock()
_WARNED: list[bool] = []  # one warning per process


@functools.lru_cache(maxsize=None)
def _load() -> Optional[str]:
    """Build and load the extension once (callers hold ``_BUILD_LOCK``); None on success,
    else why it failed."""
    capability = _capability()
    try:
        from torch.utils import cpp_extension

        _put_ninja_on_path()
        cpp_extension.load(
            name=f"mhc_compile_connection_cpu_{capability.lower()}",
            sources=[SOURCE],
            extra_cflags=["-O3", "-fopenmp", *_ISA_FLAGS.get(capability, [])],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
        torch.ops.mhc_cpu.pre_forward  # noqa: B018 (the ops are registered)
    except Exception as error:  # noqa: BLE001 (any build failure means the slower path)
        return _first_error_line(error)
    return None


def _first_error_line(error: Exception) -> str:
    """The compiler's first ``error:`` line where there is one, else the exception's first line."""
    text = [str(error)]
    chain = error.__cause__ or error.__context__
    output = getattr(chain, "output", None)
    if output:
        text.insert(0, output.decode(errors="replace") if isinstance(output, bytes) else str(output))
    lines = [line.strip() for block in text for line in block.splitlines() if line.strip()]
    found = [line for line in lines if "error:" in line]
    return f"{type(error).__name__}: {(found or lines or [''])[0][:300]}"


def _caller_stacklevel() -> int:
    """The stack level of the first frame outside this package and torch (for the warning)."""
    frame, level = sys._getframe(1), 1
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    while frame is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        if not (name.startswith(package) or name.startswith(torch_dir)):
            return level
        frame, level = frame.f_back, level + 1
    return 1


def available() -> bool:
    """True when the compiled kernels are switched on and built (builds them on first call;
    a failed build warns once, then the CPU ops run their whole-tensor formulation)."""
    if not enabled():
        return False
    with _BUILD_LOCK:
        reason = _load()
        if reason is None or _WARNED:
            return reason is None
        _WARNED.append(True)  # before warning: a warnings filter that raises must not repeat it
    warnings.warn(
        f"mhc_compile: the compiled CPU connection kernels could not be built ({reason}); the CPU "
        f"ops run their whole-tensor formulation (same results, slower). Install a C++ compiler and "
        f"ninja (pip install ninja) to build them, or set {ENV_SWITCH}=0 to skip them without this "
        f"warning.",
        RuntimeWarning,
        stacklevel=_caller_stacklevel(),
    )
    return False


def usable(x: Tensor) -> bool:
    """Whether a connection side on the token tensor ``x [M, n, C]`` runs the compiled code.

    Only plain eager CPU tensors of a supported dtype with ``n <= 16`` do: under tracing
    (``torch.compile``, ``torch.export``, fake or meta tensors, tensor subclasses) the
    whole-tensor formulation runs, which the compilers can see into.
    """
    if type(x) not in (Tensor, torch.nn.Parameter) or x.device.type != "cpu" or x.dtype not in _DTYPES:
        return False
    if x.dim() != 3 or x.shape[1] > MAX_STREAMS or torch.compiler.is_compiling():
        return False
    return available()


def ops():
    """``torch.ops.mhc_cpu`` (after :func:`available` returned True)."""
    return torch.ops.mhc_cpu


__all__ = ["enabled", "available", "usable", "ops", "SOURCE", "ENV_SWITCH", "MAX_STREAMS"]
