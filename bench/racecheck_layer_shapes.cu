// Does racecheck honour named barriers with a thread count (bar.sync id, n)
// in the layer kernel's patterns? Warps 0-3 take part; warp 4 passes the
// block-wide barrier and exits at once (the layer kernel's copying warp
// exits only when its copies are issued: racecheck_partial_barriers.cu
// keeps it running).
// mode 0: every exchange ordered by a named barrier (correct);
// mode 1: the barriers left out (a real race, for comparison).
//
// Not part of the build: a probe for a GPU machine with nvcc, run under
// compute-sanitizer's racecheck, one mode at a time:
//
//   nvcc -arch=sm_90 -lineinfo bench/racecheck_layer_shapes.cu -o /tmp/probe
//   compute-sanitizer --tool racecheck /tmp/probe MODE
//
// Results: results/h100/racecheck_probe.txt (section 21 of the experiments file).
#include <cstdio>
#include <cstdlib>
__device__ __forceinline__ void named_sync(int id, int n, int mode) {
  if (mode == 0) asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(n) : "memory");
}
__global__ void patterns(int* out, unsigned* counter, int mode) {
  __shared__ int flag[1];
  __shared__ int xs[128];
  const int t = threadIdx.x;
  __syncthreads();
  if (t >= 128) return;  // the "copying" warp
  const int part = 1 + t / 128;  // a barrier id known only at run time, as the layer kernel's
  for (int item = 0; item < 3; item++) {
    // the attention merge's flag: thread 0 writes, all read
    named_sync(part, 128, mode);
    if (t == 0) {
      __threadfence();
      flag[0] = atomicAdd(counter, 1u) % 2;
      __threadfence();
    }
    named_sync(part, 128, mode);
    if (flag[0]) out[item * 128 + t] = 1;
    named_sync(part, 128, mode);
    // the staging: all write, all read another thread's element
    xs[t] = t + item;
    named_sync(2, 128, mode);
    out[384 + item * 128 + t] = xs[127 - t];
    // the grid barrier's shape: thread 0 spins, then everyone meets
    named_sync(2, 128, mode);
    if (t == 0) {
      atomicAdd(counter + 1, 1u);
      while (atomicAdd(counter + 1, 0u) < (unsigned)(item + 1)) {
      }
    }
    named_sync(2, 128, mode);
  }
}
int main(int argc, char** argv) {
  const int mode = argc > 1 ? atoi(argv[1]) : 0;
  int* out; unsigned* counter;
  cudaMalloc(&out, 6 * 128 * sizeof(int));
  cudaMalloc(&counter, 2 * sizeof(unsigned));
  cudaMemset(counter, 0, 2 * sizeof(unsigned));
  patterns<<<1, 160>>>(out, counter, mode);
  printf("mode %d: %s\n", mode, cudaGetErrorString(cudaDeviceSynchronize()));
  return 0;
}
