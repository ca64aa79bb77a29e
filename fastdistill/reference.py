"""Plain-PyTorch reference implementations: the definitions the kernels are tested against
(run in float64 by the tests) and the eager baselines the benchmarks compare with."""
import math

import torch
import torch.nn.functional as F


def _kl(log_x, log_y):
    """Row-wise KL(x || y) from log-probabilities; terms with x == 0 contribute 0 (the masking is
    applied to the logs too, so that -inf logits give no NaN in the gradient either)."""
    p = log_x.exp()
    live = p > 0
    zero = torch.zeros_like(p)
    return (p * (torch.where(live, log_x, zero) - torch.where(live, log_y, zero))).sum(-1)


def kd_divergence_reference(student, teacher, temperature=1.0, divergence="forward_kl", beta=0.5):
    """Per-row divergence (no T^2 scaling) between softmax(teacher/T) and softmax(student/T)."""
    log_q = F.log_softmax(student / temperature, dim=-1)
    log_p = F.log_softmax(teacher / temperature, dim=-1)
    return _divergence_of_logs(log_p, log_q, divergence, beta)


def _divergence_of_logs(log_p, log_q, divergence, beta):
    """Per-row divergence between two distributions given by their log-probabilities over the last dim."""
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0):
        return _kl(log_p, log_q)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1):
        return _kl(log_q, log_p)
    if divergence != "jsd":
        raise ValueError(divergence)
    live = (log_p > float("-inf")) | (log_q > float("-inf"))
    zero = torch.zeros_like(log_p)
    log_m = torch.logaddexp(torch.where(live, log_p, zero) + math.log(beta),
                            torch.where(live, log_q, zero) + math.log1p(-beta))
    return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)


def kd_reverse_kl_grad_reference(student, teacher, temperature=1.0):
    """d/d student of sum_rows T^2 KL(q || p), rows of finite logits, centred the way the kernels are: at
    |logits| / T ~ 1e4 autograd's q (log q/p - KL) cancels even in float64 (a term of 1e-25 next to 1e4 is
    below its eps), and it is q (d - sum q d) with d = ((s - t) - (s - t) at argmax s) / T that stays exact."""
    s, t = student.double(), teacher.double()
    diff = s - t
    d = (diff - diff.gather(-1, s.argmax(-1, keepdim=True))) / temperature
    q = torch.softmax(s / temperature, dim=-1)
    return temperature * q * (d - (q * d).sum(-1, keepdim=True))


def kd_loss_reference(student, teacher, *, temperature=1.0, divergence="forward_kl", beta=0.5,
                      reduction="batchmean", labels=None, ignore_index=-100, soft_weight=1.0,
                      hard_weight=0.0, scale_by_t2=True):
    """The whole kd_loss, written the obvious way (materialises several vocab-sized tensors)."""
    teacher = teacher.to(student.dtype)
    divergence_rows = kd_divergence_reference(student, teacher, temperature, divergence, beta)
    return _total_reference(divergence_rows, student, temperature, reduction, labels, ignore_index, soft_weight,
                            hard_weight, scale_by_t2)


def kd_topk_divergence_reference(student, indices, logprobs, temperature=1.0, divergence="forward_kl", beta=0.5,
                                 tail="bucket"):
    """Per-row divergence against a top-k teacher (fastdistill.kd_loss's teacher_topk), over its outcomes: the used
    slots (logprob > -inf) and, for tail="bucket", one tail outcome unless the used tokens cover the vocabulary."""
    log_q = F.log_softmax(student / temperature, dim=-1)
    lp = logprobs.to(log_q.dtype)
    used = lp > float("-inf")
    idx = torch.where(used, indices.long(), torch.zeros_like(indices, dtype=torch.long))
    neg_inf = torch.full_like(lp, float("-inf"))
    lq_used = torch.where(used, log_q.gather(-1, idx), neg_inf)
    lp = torch.where(used, lp, neg_inf)
    if tail == "renormalize":
        lp_hat = lp - torch.logsumexp(lp, -1, keepdim=True)
        lp_hat = torch.where(used, lp_hat, neg_inf)  # a row without a used slot: no outcome, divergence 0
        return _divergence_of_logs(lp_hat, lq_used, divergence, beta)
    in_used = torch.zeros_like(log_q).scatter_add(-1, idx, used.to(log_q.dtype)) > 0
    has_tail = ~in_used.all(-1, keepdim=True)
    # q_tail as a sum over the tail (rows without one sum everything, then drop it: no -inf-only logsumexp)
    lq_tail = torch.logsumexp(torch.where(in_used & has_tail, float("-inf"), log_q), -1, keepdim=True)
    p_tail = (1 - lp.exp().sum(-1, keepdim=True)).clamp_min(0)
    row_neg_inf = torch.full_like(lq_tail, float("-inf"))
    log_p = torch.cat([lp, torch.where(has_tail, p_tail.log(), row_neg_inf)], -1)
    log_q_out = torch.cat([lq_used, torch.where(has_tail, lq_tail, row_neg_inf)], -1)
    return _divergence_of_logs(log_p, log_q_out, divergence, beta)


def kd_topk_loss_reference(student, indices, logprobs, *, topk_tail="bucket", temperature=1.0,
                           divergence="forward_kl", beta=0.5, reduction="batchmean", labels=None, ignore_index=-100,
                           soft_weight=1.0, hard_weight=0.0, scale_by_t2=True):
    """The whole kd_loss with teacher_topk=(indices, logprobs), written the obvious way."""
    divergence_rows = kd_topk_divergence_reference(student, indices, logprobs, temperature, divergence, beta,
                                                   topk_tail)
    return _total_reference(divergence_rows, student, temperature, reduction, labels, ignore_index, soft_weight,
                            hard_weight, scale_by_t2)


def _total_reference(divergence_rows, student, temperature, reduction, labels, ignore_index, soft_weight,
                     hard_weight, scale_by_t2):
    """kd_loss's total from per-row divergences: weights, the hard term, ignored rows, the reduction."""
    t2 = temperature * temperature if scale_by_t2 else 1.0
    rows = soft_weight * t2 * divergence_rows
    counted = torch.ones_like(rows, dtype=torch.bool)
    if labels is not None:
        counted = labels != ignore_index
        if hard_weight:
            safe = torch.where(counted, labels, torch.zeros_like(labels))
            ce = -F.log_softmax(student, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
            rows = rows + hard_weight * ce
        rows = torch.where(counted, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        return rows.sum() / max(student.numel(), 1)
    return rows.sum() / counted.sum().clamp_min(1)


def kd_loss_eager(student, teacher, temperature=1.0, labels=None):
    """What a user writes without fastdistill: forward KL through F.kl_div, batchmean, T^2 scaled."""
    return F.kl_div(F.log_softmax(student / temperature, dim=-1), F.log_softmax(teacher / temperature, dim=-1),
                    log_target=True, reduction="batchmean") * temperature * temperature


def kd_reverse_kl_eager(student, teacher, temperature=1.0):
    """Reverse KL(q || p) as a user writes it: F.kl_div with the roles swapped, batchmean, T^2 scaled."""
    return F.kl_div(F.log_softmax(teacher / temperature, dim=-1), F.log_softmax(student / temperature, dim=-1),
                    log_target=True, reduction="batchmean") * temperature * temperature


def kd_jsd_eager(student, teacher, temperature=1.0, beta=0.5):
    """Generalised JSD as a user writes it (Liger-style): M = beta p + (1 - beta) q in log space,
    beta KL(p || M) + (1 - beta) KL(q || M), batchmean, T^2 scaled."""
    lp = F.log_softmax(teacher / temperature, dim=-1)
    lq = F.log_softmax(student / temperature, dim=-1)
    lm = torch.logsumexp(torch.stack([lp + math.log(beta), lq + math.log(1 - beta)]), dim=0)
    rows = student.numel() // student.shape[-1]
    kl_p = F.kl_div(lm, lp, log_target=True, reduction="sum")
    kl_q = F.kl_div(lm, lq, log_target=True, reduction="sum")
    return (beta * kl_p + (1 - beta) * kl_q) / rows * temperature * temperature


# ---------------------------------------------------------------- 2:4 structured sparsity
def sparse24_linear_reference(x, values, meta, bias=None, w_scales=None, dtype=None):
    """y = x @ W^T (+ bias) with W = decompress_2_4(values, meta) (times w_scales per row for int8
    values, in which case x is quantized per token first), computed in `dtype` (default x.dtype)."""
    from fastdistill.sparse import decompress_2_4

    dtype = dtype or x.dtype
    w = decompress_2_4(values, meta).to(dtype)
    if w_scales is not None:  # the integer sums first, as int8_linear_reference
        q, s = quantize_symmetric_reference(x)
        y = (q.to(dtype) @ w.t()) * s.to(dtype).unsqueeze(-1) * w_scales.to(dtype)
    else:
        y = x.to(dtype) @ w.t()
    if bias is not None:
        y = y + bias.to(dtype)
    return y


def compressed_2_4_sample(dense: torch.Tensor):
    """A test weight in the canonical 2:4 format: (values, meta, the pruned dense weight), pruned by magnitude."""
    from fastdistill.sparse import compress_2_4, decompress_2_4

    values, meta = compress_2_4(dense)
    return values, meta, decompress_2_4(values, meta)


# ---------------------------------------------------------------- int8 quantized inference
def quantize_symmetric_reference(x: torch.Tensor):
    """Per-row symmetric int8: s = amax / 127 (fp32), q = clamp(round(x / s), -127, 127), s = 0 -> q = 0."""
    xf = x.float()
    s = xf.abs().amax(-1) / 127
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.where((s > 0).unsqueeze(-1), torch.round(xf / safe.unsqueeze(-1)), torch.zeros_like(xf))
    return q.clamp(-127, 127).to(torch.int8), s


def int8_linear_reference(x, w_int8, w_scales, bias=None, dtype=torch.float64):
    """Dynamic W8A8 in `dtype`: (q(x) @ w^T) * s_x * s_w + bias. The integer sums come first, as in the kernels, so
    in fp64 they are exact (|sum| < 2^53) and the result is the scheme's exact value."""
    xq, xs = quantize_symmetric_reference(x)
    y = (xq.to(dtype) @ w_int8.to(dtype).T) * xs.to(dtype).unsqueeze(-1) * w_scales.to(dtype)
    return y + bias.to(dtype) if bias is not None else y


def int8_weight_only_linear_reference(x, w_int8, w_scales, bias=None, dtype=torch.float64):
    """Weight-only int8: x @ (w * s_w)^T + bias in `dtype`."""
    w = w_int8.to(dtype) * w_scales.to(dtype).unsqueeze(-1)
    y = x.to(dtype) @ w.T
    return y + bias.to(dtype) if bias is not None else y


def int8_conv2d_reference(x, w_int8, w_scales, bias=None, x_scale=None, residual=None, stride=1, padding=0,
                          dilation=1, groups=1, activation="none", dtype=torch.float64):
    """int8 Conv2d in `dtype`: x quantised per tensor (s = x_scale, else amax(|x|) / 127, in fp32; q = clamp(round(x /
    s), -127, 127)), the integer conv sums first (exact in fp64), then * s * w_scales[n] + bias (+ residual), then
    the activation."""
    xf = x.float()
    s = x_scale.float().reshape(()) if x_scale is not None else xf.abs().amax() / 127
    q = torch.round(xf / s).clamp(-127, 127) if s > 0 else torch.zeros_like(xf)
    acc = F.conv2d(q.to(dtype), w_int8.to(dtype), None, stride, padding, dilation, groups)
    y = acc * s.to(dtype) * w_scales.to(dtype).reshape(1, -1, 1, 1)
    if bias is not None:
        y = y + bias.to(dtype).reshape(1, -1, 1, 1)
    if residual is not None:
        y = y + residual.to(dtype)
    if activation == "relu":
        y = y.clamp_min(0)
    elif activation == "relu6":
        y = y.clamp(0, 6)
    return y
