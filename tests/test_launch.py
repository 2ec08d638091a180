"""The direct launcher's bookkeeping (ops/triton/launch.py), on any machine.

Its launches themselves need CUDA: ``test_kernels.py::test_direct_launches_give_triton_launchers_bits_on_gpu``
checks them bit for bit against Triton's own launcher.
"""

from __future__ import annotations

import pytest
import torch

launch = pytest.importorskip("mhc_compile.ops.triton.launch")
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")


@triton.jit
def _scale_kernel(x_ptr, out_ptr, M, scale, FLAG: tl.constexpr, BM: tl.constexpr = 16):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    x = tl.load(x_ptr + rm, mask=rm < M)
    tl.store(out_ptr + rm, x * scale if FLAG else x, mask=rm < M)


def test_this_triton_launches_as_the_direct_path_repeats():
    assert launch._direct_launch_supported(), (
        "triton.runtime.jit.JITFunction.run no longer launches compiled kernels as "
        "ops/triton/launch.py repeats it; update _TRITON_LAUNCH (eager decode is slower without it)")


def test_parameter_values_come_in_the_kernels_order_with_defaults():
    forms = launch._Forms(_scale_kernel)
    x = torch.randn(5)
    args, kwargs = (x, x, 5), {"FLAG": True, "scale": 2.0, "num_warps": 4}
    values = forms.values(args, kwargs, forms.keyword_names(args, kwargs))
    assert values == (x, x, 5, 2.0, True, 16)  # num_warps is a launch option, not a parameter


def test_call_forms_tell_apart_what_triton_specialises_on():
    base = torch.randn(64)
    args = (base, base, 17, 0.5)
    form = launch._form(0, args, {"FLAG": True})
    assert form == launch._form(0, (torch.randn(64), torch.randn(64), 17, 0.5), {"FLAG": True})
    different = [
        launch._form(1, args, {"FLAG": True}),  # another device
        launch._form(0, (base[1:], base, 17, 0.5), {"FLAG": True}),  # a 4-byte-aligned address
        launch._form(0, (base.half(), base, 17, 0.5), {"FLAG": True}),  # another dtype
        launch._form(0, (base, base, 16, 0.5), {"FLAG": True}),  # another integer
        launch._form(0, (base, base, 17, 1), {"FLAG": True}),  # an int where a float was
        launch._form(0, args, {"FLAG": False}),  # another constexpr
    ]
    assert all(d != form for d in different)


def test_only_plain_cuda_tensors_have_their_forms_kept():
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert not launch._plain((torch.randn(8), 3))  # CPU tensors
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.randn(8))
    assert not launch._plain((fake,))
    assert launch._plain((3, 0.5))  # no tensors at all
