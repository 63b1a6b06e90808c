//! The whole system through HTTP: real worker processes, a real etcd, the
//! real model on the CPU.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use module05_routing::registry::Role;
use module06_dynamo::bench::stream_chat;
use module06_dynamo::deploy::{Deployment, DeploymentSpec};
use module06_dynamo::disagg::DisaggPolicy;
use serde_json::{json, Value};
use shared::engine::generate::generate;
use shared::engine::sampling::SamplingParams;
use shared::etcd_server::EtcdServer;
use shared::model::tokenizer::ChatMessage;
use tch::{Device, Kind};

const QUESTION: &str = "What is a KV cache? Answer in one sentence.";

fn model_path() -> PathBuf {
    shared::model::default_model_path().expect("run scripts/setup.sh: it installs the model")
}

async fn deploy(etcd: &EtcdServer, configure: impl FnOnce(&mut DeploymentSpec)) -> Deployment {
    let mut spec = DeploymentSpec::new(Some(model_path()));
    spec.etcd = etcd.endpoint.clone();
    spec.listen = "127.0.0.1:0".parse().unwrap();
    spec.device = "cpu".into();
    configure(&mut spec);
    Deployment::start(Path::new(env!("CARGO_BIN_EXE_module06_dynamo")), &spec)
        .await
        .expect("the deployment starts")
}

/// Module 1's reference loop, in this process: greedy text for a chat.
fn reference_chat(messages: &[ChatMessage], max_tokens: usize) -> String {
    let m = shared::model::load_model(&model_path(), Device::Cpu, Kind::Float).unwrap();
    let prompt = m
        .tokenizer
        .encode(&m.tokenizer.apply_chat_template(messages).unwrap())
        .unwrap();
    let params = SamplingParams::greedy(max_tokens);
    let tokens = generate(
        &m.model,
        &prompt,
        &m.model.config().eos_ids(),
        &params,
        |_| {},
    )
    .unwrap()
    .tokens;
    m.tokenizer.decode(&tokens).unwrap()
}

fn chat_body(max_tokens: usize, stream: bool) -> Value {
    json!({
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "stream_options": {"include_usage": true},
    })
}

async fn post_raw(url: &str, path: &str, body: Vec<u8>) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{url}{path}"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_api_end_to_end_with_remote_prefill() {
    let etcd = EtcdServer::start().unwrap();
    let d = deploy(&etcd, |s| {
        s.disagg = DisaggPolicy {
            min_remote_prefill_tokens: 0,
            max_prefill_queue: usize::MAX,
        };
    })
    .await;
    let url = d.url.clone();
    let want = reference_chat(&[ChatMessage::new("user", QUESTION)], 8);

    // Non-streaming: the same greedy text as module 1's loop.
    let (status, body) = post_raw(
        &url,
        "/v1/chat/completions",
        chat_body(8, false).to_string().into_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["content"], want.as_str());
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 8);

    // Streaming: the pieces add up to the same text, then usage and [DONE].
    let streamed = stream_chat(&reqwest::Client::new(), &url, &chat_body(8, true))
        .await
        .unwrap();
    assert_eq!(streamed.text, want);
    assert_eq!(streamed.completion_tokens, 8);
    assert_eq!(streamed.finish_reason.as_deref(), Some("length"));

    // A stop string cuts the text before it and ends with "stop".
    let cut = want.split_whitespace().nth(2).unwrap().to_string();
    let mut body = chat_body(8, false);
    body["stop"] = json!([cut.clone()]);
    let (_, stopped) = post_raw(&url, "/v1/chat/completions", body.to_string().into_bytes()).await;
    let text = stopped["choices"][0]["message"]["content"]
        .as_str()
        .unwrap();
    assert_eq!(text, &want[..want.find(&cut).unwrap()]);
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");

    // Text completions.
    let body = json!({"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0});
    let (status, completion) =
        post_raw(&url, "/v1/completions", body.to_string().into_bytes()).await;
    assert_eq!(status, 200, "{completion}");
    assert_eq!(completion["object"], "text_completion");
    assert_eq!(completion["usage"]["completion_tokens"], 3);

    // Bad requests: 400 with a message that says what is wrong.
    let long = "word ".repeat(9000);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"{\"messages\": [".to_vec(), "not valid JSON"),
        (br#"{"model": "x"}"#.to_vec(), "messages"),
        (
            b"{\"messages\": [{\"role\": \"user\", \"content\": \"\xff\xfe\"}]}".to_vec(),
            "UTF-8",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0})
                .to_string()
                .into_bytes(),
            "max_tokens",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000_000})
                .to_string()
                .into_bytes(),
            "context",
        ),
        (
            json!({"messages": [{"role": "user", "content": long}], "max_tokens": 4})
                .to_string()
                .into_bytes(),
            "context",
        ),
        (json!({"messages": []}).to_string().into_bytes(), "messages"),
    ];
    for (body, needle) in cases {
        let (status, error) = post_raw(&url, "/v1/chat/completions", body).await;
        assert_eq!(status, 400, "{error}");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{needle:?} not in {message:?}");
    }
    let (status, _) = post_raw(
        &url,
        "/v1/chat/completions",
        json!({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]})
            .to_string()
            .into_bytes(),
    )
    .await;
    assert_eq!(status, 404);

    // The official Python client sees the same text.
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let output = std::process::Command::new(&python)
        .arg(&script)
        .arg(&url)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "running {} (set up by scripts/setup.sh): {e}",
                python.display()
            )
        });
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(seen["chat_text"], want.as_str());
    assert_eq!(seen["stream_text"], want.as_str());
    assert_eq!(seen["chat_finish"], "length");
    assert_eq!(seen["stream_usage"], 8);
    assert_eq!(seen["bad_request_status"], 400);
    assert!(!seen["completion_text"].as_str().unwrap().is_empty());

    // Every prefill ran remotely, and KV crossed to the decode worker.
    let metrics = reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    assert!(
        value("spark_prefill_total{place=\"remote\"}") >= 7.0,
        "{metrics}"
    );
    assert!(value("spark_kv_transfer_bytes_total") > 0.0, "{metrics}");
    assert!(value("spark_requests_total{endpoint=\"chat_completions\",status=\"400\"}") >= 7.0);
    // Per worker: every request has finished, so no queue is left, and
    // the router's index holds the decode worker's cached blocks.
    let per_worker = |name: &str| -> Vec<f64> {
        metrics
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect()
    };
    let queues = per_worker("spark_worker_active_requests");
    assert_eq!(queues, vec![0.0, 0.0], "{metrics}");
    let blocks = per_worker("spark_worker_indexed_blocks");
    assert_eq!(blocks.len(), 2, "{metrics}");
    assert!(blocks.iter().sum::<f64>() > 0.0, "{metrics}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decode_worker_killed_mid_stream_fails_the_request_fast_and_leaves_the_router() {
    let etcd = EtcdServer::start().unwrap();
    let mut d = deploy(&etcd, |s| {
        s.prefill = 1;
        s.decode = 2;
        s.policy = "round-robin".into();
        s.disagg = DisaggPolicy {
            min_remote_prefill_tokens: 0,
            max_prefill_queue: usize::MAX,
        };
    })
    .await;
    let url = d.url.clone();
    let client = reqwest::Client::new();
    let mut body = chat_body(400, true);
    body["ignore_eos"] = json!(true);

    // Round-robin: the first request goes to the first decode worker (its
    // prefill runs on the prefill worker, which then relays its tokens).
    let victim = d
        .frontend
        .router()
        .workers()
        .into_iter()
        .find(|w| w.info.role == Role::Decode)
        .unwrap()
        .info
        .name;
    let request = tokio::spawn({
        let (client, url, body) = (client.clone(), url.clone(), body.clone());
        async move { stream_chat(&client, &url, &body).await }
    });
    // Let it produce a few tokens, then kill its worker.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let killed = Instant::now();
    d.kill_worker(&victim).await.unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(5), request)
        .await
        .expect("the client heard within 5 s")
        .unwrap();
    let error = outcome.expect_err("a stream whose worker died cannot complete");
    assert!(error.contains("error"), "{error}");
    assert!(killed.elapsed() < Duration::from_secs(5));

    // The router dropped the worker; the surviving decode worker serves the
    // next requests, still prefilled remotely.
    let deadline = Instant::now() + Duration::from_secs(5);
    while d
        .frontend
        .router()
        .workers()
        .iter()
        .any(|w| w.info.name == victim)
    {
        assert!(
            Instant::now() < deadline,
            "the dead worker is still routed to"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..2 {
        let done = stream_chat(&client, &url, &chat_body(4, true))
            .await
            .unwrap();
        assert_eq!(done.completion_tokens, 4);
    }
    let health: Value = reqwest::get(format!("{url}/health"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["workers"].as_array().unwrap().len(), 2, "{health}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_streams_lose_and_duplicate_nothing() {
    let etcd = EtcdServer::start().unwrap();
    let d = deploy(&etcd, |s| s.kv_cache_gb = 1.0).await;
    let url = d.url.clone();
    let client = reqwest::Client::new();
    let questions = [
        "Name one planet.",
        "What is two plus two?",
        "Say hello in French.",
        "What colour is the sky? Explain why the sky has that colour in a full paragraph.",
    ];
    let body = |q: &str| {
        json!({
            "messages": [{"role": "user", "content": q}],
            "max_tokens": 6, "temperature": 0, "ignore_eos": true,
            "stream": true, "stream_options": {"include_usage": true},
        })
    };
    // The expected text of each question, asked alone.
    let mut expected = Vec::new();
    for q in questions {
        expected.push(stream_chat(&client, &url, &body(q)).await.unwrap().text);
    }
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let (client, url, body) = (client.clone(), url.clone(), body(questions[i % 4]));
            tokio::spawn(async move { stream_chat(&client, &url, &body).await })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        let done = task
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("stream {i}: {e}"));
        assert_eq!(done.completion_tokens, 6, "stream {i}");
        assert_eq!(done.finish_reason.as_deref(), Some("length"), "stream {i}");
        assert_eq!(done.pieces.concat(), expected[i % 4], "stream {i}");
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_decode_worker_even_a_stream_gets_a_503() {
    let etcd = EtcdServer::start().unwrap();
    let d = deploy(&etcd, |s| {
        s.prefill = 0;
        s.decode = 0;
        s.aggregated = 0;
    })
    .await;
    for stream in [false, true] {
        let (status, error) = post_raw(
            &d.url,
            "/v1/chat/completions",
            chat_body(4, stream).to_string().into_bytes(),
        )
        .await;
        assert_eq!(status, 503, "stream {stream}: {error}");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains("no decode"), "{message}");
    }
    let health = reqwest::get(format!("{}/health", d.url)).await.unwrap();
    assert_eq!(health.status().as_u16(), 503);
    d.stop().await;
}
