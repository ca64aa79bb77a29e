"""Turns `fastdistill bench --json FILE` output into benchmarks/RESULTS.md (every case) and the README's
performance summary (the rows of SUMMARY, each against its fastest baseline):
python -m fastdistill.bench.readme FILE [--results benchmarks/RESULTS.md] [--readme README.md]"""
import argparse
import json
import re

# (op, shape, dtype) of the README's summary rows.
SUMMARY = [
    ("kd_loss fwd+bwd", "4096x32000", "fp32"),
    ("kd_loss fwd+bwd", "4096x32000", "bf16"),
    ("kd_loss jsd fwd+bwd", "4096x32000", "bf16"),
    ("kd_loss fwd+bwd", "1024x128256", "bf16"),
    ("int8_linear (W8A8 dynamic)", "M=1 K=4096 N=4096", "float32"),
    ("int8_weight_only_linear", "M=1 K=4096 N=11008", "float32"),
    ("int8_linear (W8A8 dynamic)", "M=128 K=4096 N=11008", "float32"),
    ("sparse24_linear bf16", "M=1 K=4096 N=11008", "bf16"),
    ("sparse24_linear int8", "M=1 K=4096 N=11008", "int8"),
    ("sparse24_linear fp32", "M=128 K=4096 N=4096", "fp32"),
]
SUMMARY_START, SUMMARY_END = "<!-- perf-summary:start -->", "<!-- perf-summary:end -->"


def machine_line(data: dict) -> str:
    m, lim = data["machine"], data["machine"]["limits"]
    return (f"Measured by `fastdistill bench{' --quick' if data['quick'] else ''} --json` on "
            f"{m['processor'] or m['machine']} ({m['threads']} threads, torch {m['torch']}); limits measured in the "
            f"same run: memory {lim['mem_gbps']:.1f} GB/s, fp32 {lim['fp32_gflops']:.0f} GFLOP/s (MKL), int8 "
            f"{lim['int8_gops']:.0f} GOP/s (torch._int_mm). Times are medians; (cold) = weights streamed from DRAM.")


def _achieved(r: dict) -> str:
    t = r["fastdistill"]["median"]
    if r["flops"]:
        return f"{r['flops'] / t / 1e9:.0f} G{'OP' if 'int8' in r['dtype'] else 'FLOP'}/s"
    return f"{r['bytes'] / t / 1e9:.1f} GB/s"


def _roofline(r: dict) -> str:
    return f"{100 * r['roofline_s'] / r['fastdistill']['median']:.0f}%" if r.get("roofline_s") else "-"


def _shape(r: dict) -> str:
    return r["shape"] + (" (cold)" if r["cold"] else "")


def _timed(r: dict) -> dict:
    return {name: b["median"] for name, b in r["baselines"].items() if "median" in b}


def results_markdown(data: dict) -> str:
    """Every case, one line per baseline."""
    lines = [machine_line(data), "", "| op | shape | dtype | fastdistill | baseline | speedup | achieved | % roofline |",
             "| --- | --- | --- | ---: | --- | ---: | ---: | ---: |"]
    for r in data["results"]:
        t = r["fastdistill"]["median"]
        for i, (name, b) in enumerate(_timed(r).items()):
            first = i == 0
            lines.append(f"| {r['op'] if first else ''} | {_shape(r) if first else ''} | {r['dtype'] if first else ''} | "
                         f"{t * 1e3:.2f} ms | {name} {b * 1e3:.2f} ms | {b / t:.2f}x | "
                         f"{_achieved(r) if first else ''} | {_roofline(r) if first else ''} |")
    if data.get("memory"):
        lines += ["", "Extra peak memory of one forward+backward step beyond the inputs and the gradient "
                  "(in logits-sized tensors, fp32):", "",
                  "| shape | fastdistill | eager | torch.compile |", "| --- | ---: | ---: | ---: |"]
        for m in data["memory"]:
            lines.append(f"| {m['shape']} | {m['fastdistill']:.3f} | {m['eager']:.2f} | {m['torch.compile']:.2f} |")
    return "\n".join(lines) + "\n"


def summary_markdown(data: dict) -> str:
    """The SUMMARY rows present in `data`, each against the fastest of its baselines."""
    by_key = {(r["op"], r["shape"], r["dtype"]): r for r in data["results"]}
    lines = [machine_line(data), "", "| op | shape | dtype | fastdistill | fastest baseline | speedup | achieved | % roofline |",
             "| --- | --- | --- | ---: | --- | ---: | ---: | ---: |"]
    for key in SUMMARY:
        r = by_key.get(key)
        if r is None or not _timed(r):
            continue
        t = r["fastdistill"]["median"]
        name, b = min(_timed(r).items(), key=lambda kv: kv[1])
        lines.append(f"| {r['op']} | {_shape(r)} | {r['dtype']} | {t * 1e3:.2f} ms | {name} {b * 1e3:.2f} ms | "
                     f"{b / t:.2f}x | {_achieved(r)} | {_roofline(r)} |")
    return "\n".join(lines) + "\n"


def replace_summary(readme: str, summary: str) -> str:
    pattern = re.compile(re.escape(SUMMARY_START) + ".*?" + re.escape(SUMMARY_END), re.S)
    if not pattern.search(readme):
        raise ValueError(f"fastdistill.bench.readme: the README has no {SUMMARY_START} ... {SUMMARY_END} section")
    return pattern.sub(lambda _: f"{SUMMARY_START}\n{summary}{SUMMARY_END}", readme)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json_file")
    parser.add_argument("--results", default="benchmarks/RESULTS.md")
    parser.add_argument("--readme", default="README.md")
    args = parser.parse_args(argv)
    with open(args.json_file) as f:
        data = json.load(f)
    with open(args.results, "w") as f:
        f.write("# Benchmark results\n\nGenerated by `python -m fastdistill.bench.readme` from `fastdistill bench "
                "--json`; the README shows a summary of these rows.\n\n" + results_markdown(data))
    with open(args.readme) as f:
        readme = f.read()
    with open(args.readme, "w") as f:
        f.write(replace_summary(readme, summary_markdown(data)))


if __name__ == "__main__":
    main()
