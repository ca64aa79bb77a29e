// The torch-facing layer of the distillation loss, shared by the CPU, CUDA and emulator registrations: what
// the ops accept (argument checks, dtype rules, KdLossParams), and the GPU allocation and launch sequence.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>

#include "fastdistill/kd_loss.h"
#include "glue/gpu.h"

namespace fastdistill {

inline DType kd_dtype(const at::Tensor& x, const char* what) {
  switch (x.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kBFloat16: return DType::bf16;
    case at::kHalf: return DType::f16;
    default:
      TORCH_CHECK(false, "fastdistill.kd_loss: ", what, " logits must be float32, bfloat16 or float16, got ",
                  x.scalar_type());
  }
}

// Rows of a (..., V) tensor with unit stride on V, or nullopt if the leading dims cannot be
// described by RowLayout's two levels (the caller then makes the tensor contiguous).
inline std::optional<RowLayout> kd_row_layout(const at::Tensor& x) {
  if (x.dim() == 0 || x.stride(-1) != 1) return std::nullopt;
  std::vector<std::pair<int64_t, int64_t>> dims;  // (size, stride), outermost first, coalesced
  for (int64_t d = 0; d + 1 < x.dim(); ++d) {
    if (x.size(d) == 1) continue;
    if (!dims.empty() && dims.back().second == x.stride(d) * x.size(d)) {
      dims.back() = {dims.back().first * x.size(d), x.stride(d)};
    } else {
      dims.emplace_back(x.size(d), x.stride(d));
    }
  }
  RowLayout r;
  if (dims.empty()) return r;
  if (dims.size() == 1) {
    r.inner = dims[0].first;
    r.stride_inner = dims[0].second;
    return r;
  }
  if (dims.size() == 2) {
    r.inner = dims[1].first;
    r.stride_inner = dims[1].second;
    r.stride_outer = dims[0].second;
    return r;
  }
  return std::nullopt;
}

inline Divergence kd_divergence(const std::string& name, double beta) {
  TORCH_CHECK(beta >= 0.0 && beta <= 1.0, "fastdistill.kd_loss: beta must be in [0, 1], got ", beta);
  if (name == "forward_kl") return Divergence::forward_kl;
  if (name == "reverse_kl") return Divergence::reverse_kl;
  if (name == "jsd") {
    // The convention: beta = 0 is exactly forward KL(p||q), beta = 1 exactly reverse KL(q||p).
    if (beta == 0.0) return Divergence::forward_kl;
    if (beta == 1.0) return Divergence::reverse_kl;
    return Divergence::jsd;
  }
  TORCH_CHECK(false, "fastdistill.kd_loss: divergence must be 'forward_kl', 'reverse_kl' or 'jsd', got '", name, "'");
}

// Validated inputs of one kd_loss op call. Tensors that had to be copied are kept alive here.
struct KdLossArgs {
  at::Tensor student, teacher, labels;
  KdLossParams params;
};

inline KdLossArgs kd_loss_args(const at::Tensor& student, const at::Tensor& teacher,
                               const std::optional<at::Tensor>& labels, double temperature,
                               const std::string& divergence, double beta, int64_t ignore_index,
                               double soft_coef, double hard_weight) {
  TORCH_CHECK(student.dim() >= 1, "fastdistill.kd_loss: logits must have at least 1 dim (..., V), got a scalar");
  TORCH_CHECK(student.sizes() == teacher.sizes(), "fastdistill.kd_loss: student and teacher must have the same shape, got ",
              student.sizes(), " and ", teacher.sizes());
  TORCH_CHECK(student.device() == teacher.device(), "fastdistill.kd_loss: student and teacher must be on the same device, got ",
              student.device(), " and ", teacher.device());
  TORCH_CHECK(student.size(-1) >= 1, "fastdistill.kd_loss: the vocabulary (last) dim must be >= 1, got ", student.sizes());
  KdLossArgs a;
  KdLossParams& p = a.params;
  p.student_dtype = kd_dtype(student, "student");
  p.teacher_dtype = kd_dtype(teacher, "teacher");
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0,
              "fastdistill.kd_loss: temperature must be a finite number > 0, got ", temperature);
  p.divergence = kd_divergence(divergence, beta);
  TORCH_CHECK(std::isfinite(soft_coef) && std::isfinite(hard_weight),
              "fastdistill.kd_loss: soft_weight and hard_weight must be finite, got ", soft_coef, " and ", hard_weight);
  TORCH_CHECK(hard_weight == 0.0 || labels.has_value(),
              "fastdistill.kd_loss: hard_weight=", hard_weight, " needs labels (got labels=None)");
  p.vocab = student.size(-1);
  p.rows = student.numel() / p.vocab;
  auto rows_of = [](const at::Tensor& x, at::Tensor& keep, RowLayout& layout) {
    auto l = kd_row_layout(x);
    keep = l ? x : x.contiguous();
    layout = l ? *l : *kd_row_layout(keep);
  };
  rows_of(student, a.student, p.student_rows);
  rows_of(teacher, a.teacher, p.teacher_rows);
  p.student = a.student.data_ptr();
  p.teacher = a.teacher.data_ptr();
  if (labels.has_value()) {
    const at::Tensor& l = *labels;
    TORCH_CHECK(l.scalar_type() == at::kLong, "fastdistill.kd_loss: labels must be int64 (torch.long), got ", l.scalar_type());
    TORCH_CHECK(l.sizes() == student.sizes().slice(0, student.dim() - 1),
                "fastdistill.kd_loss: labels must have the logits' leading shape ", student.sizes().slice(0, student.dim() - 1),
                ", got ", l.sizes());
    TORCH_CHECK(l.device() == student.device(), "fastdistill.kd_loss: labels must be on the logits' device ",
                student.device(), ", got ", l.device());
    a.labels = l.contiguous();
    p.labels = a.labels.data_ptr<int64_t>();
  }
  p.ignore_index = ignore_index;
  p.temperature = float(temperature);
  p.inv_temperature = float(1.0 / temperature);
  p.beta = float(beta);
  p.soft_coef = float(soft_coef);
  p.hard_weight = float(hard_weight);
  return a;
}

// Labels in [0, V) or ignore_index: a host-side check (CPU tensors; CUDA kernels assert on the device instead).
inline void kd_check_labels(const KdLossParams& p) {
  if (!p.labels) return;
  for (int64_t r = 0; r < p.rows; ++r) {
    const int64_t l = p.labels[r];
    TORCH_CHECK(l == p.ignore_index || (l >= 0 && l < p.vocab), "fastdistill.kd_loss: labels must be in [0, ",
                p.vocab, ") or ignore_index (", p.ignore_index, "), got ", l, " at row ", r);
  }
}

// The backward's extra inputs: d loss / d row_loss and the forward's statistics.
inline void kd_check_backward(const at::Tensor& grad_rows, const at::Tensor& stats, const KdLossParams& p,
                              const at::Device& dev) {
  TORCH_CHECK(grad_rows.scalar_type() == at::kFloat && grad_rows.numel() == p.rows,
              "fastdistill.kd_loss_backward: grad_rows must be float32 with ", p.rows, " elements, got ",
              grad_rows.scalar_type(), " ", grad_rows.sizes());
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.sizes() == at::IntArrayRef({p.rows, kNumStats}),
              "fastdistill.kd_loss_backward: stats must be float32 [", p.rows, ", ", int(kNumStats), "], got ",
              stats.scalar_type(), " ", stats.sizes());
  TORCH_CHECK(grad_rows.device() == dev && stats.device() == dev,
              "fastdistill.kd_loss_backward: grad_rows and stats must be on the logits' device ", dev, ", got ",
              grad_rows.device(), " and ", stats.device());
}

// ---- vocab-parallel shards (fastdistill/distributed.py) ----
// kd_loss_jsd_sums's inputs: the shard's logits and the merged statistics of the whole vocabulary.
inline KdLossArgs kd_jsd_sums_args(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& stats,
                                   double temperature, double beta) {
  KdLossArgs a = kd_loss_args(student, teacher, std::nullopt, temperature, "jsd", beta, -100, 1.0, 0.0);
  const KdLossParams& p = a.params;
  TORCH_CHECK(p.divergence == Divergence::jsd, "fastdistill.kd_loss_jsd_sums: beta must be in (0, 1), got ", beta);
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.sizes() == at::IntArrayRef({p.rows, kNumStats}) &&
                  stats.device() == student.device(),
              "fastdistill.kd_loss_jsd_sums: stats must be float32 [", p.rows, ", ", int(kNumStats),
              "] on the logits' device, got ", stats.scalar_type(), " ", stats.sizes(), " on ", stats.device());
  return a;
}

// ---- GPU (CUDA and the emulator) ----
inline kd::KdLaunchConfig kd_gpu_config(const GpuBackend& b, const KdLossParams& p) {
  return kd::kd_launch_config(p.rows, p.vocab, kd::kd_vec_for(p.student_dtype, p.teacher_dtype), b.kd_threads,
                              b.kd_splits, b.multiprocessors);
}

inline std::tuple<at::Tensor, at::Tensor> kd_loss_forward_gpu(const GpuBackend& b, const at::Tensor& student,
                                                               const at::Tensor& teacher,
                                                               const std::optional<at::Tensor>& labels,
                                                               double temperature, const std::string& divergence,
                                                               double beta, int64_t ignore_index, double soft_coef,
                                                               double hard_weight) {
  const KdLossArgs a = kd_loss_args(student, teacher, labels, temperature, divergence, beta, ignore_index, soft_coef,
                                    hard_weight);
  const KdLossParams& p = a.params;
  auto f32 = student.options().dtype(at::kFloat);
  at::Tensor row_loss = at::empty({p.rows}, f32), stats = at::empty({p.rows, kNumStats}, f32);
  if (p.rows == 0) return {row_loss, stats};
  const kd::KdLaunchConfig c = kd_gpu_config(b, p);
  at::Tensor ws = at::empty({kd::kd_forward_workspace_floats(p.rows, c.splits)}, f32);
  kd::gpu::forward(p, row_loss.data_ptr<float>(), stats.data_ptr<float>(), ws.data_ptr<float>(), c, b.stream);
  b.launched();
  return {row_loss, stats};
}

inline at::Tensor kd_loss_backward_gpu(const GpuBackend& b, const at::Tensor& grad_rows, const at::Tensor& student,
                                       const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
                                       const at::Tensor& stats, double temperature, const std::string& divergence,
                                       double beta, int64_t ignore_index, double soft_coef, double hard_weight) {
  const KdLossArgs a = kd_loss_args(student, teacher, labels, temperature, divergence, beta, ignore_index, soft_coef,
                                    hard_weight);
  const KdLossParams& p = a.params;
  kd_check_backward(grad_rows, stats, p, student.device());
  const at::Tensor g = grad_rows.contiguous(), st = stats.contiguous();
  at::Tensor grad = at::empty(student.sizes(), student.options().memory_format(at::MemoryFormat::Contiguous));
  if (p.rows == 0) return grad;
  kd::gpu::backward(p, g.data_ptr<float>(), st.data_ptr<float>(), grad.data_ptr(), kd_gpu_config(b, p), b.stream);
  b.launched();
  return grad;
}

// ---- vocab-parallel shards on the GPU ----
inline at::Tensor kd_loss_partial_gpu(const GpuBackend& b, const at::Tensor& student, const at::Tensor& teacher,
                                      const std::optional<at::Tensor>& labels, double temperature,
                                      const std::string& divergence, double beta, int64_t ignore_index,
                                      double soft_coef, double hard_weight) {
  const KdLossArgs a = kd_loss_args(student, teacher, labels, temperature, divergence, beta, ignore_index, soft_coef,
                                    hard_weight);
  const KdLossParams& p = a.params;
  auto f32 = student.options().dtype(at::kFloat);
  at::Tensor out = at::empty({p.rows, kNumPartial}, f32);
  if (p.rows == 0) return out;
  const kd::KdLaunchConfig c = kd_gpu_config(b, p);
  at::Tensor ws = at::empty({kd::kd_forward_workspace_floats(p.rows, c.splits)}, f32);
  kd::gpu::partial(p, out.data_ptr<float>(), ws.data_ptr<float>(), c, b.stream);
  b.launched();
  return out;
}

inline at::Tensor kd_loss_jsd_sums_gpu(const GpuBackend& b, const at::Tensor& student, const at::Tensor& teacher,
                                       const at::Tensor& stats, double temperature, double beta) {
  const KdLossArgs a = kd_jsd_sums_args(student, teacher, stats, temperature, beta);
  const KdLossParams& p = a.params;
  auto f32 = student.options().dtype(at::kFloat);
  at::Tensor out = at::empty({p.rows, 2}, f32);
  if (p.rows == 0) return out;
  const kd::KdLaunchConfig c = kd_gpu_config(b, p);
  at::Tensor ws = at::empty({kd::kd_forward_workspace_floats(p.rows, c.splits)}, f32);
  const at::Tensor st = stats.contiguous();
  kd::gpu::jsd_sums(p, st.data_ptr<float>(), out.data_ptr<float>(), ws.data_ptr<float>(), c, b.stream);
  b.launched();
  return out;
}

}  // namespace fastdistill
