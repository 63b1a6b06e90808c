//! Choosing the next token from the logits.
//!
//! * **Greedy** (`temperature == 0`): the arg-max. Deterministic, which is
//!   what every correctness test in the project relies on.
//! * **Sampled**: softmax of `logits / temperature`, cut to the smallest set
//!   of tokens whose probabilities add up to `top_p` (nucleus sampling), and
//!   one draw from a seeded generator — the same seed gives the same text on
//!   any machine, because the draw happens on the CPU.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// What the caller asks of one generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f64,
    /// Nucleus cut-off in (0, 1]; 1 keeps every token.
    pub top_p: f64,
    pub seed: u64,
    /// Tokens to generate at most (the first token counts).
    pub max_tokens: usize,
    /// Keep going past end-of-sequence tokens (benchmarks want fixed lengths).
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            max_tokens: 16,
            ignore_eos: false,
        }
    }
}

impl SamplingParams {
    pub fn greedy(max_tokens: usize) -> Self {
        SamplingParams {
            max_tokens,
            ..Default::default()
        }
    }

    /// Greedy, exactly `max_tokens` tokens whatever the model says (EOS is
    /// ignored): what benchmarks and length-sensitive tests want.
    pub fn fixed_length(max_tokens: usize) -> Self {
        SamplingParams {
            ignore_eos: true,
            ..Self::greedy(max_tokens)
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// Checks the ranges, with a message for the user.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "temperature must be 0 or more, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if self.max_tokens == 0 {
            return Err("max_tokens must be at least 1".into());
        }
        Ok(())
    }
}

/// A per-sequence sampler holding its own random generator.
pub struct Sampler {
    temperature: f64,
    top_p: f64,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: &SamplingParams) -> Self {
        Sampler {
            temperature: params.temperature,
            top_p: params.top_p,
            rng: StdRng::seed_from_u64(params.seed),
        }
    }

    /// Picks a token from `logits` (`[vocab]`, any device).
    pub fn sample(&mut self, logits: &Tensor) -> u32 {
        if self.temperature <= 0.0 {
            return logits.argmax(-1, false).int64_value(&[]) as u32;
        }
        let probs = (logits.to_kind(Kind::Float) / self.temperature)
            .softmax(-1, Kind::Float)
            .to_device(tch::Device::Cpu);
        let probs: Vec<f32> = Vec::try_from(&probs).expect("probabilities are f32");
        self.pick(&probs)
    }

    /// Nucleus draw from a probability vector.
    fn pick(&mut self, probs: &[f32]) -> u32 {
        let mut order: Vec<u32> = (0..probs.len() as u32).collect();
        order.sort_unstable_by(|&a, &b| probs[b as usize].total_cmp(&probs[a as usize]));
        let mut kept = 0;
        let mut mass = 0.0f64;
        for &id in &order {
            mass += probs[id as usize] as f64;
            kept += 1;
            if mass >= self.top_p {
                break;
            }
        }
        let mut target = self.rng.random::<f64>() * mass;
        for &id in &order[..kept] {
            target -= probs[id as usize] as f64;
            if target <= 0.0 {
                return id;
            }
        }
        order[kept - 1]
    }
}

/// Greedy choice for a whole batch in one device call: `[batch, vocab]` → ids.
pub fn argmax_batch(logits: &Tensor) -> Vec<u32> {
    let ids: Vec<i64> = Vec::try_from(&logits.argmax(-1, false).to_device(tch::Device::Cpu))
        .expect("argmax gives int64");
    ids.into_iter().map(|i| i as u32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_arg_max() {
        let logits = Tensor::from_slice(&[0.1f32, 3.0, -1.0, 2.9]);
        assert_eq!(Sampler::new(&SamplingParams::greedy(1)).sample(&logits), 1);
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            ..Default::default()
        };
        let mut sampler = Sampler::new(&params);
        // Token 2 alone holds 60% of the mass, so a 0.5 nucleus is just {2}.
        let probs = [0.1f32, 0.2, 0.6, 0.1];
        assert!((0..200).all(|_| sampler.pick(&probs) == 2));
    }

    #[test]
    fn same_seed_same_draws_and_all_tokens_reachable() {
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            seed: 7,
            ..Default::default()
        };
        let probs = [0.25f32; 4];
        let draws = |p: &SamplingParams| {
            let mut s = Sampler::new(p);
            (0..64).map(|_| s.pick(&probs)).collect::<Vec<_>>()
        };
        let a = draws(&params);
        assert_eq!(a, draws(&params));
        assert!((0..4).all(|id| a.contains(&id)), "{a:?}");
        assert_ne!(
            a,
            draws(&SamplingParams {
                seed: 8,
                ..params.clone()
            })
        );
    }

    #[test]
    fn validate_rejects_out_of_range() {
        assert!(SamplingParams {
            top_p: 0.0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            temperature: -1.0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            max_tokens: 0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(SamplingParams::default().validate().is_ok());
    }
}
