"""Save and restore: the mHC options travel with the weights (HF config.json key ``mhc``,
``mhc_config.json`` for other models) and one call restores the exact model."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch

import mhc_compile as mhc
from mhc_compile.checkpoint import read_state_dict
from models import NanoGPT
from tiny_hf import llama, llama_config, token_ids, train_steps

pytest.importorskip("transformers")


def _mhc_state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if ".mhc." in k}


def test_save_pretrained_then_from_pretrained_restores_the_exact_model(tmp_path, caplog):
    from transformers import LlamaForCausalLM

    model = mhc.mhc_compile(llama(), n_streams=4, stream_dtype=torch.float32)
    ids = token_ids()
    train_steps(model, ids, steps=2)
    trained = _mhc_state(model)
    assert all((v != 0).any() for k, v in trained.items() if k.endswith("alpha"))  # moved off the init
    model.eval()
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path, max_shard_size="60KB")  # sharded: the index file is followed
    saved = json.loads((tmp_path / "config.json").read_text())["mhc"]
    assert saved["n_streams"] == 4 and saved["stream_dtype"] == "float32"
    assert saved["blocks"] == ["model.layers.0", "model.layers.1"]
    assert (tmp_path / "model.safetensors.index.json").exists()

    restored = mhc.from_pretrained(LlamaForCausalLM, tmp_path).eval()  # the one documented call

    assert mhc.is_converted(restored)
    for k, v in _mhc_state(restored).items():
        assert torch.equal(v, trained[k]), k
    with torch.no_grad():
        assert torch.equal(restored(ids).logits, expected)

    # the plain path drops the mHC weights: converting that model warns and names the fix
    plain = LlamaForCausalLM.from_pretrained(tmp_path)
    assert not mhc.is_converted(plain) and plain.config.mhc["n_streams"] == 4
    with caplog.at_level(logging.WARNING, logger="mhc_compile"):
        with pytest.warns(UserWarning, match=r"mhc_compile\.from_pretrained\(LlamaForCausalLM, "):
            mhc.mhc_compile(plain)
    assert any("dropped" in r.getMessage() for r in caplog.records)


def test_conversion_leaves_the_callers_config_alone():
    from transformers import LlamaForCausalLM

    from mhc_compile.saved_options import warn_if_dropped_checkpoint

    cfg = llama_config()
    model = mhc.mhc_compile(LlamaForCausalLM(cfg))
    assert not hasattr(cfg, "mhc")  # a baseline built from cfg later does not claim to be converted
    assert model.config.mhc["blocks"] and model.model.layers[0].self_attn.config is model.config
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # options recorded in this process: no checkpoint, no warning
        warn_if_dropped_checkpoint(LlamaForCausalLM(model.config))


def test_from_pretrained_refuses_a_checkpoint_of_an_unconverted_model(tmp_path):
    from transformers import LlamaForCausalLM

    llama().save_pretrained(tmp_path)
    with pytest.raises(mhc.CheckpointError, match="has no 'mhc' key"):
        mhc.from_pretrained(LlamaForCausalLM, tmp_path)
    with pytest.raises(mhc.CheckpointError, match="local directory"):
        mhc.from_pretrained(LlamaForCausalLM, tmp_path / "missing")


def test_save_and_load_a_plain_pytorch_model(tmp_path):
    idx = torch.randint(0, 97, (2, 8))
    torch.manual_seed(0)
    model = mhc.mhc_compile(NanoGPT(), n_streams=2, example_inputs=idx,
                            filter_fn=lambda module, fqn: fqn != "blocks.1")
    with torch.no_grad():
        for p in mhc.mhc_parameters(model):
            p.add_(0.1 * torch.randn_like(p))  # trained-looking mHC values
    model.eval()
    with torch.no_grad():
        expected = model(idx)
    mhc.save(model, tmp_path)
    assert json.loads((tmp_path / "mhc_config.json").read_text())["blocks"] == ["blocks.0", "blocks.2"]

    restored = mhc.load(NanoGPT, tmp_path, example_inputs=idx).eval()

    assert [hasattr(b, "mhc") for b in restored.blocks] == [True, False, True]
    with torch.no_grad():
        assert torch.equal(restored(idx), expected)


@pytest.mark.parametrize("layout", ["safetensors", "safetensors-sharded", "bin", "bin-sharded", "model.pt"])
def test_read_state_dict_formats(tmp_path, layout):
    from safetensors.torch import save_file

    state = {"a.mhc.0.phi": torch.randn(4, 3), "a.weight": torch.randn(2), "b.mhc.1.alpha": torch.randn(3)}
    ext = "safetensors" if layout.startswith("safetensors") else "bin"
    save = save_file if ext == "safetensors" else torch.save
    if layout.endswith("sharded"):
        name = "model" if ext == "safetensors" else "pytorch_model"
        shards = {f"{name}-0000{i}.{ext}": dict([item]) for i, item in enumerate(state.items())}
        for file, part in shards.items():
            save(part, str(tmp_path / file))
        weight_map = {k: file for file, part in shards.items() for k in part}
        (tmp_path / f"{name}.{ext}.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        file = {"safetensors": "model.safetensors", "bin": "pytorch_model.bin", "model.pt": "model.pt"}[layout]
        save(state, str(tmp_path / file))
    got = read_state_dict(str(tmp_path), lambda k: ".mhc." in k)
    assert sorted(got) == ["a.mhc.0.phi", "b.mhc.1.alpha"]
    assert all(torch.equal(got[k], state[k]) for k in got)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(mhc.CheckpointError, match="no weights"):
        read_state_dict(str(empty))


def test_options_round_trip_through_json():
    cfg = mhc.MHCConfig(n_streams=2, mode="hc", stream_dtype=torch.bfloat16, recompute="mhc")
    assert mhc.MHCConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(mhc.MHCConfigError, match="unknown mHC option"):
        mhc.MHCConfig.from_dict({"n_streams": 2, "streams": 4})
