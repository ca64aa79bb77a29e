"""The GPU run's report, on a made-up GPU run's logs (no GPU needed): sanitizer errors land on the kernel they
name, a timeout and a failed driver show as such, kernels never launched are marked, the pytest JUnit counts
and failures are read, and each target is met or not from the bench JSON's numbers."""
import json

import summary
from fastdistill.bench.gpu import evaluate_targets

MEMCHECK_LOG = """========= COMPUTE-SANITIZER
========= Invalid __global__ read of size 4 bytes
=========     at void fastdistill::kd::kd_forward_merge_kernel<float>(fastdistill::kd::KdLossParams, float *)+0x1a0
=========     by thread (3,0,0) in block (0,0,0)
========= ERROR SUMMARY: 1 error
"""
JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1"
skipped="2" tests="10" time="88.1"><testcase classname="tests.test_cuda" name="test_a" time="1"/>
<testcase classname="tests.test_cuda" name="test_b[x]" time="1"><failure message="AssertionError: boom&#10;more">
trace</failure></testcase></testsuite></testsuites>"""


def _result(target, median, baselines=None, bytes_=0.0, shape="s", flops=0.0, extra=None):
    return {"op": "op", "shape": shape, "bytes": bytes_, "flops": flops, "extra": {"target": target, **(extra or {})},
            "fastdistill": {"median": median}, "baselines": {k: {"median": v} for k, v in (baselines or {}).items()}}


BENCH = {"machine": {"limits": {"mem_gbps": 4000.0, "gpu": "NVIDIA H200"}, "torch": "2.11.0"}, "results": [
    _result("kd", 0.5e-3, bytes_=1e9),                               # floor 0.25 ms: 50%
    _result("int8", 5e-6, {"cuBLAS bf16": 10e-6}),                   # 2.0x
    _result("sparse", 5e-6, {"cuBLAS dense bf16": 6e-6, "to_sparse_semi_structured": 60e-6}),  # 1.2x
    _result("lm_head", 40e-3, {"unfused (F.linear + kd_loss)": 45e-3}, shape="met", flops=4e13,  # 1000 TFLOP/s
            extra={"memory": {"extra_bytes": 1.5e9}}),
    _result("lm_head", 40e-3, shape="over memory", flops=4e13, extra={"memory": {"extra_bytes": 2.5e9}}),
    _result("lm_head", 60e-3, shape="slow", flops=4e13, extra={"memory": {}}),
]}


def _write(path, name, text):
    (path / name).write_text(text)


def test_gpu_run_summary(tmp_path):
    _write(tmp_path, "mode.txt", "gpu\n")
    _write(tmp_path, "env.txt", "cpu: 16 cores\n")
    steps = [("build", 0, "build.log"), ("pytest cuda", 1, "pytest_cuda.log"), ("kernels kd_loss", 0, "k.log"),
             ("memcheck kd_loss", summary.SANITIZER_ERROR_EXIT, "memcheck_kd_loss.log"),
             ("racecheck kd_loss", 0, "racecheck_kd_loss.log"), ("synccheck kd_loss", 124, "synccheck_kd_loss.log"),
             ("memcheck int8", 1, "memcheck_int8.log"), ("bench", 0, "bench.log")]
    _write(tmp_path, "steps.tsv", "".join(f"{n}\t{rc}\t12.5\t120\t{log}\n" for n, rc, log in steps))
    _write(tmp_path, "memcheck_kd_loss.log", MEMCHECK_LOG)
    _write(tmp_path, "memcheck_int8.log", "AssertionError: int8_linear M=40 differs\n")
    _write(tmp_path, "pytest_cuda.log", "1 failed, 7 passed\n")
    _write(tmp_path, "pytest_cuda.xml", JUNIT)
    ran = dict.fromkeys(summary.KERNELS["kd_loss"], True) | {"kd_jsd_merge_kernel": False}
    _write(tmp_path, "kernels_kd_loss.json", json.dumps({"ran": ran}))
    _write(tmp_path, "gpu.json", json.dumps(BENCH))
    assert summary.main(str(tmp_path)) == 1  # steps failed
    text = (tmp_path / "summary.md").read_text()
    rows = {ln.split(" | ")[0].strip("| "): ln for ln in text.splitlines() if ln.startswith("| ")}
    assert rows["kd_forward_merge_kernel"].endswith("| yes | FAIL (1 report lines) | pass | TIMEOUT |")
    assert rows["kd_forward_kernel"].endswith("| yes | pass | pass | TIMEOUT |")  # the error is another kernel's
    assert rows["kd_jsd_merge_kernel"].endswith("| NO | not launched | not launched | TIMEOUT |")
    assert rows["int8_gemv_kernel"].endswith("| not run | driver failed (exit 1) | not run | not run |")
    assert "- 7 passed, 1 failed, 2 skipped in 88 s" in text
    assert "`tests.test_cuda::test_b[x]`: AssertionError: boom" in text
    assert "### memcheck int8: last lines of memcheck_int8.log" in text


def test_targets_met_or_not():
    got = {r["what"].split(" (")[0]: r for r in evaluate_targets(BENCH)}
    kd = got["KD loss fwd+bwd, bf16, 8192x128256"]
    assert kd["status"] == "NOT met" and kd["measured"].startswith("50% of floor: 0.50 ms, floor 0.25 ms")
    assert got["int8 GEMV, M = 1"]["status"] == "met" and got["int8 GEMV, M = 1"]["measured"].startswith("2.00x")
    assert got["2:4 GEMV, M = 1"]["status"] == "NOT met" and got["2:4 GEMV, M = 1"]["measured"].startswith("1.20x")
    lm = {r["what"].split("(run: ")[1].rstrip(")"): r for r in evaluate_targets(BENCH) if "lm_head" in r["what"]}
    assert lm["met"]["status"] == "met" and lm["met"]["measured"].startswith("40.0 ms (1000 TFLOP/s on the four GEMMs), 1.50 GB extra; unfused 45.0 ms")
    assert lm["over memory"]["status"] == "NOT met" and lm["slow"]["status"] == "NOT met"
    assert "memory not measured" in lm["slow"]["measured"]
    semi = got["torch semi-structured GEMM at M = 1"]
    assert semi["status"] == "reference" and semi["measured"].startswith("torch semi-structured 0.10x dense")
    empty = evaluate_targets({"machine": {"limits": {}}, "results": []})
    assert [r["status"] for r in empty[:4]] == ["not measured"] * 4
