"""The compiled CPU connection kernels (``ops/csrc/connection_cpu.cpp`` through ``ops/native.py``).

Each side, forward and backward, is checked against the whole-tensor formulation of
``ops/cpu.py`` (the same functions with the compiled code switched off) and against
``ops/reference.py``, on random inputs, for both modes, three stream dtypes, token counts
that are and are not a multiple of the kernels' 16-token tiles and several stream counts;
float64 also against finite differences.
"""

from __future__ import annotations

import functools
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from mhc_compile.ops import cpu, native
from mhc_compile.ops import reference as R


def _params(n, c, dtype=torch.float32):
    phi = torch.randn(n * c, n * n + 2 * n, dtype=dtype) / math.sqrt(n * c)
    bias = torch.randn(n * n + 2 * n, dtype=dtype)
    alpha = torch.rand(3, dtype=dtype) + 0.1
    return phi, bias, alpha


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture
def whole_tensor_ops(monkeypatch):
    """A context in which the CPU ops run their whole-tensor formulation."""
    def switch_off():
        monkeypatch.setattr(native, "usable", lambda x: False)
    return switch_off


def test_the_kernels_build_on_this_machine():
    """CI machines have a C++ compiler and ninja: the compiled path must not fall back silently."""
    assert native.available()
    x = torch.randn(5, 4, 8)
    assert native.usable(x)
    assert not native.usable(x.to("meta")) and not native.usable(x.int())


def _connection(ops, x, y, h_post, h_res, phi, bias, alpha, mode, grads_of, fused=False):
    """post then pre (two ops, or ``mhc_post_pre``) on random upstream gradients: outputs and
    the gradients of ``grads_of``."""
    if fused:
        outs = ops.mhc_post_pre(x, y, h_post, h_res, phi, bias, alpha, mode=mode)
    else:
        x_next = ops.mhc_post(x, y, h_post, h_res)
        outs = (x_next, *ops.mhc_pre(x_next, phi, bias, alpha, mode=mode))
    gen = torch.Generator().manual_seed(7)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for o in outs)
    return outs, torch.autograd.grad(loss, grads_of)


@pytest.mark.parametrize("mode", ["mhc", "hc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("m,n,c", [(37, 4, 24), (16, 1, 8), (5, 6, 40), (1, 4, 64), (37, 2, 128),
                                   (37, 4, 64), (9, 16, 64)])
@pytest.mark.parametrize("fused", [False, True], ids=["post,pre", "post_pre"])
def test_compiled_sides_match_the_whole_tensor_ops_and_the_reference(mode, dtype, m, n, c, fused, whole_tensor_ops):
    torch.manual_seed(0)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    phi, bias, alpha = (t.to(acc).requires_grad_() for t in _params(n, c))
    x = torch.randn(m, n, c).to(dtype).requires_grad_()
    y = torch.randn(m, c).to(dtype).requires_grad_()
    h_post = (torch.rand(m, n, dtype=acc) * 2).requires_grad_()
    h_res = torch.rand(m, n, n, dtype=acc).softmax(-1).requires_grad_()
    leaves = (x, y, h_post, h_res, phi, bias, alpha)
    args = (x, y, h_post, h_res, phi, bias, alpha, mode, leaves, fused)

    compiled = _connection(cpu, *args)
    whole_tensor_ops()
    whole = _connection(cpu, *args)
    # the reference computes in float32 only: float64 is checked against the whole-tensor ops (and by gradcheck)
    reference = whole if dtype == torch.float64 else _connection(R, *args)

    names = ("x_next", "u", "h_post", "h_res", *(f"d{name}" for name in ("x", "y", "h_post", "h_res", "phi", "bias", "alpha")))
    # float32: the kernels sum the projection in another order than torch.mm; dalpha, a sum of
    # signed terms over every token and column, shows it most (2.8e-6 at 37 x 2 x 128)
    tol = {torch.float64: 1e-12, torch.float32: 5e-6, torch.bfloat16: 1e-2}[dtype]
    for name, got, same_math, ref in zip(names, sum(compiled, ()), sum(whole, ()), sum(reference, ())):
        assert got.dtype == same_math.dtype and got.shape == same_math.shape, name
        assert _rel(got, same_math) < tol, (name, _rel(got, same_math))
        assert _rel(got, ref) < max(tol, 1e-5), (name, _rel(got, ref))


def test_fused_side_gradcheck():
    """The fused post + pre node's backward (X_next's own gradient added in the pre side's
    pass) against finite differences."""
    m, n, c = 19, 3, 4
    phi, bias, alpha = (t.double().requires_grad_() for t in _params(n, c))
    x = torch.randn(m, n, c, dtype=torch.float64, requires_grad=True)
    y = torch.randn(m, c, dtype=torch.float64, requires_grad=True)
    h_post = torch.rand(m, n, dtype=torch.float64, requires_grad=True)
    h_res = torch.rand(m, n, n, dtype=torch.float64, requires_grad=True)
    fn = lambda *a: cpu.mhc_post_pre(*a, sinkhorn_iters=5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, y, h_post, h_res, phi, bias, alpha))


def test_some_outputs_without_gradients(whole_tensor_ops):
    """Only u used (h_post, h_res without gradients), and a post side whose y needs none."""
    torch.manual_seed(1)
    phi, bias, alpha = (t.requires_grad_() for t in _params(4, 16))
    x = torch.randn(21, 4, 16, requires_grad=True)
    y = torch.randn(21, 16)
    h_post, h_res = torch.rand(21, 4, requires_grad=True), torch.rand(21, 4, 4)

    def grads():
        u, _, _ = cpu.mhc_pre(x, phi, bias, alpha)
        out = cpu.mhc_post(x, y, h_post, h_res)
        loss = (u * torch.linspace(-1, 1, 16)).sum() + (out * out).sum()
        return torch.autograd.grad(loss, (x, phi, bias, alpha, h_post))

    compiled = grads()
    whole_tensor_ops()
    for got, want in zip(compiled, grads()):
        assert _rel(got, want) < 2e-6


def test_post_side_with_a_branch_output_of_another_dtype(whole_tensor_ops):
    """float32 streams, bf16 branch output (autocast): the compiled mix runs in float32."""
    torch.manual_seed(2)
    x = torch.randn(33, 4, 24, requires_grad=True)
    y = torch.randn(33, 24).bfloat16().requires_grad_()
    h_post, h_res = torch.rand(33, 4, requires_grad=True), torch.rand(33, 4, 4, requires_grad=True)

    def run():
        out = cpu.mhc_post(x, y, h_post, h_res)
        return (out, *torch.autograd.grad((out * out).sum(), (x, y, h_post, h_res)))

    compiled = run()
    whole_tensor_ops()
    for got, want in zip(compiled, run()):
        assert got.dtype == want.dtype and _rel(got, want) < 2e-6


def test_a_converted_model_trains_the_same_with_and_without_the_compiled_kernels(whole_tensor_ops):
    """The demo's model, converted, three AdamW steps: the same losses and parameters."""
    from mhc_compile.api import mhc_compile
    from mhc_compile.demo import TinyGPT

    def train():
        torch.manual_seed(0)
        model = TinyGPT(32, 2, seq_len=16)
        mhc_compile(model, n_streams=4, init="paper", example_inputs=torch.zeros(2, 16, dtype=torch.long))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        idx = torch.randint(0, 256, (3, 17), generator=torch.Generator().manual_seed(3))
        losses = []
        for _ in range(3):
            loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, torch.cat([p.detach().flatten() for p in model.parameters()])

    calls = []
    real_ops = native.ops
    with pytest.MonkeyPatch.context() as patch:  # count the compiled calls: the model runs them
        patch.setattr(native, "ops", lambda: calls.append(1) or real_ops())
        losses, params = train()
    assert len(calls) > 0
    whole_tensor_ops()
    losses_whole, params_whole = train()
    assert losses == pytest.approx(losses_whole, rel=1e-5)
    # Adam normalises each update by the gradient's size, so entries whose gradient is at float32
    # noise level move by about lr either way: the parameters agree less closely than the losses
    assert _rel(params, params_whole) < 2e-4


def test_environment_switch_turns_the_compiled_kernels_off(monkeypatch):
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    assert not native.enabled() and not native.usable(torch.randn(3, 4, 8))
    monkeypatch.setenv(native.ENV_SWITCH, "1")
    assert native.enabled()


def test_a_failed_build_warns_once_and_the_ops_still_compute(monkeypatch, tmp_path):
    """No compiler, no ninja or a broken source: one RuntimeWarning naming the fix, then the
    whole-tensor formulation (same results)."""
    monkeypatch.setattr(native, "SOURCE", str(tmp_path / "missing.cpp"))
    monkeypatch.setattr(native, "_load", native._load.__wrapped__)  # uncached: builds again
    monkeypatch.setattr(native, "_capability", lambda: "TEST_MISSING")
    monkeypatch.setattr(native, "_WARNED", [])
    with pytest.warns(RuntimeWarning, match="could not be built.*MHC_CPU_KERNELS=0"):
        assert not native.available()
    phi, bias, alpha = _params(4, 8)
    x = torch.randn(6, 4, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        u, h_post, h_res = cpu.mhc_pre(x, phi, bias, alpha)
    _, h_post_ref, h_res_ref = R.mhc_pre(x, phi, bias, alpha)
    assert _rel(h_res, h_res_ref) < 1e-5 and _rel(h_post, h_post_ref) < 1e-5


def test_torch_compile_sees_the_whole_tensor_formulation():
    """Under torch.compile the CPU ops trace as whole-tensor math (no opaque compiled call)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    phi, bias, alpha = _params(4, 8)
    x = torch.randn(20, 4, 8)
    backend = CompileCounterWithBackend("eager")
    fn = torch.compile(lambda t: cpu.mhc_pre(t, phi, bias, alpha), backend=backend, fullgraph=True)
    got = fn(x)
    want = cpu.mhc_pre(x, phi, bias, alpha)
    assert backend.frame_count == 1
    targets = {str(node.target) for graph in backend.graphs for node in graph.graph.nodes}
    assert not any("mhc_cpu" in t for t in targets)
    for a, b in zip(got, want):
        assert _rel(a, b) < 1e-5


def test_ninja_from_the_ninja_package_when_path_lacks_it(monkeypatch):
    """In a virtual environment that is not activated, the ninja package's binary is not on PATH."""
    import ninja

    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    monkeypatch.setenv("PATH", "/nonexistent")
    native._put_ninja_on_path()
    assert os.environ["PATH"].split(os.pathsep)[0] == ninja.BIN_DIR


def test_a_warnings_filter_that_raises_does_not_break_the_fallback(monkeypatch, tmp_path):
    """Under ``-W error`` the failed build's warning raises once; later calls take the whole-tensor ops."""
    monkeypatch.setattr(native, "SOURCE", str(tmp_path / "missing.cpp"))
    monkeypatch.setattr(native, "_load", functools.lru_cache(maxsize=None)(native._load.__wrapped__))
    monkeypatch.setattr(native, "_capability", lambda: "TEST_MISSING")
    monkeypatch.setattr(native, "_WARNED", [])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(RuntimeWarning, match="could not be built"):
            native.available()
        assert not native.available()  # no second warning, no second build
    assert native._load.cache_info().misses == 1


def test_compile_errors_are_reported_by_their_first_error_line(monkeypatch, tmp_path):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++;\n")
    monkeypatch.setattr(native, "SOURCE", str(broken))
    monkeypatch.setattr(native, "_capability", lambda: "TEST_BROKEN")
    reason = native._load.__wrapped__()
    assert "error:" in reason and len(reason) < 400 and "\\n" not in reason


def test_operands_that_broadcast_take_the_whole_tensor_ops(whole_tensor_ops):
    """The kernels read whole operands: a broadcasting y or H_post goes to the whole-tensor ops, and
    the kernels themselves refuse a wrong shape instead of reading past it."""
    torch.manual_seed(3)
    x, y = torch.randn(40, 4, 8), torch.randn(40, 8)
    h_post, h_res = torch.rand(40, 4) * 2, torch.rand(40, 4, 4).softmax(-1)
    for args in ((x, y[:1], h_post, h_res), (x, y, h_post[:, :1], h_res)):
        got, want = cpu.mhc_post(*args), R.mhc_post(*args)
        assert _rel(got, want) < 1e-6
    with pytest.raises(RuntimeError, match="post_forward: h_post must be"):
        native.ops().post_forward(x, y, h_post[:, :1].contiguous(), h_res)
    phi, bias, alpha = _params(4, 8)
    with pytest.raises(RuntimeError, match="pre_forward: bias must be"):
        native.ops().pre_forward(x, phi, bias[:-1].contiguous(),
                                 torch.ones(24), True, 20, 1e-6, 1e-30)


@pytest.mark.parametrize("fused", [False, True])
def test_backward_inside_autocast_keeps_float32(fused, whole_tensor_ops):
    """A backward run inside ``torch.autocast("cpu", bfloat16)``: products stay float32."""
    torch.manual_seed(4)
    phi, bias, alpha = (t.requires_grad_() for t in _params(4, 16))
    x = torch.randn(24, 4, 16, requires_grad=True)
    y = torch.randn(24, 16, requires_grad=True)
    h_post, h_res = torch.rand(24, 4, requires_grad=True), torch.rand(24, 4, 4, requires_grad=True)
    leaves = (x, y, h_post, h_res, phi, bias, alpha)

    def grads(autocast: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            _, outs = _connection(cpu, *leaves, "mhc", leaves, fused)
        return outs

    outside = grads(False)
    for got, want in zip(grads(True), outside):
        assert got.dtype == want.dtype and _rel(got, want) < 1e-6
    whole_tensor_ops()
    for got, want in zip(grads(True), outside):
        assert _rel(got, want) < 1e-5


@pytest.mark.parametrize("gap", [80.0, 90.0, 100.0, 103.0, 110.0])
def test_logits_far_below_the_row_maximum(gap, whole_tensor_ops):
    """exp of a logit 88-104 below its row's maximum is subnormal, and Sinkhorn scales such a column
    back up to order 1: the compiled exp keeps subnormals as torch does."""
    x = torch.randn(3, 4, 8)
    phi = torch.zeros(32, 24)
    bias = torch.zeros(24)
    bias[8:] = torch.tensor([[-gap, 0.0, 0.0, 0.0]] * 4).flatten()
    alpha = torch.ones(3)
    got = cpu.mhc_pre(x, phi, bias, alpha)[2]
    want = R.mhc_pre(x, phi, bias, alpha)[2]
    whole_tensor_ops()
    same_math = cpu.mhc_pre(x, phi, bias, alpha)[2]
    assert _rel(got, want) < 1e-5 and _rel(got, same_math) < 1e-5


def test_fused_side_used_only_through_x_next_gives_no_coefficient_gradients():
    """Only X_next used downstream: phi, bias and alpha get None, as with two separate ops."""
    phi, bias, alpha = (t.requires_grad_() for t in _params(4, 8))
    x = torch.randn(10, 4, 8, requires_grad=True)
    y, h_post, h_res = torch.randn(10, 8), torch.rand(10, 4), torch.rand(10, 4, 4)
    x_next = cpu.mhc_post_pre(x, y, h_post, h_res, phi, bias, alpha)[0]
    g_x, g_phi, g_bias, g_alpha = torch.autograd.grad(x_next.sum(), (x, phi, bias, alpha), allow_unused=True)
    assert g_phi is None and g_bias is None and g_alpha is None
    assert _rel(g_x, torch.autograd.grad(R.mhc_post(x, y, h_post, h_res).sum(), x)[0]) < 1e-6


def test_an_in_place_change_of_the_returned_h_res_leaves_the_backward_intact():
    phi, bias, alpha = (t.requires_grad_() for t in _params(4, 8))
    x = torch.randn(10, 4, 8, requires_grad=True)
    u, h_post, h_res = cpu.mhc_pre(x, phi, bias, alpha)
    expected = torch.autograd.grad((u.sum() + h_res.sum()), phi, retain_graph=True)[0]
    h_res.mul_(1.0)  # the caller's own copy
    assert torch.equal(torch.autograd.grad((u.sum() + h_res.sum()), phi)[0], expected)


def test_sinkhorn_iterations_must_be_positive():
    phi, bias, alpha = _params(4, 8)
    with pytest.raises(ValueError, match="sinkhorn_iters must be a positive int"):
        cpu.mhc_pre(torch.randn(5, 4, 8), phi, bias, alpha, sinkhorn_iters=0)
