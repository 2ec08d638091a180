"""Bad input gets a clear exception naming the problem and the fix; the model is untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mhc_compile as mhc
from models import BY_NAME, DeepMLP


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, set(dict(model.named_modules())), model.forward


def _assert_untouched(model, snap):
    state, module_names, forward = snap
    assert set(model.state_dict()) == set(state)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k])
    assert set(dict(model.named_modules())) == module_names
    assert not mhc.is_converted(model)
    assert "forward" not in vars(model)


def test_model_without_residual_adds():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    snap = _snapshot(model)
    with pytest.raises(mhc.NoResidualError, match="no residual add"):
        mhc.mhc_compile(model, example_inputs=torch.randn(2, 8))
    _assert_untouched(model, snap)


class _DataDependent(DeepMLP):
    def forward(self, x):
        x = self.inp(x)
        if x.sum() > 0:  # data-dependent Python in the block that owns the adds: not traceable
            x = x * 2
        for f in self.layers:
            x = x + f(x)
        return self.out(x)


def test_graph_that_cannot_be_captured():
    model = _DataDependent()
    snap = _snapshot(model)
    # the analysis follows the sample's branch; the block's own trace names the line
    with pytest.raises(mhc.CaptureError, match=r"could not trace the forward of _DataDependent at .*test_errors.py:\d+: if x.sum"):
        mhc.mhc_compile(model, example_inputs=torch.randn(2, 3, 10))
    _assert_untouched(model, snap)


def test_custom_model_without_example_inputs():
    model = DeepMLP()
    snap = _snapshot(model)
    with pytest.raises(mhc.CaptureError, match="example_inputs="):
        mhc.mhc_compile(model)
    _assert_untouched(model, snap)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_streams": 0}, "n_streams must be between 1 and 8"),
        ({"n_streams": 9}, "n_streams must be between 1 and 8"),
        ({"mode": "mhcc"}, "unknown mode 'mhcc'"),
        ({"init": "zeros"}, "unknown init 'zeros'"),
        ({"backend": "cuda"}, "unknown backend 'cuda'"),
        ({"sinkhorn_iters": 0}, "sinkhorn_iters must be a positive int"),
    ],
)
def test_bad_options(kwargs, match):
    model = DeepMLP()
    snap = _snapshot(model)
    with pytest.raises(mhc.MHCConfigError, match=match):
        mhc.mhc_compile(model, example_inputs=torch.randn(2, 10), **kwargs)
    _assert_untouched(model, snap)


def test_already_converted():
    model = DeepMLP()
    mhc.mhc_compile(model, example_inputs=torch.randn(2, 10))
    with pytest.raises(mhc.ConversionError, match="already converted"):
        mhc.mhc_compile(model, example_inputs=torch.randn(2, 10))


class _Broadcast(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(8, 1)

    def forward(self, x):
        return x + self.f(x)  # [B, 8] + [B, 1]: a residual whose branch changes the shape


def test_broadcasting_add_is_no_connection():
    """``x + f(x)`` with a broadcast branch is left as it is: the only add -> no residual."""
    model = _Broadcast()
    snap = _snapshot(model)
    with pytest.raises(mhc.NoResidualError, match="same shape"):
        mhc.mhc_compile(model, example_inputs=torch.randn(2, 8))
    _assert_untouched(model, snap)


def test_weight_shared_block_converts_with_shared_connections():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8))
            self.body = _Res(self.block)

        def forward(self, x):
            return self.body(self.body(x))

    class _Res(nn.Module):
        def __init__(self, f):
            super().__init__()
            self.f = f

        def forward(self, x):
            return x + self.f(x)

    model = Shared()
    x = torch.randn(2, 8)
    expected = model(x)
    mhc.mhc_compile(model, example_inputs=x)  # one set of connection parameters, used by both calls
    assert len(model.body.mhc) == 1 and model._mhc_analysis.blocks[0].calls == 2
    torch.testing.assert_close(model(x), expected)


def test_not_a_module():
    with pytest.raises(TypeError, match="expects an nn.Module"):
        mhc.mhc_compile(lambda x: x, example_inputs=torch.randn(2))


def test_bad_example_inputs_type():
    with pytest.raises(mhc.CaptureError, match="example_inputs must be"):
        mhc.mhc_compile(DeepMLP(), example_inputs=3)


def test_sample_forward_failure_is_explained():
    model = BY_NAME["llama"].build()
    with pytest.raises(mhc.CaptureError, match="example_inputs="):
        mhc.mhc_compile(model, example_inputs={"input_ids": torch.randn(2, 8)})  # floats, not ids
