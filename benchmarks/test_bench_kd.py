"""pytest-benchmark suite for the fused loss; the cases are shared with `fastdistill bench`."""
import pytest

from fastdistill.bench import kd


def pytest_generate_tests(metafunc):
    # The IDs name the shapes this run measures: the quick ones under --benchmark-disable, else the full ones.
    if "index" in metafunc.fixturenames:
        quick = metafunc.config.getoption("benchmark_disable", default=False)
        ids = [f"{c.op}-{c.shape}-{c.dtype}".replace(" ", "_") for c in kd.cases(quick=quick)]
        metafunc.parametrize("index", range(len(ids)), ids=ids)


@pytest.mark.parametrize("impl", ["fastdistill", "eager", "torch.compile"])
def test_kd_loss(benchmark, quick, index, impl):
    case = kd.cases(quick=quick)[index]
    fn = case.run if impl == "fastdistill" else case.baselines[impl]
    benchmark.extra_info.update(shape=case.shape, dtype=case.dtype, bytes=case.bytes)
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
