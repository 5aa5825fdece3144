// The host CUDA emulator's scheduler (see kd_cuda_emulator.h): one fiber per thread of a block,
// switched cooperatively at barriers and shuffles.
#include "kd_cuda_emulator.h"

#include <ucontext.h>

#include <memory>
#include <mutex>
#include <vector>

namespace kd::emu {
namespace {

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = size_t(128) << 10;

// Threads [first, first + size) meet here; exited threads count as arrived unless `strict`.
struct Barrier {
  int first = 0, size = 0;
  bool strict = false;  // warp shuffles: every lane must still be running
  int arrived = 0;
  uint64_t generation = 0;
};

struct Fiber {
  ucontext_t context;
  bool done = false;
};

struct Block {
  std::vector<Fiber> fibers;
  std::unique_ptr<char[]> stacks;
  ucontext_t scheduler;
  int current = 0;
  bool progress = false;
  const char* error = nullptr;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<uint32_t> shuffle_slots;
  std::vector<unsigned char> dynamic_smem;
  const std::function<void()>* kernel = nullptr;
};

Block* g_block = nullptr;  // the block being run (launch() holds g_mutex)
std::mutex g_mutex;

void yield_to_scheduler() {
  Block& b = *g_block;
  swapcontext(&b.fibers[b.current].context, &b.scheduler);
}

int exited_in(const Barrier& bar) {
  int exited = 0;
  for (int t = bar.first; t < bar.first + bar.size; ++t) exited += g_block->fibers[t].done;
  return exited;
}

void wait(Barrier& bar) {
  Block& b = *g_block;
  const uint64_t generation = bar.generation;
  ++bar.arrived;
  b.progress = true;
  while (bar.generation == generation) {
    const int exited = exited_in(bar);
    if (bar.strict && exited > 0 && b.error == nullptr)
      b.error = "a warp shuffle ran after a lane of its warp had exited";
    if (bar.arrived + exited == bar.size) {
      bar.arrived = 0;
      ++bar.generation;
      break;
    }
    yield_to_scheduler();  // after an error the scheduler stops and never resumes it
  }
}

void fiber_main() {
  Block& b = *g_block;
  (*b.kernel)();
  if (b.block_barrier.arrived > 0 && b.error == nullptr)
    b.error = "a thread exited while others waited for it at __syncthreads";
  b.fibers[b.current].done = true;
  b.progress = true;
  // Returning resumes the scheduler through uc_link.
}

const char* run_block(Block& b, unsigned threads) {
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = b.fibers[t];
    f.done = false;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = b.stacks.get() + t * kStackBytes;
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &b.scheduler;
    makecontext(&f.context, fiber_main, 0);
  }
  b.block_barrier = {0, static_cast<int>(threads), false, 0, 0};
  for (unsigned w = 0; w < b.warp_barriers.size(); ++w)
    b.warp_barriers[w] = {static_cast<int>(w) * kWarpSize, kWarpSize, true, 0, 0};
  // Fill dynamic shared memory with NaN bytes: a read before any write shows up in the results.
  std::memset(b.dynamic_smem.data(), 0xff, b.dynamic_smem.size());
  for (unsigned live = threads; live > 0;) {
    b.progress = false;
    live = 0;
    for (unsigned t = 0; t < threads; ++t) {
      if (b.fibers[t].done) continue;
      b.current = static_cast<int>(t);
      threadIdx = dim3(t);
      swapcontext(&b.scheduler, &b.fibers[t].context);
      if (b.error != nullptr) return b.error;
      live += !b.fibers[t].done;
    }
    if (live > 0 && !b.progress) return "deadlock: threads wait at a barrier others never reach";
  }
  return nullptr;
}

Barrier& warp_barrier() {
  Block& b = *g_block;
  return b.warp_barriers[b.current / kWarpSize];
}

}  // namespace

const char* launch(dim3 grid, dim3 block, size_t dynamic_smem, const std::function<void()>& kernel) {
  if (block.y != 1 || block.z != 1 || grid.y != 1 || grid.z != 1) return "emulator: 1-D launches only";
  if (block.x == 0 || block.x > 1024 || block.x % kWarpSize != 0)
    return "emulator: block size must be a multiple of 32 in [32, 1024]";
  std::lock_guard<std::mutex> lock(g_mutex);
  Block b;
  b.fibers.resize(block.x);
  b.stacks.reset(new char[block.x * kStackBytes]);
  b.warp_barriers.resize(block.x / kWarpSize);
  b.shuffle_slots.resize(block.x);
  b.dynamic_smem.resize(dynamic_smem + 16);
  b.kernel = &kernel;
  g_block = &b;
  blockDim = block;
  gridDim = grid;
  const char* error = nullptr;
  for (unsigned i = 0; i < grid.x && error == nullptr; ++i) {
    blockIdx = dim3(i);
    error = run_block(b, block.x);
  }
  g_block = nullptr;
  return error;
}

void sync_threads() { wait(g_block->block_barrier); }

void sync_warp() { wait(warp_barrier()); }

uint32_t shuffle_xor_bits(uint32_t value, int lane_mask) {
  Block& b = *g_block;
  const int self = b.current;
  const int source = (self & ~(kWarpSize - 1)) | ((self % kWarpSize) ^ (lane_mask & (kWarpSize - 1)));
  b.shuffle_slots[self] = value;
  wait(warp_barrier());  // every lane has published its value
  const uint32_t result = b.shuffle_slots[source];
  wait(warp_barrier());  // every lane has read before any lane publishes again
  return result;
}

unsigned char* dynamic_shared_memory() {
  auto address = reinterpret_cast<uintptr_t>(g_block->dynamic_smem.data());
  return reinterpret_cast<unsigned char*>((address + 15) & ~uintptr_t(15));
}

}  // namespace kd::emu
