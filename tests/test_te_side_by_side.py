"""TransformerEngine's Triton mHC ops and ours compute the same connection (CPU, interpreter).

Needs TE's pure-Python wheel in ``.whl/`` (``pip download --no-deps transformer_engine==2.20.2
-d .whl``); skipped without it. benchmarks/te_mhc.py loads its two mHC files from the wheel.
Float32 only: Triton's CPU interpreter computes 16-bit ``tl.dot`` wrongly (numpy has no
bfloat16), and TE's kernels use 16-bit dots for bf16 streams.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import te_mhc  # noqa: E402

from mhc_compile.ops import library  # noqa: E402

pytestmark = pytest.mark.skipif(not library.KERNELS_AVAILABLE, reason="needs the triton package")


@pytest.fixture(scope="module")
def te():
    try:
        wheel = te_mhc.find_wheel(search=os.path.join(ROOT, ".whl"))
    except te_mhc.TEUnavailable as err:
        pytest.skip(str(err))
    return te_mhc.load(wheel)


@pytest.mark.parametrize("m, c", [(8, 32), (5, 48)])
def test_te_and_ours_compute_the_same_connection(te, m, c):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    diffs = te_mhc.check_equivalence(te, m, c, dtype=torch.float32, device=device)
    assert set(diffs) == {"out", "dx", "dphi", "dalpha", "dbias"}
    assert all(0 <= v <= 1e-5 for v in diffs.values()), diffs  # the same math, float32 rounding apart
    assert "transformer_engine" not in sys.modules  # the stubs are gone after loading


def test_layout_mapping_round_trips():
    n, c, m = 4, 6, 3
    x = torch.randn(m, n, c, requires_grad=True)
    phi = torch.randn(n * c, n * n + 2 * n, requires_grad=True)
    bias = torch.randn(n * n + 2 * n, requires_grad=True)
    alpha = torch.rand(3, requires_grad=True)
    x_te, phi_te, alpha_te, beta_te = te_mhc.to_te_layout(x, phi, bias, alpha)
    # TE's vec(x) is ordered c*n + i; its res logits are our transpose
    assert torch.equal(x_te[1, 0, 2, 3], x[1, 3, 2])
    assert torch.equal(phi_te[2 * n + 1 * n + 2, 5 * n + 3], phi[3 * c + 5, 2 * n + 2 * n + 1].detach())
    assert torch.equal(beta_te[0, 2 * n + 1 * n + 2], bias[2 * n + 2 * n + 1].detach())
    back = te_mhc.from_te_grads(x_te, phi_te, alpha_te, beta_te, n)
    for a, b in zip(back, (x, phi, alpha, bias)):
        assert torch.equal(a.detach(), b.detach())
