// Dynamic task runner shared by the CPU op families.
#pragma once
#include <cstdint>
#include <functional>

namespace fastdistill::cpu {

// Runs body(t) for t in [0, ntasks), each task exactly once, on ATen's worker threads (at::parallel_for),
// which claim tasks one at a time from a shared counter, so uneven tasks balance. It deliberately uses
// ATen's pool and not one of its own: a private pool's threads would compete for the cores with OpenMP
// workers still spinning after the previous ATen op (libgomp spins for a while after each region).
// Callers must make each task write disjoint outputs, so that results do not depend on the thread count.
// `work` sets how many threads are woken (threads_for_work), in int8 multiply-add equivalents: time, not flops.
void run_dynamic(int64_t ntasks, double work, const std::function<void(int64_t)>& body);

// The threads worth waking for `work` int8 multiply-add equivalents (one dense int8 MAC = 1; a 2:4 int8 MAC of the
// dense-equivalent count = 2, a 2:4 float one = 4, as their small-M speeds compare): at most at::get_num_threads(),
// and one (the caller, no parallel region) below kWorkPerExtraThread per thread. Waking ATen's OpenMP pool costs ~5 us, which was most of
// a small int8 linear on 2 cores (1 x 384 -> 384: 12.1 us on 2 threads against 7.4 us on 1).
int64_t threads_for_work(double work);

}  // namespace fastdistill::cpu
