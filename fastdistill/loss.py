"""The fused distillation loss: temperature softmax + divergence, in one pass, no vocab-sized temporaries."""
import math

import torch

from fastdistill import _ext, ops

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("batchmean", "sum", "mean", "none")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor = None, *, teacher_topk=None,
            topk_tail: str = "bucket", temperature: float = 1.0, divergence: str = "forward_kl", beta: float = 0.5,
            reduction: str = "batchmean", labels: torch.Tensor = None, ignore_index: int = -100,
            soft_weight: float = 1.0, hard_weight: float = 0.0, scale_by_t2: bool = True,
            process_group=None) -> torch.Tensor:
    """Distillation loss between logits of shape (..., V); the leading dims are rows.

    With p = softmax(teacher / T) and q = softmax(student / T):

    * ``forward_kl``: KL(p || q);  ``reverse_kl``: KL(q || p).
    * ``jsd``: generalised Jensen-Shannon with M = beta*p + (1-beta)*q, weighted
      beta*KL(p||M) + (1-beta)*KL(q||M). By convention beta=0 is exactly forward KL(p||q) and
      beta=1 exactly reverse KL(q||p) (special cases, not limits: the formula itself vanishes there).

    Total = soft_weight * (T^2 if scale_by_t2) * divergence + hard_weight * CE(student at T=1, labels).
    Rows whose label equals ``ignore_index`` count in neither term.

    Reductions: ``batchmean`` (sum over counted rows / number of counted rows, 0 if none),
    ``sum``, ``mean`` (sum / (rows * V), as F.kl_div), ``none`` (shape of the leading dims).
    The loss is returned in float32 whatever the logits' dtype (as autocast does for losses);
    only the student receives a gradient, in its own dtype.

    The teacher comes as ``teacher_logits`` (..., V) or as ``teacher_topk = (indices, logprobs)``, both (..., k):
    the teacher's log-probabilities at the temperature of k tokens per row (-inf marks an unused slot; the used
    indices of a row are distinct). ``topk_tail="bucket"`` compares k+1 outcomes, the used tokens and one tail
    (p_tail = max(0, 1 - sum p), q_tail = the student's probability outside them); ``"renormalize"`` (forward_kl
    only) is KL(p / sum p || q) over the used tokens, q the student's full softmax.

    ``process_group``: vocab-parallel logits (fastdistill.distributed). Each rank passes its shard (..., V_r) of
    student and teacher logits, split along the vocabulary over the group's ranks in rank order by
    torch.tensor_split's rule, the same rows and the same global ``labels``; every rank gets the loss of the whole
    vocabulary, and its shard's gradient.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"fastdistill.kd_loss: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    t = float(temperature)
    soft_coef = float(soft_weight) * (t * t if scale_by_t2 else 1.0)
    if process_group is not None:
        if teacher_topk is not None:
            raise NotImplementedError("fastdistill.kd_loss: teacher_topk with a process_group (vocab-parallel) is not "
                                      "supported yet; pass dense teacher logits shards")
        from fastdistill import distributed
        return distributed.kd_loss_vocab_parallel(
            student_logits, teacher_logits, labels, temperature=t, divergence=divergence, beta=float(beta),
            ignore_index=int(ignore_index), soft_coef=soft_coef, hard_weight=float(hard_weight), reduction=reduction,
            group=process_group)
    params = (t, divergence, float(beta), int(ignore_index), soft_coef, float(hard_weight))
    if teacher_topk is not None or teacher_logits is None:
        teacher, params = _topk_pair(teacher_logits, teacher_topk), params + (topk_tail,)
        forward, fused, backward = ops.kd_topk_forward, "kd_topk_fused", "kd_topk_backward"
    else:
        teacher, forward, fused, backward = (teacher_logits,), ops.kd_loss_forward, "kd_loss_fused", "kd_loss_backward"
    if _fused_applies(student_logits):
        return _FusedKDLoss.apply(student_logits, labels, teacher, params, reduction, fused, backward)
    row_loss, _ = forward(student_logits, *teacher, labels, *params)
    return _reduce(row_loss, student_logits.shape, labels, ignore_index, reduction)


def _topk_pair(teacher_logits, teacher_topk):
    """(indices, logprobs) of a top-k teacher given as the only teacher."""
    if teacher_logits is not None:
        raise ValueError("fastdistill.kd_loss: give the teacher as teacher_logits or teacher_topk, not both")
    if teacher_topk is None:
        raise ValueError("fastdistill.kd_loss: no teacher: give teacher_logits or teacher_topk")
    if not (isinstance(teacher_topk, (tuple, list)) and len(teacher_topk) == 2
            and all(isinstance(x, torch.Tensor) for x in teacher_topk)):
        raise TypeError("fastdistill.kd_loss: teacher_topk must be a pair of tensors (indices, logprobs)")
    indices, logprobs = teacher_topk
    return indices.detach(), logprobs.detach()


def _reduce(row_loss, logits_shape, labels, ignore_index, reduction):
    """The reduction of the row losses of logits of shape `logits_shape` (the fused lm_head loss shares it)."""
    if reduction == "none":
        return row_loss.view(logits_shape[:-1])
    total = row_loss.sum()
    if reduction == "sum":
        return total
    return total / _divisor(logits_shape, labels, ignore_index, reduction)


def _divisor(logits_shape, labels, ignore_index, reduction):
    """What mean and batchmean divide the summed row losses by."""
    if reduction == "mean":
        return max(math.prod(logits_shape), 1)
    if labels is None:
        return max(math.prod(logits_shape[:-1]), 1)
    return (labels != ignore_index).sum().clamp_min(1)


def _grad_rows(grad_loss, rows, reduction, divisor):
    """d loss / d row_loss for every row, from the reduced loss's grad_output (`divisor`: _divisor's, or 1)."""
    if reduction == "none":
        return grad_loss.reshape(rows)
    if reduction == "sum":
        return grad_loss.expand(rows)
    return (grad_loss / divisor).expand(rows)


def _fused_applies(student: torch.Tensor) -> bool:
    """The one-call forward+gradient path: eager CPU training. torch.compile traces the two-op path
    (kd_loss_forward / kd_loss_backward) instead, and CUDA keeps it too (there the unit-grad_output
    check below would be a host sync)."""
    return (torch.is_grad_enabled() and student.requires_grad and student.device.type == "cpu"
            and type(student) is torch.Tensor and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active())


def _exact_scales(g: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether scaling a `dtype` tensor by every value of g is exact: zeros and powers of 2, for bf16 (fp32's
    range: its subnormals are below 1e-38). fp16 gradients have subnormals from 6e-5 down, where it is not."""
    return dtype == torch.bfloat16 and bool(((torch.frexp(g).mantissa.abs() == 0.5) | (g == 0)).all())


class _FusedKDLoss(torch.autograd.Function):
    """The forward writes the gradient too, each row while it is still in cache after its statistics, so a
    training step moves 2 reads + 1 write of logits-sized memory instead of 4 reads + 1 write. The backward
    hands that gradient over, scaled in place when grad_output is not exactly 1 (an fp32 gradient, or a bf16
    one and a power-of-2 scale such as 1 / accumulation steps); no second logits-sized tensor exists."""

    @staticmethod
    def forward(ctx, student, labels, teacher, params, reduction, fused_op, backward_op):
        """teacher: the teacher tensors of the ops (teacher_logits,) or (indices, logprobs); params: their scalar
        arguments after labels; fused_op / backward_op: kd_loss_fused and kd_loss_backward, or the kd_topk ones."""
        ignore_index = params[3]
        grad_scale = 1.0 if reduction in ("sum", "none") else 1.0 / float(_divisor(student.shape, labels,
                                                                                     ignore_index, reduction))
        _ext.require(fused_op, student.device)
        row_loss, stats, grad = getattr(torch.ops.fastdistill, fused_op)(student, *teacher, labels, *params,
                                                                         grad_scale)
        ctx.save_for_backward(student, labels, stats, *teacher)
        ctx.params, ctx.backward_op = params, backward_op
        ctx.reduction, ctx.ignore_index = reduction, ignore_index
        ctx.grad = grad
        return _reduce(row_loss, student.shape, labels, ignore_index, reduction)  # as the two-op path, bit for bit

    @staticmethod
    def backward(ctx, grad_loss):
        student, labels, stats, *teacher = ctx.saved_tensors
        grad, ctx.grad = ctx.grad, None  # the precomputed gradient is handed over once
        none = (None,) * 6
        if grad is not None and not torch.is_grad_enabled():
            g = grad_loss.reshape(grad.shape[:-1] + (1,)) if ctx.reduction == "none" else grad_loss
            if bool((g == 1).all()):  # a CPU tensor: no device sync
                return (grad,) + none
            if grad.dtype == torch.float32 or _exact_scales(g, grad.dtype):
                grad.mul_(g)
                return (grad,) + none
        # A second backward (retain_graph=True), create_graph=True, or a low-precision gradient that an in-place
        # scale would round twice: recompute through the backward op, whose own autograd raises a clear error
        # for double backward.
        divisor = 1 if ctx.reduction in ("sum", "none") else _divisor(student.shape, labels, ctx.ignore_index,
                                                                      ctx.reduction)
        grad_rows = _grad_rows(grad_loss, ops._rows(student), ctx.reduction, divisor)
        grad = getattr(torch.ops.fastdistill, ctx.backward_op)(grad_rows.contiguous(), student, *teacher, labels,
                                                               stats, *ctx.params)
        return (grad,) + none


class KDLoss(torch.nn.Module):
    """nn.Module form of :func:`kd_loss`: ``KDLoss(temperature=2.0)(student, teacher, labels=None)``."""

    def __init__(self, *, temperature: float = 1.0, divergence: str = "forward_kl", beta: float = 0.5,
                 reduction: str = "batchmean", ignore_index: int = -100, soft_weight: float = 1.0,
                 hard_weight: float = 0.0, scale_by_t2: bool = True, topk_tail: str = "bucket", process_group=None):
        super().__init__()
        self.kwargs = dict(temperature=temperature, divergence=divergence, beta=beta, reduction=reduction,
                           ignore_index=ignore_index, soft_weight=soft_weight, hard_weight=hard_weight,
                           scale_by_t2=scale_by_t2, topk_tail=topk_tail, process_group=process_group)

    def forward(self, student_logits, teacher_logits=None, labels=None, *, teacher_topk=None):
        return kd_loss(student_logits, teacher_logits, teacher_topk=teacher_topk, labels=labels, **self.kwargs)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
