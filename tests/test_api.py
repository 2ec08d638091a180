"""The decorator, the off switch, inspect, modes, n, and the stream layout of conv nets."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import mhc_compile as mhc
from models import BY_NAME, DeepMLP, NanoGPT


def test_decorator_on_a_class():
    @mhc.hyper_connected(n_streams=2, example_inputs=torch.randn(2, 10))
    class Net(DeepMLP):
        pass

    model = Net()
    assert mhc.is_converted(model)
    assert len(mhc.inspect(model, print_table=False)) == 6
    assert model.mhc[0].n_streams == 2


def test_decorator_on_a_factory():
    @mhc.hyper_connected(n_streams=3)
    def build():
        return BY_NAME["gpt2"].build()

    model = build()
    assert mhc.is_converted(model)
    assert model.transformer.h[0].mhc[0].phi.shape == (3 * 32, 3 * 3 + 6)


def test_disable_switch(monkeypatch, caplog):
    monkeypatch.setenv("MHC_DISABLE", "1")

    @mhc.hyper_connected(n_streams=4, example_inputs=torch.randn(2, 10))
    def build():
        return DeepMLP()

    with caplog.at_level(logging.WARNING, logger="mhc_compile"):
        model = build()
    assert not mhc.is_converted(model)
    lines = [r for r in caplog.records if "MHC_DISABLE" in r.getMessage()]
    assert len(lines) == 1 and "unchanged" in lines[0].getMessage()


def test_inspect_prints_table_and_works_before_conversion(capsys):
    model = NanoGPT()
    example = torch.randint(0, 97, (2, 8))
    rows = mhc.inspect(model, example_inputs=example)
    assert not mhc.is_converted(model)
    out = capsys.readouterr().out
    assert "blocks.0" in out and "hidden_size" in out
    assert [r["hidden_size"] for r in rows] == [32] * 6
    assert rows[0]["branch"].startswith("ln_1")


def test_residual_mode_keeps_the_model():
    model = NanoGPT()
    ref = copy.deepcopy(model)
    mhc.mhc_compile(model, mode="residual", example_inputs=torch.randint(0, 97, (2, 8)))
    assert len(list(mhc.mhc_parameters(model))) == 0
    assert len(mhc.inspect(model, print_table=False)) == 6
    idx = torch.randint(0, 97, (2, 8))
    model.eval(), ref.eval()
    torch.testing.assert_close(model(idx), ref(idx))


@pytest.mark.parametrize("n", [1, 2, 8])
@pytest.mark.parametrize("mode", ["mhc", "hc"])
def test_modes_and_stream_counts_preserve_function(n, mode):
    model = NanoGPT().eval()
    ref = copy.deepcopy(model)
    idx = torch.randint(0, 97, (2, 8))
    mhc.mhc_compile(model, n_streams=n, mode=mode, example_inputs=idx)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref(idx), rtol=1e-5, atol=1e-5)


def test_paper_init_differs_and_trains():
    model = NanoGPT()
    idx = torch.randint(0, 97, (2, 8))
    mhc.mhc_compile(model, init="paper", example_inputs=idx)
    alphas = [m.alpha for m in model.modules() if isinstance(m, mhc.MHCConnection)]
    assert all(torch.all(a == 0.01) for a in alphas)
    logits, loss = model(idx, idx)
    loss.backward()
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in alphas)


def test_conv_stream_layout_is_channels_first():
    model = BY_NAME["resnet"].build().eval()
    mhc.mhc_compile(model)
    block = model.encoder.stages[0].layers[0]
    seen = {}
    handle = block.register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    model(pixel_values=torch.randn(2, 3, 16, 16))
    handle.remove()
    assert seen["out"].shape == (2, 4, 8, 4, 4)  # [B, n, C, H, W]: linked to the next block
    assert mhc.inspect(model, print_table=False)[0]["layout"] == "[B, n, C, *S]"


def test_stream_dtype_stores_the_streams_in_bfloat16():
    from mhc_compile.ops import functional

    model = BY_NAME["llama"].build().eval()
    ref = copy.deepcopy(model)
    mhc.mhc_compile(model, stream_dtype=torch.bfloat16)
    seen = []
    functional.OBSERVERS.append(lambda kind, t: seen.append(t["streams"].dtype))
    try:
        ids = torch.randint(0, 97, (2, 8))
        with torch.no_grad():
            out, expected = model(ids).logits, ref(ids).logits
    finally:
        functional.OBSERVERS.pop()
    assert seen == [torch.bfloat16] * 4
    assert ((out - expected).norm() / expected.norm()).item() < 2e-2
    with pytest.raises(mhc.MHCConfigError, match="stream_dtype"):
        mhc.mhc_compile(BY_NAME["llama"].build(), stream_dtype=torch.int8)


def _stream_dtypes_under_autocast(model, ids) -> list:
    from mhc_compile.ops import functional

    seen = []
    functional.OBSERVERS.append(lambda kind, t: seen.append(t["streams"].dtype))
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(ids).logits
    finally:
        functional.OBSERVERS.pop()
    return seen, logits


def test_streams_default_to_the_autocast_dtype_and_float32_opts_out():
    ids = torch.randint(0, 97, (2, 8))
    original = BY_NAME["llama"].build().eval()
    default = mhc.mhc_compile(copy.deepcopy(original))
    opt_out = mhc.mhc_compile(copy.deepcopy(original), stream_dtype=torch.float32)
    seen_default, logits_default = _stream_dtypes_under_autocast(default, ids)
    seen_opt_out, logits_opt_out = _stream_dtypes_under_autocast(opt_out, ids)
    assert seen_default == [torch.bfloat16] * 4      # the float32 residual -> bf16 streams
    assert seen_opt_out == [torch.float32] * 4
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = original(ids).logits.float()
    for logits in (logits_default, logits_opt_out):  # both within bf16 rounding of the original
        assert ((logits.float() - expected).norm() / expected.norm()).item() < 3e-2
    with torch.no_grad():                            # outside autocast: float32 streams, exact
        out, plain = default(ids).logits, original(ids).logits
    assert ((out - plain).abs().max() / plain.abs().max()).item() < 1e-6
