"""A transformers Trainer that distils a causal LM with fastdistill.fused_linear_kd_loss: the student's and the
teacher's lm_heads go into the loss, so neither model's [batch, seq, V] logits are ever built.

    from fastdistill.integrations.transformers import DistillationTrainer
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=TrainingArguments(...),
                                  kd=dict(temperature=2.0, divergence="jsd", beta=0.5, hard_weight=0.5),
                                  train_dataset=...)

Importing this module imports transformers; importing fastdistill does not.
"""
from contextlib import contextmanager
from typing import Any, Dict, Optional

import torch
from torch import nn
from transformers import Trainer

from fastdistill.fused_linear import fused_linear_kd_loss

_NAME = "fastdistill.DistillationTrainer"
# The kd= keys: fused_linear_kd_loss's keywords that the trainer does not decide itself (reduction and labels are its).
KD_OPTIONS = ("temperature", "divergence", "beta", "soft_weight", "hard_weight", "scale_by_t2", "ignore_index",
              "chunk_size", "topk_tail")
# The batch columns of an offline teacher (fastdistill.TeacherTopK: its log-probs at the distillation temperature of
# k tokens per position, [batch, seq, k] each, aligned with the inputs as the teacher's logits would be).
TOPK_COLUMNS = ("teacher_topk_indices", "teacher_topk_logprobs")
# Config fields of models whose logits are not just lm_head(hidden): the fused loss would see other logits than theirs.
_LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}


class DistillationTrainer(Trainer):
    """A :class:`transformers.Trainer` whose loss is the distillation loss of `model` (the student) against
    `teacher_model`, both causal LMs with the same vocabulary (their hidden sizes may differ), or against an offline
    teacher: with ``teacher_model=None`` every batch carries the columns ``teacher_topk_indices`` and
    ``teacher_topk_logprobs`` ([batch, seq, k] each, e.g. from :class:`fastdistill.TeacherTopK`: the teacher's
    log-probs at the distillation temperature, position i's distribution over token i + 1, as its logits would give),
    and ``kd`` may set ``topk_tail``.

    ``kd`` holds :func:`fastdistill.fused_linear_kd_loss`'s keywords (``temperature``, ``divergence``, ``beta``,
    ``soft_weight``, ``hard_weight``, ``scale_by_t2``, ``ignore_index``, ``chunk_size``). Each batch needs
    ``labels`` (as for the model's own loss: the tokens, ``ignore_index`` where no target); they are shifted by one
    for next-token prediction, and positions whose shifted label is ignored count in neither the soft nor the hard
    term. When the Trainer passes ``num_items_in_batch`` (the counted positions of every accumulated batch, on every
    device under ``average_tokens_across_devices``) the loss is the sum over this batch's positions divided by it, as
    transformers normalises its own causal-LM loss; otherwise the mean over this batch's counted positions. The
    teacher runs in eval mode without gradients.
    """

    def __init__(self, model=None, teacher_model: Optional[nn.Module] = None, args=None,
                 kd: Optional[Dict[str, Any]] = None, **kwargs):
        kd = dict(kd or {})
        if "teacher_topk" in kwargs or "teacher_topk" in kd:
            raise ValueError(f"{_NAME}: an offline top-k teacher comes as the batch columns {list(TOPK_COLUMNS)} "
                             "(with teacher_model=None), not as an argument")
        unknown = sorted(set(kd) - set(KD_OPTIONS))
        if unknown:
            raise ValueError(f"{_NAME}: unknown kd option(s) {unknown}; the options are {list(KD_OPTIONS)}")
        for who, m in (("model", model), ("teacher_model", teacher_model)):
            if m is not None or who == "model":
                _check_causal_lm(m, who)
        self.kd = kd
        super().__init__(model=model, args=args, **kwargs)
        self.teacher_model = (teacher_model.to(self.args.device).eval().requires_grad_(False)
                              if teacher_model is not None else None)
        # compute_loss divides by num_items_in_batch itself: the Trainer must count the items for every model, and
        # training_step must not divide by the accumulation steps again (what it does for models without loss kwargs).
        self.model_accepts_loss_kwargs = True
        # The items are the shifted labels (what transformers counts for the causal-LM losses it recognises).
        self._loss_shifts_labels = True

    def _set_signature_columns_if_needed(self):
        # remove_unused_columns keeps the model's forward arguments only; the top-k columns are the loss's.
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(self._signature_columns) + [c for c in TOPK_COLUMNS
                                                                   if c not in self._signature_columns]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        topk = tuple(inputs.pop(c, None) for c in TOPK_COLUMNS)
        if (topk[0] is None) != (topk[1] is None):
            raise ValueError(f"{_NAME}: the batch has one of {list(TOPK_COLUMNS)} without the other")
        offline = topk[0] is not None
        if offline == (self.teacher_model is not None):
            raise ValueError(f"{_NAME}: give the teacher in one form: teacher_model, or the batch columns "
                             f"{list(TOPK_COLUMNS)} with teacher_model=None (got "
                             f"{'both' if offline else 'neither'})")
        labels = inputs.pop("labels", None)
        if labels is None:
            raise ValueError(f"{_NAME}: the batch has no 'labels' (the target tokens, ignore_index where none; a "
                             "causal-LM collator such as DataCollatorForLanguageModeling(mlm=False) adds them)")
        student = self.accelerator.unwrap_model(model)
        hidden, outputs = _run_without_logits(model, student, inputs)
        ignore_index = self.kd.get("ignore_index", -100)
        # Position i predicts token i + 1; the last position has no target.
        shifted = torch.cat([labels[..., 1:], labels.new_full(labels[..., :1].shape, ignore_index)], dim=-1)
        head = student.get_output_embeddings()
        kw = dict(self.kd, labels=shifted.to(hidden.device), student_bias=head.bias,
                  reduction="batchmean" if num_items_in_batch is None else "sum")
        if offline:
            loss = fused_linear_kd_loss(hidden, head.weight, teacher_topk=tuple(x.to(hidden.device) for x in topk), **kw)
        else:
            with torch.no_grad():
                teacher_hidden, _ = _run_without_logits(self.teacher_model, self.teacher_model, inputs)
            teacher_head = self.teacher_model.get_output_embeddings()
            loss = fused_linear_kd_loss(hidden, head.weight, teacher_hidden, teacher_head.weight,
                                        teacher_bias=teacher_head.bias, **kw)
        if num_items_in_batch is not None:
            loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device)
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                # num_items_in_batch counts every device's items, and DDP/FSDP average the devices' gradients.
                loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss


def _check_causal_lm(model, who):
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_output_embeddings"):
        raise TypeError(f"{_NAME}: {who} must be a transformers causal LM (a PreTrainedModel with an lm_head)")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{_NAME}: {who} is an encoder-decoder model; only causal LMs are supported")
    head = model.get_output_embeddings()
    if not isinstance(getattr(head, "weight", None), torch.Tensor) or head.weight.dim() != 2:
        raise ValueError(f"{_NAME}: {who}'s output embedding {type(head).__name__} has no [V, H] weight")
    for field, plain in _LOGIT_TRANSFORMS.items():
        if getattr(config, field, plain) != plain:
            raise ValueError(f"{_NAME}: {who}'s config sets {field}={getattr(config, field)!r}: its logits are not "
                             "lm_head(hidden), which the fused loss computes")


def _run_without_logits(call, model, inputs):
    """Runs call(**inputs) (the model as the Trainer wraps it: DDP/FSDP see their own forward) with its lm_head fed
    zero rows. Returns the hidden states the head would have seen and the model's outputs."""
    captured = []

    def keep_hidden(module, args):
        captured.append(args[0])
        return (args[0].narrow(-2, 0, 0),) + tuple(args[1:])

    with _hook(model.get_output_embeddings(), keep_hidden):
        outputs = call(**{"use_cache": False, **inputs})
    if len(captured) != 1:
        raise RuntimeError(f"{_NAME}: expected the model's forward to call its lm_head once, it did {len(captured)}x")
    return captured[0], outputs


@contextmanager
def _hook(module, pre_hook):
    handle = module.register_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        handle.remove()
