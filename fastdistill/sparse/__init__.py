"""2:4 structured sparsity: the canonical compressed format (format.py), the SparseLinear and
SparseInt8Linear drop-ins with sparsify_ (modules.py), and mask-preserving fine-tuning (finetune.py)."""
from fastdistill.sparse.finetune import MaskHandle, apply_2_4_masks
from fastdistill.sparse.format import (compress_2_4, decompress_2_4, from_cutlass_2_4, prune_2_4, to_cutlass_2_4,
                                       to_semi_structured_2_4)
from fastdistill.sparse.modules import SparseInt8Linear, SparseLinear, sparsify_

__all__ = ["prune_2_4", "compress_2_4", "decompress_2_4", "to_cutlass_2_4", "from_cutlass_2_4", "to_semi_structured_2_4",
           "SparseLinear", "SparseInt8Linear", "sparsify_", "apply_2_4_masks", "MaskHandle"]
