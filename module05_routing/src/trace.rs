//! Request traces: the Mooncake conversation trace, or a synthetic one.
//!
//! A trace line is one request: when it arrived, how long its prompt and
//! answer were, and the chained hash of each 512-token block of its prompt
//! (`hash_ids`). Two requests share a block id only if they share the whole
//! prefix up to that block, so hash ids are exactly what a prefix cache
//! and a KV-aware router see — with the tokens themselves left out.
//!
//! `conversation_trace.jsonl` comes from Mooncake (Kimi's serving
//! platform), published with the FAST '25 paper "Mooncake: Trading More
//! Storage for Less Computation" at github.com/kvcache-ai/Mooncake
//! (`FAST25-release/traces`, Apache-2.0). It has no conversation ids; a
//! request's first two block ids (a system prompt shared by all, then the
//! conversation's opening) stand in for one.

use std::io::BufRead;
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use shared::kv::hash::BlockHash;

/// Tokens per block in the Mooncake trace.
pub const TRACE_BLOCK_TOKENS: usize = 512;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceRequest {
    /// Arrival, in milliseconds from the start of the trace.
    pub timestamp: u64,
    pub input_length: usize,
    pub output_length: usize,
    pub hash_ids: Vec<u64>,
    /// A conversation id, when the trace has one.
    #[serde(default)]
    pub session: Option<u64>,
}

impl TraceRequest {
    pub fn hashes(&self) -> Vec<BlockHash> {
        self.hash_ids.iter().map(|&h| BlockHash(h)).collect()
    }

    /// The conversation this request belongs to (see the module doc).
    pub fn session_key(&self) -> u64 {
        self.session.unwrap_or_else(|| {
            let mut key = Vec::with_capacity(16);
            for id in self.hash_ids.iter().take(2) {
                key.extend_from_slice(&id.to_le_bytes());
            }
            xxhash_rust::xxh3::xxh3_64(&key)
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("cannot read the trace {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}, line {line}: {message} (expected JSON like {{\"timestamp\": 0, \"input_length\": 6758, \"output_length\": 500, \"hash_ids\": [0, 1, 2]}})")]
    Parse {
        path: String,
        line: usize,
        message: String,
    },
    #[error("{path} holds no requests")]
    Empty { path: String },
}

/// Reads a JSON-lines trace; `limit` keeps the first N requests.
pub fn load(path: &Path, limit: Option<usize>) -> Result<Vec<TraceRequest>, TraceError> {
    let name = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| TraceError::Io {
        path: name.clone(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        if limit.is_some_and(|n| out.len() >= n) {
            break;
        }
        let line = line.map_err(|source| TraceError::Io {
            path: name.clone(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let request: TraceRequest = serde_json::from_str(&line).map_err(|e| TraceError::Parse {
            path: name.clone(),
            line: i + 1,
            message: e.to_string(),
        })?;
        out.push(request);
    }
    if out.is_empty() {
        return Err(TraceError::Empty { path: name });
    }
    Ok(out)
}

/// A synthetic multi-turn chat workload.
#[derive(Debug, Clone, Serialize)]
pub struct SyntheticChats {
    pub conversations: usize,
    pub turns: usize,
    /// Blocks of system prompt every conversation shares.
    pub system_blocks: usize,
    /// Blocks each turn adds (the user's message and the previous answer).
    pub blocks_per_turn: usize,
    /// Mean seconds between a conversation's turns (exponential).
    pub think_time_s: f64,
    /// Mean new conversations per second (Poisson).
    pub arrival_rate: f64,
    pub output_length: usize,
    pub seed: u64,
}

impl Default for SyntheticChats {
    fn default() -> Self {
        SyntheticChats {
            conversations: 200,
            turns: 6,
            system_blocks: 2,
            blocks_per_turn: 2,
            think_time_s: 20.0,
            arrival_rate: 2.0,
            output_length: 200,
            seed: 0,
        }
    }
}

impl SyntheticChats {
    /// The requests, sorted by arrival. Turn `t` of a conversation carries
    /// the system prompt, then every earlier turn, then its own blocks.
    pub fn generate(&self) -> Vec<TraceRequest> {
        let mut rng = StdRng::seed_from_u64(self.seed);
        let exp = |rng: &mut StdRng, mean: f64| -mean * (1.0 - rng.random::<f64>()).ln();
        let mut next_id = self.system_blocks as u64;
        let mut requests = Vec::new();
        let mut start = 0.0;
        for c in 0..self.conversations {
            start += exp(&mut rng, 1.0 / self.arrival_rate);
            let mut at = start;
            let mut context: Vec<u64> = (0..self.system_blocks as u64).collect();
            for _ in 0..self.turns {
                for _ in 0..self.blocks_per_turn {
                    context.push(next_id);
                    next_id += 1;
                }
                requests.push(TraceRequest {
                    timestamp: (at * 1000.0) as u64,
                    input_length: context.len() * TRACE_BLOCK_TOKENS,
                    output_length: self.output_length,
                    hash_ids: context.clone(),
                    session: Some(c as u64),
                });
                at += exp(&mut rng, self.think_time_s);
            }
        }
        requests.sort_by_key(|r| r.timestamp);
        requests
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_turns_extend_their_conversation() {
        let chats = SyntheticChats {
            conversations: 3,
            turns: 3,
            ..Default::default()
        };
        let requests = chats.generate();
        assert_eq!(requests.len(), 9);
        assert!(requests
            .windows(2)
            .all(|w| w[0].timestamp <= w[1].timestamp));
        let turns: Vec<_> = requests.iter().filter(|r| r.session == Some(1)).collect();
        assert_eq!(turns.len(), 3);
        for pair in turns.windows(2) {
            assert!(pair[1].hash_ids.starts_with(&pair[0].hash_ids));
            assert_eq!(pair[1].hash_ids.len(), pair[0].hash_ids.len() + 2);
        }
        assert_eq!(&turns[0].hash_ids[..2], &[0, 1]);
        assert_eq!(chats.generate(), requests, "seeded");
    }

    #[test]
    fn bad_lines_say_where_and_what_was_expected() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let path = dir.join("bad.jsonl");
        std::fs::write(&path, "{\"timestamp\": 0, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": [0]}\n{\"timestamp\": \"x\"}\n").unwrap();
        let err = load(&path, None).unwrap_err().to_string();
        assert!(
            err.contains("line 2") && err.contains("expected JSON like"),
            "{err}"
        );
        assert_eq!(load(&path, Some(1)).unwrap().len(), 1);
        let missing = load(&dir.join("nope.jsonl"), None).unwrap_err();
        assert!(missing.to_string().contains("cannot read the trace"));
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(load(&path, None), Err(TraceError::Empty { .. })));
    }
}
