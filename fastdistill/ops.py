"""Typed wrappers over torch.ops.fastdistill.*, with fake (shape) kernels and autograd.

Every op is a dispatcher op, so it works under torch.compile(fullgraph=True) and opcheck.
"""
import math

import torch

from fastdistill import _ext

_lib_loaded = _ext._C is not None


def _rows(x: torch.Tensor):
    return math.prod(x.shape[:-1])


# ---------------------------------------------------------------- fused distillation loss
def kd_loss_forward(student, teacher, labels, temperature, divergence, beta, ignore_index, soft_coef, hard_weight):
    _ext.require("kd_loss_forward", student.device)
    return torch.ops.fastdistill.kd_loss_forward(
        student, teacher, labels, float(temperature), divergence, float(beta), int(ignore_index),
        float(soft_coef), float(hard_weight))


if _lib_loaded:

    @torch.library.register_fake("fastdistill::kd_loss_forward")
    def _kd_loss_forward_fake(student, teacher, labels, temperature, divergence, beta, ignore_index,
                              soft_coef, hard_weight):
        torch._check(student.device == teacher.device, lambda: (
            "fastdistill.kd_loss: student and teacher must be on the same device, got "
            f"{student.device} and {teacher.device}"))
        rows = _rows(student)
        return (student.new_empty((rows,), dtype=torch.float32),
                student.new_empty((rows, 8), dtype=torch.float32))

    @torch.library.register_fake("fastdistill::kd_loss_fused")
    def _kd_loss_fused_fake(student, teacher, labels, temperature, divergence, beta, ignore_index,
                            soft_coef, hard_weight, grad_scale):
        loss, stats = _kd_loss_forward_fake(student, teacher, labels, temperature, divergence, beta, ignore_index,
                                            soft_coef, hard_weight)
        return loss, stats, student.new_empty(student.shape)

    @torch.library.register_fake("fastdistill::kd_loss_backward")
    def _kd_loss_backward_fake(grad_rows, student, teacher, labels, stats, temperature, divergence, beta,
                               ignore_index, soft_coef, hard_weight):
        return student.new_empty(student.shape)

    def _kd_setup_context(ctx, inputs, output):
        student, teacher, labels, *params = inputs
        ctx.save_for_backward(student, teacher, labels, output[1])
        ctx.params = params

    def _kd_backward(ctx, grad_rows, _grad_stats):
        student, teacher, labels, stats = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = torch.ops.fastdistill.kd_loss_backward(
                grad_rows.contiguous(), student, teacher, labels, stats, *ctx.params)
        return (grad,) + (None,) * 8

    torch.library.register_autograd(
        "fastdistill::kd_loss_forward", _kd_backward, setup_context=_kd_setup_context)

    def _kd_double_backward(ctx, grad):
        raise NotImplementedError("fastdistill.kd_loss: double backward (gradients of the gradient) is not supported")

    torch.library.register_autograd(
        "fastdistill::kd_loss_backward", _kd_double_backward, setup_context=lambda ctx, inputs, output: None)


# ---------------------------------------------------------------- distillation loss, top-k teacher
def kd_topk_forward(student, indices, logprobs, labels, temperature, divergence, beta, ignore_index, soft_coef,
                    hard_weight, tail):
    _ext.require("kd_topk_forward", student.device)
    return torch.ops.fastdistill.kd_topk_forward(
        student, indices, logprobs, labels, float(temperature), divergence, float(beta), int(ignore_index),
        float(soft_coef), float(hard_weight), tail)


if _lib_loaded:

    @torch.library.register_fake("fastdistill::kd_topk_forward")
    def _kd_topk_forward_fake(student, indices, logprobs, labels, temperature, divergence, beta, ignore_index,
                              soft_coef, hard_weight, tail):
        rows = _rows(student)
        return (student.new_empty((rows,), dtype=torch.float32),
                student.new_empty((rows, 8), dtype=torch.float32))

    @torch.library.register_fake("fastdistill::kd_topk_backward")
    def _kd_topk_backward_fake(grad_rows, student, indices, logprobs, labels, stats, temperature, divergence, beta,
                               ignore_index, soft_coef, hard_weight, tail):
        return student.new_empty(student.shape)

    @torch.library.register_fake("fastdistill::kd_topk_fused")
    def _kd_topk_fused_fake(student, indices, logprobs, labels, temperature, divergence, beta, ignore_index,
                            soft_coef, hard_weight, tail, grad_scale):
        loss, stats = _kd_topk_forward_fake(student, indices, logprobs, labels, temperature, divergence, beta,
                                            ignore_index, soft_coef, hard_weight, tail)
        return loss, stats, student.new_empty(student.shape)

    def _kd_topk_setup_context(ctx, inputs, output):
        student, indices, logprobs, labels, *params = inputs
        ctx.save_for_backward(student, indices, logprobs, labels, output[1])
        ctx.params = params

    def _kd_topk_backward(ctx, grad_rows, _grad_stats):
        student, indices, logprobs, labels, stats = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = torch.ops.fastdistill.kd_topk_backward(
                grad_rows.contiguous(), student, indices, logprobs, labels, stats, *ctx.params)
        return (grad,) + (None,) * 10

    torch.library.register_autograd(
        "fastdistill::kd_topk_forward", _kd_topk_backward, setup_context=_kd_topk_setup_context)
    torch.library.register_autograd(
        "fastdistill::kd_topk_backward", _kd_double_backward, setup_context=lambda ctx, inputs, output: None)


def kd_loss_partial(student, teacher, labels, temperature, divergence, beta, ignore_index, soft_coef, hard_weight):
    """The unfinished per-row softmax state of a vocabulary shard, fp32 [rows, 8] (fastdistill.distributed merges it
    across ranks); labels are global indices and only say whether there is a hard term. No autograd of its own."""
    _ext.require("kd_loss_partial", student.device)
    return torch.ops.fastdistill.kd_loss_partial(
        student, teacher, labels, float(temperature), divergence, float(beta), int(ignore_index), float(soft_coef),
        float(hard_weight))


def kd_loss_jsd_sums(student, teacher, stats, temperature, beta):
    """JSD's two per-row sums over a vocabulary shard, fp32 [rows, 2], from the merged statistics."""
    _ext.require("kd_loss_jsd_sums", student.device)
    return torch.ops.fastdistill.kd_loss_jsd_sums(student, teacher, stats, float(temperature), float(beta))


if _lib_loaded:

    @torch.library.register_fake("fastdistill::kd_loss_partial")
    def _kd_loss_partial_fake(student, teacher, labels, temperature, divergence, beta, ignore_index, soft_coef,
                              hard_weight):
        return student.new_empty((_rows(student), 8), dtype=torch.float32)

    @torch.library.register_fake("fastdistill::kd_loss_jsd_sums")
    def _kd_loss_jsd_sums_fake(student, teacher, stats, temperature, beta):
        return student.new_empty((_rows(student), 2), dtype=torch.float32)


# ---------------------------------------------------------------- 2:4 structured sparsity
def sparse24_pack(values: torch.Tensor, meta: torch.Tensor):
    """Canonical (values [N, K/2], meta uint8 [N, ceil(K/8)]) -> the layout this device's kernels read."""
    _ext.require("sparse24_pack", values.device)
    return torch.ops.fastdistill.sparse24_pack(values, meta)


def sparse24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias=None) -> torch.Tensor:
    """x[..., K] @ W^T (+ bias) for a 2:4 weight with fp32/bf16 values; output in x's dtype."""
    _ext.require("sparse24_linear", x.device)
    return torch.ops.fastdistill.sparse24_linear(x, values, meta, bias)


def sparse24_int8_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, w_scales: torch.Tensor,
                         bias=None) -> torch.Tensor:
    """2:4 int8 weight (per-channel scales) times per-token dynamically quantized x; output in x's dtype."""
    _ext.require("sparse24_int8_linear", x.device)
    return torch.ops.fastdistill.sparse24_int8_linear(x, values, meta, w_scales, bias)


# ---------------------------------------------------------------- int8 quantized inference
def int8_packed_numel(n, k, device):
    """Number of int8 elements of int8_pack_weight's output for an [n, k] weight on `device` (the packed layout
    is opaque and device-specific; its constants come from the extension). n and k may be SymInts."""
    try:
        layout = _layout("int8_pack_weight").int8_packed_layout(torch.device(device).type)
    except ValueError as exc:
        raise NotImplementedError(str(exc)) from None
    n_pad = (n + layout["row_block"] - 1) // layout["row_block"] * layout["row_block"]
    k_pad = (k + layout["k_align"] - 1) // layout["k_align"] * layout["k_align"]
    tail = k_pad - k if layout["k_tail"] else 0
    return layout["header"] + n_pad * (layout["row_bytes"] + k_pad) + tail


def _layout(op):
    if _ext._C is None:
        raise RuntimeError(f"fastdistill.{op}: the compiled extension failed to load ({_ext.LOAD_ERROR})")
    return _ext._C


def int8_max_k() -> int:
    """The largest K of the CPU int8 GEMMs (int32 sums of u8 x s8 products: K * 255 * 127 < 2^31), from the
    extension (int8_pack_weight and int8_conv2d_pack_weight refuse more)."""
    return _layout("int8_pack_weight").int8_max_k()


def int8_conv_gemm_k(cin: int, kh: int, kw: int) -> int:
    """K of int8_conv2d's implicit GEMM (groups == 1): kh * kw taps of Cin channels padded per tap, from the
    extension."""
    return _layout("int8_conv2d_pack_weight").int8_conv_gemm_k(int(cin), int(kh), int(kw))


def quantize_per_token(x):
    _ext.require("quantize_per_token", x.device)
    return torch.ops.fastdistill.quantize_per_token(x)


def quantize_per_channel(w):
    _ext.require("quantize_per_channel", w.device)
    return torch.ops.fastdistill.quantize_per_channel(w)


def int8_pack_weight(w_int8):
    _ext.require("int8_pack_weight", w_int8.device)
    return torch.ops.fastdistill.int8_pack_weight(w_int8)


def int8_unpack_weight(w_packed, n: int, k: int):
    _ext.require("int8_unpack_weight", w_packed.device)
    return torch.ops.fastdistill.int8_unpack_weight(w_packed, int(n), int(k))


# The epilogue activations each op takes (glue/int8.h's kLinearActivations / kConvActivations, in that order).
INT8_ACTIVATIONS = ("none", "relu", "relu6", "gelu", "gelu_tanh")
CONV_ACTIVATIONS = ("none", "relu", "relu6")


def int8_linear(x, w_packed, w_scales, bias=None, activation: str = "none", out_dtype=None):
    """Dynamic W8A8 linear; the epilogue adds the bias, then applies `activation` (one of INT8_ACTIVATIONS; "relu6"
    clamps to [0, 6], "gelu" is the erf form) in fp32 and stores out_dtype (fp32, bf16 or fp16; None: x's dtype)."""
    _ext.require("int8_linear", x.device)
    return torch.ops.fastdistill.int8_linear(x, w_packed, w_scales, bias, activation, out_dtype)


def int8_weight_only_linear(x, w_packed, w_scales, bias=None):
    _ext.require("int8_weight_only_linear", x.device)
    return torch.ops.fastdistill.int8_weight_only_linear(x, w_packed, w_scales, bias)


def int8_gemm_s32(x_int8, w_int8):
    _ext.require("int8_gemm_s32", x_int8.device)
    return torch.ops.fastdistill.int8_gemm_s32(x_int8, w_int8)


def _conv_cpu_only(op, device):
    if torch.device(device).type not in ("cpu", "meta"):
        raise NotImplementedError(f"fastdistill.{op}: int8 Conv2d has CPU kernels only so far; got a tensor on "
                                  f"{device} (keep the quantized conv layers on the CPU)")
    _ext.require(op, torch.device(device))


def int8_conv2d_pack_weight(w_int8, groups: int = 1):
    """int8 [Cout, Cin / groups, kh, kw] -> the CPU's opaque packed conv weight (groups 1 or depthwise)."""
    _conv_cpu_only("int8_conv2d_pack_weight", w_int8.device)
    return torch.ops.fastdistill.int8_conv2d_pack_weight(w_int8, int(groups))


def int8_conv2d_unpack_weight(w_packed, shape):
    """The packed conv weight's int8 [Cout, Cin / groups, kh, kw] tensor (`shape`, checked against the packing)."""
    _conv_cpu_only("int8_conv2d_unpack_weight", w_packed.device)
    return torch.ops.fastdistill.int8_conv2d_unpack_weight(w_packed, [int(s) for s in shape])


def int8_conv2d(x, w_packed, w_scales, bias=None, x_scale=None, residual=None, kernel_size=(1, 1), stride=(1, 1),
                padding=(0, 0), dilation=(1, 1), groups: int = 1, activation: str = "none"):
    """int8 Conv2d (see Int8Conv2d): static per-tensor activations when x_scale is given, else dynamic; `activation`
    is one of CONV_ACTIVATIONS."""
    _conv_cpu_only("int8_conv2d", x.device)
    return torch.ops.fastdistill.int8_conv2d(x, w_packed, w_scales, bias, x_scale, residual, list(kernel_size),
                                             list(stride), list(padding), list(dilation), int(groups), activation)


if _lib_loaded:

    @torch.library.register_fake("fastdistill::sparse24_pack")
    def _sparse24_pack_fake(values, meta):
        return values.new_empty(values.shape), meta.new_empty(meta.shape)

    @torch.library.register_fake("fastdistill::sparse24_linear")
    def _sparse24_linear_fake(x, values, meta, bias):
        return x.new_empty((*x.shape[:-1], values.shape[0]))

    @torch.library.register_fake("fastdistill::sparse24_int8_linear")
    def _sparse24_int8_linear_fake(x, values, meta, w_scales, bias):
        return x.new_empty((*x.shape[:-1], values.shape[0]))

    @torch.library.register_fake("fastdistill::quantize_per_token")
    def _quantize_per_token_fake(x):
        return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)

    @torch.library.register_fake("fastdistill::quantize_per_channel")
    def _quantize_per_channel_fake(w):
        torch._check(w.dim() == 2, lambda: f"fastdistill.quantize_per_channel: w must be 2-D [N, K], got {w.dim()}-D")
        return w.new_empty(w.shape, dtype=torch.int8), w.new_empty(w.shape[:1], dtype=torch.float32)

    @torch.library.register_fake("fastdistill::int8_pack_weight")
    def _int8_pack_weight_fake(w_int8):
        n, k = w_int8.shape
        return w_int8.new_empty((int8_packed_numel(n, k, w_int8.device),), dtype=torch.int8)

    @torch.library.register_fake("fastdistill::int8_unpack_weight")
    def _int8_unpack_weight_fake(w_packed, n, k):
        return w_packed.new_empty((n, k), dtype=torch.int8)

    @torch.library.register_fake("fastdistill::int8_linear")
    def _int8_linear_fake(x, w_packed, w_scales, bias, activation="none", out_dtype=None):
        torch._check(activation in INT8_ACTIVATIONS,
                     lambda: f"fastdistill.int8_linear: activation must be one of {INT8_ACTIVATIONS}, got {activation!r}")
        return x.new_empty((*x.shape[:-1], w_scales.shape[0]), dtype=out_dtype if out_dtype is not None else x.dtype)

    @torch.library.register_fake("fastdistill::int8_weight_only_linear")
    def _int8_weight_only_linear_fake(x, w_packed, w_scales, bias):
        return x.new_empty((*x.shape[:-1], w_scales.shape[0]))

    @torch.library.register_fake("fastdistill::int8_gemm_s32")
    def _int8_gemm_s32_fake(x_int8, w_int8):
        return x_int8.new_empty((*x_int8.shape[:-1], w_int8.shape[0]), dtype=torch.int32)

    @torch.library.register_fake("fastdistill::int8_conv2d_pack_weight")
    def _int8_conv2d_pack_weight_fake(w_int8, groups):
        cout, cin_g, kh, kw = w_int8.shape
        size = _ext._C.int8_conv_packed_bytes(int(cout), int(cin_g * groups), int(kh), int(kw), int(groups))
        return w_int8.new_empty((size,), dtype=torch.int8)

    @torch.library.register_fake("fastdistill::int8_conv2d_unpack_weight")
    def _int8_conv2d_unpack_weight_fake(w_packed, shape):
        return w_packed.new_empty(tuple(shape), dtype=torch.int8)

    @torch.library.register_fake("fastdistill::int8_conv2d")
    def _int8_conv2d_fake(x, w_packed, w_scales, bias, x_scale, residual, kernel_size, stride, padding, dilation,
                          groups, activation):
        torch._check(x.dim() == 4, lambda: f"fastdistill.int8_conv2d: x must be 4-D [N, C, H, W], got {x.dim()}-D")
        n, _, h, w = x.shape
        oh = (h + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1
        ow = (w + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1
        return torch.empty((n, w_scales.shape[0], oh, ow), dtype=x.dtype, device=x.device,
                           memory_format=torch.channels_last)
