"""int8 quantized inference: W8A8 dynamic (per-token activations, per-channel weights, int32
accumulation) and weight-only int8, as nn.Linear drop-ins.

Quantisation: symmetric, zero point 0, s = amax / 127, q = clamp(round(x / s), -127, 127)
(round half to even; an all-zero row has s = 0, q = 0).

Memory: an Int8Linear keeps ONE copy of its weights, the device's packed layout (a non-persistent
buffer, ~N*K bytes). Its state_dict still holds the canonical int8 [N, K] `weight`, fp32 `weight_scale`
[N] and fp32 `bias`: `weight` is unpacked on the fly when the state_dict is built, and packed again by
load_state_dict and by .to()/.cuda() (the packed layout is device-specific).
"""
from typing import Optional

import torch
from torch import nn

from fastdistill import ops
from fastdistill.convert import FilterFn, convert_modules, register_converter

_MODES = ("dynamic", "weight_only")


def quantize_per_token(x: torch.Tensor):
    """x (..., K) fp32/bf16/fp16 -> (int8 (..., K), fp32 scales (...)): one scale per row."""
    return ops.quantize_per_token(x)


def quantize_per_channel(w: torch.Tensor):
    """w [N, K] -> (int8 [N, K], fp32 scales [N]): one scale per output channel. NaN/Inf is an error."""
    return ops.quantize_per_channel(w)


def _check_mode(mode):
    if mode not in _MODES:
        raise ValueError(f"fastdistill.quant: mode must be one of {_MODES}, got {mode!r}")


class Int8Linear(nn.Module):
    """y = x @ W^T + b with W stored as int8 + per-output-channel fp32 scales.

    mode="dynamic": x is quantised per token inside the op (int8 x int8 -> int32, fused dequant + bias).
    mode="weight_only": W is dequantised on the fly inside the GEMM; x stays in floating point.
    The output has x's dtype (fp32, bf16 or fp16).
    activation ("dynamic" only): applied in the op's epilogue after the bias, in fp32: "none", "relu", "gelu" (erf)
    or "gelu_tanh" (quantize_(..., fuse=True) sets it where it fuses an FFN's activation; not in the state_dict).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, mode: str = "dynamic",
                 device=None, activation: str = "none"):
        super().__init__()
        _check_mode(mode)
        if activation not in ops.INT8_ACTIVATIONS or (activation != "none" and mode != "dynamic"):
            raise ValueError(f"fastdistill.Int8Linear: activation must be one of {ops.INT8_ACTIVATIONS} "
                             f"(other than 'none' in mode='dynamic' only), got {activation!r} with mode={mode!r}")
        self.in_features, self.out_features, self.mode = int(in_features), int(out_features), mode
        self.activation = activation
        device = torch.device(device if device is not None else "cpu")
        w = torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        self.register_buffer("w_packed", ops.int8_pack_weight(w), persistent=False)
        self.register_buffer("weight_scale", torch.zeros(out_features, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32, device=device))
        else:
            self.bias = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_float(cls, linear: nn.Linear, mode: str = "dynamic") -> "Int8Linear":
        """Quantise an nn.Linear (any float dtype) per output channel."""
        _check_mode(mode)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"fastdistill.Int8Linear.from_float: expected an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, mode=mode,
                  device=weight.device)
        with torch.no_grad():
            q, s = ops.quantize_per_channel(weight)
            mod.set_int8_weight(q, s)
            if linear.bias is not None:
                mod.bias.copy_(linear.bias.detach().float())
        return mod

    @torch.no_grad()
    def set_int8_weight(self, w_int8: torch.Tensor, scales: Optional[torch.Tensor] = None):
        """Replace the weights with an int8 [N, K] tensor (and optionally the fp32 [N] scales)."""
        if w_int8.shape != (self.out_features, self.in_features) or w_int8.dtype != torch.int8:
            raise ValueError(f"fastdistill.Int8Linear: weight must be int8 of shape "
                             f"[{self.out_features}, {self.in_features}], got {w_int8.dtype} {list(w_int8.shape)}")
        self.w_packed = ops.int8_pack_weight(w_int8.to(self.weight_scale.device).contiguous())
        if scales is not None:
            if scales.shape != (self.out_features,):
                raise ValueError(f"fastdistill.Int8Linear: weight_scale must have shape [{self.out_features}], "
                                 f"got {list(scales.shape)}")
            self.weight_scale.copy_(scales)

    def int8_weight(self) -> torch.Tensor:
        """The int8 [N, K] weight (unpacked from the packed layout; a fresh tensor)."""
        return ops.int8_unpack_weight(self.w_packed, self.out_features, self.in_features)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "dynamic":
            return ops.int8_linear(x, self.w_packed, self.weight_scale, self.bias, self.activation)
        return ops.int8_weight_only_linear(x, self.w_packed, self.weight_scale, self.bias)

    def extra_repr(self):
        act = f", activation={self.activation}" if self.activation != "none" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, mode={self.mode}{act}")

    # ------------------------------------------------------------------ state_dict / devices
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.int8_weight()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        w = state_dict.get(key)
        if w is None:
            missing_keys.append(key)
        elif w.dtype != torch.int8 or tuple(w.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"fastdistill.Int8Linear: {key} must be int8 of shape "
                              f"[{self.out_features}, {self.in_features}], got {w.dtype} {list(w.shape)}")
            w = None
        scale_key = prefix + "weight_scale"
        s = state_dict.get(scale_key)
        if s is not None and s.dtype != torch.float32:
            error_msgs.append(f"fastdistill.Int8Linear: {scale_key} must be float32, got {s.dtype}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if key in unexpected_keys:
            unexpected_keys.remove(key)
        if w is not None:
            with torch.no_grad():
                self.w_packed = ops.int8_pack_weight(w.to(self.weight_scale.device).contiguous())

    def _apply(self, fn, recurse=True):
        # The packed layout is device-specific: unpack, move the canonical int8 weight, repack there.
        w = self.int8_weight()
        self.w_packed = torch.empty(0, dtype=torch.int8, device=self.w_packed.device)
        super()._apply(fn, recurse)
        self.weight_scale = self.weight_scale.float()  # .half() etc. must not touch the scales
        self.w_packed = ops.int8_pack_weight(fn(w).contiguous())
        return self


@register_converter("quantize", nn.Linear)
def _quantize_linear(module: nn.Linear, mode: str) -> Int8Linear:
    return Int8Linear.from_float(module, mode=mode)


def quantize_(model: nn.Module, mode: str = "dynamic", filter_fn: FilterFn = None, fuse: bool = False) -> nn.Module:
    """Replace, in place, every nn.Linear of `model` (or those for which filter_fn(module, fqn) is
    true) with an Int8Linear, and every fastdistill.SparseLinear with a SparseInt8Linear (2:4 and int8
    combined; "dynamic" mode only: in "weight_only" mode they stay and are named in the warning).
    Returns model (or the replacement when model itself is such a layer).

    fuse=True then applies fastdistill.fusion.fuse_int8_ (dynamic mode): in transformers BERT-style encoders the
    Q/K/V projections of each self-attention become one int8 GEMM (Int8Linear or SparseInt8Linear layers) and each
    FFN up-projection takes its GELU into the GEMM's epilogue (Int8Linear layers). Structures it does not recognise
    keep the unfused path. The fused attention's state_dict holds `qkv.*` instead of query/key/value: save with
    save_compressed from a model quantized without fuse."""
    _check_mode(mode)
    model = convert_modules(model, "quantize", filter_fn, mode=mode)
    if fuse and mode == "dynamic":
        from fastdistill.fusion import fuse_int8_
        fuse_int8_(model)
    return model
