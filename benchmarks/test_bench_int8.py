"""pytest-benchmark suite for int8 inference; the cases come from fastdistill.bench.int8 so the
suite and `fastdistill bench` cannot drift. With --benchmark-disable it runs the quick subset once
(a smoke test)."""
import pytest

from fastdistill.bench import int8 as bench_int8



def _cases(quick):
    return bench_int8.cases(quick=quick)


def _ids(cases):
    return [f"{c.op}|{c.shape}|{'cold' if c.cold else 'warm'}" for c in cases]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        quick = metafunc.config.getoption("benchmark_disable", default=False)
        cases = _cases(quick)
        metafunc.parametrize("case", cases, ids=_ids(cases))
        metafunc.parametrize("impl", ["fastdistill", "fp32 F.linear", "bf16 F.linear", "fbgemm quantize_dynamic"])


def test_int8(benchmark, case, impl):
    fn = case.run if impl == "fastdistill" else case.baselines.get(impl)
    if fn is None:
        pytest.skip(f"{impl} is not a baseline of {case.op}")
    benchmark.group = f"{case.op} {case.shape}"
    benchmark.extra_info.update(bytes=case.bytes, flops=case.flops, cold=case.cold)
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
