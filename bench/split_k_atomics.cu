// Could the layer kernel drop its fourth grid barrier (between gate/up and
// down) by splitting the down projection along its input? Each block would
// multiply its own slice of the SwiGLU output by the matching rows of a
// transposed W_down and add its partial sums, a whole hidden vector, into the
// layer's output with atomics; the kernel's end orders them before the next
// layer reads. This probe asks what those atomics cost against the barrier
// they replace, while the weights stream.
//
// A simulated decode: 22 "layers" of 88 MB (TinyLlama's), tiles of 32 KiB
// dealt round the grid, a ring of 6 slots per SM as in l2_stall.cu; the
// reading warp spends WORK ns on each tile (the computing warps' pace: about
// 1 300 ns a tile matches HBM). Once a layer each block, in mode
//   0  does nothing more (the stream alone)
//   1  crosses a grid barrier three quarters into the layer (the layer
//      kernel's: fence, atomicAdd, poll with acquire loads)
//   2  adds 2 048 floats into the layer's output at its end, red.add.f32
//   3  the same as 512 red.add.v4.f32 (sm_90)
//   4  the same as 2 048 64-bit fixed-point integers, red.add.u64: integer
//      sums do not depend on the order of the additions, so the result
//      would stay the same from run to run, as float atomics' does not
// and the probe checks that every sum came out right. It runs the 22 layers
// as one kernel, and again as one launch a layer, as the layer kernel runs:
// there the next launch starts only once the atomics have landed, where in
// one kernel the next layer's stream hides them.
//
// Not part of the build: a probe for a GPU machine with nvcc.
//
//   nvcc -O3 -arch=sm_90 bench/split_k_atomics.cu -o /tmp/split_k && /tmp/split_k
//
// Results: results/h100/split_k_atomics_probe.txt (section 22 of the experiments file).
#include <cstdio>
#include <vector>
#include <algorithm>
#include "ring_ptx.cuh"
constexpr int SLOTS = 6, ROW = 4096, ROWS = 8, TILE = ROW * ROWS, LAYERS = 22, HIDDEN = 2048;
constexpr long LAYER_BYTES = 88l << 20, LAYER_TILES = LAYER_BYTES / TILE;
constexpr double FIXED_ONE = 4294967296.0;  // 2^32: the fixed-point scale of mode 4

__device__ __forceinline__ unsigned load_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// One block's partial sums of a hidden vector (every value 1), added into
// `out` by the warp's 32 lanes in the given mode.
__device__ __forceinline__ void add_partials(float* out, unsigned long long* fixed, int mode, int lane) {
  if (mode == 2) {
    for (int i = lane; i < HIDDEN; i += 32) asm volatile("red.global.add.f32 [%0], %1;" ::"l"(out + i), "f"(1.f) : "memory");
  } else if (mode == 3) {
    for (int i = 4 * lane; i < HIDDEN; i += 128)
      asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(out + i), "f"(1.f), "f"(1.f), "f"(1.f),
                   "f"(1.f) : "memory");
  } else if (mode == 4) {
    const unsigned long long one = 1ull << 32;
    for (int i = lane; i < HIDDEN; i += 32)
      asm volatile("red.global.add.u64 [%0], %1;" ::"l"(fixed + i), "l"(one) : "memory");
  }
}

// Layers first, first + 1, ..., first + count - 1.
__global__ void __launch_bounds__(64, 1) layers(const char* src, int first, int count_layers, int mode,
                                                 unsigned work_ns, unsigned* count, float* out,
                                                 unsigned long long* fixed, int* sink, u64* times) {
  extern __shared__ __align__(128) char ring[];
  __shared__ __align__(8) u64 full[SLOTS], empty[SLOTS];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  ring_began(full, empty, SLOTS, times);
  const long per_layer = LAYER_TILES / gridDim.x, mine = per_layer * count_layers;
  auto address = [&](long i) {
    return src + ((first + i / per_layer) * LAYER_TILES + blockIdx.x + (i % per_layer) * gridDim.x) * (long)TILE;
  };
  if (warp == 1) {  // the copying warp
    for (long i = 0; i < mine; i++) {
      const int slot = i % SLOTS;
      if (i >= SLOTS) {
        const unsigned parity = ((i / SLOTS) & 1) ^ 1;
        while (!__shfl_sync(~0u, lane == 0 ? mbar_test(&empty[slot], parity) : 0, 0)) {
        }
      }
      if (lane == 0) mbar_expect(&full[slot], TILE);
      __syncwarp();
      if (lane < ROWS) bulk_copy(ring + slot * TILE + lane * ROW, address(i) + lane * ROW, ROW, &full[slot]);
    }
  } else {  // the reading warp
    int acc = 0;
    for (long i = 0; i < mine; i++) {
      const int slot = i % SLOTS;
      const long layer = first + i / per_layer, in_layer = i % per_layer;
      mbar_spin(&full[slot], (i / SLOTS) & 1);
      acc += reinterpret_cast<const int*>(ring + slot * TILE)[lane];
      const u64 start = now();
      while (now() - start < work_ns) {
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(&empty[slot]);
      if (mode == 1 && in_layer == 3 * per_layer / 4) {
        if (lane == 0) {
          __threadfence();
          atomicAdd(count, 1);
          const unsigned target = (layer + 1) * gridDim.x;
          while (load_acquire(count) < target) {
          }
        }
        __syncwarp();
      }
      if (in_layer == per_layer - 1) add_partials(out + layer * HIDDEN, fixed + layer * HIDDEN, mode, lane);
    }
    reader_done(acc, sink, times);
  }
}

int main() {
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  const long bytes = LAYERS * LAYER_BYTES;
  char* src; int* sink; u64* times; unsigned* count; float* out; unsigned long long* fixed;
  cudaMalloc(&src, bytes); cudaMalloc(&sink, 4); cudaMalloc(&times, 2 * sms * sizeof(u64));
  cudaMalloc(&count, 4); cudaMalloc(&out, LAYERS * HIDDEN * 4); cudaMalloc(&fixed, LAYERS * HIDDEN * 8);
  cudaMemset(src, 1, bytes);
  std::vector<u64> host(2 * sms);
  std::vector<float> sums(LAYERS * HIDDEN);
  std::vector<unsigned long long> fixed_sums(LAYERS * HIDDEN);
  const int smem = SLOTS * TILE;
  cudaFuncSetAttribute(layers, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  bool all_right = true;
  cudaEvent_t begin, end;
  cudaEventCreate(&begin); cudaEventCreate(&end);
  // us per layer: in one kernel, from the first block's start to the last
  // block's end; launched a layer at a time, between events around the 22
  // launches (their gaps included, the same for every mode).
  auto timed = [&](int mode, unsigned work, bool per_layer_launch) {
    std::vector<double> r;
    for (int rep = 0; rep < 5; rep++) {
      cudaMemset(count, 0, 4); cudaMemset(out, 0, LAYERS * HIDDEN * 4); cudaMemset(fixed, 0, LAYERS * HIDDEN * 8);
      if (per_layer_launch) {
        cudaEventRecord(begin);
        for (int l = 0; l < LAYERS; l++)
          layers<<<sms, 64, smem>>>(src, l, 1, mode, work, count, out, fixed, sink, times);
        cudaEventRecord(end);
        cudaEventSynchronize(end);
        float ms = 0.f;
        cudaEventElapsedTime(&ms, begin, end);
        r.push_back(ms * 1e3 / LAYERS);
      } else {
        layers<<<sms, 64, smem>>>(src, 0, LAYERS, mode, work, count, out, fixed, sink, times);
        cudaMemcpy(host.data(), times, host.size() * sizeof(u64), cudaMemcpyDeviceToHost);
        u64 first = ~0ull, last = 0;
        for (int b = 0; b < sms; b++) { first = std::min(first, host[2 * b]); last = std::max(last, host[2 * b + 1]); }
        r.push_back((last - first) / 1e3 / LAYERS);
      }
      cudaMemcpy(sums.data(), out, sums.size() * 4, cudaMemcpyDeviceToHost);
      cudaMemcpy(fixed_sums.data(), fixed, fixed_sums.size() * 8, cudaMemcpyDeviceToHost);
      for (int i = 0; i < LAYERS * HIDDEN; i++) {
        const double want = (mode == 2 || mode == 3) ? sms : 0;
        const double want_fixed = mode == 4 ? sms : 0;
        all_right &= sums[i] == want && fixed_sums[i] / FIXED_ONE == want_fixed;
      }
    }
    std::sort(r.begin(), r.end());
    return r[2];
  };
  const char* names[] = {"stream alone", "grid barrier", "red.add.f32 x 2048", "red.add.v4.f32 x 512",
                         "red.add.u64 x 2048"};
  printf("%d layers of %ld MB on %d SMs, ring %d x %d KiB; us per layer (median of 5)\n", LAYERS,
         LAYER_BYTES >> 20, sms, SLOTS, TILE / 1024);
  for (bool per_layer_launch : {false, true}) {
    printf(per_layer_launch ? "one launch a layer (its gaps included):\n" : "one kernel for all layers:\n");
    for (unsigned work : {0u, 1000u, 1300u}) {
      const double alone = timed(0, work, per_layer_launch);
      printf("reader %4u ns a tile: %-22s %7.2f us\n", work, names[0], alone);
      for (int mode = 1; mode <= 4; mode++) {
        const double t = timed(mode, work, per_layer_launch);
        printf("                      %-22s %7.2f us  %+.2f us\n", names[mode], t, t - alone);
      }
    }
  }
  printf("sums %s; %s\n", all_right ? "all right" : "WRONG", cudaGetErrorString(cudaDeviceSynchronize()));
  return 0;
}
