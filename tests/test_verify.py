"""Conversion's self-check: the tolerance it allows at init follows the arithmetic in use."""

import torch

from mhc_compile import verify


def test_tf32_matmuls_on_cuda_get_the_half_precision_bound():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert verify._tolerance(torch.float32, None, "cuda") == 1e-4
        torch.set_float32_matmul_precision("high")              # TF32 on CUDA
        assert verify._tolerance(torch.float32, None, "cuda") == 2e-2
        assert verify._tolerance(torch.float32, None, "cpu") == 1e-4  # the CPU has no TF32
        assert verify._tolerance(torch.float32, torch.bfloat16, "cpu") == 5e-2
        assert verify._tolerance(torch.bfloat16, None, "cpu") == 5e-2
    finally:
        torch.set_float32_matmul_precision(before)
