"""Vocab-parallel distillation loss over torch.distributed process groups.

The logits (or the lm_head weight) are split along the vocabulary over the group's ranks in rank order, as in
Megatron's column-parallel head, by torch.tensor_split's rule: with V columns over W ranks, rank r holds
V // W + (1 if r < V % W else 0) columns, the first V % W ranks one more. :func:`vocab_shard` cuts a full tensor
that way. Labels are global vocabulary indices; a label belongs to the rank whose columns contain it.

Per call, nothing logits-sized crosses the wire. One all-gather of 7 int64 per rank checks that the ranks agree
(rows, shard widths, label range), so a disagreement is an error on every rank instead of a hang. Then per row:
each rank's kernel leaves the raw softmax state of its shard (kd_loss_partial: maxima, rescalable sums, the
weighted log-ratio sum); one all-reduce MAX merges the maxima (the primary side's as an int64 key that carries the
other side's logit at its argmax, the centre of the KL log ratio), one all-reduce SUM the sums rescaled to the
global maxima (and the label's logit, from the rank that holds it). JSD then runs its second pass over the shard
with the merged log-sums and SUMs its two sums. Every rank ends with the same statistics and loss, and the existing
backward kernel turns them into the gradient of its own shard, with no communication in the backward.
Bytes all-reduced per row: forward / reverse KL 16 (MAX) + 12 (SUM), JSD 16 + 8 + 8; a hard term adds 4, and 4
more unless T = 1.
"""
import math
from typing import Callable, Optional

import torch
import torch.distributed as dist

from fastdistill import fused_linear as fl
from fastdistill import loss as kd
from fastdistill import ops

_NEG_INF = float("-inf")
# Columns of kd_loss_partial's [rows, 8] output (csrc/include/fastdistill/kd_loss.h, KdPartialField) and of the
# [rows, 8] statistics the backward reads (KdStat).
_PART_MAX_T, _PART_SUM_T, _PART_MAX_S, _PART_SUM_S, _PART_SUM_HARD, _PART_W, _PART_Q_AT = range(7)
_STAT_AUX = 5
# What the backward op reads as the label of a row whose label is in another rank's shard, and as ignore_index:
# neither is a column of any shard.
_LOCAL_IGNORE, _LOCAL_ELSEWHERE = -1, -2

_bytes_communicated = 0


def communicated_bytes() -> int:
    """Payload bytes this process has handed to collectives in vocab-parallel losses so far (the shard check's
    all-gather included)."""
    return _bytes_communicated


def shard_sizes(vocab: int, world: int):
    """Columns per rank for a vocabulary of `vocab` over `world` ranks, in rank order (torch.tensor_split's rule)."""
    return [vocab // world + (1 if r < vocab % world else 0) for r in range(world)]


def vocab_shard(x: torch.Tensor, process_group, dim: int = -1) -> torch.Tensor:
    """This rank's shard of a full tensor along the vocabulary dimension `dim` (-1 for logits, 0 for an lm_head
    weight [V, H] or a bias [V]): a view, the layout the process_group= losses expect."""
    world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
    return x.tensor_split(world, dim)[rank]


def _collective(fn, tensor, *args, group):
    global _bytes_communicated
    _bytes_communicated += tensor.numel() * tensor.element_size()
    fn(tensor, *args, group=group)


def _all_reduce(t, op, group):
    _collective(dist.all_reduce, t, op, group=group)


def agree_on_shards(op: str, group, device, local_error: Optional[str], rows: int, student_width: int,
                    teacher_width: int, labels: Optional[torch.Tensor], ignore_index: int):
    """One small all-gather of what every rank was given, checked alike on every rank, so that inputs the ranks
    disagree on raise the same error everywhere instead of leaving some ranks waiting in a collective.
    Returns (first column, end column, total vocabulary) of this rank's shard."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    big = torch.iinfo(torch.int64).max
    if labels is not None and local_error is None:
        lab = labels.reshape(-1)
        counted = lab != ignore_index
        lo = torch.where(counted, lab, big).amin() if lab.numel() else torch.tensor(big, device=lab.device)
        hi = torch.where(counted, lab, -1).amax() if lab.numel() else torch.tensor(-1, device=lab.device)
        label_range = torch.stack([lo, hi]).to(device=device, dtype=torch.int64)
    else:
        label_range = torch.tensor([big, -1], device=device, dtype=torch.int64)
    mine = torch.cat([torch.tensor([local_error is not None, rows, student_width, teacher_width,
                                    labels is not None], device=device, dtype=torch.int64), label_range])
    table = [torch.empty_like(mine) for _ in range(world)]
    global _bytes_communicated
    _bytes_communicated += mine.numel() * mine.element_size()
    dist.all_gather(table, mine, group=group)
    table = [t.tolist() for t in table]
    failed = [r for r in range(world) if table[r][0]]
    if failed:
        raise ValueError(local_error if local_error is not None else
                         f"{op}: rank(s) {failed} of the process group rejected their inputs (see their errors)")
    column = lambda i: [t[i] for t in table]  # noqa: E731
    row_counts, s_widths, t_widths, has_labels = column(1), column(2), column(3), column(4)
    if len(set(row_counts)) > 1:
        raise ValueError(f"{op}: the ranks of the process group disagree on the number of rows: {row_counts} "
                         f"(ranks in order); every rank needs the same rows, sharded along the vocabulary only")
    if s_widths != t_widths:
        raise ValueError(f"{op}: student and teacher vocabulary shards differ in width: student {s_widths}, "
                         f"teacher {t_widths} (columns per rank, in rank order)")
    vocab = sum(s_widths)
    expected = shard_sizes(vocab, world)
    if s_widths != expected or min(s_widths) < 1:
        raise ValueError(f"{op}: the vocabulary shards {s_widths} (columns per rank, in rank order, {vocab} in all) "
                         f"are not torch.tensor_split's split of {vocab} columns over {world} ranks ({expected}); "
                         f"every rank needs at least one column (fastdistill.distributed.vocab_shard cuts them)")
    if len(set(has_labels)) > 1:
        raise ValueError(f"{op}: only some ranks of the process group were given labels: {has_labels}")
    lo, hi = min(column(5)), max(column(6))
    if has_labels[0] and (lo < 0 or hi >= vocab) and lo != big:
        raise ValueError(f"{op}: labels must be global vocabulary indices in [0, {vocab}) (the sum of the shards' "
                         f"widths {s_widths}) or ignore_index ({ignore_index}), got labels from {lo} to {hi}")
    start = sum(s_widths[:rank])
    return start, start + s_widths[rank], vocab


def local_labels(labels: Optional[torch.Tensor], ignore_index: int, start: int, end: int):
    """Global labels as the backward op reads them on the shard [start, end): the shard's column for a label in it,
    _LOCAL_ELSEWHERE for a label in another rank's shard, _LOCAL_IGNORE for ignore_index."""
    if labels is None:
        return None
    inside = (labels >= start) & (labels < end)
    lab = torch.where(inside, labels - start, _LOCAL_ELSEWHERE)
    return torch.where(labels == ignore_index, _LOCAL_IGNORE, lab)


def label_logits(student: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """The student's logit at each row's label where this shard holds it, else 0 (fp32, rows): their SUM over the
    ranks is the logit at the label."""
    inside = local >= 0
    picked = student.gather(-1, torch.where(inside, local, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(inside, picked.float(), 0.0).reshape(-1)


def _effective_divergence(divergence: str, beta: float) -> str:
    """JSD's convention (beta = 0 is forward KL, beta = 1 reverse KL), as the kernels' glue applies it."""
    if divergence == "jsd" and beta in (0.0, 1.0):
        return "forward_kl" if beta == 0.0 else "reverse_kl"
    return divergence


def _ordered(x):
    """fp32 -> int32 whose signed order is the floats' order (and back: it is its own inverse on the bits)."""
    bits = x.view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _max_key(major, minor):
    """int64 keys whose MAX is the largest `major` and, among equal ones, the largest `minor` (fp32 each)."""
    return (_ordered(major).to(torch.int64) << 32) + (_ordered(minor).to(torch.int64) + 2 ** 31)


def _from_max_key(key):
    """(major, minor) of _max_key."""
    major = _ordered((key >> 32).to(torch.int32)).view(torch.float32)
    minor = _ordered(((key & 0xFFFFFFFF) - 2 ** 31).to(torch.int32)).view(torch.float32)
    return major, minor


def _rescale(m_old, m_new, inv_t):
    """exp((m_old - m_new) / T): moves a sum onto the larger maximum (0 for an empty sum), as kd_rescale."""
    return torch.where(m_old == _NEG_INF, 0.0, torch.exp((m_old - m_new) * inv_t))


def _finite(x):
    return x - x == 0


def _centre(m_p, m_q, q_at):
    """kd_centre: P - Q at P's argmax, or the maxima's difference where that is not finite."""
    fallback = torch.where(m_p == _NEG_INF, 0.0, m_p) - torch.where(m_q == _NEG_INF, 0.0, m_q)
    return torch.where(_finite(m_p - q_at), m_p - q_at, fallback)


def _centre_offset(m_q, m_p, q_at):
    """kd_centre_offset: mQ - (Q at P's argmax), or 0 for the fallback centre."""
    return torch.where(_finite(m_p - q_at), m_q - q_at, 0.0)


def merge_rows(part: torch.Tensor, label_logit: Optional[torch.Tensor], counted: Optional[torch.Tensor],
               jsd_sums: Callable[[torch.Tensor], torch.Tensor], *, group, temperature: float, divergence: str,
               beta: float, soft_coef: float, hard_weight: float, separate_hard: bool):
    """The row losses and the backward's statistics of the whole vocabulary from every rank's kd_loss_partial
    state: the same numbers kd_loss_forward would give on the unsharded logits (kd_merge and finish_row of the C++
    kernels, on [rows] tensors). jsd_sums(stats) runs JSD's second pass over this rank's shard."""
    if part.shape[0] == 0:  # the ranks agreed on the rows: all of them return here
        return part.new_empty((0,)), part.new_empty((0, 8))
    inv_t = 1.0 / temperature
    div = _effective_divergence(divergence, beta)
    m_t, z_t, m_s, z_s, z_h, w, q_at = part[:, :7].unbind(1)
    kl = div != "jsd"
    teacher_primary = div != "reverse_kl"
    m_p, m_q = (m_t, m_s) if teacher_primary else (m_s, m_t)
    # One MAX round: P's maximum together with Q's logit there (the centre of the KL log ratio) as one int64 key, so
    # the rank holding P's global maximum supplies the centre (on a tie, the largest Q: each is a valid centre).
    maxima = torch.stack([_max_key(m_p, q_at if kl else m_q), _max_key(m_q, m_q)], 1)
    _all_reduce(maxima, dist.ReduceOp.MAX, group)
    gm_p, gq_at = _from_max_key(maxima[:, 0])
    gm_q, _ = _from_max_key(maxima[:, 1])
    gm_t, gm_s = (gm_p, gm_q) if teacher_primary else (gm_q, gm_p)
    sums = [z_t * _rescale(m_t, gm_t, inv_t), z_s * _rescale(m_s, gm_s, inv_t)]
    if separate_hard:
        sums.append(z_h * _rescale(m_s, gm_s, 1.0))
    if kl:
        z_p = z_t if teacher_primary else z_s
        shift = (_centre(gm_p, gm_q, gq_at) - _centre(m_p, m_q, q_at)) * inv_t * z_p
        sums.append(torch.where(z_p == 0, 0.0, (w - shift) * _rescale(m_p, gm_p, inv_t)))
    if label_logit is not None:
        sums.append(label_logit)
    merged = torch.stack(sums, 1)
    _all_reduce(merged, dist.ReduceOp.SUM, group)
    cols = list(merged.unbind(1))
    gz_t, gz_s = cols.pop(0), cols.pop(0)
    gz_h = cols.pop(0) if separate_hard else None
    gw = cols.pop(0) if kl else None
    g_label = cols.pop(0) if label_logit is not None else None
    ms0, mt0 = torch.where(gm_s == _NEG_INF, 0.0, gm_s), torch.where(gm_t == _NEG_INF, 0.0, gm_t)
    lz_t, lz_s = torch.log(gz_t), torch.log(gz_s)
    lz_h = torch.log(gz_h) if separate_hard else lz_s
    zero = torch.zeros_like(lz_s)
    aux, centre = zero, zero
    if div == "forward_kl":
        d = gw / gz_t + _centre_offset(gm_s, gm_t, gq_at) * inv_t - lz_t + lz_s
    elif div == "reverse_kl":
        aux = gw / gz_s
        d = aux + _centre_offset(gm_t, gm_s, gq_at) * inv_t - lz_s + lz_t
        centre = _centre(gm_s, gm_t, gq_at)
    has_hard = label_logit is not None
    stats = torch.stack([ms0, lz_s, mt0, lz_t, lz_h if has_hard else zero, aux, centre, zero], 1)
    if not kl:
        js = jsd_sums(stats)
        _all_reduce(js, dist.ReduceOp.SUM, group)
        d = beta * js[:, 0] + (1.0 - beta) * js[:, 1]
        stats[:, _STAT_AUX] = js[:, 1]
    row = soft_coef * d if soft_coef != 0.0 else zero
    if has_hard:
        row = row + hard_weight * ((ms0 - g_label) + lz_h)
    if counted is not None:
        row = torch.where(counted, row, 0.0)
    return row, stats


class _VocabParallelKD(torch.autograd.Function):
    """kd_loss on vocabulary shards: the forward communicates, the backward is the local backward kernel."""

    @staticmethod
    def forward(ctx, student, teacher, labels, temperature, divergence, beta, ignore_index, soft_coef, hard_weight,
                reduction, group, start, end, vocab):
        lead = student.shape[:-1]
        local = local_labels(labels, ignore_index, start, end)
        kd_args = (temperature, divergence, beta, _LOCAL_IGNORE, soft_coef, hard_weight)
        part = ops.kd_loss_partial(student, teacher, local, *kd_args)
        has_hard = hard_weight != 0.0 and labels is not None
        row_loss, stats = merge_rows(
            part, label_logits(student, local) if has_hard else None,
            (labels != ignore_index).reshape(-1) if labels is not None else None,
            lambda st: ops.kd_loss_jsd_sums(student, teacher, st, temperature, beta), group=group,
            temperature=temperature, divergence=divergence, beta=beta, soft_coef=soft_coef, hard_weight=hard_weight,
            separate_hard=has_hard and temperature != 1.0)
        ctx.save_for_backward(student, teacher, local, stats)
        ctx.kd_args, ctx.reduction = kd_args, reduction
        shape = (*lead, vocab)
        ctx.divisor = 1 if reduction in ("sum", "none") else kd._divisor(shape, labels, ignore_index, reduction)
        return kd._reduce(row_loss, shape, labels, ignore_index, reduction)

    @staticmethod
    def backward(ctx, grad_loss):
        student, teacher, local, stats = ctx.saved_tensors
        grad_rows = kd._grad_rows(grad_loss, stats.shape[0], ctx.reduction, ctx.divisor)
        grad = torch.ops.fastdistill.kd_loss_backward(grad_rows.float().contiguous(), student, teacher, local, stats,
                                                      *ctx.kd_args)
        return (grad,) + (None,) * 13


def kd_loss_vocab_parallel(student, teacher, labels, *, temperature, divergence, beta, ignore_index, soft_coef,
                           hard_weight, reduction, group):
    """fastdistill.kd_loss(..., process_group=group) (see there)."""
    op = "fastdistill.kd_loss"
    error = None
    try:
        if student.dim() < 1 or teacher.dim() != student.dim() or teacher.shape[:-1] != student.shape[:-1]:
            raise ValueError(f"{op}: student and teacher shards must be (..., V_shard) with the same leading shape, "
                             f"got {list(student.shape)} and {list(teacher.shape)}")
        if labels is not None and (labels.dtype != torch.long or labels.shape != student.shape[:-1]):
            raise ValueError(f"{op}: labels must be int64 with the logits' leading shape {list(student.shape[:-1])}, "
                             f"got {labels.dtype} {list(labels.shape)}")
        if hard_weight != 0.0 and labels is None:
            raise ValueError(f"{op}: hard_weight={hard_weight} needs labels (got labels=None)")
    except ValueError as exc:
        error = str(exc)
    rows = math.prod(student.shape[:-1]) if student.dim() else 0
    width = lambda x: x.shape[-1] if x.dim() else 0  # noqa: E731
    start, end, vocab = agree_on_shards(op, group, student.device, error, rows, width(student), width(teacher),
                                        labels if error is None else None, ignore_index)
    return _VocabParallelKD.apply(student, teacher, labels, temperature, divergence, beta, ignore_index, soft_coef,
                                  hard_weight, reduction, group, start, end, vocab)


class _VocabParallelFusedLinear(torch.autograd.Function):
    """fused_linear_kd_loss on lm_head shards: chunked partial states, one merge, and the chunked backward."""

    @staticmethod
    def forward(ctx, h, w, b, th, tw, tb, tl, labels, temperature, divergence, beta, ignore_index, soft_coef,
                hard_weight, reduction, chunk, group, start, end, vocab):
        rows = h.shape[0]
        local = local_labels(labels, ignore_index, start, end)
        kd_args = (temperature, divergence, beta, _LOCAL_IGNORE, soft_coef, hard_weight)
        has_hard = hard_weight != 0.0 and labels is not None
        part = h.new_empty((rows, 8), dtype=torch.float32)
        label_logit = h.new_zeros((rows,), dtype=torch.float32) if has_hard else None
        w_mm, tw_mm = fl._gemm_operand(w), fl._gemm_operand(tw) if tw is not None else None
        for r0, r1, _, s, t in fl.chunk_logits(h, w_mm, b, th, tw_mm, tb, tl, chunk):
            lab = local[r0:r1] if local is not None else None
            part[r0:r1] = ops.kd_loss_partial(s, t, lab, *kd_args)
            if has_hard:
                label_logit[r0:r1] = label_logits(s, lab)

        def jsd_sums(stats):  # JSD's second pass: the chunks' logits again, with the merged log-sums
            out = h.new_empty((rows, 2), dtype=torch.float32)
            for r0, r1, _, s, t in fl.chunk_logits(h, w_mm, b, th, tw_mm, tb, tl, chunk):
                out[r0:r1] = ops.kd_loss_jsd_sums(s, t, stats[r0:r1], temperature, beta)
            return out

        row_loss, stats = merge_rows(
            part, label_logit, labels != ignore_index if labels is not None else None, jsd_sums, group=group,
            temperature=temperature, divergence=divergence, beta=beta, soft_coef=soft_coef, hard_weight=hard_weight,
            separate_hard=has_hard and temperature != 1.0)
        ctx.save_for_backward(h, w, b, th, tw, tb, tl, local, stats)
        ctx.kd_args, ctx.reduction, ctx.chunk = kd_args, reduction, chunk
        shape = (rows, vocab)
        ctx.divisor = 1 if reduction in ("sum", "none") else kd._divisor(shape, labels, ignore_index, reduction)
        return row_loss if reduction == "none" else kd._reduce(row_loss, shape, labels, ignore_index, reduction)

    @staticmethod
    def backward(ctx, grad_loss):
        h, w, b, th, tw, tb, tl, local, stats = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        grad_rows = kd._grad_rows(grad_loss, h.shape[0], ctx.reduction, ctx.divisor).float().contiguous()
        _, _, gh, gw, gb = fl._chunked(h, w, b, th, tw, tb, tl, None, None, local, ctx.kd_args, ctx.chunk, needs,
                                       grad_rows=grad_rows, stats=stats)
        grads = tuple(g.to(x.dtype) if need else None for g, x, need in zip((gh, gw, gb), (h, w, b), needs))
        return grads + (None,) * 17
