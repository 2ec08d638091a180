"""TransformerEngine's Triton mHC ops beside ours: loaded from TE's wheel, layouts mapped.

TE ships its mHC kernels as plain Triton in the pure-Python wheel
``transformer_engine-<version>-py3-none-any.whl`` (``transformer_engine/common/triton/mhc.py``,
the kernels, and ``transformer_engine/pytorch/triton/mhc.py``, the autograd wrappers). This
module reads those two files out of the wheel at run time (nothing of TE is copied into this
repository), imports them under their own names with stub parent packages, and replaces their
one compiled dependency, ``general_gemm`` (cuBLAS through TE's C++ extension, used for
``dphi``), by a ``torch.matmul`` stand-in.

Layouts (ours -> TE), for ``n`` streams of ``C`` channels and ``N = n^2 + 2n`` coefficients:

* streams ``x [M, n, C]`` -> ``[s=M, b=1, C, n]`` (streams innermost), so ``vec(x)`` of a
  token is ordered ``c*n + i`` in TE, ``i*C + c`` here;
* ``phi [n*C, N]`` -> ``[N, n*C]`` with its rows permuted to that order;
* ``bias [N]`` -> ``beta [1, N]``; ``alpha [3]`` is the same;
* ``H_res``: TE computes ``X' = X @ H_res`` (``out[c, j] = sum_i x[c, i] H[i, j]``), we
  compute ``X' = H_res X``, so TE's matrix is our transpose: its res logits (row-major)
  are our res logits transposed.

Differences found (see :func:`check_equivalence`): TE has an optional RMSNorm weight
(absorbed into ``phi``; we have none, so it is left out), its RMS epsilon is
``finfo(float32).eps`` = 1.19e-7 (ours ``rms_eps`` = 1e-6 by default; the check passes TE's
value to ours), its Sinkhorn runs in log space and, in our orientation, normalises columns
first and rows last (ours: rows first, columns last; the same limit, so results differ by the
convergence error of 20 iterations), only ``n = 4`` is supported, its projection uses TF32
by default (``use_tf32=True``; the check uses ``use_tf32=False``), and ``H_post``/``H_res``
are returned as ``[s, b, n]`` / ``[s, b, n, n]`` float32 like ours.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys
import tempfile
import types
import zipfile
from pathlib import Path
from typing import Callable, Optional

import torch

N_STREAMS = 4  # the only stream count TE's kernels support
_FILES = {
    "transformer_engine.common.triton.mhc": "transformer_engine/common/triton/mhc.py",
    "transformer_engine.pytorch.triton.mhc": "transformer_engine/pytorch/triton/mhc.py",
}


_LOADED: dict[str, types.ModuleType] = {}  # wheel path -> its loaded wrappers module


class TEUnavailable(RuntimeError):
    """TE's wheel is missing or its mHC files cannot be loaded; the message says why."""


def find_wheel(path: Optional[str] = None, search: str = ".whl") -> Path:
    """The wheel given by ``path``, else the newest ``transformer_engine-*-py3-none-any.whl``
    in ``search``."""
    if path:
        wheel = Path(path)
        if not wheel.is_file():
            raise TEUnavailable(f"--te-wheel {path}: no such file")
        return wheel
    found = sorted(glob.glob(os.path.join(search, "transformer_engine-*-py3-none-any.whl")))
    if not found:
        raise TEUnavailable(
            f"no transformer_engine-*-py3-none-any.whl in {search}/; get it with "
            f"`pip download --no-deps transformer_engine==2.20.2 -d {search}` or pass --te-wheel"
        )
    return Path(found[-1])


def _matmul_gemm(a: torch.Tensor, b: torch.Tensor, out_dtype=None, layout: str = "NT", **_unused):
    """Stand-in for TE's ``general_gemm`` as its mHC code calls it (``layout="NT"``):
    ``b^T @ a`` in float32, returned as a 1-tuple like TE's."""
    if layout != "NT":
        raise TEUnavailable(f"the general_gemm stand-in only knows layout 'NT', got {layout!r}")
    out = b.t().float() @ a.float()
    return (out.to(out_dtype) if out_dtype is not None else out,)


def _package(name: str) -> None:
    module = types.ModuleType(name)
    module.__path__ = []  # a package, so submodules can be registered under it
    sys.modules[name] = module


def load(wheel: Path) -> types.ModuleType:
    """Import TE's two mHC files from ``wheel``; returns ``transformer_engine.pytorch.triton.mhc``.

    The files are extracted to a temporary directory (Triton reads a kernel's source from its
    file). The stub packages live in ``sys.modules`` only while the files import, so nothing
    else in the process sees a ``transformer_engine`` package. Under ``TRITON_INTERPRET=1``
    autotuning is reduced to one config per kernel and TMA is off (CPU tensors).
    """
    if str(wheel) in _LOADED:
        return _LOADED[str(wheel)]
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if interpreting:
        os.environ["NVTE_DISABLE_TRITON_AUTOTUNING"] = "1"  # read by TE's config pruners
    target = Path(tempfile.mkdtemp(prefix="te-mhc-"))
    try:
        with zipfile.ZipFile(wheel) as zf:
            for member in _FILES.values():
                zf.extract(member, target)
    except (KeyError, zipfile.BadZipFile) as err:
        raise TEUnavailable(f"{wheel}: not a TE wheel with the mHC files ({err})") from err
    if any(name == "transformer_engine" or name.startswith("transformer_engine.") for name in sys.modules):
        raise TEUnavailable("transformer_engine is already imported in this process; run without it")
    gemm = types.ModuleType("transformer_engine.pytorch.cpp_extensions.gemm")
    gemm.general_gemm = _matmul_gemm
    modules = {}
    try:
        for pkg in ("transformer_engine", "transformer_engine.common", "transformer_engine.common.triton",
                    "transformer_engine.pytorch", "transformer_engine.pytorch.triton",
                    "transformer_engine.pytorch.cpp_extensions"):
            _package(pkg)
        sys.modules[gemm.__name__] = gemm
        for name, member in _FILES.items():
            spec = importlib.util.spec_from_file_location(name, target / member)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            modules[name] = module
    finally:
        for name in [n for n in sys.modules if n == "transformer_engine" or n.startswith("transformer_engine.")]:
            del sys.modules[name]
    wrappers = modules["transformer_engine.pytorch.triton.mhc"]
    _LOADED[str(wheel)] = wrappers
    if interpreting:
        _for_the_interpreter(wrappers, modules["transformer_engine.common.triton.mhc"])
    return wrappers


def _for_the_interpreter(wrappers: types.ModuleType, kernels: types.ModuleType) -> None:
    """No TMA on CPU tensors; one config for each autotuned kernel without a pruner (those
    with one are cut to one config by NVTE_DISABLE_TRITON_AUTOTUNING)."""
    support_tma = wrappers._support_tma
    wrappers._support_tma = lambda x: x.is_cuda and support_tma(x)
    for value in vars(kernels).values():
        configs = getattr(value, "configs", None)
        if isinstance(configs, list) and len(configs) > 1 and not getattr(value, "early_config_prune", None):
            value.configs = configs[:1]


def to_te_layout(x: torch.Tensor, phi: torch.Tensor, bias: torch.Tensor, alpha: torch.Tensor):
    """Our ``x [M, n, C]``, ``phi [n*C, N]``, ``bias [N]``, ``alpha [3]`` -> TE's
    ``x [M, 1, C, n]``, ``phi [N, n*C]``, ``alpha [3]``, ``beta [1, N]`` (new leaf tensors
    that require grad where the inputs do)."""
    m, n, c = x.shape
    width = n * n + 2 * n
    phi_te = phi.detach().reshape(n, c, width).permute(2, 1, 0).reshape(width, c * n)
    bias_te = bias.detach().clone()
    bias_te[2 * n:] = _transpose_res(bias_te[2 * n:], n)
    phi_te = phi_te.clone()
    phi_te[2 * n:] = _transpose_res(phi_te[2 * n:], n)
    x_te = x.detach().permute(0, 2, 1).reshape(m, 1, c, n)
    leaves = (x_te.contiguous(), phi_te.contiguous(), alpha.detach().clone(), bias_te.reshape(1, width))
    return tuple(t.requires_grad_(s.requires_grad) for t, s in zip(leaves, (x, phi, alpha, bias)))


def _transpose_res(res: torch.Tensor, n: int) -> torch.Tensor:
    """``[n*n, ...]`` res coefficients in row-major order of one matrix -> of its transpose."""
    return res.reshape(n, n, *res.shape[1:]).transpose(0, 1).reshape(n * n, *res.shape[1:])


def from_te_grads(dx, dphi, dalpha, dbeta, n: int):
    """TE-layout gradients -> ours (inverse of :func:`to_te_layout`)."""
    m, _, c, _ = dx.shape
    width = n * n + 2 * n
    dphi = dphi.clone()
    dphi[2 * n:] = _transpose_res(dphi[2 * n:], n)
    dbias = dbeta.reshape(width).clone()
    dbias[2 * n:] = _transpose_res(dbias[2 * n:], n)
    return (dx.reshape(m, c, n).permute(0, 2, 1), dphi.reshape(width, c, n).permute(2, 1, 0).reshape(n * c, width),
            dalpha, dbias)


def te_connection(te: types.ModuleType, use_tf32: bool = True) -> Callable:
    """pre -> identity branch -> post with TE's ops, on TE-layout inputs: returns
    ``X' [M, 1, C, n]``."""

    def run(x, phi, alpha, beta):
        u, h_post, h_res = te.mhc_generate_mix_and_aggregate(x, phi, alpha, beta, use_tf32=use_tf32)
        return te.mhc_fused_expand_combine(u, None, h_post, x, h_res, x.shape[-1], use_tf32=use_tf32)

    return run


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def check_equivalence(te: types.ModuleType, m: int, c: int, dtype=torch.bfloat16, device: str = "cuda",
                      seed: int = 0) -> dict[str, float]:
    """TE's connection and ours (``mhc_compile.ops.library``) on the same random inputs:
    relative differences of the output and of the gradients of ``x, phi, alpha, bias``.

    Ours runs with TE's RMS epsilon; TE with ``use_tf32=False``. Raises :class:`TEUnavailable`
    naming the first quantity that differs by more than ``tol`` (5e-2 for 16-bit streams,
    1e-3 for float32: the Sinkhorn orders differ, see the module docstring)."""
    from mhc_compile.ops import library

    n = N_STREAMS
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(m, n, c, device=device, generator=g).to(dtype).requires_grad_()
    phi = (torch.randn(n * c, n * n + 2 * n, device=device, generator=g) / (n * c) ** 0.5).requires_grad_()
    bias = (0.5 * torch.randn(n * n + 2 * n, device=device, generator=g)).requires_grad_()
    alpha = torch.tensor([0.8, 0.6, 0.7], device=device).requires_grad_()
    grad = torch.randn(m, n, c, device=device, generator=g).to(dtype)
    eps = torch.finfo(torch.float32).eps
    u, h_post, h_res = library.mhc_pre(x, phi, bias, alpha, eps=eps)
    ours = library.mhc_post(x, u, h_post, h_res)
    ours_grads = torch.autograd.grad(ours, [x, phi, alpha, bias], grad)
    te_inputs = to_te_layout(x, phi, bias, alpha)
    theirs_te = te_connection(te, use_tf32=False)(*te_inputs)
    te_grads = torch.autograd.grad(theirs_te, list(te_inputs), grad.permute(0, 2, 1).reshape(theirs_te.shape))
    theirs = theirs_te.reshape(m, c, n).permute(0, 2, 1)
    diffs = {"out": _rel(theirs, ours)}
    for name, a, b in zip(["dx", "dphi", "dalpha", "dbias"], from_te_grads(*te_grads, n), ours_grads):
        diffs[name] = _rel(a, b)
    tol = 5e-2 if dtype != torch.float32 else 1e-3
    bad = [k for k, v in diffs.items() if not v <= tol]
    if bad:
        raise TEUnavailable(f"TE and mhc_compile compute different connections at M={m}, C={c}: "
                            + ", ".join(f"{k} {diffs[k]:.2e}" for k in bad) + f" (tolerance {tol})")
    return diffs
