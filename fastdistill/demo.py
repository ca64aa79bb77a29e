"""`fastdistill demo`: distill, prune and quantize an MLP on scikit-learn's digits, end to end.

Stages: a teacher (trained with dropout); a small student trained on hard labels vs the same student
distilled from the teacher with KDLoss (same init, batches, epochs, optimizer and learning rate); the
teacher pruned 2:4 (accuracy drops) and recovered by distillation with the mask kept; int8; 2:4 +
int8. Every stage is saved as a state_dict, reloaded into a freshly built model and evaluated from
the reloaded copy, so the table describes the real artefacts.
"""
import copy
import json
import os
import statistics
import time

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
        _plot(rows, os.path.join(out_dir, "demo.png"))
    log(f"  wrote {out_dir}/results.json" + (f" and {out_dir}/demo.png" if plot else ""))
    return result


def _is_2_4(model) -> bool:
    import fastdistill

    for m in model.modules():
        if isinstance(m, fastdistill.SparseLinear):
            w = m.to_dense()
            if not bool(((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()):
                return False
    return True


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        a.scatter(r["bytes"] / 1024, r["accuracy"])
        a.annotate(r["stage"], (r["bytes"] / 1024, r["accuracy"]), fontsize=8)
    a.set_xscale("log")
    a.set_xlabel("state_dict size (KiB)")
    a.set_ylabel("test accuracy")
    a.set_title("accuracy vs size")
    names = [r["stage"] for r in rows]
    pos = range(len(rows))
    b.barh([p - 0.2 for p in pos], [r["latency_b1_ms"] for r in rows], height=0.4, label="batch 1")
    b.barh([p + 0.2 for p in pos], [r["latency_b256_ms"] for r in rows], height=0.4, label="batch 256")
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
