// int8 CPU kernels, amx level: the dynamic W8A8 GEMM on AMX tiles (tdpbssd, s8 x s8 -> exact int32). The packed
// weight layout is already the tile B operand: 16 consecutive groups of 4 k of one 16-column block are 16 rows of
// 64 bytes [col][k % 4], contiguous. So one B tile is 1 KB read straight from the packed weight, with no repack,
// and the int32 sums equal the VNNI levels' bit for bit (activations are s8 here, so no compensation). The rest
// (quantization, weight-only) is the avx512bf16 level's.
#include "cpu/simd/prelude.h"
#include "cpu/int8_kernels.h"

#if defined(__x86_64__)
FASTDISTILL_TARGET_AMX

namespace fastdistill::cpu::int8 {
namespace avx512bf16 {
void gemm_wo_bf16(const WoParams& p, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1);
}

namespace amx {

#include "cpu/int8_per_isa.inc"

namespace {

// Tile registers: C 0..3 = (row tile r, column tile j) at 2r + j; A 4, 5 = row tiles 0, 1; B 6, 7 = column tiles.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// GCC's tile intrinsics are asm statements that take only pointers, with no memory clobber: without this fence the
// compiler may drop or sink the stores that fill a tile's source (the config, the tail copies) and hoist reads of
// what a tile store wrote. Passing the pointer also makes the buffer escape, so its stores cannot be elided.
inline void memory_fence(const void* p) { asm volatile("" : : "r"(p) : "memory"); }

constexpr int kTileK = 64;     // k per tile (64 bytes a row)
constexpr int kTileM = 16;     // rows per tile
constexpr int64_t kRowsPerStep = 2 * kTileM;

// Rows r0 (tiles 0, 1, 4) and r1 (tiles 2, 3, 5) of the two row tiles; r1 = 0 leaves them unconfigured.
void configure(int r0, int r1) {
  TileConfig cfg;
  for (int t : {0, 1, 4}) cfg.rows[t] = uint8_t(r0), cfg.colsb[t] = 64;
  if (r1 > 0)
    for (int t : {2, 3, 5}) cfg.rows[t] = uint8_t(r1), cfg.colsb[t] = 64;
  for (int t : {6, 7}) cfg.rows[t] = kTileM, cfg.colsb[t] = 64;
  memory_fence(&cfg);
  _tile_loadconfig(&cfg);
}

// Sums of rows [0, r0 + r1) of a over one or two 16-column tiles (b0, b1 = b0 + 1 tile; two unless single),
// written to c (row stride kPanelCols). The k_pad % 64 tail goes through zero-padded copies: tile loads read whole
// 64-byte rows, and A's zero padding makes B's padding irrelevant (B's copy only keeps the load in bounds).
void tile_sums(const int8_t* a, int64_t lda, const int8_t* b0, int64_t k_pad, int r0, int r1, bool single,
               int32_t* c) {
  _tile_zero(0);
  _tile_zero(1);
  if (r1 > 0) {
    _tile_zero(2);
    _tile_zero(3);
  }
  const int8_t* b1 = b0 + k_pad * kNB;
  const int64_t kmain = k_pad / kTileK * kTileK;
  const int64_t lda2 = kTileM * lda;
  for (int64_t k = 0; k < kmain; k += kTileK) {
    _tile_loadd(4, a + k, lda);
    _tile_loadd(6, b0 + k * kNB, 64);
    _tile_dpbssd(0, 4, 6);
    if (!single) {
      _tile_loadd(7, b1 + k * kNB, 64);
      _tile_dpbssd(1, 4, 7);
    }
    if (r1 > 0) {
      _tile_loadd(5, a + lda2 + k, lda);
      _tile_dpbssd(2, 5, 6);
      if (!single) _tile_dpbssd(3, 5, 7);
    }
  }
  if (kmain < k_pad) {
    const int64_t kr = k_pad - kmain;
    alignas(64) int8_t at[kRowsPerStep * kTileK] = {};
    alignas(64) int8_t bt[2][kTileM * kTileK] = {};
    for (int i = 0; i < r0 + r1; ++i) std::memcpy(at + i * kTileK, a + i * lda + kmain, size_t(kr));
    std::memcpy(bt[0], b0 + kmain * kNB, size_t(kr * kNB));
    if (!single) std::memcpy(bt[1], b1 + kmain * kNB, size_t(kr * kNB));
    memory_fence(at);
    memory_fence(bt);
    _tile_loadd(4, at, kTileK);
    _tile_loadd(6, bt[0], 64);
    _tile_dpbssd(0, 4, 6);
    if (!single) {
      _tile_loadd(7, bt[1], 64);
      _tile_dpbssd(1, 4, 7);
    }
    if (r1 > 0) {
      _tile_loadd(5, at + kTileM * kTileK, kTileK);
      _tile_dpbssd(2, 5, 6);
      if (!single) _tile_dpbssd(3, 5, 7);
    }
  }
  constexpr int64_t ldc = kPanelCols * 4;  // bytes
  _tile_stored(0, c, ldc);
  if (!single) _tile_stored(1, c + kNB, ldc);
  if (r1 > 0) {
    _tile_stored(2, c + kTileM * kPanelCols, ldc);
    if (!single) _tile_stored(3, c + kTileM * kPanelCols + kNB, ldc);
  }
  memory_fence(c);
}

}  // namespace

void gemm_s8_panel(const int8_t* a, int64_t lda, const int8_t* panel, int64_t k_pad, int nblk, int64_t rows,
                   int32_t* c) {
  if (k_pad == 0) {
    std::memset(c, 0, size_t(rows * kPanelCols) * sizeof(int32_t));
    return;
  }
  const int64_t bstride = k_pad * kNB;
  int configured[2] = {-1, -1};
  for (int64_t m = 0; m < rows; m += kRowsPerStep) {
    const int r0 = int(std::min<int64_t>(kTileM, rows - m));
    const int r1 = int(std::min<int64_t>(kTileM, std::max<int64_t>(0, rows - m - kTileM)));
    if (r0 != configured[0] || r1 != configured[1]) configure(r0, r1), configured[0] = r0, configured[1] = r1;
    for (int j = 0; j < nblk; j += 2)
      tile_sums(a + m * lda, lda, panel + j * bstride, k_pad, r0, r1, j + 1 == nblk, c + m * kPanelCols + j * kNB);
  }
  _tile_release();  // a thread that keeps tile state dirty makes every context switch save 8 KB more
}

void gemm_s8(const GemmParams& p, int64_t m0, int64_t m1, int64_t nb0, int64_t nb1) {
  gemm_s8_by_panels(p, m0, m1, nb0, nb1, gemm_s8_panel);
}

// Below 3 rows the VNNI level is as fast or faster (measured at M = 1..8, K x N = 384 x 384, 384 x 1536,
// 4096 x 4096, one thread, on a Sapphire Rapids-class Xeon: 0.82-0.98x at M = 1-2, 1.05-1.2x at M = 3-6).
extern const Int8Kernels kernels{avx512::quantize_rows, gemm_s8, gemm_s8_panel, false, avx512::gemm_wo,
                                 avx512bf16::gemm_wo_bf16, 3};

}  // namespace amx
}  // namespace fastdistill::cpu::int8

#endif  // __x86_64__
