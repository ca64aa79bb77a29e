// Large CPU output buffers (the logits gradient) that keep their pages between calls.
#pragma once
#include <ATen/ATen.h>

namespace fastdistill::cpu {

// Like at::empty, but for large sizes the memory is 2 MB-aligned, backed by transparent huge
// pages where the kernel allows it, and recycled through a small cache when the tensor dies, so a
// training loop does not pay a page fault per 4 KB of gradient on every step (the first touch of
// fresh memory costs more than the whole backward pass for vocab-sized tensors).
// FASTDISTILL_REUSE_BUFFERS=0 turns the cache off.
at::Tensor empty_reusable(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace fastdistill::cpu
