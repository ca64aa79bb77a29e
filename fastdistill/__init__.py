"""fastdistill: fused distillation loss, 2:4 structured sparsity and int8 kernels for PyTorch.

Importing never fails because the compiled extension (or one device's kernels) is missing: the ops
then raise an error that says why when they are called (fastdistill/_ext.py)."""
from fastdistill import _ext
from fastdistill.convert import fold_batchnorm_
from fastdistill.distributed import vocab_shard
from fastdistill.export import from_sparse24_bitmask, load_compressed, save_compressed, to_sparse24_bitmask
from fastdistill.fused_linear import FusedLinearKDLoss, fused_linear_kd_loss
from fastdistill.isa import cpu_isa, set_cpu_isa
from fastdistill.loss import KDLoss, kd_loss
from fastdistill.prune import Calibration, calibrate, prune_2_4_
from fastdistill.quant import Int8Conv2d, Int8Linear, quantize_, quantize_per_channel, quantize_per_token
from fastdistill.recover import recover
from fastdistill.sparse import (SparseLinear, apply_2_4_masks, compress_2_4, decompress_2_4, from_cutlass_2_4,
                                prune_2_4, sparsify_, to_cutlass_2_4, to_semi_structured_2_4)
from fastdistill.topk import TeacherTopK

__version__ = "0.1.0"

__all__ = ["kd_loss", "KDLoss", "fused_linear_kd_loss", "FusedLinearKDLoss", "cpu_isa", "set_cpu_isa", "Int8Linear",
           "Int8Conv2d", "fold_batchnorm_", "quantize_", "quantize_per_channel", "quantize_per_token", "Calibration", "calibrate", "prune_2_4_",
           "SparseLinear", "apply_2_4_masks", "compress_2_4", "decompress_2_4", "from_cutlass_2_4", "prune_2_4",
           "sparsify_", "to_cutlass_2_4", "to_semi_structured_2_4", "save_compressed", "load_compressed",
           "to_sparse24_bitmask", "from_sparse24_bitmask", "recover", "vocab_shard", "TeacherTopK"]
