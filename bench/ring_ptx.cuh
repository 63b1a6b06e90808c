// The PTX the ring probes share (bench/l2_stream.cu, bench/l2_stall.cu,
// bench/split_k_atomics.cu):
// shared-memory addresses, mbarriers, bulk copies into shared memory, and
// the GPU's global timer, as the layer kernel (shared/src/kernels/decode.cu)
// uses them; and the probes' per-block clock.
#pragma once
typedef unsigned long long u64;

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(u64* b, unsigned n) {
  asm volatile("mbarrier.init.shared.b64 [%0], %1;" ::"r"(smem_addr(b)), "r"(n) : "memory");
}

// Thread 0 readies a ring's `slots` pairs of barriers, "full" (the copy
// engine's bytes arrived) and "empty" (the readers are done), one arrival
// each, and makes them visible to the copy engine; the block must meet at
// __syncthreads() before using them.
__device__ __forceinline__ void ring_barriers_init(u64* full, u64* empty, int slots) {
  if (threadIdx.x == 0) {
    for (int s = 0; s < slots; s++) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], 1);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
}

// Whether phase `parity` of barrier `b` has completed (test_wait: no
// suspension), and a spin on it.
__device__ __forceinline__ bool mbar_test(u64* b, unsigned parity) {
  unsigned done;
  asm volatile(
      "{ .reg .pred p; mbarrier.test_wait.parity.shared.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
      : "=r"(done) : "r"(smem_addr(b)), "r"(parity) : "memory");
  return done;
}
__device__ __forceinline__ void mbar_spin(u64* b, unsigned parity) {
  while (!mbar_test(b, parity)) {
  }
}

__device__ __forceinline__ void mbar_arrive(u64* b) {
  asm volatile("{ .reg .b64 s; mbarrier.arrive.shared.b64 s, [%0]; }" ::"r"(smem_addr(b)) : "memory");
}

__device__ __forceinline__ void mbar_expect(u64* b, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(b)), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void bulk_copy(void* dst, const void* src, unsigned bytes, u64* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
          smem_addr(dst)), "l"(src), "r"(bytes), "r"(smem_addr(bar)) : "memory");
}

__device__ __forceinline__ u64 now() {
  u64 t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}

// The probes' clock: times[2b] when block b began, times[2b + 1] when its
// reading warp finished (ns, the global timer), so that launch gaps are not
// timed. `acc`, the reader's checksum of what it read, is stored only if it
// holds a value no run gives: enough to keep the reads from being optimised
// away.
__device__ __forceinline__ void block_began(u64* times) {
  if (threadIdx.x == 0) times[2 * blockIdx.x] = now();
}
__device__ __forceinline__ void reader_done(int acc, int* sink, u64* times) {
  if (acc == 0x12345678) *sink = acc;
  if (threadIdx.x % 32 == 0) times[2 * blockIdx.x + 1] = now();
}

// A probe block's start: its ring's barriers readied and seen by every
// thread, and its clock started.
__device__ __forceinline__ void ring_began(u64* full, u64* empty, int slots, u64* times) {
  ring_barriers_init(full, empty, slots);
  __syncthreads();
  block_began(times);
}
