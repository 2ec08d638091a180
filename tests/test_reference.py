"""The reference math: shapes, function-preserving init, gradcheck, Sinkhorn properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mhc_compile.config import MHCConfig
from mhc_compile.layers import MHCConnection
from mhc_compile.ops import reference as R


def _params(n, c, dtype=torch.float64, alpha_scale=1.0):
    phi = torch.randn(n * c, n * n + 2 * n, dtype=dtype) / math.sqrt(n * c)
    bias = torch.randn(n * n + 2 * n, dtype=dtype)
    alpha = torch.rand(3, dtype=dtype) * alpha_scale + 0.1
    return phi, bias, alpha


def test_sinkhorn_is_doubly_stochastic_for_bounded_logits():
    # 20 rounds converge to 1e-5 for logits in [-1, 1]; wider spreads converge slower
    # (std-2 Gaussian logits leave row errors near 2e-2 after 20 rounds).
    p = R.sinkhorn_knopp(torch.rand(4096, 4, 4) * 2 - 1, iters=20)
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(4096, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(p.sum(-2), torch.ones(4096, 4), atol=1e-5, rtol=0)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), n=st.integers(1, 8))
def test_sinkhorn_property_rows_and_columns_sum_to_one(data, n):
    entries = data.draw(st.lists(st.floats(-1.0, 1.0), min_size=n * n, max_size=n * n))
    logits = torch.tensor(entries).reshape(1, n, n)
    p = R.sinkhorn_knopp(logits, iters=20)
    assert torch.isfinite(p).all()
    assert (p.sum(-1) - 1).abs().max() <= 1e-5
    assert (p.sum(-2) - 1).abs().max() <= 1e-5


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 8), magnitude=st.floats(10.0, 1e4), seed=st.integers(0, 2**31 - 1))
def test_sinkhorn_large_logits_stay_finite(n, magnitude, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.rand(8, n, n, generator=g) * 2 - 1) * magnitude
    p = R.sinkhorn_knopp(logits, iters=20)
    assert torch.isfinite(p).all()
    assert (p >= 0).all() and (p <= 1 + 1e-6).all()
    # the last step normalises columns; a column whose entries all underflow stays 0
    col = p.sum(-2)
    assert ((col - 1).abs() <= 1e-5).logical_or(col == 0).all()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 8), c=st.integers(1, 9), big=st.floats(0.0, 50.0), seed=st.integers(0, 2**31 - 1))
def test_coefficient_ranges(n, c, big, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, n, c, generator=g)
    phi = torch.randn(n * c, n * n + 2 * n, generator=g) * big
    bias = torch.randn(n * n + 2 * n, generator=g) * big
    h_pre, h_post, h_res = R.mhc_coefficients(x, phi, bias, torch.ones(3))
    for h in (h_pre, h_post, h_res):
        assert torch.isfinite(h).all()
    assert ((h_pre >= 0) & (h_pre <= 1)).all()
    assert ((h_post >= 0) & (h_post <= 2)).all()


def test_rms_reordering_matches_normalise_first():
    x = torch.randn(7, 4, 6, dtype=torch.float64)
    phi, bias, alpha = _params(4, 6)
    v = x.reshape(7, 24)
    v_norm = v / v.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    proj = v_norm @ phi
    h_pre, _, _ = R.mhc_coefficients(x, phi, bias, alpha)
    torch.testing.assert_close(h_pre, torch.sigmoid(alpha[0] * proj[:, :4] + bias[:4]).float())


@pytest.mark.parametrize("mode", ["mhc", "hc"])
def test_gradcheck_pre(mode):
    n, c = 3, 5
    x = torch.randn(4, n, c, dtype=torch.float64, requires_grad=True)
    phi, bias, alpha = (t.requires_grad_() for t in _params(n, c))

    def f(x, phi, bias, alpha):
        v = x.reshape(4, n * c)
        rstd = torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6)
        proj = (v @ phi) * rstd
        # the reference in float64 end to end (mhc_coefficients upcasts only to float32)
        d_pre, d_post, d_res = R.split_coefficients(proj, n)
        b_pre, b_post, b_res = R.split_coefficients(bias, n)
        if mode == "mhc":
            h_pre = torch.sigmoid(alpha[0] * d_pre + b_pre)
            h_post = 2 * torch.sigmoid(alpha[1] * d_post + b_post)
            logits = alpha[2] * d_res + b_res
            p = torch.exp(logits - logits.amax(-1, keepdim=True))
            for _ in range(20):
                p = p / p.sum(-1, keepdim=True)
                p = p / p.sum(-2, keepdim=True)
            h_res = p
        else:
            h_pre = alpha[0] * torch.tanh(d_pre) + b_pre
            h_post = alpha[1] * torch.tanh(d_post) + b_post
            h_res = alpha[2] * torch.tanh(d_res) + b_res
        u = torch.einsum("mn,mnc->mc", h_pre, x)
        return u, h_post, h_res

    assert torch.autograd.gradcheck(f, (x, phi, bias, alpha))
    # and the float64 formula above is the reference's formula
    u_ref, hp_ref, hr_ref = R.mhc_pre(x.float(), phi.float(), bias.float(), alpha.float(), mode=mode)
    u, hp, hr = f(x, phi, bias, alpha)
    torch.testing.assert_close(u.float(), u_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hr.float(), hr_ref, rtol=1e-5, atol=1e-5)


def test_gradcheck_sinkhorn():
    logits = torch.randn(3, 4, 4, dtype=torch.float64, requires_grad=True)

    def f(z):
        p = torch.exp(z - z.amax(-1, keepdim=True))
        for _ in range(20):
            p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
            p = p / p.sum(-2, keepdim=True).clamp_min(1e-30)
        return p

    assert torch.autograd.gradcheck(f, (logits,))
    torch.testing.assert_close(f(logits).float(), R.sinkhorn_knopp(logits.float()), rtol=1e-5, atol=1e-6)


def test_gradcheck_post_and_aggregate():
    n, c = 4, 3
    x = torch.randn(5, n, c, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, c, dtype=torch.float64, requires_grad=True)
    h_post = torch.rand(5, n, dtype=torch.float64, requires_grad=True)
    h_res = torch.rand(5, n, n, dtype=torch.float64, requires_grad=True)
    h_pre = torch.rand(5, n, dtype=torch.float64, requires_grad=True)
    post = lambda x, y, hp, hr: torch.einsum("mij,mjc->mic", hr, x) + hp.unsqueeze(-1) * y.unsqueeze(-2)
    assert torch.autograd.gradcheck(post, (x, y, h_post, h_res))
    assert torch.autograd.gradcheck(lambda x, h: torch.einsum("mn,mnc->mc", h, x), (x, h_pre))
    torch.testing.assert_close(R.mhc_post(x.float(), y.float(), h_post.float(), h_res.float()),
                               post(x, y, h_post, h_res).float(), rtol=1e-5, atol=1e-6)


def test_expand_collapse_roundtrip():
    x = torch.randn(2, 3, 5)
    xs = R.expand_streams(x, 4, -2)
    assert xs.shape == (2, 3, 4, 5)
    torch.testing.assert_close(R.collapse_streams(xs, -2, "mean"), x)
    torch.testing.assert_close(R.collapse_streams(xs, -2, "sum"), 4 * x)
    img = torch.randn(2, 6, 3, 3)
    assert R.expand_streams(img, 2, 1).shape == (2, 2, 6, 3, 3)


@pytest.mark.parametrize("mode", ["mhc", "hc"])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_preserve_init_is_identity_on_replicated_streams(mode, n):
    c = 8
    conn = MHCConnection(c, MHCConfig(n_streams=n, mode=mode))
    x = torch.randn(6, c)
    y = torch.randn(6, c)
    xs = R.expand_streams(x, n, -2)
    u, h_post, h_res = R.mhc_pre(xs, conn.phi, conn.bias, conn.alpha, mode=mode)
    torch.testing.assert_close(u, x, rtol=1e-6, atol=1e-6)
    out = R.mhc_post(xs, y, h_post, h_res)
    torch.testing.assert_close(out, R.expand_streams(x + y, n, -2), rtol=1e-6, atol=1e-6)


def test_bf16_streams_fp32_coefficients():
    x = torch.randn(4, 4, 8, dtype=torch.bfloat16)
    phi, bias, alpha = (t.float() for t in _params(4, 8))
    u, h_post, h_res = R.mhc_pre(x, phi, bias, alpha)
    assert u.dtype == torch.bfloat16 and h_post.dtype == torch.float32 and h_res.dtype == torch.float32
    assert R.mhc_post(x, u, h_post, h_res).dtype == torch.bfloat16


@pytest.mark.parametrize("n", [2, 3, 4])
def test_cpu_sinkhorn_gradcheck_and_matches_reference(n):
    from mhc_compile.ops import cpu

    token_last = (torch.randn(n, n, 5, dtype=torch.float64) * 2).requires_grad_()  # [n, n, M]
    assert torch.autograd.gradcheck(lambda t: cpu._SinkhornKnopp.apply(t, 7), (token_last,))
    logits = (torch.randn(64, n, n) * 2).requires_grad_()
    grad = torch.randn(64, n, n)
    (out_ref, g_ref), (out_cpu, g_cpu) = [
        (p, torch.autograd.grad(p, logits, grad)[0])
        for p in (R.sinkhorn_knopp(logits, 20), cpu.sinkhorn_knopp(logits, 20))
    ]
    torch.testing.assert_close(out_cpu, out_ref, atol=1e-6, rtol=1e-5)
    assert ((g_cpu - g_ref).norm() / g_ref.norm()).item() < 1e-5


@pytest.mark.parametrize("n", [2, 4, 8])
def test_cpu_sinkhorn_row_sums_never_need_the_clamp(n):
    """The CPU Sinkhorn clamps only column sums; with the row clamp too it gives the same
    bits, on logits up to 1e4 and columns that underflow to zero."""
    from mhc_compile.ops import cpu

    torch.manual_seed(n)
    logits = torch.randn(n, n, 256) * torch.logspace(-2, 4, 256)  # [n, n, M]
    logits[:, 0, :64] = -1e4  # a column that underflows in every row
    p = logits - logits.amax(dim=1, keepdim=True)
    p.exp_()
    for _ in range(20):
        p.div_(p.sum(dim=1, keepdim=True).clamp_min_(R._TINY))
        p.div_(p.sum(dim=0, keepdim=True).clamp_min_(R._TINY))
    got, _ = cpu._sinkhorn_forward(logits, 20)
    assert torch.isfinite(got).all() and torch.equal(got, p)


@pytest.mark.parametrize("mode", ["mhc", "hc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_ops_match_the_reference_values_and_grads(mode, dtype):
    from mhc_compile.ops import cpu

    m, n, c = 37, 4, 24
    phi, bias, alpha = (t.float().requires_grad_() for t in _params(n, c))
    x = torch.randn(m, n, c).to(dtype).requires_grad_()
    y = torch.randn(m, c).to(dtype).requires_grad_()
    leaves = (x, y, phi, bias, alpha)

    def run(ops):
        x_next, u, h_post, h_res = ops.mhc_post_pre(x, y, *R.mhc_pre(x, phi, bias, alpha, mode=mode)[1:],
                                                    phi, bias, alpha, mode=mode)
        outs = (x_next.float(), u.float(), h_post, h_res)
        weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)) for i, o in enumerate(outs)]
        loss = sum((o * w).sum() for o, w in zip(outs, weights))
        return outs, torch.autograd.grad(loss, leaves)

    (outs_ref, grads_ref), (outs_cpu, grads_cpu) = run(R), run(cpu)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, a, b in zip(("x_next", "u", "h_post", "h_res", *(f"d{i}" for i in range(5))),
                          outs_cpu + grads_cpu, outs_ref + grads_ref):
        err = ((a.float() - b.float()).norm() / b.float().norm()).item()
        assert err < tol, (name, err)


@pytest.mark.parametrize("mode", ["mhc", "hc"])
@pytest.mark.parametrize("compiled", [False, True], ids=["whole-tensor", "compiled"])
def test_cpu_connection_sides_gradcheck(mode, compiled, monkeypatch):
    """Each CPU side is one autograd node with a hand-written backward: check it against
    finite differences in float64 (the CPU ops accumulate in float64 for float64 streams), in
    the whole-tensor formulation and through the compiled kernels (19 tokens: a partial tile)."""
    from mhc_compile.ops import cpu, native

    if compiled:
        assert native.available()
    else:
        monkeypatch.setattr(native, "usable", lambda x: False)
    m, n, c = 19 if compiled else 5, 3, 4
    phi, bias, alpha = (t.requires_grad_() for t in _params(n, c))
    x = torch.randn(m, n, c, dtype=torch.float64, requires_grad=True)
    y = torch.randn(m, c, dtype=torch.float64, requires_grad=True)
    pre = lambda *a: cpu.mhc_pre(*a, mode=mode, sinkhorn_iters=5)  # noqa: E731
    assert torch.autograd.gradcheck(pre, (x, phi, bias, alpha))
    _, h_post, h_res = (t.detach().requires_grad_() for t in pre(x, phi, bias, alpha))
    assert torch.autograd.gradcheck(cpu.mhc_post, (x, y, h_post, h_res))


def test_cpu_ops_compute_coefficients_in_float32_under_autocast():
    """Under CPU bf16 autocast the projection stays float32, as in the kernels: the CPU
    ops' coefficients match the reference's outside autocast."""
    from mhc_compile.ops import cpu

    m, n, c = 64, 4, 32
    phi, bias, alpha = (t.float() for t in _params(n, c))
    x = torch.randn(m, n, c)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, h_post, h_res = cpu.mhc_pre(x, phi, bias, alpha)
    _, h_post_ref, h_res_ref = R.mhc_pre(x, phi, bias, alpha)
    assert h_post.dtype == h_res.dtype == torch.float32
    torch.testing.assert_close(h_post, h_post_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_res, h_res_ref, rtol=1e-5, atol=1e-6)


def test_cpu_ops_on_meta_tensors_give_shapes_and_dtypes():
    """Meta tensors (a model built on the meta device and converted) take the CPU ops."""
    from mhc_compile.ops import cpu

    m, n, c = 6, 4, 8
    phi, bias, alpha = (t.float().to("meta") for t in _params(n, c))
    x = torch.empty(m, n, c, device="meta", dtype=torch.bfloat16)
    u, h_post, h_res = cpu.mhc_pre(x, phi, bias, alpha)
    assert (u.shape, u.dtype, h_post.shape, h_res.shape) == ((m, c), torch.bfloat16, (m, n), (m, n, n))
    out = cpu.mhc_post(x, u, h_post, h_res)
    assert out.shape == x.shape and out.dtype == torch.bfloat16 and out.device.type == "meta"
