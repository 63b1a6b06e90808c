//! The decode step again, on the custom kernels of [`crate::kernels`].
//!
//! Same model, same math as [`Llama::forward`], for the one case a GPU
//! spends most of its serving time in: one new token per sequence, with
//! the KV cache in pages. Per layer it launches ten kernels where the
//! reference launches about thirty:
//!
//! ```text
//! rms_norm ─► qkv GEMM ─► rope_store_kv ─► paged_attention (2) ─► o GEMM (+= x)
//!          ─► rms_norm ─► gate/up GEMM ─► silu_mul ─► down GEMM (+= x)
//! ```
//!
//! and at batch 1 (up to `EngineConfig::matvec_max_batch`), where the
//! matrix-vector kernel takes the products and the operations around them,
//! seven:
//!
//! ```text
//! matvec(rms_norm, qkv) ─► rope_store_kv ─► paged_attention (2) ─► matvec(o, += x)
//!                       ─► matvec(rms_norm, gate/up) ─► matvec(silu_mul, down, += x)
//! ```
//!
//! or, with the persistent layer kernel (the default where it fits), one:
//! `decode_layer` does all of that with grid-wide barriers between stages.
//!
//! The engine replays it inside a CUDA graph (`engine::decode_graph`);
//! `tests` check it against the reference forward on a GPU.
//!
//! Prefill runs the same layers ([`Llama::prefill_fused`]) on many tokens
//! per sequence: the products are cuBLAS's, RoPE and the KV-cache write
//! are one kernel instead of nine PyTorch operations, the activation one
//! instead of two, and the residual additions happen inside the products.
//! Only attention differs: the engine's runner gathers each sequence's
//! context and calls SDPA (`engine::runner`).

use tch::Tensor;

use super::Llama;
use crate::kernels::{DecodeKernels, LayerStep, LayerWeights};

/// One decode step's inputs, and the paged KV cache as the kernels see it.
pub struct PagedDecode<'a> {
    /// `[batch]` int64: each sequence's new token.
    pub tokens: &'a Tensor,
    /// `[batch]` int64: its position (it attends to `0..=position`).
    pub positions: &'a Tensor,
    /// `[batch]` int64: the pool slot its K and V go to.
    pub write_slots: &'a Tensor,
    /// `[batch, max_blocks]` int64: its blocks, in order (padding past the end).
    pub block_tables: &'a Tensor,
    pub block_size: usize,
    /// Layer `i`'s K and V, each `[slots, kv_heads, head_dim]` (views of the pool).
    pub layers: &'a [(Tensor, Tensor)],
}

/// A prefill forward's inputs on the custom kernels: the chunks of one
/// step laid end to end, one row per token.
pub struct PagedPrefill<'a> {
    /// `[rows]` int64: the tokens.
    pub tokens: &'a Tensor,
    /// `[rows]` int64: each token's position in its sequence.
    pub positions: &'a Tensor,
    /// `[rows]` int64: the pool slot its K and V go to.
    pub write_slots: &'a Tensor,
    /// `[chunks]` int64: the rows whose logits are wanted (each chunk's last).
    pub last_rows: &'a Tensor,
    /// Layer `i`'s K and V, each `[slots, kv_heads, head_dim]` (views of the pool).
    pub layers: &'a [(Tensor, Tensor)],
}

/// Attention of one layer: from the layer's index, the rotated queries
/// `[rows, heads, head_dim]` and its pool `(K, V)` (this step's keys and
/// values already written) to `[rows, heads, head_dim]`.
pub type LayerAttention<'a> = dyn FnMut(usize, &Tensor, &Tensor, &Tensor) -> Tensor + 'a;

impl Llama {
    /// Runs one decode step and returns the logits `[batch, vocab]` (f32).
    /// Keys and values of the new tokens are written into `step.layers` on
    /// the way.
    // ANCHOR: decode_fused
    pub fn decode_fused(&self, kernels: &DecodeKernels, step: &PagedDecode) -> Tensor {
        let _no_grad = tch::no_grad_guard();
        let eps = self.config.rms_norm_eps;
        // x, the residual stream: the products after attention and the MLP add into it in place.
        let x = self.embed_tokens.index_select(0, step.tokens);
        let rows = step.tokens.numel();
        if kernels.takes_layer_kernel(rows) {
            self.decode_layers(kernels, step, &x);
            return kernels.norm_logits(&x, &self.norm, eps, &self.lm_head);
        }
        let mut attention = |_layer: usize, q: &Tensor, k_cache: &Tensor, v_cache: &Tensor| {
            kernels.paged_attention(
                q,
                k_cache,
                v_cache,
                step.block_tables,
                step.positions,
                step.block_size,
            )
        };
        let rows = (step.positions, step.write_slots);
        self.layers_on_kernels(kernels, &x, rows, step.layers, &mut attention);
        kernels.norm_logits(&x, &self.norm, eps, &self.lm_head)
    }
    // ANCHOR_END: decode_fused

    /// Runs the prefill of chunks laid end to end on the custom kernels and
    /// returns the logits of `step.last_rows`, `[chunks, vocab]` (f32). The
    /// layers are those of [`Llama::decode_fused`] at large batch; only
    /// attention differs (many new tokens per sequence): `attention` does it.
    pub fn prefill_fused(
        &self,
        kernels: &DecodeKernels,
        step: &PagedPrefill,
        attention: &mut LayerAttention,
    ) -> Tensor {
        let _no_grad = tch::no_grad_guard();
        let x = self.embed_tokens.index_select(0, step.tokens);
        let rows = (step.positions, step.write_slots);
        self.layers_on_kernels(kernels, &x, rows, step.layers, attention);
        let last = x.index_select(0, step.last_rows);
        kernels.norm_logits(&last, &self.norm, self.config.rms_norm_eps, &self.lm_head)
    }

    /// The decoder layers on the custom kernels, for the token rows of `x`
    /// (`[rows, hidden]`, updated in place) at `positions`, their keys and
    /// values written to `write_slots` of `pool`:
    ///
    /// ```text
    /// rms_norm ─► qkv product ─► rope_store_kv ─► attention ─► o product (+= x)
    ///          ─► rms_norm ─► gate/up product ─► silu_mul ─► down product (+= x)
    /// ```
    ///
    /// (`mlp_add` is the second line; with the opt-in product kernel,
    /// `silu_mul` happens inside the gate/up product.)
    // ANCHOR: layers_on_kernels
    fn layers_on_kernels(
        &self,
        kernels: &DecodeKernels,
        x: &Tensor,
        (positions, write_slots): (&Tensor, &Tensor),
        pool: &[(Tensor, Tensor)],
        attention: &mut LayerAttention,
    ) {
        let eps = self.config.rms_norm_eps;
        for (i, (layer, (k_cache, v_cache))) in self.layers.iter().zip(pool).enumerate() {
            // Each product names the weight read after it, for L2 prefetch.
            let next_qkv = self.weight_after_layer(i);
            let qkv = kernels.norm_linear(
                x,
                &layer.input_norm,
                eps,
                &layer.qkv_proj,
                Some(&layer.o_proj),
            );
            let q = kernels.rope_store_kv(
                &qkv,
                positions,
                write_slots,
                &self.rope.cos,
                &self.rope.sin,
                k_cache,
                v_cache,
            );
            let attn = attention(i, &q, k_cache, v_cache);
            kernels.linear_add(
                &attn.flatten(1, 2),
                &layer.o_proj,
                x,
                Some(&layer.gate_up_proj),
            );

            kernels.mlp_add(
                x,
                &layer.post_norm,
                eps,
                &layer.gate_up_proj,
                &layer.down_proj,
                Some(next_qkv),
            );
        }
    }
    // ANCHOR_END: layers_on_kernels

    /// The weight a decode step reads after layer `i`: the next layer's
    /// qkv projection, or after the last layer the logits' (for L2 prefetch).
    fn weight_after_layer(&self, i: usize) -> &Tensor {
        match self.layers.get(i + 1) {
            Some(next) => &next.qkv_proj,
            None => &self.lm_head,
        }
    }

    /// The layers of [`Llama::decode_fused`], each one `decode_layer` kernel.
    fn decode_layers(&self, kernels: &DecodeKernels, step: &PagedDecode, x: &Tensor) {
        let config = &self.config;
        let context = step.block_tables.size()[1] as usize * step.block_size;
        let scratch = kernels.layer_scratch(step.tokens.numel(), context, config, x.device());
        let layer_step = LayerStep {
            positions: step.positions,
            write_slots: step.write_slots,
            block_tables: step.block_tables,
            block_size: step.block_size,
            cos: &self.rope.cos,
            sin: &self.rope.sin,
            eps: config.rms_norm_eps,
        };
        for (i, (layer, (k_cache, v_cache))) in self.layers.iter().zip(step.layers).enumerate() {
            let weights = LayerWeights {
                input_norm: &layer.input_norm,
                qkv_proj: &layer.qkv_proj,
                o_proj: &layer.o_proj,
                post_norm: &layer.post_norm,
                gate_up_proj: &layer.gate_up_proj,
                down_proj: &layer.down_proj,
            };
            kernels.decode_layer(i, x, &weights, k_cache, v_cache, &layer_step, &scratch);
        }
    }
}

#[cfg(test)]
mod tests {
    //! These compare the kernels with the reference on a GPU; on a machine
    //! without one they check nothing (and say so).

    use tch::{Device, Kind, Tensor};

    use super::*;
    use crate::kernels::timeline::mark;
    use crate::kernels::{max_abs, max_diff, test_config as config, test_gpu as gpu, KernelShape};
    use crate::model::config::LlamaConfig;
    use crate::model::llama::{causal_attention, rope_inv_freq, AttentionCache};

    #[test]
    fn small_kernels_match_pytorch() {
        let Some(device) = gpu() else { return };
        let _no_grad = tch::no_grad_guard();
        for kind in [Kind::Float, Kind::BFloat16] {
            let kernels = DecodeKernels::get(&config(), kind, device).unwrap();
            let tol = if kind == Kind::Float { 1e-5 } else { 2e-2 };
            // Rows of 16-byte pieces (the vectorised paths: a piece a
            // thread up to 1024 of them, 4096 being 512 or 1024), rows
            // that are not (element by element), and rows of more pieces
            // than a block has threads (each thread loops).
            for hidden in [512, 510, 4096, 16384] {
                let x = Tensor::randn([5, hidden], (kind, device));
                let w = Tensor::randn([hidden], (kind, device));
                let reference = x.rms_norm([hidden], Some(&w), 1e-5);
                let diff = max_diff(&kernels.rms_norm(&x, &w, 1e-5), &reference);
                assert!(
                    diff <= tol * max_abs(&reference),
                    "rms_norm {kind:?} of {hidden}: {diff}"
                );
            }
            for inter in [1024, 1001, 3] {
                let gate_up = Tensor::randn([5, 2 * inter], (kind, device));
                let reference =
                    gate_up.narrow(1, 0, inter).silu() * gate_up.narrow(1, inter, inter);
                let diff = max_diff(&kernels.silu_mul(&gate_up), &reference);
                assert!(
                    diff <= tol * max_abs(&reference),
                    "silu_mul {kind:?} of {inter}: {diff}"
                );
            }
        }
    }

    /// `rope_store_kv` against "rotate half" written with tensor
    /// operations: the rotated queries it returns, and the rotated keys and
    /// the values it leaves in the pool at each token's slot (and nowhere
    /// else). Once with 16-byte aligned tensors (the vectorised path) and
    /// once with `qkv` two bytes off (element by element).
    #[test]
    fn rope_store_kv_matches_rotate_half() {
        let Some(device) = gpu() else { return };
        let _no_grad = tch::no_grad_guard();
        let config = config();
        let heads = config.num_attention_heads as i64;
        let (kv_heads, d) = (config.num_kv_heads() as i64, config.head_dim() as i64);
        let width = (heads + 2 * kv_heads) * d;
        let (tokens, slots_in_pool) = (5i64, 40i64);
        for kind in [Kind::Float, Kind::BFloat16] {
            let kernels = DecodeKernels::get(&config, kind, device).unwrap();
            let positions = Tensor::from_slice(&[0i64, 7, 8, 300, 1023]).to_device(device);
            let slots = Tensor::from_slice(&[33i64, 2, 17, 0, 39]).to_device(device);
            let inv_freq = Tensor::from_slice(&rope_inv_freq(&config)).to_device(device);
            let angles =
                Tensor::arange(1024, (Kind::Float, device)).unsqueeze(1) * inv_freq.unsqueeze(0);
            let (cos, sin) = (angles.cos(), angles.sin());
            for offset in [0i64, 1] {
                let buffer = Tensor::randn([tokens * width + offset], (kind, device));
                let qkv = buffer
                    .narrow(0, offset, tokens * width)
                    .view([tokens, width]);
                let k_cache = Tensor::zeros([slots_in_pool, kv_heads, d], (kind, device));
                let v_cache = k_cache.zeros_like();
                let q =
                    kernels.rope_store_kv(&qkv, &positions, &slots, &cos, &sin, &k_cache, &v_cache);

                let x = qkv
                    .view([tokens, heads + 2 * kv_heads, d])
                    .to_kind(Kind::Float);
                let pick = |t: &Tensor| t.index_select(0, &positions).unsqueeze(1);
                let (c, s) = (pick(&cos), pick(&sin));
                let (x1, x2) = (x.narrow(2, 0, d / 2), x.narrow(2, d / 2, d / 2));
                let rotated = Tensor::cat(&[&x1 * &c - &x2 * &s, &x2 * &c + &x1 * &s], 2);
                let tol = if kind == Kind::Float { 1e-5 } else { 2e-2 };
                let check = |what: &str, got: &Tensor, want: &Tensor| {
                    let diff = max_diff(got, want);
                    assert!(
                        diff <= tol * max_abs(want).max(1.0),
                        "{what}, {kind:?}, qkv {offset} elements off: {diff}"
                    );
                };
                check("queries", &q, &rotated.narrow(1, 0, heads));
                check(
                    "keys",
                    &k_cache.index_select(0, &slots),
                    &rotated.narrow(1, heads, kv_heads),
                );
                check(
                    "values",
                    &v_cache.index_select(0, &slots),
                    &x.narrow(1, heads + kv_heads, kv_heads),
                );
                let written =
                    k_cache
                        .abs()
                        .sum_dim_intlist([1i64, 2].as_slice(), false, Kind::Float);
                let slots_written = written.ne(0.0).sum(Kind::Int64).int64_value(&[]);
                assert_eq!(
                    slots_written, tokens,
                    "only the tokens' slots get keys ({kind:?})"
                );
            }
        }
    }

    /// The matrix-vector kernel, for 1 to 4 rows, against the same
    /// operations done by PyTorch (the path above 4 rows): output sizes
    /// that do not fill a block, and one with more rows than the grid has
    /// warps (so warps stride over several).
    #[test]
    fn matvec_products_match_pytorch() {
        let Some(device) = gpu() else { return };
        let _no_grad = tch::no_grad_guard();
        for kind in [Kind::Float, Kind::BFloat16] {
            let kernels = DecodeKernels::get(&config(), kind, device).unwrap();
            assert_eq!(kernels.matvec_limit(), 4, "{kind:?}");
            let tol = if kind == Kind::Float { 1e-4 } else { 3e-2 };
            let weight = |n: i64, k: i64| Tensor::randn([n, k], (kind, device)) / (k as f64).sqrt();
            let norm = Tensor::randn([512], (kind, device));
            for (rows, n) in [(1i64, 296i64), (2, 512), (3, 5000), (4, 1024)] {
                let check = |what: &str, got: &Tensor, want: &Tensor| {
                    let diff = max_diff(got, want);
                    assert!(
                        diff <= tol * max_abs(want).max(1.0),
                        "{what}, {kind:?}, {rows} rows, n {n}: {diff}"
                    );
                };
                let x = Tensor::randn([rows, 512], (kind, device));
                let w = weight(n, 512);
                // A weight to prefetch afterwards, of a size that is no
                // multiple of the 128-byte lines (it must not change results).
                let next = Tensor::randn([3, 77], (kind, device));
                let normed = x.rms_norm([512], Some(&norm), 1e-5);
                let want = normed.linear(&w, None::<Tensor>);
                check(
                    "norm_linear",
                    &kernels.norm_linear(&x, &norm, 1e-5, &w, Some(&next)),
                    &want,
                );
                let logits = kernels.norm_logits(&x, &norm, 1e-5, &w);
                assert_eq!(logits.kind(), Kind::Float);
                check("norm_logits", &logits, &want);

                // Input rows of up to 1024 (the model's intermediate size).
                let n = n.min(1024);
                let w = weight(512, n);
                let h = Tensor::randn([rows, n], (kind, device));
                let residual = Tensor::randn([rows, 512], (kind, device));
                let want = &residual + h.linear(&w, None::<Tensor>);
                kernels.linear_add(&h, &w, &residual, Some(&next));
                check("linear_add", &residual, &want);

                let gate_up = Tensor::randn([rows, 2 * n], (kind, device));
                let residual = Tensor::randn([rows, 512], (kind, device));
                let silu = gate_up.narrow(1, 0, n).silu() * gate_up.narrow(1, n, n);
                let want = &residual + silu.linear(&w, None::<Tensor>);
                kernels.silu_linear_add(&gate_up, &w, &residual, None);
                check("silu_linear_add", &residual, &want);
            }
        }
    }

    /// Paged attention over contexts of 1 to 700 tokens, in blocks handed
    /// out in shuffled order, against gather + SDPA. The shapes cover both
    /// of `attention_partial`'s paths (CUDA cores for f32, tensor cores for
    /// 16-bit types on sm_80 and later): query heads per KV head of 8
    /// (TinyLlama), 3 (SmolLM2), 4 and 1, heads of 64 and 128 elements.
    #[test]
    fn paged_attention_matches_sdpa() {
        let Some(device) = gpu() else { return };
        let _no_grad = tch::no_grad_guard();
        for (heads, kv_heads, head_dim) in
            [(8, 2, 64), (32, 4, 64), (9, 3, 64), (4, 4, 64), (8, 2, 128)]
        {
            let config = LlamaConfig {
                hidden_size: heads * head_dim,
                num_attention_heads: heads,
                num_key_value_heads: Some(kv_heads),
                ..config()
            };
            // f32 runs on the CUDA cores only; 16-bit types on both.
            let variants = [
                (Kind::Float, false),
                (Kind::BFloat16, false),
                (Kind::BFloat16, true),
                (Kind::Half, false),
                (Kind::Half, true),
            ];
            for (kind, mma) in variants {
                if kind == Kind::Float && head_dim == 128 {
                    continue; // 512-byte rows: the kernels take at most 256
                }
                let shape = KernelShape {
                    attention_mma: mma,
                    ..KernelShape::of(&config, kind).unwrap()
                };
                let kernels = DecodeKernels::for_shape(shape, device).unwrap();
                check_paged_attention(&kernels, &config, kind, device);
            }
        }
    }

    /// One case of `paged_attention_matches_sdpa`. Pool slots past each
    /// context hold NaN and the block table's entries past it point
    /// nowhere: the kernel must read neither.
    fn check_paged_attention(
        kernels: &DecodeKernels,
        config: &LlamaConfig,
        kind: Kind,
        device: Device,
    ) {
        let block_size = 16usize;
        let positions = [0i64, 15, 16, 63, 64, 130, 699];
        let max_blocks = 700usize.div_ceil(block_size);
        let batch = positions.len() as i64;
        let heads = config.num_attention_heads as i64;
        let kv_heads = config.num_kv_heads() as i64;
        let head_dim = config.head_dim() as i64;
        let num_blocks = positions.len() * max_blocks + 1;
        let slots = (num_blocks * block_size) as i64;
        // Every sequence gets max_blocks distinct blocks, in a scrambled order.
        let order = Tensor::randperm(num_blocks as i64 - 1, (Kind::Int64, Device::Cpu));
        let tables = order
            .narrow(0, 0, (positions.len() * max_blocks) as i64)
            .reshape([batch, max_blocks as i64]);
        let offsets = Tensor::arange(block_size as i64, (Kind::Int64, Device::Cpu));
        let context_slots: Vec<Tensor> = positions
            .iter()
            .enumerate()
            .map(|(b, &p)| {
                (tables.get(b as i64).unsqueeze(1) * block_size as i64 + offsets.unsqueeze(0))
                    .reshape([-1])
                    .narrow(0, 0, p + 1)
                    .to_device(device)
            })
            .collect();
        let live = Tensor::zeros([slots], (Kind::Bool, device));
        for s in &context_slots {
            let _ = live.shallow_clone().index_fill_(0, s, 1);
        }
        let dead = live.logical_not().view([slots, 1, 1]);
        let pool = || {
            Tensor::randn([slots, kv_heads, head_dim], (kind, device)).masked_fill(&dead, f64::NAN)
        };
        let (k_cache, v_cache) = (pool(), pool());
        let garbage = tables.copy();
        for (b, &p) in positions.iter().enumerate() {
            let used = (p as usize + 1).div_ceil(block_size) as i64;
            let _ = garbage
                .get(b as i64)
                .narrow(0, used, max_blocks as i64 - used)
                .fill_(i64::MAX / 2);
        }
        let q = Tensor::randn([batch, heads, head_dim], (kind, device));
        let pos = Tensor::from_slice(&positions).to_device(device);
        let tables = garbage.to_device(device);
        // Each block reads one partition (of 32 or 64 tokens), two, three
        // (a short last span), or all of them; and as `paged_attention`
        // chooses.
        let all = (max_blocks * block_size).div_ceil(kernels.shape().partition());
        let mut outs: Vec<(String, Tensor)> = [1, 2, 3, all]
            .into_iter()
            .map(|span| {
                let out = kernels.paged_attention_in_spans(
                    &q, &k_cache, &v_cache, &tables, &pos, block_size, span,
                );
                (format!("spans of {span}"), out)
            })
            .collect();
        let chosen = kernels.paged_attention(&q, &k_cache, &v_cache, &tables, &pos, block_size);
        outs.push(("spans as chosen".into(), chosen));
        let mma = kernels.shape().attention_mma;
        for (b, (&p, slots)) in positions.iter().zip(&context_slots).enumerate() {
            let gather = |cache: &Tensor| cache.index_select(0, slots).transpose(0, 1).unsqueeze(0);
            let reference = causal_attention(
                &q.get(b as i64).unsqueeze(0).unsqueeze(2),
                &gather(&k_cache),
                &gather(&v_cache),
            )
            .squeeze_dim(2)
            .squeeze_dim(0);
            let tol = if kind == Kind::Float { 1e-4 } else { 3e-2 };
            for (spans, out) in &outs {
                let diff = max_diff(&out.get(b as i64), &reference);
                assert!(
                    diff <= tol,
                    "{kind:?} (tensor cores allowed: {mma}), {heads} heads / {kv_heads} KV heads \
                     of {head_dim}, position {p}, {spans}: max difference {diff}"
                );
            }
        }
    }

    /// The reference's attention cache for one sequence per row, over the
    /// same pool the kernels use (the layout `engine::runner` gives it).
    struct GatherCache<'a> {
        layers: &'a [(Tensor, Tensor)],
        write_slots: Tensor,
        read_slots: Tensor,
        mask: Tensor,
        context: i64,
    }

    impl AttentionCache for GatherCache<'_> {
        fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
            let b = q.size()[0];
            let (k_cache, v_cache) = &self.layers[layer];
            let read = |cache: &Tensor, x: &Tensor| {
                let rows = x.transpose(1, 2).reshape([b, x.size()[1], x.size()[3]]);
                let _ = cache
                    .shallow_clone()
                    .index_copy_(0, &self.write_slots, &rows);
                cache
                    .index_select(0, &self.read_slots)
                    .reshape([b, self.context, x.size()[1], x.size()[3]])
                    .transpose(1, 2)
            };
            let (keys, values) = (read(k_cache, k), read(v_cache, v));
            Tensor::scaled_dot_product_attention(
                q,
                &keys,
                &values,
                Some(&self.mask),
                0.0,
                false,
                None,
                true,
            )
        }
    }

    /// A whole decode step through the fused path and through
    /// `Llama::forward`: the same logits, and the same keys and values
    /// left in the pool. Batches of 1 and 3 run on the persistent layer
    /// kernel, and again without it; 6 is above the matrix-vector limit,
    /// with the batched products on our kernel and on cuBLAS.
    #[test]
    fn fused_decode_matches_the_reference_forward() {
        let Some(device) = gpu() else { return };
        // 4 query heads per KV head (one attention chunk of the layer
        // kernel), and 8 (two chunks of 4 in bf16).
        let wide = LlamaConfig {
            hidden_size: 1024,
            num_attention_heads: 16,
            ..config()
        };
        // Rows of 5632, as TinyLlama's down projection: two to a tile of
        // the layer kernel's ring, which `dot_tile` reads rather than the
        // tensor cores (the configurations above have eight to a tile).
        let long_rows = LlamaConfig {
            intermediate_size: 5632,
            num_hidden_layers: 2,
            ..config()
        };
        for config in [config(), wide, long_rows] {
            // The layer kernel on, whatever this GPU's default: where it
            // lacks bulk copies the ring is filled with cp.async.
            let kernels = DecodeKernels::get(&config, Kind::BFloat16, device)
                .unwrap()
                .with_layer_kernel(true);
            assert!(
                kernels.takes_layer_kernel(1) && kernels.takes_layer_kernel(3),
                "the layer kernel should fit this GPU"
            );
            let unfused = kernels.with_layer_kernel(false);
            assert!(!unfused.takes_layer_kernel(1));
            for kernels in [&kernels, &unfused] {
                check_decode_step(&config, kernels, device, &[299]);
                check_decode_step(&config, kernels, device, &[0, 39, 299]);
            }
            // The ring read by groups of three warps and by groups of five
            // (which of them a GPU takes depends on its shared memory), and
            // compiled for batch 1 alone, as the engine does by default.
            let shape = KernelShape::of(&config, Kind::BFloat16).unwrap();
            for warps in [3, 5] {
                let forced = DecodeKernels::for_shape_with_groups(shape, device, &[warps])
                    .unwrap()
                    .with_layer_kernel(true);
                let ring = forced.layer_ring().expect("a ring fits this GPU");
                assert_eq!(ring.group_warps, warps);
                assert_eq!(ring.slots % ring.groups, 0);
                check_decode_step(&config, &forced, device, &[299]);
                check_decode_step(&config, &forced, device, &[0, 39, 299]);
            }
            // The other way for the layer's stages to get their inputs:
            // tagged words where this build has grid barriers (as this
            // small model's has by default), and the reverse.
            let other = KernelShape {
                layer_tagged: !shape.layer_tagged,
                ..shape
            };
            let other = DecodeKernels::for_shape_with_groups(other, device, &[5])
                .unwrap()
                .with_layer_kernel(true);
            assert_eq!(
                other.layer_ring().map(|ring| ring.tagged),
                Some(!shape.layer_tagged)
            );
            check_decode_step(&config, &other, device, &[299]);
            check_decode_step(&config, &other, device, &[0, 39, 299]);
            let single = DecodeKernels::get_for_batches(&config, Kind::BFloat16, device, 1)
                .unwrap()
                .with_layer_kernel(true);
            assert!(single.takes_layer_kernel(1) && !single.takes_layer_kernel(2));
            check_decode_step(&config, &single, device, &[299]);
            // Above it, on the product kernel and on cuBLAS.
            let batch = [0, 5, 39, 100, 200, 299];
            let products = kernels.with_product_kernel(true);
            assert!(
                products.product_kernel(),
                "the product kernel should run here"
            );
            check_decode_step(&config, &products, device, &batch);
            check_decode_step(
                &config,
                &products.with_product_kernel(false),
                device,
                &batch,
            );
        }
    }

    /// One decode step's inputs over a pool of random keys and values: a
    /// sequence at each of `positions`, its blocks given out in reverse
    /// order (so that block tables are not the identity).
    struct StepInputs {
        tokens: Tensor,
        positions: Tensor,
        write_slots: Tensor,
        tables: Tensor,
        block_size: usize,
        pool: Vec<(Tensor, Tensor)>,
    }

    impl StepInputs {
        fn new(config: &LlamaConfig, device: Device, positions: &[i64]) -> StepInputs {
            let kind = Kind::BFloat16;
            let (kv_heads, head_dim, block_size) = (2i64, config.head_dim() as i64, 16usize);
            let max_blocks = 304 / block_size as i64;
            let batch = positions.len() as i64;
            let slots = batch * max_blocks * block_size as i64;
            let pool = (0..config.num_hidden_layers)
                .map(|_| {
                    let cache = || Tensor::randn([slots, kv_heads, head_dim], (kind, device));
                    (cache(), cache())
                })
                .collect();
            let tables = Tensor::arange(batch * max_blocks, (Kind::Int64, device))
                .flip([0])
                .reshape([batch, max_blocks]);
            let pos = Tensor::from_slice(positions).to_device(device);
            let bs = block_size as i64;
            let write_slots = tables
                .gather(1, &pos.floor_divide_scalar(bs).unsqueeze(1), false)
                .squeeze_dim(1)
                * bs
                + pos.remainder(bs);
            let tokens = (Tensor::arange(batch, (Kind::Int64, device)) * 37).remainder(256);
            StepInputs {
                tokens,
                positions: pos,
                write_slots,
                tables,
                block_size,
                pool,
            }
        }

        /// A copy of the pool, for one run of the step to write into.
        fn pool_copy(&self) -> Vec<(Tensor, Tensor)> {
            self.pool
                .iter()
                .map(|(k, v)| (k.copy(), v.copy()))
                .collect()
        }

        fn step<'a>(&'a self, layers: &'a [(Tensor, Tensor)]) -> PagedDecode<'a> {
            PagedDecode {
                tokens: &self.tokens,
                positions: &self.positions,
                write_slots: &self.write_slots,
                block_tables: &self.tables,
                block_size: self.block_size,
                layers,
            }
        }
    }

    /// Launching a kernel while the one before it runs (programmatic
    /// dependent launch, through `cuLaunchKernelEx`) changes when it
    /// starts, never what it computes: the same logits and the same pool as
    /// with plain launches, bit for bit (the kernels' sums run in a fixed
    /// order). Checked for the layer kernels of a step of 3 sequences, and
    /// for the attention kernels (`rope_store_kv` -> `attention_partial` ->
    /// `attention_combine`) and the batched products (each copying its
    /// first weights before the kernel ahead ends) of a step of 6, above
    /// the matrix-vector limit.
    #[test]
    fn overlapping_launches_change_no_result() {
        let Some(device) = gpu() else { return };
        let _no_grad = tch::no_grad_guard();
        let config = config();
        let kernels = DecodeKernels::get(&config, Kind::BFloat16, device)
            .unwrap()
            .with_layer_kernel(true);
        assert!(kernels.takes_layer_kernel(3) && !kernels.takes_layer_kernel(6));
        let model = Llama::random(config.clone(), 3, device, Kind::BFloat16);
        type Overlap = fn(&DecodeKernels, bool) -> DecodeKernels;
        let six: &[i64] = &[0, 5, 39, 100, 200, 299];
        let cases: [(&[i64], Overlap); 3] = [
            (&[0, 39, 299], DecodeKernels::with_layer_overlap),
            (six, DecodeKernels::with_attention_overlap),
            (six, DecodeKernels::with_product_overlap),
        ];
        // The product kernel is off by default: on for these steps.
        let kernels = kernels.with_product_kernel(true);
        assert!(
            kernels.product_kernel(),
            "the product kernel should run here"
        );
        for (positions, overlap) in cases {
            let inputs = StepInputs::new(&config, device, positions);
            let [(overlapped, overlapped_pool), (serial, serial_pool)] = [true, false].map(|on| {
                let pool = inputs.pool_copy();
                let logits = model.decode_fused(&overlap(&kernels, on), &inputs.step(&pool));
                (logits, pool)
            });
            let batch = positions.len();
            assert!(
                overlapped.equal(&serial),
                "batch {batch}: logits differ by {}",
                max_diff(&overlapped, &serial)
            );
            for (layer, ((ok, ov), (sk, sv))) in
                overlapped_pool.iter().zip(&serial_pool).enumerate()
            {
                assert!(
                    ok.equal(sk) && ov.equal(sv),
                    "batch {batch}: layer {layer}'s keys or values differ"
                );
            }
        }
    }

    /// The timeline build (`-DLAYER_TIMELINE=1`) records every stage of
    /// every layer of every block in order, and computes what the default
    /// build computes, bit for bit: its marks and extra barriers change
    /// when things happen, not what. The default build records nothing.
    #[test]
    fn the_layer_timeline_marks_every_stage_and_changes_no_result() {
        let Some(device) = gpu() else { return };
        let _no_grad = tch::no_grad_guard();
        let config = config();
        let plain = DecodeKernels::get_for_batches(&config, Kind::BFloat16, device, 1)
            .unwrap()
            .with_layer_kernel(true);
        let shape = KernelShape {
            layer_timeline: true,
            ..plain.shape()
        };
        let timed = DecodeKernels::for_shape(shape, device)
            .unwrap()
            .with_matvec_limit(1)
            .with_layer_kernel(true);
        assert!(timed.takes_layer_kernel(1));
        let layers = config.num_hidden_layers;
        assert!(plain.layer_timeline(layers).unwrap().is_none());
        let model = Llama::random(config.clone(), 5, device, Kind::BFloat16);
        let inputs = StepInputs::new(&config, device, &[299]);
        let [(with_marks, marked_pool), (without, plain_pool)] = [&timed, &plain].map(|k| {
            let pool = inputs.pool_copy();
            let logits = model.decode_fused(k, &inputs.step(&pool));
            (logits, pool)
        });
        assert!(
            with_marks.equal(&without),
            "the timeline build's logits differ by {}",
            max_diff(&with_marks, &without)
        );
        for ((mk, mv), (pk, pv)) in marked_pool.iter().zip(&plain_pool) {
            assert!(mk.equal(pk) && mv.equal(pv));
        }
        let timeline = timed
            .layer_timeline(layers)
            .unwrap()
            .expect("a timeline build");
        assert_eq!(timeline.layers(), layers);
        assert!(timeline.blocks() > 0);
        assert!(timeline.is_ordered(), "{timeline:?}");
        for l in 0..layers {
            // Each layer ends before the next begins (one kernel each).
            if let Some(gap) = timeline.gap_ns(l) {
                assert!(
                    timeline.layer_start(l + 1) >= timeline.layer_end(l),
                    "layer {l}, gap {gap}"
                );
            }
            // A layer of this small model takes microseconds, not seconds.
            assert!(timeline.layer_ns(l) < 1_000_000_000, "layer {l}");
            // Block 0 runs the first attention item, and times it.
            assert!(timeline.timed_attention(l, 0), "layer {l}");
            // Thread 0's waits, dot products and group barriers in a
            // product lie within that product's stages (so each sum was
            // zeroed and stored in its place).
            let spans = [
                (mark::STARTED, mark::QKV_DONE),
                (mark::BARRIER2, mark::O_DONE),
                (mark::BARRIER3, mark::GATE_UP_DONE),
                (mark::BARRIER4, mark::DOWN_DONE),
            ];
            for b in 0..timeline.blocks() {
                for (i, (from, to)) in spans.into_iter().enumerate() {
                    let span = timeline.mark(l, b, to) - timeline.mark(l, b, from);
                    let spent: u64 = [mark::TILE_WAITS, mark::TILE_DOTS, mark::TILE_SYNCS]
                        .iter()
                        .map(|marks| timeline.mark(l, b, marks[i]))
                        .sum();
                    assert!(
                        spent <= span,
                        "layer {l} block {b} product {i}: {spent} ns in a span of {span}"
                    );
                }
            }
        }
    }

    fn check_decode_step(
        config: &LlamaConfig,
        kernels: &DecodeKernels,
        device: Device,
        positions: &[i64],
    ) {
        let _no_grad = tch::no_grad_guard();
        let model = Llama::random(config.clone(), 3, device, Kind::BFloat16);
        let inputs = StepInputs::new(config, device, positions);
        let fused_pool = inputs.pool_copy();
        let reference_pool = inputs.pool_copy();
        let fused = model.decode_fused(kernels, &inputs.step(&fused_pool));

        let (tables, pos, write_slots, tokens) = (
            &inputs.tables,
            &inputs.positions,
            &inputs.write_slots,
            &inputs.tokens,
        );
        let (batch, max_blocks) = tables.size2().expect("tables are [batch, max_blocks]");
        let bs = inputs.block_size as i64;
        let context = max_blocks * bs;
        let offsets = Tensor::arange(bs, (Kind::Int64, device));
        let read_slots = (tables.unsqueeze(2) * bs + offsets.reshape([1, 1, bs])).reshape([-1]);
        let cols = Tensor::arange(context, (Kind::Int64, device)).reshape([1, 1, 1, context]);
        let mut cache = GatherCache {
            layers: &reference_pool,
            write_slots: write_slots.shallow_clone(),
            read_slots,
            mask: cols.le_tensor(&pos.reshape([batch, 1, 1, 1])),
            context,
        };
        let hidden = model.forward(&tokens.unsqueeze(1), &pos.unsqueeze(1), &mut cache);
        let reference = model.logits(&hidden.select(1, 0));

        let diff = max_diff(&fused, &reference);
        let layer_kernel = kernels.takes_layer_kernel(batch as usize);
        assert!(
            diff <= 0.05 * max_abs(&reference),
            "batch {batch} (layer kernel: {layer_kernel}): logits differ by {diff} (largest {})",
            max_abs(&reference)
        );
        for (layer, ((fk, fv), (rk, rv))) in fused_pool.iter().zip(&reference_pool).enumerate() {
            for (name, f, r) in [("K", fk, rk), ("V", fv, rv)] {
                let diff = max_diff(f, r);
                assert!(
                    diff <= 0.05 * max_abs(r),
                    "batch {batch} (layer kernel: {layer_kernel}): layer {layer} {name} differs \
                     by {diff}"
                );
            }
        }
    }
}
