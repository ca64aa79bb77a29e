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


# ---------------------------------------------------------------- 2:4 structured sparsity (issue 4)
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
