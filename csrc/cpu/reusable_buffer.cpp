#include "cpu/reusable_buffer.h"

#include <sys/mman.h>

#include <cstdlib>
#include <mutex>
#include <vector>

namespace fastdistill::cpu {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kMinBytes = size_t(8) << 20;  // below this the system allocator is fine
constexpr size_t kMaxCached = 2;               // blocks kept for reuse (a step's gradient or two)

struct Block {
  void* ptr;
  size_t bytes;
};

std::mutex g_mutex;
std::vector<Block> g_free;

bool cache_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("FASTDISTILL_REUSE_BUFFERS");
    return v == nullptr || std::string(v) != "0";
  }();
  return on;
}

void release(void* ctx) {
  auto* b = static_cast<Block*>(ctx);
  void* evicted = b->ptr;
  if (cache_enabled()) {
    // Keep the most recently released blocks: a training loop's shape changes (e.g. a new batch
    // size) must not leave stale sizes pinning the cache while every new step faults fresh pages.
    std::lock_guard<std::mutex> lock(g_mutex);
    g_free.push_back(*b);
    evicted = nullptr;
    if (g_free.size() > kMaxCached) {
      evicted = g_free.front().ptr;
      g_free.erase(g_free.begin());
    }
  }
  std::free(evicted);
  delete b;
}

Block acquire(size_t bytes) {
  const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    for (size_t i = 0; i < g_free.size(); ++i) {
      if (g_free[i].bytes == rounded) {
        Block b = g_free[i];
        g_free.erase(g_free.begin() + i);
        return b;
      }
    }
  }
  void* ptr = nullptr;
  TORCH_CHECK(posix_memalign(&ptr, kHugePage, rounded) == 0, "fastdistill: out of memory allocating ", rounded, " bytes");
#ifdef MADV_HUGEPAGE
  madvise(ptr, rounded, MADV_HUGEPAGE);
#endif
  return {ptr, rounded};
}

}  // namespace

at::Tensor empty_reusable(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes = size_t(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (bytes < kMinBytes) return at::empty(sizes, options);
  auto* block = new Block(acquire(bytes));
  return at::from_blob(block->ptr, sizes, [block](void*) { release(block); }, options);
}

}  // namespace fastdistill::cpu
