"""GPU benchmark cases (the CUDA kernels) and the GPU performance targets.

* KD loss forward+backward vs eager PyTorch and torch.compile; roofline = HBM bytes that must move
  (forward reads student + teacher, backward reads them again and writes the gradient).
* int8 GEMV (M <= 16, weights streamed cold) vs cuBLAS bf16 F.linear; M > 16 vs torch._int_mm.
* 2:4 GEMV (M <= 16, cold) vs dense cuBLAS bf16 and to_sparse_semi_structured (CUTLASS / cuSPARSELt).

`cases(quick, device="cuda")` feeds `fastdistill bench --device cuda` and benchmarks/test_bench_gpu.py;
`python -m fastdistill.bench.gpu [--quick]` times them here and prints each ratio next to its target.
"""
import argparse
import math
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from fastdistill.bench.common import Case, Rotating, machine_limits, summarize, time_fn

# The GPU performance targets, printed with every GPU run.
TARGETS = {
    "kd": ("KD loss fwd+bwd bf16 8192x128256", ">= 85% of the HBM bandwidth floor", 0.85),
    "int8": ("int8 GEMV M=1", ">= 1.8x cuBLAS bf16", 1.8),
    "sparse": ("2:4 GEMV M=1", ">= 1.6x cuBLAS dense bf16", 1.6),
}


def _with_target(op: str, family: str, applies: bool) -> str:
    """The op name as printed by `fastdistill bench --device cuda`, carrying its target."""
    return f"{op} [target {TARGETS[family][1]}]" if applies else op


GEMV_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 28672)]  # (K, N)
QUICK_GEMV_SHAPES = [(4096, 4096)]


def _kd_cases(quick: bool, device: str) -> List[Case]:
    from fastdistill.loss import kd_loss
    from fastdistill.reference import kd_loss_eager

    rows, V = (512, 32000) if quick else (8192, 128256)
    s = torch.randn(rows, V, device=device, dtype=torch.bfloat16).requires_grad_()
    t = torch.randn(rows, V, device=device, dtype=torch.bfloat16)

    def fwd_bwd(fn):
        def run():
            s.grad = None
            fn(s, t).backward()
        return run

    compiled = torch.compile(kd_loss_eager)
    elem = rows * V
    return [Case(
        family="kd", op=_with_target("kd_loss fwd+bwd", "kd", (rows, V) == (8192, 128256)),
        shape=f"{rows}x{V}", dtype="bf16",
        run=fwd_bwd(lambda a, b: kd_loss(a, b, temperature=2.0)),
        baselines={"eager": fwd_bwd(lambda a, b: kd_loss_eager(a, b, 2.0)),
                   "torch.compile": fwd_bwd(lambda a, b: compiled(a, b, 2.0))},
        bytes=elem * 2 * 5,  # fwd: read s, t; bwd: read s, t, write grad (bf16 each)
        note=("target " + TARGETS["kd"][1]) if (rows, V) == (8192, 128256) else "",
        extra={"target_fraction_of_floor": TARGETS["kd"][2]})]


def _int8_cases(quick: bool, device: str) -> List[Case]:
    ops = torch.ops.fastdistill

    out = []
    for k, n in (QUICK_GEMV_SHAPES if quick else GEMV_SHAPES):
        w = torch.randn(n, k, device=device) / math.sqrt(k)
        q, s = ops.quantize_per_channel(w)
        ours = Rotating(lambda: (ops.int8_pack_weight(q), s.clone()))
        bf16 = Rotating(lambda: (w.bfloat16(),))
        qt = Rotating(lambda: (q.t().contiguous().t(),))  # [K, N] column-major, as cuBLASLt wants it
        for m in ([1] if quick else [1, 4, 16, 128]):
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            xq = torch.randint(-127, 128, (m, k), device=device, dtype=torch.int8)
            base: Dict[str, Callable[[], object]] = {
                "cuBLAS bf16": lambda x=x: F.linear(x, *bf16.next()),
                "weight-only (ours)": lambda x=x: ops.int8_weight_only_linear(x, *ours.next()),
            }
            if m > 16:
                base["torch._int_mm"] = lambda xq=xq: torch._int_mm(xq, qt.next()[0].t())
            out.append(Case(
                family="int8", op=_with_target("int8_linear", "int8", m == 1), shape=f"M={m} K={k} N={n}",
                dtype="bf16 x / int8 w",
                run=lambda x=x: ops.int8_linear(x, *ours.next()), baselines=base,
                bytes=n * k + 4 * n + 2 * m * (k + n), flops=2 * m * n * k, cold=m <= 16, peak_kind="int8",
                note=("target " + TARGETS["int8"][1]) if m == 1 else "",
                extra={"target_speedup_vs_cublas_bf16": TARGETS["int8"][2]} if m == 1 else {}))
    return out


def _sparse_cases(quick: bool, device: str) -> List[Case]:
    ops = torch.ops.fastdistill

    out = []
    for k, n in (QUICK_GEMV_SHAPES if quick else GEMV_SHAPES):
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
        g = w.view(n, k // 4, 4)
        idx = g.float().abs().topk(2, -1).indices.sort(-1).values
        values = g.gather(-1, idx).reshape(n, k // 2).contiguous()
        codes = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.int32)
        meta = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8).contiguous()
        dense = torch.zeros_like(g).scatter_(-1, idx, g.gather(-1, idx)).reshape(n, k)
        ours = Rotating(lambda: ops.sparse24_pack(values, meta))
        cublas = Rotating(lambda: (dense.clone(),))
        semi: Optional[Rotating] = None
        ours_large: Optional[Rotating] = None  # what SparseLinear runs for M > 16
        try:
            from torch.sparse import to_sparse_semi_structured

            from fastdistill.sparse import to_semi_structured_2_4
            semi = Rotating(lambda: (to_sparse_semi_structured(dense.clone()),))
            ours_large = Rotating(lambda: (to_semi_structured_2_4(values, meta),))
        except Exception as exc:  # no CUTLASS / cuSPARSELt kernels for this GPU or build
            semi_error = str(exc)
        for m in ([1] if quick else [1, 4, 16, 128]):
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            base: Dict[str, Callable[[], object]] = {"cuBLAS dense bf16": lambda x=x: F.linear(x, *cublas.next())}
            if semi is not None:
                base["to_sparse_semi_structured"] = lambda x=x: F.linear(x, *semi.next())
            out.append(Case(
                family="sparse", op=_with_target("sparse24_linear", "sparse", m == 1), shape=f"M={m} K={k} N={n}",
                dtype="bf16",
                run=(lambda x=x: F.linear(x, *ours_large.next())) if m > 16 and ours_large is not None
                else (lambda x=x: ops.sparse24_linear(x, *ours.next(), None)), baselines=base,
                bytes=n * k + n * k // 8 + 2 * m * (k + n), flops=2 * m * n * k, cold=m <= 16,
                note=(("target " + TARGETS["sparse"][1]) if m == 1 else "")
                + ("" if semi is not None else f" (to_sparse_semi_structured unavailable: {semi_error})"),
                extra={"target_speedup_vs_cublas_bf16": TARGETS["sparse"][2]} if m == 1 else {}))
    return out


def cases(quick: bool, device: str = "cuda") -> List[Case]:
    """Every GPU case; quick=True keeps one small shape per family (a smoke run)."""
    if not str(device).startswith("cuda"):
        return []
    return _kd_cases(quick, device) + _int8_cases(quick, device) + _sparse_cases(quick, device)


def print_targets() -> None:
    print("GPU targets:")
    for what, target, _ in TARGETS.values():
        print(f"  {what}: {target}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    print_targets()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing measured")
        return
    lim = machine_limits("cuda")
    print(f"device: {torch.cuda.get_device_name()}  HBM {lim['mem_gbps']:.0f} GB/s (measured copy)")
    for c in cases(args.quick):
        ours = summarize(time_fn(c.run, repeats=10, warmup=3, device="cuda"))["median"]
        line = f"{c.family:6s} {c.op:18s} {c.shape:24s} {ours * 1e6:9.1f} us  {c.bytes / ours / 1e9:7.0f} GB/s"
        if c.family == "kd":
            frac = c.bytes / ours / 1e9 / lim["mem_gbps"]
            line += f"  {100 * frac:.0f}% of floor"
        for name, fn in c.baselines.items():
            try:
                t = summarize(time_fn(fn, repeats=10, warmup=3, device="cuda"))["median"]
                line += f"  | {name} {t * 1e6:.1f} us ({t / ours:.2f}x)"
            except Exception as exc:  # e.g. a vendor path that refuses the shape
                line += f"  | {name}: {type(exc).__name__}"
        print(line + (f"  [{c.note.strip()}]" if c.note.strip() else ""))


if __name__ == "__main__":
    main()
