"""The inner stream state of a block recomputed in the backward instead of stored.

``recompute_streams=True`` (the default) marks each ``mhc_post_pre -> mhc_post`` link
(:mod:`mhc_compile.passes.streams`): the fused op does not keep its ``X_next`` and the post
keeps the fused op's inputs in its place; both backwards rebuild ``X_next``. The results
must be those of the stored path, and one n-stream tensor per block fewer must be kept.
On the CPU the kernels run under TRITON_INTERPRET=1; the ``gpu`` tests repeat at full size
and measure the peak memory of a compiled training step.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mhc_compile as mhc
from mhc_compile.ops import library

pytestmark = pytest.mark.skipif(not library.KERNELS_AVAILABLE, reason="needs the triton package")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _stream_storages(fn, channels: int):
    """Run ``fn()``; return its result and the storages of the ``[M, 4, channels]`` tensors
    autograd kept for the backward (saved-tensor hooks see every tensor an op saves)."""
    saved = {}

    def pack(t):
        if t.dim() == 3 and t.shape[1:] == (4, channels):
            saved[t.untyped_storage().data_ptr()] = t.shape
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, saved


def _chain_inputs(m, c, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n, nc = 4, 24

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(DEVICE)

    return [rand(m, n, c).to(dtype), rand(m, c).to(dtype), torch.rand(m, n, generator=gen).to(DEVICE),
            torch.rand(m, n, n, generator=gen).to(DEVICE), rand(n * c, nc, scale=1 / math.sqrt(n * c)),
            rand(nc, scale=0.5), torch.rand(3, generator=gen).to(DEVICE) + 0.3, rand(m, c).to(dtype)]


def _chain(inputs, recompute: bool, deterministic: bool):
    """``post_pre`` then ``post`` on its ``X_next`` (a block's two connections): outputs,
    the gradients of every input and the stream storages kept."""
    leaves = [t.clone().requires_grad_() for t in inputs]
    x, y, h_post, h_res, phi, bias, alpha, y2 = leaves

    def forward():
        x_next, u, h_post2, h_res2 = library.mhc_post_pre(
            x, y, h_post, h_res, phi, bias, alpha, deterministic=deterministic, keep_next=not recompute)
        out = library.mhc_post(x_next, y2 * u, h_post2, h_res2, deterministic=deterministic,
                               source=(x, y, h_post, h_res) if recompute else None)
        return out, u

    (out, u), kept = _stream_storages(forward, inputs[0].shape[2])
    gen = torch.Generator().manual_seed(5)
    g_out = torch.randn(out.shape, generator=gen).to(DEVICE)
    g_u = torch.randn(u.shape, generator=gen).to(DEVICE)
    grads = torch.autograd.grad((out.float() * g_out).sum() + (u.float() * g_u).sum(), leaves)
    return [out.detach(), u.detach(), *grads], kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("m, c", [(19, 24), (70, 40)])  # 70 tokens: the training tiles, several token blocks
def test_recomputed_inner_stream_gives_the_stored_paths_results(m, c, dtype, deterministic):
    inputs = _chain_inputs(m, c, dtype)
    stored, kept_stored = _chain(inputs, recompute=False, deterministic=deterministic)
    recomputed, kept_recomputed = _chain(inputs, recompute=True, deterministic=deterministic)
    names = ["out", "u", "dx", "dy", "dh_post", "dh_res", "dphi", "dbias", "dalpha", "dy2"]
    for name, a, b in zip(names, recomputed, stored):
        assert torch.isfinite(a).all(), name
        if DEVICE == "cpu":  # the interpreter computes X_next the same way in every kernel
            assert torch.equal(a, b), name
        else:  # on the GPU the stream sum's order follows each kernel's tile layout: last-bit differences
            assert _rel(a, b) <= (1e-6 if dtype == torch.float32 else 1e-3), (name, _rel(a, b))
    # stored: x and X_next; recomputed: x only (the post keeps the fused op's inputs)
    assert len(kept_stored) == 2 and len(kept_recomputed) == 1
    assert inputs[0].shape in kept_recomputed.values()


def test_source_must_match_the_streams():
    x, y, h_post, h_res = _chain_inputs(6, 8, torch.float32)[:4]
    with pytest.raises(library.KernelInputError, match="source streams must be like x"):
        library.mhc_post(x, y, h_post, h_res, source=(x.to(torch.bfloat16), y, h_post, h_res))


class _OpArgs(TorchDispatchMode):
    """The arguments of each ``post_pre_fwd`` and ``post_fwd`` call that runs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func).split(".")
        if name[0] == "mhc_compile" and name[1] in ("post_pre_fwd", "post_fwd"):
            self.calls.append((name[1], args))
        return func(*args, **(kwargs or {}))

    def links(self):
        """(``keep_next`` of each fused call, whether each post call was given a source)."""
        # the dispatcher leaves out trailing arguments at their defaults (True, None)
        keep = [a[11] if len(a) > 11 else True for n, a in self.calls if n == "post_pre_fwd"]
        sources = [len(a) > 5 and a[5] is not None for n, a in self.calls if n == "post_fwd"]
        return keep, sources


def _converted_llama(**options):
    """A two-layer Hugging Face Llama (hidden 32: the interpreter is slow), converted with
    ``init="paper"`` (mixing away from the identity) and the kernels unless ``options`` say."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=50, max_position_embeddings=32)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(DEVICE)
    ids = torch.randint(0, 50, (1, 8), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    torch.manual_seed(2)
    mhc.mhc_compile(model, **{"backend": "triton", "init": "paper", "example_inputs": (ids,), **options})
    return model.train(), ids


def _step(model, ids):
    """Loss, parameter gradients, kept stream storages and the op calls of one step."""
    with _OpArgs() as ops:
        loss, kept = _stream_storages(lambda: model(input_ids=ids, labels=ids).loss, model.config.hidden_size)
        loss.backward()
    return loss.detach(), {k: p.grad for k, p in model.named_parameters()}, kept, ops.links()


def test_converted_llama_keeps_one_stream_tensor_less_per_block():
    """A Hugging Face Llama: each decoder layer's state between attention and MLP is no
    longer kept; loss and every gradient are the stored path's."""
    loss_r, grads_r, kept_r, (keep_r, sources_r) = _step(*_converted_llama())
    loss_s, grads_s, kept_s, (keep_s, sources_s) = _step(*_converted_llama(recompute_streams=False))
    layers = 2
    assert keep_r == [False] * layers and sources_r == [True] * layers
    assert keep_s == [True] * layers and sources_s == [False] * layers
    assert torch.equal(loss_r, loss_s)
    for k in grads_s:
        assert _rel(grads_r[k], grads_s[k]) <= (0.0 if DEVICE == "cpu" else 1e-5), k
    assert len(kept_s) - len(kept_r) == layers  # one [M, n, C] tensor per decoder layer


def test_validation_and_the_reference_backend_agree():
    """A bad value is refused; the reference ops ignore the marks and give the kernels' results."""
    with pytest.raises(mhc.MHCConfigError, match="recompute_streams must be True or False"):
        mhc.MHCConfig(recompute_streams="yes")
    loss_t, grads_t, _, _ = _step(*_converted_llama(backend="torch"))  # the reference ops ignore the marks
    model, ids = _converted_llama()
    loss_k, grads_k, _, _ = _step(model, ids)
    with torch.no_grad(), _OpArgs() as ops:  # nothing to keep without a backward: no source passed
        model(input_ids=ids)
    assert ops.links()[1] == [False, False]
    assert _rel(loss_k, loss_t) <= 1e-5
    for k in grads_t:
        assert _rel(grads_k[k], grads_t[k]) <= 1e-4, k


@pytest.mark.gpu
def test_compiled_training_step_peak_memory_drops_by_the_inner_streams_on_gpu():
    """A compiled bf16 training step of a Llama at 4 layers: the peak memory with the
    inner streams recomputed is lower than with them stored, and the losses agree. The
    peak falls in the backward, where one layer's rebuilt ``X_mid`` is live (the fused
    op's dH_pre launch writes it for its gradient pass): of the 4 streams no longer kept,
    3 leave the peak (measured on an H200: 2.7 x 32 MiB), so the bound is three quarters
    of one n-stream tensor for each layer but one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=1024, max_position_embeddings=2048)
    ids = torch.randint(0, 1024, (4, 1024), device="cuda")
    peaks, losses = {}, {}
    for recompute in (False, True):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).cuda().to(torch.bfloat16)
        mhc.mhc_compile(model, init="paper", recompute_streams=recompute, example_inputs=(ids[:, :16],))
        step = torch.compile(lambda: model(input_ids=ids, labels=ids).loss)
        step().backward()  # compile and warm up
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = step()
        loss.backward()
        torch.cuda.synchronize()
        peaks[recompute] = torch.cuda.max_memory_allocated() - base
        losses[recompute] = loss.item()
        del model, step, loss
        torch.cuda.empty_cache()
        torch._dynamo.reset()
    stream_bytes = ids.numel() * 4 * cfg.hidden_size * 2  # [M, n, C] in bf16
    assert peaks[False] - peaks[True] >= 0.75 * (cfg.num_hidden_layers - 1) * stream_bytes, peaks
    assert abs(losses[True] - losses[False]) <= 1e-3 * abs(losses[False])
