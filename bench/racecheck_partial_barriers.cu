// Does racecheck honour a named barrier of part of a block while the rest
// of the block is still running (the layer kernel's shape: 15 computing
// warps meet at bar.sync 4, 480 while the copying warp keeps copying)?
// And does it honour mbarrier ordering of bulk copies (the weight ring)?
// mode 0: warps 0-3 ordered by bar.sync id, 128; warp 4 alive, meeting
//         them only at the kernel's end (__syncthreads)
// mode 1: as 0, but warp 4 exits at once (the shape racecheck_layer_shapes.cu tried)
// mode 2: as 0 without the named barriers (a real race)
// mode 3: a ring of one slot: warp 4 bulk-copies into it, warps 0-3 wait on
//         its "full" mbarrier, read it, arrive on "empty", which warp 4
//         waits for before the next copy (ordered)
//
// Not part of the build: a probe for a GPU machine with nvcc, run under
// compute-sanitizer's racecheck, one mode at a time:
//
//   nvcc -arch=sm_90 -lineinfo bench/racecheck_partial_barriers.cu -o /tmp/probe
//   compute-sanitizer --tool racecheck /tmp/probe MODE
//
// Results: results/h100/racecheck_probe.txt (section 21 of the experiments file).
#include <cstdio>
#include <cstdlib>
typedef unsigned long long u64;
__device__ __forceinline__ unsigned sa(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void named_sync(int id, int n) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(n) : "memory");
}
__device__ __forceinline__ void mbar_wait(u64* b, unsigned parity) {
  unsigned done = 0;
  while (!done)
    asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                 : "=r"(done) : "r"(sa(b)), "r"(parity) : "memory");
}
__global__ void patterns(int* out, const int* src, int mode) {
  __shared__ int xs[128];
  __shared__ __align__(128) int slot[128];
  __shared__ __align__(8) u64 full, empty;
  const int t = threadIdx.x;
  if (t == 0) {
    asm volatile("mbarrier.init.shared.b64 [%0], 1;" ::"r"(sa(&full)) : "memory");
    asm volatile("mbarrier.init.shared.b64 [%0], 128;" ::"r"(sa(&empty)) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (t >= 128) {  // the "copying" warp
    if (mode == 1) return;
    if (mode == 3 && t == 128)
      for (int item = 0; item < 3; item++) {
        if (item > 0) mbar_wait(&empty, (item - 1) & 1);
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], 512;" ::"r"(sa(&full)) : "memory");
        asm volatile(
            "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], 512, [%2];" ::"r"(
                sa(slot)), "l"(src + item * 128), "r"(sa(&full)) : "memory");
      }
  } else {
    for (int item = 0; item < 3; item++) {
      if (mode == 3) {
        mbar_wait(&full, item & 1);
        out[item * 128 + t] = slot[127 - t];
        asm volatile("{ .reg .b64 s; mbarrier.arrive.shared.b64 s, [%0]; }" ::"r"(sa(&empty)) : "memory");
      } else {
        xs[t] = t + item;
        if (mode != 2) named_sync(1 + t / 128, 128);
        out[item * 128 + t] = xs[127 - t];
        if (mode != 2) named_sync(2, 128);
      }
    }
  }
  if (mode != 1) __syncthreads();
}
int main(int argc, char** argv) {
  const int mode = argc > 1 ? atoi(argv[1]) : 0;
  int *out, *src;
  cudaMalloc(&out, 3 * 128 * sizeof(int));
  cudaMalloc(&src, 3 * 128 * sizeof(int));
  cudaMemset(src, 0, 3 * 128 * sizeof(int));
  patterns<<<1, 160>>>(out, src, mode);
  printf("mode %d: %s\n", mode, cudaGetErrorString(cudaDeviceSynchronize()));
  return 0;
}
