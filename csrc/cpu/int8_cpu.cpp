// CPU registration of the int8 ops: the CPU packed layout (cpu/int8_kernels.h), allocation, threading, and the
// kernel table of the ISA level in force. What the ops accept is glue/int8.h's.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>
#include <vector>

#include "cpu/int8_kernels.h"
#include "cpu/task_runner.h"
#include "glue/int8.h"

namespace fastdistill::cpu::int8 {
namespace {

using fastdistill::int8::as_rows;
using fastdistill::int8::float_dtype;
using fastdistill::int8::out_shape;

// bf16 activations take the native bf16 weight-only kernel from this many rows (below, the fp32 kernel's
// on-the-fly conversion streams the weights once per 6 rows and is as fast).
constexpr int64_t kBf16MinRows = 8;

// Tasks = (64-column panel) x (96-row tile), panel-major so consecutive tasks (one thread's share)
// reuse a panel of weights from cache. Each output element belongs to exactly one task, so the
// result does not depend on the thread count. A small problem runs on the calling thread (threads_for_work).
template <typename F>
void for_tiles(int64_t m, int64_t nblocks, int64_t k_pad, const F& f) {
  if (m == 0 || nblocks == 0) return;
  const int64_t panels = (nblocks + kPanelBlocks - 1) / kPanelBlocks;
  const int64_t tiles = (m + kTileRows - 1) / kTileRows;
  const int64_t threads = threads_for_work(double(m) * double(nblocks * kNB) * double(k_pad));
  const int64_t grain = (panels * tiles + threads - 1) / threads;
  at::parallel_for(0, panels * tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t p = t / tiles, mt = t % tiles;
      f(mt * kTileRows, std::min(m, (mt + 1) * kTileRows), p * kPanelBlocks,
        std::min(nblocks, (p + 1) * kPanelBlocks));
    }
  });
}

// Rows grain for cheap per-row passes.
int64_t row_grain(int64_t k) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1)); }

PackedHeader read_header(const char* op, const at::Tensor& packed) {
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.dim() == 1 && packed.is_contiguous(), "fastdistill.", op,
              ": w_packed must be a contiguous 1-D int8 tensor from fastdistill.int8_pack_weight, got ",
              packed.scalar_type(), " of shape ", packed.sizes());
  PackedHeader h{};
  TORCH_CHECK(packed.numel() >= kHeaderBytes, "fastdistill.", op,
              ": w_packed is too small to be a packed weight (", packed.numel(), " bytes)");
  std::memcpy(&h, packed.data_ptr<int8_t>(), sizeof(h));
  TORCH_CHECK(h.magic == kMagic && h.version == kVersion && h.n >= 0 && h.k >= 0 &&
                  h.n_pad == round_up(h.n, kNB) && h.k_pad == round_up(h.k, kKG) &&
                  packed.numel() == packed_bytes(h.n, h.k),
              "fastdistill.", op, ": w_packed is not a CPU packed int8 weight (bad header or size); "
              "build it with fastdistill.int8_pack_weight on the CPU");
  return h;
}

// The shared checks of int8_linear / int8_weight_only_linear, then the packed weight's; returns its header.
PackedHeader check_linear(const char* op, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                          const std::optional<at::Tensor>& bias) {
  fastdistill::int8::check_linear_inputs(op, x, packed, scales, bias);
  const PackedHeader h = read_header(op, packed);
  TORCH_CHECK(scales.size(0) == h.n, "fastdistill.", op, ": w_scales must have shape [N] = [", h.n,
              "] to match the weight, got ", scales.sizes());
  TORCH_CHECK(x.size(-1) == h.k, "fastdistill.", op, ": x must have K=", h.k,
              " columns to match the weight, got ", x.size(-1));
  fastdistill::int8::check_bias(op, bias, h.n);
  return h;
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& x_in) {
  const char* op = "quantize_per_token";
  fastdistill::int8::check_activations(op, x_in);
  const DType dt = float_dtype(op, "x", x_in);
  const at::Tensor x = x_in.contiguous();
  const int64_t k = x.size(-1), rows = k == 0 ? 0 : x.numel() / k;
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  at::Tensor s = at::zeros(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  if (rows == 0) return {q, s};
  QuantParams p;
  p.dtype = dt;
  p.x = x.data_ptr();
  p.rows = rows;
  p.ldx = p.k = p.k_pad = p.ldq = k;
  p.q = q.data_ptr<int8_t>();
  p.scales = s.data_ptr<float>();
  const Int8Kernels& kern = int8_kernels();
  at::parallel_for(0, rows, row_grain(k), [&](int64_t r0, int64_t r1) { kern.quantize_rows(p, r0, r1); });
  return {q, s};
}

std::tuple<at::Tensor, at::Tensor> quantize_per_channel(const at::Tensor& w_in) {
  fastdistill::int8::check_quantize_per_channel(w_in);
  const DType dt = float_dtype("quantize_per_channel", "w", w_in);
  const at::Tensor w = w_in.contiguous();
  const int64_t n = w.size(0), k = w.size(1);
  at::Tensor q = at::empty({n, k}, w.options().dtype(at::kChar));
  at::Tensor s = at::empty({n}, w.options().dtype(at::kFloat));
  std::atomic<bool> finite{true};
  at::parallel_for(0, n, row_grain(k), [&](int64_t r0, int64_t r1) {
    if (!quantize_channel_rows(dt, w.data_ptr(), k, k, q.data_ptr<int8_t>(), s.data_ptr<float>(), r0, r1))
      finite.store(false);
  });
  TORCH_CHECK(finite.load(), "fastdistill.quantize_per_channel: w contains NaN or Inf; cannot quantize a non-finite weight");
  return {q, s};
}

at::Tensor pack(const char* op, const at::Tensor& w_in) {
  fastdistill::int8::check_weight_int8(op, w_in);
  const at::Tensor w = w_in.contiguous();
  const int64_t n = w.size(0), k = w.size(1);
  TORCH_CHECK(k <= kMaxK, "fastdistill.", op, ": K must be at most ", kMaxK,
              " (int32 accumulation of int8 products), got ", k);
  at::Tensor packed = at::empty({packed_bytes(n, k)}, w.options());
  int8_t* out = packed.data_ptr<int8_t>();
  write_header(out, n, k);
  const int64_t nblocks = round_up(n, kNB) / kNB;
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    pack_blocks(w.data_ptr<int8_t>(), k, n, k, out, b0, b1);
  });
  return packed;
}

at::Tensor int8_pack_weight(const at::Tensor& w) { return pack("int8_pack_weight", w); }

at::Tensor int8_unpack_weight(const at::Tensor& packed, int64_t n, int64_t k) {
  const char* op = "int8_unpack_weight";
  const PackedHeader h = read_header(op, packed);
  TORCH_CHECK(h.n == n && h.k == k, "fastdistill.", op, ": w_packed holds a [", h.n, ", ", h.k,
              "] weight, but N=", n, " K=", k, " were given");
  at::Tensor w = at::empty({n, k}, packed.options());
  at::parallel_for(0, n, row_grain(k), [&](int64_t r0, int64_t r1) {
    unpack_rows(packed.data_ptr<int8_t>(), w.data_ptr<int8_t>(), r0, r1);
  });
  return w;
}

// Quantises x (M x K rows, contiguous) into the [M, k_pad] operand of the table's GEMM kernel and its [M] scales,
// in the calling thread's scratch (kept between calls at the largest size seen: no allocation per call beyond the
// output). The workers of the GEMM's parallel region only read it, while the caller waits.
struct Operand {
  const int8_t* a;
  const float* scales;
};
Operand quantize_operand(const Int8Kernels& kern, const at::Tensor& x2, DType dt, int64_t k_pad) {
  thread_local std::vector<int8_t> a;
  thread_local std::vector<float> scales;
  const int64_t m = x2.size(0), k = x2.size(1);
  if (int64_t(a.size()) < m * k_pad) a.resize(size_t(m * k_pad));
  if (int64_t(scales.size()) < m) scales.resize(size_t(m));
  QuantParams p;
  p.dtype = dt;
  p.x = x2.data_ptr();
  p.rows = m;
  p.ldx = p.k = k;
  p.k_pad = p.ldq = k_pad;
  p.q = a.data();
  p.scales = scales.data();
  p.xor_mask = kern.u8_activations ? 0x80 : 0;
  at::parallel_for(0, m, row_grain(k), [&](int64_t r0, int64_t r1) { kern.quantize_rows(p, r0, r1); });
  return {a.data(), scales.data()};
}

at::Tensor int8_linear(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& scales_in,
                       const std::optional<at::Tensor>& bias_in, c10::string_view activation,
                       std::optional<at::ScalarType> out_dtype) {
  const char* op = "int8_linear";
  const PackedHeader h = check_linear(op, x_in, packed, scales_in, bias_in);
  const DType dt = float_dtype(op, "x", x_in);
  const Activation act = fastdistill::int8::parse_activation(op, activation);
  const at::ScalarType ot = fastdistill::int8::out_scalar_type(op, x_in, out_dtype);
  const at::Tensor x2 = as_rows(x_in).contiguous();
  const int64_t m = x2.size(0);
  at::Tensor out = at::empty({m, h.n}, x_in.options().dtype(ot));
  if (m > 0 && h.n > 0) {
    const Int8Kernels& kern = int8_kernels_for_rows(m);
    const at::Tensor ws = scales_in.contiguous();
    at::Tensor bias;
    if (bias_in.has_value()) bias = bias_in->to(at::kFloat).contiguous();
    const Operand operand = quantize_operand(kern, x2, dt, h.k_pad);
    GemmParams p{};
    p.a = operand.a;
    p.lda = h.k_pad;
    p.shifted = kern.u8_activations;
    p.w = packed_data(packed.data_ptr<int8_t>(), h.n_pad);
    p.comp = packed_comp(packed.data_ptr<int8_t>());
    p.n = h.n;
    p.k_pad = h.k_pad;
    p.out = out.data_ptr();
    p.out_dtype = float_dtype(op, "out", out);
    p.ldo = h.n;
    p.x_scales = operand.scales;
    p.w_scales = ws.data_ptr<float>();
    p.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
    p.act = act;
    for_tiles(m, h.n_pad / kNB, h.k_pad, [&](int64_t m0, int64_t m1, int64_t b0, int64_t b1) { kern.gemm_s8(p, m0, m1, b0, b1); });
  }
  return out.view(out_shape(x_in, h.n));
}

at::Tensor int8_weight_only_linear(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& scales_in,
                                   const std::optional<at::Tensor>& bias_in) {
  const char* op = "int8_weight_only_linear";
  const PackedHeader h = check_linear(op, x_in, packed, scales_in, bias_in);
  const DType dt = float_dtype(op, "x", x_in);
  at::Tensor x2 = as_rows(x_in);
  const int64_t m = x2.size(0);
  at::Tensor out = at::empty({m, h.n}, x_in.options());
  if (m > 0 && h.n > 0) {
    const Int8Kernels& kern = int8_kernels();
    const bool bf16_path = dt == DType::bf16 && kern.gemm_wo_bf16 != nullptr && m >= kBf16MinRows;
    // k_pad columns, the padding zero (the packed weights' padding is 0; the activations' must be finite).
    const at::ScalarType op_type = bf16_path ? at::kBFloat16 : at::kFloat;
    if (h.k_pad != h.k) {
      at::Tensor xp = at::zeros({m, h.k_pad}, x2.options().dtype(op_type));
      xp.narrow(1, 0, h.k).copy_(x2);
      x2 = xp;
    } else {
      x2 = x2.to(op_type).contiguous();
    }
    const at::Tensor ws = scales_in.contiguous();
    at::Tensor bias;
    if (bias_in.has_value()) bias = bias_in->to(at::kFloat).contiguous();
    WoParams p{};
    p.x = bf16_path ? nullptr : x2.data_ptr<float>();
    p.xb = bf16_path ? reinterpret_cast<const bf16_t*>(x2.data_ptr()) : nullptr;
    p.ldx = h.k_pad;
    p.w = packed_data(packed.data_ptr<int8_t>(), h.n_pad);
    p.n = h.n;
    p.k_pad = h.k_pad;
    p.w_scales = ws.data_ptr<float>();
    p.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
    p.out = out.data_ptr();
    p.out_dtype = dt;
    p.ldo = h.n;
    const auto gemm = bf16_path ? kern.gemm_wo_bf16 : kern.gemm_wo;
    for_tiles(m, h.n_pad / kNB, h.k_pad, [&](int64_t m0, int64_t m1, int64_t b0, int64_t b1) { gemm(p, m0, m1, b0, b1); });
  }
  return out.view(out_shape(x_in, h.n));
}

at::Tensor int8_gemm_s32(const at::Tensor& x_in, const at::Tensor& w) {
  const char* op = "int8_gemm_s32";
  fastdistill::int8::check_gemm_s32_inputs(op, x_in, w);
  const at::Tensor packed = pack(op, w);
  const int64_t n = w.size(0), k = w.size(1), np = round_up(n, kNB), kp = round_up(k, kKG);
  const at::Tensor x2 = as_rows(x_in);
  const int64_t m = x2.size(0);
  const Int8Kernels& kern = int8_kernels_for_rows(m);
  at::Tensor a = at::zeros({m, kp}, x2.options());
  a.narrow(1, 0, k).copy_(x2);
  if (kern.u8_activations) a = a.bitwise_xor(-128);  // s8 -> u8 (+128), stored in the same bytes
  at::Tensor out = at::empty({m, n}, x2.options().dtype(at::kInt));
  GemmParams p{};
  p.a = a.data_ptr<int8_t>();
  p.lda = kp;
  p.shifted = kern.u8_activations;
  p.w = packed_data(packed.data_ptr<int8_t>(), np);
  p.comp = packed_comp(packed.data_ptr<int8_t>());
  p.n = n;
  p.k_pad = kp;
  p.out_s32 = out.data_ptr<int32_t>();
  p.ldo = n;
  for_tiles(m, np / kNB, kp, [&](int64_t m0, int64_t m1, int64_t b0, int64_t b1) { kern.gemm_s8(p, m0, m1, b0, b1); });
  return out.view(out_shape(x_in, n));
}

}  // namespace
}  // namespace fastdistill::cpu::int8

TORCH_LIBRARY_IMPL(fastdistill, CPU, m) {
  using namespace fastdistill::cpu::int8;
  m.impl("quantize_per_token", &quantize_per_token);
  m.impl("quantize_per_channel", &quantize_per_channel);
  m.impl("int8_pack_weight", &int8_pack_weight);
  m.impl("int8_unpack_weight", &int8_unpack_weight);
  m.impl("int8_linear", &int8_linear);
  m.impl("int8_weight_only_linear", &int8_weight_only_linear);
  m.impl("int8_gemm_s32", &int8_gemm_s32);
}
