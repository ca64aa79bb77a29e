// Dynamic task runner shared by the CPU op families.
#pragma once
#include <cstdint>
#include <functional>

namespace fastdistill::cpu {

// Runs body(t) for t in [0, ntasks), each task exactly once, on the calling thread plus up to
// at::get_num_threads() - 1 helper threads that claim tasks dynamically. Unlike an OpenMP fork/join
// (at::parallel_for), the caller never waits for a helper that has not started: on a machine whose
// other cores are busy, a helper's wake-up can take a scheduler tick (4-8 ms, measured), and the
// caller simply runs every unclaimed task itself. It only waits for tasks that a helper has claimed
// and is running. Helpers are persistent and poll for the next job for a short while before they
// sleep, so back-to-back calls (the layers of a model) do not pay a thread wake-up each. Callers
// must make each task write disjoint outputs, so that results do not depend on the thread count.
void run_dynamic(int64_t ntasks, const std::function<void(int64_t)>& body);

}  // namespace fastdistill::cpu
