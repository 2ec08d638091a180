"""Every model of the catalogue, converted the way a user would: chains found, same
outputs at init, training moves the mHC parameters, state_dict, shapes, train/eval,
torch.compile(fullgraph=True), per-block checkpointing and per-block compile."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

import mhc_compile as mhc
from mhc_compile import diagnostics
from models import BY_NAME, CATALOGUE

NAMES = [e.name for e in CATALOGUE]


def _convert(entry, n_streams=4, **kw):
    model = entry.build()
    original = copy.deepcopy(model)
    example = entry.inputs(2, 8) if entry.example_inputs else None
    mhc.mhc_compile(model, n_streams=n_streams, example_inputs=example, **kw)
    return original, model


def _rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _loss(entry, model, inputs):
    return entry.main_output(model(**inputs)).float().pow(2).mean()


@pytest.mark.parametrize("name", NAMES)
def test_connections_found_in_the_right_blocks(name):
    entry = BY_NAME[name]
    _, model = _convert(entry)
    rows = mhc.inspect(model)
    assert len(rows) == entry.connections
    blocks = {"" if r["block"] == "(root)" else r["block"] for r in rows}
    assert blocks == set(entry.blocks)
    modules = dict(model.named_modules())
    for path in entry.blocks:
        assert isinstance(modules[path + ".mhc" if path else "mhc"], torch.nn.ModuleList)


@pytest.mark.parametrize("name", NAMES)
def test_preserve_init_matches_original_at_several_shapes(name):
    entry = BY_NAME[name]
    original, model = _convert(entry)
    original.eval()
    model.eval()
    with torch.no_grad():
        for batch, length in [(2, 8), (3, 5), (1, 13)]:
            inputs = entry.inputs(batch, length)
            err = _rel_err(entry.main_output(model(**inputs)), entry.main_output(original(**inputs)))
            assert err <= 1e-5, (batch, length, err)


@pytest.mark.parametrize("name", NAMES)
def test_train_mode_matches_original_with_same_rng(name):
    """Dropout and batch norm behave as in the original in train() (same RNG draws)."""
    entry = BY_NAME[name]
    original, model = _convert(entry)
    original.train()
    model.train()
    inputs = entry.inputs(2, 8)
    torch.manual_seed(123)
    ref = entry.main_output(original(**inputs))
    torch.manual_seed(123)
    out = entry.main_output(model(**inputs))
    assert _rel_err(out, ref) <= 1e-5
    for (name_a, buf_a), (name_b, buf_b) in zip(original.named_buffers(), model.named_buffers()):
        assert name_a == name_b
        torch.testing.assert_close(buf_a, buf_b)  # batch-norm statistics updated alike
    model.eval()
    with torch.no_grad():
        a = entry.main_output(model(**inputs))
        b = entry.main_output(model(**inputs))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_training_moves_mhc_parameters_and_streams_diverge(name):
    entry = BY_NAME[name]
    _, model = _convert(entry)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    new = dict((n, p) for n, p in model.named_parameters() if ".mhc." in n or n.startswith("mhc."))
    assert len(new) == 3 * entry.connections
    assert {id(p) for p in mhc.mhc_parameters(model)} == {id(p) for p in new.values()}
    before = {n: p.detach().clone() for n, p in new.items()}
    with diagnostics.observe() as rec:
        model(**entry.inputs(2, 8))
    assert all(float(r.std()) == 0.0 for r in rec.stream_rms)  # identical streams at init
    for _ in range(3):
        loss = _loss(entry, model, entry.inputs(2, 8))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in new.items():
        assert not torch.equal(before[n], p.detach()), n
    model.eval()
    with diagnostics.observe() as rec:
        model(**entry.inputs(2, 8))
    assert any(float(r.std()) > 0 for r in rec.stream_rms[1:])  # streams no longer identical


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_and_original_checkpoint(name):
    entry = BY_NAME[name]
    original, model = _convert(entry)
    orig_keys = set(original.state_dict())
    keys = set(model.state_dict())
    assert orig_keys <= keys
    assert all(".mhc." in k or k.startswith("mhc.") for k in keys - orig_keys)
    with torch.no_grad():
        for p in mhc.mhc_parameters(model):
            p.add_(torch.randn_like(p) * 0.1)
    saved = copy.deepcopy(model.state_dict())
    torch.manual_seed(7)
    _, fresh = _convert(entry)
    fresh.load_state_dict(saved)
    model.eval()
    fresh.eval()
    inputs = entry.inputs(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(entry.main_output(fresh(**inputs)), entry.main_output(model(**inputs)))
    # the original model's checkpoint loads, the mHC parameters keep their init
    _, from_orig = _convert(entry)
    init = {k: v.clone() for k, v in from_orig.state_dict().items() if k not in orig_keys}
    result = from_orig.load_state_dict(original.state_dict(), strict=False)
    assert set(result.missing_keys) == keys - orig_keys and not result.unexpected_keys
    for k, v in from_orig.state_dict().items():
        if k in init:
            torch.testing.assert_close(v, init[k])


@pytest.mark.parametrize("name", NAMES)
def test_compile_fullgraph_forward_backward(name):
    entry = BY_NAME[name]
    _, model = _convert(entry)
    model.eval()
    inputs = entry.inputs(2, 8)
    with torch.no_grad():
        eager = entry.main_output(model(**inputs))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert _rel_err(entry.main_output(compiled(**inputs)), eager) <= 1e-5
    model.train()
    loss = _loss(entry, compiled, inputs)
    loss.backward()
    grads = [p.grad for p in mhc.mhc_parameters(model)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def _per_block_grads(entry, wrap):
    torch.manual_seed(0)
    _, model = _convert(entry)
    model.eval()  # deterministic (no dropout) so the two runs compare exactly
    if getattr(getattr(model, "config", None), "use_cache", False):
        model.config.use_cache = False  # a recomputed block would append to a KV cache twice
    modules = dict(model.named_modules())
    for path in entry.blocks:
        if path:
            parent_path, _, child = path.rpartition(".")
            parent = modules[parent_path] if parent_path else model
            setattr(parent, child, wrap(modules[path])) if not child.isdigit() else parent.__setitem__(int(child), wrap(modules[path]))
    inputs = entry.inputs(2, 8)
    torch.manual_seed(1)
    loss = _loss(entry, model, inputs)
    loss.backward()
    return loss.detach(), {n.replace("._checkpoint_wrapped_module", ""): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# T5's blocks are its layer.0/1/2 sub-layers; the first hands its relative position bias to
# the others, and a checkpointed sub-layer saves a different number of tensors when it is
# recomputed (open: see the coverage issue). Its whole-model checks all run.
@pytest.mark.parametrize("name", [n for n in NAMES if BY_NAME[n].blocks != [""] and n != "t5"])
def test_per_block_activation_checkpointing_gives_same_loss_and_grads(name):
    entry = BY_NAME[name]
    loss_a, grads_a = _per_block_grads(entry, lambda m: m)
    loss_b, grads_b = _per_block_grads(entry, checkpoint_wrapper)
    torch.testing.assert_close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        torch.testing.assert_close(grads_a[k], grads_b[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["llama", "nanogpt", "resnet"])
def test_per_block_compile_gives_same_loss_and_grads(name):
    entry = BY_NAME[name]
    loss_a, grads_a = _per_block_grads(entry, lambda m: m)

    def compile_block(block):
        block.compile(fullgraph=True, backend="aot_eager")
        return block

    torch._dynamo.reset()
    loss_b, grads_b = _per_block_grads(entry, compile_block)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    for k in grads_a:
        torch.testing.assert_close(grads_a[k], grads_b[k], rtol=1e-4, atol=1e-6)


def test_hf_labels_still_give_loss():
    entry = BY_NAME["llama"]
    original, model = _convert(entry)
    ids = torch.randint(0, 97, (2, 8))
    out = model(input_ids=ids, labels=ids)
    assert type(out) is type(original(input_ids=ids))
    assert out.loss is not None and torch.isfinite(out.loss)
    out.loss.backward()


def test_hf_gradient_checkpointing_enable_still_works():
    entry = BY_NAME["llama"]
    _, model = _convert(entry)
    model.train()
    ids = torch.randint(0, 97, (2, 8))
    torch.manual_seed(3)
    model.config.attention_dropout = 0.0
    loss_a = model(input_ids=ids, labels=ids).loss
    loss_a.backward()
    grads_a = [p.grad.clone() for p in mhc.mhc_parameters(model)]
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss_b = model(input_ids=ids, labels=ids).loss
    loss_b.backward()
    torch.testing.assert_close(loss_a, loss_b)
    for a, b in zip(grads_a, mhc.mhc_parameters(model)):
        torch.testing.assert_close(a, b.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_inductor_compile_trains_llama():
    """The real Inductor backend, forward + backward + AdamW step, no graph break."""
    entry = BY_NAME["llama"]
    original, model = _convert(entry)
    ids = torch.randint(0, 97, (2, 8))
    compiled = torch.compile(model, fullgraph=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    loss = compiled(input_ids=ids, labels=ids).loss
    ref = original.train()(input_ids=ids, labels=ids).loss
    assert abs(loss.item() - ref.item()) <= 1e-4 * abs(ref.item())
    loss.backward()
    opt.step()
    assert all(p.grad is not None for p in mhc.mhc_parameters(model))
