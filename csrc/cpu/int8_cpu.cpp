// int8 quantized inference: CPU torch glue (checks, allocation, dtype and ISA dispatch, threads).
// Kernels: int8_avx512.cpp (VNNI), int8_avx2.cpp, int8_scalar.cpp; layout: int8_kernels.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>

#include "cpu/cpu_isa.h"
#include "cpu/int8_kernels.h"

namespace fastdistill::cpu::int8 {
namespace {

constexpr int64_t kPanelBlocks = 4;  // 64 columns per task
constexpr int64_t kTileRows = 96;    // rows per task (a multiple of every micro-kernel's MR)
constexpr int64_t kMaxK = 65536;

DType float_dtype(const char* op, const char* what, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kBFloat16: return DType::bf16;
    case at::kHalf: return DType::f16;
    default:
      TORCH_CHECK(false, "fastdistill.", op, ": ", what, " must be float32, bfloat16 or float16, got ",
                  t.scalar_type());
  }
  return DType::f32;
}

void check_cpu(const char* op, const char* what, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "fastdistill.", op, ": ", what, " must be a CPU tensor, got ", t.device());
}

// Which kernels run: gemm_s8 needs VNNI on the avx512 path, else the AVX2 kernel.
struct Isa {
  CpuIsa level;
  bool vnni;
};
Isa current_isa() {
  const CpuIsa level = active_isa();
  return {level, level == CpuIsa::avx512 && cpu_features().avx512vnni};
}

void quantize_rows(CpuIsa isa, const QuantParams& p, int64_t r0, int64_t r1) {
#if defined(__x86_64__)
  if (isa == CpuIsa::avx512) return avx512::quantize_rows(p, r0, r1);
  if (isa == CpuIsa::avx2) return avx2::quantize_rows(p, r0, r1);
#endif
  scalar::quantize_rows(p, r0, r1);
}

void gemm_s8(const Isa& isa, const GemmParams& p, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1) {
#if defined(__x86_64__)
  if (isa.vnni) return avx512::gemm_s8(p, m0, m1, nb0, nb1);
  if (isa.level != CpuIsa::scalar) return avx2::gemm_s8(p, m0, m1, nb0, nb1);
#endif
  scalar::gemm_s8(p, m0, m1, nb0, nb1);
}

void gemm_wo(const Isa& isa, const WoParams& p, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1) {
#if defined(__x86_64__)
  if (isa.level == CpuIsa::avx512) return avx512::gemm_wo(p, m0, m1, nb0, nb1);
  if (isa.level == CpuIsa::avx2) return avx2::gemm_wo(p, m0, m1, nb0, nb1);
#endif
  scalar::gemm_wo(p, m0, m1, nb0, nb1);
}

// Tasks = (64-column panel) x (96-row tile), panel-major so consecutive tasks (one thread's share)
// reuse a panel of weights from cache. Each output element belongs to exactly one task, so the
// result does not depend on the thread count.
template <typename F>
void for_tiles(int64_t m, int64_t nblocks, const F& f) {
  if (m == 0 || nblocks == 0) return;
  const int64_t panels = (nblocks + kPanelBlocks - 1) / kPanelBlocks;
  const int64_t tiles = (m + kTileRows - 1) / kTileRows;
  at::parallel_for(0, panels * tiles, 1, [&](int64_t t0, int64_t t1) {
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
  check_cpu(op, "w_packed", packed);
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

// Common checks of int8_linear / int8_weight_only_linear; returns the header.
PackedHeader check_linear(const char* op, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                          const std::optional<at::Tensor>& bias) {
  check_cpu(op, "x", x);
  float_dtype(op, "x", x);
  TORCH_CHECK(x.dim() >= 1, "fastdistill.", op, ": x must have at least 1 dimension (..., K), got a scalar");
  check_cpu(op, "w_scales", scales);
  TORCH_CHECK(scales.dim() == 1, "fastdistill.", op, ": w_scales must be 1-D [N], got shape ", scales.sizes());
  TORCH_CHECK(scales.scalar_type() == at::kFloat, "fastdistill.", op, ": w_scales must be float32, got ",
              scales.scalar_type());
  const PackedHeader h = read_header(op, packed);
  TORCH_CHECK(scales.size(0) == h.n, "fastdistill.", op, ": w_scales must have shape [N] = [", h.n,
              "] to match the weight, got ", scales.sizes());
  TORCH_CHECK(x.size(-1) == h.k, "fastdistill.", op, ": x must have K=", h.k,
              " columns to match the weight, got ", x.size(-1));
  if (bias.has_value()) {
    check_cpu(op, "bias", *bias);
    float_dtype(op, "bias", *bias);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == h.n, "fastdistill.", op, ": bias must have shape [N] = [",
                h.n, "], got ", bias->sizes());
  }
  return h;
}

// x (..., K) -> [M, K] with M the product of the leading dims (also when K == 0).
at::Tensor as_rows(const at::Tensor& x, int64_t k) {
  int64_t m = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) m *= x.size(d);
  return x.reshape({m, k});
}

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
  s.back() = n;
  return s;
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& x_in) {
  const char* op = "quantize_per_token";
  check_cpu(op, "x", x_in);
  const DType dt = float_dtype(op, "x", x_in);
  TORCH_CHECK(x_in.dim() >= 1, "fastdistill.", op, ": x must have at least 1 dimension (..., K), got a scalar");
  const at::Tensor x = x_in.contiguous();
  const int64_t k = x.size(-1), rows = k == 0 ? 0 : x.numel() / k;
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  at::Tensor s = at::zeros(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  if (rows == 0) return {q, s};
  QuantParams p{dt, x.data_ptr(), k, k, k, q.data_ptr<int8_t>(), k, s.data_ptr<float>(), 0};
  const CpuIsa isa = active_isa();
  at::parallel_for(0, rows, row_grain(k), [&](int64_t r0, int64_t r1) { quantize_rows(isa, p, r0, r1); });
  return {q, s};
}

std::tuple<at::Tensor, at::Tensor> quantize_per_channel(const at::Tensor& w_in) {
  const char* op = "quantize_per_channel";
  check_cpu(op, "w", w_in);
  TORCH_CHECK(w_in.dim() == 2, "fastdistill.", op, ": w must be 2-D [N, K], got shape ", w_in.sizes());
  const DType dt = float_dtype(op, "w", w_in);
  const at::Tensor w = w_in.contiguous();
  const int64_t n = w.size(0), k = w.size(1);
  at::Tensor q = at::empty({n, k}, w.options().dtype(at::kChar));
  at::Tensor s = at::empty({n}, w.options().dtype(at::kFloat));
  std::atomic<bool> finite{true};
  at::parallel_for(0, n, row_grain(k), [&](int64_t r0, int64_t r1) {
    if (!quantize_channel_rows(dt, w.data_ptr(), k, k, q.data_ptr<int8_t>(), s.data_ptr<float>(), r0, r1))
      finite.store(false);
  });
  TORCH_CHECK(finite.load(), "fastdistill.", op, ": w contains NaN or Inf; cannot quantize a non-finite weight");
  return {q, s};
}

at::Tensor pack(const char* op, const at::Tensor& w_in) {
  check_cpu(op, "w_int8", w_in);
  TORCH_CHECK(w_in.dim() == 2, "fastdistill.", op, ": w_int8 must be 2-D [N, K], got shape ", w_in.sizes());
  TORCH_CHECK(w_in.scalar_type() == at::kChar, "fastdistill.", op, ": w_int8 must be int8, got ",
              w_in.scalar_type());
  const at::Tensor w = w_in.contiguous();
  const int64_t n = w.size(0), k = w.size(1);
  // int32 accumulators: K * 255 * 127 (u8 x s8, VNNI path) must stay below 2^31.
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

// Quantises x (M x K rows, contiguous) into a [M, k_pad] operand for the active GEMM kernel.
at::Tensor quantize_operand(const Isa& isa, const at::Tensor& x2, DType dt, int64_t k_pad, at::Tensor& scales) {
  const int64_t m = x2.size(0), k = x2.size(1);
  at::Tensor a = at::empty({m, k_pad}, x2.options().dtype(at::kChar));
  scales = at::empty({m}, x2.options().dtype(at::kFloat));
  QuantParams p{dt, x2.data_ptr(), k, k, k_pad, a.data_ptr<int8_t>(), k_pad, scales.data_ptr<float>(),
                uint8_t(isa.vnni ? 0x80 : 0)};
  at::parallel_for(0, m, row_grain(k), [&](int64_t r0, int64_t r1) { quantize_rows(isa.level, p, r0, r1); });
  return a;
}

at::Tensor int8_linear(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& scales_in,
                       const std::optional<at::Tensor>& bias_in) {
  const char* op = "int8_linear";
  const PackedHeader h = check_linear(op, x_in, packed, scales_in, bias_in);
  const DType dt = float_dtype(op, "x", x_in);
  const at::Tensor x2 = as_rows(x_in, h.k).contiguous();
  const int64_t m = x2.size(0);
  at::Tensor out = at::empty({m, h.n}, x_in.options());
  if (m > 0 && h.n > 0) {
    const Isa isa = current_isa();
    const at::Tensor ws = scales_in.contiguous();
    at::Tensor bias;
    if (bias_in.has_value()) bias = bias_in->to(at::kFloat).contiguous();
    at::Tensor xs;
    const at::Tensor a = quantize_operand(isa, x2, dt, h.k_pad, xs);
    GemmParams p{};
    p.a = a.data_ptr<int8_t>();
    p.lda = h.k_pad;
    p.shifted = isa.vnni;
    p.w = packed_data(packed.data_ptr<int8_t>(), h.n_pad);
    p.comp = packed_comp(packed.data_ptr<int8_t>());
    p.n = h.n;
    p.k_pad = h.k_pad;
    p.out = out.data_ptr();
    p.out_dtype = dt;
    p.ldo = h.n;
    p.x_scales = xs.data_ptr<float>();
    p.w_scales = ws.data_ptr<float>();
    p.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
    for_tiles(m, h.n_pad / kNB, [&](int64_t m0, int64_t m1, int64_t b0, int64_t b1) { gemm_s8(isa, p, m0, m1, b0, b1); });
  }
  return out.view(out_shape(x_in, h.n));
}

at::Tensor int8_weight_only_linear(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& scales_in,
                                   const std::optional<at::Tensor>& bias_in) {
  const char* op = "int8_weight_only_linear";
  const PackedHeader h = check_linear(op, x_in, packed, scales_in, bias_in);
  const DType dt = float_dtype(op, "x", x_in);
  at::Tensor x2 = as_rows(x_in, h.k);
  const int64_t m = x2.size(0);
  at::Tensor out = at::empty({m, h.n}, x_in.options());
  if (m > 0 && h.n > 0) {
    const Isa isa = current_isa();
    // bf16 inputs with many rows on a CPU with avx512bf16: the kernel takes bf16 activations (exact
    // products, 2x the fp32 FMA rate). Otherwise an fp32 operand. Either way k_pad columns, the
    // padding zero (the packed weights' padding is 0, the activations' must be finite).
    const bool bf16_path = dt == DType::bf16 && isa.level == CpuIsa::avx512 && cpu_features().avx512bf16 && m >= 8;
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
    for_tiles(m, h.n_pad / kNB, [&](int64_t m0, int64_t m1, int64_t b0, int64_t b1) { gemm_wo(isa, p, m0, m1, b0, b1); });
  }
  return out.view(out_shape(x_in, h.n));
}

at::Tensor int8_gemm_s32(const at::Tensor& x_in, const at::Tensor& w) {
  const char* op = "int8_gemm_s32";
  check_cpu(op, "x_int8", x_in);
  TORCH_CHECK(x_in.scalar_type() == at::kChar, "fastdistill.", op, ": x_int8 must be int8, got ", x_in.scalar_type());
  TORCH_CHECK(x_in.dim() >= 1, "fastdistill.", op, ": x_int8 must have at least 1 dimension (..., K), got a scalar");
  const at::Tensor packed = pack(op, w);
  const int64_t n = w.size(0), k = w.size(1), np = round_up(n, kNB), kp = round_up(k, kKG);
  TORCH_CHECK(x_in.size(-1) == k, "fastdistill.", op, ": x_int8 must have K=", k,
              " columns to match the weight, got ", x_in.size(-1));
  const at::Tensor x2 = as_rows(x_in, k);
  const int64_t m = x2.size(0);
  const Isa isa = current_isa();
  at::Tensor a = at::zeros({m, kp}, x2.options());
  a.narrow(1, 0, k).copy_(x2);
  if (isa.vnni) a = a.bitwise_xor(-128);  // s8 -> u8 (+128), stored in the same bytes
  at::Tensor out = at::empty({m, n}, x2.options().dtype(at::kInt));
  GemmParams p{};
  p.a = a.data_ptr<int8_t>();
  p.lda = kp;
  p.shifted = isa.vnni;
  p.w = packed_data(packed.data_ptr<int8_t>(), np);
  p.comp = packed_comp(packed.data_ptr<int8_t>());
  p.n = n;
  p.k_pad = kp;
  p.out_s32 = out.data_ptr<int32_t>();
  p.ldo = n;
  for_tiles(m, np / kNB, [&](int64_t m0, int64_t m1, int64_t b0, int64_t b1) { gemm_s8(isa, p, m0, m1, b0, b1); });
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
