"""pytest-benchmark suite for 2:4 sparsity; the cases come from fastdistill.bench.sparse so the
suite and `fastdistill bench` cannot drift. With --benchmark-disable it runs the quick subset once
(a smoke test)."""
import pytest

from fastdistill.bench import sparse as bench_sparse

IMPLS = ["fastdistill", "fp32 F.linear", "bf16 F.linear", "fastdistill dense int8"]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        quick = metafunc.config.getoption("benchmark_disable", default=False)
        cases = bench_sparse.cases(quick=quick)
        metafunc.parametrize("case", cases, ids=[f"{c.op}|{c.shape}|{'cold' if c.cold else 'warm'}" for c in cases])
        metafunc.parametrize("impl", IMPLS)


def test_sparse(benchmark, case, impl):
    fn = case.run if impl == "fastdistill" else case.baselines.get(impl)
    if fn is None:
        pytest.skip(f"{impl} is not a baseline of {case.op}")
    benchmark.group = f"{case.op} {case.shape}"
    benchmark.extra_info.update(bytes=case.bytes, flops=case.flops, cold=case.cold)
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
