"""Deferred initialisation: build on the meta device, convert there, ``to_empty``, load the
original weights, then initialise the mHC parameters (``mhc.init_parameters`` or HF's
``initialize_weights``), also under FSDP2 (one gloo process)."""

from __future__ import annotations

import copy

import pytest
import torch

import mhc_compile as mhc
from tiny_hf import llama, llama_config, token_ids

pytest.importorskip("transformers")


def _meta_converted():
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config())
    mhc.mhc_compile(model)  # the sample forwards run on meta tensors
    assert all(p.is_meta for p in mhc.mhc_parameters(model))
    return model


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def _preserve_init(model) -> bool:
    """Every connection holds the ``init="preserve"`` values (alpha 0, b_pre = logit(1/4))."""
    conns = [m for m in model.modules() if isinstance(m, mhc.MHCConnection)]
    return bool(conns) and all(
        torch.equal(c.alpha, torch.zeros(3)) and torch.allclose(c.bias[:4], torch.full((4,), -1.0986123))
        and torch.equal(c.bias[4:], torch.zeros(20)) and torch.isfinite(c.phi).all()
        for c in conns
    )


def test_meta_convert_then_init_parameters():
    reference = llama()
    state = reference.state_dict()
    ids = token_ids()
    model = _meta_converted()
    model.to_empty(device="cpu")
    result = model.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == sorted(k for k in model.state_dict() if ".mhc." in k)
    model.model.rotary_emb.inv_freq.copy_(reference.model.rotary_emb.inv_freq)  # a non-persistent buffer

    assert mhc.init_parameters(model) == 4

    assert _preserve_init(model)
    with torch.no_grad():
        assert torch.equal(_loss(model, ids), _loss(reference, ids))  # preserve init: the original function
    loss = _loss(model.train(), ids)
    loss.backward()
    torch.optim.AdamW(model.parameters(), lr=1e-2).step()
    assert torch.isfinite(loss) and torch.isfinite(_loss(model, ids))


def test_hf_initialize_weights_initialises_the_connections():
    reference = llama()
    state = reference.state_dict()
    model = _meta_converted()
    model.to_empty(device="cpu")
    model.load_state_dict(state, strict=False)
    for key in state:  # what a loader marks as loaded; HF's init skips flagged tensors
        model.get_parameter_or_buffer(key)._is_hf_initialized = True

    model.initialize_weights()  # HF's own path: the mHC connections and the rotary buffers

    assert _preserve_init(model)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, state["model.layers.0.self_attn.q_proj.weight"])
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(_loss(model, ids), _loss(reference, ids))  # preserve init: the original function


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_fsdp2_meta_flow_on_one_gloo_process(tmp_path):
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    reference = llama()
    ids = token_ids()
    with torch.no_grad():
        expected = _loss(mhc.mhc_compile(copy.deepcopy(reference)), ids)  # converted the usual way
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path / 'pg'}")
    try:
        model = _meta_converted()
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        model.to_empty(device="cpu")
        set_model_state_dict(model, reference.state_dict(), options=StateDictOptions(full_state_dict=True, strict=False))
        model.model.rotary_emb.inv_freq.copy_(reference.model.rotary_emb.inv_freq)

        mhc.init_parameters(model)  # DTensor parameters: written shard by shard

        alpha = model.model.layers[0].mhc[0].alpha
        assert isinstance(alpha, DTensor) and torch.equal(alpha.full_tensor(), torch.zeros(3))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        loss = _loss(model, ids)
        torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=0)
        loss.backward()
        opt.step()
        assert torch.isfinite(_loss(model, ids))
    finally:
        dist.destroy_process_group()
