import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors through Triton's interpreter (set before any import of triton)
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run on the GPU machine with -m gpu)")
    config.addinivalue_line("markers", "slow: compiles with Inductor on the CPU (minutes)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
