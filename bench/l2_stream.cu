// Does a tile stream like the layer kernel's ring read faster from L2 than
// from HBM? Each block of one per SM copies its tiles (8 rows of 4 KiB,
// one bulk copy per row, as decode_layer does) through a ring of 6 slots in
// shared memory; one warp copies, one warp waits for each tile and frees its
// slot (no arithmetic: the stream alone). Tiles are dealt round the grid.
//   cold:         after reading 1 GiB of other data (L2 flushed)
//   warm:         right after the same stream (what fits in L2 is there)
//   warm-shifted: warm, but every tile read by the next block over, so a line
//                 cached for one SM is read by another
//   prefetched:   after a kernel of bulk L2 prefetches of the same bytes
//
// Not part of the build: a probe for a GPU machine with nvcc.
//
//   nvcc -O3 -arch=sm_90 bench/l2_stream.cu -o /tmp/l2_stream && /tmp/l2_stream
//
// Results: results/h100/l2_stream_probe.txt (section 21 of the experiments file).
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>
#include "ring_ptx.cuh"
constexpr int SLOTS = 6, ROW = 4096, ROWS = 8, TILE = ROW * ROWS;

__device__ __forceinline__ void mbar_wait(u64* b, unsigned parity) {
  unsigned done = 0;
  while (!done)
    asm volatile(
        "{ .reg .pred p; mbarrier.try_wait.parity.shared.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
        : "=r"(done) : "r"(smem_addr(b)), "r"(parity) : "memory");
}

// times[2b], times[2b + 1]: when block b started streaming and when its last
// tile was read (ns, the GPU's global timer), so that launch gaps are not timed.
__global__ void __launch_bounds__(64, 1) stream(const char* src, long tiles, int shift, int* sink,
                                                 u64* times) {
  extern __shared__ __align__(128) char ring[];
  __shared__ __align__(8) u64 full[SLOTS], empty[SLOTS];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  ring_began(full, empty, SLOTS, times);
  const int block = (blockIdx.x + shift) % gridDim.x;
  const long mine = tiles > block ? (tiles - block + gridDim.x - 1) / gridDim.x : 0;
  if (warp == 1) {  // the copying warp
    for (long i = 0; i < mine; i++) {
      const int slot = i % SLOTS;
      if (i >= SLOTS) mbar_wait(&empty[slot], ((i / SLOTS) & 1) ^ 1);
      if (lane == 0) mbar_expect(&full[slot], TILE);
      __syncwarp();
      const char* tile = src + (block + i * gridDim.x) * (long)TILE;
      if (lane < ROWS) bulk_copy(ring + slot * TILE + lane * ROW, tile + lane * ROW, ROW, &full[slot]);
    }
  } else {  // the reading warp: waits for each tile, touches it, frees the slot
    int acc = 0;
    for (long i = 0; i < mine; i++) {
      const int slot = i % SLOTS;
      mbar_wait(&full[slot], (i / SLOTS) & 1);
      acc += reinterpret_cast<const int*>(ring + slot * TILE)[lane];
      __syncwarp();
      if (lane == 0) mbar_arrive(&empty[slot]);
    }
    reader_done(acc, sink, times);
  }
}

__global__ void spin(u64 ns) {
  const u64 start = now();
  while (now() - start < ns) {
  }
}

__global__ void prefetch(const char* src, long tiles) {
  // each block prefetches its own tiles, whole, into L2
  for (long t = blockIdx.x + (long)threadIdx.x * gridDim.x; t < tiles; t += (long)blockDim.x * gridDim.x)
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(src + t * TILE), "r"(TILE) : "memory");
}

__global__ void flush(const int4* p, long n, int* sink) {
  int4 acc = make_int4(0, 0, 0, 0);
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
    int4 v = p[i];
    acc.x ^= v.x;
  }
  if (acc.x == 0x12345678) *sink = acc.x;
}

int main() {
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  const long max_bytes = 64l << 20, flush_bytes = 1l << 30;
  char* src; int4* junk; int* sink; u64* times;
  cudaMalloc(&src, max_bytes); cudaMalloc(&junk, flush_bytes); cudaMalloc(&sink, 4);
  cudaMalloc(&times, 2 * sms * sizeof(u64));
  std::vector<u64> host(2 * sms);
  cudaMemset(src, 1, max_bytes); cudaMemset(junk, 2, flush_bytes);
  const int smem = SLOTS * TILE;
  cudaFuncSetAttribute(stream, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  // microseconds from the first block's start to the last block's end
  auto timed = [&](long tiles, int shift) {
    stream<<<sms, 64, smem>>>(src, tiles, shift, sink, times);
    cudaMemcpy(host.data(), times, host.size() * sizeof(u64), cudaMemcpyDeviceToHost);
    u64 first = ~0ull, last = 0;
    for (int b = 0; b < sms; b++) {
      first = std::min(first, host[2 * b]);
      last = std::max(last, host[2 * b + 1]);
    }
    return (last - first) / 1e3;
  };
  auto do_flush = [&] { flush<<<sms * 4, 512>>>(junk, flush_bytes / 16, sink); };
  printf("tile stream on %d SMs: GB/s, first block's start to last block's end (median of 7)\n", sms);
  printf("%8s %8s %8s %8s %8s\n", "MB", "cold", "warm", "shifted", "prefetch");
  for (long mb : {8, 16, 24, 32, 40, 48, 64}) {
    const long tiles = (mb << 20) / TILE;
    std::vector<double> r[4];
    for (int rep = 0; rep < 7; rep++) {
      do_flush(); r[0].push_back(timed(tiles, 0));
      timed(tiles, 0); r[1].push_back(timed(tiles, 0));
      timed(tiles, 0); r[2].push_back(timed(tiles, 1));
      do_flush(); prefetch<<<sms, 32>>>(src, tiles); spin<<<1, 1>>>(100000); cudaDeviceSynchronize();
      r[3].push_back(timed(tiles, 0));
    }
    printf("%8ld", mb);
    for (auto& v : r) {
      std::sort(v.begin(), v.end());
      printf(" %8.0f", (tiles * (double)TILE) / (v[3] * 1e3));
    }
    printf("\n");
  }
  cudaError_t e = cudaDeviceSynchronize();
  printf("%s\n", cudaGetErrorString(e));
  return 0;
}
