"""Turns `fastdistill bench --json FILE` output into the README's performance table:
python -m fastdistill.bench.readme FILE"""
import json
import sys


def readme_table(data: dict) -> str:
    m = data["machine"]
    lim = m["limits"]
    head = (f"Measured by `fastdistill bench{' --quick' if data['quick'] else ''} --json` on {m['processor'] or m['machine']} "
            f"({m['threads']} threads, torch {m['torch']}); limits measured in the same run: memory "
            f"{lim['mem_gbps']:.1f} GB/s, fp32 {lim['fp32_gflops']:.0f} GFLOP/s (MKL), int8 {lim['int8_gops']:.0f} GOP/s "
            "(torch._int_mm). Times are medians; (cold) = weights streamed from DRAM.\n")
    lines = [head, "| op | shape | dtype | fastdistill | baseline | speedup | achieved | % roofline |",
             "| --- | --- | --- | ---: | --- | ---: | ---: | ---: |"]
    for r in data["results"]:
        t = r["fastdistill"]["median"]
        shape = r["shape"] + (" (cold)" if r["cold"] else "")
        if r["flops"]:
            achieved = f"{r['flops'] / t / 1e9:.0f} G{'OP' if 'int8' in r['dtype'] else 'FLOP'}/s"
        else:
            achieved = f"{r['bytes'] / t / 1e9:.1f} GB/s"
        roof = f"{100 * r['roofline_s'] / t:.0f}%" if r.get("roofline_s") else "-"
        first = True
        for name, b in r["baselines"].items():
            if "median" not in b:
                continue
            lines.append(f"| {r['op'] if first else ''} | {shape if first else ''} | {r['dtype'] if first else ''} | "
                         f"{t * 1e3:.2f} ms | {name} {b['median'] * 1e3:.2f} ms | {b['median'] / t:.2f}x | "
                         f"{achieved if first else ''} | {roof if first else ''} |")
            first = False
    if data.get("memory"):
        lines += ["", "Extra peak memory of one forward+backward step beyond the inputs and the gradient "
                  "(in logits-sized tensors, fp32):", "",
                  "| shape | fastdistill | eager | torch.compile |", "| --- | ---: | ---: | ---: |"]
        for m in data["memory"]:
            lines.append(f"| {m['shape']} | {m['fastdistill']:.3f} | {m['eager']:.2f} | {m['torch.compile']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(readme_table(json.load(f)))
