"""Fused Triton kernels against the reference: forward, backward, torch.library, errors.

On the CPU these run under TRITON_INTERPRET=1 with small shapes (odd C, M not a
multiple of the block, n from 1 to 8); the ``gpu`` tests repeat them at full size.
Every output buffer is NaN-filled before the kernels run, so an unwritten element fails.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mhc_compile as mhc
from mhc_compile.ops import library, reference
from models import NanoGPT

pytestmark = pytest.mark.skipif(not library.KERNELS_AVAILABLE, reason="needs the triton package")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(library, "POISON_OUTPUTS", True)


@pytest.fixture(params=["few tokens", "many tokens"])
def token_path(request, monkeypatch):
    """Both launch paths: the decode tiles (coefficients and aggregate in one launch) and
    the prefill/training tiles, whatever the test's token count."""
    monkeypatch.setattr(library, "DECODE_TOKENS", 1 << 30 if request.param == "few tokens" else 0)
    return request.param


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _inputs(m, n, c, dtype, device=DEVICE, alpha_scale=1.0):
    x = torch.randn(m, n, c, device=device).to(dtype).requires_grad_()
    y = torch.randn(m, c, device=device).to(dtype).requires_grad_()
    phi = (torch.randn(n * c, n * n + 2 * n, device=device) / math.sqrt(n * c)).requires_grad_()
    bias = (torch.randn(n * n + 2 * n, device=device) * 0.5).requires_grad_()
    alpha = (torch.rand(3, device=device) * alpha_scale + 0.3).requires_grad_()
    return x, y, phi, bias, alpha


def _connection(impl, x, y, phi, bias, alpha, mode, iters=20):
    u, h_post, h_res = impl.mhc_pre(x, phi, bias, alpha, mode=mode, sinkhorn_iters=iters)
    out = impl.mhc_post(x, y, h_post, h_res)
    return u, h_post, h_res, out


def _check(m, n, c, dtype, mode, iters=20, tol=None):
    x, y, phi, bias, alpha = _inputs(m, n, c, dtype)
    got = _connection(library, x, y, phi, bias, alpha, mode, iters)
    ref = _connection(reference, x, y, phi, bias, alpha, mode, iters)
    tol = tol or TOL[dtype]
    for name, a, b in zip(["u", "h_post", "h_res", "out"], got, ref):
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) <= tol, (name, _rel(a, b))
    g_u = torch.randn_like(got[0])
    g_out = torch.randn_like(got[3])
    leaves = [x, phi, bias, alpha, y]
    grads = torch.autograd.grad((got[0].float() * g_u.float()).sum() + (got[3].float() * g_out.float()).sum(), leaves)
    grads_ref = torch.autograd.grad((ref[0].float() * g_u.float()).sum() + (ref[3].float() * g_out.float()).sum(), leaves)
    for name, a, b in zip(["dx", "dphi", "dbias", "dalpha", "dy"], grads, grads_ref):
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) <= tol, (name, _rel(a, b))


@pytest.mark.parametrize("n, c, m", [(1, 7, 5), (2, 13, 17), (3, 9, 7), (4, 33, 19), (8, 5, 6)])
@pytest.mark.parametrize("mode", ["mhc", "hc"])
def test_kernels_match_reference_fp32(n, c, m, mode, token_path):
    _check(m, n, c, torch.float32, mode)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernels_match_reference_16bit(dtype, token_path):
    _check(21, 4, 40, dtype, "mhc")


def test_sinkhorn_iterations_are_respected():
    _check(9, 4, 12, torch.float32, "mhc", iters=3)


def _two_connections(impl, x, y1, y2, params1, params2, mode, fused, use_next=True):
    """pre(1) -> [post(1), pre(2)] -> post(2); the middle pair fused or as two ops."""
    u1, hp1, hr1 = impl.mhc_pre(x, *params1, mode=mode)
    y1 = y1 + u1  # the branch output depends on its input, as in a real block
    if fused:
        x2, u2, hp2, hr2 = impl.mhc_post_pre(x, y1, hp1, hr1, *params2, mode=mode)
    else:
        x2 = impl.mhc_post(x, y1, hp1, hr1)
        u2, hp2, hr2 = impl.mhc_pre(x2, *params2, mode=mode)
    out = impl.mhc_post(x2 if use_next else x2.detach(), y2 + u2, hp2, hr2)
    return x2, u2, hp2, hr2, out


def _check_post_pre(m, n, c, dtype, mode, use_next=True, tol=None):
    x, y1, phi1, bias1, alpha1 = _inputs(m, n, c, dtype)
    _, y2, phi2, bias2, alpha2 = _inputs(m, n, c, dtype)
    p1, p2 = (phi1, bias1, alpha1), (phi2, bias2, alpha2)
    got = _two_connections(library, x, y1, y2, p1, p2, mode, fused=True, use_next=use_next)
    ref = _two_connections(reference, x, y1, y2, p1, p2, mode, fused=False, use_next=use_next)
    tol = tol or TOL[dtype]
    for name, a, b in zip(["x_next", "u", "h_post", "h_res", "out"], got, ref):
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) <= tol, (name, _rel(a, b))
    g_out = torch.randn_like(got[-1])
    leaves = [x, y1, y2, *p1, *p2]
    grads = torch.autograd.grad((got[-1].float() * g_out.float()).sum(), leaves)
    grads_ref = torch.autograd.grad((ref[-1].float() * g_out.float()).sum(), leaves)
    names = ["dx", "dy1", "dy2", "dphi1", "dbias1", "dalpha1", "dphi2", "dbias2", "dalpha2"]
    for name, a, b in zip(names, grads, grads_ref):
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) <= tol, (name, _rel(a, b))


@pytest.mark.parametrize("n, c, m", [(1, 7, 5), (2, 13, 17), (4, 33, 19), (8, 5, 6)])
@pytest.mark.parametrize("mode", ["mhc", "hc"])
def test_fused_post_pre_matches_reference_fp32(n, c, m, mode, token_path):
    _check_post_pre(m, n, c, torch.float32, mode)


def test_fused_post_pre_when_only_the_next_pre_uses_the_streams():
    _check_post_pre(11, 4, 20, torch.float32, "mhc", use_next=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_post_pre_16bit(dtype, token_path):
    _check_post_pre(21, 4, 40, dtype, "mhc")


def _post_pre_grads(m, n, c, dtype, keep_next, mode="mhc"):
    """Gradients of ``pre -> post_pre(keep_next) -> post`` w.r.t. every input (both
    connections' parameters, both branch outputs), with the upstream gradients fixed."""
    gen = torch.Generator().manual_seed(3)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(DEVICE)  # noqa: E731
    x = rand(m, n, c).to(dtype).requires_grad_()
    ys = [rand(m, c).to(dtype).requires_grad_() for _ in range(2)]
    params = [((rand(n * c, n * n + 2 * n) / math.sqrt(n * c)).requires_grad_(),
               (rand(n * n + 2 * n) * 0.5).requires_grad_(), (rand(3).abs() + 0.3).requires_grad_())
              for _ in range(2)]

    def grads(impl, **kw):
        u, h_post, h_res = impl.mhc_pre(x, *params[0], mode=mode)
        x2, u2, h_post2, h_res2 = impl.mhc_post_pre(x, ys[0] + u, h_post, h_res, *params[1], mode=mode, **kw)
        out = impl.mhc_post(x2, ys[1] * u2, h_post2, h_res2)
        loss = (out.float() * torch.linspace(-1, 1, out.numel(), device=DEVICE).view_as(out)).sum()
        return torch.autograd.grad(loss + (x2.float() ** 2).mean(), [x, *ys, *params[0], *params[1]])

    return grads(library, keep_next=keep_next), grads(reference)


# the fused backward's forms: (POST_PRE_ONE_PASS, POST_PRE_DPHI_IN_PASS)
BACKWARD_FORMS = {"one pass": (True, True), "one pass, dphi by matmul": (True, False), "three passes": (False, True)}


def _set_backward_form(monkeypatch, form: str) -> None:
    one_pass, dphi_in_pass = BACKWARD_FORMS[form]
    monkeypatch.setattr(library, "POST_PRE_ONE_PASS", one_pass)
    monkeypatch.setattr(library, "POST_PRE_DPHI_IN_PASS", dphi_in_pass)


@pytest.mark.parametrize("n, c, m", [(4, 40, 37), (3, 70, 20), (8, 24, 17), (1, 9, 16)])
@pytest.mark.parametrize("keep_next", [True, False], ids=["X_next kept", "X_next recomputed"])
@pytest.mark.parametrize("form", list(BACKWARD_FORMS))
def test_fused_post_pre_backward_forms_match_reference_and_repeat_bitwise(n, c, m, keep_next, form, monkeypatch):
    """Each form of the fused backward: X_next kept or recomputed, several channel chunks
    and token groups (partials added on the host), n = 1 to 8."""
    _set_backward_form(monkeypatch, form)
    got, ref = _post_pre_grads(m, n, c, torch.float32, keep_next)
    names = ["dx", "dy1", "dy2", "dphi1", "dbias1", "dalpha1", "dphi2", "dbias2", "dalpha2"]
    for name, a, b in zip(names, got, ref):
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) <= TOL[torch.float32], (name, _rel(a, b))
    again, _ = _post_pre_grads(m, n, c, torch.float32, keep_next)
    assert all(torch.equal(a, b) for a, b in zip(again, got))


@pytest.mark.gpu
@pytest.mark.parametrize("keep_next", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_post_pre_backward_forms_agree_on_gpu(dtype, keep_next, monkeypatch):
    """Full size: the one-pass backward's forms against the three-pass one and the reference."""
    m, c = (16384, 4096) if dtype == torch.bfloat16 else (2048, 4096)
    forms = {}
    for form in BACKWARD_FORMS:
        _set_backward_form(monkeypatch, form)
        forms[form], ref = _post_pre_grads(m, 4, c, dtype, keep_next)
    for form in ("one pass", "one pass, dphi by matmul"):
        for i, (a, b, r) in enumerate(zip(forms[form], forms["three passes"], ref)):
            assert torch.isfinite(a).all(), (form, i)
            assert _rel(a, r) <= max(TOL[dtype], 1.5 * _rel(b, r)), (form, i, _rel(a, r), _rel(b, r))


def test_non_contiguous_inputs_give_same_results():
    x, y, phi, bias, alpha = _inputs(8, 4, 16, torch.float32)
    xt = x.detach().transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    assert not xt.is_contiguous()
    a = library.mhc_pre(xt, phi, bias, alpha)
    b = library.mhc_pre(x.detach(), phi, bias, alpha)
    for s, t in zip(a, b):
        torch.testing.assert_close(s, t)


def test_bad_inputs_give_clear_errors(monkeypatch):
    x, y, phi, bias, alpha = _inputs(4, 4, 8, torch.float32)
    with pytest.raises(library.KernelInputError, match=r"\[M, n, C\]"):
        library.mhc_pre(x.detach().reshape(4, 32), phi, bias, alpha)
    with pytest.raises(library.KernelInputError, match="float32, bfloat16 or float16"):
        library.mhc_pre(x.detach().double(), phi, bias, alpha)
    with pytest.raises(library.KernelInputError, match="1 to 8 streams"):
        library.mhc_pre(torch.randn(2, 9, 4, device=DEVICE), phi, bias, alpha)
    with pytest.raises(library.KernelInputError, match=r"phi must be"):
        library.mhc_pre(x.detach(), phi[:-1], bias, alpha)
    with pytest.raises(library.KernelInputError, match=r"branch output must be"):
        library.mhc_post(x.detach(), y.detach()[:, :-1], torch.rand(4, 4), torch.rand(4, 4, 4))
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(library.KernelInputError, match="CUDA tensors"):
            library.mhc_pre(x.detach(), phi, bias, alpha)


def test_ops_are_registered_with_torch_library():
    for name in ["pre_fwd", "pre_bwd", "post_fwd", "post_bwd", "post_pre_fwd", "post_pre_bwd"]:
        assert hasattr(torch.ops.mhc_compile, name)
    x, y, phi, bias, alpha = _inputs(5, 4, 8, torch.float32)
    torch.library.opcheck(torch.ops.mhc_compile.post_fwd.default,
                          (x.detach(), y.detach(), torch.rand(5, 4, device=DEVICE), torch.rand(5, 4, 4, device=DEVICE)),
                          # fake-tensor runs need real Triton: the CPU interpreter launches the kernel
                          test_utils=("test_schema", "test_faketensor") if DEVICE == "cuda" else ("test_schema",))


def _converted_pair(idx, first: dict, second: dict):
    """One NanoGPT converted twice (``first``, ``second`` options), equal mHC parameters
    moved off their init, both in eval mode."""
    base = NanoGPT().to(DEVICE)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    mhc.mhc_compile(a, example_inputs=idx, **first)
    mhc.mhc_compile(b, example_inputs=idx, **second)
    with torch.no_grad():
        for p, q in zip(mhc.mhc_parameters(a), mhc.mhc_parameters(b)):
            p.copy_(q.detach() + 0.05 * torch.randn_like(q))
            q.copy_(p)
    return a.eval(), b.eval()


def test_converted_model_uses_kernels_and_matches_torch_backend():
    idx = torch.randint(0, 97, (2, 7), device=DEVICE)
    a, b = _converted_pair(idx, {"backend": "triton"}, {"backend": "torch"})
    la = a(idx, idx)[1]
    lb = b(idx, idx)[1]
    assert abs(la.item() - lb.item()) <= 1e-5 * abs(lb.item())
    la.backward()
    lb.backward()
    for p, q in zip(mhc.mhc_parameters(a), mhc.mhc_parameters(b)):
        assert _rel(p.grad, q.grad) <= 1e-4


class _OpRecorder(TorchDispatchMode):
    """Names (``calls``) and arguments (``args``) of the ``mhc_compile`` ops that run
    (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.args = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "mhc_compile" in str(func):
            self.calls.append(str(func).split(".")[1])
            self.args.append(args)
        return func(*args, **(kwargs or {}))

    def deterministic_flags(self) -> list[bool]:
        """The ``deterministic`` argument of each ``post_bwd`` / ``post_pre_bwd`` call."""
        index = {"post_bwd": 5, "post_pre_bwd": 18}  # the dispatcher drops trailing arguments at their defaults
        return [len(a) > index[name] and a[index[name]] is True
                for name, a in zip(self.calls, self.args) if name in index]


class _Passthrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_eager_calls_skip_the_dispatcher_with_the_same_results():
    """Plain eager calls run the op bodies under the ops' own autograd formulas; with a
    dispatch mode active they go through torch.ops: bitwise the same values and grads."""
    x, y, phi, bias, alpha = _inputs(9, 4, 24, torch.float32)
    phi, bias = torch.nn.Parameter(phi.detach()), torch.nn.Parameter(bias.detach())  # as in a model

    def run():
        u, h_post, h_res = library.mhc_pre(x, phi, bias, alpha)
        x2, u2, h_post2, h_res2 = library.mhc_post_pre(x, u * y, h_post, h_res, phi, bias, alpha)
        out = library.mhc_post(x2, u2, h_post2, h_res2)
        return out, torch.autograd.grad(out.square().sum(), [x, y, phi, bias, alpha])

    fast, fast_grads = run()
    assert type(fast.grad_fn).__name__ == "PostFwdBackward"  # the eager autograd.Function
    with _Passthrough():
        slow, slow_grads = run()
    assert type(slow.grad_fn).__name__ != "PostFwdBackward"  # the op's registered autograd
    assert torch.equal(fast, slow)
    for a, b in zip(fast_grads, slow_grads):
        assert torch.isfinite(a).all() and torch.equal(a, b)


def test_no_grad_calls_with_few_tokens_reuse_scratch_buffers_safely(monkeypatch):
    """No-grad eager calls with few tokens (decode) take the split-K partials, H_pre, q
    and rstd from per-stream scratch buffers; what they return is fresh, matches the
    reference, and a graph recorded before them still gets the right gradients."""
    monkeypatch.setattr(library, "_SCRATCH", {})
    x, y, phi, bias, alpha = _inputs(3, 4, 24, torch.float32)
    u_ref, hp_ref, hr_ref = reference.mhc_pre(x, phi, bias, alpha)
    out_ref = reference.mhc_post(x, y, hp_ref, hr_ref)
    grads_ref = torch.autograd.grad(out_ref.square().sum() + u_ref.square().sum(), [x, phi, bias, alpha])
    u_g, hp_g, hr_g = library.mhc_pre(x, phi, bias, alpha)  # with grad: its saved tensors are its own
    assert not library._SCRATCH
    kept = []
    with torch.no_grad():
        for scale in (1.0, -2.0, 0.5):  # each call overwrites the scratch of the one before
            xs = x.detach() * scale
            u, h_post, h_res = library.mhc_pre(xs, phi, bias, alpha)
            x2, u2, h_post2, h_res2 = library.mhc_post_pre(xs, u * y, h_post, h_res, phi, bias, alpha)
            kept.append((scale, u, h_post, h_res, x2, u2))
    assert library._SCRATCH  # the partials and the kept-for-backward buffers
    for scale, u, h_post, h_res, x2, u2 in kept:
        xs = x.detach() * scale
        ur, hpr, hrr = reference.mhc_pre(xs, phi, bias, alpha)
        x2r = reference.mhc_post(xs, ur * y, hpr, hrr)
        u2r, _, _ = reference.mhc_pre(x2r, phi, bias, alpha)
        for a, b in ((u, ur), (h_post, hpr), (h_res, hrr), (x2, x2r), (u2, u2r)):
            assert torch.isfinite(a).all() and _rel(a, b) <= TOL[torch.float32]
    out_g = library.mhc_post(x, y, hp_g, hr_g)
    grads = torch.autograd.grad(out_g.square().sum() + u_g.square().sum(), [x, phi, bias, alpha])
    for a, b in zip(grads, grads_ref):
        assert torch.isfinite(a).all() and _rel(a, b) <= TOL[torch.float32]


def test_scratch_buffers_are_per_thread(monkeypatch):
    """Two threads on one stream could interleave their launches: each has its own set."""
    import threading

    monkeypatch.setattr(library, "_SCRATCH", {})
    x, _, phi, bias, alpha = _inputs(2, 4, 24, torch.float32)
    results = {}

    def run(name):
        with torch.no_grad():
            results[name] = library.mhc_pre(x, phi, bias, alpha)[0]

    worker = threading.Thread(target=run, args=("worker",))
    worker.start()
    worker.join()
    run("main")
    assert len({key[2] for key in library._SCRATCH}) == 2  # the thread is part of the key
    assert torch.equal(results["worker"], results["main"])


def test_rewrite_emits_the_fused_post_pre_kernel():
    idx = torch.randint(0, 97, (2, 7), device=DEVICE)
    # fuse_adjacent is the default
    fused, separate = _converted_pair(idx, {"backend": "triton"}, {"backend": "triton", "fuse_adjacent": False})
    with _OpRecorder() as rec:
        loss_fused = fused(idx, idx)[1]
        loss_fused.backward()
    # three blocks, each attention -> MLP: one fused kernel per block, forward and backward
    assert rec.calls.count("post_pre_fwd") == 3 and rec.calls.count("post_pre_bwd") == 3
    assert rec.calls.count("pre_fwd") == 3 and rec.calls.count("post_fwd") == 3
    with _OpRecorder() as rec:
        loss_separate = separate(idx, idx)[1]
        loss_separate.backward()
    assert "post_pre_fwd" not in rec.calls and rec.calls.count("pre_fwd") == 6
    assert abs(loss_fused.item() - loss_separate.item()) <= 1e-5 * abs(loss_separate.item())
    for p, q in zip(mhc.mhc_parameters(fused), mhc.mhc_parameters(separate)):
        assert _rel(p.grad, q.grad) <= 1e-4


@pytest.mark.gpu
def test_kernels_under_torch_compile_fullgraph():
    x, y, phi, bias, alpha = _inputs(6, 4, 12, torch.float32)

    def connection(x, y, phi, bias, alpha):
        u, h_post, h_res = library.mhc_pre(x, phi, bias, alpha)
        return library.mhc_post(x, u + y, h_post, h_res)

    torch._dynamo.reset()
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(connection, fullgraph=True, backend=backend)
    out = compiled(x, y, phi, bias, alpha)
    ref = connection(x, y, phi, bias, alpha)
    assert _rel(out, ref) <= 1e-6
    out.sum().backward()
    assert all(t.grad is not None for t in (x, y, phi, bias, alpha))


@pytest.mark.parametrize("m", [5, 70])  # few tokens (the decode plan) and many (split-K ranges fitted to the GPU)
def test_ops_under_torch_compile_with_dynamic_token_counts(m):
    """``torch.compile(dynamic=True)`` runs the ops' launch planning on a symbolic token
    count (a SymInt: not hashable, no ``bit_length``)."""
    x, y, phi, bias, alpha = _inputs(m, 4, 12, torch.float32)
    x, y = x.detach(), y.detach()
    weight = torch.rand(12, device=DEVICE) + 0.5

    def step(x, y):
        u, h_post, h_res = library.mhc_pre(x, phi, bias, alpha)
        x_next, u2, _, _ = library.mhc_post_pre(x, u + y, h_post, h_res, phi, bias, alpha)
        if library.norm_fusable(x_next, weight, phi, bias, alpha):
            return x_next, library.mhc_pre_normed(x_next, phi, bias, alpha, weight, 1e-5)[0], u2
        return x_next, u2, u2

    torch._dynamo.reset()
    compiled = torch.compile(step, dynamic=True, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "eager")
    with torch.no_grad():
        for got, want in zip(compiled(x, y), step(x, y)):
            assert _rel(got, want) <= 1e-6


def test_dynamic_token_counts_compile_once():
    """A symbolic token count adds no guard beyond the few/many split: one graph serves 5 to
    33 tokens (the decode plan takes its largest token block for a symbolic count)."""
    from torch._dynamo.testing import CompileCounter

    _, _, phi, bias, alpha = _inputs(3, 4, 12, torch.float32)
    weight = torch.rand(12, device=DEVICE) + 0.5

    def step(x):
        u, h_post, h_res = library.mhc_pre(x, phi, bias, alpha)
        return library.mhc_pre_normed(x, phi, bias, alpha, weight, 1e-5)[0] + u, h_post, h_res

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(step, dynamic=True, fullgraph=True, backend=counter)
    with torch.no_grad():
        for m in (5, 6, 9, 17, 33):  # not 3 or 4: duck sizing would tie M to alpha or n
            x = torch.randn(m, 4, 12, device=DEVICE)
            for got, want in zip(compiled(x), step(x)):
                assert _rel(got, want) <= 1e-6
    assert counter.frame_count == 1


@pytest.mark.gpu
@pytest.mark.parametrize("c", [2048, 4096, 7168])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernels_full_size_on_gpu(c, dtype):
    # on the GPU float32 projections run as bf16 hi/lo splits on tensor cores (~2^-16 relative)
    _check(16384 if dtype == torch.bfloat16 else 2048, 4, c, dtype, "mhc", tol=1e-4 if dtype == torch.float32 else None)


@pytest.mark.gpu
@pytest.mark.parametrize("c", [2048, 4096, 7168])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_post_pre_full_size_on_gpu(c, dtype):
    _check_post_pre(16384 if dtype == torch.bfloat16 else 2048, 4, c, dtype, "mhc",
                    tol=1e-4 if dtype == torch.float32 else None)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7, 64])
@pytest.mark.parametrize("fused", [False, True])
def test_decode_token_counts_on_gpu(m, fused):
    """Few tokens take the decode tiles (many channel ranges, u computed with the
    coefficients): the same results at full width."""
    assert library.few_tokens(m)
    if fused:
        _check_post_pre(m, 4, 4096, torch.bfloat16, "mhc")
    else:
        _check(m, 4, 4096, torch.bfloat16, "mhc")


@pytest.mark.gpu
@pytest.mark.parametrize("m", [65, 128, 1000])
@pytest.mark.parametrize("fused", [False, True])
def test_prefill_token_counts_split_channels_further_on_gpu(m, fused):
    """Too few token blocks to fill the GPU (a prefill, a small batch) take more channel
    ranges per launch (projections, dH_pre, dx): the same results, forward and backward."""
    x = torch.empty(m, 4, 4096, device="cuda", dtype=torch.bfloat16)
    t = library._tiles(x, 4096, library.PROJ_TILES, "proj")
    _, splits = library._splits(x, 4096, t.channels, blocks=library._cdiv(m, t.tokens))
    assert splits > library._cdiv(4096, library.SPLIT_CHANNELS)
    if fused:
        _check_post_pre(m, 4, 4096, torch.bfloat16, "mhc")
    else:
        _check(m, 4, 4096, torch.bfloat16, "mhc")


@pytest.mark.gpu
def test_converted_llama_on_gpu_uses_kernels_compiled():
    from models import BY_NAME

    model = BY_NAME["llama"].build().cuda()
    ref = copy.deepcopy(model).eval()
    mhc.mhc_compile(model)  # backend="auto": the kernels on CUDA
    ids = torch.randint(0, 97, (2, 8), device="cuda")
    with torch.no_grad():
        assert _rel(model.eval()(ids).logits, ref(ids).logits) <= 1e-5
    model.train()
    compiled = torch.compile(model, fullgraph=True)
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None for p in mhc.mhc_parameters(model))


def _connection_grads(impl, inputs, mode, fused, **kw):
    """Grads of a pre -> post (-> pre -> post where ``fused``) chain w.r.t. all inputs."""
    x, y, phi, bias, alpha = inputs
    u, h_post, h_res = impl.mhc_pre(x, phi, bias, alpha, mode=mode)
    if fused:
        x2, u2, h_post2, h_res2 = impl.mhc_post_pre(x, y + u, h_post, h_res, phi, bias, alpha, mode=mode, **kw)
        out = impl.mhc_post(x2, y * u2, h_post2, h_res2, **kw)
    else:
        out = impl.mhc_post(x, y + u, h_post, h_res, **kw)
    gen = torch.Generator(device=out.device).manual_seed(1)
    g = torch.randn(out.shape, generator=gen, device=out.device).to(out.dtype)
    return torch.autograd.grad((out.float() * g.float()).sum(), [x, y, phi, bias, alpha])


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("n, c, m", [(4, 40, 9), (3, 70, 6)])
def test_deterministic_post_backward_matches_reference(n, c, m, fused):
    # channels 40 / 70 under the interpreter: several channel ranges, so the partial sums are reduced
    inputs = _inputs(m, n, c, torch.float32)
    got = _connection_grads(library, inputs, "mhc", fused, deterministic=True)
    ref = _connection_grads(reference, inputs, "mhc", fused)
    for name, a, b in zip(["dx", "dy", "dphi", "dbias", "dalpha"], got, ref):
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) <= TOL[torch.float32], (name, _rel(a, b))


def test_deterministic_option_reaches_the_kernels():
    idx = torch.randint(0, 97, (2, 7), device=DEVICE)
    det, ref = _converted_pair(idx, {"backend": "triton", "deterministic": True}, {"backend": "torch"})
    with _OpRecorder() as rec:
        det(idx, idx)[1].backward()
    flags = rec.deterministic_flags()
    assert flags and all(flags), flags  # 3 fused + 3 separate post backwards
    ref(idx, idx)[1].backward()
    for p, q in zip(mhc.mhc_parameters(det), mhc.mhc_parameters(ref)):
        assert _rel(p.grad, q.grad) <= 1e-4


def test_torch_deterministic_algorithms_turn_the_deterministic_path_on():
    x, y, phi, bias, alpha = _inputs(6, 4, 24, torch.float32)
    with _OpRecorder() as rec:
        _connection_grads(library, (x, y, phi, bias, alpha), "mhc", fused=True)
    assert rec.deterministic_flags() == [False, False]
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with _OpRecorder() as rec:
            _connection_grads(library, (x, y, phi, bias, alpha), "mhc", fused=True)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert rec.deterministic_flags() == [True, True]


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("c", [2048, 7168])
def test_deterministic_grads_are_bitwise_identical_on_gpu(c, fused):
    inputs = _inputs(16384, 4, c, torch.bfloat16)
    first = _connection_grads(library, inputs, "mhc", fused, deterministic=True)
    for _ in range(3):
        again = _connection_grads(library, inputs, "mhc", fused, deterministic=True)
        for name, a, b in zip(["dx", "dy", "dphi", "dbias", "dalpha"], again, first):
            assert torch.equal(a, b), name
    default = _connection_grads(library, inputs, "mhc", fused)  # float32 atomics: the same within rounding
    ref = _connection_grads(reference, inputs, "mhc", fused)
    for name, a, b, r in zip(["dx", "dy", "dphi", "dbias", "dalpha"], default, first, ref):
        assert _rel(a, b) <= 1e-3, name
        assert _rel(b, r) <= TOL[torch.bfloat16], name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_phi_split_kernel_gives_the_on_chip_hi_and_lo_parts(dtype):
    """``_split_phi_kernel``: ``phi [K, NC]`` -> ``[2, K, W]`` hi and lo parts whose sum is
    ``phi`` to about 2^-16, zero past ``NC`` (K not a multiple of the rows a program takes).
    float16: exactly torch's rounding; bfloat16: within one unit of it (the interpreter
    truncates to bfloat16 where a GPU rounds to nearest, as the on-chip split does there)."""
    from mhc_compile.ops.triton import kernels
    from mhc_compile.ops.triton.launch import launch

    k, lay = 4 * 70 + 3, library.layout(4)
    phi = torch.randn(k, lay.nc, generator=torch.Generator().manual_seed(0)).to(DEVICE) / 17
    parts = torch.full((2, k, lay.w), float("nan"), dtype=dtype, device=DEVICE)
    launch(kernels._split_phi_kernel, (library._cdiv(k, 64),), phi, parts, k, NC=lay.nc, W=lay.w, BK=64)
    hi, lo = parts[0, :, :lay.nc].float(), parts[1, :, :lay.nc].float()
    if dtype == torch.float16 or DEVICE == "cuda":
        assert torch.equal(hi, phi.to(dtype).float()) and torch.equal(lo, (phi - hi).to(dtype).float())
    assert ((hi - phi.to(dtype).float()).abs() <= phi.abs() * 2.0 ** -7).all()
    assert ((hi + lo - phi).abs() <= phi.abs() * 2.0 ** -14 + 2.0 ** -24).all()  # float16: lo may be subnormal
    assert lo.any() and (lo.abs() <= phi.abs() * 2.0 ** -7).all()  # a real second part, below hi's last bit
    assert not parts[:, :, lay.nc:].any()


@pytest.mark.gpu
@pytest.mark.parametrize("knob", ["PHI_T_BF16", "POST_PRE_PHI_PRESPLIT"])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("m, c", [(16384, 4096), (1000, 1536), (7, 4096)])
def test_phi_prepared_once_per_call_gives_the_same_bits_on_gpu(m, c, fused, knob, monkeypatch):
    """bf16 streams: ``phi`` rounded once per call instead of in every token block, each
    knob of ops/library.py on against off: the dx kernel's bf16 dot reading a bf16
    transpose (``PHI_T_BF16``), the fused post+pre projection reading hi + lo parts split
    by one launch (``POST_PRE_PHI_PRESPLIT``). The same bits either way."""
    inputs = _inputs(m, 4, c, torch.bfloat16)
    monkeypatch.setattr(library, knob, False)
    on_chip = _connection_grads(library, inputs, "mhc", fused, deterministic=True)
    monkeypatch.setattr(library, knob, True)
    prepared = _connection_grads(library, inputs, "mhc", fused, deterministic=True)
    ref = _connection_grads(reference, inputs, "mhc", fused)
    for name, a, b, r in zip(["dx", "dy", "dphi", "dbias", "dalpha"], prepared, on_chip, ref):
        assert torch.equal(a, b), name
        assert _rel(a, r) <= TOL[torch.bfloat16], name


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7, 64, 1000])
def test_direct_launches_give_triton_launchers_bits_on_gpu(m, monkeypatch):
    """Eager calls launch a kernel's call form directly from its second launch on
    (ops/triton/launch.py): the same bits as Triton's launcher, whose ``run`` they skip."""
    from triton.runtime.jit import JITFunction

    from mhc_compile.ops.triton import launch

    assert launch.DIRECT, "this Triton's JITFunction.run launches differently: direct launches are off"
    runs = []
    triton_run = JITFunction.run
    monkeypatch.setattr(JITFunction, "run", lambda self, *a, **k: runs.append(1) or triton_run(self, *a, **k))
    inputs = _inputs(m, 4, 4096, torch.bfloat16)
    monkeypatch.setattr(launch, "DIRECT", False)
    reference_bits = _connection_grads(library, inputs, "mhc", True, deterministic=True)
    monkeypatch.setattr(launch, "DIRECT", True)
    _connection_grads(library, inputs, "mhc", True, deterministic=True)  # first launch of each form
    runs.clear()
    direct_bits = _connection_grads(library, inputs, "mhc", True, deterministic=True)
    assert not runs, f"{len(runs)} launches went through Triton's launcher"
    for name, a, b in zip(["dx", "dy", "dphi", "dbias", "dalpha"], direct_bits, reference_bits):
        assert torch.equal(a, b), name


def _autocast_mhc_grads(model, state, ids, backend, autocast, stream_dtype):
    """Grads of every connection's ``alpha`` and ``bias`` (concatenated) after one
    forward/backward of ``model`` converted with ``backend``, parameters from ``state``."""
    converted = mhc.mhc_compile(copy.deepcopy(model), backend=backend, stream_dtype=stream_dtype)
    converted.load_state_dict(state)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = converted(input_ids=ids, labels=ids).loss
    loss.backward()
    named = dict(converted.named_parameters())
    return {k: torch.cat([p.grad.flatten() for n, p in named.items() if ".mhc." in n and n.endswith(k)])
            for k in ("alpha", "bias")}


@pytest.mark.gpu
@pytest.mark.parametrize("stream_dtype", [None, torch.float32])  # None: the autocast dtype
def test_autocast_grads_of_alpha_and_bias_as_close_as_the_reference_path(stream_dtype):
    """Under bf16 autocast the kernels' grads of alpha and bias are no further from a float32
    run than the reference ops' grads under the same autocast (within 2x)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2)
    base = Qwen2ForCausalLM(cfg).cuda()
    ids = torch.randint(0, 512, (4, 128), device="cuda")
    trained = mhc.mhc_compile(copy.deepcopy(base), backend="torch", init="preserve", stream_dtype=stream_dtype)
    opt = torch.optim.AdamW(trained.parameters(), lr=3e-3)
    for _ in range(3):  # a few steps: alpha leaves 0 and the streams differ
        trained(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        for p in mhc.mhc_parameters(trained):
            if p.numel() == 3:  # alpha: Adam moves alpha_res little while its grad is ~0
                p.add_(0.05 * torch.rand_like(p))
    state = trained.state_dict()
    truth = _autocast_mhc_grads(base, state, ids, "torch", False, stream_dtype)
    ref = _autocast_mhc_grads(base, state, ids, "torch", True, stream_dtype)
    got = _autocast_mhc_grads(base, state, ids, "triton", True, stream_dtype)
    for name in ("alpha", "bias"):
        err_ref, err_got = _rel(ref[name], truth[name]), _rel(got[name], truth[name])
        assert err_ref > 0 and err_got <= 2 * err_ref, (name, err_got, err_ref)


@pytest.mark.parametrize("n", range(1, library.MAX_STREAMS + 1))
def test_coefficient_layout(n):
    """phi's real columns fit the projection dot (a power of two >= 16, tl.dot's minimum),
    and the padded on-chip blocks hold n streams and an n x n res block."""
    lay = library.layout(n)
    assert lay.nc == n * n + 2 * n <= lay.w and lay.w >= 16 and lay.w & (lay.w - 1) == 0
    assert lay.npad >= n and lay.np >= max(16, lay.npad) and lay.nr == lay.npad ** 2
    assert lay.qw == 2 * lay.np + lay.nr
    assert set(lay.constants()) == {"NPAD", "NP", "NR", "NC", "W", "QW"}


def test_named_kernel_settings():
    from mhc_compile.ops.settings import DotMode, Tiles

    t = Tiles(tokens=64, channels=32, warps=4, stages=3)
    assert t.launch() == {"BM": 64, "BC": 32, "num_warps": 4, "num_stages": 3}
    assert Tiles(16, 1, 4).launch(channels=False) == {"BM": 16, "num_warps": 4}  # Triton's default stages
    with pytest.raises(mhc.MHCConfigError, match="Tiles.warps must be a positive int"):
        Tiles(64, 32, 0)
    x = torch.randn(2, 4, 8, device=DEVICE)
    assert library._dot_mode(x) == (DotMode.IEEE_FP32 if DEVICE == "cpu" else DotMode.SPLIT_AB)
    assert library._back_dot(DotMode.SPLIT_B) == DotMode.BF16 and library._back_dot(DotMode.SPLIT_AB) == DotMode.SPLIT_AB
