"""torchao-style options (``config=MHCConfig(...)``, ``filter_fn``), the MHCError hierarchy,
checks at conversion time, ``mode="residual"`` and the public submodules."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

import mhc_compile as mhc
from models import DeepMLP, NanoGPT
from tiny_hf import llama, token_ids, train_steps

def test_config_object_is_accepted():
    model = NanoGPT()
    mhc.mhc_compile(model, config=mhc.MHCConfig(n_streams=2, mode="hc"), example_inputs=torch.randint(0, 97, (2, 8)))
    assert model.blocks[0].mhc[0].n_streams == 2 and model.blocks[0].mhc[0].mode == "hc"


@pytest.mark.parametrize("kwargs", [{"n_streams": 2}, {"mode": "hc"}, {"stream_dtype": torch.bfloat16}])
def test_config_and_differing_keywords_conflict(kwargs):
    model = DeepMLP()
    with pytest.raises(mhc.MHCConfigError, match=f"config= and also {next(iter(kwargs))}="):
        mhc.mhc_compile(model, config=mhc.MHCConfig(n_streams=4), example_inputs=torch.randn(2, 10), **kwargs)
    assert not mhc.is_converted(model)
    with pytest.raises(mhc.MHCConfigError, match="must be an mhc_compile.MHCConfig"):
        mhc.mhc_compile(model, config={"n_streams": 2}, example_inputs=torch.randn(2, 10))


def test_filter_fn_converts_every_other_layer():
    model = llama(layers=4).eval()
    original = copy.deepcopy(model)
    every_other = lambda module, fqn: fqn.startswith("model.layers.") and int(fqn.rsplit(".", 1)[1]) % 2 == 0  # noqa: E731

    mhc.mhc_compile(model, config=mhc.MHCConfig(n_streams=4), filter_fn=every_other)

    assert [hasattr(layer, "mhc") for layer in model.model.layers] == [True, False, True, False]
    rows = mhc.inspect(model, print_table=False)
    assert [r["block"] for r in rows] == ["model.layers.0"] * 2 + ["model.layers.2"] * 2
    assert len({r["chain"] for r in rows}) == 2  # layer 1 is plain: the chain is cut there
    assert model.config.mhc["blocks"] == ["model.layers.0", "model.layers.2"]
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=0, atol=1e-6)
    before = [p.detach().clone() for p in mhc.mhc_parameters(model)]
    train_steps(model, ids, steps=1)
    assert all(not torch.equal(a, b) for a, b in zip(before, mhc.mhc_parameters(model)))


def test_filter_fn_that_rejects_everything():
    model = DeepMLP()
    with pytest.raises(mhc.MHCConfigError, match="filter_fn rejected all 1 candidate blocks"):
        mhc.mhc_compile(model, example_inputs=torch.randn(2, 10), filter_fn=lambda module, fqn: False)
    assert not mhc.is_converted(model)


def test_triton_backend_on_cpu_parameters_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = DeepMLP()
    with pytest.raises(mhc.MHCConfigError, match=r"parameters on cpu; use backend='auto'.*model\.cuda\(\)"):
        mhc.mhc_compile(model, backend="triton", example_inputs=torch.randn(2, 10))
    assert not mhc.is_converted(model)


def test_residual_mode_is_not_a_conversion():
    model = NanoGPT()
    idx = torch.randint(0, 97, (2, 8))
    mhc.mhc_compile(model, mode="residual", example_inputs=idx)
    assert not mhc.is_converted(model)
    assert len(mhc.inspect(model, print_table=False)) == 6  # the analysis is kept for inspect()
    mhc.mhc_compile(model, n_streams=2, example_inputs=idx)  # a real conversion is accepted later
    assert mhc.is_converted(model) and model.blocks[0].mhc[0].n_streams == 2


def test_diagnostics_is_reachable_after_a_plain_import():
    code = "import mhc_compile as mhc; print(mhc.diagnostics.summarize.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "summarize", out.stderr


def test_every_error_is_an_mhc_error():
    for cls, builtin in ((mhc.MHCConfigError, ValueError), (mhc.ConversionError, ValueError),
                         (mhc.NoResidualError, ValueError), (mhc.CheckpointError, ValueError),
                         (mhc.CaptureError, RuntimeError)):
        assert issubclass(cls, mhc.MHCError) and issubclass(cls, builtin), cls
    from mhc_compile.ops.library import KernelInputError

    assert issubclass(KernelInputError, mhc.MHCError) and issubclass(KernelInputError, ValueError)
    with pytest.raises(mhc.MHCError, match="example_inputs="):
        mhc.mhc_compile(DeepMLP())  # a CaptureError
    with pytest.raises(mhc.MHCError, match="already converted"):
        mhc.mhc_compile(mhc.mhc_compile(DeepMLP(), example_inputs=torch.randn(2, 10)), example_inputs=torch.randn(2, 10))


class _Residual(torch.nn.Module):
    def __init__(self, out: int = 8) -> None:
        super().__init__()
        self.f = torch.nn.Linear(8, 8)
        self.g = torch.nn.Linear(8, out)

    def forward(self, x):
        x = x + self.f(x)
        return x + self.g(x)  # out=1: [B, 8] + [B, 1], the branch changes the shape


def test_filter_fn_leaves_a_block_as_it_is():
    """Without a filter both blocks convert (block 1's broadcasting add stays a plain add);
    a filter that rejects block 1 leaves it entirely as it was."""
    x = torch.randn(2, 8)
    build = lambda: torch.nn.Sequential(_Residual(), _Residual(out=1))  # noqa: E731
    model = build()
    mhc.mhc_compile(model, example_inputs=x)
    assert hasattr(model[0], "mhc") and len(model[1].mhc) == 1
    model = build()
    expected = model(x)
    mhc.mhc_compile(model, example_inputs=x, filter_fn=lambda module, fqn: fqn != "1")
    assert hasattr(model[0], "mhc") and not hasattr(model[1], "mhc")
    assert any("not converted (filter_fn)" in c for c in model._mhc_analysis.cuts)
    torch.testing.assert_close(model(x), expected)

def test_deterministic_option_is_validated_and_saved():
    cfg = mhc.MHCConfig(deterministic=True)
    assert mhc.MHCConfig.from_dict(cfg.to_dict()) == cfg
    assert mhc.MHCConfig.from_dict({"n_streams": 4}).deterministic is False  # options saved before it existed
    with pytest.raises(mhc.MHCConfigError, match="deterministic must be True or False"):
        mhc.MHCConfig(deterministic="yes")
