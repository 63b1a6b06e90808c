//! Live evaluation: real engines behind the router, real conversations.
//!
//! For each policy, a fresh set of `workers` engines (module 3's decode
//! server, each with its own paged KV pool and prefix cache, all sharing one
//! copy of the weights) starts in this process, listens on loopback and
//! registers in etcd. A [`Router`] watches that registry, follows every
//! worker's KV event stream, and routes each turn of `sessions` multi-turn
//! conversations. Conversations run `concurrency` at a time; turns of one
//! conversation run in order, each resending the whole history.
//!
//! Two hit rates are reported, because they can differ: what the router's
//! index *predicted* the chosen worker held, and what the worker's prefix
//! cache *actually* reused (`cached_prompt_tokens`, counted by the engine).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shared::engine::sampling::SamplingParams;
use shared::engine::EngineConfig;
use shared::kv::hash::BlockHash;
use shared::model::llama::Llama;
use shared::model::tokenizer::Tokenizer;
use shared::stats::percentile;
use shared::wire::{Prompt, TransferMode};
use shared::worker_client::{GenerateRequest, WorkerReply, WorkerStream};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::chats::{chat_scripts, ChatScript, Conversation};
use crate::policy;
use crate::registry::{Registration, Registry, Role, WorkerInfo};
use crate::router::Router;

/// What a live run does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LiveConfig {
    pub workers: usize,
    pub sessions: usize,
    pub turns: usize,
    /// Tokens generated per turn (end-of-sequence ignored, so every policy
    /// does the same work).
    pub max_tokens: usize,
    /// Conversations in flight at once.
    pub concurrency: usize,
    /// KV pool per worker, in blocks (small enough that caches must choose).
    pub kv_blocks: usize,
    pub overlap_weight: f64,
    pub seed: u64,
}

impl Default for LiveConfig {
    fn default() -> Self {
        LiveConfig {
            workers: 3,
            sessions: 16,
            turns: 4,
            max_tokens: 12,
            concurrency: 5,
            kv_blocks: 128,
            overlap_weight: 1.0,
            seed: 0,
        }
    }
}

/// One turn as measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TurnRecord {
    pub session: u64,
    pub turn: usize,
    pub worker: String,
    pub prompt_tokens: usize,
    /// Prompt tokens the worker's prefix cache reused.
    pub cached_tokens: usize,
    /// Prompt tokens the router's index said the worker held.
    pub predicted_tokens: usize,
    /// When it was sent, from the start of the policy's run.
    pub sent_s: f64,
    pub ttft_s: f64,
    pub e2e_s: f64,
    /// The prompt's block hashes (for the oracle; not written out)…
    #[serde(skip)]
    pub hashes: Vec<BlockHash>,
    /// …and those of the prompt followed by the reply, which the worker's
    /// cache holds afterwards.
    #[serde(skip)]
    pub hashes_after: Vec<BlockHash>,
}

/// One policy's results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LivePolicyResult {
    pub policy: String,
    pub requests: usize,
    /// Reused prompt tokens / prompt tokens, as the engines counted them.
    pub hit_rate: f64,
    /// The same, as the router's index predicted at routing time.
    pub predicted_hit_rate: f64,
    /// Reused / prompt tokens for one worker with an infinite cache that
    /// saw every earlier prompt (an upper bound for any policy).
    pub oracle_hit_rate: f64,
    pub ttft_mean_s: f64,
    pub ttft_p50_s: f64,
    pub ttft_p99_s: f64,
    /// Later turns (2+) with at least half their prompt reused…
    pub ttft_hit_mean_s: Option<f64>,
    pub hits: usize,
    /// …and those with less.
    pub ttft_miss_mean_s: Option<f64>,
    pub misses: usize,
    pub e2e_p50_s: f64,
    /// Requests on the busiest worker / mean requests per worker.
    pub max_mean_load: f64,
    pub wall_s: f64,
    pub turns: Vec<TurnRecord>,
}

/// Workers running in this process, registered in etcd until dropped.
pub struct LiveWorkers {
    tasks: Vec<tokio::task::JoinHandle<std::io::Result<()>>>,
    registrations: Vec<Registration>,
}

impl LiveWorkers {
    /// Starts `n` aggregated workers sharing `model`'s weights, each with a
    /// pool of `kv_blocks` blocks, and registers them under `registry`.
    pub async fn start(
        model: &Llama,
        tokenizer: &Tokenizer,
        registry: &Registry,
        n: usize,
        kv_blocks: usize,
        name_prefix: &str,
    ) -> anyhow::Result<LiveWorkers> {
        let mut workers = LiveWorkers {
            tasks: Vec::new(),
            registrations: Vec::new(),
        };
        for i in 0..n {
            let shared_model = model.share_weights();
            let mut config = EngineConfig::with_kv_budget(&shared_model, 0);
            config.num_blocks = kv_blocks;
            let server =
                module03_tcp::decode::DecodeServer::new(shared_model, tokenizer.clone(), config)?;
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let address = listener.local_addr()?.to_string();
            workers.tasks.push(tokio::spawn(server.serve(listener)));
            let info = WorkerInfo {
                name: format!("{name_prefix}-{i}"),
                address,
                role: Role::Aggregated,
                capacity_blocks: kv_blocks,
            };
            workers
                .registrations
                .push(registry.register(&info, 5).await?);
        }
        Ok(workers)
    }

    /// Stops serving and leaves the registry at once.
    pub async fn stop(self) {
        for task in &self.tasks {
            task.abort();
        }
        for registration in self.registrations {
            let _ = registration.revoke().await;
        }
    }
}

/// Runs every policy in `policies` on the same conversations, each with
/// fresh workers (empty caches). `progress` is told each finished turn.
pub async fn run(
    model: &Llama,
    tokenizer: &Tokenizer,
    etcd: &str,
    config: &LiveConfig,
    policies: &[String],
    progress: &(dyn Fn(&str, usize) + Sync),
) -> anyhow::Result<Vec<LivePolicyResult>> {
    let scripts = chat_scripts(config.sessions, config.turns, config.seed);
    let mut results = Vec::new();
    for (p, name) in policies.iter().enumerate() {
        let policy =
            policy::by_name(name, config.seed, config.overlap_weight).ok_or_else(|| {
                anyhow::anyhow!(
                    "unknown policy {name:?}; try one of {:?}",
                    policy::POLICY_NAMES
                )
            })?;
        let prefix = format!("/spark-disagg/live/{}-{p}", std::process::id());
        let registry = Registry::connect(etcd, &prefix).await?;
        let workers = LiveWorkers::start(
            model,
            tokenizer,
            &registry,
            config.workers,
            config.kv_blocks,
            "live",
        )
        .await?;
        let block_size = shared::kv::block::DEFAULT_BLOCK_SIZE;
        let router = Router::start(&registry, policy, block_size).await?;
        if !router
            .wait_for(config.workers, 0, Duration::from_secs(10))
            .await
        {
            anyhow::bail!("the live workers did not all join the router within 10 s");
        }
        let result = run_policy(&router, tokenizer, &scripts, config, progress).await;
        workers.stop().await;
        results.push(result?);
    }
    Ok(results)
}

/// One policy: all conversations through `router`.
async fn run_policy(
    router: &Arc<Router>,
    tokenizer: &Tokenizer,
    scripts: &[ChatScript],
    config: &LiveConfig,
    progress: &(dyn Fn(&str, usize) + Sync),
) -> anyhow::Result<LivePolicyResult> {
    let name = router.policy_name();
    let gate = Arc::new(Semaphore::new(config.concurrency.max(1)));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let tokenizer = Arc::new(tokenizer.clone());
    for script in scripts {
        let script = script.clone();
        let (router, tokenizer, gate) = (router.clone(), tokenizer.clone(), gate.clone());
        let max_tokens = config.max_tokens;
        tasks.spawn(async move {
            let _slot = gate.acquire_owned().await.expect("never closed");
            converse(&router, &tokenizer, &script, max_tokens, start).await
        });
    }
    let mut turns = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let records = done??;
        turns.extend(records);
        progress(&name, turns.len());
    }
    let wall_s = start.elapsed().as_secs_f64();
    turns.sort_by_key(|t| (t.session, t.turn));
    Ok(summarise(name, turns, router.block_size(), wall_s))
}

/// One conversation, turn after turn.
async fn converse(
    router: &Arc<Router>,
    tokenizer: &Tokenizer,
    script: &ChatScript,
    max_tokens: usize,
    start: Instant,
) -> anyhow::Result<Vec<TurnRecord>> {
    let mut conversation = Conversation::new();
    let mut records = Vec::new();
    for (turn, message) in script.user_turns.iter().enumerate() {
        conversation.user(message);
        let prompt = tokenizer.encode(&tokenizer.apply_chat_template(&conversation.messages)?)?;
        let route = router
            .route(&prompt, script.session)
            .ok_or_else(|| anyhow::anyhow!("no worker to route to"))?;
        let request = GenerateRequest {
            prompt: Prompt::Tokens(prompt.clone()),
            params: SamplingParams {
                ignore_eos: true,
                ..SamplingParams::greedy(max_tokens)
            },
            mode: TransferMode::Local,
            decode: None,
        };
        let sent = Instant::now();
        let mut stream = WorkerStream::open(&route.worker.address, request).await?;
        let (mut ttft_s, mut reply, mut cached) = (None, String::new(), 0);
        let mut all_tokens = prompt.clone();
        while let Some(next) = stream.next().await {
            match next? {
                WorkerReply::Token { token, text } => {
                    ttft_s.get_or_insert(sent.elapsed().as_secs_f64());
                    reply.push_str(&text);
                    all_tokens.push(token);
                }
                WorkerReply::Done(breakdown) => cached = breakdown.cached_prompt_tokens as usize,
            }
        }
        records.push(TurnRecord {
            session: script.session,
            turn: turn + 1,
            worker: route.worker.name.clone(),
            prompt_tokens: prompt.len(),
            cached_tokens: cached,
            predicted_tokens: route.cached_blocks * router.block_size(),
            sent_s: (sent - start).as_secs_f64(),
            hashes: router.hashes(&prompt),
            hashes_after: router.hashes(&all_tokens),
            ttft_s: ttft_s.unwrap_or_default(),
            e2e_s: sent.elapsed().as_secs_f64(),
        });
        conversation.assistant(&reply);
    }
    Ok(records)
}

fn summarise(
    policy: String,
    turns: Vec<TurnRecord>,
    block_size: usize,
    wall_s: f64,
) -> LivePolicyResult {
    let prompt: usize = turns.iter().map(|t| t.prompt_tokens).sum();
    let ratio = |n: usize| n as f64 / prompt.max(1) as f64;
    let mean = |xs: &[f64]| (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64);
    let ttfts: Vec<f64> = turns.iter().map(|t| t.ttft_s).collect();
    let later = turns.iter().filter(|t| t.turn > 1);
    let (hit, miss): (Vec<&TurnRecord>, Vec<&TurnRecord>) =
        later.partition(|t| 2 * t.cached_tokens >= t.prompt_tokens);
    let hit_ttft: Vec<f64> = hit.iter().map(|t| t.ttft_s).collect();
    let miss_ttft: Vec<f64> = miss.iter().map(|t| t.ttft_s).collect();
    let mut per_worker = BTreeMap::<&str, usize>::new();
    for t in &turns {
        *per_worker.entry(t.worker.as_str()).or_default() += 1;
    }
    let max = per_worker.values().copied().max().unwrap_or(0) as f64;
    let mean_load = turns.len() as f64 / per_worker.len().max(1) as f64;
    LivePolicyResult {
        policy,
        requests: turns.len(),
        hit_rate: ratio(turns.iter().map(|t| t.cached_tokens).sum()),
        predicted_hit_rate: ratio(turns.iter().map(|t| t.predicted_tokens).sum()),
        oracle_hit_rate: oracle_hit_rate(&turns, block_size),
        ttft_mean_s: mean(&ttfts).unwrap_or_default(),
        ttft_p50_s: percentile(&ttfts, 0.5),
        ttft_p99_s: percentile(&ttfts, 0.99),
        ttft_hit_mean_s: mean(&hit_ttft),
        hits: hit.len(),
        ttft_miss_mean_s: mean(&miss_ttft),
        misses: miss.len(),
        e2e_p50_s: percentile(&turns.iter().map(|t| t.e2e_s).collect::<Vec<_>>(), 0.5),
        max_mean_load: max / mean_load.max(f64::MIN_POSITIVE),
        wall_s,
        turns,
    }
}

/// The hit rate of one worker with an unbounded cache that holds every
/// earlier prompt and reply (in the order they were sent): the longest run
/// of each prompt's blocks seen before, in tokens, over all prompt tokens.
fn oracle_hit_rate(turns: &[TurnRecord], block_size: usize) -> f64 {
    let mut order: Vec<&TurnRecord> = turns.iter().collect();
    order.sort_by(|a, b| a.sent_s.total_cmp(&b.sent_s));
    let mut seen = HashSet::new();
    let mut reused = 0;
    for t in order {
        reused += t.hashes.iter().take_while(|h| seen.contains(*h)).count() * block_size;
        seen.extend(t.hashes_after.iter().copied());
    }
    reused as f64 / turns.iter().map(|t| t.prompt_tokens).sum::<usize>().max(1) as f64
}

/// The policies side by side, with TTFT as a ratio to the first policy.
pub fn table(config: &LiveConfig, results: &[LivePolicyResult]) -> String {
    let mut out = format!(
        "{} workers × {} KV blocks, {} conversations × {} turns, {} new tokens per turn, {} conversations at a time\n",
        config.workers, config.kv_blocks, config.sessions, config.turns, config.max_tokens, config.concurrency
    );
    out += &format!(
        "{:<18} {:>8} {:>9} {:>9} {:>10} {:>9} {:>11} {:>12} {:>9}\n",
        "policy",
        "hit rate",
        "% oracle",
        "predicted",
        "TTFT mean",
        "vs first",
        "TTFT hit",
        "TTFT miss",
        "max/mean"
    );
    let base = results.first().map_or(1.0, |r| r.ttft_mean_s);
    let ms = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{:.0} ms", x * 1e3));
    for r in results {
        out += &format!(
            "{:<18} {:>7.1}% {:>8.1}% {:>8.1}% {:>7.0} ms {:>8.2}x {:>11} {:>12} {:>9.2}\n",
            r.policy,
            r.hit_rate * 100.0,
            100.0 * r.hit_rate / r.oracle_hit_rate.max(f64::MIN_POSITIVE),
            r.predicted_hit_rate * 100.0,
            r.ttft_mean_s * 1e3,
            r.ttft_mean_s / base.max(f64::MIN_POSITIVE),
            ms(r.ttft_hit_mean_s),
            ms(r.ttft_miss_mean_s),
            r.max_mean_load,
        );
    }
    out +=
        "hit rate: prompt tokens the engines reused; predicted: what the router's index expected; \
            TTFT hit/miss: turns 2+ with at least / less than half the prompt reused\n";
    out
}
