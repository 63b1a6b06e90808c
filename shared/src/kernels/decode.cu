// The decode step's own kernels, compiled at run time by NVRTC (see mod.rs).
//
// A decode step built from stock PyTorch operations launches about thirty
// kernels per layer: RoPE alone is five (negate, concatenate, two products,
// a sum), the paged KV cache three per tensor (a copy to make the new keys
// contiguous, a scatter into the pool, a gather back out), attention a few
// more for the mask and the grouped heads. Each of those kernels moves a few
// kilobytes; each costs about two microseconds anyway, so a batch-1 step
// spends more time between kernels than in them. With the kernels here a
// layer takes ten launches (four of them cuBLAS's matrix products), seven
// with the matrix-vector kernel at small batch, or one (`decode_layer`),
// and attention reads the KV cache in place.
//
// Compile-time configuration, given as -D options by the Rust side:
//   SCALAR_KIND    0 = float, 1 = bfloat16, 2 = float16 (the model's dtype)
//   HEAD_DIM       elements per attention head
//   GQA_GROUP      query heads per key/value head
//   PARTITION      context tokens per attention block
//   MATVEC_ROWS    rows the matrix-vector products take at most
//   MATVEC_K       their longest input row
//   LAYER_HEADS    query heads per attention item of decode_layer
//   LAYER_THREADS  threads per block of decode_layer
//   LAYER_SLOT_BYTES  bytes of a slot of its weight ring
//   LAYER_TILE_ROWS   weight rows per tile, at most
//   LAYER_BULK_COPY_ALLOWED  1: fill the ring with bulk copies on sm_90 and
//                  later, 0: with cp.async everywhere
//   LAYER_EVICT_FIRST  1: the ring's copies (bulk or cp.async) ask L2 to
//                  evict the weights they bring in first, 0: no hint
//   LAYER_COPY_DEPTH  tiles a block of decode_layer keeps on their way from
//                  memory at once; 0 (or the ring's slots and more): no limit
//   LAYER_START_TILES  of a block's first tiles, qkv's, how many it asks for
//                  at once at the layer's start, whatever LAYER_COPY_DEPTH
//   ATTENTION_MMA_ALLOWED  1: attention_partial on the tensor cores where
//                  it can be (16-bit types, sm_80 and later), 0: never
//
// NVRTC compiles without the CUDA toolkit's headers, so 16-bit floats are
// handled as raw bits and converted by hand: the rounding is
// round-to-nearest-even, as PyTorch's own conversion.

typedef unsigned short u16;
typedef long long i64;
typedef unsigned long long u64;

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

#define VEC (16 / (int)sizeof(scalar_t))  // elements per 16-byte load

// The VEC elements of one 16-byte load, as floats.
__device__ __forceinline__ void unpack(uint4 raw, float* out) {
  const scalar_t* e = reinterpret_cast<const scalar_t*>(&raw);
#pragma unroll
  for (int i = 0; i < VEC; i++) out[i] = to_float(e[i]);
}

// VEC floats as the elements of one 16-byte store.
__device__ __forceinline__ uint4 pack(const float* in) {
  uint4 raw;
  scalar_t* e = reinterpret_cast<scalar_t*>(&raw);
#pragma unroll
  for (int i = 0; i < VEC; i++) e[i] = from_float(in[i]);
  return raw;
}

// Programmatic dependent launch (sm_90): a kernel launched with it is
// launched once every block of the kernel before it on the stream has
// executed launch_dependents (or exited), its blocks start as soon as they
// fit, and it must wait before it reads what that kernel writes, or writes
// what it reads (the wait returns once that kernel has finished and its
// writes are visible). Without such a launch both are no-ops. The layer
// kernel uses it between layers; rope_store_kv, attention_partial and
// attention_combine between each other.
__device__ __forceinline__ void grid_dependents_may_launch() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void grid_dependencies_wait() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

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

// Up to 1024 threads a block (the host gives one per 16-byte piece).
extern "C" __global__ void __launch_bounds__(1024) rms_norm(const scalar_t* __restrict__ x,
                                    const scalar_t* __restrict__ weight,
                                    scalar_t* __restrict__ out, int hidden, float eps,
                                    int vectorized) {
  // The product after the norm may be launched now: it copies its first
  // weights while this kernel runs (it waits for its input itself).
  grid_dependents_may_launch();
  const scalar_t* row = x + (i64)blockIdx.x * hidden;
  scalar_t* dst = out + (i64)blockIdx.x * hidden;
  float squares = 0.f;
  if (vectorized) {
    // 16 bytes a load where rows split into such pieces (and the Rust side
    // found the tensors aligned). The Rust side gives a thread per piece
    // (a row of TinyLlama is 256 of them): each thread loads its piece of
    // the row and of the weight at once, before the block's sum, and keeps
    // both in registers. So the kernel waits for memory once, not three
    // times in a row (the row, the sum, then the weight and the row again),
    // which matters in a batched step, where it is one of the small
    // kernels between the matrix products.
    const uint4* row16 = reinterpret_cast<const uint4*>(row);
    const uint4* weight16 = reinterpret_cast<const uint4*>(weight);
    const int pieces = hidden / VEC, i = threadIdx.x;
    if (pieces <= (int)blockDim.x) {
      const bool mine = i < pieces;
      float v[VEC], w[VEC];
      unpack(mine ? row16[i] : make_uint4(0, 0, 0, 0), v);
      unpack(mine ? weight16[i] : make_uint4(0, 0, 0, 0), w);
#pragma unroll
      for (int e = 0; e < VEC; e++) squares += v[e] * v[e];
      float inv_rms = rsqrtf(block_sum(squares) / hidden + eps);
#pragma unroll
      for (int e = 0; e < VEC; e++) v[e] = v[e] * inv_rms * w[e];
      if (mine) reinterpret_cast<uint4*>(dst)[i] = pack(v);
      return;
    }
    for (int p = i; p < pieces; p += blockDim.x) {
      float v[VEC];
      unpack(row16[p], v);
#pragma unroll
      for (int e = 0; e < VEC; e++) squares += v[e] * v[e];
    }
    float inv_rms = rsqrtf(block_sum(squares) / hidden + eps);
    for (int p = i; p < pieces; p += blockDim.x) {
      float v[VEC], w[VEC];
      unpack(row16[p], v);
      unpack(weight16[p], w);
#pragma unroll
      for (int e = 0; e < VEC; e++) v[e] = v[e] * inv_rms * w[e];
      reinterpret_cast<uint4*>(dst)[p] = pack(v);
    }
    return;
  }
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
// writes it. One thread per VEC output elements (one 16-byte load of gate,
// one of up, one store) where `vectorized`, else per element.
__device__ __forceinline__ float silu_times(float gate, float up) { return gate / (1.f + __expf(-gate)) * up; }

extern "C" __global__ void silu_mul(const scalar_t* gate_up, scalar_t* out, int inter, i64 total,
                                    int vectorized) {
  const int per_thread = vectorized ? VEC : 1;
  i64 i = ((i64)blockIdx.x * blockDim.x + threadIdx.x) * per_thread;
  if (i >= total) return;
  i64 row = i / inter, j = i % inter;
  const scalar_t* gate = gate_up + row * 2 * inter + j;
  const scalar_t* up = gate + inter;
  if (vectorized) {
    float g[VEC], u[VEC];
    unpack(*reinterpret_cast<const uint4*>(gate), g);
    unpack(*reinterpret_cast<const uint4*>(up), u);
#pragma unroll
    for (int e = 0; e < VEC; e++) g[e] = silu_times(g[e], u[e]);
    *reinterpret_cast<uint4*>(out + i) = pack(g);
  } else {
    out[i] = from_float(silu_times(to_float(*gate), to_float(*up)));
  }
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
//
// The work is a list of items, and the Rust side gives the block a thread
// per item, so each thread issues all its loads at once and waits for
// memory once. Where `vectorized` (16-byte aligned tensors), an item is
// VEC pairs of one head — 16 bytes of each half, VEC cosines and sines —
// or 16 bytes of a value row; else one pair or one value. `__restrict__`
// tells the compiler that the stores cannot change what a later load
// reads: without it, each item's loads had to wait for the previous
// item's stores, a chain of memory round trips (6 us for a batch of 32
// on an H100, against about 3 with the chain gone).
#define ROPE_VECTORIZED (HEAD_DIM / 2 % VEC == 0)  // half a head is whole 16-byte pieces
#define ROPE_PIECES (ROPE_VECTORIZED ? HEAD_DIM / 2 / VEC : 1)
static_assert(HEAD_DIM % 2 == 0, "RoPE rotates pairs");

// VEC consecutive f32 values (the cosines or sines of one piece).
__device__ __forceinline__ void load_f32_piece(const float* __restrict__ p, float* out) {
#pragma unroll
  for (int e = 0; e < VEC; e += 4) {
    float4 f = *reinterpret_cast<const float4*>(p + e);
    out[e] = f.x, out[e + 1] = f.y, out[e + 2] = f.z, out[e + 3] = f.w;
  }
}

extern "C" __global__ void __launch_bounds__(1024) rope_store_kv(const scalar_t* __restrict__ qkv,
                                         const i64* __restrict__ positions,
                                         const i64* __restrict__ slots,
                                         const float* __restrict__ cos_table,
                                         const float* __restrict__ sin_table,
                                         scalar_t* __restrict__ q_out,
                                         scalar_t* __restrict__ k_cache,
                                         scalar_t* __restrict__ v_cache, int heads, int kv_heads,
                                         int vectorized) {
  // The kernel after it (attention_partial, in a decode step) may be
  // launched now; its blocks wait for this kernel's end themselves.
  grid_dependents_may_launch();
  const int half = HEAD_DIM / 2;
  const i64 token = blockIdx.x;
  const scalar_t* row = qkv + token * (heads + 2 * kv_heads) * HEAD_DIM;
  const i64 position = positions[token], slot = slots[token];
  const float* cos_row = cos_table + position * half;
  const float* sin_row = sin_table + position * half;
  const scalar_t* v = row + (heads + kv_heads) * HEAD_DIM;
  scalar_t* v_dst = v_cache + slot * kv_heads * HEAD_DIM;
  // Where a rotated head goes: the queries' scratch or the key cache.
  auto destination = [&](int head) {
    return head < heads ? q_out + (token * heads + head) * HEAD_DIM
                        : k_cache + (slot * kv_heads + head - heads) * HEAD_DIM;
  };
  if (vectorized && ROPE_VECTORIZED) {
    const int rotations = (heads + kv_heads) * ROPE_PIECES, copies = kv_heads * HEAD_DIM / VEC;
    for (int i = threadIdx.x; i < rotations + copies; i += blockDim.x) {
      if (i >= rotations) {
        const int c = i - rotations;
        reinterpret_cast<uint4*>(v_dst)[c] = reinterpret_cast<const uint4*>(v)[c];
        continue;
      }
      const int head = i / ROPE_PIECES, j = i % ROPE_PIECES * VEC;
      const scalar_t* x = row + head * HEAD_DIM;
      float x1[VEC], x2[VEC], c[VEC], s[VEC], r1[VEC], r2[VEC];
      unpack(*reinterpret_cast<const uint4*>(x + j), x1);
      unpack(*reinterpret_cast<const uint4*>(x + j + half), x2);
      load_f32_piece(cos_row + j, c);
      load_f32_piece(sin_row + j, s);
#pragma unroll
      for (int e = 0; e < VEC; e++) {
        r1[e] = x1[e] * c[e] - x2[e] * s[e];
        r2[e] = x2[e] * c[e] + x1[e] * s[e];
      }
      scalar_t* dst = destination(head);
      *reinterpret_cast<uint4*>(dst + j) = pack(r1);
      *reinterpret_cast<uint4*>(dst + j + half) = pack(r2);
    }
    return;
  }
  const int rotations = (heads + kv_heads) * half, copies = kv_heads * HEAD_DIM;
  for (int i = threadIdx.x; i < rotations + copies; i += blockDim.x) {
    if (i >= rotations) {
      v_dst[i - rotations] = v[i - rotations];
      continue;
    }
    const int head = i / half, j = i % half;
    const scalar_t* x = row + head * HEAD_DIM;
    float x1 = to_float(x[j]), x2 = to_float(x[j + half]);
    float c = cos_row[j], s = sin_row[j];
    scalar_t* dst = destination(head);
    dst[j] = from_float(x1 * c - x2 * s);
    dst[j + half] = from_float(x2 * c + x1 * s);
  }
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
//
// The work of one block is a device function, `attention_part`, so that
// the persistent layer kernel below can run it too, on 128 of its threads.
#define THREADS 128
#define LANES (HEAD_DIM / VEC)             // lanes per token row
#define GROUPS (THREADS / LANES)           // tokens in flight per block
#define TOKENS_PER_GROUP (PARTITION / GROUPS)
static_assert(HEAD_DIM % VEC == 0 && 32 % LANES == 0, "a head's row must split into 16-byte lanes of a warp");
static_assert(PARTITION % GROUPS == 0, "a partition is a whole number of tokens per lane group");

// Loads that skip L1 and are served by L2, which all multiprocessors share.
// The layer kernel reads data that other blocks of the same kernel wrote a
// moment before, which a stale L1 line would hide; elsewhere they cost
// nothing, as these data are read once.
__device__ __forceinline__ uint4 load_cg(const void* p) {
  uint4 v;
  asm volatile("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}
__device__ __forceinline__ float load_cg_f32(const float* p) {
  float v;
  asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
  return v;
}

__device__ __forceinline__ scalar_t load_cg_scalar(const scalar_t* p) {
#if SCALAR_KIND == 0
  return load_cg_f32(p);
#else
  u16 v;
  asm volatile("ld.global.cg.u16 %0, [%1];" : "=h"(v) : "l"(p));
  return v;
#endif
}

// Waits for the `count` threads that share named barrier `id` (0 is the
// one __syncthreads uses: the whole block).
__device__ __forceinline__ void sync_threads(int id, int count) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(count) : "memory");
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

// Where attention_part finds the step's queries and the new token's keys
// and values: in q and the KV cache, where a grid barrier (or the kernel
// boundary) has made them visible. The layer kernel's tagged build passes
// TaggedQkv instead, whose words it waits for.
struct QkvWritten {
  static constexpr bool tagged = false;
  __device__ uint4 query(int, int, int) const { return make_uint4(0, 0, 0, 0); }
  __device__ void new_kv(int, int, int, uint4&, uint4&) const {}
};

// Shared memory of one attention_part: each warp's softmax state.
template <int HG>
struct AttentionShared {
  float acc[THREADS / 32][HG][HEAD_DIM];
  float m[THREADS / 32][HG], l[THREADS / 32][HG];
};

// q [batch, heads, HEAD_DIM]; k_cache, v_cache [slots, kv_heads, HEAD_DIM];
// block_tables [batch, max_blocks]; positions [batch] (the new token's
// position: it sees positions 0..=p). For query heads head0 .. head0 + HG
// of key/value head `kv_head`, attends over `span` partitions of the
// context from partition `partition` · `span` on, and writes the result as
// part `partition` of part_acc [batch, heads, partitions, HEAD_DIM] and
// part_max, part_sum [batch, heads, partitions]; or, where `out` is not
// null (the block covers the whole context), the normalised result into
// `out` [batch, heads, HEAD_DIM]. `tid` is the thread's index among the
// THREADS that run it; they meet at named barrier `barrier`.
template <int HG, class Qkv = QkvWritten>
__device__ __forceinline__ void attention_part(const scalar_t* q, const scalar_t* k_cache, const scalar_t* v_cache,
                               const i64* block_tables, const i64* positions, int kv_heads,
                               int block_size, int max_blocks, float scale, float* part_acc,
                               float* part_max, float* part_sum, int kv_head, int head0, int seq,
                               int partition, int partitions, int span, scalar_t* out,
                               int tid, int barrier, AttentionShared<HG>& shared,
                               const Qkv& fresh = Qkv{}) {
  const int heads = kv_heads * GQA_GROUP;
  const int warp = tid / 32, lane = tid % 32;
  const int group = tid / LANES, sub = tid % LANES;
  const int context = (int)positions[seq] + 1;

  // This lane's slice of each of the HG query heads, pre-scaled.
  float qs[HG][VEC];
#pragma unroll
  for (int h = 0; h < HG; h++) {
    const int head = kv_head * GQA_GROUP + head0 + h;
    if constexpr (Qkv::tagged) {
      unpack(fresh.query(seq, head, sub), qs[h]);
    } else {
      unpack(load_cg(q + ((i64)seq * heads + head) * HEAD_DIM + sub * VEC), qs[h]);
    }
#pragma unroll
    for (int i = 0; i < VEC; i++) qs[h][i] *= scale;
  }

  // Online softmax over this lane group's tokens, for each query head,
  // one partition after another.
  float m[HG], l[HG], acc[HG][VEC];
#pragma unroll
  for (int h = 0; h < HG; h++) {
    m[h] = NEG_INF;
    l[h] = 0.f;
#pragma unroll
    for (int i = 0; i < VEC; i++) acc[h][i] = 0.f;
  }
  for (int first = partition * span * PARTITION, end = min(first + span * PARTITION, context);
       first < end; first += PARTITION) {
    // Load every key and value row this lane will use (zeros past the context).
    uint4 keys[TOKENS_PER_GROUP], values[TOKENS_PER_GROUP];
#pragma unroll
    for (int t = 0; t < TOKENS_PER_GROUP; t++) {
      int pos = first + t * GROUPS + group;
      keys[t] = values[t] = make_uint4(0, 0, 0, 0);
      if (Qkv::tagged && pos == context - 1) {
        // The new token's: the last this lane loads, so waiting for it
        // holds back none of the loads above.
        fresh.new_kv(seq, kv_head, sub, keys[t], values[t]);
      } else if (pos < context) {
        i64 block = block_tables[(i64)seq * max_blocks + pos / block_size];
        i64 offset = ((block * block_size + pos % block_size) * kv_heads + kv_head) * HEAD_DIM + sub * VEC;
        keys[t] = load_cg(k_cache + offset);
        values[t] = load_cg(v_cache + offset);
      }
    }
#pragma unroll
    for (int t = 0; t < TOKENS_PER_GROUP; t++) {
      bool valid = first + t * GROUPS + group < context;
      float key[VEC], value[VEC];
      unpack(keys[t], key);
      unpack(values[t], value);
#pragma unroll
      for (int h = 0; h < HG; h++) {
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
  }

  // Merge the lane groups of each warp (lanes sub, sub + LANES, ... hold
  // the same dimensions), then the warps through shared memory.
#pragma unroll
  for (int h = 0; h < HG; h++) {
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
  if (lane < LANES) {
#pragma unroll
    for (int h = 0; h < HG; h++) {
#pragma unroll
      for (int i = 0; i < VEC; i++) shared.acc[warp][h][sub * VEC + i] = acc[h][i];
      shared.m[warp][h] = m[h];
      shared.l[warp][h] = l[h];
    }
  }
  sync_threads(barrier, THREADS);
  if (warp == 0 && lane < LANES) {
#pragma unroll
    for (int h = 0; h < HG; h++) {
      for (int w = 1; w < THREADS / 32; w++)
        merge(m[h], l[h], acc[h], shared.m[w][h], shared.l[w][h], &shared.acc[w][h][sub * VEC]);
      const i64 row = (i64)seq * heads + kv_head * GQA_GROUP + head0 + h;
      if (out != nullptr) {
#pragma unroll
        for (int i = 0; i < VEC; i++) out[row * HEAD_DIM + sub * VEC + i] = from_float(acc[h][i] / l[h]);
        continue;
      }
      const i64 part = row * partitions + partition;
#pragma unroll
      for (int i = 0; i < VEC; i++) part_acc[part * HEAD_DIM + sub * VEC + i] = acc[h][i];
      if (sub == 0) {
        part_max[part] = m[h];
        part_sum[part] = l[h];
      }
    }
  }
}

// Dimension `d` of row `row` (= seq · heads + head): the softmax states of
// all its partitions merged and normalised. The states are read
// COMBINE_AHEAD partitions at a time, every load issued before any is
// used: each is a trip to L2, and one after another (as a plain loop
// waits for them) they took 3.3 of the 10 µs of the layer kernel's
// attention stage on the H100. One pass: the running maximum rises chunk
// by chunk, and what is summed so far is rescaled when it does (the
// online softmax again), so the maxima are not read in a pass of their own.
#define COMBINE_AHEAD 8
__device__ __forceinline__ float combine_partitions(const float* part_acc, const float* part_max,
                                    const float* part_sum, int partitions, i64 row, int d) {
  const float* maxes = part_max + row * partitions;
  const float* sums = part_sum + row * partitions;
  const float* accs = part_acc + row * partitions * HEAD_DIM + d;
  float top = NEG_INF, total = 0.f, value = 0.f;
  for (int p0 = 0; p0 < partitions; p0 += COMBINE_AHEAD) {
    float m[COMBINE_AHEAD], l[COMBINE_AHEAD], a[COMBINE_AHEAD];
#pragma unroll
    for (int j = 0; j < COMBINE_AHEAD; j++) {
      const bool in = p0 + j < partitions;
      m[j] = in ? load_cg_f32(maxes + p0 + j) : NEG_INF;
      l[j] = in ? load_cg_f32(sums + p0 + j) : 0.f;
      a[j] = in ? load_cg_f32(accs + (i64)(p0 + j) * HEAD_DIM) : 0.f;
    }
    float chunk_top = NEG_INF;
#pragma unroll
    for (int j = 0; j < COMBINE_AHEAD; j++) chunk_top = fmaxf(chunk_top, m[j]);
    if (chunk_top > top) {
      const float rescale = top == NEG_INF ? 0.f : __expf(top - chunk_top);
      total *= rescale;
      value *= rescale;
      top = chunk_top;
    }
    // A partition past the sequence's context is empty: its maximum is
    // -inf, and it weighs nothing.
#pragma unroll
    for (int j = 0; j < COMBINE_AHEAD; j++) {
      const float weight = m[j] == NEG_INF ? 0.f : __expf(m[j] - top);
      total += l[j] * weight;
      value += a[j] * weight;
    }
  }
  return value / total;
}

// One block per (head, sequence), one thread per dimension: the softmax
// states of all partitions merged, normalised, written as [batch, heads, HEAD_DIM].
extern "C" __global__ void attention_combine(const float* part_acc, const float* part_max,
                                            const float* part_sum, int partitions, scalar_t* out) {
  grid_dependents_may_launch();  // the o product after it, as after rms_norm
  grid_dependencies_wait();      // for attention_partial, where launched to overlap it
  const i64 row = (i64)blockIdx.y * gridDim.x + blockIdx.x;  // seq · heads + head
  out[row * HEAD_DIM + threadIdx.x] =
      from_float(combine_partitions(part_acc, part_max, part_sum, partitions, row, threadIdx.x));
}
// ANCHOR_END: paged_attention

// ANCHOR: paged_attention_mma
// The same partial attention on the tensor cores, for batched decode
// (sm_80 and later, 16-bit models).
//
// `attention_part` does its dot products one multiply-add at a time, and
// each lane keeps the queries and accumulators of all GQA_GROUP heads in
// registers: about 200 of them for TinyLlama's group of 8, so that only
// two blocks fit on a multiprocessor. At batch 32 it took 48 µs a layer on
// the H100, where reading the layer's 19 MB of keys and values needs 6.
// The query heads that share a key/value head form a small matrix, though:
// Q is [group, HEAD_DIM], the partition's keys K are [PARTITION, HEAD_DIM],
// and S = Q · Kᵀ and O = softmax(S) · V are two matrix products, which the
// tensor cores take 16 × 8 × 16 at a time (FlashInfer's decode kernels do
// the same for grouped-query models). The group is padded with zero rows
// to the instruction's 16.
//
// A block of four warps copies the partition's key and value rows into
// shared memory with asynchronous copies (through the block table; zeros
// past the context), the values while the scores are being computed. Each
// warp then takes a quarter of the tokens: its scores, their softmax and
// its share of O, all in registers. The warps' results are merged through
// shared memory and written as `attention_part` writes them, so
// `attention_combine` is the same for both.
#if ATTENTION_MMA_ALLOWED && __CUDA_ARCH__ >= 800 && SCALAR_KIND != 0 && HEAD_DIM % 16 == 0 && \
    GQA_GROUP <= 16 && (PARTITION / (THREADS / 32) == 8 || PARTITION / (THREADS / 32) % 16 == 0)
#define ATTENTION_MMA 1
#else
#define ATTENTION_MMA 0
#endif

#if __CUDA_ARCH__ >= 800
// The 32-bit shared-memory address of a generic pointer into shared memory,
// as the PTX instructions below take it.
__device__ __forceinline__ unsigned shared_address(const void* p) {
  u64 address;
  asm("cvta.to.shared.u64 %0, %1;" : "=l"(address) : "l"(p));
  return static_cast<unsigned>(address);
}

// 16 bytes from global to shared memory, or 16 zero bytes when `valid` is
// false (the source is then not read).
__device__ __forceinline__ void copy_async_16_or_zeros(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(shared_address(dst)), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void copy_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// Waits until at most N of this thread's groups of copies are in flight.
template <int N>
__device__ __forceinline__ void copy_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// ldmatrix: a warp reads 8×8 tiles of 16-bit elements from shared memory,
// lanes 0-7 giving the addresses of the first tile's rows, 8-15 the
// second's. Each lane gets, of every tile, row lane / 4, elements 2 ·
// (lane % 4) and the next: the layout of an mma operand. With .trans it
// gets the tile's transpose instead.
__device__ __forceinline__ void load_tiles_x2(unsigned& r0, unsigned& r1, const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];"
               : "=r"(r0), "=r"(r1)
               : "r"(shared_address(row))
               : "memory");
}
__device__ __forceinline__ void load_tiles_x2_trans(unsigned& r0, unsigned& r1, const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];"
               : "=r"(r0), "=r"(r1)
               : "r"(shared_address(row))
               : "memory");
}
__device__ __forceinline__ void load_tile_trans(unsigned& r0, const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];"
               : "=r"(r0)
               : "r"(shared_address(row))
               : "memory");
}
#endif

#if __CUDA_ARCH__ >= 800 && SCALAR_KIND != 0
// d += a · b for a 16×16 tile of a (rows: inputs, columns: k) and a 16×8
// tile of b (k by tile rows), on the tensor cores: one instruction for the
// whole warp. Each lane holds a share of a, b and d as the instruction
// defines it: with g = lane / 4 and t = lane % 4, a0 is a's row g, k = 2t
// and 2t + 1, a1 row g + 8, a2 row g, k = 2t + 8 and 2t + 9, a3 row
// g + 8; b0 is k = 2t and 2t + 1 of b's column g, b1 k = 2t + 8 and
// 2t + 9; d0 and d1 are row g, columns 2t and 2t + 1 (d2 and d3 row g + 8).
__device__ __forceinline__ void mma_16x8x16(float* d, unsigned a0, unsigned a1, unsigned a2,
                                            unsigned a3, unsigned b0, unsigned b1) {
#if SCALAR_KIND == 1
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
#else
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
#endif
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Two floats as a pair of 16-bit elements, the first in the low half.
__device__ __forceinline__ unsigned pack_pair(float lo, float hi) {
  return (unsigned)from_float(lo) | ((unsigned)from_float(hi) << 16);
}
#endif

#if ATTENTION_MMA
#define WARP_TOKENS (PARTITION / (THREADS / 32))  // tokens per warp
#define SCORE_TILES (WARP_TOKENS / 8)              // its 8-token tiles of scores
#define ROW_PIECES (HEAD_DIM / VEC)                // 16-byte pieces of a key row
#define COPIES (PARTITION * ROW_PIECES / THREADS)  // pieces per thread, keys and values each
// A shared row is padded by 16 bytes, so that the eight rows one ldmatrix
// reads start in eight different groups of four banks: no conflicts.
#define ROW_PITCH (HEAD_DIM + 8)
static_assert(PARTITION * ROW_PIECES % THREADS == 0, "threads copy whole pieces");

// Shared memory of one block: first the rows of two partitions (one being
// read while the next one's copies land), then (once every warp is done
// with them) the warps' results.
union __align__(16) AttentionMmaShared {
  struct {
    scalar_t k[PARTITION][ROW_PITCH], v[PARTITION][ROW_PITCH];
  } rows[2];
  struct {
    float o[THREADS / 32][GQA_GROUP][ROW_PITCH];
    float m[THREADS / 32][GQA_GROUP], l[THREADS / 32][GQA_GROUP];
  } warps;
};

// This thread's pieces of the partition's rows of `cache` (at `offsets`;
// zeros where not `valid`) into `rows`, as one group of copies.
__device__ __forceinline__ void copy_rows_async(scalar_t (*rows)[ROW_PITCH], const scalar_t* cache,
                                                const i64* offsets, const bool* valid, int tid) {
#pragma unroll
  for (int i = 0; i < COPIES; i++) {
    const int piece = tid + i * THREADS;
    copy_async_16_or_zeros(&rows[piece / ROW_PIECES][piece % ROW_PIECES * VEC], cache + offsets[i],
                           valid[i]);
  }
  copy_async_commit();
}

// Starts copying the key and value rows of the partition whose first token
// is `first` into `rows` (zeros past the context): two groups of copies,
// keys first. The block table is read first, so that its loads overlap.
__device__ __forceinline__ void copy_partition_async(AttentionMmaShared& shared, int buffer,
                                                     const scalar_t* k_cache, const scalar_t* v_cache,
                                                     const i64* block_tables, int kv_heads,
                                                     int block_size, int max_blocks, int kv_head,
                                                     int seq, int first, int context, int tid) {
  i64 offsets[COPIES];
  bool valid[COPIES];
#pragma unroll
  for (int i = 0; i < COPIES; i++) {
    const int piece = tid + i * THREADS, pos = first + piece / ROW_PIECES;
    valid[i] = pos < context;
    offsets[i] = 0;
    if (valid[i]) {
      const i64 block = block_tables[(i64)seq * max_blocks + pos / block_size];
      offsets[i] = ((block * block_size + pos % block_size) * kv_heads + kv_head) * HEAD_DIM +
                   piece % ROW_PIECES * VEC;
    }
  }
  copy_rows_async(shared.rows[buffer].k, k_cache, offsets, valid, tid);
  copy_rows_async(shared.rows[buffer].v, v_cache, offsets, valid, tid);
}

// attention_part's work (same arguments, same results) for all GQA_GROUP
// query heads of key/value head `kv_head`, by the whole block. The block's
// `span` partitions are read one after another, each one's copies issued
// while the one before is computed; each warp keeps its running softmax
// state (maximum, sum, output) across them, as one longer partition would.
__device__ __forceinline__ void attention_part_mma(const scalar_t* q, const scalar_t* k_cache,
                                                   const scalar_t* v_cache, const i64* block_tables,
                                                   const i64* positions, int kv_heads, int block_size,
                                                   int max_blocks, float scale, float* part_acc,
                                                   float* part_max, float* part_sum, int kv_head,
                                                   int seq, int partition, int partitions, int span,
                                                   scalar_t* out, AttentionMmaShared& shared) {
  const int heads = kv_heads * GQA_GROUP;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;  // the mma fragments' row and column pair
  const int context = (int)positions[seq] + 1;
  const int begin = partition * span * PARTITION;
  const int end = min(begin + span * PARTITION, context);
  const i64 head_row = (i64)seq * heads + kv_head * GQA_GROUP;  // the group's first query row

  // Partitions past the context (the grid covers the longest sequence)
  // are empty: a zero result that weighs nothing.
  if (begin >= context) {
    for (int i = tid; i < GQA_GROUP * HEAD_DIM; i += THREADS) {
      const int r = i / HEAD_DIM, d = i % HEAD_DIM;
      const i64 out = (head_row + r) * partitions + partition;
      part_acc[out * HEAD_DIM + d] = 0.f;
      if (d == 0) {
        part_max[out] = NEG_INF;
        part_sum[out] = 0.f;
      }
    }
    return;
  }

  // 1. Start copying the first partition's keys, then its values.
  copy_partition_async(shared, 0, k_cache, v_cache, block_tables, kv_heads, block_size, max_blocks,
                       kv_head, seq, begin, context, tid);

  // 2. The queries as the mma's a operand, straight from global memory
  // while the copies fly: rows g and g + 8 of each 16-column step.
  unsigned qa[HEAD_DIM / 16][4];
#pragma unroll
  for (int s = 0; s < HEAD_DIM / 16; s++) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const int row = g + (i % 2) * 8, column = 16 * s + (i / 2) * 8 + 2 * t;
      qa[s][i] = row < GQA_GROUP
                     ? *reinterpret_cast<const unsigned*>(q + (head_row + row) * HEAD_DIM + column)
                     : 0u;
    }
  }

  // The warp's running state for rows g ("lo") and g + 8 ("hi").
  float m_lo = NEG_INF, m_hi = NEG_INF, l_lo = 0.f, l_hi = 0.f;
  float o[HEAD_DIM / 8][4];
#pragma unroll
  for (int d = 0; d < HEAD_DIM / 8; d++) {
#pragma unroll
    for (int i = 0; i < 4; i++) o[d][i] = 0.f;
  }
  const int token0 = warp * WARP_TOKENS;

  for (int first = begin, buffer = 0; first < end; first += PARTITION, buffer ^= 1) {
    const auto& rows = shared.rows[buffer];
    // The next partition's copies go into the other buffer, which every
    // warp finished reading at the end of the previous round.
    const bool ahead = first + PARTITION < end;
    if (ahead)
      copy_partition_async(shared, buffer ^ 1, k_cache, v_cache, block_tables, kv_heads,
                           block_size, max_blocks, kv_head, seq, first + PARTITION, context, tid);

    // 3. Scores of this warp's tokens: S = Q · Kᵀ, scaled, -inf past the
    // context. Tile j holds tokens j·8 .. j·8 + 7 of the warp's share.
    if (ahead)
      copy_async_wait<3>();  // this thread's keys have landed (the values and the next two groups may fly) ...
    else
      copy_async_wait<1>();
    __syncthreads();  // ... and everyone else's
    float p[SCORE_TILES][4];
#pragma unroll
    for (int j = 0; j < SCORE_TILES; j++) {
#pragma unroll
      for (int i = 0; i < 4; i++) p[j][i] = 0.f;
#pragma unroll
      for (int s = 0; s < HEAD_DIM / 16; s++) {
        unsigned b0, b1;
        load_tiles_x2(b0, b1, &rows.k[token0 + j * 8 + lane % 8][16 * s + (lane / 8) % 2 * 8]);
        mma_16x8x16(p[j], qa[s][0], qa[s][1], qa[s][2], qa[s][3], b0, b1);
      }
    }

    // 4. Online softmax without normalising: rows g and g + 8 (the lane's
    // halves of each tile), max and sum over the four lanes that share a
    // row; what was accumulated before is rescaled to the new maximum.
    float top_lo = m_lo, top_hi = m_hi;
#pragma unroll
    for (int j = 0; j < SCORE_TILES; j++) {
#pragma unroll
      for (int e = 0; e < 2; e++) {
        const bool in = first + token0 + j * 8 + 2 * t + e < context;
        p[j][e] = in ? p[j][e] * scale : NEG_INF;
        p[j][2 + e] = in ? p[j][2 + e] * scale : NEG_INF;
        top_lo = fmaxf(top_lo, p[j][e]);
        top_hi = fmaxf(top_hi, p[j][2 + e]);
      }
    }
#pragma unroll
    for (int offset = 1; offset < 4; offset *= 2) {
      top_lo = fmaxf(top_lo, __shfl_xor_sync(0xffffffffu, top_lo, offset));
      top_hi = fmaxf(top_hi, __shfl_xor_sync(0xffffffffu, top_hi, offset));
    }
    // Nothing seen yet (m = -inf) weighs nothing; nor does a row whose
    // tokens so far are all past the context (top = -inf).
    const float scale_lo = m_lo == NEG_INF ? 0.f : __expf(m_lo - top_lo);
    const float scale_hi = m_hi == NEG_INF ? 0.f : __expf(m_hi - top_hi);
    float sum_lo = 0.f, sum_hi = 0.f;
#pragma unroll
    for (int j = 0; j < SCORE_TILES; j++) {
#pragma unroll
      for (int e = 0; e < 2; e++) {
        p[j][e] = top_lo == NEG_INF ? 0.f : __expf(p[j][e] - top_lo);
        p[j][2 + e] = top_hi == NEG_INF ? 0.f : __expf(p[j][2 + e] - top_hi);
        sum_lo += p[j][e];
        sum_hi += p[j][2 + e];
      }
    }
#pragma unroll
    for (int offset = 1; offset < 4; offset *= 2) {
      sum_lo += __shfl_xor_sync(0xffffffffu, sum_lo, offset);
      sum_hi += __shfl_xor_sync(0xffffffffu, sum_hi, offset);
    }
    l_lo = l_lo * scale_lo + sum_lo;
    l_hi = l_hi * scale_hi + sum_hi;
    m_lo = top_lo;
    m_hi = top_hi;
#pragma unroll
    for (int d = 0; d < HEAD_DIM / 8; d++) {
      o[d][0] *= scale_lo;
      o[d][1] *= scale_lo;
      o[d][2] *= scale_hi;
      o[d][3] *= scale_hi;
    }

    // 5. O += P · V, 16 tokens per step. The scores' layout in registers
    // is already that of the a operand: tiles 2c and 2c + 1 are its two
    // halves of k. V's rows are tokens, so ldmatrix transposes them into b.
    if (ahead)
      copy_async_wait<2>();
    else
      copy_async_wait<0>();
    __syncthreads();
#if SCORE_TILES == 1
    // Eight tokens per warp: the upper half of k is zero.
    {
      const unsigned a0 = pack_pair(p[0][0], p[0][1]), a1 = pack_pair(p[0][2], p[0][3]);
#pragma unroll
      for (int d = 0; d < HEAD_DIM / 8; d++) {
        unsigned b0;
        load_tile_trans(b0, &rows.v[token0 + lane % 8][8 * d]);
        mma_16x8x16(o[d], a0, a1, 0u, 0u, b0, 0u);
      }
    }
#else
#pragma unroll
    for (int c = 0; c < SCORE_TILES / 2; c++) {
      const unsigned a0 = pack_pair(p[2 * c][0], p[2 * c][1]);
      const unsigned a1 = pack_pair(p[2 * c][2], p[2 * c][3]);
      const unsigned a2 = pack_pair(p[2 * c + 1][0], p[2 * c + 1][1]);
      const unsigned a3 = pack_pair(p[2 * c + 1][2], p[2 * c + 1][3]);
#pragma unroll
      for (int d = 0; d < HEAD_DIM / 8; d++) {
        unsigned b0, b1;
        load_tiles_x2_trans(b0, b1, &rows.v[token0 + 16 * c + lane % 16][8 * d]);
        mma_16x8x16(o[d], a0, a1, a2, a3, b0, b1);
      }
    }
#endif
    // Everyone is done with this buffer before the next round refills it
    // (and, after the last round, before the results reuse the memory).
    __syncthreads();
  }

  // 6. Merge the four warps. Rows past the group are padding: dropped.
#pragma unroll
  for (int half = 0; half < 2; half++) {
    const int row = g + half * 8;
    if (row < GQA_GROUP) {
#pragma unroll
      for (int d = 0; d < HEAD_DIM / 8; d++)
        *reinterpret_cast<float2*>(&shared.warps.o[warp][row][8 * d + 2 * t]) =
            make_float2(o[d][2 * half], o[d][2 * half + 1]);
      if (t == 0) {
        shared.warps.m[warp][row] = half ? m_hi : m_lo;
        shared.warps.l[warp][row] = half ? l_hi : l_lo;
      }
    }
  }
  __syncthreads();
  for (int i = tid; i < GQA_GROUP * HEAD_DIM; i += THREADS) {
    const int r = i / HEAD_DIM, d = i % HEAD_DIM;
    float top = NEG_INF;
#pragma unroll
    for (int w = 0; w < THREADS / 32; w++) top = fmaxf(top, shared.warps.m[w][r]);
    float acc = 0.f, sum = 0.f;
#pragma unroll
    for (int w = 0; w < THREADS / 32; w++) {
      const float m = shared.warps.m[w][r];
      const float weight = m == NEG_INF ? 0.f : __expf(m - top);
      acc += shared.warps.o[w][r][d] * weight;
      sum += shared.warps.l[w][r] * weight;
    }
    if (out != nullptr) {
      out[(head_row + r) * HEAD_DIM + d] = from_float(acc / sum);
      continue;
    }
    const i64 part = (head_row + r) * partitions + partition;
    part_acc[part * HEAD_DIM + d] = acc;
    if (d == 0) {
      part_max[part] = top;
      part_sum[part] = sum;
    }
  }
}
#endif  // ATTENTION_MMA

// One block per (key/value head, sequence, span of `span` partitions).
// With one span per sequence (gridDim.z == 1) the host passes `out` and
// no partial results: there is nothing for attention_combine to merge.
extern "C" __global__ void __launch_bounds__(THREADS)
attention_partial(const scalar_t* q, const scalar_t* k_cache, const scalar_t* v_cache,
                  const i64* block_tables, const i64* positions, int kv_heads, int block_size,
                  int max_blocks, int span, float scale, float* part_acc, float* part_max,
                  float* part_sum, scalar_t* out) {
  // Launched while rope_store_kv finishes (where the host asks for it): the
  // block is scheduled already, and waits here for the queries and keys.
  // attention_combine may be launched behind it in turn.
  grid_dependents_may_launch();
  grid_dependencies_wait();
#if ATTENTION_MMA
  __shared__ AttentionMmaShared shared;
  attention_part_mma(q, k_cache, v_cache, block_tables, positions, kv_heads, block_size, max_blocks,
                     scale, part_acc, part_max, part_sum, blockIdx.x, blockIdx.y, blockIdx.z,
                     gridDim.z, span, out, shared);
#else
  __shared__ AttentionShared<GQA_GROUP> shared;
  attention_part<GQA_GROUP>(q, k_cache, v_cache, block_tables, positions, kv_heads, block_size,
                            max_blocks, scale, part_acc, part_max, part_sum, blockIdx.x, 0,
                            blockIdx.y, blockIdx.z, gridDim.z, span, out, threadIdx.x, 0, shared);
#endif
}
// ANCHOR_END: paged_attention_mma

// ANCHOR: product
// The batched step's matrix products on our own kernel: y = x · Wᵀ for 1
// to 128 rows of x (the sequences of a decode step), W [n, k] as
// nn.Linear keeps it. Off by default (SPARK_DISAGG_PRODUCT_KERNEL=1 turns
// it on): on the H100 cuBLAS is still faster, and what this kernel shows
// is why (chapter 1, "A product kernel of our own").
//
// At these batches a product is still a stream of weights: TinyLlama's
// qkv projection reads 10.5 MB of them (3.1 µs at the H100's 3.35 TB/s)
// and does 32 rows of arithmetic on each. cuBLAS took 8-20 µs for each of
// a layer's four products at batch 32 (62-70 % of the bandwidth on the
// large ones, a third of it on the small ones): its tiles are chosen for
// large matrices, so a small product is split over fewer blocks than the
// GPU has multiprocessors, and every launch starts cold, its first weights
// requested only once the kernel before it has ended.
//
// This kernel is shaped for the stream instead. The weights are cut into
// units of PRODUCT_ROWS rows, and each unit's k into `splits` ranges, so
// that the grid is about two blocks per multiprocessor whatever the
// matrix; each block copies its rows and the matching columns of x through
// a ring of stages in shared memory (cp.async), and its eight warps
// multiply them on the tensor cores (mma.sync, 16 × 8 × 16 a step, f32
// sums). The rows of x are padded with zeros to M_TILES · 16.
//
// Weights depend on nothing the kernel before wrote, so with programmatic
// dependent launch (sm_90) a block fills the first stages of its ring
// with weights before it waits for that kernel, and only then copies x:
// the cold start of each product overlaps the tail of the kernel before.
//
// The block's sums then go through shared memory. Where k is split, each
// block writes them (f32) to `partials`, and the last block of a unit to
// finish, told by a counter per unit, adds them up in split order (so the
// result does not depend on which block finished first), sets the counter
// back to zero for the next launch, and runs the epilogue:
//   PRODUCT_STORE     out = y
//   PRODUCT_STORE_F32 out = y in f32 (the logits)
//   PRODUCT_ADD_TO    out += y (out is the residual stream)
//   PRODUCT_SWIGLU    out = silu(gate) · up, where W is the fused gate/up
//                     weight, [gate (n/2 rows) | up (n/2 rows)]: a unit
//                     takes 8 gate rows then the same 8 up rows, four
//                     times, so that the gate and up sums of the same
//                     outputs are in the same block and the activation is
//                     applied before anything is written (no silu_mul
//                     kernel, and half the output).
#define PRODUCT_STORE 0
#define PRODUCT_STORE_F32 1
#define PRODUCT_ADD_TO 2
#define PRODUCT_SWIGLU 3

#if __CUDA_ARCH__ >= 800 && SCALAR_KIND != 0
#define PRODUCT_THREADS 256
#define PRODUCT_ROWS 64      // weight rows per unit: eight 8-row tiles of the mma
#define PRODUCT_DEPTH 64     // k per stage: 128 bytes of each row
// A row in shared memory is padded by 16 bytes, so that the eight rows one
// ldmatrix reads start in eight different groups of four banks.
#define PRODUCT_PITCH (PRODUCT_DEPTH + 8)
#define PRODUCT_PIECES (PRODUCT_DEPTH / VEC)  // 16-byte pieces of a row per stage
#define PRODUCT_MAX_SPLITS 8                  // ranges of k a product is split into, at most

// The weight row that row `r` (0..PRODUCT_ROWS-1) of unit `unit` reads, or
// -1 past the end.
__device__ __forceinline__ int product_weight_row(int unit, int r, int n, bool swiglu) {
  if (!swiglu) {
    const int row = unit * PRODUCT_ROWS + r;
    return row < n ? row : -1;
  }
  // 8-row tile j of the unit: gate rows where j is even, up rows where odd.
  const int j = r / 8, column = unit * (PRODUCT_ROWS / 2) + j / 2 * 8 + r % 8;
  return column < n / 2 ? (j % 2) * (n / 2) + column : -1;
}

// 16 bytes from global memory to shared memory at the 32-bit shared
// address `dst`, or 16 zero bytes when `valid` is false.
__device__ __forceinline__ void copy_async_16_at(unsigned dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}

// ldmatrix .x4 (as load_tiles_x2, with lanes 16-31 giving the third and
// fourth tiles' rows) from a 32-bit shared address.
__device__ __forceinline__ void load_tiles_x4_at(unsigned* r, unsigned address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address)
               : "memory");
}

// ldmatrix .x2 (as load_tiles_x2) from a 32-bit shared address.
__device__ __forceinline__ void load_tiles_x2_at(unsigned* r, unsigned address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(address)
               : "memory");
}

// Four floats from L2 (load_cg: other blocks wrote them).
__device__ __forceinline__ float4 load_cg_f32x4(const float* p) {
  const uint4 v = load_cg(p);
  return make_float4(__uint_as_float(v.x), __uint_as_float(v.y), __uint_as_float(v.z),
                     __uint_as_float(v.w));
}

// One thread's share of a stage's copies: PIECES_PER_THREAD pieces of 16
// bytes, each from a row of a matrix with k columns (`source` points at
// the piece's place in the row's first stage) to its place in a stage
// (`offset` bytes from the stage's start). Rows past the matrix have no
// source. Worked out once, so that a stage's copies cost an addition and
// a compare each: with the addresses recomputed per stage (and converted
// to shared-memory addresses per ldmatrix), the first version of this
// kernel spent most of its time issuing instructions, eight cycles apart.
template <int PIECES_PER_THREAD>
struct StageCopies {
  const scalar_t* matrix;
  const scalar_t* source[PIECES_PER_THREAD];
  unsigned offset[PIECES_PER_THREAD];
  int column[PIECES_PER_THREAD];  // the piece's first column in the row's first stage

  // Pieces `tid`, `tid` + PRODUCT_THREADS, ... of `rows` rows (weight or x
  // row of each from `row_of`).
  template <typename RowOf>
  __device__ __forceinline__ void plan(const scalar_t* of, int k, int rows, int tid, RowOf row_of) {
    matrix = of;
#pragma unroll
    for (int i = 0; i < PIECES_PER_THREAD; i++) {
      const int piece = tid + i * PRODUCT_THREADS, r = piece / PRODUCT_PIECES;
      const int row = piece < rows * PRODUCT_PIECES ? row_of(r) : -1;
      column[i] = piece % PRODUCT_PIECES * VEC;
      offset[i] = r * PRODUCT_PITCH * (int)sizeof(scalar_t) + column[i] * (int)sizeof(scalar_t);
      source[i] = row >= 0 ? matrix + (i64)row * k + column[i] : nullptr;
    }
  }

  // Chunk `chunk` into the stage at shared address `stage`, zeros past the matrix.
  __device__ __forceinline__ void issue(unsigned stage, int chunk, int k, int rows_in_stage, int tid) {
#pragma unroll
    for (int i = 0; i < PIECES_PER_THREAD; i++) {
      if (tid + i * PRODUCT_THREADS >= rows_in_stage * PRODUCT_PIECES) continue;
      const int at = chunk * PRODUCT_DEPTH;
      const bool valid = source[i] != nullptr && at + column[i] < k;
      copy_async_16_at(stage + offset[i], valid ? source[i] + at : matrix, valid);
    }
  }
};

template <int M_TILES, int STAGES>
__device__ __forceinline__ void product(const scalar_t* __restrict__ x,
                                        const scalar_t* __restrict__ w, void* out,
                                        float* partials, unsigned* counters, int m, int n, int k,
                                        int epilogue) {
  constexpr int X_ROWS = M_TILES * 16;
  constexpr int PITCH_BYTES = PRODUCT_PITCH * (int)sizeof(scalar_t);
  // The eight warps split the block's output: two by four where x has 32
  // rows or more, else one by eight.
  constexpr int WARPS_M = M_TILES >= 2 ? 2 : 1, WARPS_N = PRODUCT_THREADS / 32 / WARPS_M;
  constexpr int WM = M_TILES / WARPS_M;           // 16-row tiles of x per warp
  constexpr int WN = PRODUCT_ROWS / 8 / WARPS_N;  // 8-row tiles of W per warp
  static_assert(WN == 1 || WN % 2 == 0, "weight tiles are read one or two at a time");
  extern __shared__ __align__(16) unsigned char product_shared[];
  const unsigned ring = shared_address(product_shared);
  const unsigned w_ring = ring, x_ring = ring + STAGES * PRODUCT_ROWS * PITCH_BYTES;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int warp_m = warp / WARPS_N, warp_n = warp % WARPS_N;
  const int unit = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  const bool swiglu = epilogue == PRODUCT_SWIGLU;
  const int chunks = (k + PRODUCT_DEPTH - 1) / PRODUCT_DEPTH;
  const int first = split * chunks / splits, last = (split + 1) * chunks / splits;

  // Which pieces this thread copies, worked out once: each chunk only
  // moves the sources along.
  StageCopies<PRODUCT_ROWS * PRODUCT_PIECES / PRODUCT_THREADS> w_copies;
  StageCopies<(X_ROWS * PRODUCT_PIECES + PRODUCT_THREADS - 1) / PRODUCT_THREADS> x_copies;
  w_copies.plan(w, k, PRODUCT_ROWS, tid, [&](int r) { return product_weight_row(unit, r, n, swiglu); });
  x_copies.plan(x, k, X_ROWS, tid, [&](int r) { return r < m ? r : -1; });

  // The ring's first stages: weights first, before the kernel ahead has
  // finished; x once it has. One group of copies per stage, so the wait
  // below counts stages (the weights of the first stages join the first).
  grid_dependents_may_launch();
  for (int s = 0; s < STAGES - 1; s++)
    if (first + s < last)
      w_copies.issue(w_ring + s * PRODUCT_ROWS * PITCH_BYTES, first + s, k, PRODUCT_ROWS, tid);
  grid_dependencies_wait();
  for (int s = 0; s < STAGES - 1; s++) {
    if (first + s < last)
      x_copies.issue(x_ring + s * X_ROWS * PITCH_BYTES, first + s, k, X_ROWS, tid);
    copy_async_commit();
  }

  float acc[WM][WN][4];
#pragma unroll
  for (int i = 0; i < WM; i++)
#pragma unroll
    for (int j = 0; j < WN; j++) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.f;

  // Where this lane's ldmatrix rows start in a stage. a: rows 0-15 of each
  // x tile, lanes 16-31 the second 8 columns. b: two 8-row weight tiles
  // per ldmatrix (lanes 16-31 the second), both 8-column halves of each
  // (lanes 8-15 and 24-31); with one tile per warp, one tile's halves.
  const unsigned a_lane = (warp_m * WM * 16 + lane % 16) * PITCH_BYTES + lane / 16 * 16;
  const unsigned b_lane = (warp_n * WN * 8 + lane % 8 + (WN > 1 ? lane / 16 * 8 : 0)) * PITCH_BYTES +
                          lane / 8 % 2 * 16;
  int slot = 0, refill = STAGES - 1;
  for (int c = first; c < last; c++) {
    copy_async_wait<STAGES - 2>();  // chunk c has landed (this thread's copies)
    __syncthreads();                // everyone's, and the slot refilled below is free
    if (c + STAGES - 1 < last) {
      w_copies.issue(w_ring + refill * PRODUCT_ROWS * PITCH_BYTES, c + STAGES - 1, k, PRODUCT_ROWS,
                       tid);
      x_copies.issue(x_ring + refill * X_ROWS * PITCH_BYTES, c + STAGES - 1, k, X_ROWS, tid);
    }
    copy_async_commit();
    const unsigned ws = w_ring + slot * PRODUCT_ROWS * PITCH_BYTES + b_lane;
    const unsigned xs = x_ring + slot * X_ROWS * PITCH_BYTES + a_lane;
#pragma unroll
    for (int kk = 0; kk < PRODUCT_DEPTH; kk += 16) {
      unsigned a[WM][4];
#pragma unroll
      for (int i = 0; i < WM; i++) load_tiles_x4_at(a[i], xs + i * 16 * PITCH_BYTES + kk * 2);
#pragma unroll
      for (int j = 0; j < WN; j += 2) {
        unsigned b[4];
        if (WN > 1) {
          load_tiles_x4_at(b, ws + j * 8 * PITCH_BYTES + kk * 2);
        } else {
          load_tiles_x2_at(b, ws + kk * 2);
        }
#pragma unroll
        for (int i = 0; i < WM; i++) {
          mma_16x8x16(acc[i][j], a[i][0], a[i][1], a[i][2], a[i][3], b[0], b[1]);
          if (WN > 1) mma_16x8x16(acc[i][j + 1], a[i][0], a[i][1], a[i][2], a[i][3], b[2], b[3]);
        }
      }
    }
    slot = slot + 1 == STAGES ? 0 : slot + 1;
    refill = refill + 1 == STAGES ? 0 : refill + 1;
  }

  // The block's sums go to shared memory (the ring is free once the last
  // copies have landed), so that the rest reads them in rows: partial sums
  // and outputs are then written 16 bytes at a time.
  copy_async_wait<0>();
  __syncthreads();
  float(*sums)[PRODUCT_ROWS + 4] = reinterpret_cast<float(*)[PRODUCT_ROWS + 4]>(product_shared);
  {
    // Lane (g, t) holds, of x tile i and weight tile j, rows g and g + 8,
    // columns 2t and 2t + 1 (in the unit's own row order).
    const int row0 = warp_m * WM * 16 + g, col0 = warp_n * WN * 8 + 2 * t;
#pragma unroll
    for (int i = 0; i < WM; i++)
#pragma unroll
      for (int j = 0; j < WN; j++)
#pragma unroll
        for (int h = 0; h < 2; h++)
          *reinterpret_cast<float2*>(&sums[row0 + i * 16 + h * 8][col0 + j * 8]) =
              make_float2(acc[i][j][2 * h], acc[i][j][2 * h + 1]);
  }
  __syncthreads();

  // An item is four adjacent sums of one row of x: row item / 16, columns
  // item % 16 · 4 and the next three.
  const int items = m * (PRODUCT_ROWS / 4);
  if (splits > 1) {
    // Each unit's partial sums are m rows of PRODUCT_ROWS, one block after
    // another: [split][unit][row][column].
    const i64 block_sums = (i64)m * PRODUCT_ROWS;
    float* mine = partials + ((i64)split * gridDim.x + unit) * block_sums;
    for (int item = tid; item < items; item += PRODUCT_THREADS)
      *reinterpret_cast<float4*>(mine + item * 4) =
          *reinterpret_cast<const float4*>(&sums[item / 16][item % 16 * 4]);
    // The release: every thread's partials visible before the count.
    __threadfence();
    __syncthreads();
    __shared__ unsigned arrived;
    if (tid == 0) arrived = atomicAdd(&counters[unit], 1u);
    __syncthreads();
    if (arrived != (unsigned)splits - 1) return;
    __threadfence();  // the acquire: the other blocks' partials are read after the count
    if (tid == 0) counters[unit] = 0;
    // The sums of all splits, two items per thread at a time with every
    // split's load issued before any is added: one trip to L2 per two
    // items, not one per split. Added in split order, whichever block
    // came last.
    for (int base = tid; base < items; base += 2 * PRODUCT_THREADS) {
      float4 part[2][PRODUCT_MAX_SPLITS];
#pragma unroll
      for (int q = 0; q < 2; q++)
#pragma unroll
        for (int s = 0; s < PRODUCT_MAX_SPLITS; s++)
          if (s < splits && base + q * PRODUCT_THREADS < items)
            part[q][s] = load_cg_f32x4(partials + ((i64)s * gridDim.x + unit) * block_sums +
                                       (base + q * PRODUCT_THREADS) * 4);
#pragma unroll
      for (int q = 0; q < 2; q++) {
        const int item = base + q * PRODUCT_THREADS;
        if (item >= items) continue;
        float4 total = part[q][0];
#pragma unroll
        for (int s = 1; s < PRODUCT_MAX_SPLITS; s++)
          if (s < splits)
            total = make_float4(total.x + part[q][s].x, total.y + part[q][s].y,
                                total.z + part[q][s].z, total.w + part[q][s].w);
        *reinterpret_cast<float4*>(&sums[item / 16][item % 16 * 4]) = total;
      }
    }
    __syncthreads();
  }

  // The epilogue, an item per thread at a time.
  for (int item = tid; item < items; item += PRODUCT_THREADS) {
    const int row = item / 16, local = item % 16 * 4;
    const float* y = &sums[row][local];
    if (swiglu) {
      // Gate items only; the up sums of the same outputs are 8 columns on.
      if (local / 8 % 2) continue;
      const int column = unit * (PRODUCT_ROWS / 2) + local / 16 * 8 + local % 8;
      if (column >= n / 2) continue;
      // Gate and up rounded to the model's type first, as the gate/up
      // product's output would be before silu_mul reads it.
      float a[4];
#pragma unroll
      for (int e = 0; e < 4; e++)
        a[e] = silu_times(to_float(from_float(y[e])), to_float(from_float(y[e + 8])));
      *reinterpret_cast<uint2*>(static_cast<scalar_t*>(out) + (i64)row * (n / 2) + column) =
          make_uint2(pack_pair(a[0], a[1]), pack_pair(a[2], a[3]));
      continue;
    }
    const int column = unit * PRODUCT_ROWS + local;
    if (column >= n) continue;
    const i64 at = (i64)row * n + column;
    if (epilogue == PRODUCT_STORE_F32) {
      *reinterpret_cast<float4*>(static_cast<float*>(out) + at) = make_float4(y[0], y[1], y[2], y[3]);
    } else if (epilogue == PRODUCT_ADD_TO) {
      uint2* p = reinterpret_cast<uint2*>(static_cast<scalar_t*>(out) + at);
      const uint2 old = *p;
      // As addmm_: the product rounded to the model's type, then added.
      const float r0 = to_float((scalar_t)(old.x & 0xffffu)), r1 = to_float((scalar_t)(old.x >> 16));
      const float r2 = to_float((scalar_t)(old.y & 0xffffu)), r3 = to_float((scalar_t)(old.y >> 16));
      *p = make_uint2(pack_pair(r0 + to_float(from_float(y[0])), r1 + to_float(from_float(y[1]))),
                      pack_pair(r2 + to_float(from_float(y[2])), r3 + to_float(from_float(y[3]))));
    } else {
      *reinterpret_cast<uint2*>(static_cast<scalar_t*>(out) + at) =
          make_uint2(pack_pair(y[0], y[1]), pack_pair(y[2], y[3]));
    }
  }
}
#define PRODUCT_KERNEL(NAME, M_TILES, STAGES)                                                     \
  extern "C" __global__ void __launch_bounds__(PRODUCT_THREADS)                                   \
      NAME(const scalar_t* x, const scalar_t* w, void* out, float* partials, unsigned* counters, \
           int m, int n, int k, int epilogue) {                                                   \
    product<M_TILES, STAGES>(x, w, out, partials, counters, m, n, k, epilogue);                   \
  }
#else
#define PRODUCT_KERNEL(NAME, M_TILES, STAGES)                                                     \
  extern "C" __global__ void NAME(const scalar_t* x, const scalar_t* w, void* out,                \
                                  float* partials, unsigned* counters, int m, int n, int k,       \
                                  int epilogue) {                                                 \
    __trap();                                                                                     \
  }
#endif
// One kernel per height of x: 16, 32, 64 or 128 rows, with as many stages
// as keep a block's shared memory at about 110 KiB (two blocks fit on an
// H100's multiprocessor). A stage's copies take a trip to memory, about
// two microseconds under load, so the ring must hold that long's worth
// of the block's share of the bandwidth: with four stages TinyLlama's
// gate/up product ran at half of it.
PRODUCT_KERNEL(product_rows16, 1, 8)
PRODUCT_KERNEL(product_rows32, 2, 8)
PRODUCT_KERNEL(product_rows64, 4, 6)
PRODUCT_KERNEL(product_rows128, 8, 4)
// ANCHOR_END: product


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

// Lane `lane`'s chunks base, base + 32, ... (MATVEC_UNROLL of them) of
// weight row `row`.
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

// Shared memory for staging: the per-warp sums of squares and each row's
// 1/rms (the staged rows themselves are the caller's, as their size varies).
struct StagingShared {
  float partial[32][MATVEC_ROWS];
  float inv_rms[MATVEC_ROWS];
};

// Each row's 1/rms from every thread's sums of squares (squares[m] for row
// m): the warps add their lanes with shuffles, then the first `rows` threads
// add the warps. Ends with the barrier after which s.inv_rms is ready.
__device__ __forceinline__ void rows_inv_rms(float (&squares)[MATVEC_ROWS], StagingShared& s,
                                             float eps, int rows, int k, int threads, int barrier) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = threads / 32;
#pragma unroll
  for (int m = 0; m < MATVEC_ROWS; m++) {
    for (int offset = 16; offset > 0; offset /= 2)
      squares[m] += __shfl_xor_sync(0xffffffffu, squares[m], offset);
    if (lane == 0) s.partial[warp][m] = squares[m];
  }
  sync_threads(barrier, threads);
  if (threadIdx.x < rows) {
    float total = 0.f;
    for (int w = 0; w < warps; w++) total += s.partial[w][threadIdx.x];
    s.inv_rms[threadIdx.x] = rsqrtf(total / k + eps);
  }
  sync_threads(barrier, threads);
}

// Stages `rows` rows of the product's input into `xs` (shared, [rows, k]),
// applying the prologue; 16 bytes per thread at a time, the block's first
// `threads` threads taking part, which meet at named barrier `barrier`
// (0 and the whole block for matvec). Ends with that barrier: xs is ready.
//
// RMSNorm needs every element of a row before it can scale any of them.
// Where each thread has at most one 16-byte chunk of a row (k up to
// 8 · threads: TinyLlama's 2048 on the layer kernel's 480 threads), it
// loads its chunk of every row and of the norm's weight at once, keeps them
// in registers while the block adds the squares, and scales them from
// there: one trip to memory (L2, where the previous stage left x) before
// the staging's barriers instead of two, one on each side of them. The
// sums are added in the same order either way, so the staged values are the
// same to the bit.
__device__ __forceinline__ void stage_input(scalar_t* xs, StagingShared& s, const scalar_t* in,
                                            const scalar_t* norm_weight, float eps, int rows, int k,
                                            int prologue, int threads, int barrier) {
  const int chunks = k / VEC;
  const uint4* in4 = reinterpret_cast<const uint4*>(in);
  if (prologue == 1 && chunks <= threads) {
    const int c = threadIdx.x;
    const bool holds = c < chunks;
    uint4 held[MATVEC_ROWS];
    const uint4 gain = holds ? reinterpret_cast<const uint4*>(norm_weight)[c] : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int m = 0; m < MATVEC_ROWS; m++)
      held[m] = holds && m < rows ? load_cg(in4 + m * chunks + c) : make_uint4(0, 0, 0, 0);
    float squares[MATVEC_ROWS];
#pragma unroll
    for (int m = 0; m < MATVEC_ROWS; m++) {
      float v[VEC];
      unpack(held[m], v);
      squares[m] = 0.f;
#pragma unroll
      for (int i = 0; i < VEC; i++) squares[m] += v[i] * v[i];
    }
    rows_inv_rms(squares, s, eps, rows, k, threads, barrier);
    if (holds) {
      float b[VEC];
      unpack(gain, b);
#pragma unroll
      for (int m = 0; m < MATVEC_ROWS; m++) {
        if (m >= rows) break;
        float a[VEC];
        unpack(held[m], a);
        scalar_t* dst = xs + m * k + c * VEC;
#pragma unroll
        for (int e = 0; e < VEC; e++) dst[e] = from_float(a[e] * s.inv_rms[m] * b[e]);
      }
    }
    sync_threads(barrier, threads);
    return;
  }
  if (prologue == 1) {
    float squares[MATVEC_ROWS];
#pragma unroll
    for (int m = 0; m < MATVEC_ROWS; m++) {
      squares[m] = 0.f;
      if (m < rows)
        for (int c = threadIdx.x; c < chunks; c += threads) {
          float v[VEC];
          unpack(load_cg(in4 + m * chunks + c), v);
#pragma unroll
          for (int i = 0; i < VEC; i++) squares[m] += v[i] * v[i];
        }
    }
    rows_inv_rms(squares, s, eps, rows, k, threads, barrier);
  }
#pragma unroll 4
  for (int i = threadIdx.x; i < rows * chunks; i += threads) {
    int m = i / chunks, c = i % chunks;
    scalar_t* dst = xs + m * k + c * VEC;
    float a[VEC], b[VEC];
    if (prologue == 0) {
      *reinterpret_cast<uint4*>(dst) = load_cg(in4 + i);
    } else if (prologue == 1) {
      unpack(load_cg(in4 + i), a);
      unpack(reinterpret_cast<const uint4*>(norm_weight)[c], b);
#pragma unroll
      for (int e = 0; e < VEC; e++) dst[e] = from_float(a[e] * s.inv_rms[m] * b[e]);
    } else {
      unpack(load_cg(in4 + m * 2 * chunks + c), a);           // gate
      unpack(load_cg(in4 + m * 2 * chunks + chunks + c), b);  // up
#pragma unroll
      for (int e = 0; e < VEC; e++) dst[e] = from_float(a[e] / (1.f + __expf(-a[e])) * b[e]);
    }
  }
  sync_threads(barrier, threads);
}

// The dot products of weight row `row` with each staged row of xs, by one
// warp: acc[m] (in every lane). `chunk` holds the row's first loads
// (base = lane), issued by the caller before it staged xs, so that they
// are in flight meanwhile.
__device__ __forceinline__ void dot_row(const scalar_t* weight, int row, int k, const scalar_t* xs,
                                        int rows, uint4 (&chunk)[MATVEC_UNROLL],
                                        float (&acc)[MATVEC_ROWS]) {
  const int lane = threadIdx.x % 32, chunks = k / VEC;
#pragma unroll
  for (int m = 0; m < MATVEC_ROWS; m++) acc[m] = 0.f;
  for (int base = lane; base < chunks; base += 32 * MATVEC_UNROLL) {
    if (base != lane) load_weight_chunks(chunk, weight, row, k, base);
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
  for (int m = 0; m < MATVEC_ROWS; m++)
    for (int offset = 16; offset > 0; offset /= 2)
      acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], offset);
}

// The first `bytes` of `p` into L2, spread over `threads` threads (this one
// is `thread`), one 128-byte line at a time. A prefetch waits for nothing.
__device__ __forceinline__ void prefetch_l2(const char* p, i64 bytes, i64 thread, i64 threads) {
  if (p == nullptr) return;
  for (i64 at = thread * 128; at < bytes; at += threads * 128)
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p + at));
}

extern "C" __global__ void __launch_bounds__(MATVEC_WARPS * 32)
matvec(const scalar_t* in, const scalar_t* norm_weight, float eps, const scalar_t* weight,
       void* out, int rows, int n, int k, int prologue, int epilogue, const char* next_weight,
       i64 prefetch_bytes) {
  __shared__ __align__(16) scalar_t xs[MATVEC_ROWS * MATVEC_K];
  __shared__ StagingShared staging;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int stride = gridDim.x * MATVEC_WARPS;
  const int first_row = blockIdx.x * MATVEC_WARPS + warp;

  uint4 chunk[MATVEC_UNROLL];
  if (first_row < n) load_weight_chunks(chunk, weight, first_row, k, lane);
  stage_input(xs, staging, in, norm_weight, eps, rows, k, prologue, blockDim.x, 0);

  for (int row = first_row; row < n; row += stride) {
    if (row != first_row) load_weight_chunks(chunk, weight, row, k, lane);
    float acc[MATVEC_ROWS];
    dot_row(weight, row, k, xs, rows, chunk, acc);
#pragma unroll
    for (int m = 0; m < MATVEC_ROWS; m++) {
      if (lane != m || m >= rows) continue;  // lane m writes row m
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

  // Done with its rows, the block asks L2 for its share of the first
  // `prefetch_bytes` of the next product's weights. HBM stays busy through
  // this kernel's tail, the launch of the next, and the attention kernels
  // between the qkv and o products, which barely touch memory.
  prefetch_l2(next_weight, prefetch_bytes, (i64)blockIdx.x * blockDim.x + threadIdx.x,
              (i64)gridDim.x * blockDim.x);
}
// ANCHOR_END: matvec

// ANCHOR: decode_layer
// A whole decoder layer in one persistent kernel, for small batches.
//
// With one kernel per operation, every matrix product starts from nothing:
// its blocks are launched, stage their input, issue their first loads and
// wait a memory round trip before HBM streams at full speed, and a product
// of a few megabytes is over before it gets there. Here one block per
// multiprocessor stays resident for the whole layer and walks through its
// five stages, meeting the other blocks at a grid-wide barrier between
// stages that depend on each other:
//
//   1. qkv = rms_norm(x) · Wqkvᵀ, RoPE; q to scratch, k and v to the pool
//   2. attention (flash-decoding split; the last partition of each head
//      to finish merges them all)
//   3. x += attn · Woᵀ
//   4. act = silu(gate) · up, from rms_norm(x) · Wgate_upᵀ
//   5. x += act · Wdownᵀ
//
// The weights do not depend on anything the layer computes, so they need
// not wait for the barriers at all. Each block keeps a ring of weight
// tiles in shared memory (a tile: a few whole rows, up to
// LAYER_SLOT_BYTES), and its last warp does nothing but fill it: it walks
// through the block's tiles of all four products in order, and copies each
// into the next free slot as soon as the warps that read the slot's last
// tile let it go. The other warps compute: they take the tiles in the same
// order, wait for a tile to land, and read it from shared memory. So while
// they wait at a barrier, or run attention, the ring fills with the next
// product's weights, and HBM streams across the whole layer rather than in
// bursts between barriers. This is the producer/consumer pipeline of
// Hopper's GEMM kernels, on one row of inputs.
//
// The copies are Hopper's bulk copies (TMA, cp.async.bulk): one thread
// asks for a whole tile, and the copy engine moves it without registers;
// its arrival is counted in bytes on the slot's "full" barrier (an
// mbarrier, a barrier object in shared memory). Before Hopper, the copying
// warp issues 16-byte asynchronous copies (cp.async, Ampere) instead.
// A slot's "empty" barrier is where its reader says it is done.
//
// Where the epilogue needs two rows, a tile holds pairs (row j and its
// partner, interleaved): (j, j + HEAD_DIM/2) of a head for RoPE ("rotate
// half"), (j, inter + j) for SwiGLU's gate and up.
//
// The grid must be resident all at once (a barrier waits for every
// block): one block per multiprocessor, launched cooperatively, which makes
// the driver check exactly that. The block is LAYER_THREADS threads (set by
// the Rust side: 512): 15 computing warps, which read each tile in groups
// of LAYER_GROUP_WARPS (3, or 5 where three groups can use a ring one slot
// longer than five can: `LayerRing::choose`), and the copying warp. The
// staged input (MATVEC_ROWS rows) takes what the ring cannot, so the
// engine compiles for the rows it will send (batch 1 by default).
#define LAYER_CONSUMERS (LAYER_THREADS - 32)      // the computing threads; the last warp copies
#define LAYER_WARPS (LAYER_CONSUMERS / 32)
#define LAYER_PARTS (LAYER_CONSUMERS / THREADS)  // attention items a block runs at once
#ifndef LAYER_TAGGED
#define LAYER_TAGGED 0  // 1: the stages wait for tagged words, not grid barriers
#endif
#define LAYER_BARRIERS (LAYER_TAGGED ? 0 : 4)      // grid barriers per layer
#define LAYER_SYNC (LAYER_PARTS + 1)               // named barrier of the computing threads
#define LAYER_GROUPS (LAYER_WARPS / LAYER_GROUP_WARPS)  // groups of warps that read a tile together
#define LAYER_GROUP_THREADS (LAYER_GROUP_WARPS * 32)   // (they meet at barrier LAYER_SYNC + 1 + group)
#define LAYER_BULK_COPY (LAYER_BULK_COPY_ALLOWED && __CUDA_ARCH__ >= 900)
static_assert(GQA_GROUP % LAYER_HEADS == 0, "a query-head chunk divides the group");
static_assert(LAYER_GROUP_WARPS == 1 || LAYER_SYNC + LAYER_GROUPS < 16, "named barriers are 0..15");
static_assert(LAYER_SLOT_BYTES % 16 == 0, "tiles are copied in 16-byte units");

// --- the layer timeline (a diagnostic build: -DLAYER_TIMELINE=1) ---
//
// Where a layer's time goes, block by block: thread 0 of each block reads
// the GPU's global clock (%globaltimer, nanoseconds) at each stage boundary
// and stores it in layer_timeline[layer][block][mark]; the host reads the
// array after a step (DecodeKernels::layer_timeline). "Done" marks are
// taken once all the block's computing warps are done (one extra named
// barrier per stage, the build's only change to the layer's work); the
// copying warp adds when it issued its first and last copies and how long
// it waited for free slots, and thread 0 where its time went in each
// product: waiting for tiles to arrive (a wait there means the stream set
// the pace, not the arithmetic), in the dot products, and at its group's
// barrier. In the default build all of it is compiled out: the marks
// below expand to nothing.
#ifndef LAYER_TIMELINE
#define LAYER_TIMELINE 0
#endif
#define TIMELINE_LAYERS 128   // layers and blocks past these are not recorded
#define TIMELINE_BLOCKS 160
#define TIMELINE_MARKS 32
// The marks, in order (the Rust side's `timeline::mark` names them).
#define MARK_LAUNCHED 0       // the block began (before any barrier)
#define MARK_STARTED 1        // the kernels before it have finished
#define MARK_STAGED 2         // input normalised and staged
#define MARK_QKV_DONE 3
#define MARK_BARRIER1 4
#define MARK_ATTENTION_DONE 5
#define MARK_BARRIER2 6
#define MARK_O_DONE 7
#define MARK_BARRIER3 8
#define MARK_GATE_UP_DONE 9
#define MARK_BARRIER4 10
#define MARK_DOWN_DONE 11
#define MARK_FIRST_COPY 12    // the copying warp issued its first tile
#define MARK_LAST_COPY 13     // ... its last
#define MARK_SLOT_WAIT 14     // ns it waited for free slots, in all
// Thread 0's time in each product p (0 qkv, 1 o, 2 gate/up, 3 down), ns:
#define MARK_TILE_WAIT 15      // + p: waiting for its tiles to arrive
#define MARK_TILE_DOT 19       // + p: in the dot products
#define MARK_TILE_SYNC 23      // + p: at its group's barrier after them
// A block's first attention item (part 0's), timed by thread 0; a block
// with no item records none of these:
#define MARK_ATTN_QUERIES 27   // its first queries seen (tagged build: waited for)
#define MARK_ATTN_PARTIAL 28   // its partition's result stored, the part's threads done
#define MARK_ATTN_COUNTED 29   // the partition counted (fence, atomic)
#define MARK_ATTN_MERGED 30    // the partitions merged, where it was the last
#if LAYER_TIMELINE
__device__ unsigned long long layer_timeline[TIMELINE_LAYERS][TIMELINE_BLOCKS][TIMELINE_MARKS];

__device__ __forceinline__ unsigned long long global_timer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ void timeline_store(int layer, int mark, unsigned long long value) {
  if (layer < TIMELINE_LAYERS && blockIdx.x < TIMELINE_BLOCKS)
    layer_timeline[layer][blockIdx.x][mark] = value;
}

// Thread 0's clock now.
#define TIMELINE_MARK(mark) \
  if (threadIdx.x == 0) timeline_store(p.layer, mark, global_timer())
// Once every computing warp of the block has got here.
#define TIMELINE_DONE(mark)                          \
  do {                                               \
    sync_threads(LAYER_SYNC, LAYER_CONSUMERS);       \
    TIMELINE_MARK(mark);                             \
  } while (0)

// Thread 0's time in the current product, ns (it alone uses them): 0
// waiting for tiles, 1 in dot products, 2 at the group's barrier.
__shared__ unsigned long long timeline_tile[3];
// Starts thread 0's clock for a tile; TIMELINE_TILE_SPLIT(i) adds the time
// since to timeline_tile[i] and starts it again.
#define TIMELINE_TILE_BEGIN \
  unsigned long long tile_clock = threadIdx.x == 0 ? global_timer() : 0
#define TIMELINE_TILE_SPLIT(i)                        \
  if (threadIdx.x == 0) {                             \
    const unsigned long long now = global_timer();    \
    timeline_tile[i] += now - tile_clock;             \
    tile_clock = now;                                 \
  }
#define TIMELINE_TILE_ZERO \
  if (threadIdx.x == 0) timeline_tile[0] = timeline_tile[1] = timeline_tile[2] = 0
// Stores product `product`'s times in its marks and starts the next at 0.
#define TIMELINE_TILE_STORE(product)                                       \
  if (threadIdx.x == 0) {                                                  \
    timeline_store(p.layer, MARK_TILE_WAIT + (product), timeline_tile[0]); \
    timeline_store(p.layer, MARK_TILE_DOT + (product), timeline_tile[1]);  \
    timeline_store(p.layer, MARK_TILE_SYNC + (product), timeline_tile[2]); \
    TIMELINE_TILE_ZERO;                                                    \
  }
// Thread 0's clock now, in the attention item it times (`timed`).
#define TIMELINE_ITEM(mark) \
  if (timed) timeline_store(p.layer, mark, global_timer())
#else
#define TIMELINE_MARK(mark)
#define TIMELINE_DONE(mark)
#define TIMELINE_TILE_BEGIN
#define TIMELINE_TILE_SPLIT(i)
#define TIMELINE_TILE_ZERO
#define TIMELINE_TILE_STORE(product)
#define TIMELINE_ITEM(mark)
#endif

// --- values passed between blocks with their layer's tag (LAYER_TAGGED) ---
//
// A grid barrier is a chain of trips to L2: the fence that waits for the
// block's writes, the atomic that counts its arrival, the polls that see
// the last one arrive, and then the loads of the data it guarded. Where a
// stage needs nothing from the stage before but one vector (qkv's output,
// attention's output, x after the o projection, SwiGLU's output), the data
// can carry its own signal instead: each element is stored together with a tag, the
// layer's index + 1, in one word that a reader sees whole or not at all
// (an aligned 32- or 64-bit access is single-copy atomic). The reader
// polls the words it needs until every tag is this layer's, and has the
// data in the same trip that tells it the data is there. This is the "LL"
// (low-latency) protocol of NCCL's collectives, inside one kernel. A word
// is twice the bytes of its value (bf16 and f16: 16-bit value, 16-bit tag;
// f32: 32 + 32), a few KiB per layer beside megabytes of weights. The words
// are zeroed before a step (tag 0) and each layer's tag differs from the
// one before it, so a word left by an earlier layer or step is never taken
// for this layer's. Attention takes the queries and the new token's keys
// and values from qkv's tagged output (TaggedQkv), and the older keys and
// values from the KV cache as before, so the tagged build has no grid
// barrier left; qkv still writes the new keys and values into the cache,
// for the steps after this one.
//
// The Rust side builds it for layers of 64 MiB or more at one row
// (layer_tagged_wanted in mod.rs): on an H100 it was faster there and
// slower for smaller layers, whose barriers are cheap once the ring holds
// most of the weights (results/h100/module01_decode_experiments_h100.txt,
// sections 25, 26 and 28).
#if SCALAR_KIND == 0
typedef u64 tagged_t;
#define TAG_BITS 32
#else
typedef unsigned tagged_t;
#define TAG_BITS 16
#endif

struct LayerParams {
  scalar_t* x;  // the residual stream [rows, hidden], updated in place
  const scalar_t* input_norm;
  const scalar_t* post_norm;
  const scalar_t* qkv_proj;      // [(heads + 2 kv_heads) · HEAD_DIM, hidden]
  const scalar_t* o_proj;        // [hidden, heads · HEAD_DIM]
  const scalar_t* gate_up_proj;  // [2 · inter, hidden]
  const scalar_t* down_proj;     // [hidden, inter]
  const i64* positions;     // [rows]
  const i64* slots;         // [rows]: where the new keys and values go
  const i64* block_tables;  // [rows, max_blocks]
  const float* cos_table;   // [max_positions, HEAD_DIM / 2]
  const float* sin_table;
  scalar_t* k_cache;  // [slots, kv_heads, HEAD_DIM]
  scalar_t* v_cache;
  scalar_t* q;     // scratch [rows, heads, HEAD_DIM]: rotated queries
  scalar_t* attn;  // scratch [rows, heads · HEAD_DIM]: attention output
  scalar_t* act;   // scratch [rows, inter]: SwiGLU output
  // Vectors that pass between stages, as tagged words (LAYER_TAGGED; see
  // store_tagged), zeroed before the first layer: attention's output,
  // x after the o projection, SwiGLU's output.
  tagged_t* attn_tagged;
  tagged_t* x_tagged;
  tagged_t* act_tagged;
  // qkv's output as tagged words, [rows, heads + 2 kv_heads, HEAD_DIM]
  // (see TaggedQkv).
  tagged_t* qkv_tagged;
  float* part_acc;  // scratch of the attention split (see attention_part)
  float* part_max;
  float* part_sum;
  // [1 + rows · kv_heads · chunks], zeroed before the first layer: the
  // grid barrier's arrivals, then the attention merge's counters.
  unsigned* sync;
  float eps, scale;
  int rows, hidden, inter, heads, kv_heads, max_blocks, block_size, partitions;
  int layer;       // the layer's index in the step: which barriers are its own
  int ring_slots;  // slots of the weight ring (dynamic shared memory)
  int tile_groups;  // groups of warps that take tiles: ring_slots is a multiple
};

// mbarriers and asynchronous copies came with Ampere (sm_80): before it the
// Rust side leaves the layer kernel off, and it is only a stub here.
#if __CUDA_ARCH__ >= 800

// --- mbarriers and asynchronous copies (PTX; sm_80, bulk copies sm_90) ---

__device__ __forceinline__ void mbarrier_init(u64* bar, unsigned count) {
  asm volatile("mbarrier.init.shared.b64 [%0], %1;" ::"r"(shared_address(bar)), "r"(count)
               : "memory");
}

__device__ __forceinline__ void mbarrier_arrive(u64* bar) {
  [[maybe_unused]] u64 state;
  asm volatile("mbarrier.arrive.shared.b64 %0, [%1];"
               : "=l"(state)
               : "r"(shared_address(bar))
               : "memory");
}

// Waits until the phase of parity `parity` of the barrier has completed.
// A barrier's phases alternate in parity, so a waiter must never be more
// than one phase ahead: the ring makes sure of that (see decode_layer).
__device__ __forceinline__ void mbarrier_wait(u64* bar, unsigned parity) {
  unsigned done = 0;
  while (!done)
#if __CUDA_ARCH__ >= 900
    asm volatile(
        "{ .reg .pred p; mbarrier.try_wait.parity.shared.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
        : "=r"(done)
        : "r"(shared_address(bar)), "r"(parity)
        : "memory");
#else
    asm volatile(
        "{ .reg .pred p; mbarrier.test_wait.parity.shared.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
        : "=r"(done)
        : "r"(shared_address(bar)), "r"(parity)
        : "memory");
#endif
}

// An L2 cache policy whose lines are the first to be evicted. A decode step
// reads each weight once, so a weight line in L2 is of no further use once
// its tile has landed in shared memory; marked this way, the weights stream
// through L2 without pushing out what the layer reads again and again: the
// residual stream, the staged inputs' sources, the grid barrier's counter,
// the attention scratch. On the H100 the step was about 2 % faster with
// bulk copies, and about 0.7 % with cp.async (the path of Ampere GPUs,
// where it was not measured).
__device__ __forceinline__ u64 l2_evict_first_policy() {
  u64 policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  return policy;
}

#if LAYER_BULK_COPY
// Arrives on the barrier and tells it `bytes` more are on their way.
__device__ __forceinline__ void mbarrier_expect_bytes(u64* bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(shared_address(bar)),
               "r"(bytes)
               : "memory");
}

// `bytes` from global to shared memory by the copy engine; their arrival
// is counted on `bar`. With LAYER_EVICT_FIRST the lines they pass through
// in L2 follow `policy`.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, unsigned bytes, u64* bar,
                                          [[maybe_unused]] u64 policy) {
#if LAYER_EVICT_FIRST
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1], %2, [%3], %4;" ::"r"(shared_address(dst)),
      "l"(src), "r"(bytes), "r"(shared_address(bar)), "l"(policy)
      : "memory");
#else
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
          shared_address(dst)),
      "l"(src), "r"(bytes), "r"(shared_address(bar))
      : "memory");
#endif
}
#else
// 16 bytes from global to shared memory, without a register on the way;
// with LAYER_EVICT_FIRST their L2 lines follow `policy`.
__device__ __forceinline__ void copy_async_16(void* dst, const void* src,
                                              [[maybe_unused]] u64 policy) {
#if LAYER_EVICT_FIRST
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;" ::"r"(
                   shared_address(dst)),
               "l"(src), "l"(policy)
               : "memory");
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(shared_address(dst)), "l"(src)
               : "memory");
#endif
}

// Arrives on `bar` once this thread's copies so far have landed.
__device__ __forceinline__ void copy_async_arrive(u64* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared.b64 [%0];" ::"r"(shared_address(bar))
               : "memory");
}
#endif

// --- the weight ring ---

// Bytes from one row of a ring tile to the next: the row, padded to 64
// more than a multiple of 128. Shared memory is 32 banks of 4 bytes, and a
// warp's 16-byte loads are served eight lanes at a time; `dot_tile`'s eight
// lanes read 64 bytes of each of two rows, which then fall in different
// banks. Unpadded, rows of 4096 bytes (2048 bf16) would all start in bank
// 0 and every load would take twice as long.
__device__ __forceinline__ int tile_pitch(int k) {
  const int bytes = k * (int)sizeof(scalar_t);
  return bytes + (64 - bytes % 128 + 128) % 128;
}

// One matrix product of the layer as the ring sees it: `units` outputs,
// each one weight row of `k` elements, or with `pairs` two rows `span`
// apart; `per_tile` units make a tile, its rows `pitch` bytes apart.
struct LayerProduct {
  const scalar_t* weight;
  int k, units, span;
  bool pairs;
  int pitch, per_tile;

  __device__ LayerProduct(const scalar_t* weight, int k, int units, int span, bool pairs)
      : weight(weight), k(k), units(units), span(span), pairs(pairs), pitch(tile_pitch(k)) {
    int rows = LAYER_SLOT_BYTES / pitch;
    rows = rows < LAYER_TILE_ROWS ? rows : LAYER_TILE_ROWS;
    per_tile = pairs ? rows / 2 : rows;
  }
  // The first row of unit `u` (its partner is `span` rows on). For qkv,
  // units run over the first halves of the heads: head u / span, element
  // u % span.
  __device__ int row(int u) const { return pairs ? u / span * 2 * span + u % span : u; }
  // The weight row that tile row `r` of units from `first` on holds.
  __device__ int tile_row(int first, int r) const {
    return pairs ? row(first + r / 2) + (r % 2) * span : first + r;
  }
  // Whole tiles are dealt round the grid: tile k goes to block
  // k % gridDim.x, so at any moment the blocks read neighbouring rows, and
  // some blocks get one tile more than others. Evening that out was slower
  // on the H100: every block the same number of smaller tiles, dealt the
  // same way, 1.24-1.25 ms a step against 1.21-1.24; each block a
  // contiguous run of rows, 1.30-1.31 (the blocks then read far-apart
  // rows at once).
  __device__ int block_tiles() const {
    const int tiles = (units + per_tile - 1) / per_tile;
    return tiles > (int)blockIdx.x ? (tiles - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
  }
  // Tile t of this block: its first unit and how many units it holds.
  __device__ void block_tile(int t, int& first, int& count) const {
    first = (blockIdx.x + t * gridDim.x) * per_tile;
    count = min(per_tile, units - first);
  }
};

// The layer's products, in the order the ring carries them.
__device__ LayerProduct layer_product(const LayerParams& p, int index) {
  const int half = HEAD_DIM / 2;
  switch (index) {
    case 0: return LayerProduct(p.qkv_proj, p.hidden, (p.heads + 2 * p.kv_heads) * half, half, true);
    case 1: return LayerProduct(p.o_proj, p.heads * HEAD_DIM, p.hidden, p.hidden, false);
    case 2: return LayerProduct(p.gate_up_proj, p.hidden, p.inter, p.inter, true);
    default: return LayerProduct(p.down_proj, p.inter, p.hidden, p.hidden, false);
  }
}

// A group's partial sums of one tile: [member warp][tile row][input row].
struct TileSums {
  float v[LAYER_GROUP_WARPS][LAYER_TILE_ROWS][MATVEC_ROWS];
};

// Slots of LAYER_SLOT_BYTES each, then a full and an empty barrier per
// slot, then two TileSums per group.
struct WeightRing {
  char* tiles;
  u64* full;
  u64* empty;
  TileSums* sums;
  int slots;

  __device__ WeightRing(char* memory, int slots)
      : tiles(memory),
        full(reinterpret_cast<u64*>(memory + (i64)slots * LAYER_SLOT_BYTES)),
        empty(full + slots),
        sums(reinterpret_cast<TileSums*>(empty + slots)),
        slots(slots) {}
  // The slot, and its barriers' phase parity, of the block's i-th tile.
  __device__ char* tile(int i) const { return tiles + (i64)(i % slots) * LAYER_SLOT_BYTES; }
  __device__ unsigned parity(int i) const { return (i / slots) & 1; }
};

// The copying warp's whole job: every tile of this block, all four
// products, in order, each into its slot once the slot is free.
//
// It does not prefetch the next layer's weights into L2, as the
// matrix-vector kernel does for the next product: the next layer's copying
// warp starts its copies as soon as its block starts (it waits for no
// earlier kernel), and a prefetch of the next layer's first 4 MB made the
// H100's step slower (1.24 ms per token with it against 1.23 without,
// copies without the evict-first hint; 1.21 against 1.20 with the hint).
//
// Nor does it ask for a tile as soon as a slot is free: with
// LAYER_COPY_DEPTH = D it first waits for tile i - D to land. 132 blocks
// with one 33 KiB tile each in flight are 4.4 MB on their way, more than
// the H100's memory needs to stream at full rate (3.35 TB/s times about a
// microsecond of latency); six each, as many as the ring has slots, are
// 26 MB, and the excess only queues. Every other trip to L2 waits in that
// queue too: the grid barriers' atomics and polls, attention's loads of the
// KV cache. With D = 1 the first barrier passed 3 us sooner and the
// TinyLlama step took 1.08 ms instead of 1.17 (experiments file, 22k).
//
// Except at the layer's start: the first LAYER_START_TILES tiles, if they
// are qkv's, go out at once. Then the ring is empty, the layer before has
// finished, nothing else waits in the queue, and everything waits for
// qkv's output. A block of TinyLlama has two or three qkv tiles, which
// took as many trips to memory one after the other; in one, the step was
// about 3 % faster on an H100 (experiments file, section 29).
__device__ void fill_ring(const LayerParams& p, const WeightRing& ring) {
  const int lane = threadIdx.x % 32;
  int i = 0;
#if LAYER_TIMELINE
  unsigned long long waited = 0;
#endif
  const u64 policy = l2_evict_first_policy();
  for (int product = 0; product < 4; product++) {
    const LayerProduct w = layer_product(p, product);
    const unsigned row_bytes = w.k * sizeof(scalar_t);
    for (int t = 0; t < w.block_tiles(); t++, i++) {
      int first, units;
      w.block_tile(t, first, units);
      const int rows = w.pairs ? 2 * units : units;
      // ANCHOR: copy_depth
      // Past the start burst, at most LAYER_COPY_DEPTH tiles of this block
      // on their way: tile i - LAYER_COPY_DEPTH must have landed before
      // tile i is asked for. Its slot's full barrier tells (a wait on a
      // phase that has already completed returns at once; with fewer tiles
      // in flight than slots, that slot has not been refilled since).
      const bool starting = product == 0 && i < LAYER_START_TILES;
      if (!starting && LAYER_COPY_DEPTH > 0 && LAYER_COPY_DEPTH < ring.slots && i >= LAYER_COPY_DEPTH) {
        const int landed = i - LAYER_COPY_DEPTH;
        mbarrier_wait(&ring.full[landed % ring.slots], ring.parity(landed));
      }
      // ANCHOR_END: copy_depth
      // The slot's last tile, i - slots, must have been read.
#if LAYER_TIMELINE
      const unsigned long long before = global_timer();
      if (i == 0 && lane == 0) timeline_store(p.layer, MARK_FIRST_COPY, before);
#endif
      if (i >= ring.slots) mbarrier_wait(&ring.empty[i % ring.slots], ring.parity(i) ^ 1);
#if LAYER_TIMELINE
      waited += global_timer() - before;
#endif
      char* dst = ring.tile(i);
      u64* full = &ring.full[i % ring.slots];
      // Row by row, each to its padded place; with pairs, interleaved:
      // j, its partner, j + 1, ...
#if LAYER_BULK_COPY
      if (lane == 0) mbarrier_expect_bytes(full, rows * row_bytes);
      __syncwarp();
      for (int r = lane; r < rows; r += 32)
        bulk_copy(dst + r * w.pitch, w.weight + (i64)w.tile_row(first, r) * w.k, row_bytes, full,
                  policy);
#else
      // Row by row too: each lane copies every 32nd 16-byte chunk of the
      // row. The row's address is worked out once a row, so a chunk costs
      // an addition and the copy. Where each chunk worked out its row and
      // place (divisions by the row's chunks and by the pairs' span, which
      // are known only at run time), the one warp that issues every copy of
      // the block spent longer dividing than the memory took to answer:
      // TinyLlama's step took 4.14 ms on the H100 that way, 1.43 this way
      // (experiments file, section 23).
      const int chunks = row_bytes / 16;
      for (int r = 0; r < rows; r++) {
        const char* from =
            reinterpret_cast<const char*>(w.weight + (i64)w.tile_row(first, r) * w.k);
        char* to = dst + r * w.pitch;
        for (int c = lane; c < chunks; c += 32) copy_async_16(to + c * 16, from + c * 16, policy);
      }
      copy_async_arrive(full);
#endif
    }
  }
#if LAYER_TIMELINE
  if (lane == 0) {
    timeline_store(p.layer, MARK_LAST_COPY, global_timer());
    timeline_store(p.layer, MARK_SLOT_WAIT, waited);
  }
#endif
}

#if SCALAR_KIND != 0
// Tiles of fewer rows go to dot_tile. An mma costs the same for two tile
// rows as for eight, and with two (TinyLlama's down projection: rows of
// 5632) the tensor pipe becomes the limit: 13 300 cycles per tile on the
// H100 where dot_tile takes 5 800. A mapping for two-row tiles, a's
// sixteen rows being the two rows over eight segments of k, was slower in
// the layer than dot_tile (the experiments file, section 22).
#define MMA_MIN_ROWS 4
static_assert(LAYER_TILE_ROWS <= 8 && MATVEC_ROWS <= 8, "one mma takes 8 tile rows and 8 input rows");

// The dot products of a tile's `n` weight rows (shared memory, rows `pitch`
// bytes apart) with each staged row of xs, by one warp of a group: its
// share of the columns, into out[r · MATVEC_ROWS + m] (row r, input m).
//
// A matrix-vector product is no work for tensor cores, but they save
// instructions: reading a 32 KiB tile with ordinary arithmetic takes each
// lane several hundred instructions (unpack the 16-bit values,
// multiply-add, sum across the warp), where here a 16-byte load per lane
// feeds two `mma`s, each a 16×8×16 product of the whole warp: an 8-row
// tile of 2048 takes 1 900 cycles instead of 4 800 on the H100. The inputs are a's
// rows (8 of 16 used at most, batch 1 uses one), the tile's rows are b's
// columns. The order of k within an instruction is free as long as a and
// b agree, so lane (g, t) takes the 16-byte chunk t of every four, k = 8t
// to 8t + 7 of the 32: the first instruction's "2t, 2t + 1" are its first
// two elements, "2t + 8, 2t + 9" the next two, the second instruction's
// the last four. A warp takes every LAYER_GROUP_WARPS-th run of four
// chunks; two sets of sums keep two instructions in flight, summed at the
// end. Not inlined: one copy serves three products; inlined, the step was
// 3% slower on the H100 (the instruction cache, as with dot_tile).
__device__ __noinline__ void dot_tile_mma(const scalar_t* tile, int pitch, int n, int k,
                                      const scalar_t* xs, int rows, int member, float* out) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4, chunks = k / VEC;
  const uint4* w = reinterpret_cast<const uint4*>(reinterpret_cast<const char*>(tile) + g * pitch);
  const uint4* x = reinterpret_cast<const uint4*>(xs) + g * chunks;
  const bool has_w = g < n, has_x = g < rows;
  float d0[4] = {0.f, 0.f, 0.f, 0.f}, d1[4] = {0.f, 0.f, 0.f, 0.f};
  // Lanes past the tile's rows, the inputs or the row's end add zeros.
  auto step = [&](int c, bool in_row) {
    uint4 wv = make_uint4(0, 0, 0, 0), xv = make_uint4(0, 0, 0, 0);
    if (has_w && in_row) wv = w[c];
    if (has_x && in_row) xv = x[c];
    mma_16x8x16(d0, xv.x, 0u, xv.y, 0u, wv.x, wv.y);
    mma_16x8x16(d1, xv.z, 0u, xv.w, 0u, wv.z, wv.w);
  };
  // Runs of four whole chunks, without a branch, so that the loads of
  // several runs are in flight at once; then the last, partial run where
  // k is not a multiple of 32.
  const int runs = chunks / 4;
  int run = member;
#pragma unroll 4
  for (; run < runs; run += LAYER_GROUP_WARPS) step(run * 4 + t, true);
  if (run == runs && runs * 4 < chunks) step(runs * 4 + t, runs * 4 + t < chunks);
  if (has_x) {
    if (2 * t < n) out[2 * t * MATVEC_ROWS + g] = d0[0] + d1[0];
    if (2 * t + 1 < n) out[(2 * t + 1) * MATVEC_ROWS + g] = d0[1] + d1[1];
  }
}
#endif

// The dot products of a tile's `n` weight rows (shared memory, rows `pitch`
// bytes apart) with each staged row of xs, by one warp of a group, with
// ordinary multiply-adds: its share of the columns (16-byte chunks
// member · 32 + lane, then every group's width on), summed over the warp
// into out[r · MATVEC_ROWS + m]. Rows go two at a time, so that two chains
// of additions and two warp sums are in flight (a lone last row is read
// twice, and its copy dropped). This serves f32 (tensor cores would round
// the inputs to tf32) and tiles of few rows, where `dot_tile_mma` would do
// the same number of instructions for a fraction of the weights. Not
// inlined: one copy serves all four products, where four inlined copies
// (one per epilogue) made the kernel too large for the instruction cache
// (inlining even the one copy of the down projection made the step 10%
// slower than with it called).
__device__ __noinline__ void dot_tile(const scalar_t* tile, int pitch, int n, int k,
                                      const scalar_t* xs, int rows, int member, float* out) {
  const int lane = threadIdx.x % 32, chunks = k / VEC;
  const uint4* x4 = reinterpret_cast<const uint4*>(xs);
  for (int r = 0; r < n; r += 2) {
    const uint4* w0 = reinterpret_cast<const uint4*>(reinterpret_cast<const char*>(tile) + r * pitch);
    const uint4* w1 =
        r + 1 < n ? reinterpret_cast<const uint4*>(reinterpret_cast<const char*>(w0) + pitch) : w0;
    float a[MATVEC_ROWS], b[MATVEC_ROWS];
#pragma unroll
    for (int m = 0; m < MATVEC_ROWS; m++) a[m] = b[m] = 0.f;
#pragma unroll 2
    for (int c = member * 32 + lane; c < chunks; c += LAYER_GROUP_THREADS) {
      float wa[VEC], wb[VEC];
      unpack(w0[c], wa);
      unpack(w1[c], wb);
#pragma unroll
      for (int m = 0; m < MATVEC_ROWS; m++) {
        if (m >= rows) break;
        float x[VEC];
        unpack(x4[m * chunks + c], x);
#pragma unroll
        for (int i = 0; i < VEC; i++) {
          a[m] += wa[i] * x[i];
          b[m] += wb[i] * x[i];
        }
      }
    }
#pragma unroll
    for (int m = 0; m < MATVEC_ROWS; m++) {
      if (m >= rows) break;
      for (int offset = 16; offset > 0; offset /= 2) {
        a[m] += __shfl_xor_sync(0xffffffffu, a[m], offset);
        b[m] += __shfl_xor_sync(0xffffffffu, b[m], offset);
      }
      if (lane == 0) {
        out[r * MATVEC_ROWS + m] = a[m];
        if (r + 1 < n) out[(r + 1) * MATVEC_ROWS + m] = b[m];
      }
    }
  }
}

// A product's share of this block, read from the ring: tiles base, base +
// 1, ... of the block (`w.block_tiles()` of them), group g of
// LAYER_GROUP_WARPS warps taking tiles g, g + groups, ... Each warp sums
// its share of the columns, the group adds the shares up in `sums`, and
// thread (unit u, input row m) of the group finishes the output:
// `epilogue(unit, m, a, b, operands)` gets unit `unit`'s result for input
// row m, a, and with PAIRS b, its partner's, and what `prepare(unit, m)`
// read for it from global memory before the tile was waited for.
//
// Those reads (RoPE's cosine and sine, the residual the output adds to)
// queue behind the weights streaming in. Issued after the dot product,
// they stood between the last tile and the grid barrier: the qkv epilogue
// took 9 200 cycles of the H100's layer 11, now 370 (the call of the dot
// product still waits for them, but after the tile's wait).
//
// The slot of tile t was last read, at t - slots, by the same group (slots
// is a multiple of groups), and the earlier products' tiles were all read
// before this one began (a barrier lies between), so a group never waits
// for a phase of a slot's barrier more than one ahead.
template <bool PAIRS, typename Prepare, typename Epilogue>
__device__ __forceinline__ void ring_product(const LayerProduct& w, const WeightRing& ring, int base,
                                             int groups, TileSums* sums, const scalar_t* xs,
                                             int rows, Prepare prepare, Epilogue epilogue) {
  static_assert(LAYER_TILE_ROWS * MATVEC_ROWS <= LAYER_GROUP_THREADS,
                "a thread finishes at most one output of a tile");
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = warp / LAYER_GROUP_WARPS, member = warp % LAYER_GROUP_WARPS;
  const int gtid = member * 32 + lane, u = gtid / rows, m = gtid % rows;
  for (int t = group; t < w.block_tiles(); t += groups) {
    const int i = base + t;
    int first, units;
    w.block_tile(t, first, units);
    const int n = PAIRS ? 2 * units : units;
    decltype(prepare(0, 0)) operands{};
    if (u < units) operands = prepare(first + u, m);
    TIMELINE_TILE_BEGIN;
    mbarrier_wait(&ring.full[i % ring.slots], ring.parity(i));
    TIMELINE_TILE_SPLIT(0);
    // Two sets of sums, alternating: a group's next tile writes the other
    // while slower members may still read this one.
    TileSums& sum = sums[2 * group + (t / groups) % 2];
    const scalar_t* tile = reinterpret_cast<const scalar_t*>(ring.tile(i));
#if SCALAR_KIND != 0
    if (n >= MMA_MIN_ROWS)
      dot_tile_mma(tile, w.pitch, n, w.k, xs, rows, member, &sum.v[member][0][0]);
    else
#endif
      dot_tile(tile, w.pitch, n, w.k, xs, rows, member, &sum.v[member][0][0]);
    TIMELINE_TILE_SPLIT(1);
    if (LAYER_GROUP_WARPS == 1)
      __syncwarp();
    else
      sync_threads(LAYER_SYNC + 1 + group, LAYER_GROUP_THREADS);
    TIMELINE_TILE_SPLIT(2);
    if (gtid == 0) mbarrier_arrive(&ring.empty[i % ring.slots]);
    if (u < units) {
      float a = 0.f, b = 0.f;
#pragma unroll
      for (int g = 0; g < LAYER_GROUP_WARPS; g++) {
        a += sum.v[g][PAIRS ? 2 * u : u][m];
        if (PAIRS) b += sum.v[g][2 * u + 1][m];
      }
      epilogue(first + u, m, a, b, operands);
    }
  }
}

__device__ __forceinline__ unsigned load_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Every block's computing threads wait here until all have arrived; what
// any of them wrote before is then visible to all. `arrivals` counts every
// block's arrival at every barrier of the step (it is zeroed before the
// first layer), so the n-th barrier of the step is passed when it reaches
// n · gridDim.x: one atomic addition per block and no reset, which would
// need a barrier of its own.
__device__ __forceinline__ void grid_barrier(unsigned* arrivals, unsigned target) {
  sync_threads(LAYER_SYNC, LAYER_CONSUMERS);
  if (threadIdx.x == 0) {
    __threadfence();  // the block's writes before its arrival
    atomicAdd(arrivals, 1u);
    while (load_acquire(arrivals) < target) {
    }
  }
  sync_threads(LAYER_SYNC, LAYER_CONSUMERS);
}

// This layer's tag: never 0 (a zeroed word), never the layer before's.
__device__ __forceinline__ unsigned layer_tag(int layer) {
  return (unsigned)layer % ((1ull << TAG_BITS) - 1) + 1;
}

__device__ __forceinline__ void store_tagged(tagged_t* p, scalar_t v, unsigned tag) {
#if SCALAR_KIND == 0
  const u64 word = (u64)tag << 32 | __float_as_uint(v);
  asm volatile("st.relaxed.gpu.global.b64 [%0], %1;" ::"l"(p), "l"(word) : "memory");
#else
  const unsigned word = tag << 16 | v;
  asm volatile("st.relaxed.gpu.global.b32 [%0], %1;" ::"l"(p), "r"(word) : "memory");
#endif
}

// 16 bytes of tagged words (four, or two for f32), each word read whole.
__device__ __forceinline__ uint4 load_tagged(const tagged_t* p) {
  uint4 v;
#if SCALAR_KIND == 0
  u64 a, b;
  asm volatile("ld.relaxed.gpu.global.v2.b64 {%0, %1}, [%2];" : "=l"(a), "=l"(b) : "l"(p) : "memory");
  v = make_uint4((unsigned)a, (unsigned)(a >> 32), (unsigned)b, (unsigned)(b >> 32));
#else
  asm volatile("ld.relaxed.gpu.global.v4.b32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p)
               : "memory");
#endif
  return v;
}

__device__ __forceinline__ bool tagged_as(uint4 v, unsigned tag) {
#if SCALAR_KIND == 0
  return v.y == tag && v.w == tag;
#else
  return (v.x >> 16) == tag && (v.y >> 16) == tag && (v.z >> 16) == tag && (v.w >> 16) == tag;
#endif
}

// Polls 16 bytes of words, already loaded into `v`, until all carry `tag`.
__device__ __forceinline__ void wait_tagged(uint4& v, const tagged_t* p, unsigned tag) {
  while (!tagged_as(v, tag)) {
    __nanosleep(32);  // a pause between polls; 256 ns was slower (section 25)
    v = load_tagged(p);
  }
}

// The values of two loads of words (VEC of them) as 16 bytes of scalars.
__device__ __forceinline__ uint4 untag(uint4 a, uint4 b) {
#if SCALAR_KIND == 0
  return make_uint4(a.x, a.z, b.x, b.z);
#else
  auto pair = [](unsigned lo, unsigned hi) { return (lo & 0xffffu) | hi << 16; };
  return make_uint4(pair(a.x, a.y), pair(a.z, a.w), pair(b.x, b.y), pair(b.z, b.w));
#endif
}

// The value of a tagged word that this block has already seen carry this
// layer's tag (its staging waited for it, before a block barrier): one
// load, no wait. Waiting here instead would make each load a round trip
// before the next could start.
__device__ __forceinline__ scalar_t seen_tagged(const tagged_t* p) {
  tagged_t word;
#if SCALAR_KIND == 0
  asm volatile("ld.relaxed.gpu.global.b64 %0, [%1];" : "=l"(word) : "l"(p) : "memory");
  return __uint_as_float((unsigned)word);
#else
  asm volatile("ld.relaxed.gpu.global.b32 %0, [%1];" : "=r"(word) : "l"(p) : "memory");
  return (scalar_t)(word & 0xffffu);
#endif
}

// The step's queries and new keys and values as tagged words, laid out as
// qkv's output ([rows, heads + 2 kv_heads, HEAD_DIM]), for attention_part
// in the tagged build: what it reads of them, it waits for, so the layer
// needs no grid barrier between qkv and attention. The new keys and values
// go to the KV cache too, for the steps after this one.
struct TaggedQkv {
  static constexpr bool tagged = true;
  const tagged_t* words;
  int heads, kv_heads;
  unsigned tag;

  __device__ const tagged_t* row(int seq, int head, int sub) const {
    return words + ((i64)seq * (heads + 2 * kv_heads) + head) * HEAD_DIM + sub * VEC;
  }
  // VEC values at `p`: both loads issued before either is waited for.
  __device__ uint4 chunk(const tagged_t* p) const {
    constexpr int half = 16 / (int)sizeof(tagged_t);
    uint4 a = load_tagged(p), b = load_tagged(p + half);
    wait_tagged(a, p, tag);
    wait_tagged(b, p + half, tag);
    return untag(a, b);
  }
  __device__ uint4 query(int seq, int head, int sub) const { return chunk(row(seq, head, sub)); }
  __device__ void new_kv(int seq, int kv_head, int sub, uint4& k, uint4& v) const {
    constexpr int half = 16 / (int)sizeof(tagged_t);
    const tagged_t* kp = row(seq, heads + kv_head, sub);
    const tagged_t* vp = row(seq, heads + kv_heads + kv_head, sub);
    uint4 k0 = load_tagged(kp), k1 = load_tagged(kp + half);
    uint4 v0 = load_tagged(vp), v1 = load_tagged(vp + half);
    wait_tagged(k0, kp, tag);
    wait_tagged(k1, kp + half, tag);
    wait_tagged(v0, vp, tag);
    wait_tagged(v1, vp + half, tag);
    k = untag(k0, k1);
    v = untag(v0, v1);
  }
};

// stage_input for tagged words: stages `rows` rows of `k` values from `in`
// into xs once each word carries `tag`, copying them (prologue 0) or
// applying RMSNorm (1). A thread takes chunks of VEC values (two 16-byte
// loads of words each) two at a time, so that its loads are all on their
// way before it waits for any; the squares are added chunk by chunk in
// stage_input's general order. RMSNorm's second pass scales the staged
// values in shared memory, each thread its own chunks, with the norm's
// weight asked into L1 during the first.
__device__ __forceinline__ void stage_tagged(scalar_t* xs, StagingShared& s, const tagged_t* in,
                                             const scalar_t* norm_weight, float eps, int rows, int k,
                                             int prologue, unsigned tag, int threads, int barrier) {
  const int chunks = k / VEC;
  constexpr int half = 16 / (int)sizeof(tagged_t);  // words of one 16-byte load
  float squares[MATVEC_ROWS];
#pragma unroll
  for (int m = 0; m < MATVEC_ROWS; m++) {
    squares[m] = 0.f;
    if (m >= rows) continue;
    const tagged_t* row = in + (i64)m * k;
    for (int c0 = threadIdx.x; c0 < chunks; c0 += 2 * threads) {
      const int c1 = c0 + threads;
      if (prologue == 1 && m == 0) {
        asm volatile("prefetch.global.L1 [%0];" ::"l"(norm_weight + c0 * VEC));
        if (c1 < chunks) asm volatile("prefetch.global.L1 [%0];" ::"l"(norm_weight + c1 * VEC));
      }
      uint4 w[2][2];
#pragma unroll
      for (int j = 0; j < 2; j++) {
        const int c = j == 0 ? c0 : c1;
        if (c < chunks) {
          w[j][0] = load_tagged(row + c * VEC);
          w[j][1] = load_tagged(row + c * VEC + half);
        }
      }
#pragma unroll
      for (int j = 0; j < 2; j++) {
        const int c = j == 0 ? c0 : c1;
        if (c >= chunks) break;
        wait_tagged(w[j][0], row + c * VEC, tag);
        wait_tagged(w[j][1], row + c * VEC + half, tag);
        const uint4 values = untag(w[j][0], w[j][1]);
        *reinterpret_cast<uint4*>(xs + m * k + c * VEC) = values;
        if (prologue == 1) {
          float v[VEC];
          unpack(values, v);
#pragma unroll
          for (int i = 0; i < VEC; i++) squares[m] += v[i] * v[i];
        }
      }
    }
  }
  if (prologue == 1) {
    rows_inv_rms(squares, s, eps, rows, k, threads, barrier);
#pragma unroll
    for (int m = 0; m < MATVEC_ROWS; m++) {
      if (m >= rows) break;
      for (int c = threadIdx.x; c < chunks; c += threads) {
        scalar_t* dst = xs + m * k + c * VEC;
        float a[VEC], b[VEC];
        unpack(*reinterpret_cast<const uint4*>(dst), a);
        unpack(reinterpret_cast<const uint4*>(norm_weight)[c], b);
#pragma unroll
        for (int e = 0; e < VEC; e++) dst[e] = from_float(a[e] * s.inv_rms[m] * b[e]);
      }
    }
  }
  sync_threads(barrier, threads);
}

extern "C" __global__ void __launch_bounds__(LAYER_THREADS, 1) decode_layer(const LayerParams p) {
  constexpr int staging_bytes = MATVEC_ROWS * MATVEC_K * (int)sizeof(scalar_t);
  constexpr int attention_bytes = LAYER_PARTS * (int)sizeof(AttentionShared<LAYER_HEADS>);
  __shared__ __align__(16) char smem[staging_bytes > attention_bytes ? staging_bytes : attention_bytes];
  __shared__ StagingShared staging;
  __shared__ int last_part[LAYER_PARTS];
  extern __shared__ __align__(128) char ring_memory[];
  scalar_t* xs = reinterpret_cast<scalar_t*>(smem);
  const WeightRing ring(ring_memory, p.ring_slots);

  TIMELINE_MARK(MARK_LAUNCHED);
  if (threadIdx.x == 0) {
    for (int s = 0; s < ring.slots; s++) {
      mbarrier_init(&ring.full[s], LAYER_BULK_COPY ? 1 : 32);
      mbarrier_init(&ring.empty[s], 1);
    }
#if LAYER_BULK_COPY
    // The copy engine is another "proxy": it must see the initialised barriers.
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#endif
  }
  // Kernels in a row: the next layer's kernel may be launched now (where
  // the Rust side asked for programmatic dependent launch). Being
  // cooperative, its blocks still start only once every block here has
  // exited, but its launch is done by then: on the H100 they start about
  // half a microsecond after the last block here exits instead of one.
  grid_dependents_may_launch();
  __syncthreads();
  if (threadIdx.x >= LAYER_CONSUMERS) {
    fill_ring(p, ring);  // the weights: nothing an earlier kernel writes
    return;
  }
  // Everything else waits for the kernels before this one (the previous
  // layer) to have finished and their writes to be visible.
  grid_dependencies_wait();
  TIMELINE_MARK(MARK_STARTED);
  TIMELINE_TILE_ZERO;

  const int rows = p.rows, hidden = p.hidden, inter = p.inter, half = HEAD_DIM / 2;
  const int attn_k = p.heads * HEAD_DIM;
  const bool takes_tiles = threadIdx.x / 32 < p.tile_groups * LAYER_GROUP_WARPS;
  [[maybe_unused]] const unsigned tag = layer_tag(p.layer);
  int base = 0;  // the block's tiles of the products before this one

  // 1. qkv, RoPE, the KV-cache write. Unit u is element j of a head and
  // its partner j + half; heads run queries, keys, values. The position
  // and cache slot of the input row this thread finishes (ring_product's
  // m) are read first, while the input is staged.
  const i64 position = p.positions[threadIdx.x % LAYER_GROUP_THREADS % rows];
  const i64 slot = p.slots[threadIdx.x % LAYER_GROUP_THREADS % rows];
  stage_input(xs, staging, p.x, p.input_norm, p.eps, rows, hidden, 1, LAYER_CONSUMERS, LAYER_SYNC);
  TIMELINE_MARK(MARK_STAGED);
  {
    const LayerProduct w = layer_product(p, 0);
    struct Rotation {
      float c, s;
    };
    auto rotation = [&](int unit, int) {
      Rotation r{1.f, 0.f};  // values are not rotated
      if (unit / half < p.heads + p.kv_heads) {
        const i64 angle = position * half + unit % half;
        r = {p.cos_table[angle], p.sin_table[angle]};
      }
      return r;
    };
    if (takes_tiles)
      ring_product<true>(w, ring, base, p.tile_groups, ring.sums, xs, rows, rotation,
                         [&](int unit, int m, float a, float b, Rotation r) {
        const int head = unit / half, j = unit % half;
        // Rounded to the model's dtype first, as the unfused step stores qkv.
        a = to_float(from_float(a));
        b = to_float(from_float(b));
        // Keys and queries rotated; values not (their rotation is none).
        const bool rotated = head < p.heads + p.kv_heads;
        const scalar_t lo = from_float(rotated ? a * r.c - b * r.s : a);
        const scalar_t hi = from_float(rotated ? b * r.c + a * r.s : b);
#if LAYER_TAGGED
        tagged_t* words = p.qkv_tagged + ((i64)m * (p.heads + 2 * p.kv_heads) + head) * HEAD_DIM;
        store_tagged(words + j, lo, tag);
        store_tagged(words + j + half, hi, tag);
        if (head < p.heads) return;  // queries: only this layer's attention reads them
#endif
        scalar_t* dst;
        if (head < p.heads) {
          dst = p.q + ((i64)m * p.heads + head) * HEAD_DIM;
        } else if (head < p.heads + p.kv_heads) {
          dst = p.k_cache + (slot * p.kv_heads + head - p.heads) * HEAD_DIM;
        } else {
          dst = p.v_cache + (slot * p.kv_heads + head - p.heads - p.kv_heads) * HEAD_DIM;
        }
        dst[j] = lo;
        dst[j + half] = hi;
      });
    base += w.block_tiles();
  }
  TIMELINE_DONE(MARK_QKV_DONE);
  TIMELINE_TILE_STORE(0);
#if LAYER_TAGGED
  // Attention waits for the words it reads; the block only for its own
  // warps, whose staging's shared memory attention takes next.
  sync_threads(LAYER_SYNC, LAYER_CONSUMERS);
#else
  grid_barrier(p.sync, (p.layer * LAYER_BARRIERS + 1) * gridDim.x);
#endif
  TIMELINE_MARK(MARK_BARRIER1);

  // 2. Attention: items (sequence, KV head, chunk of LAYER_HEADS query
  // heads, partition), each on 128 threads of a block. Meanwhile the
  // copying warp fills the ring with the output projection.
  {
    auto* shared = reinterpret_cast<AttentionShared<LAYER_HEADS>*>(smem);
    const int part = threadIdx.x / THREADS, tid = threadIdx.x % THREADS, barrier = 1 + part;
    const int chunks = GQA_GROUP / LAYER_HEADS;
    // Warps past the last whole part of 128 threads sit this stage out.
    const int items = part < LAYER_PARTS ? rows * p.kv_heads * chunks * p.partitions : 0;
    for (int item = blockIdx.x * LAYER_PARTS + part; item < items; item += gridDim.x * LAYER_PARTS) {
      const int partition = item % p.partitions, group = item / p.partitions;
      const int head_chunk = group % chunks, kv_head = group / chunks % p.kv_heads;
      const int seq = group / chunks / p.kv_heads;
#if LAYER_TAGGED
      const TaggedQkv fresh{p.qkv_tagged, p.heads, p.kv_heads, tag};
#else
      const QkvWritten fresh;
#endif
#if LAYER_TIMELINE
      // Part 0's first item is timed. Its thread 0 waits for its first
      // query chunk here, as attention_part would first thing, so that
      // the wait shows apart from the rest.
      const bool timed = threadIdx.x == 0 && item == (int)blockIdx.x * LAYER_PARTS;
#if LAYER_TAGGED
      if (timed) fresh.query(seq, kv_head * GQA_GROUP + head_chunk * LAYER_HEADS, 0);
#endif
#endif
      TIMELINE_ITEM(MARK_ATTN_QUERIES);
      attention_part<LAYER_HEADS>(p.q, p.k_cache, p.v_cache, p.block_tables, p.positions,
                                  p.kv_heads, p.block_size, p.max_blocks, p.scale, p.part_acc,
                                  p.part_max, p.part_sum, kv_head, head_chunk * LAYER_HEADS, seq,
                                  partition, p.partitions, 1, nullptr, tid, barrier,
                                  shared[part], fresh);
      // The last partition of this (sequence, KV head, chunk) to finish
      // merges them all, so no stage (and no barrier) is needed for it.
      sync_threads(barrier, THREADS);
      TIMELINE_ITEM(MARK_ATTN_PARTIAL);
      if (tid == 0) {
        __threadfence();
        unsigned* count = p.sync + 1 + group;
        last_part[part] = atomicAdd(count, 1u) == (unsigned)p.partitions - 1;
        if (last_part[part]) atomicExch(count, 0u);
        __threadfence();
      }
      sync_threads(barrier, THREADS);
      TIMELINE_ITEM(MARK_ATTN_COUNTED);
      if (last_part[part]) {
        for (int i = tid; i < LAYER_HEADS * HEAD_DIM; i += THREADS) {
          const int h = i / HEAD_DIM, d = i % HEAD_DIM;
          const i64 out = (i64)seq * p.heads + kv_head * GQA_GROUP + head_chunk * LAYER_HEADS + h;
          const scalar_t merged = from_float(
              combine_partitions(p.part_acc, p.part_max, p.part_sum, p.partitions, out, d));
#if LAYER_TAGGED
          store_tagged(p.attn_tagged + out * HEAD_DIM + d, merged, tag);
#else
          p.attn[out * HEAD_DIM + d] = merged;
#endif
        }
      }
      sync_threads(barrier, THREADS);
      TIMELINE_ITEM(MARK_ATTN_MERGED);
    }
  }
  TIMELINE_DONE(MARK_ATTENTION_DONE);
#if LAYER_TAGGED
  // The block's attention items are done with the shared memory that the
  // staging takes; attention's output from the other blocks is waited for
  // word by word.
  sync_threads(LAYER_SYNC, LAYER_CONSUMERS);
  TIMELINE_MARK(MARK_BARRIER2);
  stage_tagged(xs, staging, p.attn_tagged, nullptr, 0.f, rows, attn_k, 0, tag, LAYER_CONSUMERS,
               LAYER_SYNC);
#else
  grid_barrier(p.sync, (p.layer * LAYER_BARRIERS + 2) * gridDim.x);
  TIMELINE_MARK(MARK_BARRIER2);
  stage_input(xs, staging, p.attn, nullptr, 0.f, rows, attn_k, 0, LAYER_CONSUMERS, LAYER_SYNC);
#endif

  // 3. x += attn · Woᵀ: unit `row` of input row m is this block's alone to
  // add. With tagged words the sum goes to x's tagged copy, which the
  // MLP's staging and the down projection's residual read; the down
  // projection then writes x itself, its only writer in the layer.
  auto residual = [&](int row, int m) { return load_cg_scalar(p.x + (i64)m * hidden + row); };
  auto add_to_x = [&](int row, int m, float a, float, scalar_t x) {
    p.x[(i64)m * hidden + row] = from_float(to_float(x) + a);
  };
#if LAYER_TAGGED
  auto add_to_tagged_x = [&](int row, int m, float a, float, scalar_t x) {
    store_tagged(p.x_tagged + (i64)m * hidden + row, from_float(to_float(x) + a), tag);
  };
#endif
  {
    const LayerProduct w = layer_product(p, 1);
#if LAYER_TAGGED
    if (takes_tiles)
      ring_product<false>(w, ring, base, p.tile_groups, ring.sums, xs, rows, residual, add_to_tagged_x);
#else
    if (takes_tiles) ring_product<false>(w, ring, base, p.tile_groups, ring.sums, xs, rows, residual, add_to_x);
#endif
    base += w.block_tiles();
  }
  TIMELINE_DONE(MARK_O_DONE);
  TIMELINE_TILE_STORE(1);
#if LAYER_TAGGED
  sync_threads(LAYER_SYNC, LAYER_CONSUMERS);
  TIMELINE_MARK(MARK_BARRIER3);
  // 4. act = silu(gate) · up of rms_norm(x) · Wgate_upᵀ.
  stage_tagged(xs, staging, p.x_tagged, p.post_norm, p.eps, rows, hidden, 1, tag, LAYER_CONSUMERS,
               LAYER_SYNC);
#else
  grid_barrier(p.sync, (p.layer * LAYER_BARRIERS + 3) * gridDim.x);
  TIMELINE_MARK(MARK_BARRIER3);
  // 4. act = silu(gate) · up of rms_norm(x) · Wgate_upᵀ.
  stage_input(xs, staging, p.x, p.post_norm, p.eps, rows, hidden, 1, LAYER_CONSUMERS, LAYER_SYNC);
#endif
  {
    const LayerProduct w = layer_product(p, 2);
    if (takes_tiles)
      ring_product<true>(w, ring, base, p.tile_groups, ring.sums, xs, rows, [](int, int) { return 0; },
                         [&](int j, int m, float gate, float up, int) {
        gate = to_float(from_float(gate));
        up = to_float(from_float(up));
        const scalar_t a = from_float(gate / (1.f + __expf(-gate)) * up);
#if LAYER_TAGGED
        store_tagged(p.act_tagged + (i64)m * inter + j, a, tag);
#else
        p.act[(i64)m * inter + j] = a;
#endif
      });
    base += w.block_tiles();
  }
  TIMELINE_DONE(MARK_GATE_UP_DONE);
  TIMELINE_TILE_STORE(2);
#if LAYER_TAGGED
  sync_threads(LAYER_SYNC, LAYER_CONSUMERS);
  TIMELINE_MARK(MARK_BARRIER4);
  // 5. x += act · Wdownᵀ, the residual this layer's x after the o projection.
  stage_tagged(xs, staging, p.act_tagged, nullptr, 0.f, rows, inter, 0, tag, LAYER_CONSUMERS,
               LAYER_SYNC);
  auto tagged_residual = [&](int row, int m) { return seen_tagged(p.x_tagged + (i64)m * hidden + row); };
  if (takes_tiles)
    ring_product<false>(layer_product(p, 3), ring, base, p.tile_groups, ring.sums, xs, rows, tagged_residual,
                        add_to_x);
#else
  grid_barrier(p.sync, (p.layer * LAYER_BARRIERS + 4) * gridDim.x);
  TIMELINE_MARK(MARK_BARRIER4);

  // 5. x += act · Wdownᵀ.
  stage_input(xs, staging, p.act, nullptr, 0.f, rows, inter, 0, LAYER_CONSUMERS, LAYER_SYNC);
  if (takes_tiles) ring_product<false>(layer_product(p, 3), ring, base, p.tile_groups, ring.sums, xs, rows, residual, add_to_x);
#endif
  TIMELINE_DONE(MARK_DOWN_DONE);
  TIMELINE_TILE_STORE(3);
}
#else
extern "C" __global__ void decode_layer(const LayerParams p) { __trap(); }
#endif  // __CUDA_ARCH__ >= 800
// ANCHOR_END: decode_layer
