"""fastdistill: fused distillation loss, 2:4 structured sparsity and int8 kernels for PyTorch."""
from fastdistill import _ext
from fastdistill.loss import KDLoss, kd_loss
from fastdistill.isa import cpu_isa, set_cpu_isa

__version__ = "0.1.0"

__all__ = ["kd_loss", "KDLoss", "cpu_isa", "set_cpu_isa"]

# Each family is optional at import time: a missing piece never breaks `import fastdistill`.
try:
    from fastdistill.quant import Int8Linear, quantize_, quantize_per_channel, quantize_per_token  # noqa: F401
    __all__ += ["Int8Linear", "quantize_", "quantize_per_channel", "quantize_per_token"]
except ImportError:  # pragma: no cover - only while a family is absent from the source tree
    pass
try:
    from fastdistill.sparse import (SparseLinear, apply_2_4_masks, compress_2_4, decompress_2_4,  # noqa: F401
                                    from_cutlass_2_4, prune_2_4, sparsify_, to_cutlass_2_4)
    __all__ += ["SparseLinear", "apply_2_4_masks", "compress_2_4", "decompress_2_4", "from_cutlass_2_4",
                "prune_2_4", "sparsify_", "to_cutlass_2_4"]
except ImportError:  # pragma: no cover
    pass
