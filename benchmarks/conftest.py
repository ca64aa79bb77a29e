import pytest


@pytest.fixture
def quick(request):
    """Small shapes when benchmarks only need to execute (--benchmark-disable, as in CI)."""
    return bool(request.config.getoption("benchmark_disable"))
