// Dynamic task claiming on ATen's thread pool (task_runner.h).
#include "cpu/task_runner.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>

namespace fastdistill::cpu {

namespace {
// One more thread per this much work. Measured on Intel Xeon (Emerald Rapids, 2 cores), int8_linear on 1 vs 2
// threads alternated in one process: even at 2.1M multiply-adds (14 x 384 -> 384), 2 threads 0.79x the time at 4.7M.
constexpr double kWorkPerExtraThread = 2e6;
}  // namespace

int64_t threads_for_work(double work) {
  if (at::in_parallel_region()) return 1;
  const int64_t most = at::get_num_threads();
  const double worth = std::floor(work / kWorkPerExtraThread);
  return worth >= double(most) ? most : std::max<int64_t>(1, int64_t(worth));
}

void run_dynamic(int64_t ntasks, double work, const std::function<void(int64_t)>& body) {
  const int64_t nthreads = std::min<int64_t>(threads_for_work(work), ntasks);  // 1 inside a parallel region
  if (nthreads <= 1) {
    for (int64_t t = 0; t < ntasks; ++t) body(t);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < ntasks;) body(t);
  });
}

}  // namespace fastdistill::cpu
