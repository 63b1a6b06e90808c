//! Conditional disaggregation: prefill here, or on a prefill worker?
//!
//! Shipping a prompt's KV to the decode worker costs a transfer and a hop.
//! That pays off when the prefill is long — it would stall every sequence
//! the decode worker is generating for (module 1 measured the stall) — and
//! not when it is short. So, as Dynamo's disaggregated router does, a
//! request is prefilled **remotely** only if
//!
//! * the decode worker is a `decode` worker and some prefill worker exists,
//! * the tokens *left to prefill* — the prompt minus the prefix the chosen
//!   decode worker already caches — reach a threshold, and
//! * the prefill queue is not too long: a prefill worker with a backlog
//!   would add more waiting than local prefill costs.
//!
//! Otherwise the decode worker prefills locally, in its own batch.

use serde::{Deserialize, Serialize};

/// When to prefill remotely.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DisaggPolicy {
    /// Uncached prompt tokens at or above which prefill goes remote.
    pub min_remote_prefill_tokens: usize,
    /// Prefill requests in flight on the least busy prefill worker at or
    /// above which prefill stays local.
    pub max_prefill_queue: usize,
}

impl Default for DisaggPolicy {
    fn default() -> Self {
        DisaggPolicy {
            min_remote_prefill_tokens: 32,
            max_prefill_queue: 8,
        }
    }
}

/// Where one request's prefill runs, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrefillPlace {
    Remote,
    /// The worker is aggregated, or no prefill worker is registered.
    LocalNoPrefillWorker,
    /// Little left to prefill after the cached prefix.
    LocalShortPrompt,
    /// The prefill workers are backed up.
    LocalPrefillQueueFull,
}

impl PrefillPlace {
    pub fn label(self) -> &'static str {
        match self {
            PrefillPlace::Remote => "remote",
            PrefillPlace::LocalNoPrefillWorker => "local_no_prefill_worker",
            PrefillPlace::LocalShortPrompt => "local_short_prompt",
            PrefillPlace::LocalPrefillQueueFull => "local_prefill_queue_full",
        }
    }
}

// ANCHOR: decide
impl DisaggPolicy {
    /// `prompt_tokens` long, `cached_tokens` of it cached on the chosen
    /// decode worker; `prefill_queue` is the least busy prefill worker's
    /// requests in flight, `None` if there is no prefill worker (or the
    /// decode worker is aggregated).
    pub fn decide(
        &self,
        prompt_tokens: usize,
        cached_tokens: usize,
        prefill_queue: Option<usize>,
    ) -> PrefillPlace {
        let Some(queue) = prefill_queue else {
            return PrefillPlace::LocalNoPrefillWorker;
        };
        if prompt_tokens.saturating_sub(cached_tokens) < self.min_remote_prefill_tokens {
            PrefillPlace::LocalShortPrompt
        } else if queue >= self.max_prefill_queue {
            PrefillPlace::LocalPrefillQueueFull
        } else {
            PrefillPlace::Remote
        }
    }
}
// ANCHOR_END: decide

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_uncached_prompts_go_remote_and_the_rest_stay() {
        let p = DisaggPolicy {
            min_remote_prefill_tokens: 100,
            max_prefill_queue: 2,
        };
        assert_eq!(p.decide(500, 0, Some(0)), PrefillPlace::Remote);
        assert_eq!(p.decide(500, 0, None), PrefillPlace::LocalNoPrefillWorker);
        assert_eq!(p.decide(99, 0, Some(0)), PrefillPlace::LocalShortPrompt);
        // Long, but mostly cached on the decode worker: local.
        assert_eq!(p.decide(500, 448, Some(0)), PrefillPlace::LocalShortPrompt);
        assert_eq!(
            p.decide(500, 0, Some(2)),
            PrefillPlace::LocalPrefillQueueFull
        );
    }
}
