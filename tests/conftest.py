import pytest
import torch

import fastdistill
from fastdistill.isa import available_cpu_isas


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    if not torch.cuda.is_available():
        for item in items:
            if item.get_closest_marker("cuda") is not None:
                item.add_marker(skip)


@pytest.fixture(params=available_cpu_isas())
def isa(request):
    """Runs the test once per CPU ISA path this machine can execute (avx512, avx2, scalar)."""
    with fastdistill.cpu_isa(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
