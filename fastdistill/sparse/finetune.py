"""Keeping a 2:4 pattern through fine-tuning: a fixed mask, or SR-STE where the mask may move."""
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
from torch.nn.utils import parametrize
from torch.optim.optimizer import register_optimizer_step_post_hook

from fastdistill.convert import named_layers
from fastdistill.sparse.format import prune_2_4


class _SRSTEFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, decay):
        mask = prune_2_4(w)
        ctx.save_for_backward(w, mask)
        ctx.decay = decay
        return torch.where(mask, w, torch.zeros_like(w))

    @staticmethod
    def backward(ctx, grad):
        w, mask = ctx.saved_tensors
        # Straight-through to every weight, plus the SR-STE decay pulling pruned weights to 0.
        return grad + ctx.decay * torch.where(mask, torch.zeros_like(w), w), None


class _SRSTE(nn.Module):
    def __init__(self, decay: float):
        super().__init__()
        self.decay = decay

    def forward(self, w):
        return _SRSTEFn.apply(w, self.decay)


class MaskHandle:
    """Returned by apply_2_4_masks. `remove()` stops mask enforcement and leaves the weights exactly 2:4."""

    def __init__(self):
        self.layers = []   # (module, mask or None)
        self._hooks = []
        self.sr_ste = False

    def masks(self):
        return {id(m): mask for m, mask in self.layers}

    def remask(self):
        with torch.no_grad():
            for mod, mask in self.layers:
                if mask is not None:
                    mod.weight.masked_fill_(~mask, 0)

    def remove(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self.sr_ste:
            for mod, _ in self.layers:
                if parametrize.is_parametrized(mod, "weight"):
                    parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
        else:
            self.remask()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def apply_2_4_masks(model: nn.Module, sr_ste_decay: float = 0.0,
                    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
                    masks: Optional[Dict[str, torch.Tensor]] = None) -> MaskHandle:
    """Prune every nn.Linear with in_features % 4 == 0 to 2:4 (by magnitude) and keep the pattern during
    fine-tuning.

    sr_ste_decay == 0: the mask is fixed; gradients of pruned weights are zeroed and the weights are
    re-masked after every optimizer step (any torch.optim optimizer), so the pattern holds exactly.
    sr_ste_decay > 0: SR-STE (Zhou et al., 2021): the forward uses the 2:4 projection of the dense
    weight (recomputed every step, so the mask may move), gradients pass straight through, and pruned
    weights get the extra decay sr_ste_decay * w. The weight seen by the forward is always exactly 2:4;
    `remove()` bakes the last 2:4 projection into the weight.

    masks: {fqn: bool mask of the kept weights}, as prune_2_4_ returns: exactly those layers keep exactly those
    masks (fixed-mask mode only; filter_fn does not apply). Without it the masks are chosen by magnitude.
    """
    if sr_ste_decay < 0:
        raise ValueError(f"fastdistill.apply_2_4_masks: sr_ste_decay must be >= 0, got {sr_ste_decay}")
    handle = MaskHandle()
    handle.sr_ste = sr_ste_decay > 0
    if masks is not None:
        if handle.sr_ste:
            raise ValueError("fastdistill.apply_2_4_masks: masks= keeps fixed masks; SR-STE (sr_ste_decay > 0) "
                             "chooses its own every step")
        layers = []
        for fqn, mask in masks.items():
            try:
                mod = model.get_submodule(fqn)
            except AttributeError:
                raise ValueError(f"fastdistill.apply_2_4_masks: masks names {fqn!r}, which is not a module of the "
                                 f"model") from None
            if type(mod) is not nn.Linear or mask.shape != mod.weight.shape or mask.dtype != torch.bool:
                raise ValueError(f"fastdistill.apply_2_4_masks: masks[{fqn!r}] must be a bool mask of an nn.Linear's "
                                 f"weight shape, got {mask.dtype} {list(mask.shape)} for {type(mod).__name__}")
            if parametrize.is_parametrized(mod):
                raise ValueError(f"fastdistill.apply_2_4_masks: layer {fqn!r} is parametrized")
            layers.append((mod, mask.to(mod.weight.device)))
    else:
        layers = [(mod, None) for _, mod in named_layers(model, (nn.Linear,), filter_fn)
                  if not (mod.in_features % 4 or parametrize.is_parametrized(mod))]
    for mod, mask in layers:
        if handle.sr_ste:
            parametrize.register_parametrization(mod, "weight", _SRSTE(float(sr_ste_decay)))
            handle.layers.append((mod, None))
            continue
        if mask is None:
            mask = prune_2_4(mod.weight)
        with torch.no_grad():
            mod.weight.masked_fill_(~mask, 0)
        handle._hooks.append(mod.weight.register_hook(lambda g, m=mask: g.masked_fill(~m, 0)))
        handle.layers.append((mod, mask))
    if not handle.sr_ste:
        handle._hooks.append(register_optimizer_step_post_hook(
            lambda opt, args, kwargs: handle.remask()))
    return handle
