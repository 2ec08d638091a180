"""recompute="mhc": same losses and gradients, fewer stored bytes, composes with checkpointing
and torch.compile."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.checkpoint import CheckpointPolicy

import mhc_compile as mhc
from mhc_compile import recompute
from models import BY_NAME


def _pair(**options):
    """The same converted Llama twice: plain and with recompute="mhc" (paper init: mixing)."""
    torch.manual_seed(0)
    base = BY_NAME["llama"].build()
    plain, rec = copy.deepcopy(base), copy.deepcopy(base)
    mhc.mhc_compile(plain, init="paper", **options)
    mhc.mhc_compile(rec, init="paper", recompute="mhc", **options)
    with torch.no_grad():
        for p in mhc.mhc_parameters(plain):
            p.add_(0.1 * torch.randn_like(p))
    rec.load_state_dict(plain.state_dict())
    return plain, rec


def _loss_and_grads(model, ids, forward=None):
    model.zero_grad(set_to_none=True)
    loss = (model if forward is None else forward)(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b, tol=1e-5):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert abs(loss_a.item() - loss_b.item()) <= tol * abs(loss_a.item())
    assert grads_a.keys() == grads_b.keys() and any(".mhc." in n for n in grads_a)
    for name, g in grads_a.items():
        err = ((g - grads_b[name]).norm() / g.norm().clamp_min(1e-30)).item()
        assert err <= tol, (name, err)


def test_recompute_gives_the_same_losses_and_gradients():
    plain, rec = _pair()
    ids = torch.randint(0, 97, (2, 16))
    _assert_same(_loss_and_grads(plain, ids), _loss_and_grads(rec, ids))
    assert rec.config.use_cache is False  # a KV cache would be appended to twice


def _stored_bytes(model, ids, monkeypatch) -> int:
    """Bytes kept for backward: distinct storages saved by autograd + selective-checkpoint cache."""
    storages, cached = {}, [0]
    policy = recompute._policy

    def counting_policy(ctx, func, *args, **kwargs):
        decision = policy(ctx, func, *args, **kwargs)
        if decision == CheckpointPolicy.MUST_SAVE and not ctx.is_recompute:
            outs = ctx.op_output if isinstance(ctx.op_output, (tuple, list)) else [ctx.op_output]
            cached[0] += sum(o.untyped_storage().nbytes() for o in outs if isinstance(o, torch.Tensor))
        return decision

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    monkeypatch.setattr(recompute, "_policy", counting_policy)
    with saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return sum(storages.values()) + cached[0]


def test_recompute_stores_fewer_bytes(monkeypatch):
    plain, rec = _pair()
    ids = torch.randint(0, 97, (4, 32))
    stored_plain = _stored_bytes(plain, ids, monkeypatch)
    stored_rec = _stored_bytes(rec, ids, monkeypatch)
    assert stored_rec < 0.8 * stored_plain, (stored_rec, stored_plain)


def test_recompute_composes_with_per_block_checkpointing():
    plain, rec = _pair()
    rec.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 97, (2, 16))
    _assert_same(_loss_and_grads(plain, ids), _loss_and_grads(rec, ids))


def test_recompute_under_torch_compile():
    plain, rec = _pair()
    ids = torch.randint(0, 97, (2, 16))
    torch._dynamo.reset()
    compiled = torch.compile(rec, backend="aot_eager")
    _assert_same(_loss_and_grads(plain, ids), _loss_and_grads(rec, ids, forward=compiled), tol=1e-4)


def test_unknown_recompute_value_is_refused():
    with pytest.raises(mhc.MHCConfigError, match="recompute"):
        mhc.mhc_compile(BY_NAME["llama"].build(), recompute="everything")
