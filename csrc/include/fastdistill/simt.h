// CUDA portability layer. Kernels are written once against this header:
//   * under nvcc it maps straight onto CUDA;
//   * under a host compiler with FASTDISTILL_SIMT_EMULATOR it is a small CPU emulator that runs a
//     grid block by block, every thread of a block as its own cooperative user-level context.
//
// The emulator models only what CUDA guarantees. Threads of a block run one at a time, each from one
// synchronisation point (__syncthreads, __syncwarp, a warp shuffle / ballot / vote) to the next,
// in a freshly shuffled order every round, and blocks run in shuffled order. Shared memory
// (FD_SHARED / FD_DYNAMIC_SMEM) is poisoned (all bytes 0xff: NaN floats, -1 ints) at the start of
// every block. So a read of another thread's shared-memory write without a barrier in between sees
// poison or a stale value, never a lucky one; warps have no implicit lock-step; a __syncthreads that
// not every live thread reaches, a warp collective whose named lanes do not all arrive (or arrive with
// another mask), a shuffle from a lane outside the mask, a misaligned vector load and launch
// configurations a GPU rejects all raise an error (a C++ exception out of launch()).
// Limits of the model: memory is sequentially consistent (no weak ordering between fences), and
// blocks never run concurrently (so no inter-block spin-waits).
//
// Kernel-side vocabulary (both builds): FD_KERNEL, FD_DEVICE, FD_SHARED(T, name, n),
// FD_DYNAMIC_SMEM(T, name), threadIdx/blockIdx/blockDim/gridDim, __syncthreads, __syncwarp,
// __shfl_sync/__shfl_xor_sync/__shfl_down_sync/__shfl_up_sync, __ballot_sync/__any_sync/__all_sync,
// atomicAdd/atomicMax/atomicMin/atomicCAS/atomicExch, __dp4a, simt::load_pack / store_pack
// (aligned vector loads and stores). Host side: simt::launch(kernel, grid, block, smem, stream, args...).
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <cmath>
#include <utility>

#include "fastdistill/common.h"

#if defined(__CUDACC__)
// ============================================================================ real CUDA
#include <cuda_runtime.h>

#include <cassert>  // __assert_fail, which FD_KERNEL_ASSERT calls

#define FD_DEVICE __device__ __forceinline__
#define FD_KERNEL __global__
// Checks an input that the host cannot see without a sync (labels). On a GPU it is the CUDA assert, not
// compiled out by NDEBUG: the kernel stops and the next CUDA call raises "device-side assert triggered",
// as F.cross_entropy does for a bad target. The emulator turns it into a launch error.
#define FD_KERNEL_ASSERT(cond, msg) \
  do {                              \
    if (!(cond)) __assert_fail(msg, __FILE__, static_cast<unsigned>(__LINE__), __func__); \
  } while (0)
#define FD_SHARED(T, name, n) __shared__ T name[n]
#define FD_DYNAMIC_SMEM(T, name)                                   \
  extern __shared__ __align__(16) unsigned char fd_dynamic_smem_[]; \
  T* name = reinterpret_cast<T*>(fd_dynamic_smem_)

namespace fastdistill::simt {
using stream_t = cudaStream_t;
constexpr bool kEmulated = false;

template <class... P, class... A>
inline void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, stream_t stream, A&&... args) {
  kernel<<<grid, block, smem, stream>>>(std::forward<A>(args)...);
}

template <int N> struct RawOf;
template <> struct RawOf<16> { using type = uint4; };
template <> struct RawOf<8> { using type = uint2; };
template <> struct RawOf<4> { using type = unsigned int; };
template <> struct RawOf<2> { using type = unsigned short; };
template <> struct RawOf<1> { using type = unsigned char; };

// Streaming (evict-first) load of an aligned N-byte chunk; plain load for sizes below 4.
template <int N>
__device__ __forceinline__ typename RawOf<N>::type load_raw(const void* p) {
  using R = typename RawOf<N>::type;
  if constexpr (N >= 4) return __ldcs(reinterpret_cast<const R*>(p));
  else return *reinterpret_cast<const R*>(p);
}
template <int N>
__device__ __forceinline__ void store_raw(void* p, typename RawOf<N>::type v) {
  *reinterpret_cast<typename RawOf<N>::type*>(p) = v;
}
}  // namespace fastdistill::simt

#else
// ============================================================================ CPU emulator
#if !defined(FASTDISTILL_SIMT_EMULATOR)
#error "simt.h: compile with nvcc, or define FASTDISTILL_SIMT_EMULATOR for the CPU emulator"
#endif
#include <ucontext.h>

#include <algorithm>
#include <cstdlib>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#define FD_DEVICE inline
#define FD_KERNEL inline
#define FD_KERNEL_ASSERT(cond, msg) \
  do {                              \
    if (!(cond)) ::fastdistill::simt::detail::fail(std::string("device-side assert: ") + (msg)); \
  } while (0)
#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 { unsigned x, y, z; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(4) char4 { signed char x, y, z, w; };
constexpr int warpSize = 32;

namespace fastdistill::simt {
using stream_t = void*;
constexpr bool kEmulated = true;

namespace detail {

enum class State : uint8_t { runnable, barrier, warp, done };
enum class Coll : uint8_t { none, sync, shfl_idx, shfl_xor, shfl_down, shfl_up, ballot, any, all };

struct Thread {
  ucontext_t ctx;
  uint3 tid;
  int linear = 0;
  State state = State::runnable;
  Coll kind = Coll::none;
  unsigned mask = 0;
  int arg = 0, width = 32;
  uint64_t in = 0, out = 0;
  unsigned char* stack = nullptr;
};

struct Block {
  dim3 grid, block;
  uint3 bid;
  int nthreads = 0;
  std::vector<Thread> threads;
  ucontext_t sched;
  Thread* cur = nullptr;
  std::function<void()> body;
  std::string error;
  std::vector<unsigned> arrived;  // per warp: lanes waiting in a warp collective
  unsigned char* dynamic_smem = nullptr;
  size_t dynamic_bytes = 0, static_bytes = 0;
  std::vector<std::pair<const void*, std::unique_ptr<unsigned char[]>>> statics;
  uint64_t rng = 0;
};

inline thread_local Block* g_block = nullptr;
constexpr size_t kStackBytes = 64 << 10;
constexpr size_t kSmemLimit = 48 << 10;  // the default per-block limit without an opt-in

inline uint64_t next_random(uint64_t& s) {  // splitmix64
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
template <class V>
inline void shuffle(V& v, uint64_t& s) {
  for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[next_random(s) % i]);
}

inline uint64_t& launch_seed() {
  static thread_local uint64_t seed = [] {
    const char* e = std::getenv("FASTDISTILL_SIMT_SEED");
    return e ? std::strtoull(e, nullptr, 10) : 0x5eedull;
  }();
  return seed;
}

inline Block& blk() { return *g_block; }

// Called inside a thread context: record a kernel bug and hand control back for good.
[[noreturn]] inline void fail(const std::string& msg) {
  Block& b = blk();
  if (b.error.empty()) {
    const Thread& t = *b.cur;
    b.error = "simt emulator: block (" + std::to_string(b.bid.x) + "," + std::to_string(b.bid.y) + "," +
              std::to_string(b.bid.z) + ") thread (" + std::to_string(t.tid.x) + "," + std::to_string(t.tid.y) +
              "," + std::to_string(t.tid.z) + "): " + msg;
  }
  b.cur->state = State::done;
  swapcontext(&b.cur->ctx, &b.sched);
  std::abort();  // never resumed
}

inline void yield() {
  Block& b = blk();
  swapcontext(&b.cur->ctx, &b.sched);
}

inline void thread_entry() {
  Block& b = blk();
  b.body();
  b.cur->state = State::done;
  swapcontext(&b.cur->ctx, &b.sched);
}

inline std::vector<std::unique_ptr<unsigned char[]>>& stacks() {
  static thread_local std::vector<std::unique_ptr<unsigned char[]>> s;
  return s;
}

inline void run_block(Block& b) {
  auto& st = stacks();
  while ((int)st.size() < b.nthreads) st.emplace_back(new unsigned char[kStackBytes]);
  b.threads.assign(b.nthreads, Thread{});
  b.arrived.assign((b.nthreads + 31) / 32, 0u);
  b.statics.clear();
  b.static_bytes = 0;
  if (b.dynamic_bytes) std::memset(b.dynamic_smem, 0xff, b.dynamic_bytes);
  for (int i = 0; i < b.nthreads; ++i) {
    Thread& t = b.threads[i];
    t.linear = i;
    t.tid = {unsigned(i % b.block.x), unsigned((i / b.block.x) % b.block.y), unsigned(i / (b.block.x * b.block.y))};
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = st[i].get();
    t.ctx.uc_stack.ss_size = kStackBytes;
    t.ctx.uc_link = nullptr;
    makecontext(&t.ctx, &thread_entry, 0);
  }
  std::vector<int> order;
  order.reserve(b.nthreads);
  for (;;) {
    order.clear();
    int done = 0, at_barrier = 0;
    for (auto& t : b.threads) {
      if (t.state == State::runnable) order.push_back(t.linear);
      done += t.state == State::done;
      at_barrier += t.state == State::barrier;
    }
    if (order.empty()) {
      if (done == b.nthreads) return;
      if (at_barrier + done == b.nthreads && done == 0) {  // everyone reached __syncthreads
        for (auto& t : b.threads) t.state = State::runnable;
        continue;
      }
      std::string what = at_barrier + done == b.nthreads
                             ? std::to_string(done) + " thread(s) exited while " + std::to_string(at_barrier) +
                                   " wait in __syncthreads (divergent barrier)"
                             : "deadlock: " + std::to_string(at_barrier) + " thread(s) in __syncthreads, " +
                                   std::to_string(b.nthreads - done - at_barrier) +
                                   " in warp collectives whose lanes never all arrive";
      throw std::runtime_error("simt emulator: block (" + std::to_string(b.bid.x) + "," + std::to_string(b.bid.y) +
                               "," + std::to_string(b.bid.z) + "): " + what);
    }
    shuffle(order, b.rng);
    for (int i : order) {
      Thread& t = b.threads[i];
      if (t.state != State::runnable) continue;
      b.cur = &t;
      swapcontext(&b.sched, &t.ctx);
      b.cur = nullptr;
      if (!b.error.empty()) throw std::runtime_error(b.error);
    }
  }
}

// Completes a warp collective once all lanes named in the mask have arrived.
inline void try_complete(Block& b, int warp, unsigned mask) {
  if ((b.arrived[warp] & mask) != mask) return;
  Thread* lanes[32] = {};
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1u) lanes[l] = &b.threads[warp * 32 + l];
  const Thread& first = *lanes[__builtin_ctz(mask)];
  unsigned votes = 0;
  for (int l = 0; l < 32; ++l) {
    if (!lanes[l]) continue;
    if (lanes[l]->kind != first.kind || lanes[l]->mask != mask || lanes[l]->width != first.width)
      fail("warp collective: lanes named in mask 0x" + std::to_string(mask) +
           " arrived at different collectives or with different masks/widths");
    if (lanes[l]->in) votes |= 1u << l;
  }
  for (int l = 0; l < 32; ++l) {
    Thread* t = lanes[l];
    if (!t) continue;
    const int w = t->width, seg = l & ~(w - 1);
    int src = l;
    switch (t->kind) {
      case Coll::shfl_idx: src = seg + (t->arg & (w - 1)); break;
      case Coll::shfl_xor: src = l ^ t->arg; if (src >= seg + w) src = l; break;
      case Coll::shfl_down: src = l + t->arg; if (src >= seg + w) src = l; break;
      case Coll::shfl_up: src = l - t->arg; if (src < seg) src = l; break;
      default: break;
    }
    switch (t->kind) {
      case Coll::ballot: t->out = votes; break;
      case Coll::any: t->out = votes != 0; break;
      case Coll::all: t->out = (votes & mask) == mask; break;
      case Coll::sync: t->out = 0; break;
      default:
        if (src < 0 || src > 31 || !lanes[src])
          fail("warp shuffle reads lane " + std::to_string(src) + " which is not in the mask (undefined in CUDA)");
        t->out = lanes[src]->in;
    }
    t->state = State::runnable;
  }
  b.arrived[warp] &= ~mask;
}

template <class T>
inline T collective(Coll kind, unsigned mask, T value, int arg, int width) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp collectives move values of up to 8 bytes");
  Block& b = blk();
  Thread& t = *b.cur;
  const int lane = t.linear & 31, warp = t.linear >> 5;
  if (!(mask >> lane & 1u)) fail("warp collective called by a lane that is not in its own mask");
  if (width < 1 || width > 32 || (width & (width - 1))) fail("shuffle width must be a power of two <= 32");
  const int lanes_here = std::min(32, b.nthreads - warp * 32);
  if (lanes_here < 32 && (mask >> lanes_here)) fail("warp collective mask names lanes that do not exist");
  t.kind = kind;
  t.mask = mask;
  t.arg = arg;
  t.width = width;
  t.in = 0;
  std::memcpy(&t.in, &value, sizeof(T));
  t.state = State::warp;
  b.arrived[warp] |= 1u << lane;
  try_complete(b, warp, mask);
  yield();
  T out;
  std::memcpy(&out, &t.out, sizeof(T));
  return out;
}

template <class T>
inline T* static_smem(const void* key, size_t n) {
  Block& b = blk();
  for (auto& s : b.statics)
    if (s.first == key) return reinterpret_cast<T*>(s.second.get());
  const size_t bytes = std::max<size_t>(n * sizeof(T), 1);
  b.static_bytes += (bytes + 15) & ~size_t(15);
  if (b.static_bytes + b.dynamic_bytes > kSmemLimit) fail("shared memory over the 48 KiB per-block limit");
  b.statics.emplace_back(key, std::unique_ptr<unsigned char[]>(new (std::align_val_t(16)) unsigned char[bytes]));
  std::memset(b.statics.back().second.get(), 0xff, bytes);
  return reinterpret_cast<T*>(b.statics.back().second.get());
}

}  // namespace detail

// Runs kernel(args...) over grid x block, one block at a time, in a shuffled block order.
template <class... P, class... A>
inline void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, stream_t, A&&... args) {
  using namespace detail;
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024 || block.z > 64)
    throw std::runtime_error("simt emulator: invalid block size " + std::to_string(nthreads));
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u)
    throw std::runtime_error("simt emulator: invalid grid (" + std::to_string(grid.x) + "," +
                             std::to_string(grid.y) + "," + std::to_string(grid.z) + ")");
  if (smem > kSmemLimit) throw std::runtime_error("simt emulator: dynamic shared memory over 48 KiB");
  if (g_block) throw std::runtime_error("simt emulator: nested launch");
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  Block b;
  b.grid = grid;
  b.block = block;
  b.nthreads = int(nthreads);
  b.rng = next_random(launch_seed());
  b.body = [&] { std::apply(kernel, params); };
  std::unique_ptr<unsigned char[]> dyn;
  if (smem) dyn.reset(new (std::align_val_t(16)) unsigned char[smem]);
  b.dynamic_smem = dyn.get();
  b.dynamic_bytes = smem;
  std::vector<uint3> blocks;
  blocks.reserve(size_t(grid.x) * grid.y * grid.z);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) blocks.push_back({x, y, z});
  shuffle(blocks, b.rng);
  struct Reset { ~Reset() { g_block = nullptr; } } reset;
  g_block = &b;
  for (const uint3& id : blocks) {
    b.bid = id;
    b.error.clear();
    run_block(b);
  }
}

template <int N> struct RawOf;
template <> struct RawOf<16> { using type = uint4; };
template <> struct RawOf<8> { using type = uint2; };
template <> struct RawOf<4> { using type = unsigned int; };
template <> struct RawOf<2> { using type = unsigned short; };
template <> struct RawOf<1> { using type = unsigned char; };

template <int N>
inline typename RawOf<N>::type load_raw(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % N) detail::fail("misaligned " + std::to_string(N) + "-byte vector load");
  typename RawOf<N>::type r;
  std::memcpy(&r, p, N);
  return r;
}
template <int N>
inline void store_raw(void* p, typename RawOf<N>::type v) {
  if (reinterpret_cast<uintptr_t>(p) % N) detail::fail("misaligned " + std::to_string(N) + "-byte vector store");
  std::memcpy(p, &v, N);
}

}  // namespace fastdistill::simt

#define FD_SHARED(T, name, n)            \
  static const char fd_smem_key_##name = 0; \
  T* name = ::fastdistill::simt::detail::static_smem<T>(&fd_smem_key_##name, (n))
#define FD_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(::fastdistill::simt::detail::blk().dynamic_smem)

#define threadIdx (::fastdistill::simt::detail::blk().cur->tid)
#define blockIdx (::fastdistill::simt::detail::blk().bid)
#define blockDim (::fastdistill::simt::detail::blk().block)
#define gridDim (::fastdistill::simt::detail::blk().grid)

inline void __syncthreads() {
  using namespace fastdistill::simt::detail;
  blk().cur->state = State::barrier;
  yield();
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  using namespace fastdistill::simt::detail;
  collective<int>(Coll::sync, mask, 0, 0, 32);
}
inline void __threadfence() {}
inline void __threadfence_block() {}
template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return fastdistill::simt::detail::collective<T>(fastdistill::simt::detail::Coll::shfl_idx, mask, v, src, width);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lm, int width = 32) {
  return fastdistill::simt::detail::collective<T>(fastdistill::simt::detail::Coll::shfl_xor, mask, v, lm, width);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32) {
  return fastdistill::simt::detail::collective<T>(fastdistill::simt::detail::Coll::shfl_down, mask, v, int(d), width);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32) {
  return fastdistill::simt::detail::collective<T>(fastdistill::simt::detail::Coll::shfl_up, mask, v, int(d), width);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return fastdistill::simt::detail::collective<uint64_t>(fastdistill::simt::detail::Coll::ballot, mask, pred != 0, 0, 32);
}
inline int __any_sync(unsigned mask, int pred) {
  return int(fastdistill::simt::detail::collective<uint64_t>(fastdistill::simt::detail::Coll::any, mask, pred != 0, 0, 32));
}
inline int __all_sync(unsigned mask, int pred) {
  return int(fastdistill::simt::detail::collective<uint64_t>(fastdistill::simt::detail::Coll::all, mask, pred != 0, 0, 32));
}

// Atomics: blocks and threads never run in parallel in the emulator, so plain read-modify-write is atomic.
template <class T>
inline T atomicAdd(T* p, T v) { T old = *p; *p = old + v; return old; }
template <class T>
inline T atomicMax(T* p, T v) { static_assert(std::is_integral_v<T>, "CUDA has integer atomicMax only"); T old = *p; *p = std::max(old, v); return old; }
template <class T>
inline T atomicMin(T* p, T v) { static_assert(std::is_integral_v<T>, "CUDA has integer atomicMin only"); T old = *p; *p = std::min(old, v); return old; }
template <class T>
inline T atomicExch(T* p, T v) { T old = *p; *p = v; return old; }
template <class T>
inline T atomicCAS(T* p, T cmp, T v) { T old = *p; if (old == cmp) *p = v; return old; }
template <class T>
inline T atomicOr(T* p, T v) { static_assert(std::is_integral_v<T>, "CUDA has integer atomicOr only"); T old = *p; *p = old | v; return old; }

inline int __dp4a(int a, int b, int c) {
  for (int i = 0; i < 4; ++i) c += int(int8_t(a >> (8 * i))) * int(int8_t(b >> (8 * i)));
  return c;
}
inline unsigned __dp4a(unsigned a, unsigned b, unsigned c) {
  for (int i = 0; i < 4; ++i) c += ((a >> (8 * i)) & 0xffu) * ((b >> (8 * i)) & 0xffu);
  return c;
}
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline int __float2int_rn(float x) { return int(std::nearbyint(x)); }
inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
inline float __uint_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float x) { unsigned i; std::memcpy(&i, &x, 4); return i; }
template <class T>
inline T __ldg(const T* p) { return *p; }
#endif  // emulator

// ============================================================================ both builds
namespace fastdistill::simt {

// A pack of VEC elements of T moved as one aligned vector access (16 bytes at most).
template <class T, int VEC>
struct Pack {
  T v[VEC];
};

template <class T, int VEC>
FD_DEVICE Pack<T, VEC> load_pack(const T* p) {
  constexpr int N = int(sizeof(T)) * VEC;
  static_assert(N <= 16 && (N & (N - 1)) == 0, "a pack is a power-of-two size up to 16 bytes");
  const auto raw = load_raw<N>(p);
  Pack<T, VEC> out;
  memcpy(&out, &raw, N);
  return out;
}

template <class T, int VEC>
FD_DEVICE void store_pack(T* p, const Pack<T, VEC>& x) {
  constexpr int N = int(sizeof(T)) * VEC;
  typename RawOf<N>::type raw;
  memcpy(&raw, &x, N);
  store_raw<N>(p, raw);
}

FD_DEVICE float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
FD_DEVICE float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

}  // namespace fastdistill::simt
