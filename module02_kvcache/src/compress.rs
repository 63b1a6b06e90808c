//! Compressing the KV cache: what quantization saves, and what it breaks.
//!
//! Quantization stores each number in fewer bits plus a shared **scale**:
//! `x ≈ q · scale`, with `q` a small integer (int8: −127…127) or an 8-bit
//! float (fp8 e4m3: up to ±448). The scale is chosen so the largest value
//! in its group maps to the largest `q`, which makes the grouping the whole
//! story: one outlier in a group coarsens every other value sharing its
//! scale. Keys have such outliers (a few channels much larger than the
//! rest), values mostly do not.
//!
//! Schemes here group per **block** (16 tokens × head_dim values, for one
//! layer, K or V, and KV head — the unit the paged cache already moves) or
//! per **layer** (one scale for a layer's whole K or V, to show why that is
//! too coarse), at 8, 4 and 2 bits.
//!
//! The honest test is not the reconstruction error but what the model does
//! with the damaged cache: the prompt's KV is compressed as it would be for
//! the wire, the model decodes from it, and its logits and greedy tokens are
//! compared with decoding from the exact cache.

use serde::{Deserialize, Serialize};
use shared::model::llama::{DenseKvCache, Llama};
use tch::{Kind, Tensor};

/// A way of storing the prompt's K and V.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Scheme {
    /// A plain cast to bf16 (no scales).
    Bf16,
    Fp8Block,
    Int8Block,
    Int8Layer,
    Int4Block,
    Int2Block,
}

enum Grouping {
    Block,
    Layer,
}

impl Scheme {
    pub const ALL: [Scheme; 6] = [
        Scheme::Bf16,
        Scheme::Fp8Block,
        Scheme::Int8Block,
        Scheme::Int8Layer,
        Scheme::Int4Block,
        Scheme::Int2Block,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scheme::Bf16 => "bf16 cast",
            Scheme::Fp8Block => "fp8 e4m3 / block",
            Scheme::Int8Block => "int8 / block",
            Scheme::Int8Layer => "int8 / layer",
            Scheme::Int4Block => "int4 / block",
            Scheme::Int2Block => "int2 / block",
        }
    }

    pub fn bits(self) -> usize {
        match self {
            Scheme::Bf16 => 16,
            Scheme::Fp8Block | Scheme::Int8Block | Scheme::Int8Layer => 8,
            Scheme::Int4Block => 4,
            Scheme::Int2Block => 2,
        }
    }

    /// Largest representable magnitude of `q`.
    fn q_max(self) -> f64 {
        match self {
            Scheme::Bf16 => f64::INFINITY,
            Scheme::Fp8Block => 448.0,
            Scheme::Int8Block | Scheme::Int8Layer => 127.0,
            Scheme::Int4Block => 7.0,
            Scheme::Int2Block => 1.0,
        }
    }

    fn grouping(self) -> Grouping {
        match self {
            Scheme::Int8Layer => Grouping::Layer,
            _ => Grouping::Block,
        }
    }
}

/// A quantized KV cache: values plus scales, and what it would weigh on the wire.
pub struct QuantizedKv {
    pub scheme: Scheme,
    /// `[layers, 2, blocks, block_size, kv_heads, head_dim]` (tokens padded to whole blocks).
    values: Tensor,
    /// One f32 per group, broadcastable against `values`; `None` for a cast.
    scales: Option<Tensor>,
    tokens: i64,
}

impl QuantizedKv {
    /// Bytes of the compressed form: values at `bits` each (packed, as a
    /// wire format would; int4 and int2 are held unpacked in memory here),
    /// plus the scales, for the real tokens only.
    pub fn wire_bytes(&self) -> usize {
        let s = self.values.size();
        let elements = (s[0] * s[1] * self.tokens * s[4] * s[5]) as usize;
        let scales = self.scales.as_ref().map_or(0, |t| t.numel() * 4);
        (elements * self.scheme.bits()).div_ceil(8) + scales
    }
}

/// Quantizes `kv` (`[layers, 2, tokens, kv_heads, head_dim]`) with `scheme`.
pub fn quantize(kv: &Tensor, scheme: Scheme, block_size: i64) -> QuantizedKv {
    let _no_grad = tch::no_grad_guard();
    let s = kv.size();
    let (layers, tokens, heads, dim) = (s[0], s[2], s[3], s[4]);
    let blocks = (tokens + block_size - 1) / block_size;
    let x = kv.to_kind(Kind::Float);
    let pad = blocks * block_size - tokens;
    let x = if pad > 0 {
        Tensor::cat(&[x.shallow_clone(), x.zeros_like().narrow(2, 0, pad)], 2)
    } else {
        x
    }
    .reshape([layers, 2, blocks, block_size, heads, dim]);

    if scheme == Scheme::Bf16 {
        return QuantizedKv {
            scheme,
            values: x.to_kind(Kind::BFloat16),
            scales: None,
            tokens,
        };
    }
    // ANCHOR: quantize
    let reduce: &[i64] = match scheme.grouping() {
        Grouping::Block => &[3, 5],
        Grouping::Layer => &[2, 3, 4, 5],
    };
    let amax = x.abs().amax(reduce, true);
    let scales = (amax / scheme.q_max()).clamp_min(1e-12);
    let scaled = &x / &scales;
    let values = match scheme {
        Scheme::Fp8Block => scaled.to_kind(Kind::Float8e4m3fn),
        _ => scaled
            .round()
            .clamp(-scheme.q_max(), scheme.q_max())
            .to_kind(Kind::Int8),
    };
    // ANCHOR_END: quantize
    QuantizedKv {
        scheme,
        values,
        scales: Some(scales),
        tokens,
    }
}

/// Back to `[layers, 2, tokens, kv_heads, head_dim]` in `kind`.
pub fn dequantize(q: &QuantizedKv, kind: Kind) -> Tensor {
    let _no_grad = tch::no_grad_guard();
    let x = q.values.to_kind(Kind::Float);
    let x = match &q.scales {
        Some(scales) => x * scales,
        None => x,
    };
    let s = x.size();
    x.reshape([s[0], s[1], s[2] * s[3], s[4], s[5]])
        .narrow(2, 0, q.tokens)
        .to_kind(kind)
}

/// ‖a − b‖ / ‖b‖ for K (`which = 0`) or V (`which = 1`).
fn relative_error(approx: &Tensor, exact: &Tensor, which: i64) -> f64 {
    let a = approx.select(1, which).to_kind(Kind::Float);
    let e = exact.select(1, which).to_kind(Kind::Float);
    (a - &e).norm().double_value(&[]) / e.norm().double_value(&[])
}

/// What one scheme did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchemeResult {
    pub scheme: Scheme,
    pub bits: usize,
    pub bytes: usize,
    /// Relative reconstruction error of K and of V.
    pub k_error: f64,
    pub v_error: f64,
    /// Largest |logit difference| over all steps, teacher-forced.
    pub max_logit_diff: f64,
    /// Steps whose top-1 token matched the exact cache's, teacher-forced.
    pub top1_matches: usize,
    /// Greedy tokens, decoding freely, identical to the exact run before the first difference.
    pub greedy_prefix_matches: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompressReport {
    pub prompt_tokens: usize,
    pub dtype: String,
    pub original_bytes: usize,
    pub steps: usize,
    pub results: Vec<SchemeResult>,
}

/// A dense cache holding `kv` (`[layers, 2, tokens, kv_heads, head_dim]`), batch 1.
fn dense_cache(kv: &Tensor) -> DenseKvCache {
    let layers = kv.size()[0] as usize;
    let mut cache = DenseKvCache::new(layers);
    for l in 0..layers {
        let layer = kv.get(l as i64);
        let k = layer.get(0).permute([1, 0, 2]).unsqueeze(0).contiguous();
        let v = layer.get(1).permute([1, 0, 2]).unsqueeze(0).contiguous();
        cache.set_layer(l, k, v);
    }
    cache
}

/// One decode step: feeds `token` at `position`, returns the f32 logits `[vocab]`.
fn step(model: &Llama, cache: &mut DenseKvCache, token: u32, position: i64) -> Tensor {
    let hidden = model.forward(
        &model.token_tensor(&[token]),
        &model.positions(position, 1),
        cache,
    );
    model.logits(&hidden).reshape([-1])
}

/// Decodes `steps` tokens after the prompt from the exact `kv` and from each
/// scheme's reconstruction of it, and compares. `first_token` is what the
/// prefill chose; only the prompt's cache is compressed (as it would be for
/// transfer), tokens decoded afterwards are cached exactly.
pub fn evaluate(
    model: &Llama,
    kv: &Tensor,
    first_token: u32,
    steps: usize,
    block_size: i64,
    schemes: &[Scheme],
) -> CompressReport {
    let prompt_tokens = kv.size()[2];
    let kind = kv.kind();

    let mut cache = dense_cache(kv);
    let (mut reference_logits, mut reference_tokens) = (Vec::new(), Vec::new());
    let mut token = first_token;
    for i in 0..steps {
        let logits = step(model, &mut cache, token, prompt_tokens + i as i64);
        token = logits.argmax(0, false).int64_value(&[]) as u32;
        reference_logits.push(logits);
        reference_tokens.push(token);
    }

    let results = schemes
        .iter()
        .map(|&scheme| {
            let q = quantize(kv, scheme, block_size);
            let approx = dequantize(&q, kind);

            let mut cache = dense_cache(&approx);
            let (mut max_logit_diff, mut top1_matches) = (0.0f64, 0);
            let mut fed = first_token;
            for i in 0..steps {
                let logits = step(model, &mut cache, fed, prompt_tokens + i as i64);
                let diff = (&logits - &reference_logits[i])
                    .abs()
                    .max()
                    .double_value(&[]);
                max_logit_diff = max_logit_diff.max(diff);
                if logits.argmax(0, false).int64_value(&[]) as u32 == reference_tokens[i] {
                    top1_matches += 1;
                }
                fed = reference_tokens[i];
            }

            let mut cache = dense_cache(&approx);
            let mut greedy_prefix_matches = 0;
            let mut token = first_token;
            for (i, &expected) in reference_tokens.iter().enumerate() {
                let logits = step(model, &mut cache, token, prompt_tokens + i as i64);
                token = logits.argmax(0, false).int64_value(&[]) as u32;
                if token != expected {
                    break;
                }
                greedy_prefix_matches += 1;
            }

            SchemeResult {
                scheme,
                bits: scheme.bits(),
                bytes: q.wire_bytes(),
                k_error: relative_error(&approx, kv, 0),
                v_error: relative_error(&approx, kv, 1),
                max_logit_diff,
                top1_matches,
                greedy_prefix_matches,
            }
        })
        .collect();

    CompressReport {
        prompt_tokens: prompt_tokens as usize,
        dtype: shared::device::kind_name(kind).to_string(),
        original_bytes: kv.numel() * kind.elt_size_in_bytes(),
        steps,
        results,
    }
}

/// Two significant figures, so a snapshot does not depend on the last bits
/// of floating-point arithmetic.
fn sig2(x: f64) -> String {
    if x == 0.0 {
        return "0".into();
    }
    format!("{x:.1e}")
}

impl CompressReport {
    /// The trade-off table. `redact` hides what the model did with the
    /// cache (logits, agreement), which can flip on a near-tie when another
    /// CPU rounds a matmul differently; sizes and reconstruction errors stay.
    pub fn render(&self, redact: bool) -> String {
        let mut out = format!(
            "prompt: {} tokens, KV in {} = {:.2} MiB; {} decode steps compared\n",
            self.prompt_tokens,
            self.dtype,
            self.original_bytes as f64 / (1u64 << 20) as f64,
            self.steps
        );
        out.push_str(&format!(
            "{:<17} {:>4} {:>10} {:>7} {:>9} {:>9} {:>10} {:>9} {:>10}\n",
            "scheme",
            "bits",
            "KiB",
            "smaller",
            "K error",
            "V error",
            "max Δlogit",
            "top-1",
            "greedy ="
        ));
        for r in &self.results {
            let hide = |s: String| if redact { "·".to_string() } else { s };
            out.push_str(&format!(
                "{:<17} {:>4} {:>10.1} {:>6.2}x {:>9} {:>9} {:>10} {:>9} {:>10}\n",
                r.scheme.name(),
                r.bits,
                r.bytes as f64 / 1024.0,
                self.original_bytes as f64 / r.bytes as f64,
                sig2(r.k_error),
                sig2(r.v_error),
                hide(sig2(r.max_logit_diff)),
                hide(format!("{}/{}", r.top1_matches, self.steps)),
                hide(format!("{}/{}", r.greedy_prefix_matches, self.steps)),
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn sample_kv() -> Tensor {
        tch::manual_seed(7);
        Tensor::randn([2, 2, 37, 3, 16], (Kind::Float, Device::Cpu))
    }

    #[test]
    fn round_trip_keeps_shape_and_error_shrinks_with_bits() {
        let kv = sample_kv();
        let errors: Vec<f64> = [Scheme::Int2Block, Scheme::Int4Block, Scheme::Int8Block]
            .iter()
            .map(|&s| {
                let back = dequantize(&quantize(&kv, s, 16), Kind::Float);
                assert_eq!(back.size(), kv.size());
                relative_error(&back, &kv, 0)
            })
            .collect();
        assert!(errors[0] > errors[1] && errors[1] > errors[2], "{errors:?}");
        assert!(
            errors[2] < 0.02,
            "int8 per block on Gaussian data: {}",
            errors[2]
        );
    }

    #[test]
    fn one_outlier_ruins_a_per_layer_scale_but_not_per_block() {
        let kv = sample_kv();
        let _ = kv.get(0).get(0).get(5).get(1).get(3).fill_(1000.0);
        let block = dequantize(&quantize(&kv, Scheme::Int8Block, 16), Kind::Float);
        let layer = dequantize(&quantize(&kv, Scheme::Int8Layer, 16), Kind::Float);
        // Compare away from the outlier's own block: layer 1 is untouched by it.
        let e_block = relative_error(
            &block.narrow(0, 0, 1).narrow(2, 16, 21),
            &kv.narrow(0, 0, 1).narrow(2, 16, 21),
            0,
        );
        let e_layer = relative_error(
            &layer.narrow(0, 0, 1).narrow(2, 16, 21),
            &kv.narrow(0, 0, 1).narrow(2, 16, 21),
            0,
        );
        assert!(
            e_layer > 10.0 * e_block,
            "layer {e_layer} vs block {e_block}"
        );
    }

    #[test]
    fn wire_bytes_count_packed_bits_and_scales() {
        let kv = sample_kv(); // 2 layers · 2 · 37 tokens · 3 heads · 16 dims
        let elements = 2 * 2 * 37 * 3 * 16;
        let blocks = 3; // 37 tokens in blocks of 16
        let scales = 2 * 2 * blocks * 3;
        assert_eq!(
            quantize(&kv, Scheme::Int8Block, 16).wire_bytes(),
            elements + 4 * scales
        );
        assert_eq!(
            quantize(&kv, Scheme::Int4Block, 16).wire_bytes(),
            elements / 2 + 4 * scales
        );
        assert_eq!(
            quantize(&kv, Scheme::Int8Layer, 16).wire_bytes(),
            elements + 4 * 4
        );
        assert_eq!(quantize(&kv, Scheme::Bf16, 16).wire_bytes(), elements * 2);
    }

    #[test]
    fn fp8_round_trips_within_its_precision() {
        let kv = sample_kv();
        let back = dequantize(&quantize(&kv, Scheme::Fp8Block, 16), Kind::Float);
        // e4m3 keeps 3 mantissa bits: relative error per value ≤ 2^-4.
        let e = relative_error(&back, &kv, 1);
        assert!(e > 0.0 && e < 0.0625, "{e}");
    }
}
