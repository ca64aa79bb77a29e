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

}  // namespace fastdistill
