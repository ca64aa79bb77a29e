"""GPU benchmark cases (the CUDA kernels), the GPU-side timer, and the GPU performance targets.

* KD loss forward+backward vs eager PyTorch and torch.compile; the floor is the HBM bytes that must move
  (forward reads student + teacher, backward reads them again and writes the gradient). Plus the forward
  alone at Liger-Kernel's published kl_div shape, as a reference point.
* int8 GEMV (M <= 16, weights streamed cold) vs cuBLAS bf16 F.linear; M > 16 also vs torch._int_mm.
* 2:4 GEMV (M <= 16, cold) and SparseLinear above 16 rows (torch's semi-structured GEMM on our layout),
  each vs dense cuBLAS bf16 and vs to_sparse_semi_structured built by torch's own path.

`cases(quick, device)` feeds `fastdistill bench --device cuda` and benchmarks/test_bench_gpu.py. Tensors are
made when a case first runs, and only one case's are alive at a time. On CPU tensors the same cases are built
at toy sizes, so that benchmarks/gpu_check.sh --dry-run can run them without a GPU.

    python -m fastdistill.bench.gpu [--quick] [--device cuda|cpu] [--json FILE]   # time the cases here
    python -m fastdistill.bench.gpu --targets FILE.json    # each GPU target, met or not, from a bench JSON
"""
import argparse
import dataclasses
import json
import math
import platform
import sys
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from fastdistill.bench.common import COLD_BYTES, Case, Rotating


# ----------------------------------------------------------------------------------------- targets
@dataclasses.dataclass(frozen=True)
class Target:
    what: str
    goal: str
    threshold: float


TARGETS = {
    "kd": Target("KD loss fwd+bwd, bf16, 8192x128256", ">= 85% of the HBM floor (about 3 ms on an H200)", 0.85),
    "sparse": Target("2:4 GEMV, M = 1", ">= 1.6x cuBLAS dense bf16", 1.6),
    "int8": Target("int8 GEMV, M = 1", ">= 1.8x cuBLAS bf16", 1.8),
    "lm_head": Target("fused lm_head loss fwd+bwd, 8192x4096 -> 128256, bf16", "<= 52 ms and <= 2 GB extra", 52e-3),
}
# Published figures from other GPUs and libraries: printed next to ours, not pass or fail.
LIGER_KL_SECONDS = 8.7e-3    # Liger-Kernel kl_div forward, 16384x131072 fp32, H100 PCIe
CUSPARSELT_M1_VS_DENSE = 0.11  # cuSPARSELt at batch 1 vs dense (pytorch/pytorch#111339)

KD_TARGET_SHAPE = (8192, 128256)
LM_HEAD_SHAPE = (8192, 4096, 128256)  # rows, hidden (student and teacher), vocabulary
LM_HEAD_EXTRA_BYTES = 2e9
LIGER_LM_HEAD = "Liger chunked JSD 60.7 ms, 11.1 GB (H100, published)"
LIGER_SHAPE = (16384, 131072)
GEMV_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 28672)]  # (K, N)
QUICK_GEMV_SHAPES = [(4096, 4096)]
# CPU tensors (the dry run): the same cases at sizes the CPU ops finish in milliseconds.
TOY = {"kd": (64, 1000), "liger": (32, 1024), "gemv": [(256, 128)], "lm_head": (64, 32, 1000)}


# -------------------------------------------------------------------------------------------- timer
class CudaTimer:
    """Times fn on the GPU: `calls` back-to-back calls captured in one CUDA graph, replayed between two CUDA
    events, so that neither Python nor per-launch overhead (as long as a 3-7 us GEMV) enters the figure.
    Weights that rotate (common.Rotating) rotate inside the graph too. A callable that cannot be captured
    (it synchronises with the host) runs eagerly between the events instead; `graph` is None then."""

    def __init__(self, fn: Callable[[], object], *, min_time: float = 0.01, warmup: int = 2, max_calls: int = 2000):
        self.fn = fn
        side = torch.cuda.Stream()  # warm up off the capture stream (lazy library init), as torch's graph docs ask
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(max(warmup, 1)):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        self.calls = 1
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        one = self.sample()  # eager, one call
        self.calls = int(min(max_calls, max(1, math.ceil(min_time / max(one, 1e-7)))))
        self.capture_error = ""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                for _ in range(self.calls):
                    fn()
            self.graph = graph
        except Exception as exc:  # e.g. a host sync inside fn: time it eagerly
            self.capture_error = f"{type(exc).__name__}: {exc}"[:200]
            torch.cuda.synchronize()
            print(f"fastdistill.bench.gpu: {getattr(fn, '__qualname__', fn)} cannot be captured in a CUDA graph "
                  f"({self.capture_error}); timed eagerly, launch overhead included", file=sys.stderr)

    def replay(self) -> None:
        """One round of `calls` calls, asynchronously."""
        if self.graph is not None:
            self.graph.replay()
        else:
            for _ in range(self.calls):
                self.fn()

    def sample(self) -> float:
        """Seconds per call over one round, from CUDA events."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        self.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / self.calls


def cuda_time(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1, min_time: float = 0.0) -> List[float]:
    """Seconds per call for `repeats` samples, each a CudaTimer round of at least min_time (10 ms floor)."""
    timer = CudaTimer(fn, min_time=max(min_time, 0.01), warmup=warmup)
    return [timer.sample() for _ in range(repeats)]


def cuda_limits() -> Dict[str, object]:
    """This GPU's bandwidth (a device-to-device copy of 1 GiB, bytes read + written) and matmul peaks, measured
    now with CudaTimer."""
    n = 1 << 30
    src = torch.ones(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t_copy = min(cuda_time(lambda: dst.copy_(src), repeats=5))
    del src, dst
    m = 8192
    ops = 2 * m**3
    x32 = torch.randn(m, m, device="cuda")
    xbf = x32.to(torch.bfloat16)
    xi8 = torch.randint(-127, 127, (m, m), dtype=torch.int8, device="cuda")
    # Each peak with its own kernel: fp32 matmul (TF32 as torch's setting has it), bf16 matmul, torch._int_mm.
    t32 = min(cuda_time(lambda: x32 @ x32, repeats=3))
    tbf = min(cuda_time(lambda: xbf @ xbf, repeats=3))
    ti8 = min(cuda_time(lambda: torch._int_mm(xi8, xi8.t()), repeats=3))
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"device": "cuda", "gpu": props.name, "multiprocessors": props.multi_processor_count,
            "mem_gbps": 2 * n / t_copy / 1e9, "fp32_gflops": ops / t32 / 1e9, "bf16_gflops": ops / tbf / 1e9,
            "int8_gops": ops / ti8 / 1e9}


# -------------------------------------------------------------------------------------------- cases
class _CaseTensors:
    """A case's tensors, made on the case's first call. Making one case's drops the previous case's, so that
    only the case being timed holds device memory (the KD case alone is 2.1 GB per tensor) and the whole run
    fits a 24 GB GPU; collecting the cases allocates nothing."""

    _live: Optional["_CaseTensors"] = None

    def __init__(self, make: Callable[[], SimpleNamespace]):
        self._make = make
        self._value: Optional[SimpleNamespace] = None

    def __call__(self) -> SimpleNamespace:
        if self._value is None:
            if _CaseTensors._live is not None:
                _CaseTensors._live._value = None
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            self._value = self._make()
            _CaseTensors._live = self
        return self._value


def _cold_bytes(device: str) -> int:
    return COLD_BYTES if device.startswith("cuda") else 0  # CPU tensors: a smoke run, one copy


def _kd_cases(quick: bool, device: str) -> List[Case]:
    from fastdistill.loss import kd_loss
    from fastdistill.reference import kd_loss_eager

    on_gpu = device.startswith("cuda")
    rows, V = KD_TARGET_SHAPE if on_gpu else TOY["kd"]
    kd = _CaseTensors(lambda: SimpleNamespace(
        s=torch.randn(rows, V, device=device, dtype=torch.bfloat16).requires_grad_(),
        t=torch.randn(rows, V, device=device, dtype=torch.bfloat16)))

    def fwd_bwd(fn):
        def run():
            x = kd()
            x.s.grad = None
            fn(x.s, x.t).backward()
        return run

    baselines = {"eager": fwd_bwd(lambda a, b: kd_loss_eager(a, b, 2.0))}
    if on_gpu:  # compiling on a CPU takes longer than the whole dry run
        compiled = torch.compile(kd_loss_eager, dynamic=False)
        baselines["torch.compile"] = fwd_bwd(lambda a, b: compiled(a, b, 2.0))
    out = [Case(
        family="kd", op=f"kd_loss fwd+bwd [target {TARGETS['kd'].goal}]", shape=f"{rows}x{V}", dtype="bf16",
        run=fwd_bwd(lambda a, b: kd_loss(a, b, temperature=2.0)), baselines=baselines,
        bytes=rows * V * 2 * 5,  # fwd: read s, t; bwd: read s, t, write the gradient (bf16 each)
        note="forward KL, T=2, batchmean", extra={"target": "kd"})]

    rows, V = LIGER_SHAPE if on_gpu else TOY["liger"]
    fwd = _CaseTensors(lambda: SimpleNamespace(s=torch.randn(rows, V, device=device),
                                               t=torch.randn(rows, V, device=device)))
    out.append(Case(
        family="kd", op="kd_loss forward [reference: Liger kl_div 8.7 ms on an H100 PCIe]", shape=f"{rows}x{V}",
        dtype="fp32", run=lambda: kd_loss(fwd().s, fwd().t, temperature=1.0), baselines={},
        bytes=rows * V * 4 * 2, note="forward KL; no eager baseline (its fp32 temporaries exceed 24 GB)",
        extra={"target": "liger"}))
    return out


def _lm_head_cases(quick: bool, device: str) -> List[Case]:
    """fused_linear_kd_loss fwd+bwd against the unfused path (F.linear, then kd_loss). The first call, before the
    timing, also records the device memory the step needs beyond its inputs and the two gradients (extra["memory"],
    filled in place: the runner copies `extra` before it runs the case)."""
    from fastdistill.fused_linear import fused_linear_kd_loss
    from fastdistill.loss import kd_loss

    on_gpu = device.startswith("cuda")
    rows, hidden, vocab = LM_HEAD_SHAPE if on_gpu else TOY["lm_head"]
    memory: Dict[str, float] = {}

    def fused(v):
        return fused_linear_kd_loss(v.h, v.w, v.th, v.tw, temperature=2.0)

    def make():
        bf = dict(device=device, dtype=torch.bfloat16)
        v = SimpleNamespace(h=torch.randn(rows, hidden, **bf).requires_grad_(),
                            w=(torch.randn(vocab, hidden, **bf) / hidden ** 0.5).requires_grad_(),
                            th=torch.randn(rows, hidden, **bf), tw=torch.randn(vocab, hidden, **bf) / hidden ** 0.5)
        if on_gpu:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fused(v).backward()
            torch.cuda.synchronize()
            grads = (v.h.numel() + v.w.numel()) * 2
            memory["extra_bytes"] = float(torch.cuda.max_memory_allocated() - base - grads)
        return v

    x = _CaseTensors(make)

    def step(loss_fn):
        def run():
            v = x()
            v.h.grad = v.w.grad = None
            loss_fn(v).backward()
        return run

    unfused = step(lambda v: kd_loss(F.linear(v.h, v.w), F.linear(v.th, v.tw), temperature=2.0))
    return [Case(family="fused_linear", op=f"fused_linear_kd_loss fwd+bwd [target {TARGETS['lm_head'].goal}]",
                 shape=f"{rows}x{hidden}->{vocab}", dtype="bf16", run=step(fused),
                 baselines={"unfused (F.linear + kd_loss)": unfused}, flops=4 * 2.0 * rows * hidden * vocab,
                 note="forward KL, T=2, batchmean, teacher as hidden states + head; flops: the four GEMMs",
                 extra={"target": "lm_head", "memory": memory})]


def _int8_cases(quick: bool, device: str) -> List[Case]:
    ops = torch.ops.fastdistill
    on_gpu = device.startswith("cuda")
    shapes = (QUICK_GEMV_SHAPES if quick else GEMV_SHAPES) if on_gpu else TOY["gemv"]
    out = []
    for k, n in shapes:
        for m in ([1, 128] if quick else [1, 4, 16, 128]):
            def make(k=k, n=n, m=m):
                w = torch.randn(n, k, device=device) / math.sqrt(k)
                q, s = ops.quantize_per_channel(w)
                cold = _cold_bytes(device) if m <= 16 else 0
                return SimpleNamespace(
                    ours=Rotating(lambda: (ops.int8_pack_weight(q), s.clone()), min_bytes=cold),
                    bf16=Rotating(lambda: (w.bfloat16(),), min_bytes=cold),
                    # torch._int_mm's fast layout: the [N, K] weight transposed as a view, a column-major
                    # right-hand matrix (a row-major one is reported ~2x slower, pytorch/pytorch#187094)
                    int8=Rotating(lambda: (q.clone(),), min_bytes=cold),
                    x=torch.randn(m, k, device=device, dtype=torch.bfloat16),
                    xq=torch.randint(-127, 128, (m, k), device=device, dtype=torch.int8))
            case = _CaseTensors(make)
            base: Dict[str, Callable[[], object]] = {
                "cuBLAS bf16": lambda c=case: F.linear(c().x, *c().bf16.next()),
                "weight-only (ours)": lambda c=case: ops.int8_weight_only_linear(c().x, *c().ours.next(), None),
            }
            if m > 16:
                base["torch._int_mm"] = lambda c=case: torch._int_mm(c().xq, c().int8.next()[0].t())
            out.append(Case(
                family="int8", op="int8_linear" + (f" [target {TARGETS['int8'].goal}]" if m == 1 else ""),
                shape=f"M={m} K={k} N={n}", dtype="bf16 x / int8 w",
                run=lambda c=case: ops.int8_linear(c().x, *c().ours.next(), None), baselines=base,
                bytes=n * k + 4 * n + 2 * m * (k + n), flops=2 * m * n * k, cold=m <= 16, peak_kind="int8",
                note="torch._int_mm is given int8 x, ours quantizes x itself" if m > 16 else "",
                extra={"target": "int8"} if m == 1 else {}))
    return out


def _sparse_cases(quick: bool, device: str) -> List[Case]:
    from fastdistill.sparse import SparseLinear

    ops = torch.ops.fastdistill
    on_gpu = device.startswith("cuda")
    shapes = (QUICK_GEMV_SHAPES if quick else GEMV_SHAPES) if on_gpu else TOY["gemv"]
    out = []
    for k, n in shapes:
        for m in ([1, 128] if quick else [1, 4, 16, 128]):
            def make(k=k, n=n, m=m):
                from torch.sparse import to_sparse_semi_structured

                dense_layer = torch.nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
                layer = SparseLinear.from_dense(dense_layer)  # magnitude 2:4 pruning
                dense = layer.to_dense()
                cold = _cold_bytes(device) if m <= 16 else 0
                try:  # torch's own path; needs CUDA and torch's CUTLASS / cuSPARSELt kernels
                    semi = Rotating(lambda: (to_sparse_semi_structured(dense.clone()),), min_bytes=cold)
                    semi_error = ""
                except Exception as exc:
                    semi, semi_error = None, f"{type(exc).__name__}: {exc}"[:120]
                return SimpleNamespace(
                    layer=layer, ours=Rotating(lambda: ops.sparse24_pack(layer.values, layer.meta), min_bytes=cold),
                    dense=Rotating(lambda: (dense.clone(),), min_bytes=cold), semi=semi, semi_error=semi_error,
                    x=torch.randn(m, k, device=device, dtype=torch.bfloat16))
            case = _CaseTensors(make)

            def semi_structured(c=case):
                if c().semi is None:
                    raise RuntimeError(f"to_sparse_semi_structured unavailable here: {c().semi_error}")
                return F.linear(c().x, *c().semi.next())

            base = {"cuBLAS dense bf16": lambda c=case: F.linear(c().x, *c().dense.next()),
                    "to_sparse_semi_structured": semi_structured}
            if m <= 16:
                op = "sparse24_linear" + (f" [target {TARGETS['sparse'].goal}]" if m == 1 else "")
                run = lambda c=case: ops.sparse24_linear(c().x, *c().ours.next(), None)  # noqa: E731
            else:  # what SparseLinear runs above 16 rows: torch's semi-structured GEMM fed our layout
                op = "SparseLinear (semi-structured GEMM)"
                run = lambda c=case: c().layer(c().x)  # noqa: E731
            out.append(Case(
                family="sparse", op=op, shape=f"M={m} K={k} N={n}", dtype="bf16", run=run, baselines=base,
                bytes=n * k + n * k // 8 + 2 * m * (k + n), flops=2 * m * n * k, cold=m <= 16,
                extra={"target": "sparse"} if m == 1 else {}))
    return out


def cases(quick: bool, device: str = "cuda") -> List[Case]:
    """Every GPU case (quick=True: the target shapes and one M > 16 row per GEMV family). No tensor is made
    until a case runs. device "cpu": the same cases at toy sizes on CPU tensors (a smoke run)."""
    device = str(device)
    return _kd_cases(quick, device) + _lm_head_cases(quick, device) + _int8_cases(quick, device) + _sparse_cases(quick, device)


# ------------------------------------------------------------------------------------ target report
def _median(entry) -> Optional[float]:
    return entry.get("median") if isinstance(entry, dict) else None


def evaluate_targets(doc: dict) -> List[Dict[str, str]]:
    """Each GPU target and reference point against a bench JSON (`fastdistill bench --device cuda --json`):
    rows of what, goal, measured, status ("met", "NOT met", "not measured", "reference")."""
    limits = doc.get("machine", {}).get("limits", {})
    rows: List[Dict[str, str]] = []
    by_target: Dict[str, list] = {}
    for r in doc.get("results", []):
        if r.get("extra", {}).get("target"):
            by_target.setdefault(r["extra"]["target"], []).append(r)

    def add(what, goal, measured, status):
        rows.append({"what": what, "goal": goal, "measured": measured, "status": status})

    t = TARGETS["kd"]
    for r in by_target.get("kd", []) or [None]:
        if r is None:
            add(t.what, t.goal, "no result", "not measured")
            continue
        ours = r["fastdistill"]["median"]
        floor = r["bytes"] / (limits["mem_gbps"] * 1e9)
        frac = floor / ours
        add(f"{t.what} (run: {r['shape']})", t.goal,
            f"{100 * frac:.0f}% of floor: {ours * 1e3:.2f} ms, floor {floor * 1e3:.2f} ms at "
            f"{limits['mem_gbps']:.0f} GB/s (measured now)", "met" if frac >= t.threshold else "NOT met")
    for key, baseline in (("sparse", "cuBLAS dense bf16"), ("int8", "cuBLAS bf16")):
        t = TARGETS[key]
        for r in by_target.get(key, []) or [None]:
            base = _median(r["baselines"].get(baseline)) if r else None
            if base is None:
                add(t.what, t.goal, "no result" if r is None else f"{baseline} failed", "not measured")
                continue
            ours = r["fastdistill"]["median"]
            add(f"{t.what} ({r['shape']})", t.goal,
                f"{base / ours:.2f}x: {ours * 1e6:.1f} us vs {baseline} {base * 1e6:.1f} us",
                "met" if base / ours >= t.threshold else "NOT met")
    t = TARGETS["lm_head"]
    for r in by_target.get("lm_head", []) or [None]:
        if r is None:
            add(t.what, t.goal, "no result", "not measured")
            continue
        ours, extra = r["fastdistill"]["median"], r["extra"].get("memory", {}).get("extra_bytes")
        unfused = _median(r["baselines"].get("unfused (F.linear + kd_loss)"))
        measured = (f"{ours * 1e3:.1f} ms ({r['flops'] / ours / 1e12:.0f} TFLOP/s on the four GEMMs), "
                    + (f"{extra / 1e9:.2f} GB extra" if extra is not None else "memory not measured")
                    + (f"; unfused {unfused * 1e3:.1f} ms" if unfused else "") + f"; {LIGER_LM_HEAD}")
        met = ours <= t.threshold and extra is not None and extra <= LM_HEAD_EXTRA_BYTES
        add(f"{t.what} (run: {r['shape']})", t.goal, measured, "met" if met else "NOT met")

    for r in by_target.get("liger", []):
        ours = r["fastdistill"]["median"]
        add(f"kd_loss forward, fp32 {r['shape']}", f"reference: Liger-Kernel kl_div {LIGER_KL_SECONDS * 1e3:.1f} ms "
            "(H100 PCIe, published)", f"{ours * 1e3:.2f} ms ({r['bytes'] / ours / 1e9:.0f} GB/s)", "reference")
    for r in by_target.get("sparse", []):
        dense, semi = _median(r["baselines"].get("cuBLAS dense bf16")), _median(r["baselines"].get("to_sparse_semi_structured"))
        measured = (f"torch semi-structured {dense / semi:.2f}x dense ({semi * 1e6:.1f} us vs {dense * 1e6:.1f} us)"
                    if dense and semi else "to_sparse_semi_structured did not run")
        add(f"torch semi-structured GEMM at M = 1 ({r['shape']})",
            f"reference: cuSPARSELt {CUSPARSELT_M1_VS_DENSE}x dense (pytorch/pytorch#111339)", measured, "reference")
    return rows


def targets_markdown(doc: dict) -> str:
    gpu = doc.get("machine", {}).get("limits", {}).get("gpu", doc.get("device", "?"))
    lines = [f"GPU targets ({gpu}, torch {doc.get('machine', {}).get('torch', '?')}"
             f"{', quick run' if doc.get('quick') else ''}):", "",
             "| target | goal | measured | status |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['what']} | {r['goal']} | {r['measured']} | {r['status']} |" for r in evaluate_targets(doc)]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- main
def run_cases(quick: bool, device: str, repeats: int) -> dict:
    """Times every case here (the runner's measurement and table), as `fastdistill bench` would."""
    from fastdistill.bench.common import machine_limits
    from fastdistill.bench.runner import format_table, measure, roofline_seconds

    limits = machine_limits(device)
    print(f"{limits.get('gpu', 'CPU tensors (a smoke run: figures mean nothing)')}: memory {limits['mem_gbps']:.0f} GB/s "
          f"({'device-to-device copy' if device == 'cuda' else 'DRAM read'}, measured now), "
          f"int8 {limits['int8_gops']:.0f} GOP/s (torch._int_mm)")
    results = []
    for case in cases(quick, device):
        r = measure(case, repeats, device)
        r["roofline_s"] = roofline_seconds(case, limits)
        results.append(r)
        print(format_table([r], limits).splitlines()[-1], flush=True)
    return {"machine": {"processor": platform.processor() or platform.machine(), "torch": torch.__version__,
                        "limits": limits}, "quick": quick, "device": device, "results": results}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", metavar="BENCH_JSON", help="print the GPU targets against this bench JSON and exit")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="write the results here (the format of `fastdistill bench --json`)")
    args = ap.parse_args(argv)
    if args.targets:
        with open(args.targets) as f:
            print(targets_markdown(json.load(f)))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fastdistill.bench.gpu: --device cuda needs a CUDA device; none is available here")
    doc = run_cases(args.quick, args.device, args.repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"wrote {args.json}")
    print("\n" + targets_markdown(doc))


if __name__ == "__main__":
    main(sys.argv[1:])
