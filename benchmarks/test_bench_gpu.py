"""pytest-benchmark suite for the CUDA kernels; cases from fastdistill.bench.gpu (shared with
`fastdistill bench --device cuda`). Skipped without a GPU. With --benchmark-disable it runs the quick
subset once (a smoke test)."""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from fastdistill.bench import gpu as bench_gpu  # noqa: E402


def _ids(cases):
    return [f"{c.family}|{c.op}|{c.shape}" for c in cases]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        quick = metafunc.config.getoption("benchmark_disable", default=False)
        cases = bench_gpu.cases(quick=quick, device="cuda")
        metafunc.parametrize("case", cases, ids=_ids(cases))


def test_gpu(benchmark, case):
    benchmark.group = f"{case.family} {case.op} {case.shape}"
    benchmark.extra_info.update(bytes=case.bytes, flops=case.flops, cold=case.cold, note=case.note)
    benchmark.pedantic(lambda: (case.run(), torch.cuda.synchronize()), rounds=10, iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("baseline", ["eager", "torch.compile", "cuBLAS bf16", "torch._int_mm",
                                      "cuBLAS dense bf16", "to_sparse_semi_structured"])
def test_gpu_baseline(benchmark, case, baseline):
    fn = case.baselines.get(baseline)
    if fn is None:
        pytest.skip(f"{baseline} is not a baseline of {case.op}")
    benchmark.group = f"{case.family} {case.op} {case.shape}"
    benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=10, iterations=1, warmup_rounds=2)
