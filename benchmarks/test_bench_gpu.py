"""pytest-benchmark suite for the CUDA kernels; cases from fastdistill.bench.gpu (shared with
`fastdistill bench --device cuda`). A round replays a CUDA graph of many calls (bench.gpu.CudaTimer), so the
round time is that many calls: the group name says how many, and extra_info holds the GPU's seconds per
call. Tensors are made per case. Skipped without a GPU; with --benchmark-disable it runs the quick cases once."""
import statistics

import pytest
import torch

from fastdistill.bench import gpu as bench_gpu

pytestmark = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def pytest_generate_tests(metafunc):
    quick = metafunc.config.getoption("benchmark_disable", default=False)
    cases = bench_gpu.cases(quick=quick, device="cuda")  # allocates nothing
    if "baseline" in metafunc.fixturenames:
        pairs = [(c, name) for c in cases for name in c.baselines]
        metafunc.parametrize("case,baseline", pairs, ids=[f"{_id(c)}|{n}" for c, n in pairs])
    elif "case" in metafunc.fixturenames:
        metafunc.parametrize("case", cases, ids=[_id(c) for c in cases])


def _id(case):
    return f"{case.family}|{case.op.split(' [')[0]}|{case.shape}"  # the op without its printed target


def _bench(benchmark, case, fn):
    timer = bench_gpu.CudaTimer(fn)
    per_call = statistics.median(timer.sample() for _ in range(5))
    benchmark.group = f"{case.family} {case.op} {case.shape} (a round: {timer.calls} calls)"
    benchmark.extra_info.update(bytes=case.bytes, flops=case.flops, cold=case.cold, note=case.note,
                                calls_per_round=timer.calls, gpu_seconds_per_call=per_call,
                                graph=timer.graph is not None, capture_error=timer.capture_error)
    benchmark.pedantic(lambda: (timer.replay(), torch.cuda.synchronize()), rounds=10, iterations=1, warmup_rounds=1)


@needs_cuda
def test_gpu(benchmark, case):
    _bench(benchmark, case, case.run)


@needs_cuda
def test_gpu_baseline(benchmark, case, baseline):
    _bench(benchmark, case, case.baselines[baseline])
