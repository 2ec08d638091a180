"""PEFT / LoRA on a converted model: adapters attach to the linear layers inside the
rewritten blocks, train, and merge; the mHC parameters are frozen by default (PEFT's rule
for base parameters) and train when asked (``modules_to_save`` or ``mark_trainable``)."""

from __future__ import annotations

import pytest
import torch

import mhc_compile as mhc
from tiny_hf import llama, token_ids, train_steps

peft = pytest.importorskip("peft")


def _mhc_state(model) -> dict:
    return {k.replace("base_model.model.", ""): v.detach().clone() for k, v in model.state_dict().items()
            if ".mhc." in k and "original_module" not in k}


def _lora(model, **kwargs):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **kwargs)
    return peft.get_peft_model(model, config)


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_trains_with_mhc_frozen_and_merges():
    ids = token_ids()
    model = mhc.mhc_compile(llama())
    before = _mhc_state(model)
    lora = _lora(model)
    assert not any(p.requires_grad for p in mhc.mhc_parameters(lora))  # PEFT's default for base parameters
    with lora.disable_adapter():
        base = _logits(lora, ids)
    assert not torch.allclose(_logits(lora, ids), base)  # the adapters run inside the rewritten blocks
    train_steps(lora, ids, steps=2)
    unmerged = _logits(lora, ids)

    merged = lora.merge_and_unload()

    assert type(merged).__name__ == "LlamaForCausalLM" and mhc.is_converted(merged)
    torch.testing.assert_close(_logits(merged, ids), unmerged, rtol=1e-5, atol=1e-5)
    after = _mhc_state(merged)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("how", ["modules_to_save", "mark_trainable"])
def test_mhc_parameters_train_when_asked(how):
    ids = token_ids()
    model = mhc.mhc_compile(llama())
    before = _mhc_state(model)
    if how == "modules_to_save":
        assert mhc.peft_modules_to_save(model) == ["mhc.0", "mhc.1"]
        lora = _lora(model, modules_to_save=mhc.peft_modules_to_save(model))
    else:
        lora = _lora(model)
        assert mhc.mark_trainable(lora) == 12
    train_steps(lora, ids, steps=2)
    unmerged = _logits(lora, ids)

    merged = lora.merge_and_unload()

    torch.testing.assert_close(_logits(merged, ids), unmerged, rtol=1e-5, atol=1e-5)
    after = _mhc_state(merged)
    assert after.keys() == before.keys()
    assert all(not torch.equal(after[k], before[k]) for k in before if k.endswith("alpha"))
