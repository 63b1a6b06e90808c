// PyTorch's FlashAttention over sequences laid end to end, for Rust (see
// src/engine/varlen_attention.rs).
//
// `at::_flash_attention_forward` is the operation under
// `scaled_dot_product_attention`'s flash backend. Called directly it takes
// what SDPA does not: cumulative sequence lengths (`cu_seqlens`), so that
// one call attends many sequences of different lengths without padding,
// and keys and values with fewer heads than the queries (grouped-query
// attention). tch does not bind it (it returns five tensors), so it is
// reached from here, like the other bridges, through ATen alone.
//
// Every function catches C++ exceptions and reports them through `err`
// (see guarded.h).

#include <ATen/ATen.h>

#include <cstdint>

#include "guarded.h"

extern "C" {

// Causal attention of `query` [total_q, heads, head_dim] over `key` and
// `value` [total_k, kv_heads, head_dim]; sequence i owns query rows
// cu_seq_q[i] .. cu_seq_q[i+1] and key rows cu_seq_k[i] .. cu_seq_k[i+1]
// (int32, on the device). The causal mask is aligned to the end of each
// sequence: query row r of a sequence with q queries and k keys sees keys
// 0 ..= k - q + r, which is what a chunk after a cached past needs. On
// success `*out` is a new tensor [total_q, heads, head_dim], owned by the
// caller (tch frees it as one of its own).
int spark_varlen_attention(const void* query, const void* key, const void* value,
                           const void* cu_seq_q, const void* cu_seq_k, int64_t max_q,
                           int64_t max_k, void** out, char* err, size_t err_len) {
  return spark::guarded(err, err_len, [&] {
    auto result = at::_flash_attention_forward(
        *static_cast<const at::Tensor*>(query), *static_cast<const at::Tensor*>(key),
        *static_cast<const at::Tensor*>(value), *static_cast<const at::Tensor*>(cu_seq_q),
        *static_cast<const at::Tensor*>(cu_seq_k), max_q, max_k, /*dropout_p=*/0.0,
        /*is_causal=*/true, /*return_debug_mask=*/false);
    *out = new at::Tensor(std::get<0>(result));
  });
}

}  // extern "C"
