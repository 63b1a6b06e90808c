//! Module 3 end to end, in one process: a decode server and a prefill
//! server on loopback with the real SmolLM2, a client, and the failures a
//! real deployment meets.

use std::sync::Arc;

use module03_tcp::client::{self, RequestResult, Workload};
use module03_tcp::decode::DecodeServer;
use module03_tcp::prefill::PrefillServer;
use module04_rdma::agent::BackendChoice;
use shared::engine::generate::generate;
use shared::engine::sampling::SamplingParams;
use shared::engine::EngineConfig;
use shared::model::config::LlamaConfig;
use shared::model::llama::Llama;
use shared::model::{default_model_path, load_model, LoadedModel};
use shared::wire::{self, Message, TransferMode};
use tch::{Device, Kind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn smollm2() -> LoadedModel {
    let path = default_model_path()
        .expect("SPARK_DISAGG_MODEL is not set: run scripts/setup.sh, then the tests again");
    load_model(&path, Device::Cpu, Kind::Float).expect("the SmolLM2 GGUF loads")
}

async fn listen() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    (listener, address)
}

async fn start_decode(model: Llama, tokenizer: shared::model::tokenizer::Tokenizer) -> String {
    let config = EngineConfig::with_kv_budget(&model, 256 << 20);
    let tcp = BackendChoice::Tcp {
        listen: "127.0.0.1:0".into(),
    };
    let server = DecodeServer::with_one_sided(model, tokenizer, config, Some(tcp)).unwrap();
    let (listener, address) = listen().await;
    tokio::spawn(server.serve(listener));
    address
}

async fn start_prefill(decode: &str) -> String {
    let m = smollm2();
    let server = PrefillServer::new(m.model, m.tokenizer, Some(decode.to_string()));
    let (listener, address) = listen().await;
    tokio::spawn(Arc::clone(&server).serve(listener));
    address
}

fn workload(mode: TransferMode, max_tokens: u32) -> Workload {
    Workload {
        prompts: client::default_prompts(),
        max_tokens,
        ignore_eos: true,
        concurrency: 3,
        mode,
    }
}

fn assert_all_ok(results: &[RequestResult]) {
    for r in results {
        assert!(r.error.is_none(), "{:?} failed: {:?}", r.prompt, r.error);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disaggregated_tokens_equal_local_generation() {
    let m = smollm2();
    let decode = start_decode(m.model, m.tokenizer).await;
    let prefill = start_prefill(&decode).await;
    let max_tokens = 8;

    // The reference: the plain generation loop of module 1, in this process.
    let reference = smollm2();
    let expected: Vec<Vec<u32>> = client::default_prompts()
        .iter()
        .map(|p| {
            let prompt = reference.tokenizer.encode(p).unwrap();
            let params = SamplingParams::fixed_length(max_tokens as usize);
            generate(&reference.model, &prompt, &[], &params, |_| {})
                .unwrap()
                .tokens
        })
        .collect();

    for (mode, address) in [
        (TransferMode::Local, &decode),
        (TransferMode::Bulk, &prefill),
        (TransferMode::Layerwise, &prefill),
        (TransferMode::OneSided, &prefill),
    ] {
        let results = client::run(address, &workload(mode, max_tokens))
            .await
            .unwrap();
        assert_all_ok(&results);
        for (r, want) in results.iter().zip(&expected) {
            assert_eq!(&r.tokens, want, "{mode:?}: {:?}", r.prompt);
            let b = r.breakdown.as_ref().unwrap();
            assert_eq!(b.output_tokens, max_tokens);
            assert!(b.total_s >= b.ttft_s && b.ttft_s > 0.0);
            if mode != TransferMode::Local {
                // Every layer's K and V crossed: 30 layers · 2 · tokens · 3 heads · 64 · 4 bytes.
                let tokens = reference.tokenizer.encode(&r.prompt).unwrap().len() as u64;
                assert_eq!(b.kv_bytes, 30 * 2 * tokens * 3 * 64 * 4);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_from_another_model_is_refused() {
    let m = smollm2();
    // Same shape, other weights: the cache would decode into nonsense.
    let other = Llama::random(LlamaConfig::smollm2_135m(), 1, Device::Cpu, Kind::Float);
    let decode = start_decode(other, m.tokenizer).await;
    let prefill = start_prefill(&decode).await;
    let results = client::run(&prefill, &workload(TransferMode::Bulk, 4))
        .await
        .unwrap();
    let error = results[0].error.as_deref().expect("refused");
    assert!(error.contains("different model"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decode_server_down_is_reported_to_the_client() {
    let (listener, closed) = listen().await;
    drop(listener);
    let prefill = start_prefill(&closed).await;
    let results = client::run(&prefill, &workload(TransferMode::Layerwise, 4))
        .await
        .unwrap();
    for r in &results {
        let error = r.error.as_deref().expect("every request fails");
        assert!(error.contains("cannot reach the decode server"), "{error}");
    }
}

/// Reads frames until the server closes; returns the error messages it sent.
async fn errors_until_closed(stream: &mut TcpStream) -> Vec<String> {
    let mut errors = Vec::new();
    let mut scratch = Vec::new();
    while let Ok(message) = wire::read_frame(stream, 0, &mut scratch).await {
        if let Message::Error { message, .. } = message {
            errors.push(message);
        }
    }
    errors
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversized_frames_close_the_connection_and_nothing_else() {
    let m = smollm2();
    let decode = start_decode(m.model, m.tokenizer).await;
    let prefill = start_prefill(&decode).await;

    for address in [&decode, &prefill] {
        let mut stranger = TcpStream::connect(address).await.unwrap();
        stranger
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let errors = errors_until_closed(&mut stranger).await;
        assert!(errors.iter().any(|e| e.contains("bad magic")), "{errors:?}");
    }

    // A frame announcing a 1 TiB payload is refused from its prefix, before
    // anything is allocated.
    let mut liar = TcpStream::connect(&decode).await.unwrap();
    let mut frame = wire::encode_frame(
        &Message::KvLayer {
            request_id: 1,
            layer: 0,
        },
        &[],
    );
    frame[10..18].copy_from_slice(&(1u64 << 40).to_le_bytes());
    liar.write_all(&frame).await.unwrap();
    let errors = errors_until_closed(&mut liar).await;
    assert!(
        errors.iter().any(|e| e.contains("exceeds the cap")),
        "{errors:?}"
    );

    // A frame cut short: the server waits, then sees the end of the stream.
    let mut quitter = TcpStream::connect(&decode).await.unwrap();
    let frame = wire::encode_frame(
        &Message::KvEnd {
            request_id: 1,
            first_token: 0,
        },
        &[],
    );
    quitter.write_all(&frame[..frame.len() - 2]).await.unwrap();
    quitter.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let _ = quitter.read_to_end(&mut rest).await;

    // The servers are still fine.
    let results = client::run(&prefill, &workload(TransferMode::Bulk, 2))
        .await
        .unwrap();
    assert_all_ok(&results);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sided_needs_a_decode_server_that_offers_it() {
    let m = smollm2();
    let config = EngineConfig::with_kv_budget(&m.model, 64 << 20);
    let server = DecodeServer::new(m.model, m.tokenizer, config).unwrap();
    let (listener, decode) = listen().await;
    tokio::spawn(server.serve(listener));
    let prefill = start_prefill(&decode).await;
    let results = client::run(&prefill, &workload(TransferMode::OneSided, 2))
        .await
        .unwrap();
    let error = results[0].error.as_deref().expect("refused");
    assert!(error.contains("--one-sided"), "{error}");
    // The other modes still work on the same link.
    let results = client::run(&prefill, &workload(TransferMode::Layerwise, 2))
        .await
        .unwrap();
    assert_all_ok(&results);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_frees_the_decode_workers_slot() {
    let m = smollm2();
    let config = EngineConfig::with_kv_budget(&m.model, 256 << 20);
    let decode = DecodeServer::new(m.model, m.tokenizer, config).unwrap();
    let (listener, decode_address) = listen().await;
    tokio::spawn(decode.clone().serve(listener));
    let prefill = start_prefill(&decode_address).await;

    let request = shared::worker_client::GenerateRequest {
        prompt: wire::Prompt::Text("Count to a thousand, slowly.".into()),
        params: SamplingParams::fixed_length(1000),
        mode: TransferMode::Layerwise,
        decode: None,
    };
    let mut stream = shared::worker_client::WorkerStream::open(&prefill, request)
        .await
        .unwrap();
    for _ in 0..3 {
        assert!(matches!(
            stream.next().await,
            Some(Ok(shared::worker_client::WorkerReply::Token { .. }))
        ));
    }
    assert_eq!(decode.engine_stats().unwrap().running, 1);
    // Hang up mid-stream: the prefill worker cancels on the decode worker,
    // long before 1000 tokens are done.
    drop(stream);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while decode.engine_stats().unwrap().running > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the decode worker is still generating for a client that left"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
