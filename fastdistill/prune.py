"""Calibrated 2:4 pruning: `calibrate` collects each nn.Linear's input statistics with forward hooks, and
`prune_2_4_` prunes in place by magnitude, Wanda (Sun et al., 2023) or SparseGPT (Frantar & Alistarh, 2023).

The result is exactly 2:4 (at most 2 nonzeros in every group of 4 input columns of every output row), so it goes
straight into apply_2_4_masks (fine-tuning with the mask kept) and sparsify_ (compressed storage and kernels).
"""
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from fastdistill.convert import FilterFn, named_layers
from fastdistill.sparse.format import prune_2_4

Forward = Callable[[nn.Module, Any], Any]
METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclass
class LayerStats:
    """Input statistics of one nn.Linear over every row its input had (all leading positions, e.g. batch x tokens),
    accumulated in fp32 (fp64 for an fp64 layer) on the layer's device."""
    sq_norms: torch.Tensor        # [K]: sum of x_j^2 over the rows, Wanda's ||X_j||^2
    gram: Optional[torch.Tensor]  # [K, K]: X^T X, SparseGPT's Hessian up to a factor (None when gram=False)
    rows: int                     # how many rows were seen


@dataclass
class Calibration:
    """What calibrate returns. `groups` lists the layers in the order the forward first calls them; the layers of
    one group read the same input tensor (attention's q, k, v), so sequential pruning calibrates them in one pass.
    `batches` and `forward` are kept (the list, not copies of its tensors) for sequential pruning's passes."""
    stats: Dict[str, LayerStats]
    groups: List[List[str]]
    calls_per_batch: Dict[str, Optional[int]]   # None when it varied between batches (no early exit then)
    batches: List[Any]
    forward: Forward
    gram: bool
    # Per-tensor input absmax (fp32 scalar) of every nn.Conv2d, over all batches: the static activation scales of
    # quantize_(model, calibration=...) (s = absmax / 127).
    input_absmax: Dict[str, torch.Tensor] = field(default_factory=dict)


class _StopForward(BaseException):
    """Raised by a hook once every layer being calibrated has seen the batch: the rest of the forward is not needed.
    A BaseException, so that an `except Exception` inside the model does not swallow it."""


def _default_forward(model: nn.Module, batch: Any) -> Any:
    return model(batch)


def _collect(model: nn.Module, layers: Dict[str, nn.Linear], batches: List[Any], forward: Forward, gram: bool,
             expected_calls: Optional[Dict[str, Optional[int]]] = None):
    """One pass over the batches with pre-hooks on `layers`. Returns (stats, groups, calls_per_batch). With
    expected_calls (from an earlier pass) each batch's forward stops once every layer has had its calls."""
    stats: Dict[str, LayerStats] = {}
    groups: List[List[str]] = []
    per_batch_calls: Dict[str, List[int]] = {fqn: [] for fqn in layers}
    calls = dict.fromkeys(layers, 0)
    # The previous call's input (held, so that no other tensor can take its memory while identities are compared)
    # and whether that call was a layer's first, i.e. belongs to groups[-1].
    prev = {"input": None, "first": False}
    # The last input's contribution (x^2 column sums, X^T X) by its dtype: q, k and v read one tensor, and
    # X^T X costs 2 K^2 flops per row, more than the layer itself when K > N.
    shared = {"input": None, "version": None, "terms": {}}
    stop_at = None
    if expected_calls is not None and all(expected_calls.get(f) for f in layers):
        stop_at = {f: expected_calls[f] for f in layers}

    def hook(fqn, mod, args, kwargs):
        x_in = args[0] if args else kwargs["input"]
        s = stats.get(fqn)
        if s is None:
            acc = torch.promote_types(mod.weight.dtype, torch.float32)
            dev = mod.weight.device
            s = stats[fqn] = LayerStats(torch.zeros(mod.in_features, dtype=acc, device=dev),
                                        torch.zeros(mod.in_features, mod.in_features, dtype=acc, device=dev)
                                        if gram else None, 0)
            if prev["first"] and x_in is prev["input"]:
                groups[-1].append(fqn)
            else:
                groups.append([fqn])
        prev.update(input=x_in, first=s.rows == 0)
        if shared["input"] is not x_in or shared["version"] != x_in._version:
            shared.update(input=x_in, version=x_in._version, terms={})
        terms = shared["terms"].get(s.sq_norms.dtype)
        if terms is None:
            x = x_in.detach().reshape(-1, mod.in_features).to(s.sq_norms.dtype)
            terms = shared["terms"][s.sq_norms.dtype] = (x.square().sum(0), x.T @ x if s.gram is not None else None)
        s.sq_norms.add_(terms[0])
        if s.gram is not None:
            s.gram.add_(terms[1])
        s.rows += x_in.numel() // mod.in_features
        calls[fqn] += 1
        if stop_at is not None and all(calls[f] >= n for f, n in stop_at.items()):
            raise _StopForward

    handles = [mod.register_forward_pre_hook(lambda m, a, k, f=fqn: hook(f, m, a, k), with_kwargs=True)
               for fqn, mod in layers.items()]
    training = [(m, m.training) for m in model.modules()]
    model.eval()   # dropout off: the statistics are those of inference
    try:
        with torch.no_grad():
            for batch in batches:
                calls.update(dict.fromkeys(layers, 0))
                prev.update(input=None, first=False)
                try:
                    forward(model, batch)
                except _StopForward:
                    pass
                for fqn in layers:
                    per_batch_calls[fqn].append(calls[fqn])
    finally:
        for h in handles:
            h.remove()
        for m, mode in training:
            m.training = mode
        prev["input"] = shared["input"] = None
        shared["terms"] = {}
    calls_per_batch = {f: (c[0] if c and len(set(c)) == 1 and c[0] > 0 else None) for f, c in per_batch_calls.items()}
    return stats, groups, calls_per_batch


def calibrate(model: nn.Module, batches: Iterable[Any], filter_fn: FilterFn = None, forward: Optional[Forward] = None,
              gram: bool = True) -> Calibration:
    """Run `model` over `batches` (under no_grad, in eval mode, restored afterwards) and keep, for every nn.Linear
    (that filter_fn(module, fqn) accepts), the statistics of its input rows X [rows, K]: the squared norm of each
    column (Wanda's ||X_j||^2, K floats) and the Gram matrix X^T X (SparseGPT's Hessian), accumulated in fp32 (fp64
    for fp64 layers) on the layer's device, plus the row count.

    Memory: the Gram matrix costs K^2 floats per layer (4 K^2 bytes in fp32: 9.4 MB for K = 1536, 67 MB for
    K = 4096), for every selected layer at once. gram=False keeps only the norms (enough for "wanda").

    For every nn.Conv2d (that filter_fn accepts) it keeps the absmax of its input over all batches (input_absmax: the
    static per-tensor activation scales of quantize_(model, calibration=...)).

    forward(model, batch) runs one batch (default: model(batch)). The batches are materialised into a list and kept
    by reference in the result, so that prune_2_4_'s sequential mode can run them again.
    """
    batches = list(batches)
    forward = forward or _default_forward
    layers = dict(named_layers(model, (nn.Linear,), filter_fn))
    absmax: Dict[str, torch.Tensor] = {}

    def absmax_hook(fqn, mod, args, kwargs):
        x = (args[0] if args else kwargs["input"]).detach()
        if x.numel() == 0:
            return
        lo, hi = torch.aminmax(x)
        a = torch.maximum(-lo, hi).float()
        absmax[fqn] = a if fqn not in absmax else torch.maximum(absmax[fqn], a)

    handles = [mod.register_forward_pre_hook(lambda m, a, k, f=fqn: absmax_hook(f, m, a, k), with_kwargs=True)
               for fqn, mod in named_layers(model, (nn.Conv2d,), filter_fn)]
    try:
        stats, groups, calls = _collect(model, layers, batches, forward, gram)
    finally:
        for h in handles:
            h.remove()
    return Calibration(stats, groups, calls, batches, forward, gram, absmax)


def _check_method(method: str):
    if method not in METHODS:
        raise ValueError(f"fastdistill.prune_2_4_: method must be one of {', '.join(map(repr, METHODS))}, "
                         f"got {method!r}")


def prune_2_4_(model: nn.Module, calibration: Optional[Calibration] = None, method: str = "sparsegpt",
               filter_fn: FilterFn = None, sequential: bool = True, damp: float = 0.01,
               block_size: int = 128) -> Dict[str, torch.Tensor]:
    """Prune every nn.Linear of `model` (that filter_fn(module, fqn) accepts) to 2:4 along its input dimension K,
    in place; returns {fqn: bool mask of the kept weights}. Weights keep their dtype (the calibrated methods compute
    in fp32, fp64 for fp64 weights). Layers with K not a multiple of 4, or with a parametrized weight, are left as
    they are and named in one warning.

    method:
      "magnitude": keep the 2 largest |w| of each group of 4 (needs no calibration).
      "wanda":     keep the 2 largest |w_ij| * ||X_j|| of each group of 4 in each output row.
      "sparsegpt": the OBS reconstruction of SparseGPT. H = X^T X + damp * mean(diag(X^T X)) * I (damp = 1%
                   of the mean diagonal by default; an input column that was always 0 gets H_jj = 1 and its weights
                   0). With U the upper Cholesky factor of H^-1, columns are visited left to right in blocks of
                   `block_size`; at the start of each group of 4 the 2 largest w^2 / U_jj^2 are kept per row, and
                   pruning w_i moves the not yet visited weights of its row by -(w_i / U_ii) * U[i, i:] (the OBS
                   update; applied lazily between blocks). U_jj^2 is [H_F^-1]_jj with F the columns from j on.

    sequential (default, as in both papers): each group of layers is calibrated on the outputs of the layers before
    it that are already pruned, by running `calibration.batches` again with hooks on that group only, stopping each
    forward once the group has seen its input. Cost: one pass over the batches per group after the first (layers
    reading one input tensor, such as q/k/v, form one group), each pass reaching about halfway through the model on
    average: about G/2 full forwards for G groups (MiniLM: 24 groups). The statistics `calibration` already holds
    serve the first group. sequential=False prunes every layer from `calibration`'s statistics of the dense model.
    Measured (python -m fastdistill.bench.prune, all-MiniLM-L6-v2, 256 calibration sentences, one thread of a busy
    Zen 4): SparseGPT sequential 31.5 CPU s, mean cosine 0.892; sequential=False 7.4 CPU s, 0.890.
    """
    _check_method(method)
    calibrated = method != "magnitude"
    if calibrated and calibration is None:
        raise ValueError(f"fastdistill.prune_2_4_: method {method!r} needs a calibration: pass "
                         f"calibration=fastdistill.calibrate(model, batches)")
    if method == "sparsegpt" and not calibration.gram:
        raise ValueError("fastdistill.prune_2_4_: method 'sparsegpt' needs the input Gram matrices; this calibration "
                         "was made with gram=False")
    if block_size <= 0 or block_size % 4:
        raise ValueError(f"fastdistill.prune_2_4_: block_size must be a positive multiple of 4, got {block_size}")
    if damp < 0:
        raise ValueError(f"fastdistill.prune_2_4_: damp must be >= 0, got {damp}")
    layers: Dict[str, nn.Linear] = {}
    skipped = []
    for fqn, mod in named_layers(model, (nn.Linear,), filter_fn):
        if mod.in_features % 4:
            skipped.append(f"{fqn or '<model>'} (K={mod.in_features} is not a multiple of 4)")
        elif parametrize.is_parametrized(mod, "weight"):
            skipped.append(f"{fqn or '<model>'} (its weight is parametrized)")
        else:
            layers[fqn] = mod
    if calibrated:
        missing = [fqn or "<model>" for fqn in layers if fqn not in calibration.stats]
        if missing:
            raise ValueError(f"fastdistill.prune_2_4_: the calibration has no statistics for {len(missing)} layer(s): "
                             f"{', '.join(missing)} (was it made for another model or with another filter_fn, or did "
                             f"the forward never reach them?)")

    def prune(fqn, stats):
        masks[fqn] = _prune_layer(fqn, layers[fqn], method, stats, damp, block_size)

    masks: Dict[str, torch.Tensor] = {}
    if not calibrated or not sequential:
        for fqn in layers:
            prune(fqn, calibration.stats[fqn] if calibrated else None)
    else:
        groups = [g for g in ([f for f in group if f in layers] for group in calibration.groups) if g]
        for i, group in enumerate(groups):
            if i == 0:   # nothing is pruned yet: the calibration's own statistics are those of this pass
                stats = calibration.stats
            else:
                stats, _, _ = _collect(model, {f: layers[f] for f in group}, calibration.batches, calibration.forward,
                                       gram=method == "sparsegpt", expected_calls=calibration.calls_per_batch)
            for fqn in group:
                if fqn not in stats:
                    raise ValueError(f"fastdistill.prune_2_4_: layer {fqn!r} did not run in the sequential "
                                     f"calibration pass")
                prune(fqn, stats[fqn])
    if skipped:
        warnings.warn(f"fastdistill.prune_2_4_: left {len(skipped)} layer(s) unpruned: " + ", ".join(skipped),
                      stacklevel=2)
    return masks


@torch.no_grad()
def _prune_layer(fqn: str, mod: nn.Linear, method: str, stats: Optional[LayerStats], damp: float,
                 block_size: int) -> torch.Tensor:
    w = mod.weight
    if method == "magnitude":
        mask = prune_2_4(w)
    elif method == "wanda":
        scores = w.detach().to(stats.sq_norms.dtype).abs() * stats.sq_norms.sqrt()
        mask = prune_2_4(w, scores)
    else:
        pruned, mask = sparsegpt_2_4(w.detach(), stats.gram, damp, block_size, where=fqn)
        w.copy_(pruned)
        return mask
    w.masked_fill_(~mask, 0)
    return mask


def sparsegpt_2_4(weight: torch.Tensor, gram: torch.Tensor, damp: float = 0.01, block_size: int = 128,
                  where: str = "") -> tuple:
    """SparseGPT 2:4 for one [N, K] weight given the input Gram matrix X^T X [K, K] (see prune_2_4_).
    Returns (the pruned weight in fp32, or fp64 for fp64 inputs; the bool mask of kept weights)."""
    cdtype = torch.promote_types(torch.promote_types(weight.dtype, gram.dtype), torch.float32)
    w = weight.to(cdtype).clone()
    h = gram.to(device=w.device, dtype=cdtype).clone()
    n, k = w.shape
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h.diagonal().add_(damp * h.diagonal().mean())
    # U, the upper Cholesky factor of H^-1 (H^-1 = U^T U), from one Cholesky and one triangular solve: with J the
    # reversal, J H J = L L^T gives H^-1 = (J L^-T J)(J L^-1 J), and J L^-1 J is upper with a positive diagonal.
    # (cholesky_inverse and a second Cholesky cost 2-20x more on 2 busy cores.)
    chol, info = torch.linalg.cholesky_ex(h.flip(0, 1))
    if info.item() != 0:
        raise ValueError(f"fastdistill.prune_2_4_: layer {where!r}: the damped Hessian is not positive definite; "
                         f"raise damp (now {damp})")
    eye = torch.eye(k, dtype=cdtype, device=w.device)
    u = torch.linalg.solve_triangular(chol, eye, upper=False).flip(0, 1)
    mask = torch.zeros(n, k, dtype=torch.bool, device=w.device)
    # Three levels: a group of 4 columns is pruned column by column, its errors then reach the rest of its block
    # in one rank-4 update and the columns after the block in one update per block. Inside a block the ops are
    # small and run on one thread: split across threads each pays a fork/join (2-9x slower on 2 busy Zen 4 cores).
    # The update after each block is a GEMM of N * K * block_size FMAs; it gets the threads back only when the
    # layer is large enough for that to pay for waking them (each switch costs ~10 ms there): N * K^2 > 2^30.
    threads = torch.get_num_threads()
    block_threads = threads if n * k * k > 2 ** 30 else 1
    try:
        for b0 in range(0, k, block_size):
            b1 = min(b0 + block_size, k)
            wb = w[:, b0:b1].clone()
            ub = u[b0:b1, b0:b1]
            mb = mask[:, b0:b1]
            errs = torch.zeros_like(wb)
            d = ub.diagonal()
            torch.set_num_threads(1)
            for g in range(0, b1 - b0, 4):
                wg, mg, eg = wb[:, g:g + 4], mb[:, g:g + 4], errs[:, g:g + 4]
                scores = wg.square() / d[g:g + 4].square()
                mg.scatter_(1, scores.topk(2, dim=1).indices, True)
                for j in range(4):
                    eg[:, j] = wg[:, j].masked_fill(mg[:, j], 0) / d[g + j]
                    wg[:, j:].addr_(eg[:, j], ub[g + j, g + j:g + 4], alpha=-1)
                wb[:, g + 4:].addmm_(eg, ub[g:g + 4, g + 4:], alpha=-1)
            torch.set_num_threads(block_threads)
            w[:, b0:b1] = wb.masked_fill_(~mb, 0)
            w[:, b1:].addmm_(errs, u[b0:b1, b1:], alpha=-1)
    finally:
        torch.set_num_threads(threads)
    return w, mask
