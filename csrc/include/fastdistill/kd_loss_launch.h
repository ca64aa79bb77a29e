// Launch configuration of the kd_loss GPU kernels (host-only, torch-free, CUDA-free): shared by the
// CUDA glue, the SIMT emulator ops and the kernels' launchers in kd_loss.cuh.
#pragma once
#include <cstdint>

#include "fastdistill/kd_loss.h"

namespace fastdistill::kd {

struct KdLaunchConfig {
  int threads = 256;
  int splits = 1;
};

// Pack width (elements) of the kernels for a pair of dtypes: 16 bytes of the wider one.
inline int kd_vec_for(DType s, DType t) { return (s == DType::f32 || t == DType::f32) ? 4 : 8; }

// Threads per block and row splits. threads/splits > 0 force a value (tests); sms = multiprocessors.
inline KdLaunchConfig kd_launch_config(int64_t rows, int64_t vocab, int vec, int threads, int splits, int sms) {
  KdLaunchConfig c;
  if (threads > 0) {
    c.threads = threads;
  } else {
    const int64_t packs = (vocab + vec - 1) / vec;
    int t = 32;
    while (t < 512 && t * 4 < packs) t *= 2;  // at least ~4 packs per thread before widening the block
    c.threads = t;
  }
  if (splits > 0) {
    c.splits = splits;
  } else {
    // Enough blocks to fill the machine twice, but each block still streams >= 16 packs per thread.
    const int64_t want = (2 * int64_t(sms) + rows - 1) / (rows > 0 ? rows : 1);
    const int64_t most = vocab / (int64_t(c.threads) * vec * 16);
    int64_t sp = want < most ? want : most;
    c.splits = int(sp < 1 ? 1 : (sp > 128 ? 128 : sp));
  }
  return c;
}

// Workspace floats the forward needs (0 when splits == 1).
inline int64_t kd_forward_workspace_floats(int64_t rows, int splits) {
  if (splits <= 1) return 0;
  const int64_t state = int64_t(sizeof(KdPartial) / sizeof(float));
  return rows * splits * (state > 2 ? state : 2);
}

}  // namespace fastdistill::kd
