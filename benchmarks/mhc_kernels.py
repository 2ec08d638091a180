"""Kernel benchmark: fused mHC kernels vs the eager reference, the reference under
torch.compile (Inductor's own fusion), Liger-Kernel's mHC ops and TransformerEngine's Triton
mHC ops (read from its wheel in ``.whl/`` or ``--te-wheel``, see ``te_mhc.py``; checked to
compute the same connection before they are timed), same run, same shapes. The
``deterministic`` rows time the post backward without atomics (``deterministic=True``).

    python benchmarks/mhc_kernels.py --out benchmarks/results/kernels-<gpu>.md

Times are ``triton.testing`` medians (ms). Per-kernel rows time the op's launches replayed
from a CUDA graph (``do_bench_cudagraph``: the GPU time, as inside a compiled model) and,
beside it, the eager call (``do_bench``: plus Python launch overhead of the op's 3-5
launches); the connection tables time eager and compiled calls with ``do_bench``. "bytes" are what each kernel moves
(counted from its loads and stores); "min bytes" is the fewest any implementation must
move (each input read once, each output written once). Bandwidth is compared with a
device-to-device copy measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import sys

import torch
import triton
from tabulate import tabulate

sys.path.insert(0, ".")
from mhc_compile.ops import library, reference  # noqa: E402
from mhc_compile.ops.settings import Tiles  # noqa: E402
from benchmarks.common import BACKWARD_FORMS, library_settings, report  # noqa: E402

import te_mhc  # noqa: E402  (benchmarks/, next to this file)

N = 4


def copy_bandwidth() -> float:
    """GB/s of a large device-to-device copy (bytes read + written)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / ms / 1e6


def make_inputs(m: int, c: int, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(c)
    x = torch.randn(m, N, c, device="cuda", generator=g).to(dtype).requires_grad_()
    phi = (torch.randn(N * c, N * N + 2 * N, device="cuda", generator=g) / math.sqrt(N * c)).requires_grad_()
    bias = (torch.randn(N * N + 2 * N, device="cuda", generator=g) * 0.5).requires_grad_()
    alpha = torch.full((3,), 0.5, device="cuda").requires_grad_()
    return x, phi, bias, alpha


def connection(impl):
    """pre -> identity branch -> post: one connection, as timed in the kernel benchmarks."""

    def run(x, phi, bias, alpha):
        u, h_post, h_res = impl.mhc_pre(x, phi, bias, alpha)
        return impl.mhc_post(x, u, h_post, h_res)

    return run


def liger_connection():
    from liger_kernel.transformers.functional import liger_mhc_coeffs, liger_mhc_post_res, liger_mhc_pre

    def run(x, phi, bias, alpha):
        h_pre, h_post, h_res = liger_mhc_coeffs(x, phi, bias, alpha[0], alpha[1], alpha[2], tmax=20)
        u = liger_mhc_pre(x, h_pre)
        return liger_mhc_post_res(x, u, h_post, h_res)

    return run


def bench_fwd_bwd(fn, inputs):
    def fwd():
        with torch.no_grad():
            return fn(*inputs)

    out = fn(*inputs)
    grad = torch.randn_like(out)
    leaves = [t for t in inputs if t.requires_grad]

    def fwd_bwd():
        o = fn(*inputs)
        torch.autograd.grad(o, leaves, grad)

    t_fwd = triton.testing.do_bench(fwd, return_mode="median")
    t_all = triton.testing.do_bench(fwd_bwd, return_mode="median")
    return t_fwd, t_all


def post_pre_bwd_bytes(nc: int, c: int, kept: bool) -> int:
    """Elements per token the fused post+pre backward moves in the form ``library`` selects.

    One pass (``POST_PRE_ONE_PASS``): the dH_pre partials read du and X_next (or X and y
    when X_next is not kept); the streaming pass reads X, y, du, g_next and writes dX, dy,
    X_next recomputed on chip; dphi from X and y by matmul (not ``POST_PRE_DPHI_IN_PASS``)
    reads X and y once more. Three passes: dH_pre reads du, X_next (or reads X, y and
    writes X_next); the gradient pass reads du, X_next, g_next and writes g; dphi's matmul
    reads X_next; the post backward reads g, X, y and writes dX, dy.
    """
    if getattr(library, "POST_PRE_ONE_PASS", False):
        dphi_reads = 0 if getattr(library, "POST_PRE_DPHI_IN_PASS", True) else nc + c
        return ((4 * nc + 4 * c) if kept else (4 * nc + 5 * c)) + dphi_reads
    return (8 * nc + 4 * c) if kept else (9 * nc + 5 * c)


def kernel_rows(m, c, bw, only=None):
    """One row per fused op (all of its launches together); ``only``: just these ops (names)."""
    x, phi, bias, alpha = make_inputs(m, c)
    xd = x.detach()
    e = 2  # bf16 bytes
    nc = N * c
    u, h_pre, h_post, h_res, q, rstd = torch.ops.mhc_compile.pre_fwd(xd, phi.detach(), bias.detach(), alpha.detach(), False, 20, 1e-6)
    du = torch.randn_like(u)
    dhp = torch.randn_like(h_post)
    dhr = torch.randn_like(h_res)
    g = torch.randn_like(xd)
    pd, bd, ad = phi.detach(), bias.detach(), alpha.detach()
    x_next = torch.ops.mhc_compile.post_fwd(xd, u, h_post, h_res)  # what post+pre computes, from separate ops
    _, h_pre2, h_post2, _, q2, rstd2 = torch.ops.mhc_compile.pre_fwd(x_next, pd, bd, ad, False, 20, 1e-6)
    ops = {
        "pre fwd": (lambda: torch.ops.mhc_compile.pre_fwd(xd, phi.detach(), bias.detach(), alpha.detach(), False, 20, 1e-6),
                    (2 * nc + c) * e, (nc + c) * e),
        "post fwd": (lambda: torch.ops.mhc_compile.post_fwd(xd, u, h_post, h_res), (2 * nc + c) * e, (2 * nc + c) * e),
        "pre bwd": (lambda: torch.ops.mhc_compile.pre_bwd(xd, phi.detach(), bias.detach(), alpha.detach(), h_pre, h_post, q, rstd, du, dhp, dhr, False, 20),
                    (3 * nc + 2 * c) * e, (2 * nc + c) * e),
        "post bwd": (lambda: torch.ops.mhc_compile.post_bwd(xd, u, h_post, h_res, g), (3 * nc + 2 * c) * e, (3 * nc + 2 * c) * e),
        # fused post(l) + pre(l+1): reads X, y; writes X_next; reads X_next again; writes u
        # (the float32 partial projections, S * 48 * 4 bytes per token, are left out)
        "post+pre fwd": (lambda: torch.ops.mhc_compile.post_pre_fwd(xd, u, h_post, h_res, pd, bd, ad, False, 20, 1e-6),
                         (3 * nc + 2 * c) * e, (2 * nc + 2 * c) * e),
        "post+pre bwd": (lambda: torch.ops.mhc_compile.post_pre_bwd(
            xd, u, h_post, h_res, x_next, g, pd, bd, ad, h_pre2, h_post2, q2, rstd2, du, dhp, dhr, False, 20),
            post_pre_bwd_bytes(nc, c, kept=True) * e, (4 * nc + 3 * c) * e),
        # X_next not kept (recompute_streams, the default in converted models)
        "post+pre bwd, X_next recomputed": (lambda: torch.ops.mhc_compile.post_pre_bwd(
            xd, u, h_post, h_res, None, g, pd, bd, ad, h_pre2, h_post2, q2, rstd2, du, dhp, dhr, False, 20),
            post_pre_bwd_bytes(nc, c, kept=False) * e, (4 * nc + 3 * c) * e),
        # the post after it, x recomputed on chip from the fused op's inputs: X and y read instead of x
        "post bwd, x recomputed": (lambda: torch.ops.mhc_compile.post_bwd(
            None, u, h_post2, h_res, g, False, xd, u, h_post, h_res), (3 * nc + 3 * c) * e, (3 * nc + 3 * c) * e),
        # deterministic=True: the post backward's channel sums as ordered partials, no atomics
        "post bwd, deterministic": (lambda: torch.ops.mhc_compile.post_bwd(xd, u, h_post, h_res, g, True),
                                    (3 * nc + 2 * c) * e, (3 * nc + 2 * c) * e),
        "post+pre bwd, deterministic": (lambda: torch.ops.mhc_compile.post_pre_bwd(
            xd, u, h_post, h_res, x_next, g, pd, bd, ad, h_pre2, h_post2, q2, rstd2, du, dhp, dhr, False, 20, True),
            post_pre_bwd_bytes(nc, c, kept=True) * e, (4 * nc + 3 * c) * e),
    }
    recomputed = lambda: torch.ops.mhc_compile.post_pre_bwd(  # noqa: E731
        xd, u, h_post, h_res, None, g, pd, bd, ad, h_pre2, h_post2, q2, rstd2, du, dhp, dhr, False, 20)
    for form, settings in BACKWARD_FORMS.items():  # each form side by side, whatever the defaults
        with library_settings(settings):
            moved = post_pre_bwd_bytes(nc, c, kept=False)
        ops[f"post+pre bwd, X_next recomputed, {form}"] = (with_settings(recomputed, settings), moved * e,
                                                           (4 * nc + 3 * c) * e)
    rows = []
    for name, (fn, moved, minimum) in ops.items():
        if only is not None and name not in only:
            continue
        eager_ms = triton.testing.do_bench(fn, return_mode="median")
        try:
            ms = triton.testing.do_bench_cudagraph(fn, return_mode="median")
        except Exception as err:  # noqa: BLE001 - a capture failure must not lose the row
            print(f"{name}: no CUDA graph ({type(err).__name__}: {err}); eager time used", flush=True)
            ms = eager_ms
        gbs = moved * m / ms / 1e6
        rows.append({"C": c, "kernel": name, "ms": round(ms, 3), "ms, eager call": round(eager_ms, 3),
                     "bytes/token": moved, "min bytes/token": minimum,
                     "GB/s": round(gbs), "% copy BW": round(100 * gbs / bw, 1),
                     "% of limit": round(100 * (minimum * m / bw / 1e6) / ms, 1)})
    return rows


def te_rows(te, m, c, limit_fwd):
    """TE's connection at ``c`` channels: first the equivalence check against ours (a
    ``te_check`` row), then, if it passed, the timing row (TE's defaults: TF32 projections)."""
    try:
        diffs = te_mhc.check_equivalence(te["module"], m, c)
    except Exception as err:  # noqa: BLE001 - a mismatch or a failure is the result to report
        check = {"C": c, "result": f"{type(err).__name__}: {str(err)[:160]}"}
        return [check], [{"C": c, "implementation": te["name"], "fwd ms": "not timed: the check failed"}]
    check = {"C": c, "result": "same connection", **{f"rel. diff {k}": f"{v:.1e}" for k, v in diffs.items()}}
    x, phi, bias, alpha = make_inputs(m, c)
    args = te_mhc.to_te_layout(x, phi, bias, alpha)
    try:
        t_fwd, t_all = bench_fwd_bwd(te_mhc.te_connection(te["module"]), args)
    except Exception as err:  # noqa: BLE001 - report and continue
        return [check], [{"C": c, "implementation": te["name"], "fwd ms": f"failed: {type(err).__name__}: {str(err)[:80]}"}]
    return [check], [{"C": c, "implementation": te["name"], "fwd ms": round(t_fwd, 3), "fwd+bwd ms": round(t_all, 3),
                      "fwd limit ms": round(limit_fwd, 3), "fwd % of limit": round(100 * limit_fwd / t_fwd, 1)}]


def load_te(path):
    """TE's mHC ops from its wheel (``--te-wheel`` or ``.whl/``), or ``None`` with the reason printed."""
    try:
        wheel = te_mhc.find_wheel(path)
        module = te_mhc.load(wheel)
    except Exception as err:  # noqa: BLE001 - the benchmark runs without TE
        print(f"TransformerEngine rows skipped: {type(err).__name__}: {err}", flush=True)
        return None
    version = wheel.name.split("-")[1]
    return {"module": module, "name": f"TransformerEngine {version} mHC (Triton)", "wheel": wheel.name}


def connection_rows(m, c, bw, with_liger, te=None, with_reference=True):
    """Each implementation of one connection at ``c`` channels; with ``te`` also TE's
    (returns the rows and TE's equivalence-check rows). ``with_reference``: also the
    reference ops, eager and under Inductor (whose compilation takes minutes)."""
    inputs = make_inputs(m, c)
    nc = N * c
    limit_fwd = (3 * nc + 2 * c) * 2 * m / bw / 1e6  # ms
    impls = {
        "eager reference": connection(reference),
        "compiled reference (Inductor)": torch.compile(connection(reference)),
    } if with_reference else {}
    impls.update({
        "mhc_compile kernels": connection(library),
        "mhc_compile kernels, compiled": torch.compile(connection(library)),
    })
    if with_liger:
        impls["Liger-Kernel mHC"] = liger_connection()
    rows = []
    for name, fn in impls.items():
        args = inputs
        if name == "Liger-Kernel mHC":
            x, phi, bias, alpha = inputs
            args = (x, phi.detach().to(torch.bfloat16).requires_grad_(), bias, alpha)
        try:
            t_fwd, t_all = bench_fwd_bwd(fn, args)
        except Exception as err:  # noqa: BLE001 - report and continue
            rows.append({"C": c, "implementation": name, "fwd ms": f"failed: {type(err).__name__}: {str(err)[:80]}"})
            continue
        rows.append({"C": c, "implementation": name, "fwd ms": round(t_fwd, 3), "fwd+bwd ms": round(t_all, 3),
                     "fwd limit ms": round(limit_fwd, 3), "fwd % of limit": round(100 * limit_fwd / t_fwd, 1)})
        print(rows[-1], flush=True)  # the log keeps each row should a later one run past a limit
    checks = []
    if te is not None:
        checks, te_timing = te_rows(te, m, c, limit_fwd)
        print(checks, te_timing, flush=True)
        rows += te_timing
    return rows, checks


SWEEP_OPS = ("pre fwd", "post+pre fwd", "pre bwd", "post+pre bwd")


def token_sweep_rows(token_counts, c, bw):
    """The pre and fused post+pre ops, forward and backward, at each token count (GPU time
    from CUDA-graph replays, as in :func:`kernel_rows`): the prefill and small-batch sizes,
    where few token blocks must still fill the GPU."""
    rows = []
    for m in token_counts:
        for row in kernel_rows(m, c, bw, only=SWEEP_OPS):
            rows.append({"tokens": m, **row})
            print(rows[-1], flush=True)
    return rows


def two_connections(impl, fused, recompute=False, **kw):
    """pre(1) -> branch -> post(1) -> pre(2) -> branch -> post(2): a transformer block's
    attention -> MLP path with identity branches; the middle pair fused or not; ``kw``
    (``deterministic=True``) goes to the post sides. ``recompute`` (fused only): the
    stream between the connections is not kept, as ``recompute_streams`` marks it."""

    def run(x, phi, bias, alpha):
        u, h_post, h_res = impl.mhc_pre(x, phi, bias, alpha)
        if fused:
            extra = {"keep_next": False} if recompute else {}
            x2, u2, h_post2, h_res2 = impl.mhc_post_pre(x, u, h_post, h_res, phi, bias, alpha, **kw, **extra)
        else:
            x2 = impl.mhc_post(x, u, h_post, h_res, **kw)
            u2, h_post2, h_res2 = impl.mhc_pre(x2, phi, bias, alpha)
        source = {"source": (x, u, h_post, h_res)} if recompute else {}
        return impl.mhc_post(x2, u2, h_post2, h_res2, **kw, **source)

    return run


def block_rows(m, c, bw, with_reference=True):
    inputs = make_inputs(m, c)
    impls = {"compiled reference (Inductor)": torch.compile(two_connections(reference, False))} if with_reference else {}
    impls.update({
        "kernels, post and pre separate": two_connections(library, False),
        "kernels, post+pre fused": two_connections(library, True),
        "kernels, post+pre fused, inner stream recomputed": two_connections(library, True, recompute=True),
        "kernels, post+pre fused, deterministic": two_connections(library, True, deterministic=True),
    })
    rows = []
    for name, fn in impls.items():
        try:
            t_fwd, t_all = bench_fwd_bwd(fn, inputs)
        except Exception as err:  # noqa: BLE001 - report and continue
            rows.append({"C": c, "implementation": name, "fwd ms": f"failed: {type(err).__name__}: {str(err)[:80]}"})
            continue
        rows.append({"C": c, "implementation": name, "fwd ms": round(t_fwd, 3), "fwd+bwd ms": round(t_all, 3)})
    return rows


# Each tuning knob of ops/library.py, its candidates, and the kernel row whose time picks it.
# A knob is a module constant (``"DX_TILES"``) or one field of a ``Tiles`` constant
# (``"POST_PROJ_TILES.stages"``, tried on the tiles chosen so far).
ONE_PASS_ROW = "post+pre bwd, X_next recomputed, one-pass-matmul"  # a row of kernel_rows
KNOBS = [
    ("PROJ_TILES", [Tiles(256, 64, 4, 2), Tiles(128, 64, 4, 2), Tiles(256, 64, 8, 2), Tiles(128, 128, 8, 2),
                    Tiles(256, 32, 4, 2), Tiles(512, 32, 8, 2), Tiles(128, 64, 8, 3),
                    # deeper pipelines: more bytes in flight per SM
                    Tiles(256, 64, 4, 3), Tiles(256, 64, 4, 4), Tiles(256, 64, 8, 3), Tiles(128, 64, 4, 3),
                    Tiles(128, 64, 4, 4), Tiles(128, 128, 4, 3), Tiles(64, 64, 4, 4)], "pre fwd"),
    ("SPLIT_CHANNELS", [512, 1024, 2048], "pre fwd"),
    ("DH_TILES", [Tiles(64, 64, 4), Tiles(32, 128, 4), Tiles(16, 256, 4), Tiles(64, 128, 8)], "pre bwd"),
    ("DX_TILES", [Tiles(32, 128, 8), Tiles(64, 64, 8), Tiles(64, 64, 4), Tiles(32, 64, 4), Tiles(128, 64, 8),
                  Tiles(64, 64, 4, 2), Tiles(64, 64, 4, 4), Tiles(64, 128, 8, 3), Tiles(128, 64, 8, 3),
                  Tiles(32, 128, 4, 3), Tiles(64, 32, 4, 4)], "pre bwd"),
    ("DX_SPLIT_CHANNELS", [1024, 4096], "pre bwd"),
    ("PHI_T_BF16", [False, True], "pre bwd"),
    ("POST_PRE_PHI_PRESPLIT", [False, True], "post+pre fwd"),
    ("POST_PROJ_TILES", [Tiles(64, 32, 4, 3), Tiles(128, 32, 8, 3), Tiles(64, 64, 8, 3), Tiles(64, 16, 4, 3),
                         Tiles(128, 64, 8, 2), Tiles(256, 32, 8, 2), Tiles(128, 16, 4, 3),
                         Tiles(64, 32, 4, 4), Tiles(64, 64, 4, 3), Tiles(32, 64, 4, 3), Tiles(128, 32, 4, 4),
                         Tiles(64, 32, 8, 4), Tiles(32, 32, 4, 4), Tiles(32, 64, 4, 3)], "post+pre fwd"),
    ("POST_PROJ_TILES.stages", [1, 2, 3, 4], "post+pre fwd"),
    ("POST_SOURCE_TILES", [Tiles(4, 256, 4), Tiles(4, 256, 8), Tiles(8, 256, 8), Tiles(2, 256, 4), Tiles(4, 128, 4),
                           Tiles(8, 128, 4), Tiles(4, 512, 8), Tiles(16, 64, 4), Tiles(8, 64, 4), Tiles(2, 512, 4)],
     "post bwd, x recomputed"),
    ("DH_SOURCE_TILES", [Tiles(16, 256, 4), Tiles(16, 128, 4), Tiles(32, 128, 8), Tiles(8, 256, 4), Tiles(16, 256, 8),
                         Tiles(64, 64, 4), Tiles(32, 64, 4), Tiles(8, 128, 4)], "post+pre bwd, X_next recomputed"),
    # the one-pass backward's tiles, measured in that form (dphi by matmul, its faster one), then the form
    ("POST_PRE_DX_TILES", [Tiles(16, 64, 4), Tiles(32, 64, 8), Tiles(32, 32, 4), Tiles(64, 32, 8), Tiles(32, 64, 4),
                           Tiles(16, 32, 2), Tiles(16, 64, 2)], ONE_PASS_ROW),
    ("POST_PRE_DX_WAVES", [4, 8, 16, 32], ONE_PASS_ROW),
    ("POST_PRE_ONE_PASS", [False, True], "post+pre bwd, X_next recomputed"),
]


def get_knob(knob: str):
    """The current value of ``knob`` in ``ops.library``."""
    const, _, field = knob.partition(".")
    value = getattr(library, const, None)  # None: an older package without this knob
    return getattr(value, field) if field and value is not None else value


def set_knob(knob: str, value) -> None:
    """Set ``knob`` in ``ops.library`` (a field: a copy of the ``Tiles`` with it replaced)."""
    const, _, field = knob.partition(".")
    setattr(library, const, dataclasses.replace(getattr(library, const), **{field: value}) if field else value)


def with_settings(fn, settings: dict):
    """``fn`` run with these ``ops.library`` settings (restored after each call)."""
    def call():
        with library_settings(settings):
            return fn()
    return call


def tune(m: int, c: int, bw: float, knobs: list[str] | None = None) -> list[dict]:
    """Set each knob of ``ops.library`` (or those named) in turn to its fastest candidate
    at ``c`` channels."""
    rows = []
    for knob, candidates, kernel in KNOBS:
        if knobs and knob not in knobs:
            continue
        best = (float("inf"), get_knob(knob))
        for value in candidates:
            set_knob(knob, value)
            try:
                row = next(r for r in kernel_rows(m, c, bw, only=(kernel,)))
            except Exception as err:  # noqa: BLE001 - e.g. out of shared memory: report and go on
                rows.append({"knob": knob, "value": str(value), "kernel": kernel, "failed": f"{type(err).__name__}: {str(err)[:60]}"})
                continue
            rows.append({"knob": knob, "value": str(value), "kernel": kernel, "ms": row["ms"], "% copy BW": row["% copy BW"]})
            print(rows[-1], flush=True)
            if row["ms"] < best[0]:
                best = (row["ms"], value)
        set_knob(knob, best[1])
    return rows


def launch_breakdown(m: int, c: int) -> list[dict]:
    """Time of each kernel launch inside the fused ops (torch.profiler, mean of 10 calls)."""
    from torch.profiler import ProfilerActivity, profile

    x, phi, bias, alpha = make_inputs(m, c)
    xd, pd, bd, ad = x.detach(), phi.detach(), bias.detach(), alpha.detach()
    u, h_pre, h_post, h_res, q, rstd = torch.ops.mhc_compile.pre_fwd(xd, pd, bd, ad, False, 20, 1e-6)
    du, dhp, dhr, g = torch.randn_like(u), torch.randn_like(h_post), torch.randn_like(h_res), torch.randn_like(xd)
    x_next = torch.ops.mhc_compile.post_fwd(xd, u, h_post, h_res)
    _, h_pre2, h_post2, _, q2, rstd2 = torch.ops.mhc_compile.pre_fwd(x_next, pd, bd, ad, False, 20, 1e-6)
    ops = {
        "pre fwd": lambda: torch.ops.mhc_compile.pre_fwd(xd, pd, bd, ad, False, 20, 1e-6),
        "pre bwd": lambda: torch.ops.mhc_compile.pre_bwd(xd, pd, bd, ad, h_pre, h_post, q, rstd, du, dhp, dhr, False, 20),
        "post+pre fwd": lambda: torch.ops.mhc_compile.post_pre_fwd(xd, u, h_post, h_res, pd, bd, ad, False, 20, 1e-6),
        "post+pre bwd": lambda: torch.ops.mhc_compile.post_pre_bwd(
            xd, u, h_post, h_res, x_next, g, pd, bd, ad, h_pre2, h_post2, q2, rstd2, du, dhp, dhr, False, 20),
    }
    recomputed = lambda: torch.ops.mhc_compile.post_pre_bwd(  # noqa: E731
        xd, u, h_post, h_res, None, g, pd, bd, ad, h_pre2, h_post2, q2, rstd2, du, dhp, dhr, False, 20)
    for form, settings in BACKWARD_FORMS.items():  # X_next recomputed (the default), in each form
        ops[f"post+pre bwd, X_next recomputed, {form}"] = with_settings(recomputed, settings)
    rows = []
    for name, fn in ops.items():
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
        for ev in prof.key_averages():
            if ev.device_type.name == "CUDA" and ev.count:
                us = getattr(ev, "device_time_total", None) or ev.cuda_time_total
                rows.append({"C": c, "op": name, "launch": ev.key[:48], "us per call": round(us / 10, 1)})
    return rows


def chosen_knobs() -> str:
    return "; ".join(f"{knob} = {get_knob(knob)}" for knob, _, _ in KNOBS if "." not in knob)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 7168])
    parser.add_argument("--out", default=None)
    parser.add_argument("--kernels-only", action="store_true", help="skip the whole-connection comparison")
    parser.add_argument("--ops-only", action="store_true",
                        help="only the per-op rows and the launch breakdown (implies --kernels-only; no compiled "
                             "reference, so no Inductor compilation)")
    parser.add_argument("--without-reference", action="store_true",
                        help="leave the reference ops (eager, Inductor) out of the connection tables: their slowest part to run")
    parser.add_argument("--connections-only", action="store_true",
                        help="only the connection tables (no per-op rows, no launch breakdown)")
    parser.add_argument("--tune", action="store_true", help="first pick each kernel's tiles at C = 4096 (tried one knob at a time)")
    parser.add_argument("--knobs", nargs="*", default=None, help="with --tune: only these knobs (names in KNOBS)")
    parser.add_argument("--te-wheel", default=None,
                        help="TransformerEngine's py3-none-any wheel (default: the one in .whl/); its mHC "
                             "Triton files are loaded from it for the connection table")
    parser.add_argument("--token-sweep", type=int, nargs="+", default=None,
                        help="only one table: the pre and fused post+pre ops, forward and backward, at these token "
                             "counts (C = the first --sizes; GPU time from CUDA graphs)")
    args = parser.parse_args()
    args.kernels_only = args.kernels_only or args.ops_only
    if args.token_sweep:
        bw = copy_bandwidth()
        rows = token_sweep_rows(args.token_sweep, args.sizes[0], bw)
        report("\n".join([
            f"# Fused kernels by token count on {torch.cuda.get_device_name()}", "",
            f"Command: `python benchmarks/mhc_kernels.py --sizes {args.sizes[0]} --token-sweep "
            f"{' '.join(map(str, args.token_sweep))}`",
            f"torch {torch.__version__}, triton {triton.__version__}; n = {N}, bf16 streams; `ms`: the op's launches "
            f"replayed from a CUDA graph (GPU time), `ms, eager call`: plus the host's launch cost; do_bench "
            f"medians; copy bandwidth {bw:.0f} GB/s.", "",
            tabulate(rows, headers="keys", tablefmt="github"), ""]), args.out)
        return
    try:
        import liger_kernel  # noqa: F401

        with_liger = True
    except ImportError:
        with_liger = False
    bw = copy_bandwidth()
    kern, conn, block, tiles, te_checks = [], [], [], [], []
    te = None if args.kernels_only else load_te(args.te_wheel)
    if args.tune:
        tiles = tune(args.tokens, 4096, bw, args.knobs)
        print(tabulate(tiles, headers="keys", tablefmt="github"), flush=True)
        print("chosen:", chosen_knobs(), flush=True)
    breakdown = [{"not run": "--connections-only"}]
    if not args.connections_only:
        try:
            breakdown = launch_breakdown(args.tokens, 4096)
        except Exception as err:  # noqa: BLE001 - the tables below still matter
            breakdown = [{"failed": f"{type(err).__name__}: {err}"}]
        print(tabulate(breakdown, headers="keys", tablefmt="github"), flush=True)
    for c in args.sizes:  # the report is rewritten after each size, in case a later one runs past a limit
        if not args.connections_only:
            kern += kernel_rows(args.tokens, c, bw)
            print(tabulate(kern[-11:], headers="keys", tablefmt="github"), flush=True)
        if not args.kernels_only:
            rows, checks = connection_rows(args.tokens, c, bw, with_liger, te, not args.without_reference)
            conn += rows
            te_checks += checks
        if not args.ops_only:
            block += block_rows(args.tokens, c, bw, not args.without_reference)
        torch.cuda.empty_cache()
        write_report(args, bw, kern, conn, block, tiles, te_checks, breakdown, te, final=c == args.sizes[-1])


def write_report(args, bw, kern, conn, block, tiles, te_checks, breakdown, te, final: bool) -> None:
    """The markdown report of the rows so far (printed when ``final``)."""
    gpu = torch.cuda.get_device_name()
    lines = [
        f"# mHC kernels on {gpu}",
        "",
        f"Command: `python benchmarks/mhc_kernels.py --tokens {args.tokens} --sizes {' '.join(map(str, args.sizes))}"
        f"{' --tune' if args.tune else ''}{' --knobs ' + ' '.join(args.knobs) if args.knobs else ''}{' --ops-only' if args.ops_only else (' --kernels-only' if args.kernels_only else '')}"
        f"{' --without-reference' if args.without_reference else ''}{' --connections-only' if args.connections_only else ''}"
        f"{' --te-wheel ' + args.te_wheel if args.te_wheel else ''}`",
        f"torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}; "
        f"n = {N}, M = {args.tokens} tokens, bf16 streams, float32 coefficients, Sinkhorn 20 iterations.",
        f"Device-to-device copy bandwidth measured in the same run: **{bw:.0f} GB/s**.",
        "",
        "## Each fused kernel",
        "",
        tabulate(kern, headers="keys", tablefmt="github") if kern else "(not run: --connections-only)",
        "",
        "## One connection (pre -> identity branch -> post)",
        "",
        tabulate(conn, headers="keys", tablefmt="github") if conn else "(not run: --kernels-only)",
        "",
    ]
    if te is not None:
        lines += [
            f"TransformerEngine: `{te['wheel']}`, its two mHC Triton files loaded from the wheel "
            "(benchmarks/te_mhc.py), `general_gemm` (dphi) replaced by torch.matmul; TE's layout "
            "`[s, b, C, n]`, `phi [N, nC]`, `beta [1, N]`, `X' = X @ H_res` mapped from ours. Timed with "
            "its defaults (TF32 projections). Before timing, each size checks that both compute the same "
            "connection on the same inputs (ours with TE's RMS eps, TE with use_tf32=False; relative "
            "differences of the output and the gradients):",
            "",
            tabulate(te_checks, headers="keys", tablefmt="github"),
            "",
        ]
    lines += [
        "## Two adjacent connections (pre, post+pre, post), as in a transformer block",
        "",
        tabulate(block, headers="keys", tablefmt="github") if block else "(not run: --ops-only)",
        "",
        f"Kernel tiles used: {chosen_knobs()}.",
        "",
    ]
    lines += ["## Where the time goes: each launch inside the ops (C = 4096, torch.profiler)", "",
              tabulate(breakdown, headers="keys", tablefmt="github"), ""]
    if tiles:
        lines += ["## Tile tuning (C = 4096, one knob at a time, in this order)", "",
                  tabulate(tiles, headers="keys", tablefmt="github"), ""]
    text = "\n".join(lines)
    if final:
        report(text, args.out)
    elif args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
