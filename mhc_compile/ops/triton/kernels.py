"""Fused Triton kernels for one mHC connection. They know nothing of graphs.

Layout: streams ``x [M, N, C]`` (C contiguous), branch ``y``/``u`` ``[M, C]``.
``phi [N*C, NC]`` and ``bias [NC]`` (``NC = N^2 + 2N``) are read as they are, in the
compact column order pre ``[0, N)``, post ``[N, 2N)``, res ``2N + i*N + j``; the projection
dot runs over ``W = max(16, next_pow2(NC))`` columns (loads masked past ``NC``), and its
float32 partials ``[S, M, W]`` and the backward's ``dproj [M, W]`` keep that order.
On chip the coefficients live in padded blocks: pre and post ``[BM, NP]``, res ``[BM, NR]``
reshaped to ``[BM, NPAD, NPAD]``, with ``NPAD = max(4, next_pow2(N))``, ``NP = max(16, NPAD)``,
``NR = NPAD^2``; the scaled projections ``q [M, QW]`` saved for backward use that padded
order (pre at 0, post at ``NP``, res at ``2*NP``; ``QW = 2*NP + NR``).
``phi`` is float32; the kernels split it (and float32 streams) into bf16 hi + lo parts
on chip, so tensor-core dots give float32-accurate projections (see ``_split_dot``).
All coefficient math is float32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..settings import DotMode

# DotMode as Triton constants (a @triton.jit function may read globals only if constexpr)
DOT_IEEE_FP32 = tl.constexpr(int(DotMode.IEEE_FP32))
DOT_SPLIT_B = tl.constexpr(int(DotMode.SPLIT_B))
DOT_SPLIT_AB = tl.constexpr(int(DotMode.SPLIT_AB))
DOT_BF16 = tl.constexpr(int(DotMode.BF16))


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    return 2.0 * _sigmoid(2.0 * x) - 1.0


@triton.jit
def _lo_part(b, b_hi):
    """The lo part of a hi + lo split of float32 ``b``: ``b - b_hi`` rounded to ``b_hi``'s
    dtype (``b_hi``: ``b`` rounded to a 16-bit dtype)."""
    return (b - b_hi.to(tl.float32)).to(b_hi.dtype)


@triton.jit
def _hi_lo_dot(a, b_hi, b_lo):
    """``a @ (b_hi + b_lo)`` as two tensor-core dots with float32 results, hi first."""
    return tl.dot(a, b_hi, out_dtype=tl.float32) + tl.dot(a, b_lo, out_dtype=tl.float32)


@triton.jit
def _split_dot(a, b, DOT: tl.constexpr):
    """``a @ b`` for a float32 ``b``, computed as :class:`~mhc_compile.ops.settings.DotMode`
    ``DOT`` says (float32-accurate but for ``DOT_BF16``). The split happens here, in
    Triton, because a host-side ``phi - phi.to(bf16).float()`` may be folded to zero by
    Inductor.
    """
    if DOT == DOT_IEEE_FP32:
        return tl.dot(a.to(tl.float32), b, input_precision="ieee", out_dtype=tl.float32)
    if DOT == DOT_BF16:  # one bf16 dot: enough where the result is rounded to 16 bits anyway
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), out_dtype=tl.float32)
    if DOT == DOT_SPLIT_B:
        b_hi = b.to(a.dtype)
        return _hi_lo_dot(a, b_hi, _lo_part(b, b_hi))
    a32 = a.to(tl.float32)  # DOT_SPLIT_AB
    a_hi = a32.to(tl.bfloat16)
    b_hi = b.to(tl.bfloat16)
    return _hi_lo_dot(a_hi, b_hi, _lo_part(b, b_hi)) + tl.dot(_lo_part(a32, a_hi), b_hi, out_dtype=tl.float32)


@triton.jit
def _sinkhorn_logits(q_res, a2, b_res, N: tl.constexpr, NPAD: tl.constexpr, BM: tl.constexpr):
    """Masked ``[BM, NPAD, NPAD]`` logits and the shifted ``exp`` that starts Sinkhorn."""
    logits = tl.reshape(a2 * q_res + b_res[None, :], (BM, NPAD, NPAD))
    ri = tl.arange(0, NPAD)
    valid = (ri[:, None] < N) & (ri[None, :] < N)
    logits = tl.where(valid[None, :, :], logits, float("-inf"))
    mx = tl.max(logits, axis=2)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    p0 = tl.where(valid[None, :, :], tl.exp(logits - mx[:, :, None]), 0.0)
    return p0


@triton.jit
def _sinkhorn_step(p, axis: tl.constexpr):
    if axis == 2:
        s = tl.maximum(tl.sum(p, axis=2), 1e-30)
        return p / s[:, :, None]
    s = tl.maximum(tl.sum(p, axis=1), 1e-30)
    return p / s[:, None, :]


@triton.jit
def _res_columns(N: tl.constexpr, NPAD: tl.constexpr, NR: tl.constexpr):
    """Compact columns ``2N + i*N + j`` of the padded res entries ``i*NPAD + j`` ``[NR]``,
    and which of them are real (``i, j < N``)."""
    cr = tl.arange(0, NR)
    i = cr // NPAD
    j = cr % NPAD
    return 2 * N + i * N + j, (i < N) & (j < N)


@triton.jit
def _load_compact(row, mmask, N: tl.constexpr, NPAD: tl.constexpr, NP: tl.constexpr, NR: tl.constexpr):
    """pre ``[BM, NP]``, post ``[BM, NP]``, res ``[BM, NR]`` (zero in the padding) from
    compact rows ``row [BM, 1]`` (pointers to each token's column 0)."""
    cp = tl.arange(0, NP)
    pmask = mmask[:, None] & (cp < N)[None, :]
    col, rvalid = _res_columns(N, NPAD, NR)
    pre = tl.load(row + cp[None, :], mask=pmask, other=0.0)
    post = tl.load(row + N + cp[None, :], mask=pmask, other=0.0)
    res = tl.load(row + col[None, :], mask=mmask[:, None] & rvalid[None, :], other=0.0)
    return pre, post, res


@triton.jit
def _store_compact(row, mmask, pre, post, res, N: tl.constexpr, NPAD: tl.constexpr, NP: tl.constexpr,
                   NR: tl.constexpr):
    """Inverse of :func:`_load_compact`: the real entries of the padded blocks to ``row``."""
    cp = tl.arange(0, NP)
    pmask = mmask[:, None] & (cp < N)[None, :]
    col, rvalid = _res_columns(N, NPAD, NR)
    tl.store(row + cp[None, :], pre, mask=pmask)
    tl.store(row + N + cp[None, :], post, mask=pmask)
    tl.store(row + col[None, :], res, mask=mmask[:, None] & rvalid[None, :])


@triton.jit
def _load_bias(bias_ptr, N: tl.constexpr, NPAD: tl.constexpr, NP: tl.constexpr, NR: tl.constexpr):
    """The compact ``bias [NC]`` as padded blocks pre ``[NP]``, post ``[NP]``, res ``[NR]``."""
    cp = tl.arange(0, NP)
    col, rvalid = _res_columns(N, NPAD, NR)
    b_pre = tl.load(bias_ptr + cp, mask=cp < N, other=0.0)
    b_post = tl.load(bias_ptr + N + cp, mask=cp < N, other=0.0)
    return b_pre, b_post, tl.load(bias_ptr + col, mask=rvalid, other=0.0)


@triton.jit
def _coefficients(
    acc_pre, acc_post, acc_res, sumsq, rm, mmask, bias_ptr, alpha_ptr,
    hpre_ptr, hpost_ptr, hres_ptr, q_ptr, rstd_ptr, K, eps, iters,
    N: tl.constexpr, NPAD: tl.constexpr, NP: tl.constexpr, NR: tl.constexpr, QW: tl.constexpr,
    HC: tl.constexpr, BM: tl.constexpr,
):
    """Projections (padded blocks ``[BM, NP]``, ``[BM, NP]``, ``[BM, NR]``) and ``sum(x^2)
    [BM]`` -> stored ``H_pre, H_post, H_res, q, rstd``; returns ``H_pre [BM, NP]`` (zero in
    the padding)."""
    rm64 = rm.to(tl.int64)
    cp = tl.arange(0, NP)
    cr = tl.arange(0, NR)
    rstd = 1.0 / tl.sqrt(sumsq / K + eps)
    q_pre = acc_pre * rstd[:, None]
    q_post = acc_post * rstd[:, None]
    q_res = acc_res * rstd[:, None]
    a0 = tl.load(alpha_ptr)
    a1 = tl.load(alpha_ptr + 1)
    a2 = tl.load(alpha_ptr + 2)
    b_pre, b_post, b_res = _load_bias(bias_ptr, N, NPAD, NP, NR)
    if HC:
        h_pre = a0 * _tanh(q_pre) + b_pre[None, :]
        h_post = a1 * _tanh(q_post) + b_post[None, :]
        h_res = tl.reshape(a2 * _tanh(q_res) + b_res[None, :], (BM, NPAD, NPAD))
    else:
        h_pre = _sigmoid(a0 * q_pre + b_pre[None, :])
        h_post = 2.0 * _sigmoid(a1 * q_post + b_post[None, :])
        p = _sinkhorn_logits(q_res, a2, b_res, N, NPAD, BM)
        for _ in range(iters):
            p = _sinkhorn_step(p, 2)
            p = _sinkhorn_step(p, 1)
        h_res = p
    pvalid = cp < N
    h_pre = tl.where(pvalid[None, :], h_pre, 0.0)
    smask = mmask[:, None] & pvalid[None, :]
    tl.store(hpre_ptr + rm64[:, None] * N + cp[None, :], h_pre, mask=smask)
    tl.store(hpost_ptr + rm64[:, None] * N + cp[None, :], h_post, mask=smask)
    ri = tl.arange(0, NPAD)
    rvalid = (ri[:, None] < N) & (ri[None, :] < N)
    res_off = rm64[:, None, None] * (N * N) + ri[None, :, None] * N + ri[None, None, :]
    tl.store(hres_ptr + res_off, h_res, mask=mmask[:, None, None] & rvalid[None, :, :])
    qrow = q_ptr + rm64[:, None] * QW
    tl.store(qrow + cp[None, :], q_pre, mask=mmask[:, None])
    tl.store(qrow + NP + cp[None, :], q_post, mask=mmask[:, None])
    tl.store(qrow + 2 * NP + cr[None, :], q_res, mask=mmask[:, None])
    tl.store(rstd_ptr + rm, rstd, mask=mmask)
    return h_pre


@triton.jit
def _stream_offsets(rm64, ri, rc, C, N: tl.constexpr):
    """Offsets ``[BM, NPAD, BC]`` of a chunk of all streams, and their mask without tokens."""
    off = rm64[:, None, None] * (N * C) + ri[None, :, None] * C + rc[None, None, :]
    return off, (ri < N)[None, :, None] & (rc < C)[None, None, :]


@triton.jit
def _mix_streams(x_ptr, y_ptr, h_post, hres_ptr, rm64, mmask, rc, C, N: tl.constexpr, NPAD: tl.constexpr):
    """``H_res X + H_post^T y`` for a chunk of all streams: ``[BM, NPAD, BC]`` float32.

    ``h_post [BM, NPAD]`` is loaded by the caller (zero in the padding).
    """
    ri = tl.arange(0, NPAD)
    mi = mmask[:, None] & (ri < N)[None, :]
    mc = mmask[:, None] & (rc < C)[None, :]
    y = tl.load(y_ptr + rm64[:, None] * C + rc[None, :], mask=mc, other=0.0).to(tl.float32)
    acc = h_post[:, :, None] * y[:, None, :]
    for k in tl.static_range(N):
        xk = tl.load(x_ptr + rm64[:, None] * (N * C) + k * C + rc[None, :], mask=mc, other=0.0).to(tl.float32)
        h_col = tl.load(hres_ptr + rm64[:, None] * (N * N) + ri[None, :] * N + k, mask=mi, other=0.0)  # H[:, :, k]
        acc += h_col[:, :, None] * xk[:, None, :]
    return acc


@triton.jit
def _load_mix_inputs(x_ptr, y_ptr, rm64, mmask, rc, cmask, C, N: tl.constexpr, NPAD: tl.constexpr):
    """All input streams ``x [BM, NPAD, BC]`` and the branch output ``y [BM, BC]`` of a channel
    chunk (float32, zero where masked): what :func:`_mixed_stream` mixes."""
    ri = tl.arange(0, NPAD)
    off3, smask3 = _stream_offsets(rm64, ri, rc, C, N)
    x3 = tl.load(x_ptr + off3, mask=mmask[:, None, None] & smask3 & cmask[None, None, :], other=0.0).to(tl.float32)
    y = tl.load(y_ptr + rm64[:, None] * C + rc[None, :], mask=mmask[:, None] & cmask[None, :],
                other=0.0).to(tl.float32)
    return x3, y


@triton.jit
def _mixed_stream(x3, y, hpost_ptr, hres_ptr, rm64, mmask, i, N: tl.constexpr, NPAD: tl.constexpr):
    """Stream ``i`` of ``X_{l+1} = H_res X_l + H_post^T y`` on a ``[BM, BC]`` tile (float32)
    from :func:`_load_mix_inputs`. The fused post+pre forward and the backward kernels that
    recompute ``X_{l+1}`` instead of reading it all take this one expression."""
    ri = tl.arange(0, NPAD)
    h_post = tl.load(hpost_ptr + rm64 * N + i, mask=mmask, other=0.0)
    h_row = tl.load(hres_ptr + rm64[:, None] * (N * N) + i * N + ri[None, :],
                    mask=mmask[:, None] & (ri < N)[None, :], other=0.0)  # H[:, i, :]
    return h_post[:, None] * y + tl.sum(h_row[:, :, None] * x3, axis=1)


@triton.jit
def _post_fwd_kernel(
    x_ptr, y_ptr, hpost_ptr, hres_ptr, out_ptr, M, C,
    N: tl.constexpr, NPAD: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rm64 = rm.to(tl.int64)
    mmask = rm < M
    rc = pid_c * BC + tl.arange(0, BC)
    ri = tl.arange(0, NPAD)
    h_post = tl.load(hpost_ptr + rm64[:, None] * N + ri[None, :], mask=mmask[:, None] & (ri < N)[None, :], other=0.0)
    acc = _mix_streams(x_ptr, y_ptr, h_post, hres_ptr, rm64, mmask, rc, C, N, NPAD)
    off, smask = _stream_offsets(rm64, ri, rc, C, N)
    tl.store(out_ptr + off, acc.to(out_ptr.dtype.element_ty), mask=mmask[:, None, None] & smask)


@triton.jit
def _post_bwd_chunk(
    x_ptr, y_ptr, h_post, hres_ptr, g_ptr, dx_ptr, dy_ptr, xs_ptr, ys_ptr, hps_ptr, hrs_ptr, rm64, mmask, rc,
    cmask, C, N: tl.constexpr, NPAD: tl.constexpr, SOURCE: tl.constexpr, BM: tl.constexpr,
):
    """One ``[BM, BC]`` channel chunk of the post backward: stores ``dx`` and ``dy`` there and
    returns this chunk's parts of the channel sums ``dH_post [BM, NPAD]`` and ``dH_res [BM,
    NPAD, NPAD]``. ``SOURCE``: ``x`` is not read but recomputed as :func:`_mixed_stream` of
    ``xs, ys, hps, hrs`` (the inputs of the post that produced it; ``x_ptr`` then only gives
    its dtype)."""
    ri = tl.arange(0, NPAD)
    K = N * C
    mi = mmask[:, None] & (ri < N)[None, :]
    mc = mmask[:, None] & cmask[None, :]
    g_off, g_mask = _stream_offsets(rm64, ri, rc, C, N)
    g = tl.load(g_ptr + g_off, mask=mmask[:, None, None] & g_mask & cmask[None, None, :],
                other=0.0).to(tl.float32)  # [BM, NPAD(i), BC]
    y = tl.load(y_ptr + rm64[:, None] * C + rc[None, :], mask=mc, other=0.0).to(tl.float32)
    dy = tl.sum(h_post[:, :, None] * g, axis=1)
    tl.store(dy_ptr + rm64[:, None] * C + rc[None, :], dy.to(dy_ptr.dtype.element_ty), mask=mc)
    d_hpost = tl.sum(g * y[:, None, :], axis=2)
    d_hres = tl.zeros((BM, NPAD, NPAD), dtype=tl.float32)
    if SOURCE:
        x3, ys = _load_mix_inputs(xs_ptr, ys_ptr, rm64, mmask, rc, cmask, C, N, NPAD)
    for j in tl.static_range(N):
        if SOURCE:  # rounded to the streams' dtype, as the forward stored it
            xj = _mixed_stream(x3, ys, hps_ptr, hrs_ptr, rm64, mmask, j, N, NPAD).to(
                x_ptr.dtype.element_ty).to(tl.float32)
        else:
            xj = tl.load(x_ptr + rm64[:, None] * K + j * C + rc[None, :], mask=mc, other=0.0).to(tl.float32)
        h_col = tl.load(hres_ptr + rm64[:, None] * (N * N) + ri[None, :] * N + j, mask=mi, other=0.0)  # H[:, :, j]
        dxj = tl.sum(h_col[:, :, None] * g, axis=1)
        tl.store(dx_ptr + rm64[:, None] * K + j * C + rc[None, :], dxj.to(dx_ptr.dtype.element_ty), mask=mc)
        gx = tl.sum(g * xj[:, None, :], axis=2)  # [BM, NPAD(i)]: dH[:, i, j]
        d_hres += tl.where(ri[None, None, :] == j, gx[:, :, None], 0.0)
    return d_hpost, d_hres


@triton.jit
def _post_bwd_kernel(
    x_ptr, y_ptr, hpost_ptr, hres_ptr, g_ptr, dx_ptr, dy_ptr, dhpost_ptr, dhres_ptr,
    xs_ptr, ys_ptr, hps_ptr, hrs_ptr, M, C, CS,
    N: tl.constexpr, NPAD: tl.constexpr, ATOMIC: tl.constexpr, SOURCE: tl.constexpr,
    BM: tl.constexpr, BC: tl.constexpr,
):
    """Grid (token blocks, channel ranges of ``CS``). The sums over C of ``dH_post`` and
    ``dH_res``: with ``ATOMIC`` (``CS == BC``: one chunk per program), float32 atomics into
    zeroed ``[M, n]``, ``[M, n, n]`` buffers (fast; the rounding depends on the order the
    programs run in); else a program walks its range in chunks of ``BC`` and stores its
    partial sums to ``[S, M, n]``, ``[S, M, n, n]``, which the caller adds in a fixed order
    (bitwise reproducible). ``SOURCE``: ``x`` recomputed from ``xs, ys, hps, hrs`` (see
    :func:`_post_bwd_chunk`)."""
    rm, mmask, rm64, c_lo, c_hi = _range_program(M, C, CS, BM)
    ri = tl.arange(0, NPAD)
    ivalid = ri < N
    mi = mmask[:, None] & ivalid[None, :]
    h_post = tl.load(hpost_ptr + rm64[:, None] * N + ri[None, :], mask=mi, other=0.0)
    post_off = rm64[:, None] * N + ri[None, :]
    res_off = rm64[:, None, None] * (N * N) + ri[None, :, None] * N + ri[None, None, :]
    res_mask = mmask[:, None, None] & ivalid[None, :, None] & ivalid[None, None, :]
    if ATOMIC:
        rc = c_lo + tl.arange(0, BC)
        d_hpost, d_hres = _post_bwd_chunk(x_ptr, y_ptr, h_post, hres_ptr, g_ptr, dx_ptr, dy_ptr,
                                          xs_ptr, ys_ptr, hps_ptr, hrs_ptr, rm64, mmask, rc, rc < c_hi, C,
                                          N, NPAD, SOURCE, BM)
        tl.atomic_add(dhpost_ptr + post_off, d_hpost, mask=mi)
        tl.atomic_add(dhres_ptr + res_off, d_hres, mask=res_mask)
    else:
        d_hpost = tl.zeros((BM, NPAD), dtype=tl.float32)
        d_hres = tl.zeros((BM, NPAD, NPAD), dtype=tl.float32)
        for c0 in range(c_lo, c_hi, BC):
            rc = c0 + tl.arange(0, BC)
            hp, hr = _post_bwd_chunk(x_ptr, y_ptr, h_post, hres_ptr, g_ptr, dx_ptr, dy_ptr,
                                     xs_ptr, ys_ptr, hps_ptr, hrs_ptr, rm64, mmask, rc, rc < c_hi, C,
                                     N, NPAD, SOURCE, BM)
            d_hpost += hp
            d_hres += hr
        base = tl.program_id(1).to(tl.int64) * M
        tl.store(dhpost_ptr + base * N + post_off, d_hpost, mask=mi)
        tl.store(dhres_ptr + base * (N * N) + res_off, d_hres, mask=res_mask)


@triton.jit
def _coefficient_grads(
    d_hpre, rm, mmask, bias_ptr, alpha_ptr, hpre_ptr, hpost_ptr, q_ptr, rstd_ptr,
    dhpost_ptr, dhres_ptr, dproj_ptr, dz_ptr, dalpha_ptr, sums_ptr, M, K, iters,
    N: tl.constexpr, NPAD: tl.constexpr, NP: tl.constexpr, NR: tl.constexpr, NC: tl.constexpr,
    W: tl.constexpr, QW: tl.constexpr, HC: tl.constexpr, BM: tl.constexpr,
):
    """Backward of :func:`_coefficients` on chip (Sinkhorn recomputed, not stored).

    The recomputation keeps the ``2*iters`` row/column sums of each token in ``sums
    [2*iters, M, NPAD]`` (float32 scratch), so the backward walk is O(iters), not O(iters^2).

    Takes ``dH_pre [BM, NP]`` and loads ``dH_post``, ``dH_res``; stores ``dproj [M, W]``
    and ``dz [M, NC]`` (compact columns) and ``dalpha [M, 3]`` per token. Returns ``coef [BM]``, the factor of ``x`` in ``dx`` that comes
    from the RMS.
    """
    rm64 = rm.to(tl.int64)
    cp = tl.arange(0, NP)
    cr = tl.arange(0, NR)
    pvalid = cp < N
    a0 = tl.load(alpha_ptr)
    a1 = tl.load(alpha_ptr + 1)
    a2 = tl.load(alpha_ptr + 2)
    qrow = q_ptr + rm64[:, None] * QW
    q_pre = tl.load(qrow + cp[None, :], mask=mmask[:, None], other=0.0)
    q_post = tl.load(qrow + NP + cp[None, :], mask=mmask[:, None], other=0.0)
    q_res = tl.load(qrow + 2 * NP + cr[None, :], mask=mmask[:, None], other=0.0)
    smask = mmask[:, None] & pvalid[None, :]
    h_pre = tl.load(hpre_ptr + rm64[:, None] * N + cp[None, :], mask=smask, other=0.0)
    h_post = tl.load(hpost_ptr + rm64[:, None] * N + cp[None, :], mask=smask, other=0.0)
    d_hpost = tl.load(dhpost_ptr + rm64[:, None] * N + cp[None, :], mask=smask, other=0.0)
    ri = tl.arange(0, NPAD)
    rvalid = (ri[:, None] < N) & (ri[None, :] < N)
    res_off = rm64[:, None, None] * (N * N) + ri[None, :, None] * N + ri[None, None, :]
    d_hres = tl.load(dhres_ptr + res_off, mask=mmask[:, None, None] & rvalid[None, :, :], other=0.0)
    if HC:
        t_pre = _tanh(q_pre)
        t_post = _tanh(q_post)
        t_res = _tanh(q_res)
        dz_pre = tl.where(pvalid[None, :], d_hpre, 0.0)
        dz_post = d_hpost
        dz_res = tl.reshape(d_hres, (BM, NR))
        dq_pre = dz_pre * a0 * (1.0 - t_pre * t_pre)
        dq_post = dz_post * a1 * (1.0 - t_post * t_post)
        dq_res = dz_res * a2 * (1.0 - t_res * t_res)
        da0 = tl.sum(dz_pre * t_pre, axis=1)
        da1 = tl.sum(dz_post * t_post, axis=1)
        da2 = tl.sum(dz_res * t_res, axis=1)
    else:
        dz_pre = tl.where(pvalid[None, :], d_hpre * h_pre * (1.0 - h_pre), 0.0)
        s_post = 0.5 * h_post
        dz_post = d_hpost * 2.0 * s_post * (1.0 - s_post)
        _, _, b_res = _load_bias(bias_ptr, N, NPAD, NP, NR)
        p0 = _sinkhorn_logits(q_res, a2, b_res, N, NPAD, BM)
        valid3 = ((ri[:, None] < N) & (ri[None, :] < N))[None, :, :]
        # the forward again, keeping each step's row (even t) or column (odd t) sums
        slot = sums_ptr + rm64[:, None] * NPAD + ri[None, :]
        step = M * NPAD
        p = p0
        for t in range(0, 2 * iters):
            if t % 2 == 0:
                srow = tl.maximum(tl.sum(p, axis=2), 1e-30)
                p = p / srow[:, :, None]
                tl.store(slot + t * step, srow, mask=mmask[:, None])
            else:
                scol = tl.maximum(tl.sum(p, axis=1), 1e-30)
                p = p / scol[:, None, :]
                tl.store(slot + t * step, scol, mask=mmask[:, None])
        tl.debug_barrier()  # the sums are read back below, maybe by other threads
        # then backwards: p is step t's output; multiplying by its sums gives step t's input
        dp = d_hres
        for tt in range(0, 2 * iters):
            t = 2 * iters - 1 - tt
            sums = tl.load(slot + t * step, mask=mmask[:, None], other=1.0)
            if t % 2 == 0:
                dp = (dp - tl.sum(dp * p, axis=2)[:, :, None]) / sums[:, :, None]
                p = p * sums[:, :, None]
            else:
                dp = (dp - tl.sum(dp * p, axis=1)[:, None, :]) / sums[:, None, :]
                p = p * sums[:, None, :]
            dp = tl.where(valid3, dp, 0.0)  # padded rows/columns carry no gradient
        dz_res = tl.reshape(p0 * dp, (BM, NR))
        dq_pre = dz_pre * a0
        dq_post = dz_post * a1
        dq_res = dz_res * a2
        da0 = tl.sum(dz_pre * q_pre, axis=1)
        da1 = tl.sum(dz_post * q_post, axis=1)
        da2 = tl.sum(dz_res * q_res, axis=1)
    rstd = tl.load(rstd_ptr + rm, mask=mmask, other=1.0)
    # q = proj * rstd: dproj = dq * rstd; d rstd = sum(dq * q) / rstd
    d_rstd = (tl.sum(dq_pre * q_pre, axis=1) + tl.sum(dq_post * q_post, axis=1)
              + tl.sum(dq_res * q_res, axis=1)) / rstd
    dp_pre = dq_pre * rstd[:, None]
    dp_post = dq_post * rstd[:, None]
    dp_res = dq_res * rstd[:, None]
    _store_compact(dproj_ptr + rm64[:, None] * W, mmask, dp_pre, dp_post, dp_res, N, NPAD, NP, NR)
    _store_compact(dz_ptr + rm64[:, None] * NC, mmask, dz_pre, dz_post, dz_res, N, NPAD, NP, NR)
    tl.store(dalpha_ptr + rm64 * 3, da0, mask=mmask)
    tl.store(dalpha_ptr + rm64 * 3 + 1, da1, mask=mmask)
    tl.store(dalpha_ptr + rm64 * 3 + 2, da2, mask=mmask)
    coef = -d_rstd * rstd * rstd * rstd / K
    return coef


# ---------------------------------------------------------------------------------------
# Pre side, forward, in three launches that each stream their data once:
#   1. a split-K projection: programs (token block, channel range) write partial
#      ``vec(x) @ phi`` and ``sum(x^2)`` for their channels: ``[S, M, W]``, ``[S, M]``;
#   2. the coefficients: partials summed per token, RMS, activations, Sinkhorn on chip;
#   3. the aggregate ``u = H_pre @ x`` over (token, channel) tiles.
# The fused post+pre forward replaces launch 1 by :func:`_post_proj_kernel`, which builds
# ``X_{l+1}`` stream by stream as 2-D tiles and projects them while they are on chip.
# ---------------------------------------------------------------------------------------


@triton.jit
def _range_program(M, C, CS, BM: tl.constexpr):
    """Grid (token blocks, channel ranges of ``CS``): this program's token rows ``rm [BM]``,
    their mask and int64 form, and its channel range ``[c_lo, c_hi)``."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    c_lo = tl.program_id(1) * CS
    return rm, rm < M, rm.to(tl.int64), c_lo, tl.minimum(c_lo + CS, C)


@triton.jit
def _project(xt, phi_ptr, k, kmask, acc, sumsq, K, NC: tl.constexpr, W: tl.constexpr, DOT: tl.constexpr,
             PRESPLIT: tl.constexpr = False):
    """Add ``xt [BM, BC] @ phi[k, :]`` (rows ``k [BC]`` of ``phi [K, NC]``; one dot over all
    columns, zero past ``NC``) to ``acc [BM, W]`` and ``xt``'s row sums of squares to
    ``sumsq [BM]``. ``PRESPLIT`` (``DOT_SPLIT_B`` only): ``phi_ptr`` is :func:`_split_phi_kernel`'s
    ``[2, K, W]`` hi and lo parts in ``xt``'s dtype, whose rows load whole and contiguous;
    the same two dots and bits as the split on chip."""
    cw = tl.arange(0, W)
    if PRESPLIT:
        rows = k[:, None] * W + cw[None, :]
        hi = tl.load(phi_ptr + rows, mask=kmask[:, None], other=0.0)
        lo = tl.load(phi_ptr + K * W + rows, mask=kmask[:, None], other=0.0)
        dot = _hi_lo_dot(xt, hi, lo)
    else:
        ph = tl.load(phi_ptr + k[:, None] * NC + cw[None, :], mask=kmask[:, None] & (cw < NC)[None, :], other=0.0)
        dot = _split_dot(xt, ph, DOT)
    xf = xt.to(tl.float32)
    return acc + dot, sumsq + tl.sum(xf * xf, axis=1)


@triton.jit
def _split_phi_kernel(phi_ptr, out_ptr, K, NC: tl.constexpr, W: tl.constexpr, BK: tl.constexpr):
    """``phi [K, NC]`` (float32) -> ``[2, K, W]``: its hi and lo parts in ``out``'s dtype,
    as :func:`_split_dot`'s ``DOT_SPLIT_B`` rounds them on chip, zero past ``NC``."""
    rk = (tl.program_id(0) * BK + tl.arange(0, BK)).to(tl.int64)
    cw = tl.arange(0, W)
    kmask = rk < K
    b = tl.load(phi_ptr + rk[:, None] * NC + cw[None, :], mask=kmask[:, None] & (cw < NC)[None, :], other=0.0)
    b_hi = b.to(out_ptr.dtype.element_ty)
    rows = rk[:, None] * W + cw[None, :]
    tl.store(out_ptr + rows, b_hi, mask=kmask[:, None])
    tl.store(out_ptr + K * W + rows, _lo_part(b, b_hi), mask=kmask[:, None])


@triton.jit
def _store_projection(part_ptr, sq_ptr, split, acc, sumsq, rm64, mmask, M, W: tl.constexpr):
    """Partial projections ``[S, M, W]`` and ``sum(x^2) [S, M]`` of one channel range."""
    cw = tl.arange(0, W)
    tl.store(part_ptr + (split * M + rm64)[:, None] * W + cw[None, :], acc, mask=mmask[:, None])
    tl.store(sq_ptr + split * M + rm64, sumsq, mask=mmask)


@triton.jit
def _pre_proj_kernel(
    x_ptr, phi_ptr, part_ptr, sq_ptr, M, C, CS,
    N: tl.constexpr, NC: tl.constexpr, W: tl.constexpr, DOT: tl.constexpr,
    BM: tl.constexpr, BC: tl.constexpr,
):
    """Launch 1 of the pre forward: grid (token blocks, channel ranges of ``CS`` channels)."""
    rm, mmask, rm64, c_lo, c_hi = _range_program(M, C, CS, BM)
    split = tl.program_id(1)
    K = N * C
    acc = tl.zeros((BM, W), dtype=tl.float32)
    sumsq = tl.zeros((BM,), dtype=tl.float32)
    for j in tl.static_range(N):
        for c0 in range(c_lo, c_hi, BC):
            rc = c0 + tl.arange(0, BC)
            cmask = rc < c_hi
            xt = tl.load(x_ptr + rm64[:, None] * K + j * C + rc[None, :],
                         mask=mmask[:, None] & cmask[None, :], other=0.0)
            acc, sumsq = _project(xt, phi_ptr, (j * C + rc).to(tl.int64), cmask, acc, sumsq, K, NC, W, DOT)
    _store_projection(part_ptr, sq_ptr, split, acc, sumsq, rm64, mmask, M, W)


@triton.jit
def _post_proj_kernel(
    x_ptr, y_ptr, hpost0_ptr, hres0_ptr, phi_ptr, xn_ptr, part_ptr, sq_ptr, M, C, CS,
    N: tl.constexpr, NPAD: tl.constexpr, NC: tl.constexpr, W: tl.constexpr, DOT: tl.constexpr,
    BM: tl.constexpr, BC: tl.constexpr, PRESPLIT: tl.constexpr,
):
    """Post of connection l + launch 1 of connection l+1's pre, on 2-D output tiles
    (``PRESPLIT``: ``phi_ptr`` as in :func:`_project`).

    Per channel chunk, all input streams are loaded once as ``[BM, NPAD, BC]``; stream ``i``
    of ``X_{l+1} = H_res X_l + H_post^T y`` is reduced from it as a ``[BM, BC]`` tile, stored,
    and projected against ``phi``'s rows ``i*C + c`` while on chip.
    """
    rm, mmask, rm64, c_lo, c_hi = _range_program(M, C, CS, BM)
    split = tl.program_id(1)
    K = N * C
    acc = tl.zeros((BM, W), dtype=tl.float32)
    sumsq = tl.zeros((BM,), dtype=tl.float32)
    for c0 in range(c_lo, c_hi, BC):
        rc = c0 + tl.arange(0, BC)
        cmask = rc < c_hi
        mc = mmask[:, None] & cmask[None, :]
        x3, y = _load_mix_inputs(x_ptr, y_ptr, rm64, mmask, rc, cmask, C, N, NPAD)
        for i in tl.static_range(N):
            xo = _mixed_stream(x3, y, hpost0_ptr, hres0_ptr, rm64, mmask, i, N, NPAD).to(xn_ptr.dtype.element_ty)
            tl.store(xn_ptr + rm64[:, None] * K + i * C + rc[None, :], xo, mask=mc)
            acc, sumsq = _project(xo, phi_ptr, (i * C + rc).to(tl.int64), cmask, acc, sumsq, K, NC, W, DOT,
                                  PRESPLIT)
    _store_projection(part_ptr, sq_ptr, split, acc, sumsq, rm64, mmask, M, W)


@triton.jit
def _sum_splits(part_ptr, sq_ptr, rm64, mmask, M, SPLITS, N: tl.constexpr, NPAD: tl.constexpr,
                NP: tl.constexpr, NR: tl.constexpr, W: tl.constexpr, SB: tl.constexpr, BM: tl.constexpr):
    """The split-K partials ``[S, M, W]`` and ``[S, M]`` summed over ``S`` (``SB`` splits per
    load, added in a fixed order): padded blocks pre/post ``[BM, NP]``, res ``[BM, NR]``, and
    ``sum(x^2) [BM]``."""
    cp = tl.arange(0, NP)
    col, rvalid = _res_columns(N, NPAD, NR)
    acc_pre = tl.zeros((BM, NP), dtype=tl.float32)
    acc_post = tl.zeros((BM, NP), dtype=tl.float32)
    acc_res = tl.zeros((BM, NR), dtype=tl.float32)
    sumsq = tl.zeros((BM,), dtype=tl.float32)
    if SB == 1:  # one partial per load: many tokens, where each program has few partials
        for s in range(SPLITS):
            pre, post, res = _load_compact(part_ptr + (s * M + rm64)[:, None] * W, mmask, N, NPAD, NP, NR)
            acc_pre += pre
            acc_post += post
            acc_res += res
            sumsq += tl.load(sq_ptr + s * M + rm64, mask=mmask, other=0.0)
    else:  # SB partials per load: the decode launch, one program per token block
        sb = tl.arange(0, SB)
        for s0 in range(0, SPLITS, SB):
            split = s0 + sb
            rows = (split[None, :] * M + rm64[:, None])  # [BM, SB]
            live = mmask[:, None] & (split < SPLITS)[None, :]
            row = part_ptr + rows[:, :, None] * W
            pmask = live[:, :, None] & (cp < N)[None, None, :]
            acc_pre += tl.sum(tl.load(row + cp[None, None, :], mask=pmask, other=0.0), axis=1)
            acc_post += tl.sum(tl.load(row + N + cp[None, None, :], mask=pmask, other=0.0), axis=1)
            acc_res += tl.sum(tl.load(row + col[None, None, :], mask=live[:, :, None] & rvalid[None, None, :],
                                      other=0.0), axis=1)
            sumsq += tl.sum(tl.load(sq_ptr + rows, mask=live, other=0.0), axis=1)
    return acc_pre, acc_post, acc_res, sumsq


@triton.jit
def _pre_coef_kernel(
    part_ptr, sq_ptr, bias_ptr, alpha_ptr, hpre_ptr, hpost_ptr, hres_ptr, q_ptr, rstd_ptr,
    x_ptr, u_ptr, M, C, CS, K, eps, iters, SPLITS, nw_ptr, norm_eps,
    N: tl.constexpr, NPAD: tl.constexpr, NP: tl.constexpr, NR: tl.constexpr, W: tl.constexpr,
    QW: tl.constexpr, HC: tl.constexpr, AGGREGATE: tl.constexpr, SB: tl.constexpr, NORM: tl.constexpr,
    BM: tl.constexpr, BC: tl.constexpr, ONE_CHUNK: tl.constexpr = False,
):
    """Launch 2 of the pre forward: sum the partials, then :func:`_coefficients` per token.

    With ``AGGREGATE`` (few tokens: decode) it also computes ``u``: the grid is then (token
    blocks, channel ranges of ``CS``); every program of a token block computes the (cheap)
    coefficients, the first one stores them, and each computes ``u`` on its channel range
    in chunks of ``BC`` (what launch 3 does otherwise).

    ``NORM`` (with ``AGGREGATE`` and one channel range): ``u`` is then replaced by the
    RMSNorm that follows it, ``w * (u * rsqrt(mean(u^2) + norm_eps))`` with ``w [C]``
    (``nw_ptr``, dtype of ``u``): ``u`` rounded to its dtype, the statistics in float32, the
    normalised row rounded to ``u``'s dtype before the weight multiplies it, as Hugging
    Face's Llama-style ``RMSNorm`` computes it. ``ONE_CHUNK`` (``BC >= C``, one channel
    range): each program's rows are one chunk, normalised in registers (no store and
    read-back of ``u``, no serial walk over the channels). ``ONE_CHUNK`` without ``NORM``:
    each program's channel range (``CS <= BC``) is one chunk."""
    rm, mmask, rm64, c_lo, c_hi = _range_program(M, C, CS, BM)
    acc_pre, acc_post, acc_res, sumsq = _sum_splits(part_ptr, sq_ptr, rm64, mmask, M, SPLITS,
                                                    N, NPAD, NP, NR, W, SB, BM)
    h_pre = _coefficients(
        acc_pre, acc_post, acc_res, sumsq, rm, mmask & (rm * 0 + tl.program_id(1) == 0), bias_ptr, alpha_ptr,
        hpre_ptr, hpost_ptr, hres_ptr, q_ptr, rstd_ptr, K, eps, iters, N, NPAD, NP, NR, QW, HC, BM,
    )
    if AGGREGATE:
        dtype = u_ptr.dtype.element_ty
        if ONE_CHUNK:  # the whole row on chip: u, its statistics and the norm without a store between
            rc = c_lo + tl.arange(0, BC)
            mc = mmask[:, None] & (rc < c_hi)[None, :]
            ut = _aggregate_chunk(x_ptr, h_pre, rm64, rc, mc, K, C, N, NP, BM, BC).to(dtype)
            if NORM:
                uf = ut.to(tl.float32)
                ut = _normed(uf, _inv_rms(tl.sum(uf * uf, axis=1), C, norm_eps), nw_ptr, rc, C, dtype)
            tl.store(u_ptr + rm64[:, None] * C + rc[None, :], ut, mask=mc)
        else:
            ssq = tl.zeros((BM,), dtype=tl.float32)  # sum(u^2) of the rounded u, for NORM
            for c0 in range(c_lo, c_hi, BC):
                rc = c0 + tl.arange(0, BC)
                mc = mmask[:, None] & (rc < c_hi)[None, :]
                ut = _aggregate_chunk(x_ptr, h_pre, rm64, rc, mc, K, C, N, NP, BM, BC).to(dtype)
                tl.store(u_ptr + rm64[:, None] * C + rc[None, :], ut, mask=mc)
                if NORM:
                    uf = ut.to(tl.float32)
                    ssq += tl.sum(uf * uf, axis=1)  # masked lanes hold 0
            if NORM:
                tl.debug_barrier()  # u's rows, stored above by this program's threads, read back by others
                _norm_rows(u_ptr, nw_ptr, norm_eps, ssq, rm64, mmask, C, BM, BC)


@triton.jit
def _aggregate_chunk(x_ptr, h_pre, rm64, rc, mc, K, C, N: tl.constexpr, NP: tl.constexpr,
                     BM: tl.constexpr, BC: tl.constexpr):
    """``sum_j H_pre[:, j] x[:, j, rc]`` (float32 ``[BM, BC]``) from ``h_pre [BM, NP]``."""
    cp = tl.arange(0, NP)
    acc = tl.zeros((BM, BC), dtype=tl.float32)
    for j in tl.static_range(N):
        h = tl.sum(tl.where(cp[None, :] == j, h_pre, 0.0), axis=1)
        xt = tl.load(x_ptr + rm64[:, None] * K + j * C + rc[None, :], mask=mc, other=0.0)
        acc += h[:, None] * xt.to(tl.float32)
    return acc


@triton.jit
def _inv_rms(ssq, C, norm_eps):
    """``1 / sqrt(mean(u^2) + eps)`` from the row sums of squares ``ssq [BM]``."""
    return 1.0 / tl.sqrt_rn((ssq / C + norm_eps).to(tl.float32))  # Inductor passes a float as fp64


@triton.jit
def _normed(uf, inv, nw_ptr, rc, C, dtype: tl.constexpr):
    """The RMSNorm of float32 rows ``uf [BM, BC]`` (channels ``rc``) given ``inv [BM]``:
    ``w * round(u * inv)``, rounded to ``dtype`` (see :func:`_pre_coef_kernel`)."""
    w = tl.load(nw_ptr + rc, mask=rc < C, other=0.0).to(tl.float32)
    normed = (uf * inv[:, None]).to(dtype).to(tl.float32)
    return (w[None, :] * normed).to(dtype)


@triton.jit
def _norm_rows(u_ptr, nw_ptr, norm_eps, ssq, rm64, mmask, C, BM: tl.constexpr, BC: tl.constexpr):
    """``u [BM, C]`` rows (written by this program, their sums of squares ``ssq [BM]``)
    replaced by their RMSNorm (see :func:`_pre_coef_kernel`), chunk by chunk."""
    inv = _inv_rms(ssq, C, norm_eps)
    for c0 in range(0, C, BC):
        rc = c0 + tl.arange(0, BC)
        mc = mmask[:, None] & (rc < C)[None, :]
        ptrs = u_ptr + rm64[:, None] * C + rc[None, :]
        ut = tl.load(ptrs, mask=mc, other=0.0).to(tl.float32)
        tl.store(ptrs, _normed(ut, inv, nw_ptr, rc, C, u_ptr.dtype.element_ty), mask=mc)


@triton.jit
def _aggregate_kernel(x_ptr, hpre_ptr, u_ptr, M, C, N: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
    """Launch 3 of the pre forward: ``u [M, C] = sum_j H_pre[:, j] x[:, j, :]``."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rc = tl.program_id(1) * BC + tl.arange(0, BC)
    mmask = rm < M
    rm64 = rm.to(tl.int64)
    mc = mmask[:, None] & (rc < C)[None, :]
    acc = tl.zeros((BM, BC), dtype=tl.float32)
    for j in tl.static_range(N):
        h = tl.load(hpre_ptr + rm64 * N + j, mask=mmask, other=0.0)
        xt = tl.load(x_ptr + rm64[:, None] * (N * C) + j * C + rc[None, :], mask=mc, other=0.0)
        acc += h[:, None] * xt.to(tl.float32)
    tl.store(u_ptr + rm64[:, None] * C + rc[None, :], acc.to(u_ptr.dtype.element_ty), mask=mc)


# ---------------------------------------------------------------------------------------
# Pre side, backward: (1) split-K partials of dH_pre = sum_c du x_j; (2) the coefficient
# backward per token (Sinkhorn recomputed on chip); (3) dx over (token, channel) tiles.
# The fused post+pre backward runs (3) with the gradient from X_{l+1}'s other users added,
# which gives X_{l+1}'s whole gradient, and then the post backward on it.
# ---------------------------------------------------------------------------------------


@triton.jit
def _dh_pre_kernel(x_ptr, du_ptr, part_ptr, xs_ptr, ys_ptr, hps_ptr, hrs_ptr, M, C, CS,
                   N: tl.constexpr, NP: tl.constexpr, NPAD: tl.constexpr, SOURCE: tl.constexpr,
                   STORE: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
    """Partial ``dH_pre [S, M, NP]`` of one channel range: ``sum_c du[:, c] x[:, j, c]``.

    ``SOURCE``: the streams ``x`` are the output of a post that was not kept: they are
    recomputed as :func:`_mixed_stream` of ``xs, ys, hps, hrs`` (that post's inputs) and,
    with ``STORE``, stored to ``x_ptr`` for the launches that follow (without, ``x_ptr``
    only gives their dtype)."""
    rm, mmask, rm64, c_lo, c_hi = _range_program(M, C, CS, BM)
    split = tl.program_id(1)
    cp = tl.arange(0, NP)
    d_hpre = tl.zeros((BM, NP), dtype=tl.float32)
    for c0 in range(c_lo, c_hi, BC):
        rc = c0 + tl.arange(0, BC)
        cmask = rc < c_hi
        mc = mmask[:, None] & cmask[None, :]
        du = tl.load(du_ptr + rm64[:, None] * C + rc[None, :], mask=mc, other=0.0).to(tl.float32)
        if SOURCE:
            x3, ys = _load_mix_inputs(xs_ptr, ys_ptr, rm64, mmask, rc, cmask, C, N, NPAD)
        for j in tl.static_range(N):
            if SOURCE:
                xj = _mixed_stream(x3, ys, hps_ptr, hrs_ptr, rm64, mmask, j, N, NPAD).to(x_ptr.dtype.element_ty)
                if STORE:
                    tl.store(x_ptr + rm64[:, None] * (N * C) + j * C + rc[None, :], xj, mask=mc)
            else:
                xj = tl.load(x_ptr + rm64[:, None] * (N * C) + j * C + rc[None, :], mask=mc, other=0.0)
            d_hpre += tl.where(cp[None, :] == j, tl.sum(du * xj.to(tl.float32), axis=1)[:, None], 0.0)
    tl.store(part_ptr + (split * M + rm64)[:, None] * NP + cp[None, :], d_hpre, mask=mmask[:, None])


@triton.jit
def _pre_coef_bwd_kernel(
    part_ptr, bias_ptr, alpha_ptr, hpre_ptr, hpost_ptr, q_ptr, rstd_ptr, dhpost_ptr, dhres_ptr,
    dproj_ptr, dz_ptr, dalpha_ptr, coef_ptr, sums_ptr, M, K, iters, SPLITS,
    N: tl.constexpr, NPAD: tl.constexpr, NP: tl.constexpr, NR: tl.constexpr, NC: tl.constexpr,
    W: tl.constexpr, QW: tl.constexpr, HC: tl.constexpr, BM: tl.constexpr,
):
    """Launch 2 of the pre backward: ``dproj``, ``dz``, ``dalpha`` and the RMS factor ``coef [M]``."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    mmask = rm < M
    rm64 = rm.to(tl.int64)
    cp = tl.arange(0, NP)
    d_hpre = tl.zeros((BM, NP), dtype=tl.float32)
    for s in range(SPLITS):
        d_hpre += tl.load(part_ptr + (s * M + rm64)[:, None] * NP + cp[None, :], mask=mmask[:, None], other=0.0)
    coef = _coefficient_grads(
        d_hpre, rm, mmask, bias_ptr, alpha_ptr, hpre_ptr, hpost_ptr, q_ptr, rstd_ptr,
        dhpost_ptr, dhres_ptr, dproj_ptr, dz_ptr, dalpha_ptr, sums_ptr, M, K, iters,
        N, NPAD, NP, NR, NC, W, QW, HC, BM,
    )
    tl.store(coef_ptr + rm64, coef, mask=mmask)


@triton.jit
def _stream_grad(xj, du, hj, coef, dproj, phi_ptr, k, kmask, K, NC: tl.constexpr, W: tl.constexpr,
                 BDOT: tl.constexpr, PHI_T: tl.constexpr):
    """The pre side's gradient of stream ``j`` on a ``[BM, BC]`` tile:
    ``H_pre[:, j] du + dproj @ phi[k, :]^T + coef x_j``; ``dproj [BM, W]`` is zero past
    ``NC``. ``phi`` is either ``phi [K, NC]`` itself (float32, loaded as its rows ``[BC, W]``,
    zero past ``NC``, then transposed on chip) or, with ``PHI_T``, its padded transpose
    ``[W, K]`` in bf16 (rows past ``NC`` zero), whose ``[W, BC]`` tiles load contiguous and
    at half the bytes: what a ``DOT_BF16`` dot rounds ``phi`` to anyway."""
    cw = tl.arange(0, W)
    if PHI_T:
        pt = tl.load(phi_ptr + cw[:, None] * K + k[None, :], mask=kmask[None, :], other=0.0)
    else:
        ph = tl.load(phi_ptr + k[:, None] * NC + cw[None, :], mask=kmask[:, None] & (cw < NC)[None, :], other=0.0)
        pt = tl.trans(ph)  # [W, BC]
    return hj[:, None] * du + _split_dot(dproj, pt, BDOT) + coef[:, None] * xj


@triton.jit
def _pre_dx_kernel(
    x_ptr, du_ptr, phi_ptr, hpre_ptr, dproj_ptr, coef_ptr, gin_ptr, dx_ptr, M, C, CS,
    N: tl.constexpr, NC: tl.constexpr, W: tl.constexpr, BDOT: tl.constexpr, ACCUM: tl.constexpr,
    PHI_T: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr,
):
    """Launch 3 of the pre backward: ``dx = H_pre^T du + dproj @ phi^T + coef * x``, plus
    ``gin [M, n, C]`` (the gradient from the streams' other users) where ``ACCUM``;
    ``phi_ptr``: ``phi`` or, with ``PHI_T``, its bf16 transpose (see :func:`_stream_grad`).

    Grid (token blocks, channel ranges of ``CS``): a program loads its tokens' ``dproj``
    once and walks its channel range in chunks of ``BC``.
    """
    rm, mmask, rm64, c_lo, c_hi = _range_program(M, C, CS, BM)
    K = N * C
    cw = tl.arange(0, W)
    dproj = tl.load(dproj_ptr + rm64[:, None] * W + cw[None, :], mask=mmask[:, None], other=0.0)
    coef = tl.load(coef_ptr + rm64, mask=mmask, other=0.0)
    for c0 in range(c_lo, c_hi, BC):
        rc = c0 + tl.arange(0, BC)
        cmask = rc < c_hi
        mc = mmask[:, None] & cmask[None, :]
        du = tl.load(du_ptr + rm64[:, None] * C + rc[None, :], mask=mc, other=0.0).to(tl.float32)
        for j in tl.static_range(N):
            off = rm64[:, None] * K + j * C + rc[None, :]
            hj = tl.load(hpre_ptr + rm64 * N + j, mask=mmask, other=0.0)
            xj = tl.load(x_ptr + off, mask=mc, other=0.0).to(tl.float32)
            dxj = _stream_grad(xj, du, hj, coef, dproj, phi_ptr, (j * C + rc).to(tl.int64), cmask, K, NC, W,
                               BDOT, PHI_T)
            if ACCUM:
                dxj += tl.load(gin_ptr + off, mask=mc, other=0.0).to(tl.float32)
            tl.store(dx_ptr + off, dxj.to(dx_ptr.dtype.element_ty), mask=mc)


# ---------------------------------------------------------------------------------------
# The fused post+pre backward in one streaming pass (after launches 1 and 2 of the pre
# side): X_{l+1} recomputed on chip from the post's inputs, its whole gradient formed
# there and sent through the post's backward, and (DPHI) dphi = X_{l+1}^T dproj accumulated
# per channel chunk over the program's tokens. Nothing of [M, n, C] is written but dx. Off by
# default (library.POST_PRE_ONE_PASS): measured slower than the three passes.
# ---------------------------------------------------------------------------------------


@triton.jit
def _post_pre_dx_kernel(
    x_ptr, y_ptr, hpost0_ptr, hres0_ptr, gin_ptr, du_ptr, phi_ptr, hpre_ptr, dproj_ptr, coef_ptr,
    dx_ptr, dy_ptr, dhpost_ptr, dhres_ptr, dphi_ptr, M, C, TG,
    N: tl.constexpr, NPAD: tl.constexpr, NC: tl.constexpr, W: tl.constexpr, DOT: tl.constexpr,
    BDOT: tl.constexpr, PHI_T: tl.constexpr, DPHI: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr,
):
    """Grid (channel chunks of ``BC``, token groups of ``TG`` tokens, a multiple of ``BM``).

    Inputs: the post's ``x [M, n, C]`` (X_l), ``y [M, C]``, ``H_post0 [M, n]``, ``H_res0 [M, n,
    n]``; ``gin [M, n, C]``, the gradient reaching X_{l+1} from its other users; the pre
    side's ``du [M, C]``, ``phi`` (as in :func:`_stream_grad`), ``H_pre [M, n]``, ``dproj [M,
    W]`` (zero past ``NC``) and ``coef [M]``. Per ``[BM, BC]`` block, stream ``i`` of X_{l+1}
    is :func:`_mixed_stream` rounded to the streams' dtype (the bits the forward stored), its
    gradient ``g_i`` is :func:`_stream_grad` plus ``gin``, and the post backward takes it:
    ``dx_j += H_res0[i, j] g_i``, ``dy += H_post0_i g_i``. Outputs: ``dx``, ``dy``; the
    chunk's channel sums ``dH_post [CH, M, n]``, ``dH_res [CH, M, n, n]`` and the group's
    ``dphi [G, n*C, W]`` (float32 partials the caller adds in a fixed order: bitwise
    reproducible run to run); without ``DPHI`` no ``dphi`` (the caller forms it from X_l
    and y: :func:`~mhc_compile.ops.library._dphi_from_mix`), which frees the ``[n, BC, W]``
    accumulator's registers."""
    pid_c = tl.program_id(0)
    group = tl.program_id(1)
    K = N * C
    rc = pid_c * BC + tl.arange(0, BC)
    cmask = rc < C
    ri = tl.arange(0, NPAD)
    ivalid = ri < N
    cw = tl.arange(0, W)
    if DPHI:
        dphi = tl.zeros((NPAD, BC, W), dtype=tl.float32)
    m_lo = group * TG
    for m0 in range(m_lo, tl.minimum(m_lo + TG, M), BM):
        rm = m0 + tl.arange(0, BM)
        mmask = rm < M
        rm64 = rm.to(tl.int64)
        mc = mmask[:, None] & cmask[None, :]
        mi = mmask[:, None] & ivalid[None, :]
        x3, y = _load_mix_inputs(x_ptr, y_ptr, rm64, mmask, rc, cmask, C, N, NPAD)
        du = tl.load(du_ptr + rm64[:, None] * C + rc[None, :], mask=mc, other=0.0).to(tl.float32)
        dproj = tl.load(dproj_ptr + rm64[:, None] * W + cw[None, :], mask=mmask[:, None], other=0.0)
        coef = tl.load(coef_ptr + rm64, mask=mmask, other=0.0)
        dy = tl.zeros((BM, BC), dtype=tl.float32)
        dx3 = tl.zeros((BM, NPAD, BC), dtype=tl.float32)
        d_hpost = tl.zeros((BM, NPAD), dtype=tl.float32)
        d_hres = tl.zeros((BM, NPAD, NPAD), dtype=tl.float32)
        for i in tl.static_range(N):
            xn = _mixed_stream(x3, y, hpost0_ptr, hres0_ptr, rm64, mmask, i, N, NPAD).to(x_ptr.dtype.element_ty)
            k = (i * C + rc).to(tl.int64)
            off = rm64[:, None] * K + i * C + rc[None, :]
            hi = tl.load(hpre_ptr + rm64 * N + i, mask=mmask, other=0.0)
            gi = _stream_grad(xn.to(tl.float32), du, hi, coef, dproj, phi_ptr, k, cmask, K, NC, W, BDOT, PHI_T)
            gi += tl.load(gin_ptr + off, mask=mc, other=0.0).to(tl.float32)
            if DPHI:
                dphi += tl.where(ri[:, None, None] == i, _split_dot(tl.trans(xn), dproj, DOT)[None, :, :], 0.0)
            h_post = tl.load(hpost0_ptr + rm64 * N + i, mask=mmask, other=0.0)
            h_row = tl.load(hres0_ptr + rm64[:, None] * (N * N) + i * N + ri[None, :], mask=mi, other=0.0)
            dy += h_post[:, None] * gi
            dx3 += h_row[:, :, None] * gi[:, None, :]
            d_hpost += tl.where(ri[None, :] == i, tl.sum(gi * y, axis=1)[:, None], 0.0)
            d_hres += tl.where(ri[None, :, None] == i, tl.sum(gi[:, None, :] * x3, axis=2)[:, None, :], 0.0)
        off3, smask3 = _stream_offsets(rm64, ri, rc, C, N)
        tl.store(dx_ptr + off3, dx3.to(dx_ptr.dtype.element_ty), mask=mmask[:, None, None] & smask3)
        tl.store(dy_ptr + rm64[:, None] * C + rc[None, :], dy.to(dy_ptr.dtype.element_ty), mask=mc)
        base = pid_c.to(tl.int64) * M
        tl.store(dhpost_ptr + (base + rm64)[:, None] * N + ri[None, :], d_hpost, mask=mi)
        res_off = (base + rm64)[:, None, None] * (N * N) + ri[None, :, None] * N + ri[None, None, :]
        tl.store(dhres_ptr + res_off, d_hres, mask=mi[:, :, None] & ivalid[None, None, :])
    if DPHI:
        rows = group.to(tl.int64) * K + ri[:, None, None] * C + rc[None, :, None]
        tl.store(dphi_ptr + rows * W + cw[None, None, :], dphi, mask=ivalid[:, None, None] & cmask[None, :, None])
