//! Padded decode steps (the shapes CUDA graphs replay) give exactly the
//! tokens of eager ones.
//!
//! On a CPU the padded steps run without graphs (`DecodeMode::Padded`): the
//! padding of the batch and the context, the masks, the block tables
//! expanded on the device and the padding block are all exercised. On a
//! GPU the same comparison runs with real CUDA graphs.

mod common;

use shared::engine::metrics::EngineStats;
use shared::engine::sampling::SamplingParams;
use shared::engine::{DecodeMode, Engine, EngineConfig, Request, TokenEvent};
use shared::model::llama::Llama;
use tch::{Device, Kind, Tensor};

fn device() -> Device {
    shared::device::cuda_if_available()
}

/// A small random model whose weights are large enough (std 0.3, not the
/// usual 0.02) that its next token really depends on attention: with tiny
/// weights the arg-max barely looks past the current token, and a broken
/// mask would go unnoticed.
fn tiny_model(device: Device) -> Llama {
    let config = common::tiny_llama_config(512);
    // libtorch has one global generator: tests run in parallel threads.
    static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _rng = RNG.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    tch::manual_seed(7);
    let tensors = shared::model::load::expected_shapes(&config)
        .into_iter()
        .map(|(name, shape)| {
            let t = if shape.len() == 1 {
                Tensor::ones(&shape, (Kind::Float, device))
            } else {
                Tensor::randn(&shape, (Kind::Float, device)) * 0.3
            };
            (name, t)
        })
        .collect();
    Llama::new(config, tensors, device, Kind::Float).unwrap()
}

fn config(decode: DecodeMode) -> EngineConfig {
    EngineConfig {
        block_size: 4,
        num_blocks: 512,
        max_num_batched_tokens: 64,
        max_num_seqs: 16,
        enable_prefix_caching: true,
        decode,
        cudnn_attention: false,
        fused_kernels: true,
        matvec_max_batch: 4,
        decode_ahead: true,
    }
}

/// Six prompts from 3 to 120 tokens and different output lengths, so the
/// batch shrinks as they finish (5 → bucket 8, then 4, 2, 1) and the
/// longest context crosses a bucket edge (128 tokens).
fn requests(vocab: u32) -> Vec<Request> {
    [3usize, 17, 40, 64, 100, 120]
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            let prompt = (0..len as u32)
                .map(|t| (t * 31 + i as u32 * 7) % vocab)
                .collect();
            Request::new(i as u64, prompt, SamplingParams::fixed_length(8 + 4 * i))
        })
        .collect()
}

fn run(model: Llama, decode: DecodeMode) -> (Vec<Vec<u32>>, Engine) {
    let vocab = model.config().vocab_size as u32;
    run_requests(model, decode, requests(vocab))
}

/// Each request's tokens, in the order of `requests`.
fn run_requests(
    model: Llama,
    decode: DecodeMode,
    requests: Vec<Request>,
) -> (Vec<Vec<u32>>, Engine) {
    run_requests_with(model, config(decode), requests)
}

fn run_requests_with(
    model: Llama,
    config: EngineConfig,
    requests: Vec<Request>,
) -> (Vec<Vec<u32>>, Engine) {
    let mut engine = Engine::new(model, config, vec![]).unwrap();
    let ids: Vec<u64> = requests.iter().map(|r| r.id).collect();
    for request in requests {
        engine.add_request(request, None).unwrap();
    }
    let mut tokens = vec![Vec::new(); ids.len()];
    while engine.has_unfinished() {
        for event in engine.step() {
            if let TokenEvent::Token { id, token } = event {
                let index = ids
                    .iter()
                    .position(|&i| i == id)
                    .expect("a request of ours");
                tokens[index].push(token);
            }
        }
    }
    (tokens, engine)
}

#[test]
fn padded_decode_steps_give_the_eager_tokens() {
    let (eager, _) = run(tiny_model(Device::Cpu), DecodeMode::Eager);
    let (padded, engine) = run(tiny_model(Device::Cpu), DecodeMode::Padded);
    assert_eq!(engine.decode_mode(), DecodeMode::Padded);
    assert_eq!(engine.graphs_captured(), 0, "padded mode captures nothing");
    for (i, (e, p)) in eager.iter().zip(&padded).enumerate() {
        assert_eq!(e.len(), 8 + 4 * i);
        assert_eq!(e, p, "request {i}");
    }
    assert_eq!(engine.stats().blocks_in_use, 0, "every block released");
}

/// A padded step takes every row's arg-max itself; a row that samples
/// instead must still get its own logits, next to greedy rows of the same
/// step: each request gives the tokens it gives when it runs alone.
#[test]
fn padded_decode_steps_sample_next_to_greedy_rows() {
    let vocab = tiny_model(Device::Cpu).config().vocab_size as u32;
    let mixed: Vec<Request> = requests(vocab)
        .into_iter()
        .map(|mut r| {
            if r.id % 2 == 1 {
                r.params.temperature = 0.8;
                r.params.seed = r.id;
            }
            r
        })
        .collect();
    let (together, _) = run_requests(tiny_model(Device::Cpu), DecodeMode::Padded, mixed.clone());
    let (greedy, _) = run(tiny_model(Device::Cpu), DecodeMode::Eager);
    for (i, request) in mixed.into_iter().enumerate() {
        let (alone, _) = run_requests(tiny_model(Device::Cpu), DecodeMode::Eager, vec![request]);
        assert_eq!(together[i], alone[0], "request {i}");
        if i % 2 == 1 {
            assert_ne!(together[i], greedy[i], "request {i} sampled, not greedy");
        }
    }
}

/// Steps queued ahead (before the previous step's tokens are read) give
/// the tokens of steps queued one at a time, and are used.
#[test]
fn decode_steps_queued_ahead_give_the_same_tokens() {
    let (ahead, engine) = run(tiny_model(Device::Cpu), DecodeMode::Padded);
    let stats = engine.stats();
    let (one_at_a_time, engine) = run_requests_with(
        tiny_model(Device::Cpu),
        EngineConfig {
            decode_ahead: false,
            ..config(DecodeMode::Padded)
        },
        requests(tiny_model(Device::Cpu).config().vocab_size as u32),
    );
    assert_eq!(ahead, one_at_a_time);
    assert!(stats.steps_ahead_used > 10, "{stats:?}");
    let off = engine.stats();
    assert_eq!((off.steps_ahead_used, off.steps_ahead_dropped), (0, 0));
    // The steps are the same ones, merely queued earlier.
    assert_eq!(stats.steps, off.steps);
}

/// A step queued ahead that turns out not to be the next one — its
/// sequence drew its end token, or was cancelled — is dropped, and nothing
/// it did shows in the tokens or in the pool. Whether a step was queued
/// when the sequence stopped depends on where it stopped (not at a block's
/// last slot, not at its length limit), so every place is tried.
#[test]
fn a_step_queued_ahead_is_dropped_when_its_sequence_stops() {
    let (reference, _) = run_one(false, vec![], None);
    let mut dropped = [0, 0];
    for (at, &token) in reference.iter().enumerate().skip(1) {
        if reference[..at].contains(&token) {
            continue; // it would stop at the first one
        }
        // Ends on `token`: the tokens before it come out, then it stops.
        let (tokens, stats) = run_one(true, vec![token], None);
        assert_eq!(tokens, reference[..at], "end token at {at}");
        assert_eq!(stats.blocks_in_use, 0);
        dropped[0] += stats.steps_ahead_dropped;
        // Cancelled after `at` steps: the same tokens with and without.
        let (tokens, stats) = run_one(true, vec![], Some(at));
        assert_eq!(
            tokens,
            run_one(false, vec![], Some(at)).0,
            "cancelled at {at}"
        );
        assert_eq!(stats.blocks_in_use, 0);
        dropped[1] += stats.steps_ahead_dropped;
    }
    assert!(dropped[0] > 0 && dropped[1] > 0, "dropped {dropped:?}");
}

/// One request's tokens, run to its end token in `eos` or cancelled after
/// `cancel_after` steps, and the engine's statistics.
fn run_one(
    decode_ahead: bool,
    eos: Vec<u32>,
    cancel_after: Option<usize>,
) -> (Vec<u32>, EngineStats) {
    let config = EngineConfig {
        decode_ahead,
        ..config(DecodeMode::Padded)
    };
    let mut engine = Engine::new(tiny_model(Device::Cpu), config, eos).unwrap();
    let request = Request::new(0, vec![3, 1, 4, 1, 5], SamplingParams::greedy(16));
    engine.add_request(request, None).unwrap();
    let mut tokens = Vec::new();
    let mut steps = 0;
    while engine.has_unfinished() {
        if Some(steps) == cancel_after {
            engine.cancel(0);
        }
        steps += 1;
        for event in engine.step() {
            if let TokenEvent::Token { token, .. } = event {
                tokens.push(token);
            }
        }
    }
    (tokens, engine.stats())
}

/// A request that arrives while a step is queued ahead does not make it
/// wrong: its prompt is prefilled beside the queued decodes.
#[test]
fn a_request_arriving_is_prefilled_beside_the_step_queued_ahead() {
    let (ahead, with) = run_with_arrival(true);
    let (one_at_a_time, without) = run_with_arrival(false);
    assert_eq!(ahead, one_at_a_time);
    assert_eq!(ahead[6].len(), 12, "the late request ran");
    assert!(with.steps_ahead_used > 0, "{with:?}");
    assert_eq!(with.steps_ahead_dropped, 0, "{with:?}");
    assert_eq!(with.steps, without.steps);
}

/// The six requests, and a seventh that arrives after 12 steps: each
/// request's tokens (the seventh's last) and the engine's statistics.
fn run_with_arrival(decode_ahead: bool) -> (Vec<Vec<u32>>, EngineStats) {
    let model = tiny_model(Device::Cpu);
    let vocab = model.config().vocab_size as u32;
    let config = EngineConfig {
        decode_ahead,
        ..config(DecodeMode::Padded)
    };
    let mut engine = Engine::new(model, config, vec![]).unwrap();
    for request in requests(vocab) {
        engine.add_request(request, None).unwrap();
    }
    let late = Request::new(6, vec![5, 9, 2, 7, 11], SamplingParams::greedy(12));
    let mut tokens = vec![Vec::new(); 7];
    let mut steps = 0;
    while engine.has_unfinished() {
        steps += 1;
        if steps == 12 {
            engine.add_request(late.clone(), None).unwrap();
        }
        for event in engine.step() {
            if let TokenEvent::Token { id, token } = event {
                tokens[id as usize].push(token);
            }
        }
    }
    (tokens, engine.stats())
}

#[test]
fn padded_decode_steps_on_the_real_model() {
    let loaded =
        shared::model::load_model(&common::smollm2_gguf(), Device::Cpu, Kind::Float).unwrap();
    let prompts = [
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time, in a land far away, there lived a",
    ];
    let requests = |n: usize| -> Vec<Request> {
        prompts
            .iter()
            .enumerate()
            .take(n)
            .map(|(i, p)| {
                let ids = loaded.tokenizer.encode(p).unwrap();
                Request::new(i as u64, ids, SamplingParams::fixed_length(6 + 3 * i))
            })
            .collect()
    };
    let mut results = Vec::new();
    for decode in [DecodeMode::Eager, DecodeMode::Padded] {
        let model = loaded.model.share_weights();
        let mut engine = Engine::new(model, config(decode), vec![]).unwrap();
        let out = engine.generate_all(requests(prompts.len())).unwrap();
        results.push(
            out.into_iter()
                .map(|(tokens, _, _)| tokens)
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(results[0], results[1]);
}

/// With a GPU: real CUDA graphs against eager steps. Without one: asking
/// for graphs falls back to eager steps, which still give the same tokens.
#[test]
fn cuda_graph_decode_steps_give_the_eager_tokens() {
    let device = device();
    let (eager, _) = run(tiny_model(device), DecodeMode::Eager);
    let (graphed, engine) = run(tiny_model(device), DecodeMode::CudaGraphs);
    assert_eq!(eager, graphed);
    if device.is_cuda() && shared::engine::cuda_graph::CudaGraph::compiled() {
        assert_eq!(engine.decode_mode(), DecodeMode::CudaGraphs);
        // A few batch buckets (8, 4, 2, 1) times two context buckets.
        let captured = engine.graphs_captured();
        assert!((2..=10).contains(&captured), "{captured} graphs");
        // With real graphs the steps queued ahead overlap the host's work.
        assert!(engine.stats().steps_ahead_used > 10, "{:?}", engine.stats());
    } else {
        assert_eq!(
            engine.decode_mode(),
            DecodeMode::Eager,
            "no graphs on {device:?}"
        );
        assert_eq!(engine.graphs_captured(), 0);
    }
}
