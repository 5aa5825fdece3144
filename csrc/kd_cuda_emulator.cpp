// The host CUDA emulator's scheduler (see kd_cuda_emulator.h): one fiber per thread of a
// cluster of blocks, switched cooperatively at barriers and shuffles.
// glibc's fortified longjmp refuses to jump between stacks, which is all a fiber switch does.
#undef _FORTIFY_SOURCE

#include "kd_cuda_emulator.h"

#include <setjmp.h>
#include <ucontext.h>

#include <memory>
#include <mutex>
#include <vector>

namespace kd::emu {
namespace {

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = size_t(128) << 10;

// Threads [first, first + size) of the cluster meet here.
struct Barrier {
  int first = 0, size = 0;
  bool strict = false;  // warp shuffles: every lane must still be running
  int arrived = 0;
  int exited = 0;
  uint64_t generation = 0;
};

// A fiber starts once through makecontext/swapcontext and from then on switches with
// _setjmp/_longjmp, which skip swapcontext's signal-mask system calls (the emulator's main cost).
struct Fiber {
  ucontext_t start;
  jmp_buf resume;
  bool started = false;
  bool done = false;
};

// The blocks of one cluster, run together.
struct Cluster {
  unsigned threads_per_block = 0, blocks = 0;
  std::vector<Fiber> fibers;  // block b's thread t is fiber b * threads_per_block + t
  std::unique_ptr<char[]> stacks;
  ucontext_t scheduler_start;
  jmp_buf scheduler;
  int current = 0;
  bool progress = false;
  const char* error = nullptr;
  std::vector<Barrier> block_barriers, warp_barriers;
  Barrier cluster_barrier;
  std::vector<uint32_t> shuffle_slots;
  size_t smem_stride = 0;  // bytes between the blocks' shared memory buffers
  std::unique_ptr<unsigned char[]> smem;
  const std::function<void()>* kernel = nullptr;

  unsigned block_of(int fiber) const { return static_cast<unsigned>(fiber) / threads_per_block; }
  unsigned char* smem_of(unsigned block) const {
    const auto base = reinterpret_cast<uintptr_t>(smem.get()) + block * smem_stride;
    return reinterpret_cast<unsigned char*>((base + 15) & ~uintptr_t(15));
  }
};

Cluster* g_cluster = nullptr;  // the cluster being run (launch() holds g_mutex)
std::mutex g_mutex;

void yield_to_scheduler() {
  Cluster& c = *g_cluster;
  if (_setjmp(c.fibers[c.current].resume) == 0) _longjmp(c.scheduler, 1);
}

void wait(Barrier& bar) {
  Cluster& c = *g_cluster;
  const uint64_t generation = bar.generation;
  ++bar.arrived;
  c.progress = true;
  while (bar.generation == generation) {
    const int exited = bar.exited;
    if (bar.strict && exited > 0 && c.error == nullptr)
      c.error = "a warp shuffle ran after a lane of its warp had exited";
    if (bar.arrived + exited == bar.size) {
      bar.arrived = 0;
      ++bar.generation;
      break;
    }
    yield_to_scheduler();  // after an error the scheduler stops and never resumes it
  }
}

void fiber_main() {
  Cluster& c = *g_cluster;
  (*c.kernel)();
  if (c.error == nullptr && c.block_barriers[c.block_of(c.current)].arrived > 0)
    c.error = "a thread exited while others waited for it at __syncthreads";
  if (c.error == nullptr && c.cluster_barrier.arrived > 0)
    c.error = "a thread exited while others waited for it at a cluster barrier";
  c.fibers[c.current].done = true;
  ++c.block_barriers[c.block_of(c.current)].exited;
  ++c.warp_barriers[c.current / kWarpSize].exited;
  ++c.cluster_barrier.exited;
  c.progress = true;
  _longjmp(c.scheduler, 1);  // never returns: the scheduler does not resume finished fibers
}

void set_coordinates(const Cluster& c, unsigned first_block, int fiber) {
  blockIdx = dim3(first_block + c.block_of(fiber));
  threadIdx = dim3(static_cast<unsigned>(fiber) % c.threads_per_block);
}

const char* run_cluster(Cluster& c, unsigned first_block) {
  const int total = static_cast<int>(c.fibers.size());
  ucontext_t blank;
  getcontext(&blank);  // once: getcontext is a system call
  for (int f = 0; f < total; ++f) {
    Fiber& fiber = c.fibers[f];
    fiber.done = false;
    fiber.started = false;
    fiber.start = blank;
    fiber.start.uc_stack.ss_sp = c.stacks.get() + f * kStackBytes;
    fiber.start.uc_stack.ss_size = kStackBytes;
    fiber.start.uc_link = nullptr;
    makecontext(&fiber.start, fiber_main, 0);
  }
  const int per_block = static_cast<int>(c.threads_per_block);
  for (unsigned b = 0; b < c.blocks; ++b) c.block_barriers[b] = {static_cast<int>(b) * per_block, per_block};
  for (size_t w = 0; w < c.warp_barriers.size(); ++w)
    c.warp_barriers[w] = {static_cast<int>(w) * kWarpSize, kWarpSize, true};
  c.cluster_barrier = {0, total};
  // Fill shared memory with NaN bytes: a read before any write shows up in the results.
  std::memset(c.smem.get(), 0xff, c.smem_stride * c.blocks);
  for (int live = total; live > 0;) {
    c.progress = false;
    live = 0;
    for (int f = 0; f < total; ++f) {
      if (c.fibers[f].done) continue;
      c.current = f;
      set_coordinates(c, first_block, f);
      Fiber& fiber = c.fibers[f];
      if (_setjmp(c.scheduler) == 0) {
        if (fiber.started) _longjmp(fiber.resume, 1);
        fiber.started = true;
        swapcontext(&c.scheduler_start, &fiber.start);  // runs until its first switch back
      }
      if (c.error != nullptr) return c.error;
      live += !c.fibers[f].done;
    }
    if (live > 0 && !c.progress) return "deadlock: threads wait at a barrier others never reach";
  }
  return nullptr;
}

}  // namespace

const char* launch(dim3 grid, dim3 block, size_t dynamic_smem, const std::function<void()>& kernel,
                   unsigned cluster) {
  if (block.y != 1 || block.z != 1 || grid.y != 1 || grid.z != 1) return "emulator: 1-D launches only";
  if (block.x == 0 || block.x > 1024 || block.x % kWarpSize != 0)
    return "emulator: block size must be a multiple of 32 in [32, 1024]";
  if (cluster == 0 || cluster > 16 || grid.x % cluster != 0)
    return "emulator: the grid must be a whole number of clusters of 1 to 16 blocks";
  std::lock_guard<std::mutex> lock(g_mutex);
  Cluster c;
  c.threads_per_block = block.x;
  c.blocks = cluster;
  const size_t fibers = size_t(block.x) * cluster;
  c.fibers.resize(fibers);
  c.stacks.reset(new char[fibers * kStackBytes]);
  c.block_barriers.resize(cluster);
  c.warp_barriers.resize(fibers / kWarpSize);
  c.shuffle_slots.resize(fibers);
  c.smem_stride = (dynamic_smem + 31) & ~size_t(15);
  c.smem.reset(new unsigned char[c.smem_stride * cluster]);
  c.kernel = &kernel;
  g_cluster = &c;
  blockDim = block;
  gridDim = grid;
  const char* error = nullptr;
  for (unsigned first = 0; first < grid.x && error == nullptr; first += cluster) {
    error = run_cluster(c, first);
  }
  g_cluster = nullptr;
  return error;
}

void sync_threads() {
  Cluster& c = *g_cluster;
  wait(c.block_barriers[c.block_of(c.current)]);
}

void sync_warp() {
  Cluster& c = *g_cluster;
  wait(c.warp_barriers[c.current / kWarpSize]);
}

void sync_cluster() { wait(g_cluster->cluster_barrier); }

uint32_t shuffle_xor_bits(uint32_t value, int lane_mask) {
  Cluster& c = *g_cluster;
  const int self = c.current;
  const int source = (self & ~(kWarpSize - 1)) | ((self % kWarpSize) ^ (lane_mask & (kWarpSize - 1)));
  c.shuffle_slots[self] = value;
  sync_warp();  // every lane has published its value
  const uint32_t result = c.shuffle_slots[source];
  sync_warp();  // every lane has read before any lane publishes again
  return result;
}

unsigned char* dynamic_shared_memory() {
  Cluster& c = *g_cluster;
  return c.smem_of(c.block_of(c.current));
}

unsigned cluster_rank() {
  Cluster& c = *g_cluster;
  return c.block_of(c.current);
}

unsigned char* map_shared_rank(unsigned char* address, unsigned rank) {
  Cluster& c = *g_cluster;
  const unsigned char* own = c.smem_of(c.block_of(c.current));
  if (rank >= c.blocks || address < own || address >= own + c.smem_stride) {
    if (c.error == nullptr) c.error = "map_shared_rank: not this block's shared memory, or no such rank";
    return address;
  }
  return c.smem_of(rank) + (address - own);
}

}  // namespace kd::emu
