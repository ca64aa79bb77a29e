// The torch-facing layer of the top-k teacher loss, shared by every backend: what the ops accept and KdTopkParams.
#pragma once
#include <ATen/ATen.h>

#include <string>

#include "fastdistill/kd_topk.h"
#include "glue/kd_loss.h"

namespace fastdistill {

inline IndexType kd_topk_index_type(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kByte: return IndexType::u8;
    case at::kChar: return IndexType::i8;
    case at::kShort: return IndexType::i16;
    case at::kUInt16: return IndexType::u16;
    case at::kInt: return IndexType::i32;
    case at::kLong: return IndexType::i64;
    default:
      TORCH_CHECK(false, "fastdistill.kd_loss: teacher_topk indices must be an integer tensor (int64, int32, int16, "
                  "uint16, int8 or uint8), got ", x.scalar_type());
  }
}

inline TopkTail kd_topk_tail(const std::string& name, Divergence d) {
  TopkTail t;
  if (name == "bucket") t = TopkTail::bucket;
  else if (name == "renormalize") t = TopkTail::renormalize;
  else TORCH_CHECK(false, "fastdistill.kd_loss: topk_tail must be 'bucket' or 'renormalize', got '", name, "'");
  TORCH_CHECK(t == TopkTail::bucket || d == Divergence::forward_kl,
              "fastdistill.kd_loss: topk_tail='renormalize' is defined for divergence='forward_kl' only");
  return t;
}

struct KdTopkArgs {
  KdLossArgs kd;
  at::Tensor indices, logprobs;
  KdTopkParams params;
};

inline KdTopkArgs kd_topk_args(const at::Tensor& student, const at::Tensor& indices, const at::Tensor& logprobs,
                               const std::optional<at::Tensor>& labels, double temperature,
                               const std::string& divergence, double beta, int64_t ignore_index, double soft_coef,
                               double hard_weight, const std::string& tail) {
  KdTopkArgs a;
  // The student's checks are kd_loss's; passed as its own teacher, the teacher's checks hold trivially and its
  // pointer is dropped below (a top-k op never reads it).
  a.kd = kd_loss_args(student, student, labels, temperature, divergence, beta, ignore_index, soft_coef, hard_weight);
  KdTopkParams& p = a.params;
  p.kd = a.kd.params;
  p.kd.teacher = nullptr;
  p.tail = kd_topk_tail(tail, p.kd.divergence);
  p.index_type = kd_topk_index_type(indices);
  TORCH_CHECK(logprobs.scalar_type() == at::kFloat || logprobs.scalar_type() == at::kBFloat16 ||
                  logprobs.scalar_type() == at::kHalf,
              "fastdistill.kd_loss: teacher_topk logprobs must be float32, bfloat16 or float16, got ",
              logprobs.scalar_type());
  p.logprob_dtype = kd_dtype(logprobs, "teacher_topk log-prob");
  const auto lead = student.sizes().slice(0, student.dim() - 1);
  TORCH_CHECK(indices.sizes() == logprobs.sizes() && indices.dim() == student.dim() &&
                  indices.sizes().slice(0, indices.dim() - 1) == lead,
              "fastdistill.kd_loss: teacher_topk indices and logprobs must both be (..., k) with the logits' leading "
              "shape ", lead, ", got ", indices.sizes(), " and ", logprobs.sizes());
  TORCH_CHECK(indices.device() == student.device() && logprobs.device() == student.device(),
              "fastdistill.kd_loss: teacher_topk must be on the logits' device ", student.device(), ", got ",
              indices.device(), " and ", logprobs.device());
  a.indices = indices.contiguous();
  a.logprobs = logprobs.contiguous();
  p.k = indices.size(-1);
  p.indices = a.indices.data_ptr();
  p.logprobs = a.logprobs.data_ptr();
  return a;
}

// ---- GPU (CUDA and the emulator) ----
inline int kd_topk_gpu_threads(const GpuBackend& b, const KdTopkParams& p) {
  return kd::kd_launch_config(p.kd.rows, p.kd.vocab, 1, b.kd_threads, 1, b.multiprocessors).threads;
}

inline void kd_topk_check_gpu(const KdTopkParams& p) {
  TORCH_CHECK(p.kd.vocab <= kd::kTopkMaxVocabGpu, "fastdistill.kd_loss: teacher_topk on a GPU supports a vocabulary "
              "of at most ", kd::kTopkMaxVocabGpu, ", got ", p.kd.vocab);
}

inline std::tuple<at::Tensor, at::Tensor> kd_topk_forward_gpu(
    const GpuBackend& b, const at::Tensor& student, const at::Tensor& indices, const at::Tensor& logprobs,
    const std::optional<at::Tensor>& labels, double temperature, const std::string& divergence, double beta,
    int64_t ignore_index, double soft_coef, double hard_weight, const std::string& tail) {
  const KdTopkArgs a = kd_topk_args(student, indices, logprobs, labels, temperature, divergence, beta, ignore_index,
                                    soft_coef, hard_weight, tail);
  const KdTopkParams& p = a.params;
  kd_topk_check_gpu(p);
  auto f32 = student.options().dtype(at::kFloat);
  at::Tensor row_loss = at::empty({p.kd.rows}, f32), stats = at::empty({p.kd.rows, kNumStats}, f32);
  if (p.kd.rows == 0) return {row_loss, stats};
  kd::gpu::topk_forward(p, row_loss.data_ptr<float>(), stats.data_ptr<float>(), kd_topk_gpu_threads(b, p), b.stream);
  b.launched();
  return {row_loss, stats};
}

inline at::Tensor kd_topk_backward_gpu(const GpuBackend& b, const at::Tensor& grad_rows, const at::Tensor& student,
                                       const at::Tensor& indices, const at::Tensor& logprobs,
                                       const std::optional<at::Tensor>& labels, const at::Tensor& stats,
                                       double temperature, const std::string& divergence, double beta,
                                       int64_t ignore_index, double soft_coef, double hard_weight,
                                       const std::string& tail) {
  const KdTopkArgs a = kd_topk_args(student, indices, logprobs, labels, temperature, divergence, beta, ignore_index,
                                    soft_coef, hard_weight, tail);
  const KdTopkParams& p = a.params;
  kd_topk_check_gpu(p);
  kd_check_backward(grad_rows, stats, p.kd, student.device());
  const at::Tensor g = grad_rows.contiguous(), st = stats.contiguous();
  at::Tensor grad = at::empty(student.sizes(), student.options().memory_format(at::MemoryFormat::Contiguous));
  if (p.kd.rows == 0) return grad;
  kd::gpu::topk_backward(p, g.data_ptr<float>(), st.data_ptr<float>(), grad.data_ptr(), kd_topk_gpu_threads(b, p),
                         b.stream);
  b.launched();
  return grad;
}

}  // namespace fastdistill
