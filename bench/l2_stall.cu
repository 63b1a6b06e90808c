// Can the ring's copying warp keep HBM busy while the computing warps stall
// at a barrier, by pulling the tiles it cannot yet copy (its ring is full)
// into L2, so that they are copied from L2 once slots free? A simulated
// decode: 22 "layers" of 88 MB (TinyLlama's), tiles of 32 KiB dealt round
// the grid, a ring of 6 slots per SM; the reading warp stalls P us four times
// a layer (the barriers and attention). While the ring is full the copying
// warp, in mode
//   0  waits (today's kernel)
//   1  issues cp.async.bulk.prefetch.L2 of the next tile not yet copied
//   2  reads the next tile with ld.global.L2::256B, one 4-byte load per 256 bytes
//      (the load's sector is discarded; the 256-byte L2 fill is what counts)
//   3  issues prefetch.global.L2 for every 128-byte line of the next tile
// at most AHEAD tiles past the next one it will copy.
//
// Not part of the build: a probe for a GPU machine with nvcc.
//
//   nvcc -O3 -arch=sm_90 bench/l2_stall.cu -o /tmp/l2_stall && /tmp/l2_stall
//
// Results: results/h100/l2_stall_probe.txt (section 21 of the experiments file).
#include <cstdio>
#include <vector>
#include <algorithm>
#include "ring_ptx.cuh"
constexpr int SLOTS = 6, ROW = 4096, ROWS = 8, TILE = ROW * ROWS, LAYERS = 22;
constexpr long LAYER_BYTES = 88l << 20, LAYER_TILES = LAYER_BYTES / TILE;


// Pulls `tile` toward L2 in the given mode (the whole warp calls it).
__device__ __forceinline__ unsigned pull(const char* tile, int mode, int lane) {
  unsigned acc = 0;
  if (mode == 1) {
    if (lane == 0)
      asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(tile), "r"(TILE) : "memory");
  } else if (mode == 2) {
    for (int k = 0; k < TILE / 256 / 32; k++) {
      unsigned v;
      asm volatile("ld.global.L2::256B.u32 %0, [%1];" : "=r"(v) : "l"(tile + (k * 32 + lane) * 256));
      acc ^= v;
    }
  } else if (mode == 3) {
    for (int k = 0; k < TILE / 128 / 32; k++)
      asm volatile("prefetch.global.L2 [%0];" ::"l"(tile + (k * 32 + lane) * 128));
  }
  return acc;
}

__global__ void __launch_bounds__(64, 1) layers(const char* src, int mode, int ahead, unsigned pause_ns,
                                                 int* sink, u64* times) {
  extern __shared__ __align__(128) char ring[];
  __shared__ __align__(8) u64 full[SLOTS], empty[SLOTS];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  ring_began(full, empty, SLOTS, times);
  const long per_layer = LAYER_TILES / gridDim.x, mine = per_layer * LAYERS;
  auto address = [&](long i) {
    return src + ((i / per_layer) * LAYER_TILES + blockIdx.x + (i % per_layer) * gridDim.x) * (long)TILE;
  };
  if (warp == 1) {  // the copying warp
    long pulled = 0;
    unsigned acc = 0;
    for (long i = 0; i < mine; i++) {
      const int slot = i % SLOTS;
      if (i >= SLOTS) {
        const unsigned parity = ((i / SLOTS) & 1) ^ 1;
        pulled = max(pulled, i);
        while (!__shfl_sync(~0u, lane == 0 ? mbar_test(&empty[slot], parity) : 0, 0)) {
          if (mode > 0 && pulled < min(mine, i + 1 + ahead)) acc ^= pull(address(pulled++), mode, lane);
        }
      }
      if (lane == 0) mbar_expect(&full[slot], TILE);
      __syncwarp();
      if (lane < ROWS) bulk_copy(ring + slot * TILE + lane * ROW, address(i) + lane * ROW, ROW, &full[slot]);
    }
    if (acc == 0x12345678) *sink = acc;
  } else {  // the reading warp: stalls four times a layer
    int acc = 0;
    const long quarter = max(1l, per_layer / 4);
    for (long i = 0; i < mine; i++) {
      const int slot = i % SLOTS;
      mbar_spin(&full[slot], (i / SLOTS) & 1);
      acc += reinterpret_cast<const int*>(ring + slot * TILE)[lane];
      __syncwarp();
      if (lane == 0) mbar_arrive(&empty[slot]);
      if (pause_ns && ((i % per_layer) + 1) % quarter == 0) {
        const u64 start = now();
        while (now() - start < pause_ns) {
        }
      }
    }
    reader_done(acc, sink, times);
  }
}

int main() {
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  const long bytes = LAYERS * LAYER_BYTES;
  char* src; int* sink; u64* times;
  cudaMalloc(&src, bytes); cudaMalloc(&sink, 4); cudaMalloc(&times, 2 * sms * sizeof(u64));
  cudaMemset(src, 1, bytes);
  std::vector<u64> host(2 * sms);
  const int smem = SLOTS * TILE;
  cudaFuncSetAttribute(layers, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  const long streamed = (LAYER_TILES / sms) * sms * (long)TILE * LAYERS;
  auto timed = [&](int mode, int ahead, unsigned pause) {
    std::vector<double> r;
    for (int rep = 0; rep < 5; rep++) {
      layers<<<sms, 64, smem>>>(src, mode, ahead, pause, sink, times);
      cudaMemcpy(host.data(), times, host.size() * sizeof(u64), cudaMemcpyDeviceToHost);
      u64 first = ~0ull, last = 0;
      for (int b = 0; b < sms; b++) { first = std::min(first, host[2 * b]); last = std::max(last, host[2 * b + 1]); }
      r.push_back((last - first) / 1e3 / LAYERS);
    }
    std::sort(r.begin(), r.end());
    return r[2];
  };
  printf("%d layers of %ld MB on %d SMs, ring %d x %d KiB; us per layer (median of 5), GB/s\n", LAYERS,
         LAYER_BYTES >> 20, sms, SLOTS, TILE / 1024);
  const double bare = timed(0, 0, 0);
  printf("no stalls                      %7.2f us  %5.0f GB/s\n", bare, streamed / LAYERS / (bare * 1e3));
  for (unsigned pause : {3000u, 5000u, 8000u}) {
    const double wait = timed(0, 0, pause);
    printf("stalls 4 x %u us: mode 0 (wait) %7.2f us  (stream + stalls would be %.2f)\n", pause / 1000, wait,
           bare + 4 * pause / 1e3);
    for (int mode : {1, 2, 3})
      for (int ahead : {4, 8, 16}) {
        const double t = timed(mode, ahead, pause);
        printf("   mode %d, ahead %2d            %7.2f us  %+.1f%%\n", mode, ahead, t, 100 * (t / wait - 1));
      }
  }
  printf("%s\n", cudaGetErrorString(cudaDeviceSynchronize()));
  return 0;
}
