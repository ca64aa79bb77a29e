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
void run_dynamic(int64_t ntasks, const std::function<void(int64_t)>& body);

}  // namespace fastdistill::cpu
