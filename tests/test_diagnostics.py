"""Gain magnitude, doubly-stochastic error and stream statistics."""

import itertools

import torch

import mhc_compile as mhc
from mhc_compile import diagnostics
from mhc_compile.ops import reference
from models import NanoGPT


def test_identity_chain_has_gain_one():
    h = [torch.eye(4).expand(10, 4, 4) for _ in range(12)]
    fwd, bwd = diagnostics.composite_gains(h)
    assert fwd.shape == (12,)
    torch.testing.assert_close(fwd, torch.ones(12))
    torch.testing.assert_close(bwd, torch.ones(12))


def test_known_non_stochastic_chain_matches_hand_computation():
    a = torch.tensor([[1.0, 0.5], [0.0, 1.0]])  # rows sum to 1.5 and 1; columns to 1 and 1.5
    b = torch.tensor([[2.0, 0.0], [-1.0, 1.0]])  # abs rows: 2 and 2; abs cols: 3 and 1
    fwd, bwd = diagnostics.composite_gains([a.expand(3, 2, 2), b.expand(3, 2, 2)])
    ba = b @ a  # [[2, 1], [-1, 0.5]]: abs row sums 3, 1.5; abs column sums 3, 1.5
    assert fwd.tolist() == [1.5, 3.0]
    assert bwd.tolist() == [1.5, 3.0]
    assert float(ba.abs().sum(-1).max()) == 3.0


def test_chain_of_permutation_mixtures_has_gain_one():
    g = torch.Generator().manual_seed(0)
    perms = [torch.eye(4)[list(p)] for p in itertools.permutations(range(4))]
    chain = []
    for _ in range(30):
        w = torch.rand(len(perms), generator=g)
        w = w / w.sum()
        chain.append(sum(wi * p for wi, p in zip(w, perms)).expand(5, 4, 4))
    fwd, bwd = diagnostics.composite_gains(chain)
    assert (fwd - 1).abs().max() <= 1e-5
    assert (bwd - 1).abs().max() <= 1e-5
    assert float(diagnostics.doubly_stochastic_error(chain[0])) <= 1e-6


def test_sinkhorn_output_has_small_ds_error():
    p = reference.sinkhorn_knopp(torch.rand(64, 4, 4) * 2 - 1)
    assert float(diagnostics.doubly_stochastic_error(p)) <= 1e-5


def test_observe_and_summarize_on_converted_models():
    idx = torch.randint(0, 97, (2, 8))
    for mode, bounded in (("mhc", True), ("hc", False)):
        model = NanoGPT().eval()
        mhc.mhc_compile(model, mode=mode, init="paper", example_inputs=idx)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, mhc.MHCConnection):
                    m.alpha.fill_(2.0)  # strong dynamic parts
        with diagnostics.observe() as rec:
            model(idx)
        assert len(rec.h_res) == 6 and len(rec.stream_rms) == 6
        stats = diagnostics.summarize(rec)
        assert len(stats["forward_gain_per_depth"]) == 6
        if bounded:
            # 20 Sinkhorn rounds on strong logits leave H_res ~0.3% off doubly stochastic
            assert abs(stats["forward_gain"] - 1) <= 1e-2 and stats["ds_error"] <= 1e-2
        else:
            assert stats["forward_gain"] > 1.5
    assert not diagnostics.functional.OBSERVERS  # the observer is removed afterwards
