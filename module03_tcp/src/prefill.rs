//! The prefill worker: runs prompts and ships their KV caches.
//!
//! Prefill is the compute-heavy half of serving: the whole prompt goes
//! through the model in one pass, which leaves every layer's keys and values
//! for the prompt — the KV cache — and the first output token. This worker
//! does only that, then sends the cache to a decode worker and relays the
//! tokens that come back to its client.
//!
//! The transfer can start at two moments:
//!
//! * **bulk**: after the whole forward pass, all layers at once;
//! * **layer-wise**: layer `i`'s K and V are final as soon as layer `i` has
//!   run, so they are handed to the sending task right then, and go over
//!   the wire while layers `i+1…` compute. Only the last layer's transfer
//!   remains exposed. The hook is an [`AttentionCache`] that sees each
//!   layer's K and V on their way into attention.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use shared::engine::sampling::{Sampler, SamplingParams};
use shared::model::llama::{causal_attention, AttentionCache, Llama};
use shared::model::tokenizer::Tokenizer;
use shared::wire::{self, FrameError, Message, ModelFingerprint, TransferMode};
use tch::Tensor;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// Attention over the prompt alone, showing each layer's K and V to a callback.
struct LayerTap<'a> {
    on_layer: &'a mut dyn FnMut(usize, &Tensor, &Tensor),
}

impl AttentionCache for LayerTap<'_> {
    fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        (self.on_layer)(layer, k, v);
        causal_attention(q, k, v)
    }
}

// ANCHOR: run_prompt
/// Runs `prompt` through `model` and returns the logits of its last position.
/// `on_layer(layer, k, v)` is called with each layer's K and V
/// (`[1, kv_heads, tokens, head_dim]`) as soon as that layer computes them.
pub fn run_prompt(
    model: &Llama,
    prompt: &[u32],
    on_layer: &mut dyn FnMut(usize, &Tensor, &Tensor),
) -> Tensor {
    let tokens = model.token_tensor(prompt);
    let positions = model.positions(0, prompt.len() as i64);
    let hidden = model.forward(&tokens, &positions, &mut LayerTap { on_layer });
    model
        .logits(&hidden.narrow(1, prompt.len() as i64 - 1, 1))
        .reshape([-1])
}
// ANCHOR_END: run_prompt

/// Send buffers, reused: a fresh multi-megabyte buffer per layer would pay
/// page faults on every request (module 2 measured how much).
#[derive(Clone, Default)]
struct BufferPool(Arc<Mutex<Vec<Vec<u8>>>>);

impl BufferPool {
    fn take(&self) -> Vec<u8> {
        self.0.lock().expect("pool lock").pop().unwrap_or_default()
    }
    fn give(&self, buffer: Vec<u8>) {
        self.0.lock().expect("pool lock").push(buffer);
    }
}

struct Outgoing {
    message: Message,
    payload: Vec<u8>,
}

type Pending = Arc<Mutex<HashMap<u64, UnboundedSender<Message>>>>;

/// The one connection to the decode worker, shared by all requests.
/// A writer task sends frames in order; a reader task routes replies to
/// the request they belong to.
struct DecodeLink {
    outgoing: UnboundedSender<Outgoing>,
    pending: Pending,
    dead: Arc<AtomicBool>,
}

impl DecodeLink {
    async fn connect(
        address: &str,
        fingerprint: &ModelFingerprint,
        pool: BufferPool,
    ) -> Result<DecodeLink, String> {
        let unreachable = |e: &dyn std::fmt::Display| {
            format!(
                "cannot reach the decode server at {address}: {e}. Is `module03_tcp decode --listen {address}` running?"
            )
        };
        let stream = TcpStream::connect(address)
            .await
            .map_err(|e| unreachable(&e))?;
        stream.set_nodelay(true).map_err(|e| unreachable(&e))?;
        let (mut reader, mut writer) = stream.into_split();
        let hello = Message::Hello {
            fingerprint: fingerprint.clone(),
        };
        wire::write_frame(&mut writer, &hello, &[])
            .await
            .map_err(|e| unreachable(&e))?;
        let mut scratch = Vec::new();
        match wire::read_frame(&mut reader, 0, &mut scratch).await {
            Ok(Message::Hello {
                fingerprint: theirs,
            }) => {
                if let Some(why) = fingerprint.mismatch(&theirs) {
                    return Err(why);
                }
            }
            Ok(Message::Error { message, .. }) => {
                return Err(format!("the decode server refused: {message}"))
            }
            Ok(other) => return Err(format!("the decode server answered {other:?} to Hello")),
            Err(e) => return Err(unreachable(&e)),
        }

        let pending: Pending = Arc::default();
        let dead = Arc::new(AtomicBool::new(false));
        let (outgoing, mut queue) = unbounded_channel::<Outgoing>();
        let fail_all = {
            let (pending, dead) = (pending.clone(), dead.clone());
            move |why: String| {
                dead.store(true, Ordering::SeqCst);
                for (id, waiter) in pending.lock().expect("pending lock").drain() {
                    let _ = waiter.send(Message::Error {
                        request_id: Some(id),
                        message: why.clone(),
                    });
                }
            }
        };
        let fail_writer = fail_all.clone();
        tokio::spawn(async move {
            while let Some(Outgoing { message, payload }) = queue.recv().await {
                if let Err(e) = wire::write_frame(&mut writer, &message, &payload).await {
                    fail_writer(format!(
                        "lost the connection to the decode server while sending: {e}"
                    ));
                    return;
                }
                pool.give(payload);
            }
        });
        let routes = pending.clone();
        tokio::spawn(async move {
            let mut scratch = Vec::new();
            loop {
                let message = match wire::read_frame(&mut reader, 0, &mut scratch).await {
                    Ok(message) => message,
                    Err(FrameError::Closed) => {
                        fail_all("the decode server closed the connection".into());
                        return;
                    }
                    Err(e) => {
                        fail_all(format!("lost the connection to the decode server: {e}"));
                        return;
                    }
                };
                let id = match &message {
                    Message::KvReceived { request_id }
                    | Message::Token { request_id, .. }
                    | Message::Done { request_id, .. } => Some(*request_id),
                    Message::Error { request_id, .. } => *request_id,
                    _ => None,
                };
                match id {
                    Some(id) => {
                        let waiter = routes.lock().expect("pending lock").get(&id).cloned();
                        if let Some(waiter) = waiter {
                            let _ = waiter.send(message);
                        }
                    }
                    None => {
                        let why = match message {
                            Message::Error { message, .. } => {
                                format!("the decode server failed: {message}")
                            }
                            other => {
                                format!("unexpected message from the decode server: {other:?}")
                            }
                        };
                        fail_all(why);
                        return;
                    }
                }
            }
        });
        Ok(DecodeLink {
            outgoing,
            pending,
            dead,
        })
    }

    fn register(&self, id: u64) -> UnboundedReceiver<Message> {
        let (tx, rx) = unbounded_channel();
        self.pending.lock().expect("pending lock").insert(id, tx);
        rx
    }

    fn forget(&self, id: u64) {
        self.pending.lock().expect("pending lock").remove(&id);
    }
}

/// A prefill server: one model, one link to a decode server, many clients.
pub struct PrefillServer {
    model: Mutex<Llama>,
    tokenizer: Tokenizer,
    fingerprint: ModelFingerprint,
    decode_address: String,
    link: tokio::sync::Mutex<Option<Arc<DecodeLink>>>,
    next_id: AtomicU64,
    pool: BufferPool,
}

impl PrefillServer {
    pub fn new(model: Llama, tokenizer: Tokenizer, decode_address: String) -> Arc<PrefillServer> {
        Arc::new(PrefillServer {
            fingerprint: ModelFingerprint::of(&model),
            model: Mutex::new(model),
            tokenizer,
            decode_address,
            link: tokio::sync::Mutex::new(None),
            next_id: AtomicU64::new(1),
            pool: BufferPool::default(),
        })
    }

    /// Serves clients on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        loop {
            let (stream, _) = listener.accept().await?;
            let server = self.clone();
            tokio::spawn(async move { server.serve_client(stream).await });
        }
    }

    /// The link to the decode server, (re)connecting if there is none or it died.
    async fn link(&self) -> Result<Arc<DecodeLink>, String> {
        let mut guard = self.link.lock().await;
        if let Some(link) = guard.as_ref().filter(|l| !l.dead.load(Ordering::SeqCst)) {
            return Ok(link.clone());
        }
        let link = Arc::new(
            DecodeLink::connect(&self.decode_address, &self.fingerprint, self.pool.clone()).await?,
        );
        *guard = Some(link.clone());
        Ok(link)
    }

    async fn serve_client(self: Arc<Self>, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let (mut reader, mut writer) = stream.into_split();
        let (to_client, mut queue) = unbounded_channel::<Message>();
        tokio::spawn(async move {
            while let Some(message) = queue.recv().await {
                if wire::write_frame(&mut writer, &message, &[]).await.is_err() {
                    return;
                }
            }
        });
        let mut scratch = Vec::new();
        loop {
            match wire::read_frame(&mut reader, 0, &mut scratch).await {
                Ok(Message::Generate {
                    request_id,
                    prompt,
                    max_tokens,
                    ignore_eos,
                    mode,
                }) => {
                    let (server, to_client) = (self.clone(), to_client.clone());
                    tokio::spawn(async move {
                        let params = SamplingParams {
                            max_tokens: max_tokens as usize,
                            ignore_eos,
                            ..SamplingParams::default()
                        };
                        if let Err(message) = server
                            .run_request(request_id, &prompt, params, mode, &to_client)
                            .await
                        {
                            let _ = to_client.send(Message::Error {
                                request_id: Some(request_id),
                                message,
                            });
                        }
                    });
                }
                Ok(other) => {
                    let _ = to_client.send(Message::Error {
                        request_id: None,
                        message: format!(
                            "a prefill server accepts Generate requests, not {other:?}"
                        ),
                    });
                    return;
                }
                Err(FrameError::Closed) => return,
                Err(e) => {
                    let _ = to_client.send(Message::Error {
                        request_id: None,
                        message: format!("bad frame, closing: {e}"),
                    });
                    return;
                }
            }
        }
    }

    /// One request: prefill, ship the KV, relay the decode worker's tokens.
    async fn run_request(
        self: &Arc<Self>,
        client_id: u64,
        text: &str,
        params: SamplingParams,
        mode: TransferMode,
        to_client: &UnboundedSender<Message>,
    ) -> Result<(), String> {
        if mode == TransferMode::Local {
            return Err("local requests run on the decode server alone: send them there".into());
        }
        let prompt = self.tokenizer.encode(text).map_err(|e| e.to_string())?;
        let context = self
            .model
            .lock()
            .expect("model lock")
            .config()
            .max_position_embeddings;
        if prompt.is_empty() || prompt.len() + params.max_tokens > context {
            return Err(format!(
                "the prompt has {} tokens; it must have at least 1 and leave room for {} new ones in the context of {context}",
                prompt.len(),
                params.max_tokens
            ));
        }
        let link = self.link().await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut replies = link.register(id);
        let result = self
            .prefill_and_relay(
                &link,
                id,
                client_id,
                prompt,
                params,
                mode,
                &mut replies,
                to_client,
            )
            .await;
        link.forget(id);
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn prefill_and_relay(
        self: &Arc<Self>,
        link: &Arc<DecodeLink>,
        id: u64,
        client_id: u64,
        prompt: Vec<u32>,
        params: SamplingParams,
        mode: TransferMode,
        replies: &mut UnboundedReceiver<Message>,
        to_client: &UnboundedSender<Message>,
    ) -> Result<(), String> {
        let prompt_tokens = prompt.len();
        let send = |message: Message, payload: Vec<u8>| {
            link.outgoing
                .send(Outgoing { message, payload })
                .map_err(|_| "the connection to the decode server is gone".to_string())
        };
        send(
            Message::KvBegin {
                request_id: id,
                prompt: prompt.clone(),
                max_tokens: params.max_tokens as u32,
                ignore_eos: params.ignore_eos,
            },
            Vec::new(),
        )?;

        // The forward pass runs on a blocking thread; layers leave through the
        // link's writer task while later layers compute.
        let server = self.clone();
        let outgoing = link.outgoing.clone();
        let compute = tokio::task::spawn_blocking(move || {
            let model = server.model.lock().expect("model lock");
            let mut serialize_s = 0.0;
            let mut kv_bytes = 0u64;
            let mut held = Vec::new();
            let ship = |layer: usize,
                        k: &Tensor,
                        v: &Tensor,
                        serialize_s: &mut f64,
                        kv_bytes: &mut u64| {
                let start = Instant::now();
                let mut payload = server.pool.take();
                wire::layer_payload(k, v, &mut payload);
                *serialize_s += start.elapsed().as_secs_f64();
                *kv_bytes += payload.len() as u64;
                let message = Message::KvLayer {
                    request_id: id,
                    layer: layer as u32,
                };
                outgoing.send(Outgoing { message, payload }).is_ok()
            };
            let start = Instant::now();
            let logits = run_prompt(&model, &prompt, &mut |layer, k, v| match mode {
                TransferMode::Layerwise => {
                    ship(layer, k, v, &mut serialize_s, &mut kv_bytes);
                }
                _ => held.push((layer, k.shallow_clone(), v.shallow_clone())),
            });
            let first_token = Sampler::new(&params).sample(&logits);
            let forward_s = start.elapsed().as_secs_f64() - serialize_s;
            for (layer, k, v) in held {
                ship(layer, &k, &v, &mut serialize_s, &mut kv_bytes);
            }
            (
                first_token,
                forward_s,
                serialize_s,
                kv_bytes,
                Instant::now(),
            )
        });
        let (first_token, prefill_s, serialize_s, kv_bytes, sent_at) = compute
            .await
            .map_err(|e| format!("the prefill failed: {e}"))?;
        send(
            Message::KvEnd {
                request_id: id,
                first_token,
            },
            Vec::new(),
        )?;
        // The first token is known now: the client need not wait for the decode worker.
        let text = self.tokenizer.decode(&[first_token]).unwrap_or_default();
        let _ = to_client.send(Message::Token {
            request_id: client_id,
            token: first_token,
            text,
        });

        let mut transfer_exposed_s = 0.0;
        while let Some(reply) = replies.recv().await {
            match reply {
                Message::KvReceived { .. } => transfer_exposed_s = sent_at.elapsed().as_secs_f64(),
                Message::Token { token, text, .. } => {
                    let _ = to_client.send(Message::Token {
                        request_id: client_id,
                        token,
                        text,
                    });
                }
                Message::Done { mut breakdown, .. } => {
                    breakdown.prompt_tokens = prompt_tokens as u32;
                    breakdown.kv_bytes = kv_bytes;
                    breakdown.prefill_s = prefill_s;
                    breakdown.serialize_s = serialize_s;
                    breakdown.transfer_exposed_s = transfer_exposed_s;
                    let _ = to_client.send(Message::Done {
                        request_id: client_id,
                        breakdown,
                    });
                    return Ok(());
                }
                Message::Error { message, .. } => return Err(message),
                other => {
                    return Err(format!(
                        "unexpected reply from the decode server: {other:?}"
                    ))
                }
            }
        }
        Err("the connection to the decode server closed mid-request".into())
    }
}
