// The decode step's own kernels, compiled at run time by NVRTC (see mod.rs).
//
// A decode step built from stock PyTorch operations launches about thirty
// kernels per layer: RoPE alone is five (negate, concatenate, two products,
// a sum), the paged KV cache three per tensor (a copy to make the new keys
// contiguous, a scatter into the pool, a gather back out), attention a few
// more for the mask and the grouped heads. Each of those kernels moves a few
// kilobytes; each costs about two microseconds anyway, so a batch-1 step
// spends more time between kernels than in them. With the kernels here a
// layer takes ten launches (four of them cuBLAS's matrix products), and
// attention reads the KV cache in place.
//
// Compile-time configuration, given as -D options by the Rust side:
//   SCALAR_KIND  0 = float, 1 = bfloat16, 2 = float16 (the model's dtype)
//   HEAD_DIM     elements per attention head
//   GQA_GROUP    query heads per key/value head
//
// NVRTC compiles without the CUDA toolkit's headers, so 16-bit floats are
// handled as raw bits and converted by hand: the rounding is
// round-to-nearest-even, as PyTorch's own conversion.

typedef unsigned short u16;
typedef long long i64;

#if SCALAR_KIND == 0
typedef float scalar_t;
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float from_float(float x) { return x; }
#elif SCALAR_KIND == 1
typedef u16 scalar_t;
__device__ __forceinline__ float to_float(u16 x) { return __uint_as_float(((unsigned)x) << 16); }
__device__ __forceinline__ u16 from_float(float f) {
  unsigned u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return (u16)(u >> 16);
}
#else
typedef u16 scalar_t;
__device__ __forceinline__ float to_float(u16 x) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
  return f;
}
__device__ __forceinline__ u16 from_float(float f) {
  u16 h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}
#endif

#define NEG_INF (-__int_as_float(0x7f800000))

// ANCHOR: rms_norm
// RMSNorm, one block per row: out = x / sqrt(mean(x²) + eps) · weight.
// The sum of squares is accumulated in f32, per thread, then across the
// block: each warp adds its 32 lanes with shuffles, warp 0 adds the warps.
__device__ float block_sum(float v) {
  __shared__ float warp_sums[32];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  int warps = (blockDim.x + 31) / 32;
  v = lane < warps ? warp_sums[lane] : 0.f;
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;  // every thread of the block holds the total
}

extern "C" __global__ void rms_norm(const scalar_t* x, const scalar_t* weight, scalar_t* out,
                                   int hidden, float eps) {
  const scalar_t* row = x + (i64)blockIdx.x * hidden;
  scalar_t* dst = out + (i64)blockIdx.x * hidden;
  float squares = 0.f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    float v = to_float(row[i]);
    squares += v * v;
  }
  float inv_rms = rsqrtf(block_sum(squares) / hidden + eps);
  for (int i = threadIdx.x; i < hidden; i += blockDim.x)
    dst[i] = from_float(to_float(row[i]) * inv_rms * to_float(weight[i]));
}
// ANCHOR_END: rms_norm

// ANCHOR: silu_mul
// SwiGLU's activation: out[t, j] = silu(gate[t, j]) · up[t, j], where each
// row of `gate_up` is [gate (inter) | up (inter)], as the fused projection
// writes it. One thread per output element.
extern "C" __global__ void silu_mul(const scalar_t* gate_up, scalar_t* out, int inter, i64 total) {
  i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= total) return;
  i64 row = i / inter, j = i % inter;
  float gate = to_float(gate_up[row * 2 * inter + j]);
  float up = to_float(gate_up[row * 2 * inter + inter + j]);
  out[i] = from_float(gate / (1.f + __expf(-gate)) * up);
}
// ANCHOR_END: silu_mul

// ANCHOR: rope_store_kv
// RoPE and the KV-cache write in one pass, one block per token. `qkv` is
// the fused projection's output, [tokens, (heads + 2·kv_heads)·HEAD_DIM]:
// queries, then keys, then values. Queries and keys are rotated ("rotate
// half": pairs (i, i + HEAD_DIM/2)) by their position's angles; rotated
// queries go to `q_out` [tokens, heads, HEAD_DIM]; rotated keys and the
// values go straight into the pool at the token's slot. `cos_table` and
// `sin_table` are [max_positions, HEAD_DIM/2] in f32.
extern "C" __global__ void rope_store_kv(const scalar_t* qkv, const i64* positions, const i64* slots,
                                        const float* cos_table, const float* sin_table,
                                        scalar_t* q_out, scalar_t* k_cache, scalar_t* v_cache,
                                        int heads, int kv_heads) {
  const int half = HEAD_DIM / 2;
  const i64 token = blockIdx.x;
  const scalar_t* row = qkv + token * (heads + 2 * kv_heads) * HEAD_DIM;
  const float* cos_row = cos_table + positions[token] * half;
  const float* sin_row = sin_table + positions[token] * half;
  const i64 slot = slots[token];
  for (int i = threadIdx.x; i < (heads + kv_heads) * half; i += blockDim.x) {
    int head = i / half, j = i % half;
    const scalar_t* x = row + head * HEAD_DIM;
    float x1 = to_float(x[j]), x2 = to_float(x[j + half]);
    float c = cos_row[j], s = sin_row[j];
    scalar_t* dst = head < heads ? q_out + (token * heads + head) * HEAD_DIM
                                 : k_cache + (slot * kv_heads + head - heads) * HEAD_DIM;
    dst[j] = from_float(x1 * c - x2 * s);
    dst[j + half] = from_float(x2 * c + x1 * s);
  }
  const scalar_t* v = row + (heads + kv_heads) * HEAD_DIM;
  for (int i = threadIdx.x; i < kv_heads * HEAD_DIM; i += blockDim.x)
    v_cache[slot * kv_heads * HEAD_DIM + i] = v[i];
}
// ANCHOR_END: rope_store_kv

// ANCHOR: paged_attention
// Paged attention for one new token per sequence, in two kernels (the
// "flash-decoding" split that vLLM's paged_attention_v2 also makes).
//
// The context is cut into partitions of PARTITION tokens. `attention_partial`
// runs one block per (key/value head, sequence, partition): it reads that
// stretch of keys and values once, through the block table, for all
// GQA_GROUP query heads that share them, and leaves an unnormalised result
// with its running max and sum. `attention_combine` merges the partitions
// of each (sequence, head). Splitting matters at batch 1: without it a
// layer would have as few blocks as key/value heads (4 for TinyLlama) on a
// GPU with 132 multiprocessors.
//
// Inside a block, LANES consecutive lanes hold one token's key (or value)
// row, 16 bytes each, so a warp works on 32 / LANES tokens at once. Every
// lane first loads all the rows it will need (so that the loads are in
// flight together, not one memory round trip per token), then runs the
// online softmax over them in registers. PARTITION (tokens per block) is
// set by the Rust side: TOKENS_PER_GROUP rows per lane group.
#define THREADS 128
#define VEC (16 / (int)sizeof(scalar_t))  // elements per 16-byte load
#define LANES (HEAD_DIM / VEC)             // lanes per token row
#define GROUPS (THREADS / LANES)           // tokens in flight per block
#define TOKENS_PER_GROUP (PARTITION / GROUPS)
static_assert(HEAD_DIM % VEC == 0 && 32 % LANES == 0, "a head's row must split into 16-byte lanes of a warp");
static_assert(PARTITION % GROUPS == 0, "a partition is a whole number of tokens per lane group");

// The VEC elements of one 16-byte load, as floats.
__device__ __forceinline__ void unpack(uint4 raw, float* out) {
  const scalar_t* e = reinterpret_cast<const scalar_t*>(&raw);
#pragma unroll
  for (int i = 0; i < VEC; i++) out[i] = to_float(e[i]);
}

// Merges softmax state (m2, l2, acc2) into (m, l, acc): the result is what
// one pass over both sets of tokens would have produced.
__device__ __forceinline__ void merge(float& m, float& l, float* acc, float m2, float l2,
                                      const float* acc2) {
  float top = fmaxf(m, m2);
  if (top == NEG_INF) return;  // both empty
  float a = __expf(m - top), b = __expf(m2 - top);
  l = l * a + l2 * b;
#pragma unroll
  for (int i = 0; i < VEC; i++) acc[i] = acc[i] * a + acc2[i] * b;
  m = top;
}

// q [batch, heads, HEAD_DIM]; k_cache, v_cache [slots, kv_heads, HEAD_DIM];
// block_tables [batch, max_blocks]; positions [batch] (the new token's
// position: it sees positions 0..=p). Writes part_acc [batch, heads,
// partitions, HEAD_DIM] and part_max, part_sum [batch, heads, partitions].
extern "C" __global__ void __launch_bounds__(THREADS)
attention_partial(const scalar_t* q, const scalar_t* k_cache, const scalar_t* v_cache,
                  const i64* block_tables, const i64* positions, int kv_heads, int block_size,
                  int max_blocks, float scale, float* part_acc, float* part_max, float* part_sum) {
  const int kv_head = blockIdx.x, seq = blockIdx.y, partition = blockIdx.z;
  const int partitions = gridDim.z, heads = kv_heads * GQA_GROUP;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = threadIdx.x / LANES, sub = threadIdx.x % LANES;
  const int context = (int)positions[seq] + 1;
  const int first = partition * PARTITION;

  // This lane's slice of every query head of the group, pre-scaled.
  float qs[GQA_GROUP][VEC];
#pragma unroll
  for (int h = 0; h < GQA_GROUP; h++) {
    const scalar_t* qh = q + ((i64)seq * heads + kv_head * GQA_GROUP + h) * HEAD_DIM + sub * VEC;
#pragma unroll
    for (int i = 0; i < VEC; i++) qs[h][i] = to_float(qh[i]) * scale;
  }

  // Load every key and value row this lane will use (zeros past the context).
  uint4 keys[TOKENS_PER_GROUP], values[TOKENS_PER_GROUP];
#pragma unroll
  for (int t = 0; t < TOKENS_PER_GROUP; t++) {
    int pos = first + t * GROUPS + group;
    keys[t] = values[t] = make_uint4(0, 0, 0, 0);
    if (pos < context) {
      i64 block = block_tables[(i64)seq * max_blocks + pos / block_size];
      i64 offset = ((block * block_size + pos % block_size) * kv_heads + kv_head) * HEAD_DIM + sub * VEC;
      keys[t] = *reinterpret_cast<const uint4*>(k_cache + offset);
      values[t] = *reinterpret_cast<const uint4*>(v_cache + offset);
    }
  }

  // Online softmax over this lane group's tokens, for each query head.
  float m[GQA_GROUP], l[GQA_GROUP], acc[GQA_GROUP][VEC];
#pragma unroll
  for (int h = 0; h < GQA_GROUP; h++) {
    m[h] = NEG_INF;
    l[h] = 0.f;
#pragma unroll
    for (int i = 0; i < VEC; i++) acc[h][i] = 0.f;
  }
#pragma unroll
  for (int t = 0; t < TOKENS_PER_GROUP; t++) {
    bool valid = first + t * GROUPS + group < context;
    float key[VEC], value[VEC];
    unpack(keys[t], key);
    unpack(values[t], value);
#pragma unroll
    for (int h = 0; h < GQA_GROUP; h++) {
      float dot = 0.f;
#pragma unroll
      for (int i = 0; i < VEC; i++) dot += qs[h][i] * key[i];
      // Every lane of the warp takes part in the shuffles, valid or not.
#pragma unroll
      for (int offset = LANES / 2; offset > 0; offset /= 2)
        dot += __shfl_xor_sync(0xffffffffu, dot, offset);
      if (valid) {
        float top = fmaxf(m[h], dot);
        float correction = __expf(m[h] - top), p = __expf(dot - top);
        l[h] = l[h] * correction + p;
#pragma unroll
        for (int i = 0; i < VEC; i++) acc[h][i] = acc[h][i] * correction + p * value[i];
        m[h] = top;
      }
    }
  }

  // Merge the lane groups of each warp (lanes sub, sub + LANES, ... hold
  // the same dimensions), then the warps through shared memory.
#pragma unroll
  for (int h = 0; h < GQA_GROUP; h++) {
#pragma unroll
    for (int offset = LANES; offset < 32; offset *= 2) {
      float m2 = __shfl_xor_sync(0xffffffffu, m[h], offset);
      float l2 = __shfl_xor_sync(0xffffffffu, l[h], offset);
      float acc2[VEC];
#pragma unroll
      for (int i = 0; i < VEC; i++) acc2[i] = __shfl_xor_sync(0xffffffffu, acc[h][i], offset);
      merge(m[h], l[h], acc[h], m2, l2, acc2);
    }
  }
  __shared__ float shared_acc[THREADS / 32][GQA_GROUP][HEAD_DIM];
  __shared__ float shared_m[THREADS / 32][GQA_GROUP], shared_l[THREADS / 32][GQA_GROUP];
  if (lane < LANES) {
#pragma unroll
    for (int h = 0; h < GQA_GROUP; h++) {
#pragma unroll
      for (int i = 0; i < VEC; i++) shared_acc[warp][h][sub * VEC + i] = acc[h][i];
      shared_m[warp][h] = m[h];
      shared_l[warp][h] = l[h];
    }
  }
  __syncthreads();
  if (warp == 0 && lane < LANES) {
#pragma unroll
    for (int h = 0; h < GQA_GROUP; h++) {
      for (int w = 1; w < THREADS / 32; w++)
        merge(m[h], l[h], acc[h], shared_m[w][h], shared_l[w][h], &shared_acc[w][h][sub * VEC]);
      i64 out = ((i64)seq * heads + kv_head * GQA_GROUP + h) * partitions + partition;
#pragma unroll
      for (int i = 0; i < VEC; i++) part_acc[out * HEAD_DIM + sub * VEC + i] = acc[h][i];
      if (sub == 0) {
        part_max[out] = m[h];
        part_sum[out] = l[h];
      }
    }
  }
}

// One block per (head, sequence), one thread per dimension: the softmax
// states of all partitions merged, normalised, written as [batch, heads, HEAD_DIM].
extern "C" __global__ void attention_combine(const float* part_acc, const float* part_max,
                                            const float* part_sum, int partitions, scalar_t* out) {
  const i64 row = (i64)blockIdx.y * gridDim.x + blockIdx.x;  // seq · heads + head
  const float* maxes = part_max + row * partitions;
  const float* sums = part_sum + row * partitions;
  float top = NEG_INF;
  for (int p = 0; p < partitions; p++) top = fmaxf(top, maxes[p]);
  float total = 0.f, value = 0.f;
  for (int p = 0; p < partitions; p++) {
    if (maxes[p] == NEG_INF) continue;
    float weight = __expf(maxes[p] - top);
    total += sums[p] * weight;
    value += part_acc[(row * partitions + p) * HEAD_DIM + threadIdx.x] * weight;
  }
  out[row * HEAD_DIM + threadIdx.x] = from_float(value / total);
}
// ANCHOR_END: paged_attention


// ANCHOR: matvec
// The decode step's matrix products at small batch: y = x · Wᵀ for at most
// MATVEC_ROWS rows of x, with W [n, k] as nn.Linear keeps it.
//
// At batch 1 a product is a matrix-vector product: every weight is read
// once and used once, so the kernel is a memory copy with arithmetic on the
// side, and the goal is to keep enough loads in flight to saturate HBM.
// One warp computes one output at a time: its 32 lanes read the weight row
// in 16-byte loads, MATVEC_UNROLL of them in flight per lane, and meet in a
// shuffle reduction. The block first stages x in shared memory — once per
// block, not once per row — and that is where the neighbouring operations
// are fused, so they cost no launch and no trip through memory:
//
//   prologue 0  x = in                        (the attention output)
//   prologue 1  x = rms_norm(in) · norm_weight (before qkv, gate/up, lm_head)
//   prologue 2  x = silu(in[:, :k]) · in[:, k:] (SwiGLU, before down)
//   epilogue 0  out = y                       (in the model's dtype)
//   epilogue 1  out += y                      (the residual stream, in place)
//   epilogue 2  out = y                       (in f32: the logits)
//
// The block's first weight loads are issued before the staging, so HBM is
// busy while x is prepared; at the end, it prefetches the next product's
// weights into L2, so HBM stays busy between kernels too. Compile-time:
// MATVEC_ROWS (rows of x, at most) and MATVEC_K (the largest k: shared
// memory is MATVEC_ROWS · MATVEC_K).
#define MATVEC_WARPS 8
#define MATVEC_UNROLL 8

// 16 bytes of weights that are read once: not kept in L1.
__device__ __forceinline__ uint4 load_streaming(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Lane `lane`'s chunks base, base + 32, ... of weight row `row`.
__device__ __forceinline__ void load_weight_chunks(uint4* chunk, const scalar_t* weight, int row,
                                                   int k, int base) {
  const uint4* w = reinterpret_cast<const uint4*>(weight + (i64)row * k);
  const int chunks = k / VEC;
#pragma unroll
  for (int u = 0; u < MATVEC_UNROLL; u++) {
    int c = base + u * 32;
    chunk[u] = c < chunks ? load_streaming(w + c) : make_uint4(0, 0, 0, 0);
  }
}

extern "C" __global__ void __launch_bounds__(MATVEC_WARPS * 32)
matvec(const scalar_t* in, const scalar_t* norm_weight, float eps, const scalar_t* weight,
       void* out, int rows, int n, int k, int prologue, int epilogue, const char* next_weight,
       i64 prefetch_bytes) {
  __shared__ __align__(16) scalar_t xs[MATVEC_ROWS * MATVEC_K];
  __shared__ float partial[MATVEC_WARPS][MATVEC_ROWS];
  __shared__ float inv_rms[MATVEC_ROWS];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int chunks = k / VEC, stride = gridDim.x * MATVEC_WARPS;
  const int first_row = blockIdx.x * MATVEC_WARPS + warp;

  uint4 chunk[MATVEC_UNROLL];
  if (first_row < n) load_weight_chunks(chunk, weight, first_row, k, lane);

  // Stage x, 16 bytes per thread at a time.
  const uint4* in4 = reinterpret_cast<const uint4*>(in);
  if (prologue == 1) {
    float squares[MATVEC_ROWS];
#pragma unroll
    for (int m = 0; m < MATVEC_ROWS; m++) {
      squares[m] = 0.f;
      if (m < rows)
        for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
          float v[VEC];
          unpack(in4[m * chunks + c], v);
#pragma unroll
          for (int i = 0; i < VEC; i++) squares[m] += v[i] * v[i];
        }
      for (int offset = 16; offset > 0; offset /= 2)
        squares[m] += __shfl_xor_sync(0xffffffffu, squares[m], offset);
      if (lane == 0) partial[warp][m] = squares[m];
    }
    __syncthreads();
    if (threadIdx.x < rows) {
      float total = 0.f;
      for (int w = 0; w < MATVEC_WARPS; w++) total += partial[w][threadIdx.x];
      inv_rms[threadIdx.x] = rsqrtf(total / k + eps);
    }
    __syncthreads();
  }
#pragma unroll 4
  for (int i = threadIdx.x; i < rows * chunks; i += blockDim.x) {
    int m = i / chunks, c = i % chunks;
    scalar_t* dst = xs + m * k + c * VEC;
    float a[VEC], b[VEC];
    if (prologue == 0) {
      *reinterpret_cast<uint4*>(dst) = in4[i];
    } else if (prologue == 1) {
      unpack(in4[i], a);
      unpack(reinterpret_cast<const uint4*>(norm_weight)[c], b);
#pragma unroll
      for (int e = 0; e < VEC; e++) dst[e] = from_float(a[e] * inv_rms[m] * b[e]);
    } else {
      unpack(in4[m * 2 * chunks + c], a);           // gate
      unpack(in4[m * 2 * chunks + chunks + c], b);  // up
#pragma unroll
      for (int e = 0; e < VEC; e++) dst[e] = from_float(a[e] / (1.f + __expf(-a[e])) * b[e]);
    }
  }
  __syncthreads();

  for (int row = first_row; row < n; row += stride) {
    float acc[MATVEC_ROWS];
#pragma unroll
    for (int m = 0; m < MATVEC_ROWS; m++) acc[m] = 0.f;
    for (int base = lane; base < chunks; base += 32 * MATVEC_UNROLL) {
      if (row != first_row || base != lane) load_weight_chunks(chunk, weight, row, k, base);
#pragma unroll
      for (int u = 0; u < MATVEC_UNROLL; u++) {
        int c = base + u * 32;
        if (c >= chunks) break;
        float w[VEC];
        unpack(chunk[u], w);
#pragma unroll
        for (int m = 0; m < MATVEC_ROWS; m++) {
          if (m >= rows) break;
          float x[VEC];
          unpack(reinterpret_cast<const uint4*>(xs + m * k)[c], x);
#pragma unroll
          for (int i = 0; i < VEC; i++) acc[m] += w[i] * x[i];
        }
      }
    }
#pragma unroll
    for (int m = 0; m < MATVEC_ROWS; m++) {
      for (int offset = 16; offset > 0; offset /= 2)
        acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], offset);
      if (lane == 0 && m < rows) {
        i64 at = (i64)m * n + row;
        if (epilogue == 0) {
          static_cast<scalar_t*>(out)[at] = from_float(acc[m]);
        } else if (epilogue == 1) {
          scalar_t* residual = static_cast<scalar_t*>(out);
          residual[at] = from_float(to_float(residual[at]) + acc[m]);
        } else {
          static_cast<float*>(out)[at] = acc[m];
        }
      }
    }
  }

  // Done with its rows, the block asks L2 for its share of the first
  // `prefetch_bytes` of the next product's weights, one 128-byte line per
  // thread at a time. A prefetch waits for nothing: HBM stays busy through
  // this kernel's tail, the launch of the next, and the attention kernels
  // between the qkv and o products, which barely touch memory.
  if (next_weight != nullptr) {
    const i64 step = (i64)gridDim.x * blockDim.x * 128;
    for (i64 at = ((i64)blockIdx.x * blockDim.x + threadIdx.x) * 128; at < prefetch_bytes; at += step)
      asm volatile("prefetch.global.L2 [%0];" ::"l"(next_weight + at));
  }
}
// ANCHOR_END: matvec
