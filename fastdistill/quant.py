"""int8 quantized inference: W8A8 dynamic (per-token activations, per-channel weights, int32
accumulation) and weight-only int8, as nn.Linear drop-ins; and int8 Conv2d (per-channel weights, per-tensor
activations: static from calibrate, or dynamic), CPU only so far.

Quantisation: symmetric, zero point 0, s = amax / 127, q = clamp(round(x / s), -127, 127)
(round half to even; an all-zero row has s = 0, q = 0).

Memory: an Int8Linear or Int8Conv2d keeps ONE copy of its weights, the device's packed layout (a
non-persistent buffer, ~N*K bytes). Its state_dict still holds the canonical int8 `weight` ([N, K], or
[Cout, Cin / groups, kh, kw]), fp32 `weight_scale` [N] and fp32 `bias`: `weight` is unpacked on the fly when
the state_dict is built, and packed again by load_state_dict and by .to()/.cuda() (the packed layout is
device-specific): _PackedInt8Weight.
"""
import warnings
from typing import Optional

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from fastdistill import ops
from fastdistill.convert import (EPILOGUE_RELUS, CannotConvert, FilterFn, conv_chains, convert_modules, fold_batchnorm_,
                                 register_converter, replace_module)

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


class _PackedInt8Weight(nn.Module):
    """The int8 layers keep their canonical int8 `weight` only in the packed buffer `w_packed` (non-persistent):
    it is unpacked into the state_dict when that is built, packed again by load_state_dict, and on moves and casts
    (the packed layout is device-specific) unpacked, moved and repacked. A subclass gives int8_weight(),
    _weight_shape() and _pack(w_int8)."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.int8_weight()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key, shape = prefix + "weight", self._weight_shape()
        w = state_dict.get(key)
        if w is None:
            missing_keys.append(key)
        elif w.dtype != torch.int8 or tuple(w.shape) != shape:
            error_msgs.append(f"fastdistill.{type(self).__name__}: {key} must be int8 of shape {list(shape)}, got "
                              f"{w.dtype} {list(w.shape)}")
            w = None
        scale_key = prefix + "weight_scale"
        s = state_dict.get(scale_key)
        if s is not None and s.dtype != torch.float32:
            error_msgs.append(f"fastdistill.{type(self).__name__}: {scale_key} must be float32, got {s.dtype}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if key in unexpected_keys:
            unexpected_keys.remove(key)
        if w is not None:
            with torch.no_grad():
                self.w_packed = self._pack(w.to(self.weight_scale.device).contiguous())

    def _apply(self, fn, recurse=True):
        w = self.int8_weight()
        self.w_packed = torch.empty(0, dtype=torch.int8, device=self.w_packed.device)
        super()._apply(fn, recurse)
        self.weight_scale = self.weight_scale.float()  # .half() etc. must not touch the scales
        self.w_packed = self._pack(fn(w).contiguous())
        return self


class Int8Linear(_PackedInt8Weight):
    """y = x @ W^T + b with W stored as int8 + per-output-channel fp32 scales.

    mode="dynamic": x is quantised per token inside the op (int8 x int8 -> int32, fused dequant + bias).
    mode="weight_only": W is dequantised on the fly inside the GEMM; x stays in floating point.
    The output has x's dtype (fp32, bf16 or fp16).
    activation ("dynamic" only): applied in the op's epilogue after the bias, in fp32: one of ops.INT8_ACTIVATIONS
    ("none", "relu", "relu6", "gelu" (erf), "gelu_tanh"); quantize_(..., fuse=True) sets it where it fuses an FFN's
    activation; not in the state_dict.
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
        self.w_packed = self._pack(w_int8.to(self.weight_scale.device).contiguous())
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

    def _weight_shape(self):
        return (self.out_features, self.in_features)

    def _pack(self, w_int8):
        return ops.int8_pack_weight(w_int8)


# Int8Conv2d.forward's non-epilogue path (a residual the epilogue does not take), one function per CONV_ACTIVATIONS.
_CONV_ACTIVATION_FNS = {"none": lambda v: v, "relu": torch.relu, "relu6": lambda v: v.clamp(0, 6)}


class Int8Conv2d(_PackedInt8Weight):
    """An nn.Conv2d with int8 weights (per output channel, symmetric) and int8 activations (per tensor): int32
    accumulation, then y = act(acc * s_x * s_w[n] + bias[n] (+ residual)) in x's dtype, NHWC inside (CPU only).

    Activations: with `input_scale` set (static: s_x = calibrated absmax / 127, quantize_(..., calibration=...))
    every input is quantised with it, and values beyond the calibrated range saturate at +-127 (never NaN: an
    input far outside the range gives a clipped, finite output). Without it (dynamic, the fallback) each call
    quantises with s_x = amax(|x|) / 127 of that input, one extra pass over it.

    groups is 1 or depthwise (groups == in_channels == out_channels); any stride, zero padding and dilation.
    `activation` (one of ops.CONV_ACTIVATIONS: 'none', 'relu', 'relu6') and the optional `residual` of forward are
    applied in the epilogue (residual first: act(conv + residual)); quantize_ fuses a ReLU / ReLU6 that alone reads
    the conv's output.

    Memory format: the kernels read NHWC. A channels_last input is read in place; a contiguous (NCHW) input is
    converted once per call (one copy of the input, about a tenth of a 3x3 conv's time at ResNet sizes), so keep
    the model and its inputs channels_last (model.to(memory_format=torch.channels_last)). The output is
    channels_last.

    The state_dict holds the int8 `weight` [Cout, Cin / groups, kh, kw], fp32 `weight_scale` [Cout], `bias` and,
    when static, fp32 `input_scale` []; `weight` lives only packed (_PackedInt8Weight).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, activation: str = "none", device=None):
        super().__init__()
        self.in_channels, self.out_channels, self.groups = int(in_channels), int(out_channels), int(groups)
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        if not (self.groups == 1 or self.groups == self.in_channels == self.out_channels):
            raise ValueError(f"fastdistill.Int8Conv2d: groups must be 1 or depthwise (groups == in_channels == "
                             f"out_channels), got groups={groups} for {in_channels} -> {out_channels} channels")
        self.activation = activation
        device = torch.device(device if device is not None else "cpu")
        w = torch.zeros(self._weight_shape(), dtype=torch.int8, device=device)
        self.register_buffer("w_packed", ops.int8_conv2d_pack_weight(w, self.groups), persistent=False)
        self.register_buffer("weight_scale", torch.zeros(out_channels, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_channels, dtype=torch.float32, device=device))
        else:
            self.bias = None
        self.register_buffer("input_scale", None)

    @property
    def activation(self) -> str:
        return self._activation

    @activation.setter
    def activation(self, value: str):
        if value not in ops.CONV_ACTIVATIONS:
            raise ValueError(f"fastdistill.Int8Conv2d: activation must be one of {ops.CONV_ACTIVATIONS}, got {value!r}")
        self._activation = value

    @classmethod
    def from_float(cls, conv: nn.Conv2d, input_absmax: Optional[torch.Tensor] = None,
                   activation: str = "none") -> "Int8Conv2d":
        """Quantise an nn.Conv2d per output channel; static activations when input_absmax (a calibrated absmax of
        its input) is given. Raises CannotConvert for what the kernels do not cover."""
        why = _conv_unsupported(conv)
        if why:
            raise CannotConvert(why)
        w = conv.weight.detach()
        mod = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, _conv_padding(conv),
                  conv.dilation, conv.groups, bias=conv.bias is not None, activation=activation, device=w.device)
        with torch.no_grad():
            wf = w if w.dtype in (torch.float32, torch.bfloat16, torch.float16) else w.float()
            q, s = ops.quantize_per_channel(wf.reshape(conv.out_channels, -1))
            mod.set_int8_weight(q.reshape(w.shape), s)
            if conv.bias is not None:
                mod.bias.copy_(conv.bias.detach().float())
        if input_absmax is not None:
            mod.set_input_absmax(input_absmax)
        return mod

    @torch.no_grad()
    def set_int8_weight(self, w_int8: torch.Tensor, scales: Optional[torch.Tensor] = None):
        """Replace the weights with an int8 [Cout, Cin / groups, kh, kw] tensor (and optionally the fp32 scales)."""
        if tuple(w_int8.shape) != self._weight_shape() or w_int8.dtype != torch.int8:
            raise ValueError(f"fastdistill.Int8Conv2d: weight must be int8 of shape {list(self._weight_shape())}, "
                             f"got {w_int8.dtype} {list(w_int8.shape)}")
        self.w_packed = self._pack(w_int8.to(self.w_packed.device).contiguous())
        if scales is not None:
            self.weight_scale.copy_(scales)

    def _weight_shape(self):
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def int8_weight(self) -> torch.Tensor:
        """The int8 [Cout, Cin / groups, kh, kw] weight (unpacked from the packed layout; a fresh tensor)."""
        return ops.int8_conv2d_unpack_weight(self.w_packed, self._weight_shape())

    @torch.no_grad()
    def set_input_absmax(self, absmax: Optional[torch.Tensor]):
        """Static activations with s_x = absmax / 127 (fp32); None returns to dynamic quantisation."""
        if absmax is None:
            self.input_scale = None
            return
        a = torch.as_tensor(absmax, dtype=torch.float32).reshape(())
        if not bool(torch.isfinite(a)) or a < 0:
            raise ValueError(f"fastdistill.Int8Conv2d: the input absmax must be finite and >= 0, got {a.item()}")
        self.input_scale = (a / 127).to(self.weight_scale.device)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """activation(conv(x) + residual): in the epilogue when residual has the output's shape and x's dtype,
        else (a broadcasting or type-promoting add) as separate ops."""
        if residual is not None and (residual.dtype != x.dtype or residual.shape != self._output_shape(x)):
            y = ops.int8_conv2d(x, self.w_packed, self.weight_scale, self.bias, self.input_scale, None,
                                self.kernel_size, self.stride, self.padding, self.dilation, self.groups, "none")
            return _CONV_ACTIVATION_FNS[self.activation](y + residual)
        return ops.int8_conv2d(x, self.w_packed, self.weight_scale, self.bias, self.input_scale, residual,
                               self.kernel_size, self.stride, self.padding, self.dilation, self.groups,
                               self.activation)

    def _output_shape(self, x: torch.Tensor) -> torch.Size:
        size = [(x.shape[2 + i] + 2 * self.padding[i] - self.dilation[i] * (self.kernel_size[i] - 1) - 1)
                // self.stride[i] + 1 for i in range(2)]
        return torch.Size([x.shape[0], self.out_channels, *size])

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}, activation={self.activation}, "
                f"activations={'static' if self.input_scale is not None else 'dynamic'}")

    def _pack(self, w_int8):
        return ops.int8_conv2d_pack_weight(w_int8, self.groups)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        scale = state_dict.get(prefix + "input_scale")
        if scale is not None and self.input_scale is None:  # a static layer's state into a dynamic one
            self.input_scale = torch.zeros((), dtype=torch.float32, device=self.weight_scale.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.input_scale is not None:
            self.input_scale = self.input_scale.float()
        return self


def _conv_padding(conv: nn.Conv2d):
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":  # symmetric when the dilated kernel's extent is odd (else PyTorch pads one side more)
        return tuple(d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation))
    return conv.padding


def _conv_unsupported(conv: nn.Conv2d) -> str:
    if not (conv.groups == 1 or conv.groups == conv.in_channels == conv.out_channels):
        return (f"groups={conv.groups} with {conv.in_channels} -> {conv.out_channels} channels is neither 1 nor "
                "depthwise")
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only zero padding)"
    if conv.padding == "same" and any(d * (k - 1) % 2 for k, d in zip(conv.kernel_size, conv.dilation)):
        return "padding='same' with an even dilated kernel extent pads asymmetrically"
    if conv.weight.device.type != "cpu":
        return f"it is on {conv.weight.device}: int8 Conv2d has CPU kernels only so far"
    k = ops.int8_conv_gemm_k(conv.in_channels, *conv.kernel_size)
    if conv.groups == 1 and k > ops.int8_max_k():
        return f"kh * kw * round_up(Cin, 4) = {k} is above {ops.int8_max_k()} (int32 accumulation)"
    return ""


@register_converter("quantize", nn.Linear)
def _quantize_linear(module: nn.Linear, mode: str) -> Int8Linear:
    return Int8Linear.from_float(module, mode=mode)


@register_converter("quantize", nn.Conv2d)
def _quantize_conv2d(module: nn.Conv2d, mode: str) -> Int8Conv2d:
    if mode != "dynamic":
        raise CannotConvert(f"Conv2d has no {mode} int8 kernel (mode='dynamic' gives Int8Conv2d)")
    return Int8Conv2d.from_float(module)


def _no_int8_kernel(module: nn.Module, mode: str):
    raise CannotConvert(f"{type(module).__name__} has no int8 kernel (only nn.Conv2d)")


for _conv_type in (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_converter("quantize", _conv_type)(_no_int8_kernel)


def quantize_(model: nn.Module, mode: str = "dynamic", filter_fn: FilterFn = None,
              calibration=None, fuse: bool = False) -> nn.Module:
    """Replace, in place, every nn.Linear of `model` (or those for which filter_fn(module, fqn) is
    true) with an Int8Linear, every nn.Conv2d with an Int8Conv2d ("dynamic" mode), and every
    fastdistill.SparseLinear with a SparseInt8Linear (2:4 and int8 combined; "dynamic" mode only: in
    "weight_only" mode they stay and are named in the warning). Layers that cannot be converted (Conv1d,
    Conv3d, grouped convs that are not depthwise, ...) stay as they are and are named in one warning.
    Returns model (or the replacement when model itself is such a layer).

    Convolutions: a model in eval mode first has its BatchNorm2d folded into the convs before them
    (fold_batchnorm_), and a ReLU / ReLU6 module that alone reads a converted conv's (folded) output is fused
    into its epilogue (the module becomes nn.Identity). Then residual blocks (fusion.fuse_conv_blocks_): a
    conv's residual add, the ReLU after it, and a ReLU module a block calls twice go into the conv's epilogue; each
    such block becomes a torch.fx.GraphModule with the same submodules and state_dict. With calibration=fastdistill.calibrate(model, batches)
    each conv quantises its input with the calibrated scale (absmax / 127; static); a conv the calibration has
    no statistics for, or every conv without one, quantises each input dynamically (per tensor).

    fuse=True then applies fastdistill.fusion.fuse_int8_ (dynamic mode): in transformers BERT-style encoders the
    Q/K/V projections of each self-attention become one int8 GEMM (Int8Linear or SparseInt8Linear layers) and each
    FFN up-projection takes its GELU into the GEMM's epilogue (Int8Linear layers). Structures it does not recognise
    keep the unfused path. The fused attention's state_dict holds `qkv.*` instead of query/key/value: save with
    save_compressed from a model quantized without fuse."""
    _check_mode(mode)
    has_convs = mode == "dynamic" and any(type(m) is nn.Conv2d for m in model.modules())
    chains = {}
    if has_convs and not model.training:
        chains = conv_chains(model)
        fold_batchnorm_(model)
    result = convert_modules(model, "quantize", filter_fn, mode=mode)
    if fuse and mode == "dynamic":
        from fastdistill.fusion import fuse_int8_
        fuse_int8_(result)
    if not has_convs:
        return result
    absmax = calibration.input_absmax if calibration is not None else {}
    uncalibrated = []
    for fqn, mod in result.named_modules():
        if type(mod) is not Int8Conv2d:
            continue
        if fqn in absmax:
            mod.set_input_absmax(absmax[fqn])
        elif calibration is not None:
            uncalibrated.append(fqn or "<model>")
        bn, act = chains.get(fqn, (None, None))
        if act is not None and (bn is None or type(result.get_submodule(bn)) is nn.Identity):
            mod.activation = EPILOGUE_RELUS[type(result.get_submodule(act))]
            replace_module(result, act, nn.Identity())
    if not model.training:
        from fastdistill.fusion import fuse_conv_blocks_
        fuse_conv_blocks_(result)
    if uncalibrated:
        warnings.warn(f"fastdistill.quantize_: the calibration has no statistics for {len(uncalibrated)} conv "
                      f"layer(s), which quantize their input dynamically: " + ", ".join(uncalibrated), stacklevel=2)
    return result
