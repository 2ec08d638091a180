import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run on the GPU machine with -m gpu)")
    config.addinivalue_line("markers", "slow: compiles with Inductor on the CPU (minutes)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
