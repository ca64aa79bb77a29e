"""pytest-benchmark suite for int8 inference; the cases come from fastdistill.bench.int8 so the
suite and `fastdistill bench` cannot drift. Each case is benchmarked for fastdistill and for each of
its baselines (fp32 / bf16 F.linear, fbgemm quantize_dynamic). With --benchmark-disable it runs the
quick subset once (a smoke test)."""
from fastdistill.bench import int8 as bench_int8


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        quick = metafunc.config.getoption("benchmark_disable", default=False)
        params, ids = [], []
        for case in bench_int8.cases(quick=quick):
            for impl, fn in [("fastdistill", case.run)] + list(case.baselines.items()):
                params.append((case, impl, fn))
                ids.append(f"{case.op}|{case.shape}|{'cold' if case.cold else 'warm'}|{impl}")
        metafunc.parametrize("case,impl,fn", params, ids=ids)


def test_int8(benchmark, case, impl, fn):
    benchmark.group = f"{case.op} {case.shape}"
    benchmark.extra_info.update(impl=impl, bytes=case.bytes, flops=case.flops, cold=case.cold)
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
