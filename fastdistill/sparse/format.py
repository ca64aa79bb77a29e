"""The canonical 2:4 format and conversions to and from it.

Canonical format (what state_dict stores): values [N, K/2] in the weight dtype, the 2 kept entries of
every group of 4 columns in ascending column order, and meta uint8 [N, ceil(K/8)]: per group the
4-bit code idx0 | idx1 << 2 (idx0 < idx1), two groups per byte, low nibble first (when K % 8 == 4
the last byte's high nibble is 0). A group with fewer than 2 nonzeros still names 2 positions and
stores zeros there.
"""
import warnings
from typing import Optional

import torch

def check_k(k: int, where: str):
    if k % 4 != 0:
        raise ValueError(f"fastdistill.{where}: 2:4 sparsity needs K (in_features, the number of columns) to be "
                         f"a multiple of 4, got K={k}")


def _check_2d(t: torch.Tensor, what: str, where: str):
    if t.dim() != 2:
        raise ValueError(f"fastdistill.{where}: {what} must be 2-D [N, K], got shape {list(t.shape)}")


def prune_2_4(weight: torch.Tensor, scores: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Bool mask keeping, in every group of 4 consecutive columns, the 2 entries with the largest |w|
    (or the largest `scores`, same shape as weight)."""
    k = weight.shape[-1]
    check_k(k, "prune_2_4")
    if scores is None:
        scores = weight.detach().abs()
    elif scores.shape != weight.shape:
        raise ValueError(f"fastdistill.prune_2_4: scores must have the weight's shape {list(weight.shape)}, "
                         f"got {list(scores.shape)}")
    s = scores.detach().float().reshape(-1, k // 4, 4)
    keep = s.topk(2, dim=-1).indices
    mask = torch.zeros(s.shape, dtype=torch.bool, device=weight.device).scatter_(-1, keep, True)
    return mask.reshape(weight.shape)


def compress_2_4(weight: torch.Tensor, mask: Optional[torch.Tensor] = None):
    """[N, K] weight (+ 2:4 bool mask; default prune_2_4(weight)) -> (values [N, K/2], meta uint8 [N, ceil(K/8)])."""
    _check_2d(weight, "weight", "compress_2_4")
    n, k = weight.shape
    check_k(k, "compress_2_4")
    if mask is None:
        mask = prune_2_4(weight)
    else:
        if mask.shape != weight.shape:
            raise ValueError(f"fastdistill.compress_2_4: mask must have the weight's shape {list(weight.shape)}, "
                             f"got {list(mask.shape)}")
        mask = mask.to(device=weight.device, dtype=torch.bool)
    g = k // 4
    m = mask.reshape(n, g, 4)
    kept = m.sum(-1)
    if bool((kept > 2).any()):
        r, grp = (kept > 2).nonzero()[0].tolist()
        raise ValueError(f"fastdistill.compress_2_4: mask is not 2:4: row {r}, columns {4 * grp}..{4 * grp + 3} keep "
                         f"{int(kept[r, grp])} of 4 (at most 2 allowed)")
    # Kept positions first, then the lowest free positions for groups with fewer than 2 kept.
    key = m.to(torch.int8) * 4 + (3 - torch.arange(4, device=weight.device, dtype=torch.int8))
    sel = key.topk(2, dim=-1).indices.sort(dim=-1).values  # [n, g, 2], ascending
    w = torch.where(mask, weight.detach(), torch.zeros((), dtype=weight.dtype, device=weight.device))
    values = w.reshape(n, g, 4).gather(-1, sel).reshape(n, k // 2).contiguous()
    codes = (sel[..., 0] | (sel[..., 1] << 2)).to(torch.uint8)  # [n, g]
    if g % 2:
        codes = torch.cat([codes, codes.new_zeros(n, 1)], dim=1)
    meta = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
    return values, meta


def check_format(values: torch.Tensor, meta: torch.Tensor, where: str) -> int:
    if values.dim() != 2:
        raise ValueError(f"fastdistill.{where}: values must be 2-D [N, K/2], got shape {list(values.shape)}")
    n, k = values.shape[0], 2 * values.shape[1]
    check_k(k, where)
    if meta.dtype != torch.uint8:
        raise ValueError(f"fastdistill.{where}: meta must be uint8, got {meta.dtype}")
    if tuple(meta.shape) != (n, (k + 7) // 8):
        raise ValueError(f"fastdistill.{where}: meta must be [N, ceil(K/8)] = [{n}, {(k + 7) // 8}] for values "
                         f"{list(values.shape)}, got {list(meta.shape)}")
    return k


def decompress_2_4(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """(values [N, K/2], meta [N, ceil(K/8)]) -> the dense [N, K] weight (zeros where pruned)."""
    k = check_format(values, meta, "decompress_2_4")
    n, g = values.shape[0], k // 4
    codes = torch.stack([meta & 15, meta >> 4], dim=-1).reshape(n, -1)
    if codes.shape[1] > g and bool((codes[:, g:] != 0).any()):
        raise ValueError("fastdistill.decompress_2_4: meta is invalid: the unused high nibble of the last byte "
                         "(K % 8 == 4) must be 0")
    codes = codes[:, :g]
    i0, i1 = (codes & 3).long(), (codes >> 2).long()
    if bool((i0 >= i1).any()):
        r, grp = (i0 >= i1).nonzero()[0].tolist()
        raise ValueError(f"fastdistill.decompress_2_4: meta is invalid: row {r}, group {grp} has code "
                         f"{int(codes[r, grp])} (needs idx0 < idx1)")
    dense = torch.zeros(n, g, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, torch.stack([i0, i1], dim=-1), values.reshape(n, g, 2))
    return dense.reshape(n, k)


def _cutlass():
    try:
        from torch.sparse import _semi_structured_conversions as conv
    except ImportError as exc:  # pragma: no cover
        raise RuntimeError(f"fastdistill: this torch has no semi-structured (CUTLASS) conversions ({exc})") from exc
    return conv


def to_cutlass_2_4(values: torch.Tensor, meta: torch.Tensor):
    """Canonical 2:4 -> PyTorch's CUTLASS semi-structured layout (sparse, meta_reordered), exactly what
    torch.sparse._semi_structured_conversions.sparse_semi_structured_from_dense_cutlass gives for the
    dense weight (its shape rules apply: rows % 32 == 0 and K % 16 == 0 for 16-bit values, rows % 16 == 0
    and K % 32 == 0 for int8). float32 is refused: its CUTLASS layout is 1:2, not 2:4."""
    if values.dtype == torch.float32:
        raise TypeError("fastdistill.to_cutlass_2_4: PyTorch's CUTLASS semi-structured layout for float32 is 1:2 "
                        "(pairs), which cannot hold a 2:4 weight; convert the values to bfloat16, float16 or int8")
    return _cutlass().sparse_semi_structured_from_dense_cutlass(decompress_2_4(values, meta))


def from_cutlass_2_4(sparse: torch.Tensor, meta_reordered: torch.Tensor):
    """PyTorch's CUTLASS semi-structured layout -> canonical (values, meta)."""
    dense = _cutlass().sparse_semi_structured_to_dense_cutlass(sparse, meta_reordered)
    return compress_2_4(dense, mask=dense != 0)


def semi_structured_shape_ok(n: int, k: int) -> bool:
    # CUTLASS bf16/fp16 constraints in torch.sparse.semi_structured (cuSPARSELt's are looser)
    return n >= 32 and n % 32 == 0 and k >= 64 and k % 64 == 0


def to_semi_structured_2_4(values: torch.Tensor, meta: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Canonical 2:4 -> a torch.sparse SparseSemiStructuredTensor for F.linear. backend "cutlass" builds it
    from to_cutlass_2_4 (runs on any device); "cusparselt" compresses the dense weight with cuSPARSELt (CUDA
    only); "auto" takes cuSPARSELt where torch has it and the weight is on CUDA."""
    from torch.sparse import semi_structured as ss
    if backend not in ("auto", "cutlass", "cusparselt"):
        raise ValueError(f"fastdistill.to_semi_structured_2_4: backend must be 'auto', 'cutlass' or 'cusparselt', "
                         f"got {backend!r}")
    k = check_format(values, meta, "to_semi_structured_2_4")
    if values.dtype not in (torch.bfloat16, torch.float16, torch.int8):
        raise TypeError(f"fastdistill.to_semi_structured_2_4: values must be bfloat16, float16 or int8 (torch's "
                        f"float32 semi-structured layout is 1:2, not 2:4), got {values.dtype}")
    if backend == "cusparselt" and not values.is_cuda:
        raise ValueError(f"fastdistill.to_semi_structured_2_4: backend 'cusparselt' needs CUDA tensors, got values "
                         f"on {values.device} (backend 'cutlass' runs on any device)")
    if backend == "auto":
        backend = "cusparselt" if values.is_cuda and torch.backends.cusparselt.is_available() else "cutlass"
    with warnings.catch_warnings():  # torch warns once that the subclass is a prototype
        warnings.simplefilter("ignore", UserWarning)
        if backend == "cusparselt":
            return ss.SparseSemiStructuredTensorCUSPARSELT.from_dense(decompress_2_4(values, meta))
        packed, meta_reordered = to_cutlass_2_4(values, meta)
        return ss.SparseSemiStructuredTensorCUTLASS(torch.Size((values.shape[0], k)), packed=packed,
                                                    meta=meta_reordered, packed_t=None, meta_t=None,
                                                    compressed_swizzled_bitmask=None)


def default_meta(n: int, k: int, device=None) -> torch.Tensor:
    """Meta for an all-zero weight: every group names columns 0 and 1."""
    meta = torch.full((n, (k + 7) // 8), 0x44, dtype=torch.uint8, device=device)
    if k % 8 == 4 and meta.numel():
        meta[:, -1] = 0x04
    return meta
