//! How big the KV cache gets: per token, per sequence, per batch, for four
//! real model shapes — and how many sequences fit on a GPU once the weights
//! are loaded.
//!
//! Everything here is arithmetic on the model configuration:
//!
//! ```text
//! KV bytes per token = 2 (K and V) · layers · kv_heads · head_dim · bytes per element
//! ```
//!
//! Grouped-query attention (GQA) is what keeps this affordable: Llama-3-8B
//! has 32 query heads but only 8 KV heads, so its cache is 4× smaller than
//! full multi-head attention (MHA) would need. [`crate::anatomy`] checks
//! the formula against the cache the engine really produces.

use std::path::Path;

use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use shared::model::config::LlamaConfig;

use crate::formats::KvFormat;

const GIB: f64 = (1u64 << 30) as f64;

/// Per-token facts about one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelKv {
    pub model: String,
    pub layers: usize,
    pub attention_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub weight_bytes_bf16: f64,
    /// What full multi-head attention would need per token, in bf16.
    pub mha_bytes_per_token_bf16: f64,
    /// Bytes per token in each format, in [`KvFormat::ALL`] order.
    pub bytes_per_token: Vec<f64>,
}

impl ModelKv {
    pub fn new(name: &str, config: &LlamaConfig) -> ModelKv {
        let per_token = |heads: usize, format: KvFormat| {
            2.0 * config.num_hidden_layers as f64
                * heads as f64
                * config.head_dim() as f64
                * format.bytes_per_element(config.head_dim())
        };
        ModelKv {
            model: name.to_string(),
            layers: config.num_hidden_layers,
            attention_heads: config.num_attention_heads,
            kv_heads: config.num_kv_heads(),
            head_dim: config.head_dim(),
            weight_bytes_bf16: 2.0 * config.num_parameters() as f64,
            mha_bytes_per_token_bf16: per_token(config.num_attention_heads, KvFormat::Bf16),
            bytes_per_token: KvFormat::ALL
                .iter()
                .map(|&f| per_token(config.num_kv_heads(), f))
                .collect(),
        }
    }

    pub fn bytes_per_token(&self, format: KvFormat) -> f64 {
        let index = KvFormat::ALL
            .iter()
            .position(|&f| f == format)
            .expect("listed");
        self.bytes_per_token[index]
    }
}

/// The whole scaling study.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScalingReport {
    pub models: Vec<ModelKv>,
    pub seq_lens: Vec<usize>,
    pub batches: Vec<usize>,
    /// Memory of the GPU the fit table assumes.
    pub gpu_memory_gib: f64,
    /// Fraction of it an engine may use (vLLM's `gpu_memory_utilization`).
    pub utilization: f64,
}

impl ScalingReport {
    /// The four presets, at 1k…128k tokens, batches 1 and 64, on an 80 GiB GPU.
    pub fn presets(gpu_memory_gib: f64) -> ScalingReport {
        ScalingReport {
            models: LlamaConfig::PRESET_NAMES
                .iter()
                .map(|&name| ModelKv::new(name, &LlamaConfig::preset(name).expect("preset")))
                .collect(),
            seq_lens: vec![1024, 4096, 32768, 131072],
            batches: vec![1, 64],
            gpu_memory_gib,
            utilization: 0.9,
        }
    }

    /// Bytes an engine has for KV after the bf16 weights, or `None` when the
    /// weights alone do not fit.
    pub fn kv_budget_bytes(&self, model: &ModelKv) -> Option<f64> {
        let usable = self.gpu_memory_gib * GIB * self.utilization;
        let free = usable - model.weight_bytes_bf16;
        (free > 0.0).then_some(free)
    }

    /// How many sequences of `seq_len` tokens fit at once.
    pub fn concurrent_sequences(
        &self,
        model: &ModelKv,
        format: KvFormat,
        seq_len: usize,
    ) -> Option<u64> {
        self.kv_budget_bytes(model)
            .map(|budget| (budget / (model.bytes_per_token(format) * seq_len as f64)) as u64)
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("KV cache per token (all layers, K and V)\n");
        out.push_str(&format!(
            "{:<15} {:>6} {:>10} {:>10} {:>11} {:>11} {:>11} {:>11}\n",
            "model", "layers", "q/kv heads", "head dim", "MHA bf16", "bf16", "fp8", "int8"
        ));
        for m in &self.models {
            out.push_str(&format!(
                "{:<15} {:>6} {:>10} {:>10} {:>11} {:>11} {:>11} {:>11}\n",
                m.model,
                m.layers,
                format!("{}/{}", m.attention_heads, m.kv_heads),
                m.head_dim,
                kib(m.mha_bytes_per_token_bf16),
                kib(m.bytes_per_token(KvFormat::Bf16)),
                kib(m.bytes_per_token(KvFormat::Fp8)),
                kib(m.bytes_per_token(KvFormat::Int8)),
            ));
        }

        out.push_str("\nKV cache for a batch of sequences (GiB)\n");
        out.push_str(&format!("{:<15} {:<5} {:>5}", "model", "dtype", "batch"));
        for &len in &self.seq_lens {
            out.push_str(&format!(" {:>10}", format!("{}k tok", len / 1024)));
        }
        out.push('\n');
        for m in &self.models {
            for format in KvFormat::ALL {
                for &batch in &self.batches {
                    out.push_str(&format!(
                        "{:<15} {:<5} {:>5}",
                        m.model,
                        format.name(),
                        batch
                    ));
                    for &len in &self.seq_lens {
                        let bytes = m.bytes_per_token(format) * (len * batch) as f64;
                        out.push_str(&format!(" {:>10}", gib(bytes)));
                    }
                    out.push('\n');
                }
            }
        }

        out.push_str(&format!(
            "\nSequences that fit at once on a {:.0} GiB GPU ({:.0}% usable, weights in bf16)\n",
            self.gpu_memory_gib,
            self.utilization * 100.0
        ));
        out.push_str(&format!(
            "{:<15} {:>9} {:>9}",
            "model", "weights", "KV room"
        ));
        for &len in &self.seq_lens {
            for format in KvFormat::ALL {
                out.push_str(&format!(
                    " {:>9}",
                    format!("{}k {}", len / 1024, format.name())
                ));
            }
        }
        out.push('\n');
        for m in &self.models {
            out.push_str(&format!("{:<15} {:>9}", m.model, gib(m.weight_bytes_bf16)));
            match self.kv_budget_bytes(m) {
                None => out.push_str(&format!(
                    " {:>9}  the weights alone do not fit: shard the model over several GPUs\n",
                    "-"
                )),
                Some(budget) => {
                    out.push_str(&format!(" {:>9}", gib(budget)));
                    for &len in &self.seq_lens {
                        for format in KvFormat::ALL {
                            let n = self.concurrent_sequences(m, format, len).unwrap_or(0);
                            out.push_str(&format!(" {n:>9}"));
                        }
                    }
                    out.push('\n');
                }
            }
        }
        out
    }

    /// KV GiB against sequence length (batch 1, bf16), log-log, one line per
    /// model, with the GPU's memory for scale.
    pub fn write_svg(&self, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let root = SVGBackend::new(path, (760, 460)).into_drawing_area();
        root.fill(&WHITE)?;
        let min_len = *self.seq_lens.first().unwrap_or(&1024) as f64 / 2.0;
        let max_len = *self.seq_lens.last().unwrap_or(&131072) as f64 * 2.0;
        let mut chart = ChartBuilder::on(&root)
            .caption("KV cache of one sequence (bf16)", ("sans-serif", 20))
            .margin(14)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(
                (min_len..max_len).log_scale(),
                (0.001f64..self.gpu_memory_gib * 4.0).log_scale(),
            )?;
        chart
            .configure_mesh()
            .x_desc("sequence length (tokens)")
            .y_desc("GiB")
            .x_label_formatter(&|x| format!("{:.0}k", x / 1000.0))
            .y_label_formatter(&|y| format!("{y}"))
            .draw()?;
        let palette = [BLUE, RED, GREEN, MAGENTA];
        let lens: Vec<f64> = (0..=16)
            .map(|i| min_len * 2f64.powf(i as f64 * (max_len / min_len).log2() / 16.0))
            .collect();
        for (m, color) in self.models.iter().zip(palette.iter().cycle()) {
            let per_token = m.bytes_per_token(KvFormat::Bf16);
            let points: Vec<(f64, f64)> = lens.iter().map(|&l| (l, per_token * l / GIB)).collect();
            let color = *color;
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))?
                .label(format!("{} ({}/token)", m.model, kib(per_token)))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        let gpu = self.gpu_memory_gib;
        chart
            .draw_series(LineSeries::new(
                vec![(min_len, gpu), (max_len, gpu)],
                BLACK.stroke_width(1),
            ))?
            .label(format!("{gpu:.0} GiB GPU"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    }
}

fn kib(bytes: f64) -> String {
    format!("{:.1} KiB", bytes / 1024.0)
}

fn gib(bytes: f64) -> String {
    if bytes >= 100.0 * GIB {
        format!("{:.0}", bytes / GIB)
    } else if bytes >= GIB {
        format!("{:.1}", bytes / GIB)
    } else {
        format!("{:.3}", bytes / GIB)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gqa_shrinks_llama3_8b_fourfold() {
        let m = ModelKv::new("llama3-8b", &LlamaConfig::llama3_8b());
        // 2 · 32 layers · 8 KV heads · 128 · 2 bytes = 128 KiB per token.
        assert_eq!(m.bytes_per_token(KvFormat::Bf16), 131072.0);
        assert_eq!(
            m.mha_bytes_per_token_bf16 / m.bytes_per_token(KvFormat::Bf16),
            4.0
        );
        // int8 halves it, plus one f32 scale per 16 tokens × 128 values.
        let int8 = m.bytes_per_token(KvFormat::Int8);
        assert!((int8 / 65536.0 - (1.0 + 4.0 / 2048.0)).abs() < 1e-12);
    }

    #[test]
    fn llama3_70b_weights_do_not_fit_one_80gib_gpu() {
        let report = ScalingReport::presets(80.0);
        let big = report
            .models
            .iter()
            .find(|m| m.model == "llama3-70b")
            .unwrap();
        assert!(report.kv_budget_bytes(big).is_none());
        let small = report
            .models
            .iter()
            .find(|m| m.model == "smollm2-135m")
            .unwrap();
        let bf16 = report
            .concurrent_sequences(small, KvFormat::Bf16, 4096)
            .unwrap();
        let int8 = report
            .concurrent_sequences(small, KvFormat::Int8, 4096)
            .unwrap();
        assert!(int8 > bf16 * 19 / 10 && int8 <= bf16 * 2);
    }
}
