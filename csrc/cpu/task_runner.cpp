// Dynamic task claiming on ATen's thread pool (task_runner.h).
#include "cpu/task_runner.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>

namespace fastdistill::cpu {

void run_dynamic(int64_t ntasks, const std::function<void(int64_t)>& body) {
  const int64_t nthreads = std::min<int64_t>(at::get_num_threads(), ntasks);
  if (nthreads <= 1 || at::in_parallel_region()) {
    for (int64_t t = 0; t < ntasks; ++t) body(t);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < ntasks;) body(t);
  });
}

}  // namespace fastdistill::cpu
