"""The lm_head fused into the distillation loss: fused_linear_kd_loss(h, W, ...) equals
kd_loss(F.linear(h, W, b), teacher, ...) without the [rows, V] logits ever existing.

Rows are processed in chunks. Per chunk: the student (and teacher) logits in fp32 from the vendor GEMM, the existing
kd kernel for the row losses and d loss / d logits, then two GEMMs that add the chunk's share of the hidden and
weight gradients into fp32 accumulators. In training the gradients are computed in the forward (one pass, four
GEMMs); the backward scales them by grad_output. reduction="none" (one grad_output per row) and a second backward
recompute the logits chunk by chunk instead.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from fastdistill import _ext
from fastdistill import loss as _kd

_OP = "fastdistill.fused_linear_kd_loss"
_F32 = torch.float32

# The chunk's working set: its fp32 student logits, teacher logits and their gradient (12 bytes per row and vocabulary
# entry) plus its hidden rows and their gradient. 20 MiB fits a 32 MiB L3 beside the GEMM's packed panels and keeps
# a training step at 2048 rows x 1024 -> 32000 within 1/8 of one fp32 logits tensor beyond inputs and gradients (the
# issue's memory target; the library's own buffers add about 10 MB). Larger chunks run the GEMMs faster (their M is
# the chunk's rows) at proportionally more memory: pass chunk_size. The row floor keeps the weight-gradient GEMM (its
# inner dimension is the chunk's rows) from being bound by reading and writing the [V, H] accumulator.
CHUNK_BUDGET_BYTES = 20 << 20
MIN_CHUNK_ROWS, MAX_CHUNK_ROWS = 16, 1024


def default_chunk_size(vocab: int, hidden: int) -> int:
    """Rows per chunk for a [V, H] head: the most rows whose working set fits CHUNK_BUDGET_BYTES, as a multiple of 8,
    within [MIN_CHUNK_ROWS, MAX_CHUNK_ROWS]."""
    rows = CHUNK_BUDGET_BYTES // (4 * (3 * vocab + 2 * hidden))
    return int(min(MAX_CHUNK_ROWS, max(MIN_CHUNK_ROWS, rows // 8 * 8)))


def _gemm_operand(x: Tensor) -> Tensor:
    """The form a GEMM operand takes so that the product accumulates and comes out in fp32. CUDA: as it is (cuBLAS
    takes out_dtype=float32 for 16-bit inputs). CPU: widened to fp32 (aten::mm.dtype has no CPU kernel in torch 2.14,
    and a 16-bit GEMM output would round the logits before the softmax); bf16/fp16 values are exact in fp32."""
    return x if x.dtype == _F32 or x.device.type == "cuda" else x.float()


def _mm(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """out = a @ b in fp32 (a and b from _gemm_operand)."""
    if a.dtype == _F32 and b.dtype == _F32:
        return torch.mm(a, b, out=out)
    return torch.mm(a, b.to(a.dtype), out_dtype=_F32, out=out)


def _addmm_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b in place in the fp32 accumulator."""
    if a.dtype == _F32 and b.dtype == _F32:
        acc.addmm_(a, b)
    else:
        torch.addmm(acc, a, b.to(a.dtype), out_dtype=_F32, out=acc)


# On CPU the two GEMMs that read the [V, H] head (logits = x @ W^T and grad_h = g @ W) go through oneDNN's linear:
# with a chunk's few rows, MKL's sgemm re-packs the whole head on every call and runs at a third of its large-M
# rate, while oneDNN's small-M kernels read the head in place (AMD EPYC Zen 4, 48 x 1024 @ 1024 x 32000 fp32:
# 43-53 vs 17-22 GFLOP/s; benchmarks/test_bench_fused_linear.py measures the whole step). The weight-gradient GEMM
# stays on addmm_ (its inner dimension is the chunk's rows, where MKL is fine and oneDNN is not).
_ONEDNN = torch.backends.mkldnn.is_available()


def _onednn_route(device: torch.device) -> bool:
    """Whether the head's GEMMs go through oneDNN: on CPU, where every GEMM operand is fp32 (_gemm_operand)."""
    return _ONEDNN and device.type == "cpu"


def _onednn_linear(x: Tensor, w: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """x @ w^T (+ bias) in fp32, a fresh tensor."""
    return torch.ops.mkldnn._linear_pointwise(x, w, None if bias is None else bias.float(), "none", [], "")


def _logits(x: Tensor, w: Tensor, bias: Optional[Tensor], out: Optional[Tensor]) -> Tensor:
    """fp32 logits of one chunk: from oneDNN where it applies (`out` is then None), else written into `out`."""
    if out is None:
        return _onednn_linear(x, w, bias)
    _mm(x, w.t(), out)
    if bias is not None:
        out.add_(bias)
    return out


def _hidden_grad(g: Tensor, w: Tensor, out: Tensor) -> None:
    """out = g @ w, the chunk's hidden gradient."""
    if _onednn_route(g.device):
        out.copy_(_onednn_linear(g, w.t()))
    else:
        _mm(g, w, out)


def chunk_logits(h, w_mm, b, th, tw_mm, tb, tl, chunk):
    """(r0, r1, x, s, t) for each chunk of `chunk` rows of 2-D inputs, the heads w_mm and tw_mm already GEMM
    operands (_gemm_operand): x the chunk's student hidden rows as a GEMM operand, s and t its fp32 student and
    teacher logits (t a view of tl for precomputed teacher logits, None for a top-k teacher). Off the oneDNN route s and
    t live in buffers that every chunk reuses (no fresh pages per chunk): use them before the next one."""
    rows, vocab = h.shape[0], w_mm.shape[0]
    kw = dict(dtype=_F32, device=h.device)
    n_max = min(chunk, rows)
    onednn = _onednn_route(h.device)  # oneDNN returns fresh logits: no buffers to reuse
    s_buf = None if onednn else torch.empty((n_max, vocab), **kw)
    t_buf = None if onednn or th is None else torch.empty((n_max, vocab), **kw)
    for r0 in range(0, rows, chunk):
        r1 = min(rows, r0 + chunk)
        x = _gemm_operand(h[r0:r1])
        s = _logits(x, w_mm, b, None if onednn else s_buf[: r1 - r0])
        t = None if th is None else _logits(_gemm_operand(th[r0:r1]), tw_mm, tb, None if onednn else t_buf[: r1 - r0])
        t = tl[r0:r1] if tl is not None else t
        yield r0, r1, x, s, t


def _chunk_kd(s, t, topk, labels, kd_args, backward, need_grad, fused, grad_rows, stats):
    """The kd kernels on one chunk's fp32 student logits `s`, the teacher as logits `t` or as `topk` (indices,
    logprobs): (row losses, stats, d loss / d s), each None where not computed (the backward computes only the last,
    for grad_rows and the forward's stats; a forward that needs no gradient skips it)."""
    ops = torch.ops.fastdistill
    if topk is not None:
        teacher, args = topk, kd_args
        forward_op, backward_op, fused_op = ops.kd_topk_forward, ops.kd_topk_backward, ops.kd_topk_fused
    else:
        teacher, args = (t,), kd_args[:6]  # kd_loss's ops take no topk_tail
        forward_op, backward_op, fused_op = ops.kd_loss_forward, ops.kd_loss_backward, ops.kd_loss_fused
    if backward:
        return None, None, backward_op(grad_rows, s, *teacher, labels, stats, *args)
    if not need_grad:
        return (*forward_op(s, *teacher, labels, *args), None)
    if fused:
        return fused_op(s, *teacher, labels, *args, 1.0)
    loss, st = forward_op(s, *teacher, labels, *args)
    ones = torch.ones((s.shape[0],), dtype=_F32, device=s.device)
    return loss, st, backward_op(ones, s, *teacher, labels, st, *args)


def _chunked(h, w, b, th, tw, tb, tl, ti, tp, labels, kd_args, chunk, needs, grad_rows=None, stats=None):
    """One pass over the row chunks of 2-D inputs (the teacher as hidden th / head tw, tb; logits tl; or top-k
    indices ti and logprobs tp). Without grad_rows: (row losses, stats) and, for each of `needs`
    (hidden, weight, bias), the fp32 gradient of the sum of the row losses. With grad_rows and the forward's stats
    (the recomputing backward): (None, None) and the fp32 gradients of sum(grad_rows * row losses)."""
    rows, vocab = h.shape[0], w.shape[0]
    kw = dict(dtype=_F32, device=h.device)
    need_h, need_w, need_b = needs
    backward = grad_rows is not None
    grad_h = torch.empty((rows, h.shape[1]), **kw) if need_h else torch.empty(0, **kw)
    accumulator = torch.empty if rows else torch.zeros  # the first chunk writes them (no separate zero-fill pass)
    grad_w = accumulator((vocab, w.shape[1]), **kw) if need_w else torch.empty(0, **kw)
    grad_b = accumulator((vocab,), **kw) if need_b else torch.empty(0, **kw)
    row_loss = None if backward else torch.empty((rows,), **kw)
    stats_out = None if backward else torch.empty((rows, 8), **kw)
    fused = h.device.type == "cpu"  # kd_loss_fused / kd_topk_fused (loss and gradient in one call) are CPU kernels
    w_mm = _gemm_operand(w)
    tw_mm = _gemm_operand(tw) if tw is not None else None
    for r0, r1, x, s, t in chunk_logits(h, w_mm, b, th, tw_mm, tb, tl, chunk):
        lab = labels[r0:r1] if labels is not None else None
        topk = (ti[r0:r1], tp[r0:r1]) if ti is not None else None
        loss_c, stats_c, g = _chunk_kd(s, t, topk, lab, kd_args, backward, any(needs), fused,
                                       grad_rows[r0:r1] if backward else None, stats[r0:r1] if backward else None)
        if not backward:
            row_loss[r0:r1] = loss_c
            stats_out[r0:r1] = stats_c
        if g is None:
            continue
        g_mm = g if w_mm.dtype == _F32 else g.to(w_mm.dtype)  # CUDA 16-bit GEMM inputs
        if need_h:
            _hidden_grad(g_mm, w_mm, grad_h[r0:r1])
        if need_w:
            _mm(g_mm.t(), x, grad_w) if r0 == 0 else _addmm_(grad_w, g_mm.t(), x)
        if need_b:
            torch.sum(g, 0, out=grad_b) if r0 == 0 else grad_b.add_(g.sum(0))
        del g, g_mm  # before the next chunk's gradient is allocated: one chunk-sized gradient alive at a time
    return row_loss, stats_out, grad_h, grad_w, grad_b


# ---------------------------------------------------------------- dispatcher ops
# Python custom ops: each composes the kd kernels (torch.ops.fastdistill.kd_loss_*) and the vendor GEMM, so one
# definition serves CPU and CUDA; register_fake gives torch.compile the shapes, register_autograd the backward.

@torch.library.custom_op("fastdistill::fused_linear_kd_forward", mutates_args=())
def _forward_op(student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
                teacher_hidden: Optional[Tensor], teacher_weight: Optional[Tensor], teacher_bias: Optional[Tensor],
                teacher_logits: Optional[Tensor], teacher_indices: Optional[Tensor], teacher_logprobs: Optional[Tensor],
                labels: Optional[Tensor], temperature: float, divergence: str, beta: float, ignore_index: int,
                soft_coef: float, hard_weight: float, topk_tail: str, reduction: str, chunk_size: int,
                grad_hidden: bool, grad_weight: bool, grad_bias: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss as `reduction` reduces it, fp32 [] or [rows]; stats [rows, 8]; the fp32 gradients of the SUM of the row
    losses w.r.t. the 2-D student hidden, weight and bias, each computed only if its flag is set, else empty)."""
    kd_args = (temperature, divergence, beta, ignore_index, soft_coef, hard_weight, topk_tail)
    row_loss, stats, gh, gw, gb = _chunked(student_hidden, student_weight, student_bias, teacher_hidden,
                                           teacher_weight, teacher_bias, teacher_logits, teacher_indices,
                                           teacher_logprobs, labels, kd_args, chunk_size,
                                           (grad_hidden, grad_weight, grad_bias))
    shape = (student_hidden.shape[0], student_weight.shape[0])
    loss = row_loss if reduction == "none" else _kd._reduce(row_loss, shape, labels, ignore_index, reduction)
    return loss, stats, gh, gw, gb


@_forward_op.register_fake
def _forward_fake(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                  teacher_logits, teacher_indices, teacher_logprobs, labels, temperature, divergence, beta,
                  ignore_index, soft_coef, hard_weight, topk_tail, reduction, chunk_size, grad_hidden, grad_weight,
                  grad_bias):
    rows = student_hidden.shape[0]
    new = lambda *shape: student_hidden.new_empty(shape, dtype=_F32)  # noqa: E731
    loss = new(rows) if reduction == "none" else new()
    return (loss, new(rows, 8), *_grads_fake(student_hidden, student_weight, grad_hidden, grad_weight, grad_bias))


def _grads_fake(h, w, grad_hidden, grad_weight, grad_bias):
    new = lambda *shape: h.new_empty(shape, dtype=_F32)  # noqa: E731
    return (new(*h.shape) if grad_hidden else new(0), new(*w.shape) if grad_weight else new(0),
            new(w.shape[0]) if grad_bias else new(0))


@torch.library.custom_op("fastdistill::fused_linear_kd_backward", mutates_args=())
def _backward_op(grad_rows: Tensor, student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
                 teacher_hidden: Optional[Tensor], teacher_weight: Optional[Tensor], teacher_bias: Optional[Tensor],
                 teacher_logits: Optional[Tensor], teacher_indices: Optional[Tensor],
                 teacher_logprobs: Optional[Tensor], labels: Optional[Tensor], stats: Tensor, temperature: float,
                 divergence: str, beta: float, ignore_index: int, soft_coef: float, hard_weight: float, topk_tail: str,
                 chunk_size: int, grad_hidden: bool, grad_weight: bool,
                 grad_bias: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """The fp32 gradients of sum(grad_rows * row losses), recomputing each chunk's logits (empty where not asked)."""
    kd_args = (temperature, divergence, beta, ignore_index, soft_coef, hard_weight, topk_tail)
    _, _, gh, gw, gb = _chunked(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                teacher_bias, teacher_logits, teacher_indices, teacher_logprobs, labels, kd_args,
                                chunk_size,
                                (grad_hidden, grad_weight, grad_bias), grad_rows=grad_rows, stats=stats)
    return gh, gw, gb


@_backward_op.register_fake
def _backward_fake(grad_rows, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                   teacher_bias, teacher_logits, teacher_indices, teacher_logprobs, labels, stats, temperature,
                   divergence, beta, ignore_index, soft_coef, hard_weight, topk_tail, chunk_size, grad_hidden,
                   grad_weight, grad_bias):
    return _grads_fake(student_hidden, student_weight, grad_hidden, grad_weight, grad_bias)


def _setup_context(ctx, inputs, output):
    h, w, b, th, tw, tb, tl, ti, tp, labels = inputs[:10]
    ctx.kd_args = inputs[10:17]  # temperature ... hard_weight, topk_tail
    ctx.reduction, ctx.chunk_size = inputs[17], inputs[18]
    ctx.save_for_backward(h, w, b, th, tw, tb, tl, ti, tp, labels, output[1])
    # Handed over to the first backward (a reference kept here would make autograd copy the weight gradient
    # instead of taking it as .grad).
    ctx.grads = output[2:] if any(inputs[19:22]) else None
    ctx.precomputed = inputs[19:22]


def _input_grads(ctx, grad_loss, in_place):
    """The gradients for (hidden, weight, bias): the forward's, scaled by grad_output (in place in eager training,
    where nothing else holds them), or, for reduction="none" and a second backward, recomputed chunk by chunk."""
    h, w, b, th, tw, tb, tl, ti, tp, labels, stats = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad[:3])
    grads, ctx.grads = ctx.grads, None
    if grads is not None and not all(done or not need for done, need in zip(ctx.precomputed, needs)):
        grads = None  # a gradient the forward did not compute is wanted
    shape, ignore_index = (h.shape[0], w.shape[0]), ctx.kd_args[3]
    div = 1 if ctx.reduction in ("sum", "none") else _kd._divisor(shape, labels, ignore_index, ctx.reduction)
    if grads is not None:
        scale = grad_loss / div
        grads = [(g.mul_(scale) if in_place else g * scale) if need else None for g, need in zip(grads, needs)]
    else:
        grad_rows = grad_loss.reshape(-1) if ctx.reduction == "none" else (grad_loss / div).expand(h.shape[0])
        grads = _backward_op(grad_rows.to(_F32).contiguous(), h, w, b, th, tw, tb, tl, ti, tp, labels, stats,
                             *ctx.kd_args, ctx.chunk_size, *needs)
    return tuple(g.to(x.dtype) if need else None for g, x, need in zip(grads, (h, w, b), needs)) + (None,) * 19


def _backward(ctx, grad_loss, *_):
    return _input_grads(ctx, grad_loss, in_place=False)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _double_backward(ctx, *grads):
    raise NotImplementedError(f"{_OP}: double backward (gradients of the gradient) is not supported")


_backward_op.register_autograd(_double_backward, setup_context=lambda ctx, inputs, output: None)


class _EagerTraining(torch.autograd.Function):
    """Eager training: the op's registered autograd, but scaling the forward's gradients in place, so no second
    weight-sized gradient exists (the registered backward stays functional for torch.compile and opcheck; as in
    fastdistill.loss)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _forward_op(*inputs)
        _setup_context(ctx, inputs, output)
        return output[0]

    @staticmethod
    def backward(ctx, grad_loss):
        return _input_grads(ctx, grad_loss, in_place=True)


def _eager_training(x: Tensor) -> bool:
    return (type(x) in (torch.Tensor, torch.nn.Parameter) and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active())


# ---------------------------------------------------------------- public API
def fused_linear_kd_loss(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Optional[Tensor] = None,
                         teacher_weight: Optional[Tensor] = None, *, teacher_logits: Optional[Tensor] = None,
                         teacher_topk: Optional[Tuple[Tensor, Tensor]] = None, topk_tail: str = "bucket",
                         student_bias: Optional[Tensor] = None, teacher_bias: Optional[Tensor] = None,
                         chunk_size: Optional[int] = None, temperature: float = 1.0, divergence: str = "forward_kl",
                         beta: float = 0.5, reduction: str = "batchmean", labels: Optional[Tensor] = None,
                         ignore_index: int = -100, soft_weight: float = 1.0, hard_weight: float = 0.0,
                         scale_by_t2: bool = True, process_group=None) -> Tensor:
    """kd_loss(F.linear(student_hidden, student_weight, student_bias), teacher, ...) without the logits.

    The teacher comes in one form: its hidden states [..., Ht] and head `teacher_weight` [V, Ht] (optional
    `teacher_bias`), where Ht may differ from the student's H; precomputed `teacher_logits` [..., V]; or
    `teacher_topk` = (indices, logprobs) [..., k] with `topk_tail`, as for :func:`fastdistill.kd_loss`. Every other
    keyword means what it means for :func:`fastdistill.kd_loss`. The logits are computed `chunk_size` rows at a time
    (default: :func:`default_chunk_size`), in fp32 whatever the inputs' dtype. Gradients go to the student's hidden
    states, weight and bias (those that require grad, each in its own dtype); the teacher never gets one.

    ``process_group``: a vocab-parallel (Megatron column-parallel) head. Each rank passes the full hidden states and
    its rows of the heads (and biases, or its columns of teacher_logits), split along V in rank order by
    torch.tensor_split's rule (fastdistill.distributed.vocab_shard). Every rank gets the loss of the whole
    vocabulary and the gradient of its weight and bias shards. The hidden states' gradient on each rank is that
    rank's partial contribution, from its shard of the vocabulary only: the tensor-parallel framework sums it over
    the group (as Megatron's copy-to-tensor-parallel-region does in its backward).
    """
    if reduction not in _kd.REDUCTIONS:
        raise ValueError(f"{_OP}: reduction must be one of {_kd.REDUCTIONS}, got {reduction!r}")
    if _is_dtensor(student_hidden):
        raise ValueError(f"{_OP}: student_hidden is a DTensor; pass its local tensor (only the heads may be DTensors)")
    student_weight, student_bias, teacher_weight, teacher_bias = (
        _gathered(x) for x in (student_weight, student_bias, teacher_weight, teacher_bias))
    t = float(temperature)
    soft_coef = float(soft_weight) * (t * t if scale_by_t2 else 1.0)
    kd = (t, divergence, float(beta), int(ignore_index), soft_coef, float(hard_weight))
    if process_group is not None:
        if teacher_topk is not None:
            raise NotImplementedError(f"{_OP}: teacher_topk with a process_group (vocab-parallel) is not supported "
                                      "yet; pass the teacher's hidden states and head shard, or its logits shard")
        return _vocab_parallel(student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits,
                               student_bias, teacher_bias, labels, chunk_size, kd, reduction, process_group)
    rows, lead, chunk, th, tw, tb, tl, ti, tp, labels = _prepare(
        student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits, student_bias, teacher_bias,
        labels, chunk_size, sharded=False, teacher_topk=teacher_topk)
    _ext.require("kd_loss_forward" if teacher_topk is None else "kd_topk_forward", student_hidden.device)
    # The gradients are computed in the forward when one scalar grad_output will scale them all.
    grad_on = torch.is_grad_enabled() and reduction != "none"
    precompute = [grad_on and x is not None and x.requires_grad for x in (student_hidden, student_weight, student_bias)]
    args = (student_hidden.reshape(rows, student_hidden.shape[-1]), student_weight, student_bias, th, tw, tb, tl,
            ti, tp, labels, *kd, str(topk_tail), reduction, chunk, *precompute)
    loss = _EagerTraining.apply(*args) if any(precompute) and _eager_training(student_hidden) else _forward_op(*args)[0]
    return loss.view(lead) if reduction == "none" else loss


def _prepare(student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits, student_bias,
             teacher_bias, labels, chunk_size, sharded, teacher_topk=None):
    """The checked inputs as 2-D rows: (rows, leading shape, chunk, teacher hidden, teacher weight, teacher bias,
    teacher logits, top-k indices, top-k logprobs, labels). `sharded`: the vocabulary widths are vocabulary shards,
    which the ranks check together."""
    if student_hidden.dim() < 1 or student_weight.dim() != 2:
        raise ValueError(f"{_OP}: student_hidden must be [..., H] and student_weight [V, H], got "
                         f"{list(student_hidden.shape)} and {list(student_weight.shape)}")
    lead, hidden = student_hidden.shape[:-1], student_hidden.shape[-1]
    vocab = student_weight.shape[0]
    if student_weight.shape[1] != hidden:
        raise ValueError(f"{_OP}: the hidden size of student_hidden ({hidden}) does not match student_weight "
                         f"{list(student_weight.shape)} (expected [V, {hidden}])")
    _check_bias(student_bias, vocab, "student")
    from_hidden = teacher_hidden is not None or teacher_weight is not None
    forms = int(from_hidden) + int(teacher_logits is not None) + int(teacher_topk is not None)
    if forms != 1:
        raise ValueError(f"{_OP}: give the teacher in exactly one form: teacher_hidden and teacher_weight, "
                         f"teacher_logits, or teacher_topk (got {('neither', None, 'both', 'all three')[forms]})")
    rows = student_hidden.numel() // hidden if hidden else 0
    teacher_indices = teacher_logprobs = None
    if teacher_topk is not None:
        if teacher_bias is not None:
            raise ValueError(f"{_OP}: teacher_bias goes with teacher_weight, not with teacher_topk")
        teacher_indices, teacher_logprobs = _kd._topk_pair(None, teacher_topk)
        if teacher_indices.shape[:-1] != lead or teacher_logprobs.shape != teacher_indices.shape:
            raise ValueError(f"{_OP}: teacher_topk indices and logprobs must both be (..., k) with the student's "
                             f"leading shape {list(lead)}, got {list(teacher_indices.shape)} and "
                             f"{list(teacher_logprobs.shape)}")
        k = teacher_indices.shape[-1]
        teacher_indices, teacher_logprobs = teacher_indices.reshape(rows, k), teacher_logprobs.reshape(rows, k)
    elif from_hidden:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError(f"{_OP}: teacher_hidden and teacher_weight go together (got only one)")
        if teacher_weight.dim() != 2 or teacher_hidden.shape[-1:] != teacher_weight.shape[1:]:
            raise ValueError(f"{_OP}: the hidden size of teacher_hidden {list(teacher_hidden.shape)} does not match "
                             f"teacher_weight {list(teacher_weight.shape)} (expected [V, Ht])")
        if teacher_weight.shape[0] != vocab and not sharded:
            raise ValueError(f"{_OP}: the teacher's vocabulary ({teacher_weight.shape[0]}) differs from the student's "
                             f"({vocab})")
        if teacher_hidden.shape[:-1] != lead:
            raise ValueError(f"{_OP}: teacher_hidden must have the student's leading shape {list(lead)}, got "
                             f"{list(teacher_hidden.shape[:-1])}")
        _check_bias(teacher_bias, teacher_weight.shape[0], "teacher")
        teacher_hidden = teacher_hidden.detach().reshape(rows, teacher_hidden.shape[-1])
        teacher_weight = teacher_weight.detach()
        teacher_bias = teacher_bias.detach() if teacher_bias is not None else None
    else:
        if teacher_bias is not None:
            raise ValueError(f"{_OP}: teacher_bias goes with teacher_weight, not with teacher_logits")
        if teacher_logits.shape[-1] != vocab and not sharded:
            raise ValueError(f"{_OP}: the teacher's vocabulary ({teacher_logits.shape[-1]}) differs from the "
                             f"student's ({vocab})")
        if teacher_logits.shape[:-1] != lead:
            raise ValueError(f"{_OP}: teacher_logits must have the student's leading shape {list(lead)}, got "
                             f"{list(teacher_logits.shape[:-1])}")
        teacher_logits = teacher_logits.detach().reshape(rows, teacher_logits.shape[-1])
    if labels is not None:
        if labels.shape != lead:
            raise ValueError(f"{_OP}: labels must have the hidden states' leading shape {list(lead)}, got "
                             f"{list(labels.shape)}")
        if labels.dtype != torch.long:
            raise ValueError(f"{_OP}: labels must be int64 (torch.long), got {labels.dtype}")
        labels = labels.reshape(rows)
    chunk = default_chunk_size(vocab, hidden) if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"{_OP}: chunk_size must be >= 1, got {chunk_size}")
    return (rows, lead, chunk, teacher_hidden, teacher_weight, teacher_bias, teacher_logits, teacher_indices,
            teacher_logprobs, labels)


def _vocab_parallel(h, w, th, tw, tl, b, tb, labels, chunk_size, kd, reduction, group):
    """fused_linear_kd_loss with process_group: the ranks check their inputs together, then merge their shards'
    statistics (fastdistill.distributed)."""
    from fastdistill import distributed
    error, prepared = None, None
    try:
        prepared = _prepare(h, w, th, tw, tl, b, tb, labels, chunk_size, sharded=True)
        if kd[5] != 0.0 and labels is None:
            raise ValueError(f"{_OP}: hard_weight={kd[5]} needs labels (got labels=None)")
    except ValueError as exc:
        error = str(exc)
    rows, lead, chunk, th, tw, tb, tl, _, _, labels = prepared or (0, None, 0, None, None, None, None, None, None, None)
    t_width = (tw.shape[0] if tw is not None else tl.shape[-1]) if prepared else 0
    start, end, vocab = distributed.agree_on_shards(_OP, group, h.device, error, rows,
                                                    w.shape[0] if w.dim() == 2 else 0, t_width, labels, kd[3])
    _ext.require("kd_loss_partial", h.device)
    loss = distributed._VocabParallelFusedLinear.apply(h.reshape(rows, h.shape[-1]), w, b, th, tw, tb, tl, labels,
                                                       *kd, reduction, chunk, group, start, end, vocab)
    return loss.view(lead) if reduction == "none" else loss


def _is_dtensor(x) -> bool:
    if x is None or type(x) in (torch.Tensor, torch.nn.Parameter) or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(x, DTensor)


def _gathered(x: Optional[Tensor]) -> Optional[Tensor]:
    """A DTensor head (FSDP2 shards, read outside its module's forward, where FSDP2 would have gathered them) as the
    full tensor. Its gradient goes back averaged over the mesh, into the shards, as FSDP2 reduces every other
    gradient (a plain full_tensor() would hand each rank only its own slice of its own gradient)."""
    if not _is_dtensor(x):
        return x
    from torch.distributed.tensor import Partial
    return x.full_tensor(grad_placements=[Partial("avg")] * x.device_mesh.ndim)


def _check_bias(bias, vocab, who):
    if bias is not None and bias.shape != (vocab,):
        raise ValueError(f"{_OP}: {who}_bias must be [V] = [{vocab}], got {list(bias.shape)}")


class FusedLinearKDLoss(torch.nn.Module):
    """nn.Module form of :func:`fused_linear_kd_loss`:
    ``FusedLinearKDLoss(temperature=2.0)(hidden, lm_head.weight, teacher_hidden, teacher_head.weight)``."""

    def __init__(self, *, chunk_size: Optional[int] = None, temperature: float = 1.0, divergence: str = "forward_kl",
                 beta: float = 0.5, reduction: str = "batchmean", ignore_index: int = -100, soft_weight: float = 1.0,
                 hard_weight: float = 0.0, scale_by_t2: bool = True, topk_tail: str = "bucket", process_group=None):
        super().__init__()
        self.kwargs = dict(chunk_size=chunk_size, temperature=temperature, divergence=divergence, beta=beta,
                           reduction=reduction, ignore_index=ignore_index, soft_weight=soft_weight,
                           hard_weight=hard_weight, scale_by_t2=scale_by_t2, topk_tail=topk_tail,
                           process_group=process_group)

    def forward(self, student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, *,
                teacher_logits=None, teacher_topk=None, labels=None, student_bias=None, teacher_bias=None):
        return fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                    teacher_logits=teacher_logits, teacher_topk=teacher_topk, labels=labels,
                                    student_bias=student_bias, teacher_bias=teacher_bias, **self.kwargs)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
