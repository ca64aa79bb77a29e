"""Recovery after pruning: distil the pruned model from its dense original, with the 2:4 masks kept.

`recover(student, teacher, batches, masks=..., steps=N, objective=...)` runs N AdamW steps on the student (the
pruned copy) against the dense teacher's outputs on the same batches, with apply_2_4_masks holding the masks that
prune_2_4_ returned, so the student is exactly as sparse afterwards as before. Objectives:

  "embedding": forward(model, batch) gives sentence embeddings [B, D]. The loss is mean(1 - cos(student_i,
               teacher_i)), which pins each embedding, plus similarity_weight times the KL divergence (kd_loss,
               forward KL) between the in-batch similarity distributions of student and teacher (each row: the
               softmax of one embedding's cosine similarities to the other B - 1, over `temperature`), which
               keeps the neighbourhoods. On all-MiniLM-L6-v2 after SparseGPT 2:4, 60 steps at lr 1e-4 (loaded
               2-core Zen 4): held-out mean cosine 0.878 -> 0.913 with similarity_weight 0.01, 0.900 with 0.1; the
               nearest-neighbour agreement was also best at 0.01 (0.715 against 0.688); at lr 2e-4 with the KL
               weighted 1, the cosine fell to 0.838.
  "logits":    forward gives logits [..., V]; the loss is kd_loss at `temperature` (classifiers).
  "causal_lm": forward gives the last hidden states [..., H] and each model's get_output_embeddings() is its
               lm_head; the loss is fused_linear_kd_loss at `temperature` over the rows (positions whose
               attention_mask is 0 are left out when the batch is a dict with one), so the [rows, V] logits
               never exist.
"""
import itertools
import math
import os
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdistill.fused_linear import fused_linear_kd_loss
from fastdistill.loss import kd_loss
from fastdistill.sparse.finetune import apply_2_4_masks

OBJECTIVES = ("embedding", "logits", "causal_lm")
SCHEDULES = ("constant", "cosine")
# In-batch similarity rows are cosines in [-1, 1]: at T = 0.05 their softmax is as peaked as a contrastive loss's.
DEFAULT_TEMPERATURE = {"embedding": 0.05, "logits": 2.0, "causal_lm": 1.0}
DEFAULT_SIMILARITY_WEIGHT = 0.01
# AdamW on every parameter: 1e-4 and 2e-4 gave the same MiniLM recovery over 60 steps (0.913, 0.912)
DEFAULT_LR = 1e-4


DEFAULT_HIDDEN_WEIGHT = 1.0
DEFAULT_SCHEDULE = "constant"
# Linear warm-up over this share of the steps when schedule is "cosine".
WARMUP_SHARE = 0.05


def _default_forward(model: nn.Module, batch: Any) -> Any:
    return model(batch)


def similarity_logits(embeddings: torch.Tensor) -> torch.Tensor:
    """[B, D] -> [B, B] cosine similarities with -inf on the diagonal (an embedding's similarity to itself is 1 for
    every model and would take most of each row's probability)."""
    e = F.normalize(embeddings.float(), dim=-1)
    sim = e @ e.T
    return sim.masked_fill(torch.eye(len(e), dtype=torch.bool, device=e.device), float("-inf"))


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 0.05,
                   similarity_weight: float = DEFAULT_SIMILARITY_WEIGHT) -> torch.Tensor:
    """The "embedding" objective for one batch of embeddings [B, D] (see the module docstring)."""
    cosine = (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()
    if len(student) < 3 or similarity_weight == 0:   # under 3 rows a similarity row holds one value or none
        return cosine
    # scale_by_t2=False: the gradient on a cosine is (q - p) / T, the scale of a contrastive loss's.
    kl = kd_loss(similarity_logits(student), similarity_logits(teacher), temperature=temperature, scale_by_t2=False)
    return cosine + similarity_weight * kl


def _rows(hidden: torch.Tensor, batch: Any) -> torch.Tensor:
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if mask is not None and mask.shape == hidden.shape[:-1]:
        return hidden[mask.bool()]
    return hidden.reshape(-1, hidden.shape[-1])


def hidden_state_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Relative squared error sum((s - t)^2) / sum(t^2) over rows [R, H] (scale-free, so layers of different
    magnitude weigh alike)."""
    s, t = student.float(), teacher.float()
    return (s - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12)


def _first_tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _modules(model: nn.Module, fqns, owner: str) -> Dict[str, nn.Module]:
    try:
        return {fqn: model.get_submodule(fqn) for fqn in fqns}
    except AttributeError as exc:
        raise ValueError(f"fastdistill.recover: hidden_states names a module the {owner} does not have ({exc})") from None


def _capture(modules: Dict[str, nn.Module], store: dict) -> list:
    return [mod.register_forward_hook(lambda m, a, out, fqn=fqn: store.__setitem__(fqn, _first_tensor(out)))
            for fqn, mod in modules.items()]


def _lr_factor(step: int, steps: int, schedule: str) -> float:
    if schedule == "constant":
        return 1.0
    warm = max(1, round(WARMUP_SHARE * steps))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def _head(model: nn.Module):
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    if not isinstance(head, nn.Linear):
        raise ValueError(f"fastdistill.recover: objective 'causal_lm' needs model.get_output_embeddings() to return "
                         f"the nn.Linear lm_head, got {type(head).__name__} from {type(model).__name__}")
    return head


def recover(student: nn.Module, teacher: nn.Module, batches: Iterable[Any], masks: Dict[str, torch.Tensor], *,
            steps: int, objective: str = "embedding", forward: Optional[Callable[[nn.Module, Any], Any]] = None,
            lr: float = DEFAULT_LR, temperature: Optional[float] = None,
            similarity_weight: float = DEFAULT_SIMILARITY_WEIGHT,
            hidden_states: Optional[Dict[str, str]] = None, hidden_weight: float = DEFAULT_HIDDEN_WEIGHT,
            schedule: str = DEFAULT_SCHEDULE, progress: bool = True) -> List[float]:
    """Fine-tune `student` (pruned by prune_2_4_, which returned `masks`) for `steps` AdamW steps (lr, no weight
    decay) on `batches` (cycled), distilling from `teacher` (its dense original, run in eval mode under no_grad).
    Returns the loss of every step. The student runs in eval mode too (dropout off: its targets are the teacher's
    deterministic outputs) and is left in eval mode; `masks` are kept exactly (apply_2_4_masks(masks=...)), and
    the weights they prune are 0 afterwards. objective, forward and temperature (default per objective:
    DEFAULT_TEMPERATURE) as in the module docstring. hidden_states: {student module fqn: teacher module fqn}
    whose outputs (the first tensor of a tuple) are matched too, hidden_weight times the mean over the pairs of
    hidden_state_loss (rows at attention_mask 0 left out when the batch is a dict with one), e.g. every
    transformer layer. schedule: "constant" lr, or "cosine" (linear warm-up over WARMUP_SHARE of the steps, then
    cosine decay to 0). progress: a tqdm bar (FASTDISTILL_NO_PROGRESS=1 hides it)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"fastdistill.recover: objective must be one of {', '.join(map(repr, OBJECTIVES))}, "
                         f"got {objective!r}")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"fastdistill.recover: steps must be an int >= 0, got {steps!r}")
    if student is teacher:
        raise ValueError("fastdistill.recover: the student must be a copy, not the teacher itself")
    if lr <= 0:
        raise ValueError(f"fastdistill.recover: lr must be > 0, got {lr}")
    if similarity_weight < 0:
        raise ValueError(f"fastdistill.recover: similarity_weight must be >= 0, got {similarity_weight}")
    if hidden_weight < 0:
        raise ValueError(f"fastdistill.recover: hidden_weight must be >= 0, got {hidden_weight}")
    if schedule not in SCHEDULES:
        raise ValueError(f"fastdistill.recover: schedule must be one of {', '.join(map(repr, SCHEDULES))}, "
                         f"got {schedule!r}")
    pairs = dict(hidden_states or {}) if hidden_weight > 0 else {}
    s_mods, t_mods = _modules(student, pairs, "student"), _modules(teacher, pairs.values(), "teacher")
    batches = list(batches)
    if steps and not batches:
        raise ValueError("fastdistill.recover: no batches")
    forward = forward or _default_forward
    t = DEFAULT_TEMPERATURE[objective] if temperature is None else float(temperature)
    if t <= 0:
        raise ValueError(f"fastdistill.recover: temperature must be > 0, got {t}")
    if objective == "causal_lm":
        heads = (_head(student), _head(teacher))

    def step_loss(batch):
        with torch.no_grad():
            target = forward(teacher, batch)
        out = forward(student, batch)
        if objective == "embedding":
            loss = embedding_loss(out, target, t, similarity_weight)
        elif objective == "logits":
            loss = kd_loss(out, target, temperature=t)
        else:
            (s_head, t_head) = heads
            loss = fused_linear_kd_loss(_rows(out, batch), s_head.weight, _rows(target, batch), t_head.weight,
                                        student_bias=s_head.bias, teacher_bias=t_head.bias, temperature=t)
        if pairs:
            hidden = sum(hidden_state_loss(_rows(s_out[s], batch), _rows(t_out[t_], batch))
                         for s, t_ in pairs.items())
            loss = loss + hidden_weight * hidden / len(pairs)
        return loss

    teacher_mode = teacher.training
    teacher.eval()
    student.eval()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    bar = range(steps)
    if progress and os.environ.get("FASTDISTILL_NO_PROGRESS") != "1":
        try:
            from tqdm.auto import tqdm
            bar = tqdm(bar, desc="recovery", leave=False)
        except ImportError:   # the bar is optional
            pass
    s_out, t_out = {}, {}
    hooks = _capture(s_mods, s_out) + _capture(t_mods, t_out)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: _lr_factor(i, steps, schedule))
    handle = apply_2_4_masks(student, masks=masks)
    try:
        for _, batch in zip(bar, itertools.cycle(batches)):
            loss = step_loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        for h in hooks:
            h.remove()
        handle.remove()
        teacher.train(teacher_mode)
    return losses
