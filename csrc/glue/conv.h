// The torch-facing layer of the int8 Conv2d ops, shared by every backend: what the ops accept. Only the CPU
// registers them today (cpu/conv_cpu.cpp); on other devices the Python wrappers say so (fastdistill/ops.py).
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "glue/int8.h"

namespace fastdistill::conv {

struct ConvGeometry {
  int64_t kh, kw, sh, sw, ph, pw, dh, dw, groups;
  int64_t oh, ow;
};

inline void check_pair(const char* op, const char* what, at::IntArrayRef v, int64_t min) {
  TORCH_CHECK(v.size() == 2 && v[0] >= min && v[1] >= min, "fastdistill.", op, ": ", what, " must be 2 integers >= ",
              min, ", got ", v);
}

// x [N, C, H, W] float; weights and their scales on x's device; the output size from the geometry.
inline ConvGeometry check_conv_inputs(const char* op, const at::Tensor& x, const at::Tensor& w_packed,
                                      const at::Tensor& w_scales, const std::optional<at::Tensor>& bias,
                                      const std::optional<at::Tensor>& x_scale, at::IntArrayRef kernel_size,
                                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                      int64_t groups) {
  TORCH_CHECK(x.dim() == 4, "fastdistill.", op, ": x must be 4-D [N, C, H, W], got shape ", x.sizes());
  fastdistill::int8::check_linear_inputs(op, x, w_packed, w_scales, bias);
  check_pair(op, "kernel_size", kernel_size, 1);
  check_pair(op, "stride", stride, 1);
  check_pair(op, "padding", padding, 0);
  check_pair(op, "dilation", dilation, 1);
  TORCH_CHECK(groups >= 1, "fastdistill.", op, ": groups must be >= 1, got ", groups);
  if (x_scale.has_value()) {
    fastdistill::int8::check_same_device(op, "x_scale", *x_scale, x);
    TORCH_CHECK(x_scale->scalar_type() == at::kFloat && x_scale->numel() == 1, "fastdistill.", op,
                ": x_scale must be a float32 tensor of 1 element (the static per-tensor activation scale), got ",
                x_scale->scalar_type(), " of shape ", x_scale->sizes());
  }
  ConvGeometry g{kernel_size[0], kernel_size[1], stride[0], stride[1], padding[0], padding[1], dilation[0],
                 dilation[1], groups, 0, 0};
  const int64_t eh = g.dh * (g.kh - 1) + 1, ew = g.dw * (g.kw - 1) + 1;
  const int64_t hp = x.size(2) + 2 * g.ph, wp = x.size(3) + 2 * g.pw;
  TORCH_CHECK(hp >= eh && wp >= ew, "fastdistill.", op, ": the padded input (", hp, " x ", wp,
              ") is smaller than the dilated kernel (", eh, " x ", ew, ")");
  g.oh = (hp - eh) / g.sh + 1;
  g.ow = (wp - ew) / g.sw + 1;
  return g;
}

inline void check_residual(const char* op, const std::optional<at::Tensor>& residual, const at::Tensor& x,
                           at::IntArrayRef out_shape) {
  if (!residual.has_value()) return;
  fastdistill::int8::check_same_device(op, "residual", *residual, x);
  TORCH_CHECK(residual->scalar_type() == x.scalar_type(), "fastdistill.", op, ": residual must have x's dtype ",
              x.scalar_type(), ", got ", residual->scalar_type());
  TORCH_CHECK(residual->sizes() == out_shape, "fastdistill.", op, ": residual must have the output's shape ",
              out_shape, ", got ", residual->sizes());
}

}  // namespace fastdistill::conv
