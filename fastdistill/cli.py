"""Command line: `fastdistill info | demo | bench`."""
import argparse
import platform
import sys

import torch


def _registered_ops():
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastdistill::"))
    return [n.split("::", 1)[1] for n in names]


def info(_args=None) -> None:
    from fastdistill import _ext

    print(f"fastdistill {__import__('fastdistill').__version__}  torch {torch.__version__}  "
          f"python {platform.python_version()}  {platform.machine()}")
    if _ext._C is None:
        print(f"compiled extension: NOT LOADED ({_ext.LOAD_ERROR})")
        return
    c = _ext._C
    feats = [k for k, v in sorted(c.cpu_features().items()) if v]
    print(f"cpu features: {' '.join(feats) or '(none detected)'}")
    print(f"cpu isa paths compiled: {', '.join(c.compiled_cpu_isas())}; best for this cpu: {c.best_cpu_isa()}; "
          f"active: {c.active_cpu_isa()} (FASTDISTILL_CPU_ISA overrides)")
    if c.built_with_cuda():
        avail = torch.cuda.is_available()
        print(f"cuda: built for {', '.join(c.cuda_archs())} with torch CUDA {torch.version.cuda}; "
              f"device available: {avail}{' (' + torch.cuda.get_device_name() + ')' if avail else ''}")
    else:
        print("cuda: not built (FASTDISTILL_CUDA=0, CPU-only torch, or nvcc not found)")
    print("registered ops:")
    for op in _registered_ops():
        devices = [d for d in ("cpu", "cuda") if _ext.has_kernel(op, d)]
        print(f"  {op:34s} {', '.join(devices) or '-'}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="fastdistill", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="what was built and what runs here")
    args = parser.parse_args(argv)
    {"info": info}[args.command](args)


if __name__ == "__main__":
    main(sys.argv[1:])
