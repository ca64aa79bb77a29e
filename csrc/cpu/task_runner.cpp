// Persistent helper threads for run_dynamic (task_runner.h).
#include "cpu/task_runner.h"

#include <ATen/Parallel.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <thread>

namespace fastdistill::cpu {
namespace {

struct Job {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::atomic<int64_t> seats{0};  // helpers that may still join
  int64_t ntasks = 0;
  const std::function<void(int64_t)>* body = nullptr;  // valid while the caller waits

  void work() {
    for (;;) {
      const int64_t t = next.fetch_add(1, std::memory_order_relaxed);
      if (t >= ntasks) return;
      (*body)(t);
      if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == ntasks) done.notify_all();
    }
  }
};

inline void cpu_relax() {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#endif
}

// Helpers poll this long for a new job after the last one, then block on a futex. Polling yields
// the core to any other runnable thread, so an OpenMP region that follows is not slowed.
constexpr auto kPoll = std::chrono::microseconds(100);

class Helpers {
 public:
  // Starts helper threads until there are n (never stops them; they sleep when idle).
  void ensure(int64_t n) {
    std::lock_guard<std::mutex> g(start_mutex_);
    for (; started_ < n; ++started_) std::thread([this] { loop(); }).detach();
  }

  void post(const std::shared_ptr<Job>& job) {
    {
      std::lock_guard<std::mutex> g(job_mutex_);
      job_ = job;
    }
    epoch_.fetch_add(1, std::memory_order_release);
    epoch_.notify_all();
  }

 private:
  void loop() {
    int seen = epoch_.load(std::memory_order_acquire);
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + kPoll;
      for (int i = 0; epoch_.load(std::memory_order_acquire) == seen; ++i) {
        if (i < 64) {
          cpu_relax();
          continue;
        }
        if (std::chrono::steady_clock::now() > until) {
          epoch_.wait(seen, std::memory_order_acquire);
          break;
        }
        std::this_thread::yield();
      }
      seen = epoch_.load(std::memory_order_acquire);
      std::shared_ptr<Job> job;
      {
        std::lock_guard<std::mutex> g(job_mutex_);
        job = job_;
      }
      if (job && job->seats.fetch_sub(1, std::memory_order_acq_rel) > 0) job->work();
    }
  }

  std::mutex start_mutex_, job_mutex_;
  int64_t started_ = 0;
  std::shared_ptr<Job> job_;
  std::atomic<int> epoch_{0};
};

// One pool per process: a forked child (e.g. a DataLoader worker) has none of the parent's threads,
// and a mutex a helper held at the fork would stay locked there, so the child starts its own.
Helpers& helpers() {
  static std::atomic<Helpers*> pool{nullptr};
  static std::atomic<pid_t> owner{0};
  static std::mutex m;
  const pid_t pid = getpid();
  Helpers* h = pool.load(std::memory_order_acquire);
  if (h && owner.load(std::memory_order_acquire) == pid) return *h;
  std::lock_guard<std::mutex> g(m);  // in a child, m may be held: it is only taken before any helper starts
  h = pool.load(std::memory_order_acquire);
  if (!h || owner.load(std::memory_order_acquire) != pid) {
    h = new Helpers();  // never freed: detached threads use it until the process exits
    owner.store(pid, std::memory_order_release);
    pool.store(h, std::memory_order_release);
  }
  return *h;
}

}  // namespace

void run_dynamic(int64_t ntasks, const std::function<void(int64_t)>& body) {
  const int64_t nhelpers = std::min<int64_t>(at::get_num_threads() - 1, ntasks - 1);
  if (nhelpers <= 0 || at::in_parallel_region()) {
    for (int64_t t = 0; t < ntasks; ++t) body(t);
    return;
  }
  auto job = std::make_shared<Job>();
  job->ntasks = ntasks;
  job->body = &body;
  job->seats.store(nhelpers, std::memory_order_relaxed);
  Helpers& pool = helpers();
  pool.ensure(nhelpers);
  pool.post(job);
  job->work();
  // Every task is claimed now; wait for the ones helpers are still running. Spin briefly, then
  // block: a helper that was preempted in mid-task sits runnable on a busy core, and when this core
  // goes idle the scheduler's idle balancing pulls it over here at once (a spinning caller would
  // keep it waiting for the other core's next tick).
  for (int spins = 0; spins < 2048 && job->done.load(std::memory_order_acquire) < ntasks; ++spins) cpu_relax();
  for (int64_t d; (d = job->done.load(std::memory_order_acquire)) < ntasks;)
    job->done.wait(d, std::memory_order_acquire);
}

}  // namespace fastdistill::cpu
