"""`fastdistill bench`: every family's cases against their baselines, in one process, as a markdown
table (and optionally JSON and a plot). Shares the cases with the pytest-benchmark suites."""
import importlib
import json
import platform
import sys
import time

import torch

from fastdistill.bench.common import machine_limits, summarize, time_fn

FAMILIES = ("kd", "fused_linear", "int8", "sparse", "conv", "vocab_parallel")
SPREAD_WARN = 0.25  # (max - min) / median above this is flagged as noisy


def family_module(family: str, device: str):
    module = "gpu" if device == "cuda" else family
    try:
        return importlib.import_module(f"fastdistill.bench.{module}")
    except ImportError as exc:
        print(f"[bench] skipping {family}: {exc}", file=sys.stderr)
        return None


def load_cases(family: str, quick: bool, device: str):
    mod = family_module(family, device)
    if mod is None:
        return []
    if device == "cuda":
        return [c for c in mod.cases(quick=quick, device=device) if c.family == family]
    return mod.cases(quick=quick, device=device)


def roofline_seconds(case, limits) -> float:
    """The time the machine's limits allow: max(bytes / bandwidth, flops / compute peak)."""
    t_mem = case.bytes / (limits["mem_gbps"] * 1e9) if case.bytes else 0.0
    peak = limits["int8_gops"] if case.peak_kind == "int8" else limits["fp32_gflops"]
    t_compute = case.flops / (peak * 1e9) if case.flops and peak == peak else 0.0
    return max(t_mem, t_compute)


def measure(case, repeats: int, device: str):
    result = {"family": case.family, "op": case.op, "shape": case.shape, "dtype": case.dtype, "note": case.note,
              "cold": case.cold, "bytes": case.bytes, "flops": case.flops, "extra": dict(case.extra)}
    stats = summarize(time_fn(case.run, repeats=repeats, warmup=1, min_time=0.05, device=device))
    result["fastdistill"] = stats
    result["baselines"] = {}
    for name, fn in case.baselines.items():
        try:
            result["baselines"][name] = summarize(time_fn(fn, repeats=repeats, warmup=1, min_time=0.05, device=device))
        except Exception as exc:  # a baseline that cannot run this case (e.g. unsupported dtype) is reported
            result["baselines"][name] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
    return result


def format_table(results, limits) -> str:
    lines = ["| op | shape | dtype | fastdistill (ms) | baselines (ms) | speedup | achieved | % roofline |",
             "| --- | --- | --- | ---: | --- | --- | ---: | ---: |"]
    for r in results:
        t = r["fastdistill"]["median"]
        base = [f"{n} {b['median'] * 1e3:.3f}" for n, b in r["baselines"].items() if "median" in b]
        speed = [f"{b['median'] / t:.2f}x vs {n}" for n, b in r["baselines"].items() if "median" in b]
        if r["flops"]:
            achieved = f"{r['flops'] / t / 1e9:.0f} G{'OP' if 'int8' in r['dtype'] else 'FLOP'}/s"
        else:
            achieved = f"{r['bytes'] / t / 1e9:.1f} GB/s"
        if r["bytes"] and r["flops"]:
            achieved += f", {r['bytes'] / t / 1e9:.1f} GB/s"
        roof = r.get("roofline_s", 0.0)
        shape = r["shape"] + (" (cold)" if r["cold"] else "")
        noisy = " (noisy)" if r["fastdistill"]["spread"] > SPREAD_WARN else ""
        slack = r.get("extra", {}).get("bound_slack_s")
        bound = "" if slack is None else f" ({'within' if t <= 1.3 * roof + slack else 'over'} 1.3x + {slack * 1e6:.0f} us)"
        lines.append(f"| {r['op']} | {shape} | {r['dtype']} | {t * 1e3:.3f}{noisy} | {'; '.join(base)} | "
                     f"{'; '.join(speed)} | {achieved} | {100 * roof / t:.0f}%{bound} |")
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(only=FAMILIES, quick=False, device="cpu", json_path=None, plot_path=None, repeats=None) -> dict:
    repeats = repeats or (3 if quick else 5)
    start = time.perf_counter()
    limits = machine_limits(device)
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; measured now: memory {limits['mem_gbps']:.1f} GB/s, "
          f"fp32 {limits['fp32_gflops']:.0f} GFLOP/s (matmul), int8 {limits['int8_gops']:.0f} GOP/s (torch._int_mm)")
    results = []
    for family in only:
        for case in load_cases(family, quick, device):
            r = measure(case, repeats, device)
            r["roofline_s"] = roofline_seconds(case, limits)
            results.append(r)
            print(format_table([r], limits).splitlines()[-1], flush=True)
    memory = []
    for family in only:
        mod = family_module(family, device)
        if device == "cpu" and hasattr(mod, "memory_report"):
            memory += mod.memory_report(quick)
    if memory:
        print("\nextra peak memory of one fwd+bwd step beyond inputs and gradient, in logits tensors:")
        for m in memory:
            print(f"  {m['shape']} {m['dtype']}: " + ", ".join(
                f"{k} {v:.3f}" for k, v in m.items() if k not in ("shape", "dtype")))
    multiprocess = []  # families measured in processes of their own (vocab_parallel: a gloo group)
    for family in only:
        mod = family_module(family, device)
        if device == "cpu" and hasattr(mod, "process_report"):
            multiprocess.append(mod.process_report(quick))
            print(mod.format_report(multiprocess[-1]), flush=True)
    table = format_table(results, limits)
    noisy = [r for r in results if r["fastdistill"]["spread"] > SPREAD_WARN or
             any(b.get("spread", 0) > SPREAD_WARN for b in r["baselines"].values())]
    print("\n" + table)
    if noisy:
        print(f"\nwarning: {len(noisy)} case(s) varied by more than {SPREAD_WARN:.0%} between repeats "
              "(median reported); the machine is noisy, rerun on an idle machine for figures to quote.")
    out = {"machine": {"processor": cpu_name(), "machine": platform.machine(),
                       "threads": torch.get_num_threads(), "torch": torch.__version__, "limits": limits},
           "quick": quick, "device": device, "seconds": time.perf_counter() - start, "results": results,
           "memory": memory, "multiprocess": multiprocess}
    if json_path:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {json_path}")
    if plot_path:
        plot(results, plot_path)
        print(f"wrote {plot_path}")
    return out


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, speedups = [], []
    for r in results:
        for name, b in r["baselines"].items():
            if "median" in b:
                labels.append(f"{r['op']} {r['shape']} {r['dtype']} vs {name}")
                speedups.append(b["median"] / r["fastdistill"]["median"])
    fig, ax = plt.subplots(figsize=(10, max(3, 0.25 * len(labels))))
    ax.barh(range(len(labels)), speedups)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(range(len(labels)), labels, fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("speedup (baseline time / fastdistill time)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
