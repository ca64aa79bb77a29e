"""2:4 structured sparsity: pruning, the compressed format, mask-preserving fine-tuning, and the
SparseLinear drop-in (fp32 / bf16 / int8 values) that multiplies the compressed weight directly.

Canonical format (what state_dict stores): values [N, K/2] in the weight dtype, the 2 kept entries of
every group of 4 columns in ascending column order, and meta uint8 [N, ceil(K/8)]: per group the
4-bit code idx0 | idx1 << 2 (idx0 < idx1), two groups per byte, low nibble first (when K % 8 == 4
the last byte's high nibble is 0). A group with fewer than 2 nonzeros still names 2 positions and
stores zeros there.
"""
import math
import warnings
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch.nn.utils import parametrize
from torch.optim.optimizer import register_optimizer_step_post_hook

from fastdistill import ops

__all__ = ["prune_2_4", "compress_2_4", "decompress_2_4", "to_cutlass_2_4", "from_cutlass_2_4", "to_semi_structured_2_4",
           "SparseLinear",
           "SparseInt8Linear", "sparsify_", "apply_2_4_masks"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16)


def _check_k(k: int, where: str):
    if k % 4 != 0:
        raise ValueError(f"fastdistill.{where}: 2:4 sparsity needs K (in_features, the number of columns) to be "
                         f"a multiple of 4, got K={k}")


def _check_2d(t: torch.Tensor, what: str, where: str):
    if t.dim() != 2:
        raise ValueError(f"fastdistill.{where}: {what} must be 2-D [N, K], got shape {list(t.shape)}")


def prune_2_4(weight: torch.Tensor, scores: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Bool mask keeping, in every group of 4 consecutive columns, the 2 entries with the largest |w|
    (or the largest `scores`, same shape as weight)."""
    k = weight.shape[-1]
    _check_k(k, "prune_2_4")
    if scores is None:
        scores = weight.detach().abs()
    elif scores.shape != weight.shape:
        raise ValueError(f"fastdistill.prune_2_4: scores must have the weight's shape {list(weight.shape)}, "
                         f"got {list(scores.shape)}")
    s = scores.detach().float().reshape(-1, k // 4, 4)
    keep = s.topk(2, dim=-1).indices
    mask = torch.zeros(s.shape, dtype=torch.bool, device=weight.device).scatter_(-1, keep, True)
    return mask.reshape(weight.shape)


def compress_2_4(weight: torch.Tensor, mask: Optional[torch.Tensor] = None):
    """[N, K] weight (+ 2:4 bool mask; default prune_2_4(weight)) -> (values [N, K/2], meta uint8 [N, ceil(K/8)])."""
    _check_2d(weight, "weight", "compress_2_4")
    n, k = weight.shape
    _check_k(k, "compress_2_4")
    if mask is None:
        mask = prune_2_4(weight)
    else:
        if mask.shape != weight.shape:
            raise ValueError(f"fastdistill.compress_2_4: mask must have the weight's shape {list(weight.shape)}, "
                             f"got {list(mask.shape)}")
        mask = mask.to(device=weight.device, dtype=torch.bool)
    g = k // 4
    m = mask.reshape(n, g, 4)
    kept = m.sum(-1)
    if bool((kept > 2).any()):
        r, grp = (kept > 2).nonzero()[0].tolist()
        raise ValueError(f"fastdistill.compress_2_4: mask is not 2:4: row {r}, columns {4 * grp}..{4 * grp + 3} keep "
                         f"{int(kept[r, grp])} of 4 (at most 2 allowed)")
    # Kept positions first, then the lowest free positions for groups with fewer than 2 kept.
    key = m.to(torch.int8) * 4 + (3 - torch.arange(4, device=weight.device, dtype=torch.int8))
    sel = key.topk(2, dim=-1).indices.sort(dim=-1).values  # [n, g, 2], ascending
    w = torch.where(mask, weight.detach(), torch.zeros((), dtype=weight.dtype, device=weight.device))
    values = w.reshape(n, g, 4).gather(-1, sel).reshape(n, k // 2).contiguous()
    codes = (sel[..., 0] | (sel[..., 1] << 2)).to(torch.uint8)  # [n, g]
    if g % 2:
        codes = torch.cat([codes, codes.new_zeros(n, 1)], dim=1)
    meta = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
    return values, meta


def _check_format(values: torch.Tensor, meta: torch.Tensor, where: str) -> int:
    if values.dim() != 2:
        raise ValueError(f"fastdistill.{where}: values must be 2-D [N, K/2], got shape {list(values.shape)}")
    n, k = values.shape[0], 2 * values.shape[1]
    _check_k(k, where)
    if meta.dtype != torch.uint8:
        raise ValueError(f"fastdistill.{where}: meta must be uint8, got {meta.dtype}")
    if tuple(meta.shape) != (n, (k + 7) // 8):
        raise ValueError(f"fastdistill.{where}: meta must be [N, ceil(K/8)] = [{n}, {(k + 7) // 8}] for values "
                         f"{list(values.shape)}, got {list(meta.shape)}")
    return k


def decompress_2_4(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """(values [N, K/2], meta [N, ceil(K/8)]) -> the dense [N, K] weight (zeros where pruned)."""
    k = _check_format(values, meta, "decompress_2_4")
    n, g = values.shape[0], k // 4
    codes = torch.stack([meta & 15, meta >> 4], dim=-1).reshape(n, -1)
    if codes.shape[1] > g and bool((codes[:, g:] != 0).any()):
        raise ValueError("fastdistill.decompress_2_4: meta is invalid: the unused high nibble of the last byte "
                         "(K % 8 == 4) must be 0")
    codes = codes[:, :g]
    i0, i1 = (codes & 3).long(), (codes >> 2).long()
    if bool((i0 >= i1).any()):
        r, grp = (i0 >= i1).nonzero()[0].tolist()
        raise ValueError(f"fastdistill.decompress_2_4: meta is invalid: row {r}, group {grp} has code "
                         f"{int(codes[r, grp])} (needs idx0 < idx1)")
    dense = torch.zeros(n, g, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, torch.stack([i0, i1], dim=-1), values.reshape(n, g, 2))
    return dense.reshape(n, k)


def _cutlass():
    try:
        from torch.sparse import _semi_structured_conversions as conv
    except ImportError as exc:  # pragma: no cover
        raise RuntimeError(f"fastdistill: this torch has no semi-structured (CUTLASS) conversions ({exc})") from exc
    return conv


def to_cutlass_2_4(values: torch.Tensor, meta: torch.Tensor):
    """Canonical 2:4 -> PyTorch's CUTLASS semi-structured layout (sparse, meta_reordered), exactly what
    torch.sparse._semi_structured_conversions.sparse_semi_structured_from_dense_cutlass gives for the
    dense weight (its shape rules apply: rows % 32 == 0 and K % 16 == 0 for 16-bit values, rows % 16 == 0
    and K % 32 == 0 for int8). float32 is refused: its CUTLASS layout is 1:2, not 2:4."""
    if values.dtype == torch.float32:
        raise TypeError("fastdistill.to_cutlass_2_4: PyTorch's CUTLASS semi-structured layout for float32 is 1:2 "
                        "(pairs), which cannot hold a 2:4 weight; convert the values to bfloat16, float16 or int8")
    return _cutlass().sparse_semi_structured_from_dense_cutlass(decompress_2_4(values, meta))


def from_cutlass_2_4(sparse: torch.Tensor, meta_reordered: torch.Tensor):
    """PyTorch's CUTLASS semi-structured layout -> canonical (values, meta)."""
    dense = _cutlass().sparse_semi_structured_to_dense_cutlass(sparse, meta_reordered)
    return compress_2_4(dense, mask=dense != 0)


def _semi_structured_shape_ok(n: int, k: int) -> bool:
    # CUTLASS bf16/fp16 constraints in torch.sparse.semi_structured (cuSPARSELt's are looser)
    return n >= 32 and n % 32 == 0 and k >= 64 and k % 64 == 0


def to_semi_structured_2_4(values: torch.Tensor, meta: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Canonical 2:4 -> a torch.sparse SparseSemiStructuredTensor for F.linear. backend "cutlass" builds it
    from to_cutlass_2_4 (runs on any device); "cusparselt" compresses the dense weight with cuSPARSELt (CUDA
    only); "auto" takes cuSPARSELt where torch has it and the weight is on CUDA."""
    from torch.sparse import semi_structured as ss
    if backend not in ("auto", "cutlass", "cusparselt"):
        raise ValueError(f"fastdistill.to_semi_structured_2_4: backend must be 'auto', 'cutlass' or 'cusparselt', "
                         f"got {backend!r}")
    k = _check_format(values, meta, "to_semi_structured_2_4")
    if values.dtype not in (torch.bfloat16, torch.float16, torch.int8):
        raise TypeError(f"fastdistill.to_semi_structured_2_4: values must be bfloat16, float16 or int8 (torch's "
                        f"float32 semi-structured layout is 1:2, not 2:4), got {values.dtype}")
    if backend == "cusparselt" and not values.is_cuda:
        raise ValueError(f"fastdistill.to_semi_structured_2_4: backend 'cusparselt' needs CUDA tensors, got values "
                         f"on {values.device} (backend 'cutlass' runs on any device)")
    if backend == "auto":
        backend = "cusparselt" if values.is_cuda and torch.backends.cusparselt.is_available() else "cutlass"
    with warnings.catch_warnings():  # torch warns once that the subclass is a prototype
        warnings.simplefilter("ignore", UserWarning)
        if backend == "cusparselt":
            return ss.SparseSemiStructuredTensorCUSPARSELT.from_dense(decompress_2_4(values, meta))
        packed, meta_reordered = to_cutlass_2_4(values, meta)
        return ss.SparseSemiStructuredTensorCUTLASS(torch.Size((values.shape[0], k)), packed=packed,
                                                    meta=meta_reordered, packed_t=None, meta_t=None,
                                                    compressed_swizzled_bitmask=None)


# ---------------------------------------------------------------- modules
def _default_meta(n: int, k: int, device=None) -> torch.Tensor:
    meta = torch.full((n, (k + 7) // 8), 0x44, dtype=torch.uint8, device=device)  # groups keep columns 0, 1
    if k % 8 == 4 and meta.numel():
        meta[:, -1] = 0x04
    return meta


class SparseLinear(nn.Module):
    """nn.Linear with a 2:4 weight stored compressed (fp32 or bf16 values + 2-bit indices) and multiplied
    without decompressing. Buffers (state_dict): values [out, in/2], meta uint8 [out, ceil(in/8)], bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype=torch.float32, device=None):
        super().__init__()
        _check_k(in_features, "SparseLinear")
        if dtype not in _FLOAT_DTYPES:
            raise TypeError(f"fastdistill.SparseLinear: values must be float32 or bfloat16, got {dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("values", torch.zeros(out_features, in_features // 2, dtype=dtype, device=device))
        self.register_buffer("meta", _default_meta(out_features, in_features, device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: Optional[torch.Tensor] = None) -> "SparseLinear":
        w = linear.weight.detach()
        _check_k(w.shape[1], "SparseLinear.from_dense")
        if w.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"fastdistill.SparseLinear.from_dense: the weight must be float32 or bfloat16, got {w.dtype}")
        values, meta = compress_2_4(w, mask)
        mod = cls(w.shape[1], w.shape[0], bias=linear.bias is not None, dtype=w.dtype, device=w.device)
        mod.values.copy_(values)
        mod.meta.copy_(meta)
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach())
        return mod

    # CUDA, more than 16 rows, bf16 values: PyTorch's semi-structured GEMM ("auto": cuSPARSELt when this
    # torch has it, else CUTLASS fed by to_cutlass_2_4; or name one). The weight in that layout is built on
    # the first such call and kept (one more compressed copy, not in the state_dict) until values or meta
    # change. None: decompress + cuBLAS inside the op instead.
    semi_structured_backend: Optional[str] = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._semi_structured_applies(x):
            w = self._semi_structured_weight()
            bias = None if self.bias is None else self.bias.to(w.dtype)
            y = torch.nn.functional.linear(x.reshape(-1, self.in_features).to(w.dtype), w, bias)
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        # The kernels of both devices read the canonical layout (sparse24_pack would only copy it).
        return ops.sparse24_linear(x, self.values, self.meta, self.bias)

    def _semi_structured_applies(self, x: torch.Tensor) -> bool:
        return (self.semi_structured_backend is not None and x.is_cuda and self.values.is_cuda
                and self.values.dtype == torch.bfloat16 and x.numel() > 16 * self.in_features
                and _semi_structured_shape_ok(self.out_features, self.in_features)
                and torch.cuda.get_device_capability(x.device) >= (8, 0)
                and not torch.compiler.is_compiling())

    def _semi_structured_weight(self) -> torch.Tensor:
        key = (self.values.data_ptr(), self.values._version, self.meta.data_ptr(), self.meta._version,
               self.semi_structured_backend)
        cached = self.__dict__.get("_semi_structured_cache")
        if cached is None or cached[0] != key:
            cached = (key, to_semi_structured_2_4(self.values, self.meta, self.semi_structured_backend))
            self.__dict__["_semi_structured_cache"] = cached
        return cached[1]

    def to_dense(self) -> torch.Tensor:
        return decompress_2_4(self.values, self.meta)

    def quantize_int8(self) -> "SparseInt8Linear":
        """The int8 2:4 layer: int8 values with per-output-channel fp32 scales, same indices."""
        return SparseInt8Linear.from_sparse(self)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"dtype={self.values.dtype}, 2:4")


class SparseInt8Linear(nn.Module):
    """2:4 weight with int8 values and per-output-channel fp32 scales; activations are quantized per
    token inside the op, int32 accumulation, fused dequant + bias. Buffers: values, meta, scales, bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__()
        _check_k(in_features, "SparseInt8Linear")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("values", torch.zeros(out_features, in_features // 2, dtype=torch.int8, device=device))
        self.register_buffer("meta", _default_meta(out_features, in_features, device))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32, device=device) if bias else None)

    @classmethod
    def from_sparse(cls, layer: SparseLinear) -> "SparseInt8Linear":
        v = layer.values.detach().float()
        scales = v.abs().amax(dim=1) / 127.0
        safe = torch.where(scales > 0, scales, torch.ones_like(scales)).unsqueeze(1)
        q = torch.round(v / safe).clamp(-127, 127).to(torch.int8)
        mod = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, device=v.device)
        mod.values.copy_(q)
        mod.meta.copy_(layer.meta)
        mod.scales.copy_(scales)
        if layer.bias is not None:
            mod.bias.copy_(layer.bias.float())
        return mod

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: Optional[torch.Tensor] = None) -> "SparseInt8Linear":
        return cls.from_sparse(SparseLinear.from_dense(linear, mask))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.sparse24_int8_linear(x, self.values, self.meta, self.scales, self.bias)

    def to_dense(self) -> torch.Tensor:
        return decompress_2_4(self.values, self.meta).float() * self.scales.unsqueeze(1)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                "int8 2:4")


def _why_not(module: nn.Linear) -> Optional[str]:
    if module.in_features % 4:
        return f"in_features={module.in_features} is not a multiple of 4"
    if module.weight.dtype not in _FLOAT_DTYPES:
        return f"dtype {module.weight.dtype} (needs float32 or bfloat16)"
    if parametrize.is_parametrized(module):
        return "it is parametrized (remove apply_2_4_masks' handle first)"
    return None


def _linears(model: nn.Module, filter_fn):
    for name, mod in model.named_modules():
        if type(mod) is nn.Linear and (filter_fn is None or filter_fn(mod, name)):
            yield name, mod


def _set_module(model: nn.Module, name: str, new: nn.Module):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def sparsify_(model: nn.Module, filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> nn.Module:
    """Replace every nn.Linear (for which filter_fn(module, name) is true) by a SparseLinear pruned 2:4
    by magnitude (a weight already 2:4 keeps its pattern). Layers that cannot be converted stay dense
    and are named in one warning. A bare nn.Linear model is converted and returned."""
    if type(model) is nn.Linear:
        why = _why_not(model)
        if why:
            warnings.warn(f"fastdistill.sparsify_: left 1 layer dense: <model> ({why})", stacklevel=2)
            return model
        return SparseLinear.from_dense(model)
    skipped = []
    for name, mod in list(_linears(model, filter_fn)):
        why = _why_not(mod)
        if why:
            skipped.append(f"{name} ({why})")
        else:
            _set_module(model, name, SparseLinear.from_dense(mod))
    if skipped:
        warnings.warn(f"fastdistill.sparsify_: left {len(skipped)} layer(s) dense: " + ", ".join(skipped),
                      stacklevel=2)
    return model


# ---------------------------------------------------------------- mask-preserving fine-tuning
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
                    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> MaskHandle:
    """Prune every nn.Linear with in_features % 4 == 0 to 2:4 (by magnitude) and keep the pattern during
    fine-tuning.

    sr_ste_decay == 0: the mask is fixed; gradients of pruned weights are zeroed and the weights are
    re-masked after every optimizer step (any torch.optim optimizer), so the pattern holds exactly.
    sr_ste_decay > 0: SR-STE (Zhou et al., 2021): the forward uses the 2:4 projection of the dense
    weight (recomputed every step, so the mask may move), gradients pass straight through, and pruned
    weights get the extra decay sr_ste_decay * w. The weight seen by the forward is always exactly 2:4;
    `remove()` bakes the last 2:4 projection into the weight.
    """
    if sr_ste_decay < 0:
        raise ValueError(f"fastdistill.apply_2_4_masks: sr_ste_decay must be >= 0, got {sr_ste_decay}")
    handle = MaskHandle()
    handle.sr_ste = sr_ste_decay > 0
    for _, mod in _linears(model, filter_fn):
        if mod.in_features % 4 or parametrize.is_parametrized(mod):
            continue
        if handle.sr_ste:
            parametrize.register_parametrization(mod, "weight", _SRSTE(float(sr_ste_decay)))
            handle.layers.append((mod, None))
            continue
        mask = prune_2_4(mod.weight)
        with torch.no_grad():
            mod.weight.masked_fill_(~mask, 0)
        handle._hooks.append(mod.weight.register_hook(lambda g, m=mask: g.masked_fill(~m, 0)))
        handle.layers.append((mod, mask))
    if not handle.sr_ste:
        handle._hooks.append(register_optimizer_step_post_hook(
            lambda opt, args, kwargs: handle.remask()))
    return handle
