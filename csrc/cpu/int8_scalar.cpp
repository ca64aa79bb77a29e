// int8 CPU kernels, scalar level, plus the ISA-neutral packing and weight quantisation.
#include "cpu/simd/prelude.h"
#include "cpu/int8_kernels.h"

namespace fastdistill::cpu::int8 {

void write_header(int8_t* packed, int64_t n, int64_t k) {
  PackedHeader h{};
  h.magic = kMagic;
  h.version = kVersion;
  h.n = n;
  h.k = k;
  h.n_pad = round_up(n, kNB);
  h.k_pad = round_up(k, kKG);
  std::memset(packed, 0, kHeaderBytes);
  std::memcpy(packed, &h, sizeof(h));
}

void pack_blocks(const int8_t* w, int64_t ldw, int64_t n, int64_t k, int8_t* packed, int64_t b0, int64_t b1) {
  const int64_t np = round_up(n, kNB), kp = round_up(k, kKG);
  int32_t* comp = reinterpret_cast<int32_t*>(packed + kHeaderBytes);
  int8_t* data = packed + kHeaderBytes + 4 * np;
  for (int64_t b = b0; b < b1; ++b) {
    int8_t* blk = data + b * kp * kNB;
    for (int64_t c = 0; c < kNB; ++c) {
      const int64_t col = b * kNB + c;
      int32_t sum = 0;
      for (int64_t kk = 0; kk < kp; ++kk) {
        const int8_t v = (col < n && kk < k) ? w[col * ldw + kk] : int8_t(0);
        sum += v;
        blk[(kk / kKG) * kNB * kKG + c * kKG + (kk % kKG)] = v;
      }
      comp[col] = 128 * sum;
    }
  }
}

void unpack_rows(const int8_t* packed, int8_t* w, int64_t r0, int64_t r1) {
  PackedHeader h;
  std::memcpy(&h, packed, sizeof(h));
  const int8_t* data = packed_data(packed, h.n_pad);
  for (int64_t r = r0; r < r1; ++r) {
    const int8_t* blk = data + (r / kNB) * h.k_pad * kNB;
    const int64_t c = r % kNB;
    for (int64_t kk = 0; kk < h.k; ++kk) w[r * h.k + kk] = blk[(kk / kKG) * kNB * kKG + c * kKG + (kk % kKG)];
  }
}

bool quantize_channel_rows(DType dtype, const void* w, int64_t ldw, int64_t k, int8_t* q, float* scales,
                           int64_t r0, int64_t r1) {
  bool finite = true;
  for (int64_t r = r0; r < r1; ++r) {
    float amax = 0.f;
    for (int64_t j = 0; j < k; ++j) {
      float v;
      switch (dtype) {
        case DType::f32: v = static_cast<const float*>(w)[r * ldw + j]; break;
        case DType::bf16: v = to_float(static_cast<const bf16_t*>(w)[r * ldw + j]); break;
        default: v = to_float(static_cast<const f16_t*>(w)[r * ldw + j]); break;
      }
      if (!std::isfinite(v)) finite = false;
      amax = std::max(amax, std::fabs(v));
    }
    const float s = finite ? amax / 127.f : 0.f;
    scales[r] = s;
    for (int64_t j = 0; j < k; ++j) {
      float v;
      switch (dtype) {
        case DType::f32: v = static_cast<const float*>(w)[r * ldw + j]; break;
        case DType::bf16: v = to_float(static_cast<const bf16_t*>(w)[r * ldw + j]); break;
        default: v = to_float(static_cast<const f16_t*>(w)[r * ldw + j]); break;
      }
      float t = s == 0.f ? 0.f : std::nearbyint(v / s);
      t = std::min(127.f, std::max(-127.f, t));
      q[r * k + j] = static_cast<int8_t>(static_cast<int>(t));
    }
  }
  return finite;
}

namespace scalar {

#include "cpu/int8_per_isa.inc"

void quantize_rows(const QuantParams& p, int64_t r0, int64_t r1) { quantize_rows_generic(p, r0, r1); }

void gemm_s8_panel(const int8_t* a, int64_t lda, const int8_t* panel, int64_t k_pad, int nblk, int64_t rows,
                   int32_t* c) {
  // The dynamic GEMM of this level takes s8 activations (u8_activations is false).
  for (int t = 0; t < nblk; ++t) {
    const int8_t* blk = panel + t * k_pad * kNB;
    for (int64_t m = 0; m < rows; ++m) {
      const int8_t* am = a + m * lda;
      int32_t* cm = c + m * kPanelCols + t * kNB;
      for (int64_t j = 0; j < kNB; ++j) cm[j] = 0;
      for (int64_t g = 0; g < k_pad / kKG; ++g) {
        const int8_t* w = blk + g * kNB * kKG;
        for (int64_t j = 0; j < kNB; ++j)
          for (int64_t u = 0; u < kKG; ++u) cm[j] += int32_t(am[g * kKG + u]) * int32_t(w[j * kKG + u]);
      }
    }
  }
}

void gemm_s8(const GemmParams& p, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1) {
  gemm_s8_by_panels(p, m0, m1, nb0, nb1, gemm_s8_panel);
}

void gemm_wo(const WoParams& p, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1) {
  float c[kNB];
  for (int64_t b = nb0; b < nb1; ++b) {
    const int8_t* blk = p.w + b * p.k_pad * kNB;
    const int64_t n0 = b * kNB, cols = std::min<int64_t>(kNB, p.n - n0);
    for (int64_t m = m0; m < m1; ++m) {
      const float* x = p.x + m * p.ldx;
      for (int64_t j = 0; j < kNB; ++j) c[j] = 0.f;
      for (int64_t g = 0; g < p.k_pad / kKG; ++g) {
        const int8_t* t = blk + g * kNB * kKG;
        for (int64_t j = 0; j < kNB; ++j)
          for (int64_t u = 0; u < kKG; ++u) c[j] += x[g * kKG + u] * float(t[j * kKG + u]);
      }
      epilogue_wo(p, c, kNB, m, 1, n0, cols);
    }
  }
}

extern const Int8Kernels kernels{quantize_rows, gemm_s8, gemm_s8_panel, false, gemm_wo, nullptr};

}  // namespace scalar
}  // namespace fastdistill::cpu::int8
