"""The command line: info, the end-to-end demo (quick mode) and the benchmark command."""
import json
import os
import statistics
import subprocess
import sys

import pytest
import torch

import fastdistill
from fastdistill.demo import run_demo


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "fastdistill", *args], capture_output=True, text=True,
                          timeout=timeout, check=True).stdout


def test_info_reports_build():
    out = run_cli("info")
    assert f"torch {torch.__version__}" in out
    c = fastdistill._ext._C
    assert f"cpu isa paths compiled: {', '.join(c.compiled_cpu_isas())}; best for this cpu: {c.best_cpu_isa()}" in out
    with fastdistill.cpu_isa("avx2"):
        levels = c.kernel_levels()
    assert levels == {"conv": "avx2", "int8": "avx2", "kd_loss": "avx2", "sparse24": "avx2"}
    assert c.compiled_cpu_isas() == (["amx", "avx512bf16", "avx512", "avx2", "scalar"] if os.uname().machine == "x86_64"
                                     else ["scalar"])
    active = c.kernel_levels()
    assert f"cpu kernels per op family: conv {active['conv']}, int8 {active['int8']}, kd_loss {active['kd_loss']}, " \
           f"sparse24 {active['sparse24']}" in out
    # Every op with the devices it has kernels for in this build: kd_loss_fused and kd_topk_fused (the eager CPU
    # training path) are CPU-only, every other op has a CUDA kernel when the build has CUDA.
    cuda = c.built_with_cuda()
    ops = ["int8_conv2d", "int8_conv2d_pack_weight", "int8_gemm_s32", "int8_linear", "int8_pack_weight", "int8_unpack_weight", "int8_weight_only_linear",
           "kd_loss_backward", "kd_loss_forward", "kd_loss_fused", "kd_topk_backward", "kd_topk_forward", "kd_topk_fused",
           "quantize_per_channel", "quantize_per_token",
           "sparse24_int8_linear", "sparse24_linear", "sparse24_pack"]
    listed = out.split("registered ops:\n", 1)[1].split()
    for op in ops:
        cpu_only = ("kd_loss_fused", "kd_topk_fused", "int8_conv2d", "int8_conv2d_pack_weight")
        devices = "cpu, cuda" if cuda and op not in cpu_only else "cpu"
        i = listed.index(op)
        assert " ".join(listed[i + 1:i + 1 + len(devices.split())]) == devices, op
    assert "cuda: built for" in out if cuda else "cuda: not built" in out


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """The quick demo (default epochs; it trains as the default run does) for seeds 0-4."""
    return [run_demo(out_dir=str(tmp_path_factory.mktemp(f"demo{seed}")), seed=seed, quick=True, log=lambda *_: None)
            for seed in range(5)]


def test_demo_distilled_student_beats_hard_labels(demo_runs):
    def acc(run, stage):
        return next(r["accuracy"] for r in run["stages"] if r["stage"] == stage)

    # Same student, init, batches, epochs and Adam lr (the hard-label student's best); one test image is 0.22%.
    gains = [acc(r, "student distilled") - acc(r, "student hard-label") for r in demo_runs]
    mean, stderr = statistics.mean(gains), statistics.stdev(gains) / len(gains) ** 0.5
    assert mean > 0 and mean > stderr, gains


def test_demo_pruning_recovers_and_keeps_pattern(demo_runs):
    for run in demo_runs:
        acc = {r["stage"]: r["accuracy"] for r in run["stages"]}
        assert run["two_four_pattern_kept"]
        assert acc["2:4 recovered"] >= acc["pruned 2:4 (no tuning)"] - 0.005
        assert acc["2:4 + int8"] >= acc["2:4 recovered"] - 0.03
        assert acc["int8 (W8A8)"] >= acc["teacher fp32"] - 0.03


def test_demo_reloaded_models_are_identical_and_files_written(demo_runs, tmp_path):
    for run in demo_runs:
        assert all(r["reload_identical"] for r in run["stages"])
        sizes = {r["stage"]: r["bytes"] for r in run["stages"]}
        assert sizes["2:4 recovered"] < sizes["teacher fp32"]
        assert sizes["int8 (W8A8)"] < 0.4 * sizes["teacher fp32"]
        assert sizes["2:4 + int8"] < sizes["int8 (W8A8)"]
    out = run_demo(out_dir=str(tmp_path), seed=3, epochs=2, quick=True, log=lambda *_: None)
    assert os.path.exists(tmp_path / "demo.png") and json.loads((tmp_path / "results.json").read_text()) == json.loads(
        json.dumps(out))


def test_demo_is_reproducible_with_seed(tmp_path):
    a = run_demo(out_dir=str(tmp_path / "a"), seed=5, epochs=2, quick=True, plot=False, log=lambda *_: None)
    b = run_demo(out_dir=str(tmp_path / "b"), seed=5, epochs=2, quick=True, plot=False, log=lambda *_: None)
    assert [r["accuracy"] for r in a["stages"]] == [r["accuracy"] for r in b["stages"]]


def test_bench_quick_json_has_every_declared_case(tmp_path):
    from fastdistill.bench import conv, fused_linear, int8, kd, sparse

    path = tmp_path / "bench.json"
    run_cli("bench", "--quick", "--json", str(path), "--plot", str(tmp_path / "bench.png"), timeout=900)
    data = json.loads(path.read_text())
    declared = {(c.family, c.op, c.shape, c.dtype) for m in (kd, fused_linear, int8, sparse, conv)
                for c in m.cases(quick=True)}
    got = {(r["family"], r["op"], r["shape"], r["dtype"]) for r in data["results"]}
    assert declared == got
    for r in data["results"]:
        assert r["fastdistill"]["median"] > 0 and r["baselines"]
    assert data["machine"]["limits"]["mem_gbps"] > 0 and os.path.exists(tmp_path / "bench.png")


def test_bench_rejects_unknown_family():
    out = subprocess.run([sys.executable, "-m", "fastdistill", "bench", "--only", "fft"], capture_output=True,
                         text=True)
    assert out.returncode != 0 and "--only takes kd,fused_linear,int8,sparse,conv,vocab_parallel, got fft" in out.stderr


def test_readme_generator_writes_summary_and_results(tmp_path):
    import json

    from fastdistill.bench.readme import SUMMARY, SUMMARY_END, SUMMARY_START, main

    op, shape, dtype = SUMMARY[0]
    row = {"op": op, "shape": shape, "dtype": dtype, "cold": False, "flops": 0, "bytes": 2e9, "roofline_s": 0.05,
           "fastdistill": {"median": 0.1}, "baselines": {"eager": {"median": 0.5}, "torch.compile": {"median": 0.3}}}
    other = dict(row, op="not in the summary")
    data = {"quick": True, "results": [row, other], "memory": [],
            "machine": {"processor": "Test CPU", "machine": "x86_64", "threads": 2, "torch": "2.x",
                        "limits": {"mem_gbps": 20.0, "fp32_gflops": 100.0, "int8_gops": 400.0}}}
    (tmp_path / "r.json").write_text(json.dumps(data))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{SUMMARY_START}\nstale text\n{SUMMARY_END}\noutro\n")
    main([str(tmp_path / "r.json"), "--results", str(tmp_path / "RESULTS.md"), "--readme", str(readme)])
    text = readme.read_text()
    assert "stale text" not in text and text.startswith("intro\n") and text.endswith("outro\n") and "Test CPU" in text
    assert f"| {op} | {shape} | {dtype} | 100.00 ms | torch.compile 300.00 ms | 3.00x | 20.0 GB/s | 50% |" in text
    assert "not in the summary" not in text
    results = (tmp_path / "RESULTS.md").read_text()
    assert "not in the summary" in results and "eager 500.00 ms | 5.00x" in results
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="has no <!-- perf-summary:start -->"):
        main([str(tmp_path / "r.json"), "--results", str(tmp_path / "RESULTS.md"), "--readme", str(readme)])
