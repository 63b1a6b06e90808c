//! The Llama transformer, forward pass only, in one file.
//!
//! ```text
//! tokens ─► embed ─► ┌──────────── × num_hidden_layers ─────────────┐ ─► RMSNorm ─► lm_head ─► logits
//!                    │ x += Attn(RMSNorm(x))   (RoPE, GQA, KV cache) │
//!                    │ x += MLP(RMSNorm(x))    (SwiGLU)              │
//!                    └───────────────────────────────────────────────┘
//! ```
//!
//! Everything a serving system cares about happens in one call:
//! [`AttentionCache::attend`]. The model computes this step's keys and values
//! and hands them, with the queries, to the cache; the cache stores them and
//! runs attention over everything it holds for those sequences. Swapping the
//! cache swaps the memory layout — a dense tensor per layer here
//! ([`DenseKvCache`]), fixed-size pages shared between sequences in the
//! engine — without touching the model.
//!
//! A few small speed-ups keep the file readable: Q, K and V projections are
//! fused into one matrix (one GEMM instead of three), and so are the MLP's
//! gate and up projections; RMSNorm is PyTorch's fused `rms_norm`, and
//! queries and keys are rotated by RoPE together. Nothing else is clever.
//! A GPU's decode step is made fast elsewhere: by the same layers on custom
//! kernels ([`Llama::decode_fused`], in `llama/fused.rs`), replayed as a
//! CUDA graph (`engine::decode_graph`).

use tch::{Device, Kind, Tensor};

use super::config::LlamaConfig;

mod fused;
use super::load::{check_tensors, layer_tensor_names, LoadError, NamedTensors};
pub use fused::{PagedDecode, PagedPrefill};

/// Where attention gets its past keys and values from, and puts new ones.
pub trait AttentionCache {
    /// Stores this step's `k`, `v` for `layer` and returns attention of `q`
    /// over all cached positions of the same sequences (causal).
    ///
    /// Shapes: `q` is `[batch, heads, new_tokens, head_dim]`; `k` and `v` are
    /// `[batch, kv_heads, new_tokens, head_dim]`, already rotated by RoPE.
    /// Returns `[batch, heads, new_tokens, head_dim]`.
    fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor;
}

/// The simplest KV cache: one growing `[batch, kv_heads, tokens, head_dim]`
/// tensor pair per layer, for a batch whose sequences all have the same length.
///
/// This is what Hugging Face's `DynamicCache` does. It is exact and easy to
/// read; its weakness — every sequence reserves contiguous memory and a batch
/// must move in lock-step — is what paged attention fixes.
#[derive(Default)]
pub struct DenseKvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl DenseKvCache {
    pub fn new(num_layers: usize) -> Self {
        DenseKvCache {
            layers: (0..num_layers).map(|_| None).collect(),
        }
    }

    /// Tokens cached so far.
    pub fn len(&self) -> i64 {
        match self.layers.first() {
            Some(Some((k, _))) => k.size()[2],
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The cached `(K, V)` of one layer, each `[batch, kv_heads, tokens, head_dim]`.
    pub fn layer(&self, layer: usize) -> Option<&(Tensor, Tensor)> {
        self.layers.get(layer).and_then(Option::as_ref)
    }

    /// Replaces one layer's cache (used when KV arrives from another process).
    pub fn set_layer(&mut self, layer: usize, k: Tensor, v: Tensor) {
        if self.layers.len() <= layer {
            self.layers.resize_with(layer + 1, || None);
        }
        self.layers[layer] = Some((k, v));
    }
}

impl AttentionCache for DenseKvCache {
    fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let (k, v) = match self.layers[layer].take() {
            Some((past_k, past_v)) => (
                Tensor::cat(&[past_k, k.shallow_clone()], 2),
                Tensor::cat(&[past_v, v.shallow_clone()], 2),
            ),
            None => (k.shallow_clone(), v.shallow_clone()),
        };
        let out = causal_attention(q, &k, &v);
        self.layers[layer] = Some((k, v));
        out
    }
}

/// Scaled dot-product attention where the `new` queries are the last `new`
/// positions of the keys: query `i` sees keys `0..=past + i`.
///
/// PyTorch's `is_causal` flag aligns the mask to the top-left corner, which
/// is only right when there is no past; with a past and several new tokens
/// (chunked prefill) an explicit mask is needed.
// ANCHOR: causal_attention
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
    let new = q.size()[2];
    let total = k.size()[2];
    let past = total - new;
    let gqa = q.size()[1] != k.size()[1];
    if new == 1 || past == 0 {
        Tensor::scaled_dot_product_attention(q, k, v, None::<Tensor>, 0.0, new > 1, None, gqa)
    } else {
        let rows = Tensor::arange(new, (Kind::Int64, q.device())).unsqueeze(1) + past;
        let cols = Tensor::arange(total, (Kind::Int64, q.device())).unsqueeze(0);
        let mask = cols.le_tensor(&rows);
        Tensor::scaled_dot_product_attention(q, k, v, Some(mask), 0.0, false, None, gqa)
    }
}
// ANCHOR_END: causal_attention

/// Rotary position embedding tables, precomputed for every position.
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(config: &LlamaConfig, device: Device) -> Self {
        let inv_freq = rope_inv_freq(config);
        let half = inv_freq.len() as i64;
        let inv_freq = Tensor::from_slice(&inv_freq).to_device(device);
        let positions =
            Tensor::arange(config.max_position_embeddings as i64, (Kind::Float, device));
        let angles = positions.unsqueeze(1) * inv_freq.reshape([1, half]);
        Rope {
            cos: angles.cos(),
            sin: angles.sin(),
        }
    }

    /// `cos` and `sin` for the given positions, shaped `[batch, 1, tokens, head_dim]`.
    fn tables(&self, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let (b, t) = positions.size2().expect("positions are [batch, tokens]");
        let flat = positions.reshape([-1]);
        let pick = |table: &Tensor| {
            let half = table.index_select(0, &flat);
            Tensor::cat(&[&half, &half], -1)
                .reshape([b, 1, t, -1])
                .to_kind(kind)
        };
        (pick(&self.cos), pick(&self.sin))
    }
}

/// RoPE frequencies `theta^(-2i/head_dim)`, with Llama 3.1's long-context
/// scaling when the config asks for it.
pub fn rope_inv_freq(config: &LlamaConfig) -> Vec<f32> {
    let dim = config.head_dim();
    let base: Vec<f64> = (0..dim / 2)
        .map(|i| 1.0 / config.rope_theta.powf(2.0 * i as f64 / dim as f64))
        .collect();
    let scaled = match &config.rope_scaling {
        Some(s) if s.rope_type == "llama3" => {
            let old = s.original_max_position_embeddings as f64;
            let low_wavelen = old / s.low_freq_factor;
            let high_wavelen = old / s.high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / s.factor
                    } else {
                        let smooth = (old / wavelen - s.low_freq_factor)
                            / (s.high_freq_factor - s.low_freq_factor);
                        (1.0 - smooth) * f / s.factor + smooth * f
                    }
                })
                .collect()
        }
        _ => base,
    };
    scaled.into_iter().map(|f| f as f32).collect()
}

// ANCHOR: rope
/// Rotates pairs `(x[i], x[i + d/2])` by the position's angle ("rotate half").
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let x1 = x.narrow(3, 0, half);
    let x2 = x.narrow(3, half, half);
    let rotated = Tensor::cat(&[-x2, x1], 3);
    x * cos + rotated * sin
}
// ANCHOR_END: rope

// ANCHOR: rms_norm
/// RMSNorm: `x / sqrt(mean(x²) + eps) · weight`, through PyTorch's own
/// `rms_norm`, which accumulates in f32 as Hugging Face does and on a GPU
/// is one fused kernel (written out with tensor operations it was eight:
/// casts, square, mean, add, rsqrt, two products).
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let hidden = *x.size().last().expect("x has a hidden dimension");
    x.rms_norm([hidden], Some(weight), eps)
}
// ANCHOR_END: rms_norm

struct DecoderLayer {
    input_norm: Tensor,
    /// `[q_proj; k_proj; v_proj]` stacked: `[(heads + 2·kv_heads)·head_dim, hidden]`.
    qkv_proj: Tensor,
    o_proj: Tensor,
    post_norm: Tensor,
    /// `[gate_proj; up_proj]` stacked: `[2·intermediate, hidden]`.
    gate_up_proj: Tensor,
    down_proj: Tensor,
}

/// A Llama model on one device, in one dtype.
pub struct Llama {
    config: LlamaConfig,
    device: Device,
    kind: Kind,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    /// Shares storage with `embed_tokens` when the embeddings are tied.
    lm_head: Tensor,
    rope: Rope,
}

impl Llama {
    /// Builds the model from tensors with Hugging Face names (see
    /// [`crate::model::load`]), moving them to `device` as `kind`.
    pub fn new(
        config: LlamaConfig,
        mut tensors: NamedTensors,
        device: Device,
        kind: Kind,
    ) -> Result<Llama, LoadError> {
        check_tensors(std::path::Path::new("<tensors>"), &config, &tensors)?;
        let _no_grad = tch::no_grad_guard();
        let mut take = |name: &str| -> Tensor {
            let t = tensors.remove(name).expect("check_tensors saw every name");
            t.to_device(device).to_kind(kind)
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let [n_in, q, k, v, o, n_post, gate, up, down] = layer_tensor_names(i);
                DecoderLayer {
                    input_norm: take(&n_in),
                    qkv_proj: Tensor::cat(&[take(&q), take(&k), take(&v)], 0),
                    o_proj: take(&o),
                    post_norm: take(&n_post),
                    gate_up_proj: Tensor::cat(&[take(&gate), take(&up)], 0),
                    down_proj: take(&down),
                }
            })
            .collect();
        let embed_tokens = take("model.embed_tokens.weight");
        let norm = take("model.norm.weight");
        let lm_head = if config.tie_word_embeddings {
            embed_tokens.shallow_clone()
        } else {
            take("lm_head.weight")
        };
        let rope = Rope::new(&config, device);
        Ok(Llama {
            config,
            device,
            kind,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
        })
    }

    /// A model of any shape with seeded random weights (normal, std 0.02;
    /// norms at 1): for tests, and for speed runs of shapes whose real
    /// weights are not at hand. The same seed gives the same weights on the
    /// same device.
    pub fn random(config: LlamaConfig, seed: u64, device: Device, kind: Kind) -> Llama {
        // libtorch has one global generator: without the lock, two threads
        // building models at once would interleave their draws.
        static GLOBAL_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _rng = GLOBAL_RNG
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        tch::manual_seed(seed as i64);
        let _no_grad = tch::no_grad_guard();
        let tensors = super::load::expected_shapes(&config)
            .into_iter()
            .map(|(name, shape)| {
                let t = if shape.len() == 1 {
                    Tensor::ones(&shape, (kind, device))
                } else {
                    (Tensor::randn(&shape, (Kind::Float, device)) * 0.02).to_kind(kind)
                };
                (name, t)
            })
            .collect();
        Llama::new(config, tensors, device, kind).expect("random tensors have the expected shapes")
    }

    /// A second model over the same weight storage (no copy): several
    /// engines in one process — module 5's live workers — can share one set
    /// of weights, as threads share a read-only memory map.
    pub fn share_weights(&self) -> Llama {
        let layers = self
            .layers
            .iter()
            .map(|l| DecoderLayer {
                input_norm: l.input_norm.shallow_clone(),
                qkv_proj: l.qkv_proj.shallow_clone(),
                o_proj: l.o_proj.shallow_clone(),
                post_norm: l.post_norm.shallow_clone(),
                gate_up_proj: l.gate_up_proj.shallow_clone(),
                down_proj: l.down_proj.shallow_clone(),
            })
            .collect();
        Llama {
            config: self.config.clone(),
            device: self.device,
            kind: self.kind,
            embed_tokens: self.embed_tokens.shallow_clone(),
            layers,
            norm: self.norm.shallow_clone(),
            lm_head: self.lm_head.shallow_clone(),
            rope: Rope {
                cos: self.rope.cos.shallow_clone(),
                sin: self.rope.sin.shallow_clone(),
            },
        }
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Bytes of weights a decode step reads: every matrix once, plus the
    /// output head. The input embedding is a row lookup, so it only counts
    /// when it doubles as the head. This is the numerator of the
    /// memory-bandwidth roofline.
    pub fn weight_bytes_per_step(&self) -> usize {
        let bytes = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                bytes(&l.input_norm)
                    + bytes(&l.qkv_proj)
                    + bytes(&l.o_proj)
                    + bytes(&l.post_norm)
                    + bytes(&l.gate_up_proj)
                    + bytes(&l.down_proj)
            })
            .sum();
        layers + bytes(&self.norm) + bytes(&self.lm_head)
    }

    /// Runs the decoder over `tokens` (`[batch, new_tokens]`, int64) at
    /// `positions` (same shape) and returns the final hidden states
    /// `[batch, new_tokens, hidden]`. Keys and values go through `cache`.
    // ANCHOR: forward
    pub fn forward(
        &self,
        tokens: &Tensor,
        positions: &Tensor,
        cache: &mut dyn AttentionCache,
    ) -> Tensor {
        let _no_grad = tch::no_grad_guard();
        let c = &self.config;
        let (b, t) = tokens.size2().expect("tokens are [batch, new_tokens]");
        let (heads, kv_heads, head_dim) = (
            c.num_attention_heads as i64,
            c.num_kv_heads() as i64,
            c.head_dim() as i64,
        );
        let inter = c.intermediate_size as i64;
        let (cos, sin) = self.rope.tables(positions, self.kind);

        let mut x = self
            .embed_tokens
            .index_select(0, &tokens.reshape([-1]))
            .reshape([b, t, -1]);
        for (i, layer) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &layer.input_norm, c.rms_norm_eps);
            let qkv = h.linear(&layer.qkv_proj, None::<Tensor>);
            let split = |start: i64, n_heads: i64| {
                qkv.narrow(2, start * head_dim, n_heads * head_dim)
                    .reshape([b, t, n_heads, head_dim])
                    .transpose(1, 2)
            };
            // Queries and keys are rotated together: one set of RoPE kernels, not two.
            let qk = apply_rope(&split(0, heads + kv_heads), &cos, &sin);
            let q = qk.narrow(1, 0, heads);
            let k = qk.narrow(1, heads, kv_heads);
            let v = split(heads + kv_heads, kv_heads);
            let attn =
                cache
                    .attend(i, &q, &k, &v)
                    .transpose(1, 2)
                    .reshape([b, t, heads * head_dim]);
            x += attn.linear(&layer.o_proj, None::<Tensor>);

            let h = rms_norm(&x, &layer.post_norm, c.rms_norm_eps);
            let gate_up = h.linear(&layer.gate_up_proj, None::<Tensor>);
            let act = gate_up.narrow(2, 0, inter).silu() * gate_up.narrow(2, inter, inter);
            x += act.linear(&layer.down_proj, None::<Tensor>);
        }
        rms_norm(&x, &self.norm, c.rms_norm_eps)
    }
    // ANCHOR_END: forward

    /// A 64-bit identity of these weights: the configuration, the dtype and
    /// a sample of the weights themselves (the first rows of the embedding,
    /// the first layer's attention and the final norm). Two processes whose
    /// fingerprints differ must not exchange KV caches: a cache is only
    /// meaningful to the exact model that computed it.
    pub fn fingerprint(&self) -> u64 {
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        hasher.update(&serde_json::to_vec(&self.config).expect("a config serialises"));
        hasher.update(crate::device::kind_name(self.kind).as_bytes());
        let sample = [
            self.embed_tokens.narrow(0, 0, 4),
            self.layers[0].qkv_proj.narrow(0, 0, 4),
            self.norm.shallow_clone(),
        ];
        for tensor in sample {
            let t = tensor
                .to_device(Device::Cpu)
                .to_kind(Kind::Float)
                .contiguous();
            let mut bytes = vec![0u8; t.numel() * 4];
            t.copy_data_u8(&mut bytes, t.numel());
            hasher.update(&bytes);
        }
        hasher.digest()
    }

    /// Output-head projection of hidden states to f32 logits over the vocabulary.
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        let _no_grad = tch::no_grad_guard();
        hidden
            .linear(&self.lm_head, None::<Tensor>)
            .to_kind(Kind::Float)
    }

    /// Convenience: positions `start..start + tokens.len()` for a batch of one.
    pub fn positions(&self, start: i64, len: i64) -> Tensor {
        Tensor::arange_start(start, start + len, (Kind::Int64, self.device)).unsqueeze(0)
    }

    /// Token ids as a `[1, n]` int64 tensor on the model's device.
    pub fn token_tensor(&self, ids: &[u32]) -> Tensor {
        let ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        Tensor::from_slice(&ids).to_device(self.device).unsqueeze(0)
    }
}
