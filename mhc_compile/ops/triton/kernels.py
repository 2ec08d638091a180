"""Fused Triton kernels for one mHC connection. They know nothing of graphs.

Layout: streams ``x [M, N, C]`` (C contiguous), branch ``y``/``u`` ``[M, C]``.
The projection ``phi [N*C, N^2 + 2N]`` arrives padded as ``[N*C, W]`` with
``W = 2*NP + NR``: pre columns at ``[0, N)``, post at ``[NP, NP+N)``, res at
``2*NP + i*NPAD + j``; ``NPAD = max(4, next_pow2(N))``, ``NP = max(16, NPAD)``,
``NR = NPAD^2`` (so ``tl.dot`` gets N >= 16 and the res block reshapes to a square).
``phi`` is float32; the kernels split it (and float32 streams) into bf16 hi + lo parts
on chip, so tensor-core dots give float32-accurate projections (see ``_split_dot``).
All coefficient math is float32.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    return 2.0 * _sigmoid(2.0 * x) - 1.0


@triton.jit
def _split_dot(a, b, DOT: tl.constexpr):
    """``a @ b`` for a float32 ``b``, with float32 accuracy.

    DOT 0: float32 IEEE dot; 1: ``a`` is 16-bit: ``b`` split on chip into hi + lo of that
    dtype, two tensor-core dots; 2: ``a`` and ``b`` both split into bf16 hi + lo, three
    tensor-core dots; 3: one bf16 dot (for results stored in 16 bits). The split happens here, in Triton, because a host-side
    ``phi - phi.to(bf16).float()`` may be folded to zero by Inductor.
    """
    if DOT == 0:
        return tl.dot(a.to(tl.float32), b, input_precision="ieee", out_dtype=tl.float32)
    if DOT == 3:  # one bf16 dot: enough where the result is rounded to 16 bits anyway
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), out_dtype=tl.float32)
    if DOT == 1:
        b_hi = b.to(a.dtype)
        b_lo = (b - b_hi.to(tl.float32)).to(a.dtype)
        return tl.dot(a, b_hi, out_dtype=tl.float32) + tl.dot(a, b_lo, out_dtype=tl.float32)
    a32 = a.to(tl.float32)
    a_hi = a32.to(tl.bfloat16)
    a_lo = (a32 - a_hi.to(tl.float32)).to(tl.bfloat16)
    b_hi = b.to(tl.bfloat16)
    b_lo = (b - b_hi.to(tl.float32)).to(tl.bfloat16)
    return (tl.dot(a_hi, b_hi, out_dtype=tl.float32) + tl.dot(a_hi, b_lo, out_dtype=tl.float32)
            + tl.dot(a_lo, b_hi, out_dtype=tl.float32))


@triton.jit
def _col(t, cols, j):
    """Column ``j`` of a 2-D tile as a vector."""
    return tl.sum(tl.where(cols[None, :] == j, t, 0.0), axis=1)


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
def _coefficients(
    acc_pre, acc_post, acc_res, sumsq, rm, mmask, bias_ptr, alpha_ptr,
    hpre_ptr, hpost_ptr, hres_ptr, q_ptr, rstd_ptr, K, eps, iters,
    N: tl.constexpr, NPAD: tl.constexpr, NP: tl.constexpr, NR: tl.constexpr,
    HC: tl.constexpr, BM: tl.constexpr,
):
    """Projections ``[BM, W]`` and ``sum(x^2) [BM]`` -> stored ``H_pre, H_post, H_res, q, rstd``.

    Returns ``H_pre [BM, NP]`` (zero in the padding) for the aggregate pass.
    """
    rm64 = rm.to(tl.int64)
    W: tl.constexpr = 2 * NP + NR
    cp = tl.arange(0, NP)
    cr = tl.arange(0, NR)
    rstd = 1.0 / tl.sqrt(sumsq / K + eps)
    q_pre = acc_pre * rstd[:, None]
    q_post = acc_post * rstd[:, None]
    q_res = acc_res * rstd[:, None]
    a0 = tl.load(alpha_ptr)
    a1 = tl.load(alpha_ptr + 1)
    a2 = tl.load(alpha_ptr + 2)
    b_pre = tl.load(bias_ptr + cp)
    b_post = tl.load(bias_ptr + NP + cp)
    b_res = tl.load(bias_ptr + 2 * NP + cr)
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
    qrow = q_ptr + rm64[:, None] * W
    tl.store(qrow + cp[None, :], q_pre, mask=mmask[:, None])
    tl.store(qrow + NP + cp[None, :], q_post, mask=mmask[:, None])
    tl.store(qrow + 2 * NP + cr[None, :], q_res, mask=mmask[:, None])
    tl.store(rstd_ptr + rm, rstd, mask=mmask)
    return h_pre


@triton.jit
def _aggregate(x_ptr, u_ptr, h_pre, rm64, mmask, C, N: tl.constexpr, NP: tl.constexpr,
               BM: tl.constexpr, BC: tl.constexpr):
    """``u [BM, C] = sum_j H_pre[:, j] x[:, j, :]``: a second pass over the block's streams."""
    K = N * C
    cp = tl.arange(0, NP)
    for c0 in range(0, C, BC):
        rc = c0 + tl.arange(0, BC)
        cmask = rc < C
        acc = tl.zeros((BM, BC), dtype=tl.float32)
        for j in tl.static_range(N):
            xt = tl.load(x_ptr + rm64[:, None] * K + j * C + rc[None, :],
                         mask=mmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            acc += _col(h_pre, cp, j)[:, None] * xt
        tl.store(u_ptr + rm64[:, None] * C + rc[None, :], acc.to(u_ptr.dtype.element_ty),
                 mask=mmask[:, None] & cmask[None, :])


@triton.jit
def _pre_fwd_kernel(
    x_ptr, phi_ptr, bias_ptr, alpha_ptr,
    u_ptr, hpre_ptr, hpost_ptr, hres_ptr, q_ptr, rstd_ptr,
    M, C, eps, iters,
    N: tl.constexpr, NPAD: tl.constexpr, NP: tl.constexpr, NR: tl.constexpr,
    HC: tl.constexpr, DOT: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr,
):
    pid = tl.program_id(0)
    rm = pid * BM + tl.arange(0, BM)
    mmask = rm < M
    rm64 = rm.to(tl.int64)
    W: tl.constexpr = 2 * NP + NR
    K = N * C
    cp = tl.arange(0, NP)
    cr = tl.arange(0, NR)
    acc_pre = tl.zeros((BM, NP), dtype=tl.float32)
    acc_post = tl.zeros((BM, NP), dtype=tl.float32)
    acc_res = tl.zeros((BM, NR), dtype=tl.float32)
    sumsq = tl.zeros((BM,), dtype=tl.float32)
    for j in tl.static_range(N):
        for c0 in range(0, C, BC):
            rc = c0 + tl.arange(0, BC)
            cmask = rc < C
            xt = tl.load(x_ptr + rm64[:, None] * K + j * C + rc[None, :],
                         mask=mmask[:, None] & cmask[None, :], other=0.0)
            xf = xt.to(tl.float32)
            sumsq += tl.sum(xf * xf, axis=1)
            k = (j * C + rc).to(tl.int64)
            base = phi_ptr + k[:, None] * W
            ph_pre = tl.load(base + cp[None, :], mask=cmask[:, None], other=0.0)
            ph_post = tl.load(base + NP + cp[None, :], mask=cmask[:, None], other=0.0)
            ph_res = tl.load(base + 2 * NP + cr[None, :], mask=cmask[:, None], other=0.0)
            acc_pre += _split_dot(xt, ph_pre, DOT)
            acc_post += _split_dot(xt, ph_post, DOT)
            acc_res += _split_dot(xt, ph_res, DOT)
    h_pre = _coefficients(
        acc_pre, acc_post, acc_res, sumsq, rm, mmask, bias_ptr, alpha_ptr,
        hpre_ptr, hpost_ptr, hres_ptr, q_ptr, rstd_ptr, K, eps, iters, N, NPAD, NP, NR, HC, BM,
    )
    _aggregate(x_ptr, u_ptr, h_pre, rm64, mmask, C, N, NP, BM, BC)


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
def _post_bwd_kernel(
    x_ptr, y_ptr, hpost_ptr, hres_ptr, g_ptr, dx_ptr, dy_ptr, dhpost_ptr, dhres_ptr, M, C,
    N: tl.constexpr, NPAD: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr,
):
    """Tiles over (tokens, channels) like the forward; the reductions over C of
    ``dH_post`` and ``dH_res`` are accumulated with atomics into zeroed float32 buffers."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rm64 = rm.to(tl.int64)
    mmask = rm < M
    rc = pid_c * BC + tl.arange(0, BC)
    cmask = rc < C
    ri = tl.arange(0, NPAD)
    ivalid = ri < N
    K = N * C
    mc = mmask[:, None] & cmask[None, :]
    mi = mmask[:, None] & ivalid[None, :]
    g_off, g_mask = _stream_offsets(rm64, ri, rc, C, N)
    g = tl.load(g_ptr + g_off, mask=mmask[:, None, None] & g_mask, other=0.0).to(tl.float32)  # [BM, NPAD(i), BC]
    y = tl.load(y_ptr + rm64[:, None] * C + rc[None, :], mask=mc, other=0.0).to(tl.float32)
    h_post = tl.load(hpost_ptr + rm64[:, None] * N + ri[None, :], mask=mi, other=0.0)
    dy = tl.sum(h_post[:, :, None] * g, axis=1)
    tl.store(dy_ptr + rm64[:, None] * C + rc[None, :], dy.to(dy_ptr.dtype.element_ty), mask=mc)
    tl.atomic_add(dhpost_ptr + rm64[:, None] * N + ri[None, :], tl.sum(g * y[:, None, :], axis=2), mask=mi)
    for j in tl.static_range(N):
        xj = tl.load(x_ptr + rm64[:, None] * K + j * C + rc[None, :], mask=mc, other=0.0).to(tl.float32)
        h_col = tl.load(hres_ptr + rm64[:, None] * (N * N) + ri[None, :] * N + j, mask=mi, other=0.0)  # H[:, :, j]
        dxj = tl.sum(h_col[:, :, None] * g, axis=1)
        tl.store(dx_ptr + rm64[:, None] * K + j * C + rc[None, :], dxj.to(dx_ptr.dtype.element_ty), mask=mc)
        gx = tl.sum(g * xj[:, None, :], axis=2)  # [BM, NPAD(i)]: dH[:, i, j]
        tl.atomic_add(dhres_ptr + rm64[:, None] * (N * N) + ri[None, :] * N + j, gx, mask=mi)


@triton.jit
def _coefficient_grads(
    d_hpre, rm, mmask, bias_ptr, alpha_ptr, hpre_ptr, hpost_ptr, q_ptr, rstd_ptr,
    dhpost_ptr, dhres_ptr, dproj_ptr, dz_ptr, dalpha_ptr, K, iters,
    N: tl.constexpr, NPAD: tl.constexpr, NP: tl.constexpr, NR: tl.constexpr,
    HC: tl.constexpr, BM: tl.constexpr,
):
    """Backward of :func:`_coefficients` on chip (Sinkhorn recomputed, not stored).

    Takes ``dH_pre [BM, NP]`` and loads ``dH_post``, ``dH_res``; stores ``dproj``, ``dz``,
    ``dalpha`` per token. Returns ``H_pre [BM, NP]``, ``dproj`` as its three column blocks
    and ``coef [BM]``, the factor of ``x`` in ``dx`` that comes from the RMS.
    """
    rm64 = rm.to(tl.int64)
    W: tl.constexpr = 2 * NP + NR
    cp = tl.arange(0, NP)
    cr = tl.arange(0, NR)
    pvalid = cp < N
    a0 = tl.load(alpha_ptr)
    a1 = tl.load(alpha_ptr + 1)
    a2 = tl.load(alpha_ptr + 2)
    qrow = q_ptr + rm64[:, None] * W
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
        b_res = tl.load(bias_ptr + 2 * NP + cr)
        p0 = _sinkhorn_logits(q_res, a2, b_res, N, NPAD, BM)
        ri3 = tl.arange(0, NPAD)
        valid3 = ((ri3[:, None] < N) & (ri3[None, :] < N))[None, :, :]
        dp = d_hres
        for tt in range(0, 2 * iters):
            t = 2 * iters - 1 - tt
            p = p0
            for s in range(0, t):
                if s % 2 == 0:
                    p = _sinkhorn_step(p, 2)
                else:
                    p = _sinkhorn_step(p, 1)
            if t % 2 == 0:
                srow = tl.maximum(tl.sum(p, axis=2), 1e-30)
                qn = p / srow[:, :, None]
                dp = (dp - tl.sum(dp * qn, axis=2)[:, :, None]) / srow[:, :, None]
            else:
                scol = tl.maximum(tl.sum(p, axis=1), 1e-30)
                qn = p / scol[:, None, :]
                dp = (dp - tl.sum(dp * qn, axis=1)[:, None, :]) / scol[:, None, :]
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
    drow = dproj_ptr + rm64[:, None] * W
    tl.store(drow + cp[None, :], dp_pre, mask=mmask[:, None])
    tl.store(drow + NP + cp[None, :], dp_post, mask=mmask[:, None])
    tl.store(drow + 2 * NP + cr[None, :], dp_res, mask=mmask[:, None])
    zrow = dz_ptr + rm64[:, None] * W
    tl.store(zrow + cp[None, :], dz_pre, mask=mmask[:, None])
    tl.store(zrow + NP + cp[None, :], dz_post, mask=mmask[:, None])
    tl.store(zrow + 2 * NP + cr[None, :], dz_res, mask=mmask[:, None])
    tl.store(dalpha_ptr + rm64 * 3, da0, mask=mmask)
    tl.store(dalpha_ptr + rm64 * 3 + 1, da1, mask=mmask)
    tl.store(dalpha_ptr + rm64 * 3 + 2, da2, mask=mmask)
    coef = -d_rstd * rstd * rstd * rstd / K
    return h_pre, dp_pre, dp_post, dp_res, coef


@triton.jit
def _reduce_dh_pre(x_ptr, du_ptr, rm64, mmask, C, N: tl.constexpr, NP: tl.constexpr,
                   BM: tl.constexpr, BC: tl.constexpr):
    """First backward pass of a pre side: ``dH_pre[:, j] = sum_c du[:, c] x[:, j, c]``, ``[BM, NP]``."""
    cp = tl.arange(0, NP)
    d_hpre = tl.zeros((BM, NP), dtype=tl.float32)
    for c0 in range(0, C, BC):
        rc = c0 + tl.arange(0, BC)
        mc = mmask[:, None] & (rc < C)[None, :]
        du = tl.load(du_ptr + rm64[:, None] * C + rc[None, :], mask=mc, other=0.0).to(tl.float32)
        for j in tl.static_range(N):
            xj = tl.load(x_ptr + rm64[:, None] * (N * C) + j * C + rc[None, :], mask=mc, other=0.0).to(tl.float32)
            d_hpre += tl.where(cp[None, :] == j, tl.sum(du * xj, axis=1)[:, None], 0.0)
    return d_hpre


@triton.jit
def _pre_bwd_kernel(
    x_ptr, phi_ptr, bias_ptr, alpha_ptr, hpre_ptr, hpost_ptr, q_ptr, rstd_ptr,
    du_ptr, dhpost_ptr, dhres_ptr,
    dx_ptr, dproj_ptr, dz_ptr, dalpha_ptr,
    M, C, iters,
    N: tl.constexpr, NPAD: tl.constexpr, NP: tl.constexpr, NR: tl.constexpr,
    HC: tl.constexpr, DOT: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr,
):
    pid = tl.program_id(0)
    rm = pid * BM + tl.arange(0, BM)
    rm64 = rm.to(tl.int64)
    mmask = rm < M
    W: tl.constexpr = 2 * NP + NR
    K = N * C
    cp = tl.arange(0, NP)
    cr = tl.arange(0, NR)
    d_hpre = _reduce_dh_pre(x_ptr, du_ptr, rm64, mmask, C, N, NP, BM, BC)  # pass 1
    h_pre, dp_pre, dp_post, dp_res, coef = _coefficient_grads(
        d_hpre, rm, mmask, bias_ptr, alpha_ptr, hpre_ptr, hpost_ptr, q_ptr, rstd_ptr,
        dhpost_ptr, dhres_ptr, dproj_ptr, dz_ptr, dalpha_ptr, K, iters, N, NPAD, NP, NR, HC, BM,
    )
    # pass 2: dx = H_pre^T du + dproj @ phi^T + d rstd * (-rstd^3 / K) * x
    for j in tl.static_range(N):
        hj = _col(h_pre, cp, j)
        for c0 in range(0, C, BC):
            rc = c0 + tl.arange(0, BC)
            cmask = rc < C
            mc = mmask[:, None] & cmask[None, :]
            du = tl.load(du_ptr + rm64[:, None] * C + rc[None, :], mask=mc, other=0.0).to(tl.float32)
            xj = tl.load(x_ptr + rm64[:, None] * K + j * C + rc[None, :], mask=mc, other=0.0).to(tl.float32)
            k = (j * C + rc).to(tl.int64)
            base = phi_ptr + k[None, :] * W  # [1, BC] rows of phi, read transposed
            pt_pre = tl.load(base + cp[:, None], mask=cmask[None, :], other=0.0)  # [NP, BC]
            pt_post = tl.load(base + NP + cp[:, None], mask=cmask[None, :], other=0.0)
            pt_res = tl.load(base + 2 * NP + cr[:, None], mask=cmask[None, :], other=0.0)
            # float32 dx needs the bf16 x3 split; a 16-bit dx is served by one bf16 dot
            BDOT: tl.constexpr = 0 if DOT == 0 else (3 if DOT == 1 else 2)
            back = (_split_dot(dp_pre, pt_pre, BDOT) + _split_dot(dp_post, pt_post, BDOT)
                    + _split_dot(dp_res, pt_res, BDOT))
            dxj = hj[:, None] * du + back + coef[:, None] * xj
            tl.store(dx_ptr + rm64[:, None] * K + j * C + rc[None, :], dxj.to(dx_ptr.dtype.element_ty), mask=mc)


@triton.jit
def _phi_rows(ri, rc, C, N: tl.constexpr, NPAD: tl.constexpr, BC: tl.constexpr):
    """Rows ``j*C + c`` of ``phi`` for a chunk of all streams, flattened to ``[NPAD*BC]``."""
    k = ri[:, None] * C + rc[None, :]
    valid = (ri[:, None] < N) & (rc[None, :] < C)
    return tl.reshape(k, (NPAD * BC,)).to(tl.int64), tl.reshape(valid, (NPAD * BC,))


@triton.jit
def _post_pre_fwd_kernel(
    x_ptr, y_ptr, hpost0_ptr, hres0_ptr, phi_ptr, bias_ptr, alpha_ptr,
    xn_ptr, u_ptr, hpre_ptr, hpost_ptr, hres_ptr, q_ptr, rstd_ptr,
    M, C, eps, iters,
    N: tl.constexpr, NPAD: tl.constexpr, NP: tl.constexpr, NR: tl.constexpr,
    HC: tl.constexpr, DOT: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr,
):
    """Post of connection l fused with pre of connection l+1.

    Pass 1 builds ``X_{l+1} = H_res X_l + H_post^T y`` chunk by chunk for all streams,
    stores it and feeds the same on-chip values to the RMS and projection of connection
    l+1; pass 2 reads ``X_{l+1}`` back once for the aggregate ``u``.
    """
    pid = tl.program_id(0)
    rm = pid * BM + tl.arange(0, BM)
    mmask = rm < M
    rm64 = rm.to(tl.int64)
    W: tl.constexpr = 2 * NP + NR
    K = N * C
    cp = tl.arange(0, NP)
    cr = tl.arange(0, NR)
    ri = tl.arange(0, NPAD)
    mi = mmask[:, None] & (ri < N)[None, :]
    h_post0 = tl.load(hpost0_ptr + rm64[:, None] * N + ri[None, :], mask=mi, other=0.0)
    acc_pre = tl.zeros((BM, NP), dtype=tl.float32)
    acc_post = tl.zeros((BM, NP), dtype=tl.float32)
    acc_res = tl.zeros((BM, NR), dtype=tl.float32)
    sumsq = tl.zeros((BM,), dtype=tl.float32)
    for c0 in range(0, C, BC):
        rc = c0 + tl.arange(0, BC)
        acc = _mix_streams(x_ptr, y_ptr, h_post0, hres0_ptr, rm64, mmask, rc, C, N, NPAD)  # [BM, NPAD, BC]
        off, smask = _stream_offsets(rm64, ri, rc, C, N)
        xn = acc.to(xn_ptr.dtype.element_ty)
        tl.store(xn_ptr + off, xn, mask=mmask[:, None, None] & smask)
        xf = xn.to(tl.float32)
        sumsq += tl.sum(tl.sum(xf * xf, axis=2), axis=1)
        xt = tl.reshape(xn, (BM, NPAD * BC))
        rows, rvalid = _phi_rows(ri, rc, C, N, NPAD, BC)
        base = phi_ptr + rows[:, None] * W
        ph_pre = tl.load(base + cp[None, :], mask=rvalid[:, None], other=0.0)
        ph_post = tl.load(base + NP + cp[None, :], mask=rvalid[:, None], other=0.0)
        ph_res = tl.load(base + 2 * NP + cr[None, :], mask=rvalid[:, None], other=0.0)
        acc_pre += _split_dot(xt, ph_pre, DOT)
        acc_post += _split_dot(xt, ph_post, DOT)
        acc_res += _split_dot(xt, ph_res, DOT)
    h_pre = _coefficients(
        acc_pre, acc_post, acc_res, sumsq, rm, mmask, bias_ptr, alpha_ptr,
        hpre_ptr, hpost_ptr, hres_ptr, q_ptr, rstd_ptr, K, eps, iters, N, NPAD, NP, NR, HC, BM,
    )
    tl.debug_barrier()  # this program's X_{l+1} stores are visible to all its threads
    _aggregate(xn_ptr, u_ptr, h_pre, rm64, mmask, C, N, NP, BM, BC)


@triton.jit
def _post_pre_bwd_kernel(
    x_ptr, y_ptr, hpost0_ptr, hres0_ptr, xn_ptr, gn_ptr,
    phi_ptr, bias_ptr, alpha_ptr, hpre_ptr, hpost_ptr, q_ptr, rstd_ptr,
    du_ptr, dhpost_ptr, dhres_ptr,
    dx_ptr, dy_ptr, dhpost0_ptr, dhres0_ptr, dproj_ptr, dz_ptr, dalpha_ptr,
    M, C, iters,
    N: tl.constexpr, NPAD: tl.constexpr, NP: tl.constexpr, NR: tl.constexpr,
    HC: tl.constexpr, DOT: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr,
):
    """Backward of :func:`_post_pre_fwd_kernel`.

    Pass 1 reduces ``dH_pre`` of connection l+1 over ``X_{l+1}``; after its coefficient
    backward on chip, pass 2 forms the full gradient of ``X_{l+1}`` per chunk (the
    gradient ``gn`` from its other users + the pre side's part) and, without writing it,
    applies the post backward: ``dX_l = H_res^T g``, ``dy = H_post g`` and the reductions
    ``dH_post``, ``dH_res`` (whole rows per program: no atomics).
    """
    pid = tl.program_id(0)
    rm = pid * BM + tl.arange(0, BM)
    rm64 = rm.to(tl.int64)
    mmask = rm < M
    W: tl.constexpr = 2 * NP + NR
    K = N * C
    cp = tl.arange(0, NP)
    cr = tl.arange(0, NR)
    ri = tl.arange(0, NPAD)
    mi = mmask[:, None] & (ri < N)[None, :]
    d_hpre = _reduce_dh_pre(xn_ptr, du_ptr, rm64, mmask, C, N, NP, BM, BC)  # pass 1, over X_{l+1}
    _, dp_pre, dp_post, dp_res, coef = _coefficient_grads(
        d_hpre, rm, mmask, bias_ptr, alpha_ptr, hpre_ptr, hpost_ptr, q_ptr, rstd_ptr,
        dhpost_ptr, dhres_ptr, dproj_ptr, dz_ptr, dalpha_ptr, K, iters, N, NPAD, NP, NR, HC, BM,
    )
    h_pre4 = tl.load(hpre_ptr + rm64[:, None] * N + ri[None, :], mask=mi, other=0.0)
    h_post0 = tl.load(hpost0_ptr + rm64[:, None] * N + ri[None, :], mask=mi, other=0.0)
    d_hpost0 = tl.zeros((BM, NPAD), dtype=tl.float32)
    d_hres0 = tl.zeros((BM, NPAD, NPAD), dtype=tl.float32)
    BDOT: tl.constexpr = 0 if DOT == 0 else (3 if DOT == 1 else 2)
    # pass 2: g = gn + H_pre^T du + dproj @ phi^T + coef * X_{l+1}, then the post backward
    for c0 in range(0, C, BC):
        rc = c0 + tl.arange(0, BC)
        mc = mmask[:, None] & (rc < C)[None, :]
        off, smask = _stream_offsets(rm64, ri, rc, C, N)
        m3 = mmask[:, None, None] & smask
        du = tl.load(du_ptr + rm64[:, None] * C + rc[None, :], mask=mc, other=0.0).to(tl.float32)
        xn = tl.load(xn_ptr + off, mask=m3, other=0.0).to(tl.float32)
        g = tl.load(gn_ptr + off, mask=m3, other=0.0).to(tl.float32)
        rows, rvalid = _phi_rows(ri, rc, C, N, NPAD, BC)
        base = phi_ptr + rows[None, :] * W  # phi rows read transposed: [NP, NPAD*BC]
        pt_pre = tl.load(base + cp[:, None], mask=rvalid[None, :], other=0.0)
        pt_post = tl.load(base + NP + cp[:, None], mask=rvalid[None, :], other=0.0)
        pt_res = tl.load(base + 2 * NP + cr[:, None], mask=rvalid[None, :], other=0.0)
        back = (_split_dot(dp_pre, pt_pre, BDOT) + _split_dot(dp_post, pt_post, BDOT)
                + _split_dot(dp_res, pt_res, BDOT))
        g += tl.reshape(back, (BM, NPAD, BC)) + h_pre4[:, :, None] * du[:, None, :] + coef[:, None, None] * xn
        g = tl.where(m3, g, 0.0)
        y = tl.load(y_ptr + rm64[:, None] * C + rc[None, :], mask=mc, other=0.0).to(tl.float32)
        dy = tl.sum(h_post0[:, :, None] * g, axis=1)
        tl.store(dy_ptr + rm64[:, None] * C + rc[None, :], dy.to(dy_ptr.dtype.element_ty), mask=mc)
        d_hpost0 += tl.sum(g * y[:, None, :], axis=2)
        for k in tl.static_range(N):
            xk = tl.load(x_ptr + rm64[:, None] * K + k * C + rc[None, :], mask=mc, other=0.0).to(tl.float32)
            h_col = tl.load(hres0_ptr + rm64[:, None] * (N * N) + ri[None, :] * N + k, mask=mi, other=0.0)
            dxk = tl.sum(h_col[:, :, None] * g, axis=1)
            tl.store(dx_ptr + rm64[:, None] * K + k * C + rc[None, :], dxk.to(dx_ptr.dtype.element_ty), mask=mc)
            gx = tl.sum(g * xk[:, None, :], axis=2)  # dH_res[:, i, k]
            d_hres0 += tl.where(ri[None, None, :] == k, gx[:, :, None], 0.0)
    tl.store(dhpost0_ptr + rm64[:, None] * N + ri[None, :], d_hpost0, mask=mi)
    res_off = rm64[:, None, None] * (N * N) + ri[None, :, None] * N + ri[None, None, :]
    rvalid = (ri[:, None] < N) & (ri[None, :] < N)
    tl.store(dhres0_ptr + res_off, d_hres0, mask=mmask[:, None, None] & rvalid[None, :, :])
