"""SparseLinear (float values) and SparseInt8Linear: nn.Linear drop-ins that keep a 2:4 weight in the
canonical compressed format and multiply it without decompressing; sparsify_ converts a model."""
from typing import Optional

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from fastdistill import ops
from fastdistill.convert import CannotConvert, FilterFn, convert_modules, register_converter
from fastdistill.sparse.format import (check_k, compress_2_4, decompress_2_4, default_meta, semi_structured_shape_ok,
                                       to_semi_structured_2_4)

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class SparseLinear(nn.Module):
    """nn.Linear with a 2:4 weight stored compressed (fp32, bf16 or fp16 values + 2-bit indices) and multiplied
    without decompressing. Buffers (state_dict): values [out, in/2], meta uint8 [out, ceil(in/8)], bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype=torch.float32, device=None):
        super().__init__()
        check_k(in_features, "SparseLinear")
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"fastdistill.SparseLinear: values must be float32, bfloat16 or float16, got {dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("values", torch.zeros(out_features, in_features // 2, dtype=dtype, device=device))
        self.register_buffer("meta", default_meta(out_features, in_features, device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: Optional[torch.Tensor] = None) -> "SparseLinear":
        w = linear.weight.detach()
        check_k(w.shape[1], "SparseLinear.from_dense")
        if w.dtype not in FLOAT_DTYPES:
            raise TypeError(f"fastdistill.SparseLinear.from_dense: the weight must be float32, bfloat16 or float16, got {w.dtype}")
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
                and semi_structured_shape_ok(self.out_features, self.in_features)
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

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"dtype={self.values.dtype}, 2:4")


class SparseInt8Linear(nn.Module):
    """2:4 weight with int8 values and per-output-channel fp32 scales; activations are quantized per
    token inside the op, int32 accumulation, fused dequant + bias. Buffers: values, meta, scales, bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__()
        check_k(in_features, "SparseInt8Linear")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("values", torch.zeros(out_features, in_features // 2, dtype=torch.int8, device=device))
        self.register_buffer("meta", default_meta(out_features, in_features, device))
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


@register_converter("sparsify", nn.Linear)
def _sparsify_linear(module: nn.Linear) -> SparseLinear:
    if module.in_features % 4:
        raise CannotConvert(f"in_features={module.in_features} is not a multiple of 4")
    if module.weight.dtype not in FLOAT_DTYPES:
        raise CannotConvert(f"dtype {module.weight.dtype} (needs float32, bfloat16 or float16)")
    if parametrize.is_parametrized(module):
        raise CannotConvert("it is parametrized (remove apply_2_4_masks' handle first)")
    return SparseLinear.from_dense(module)


@register_converter("quantize", SparseLinear)
def _quantize_sparse_linear(module: SparseLinear, mode: str) -> SparseInt8Linear:
    if mode != "dynamic":
        raise CannotConvert(f"2:4 layers have no {mode} int8 kernel (mode='dynamic' gives SparseInt8Linear)")
    return SparseInt8Linear.from_sparse(module)


def sparsify_(model: nn.Module, filter_fn: FilterFn = None) -> nn.Module:
    """Replace every nn.Linear (for which filter_fn(module, name) is true) by a SparseLinear pruned 2:4
    by magnitude (a weight already 2:4 keeps its pattern). Layers that cannot be converted stay dense
    and are named in one warning. A bare nn.Linear model is converted and returned."""
    return convert_modules(model, "sparsify", filter_fn)
