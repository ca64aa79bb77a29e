"""int8 inference benchmark cases: fastdistill int8_linear (dynamic W8A8) and weight-only int8 vs
fp32 / bf16 F.linear (MKL) and torch.ao quantize_dynamic (fbgemm), measured in the same run.

Small M (<= 16) is weight streaming: every implementation rotates through COLD_BYTES of weight copies
(common.Rotating) so weights come from DRAM as in a real model. Large M is compute bound (GOP/s).
"""
import math
import warnings
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from fastdistill import ops
from fastdistill.bench.common import COLD_BYTES, Case, Rotating

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (768, 3072)]  # (K, N)
MS = [1, 4, 16, 128, 1024]
QUICK_SHAPES = [(768, 3072)]
QUICK_MS = [1, 128]
COLD_M = 16  # M <= COLD_M is measured cold-cache
# A transformer's linears (MiniLM 384/1536, BERT-base 768/3072) at sentence-sized M, weights warm as in a running
# model, with bias; the bound there is 1.3 x the roofline + 3 us, since per-call overhead matters at these sizes.
TRANSFORMER_SHAPES = [(1, 384, 384), (14, 384, 384), (14, 384, 1536), (14, 1536, 384), (64, 768, 3072)]  # (M, K, N)
QUICK_TRANSFORMER_SHAPES = [(14, 384, 384)]
TRANSFORMER_SLACK_S = 3e-6
# quantize_(..., fuse=True)'s fusions at MiniLM / BERT-base shapes (M, K, N): Q/K/V as one N = 3 x N GEMM against
# three calls, and the FFN up-projection with its GELU in the epilogue against int8_linear + F.gelu.
FUSION_SHAPES = [(14, 384, 384), (14, 384, 1536), (64, 768, 768), (64, 768, 3072)]
QUICK_FUSION_SHAPES = [(14, 384, 384)]


class _RotatingObjects(Rotating):
    """Rotating for copies that are not plain tensors (e.g. fbgemm modules): the caller gives the size."""

    def __init__(self, make, bytes_per_copy: int, min_bytes: int = COLD_BYTES, max_copies: int = 4096):
        self.copies = [make() for _ in range(self.copies_needed(bytes_per_copy, min_bytes, max_copies))]
        self.bytes_per_copy = bytes_per_copy
        self.i = 0


def _fbgemm(w: torch.Tensor):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)


class _Weights:
    """One shape's weights in every format, hot (single copy) or cold (rotating copies). Built when a case
    first runs, and only the most recent set is kept alive: building every shape's cold copies up front
    held ~16 GB, and the first case then ran under memory pressure (0.9 ms instead of 0.6 at M=1)."""

    _current = None

    @classmethod
    def get(cls, k: int, n: int, cold: bool) -> "_Weights":
        if cls._current is None or cls._current.key != (k, n, cold):
            cls._current = None  # free the previous set first
            cls._current = cls(k, n, cold)
        return cls._current

    def __init__(self, k: int, n: int, cold: bool):
        self.key = (k, n, cold)
        w = torch.randn(n, k) / math.sqrt(k)
        q, s = ops.quantize_per_channel(w)
        one = lambda: (ops.int8_pack_weight(q), s.clone())  # noqa: E731
        f32 = lambda: (w.clone(),)  # noqa: E731
        b16 = lambda: (w.bfloat16(),)  # noqa: E731
        fb = lambda: (_fbgemm(w),)  # noqa: E731
        if cold:
            self.ours, self.f32, self.bf16 = Rotating(one), Rotating(f32), Rotating(b16)
            self.fbgemm = _RotatingObjects(fb, n * k + 4 * n)
        else:
            self.ours, self.f32, self.bf16, self.fbgemm = [_Fixed(m()) for m in (one, f32, b16, fb)]


class _Fixed:
    def __init__(self, copy):
        self.copies = [copy]

    def next(self):
        return self.copies[0]


def cases(quick: bool = False, device: str = "cpu") -> List[Case]:
    if device != "cpu":
        return []  # the CUDA cases belong to the CUDA implementation of these ops
    shapes, ms = (QUICK_SHAPES, QUICK_MS) if quick else (SHAPES, MS)
    out = [c for k, n in shapes for m in ms for c in _cases(m, k, n, cold=m <= COLD_M)]
    out += [c for m, k, n in (QUICK_TRANSFORMER_SHAPES if quick else TRANSFORMER_SHAPES)
            for c in _cases(m, k, n, cold=False, transformer=True)]
    return out + [c for m, k, n in (QUICK_FUSION_SHAPES if quick else FUSION_SHAPES) for c in _fusion_cases(m, k, n)]


def _cases(m, k, n, cold, transformer=False) -> List[Case]:
    W = lambda: _Weights.get(k, n, cold)  # noqa: E731
    x = torch.randn(m, k)
    xb = x.bfloat16()
    bias = torch.randn(n) if transformer else None

    def ours():
        p, s = W().ours.next()
        return ops.int8_linear(x, p, s, bias)

    def ours_wo():
        p, s = W().ours.next()
        return ops.int8_weight_only_linear(x, p, s, None)

    def f32():
        return F.linear(x, W().f32.next()[0], bias)

    def bf16():
        return F.linear(xb, W().bf16.next()[0])

    def fbgemm():
        return W().fbgemm.next()[0](x)

    io_bytes = 4 * m * k + 4 * m * n
    common = dict(family="int8", shape=f"M={m} K={k} N={n}", dtype="float32", flops=2.0 * m * n * k, cold=cold,
                  peak_kind="int8", bytes=float(n * k + 4 * n + io_bytes))
    if transformer:
        return [Case(op="int8_linear (W8A8 dynamic, bias)", run=ours,
                     baselines={"fp32 F.linear": f32, "fbgemm quantize_dynamic": fbgemm},
                     note="transformer shape, warm weights (fbgemm's module has no bias)",
                     extra={"bound_slack_s": TRANSFORMER_SLACK_S}, **common)]
    out = [Case(op="int8_linear (W8A8 dynamic)", run=ours,
                baselines={"fp32 F.linear": f32, "bf16 F.linear": bf16, "fbgemm quantize_dynamic": fbgemm}, **common)]
    if m <= COLD_M:
        out.append(Case(op="int8_weight_only_linear", run=ours_wo,
                        baselines={"fp32 F.linear": f32, "bf16 F.linear": bf16}, **{**common, "peak_kind": "fp32"}))
    return out


def _fusion_cases(m, k, n) -> List[Case]:
    """Warm weights, with bias (as in a running model); both sides in the same run."""
    x = torch.randn(m, k)
    parts = [ops.quantize_per_channel(torch.randn(n, k) / math.sqrt(k)) for _ in range(3)]
    packed = [(ops.int8_pack_weight(q), s, torch.randn(n)) for q, s in parts]
    fused = (ops.int8_pack_weight(torch.cat([q for q, _ in parts])), torch.cat([s for _, s in parts]),
             torch.cat([b for _, _, b in packed]))
    p, s, b = packed[0]
    w = torch.randn(n, k) / math.sqrt(k)
    common = dict(family="int8", dtype="float32", cold=False, peak_kind="int8")
    qkv = Case(op="fused Q/K/V (one int8_linear, split)", shape=f"M={m} K={k} N=3x{n}",
               run=lambda: ops.int8_linear(x, *fused).split(n, dim=-1),
               baselines={"3 x int8_linear": lambda: [ops.int8_linear(x, *pk) for pk in packed]},
               flops=6.0 * m * n * k, bytes=float(3 * (n * k + 8 * n) + 4 * m * k + 12 * m * n),
               note="quantize_(fuse=True) attention; warm weights", **common)
    gelu = Case(op="int8_linear + GELU epilogue", shape=f"M={m} K={k} N={n}",
                run=lambda: ops.int8_linear(x, p, s, b, "gelu"),
                baselines={"int8_linear + F.gelu": lambda: F.gelu(ops.int8_linear(x, p, s, b)),
                           "fp32 F.linear + F.gelu": lambda: F.gelu(F.linear(x, w, b))},
                flops=2.0 * m * n * k, bytes=float(n * k + 8 * n + 4 * m * k + 4 * m * n),
                note="quantize_(fuse=True) FFN up-projection; warm weights", **common)
    return [qkv, gelu]


def main(quick: bool = False, repeats: int = 7):
    """Print a table: median time of fastdistill and of each baseline, ratios, GB/s or GOP/s."""
    from fastdistill.bench.common import machine_limits, summarize, time_fn
    lim = machine_limits("cpu")
    print(f"# machine: {lim['threads']} threads, read bandwidth {lim['mem_gbps']:.1f} GB/s, "
          f"fp32 {lim['fp32_gflops']:.0f} GFLOP/s, torch._int_mm {lim['int8_gops']:.0f} GOP/s")
    print("| op | shape | cold | ours ms | GB/s | GOP/s | " + "fp32 ms | bf16 ms | fbgemm ms | x fp32 | x bf16 | x fbgemm |")
    print("|" + "---|" * 13)
    for c in cases(quick):
        t = summarize(time_fn(c.run, repeats=repeats, warmup=2, min_time=0.02))["median"]
        base = {name: summarize(time_fn(fn, repeats=repeats, warmup=2, min_time=0.02))["median"]
                for name, fn in c.baselines.items()}
        b = lambda key: base.get(key)  # noqa: E731
        fmt = lambda v: f"{v * 1e3:.3f}" if v else "-"  # noqa: E731
        ratio = lambda v: f"{v / t:.2f}" if v else "-"  # noqa: E731
        print(f"| {c.op} | {c.shape} | {'cold' if c.cold else 'warm'} | {t * 1e3:.3f} | {c.bytes / t / 1e9:.1f} | "
              f"{c.flops / t / 1e9:.0f} | {fmt(b('fp32 F.linear'))} | {fmt(b('bf16 F.linear'))} | "
              f"{fmt(b('fbgemm quantize_dynamic'))} | {ratio(b('fp32 F.linear'))} | {ratio(b('bf16 F.linear'))} | "
              f"{ratio(b('fbgemm quantize_dynamic'))} |", flush=True)


if __name__ == "__main__":
    import sys
    for arg in sys.argv[1:]:
        if arg.startswith("--threads="):
            torch.set_num_threads(int(arg.split("=", 1)[1]))
    main(quick="--quick" in sys.argv)
