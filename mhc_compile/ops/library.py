"""``torch.library`` registration of the fused Triton kernels.

Six custom ops (``mhc_compile::pre_fwd``, ``pre_bwd``, ``post_fwd``, ``post_bwd``,
``post_pre_fwd``, ``post_pre_bwd``) are declared with ``torch.library.triton_op`` so that
eager mode, autograd and Inductor all call the same kernels (Inductor sees the Triton
kernels inside them), with fake implementations derived from the op bodies and autograd
formulas registered with ``register_autograd``; plain eager calls run the same bodies and
formulas without the dispatcher's per-call cost (:func:`_run`), and every launch outside
tracing skips Triton's Python launcher once its call form is known
(:func:`.triton.launch.launch`). A pre side runs as three
launches (a split-K projection, the per-token coefficients, a streaming aggregate or dx
pass; for few tokens the coefficient launch computes ``u`` too); the fused post+pre op
replaces the projection launch by one that also writes ``X_{l+1}``.
:func:`mhc_pre`, :func:`mhc_post` and :func:`mhc_post_pre` are what ``ops.functional``
calls for ``backend="triton"`` (and for ``"auto"`` on CUDA)."""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
from typing import NamedTuple

import torch
from torch import Tensor

from ..errors import MHCError
from .settings import DotMode, Tiles
from .triton.launch import PLAIN_TENSORS

try:  # Triton is optional: without it only backend="torch" exists
    import triton  # noqa: F401 - the kernels need it (KERNELS_AVAILABLE)
    from torch.library import triton_op

    from .triton import kernels
    from .triton.launch import launch

    KERNELS_AVAILABLE = True
except ImportError:  # pragma: no cover - exercised on machines without Triton
    KERNELS_AVAILABLE = False

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_STREAMS = 8
# Tiles on the GPU, from benchmarks/mhc_kernels.py --tune on an H100 (the two projections'
# retuned on an H200: 4 warps, and 64 tokens for the fused one). Projections (split-K over
# channel ranges of SPLIT_CHANNELS per stream) take many tokens per program to amortise
# phi's L2 reads; streaming passes take few.
PROJ_TILES = Tiles(tokens=256, channels=64, warps=4, stages=2)  # pre forward's projection
# fused post + next pre's projection; --tune on an H200 with POST_PRE_PHI_PRESPLIT: 0.668 ms at C = 4096
POST_PROJ_TILES = Tiles(tokens=32, channels=64, warps=4, stages=3)
SPLIT_CHANNELS = 1024
COEF_TILES = Tiles(tokens=64, channels=1, warps=4)  # per-token coefficient kernels (no channel axis)
AGGREGATE_TILES = Tiles(tokens=8, channels=256, warps=8)
DH_TILES = Tiles(tokens=16, channels=256, warps=4)  # the backward's dH_pre partials (no dot: few tokens)
# the pre backward's dx (tl.dot needs >= 16 tokens), also the fused backward's gradient; --tune on an
# H200 with PHI_T_BF16: 0.665 ms a pre backward at C = 4096 (64 x 64, 4 warps: 0.697)
DX_TILES = Tiles(tokens=32, channels=128, warps=8)
DX_SPLIT_CHANNELS = 4096  # channels per dx program: dproj is read once per range, not per chunk
PHI_T_BF16 = True  # the dx kernel's bf16 dot reads a bf16 phi^T made per call (False: phi itself)
# the fused post+pre projection of 16-bit streams reads phi split into hi + lo parts by one launch a
# call (False: each token block splits float32 rows on chip); PHI_SPLIT_ROWS rows a program there
POST_PRE_PHI_PRESPLIT = True
PHI_SPLIT_ROWS = 256
POST_TILES = Tiles(tokens=4, channels=256, warps=4)  # post forward and backward
# The backward launches that recompute X_{l+1} rather than read it (recompute_streams):
# the post backward on chip, the fused op's dH_pre launch storing it for the launches after.
POST_SOURCE_TILES = Tiles(tokens=4, channels=256, warps=4)
DH_SOURCE_TILES = Tiles(tokens=8, channels=128, warps=4)  # benchmarks/mhc_kernels.py --tune, H200: 1.90 vs 2.04 ms
# The fused post+pre backward: three passes (False, the default: X_{l+1} stored by the dH_pre launch,
# its gradient written by the dx launch, dphi from it by cuBLAS, then the post backward), or one
# streaming pass after the coefficients (X_{l+1} recomputed on chip and never stored, its gradient
# sent through the post backward there). The one pass moves 1/2 to 2/3 of the bytes but is slower:
# benchmarks/mhc_kernels.py --tune on an H200 at C = 4096, M = 16384, X_{l+1} recomputed: 1.76 ms in
# three passes at 73% of copy bandwidth, 2.15 ms in one pass with dphi by matmul, 3.43 ms with dphi
# in the pass (its pass alone takes 1.6 ms where the post backward and the dx launch it replaces take
# 0.57 + 0.63 ms: presumably register-bound, a program holding [BM, n, BC] tiles of X_l and dX_l).
POST_PRE_ONE_PASS = False
POST_PRE_DX_TILES = Tiles(tokens=16, channels=64, warps=4)  # tl.dot needs >= 16 tokens; tuned as above
POST_PRE_DX_WAVES = 16  # programs per SM of that pass: token groups = waves * SMs / channel chunks
# dphi of that pass accumulated on chip per channel chunk (True), or (False) two cuBLAS matmuls over X_l
# and y after it (_dphi_from_mix): X_l and y read once more, the pass without its [n, BC, W] accumulator
POST_PRE_DPHI_IN_PASS = False
# Few tokens (decode): the projections' cost is reading phi, so many small programs share
# it (channel ranges of DECODE_SPLIT_CHANNELS), and the coefficient kernel computes u too.
DECODE_TOKENS = 64  # at most this many tokens take the decode tiles
DECODE_PROJ_TILES = Tiles(tokens=16, channels=64, warps=4)  # benchmarks/decode_ops.py --sweep
DECODE_SPLIT_CHANNELS = 128  # few serial steps per program, few partials to add up
# Coefficients + aggregate: at most this many tokens per program, and tokens x channels
# elements of x per stream and chunk (the token block shrinks to the call's tokens, the
# chunk widens to keep that size; see _decode_coef_tiles). 8 tokens: 18.2 against 21.7 us
# with 16 at 16 tokens, the same at one (benchmarks/decode_ops.py --sweep, H200).
DECODE_COEF_TILES = Tiles(tokens=8, channels=256, warps=4)
DECODE_AGGREGATE_CHANNELS = 512  # channels of u per program of the coefficient launch
DECODE_ONE_CHUNK_ELEMENTS = 8192  # widest row of u a normed coefficient launch holds in one chunk
MAX_SPLITS_PER_LOAD = 32  # split-K partials the decode coefficient launch adds up per load
DETERMINISTIC_POST_CHANNELS = 2048  # channels per program of the deterministic post backward
# The same under TRITON_INTERPRET=1: small, so CPU tests cover several splits and tiles.
_INTERPRETER_TILES = {
    "proj": Tiles(tokens=16, channels=16, warps=4), "stream": Tiles(tokens=4, channels=32, warps=4),
    "dx": Tiles(tokens=16, channels=16, warps=4), "coef": Tiles(tokens=16, channels=1, warps=4),
    "post": Tiles(tokens=4, channels=16, warps=4), "coef+aggregate": Tiles(tokens=16, channels=16, warps=4),
    "post+pre dx": Tiles(tokens=16, channels=16, warps=4),
}
POISON_OUTPUTS = False  # tests: fill every output with NaN before the kernel writes it


class KernelInputError(MHCError, ValueError):
    """An input the fused kernels cannot take; the message names the fix."""


def check_backend(backend: str) -> None:
    """Raise a clear error when ``backend="triton"`` is asked for but cannot run."""
    if backend == "triton" and not KERNELS_AVAILABLE:
        raise RuntimeError(
            "backend='triton' needs the Triton package (pip install triton); "
            "use backend='torch' for the reference ops"
        )


def _cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` in plain Python (``triton.cdiv`` costs microseconds of host time a call)."""
    return -(-a // b)


def _next_pow2(v: int) -> int:
    """The smallest power of two >= ``v`` (``v >= 1``), in plain Python."""
    return 1 << (v - 1).bit_length()


def _prev_pow2(v: int) -> int:
    """The largest power of two <= ``v`` (``v >= 1``)."""
    return 1 << (v.bit_length() - 1)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_INTERPRETED = _interpreting()  # the kernels were decorated for Triton's interpreter (read at import, as Triton does)


def _cached(plan, *args):
    """``plan(*args)`` through its ``lru_cache``, or computed afresh where an argument is
    symbolic (a token count under ``torch.compile(dynamic=True)``: a SymInt is not hashable)."""
    if any(isinstance(a, torch.SymInt) for a in args):
        return plan.__wrapped__(*args)
    return plan(*args)


def validate(x: Tensor, *others: Tensor) -> None:
    """Device, dtype, shape and stream-count checks shared by the fused ops."""
    if x.dim() != 3:
        raise KernelInputError(f"fused mHC ops take streams as [M, n, C]; got shape {tuple(x.shape)}")
    n = x.shape[1]
    if not 1 <= n <= MAX_STREAMS:
        raise KernelInputError(f"fused mHC kernels support 1 to {MAX_STREAMS} streams; got n={n}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise KernelInputError(
            f"fused mHC kernels take float32, bfloat16 or float16 streams; got {x.dtype}; "
            "cast the model or use backend='torch'"
        )
    if not (x.is_cuda or (x.device.type == "cpu" and _interpreting())):
        raise KernelInputError(
            f"fused mHC kernels run on CUDA tensors (or on the CPU under TRITON_INTERPRET=1); "
            f"got a {x.device.type} tensor; use backend='torch' or backend='auto'"
        )
    for t in others:
        if t.device != x.device:
            raise KernelInputError(f"all inputs must be on {x.device}; got one on {t.device}")


class Layout(NamedTuple):
    """Column counts of the kernels for ``n`` streams (see :mod:`.triton.kernels`):
    ``npad``/``np``/``nr`` the on-chip padded blocks, ``nc = n^2 + 2n`` the real columns of
    ``phi`` and ``bias``, ``w`` the projection dot's width (compact columns, zero past
    ``nc``), ``qw`` the width of the saved scaled projections ``q``."""

    npad: int
    np: int
    nr: int
    nc: int
    w: int
    qw: int

    def constants(self) -> dict:
        """The kernels' ``tl.constexpr`` arguments of this layout."""
        return {"NPAD": self.npad, "NP": self.np, "NR": self.nr, "NC": self.nc, "W": self.w, "QW": self.qw}


@functools.lru_cache(maxsize=None)
def layout(n: int) -> Layout:
    """The :class:`Layout` for ``n`` streams."""
    npad = max(4, 1 << (n - 1).bit_length())
    np_ = max(16, npad)
    nc = n * n + 2 * n
    return Layout(npad, np_, npad * npad, nc, max(16, 1 << (nc - 1).bit_length()), 2 * np_ + npad * npad)


def _dot_mode(x: Tensor) -> DotMode:
    """How the kernels compute ``vec(x) @ phi`` with float32 accuracy on tensor cores:
    ``SPLIT_B`` for 16-bit streams, ``SPLIT_AB`` for float32 streams, and ``IEEE_FP32``
    under ``TRITON_INTERPRET=1`` (Triton's CPU interpreter computes 16-bit ``tl.dot``
    wrongly: numpy has no bfloat16)."""
    if _INTERPRETED or not x.is_cuda:  # CPU tensors: only under the interpreter (see validate)
        return DotMode.IEEE_FP32
    return DotMode.SPLIT_AB if x.dtype == torch.float32 else DotMode.SPLIT_B


def _poisoned(*tensors: Tensor) -> None:
    if POISON_OUTPUTS:
        for t in tensors:
            t.fill_(float("nan"))


def _pre_outputs(x: Tensor, reuse: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Empty outputs of a pre side for ``x [M, n, C]``: ``u [M, C]`` (dtype of ``x``) and
    float32 ``H_pre, H_post [M, n]``, ``H_res [M, n, n]``, ``q [M, QW]``, ``rstd [M]``.
    ``reuse``: ``H_pre``, ``q`` and ``rstd`` (kept only for the backward) come from
    :func:`_scratch`."""
    m, n, c = x.shape[0], int(x.shape[1]), int(x.shape[2])
    f32 = torch.float32
    if reuse:
        h_pre, q, rstd = _scratch(x, "kept", ((m, n), (m, layout(n).qw), (m,)))
    else:
        h_pre, q, rstd = x.new_empty(m, n, dtype=f32), x.new_empty(m, layout(n).qw, dtype=f32), x.new_empty(m, dtype=f32)
    outs = (x.new_empty(m, c), h_pre, x.new_empty(m, n, dtype=f32), x.new_empty(m, n, n, dtype=f32), q, rstd)
    _poisoned(*outs)
    return outs


MAX_SCRATCH = 64  # buffer sets kept by _scratch (decode uses a few: one per token count and kind)
_SCRATCH: dict[tuple, tuple[Tensor, ...]] = {}


def _scratch(x: Tensor, kind: str, shapes: tuple[tuple[int, ...], ...]) -> tuple[Tensor, ...]:
    """Float32 buffers of ``shapes`` that a no-grad eager call with few tokens writes and
    reads within its own launches and nobody keeps (the split-K partials, and ``H_pre``,
    ``q``, ``rstd``, which only a backward would read): one set per device, stream, thread,
    kind and shapes, reused call after call. The launches of one stream run in order, so a
    call writes them only after the previous call's launches have read them; another
    stream, or another thread (whose launches could fall between this call's), has its own
    set. Saves about ten allocations a layer of host time in decode."""
    key = (x.device, torch._C._cuda_getCurrentRawStream(x.device.index) if x.is_cuda else 0,
           threading.get_ident(), kind, shapes)
    buffers = _SCRATCH.get(key)
    if buffers is None:
        if len(_SCRATCH) >= MAX_SCRATCH:
            _SCRATCH.clear()
        buffers = _SCRATCH[key] = tuple(x.new_empty(shape, dtype=torch.float32) for shape in shapes)
    return buffers


def _tiles(x: Tensor, c: int, tiles: Tiles, kind: str) -> Tiles:
    """The launch shape of one kernel: ``tiles`` on the GPU (channels halved for float32
    streams in the projection and dx kinds), small ones under the interpreter; channels capped
    at the next power of two of ``c``."""
    return _launch_tiles(x.is_cuda, x.element_size(), c, tiles, kind)


@functools.lru_cache(maxsize=4096)
def _launch_tiles(on_gpu: bool, element_size: int, c: int, tiles: Tiles, kind: str) -> Tiles:
    """:func:`_tiles`, cached (a launch on the decode path should cost little host time)."""
    t = tiles if on_gpu else _INTERPRETER_TILES[kind]
    bc = t.channels
    if on_gpu and element_size == 4 and kind in ("proj", "dx", "post+pre dx"):
        bc = max(16, bc // 2)  # float32 streams: the tiles tuned for 16 bits, halved to fit
    return dataclasses.replace(t, channels=_pick(bc, c))


def _decode_coef_tiles(x: Tensor, c: int, norm: bool) -> tuple[Tiles, int, int]:
    """Tiles, channels per program and channel ranges of the coefficient launch over the
    few tokens of ``x [M, n, C]``.

    Without ``norm`` the token block is ``M`` rounded up to a power of two, at most
    DECODE_COEF_TILES' tokens (a decode step's one token runs one row, not 8; a symbolic
    ``M`` under ``torch.compile(dynamic=True)`` takes the largest block, so that nothing
    guards on it), and each stream's chunk is widened to keep DECODE_COEF_TILES' size, up
    to a channel range of DECODE_AGGREGATE_CHANNELS (twice the interpreter tile's channels
    under the interpreter, so that CPU tests see ranges of one chunk and of two). With
    ``norm`` (one range: the whole row) a program takes one token, its row in one chunk up
    to DECODE_ONE_CHUNK_ELEMENTS channels (the interpreter tile's tokens x channels, twice,
    under the interpreter) and in chunks of that size beyond (measured: one token a program
    is fastest from 1 to 64 tokens, ``benchmarks/decode_ops.py --sweep``). A range no wider
    than its chunk is one chunk (``ONE_CHUNK``).

    The plan is cached on its arguments, the settings included (a tuner may set them); what
    it reads besides (``_INTERPRETER_TILES``, ``KERNELS_AVAILABLE``) is fixed at import."""
    return _cached(_decode_coef_plan, x.is_cuda, x.element_size(), x.shape[0], c, norm, DECODE_COEF_TILES,
                   DECODE_AGGREGATE_CHANNELS, DECODE_ONE_CHUNK_ELEMENTS)


@functools.lru_cache(maxsize=4096)
def _decode_coef_plan(on_gpu: bool, element_size: int, m: int | torch.SymInt, c: int, norm: bool, tiles: Tiles,
                      range_channels: int, one_chunk_elements: int) -> tuple[Tiles, int, int]:
    """:func:`_decode_coef_tiles`, from plain values."""
    t = _launch_tiles(on_gpu, element_size, c, tiles, "coef+aggregate")
    chunk = t.tokens * t.channels  # the tuned elements of a chunk
    if norm:  # a program a token: its whole row, in one chunk where it fits
        limit = one_chunk_elements if on_gpu else 2 * chunk
        channels = min(_next_pow2(c), _prev_pow2(max(16, limit)))
        warps = min(16, t.warps * max(1, channels // chunk))  # registers per thread as at the tuned size
        return dataclasses.replace(t, tokens=1, channels=channels, warps=warps), c, 1
    tokens = min(t.tokens, _next_pow2(m)) if type(m) is int else t.tokens
    range_width = range_channels if on_gpu else 2 * t.channels
    wide = min(_pick(chunk // tokens, c), _next_pow2(range_width))
    per = min(max(wide, range_width // wide * wide), _cdiv(c, wide) * wide)
    return dataclasses.replace(t, tokens=tokens, channels=wide), per, _cdiv(c, per)


def few_tokens(m: int) -> bool:
    """Whether ``m`` tokens take the decode tiles (see DECODE_TOKENS)."""
    return m <= DECODE_TOKENS


def _projection_tiles(x: Tensor, m: int, c: int, tiles: Tiles) -> tuple[Tiles, int, int]:
    """Tiles, channels per program and number of channel ranges of a split-K projection
    over ``m`` tokens: ``tiles`` and SPLIT_CHANNELS, or the decode ones for few tokens."""
    if few_tokens(m):
        t = _tiles(x, c, DECODE_PROJ_TILES, "proj")
        return (t, *_splits(x, c, t.channels, DECODE_SPLIT_CHANNELS))
    t = _tiles(x, c, tiles, "proj")
    return (t, *_splits(x, c, t.channels, blocks=_cdiv(m, t.tokens)))


def _splits(x: Tensor, c: int, bc: int, channels: int | None = None,
            blocks: int | torch.SymInt | None = None) -> tuple[int, int]:
    """(channels per program, number of channel ranges) for ``c`` channels per stream:
    ``channels`` (default SPLIT_CHANNELS) on the GPU, two chunks under the interpreter.

    ``blocks``: the launch's token blocks. Where they are too few to fill the GPU with
    ``channels`` per program (a prefill, a small batch: 128 tokens made 4 programs of the
    pre projection), the ranges are halved, down to ``bc``, until the launch has at least
    one program per SM (:func:`_sm_count`)."""
    if x.is_cuda and blocks is not None:
        return _cached(_split_plan, True, x.device.index, c, bc, channels or SPLIT_CHANNELS, blocks)
    return _split_plan(x.is_cuda, None, c, bc, channels or SPLIT_CHANNELS, None)


@functools.lru_cache(maxsize=4096)
def _split_plan(on_gpu: bool, device: int | None, c: int, bc: int, channels: int,
                blocks: int | torch.SymInt | None) -> tuple[int, int]:
    """:func:`_splits` from plain values (``device``: the CUDA device index, where ``blocks``
    is given); cached through :func:`_cached`."""
    per = channels if on_gpu else 2 * bc
    per = max(bc, per // bc * bc)
    if blocks is not None and on_gpu:
        target = _sm_count(device)
        while per >= 2 * bc and blocks * _cdiv(c, per) < target:
            per = per // 2 // bc * bc
    return per, _cdiv(c, per)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (the target program count of a launch)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _splits_per_load(splits: int) -> int:
    """Partials the coefficient launch adds per load where there are many (few tokens, or
    ranges split further for occupancy): all of them, up to MAX_SPLITS_PER_LOAD (a serial
    walk over many partials costs latency when a token block is one program). Many tokens
    with the default ranges add them one per load (measured: wider loads there doubled
    the launch's time, 11 -> 23 us at 16384 tokens)."""
    return min(MAX_SPLITS_PER_LOAD, _next_pow2(splits)) if KERNELS_AVAILABLE else 1


def _pick(block: int, c: int) -> int:
    return min(block, _next_pow2(c)) if KERNELS_AVAILABLE else block


def _back_dot(dot: DotMode) -> DotMode:
    """Dot mode of ``dproj @ phi^T`` in dx: a 16-bit dx is served by one bf16 dot."""
    return {DotMode.SPLIT_B: DotMode.BF16}.get(dot, dot)


def _phi_t_bf16(phi: Tensor, w: int) -> Tensor:
    """``phi [K, NC]`` (float32) as the ``[W, K]`` bf16 transpose the dx kernel's one bf16
    dot reads (rows past ``NC`` zero): the same rounding the dot applies on chip, loaded at
    half the bytes and contiguous along the channels."""
    k, nc = phi.shape
    out = phi.new_zeros(w, k, dtype=torch.bfloat16)
    out[:nc].copy_(phi.t())
    return out


if KERNELS_AVAILABLE:

    def _partials(x: Tensor, splits: int, reuse: bool) -> tuple[Tensor, Tensor]:
        """The split-K partial projections ``[S, M, W]`` and sums of squares ``[S, M]`` of
        ``x [M, n, C]`` (float32; from :func:`_scratch` where ``reuse``)."""
        m, w = x.shape[0], layout(int(x.shape[1])).w
        if reuse:
            return _scratch(x, "partials", ((splits, m, w), (splits, m)))
        return x.new_empty(splits, m, w, dtype=torch.float32), x.new_empty(splits, m, dtype=torch.float32)

    def _projection_phi(x: Tensor, phi: Tensor, dot: DotMode) -> tuple[Tensor, bool]:
        """What the fused post+pre projection over ``x [M, n, C]`` reads for ``phi [nC, NC]``:
        with POST_PRE_PHI_PRESPLIT (and 16-bit streams, ``SPLIT_B``, not the decode tiles),
        the ``[2, nC, W]`` hi and lo parts from one small launch (``_split_phi_kernel``),
        whose rows its 32-token blocks load whole instead of each splitting float32 rows on
        chip; else ``phi``. (The pre forward's 256-token blocks split few rows a token: no
        gain there, measured.)"""
        if not POST_PRE_PHI_PRESPLIT or dot != DotMode.SPLIT_B or few_tokens(x.shape[0]):
            return phi, False
        k, nc = phi.shape
        w = layout(int(x.shape[1])).w
        parts = phi.new_empty(2, k, w, dtype=x.dtype)
        launch(kernels._split_phi_kernel, (_cdiv(k, PHI_SPLIT_ROWS),), phi, parts, k, NC=nc, W=w, BK=PHI_SPLIT_ROWS)
        return parts, True

    def _pre_projection(x: Tensor, phi: Tensor, dot: DotMode, reuse: bool = False) -> tuple[Tensor, Tensor, int]:
        """Launch 1 of the pre forward: partial projections ``[S, M, W]``, ``sum(x^2) [S, M]``."""
        m, n, c = x.shape[0], int(x.shape[1]), int(x.shape[2])
        lay = layout(n)
        t, per, splits = _projection_tiles(x, m, c, PROJ_TILES)
        part, sq = _partials(x, splits, reuse)
        launch(kernels._pre_proj_kernel, (_cdiv(m, t.tokens), splits),
            x, phi, part, sq, m, c, per, N=n, NC=lay.nc, W=lay.w, DOT=int(dot), **t.launch(),
        )
        return part, sq, splits

    def _finish_pre(
        x: Tensor, part: Tensor, sq: Tensor, splits: int, bias: Tensor, alpha: Tensor,
        hc: bool, iters: int, eps: float, reuse: bool = False, norm: tuple[Tensor, float] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Launches 2 and 3 of a pre forward over streams ``x [M, n, C]``: coefficients from
        the partial projections, then ``u`` (one launch for few tokens). Returns
        :func:`_pre_outputs` (``reuse``: as there), filled. ``norm``: ``(weight [C], eps)``
        of the RMSNorm that follows (few tokens only): the ``u`` returned is its output."""
        m, n, c = x.shape[0], int(x.shape[1]), int(x.shape[2])
        lay = layout(n)
        u, h_pre, h_post, h_res, q, rstd = _pre_outputs(x, reuse)
        few = few_tokens(m)
        if few:
            ct, per, ranges = _decode_coef_tiles(x, c, norm is not None)
        else:
            ct, per, ranges = _tiles(x, c, COEF_TILES, "coef"), c, 1
        norm_weight, norm_eps = norm if norm else (u, 0.0)
        launch(kernels._pre_coef_kernel, (_cdiv(m, ct.tokens), ranges),
            part, sq, bias, alpha, h_pre, h_post, h_res, q, rstd, x, u,
            m, c, per, n * c, eps, iters, splits, norm_weight, norm_eps,
            N=n, NPAD=lay.npad, NP=lay.np, NR=lay.nr, W=lay.w, QW=lay.qw, HC=hc, AGGREGATE=few,
            SB=_splits_per_load(splits) if few or splits > _cdiv(c, SPLIT_CHANNELS) else 1, NORM=norm is not None,
            ONE_CHUNK=few and per <= ct.channels, **ct.launch(channels=True),
        )
        if few:
            return u, h_pre, h_post, h_res, q, rstd
        t = _tiles(x, c, AGGREGATE_TILES, "stream")
        launch(kernels._aggregate_kernel, (_cdiv(m, t.tokens), _cdiv(c, t.channels)),
            x, h_pre, u, m, c, N=n, **t.launch(),
        )
        return u, h_pre, h_post, h_res, q, rstd

    def _coefficient_backward(
        x: Tensor, du: Tensor, bias: Tensor, alpha: Tensor, h_pre: Tensor, h_post: Tensor,
        q: Tensor, rstd: Tensor, dh_post: Tensor, dh_res: Tensor, hc: bool, iters: int,
        source: tuple[Tensor, Tensor, Tensor, Tensor] | None = None, store: bool = True,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Launches 1 and 2 of a pre backward over streams ``x [M, n, C]``: ``dproj [M, W]``,
        ``dz [M, n^2 + 2n]``, ``dalpha [M, 3]`` and the RMS factor ``coef [M]`` (all float32).
        ``source``: ``(x_prev, y, H_post, H_res)`` of the post whose output ``x`` is, which
        was not kept: launch 1 recomputes ``x`` from them, and where ``store`` writes it into
        the (empty) ``x`` (else ``x`` only gives the streams' shape and dtype)."""
        m, n, c = x.shape[0], int(x.shape[1]), int(x.shape[2])
        lay = layout(n)
        t = _tiles(x, c, DH_TILES if source is None else DH_SOURCE_TILES, "proj")
        per, splits = _splits(x, c, t.channels, blocks=_cdiv(m, t.tokens))
        part = x.new_empty(splits, m, lay.np, dtype=torch.float32)
        launch(kernels._dh_pre_kernel, (_cdiv(m, t.tokens), splits),
            x, du, part, *(source or (x, du, x, x)), m, c, per, N=n, NP=lay.np, NPAD=lay.npad,
            SOURCE=source is not None, STORE=store, **t.launch(),
        )
        dproj = x.new_zeros(m, lay.w, dtype=torch.float32)  # zero past nc: one dot in dx
        dz = x.new_empty(m, lay.nc, dtype=torch.float32)
        dalpha = x.new_empty(m, 3, dtype=torch.float32)
        coef = x.new_empty(m, dtype=torch.float32)
        sums = x.new_empty(0 if hc else 2 * iters, m, lay.npad, dtype=torch.float32)  # Sinkhorn scratch
        _poisoned(dz, dalpha, coef)
        ct = _tiles(x, c, COEF_TILES, "coef")
        launch(kernels._pre_coef_bwd_kernel, (_cdiv(m, ct.tokens),),
            part, bias, alpha, h_pre, h_post, q, rstd, dh_post, dh_res,
            dproj, dz, dalpha, coef, sums, m, n * c, iters, splits,
            N=n, HC=hc, **lay.constants(), **ct.launch(channels=False),
        )
        return dproj, dz, dalpha, coef

    def _pre_side_backward(
        x: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor, h_pre: Tensor, h_post: Tensor,
        q: Tensor, rstd: Tensor, du: Tensor, dh_post: Tensor, dh_res: Tensor, hc: bool, iters: int,
        g_in: Tensor | None = None, source: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """A pre backward over streams ``x [M, n, C]``: ``dx`` (plus ``g_in``, the gradient
        from the streams' other users, when given), ``dproj``, ``dz``, ``dalpha``.
        ``source``: as in :func:`_coefficient_backward` (``x`` is filled there)."""
        m, n, c = x.shape[0], int(x.shape[1]), int(x.shape[2])
        dot = _dot_mode(x)
        dproj, dz, dalpha, coef = _coefficient_backward(
            x, du, bias, alpha, h_pre, h_post, q, rstd, dh_post, dh_res, hc, iters, source)
        dx = torch.empty_like(x)
        _poisoned(dx)
        t = _tiles(x, c, DX_TILES, "dx")
        per, splits = _splits(x, c, t.channels, DX_SPLIT_CHANNELS, blocks=_cdiv(m, t.tokens))
        lay = layout(n)
        bdot = _back_dot(dot)
        phi_t = bdot == DotMode.BF16 and PHI_T_BF16
        launch(kernels._pre_dx_kernel, (_cdiv(m, t.tokens), splits),
            x, du, _phi_t_bf16(phi, lay.w) if phi_t else phi, h_pre, dproj, coef, x if g_in is None else g_in, dx,
            m, c, per, N=n, NC=lay.nc, W=lay.w, BDOT=int(bdot), ACCUM=g_in is not None, PHI_T=phi_t, **t.launch(),
        )
        return dx, dproj, dz, dalpha

    def _pre_fwd_impl(
        x: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor, hc: bool, iters: int, eps: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``x [M, n, C]`` -> ``u [M, C]``, ``H_pre, H_post [M, n]``, ``H_res [M, n, n]``,
        ``q [M, QW]`` (scaled projections) and ``rstd [M]`` (float32, kept for backward)."""
        return _pre_forward(x, phi, bias, alpha, hc, iters, eps)

    def _pre_forward(
        x: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor, hc: bool, iters: int, eps: float, reuse: bool = False,
        norm: tuple[Tensor, float] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """:func:`_pre_fwd_impl`; ``reuse``: the partials, ``H_pre``, ``q`` and ``rstd`` from
        :func:`_scratch` (no-grad eager calls with few tokens, see :func:`_run`); ``norm``: as
        in :func:`_finish_pre`."""
        part, sq, splits = _pre_projection(x, phi, _dot_mode(x), reuse)
        return _finish_pre(x, part, sq, splits, bias, alpha, hc, iters, eps, reuse, norm)

    def _pre_bwd_impl(
        x: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor, h_pre: Tensor, h_post: Tensor,
        q: Tensor, rstd: Tensor, du: Tensor, dh_post: Tensor, dh_res: Tensor, hc: bool, iters: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Gradients of :func:`pre_fwd`: ``dx [M, n, C]``, ``dproj [M, W]`` (for
        ``dphi = vec(x)^T dproj``), ``dz [M, W]`` (summed: ``dbias``), ``dalpha [M, 3]``."""
        return _pre_side_backward(x, phi, bias, alpha, h_pre, h_post, q, rstd, du, dh_post, dh_res, hc, iters)

    def _post_fwd_impl(
        x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor, deterministic: bool = False,
        x_src: Tensor | None = None, y_src: Tensor | None = None, h_post_src: Tensor | None = None,
        h_res_src: Tensor | None = None,
    ) -> Tensor:
        """``X_next [M, n, C] = H_res @ x + H_post^T y``; ``deterministic`` only picks the
        backward's reduction (see :func:`post_bwd`). ``x_src``...``h_res_src``: the inputs of
        the fused post whose output ``x`` is (``mhc_post(..., source=)``); not read here, kept
        for the backward in ``x``'s place."""
        m, n, c = x.shape[0], int(x.shape[1]), int(x.shape[2])
        out = torch.empty_like(x)
        _poisoned(out)
        t = _tiles(x, c, POST_TILES, "post")
        grid = (_cdiv(m, t.tokens), _cdiv(c, t.channels))
        launch(kernels._post_fwd_kernel, grid,
            x, y, h_post, h_res, out, m, c, N=n, NPAD=layout(n).npad, **t.launch(),
        )
        return out

    def _post_backward_launch(
        x: Tensor | None, y: Tensor, h_post: Tensor, h_res: Tensor, grad: Tensor, deterministic: bool,
        source: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The post backward kernel: ``dx``, ``dy``, ``dH_post``, ``dH_res`` from ``grad [M, n, C]``.

        The channel sums of ``dH_post``/``dH_res`` use float32 atomics, or, when
        ``deterministic``, per-range partial sums (ranges of DETERMINISTIC_POST_CHANNELS)
        added in a fixed order: bitwise identical run to run. ``source``: ``(x_prev, y_prev,
        H_post_prev, H_res_prev)``, the inputs of the post whose output ``x`` is (then
        ``None``): the kernel recomputes ``x`` on chip instead of reading it."""
        x = grad if x is None else x  # with a source only its shape and dtype are used
        m, n, c = x.shape[0], int(x.shape[1]), int(x.shape[2])
        dx = torch.empty_like(x)
        dy = torch.empty_like(y)
        _poisoned(dx, dy)
        t = _tiles(x, c, POST_TILES if source is None else POST_SOURCE_TILES, "post")
        if deterministic:
            per, splits = _splits(x, c, t.channels, DETERMINISTIC_POST_CHANNELS)
            dh_post = x.new_empty(splits, m, n, dtype=torch.float32)
            dh_res = x.new_empty(splits, m, n, n, dtype=torch.float32)
            _poisoned(dh_post, dh_res)
        else:
            per, splits = t.channels, _cdiv(c, t.channels)  # one chunk per program
            dh_post = x.new_zeros(m, n, dtype=torch.float32)  # accumulated with atomics
            dh_res = x.new_zeros(m, n, n, dtype=torch.float32)
        launch(kernels._post_bwd_kernel, (_cdiv(m, t.tokens), splits),
            x, y, h_post, h_res, grad, dx, dy, dh_post, dh_res, *(source or (x, y, h_post, h_res)), m, c, per,
            N=n, NPAD=layout(n).npad, ATOMIC=not deterministic, SOURCE=source is not None, **t.launch(),
        )
        if deterministic:
            dh_post, dh_res = dh_post.sum(0), dh_res.sum(0)  # torch's reductions use no atomics
        return dx, dy, dh_post, dh_res

    def _post_bwd_impl(
        x: Tensor | None, y: Tensor, h_post: Tensor, h_res: Tensor, grad: Tensor, deterministic: bool = False,
        x_src: Tensor | None = None, y_src: Tensor | None = None, h_post_src: Tensor | None = None,
        h_res_src: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Gradients of :func:`post_fwd`: ``dx``, ``dy``, ``dH_post``, ``dH_res`` (bitwise
        reproducible where ``deterministic``); ``x`` is ``None`` where the source (``x_src``
        ...) was kept instead."""
        source = None if x_src is None else (x_src, y_src, h_post_src, h_res_src)
        return _post_backward_launch(x, y, h_post, h_res, grad, deterministic, source)

    def _post_pre_fwd_impl(
        x: Tensor, y: Tensor, h_post0: Tensor, h_res0: Tensor, phi: Tensor, bias: Tensor,
        alpha: Tensor, hc: bool, iters: int, eps: float, deterministic: bool = False, keep_next: bool = True,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Post of one connection fused with the pre of the next: ``x [M, n, C]``, ``y [M, C]``,
        ``H_post, H_res`` of the first -> ``X_next [M, n, C]`` and :func:`pre_fwd`'s outputs
        for the second (``u``, ``H_pre``, ``H_post``, ``H_res``, ``q``, ``rstd``).
        ``keep_next=False``: the backward does not keep ``X_next`` but recomputes it."""
        return _post_pre_forward(x, y, h_post0, h_res0, phi, bias, alpha, hc, iters, eps)

    def _post_pre_forward(
        x: Tensor, y: Tensor, h_post0: Tensor, h_res0: Tensor, phi: Tensor, bias: Tensor,
        alpha: Tensor, hc: bool, iters: int, eps: float, deterministic: bool = False, keep_next: bool = True,
        reuse: bool = False, norm: tuple[Tensor, float] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """:func:`_post_pre_fwd_impl`; ``reuse`` and ``norm``: as in :func:`_pre_forward`."""
        m, n, c = x.shape[0], int(x.shape[1]), int(x.shape[2])
        lay = layout(n)
        x_next = torch.empty_like(x)
        _poisoned(x_next)
        t, per, splits = _projection_tiles(x, m, c, POST_PROJ_TILES)
        part, sq = _partials(x, splits, reuse)
        dot = _dot_mode(x)
        phi_arg, presplit = _projection_phi(x, phi, dot)
        launch(kernels._post_proj_kernel, (_cdiv(m, t.tokens), splits),  # every constexpr passed: Inductor
            x, y, h_post0, h_res0, phi_arg, x_next, part, sq, m, c, per,  # drops a kernel's defaults
            N=n, NPAD=lay.npad, NC=lay.nc, W=lay.w, DOT=int(dot), PRESPLIT=presplit, **t.launch(),
        )
        return (x_next, *_finish_pre(x_next, part, sq, splits, bias, alpha, hc, iters, eps, reuse, norm))

    def _post_pre_bwd_impl(
        x: Tensor, y: Tensor, h_post0: Tensor, h_res0: Tensor, x_next: Tensor | None, g_next: Tensor,
        phi: Tensor, bias: Tensor, alpha: Tensor, h_pre: Tensor, h_post: Tensor, q: Tensor,
        rstd: Tensor, du: Tensor, dh_post: Tensor, dh_res: Tensor, hc: bool, iters: int,
        deterministic: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Gradients of :func:`post_pre_fwd`: ``dx``, ``dy``, ``dH_post``, ``dH_res`` of the
        post side and ``dphi [n*C, n^2 + 2n]``, ``dbias``, ``dalpha`` of the pre side (float32);
        ``g_next`` is the gradient reaching ``X_next`` from its other users. ``x_next=None``
        (not kept): the first launch recomputes it from ``x``, ``y``, ``H_post``, ``H_res``."""
        if POST_PRE_ONE_PASS:
            source = None if x_next is not None else (x, y, h_post0, h_res0)
            dproj, dz, dalpha, coef = _coefficient_backward(
                x if x_next is None else x_next, du, bias, alpha, h_pre, h_post, q, rstd, dh_post, dh_res, hc,
                iters, source, store=False)
            dx, dy, dh_post0, dh_res0, dphi = _post_pre_dx_launch(
                x, y, h_post0, h_res0, g_next, du, phi, h_pre, dproj, coef)
            return dx, dy, dh_post0, dh_res0, dphi, dz.sum(0), dalpha.sum(0)
        source = None
        if x_next is None:
            x_next, source = torch.empty_like(x), (x, y, h_post0, h_res0)
        g, dproj, dz, dalpha = _pre_side_backward(  # g: X_next's whole gradient, g_next included
            x_next, phi, bias, alpha, h_pre, h_post, q, rstd, du, dh_post, dh_res, hc, iters, g_in=g_next,
            source=source)
        dx, dy, dh_post0, dh_res0 = _post_backward_launch(x, y, h_post0, h_res0, g, deterministic)
        return dx, dy, dh_post0, dh_res0, *_pre_param_grads(x_next, dproj, dz, dalpha)

    def _post_pre_dx_launch(
        x: Tensor, y: Tensor, h_post0: Tensor, h_res0: Tensor, g_next: Tensor, du: Tensor, phi: Tensor,
        h_pre: Tensor, dproj: Tensor, coef: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The one-pass rest of a fused post+pre backward (:func:`kernels._post_pre_dx_kernel`):
        ``dx [M, n, C]``, ``dy [M, C]`` (the streams' dtype) and float32 ``dH_post [M, n]``,
        ``dH_res [M, n, n]``, ``dphi [n*C, n^2 + 2n]``: fixed-order sums of partials, ``dphi``
        so too with ``POST_PRE_DPHI_IN_PASS``, else cuBLAS matmuls (as the three-pass form's);
        bitwise reproducible run to run, so ``deterministic`` changes nothing here."""
        m, n, c = x.shape[0], int(x.shape[1]), int(x.shape[2])
        lay = layout(n)
        t = _tiles(x, c, POST_PRE_DX_TILES, "post+pre dx")
        bc = max(16, _pick(t.channels * 4 // lay.npad, c))  # more streams, narrower chunks: the same registers
        chunks = _cdiv(c, bc)
        blocks = _cdiv(m, t.tokens)
        groups = _cdiv(POST_PRE_DX_WAVES * _sm_count(x.device.index), chunks) if x.is_cuda else 2
        per = _cdiv(blocks, groups)  # token blocks per group
        groups = _cdiv(blocks, per)
        dot = _dot_mode(x)
        bdot = _back_dot(dot)
        phi_t = bdot == DotMode.BF16 and PHI_T_BF16
        dx, dy = torch.empty_like(x), torch.empty_like(y)
        dh_post = x.new_empty(chunks, m, n, dtype=torch.float32)
        dh_res = x.new_empty(chunks, m, n, n, dtype=torch.float32)
        in_pass = POST_PRE_DPHI_IN_PASS
        dphi = x.new_empty(groups if in_pass else 1, n * c if in_pass else 1, lay.w, dtype=torch.float32)
        _poisoned(dx, dy, dh_post, dh_res, dphi)
        launch(kernels._post_pre_dx_kernel, (chunks, groups),
            x, y, h_post0, h_res0, g_next, du, _phi_t_bf16(phi, lay.w) if phi_t else phi, h_pre, dproj, coef,
            dx, dy, dh_post, dh_res, dphi, m, c, per * t.tokens,
            N=n, NPAD=lay.npad, NC=lay.nc, W=lay.w, DOT=int(dot), BDOT=int(bdot), PHI_T=phi_t, DPHI=in_pass,
            BC=bc, **t.launch(channels=False),
        )
        dphi = dphi[:, :, :lay.nc].sum(0) if in_pass else _dphi_from_mix(x, y, h_post0, h_res0, dproj[:, :lay.nc])
        return dx, dy, dh_post.sum(0), dh_res.sum(0), dphi

    def _dphi_from_mix(x: Tensor, y: Tensor, h_post0: Tensor, h_res0: Tensor, dproj: Tensor) -> Tensor:
        """``dphi = vec(X_{l+1})^T dproj [n*C, NC]`` (float32) without ``X_{l+1}``: with
        ``X_{l+1}[m, i] = sum_j H_res0[m, i, j] x[m, j] + H_post0[m, i] y[m]``,
        ``dphi[(i, c), w] = sum_(m, j) x[m, j, c] H_res0[m, i, j] dproj[m, w]
        + sum_m y[m, c] H_post0[m, i] dproj[m, w]``: two matmuls over the tokens (and streams)
        that read ``x [M, n, C]`` and ``y [M, C]`` once, against small ``[M, n, n*NC]`` and
        ``[M, n*NC]`` right-hand sides, in the streams' dtype (as :func:`_pre_param_grads`)."""
        m, n, c = x.shape[0], int(x.shape[1]), int(x.shape[2])
        nc = dproj.shape[1]
        by_res = (h_res0.transpose(1, 2)[..., None] * dproj[:, None, None, :]).to(x.dtype)  # [M, j, i, w]
        by_post = (h_post0[..., None] * dproj[:, None, :]).to(x.dtype)  # [M, i, w]
        dphi = torch.addmm(y.t() @ by_post.reshape(m, n * nc), x.reshape(m * n, c).t(), by_res.reshape(m * n, n * nc))
        return dphi.float().reshape(c, n, nc).transpose(0, 1).reshape(n * c, nc)

    def _pre_grads_in(x, h_post, du, dh_post, dh_res):
        """Zeros for the pre-side gradients autograd passes as ``None``; float32, contiguous."""
        m, n, c = x.shape[0], int(x.shape[1]), int(x.shape[2])
        du = x.new_zeros(m, c) if du is None else du.contiguous()
        dh_post = torch.zeros_like(h_post) if dh_post is None else dh_post.float().contiguous()
        dh_res = x.new_zeros(m, n, n, dtype=torch.float32) if dh_res is None else dh_res.float().contiguous()
        return du, dh_post, dh_res

    def _pre_param_grads(x, dproj, dz, dalpha):
        """``dphi = vec(x)^T dproj`` (a matmul outside the kernel), ``dbias``, ``dalpha``."""
        m, n, c = x.shape[0], int(x.shape[1]), int(x.shape[2])
        flat = x.reshape(m, n * c)
        dproj = dproj[:, :layout(n).nc]
        if x.dtype == torch.float32:
            dphi = flat.t() @ dproj
        else:
            dphi = (flat.t() @ dproj.to(x.dtype)).float()
        return dphi, dz.sum(0), dalpha.sum(0)

    def _post_pre_setup(ctx, inputs, output) -> None:
        x, y, h_post0, h_res0, phi, bias, alpha, hc, iters, _, deterministic, keep_next = inputs
        x_next, _, h_pre, h_post, _, q, rstd = output
        ctx.save_for_backward(x, y, h_post0, h_res0, x_next if keep_next else None, phi, bias, alpha,
                              h_pre, h_post, q, rstd)
        ctx.hc, ctx.iters, ctx.deterministic = hc, iters, deterministic
        ctx.mark_non_differentiable(h_pre, q, rstd)

    def _post_pre_backward(ctx, g_next, du, _dh_pre, dh_post, dh_res, _dq, _drstd):
        x, y, h_post0, h_res0, x_next, phi, bias, alpha, h_pre, h_post, q, rstd = ctx.saved_tensors
        du, dh_post, dh_res = _pre_grads_in(x, h_post, du, dh_post, dh_res)
        g_next = torch.zeros_like(x) if g_next is None else g_next.contiguous()
        grads = torch.ops.mhc_compile.post_pre_bwd(
            x, y, h_post0, h_res0, x_next, g_next, phi, bias, alpha, h_pre, h_post, q, rstd,
            du, dh_post, dh_res, ctx.hc, ctx.iters, ctx.deterministic,
        )  # dx, dy, dH_post, dH_res, dphi, dbias, dalpha
        return *grads, None, None, None, None, None

    def _pre_setup(ctx, inputs, output) -> None:
        x, phi, bias, alpha, hc, iters, _ = inputs
        _, h_pre, h_post, _, q, rstd = output
        ctx.save_for_backward(x, phi, bias, alpha, h_pre, h_post, q, rstd)
        ctx.hc, ctx.iters = hc, iters
        ctx.mark_non_differentiable(h_pre, q, rstd)

    def _pre_backward(ctx, du, _dh_pre, dh_post, dh_res, _dq, _drstd):
        x, phi, bias, alpha, h_pre, h_post, q, rstd = ctx.saved_tensors
        du, dh_post, dh_res = _pre_grads_in(x, h_post, du, dh_post, dh_res)
        dx, dproj, dz, dalpha = torch.ops.mhc_compile.pre_bwd(
            x, phi, bias, alpha, h_pre, h_post, q, rstd, du, dh_post, dh_res, ctx.hc, ctx.iters
        )
        return (dx, *_pre_param_grads(x, dproj, dz, dalpha), None, None, None)

    def _post_setup(ctx, inputs, output) -> None:
        x, y, h_post, h_res, ctx.deterministic, *source = inputs
        # with a source (the fused post that produced x): keep it instead of x
        ctx.save_for_backward(x if source[0] is None else None, y, h_post, h_res, *source)

    def _post_backward(ctx, grad):
        grads = torch.ops.mhc_compile.post_bwd(*ctx.saved_tensors[:4], grad.contiguous(), ctx.deterministic,
                                               *ctx.saved_tensors[4:])
        return *grads, None, None, None, None, None

    pre_fwd = triton_op("mhc_compile::pre_fwd", mutates_args=())(_pre_fwd_impl)
    pre_bwd = triton_op("mhc_compile::pre_bwd", mutates_args=())(_pre_bwd_impl)
    post_fwd = triton_op("mhc_compile::post_fwd", mutates_args=())(_post_fwd_impl)
    post_bwd = triton_op("mhc_compile::post_bwd", mutates_args=())(_post_bwd_impl)
    post_pre_fwd = triton_op("mhc_compile::post_pre_fwd", mutates_args=())(_post_pre_fwd_impl)
    post_pre_bwd = triton_op("mhc_compile::post_pre_bwd", mutates_args=())(_post_pre_bwd_impl)
    pre_fwd.register_autograd(_pre_backward, setup_context=_pre_setup)
    post_pre_fwd.register_autograd(_post_pre_backward, setup_context=_post_pre_setup)
    post_fwd.register_autograd(_post_backward, setup_context=_post_setup)

    def _eager_function(name: str, impl, setup, backward) -> type:
        """An ``autograd.Function`` running ``impl`` with the op's own autograd formula: what
        eager calls take instead of the dispatcher (see :func:`_run`)."""

        def forward(ctx, *inputs):
            output = impl(*inputs)
            setup(ctx, inputs, output)
            return output

        return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(backward)})

    def _pre_normed_forward(x, phi, bias, alpha, weight, hc, iters, eps, norm_eps, reuse=False):
        """:func:`_pre_forward` with the RMSNorm of ``weight [C]`` and ``norm_eps`` on ``u``
        (few tokens): the norm's output ``[M, C]``, ``H_post [M, n]``, ``H_res [M, n, n]``."""
        u, _, h_post, h_res, _, _ = _pre_forward(x, phi, bias, alpha, hc, iters, eps, reuse, norm=(weight, norm_eps))
        return u, h_post, h_res

    def _post_pre_normed_forward(x, y, h_post0, h_res0, phi, bias, alpha, weight, hc, iters, eps, norm_eps,
                                 reuse=False):
        """:func:`_post_pre_forward` with the norm of :func:`_pre_normed_forward` on the second
        connection's ``u``: ``X_next [M, n, C]``, the norm's output, ``H_post``, ``H_res``."""
        x_next, u, _, h_post, h_res, _, _ = _post_pre_forward(
            x, y, h_post0, h_res0, phi, bias, alpha, hc, iters, eps, reuse=reuse, norm=(weight, norm_eps))
        return x_next, u, h_post, h_res

    def _pre_normed_fwd_impl(
        x: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor, weight: Tensor, hc: bool, iters: int, eps: float,
        norm_eps: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        return _pre_normed_forward(x, phi, bias, alpha, weight, hc, iters, eps, norm_eps)

    def _post_pre_normed_fwd_impl(
        x: Tensor, y: Tensor, h_post0: Tensor, h_res0: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor,
        weight: Tensor, hc: bool, iters: int, eps: float, norm_eps: float,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return _post_pre_normed_forward(x, y, h_post0, h_res0, phi, bias, alpha, weight, hc, iters, eps, norm_eps)

    # Inference only (no autograd formula): taken where no gradient is recorded (norm_fusable).
    # They serve torch.compile and the other non-eager calls; eager calls run the bodies.
    pre_normed_fwd = triton_op("mhc_compile::pre_normed_fwd", mutates_args=())(_pre_normed_fwd_impl)
    post_pre_normed_fwd = triton_op("mhc_compile::post_pre_normed_fwd", mutates_args=())(_post_pre_normed_fwd_impl)

    _EAGER = {  # op -> (body, its autograd.Function, the body of a no-grad call with few tokens)
        "pre_fwd": (_pre_fwd_impl, _eager_function("PreFwd", _pre_fwd_impl, _pre_setup, _pre_backward),
                    functools.partial(_pre_forward, reuse=True)),
        "post_fwd": (_post_fwd_impl, _eager_function("PostFwd", _post_fwd_impl, _post_setup, _post_backward),
                     _post_fwd_impl),
        "post_pre_fwd": (_post_pre_fwd_impl,
                         _eager_function("PostPreFwd", _post_pre_fwd_impl, _post_pre_setup, _post_pre_backward),
                         functools.partial(_post_pre_forward, reuse=True)),
        # inference only: norm_fusable sends them only calls that record no gradient
        "pre_normed_fwd": (_pre_normed_fwd_impl, None, functools.partial(_pre_normed_forward, reuse=True)),
        "post_pre_normed_fwd": (_post_pre_normed_fwd_impl, None,
                                functools.partial(_post_pre_normed_forward, reuse=True)),
    }


def _run(name: str, *inputs):
    """Call the op ``torch.ops.mhc_compile.<name>``, or, in plain eager mode, its body directly.

    The dispatcher's Python custom-op path costs tens of microseconds a call on the host,
    which batch-1 decode pays several times a layer. So a call outside ``torch.compile``,
    export and ``torch.func`` transforms, with no dispatch mode active (fake tensors,
    tracing and selective checkpointing all install one) and on plain tensors or parameters
    only, runs the same body under the op's own autograd formula (or without autograd where
    no input needs a gradient: then, for few tokens, with the buffers that only the launches
    themselves or a backward read taken from :func:`_scratch`); every other call goes
    through the op.
    """
    tensors = [t for t in inputs if isinstance(t, Tensor)]
    if not _plain_eager(tensors):
        return getattr(torch.ops.mhc_compile, name)(*inputs)
    impl, function, reusing = _EAGER[name]
    with _direct_launches(False):  # wrap_triton launches the kernels directly, as inside the op
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return function.apply(*inputs)
        return (reusing if few_tokens(inputs[0].shape[0]) else impl)(*inputs)


def _plain_eager(tensors: list[Tensor]) -> bool:
    """Whether a call on ``tensors`` may skip the dispatcher (see :func:`_run`)."""
    return not (_direct_launches is None or torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
                or _functorch_active() or any(type(t) not in PLAIN_TENSORS for t in tensors))


def norm_fusable(x: Tensor, weight: Tensor, *tensors: Tensor) -> bool:
    """Whether the pre side over ``x [M, n, C]`` (with the op's other tensor inputs
    ``tensors``) can compute the RMSNorm of weight ``weight [C]`` that follows it in its own
    coefficient launch (:func:`mhc_pre_normed`): few tokens and no gradient to record,
    ``weight`` contiguous, of the streams' dtype and device, plain tensors (eager or under
    ``torch.compile``; no ``torch.func`` transform)."""
    return (KERNELS_AVAILABLE and few_tokens(x.shape[0]) and weight.dtype == x.dtype and weight.device == x.device
            and weight.shape == (x.shape[2],) and weight.is_contiguous() and _op_servable([x, weight, *tensors])
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, *tensors))))


def _op_servable(tensors: list[Tensor]) -> bool:
    """Whether an inference-only op (no autograd formula, no batching rule) can take
    ``tensors``: plain tensors or parameters (what Dynamo reports for its fakes too), no
    ``torch.func`` transform."""
    return (torch.compiler.is_compiling() or not _functorch_active()) and all(type(t) in PLAIN_TENSORS for t in tensors)


def mhc_pre_normed(
    x: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor, weight: Tensor, norm_eps: float, *,
    mode: str = "mhc", sinkhorn_iters: int = 20, eps: float = 1e-6,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`mhc_pre` followed by a Llama-style RMSNorm of ``weight [C]`` and ``norm_eps``
    on ``u``, in the same launches: returns the norm's output ``[M, C]`` (dtype of ``x``),
    ``H_post [M, n]``, ``H_res [M, n, n]``. Only where :func:`norm_fusable` holds."""
    _check_pre(x, phi, bias, alpha, mode)
    inputs = _pre_inputs(x, phi, bias, alpha, mode, sinkhorn_iters, eps)  # (x, phi, bias, alpha, hc, iters, eps)
    return _run("pre_normed_fwd", *inputs[:4], weight.contiguous(), *inputs[4:], float(norm_eps))


def mhc_post_pre_normed(
    x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor,
    weight: Tensor, norm_eps: float, *, mode: str = "mhc", sinkhorn_iters: int = 20, eps: float = 1e-6,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`mhc_post_pre` with the RMSNorm of :func:`mhc_pre_normed` on the second
    connection's ``u``: ``X_next``, the norm's output, ``H_post``, ``H_res``."""
    _check_post_pre(x, y, h_post, h_res, phi, bias, alpha, mode)
    inputs = _post_pre_inputs(x, y, h_post, h_res, phi, bias, alpha, mode, sinkhorn_iters, eps, False)[:-1]
    return _run("post_pre_normed_fwd", *inputs[:7], weight.contiguous(), *inputs[7:], float(norm_eps))


_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)  # torch.func: the op path
try:  # what triton_op itself does around its body for plain tensors (else each launch is a HOP call)
    from torch._library.triton import set_wrap_triton_enabled as _direct_launches
except ImportError:  # pragma: no cover - an older or newer torch: every call takes the op
    _direct_launches = None


def mhc_pre(
    x: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor, *, mode: str = "mhc",
    sinkhorn_iters: int = 20, eps: float = 1e-6,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fused pre side: ``x [M, n, C]`` -> ``u [M, C]``, ``H_post [M, n]``, ``H_res [M, n, n]``.

    Same contract as :func:`mhc_compile.ops.reference.mhc_pre`.
    """
    _check_pre(x, phi, bias, alpha, mode)
    u, _, h_post, h_res, _, _ = _run("pre_fwd", *_pre_inputs(x, phi, bias, alpha, mode, sinkhorn_iters, eps))
    return u, h_post, h_res


def _pre_inputs(x: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor, mode: str, iters: int, eps: float) -> tuple:
    """The inputs of ``pre_fwd`` (and of its body), contiguous, the parameters float32."""
    return (x.contiguous(), phi.float().contiguous(), bias.float().contiguous(), alpha.float().contiguous(),
            mode == "hc", int(iters), float(eps))


def _post_pre_inputs(x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor,
                     mode: str, iters: int, eps: float, deterministic: bool) -> tuple:
    """The inputs of ``post_pre_fwd`` (and of its body), as :func:`_pre_inputs`."""
    return (*_post_inputs(x, y, h_post, h_res), *_pre_inputs(x, phi, bias, alpha, mode, iters, eps)[1:],
            deterministic_wanted(deterministic))


def _post_inputs(x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A post side's tensors as its kernels take them: contiguous, ``y`` in ``x``'s dtype,
    the coefficients float32."""
    return x.contiguous(), y.to(x.dtype).contiguous(), h_post.float().contiguous(), h_res.float().contiguous()


def _check_pre(x: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor, mode: str) -> None:
    check_backend("triton")
    validate(x, phi, bias, alpha)
    _check_pre_shapes(x, phi, mode)


def _check_post(x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor) -> None:
    check_backend("triton")
    validate(x, y, h_post, h_res)
    _check_post_shapes(x, y)


def _check_post_pre(x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor,
                    mode: str) -> None:
    """:func:`_check_post` and :func:`_check_pre` with one pass over the devices."""
    check_backend("triton")
    validate(x, y, h_post, h_res, phi, bias, alpha)
    _check_post_shapes(x, y)
    _check_pre_shapes(x, phi, mode)


def _check_pre_shapes(x: Tensor, phi: Tensor, mode: str) -> None:
    if mode not in ("mhc", "hc"):
        raise KernelInputError(f"unknown mode {mode!r}; use 'mhc' or 'hc'")
    n, c = x.shape[1], x.shape[2]
    if phi.shape != (n * c, n * n + 2 * n):
        raise KernelInputError(f"phi must be [n*C, n^2+2n] = {[n * c, n * n + 2 * n]}; got {list(phi.shape)}")


def _check_post_shapes(x: Tensor, y: Tensor) -> None:
    m, n, c = x.shape
    if y.shape != (m, c):
        raise KernelInputError(f"branch output must be [M, C] = {[m, c]}; got {list(y.shape)}")


def mhc_post_pre(
    x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor,
    *, mode: str = "mhc", sinkhorn_iters: int = 20, eps: float = 1e-6, deterministic: bool = False,
    keep_next: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused post of one connection and pre of the next, in one kernel.

    ``x [M, n, C]``, ``y [M, C]``, ``h_post [M, n]``, ``h_res [M, n, n]`` of the first
    connection; ``phi, bias, alpha`` of the second. Returns ``X_next [M, n, C]`` (dtype of
    ``x``) and the second connection's ``u [M, C]``, ``H_post [M, n]``, ``H_res [M, n, n]``:
    the same as :func:`mhc_post` followed by :func:`mhc_pre`. ``deterministic``: as in
    :func:`mhc_post`. ``keep_next=False``: the backward does not keep ``X_next`` (one
    ``[M, n, C]`` tensor less stored) but recomputes it from the inputs; meant for an
    ``X_next`` whose only user is an :func:`mhc_post` given ``source=`` these inputs.
    """
    _check_post_pre(x, y, h_post, h_res, phi, bias, alpha, mode)
    inputs = _post_pre_inputs(x, y, h_post, h_res, phi, bias, alpha, mode, sinkhorn_iters, eps, deterministic)
    x_next, u, _, h_post2, h_res2, _, _ = _run("post_pre_fwd", *inputs, bool(keep_next))
    return x_next, u, h_post2, h_res2


def mhc_post(
    x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor, *, deterministic: bool = False,
    source: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
) -> Tensor:
    """Fused post side: ``H_res @ x + H_post^T y``; ``[M, n, C]`` in ``x.dtype``.

    ``deterministic`` (or ``torch.use_deterministic_algorithms(True)``): the backward sums
    ``dH_post``/``dH_res`` over channels in a fixed order instead of with float32 atomics,
    so gradients are bitwise identical run to run. The other kernels are deterministic
    always (their split-K partial sums are added in a fixed order).

    ``source``: ``(x_prev, y_prev, h_post_prev, h_res_prev)`` where ``x`` is the ``X_next``
    of ``mhc_post_pre(x_prev, y_prev, h_post_prev, h_res_prev, ..., keep_next=False)``: the
    backward keeps those (stored anyway) instead of ``x`` and recomputes ``x`` on chip.
    """
    _check_post(x, y, h_post, h_res)
    src = (None,) * 4
    if source is not None:
        _check_post(*source)
        if source[0].shape != x.shape or source[0].dtype != x.dtype:
            raise KernelInputError(f"source streams must be like x {list(x.shape)}, {x.dtype}; "
                                   f"got {list(source[0].shape)}, {source[0].dtype}")
        src = _post_inputs(*source)
    return _run("post_fwd", *_post_inputs(x, y, h_post, h_res), deterministic_wanted(deterministic), *src)


def deterministic_wanted(deterministic: bool) -> bool:
    """``deterministic``, or PyTorch's global ``torch.use_deterministic_algorithms(True)``."""
    return bool(deterministic) or torch.are_deterministic_algorithms_enabled()
