"""A pre side computing the RMSNorm that follows it (``passes.norm``, the kernels' NORM
epilogue): same results as the norm module, only where the norm is Llama-style, only in
no-grad calls with few tokens, and the module's own call everywhere else."""

import copy
import inspect
import math

import pytest
import torch
from torch import nn

import mhc_compile as mhc
from mhc_compile.ops import functional, library
from mhc_compile.passes.norm import llama_style_rms_norm

pytestmark = pytest.mark.skipif(not library.KERNELS_AVAILABLE, reason="needs the triton package")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _llama_norm(u, weight, eps):
    h = u.float()
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(u.dtype)


def _inputs(m, n, c, dtype):
    x = torch.randn(m, n, c, device=DEVICE).to(dtype)
    y = torch.randn(m, c, device=DEVICE).to(dtype)
    phi = torch.randn(n * c, n * n + 2 * n, device=DEVICE) / math.sqrt(n * c)
    bias = torch.randn(n * n + 2 * n, device=DEVICE) * 0.5
    alpha = torch.rand(3, device=DEVICE) + 0.3
    weight = (torch.randn(c, device=DEVICE) * 0.3 + 1.0).to(dtype)
    return x, y, phi, bias, alpha, weight


def _check_normed(m, c, dtype):
    x, y, phi, bias, alpha, weight = _inputs(m, 4, c, dtype)
    with torch.no_grad():
        assert library.norm_fusable(x, weight, phi, bias, alpha)
        normed, h_post, h_res = library.mhc_pre_normed(x, phi, bias, alpha, weight, 1e-5)
        u_ref, h_post_ref, h_res_ref = library.mhc_pre(x, phi, bias, alpha)
        x2, normed2, h_post2, h_res2 = library.mhc_post_pre_normed(x, y, h_post, h_res, phi, bias, alpha, weight, 1e-5)
        x2_ref, u2_ref, _, _ = library.mhc_post_pre(x, y, h_post, h_res, phi, bias, alpha)
    # the coefficients of a normed call come from token blocks of another size (float32 sums in another order)
    assert _rel(h_post, h_post_ref) <= 1e-6 and _rel(h_res, h_res_ref) <= 1e-6 and torch.equal(x2, x2_ref)
    for got, u in ((normed, u_ref), (normed2, u2_ref)):
        assert got.dtype == dtype and torch.isfinite(got).all()
        assert _rel(got, _llama_norm(u, weight, 1e-5)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m, c", [(1, 40), (5, 24), (17, 64), (3, 520)])  # (3, 520): rows in chunks
def test_pre_side_with_its_norm_matches_the_pre_side_then_the_norm(m, c, dtype):
    _check_normed(m, c, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7, 64])
def test_pre_side_with_its_norm_full_width_on_gpu(m):
    _check_normed(m, 4096, torch.bfloat16)


def test_only_no_grad_calls_with_few_tokens_take_the_norm():
    x, _, phi, bias, alpha, weight = _inputs(3, 4, 24, torch.float32)
    with torch.no_grad():
        assert library.norm_fusable(x, weight, phi)
        assert not library.norm_fusable(torch.randn(library.DECODE_TOKENS + 1, 4, 24, device=DEVICE), weight, phi)
        assert not library.norm_fusable(x, weight.double(), phi)  # the weight must have the streams' dtype
        assert not library.norm_fusable(x, weight[:-1], phi)
    assert not library.norm_fusable(x, weight, phi.requires_grad_())  # a gradient to record


class _GemmaStyleRMSNorm(nn.Module):
    """``x * (1 + w)``: a different norm, which must stay a module call."""

    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c) * 0.1)
        self.eps = 1e-6

    def forward(self, x):
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight.float())).to(x.dtype)


class _OtherEpsRMSNorm(nn.Module):
    """Llama's formula, but not with the epsilon it stores."""

    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c) * 0.1 + 1.0)
        self.variance_epsilon = 1e-6

    def forward(self, x):
        return _llama_norm(x, self.weight, 1e-2)


def test_the_probe_accepts_llama_style_norms_only():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    llama = LlamaRMSNorm(24, eps=1e-5)
    nn.init.normal_(llama.weight, 1.0, 0.3)
    assert llama_style_rms_norm(llama)
    assert not llama_style_rms_norm(_GemmaStyleRMSNorm(24))
    assert not llama_style_rms_norm(_OtherEpsRMSNorm(24))
    assert not llama_style_rms_norm(nn.LayerNorm(24))  # a LayerNorm (its eps is an attribute too)
    batch_norm = nn.BatchNorm1d(24)
    assert not llama_style_rms_norm(batch_norm) and not batch_norm.num_batches_tracked  # never called
    assert type(llama) in functional.FUSABLE_NORMS and _GemmaStyleRMSNorm not in functional.FUSABLE_NORMS


def _llama(dtype=torch.float32):
    from models import BY_NAME

    torch.manual_seed(0)
    model = BY_NAME["llama"].build().to(DEVICE, dtype).eval()
    for layer in model.model.layers:  # not all ones: a norm that ignored its weight would show
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            nn.init.normal_(norm.weight, 1.0, 0.3)
    return model


def _converted_pair(original, monkeypatch):
    """``original`` converted with and without the norm pass (post+pre fused in both)."""
    import mhc_compile.blocks as blocks

    fused, without = copy.deepcopy(original), copy.deepcopy(original)
    torch.manual_seed(1)  # the same new parameters in both
    mhc.mhc_compile(fused, backend="triton")
    with monkeypatch.context() as patch:
        patch.setattr(blocks, "fuse_pre_norms", lambda gm: 0)
        torch.manual_seed(1)
        mhc.mhc_compile(without, backend="triton")
    return fused, without


def _count_normed_calls(monkeypatch):
    calls = []
    for name in ("mhc_pre_normed", "mhc_post_pre_normed"):
        fn = getattr(library, name)
        monkeypatch.setattr(library, name, lambda *a, _fn=fn, _name=name, **k: (calls.append(_name), _fn(*a, **k))[1])
    return calls


def test_converted_llama_hands_its_norms_to_the_pre_sides(monkeypatch):
    """The norms leave the rewritten graph, decode takes the kernels' norm, and the model
    gives the same logits and tokens as without the norm pass and as the original."""
    original = _llama()
    fused, separate = _converted_pair(original, monkeypatch)
    for layer in fused.model.layers:
        assert layer._mhc_plan.variants
        for variant in layer._mhc_plan.variants.values():
            code = inspect.getsource(variant.forward)
            assert "self.input_layernorm(" not in code and "self.post_attention_layernorm(" not in code
            assert code.count("norm = ") == 2  # handed to the two pre sides
    calls = _count_normed_calls(monkeypatch)
    ids = torch.randint(0, 97, (1, 6), device=DEVICE)
    with torch.no_grad():
        logits, logits_separate, logits_original = fused(ids).logits, separate(ids).logits, original(ids).logits
        tokens = fused.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
        tokens_original = original.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert calls.count("mhc_pre_normed") >= 2 and calls.count("mhc_post_pre_normed") >= 2
    assert _rel(logits, logits_separate) <= 1e-5 and _rel(logits, logits_original) <= 1e-5
    assert torch.equal(tokens, tokens_original)


def test_training_and_hooks_take_the_norm_modules(monkeypatch):
    """With gradients, or with a hook on a norm, the module itself runs: the same
    gradients as without the norm pass, and the hook sees its call."""
    original = _llama()
    fused, separate = _converted_pair(original, monkeypatch)
    calls = _count_normed_calls(monkeypatch)
    ids = torch.randint(0, 97, (2, 5), device=DEVICE)
    for model in (fused, separate):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
    assert not calls
    for a, b in zip(fused.parameters(), separate.parameters()):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:  # the same ops in the same order: the module runs in both
            assert torch.equal(a.grad, b.grad)
    seen = []
    fused.eval().model.layers[1].input_layernorm.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        assert _rel(fused(ids).logits, separate.eval()(ids).logits) <= 1e-5
    assert seen == [torch.Size([2, 5, 32])]  # the layout the module had before conversion
    assert calls.count("mhc_post_pre_normed") == 2 and calls.count("mhc_pre_normed") == 1  # layer 1's own fell back


@pytest.mark.gpu
def test_bf16_llama_decode_with_kernel_norms_on_gpu(monkeypatch):
    original = _llama(torch.bfloat16)
    fused = copy.deepcopy(original)
    mhc.mhc_compile(fused)
    calls = _count_normed_calls(monkeypatch)
    ids = torch.randint(0, 97, (1, 6), device=DEVICE)
    with torch.no_grad():
        tokens = fused.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        tokens_original = original.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert calls and torch.equal(tokens, tokens_original)


def _compiled_graph_ops(model, ids, backend):
    """Run ``torch.compile(model.forward, fullgraph=True)`` once on ``ids``; returns the
    logits and the ``mhc_compile`` ops of the captured graph."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    logits = torch.compile(model.forward, backend=counter, fullgraph=True)(input_ids=ids).logits
    ops = [str(node.target) for graph in counter.graphs for node in graph.graph.nodes
           if node.op == "call_function" and "mhc_compile" in str(node.target)]
    return logits, ops


def test_compiled_decode_takes_the_kernels_norm(monkeypatch):
    """Under ``torch.compile`` (no grad, few tokens) the captured graph calls the ops that
    compute the norms (one graph, no break) and gives the eager model's logits; with
    gradients, or with more tokens, the graph calls the norm modules instead."""
    original = _llama()
    fused = copy.deepcopy(original)
    mhc.mhc_compile(fused, backend="triton")
    backend = "inductor" if DEVICE == "cuda" else "eager"  # the interpreter runs eagerly
    ids = torch.randint(0, 97, (1, 3), device=DEVICE)
    with torch.no_grad():
        expected, logits_original = fused(ids).logits, original(ids).logits
        logits, ops = _compiled_graph_ops(fused, ids, backend)
    assert len([op for op in ops if "normed" in op]) == 2 * len(fused.model.layers), ops
    assert _rel(logits, expected) <= 1e-5 and _rel(logits, logits_original) <= 1e-5
    logits, ops = _compiled_graph_ops(fused, ids, backend)  # with gradients
    assert ops and not [op for op in ops if "normed" in op] and _rel(logits, expected) <= 1e-5
    monkeypatch.setattr(library, "DECODE_TOKENS", 2)  # 3 tokens are now many
    with torch.no_grad():
        logits, ops = _compiled_graph_ops(fused, ids, backend)
    assert ops and not [op for op in ops if "normed" in op] and _rel(logits, expected) <= 1e-5


@pytest.mark.skipif(DEVICE == "cuda", reason="Triton's interpreter only")
def test_tracing_the_interpreters_kernels_into_a_graph_is_refused():
    """Under ``TRITON_INTERPRET=1`` AOTAutograd would trace an op's body without its
    (eagerly interpreted) kernels: a clear error instead of outputs never written."""
    x, _, phi, bias, alpha, _ = _inputs(2, 4, 24, torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: library.mhc_pre(x, phi, bias, alpha)[0], backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match="interpreter .*cannot be traced"):
        compiled(x)
