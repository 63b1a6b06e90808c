// Which cuBLASLt algorithm is fastest for the decode step's matrix products
// at small batches (TinyLlama's shapes), against the one its heuristic ranks
// first. Not part of the build: a probe for a GPU machine with nvcc.
//
//   nvcc -O2 -arch=sm_90 bench/cublaslt_algos.cu -lcublasLt -o /tmp/cublaslt_algos
//   /tmp/cublaslt_algos
//
// out[M,N] = x[M,K] · W[N,K]ᵀ as the engine's products compute it (W read
// transposed, as PyTorch's `linear` asks cuBLAS). Each weight has eight
// copies, used in turn, so that they come from HBM as in a real step (an
// H100's L2 holds 50 MB). floor_us is the weights' bytes at 3.35 TB/s (an
// H100's HBM; an H200's is 4.8). Results: results/h200/cublaslt_algos_probe.txt.
#include <cublasLt.h>
#include <cuda_runtime.h>
#include <cstdio>
#include <vector>
#include <algorithm>
#define CK(x) do { auto e = (x); if (e != 0) { printf("err %d at %s:%d\n", (int)e, __FILE__, __LINE__); exit(1);} } while (0)
int main() {
  cublasLtHandle_t lt; CK(cublasLtCreate(&lt));
  size_t ws_bytes = 32 << 20; void* ws; CK(cudaMalloc(&ws, ws_bytes));
  struct Shape { const char* name; int n, k; } shapes[] = {
    {"qkv", 2560, 2048}, {"o", 2048, 2048}, {"gate_up", 11264, 2048}, {"down", 2048, 5632}};
  int ms[] = {2, 4, 8, 16, 32, 64, 128};
  const int copies = 8;  // rotate weights so L2 (50 MB) does not hold them
  cudaStream_t s; CK(cudaStreamCreate(&s));
  cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
  printf("%-8s %4s %9s %9s %9s %6s %s\n", "product", "M", "floor_us", "default", "best", "n_alg", "best algo (tile id, splitK, stages)");
  for (auto& sh : shapes) {
    size_t wbytes = (size_t)sh.n * sh.k * 2;
    std::vector<void*> w(copies);
    for (auto& p : w) { CK(cudaMalloc(&p, wbytes)); cudaMemset(p, 0, wbytes); }
    void *x, *out; CK(cudaMalloc(&x, (size_t)128 * sh.k * 2)); CK(cudaMalloc(&out, (size_t)128 * sh.n * 2));
    cudaMemset(x, 0, (size_t)128 * sh.k * 2);
    for (int m : ms) {
      cublasLtMatmulDesc_t op; CK(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
      cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
      CK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
      CK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
      cublasLtMatrixLayout_t la, lb, lc;
      CK(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, sh.k, sh.n, sh.k));
      CK(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, sh.k, m, sh.k));
      CK(cublasLtMatrixLayoutCreate(&lc, CUDA_R_16BF, sh.n, m, sh.n));
      cublasLtMatmulPreference_t pref; CK(cublasLtMatmulPreferenceCreate(&pref));
      CK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes, sizeof ws_bytes));
      cublasLtMatmulHeuristicResult_t res[64]; int found = 0;
      CK(cublasLtMatmulAlgoGetHeuristic(lt, op, la, lb, lc, lc, pref, 64, res, &found));
      float alpha = 1.f, beta = 0.f;
      auto time_algo = [&](const cublasLtMatmulAlgo_t* algo) -> float {
        for (int i = 0; i < 20; i++)
          if (cublasLtMatmul(lt, op, &alpha, w[i % copies], la, x, lb, &beta, out, lc, out, lc, algo, ws, ws_bytes, s) != 0) return -1.f;
        const int reps = 200;
        cudaEventRecord(e0, s);
        for (int i = 0; i < reps; i++)
          cublasLtMatmul(lt, op, &alpha, w[i % copies], la, x, lb, &beta, out, lc, out, lc, algo, ws, ws_bytes, s);
        cudaEventRecord(e1, s); cudaEventSynchronize(e1);
        float ms_; cudaEventElapsedTime(&ms_, e0, e1); return ms_ * 1000.f / reps;
      };
      float def = time_algo(&res[0].algo), best = 1e9; int bi = 0;
      for (int i = 0; i < found; i++) { float t = time_algo(&res[i].algo); if (t > 0 && t < best) { best = t; bi = i; } }
      int tile = 0, split = 0, stages = 0; size_t sz;
      cublasLtMatmulAlgoConfigGetAttribute(&res[bi].algo, CUBLASLT_ALGO_CONFIG_TILE_ID, &tile, sizeof tile, &sz);
      cublasLtMatmulAlgoConfigGetAttribute(&res[bi].algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &split, sizeof split, &sz);
      cublasLtMatmulAlgoConfigGetAttribute(&res[bi].algo, CUBLASLT_ALGO_CONFIG_STAGES_ID, &stages, sizeof stages, &sz);
      double floor_us = (double)wbytes / 3.35e12 * 1e6;
      printf("%-8s %4d %9.1f %9.1f %9.1f %6d #%d (tile %d, splitK %d, stages %d)\n", sh.name, m, floor_us, def, best, found, bi, tile, split, stages);
      cublasLtMatmulPreferenceDestroy(pref); cublasLtMatrixLayoutDestroy(la); cublasLtMatrixLayoutDestroy(lb); cublasLtMatrixLayoutDestroy(lc); cublasLtMatmulDescDestroy(op);
    }
    for (auto p : w) cudaFree(p); cudaFree(x); cudaFree(out);
  }
  return 0;
}
