"""What the per-family drivers share: pick the device, run the family's small cases, compare each result
with the CPU op, and (--list-kernels) record under torch's profiler which CUDA kernels ran.

    python benchmarks/gpu_check/<family>.py --device cuda [--list-kernels FILE.json]   # the real kernels
    python benchmarks/gpu_check/<family>.py --device simt   # the same kernels on the CPU SIMT emulator

The drivers are what compute-sanitizer runs (benchmarks/gpu_check.sh): small cases, one process per family."""
import argparse
import json
import re
import sys
import time

import torch

from kernels import KERNEL_FILTER, KERNELS


def close(got, want, rtol, atol, what):
    """got (any device) against the CPU op's result."""
    try:
        torch.testing.assert_close(got.cpu().double(), want.cpu().double(), rtol=rtol, atol=atol, equal_nan=True)
    except AssertionError as exc:
        raise AssertionError(f"{what}: {exc}") from None


def equal(got, want, what):
    if not torch.equal(got.cpu(), want.cpu()):
        raise AssertionError(f"{what}: differs from the CPU op")


def _kernel_names(prof):
    from torch.autograd import DeviceType

    return sorted({e.name for e in prof.events() if e.device_type == DeviceType.CUDA})


def main(family, exercise):
    ap = argparse.ArgumentParser(description=f"the {family} CUDA kernels, small cases, checked against the CPU ops")
    ap.add_argument("--device", choices=["cuda", "simt"], required=True)
    ap.add_argument("--list-kernels", metavar="JSON", help="(cuda) record the kernels that ran, under the profiler")
    args = ap.parse_args()
    import fastdistill  # noqa: F401  (loads fastdistill._C)

    if args.device == "simt":
        import fastdistill._simt  # noqa: F401

        ops, device = torch.ops.fastdistill_simt, "cpu"
    else:
        if not torch.cuda.is_available():
            sys.exit(f"{family}: --device cuda needs a CUDA device")
        ops, device = torch.ops.fastdistill, "cuda"
    t0 = time.perf_counter()
    if not args.list_kernels:
        exercise(ops, device)
        if device == "cuda":
            torch.cuda.synchronize()
        print(f"{family} on {args.device}: every case matches the CPU op ({time.perf_counter() - t0:.1f} s)")
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        exercise(ops, device)
        torch.cuda.synchronize()
    every = [k for ks in KERNELS.values() for k in ks]
    known = lambda name: any(re.search(rf"\b{k}\b", name) for k in every)  # noqa: E731
    names = [n for n in _kernel_names(prof) if known(n) or KERNEL_FILTER in n]
    ran = {k: [n for n in names if re.search(rf"\b{k}\b", n)] for k in KERNELS[family]}
    unlisted = [n for n in names if not known(n)]            # ours, but missing from kernels.py
    unfiltered = [n for n in names if KERNEL_FILTER not in n]  # the sanitizer's kernel filter would skip these
    with open(args.list_kernels, "w") as f:
        json.dump({"family": family, "ran": {k: bool(v) for k, v in ran.items()}, "launched": names,
                   "unlisted": unlisted, "unfiltered": unfiltered}, f, indent=2)
    missing = [k for k, v in ran.items() if not v]
    print(f"{family}: {len(names)} kernel instantiations launched; not launched: {missing or 'none'}; "
          f"not in kernels.py: {unlisted or 'none'}; missed by the filter kns={KERNEL_FILTER}: {unfiltered or 'none'}")
    if missing or unlisted or unfiltered:
        sys.exit(1)
