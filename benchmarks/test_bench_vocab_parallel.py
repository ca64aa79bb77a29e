"""The vocab-parallel loss's benchmark (2 gloo processes; shared with `fastdistill bench --only vocab_parallel`).
It times inside its own process group, so pytest-benchmark only records its report."""
from fastdistill.bench import vocab_parallel


def test_vocab_parallel_step(benchmark, quick):
    report = vocab_parallel.process_report(quick=quick)
    benchmark.extra_info.update(report)
    assert set(report["median_s"]) == {"2 ranks", "one process, full vocabulary", "one process, one shard"}
    assert report["bytes_per_row"] == 16 + 12  # forward KL without labels: 2 int64 maxima keys, 3 fp32 sums
