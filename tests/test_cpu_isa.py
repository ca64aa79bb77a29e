"""The CPU ISA switch: each level runs its own kernels (the tables the calls dispatched to, and bitwise-different
results where the levels' arithmetic differs), `kernel_levels` says which table each op family uses, and a level the CPU lacks (FASTDISTILL_CPU_HIDE simulates such a CPU) is a clear
error by variable and by context manager."""
import itertools
import os
import subprocess
import sys

import pytest
import torch

import fastdistill
from fastdistill import ops
from fastdistill.isa import available_cpu_isas
from fastdistill.reference import compressed_2_4_sample

C = fastdistill._ext._C
# The highest level with its own table, per family (a missing entry falls to the level below).
OWN_LEVELS = {"conv": ["scalar", "avx2", "avx512"], "int8": ["scalar", "avx2", "avx512", "avx512bf16", "amx"], "kd_loss": ["scalar", "avx2", "avx512", "avx512bf16"],
              "sparse24": ["scalar", "avx2", "avx512"]}
ORDER = ["scalar", "avx2", "avx512", "avx512bf16", "amx"]


def _expected_levels(isa):
    return {fam: max((lv for lv in own if ORDER.index(lv) <= ORDER.index(isa)), key=ORDER.index)
            for fam, own in OWN_LEVELS.items()}


def _outputs():
    """One fp32 result per family whose kernels differ in summation order between levels."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(9, 5000, generator=g), torch.randn(9, 5000, generator=g)
    x = s.clone().requires_grad_()
    loss = fastdistill.kd_loss(x, t, divergence="jsd", reduction="none")
    loss.sum().backward()
    a = torch.randn(7, 3000, generator=g)
    w = torch.randn(64, 3000, generator=g)
    q, scale = ops.quantize_per_channel(w)
    wo = ops.int8_weight_only_linear(a, ops.int8_pack_weight(q), scale)
    values, meta, _ = compressed_2_4_sample(torch.randn(64, 512, generator=g))
    sp = ops.sparse24_linear(torch.randn(5, 512, generator=g), values, meta)
    conv = _conv_output(g, torch.float32)
    return {"kd_loss": torch.cat([loss, x.grad.flatten()]), "int8": wo, "sparse24": sp, "conv": conv}


def _conv_output(g, dtype):
    """An int8 Conv2d (3x3, several pixel tiles) and a depthwise one, both with a residual and ReLU."""
    outs = []
    for cin, cout, groups in [(24, 40, 1), (40, 40, 40)]:
        q = torch.randint(-127, 128, (cout, cin // groups, 3, 3), dtype=torch.int8, generator=g)
        packed, scale = ops.int8_conv2d_pack_weight(q, groups), torch.rand(cout, generator=g) / 100
        x = torch.randn(2, cin, 12, 11, generator=g).to(dtype)
        residual = torch.randn(2, cout, 12, 11, generator=g).to(dtype)
        outs.append(ops.int8_conv2d(x, packed, scale, torch.randn(cout, generator=g), None, residual,
                                    (3, 3), (1, 1), (1, 1), (1, 1), groups, "relu").flatten())
    return torch.cat(outs)


# Where two levels' arithmetic differs, so must their bits. Not for int8, whose SIMD levels sum in the same order
# (int32 sums are exact; weight-only's fp32 sums follow the packed layout), nor between avx512 and avx512bf16 on
# fp32 data (they differ only where bf16 comes in or goes out): there the dispatch record is the proof.
BITWISE_DIFFERENT = ("kd_loss", "sparse24")
SAME_FP32_CODE = {frozenset({"avx512", "avx512bf16"})}


@pytest.mark.parametrize("isa", available_cpu_isas())
def test_kernel_levels_follow_the_switch(isa):
    with fastdistill.cpu_isa(isa):
        assert fastdistill.isa.active_cpu_isa() == isa
        assert C.kernel_levels() == _expected_levels(isa)


def test_every_level_runs_its_own_kernels():
    outs = {}
    for isa in available_cpu_isas():
        with fastdistill.cpu_isa(isa):
            outs[isa] = _outputs()
            assert C.dispatched_levels() == _expected_levels(isa)  # what the kernel calls above ran
    for a, b in itertools.combinations(outs, 2):
        for family in BITWISE_DIFFERENT:
            levels = frozenset({_expected_levels(a)[family], _expected_levels(b)[family]})
            if len(levels) == 2 and levels not in SAME_FP32_CODE:
                assert not torch.equal(outs[a][family], outs[b][family]), (family, a, b)


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True, text=True)


def test_a_cpu_without_vnni_runs_avx2_and_says_so():
    code = ("import fastdistill; print(fastdistill.isa.available_cpu_isas()); "
            "print(fastdistill._ext._C.kernel_levels())")
    out = _run(code, FASTDISTILL_CPU_HIDE="avx512vnni")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["['avx2', 'scalar']", str(_expected_levels("avx2"))]
    info = subprocess.run([sys.executable, "-m", "fastdistill", "info"], capture_output=True, text=True,
                          env=dict(os.environ, FASTDISTILL_CPU_HIDE="avx512vnni"), check=True).stdout
    assert "best for this cpu: avx2" in info and "int8 avx2, kd_loss avx2, sparse24 avx2" in info


@pytest.mark.parametrize("how", ["variable", "context manager"])
def test_a_level_the_cpu_lacks_is_a_clear_error(how):
    if how == "variable":
        code = "import torch, fastdistill; fastdistill.kd_loss(torch.randn(2, 5), torch.randn(2, 5))"
        out = _run(code, FASTDISTILL_CPU_HIDE="avx512bf16", FASTDISTILL_CPU_ISA="avx512bf16")
        origin = "FASTDISTILL_CPU_ISA"
    else:
        code = "import fastdistill\nwith fastdistill.cpu_isa('avx512bf16'):\n    pass"
        out = _run(code, FASTDISTILL_CPU_HIDE="avx512bf16")
        origin = "set_cpu_isa"
    assert out.returncode != 0
    assert (f"fastdistill: {origin} asks for the avx512bf16 path, which this CPU cannot run (best available: avx512)"
            in out.stderr), out.stderr


def test_unknown_hidden_feature_is_a_clear_error():
    out = _run("import fastdistill; fastdistill.isa.available_cpu_isas()", FASTDISTILL_CPU_HIDE="avx9")
    assert out.returncode != 0 and "FASTDISTILL_CPU_HIDE names an unknown CPU feature 'avx9'" in out.stderr


def _thread_sensitive_outputs(dtype):
    """Outputs of every op whose work is split across threads: kd (training path, no-grad forward; row-parallel
    and split long rows), int8 W8A8 and weight-only (K > 2048: several K slices), 2:4 (values in `dtype`), int8
    Conv2d (implicit GEMM and depthwise)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for shape in [(70, 3001), (3, 40000)]:
        s = torch.randn(shape, generator=g).to(dtype)
        t = torch.randn(shape, generator=g).to(dtype)
        x = s.clone().requires_grad_()
        loss = fastdistill.kd_loss(x, t, divergence="jsd", reduction="none")
        loss.backward(torch.rand(loss.shape, generator=g))
        with torch.no_grad():
            out += [loss, x.grad, fastdistill.kd_loss(s, t, divergence="reverse_kl", reduction="none")]
    w = torch.randn(70, 4500, generator=g)
    q, scale = ops.quantize_per_channel(w)
    packed, bias = ops.int8_pack_weight(q), torch.randn(70, generator=g)
    a = torch.randn(33, 4500, generator=g).to(dtype)
    out += [ops.int8_weight_only_linear(a, packed, scale, bias), ops.int8_linear(a, packed, scale, bias)]
    values, meta, _ = compressed_2_4_sample(torch.randn(96, 1024, generator=g))
    out.append(ops.sparse24_linear(torch.randn(40, 1024, generator=g).to(dtype), values.to(dtype), meta))
    out.append(_conv_output(g, dtype))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("isa", available_cpu_isas())
def test_results_do_not_depend_on_the_thread_count(isa, dtype):
    threads = torch.get_num_threads()
    try:
        with fastdistill.cpu_isa(isa):
            runs = []
            for n in (1, 2, 3, 7):
                torch.set_num_threads(n)
                runs.append(_thread_sensitive_outputs(dtype))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for i, (a, b) in enumerate(zip(runs[0], run)):
            assert torch.equal(a, b), i


@pytest.mark.parametrize("m,k,n", [(1, 384, 384), (14, 384, 384), (32, 384, 384), (64, 768, 768)])
def test_thread_policy_both_sides_of_the_crossover(m, k, n):
    """Small problems run on the calling thread (no parallel region: waking the pool cost more than the work),
    larger ones on more threads; the linears give the same bits either way."""
    from fastdistill import _C, compress_2_4
    threads = torch.get_num_threads()
    dense_int8_work = m * k * n  # int8 multiply-add equivalents, as the ops count them
    try:
        torch.set_num_threads(2)
        expect = 1 if dense_int8_work < 4e6 else 2
        assert _C.threads_for_work(dense_int8_work) == expect
        assert _C.threads_for_work(0) == 1 and _C.threads_for_work(1e12) == 2
        g = torch.Generator().manual_seed(m)
        w, x, bias = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g), torch.randn(n, generator=g)
        q, s = ops.quantize_per_channel(w)
        packed = ops.int8_pack_weight(q)
        values, meta = compress_2_4(w)
        q24 = values.mul(50).round().clamp(-127, 127).to(torch.int8)
        runs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            runs.append((ops.int8_linear(x, packed, s, bias), ops.sparse24_linear(x, values, meta, bias),
                         ops.sparse24_int8_linear(x, q24, meta, s, bias)))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)
