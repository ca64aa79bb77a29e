"""The fused distillation loss: temperature softmax + divergence, in one pass, no vocab-sized temporaries."""
import torch

from fastdistill import ops

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("batchmean", "sum", "mean", "none")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0,
            divergence: str = "forward_kl", beta: float = 0.5, reduction: str = "batchmean",
            labels: torch.Tensor = None, ignore_index: int = -100, soft_weight: float = 1.0,
            hard_weight: float = 0.0, scale_by_t2: bool = True) -> torch.Tensor:
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
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"fastdistill.kd_loss: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    t = float(temperature)
    soft_coef = float(soft_weight) * (t * t if scale_by_t2 else 1.0)
    row_loss, _ = ops.kd_loss_forward(student_logits, teacher_logits, labels, t, divergence, beta,
                                      ignore_index, soft_coef, hard_weight)
    if reduction == "none":
        return row_loss.view(student_logits.shape[:-1])
    total = row_loss.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / max(student_logits.numel(), 1)
    if labels is None:
        return total / max(row_loss.numel(), 1)
    counted = (labels != ignore_index).sum().clamp_min(1)
    return total / counted


class KDLoss(torch.nn.Module):
    """nn.Module form of :func:`kd_loss`: ``KDLoss(temperature=2.0)(student, teacher, labels=None)``."""

    def __init__(self, *, temperature: float = 1.0, divergence: str = "forward_kl", beta: float = 0.5,
                 reduction: str = "batchmean", ignore_index: int = -100, soft_weight: float = 1.0,
                 hard_weight: float = 0.0, scale_by_t2: bool = True):
        super().__init__()
        self.kwargs = dict(temperature=temperature, divergence=divergence, beta=beta, reduction=reduction,
                           ignore_index=ignore_index, soft_weight=soft_weight, hard_weight=hard_weight,
                           scale_by_t2=scale_by_t2)

    def forward(self, student_logits, teacher_logits, labels=None):
        return kd_loss(student_logits, teacher_logits, labels=labels, **self.kwargs)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
