"""pytest-benchmark suite for int8 CNN inference (torchvision ResNet-18 and MobileNetV2); the cases come from
fastdistill.bench.conv, shared with `fastdistill bench`. Each case is benchmarked for fastdistill and each baseline
(fp32 eager, torch.ao fbgemm static int8). With --benchmark-disable it runs the quick subset once."""
from fastdistill.bench import conv


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        quick = metafunc.config.getoption("benchmark_disable", default=False)
        params, ids = [], []
        for case in conv.cases(quick=quick):
            for impl, fn in [("fastdistill", case.run)] + list(case.baselines.items()):
                params.append((case, impl, fn))
                ids.append(f"{case.op}|{case.shape}|{impl}")
        metafunc.parametrize("case,impl,fn", params, ids=ids)


def test_conv(benchmark, case, impl, fn):
    benchmark.group = f"{case.op} {case.shape}"
    benchmark.extra_info.update(impl=impl, flops=case.flops, **case.extra)
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
