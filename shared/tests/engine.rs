//! The paged, continuously batched engine must produce exactly the tokens
//! of the simple one-prompt loop — whatever the batch, the chunking, the
//! preemptions or the prefix-cache hits.

mod common;

use shared::engine::generate::{generate, FinishReason};
use shared::engine::sampling::SamplingParams;
use shared::engine::{DecodeMode, Engine, EngineConfig, EngineError, Request, TokenEvent};
use shared::model::llama::Llama;
use shared::model::LoadedModel;
use tch::{Device, Kind};

const PROMPTS: [&str; 5] = [
    "The capital of France is",
    "Once upon a time, in a land far away, there lived a",
    "def fibonacci(n):",
    "The three primary colors are",
    "Paged attention stores the KV cache in fixed-size blocks so that",
];

fn smollm2() -> LoadedModel {
    shared::model::load_model(&common::smollm2_gguf(), Device::Cpu, Kind::Float).unwrap()
}

fn config(num_blocks: usize, budget: usize) -> EngineConfig {
    EngineConfig {
        block_size: 4,
        num_blocks,
        max_num_batched_tokens: budget,
        max_num_seqs: 8,
        enable_prefix_caching: true,
        decode: DecodeMode::Eager,
        cudnn_attention: false,
        fused_kernels: true,
        matvec_max_batch: 4,
        decode_ahead: true,
    }
}

/// Reference tokens from the dense-cache loop, one prompt at a time.
fn reference(
    model: &Llama,
    eos: &[u32],
    prompts: &[Vec<u32>],
    params: &SamplingParams,
) -> Vec<Vec<u32>> {
    prompts
        .iter()
        .map(|p| generate(model, p, eos, params, |_| {}).unwrap().tokens)
        .collect()
}

fn requests(prompts: &[Vec<u32>], params: &SamplingParams) -> Vec<Request> {
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| Request::new(i as u64, p.clone(), params.clone()))
        .collect()
}

#[test]
fn batched_chunked_engine_matches_individual_greedy_generation() {
    let loaded = smollm2();
    let eos = loaded.tokenizer.eos_ids();
    let prompts: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|p| loaded.tokenizer.encode(p).unwrap())
        .collect();
    let params = SamplingParams::greedy(12);
    let expected = reference(&loaded.model, &eos, &prompts, &params);

    // A budget of 8 tokens per step splits every prompt into chunks and
    // mixes them with the decodes of the others.
    let mut engine = Engine::new(loaded.model, config(64, 8), eos).unwrap();
    let results = engine.generate_all(requests(&prompts, &params)).unwrap();
    for (i, (tokens, _, timings)) in results.iter().enumerate() {
        assert_eq!(tokens, &expected[i], "prompt {i}: {:?}", PROMPTS[i]);
        assert_eq!(
            timings.output_tokens,
            tokens.len() + usize::from(results[i].1 == FinishReason::Stop)
        );
    }
    let stats = engine.stats();
    assert_eq!(stats.blocks_in_use, 0, "every block released");
    assert!(stats.steps > 12, "prompts were chunked over several steps");
}

#[test]
fn prefix_cache_hit_gives_the_same_tokens_as_a_cold_run() {
    let loaded = smollm2();
    let eos = loaded.tokenizer.eos_ids();
    let system = "You are a helpful assistant who answers in one short sentence. ";
    let prompts: Vec<Vec<u32>> = [
        "What is the capital of France?",
        "What is the capital of Spain?",
    ]
    .iter()
    .map(|q| loaded.tokenizer.encode(&format!("{system}{q}")).unwrap())
    .collect();
    let params = SamplingParams::greedy(8);
    let expected = reference(&loaded.model, &eos, &prompts, &params);

    let mut engine = Engine::new(loaded.model, config(64, 64), eos).unwrap();
    let first = engine
        .generate_all(requests(&prompts[..1], &params))
        .unwrap();
    let second = engine
        .generate_all(vec![
            Request::new(1, prompts[1].clone(), params.clone()),
            Request::new(2, prompts[0].clone(), params.clone()),
        ])
        .unwrap();
    assert_eq!(first[0].0, expected[0]);
    assert_eq!(
        second[0].0, expected[1],
        "shared system prompt, different question"
    );
    assert_eq!(second[1].0, expected[0], "exact repeat");
    assert!(
        second[0].2.cached_prompt_tokens >= 8,
        "the shared prefix came from the cache"
    );
    assert_eq!(
        second[1].2.cached_prompt_tokens,
        (prompts[0].len() - 1) / 4 * 4
    );
    assert!(engine.stats().prefix_cache_hit_rate > 0.3);
}

fn tiny_model(seed: u64) -> Llama {
    Llama::random(
        common::tiny_llama_config(256),
        seed,
        Device::Cpu,
        Kind::Float,
    )
}

/// Steps `engine` until every request is done; the tokens of requests `0..n`.
fn drain_tokens(engine: &mut Engine, n: usize) -> Vec<Vec<u32>> {
    let mut tokens = vec![Vec::new(); n];
    while engine.has_unfinished() {
        for event in engine.step() {
            if let TokenEvent::Token { id, token } = event {
                tokens[id as usize].push(token);
            }
        }
    }
    tokens
}

fn tiny_prompts() -> Vec<Vec<u32>> {
    (0..6u32)
        .map(|i| (0..(5 + 3 * i)).map(|t| (t * 7 + i * 13) % 128).collect())
        .collect()
}

#[test]
fn preemption_under_memory_pressure_keeps_tokens_exact() {
    let prompts = tiny_prompts();
    let params = SamplingParams::fixed_length(40);
    let expected = reference(&tiny_model(5), &[], &prompts, &params);
    // 30 blocks of 4 tokens: not enough for six sequences of up to 60 tokens at once.
    let mut engine = Engine::new(tiny_model(5), config(30, 64), vec![]).unwrap();
    let results = engine.generate_all(requests(&prompts, &params)).unwrap();
    for (i, (tokens, reason, _)) in results.iter().enumerate() {
        assert_eq!(tokens, &expected[i], "sequence {i}");
        assert_eq!(*reason, FinishReason::Length);
    }
    assert!(
        engine.stats().preemptions > 0,
        "the pool was meant to run out"
    );
    assert_eq!(engine.stats().blocks_in_use, 0);
}

#[test]
fn cancelled_request_stops_and_frees_its_blocks() {
    let prompts = tiny_prompts();
    let params = SamplingParams::fixed_length(50);
    let mut engine = Engine::new(tiny_model(6), config(64, 64), vec![]).unwrap();
    for r in requests(&prompts[..2], &params) {
        engine.add_request(r, None).unwrap();
    }
    for _ in 0..3 {
        engine.step();
    }
    assert!(engine.cancel(0));
    assert!(!engine.cancel(0), "already gone");
    let mut finished = Vec::new();
    while engine.has_unfinished() {
        for event in engine.step() {
            if let TokenEvent::Finished { id, reason, .. } = event {
                finished.push((id, reason));
            }
        }
    }
    assert_eq!(
        finished,
        vec![(0, FinishReason::Cancelled), (1, FinishReason::Length)]
    );
    assert_eq!(engine.stats().blocks_in_use, 0);
}

#[test]
fn prefill_on_one_engine_and_decode_on_another_matches_local_generation() {
    let prompts = tiny_prompts();
    let params = SamplingParams::fixed_length(10);
    let expected = reference(&tiny_model(7), &[], &prompts, &params);

    let mut prefill = Engine::new(tiny_model(7), config(64, 64), vec![]).unwrap();
    let mut decode = Engine::new(tiny_model(7), config(64, 64), vec![]).unwrap();
    for request in requests(&prompts, &params) {
        let out = prefill.prefill(request.clone()).unwrap();
        assert_eq!(out.first_token, expected[request.id as usize][0]);
        // The KV travels as a plain tensor, independent of the prefill engine's pool.
        decode
            .decode_from(request, out.first_token, &out.kv, None)
            .unwrap();
    }
    let tokens = drain_tokens(&mut decode, prompts.len());
    for (i, t) in tokens.iter().enumerate() {
        assert_eq!(&expected[i][1..], t.as_slice(), "sequence {i}");
    }
    assert_eq!(prefill.stats().blocks_in_use, 0);
}

#[test]
fn reserved_blocks_filled_by_a_peer_decode_like_imported_kv() {
    // What module 4's one-sided transfer does: reserve blocks, write the KV
    // straight into the pool's memory, then hand the blocks to the engine.
    let prompts = tiny_prompts();
    let params = SamplingParams::fixed_length(6);
    let expected = reference(&tiny_model(7), &[], &prompts, &params);
    let mut prefill = Engine::new(tiny_model(7), config(64, 64), vec![]).unwrap();
    let mut decode = Engine::new(tiny_model(7), config(64, 64), vec![]).unwrap();
    let total = decode.stats().blocks_total;

    // A reservation that is given back leaves nothing behind.
    let unused = decode.reserve_blocks(99, 40).unwrap();
    assert_eq!(decode.stats().blocks_in_use, unused.len());
    decode.release_reserved(&unused);
    assert_eq!(decode.stats().blocks_in_use, 0);
    assert!(
        decode.reserve_blocks(98, 64 * 4).is_err(),
        "more blocks than the pool has"
    );

    for request in requests(&prompts, &params) {
        let out = prefill.prefill(request.clone()).unwrap();
        let blocks = decode
            .reserve_blocks(request.id, request.prompt.len())
            .unwrap();
        // The "peer": copy each token's K and V into its slot of the pool tensor.
        let pool = decode.pool().tensor();
        let table = shared::kv::block::BlockTable {
            blocks: blocks.clone(),
        };
        let block_size = decode.pool().block_size();
        for (position, slot) in table
            .slots(request.prompt.len(), block_size)
            .into_iter()
            .enumerate()
        {
            pool.narrow(2, slot, 1)
                .copy_(&out.kv.narrow(2, position as i64, 1));
        }
        decode
            .decode_from_blocks(request, out.first_token, blocks, None)
            .unwrap();
    }
    let tokens = drain_tokens(&mut decode, prompts.len());
    for (i, t) in tokens.iter().enumerate() {
        assert_eq!(&expected[i][1..], t.as_slice(), "sequence {i}");
    }
    assert_eq!(decode.stats().blocks_total, total);
}

#[test]
fn impossible_requests_are_refused_with_reasons() {
    let mut engine = Engine::new(tiny_model(8), config(8, 64), vec![]).unwrap();
    let err = engine
        .add_request(
            Request::new(1, vec![1; 40], SamplingParams::greedy(10)),
            None,
        )
        .unwrap_err();
    assert!(err.to_string().contains("--kv-cache-gb"), "{err}");
    let err = engine
        .add_request(Request::new(2, vec![], SamplingParams::greedy(1)), None)
        .unwrap_err();
    assert!(err.to_string().contains("empty"), "{err}");
    let err = engine
        .add_request(Request::new(3, vec![500], SamplingParams::greedy(1)), None)
        .unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
}

/// The bare decode step is timed on stand-in sequences with blocks of their
/// own, so that it attends over the whole context: each writes its new key
/// at its last position (not into the padding block, as a row of padding
/// does), and every block goes back to the pool afterwards.
#[test]
fn a_timed_decode_step_runs_on_blocks_of_its_own_and_returns_them() {
    let mut engine = Engine::new(tiny_model(9), config(64, 64), vec![]).unwrap();
    let written_slots = |engine: &Engine| -> Vec<i64> {
        let keys =
            engine
                .pool()
                .layer(0, 0)
                .abs()
                .sum_dim_intlist(&[1i64, 2][..], false, Kind::Float);
        Vec::try_from(&keys.gt(0.0).nonzero().reshape([-1])).unwrap()
    };
    assert!(written_slots(&engine).is_empty(), "a new pool holds zeros");

    let ms = engine.time_decode_step(3, 10, 1).unwrap();
    assert!(ms > 0.0);
    // Three stand-ins, padded to a bucket of four: each writes position 9,
    // offset 1 in its third block of 4 tokens; the padding row writes
    // offset 0 of the padding block.
    let padding_slot = engine.pool().padding_block() as i64 * 4;
    let written = written_slots(&engine);
    assert_eq!(
        written.iter().filter(|&&s| s % 4 == 1).count(),
        3,
        "{written:?}"
    );
    assert_eq!(
        written.iter().filter(|&&s| s == padding_slot).count(),
        1,
        "{written:?}"
    );
    assert_eq!(written.len(), 4, "{written:?}");
    assert_eq!(engine.stats().blocks_in_use, 0, "every block given back");

    // 8 sequences of 100 tokens need 200 blocks; the pool has 64.
    let err = engine.time_decode_step(8, 100, 1).unwrap_err();
    assert!(
        matches!(err, EngineError::NoRoomToTime { needed: 200, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("--kv-cache-gb"), "{err}");
    assert_eq!(engine.stats().blocks_in_use, 0);
}

#[test]
fn threaded_engine_streams_tokens_and_cancels() {
    use shared::engine::handle::{EngineThread, HandleError};

    let prompts = tiny_prompts();
    let params = SamplingParams::fixed_length(6);
    let expected = reference(&tiny_model(9), &[], &prompts, &params);
    let thread =
        EngineThread::spawn(|| Engine::new(tiny_model(9), config(64, 64), vec![]).unwrap())
            .unwrap();
    let handle = thread.handle();

    let mut streams: Vec<_> = requests(&prompts[..3], &params)
        .into_iter()
        .map(|r| handle.submit(r).unwrap())
        .collect();
    for (i, stream) in streams.iter_mut().enumerate() {
        let mut tokens = Vec::new();
        loop {
            match stream
                .blocking_recv()
                .expect("the stream ends with Finished")
            {
                TokenEvent::Token { token, .. } => tokens.push(token),
                TokenEvent::Finished { reason, .. } => {
                    assert_eq!(reason, FinishReason::Length);
                    break;
                }
            }
        }
        assert_eq!(tokens, expected[i], "stream {i}");
    }

    // A long request, cancelled: its stream ends with Cancelled.
    let long = Request::new(10, prompts[0].clone(), SamplingParams::fixed_length(200));
    let mut stream = handle.submit(long).unwrap();
    assert!(matches!(
        stream.blocking_recv(),
        Some(TokenEvent::Token { .. })
    ));
    handle.cancel(10);
    let reason = loop {
        if let TokenEvent::Finished { reason, .. } = stream.blocking_recv().unwrap() {
            break reason;
        }
    };
    assert_eq!(reason, FinishReason::Cancelled);

    // Invalid requests are refused at submission, not lost.
    let err = handle
        .submit(Request::new(11, vec![], params.clone()))
        .unwrap_err();
    assert!(matches!(err, HandleError::Rejected(_)), "{err}");
    assert_eq!(handle.stats().unwrap().blocks_in_use, 0);
}
