//! The decode worker: receives prompts' KV caches and generates the rest.
//!
//! Decode is the memory-bound half of serving: one token per step for many
//! requests at once, so this worker runs the continuous-batching engine of
//! module 1 and feeds it requests whose prompts were prefilled elsewhere
//! (`EngineHandle::submit_prefilled`). Before it accepts a single byte of KV
//! it compares model fingerprints: a cache computed by another model, or in
//! another dtype, would decode into confident nonsense.
//!
//! It also accepts whole `Generate` requests and serves them alone — the
//! local baseline every disaggregated number is compared with.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use module04_rdma::agent::{BackendChoice, TransferAgent};
use module04_rdma::metadata::BackendKind;
use module04_rdma::region::{MemoryRegion, RegionId};
use shared::engine::handle::{EngineHandle, EngineThread, HandleError};
use shared::engine::request::{Request, TokenEvent};
use shared::engine::sampling::SamplingParams;
use shared::engine::{Engine, EngineConfig, EngineError};
use shared::kv::block::BlockId;
use shared::model::llama::Llama;
use shared::model::tokenizer::Tokenizer;
use shared::wire::{self, Breakdown, FrameError, KvAssembler, Message, ModelFingerprint, Prompt};
use tch::Kind;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("cannot start the engine thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("cannot offer one-sided transfer: {0}")]
    Agent(String),
}

/// The transfer backend a decode server should offer for one-sided writes,
/// from its flags: `None` without `--one-sided`, and `None` (with a warning)
/// where writes could not land — the TCP backend's "NIC" is a CPU thread,
/// which cannot write a KV pool in GPU memory. CUDA IPC is the opposite: it
/// shares GPU memory only, so it needs the pool on a GPU.
pub fn one_sided_backend(
    one_sided: bool,
    transfer_backend: &str,
    agent_listen: Option<String>,
    listen: &str,
    device: tch::Device,
) -> Result<Option<BackendChoice>, module04_rdma::agent::AgentError> {
    if !one_sided {
        return Ok(None);
    }
    let agent_listen = agent_listen.unwrap_or_else(|| {
        let host = listen.rsplit_once(':').map_or("127.0.0.1", |(h, _)| h);
        format!("{host}:0")
    });
    let backend = BackendChoice::parse(transfer_backend, &agent_listen)?.resolve();
    if matches!(backend, BackendChoice::Tcp { .. }) && device != tch::Device::Cpu {
        eprintln!(
            "warning: --one-sided over the TCP backend needs the KV pool in host memory; \
             disabled on this GPU (use --device cpu, or an RDMA NIC with GPUDirect)"
        );
        return Ok(None);
    }
    if matches!(backend, BackendChoice::CudaIpc { .. }) && device == tch::Device::Cpu {
        return Err(module04_rdma::agent::AgentError::Backend(
            "--transfer-backend cuda-ipc shares a KV pool in GPU memory: run the decode worker \
             on a GPU (--device cuda:N), or use the tcp backend"
                .into(),
        ));
    }
    Ok(Some(backend))
}

/// A decode server: one engine on its own thread, many connections.
pub struct DecodeServer {
    handle: EngineHandle,
    _engine: EngineThread,
    tokenizer: Tokenizer,
    fingerprint: ModelFingerprint,
    kind: Kind,
    context: usize,
    next_id: AtomicU64,
    max_payload: u64,
    one_sided: Option<OneSidedTarget>,
}

/// The decode worker's side of one-sided transfer (module 4): its KV pool,
/// registered with a transfer agent, so prefill workers write straight into
/// reserved blocks — no frames, no deserialization, no copy on this side.
struct OneSidedTarget {
    agent: TransferAgent,
    region: RegionId,
    block_size: usize,
    pool_slots: usize,
    /// Keeps the pool tensor's storage alive while it is registered (a
    /// `Mutex` only because a tensor handle may not be shared between threads).
    _pool: std::sync::Mutex<tch::Tensor>,
}

/// The requests a connection has handed to the engine: the peer's request
/// id → the engine's, so that a `Cancel` can reach the engine.
type Generating = Arc<std::sync::Mutex<HashMap<u64, u64>>>;

/// Where a prompt's KV is arriving.
enum Arriving {
    /// Layer frames, assembled here.
    Frames(KvAssembler),
    /// One-sided writes into these reserved pool blocks.
    Blocks(Vec<BlockId>),
}

/// A prompt whose KV is arriving.
struct Incoming {
    prompt: Vec<u32>,
    params: SamplingParams,
    kv: Arriving,
    deserialize_s: f64,
    first_token: Option<u32>,
}

impl Arriving {
    fn is_complete(&self) -> bool {
        match self {
            Arriving::Frames(kv) => kv.is_complete(),
            // One-sided writes completed before the prefill worker sent KvEnd.
            Arriving::Blocks(_) => true,
        }
    }
}

impl DecodeServer {
    pub fn new(
        model: Llama,
        tokenizer: Tokenizer,
        config: EngineConfig,
    ) -> Result<Arc<DecodeServer>, StartError> {
        Self::with_one_sided(model, tokenizer, config, None)
    }

    /// As [`DecodeServer::new`]; with a transfer `backend`, the KV pool is
    /// also registered with a transfer agent, for one-sided writes.
    pub fn with_one_sided(
        model: Llama,
        tokenizer: Tokenizer,
        config: EngineConfig,
        backend: Option<BackendChoice>,
    ) -> Result<Arc<DecodeServer>, StartError> {
        let fingerprint = ModelFingerprint::of(&model);
        let (kind, context) = (model.kind(), model.config().max_position_embeddings);
        let eos = model.config().eos_ids();
        let engine = Engine::new(model, config, eos)?;
        let thread = EngineThread::spawn(move || engine)?;
        let one_sided = match backend {
            None => None,
            Some(backend) => {
                let layout = thread
                    .handle()
                    .pool_layout()
                    .map_err(|e| StartError::Agent(e.to_string()))?;
                let name = format!("decode-{}", std::process::id());
                let agent = TransferAgent::new(&name, backend)
                    .map_err(|e| StartError::Agent(e.to_string()))?;
                // SAFETY: `layout.tensor` shares the pool's storage and lives
                // in the server as long as the registration; peers write only
                // blocks reserved for them, which the engine leaves alone
                // until `submit_reserved`.
                let region = agent
                    .register(unsafe { MemoryRegion::of_tensor(&layout.tensor) })
                    .map_err(|e| StartError::Agent(e.to_string()))?;
                Some(OneSidedTarget {
                    agent,
                    region,
                    block_size: layout.block_size,
                    pool_slots: layout.slots_per_layer,
                    _pool: std::sync::Mutex::new(layout.tensor),
                })
            }
        };
        Ok(Arc::new(DecodeServer {
            one_sided,
            handle: thread.handle(),
            _engine: thread,
            tokenizer,
            fingerprint,
            kind,
            context,
            next_id: AtomicU64::new(1),
            max_payload: wire::DEFAULT_MAX_PAYLOAD,
        }))
    }

    /// The backend one-sided writes arrive by, if this server takes them.
    pub fn transfer_backend(&self) -> Option<BackendKind> {
        self.one_sided.as_ref().map(|t| t.agent.backend())
    }

    /// Serves prefill workers and clients on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        loop {
            let (stream, _) = listener.accept().await?;
            let server = self.clone();
            tokio::spawn(async move { server.serve_connection(stream).await });
        }
    }

    async fn serve_connection(self: Arc<Self>, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let (mut reader, mut writer) = stream.into_split();
        let (out, mut queue) = unbounded_channel::<Message>();
        tokio::spawn(async move {
            while let Some(message) = queue.recv().await {
                if wire::write_frame(&mut writer, &message, &[]).await.is_err() {
                    return;
                }
            }
        });
        let mut payload = Vec::new();
        let mut incoming: HashMap<u64, Incoming> = HashMap::new();
        // Requests of this connection in the engine: link id → engine id.
        let generating: Generating = Arc::default();
        loop {
            let message = match wire::read_frame(&mut reader, self.max_payload, &mut payload).await
            {
                Ok(message) => message,
                Err(FrameError::Closed) => return,
                Err(e) => {
                    let _ = out.send(Message::Error {
                        request_id: None,
                        message: format!("bad frame, closing the connection: {e}"),
                    });
                    return;
                }
            };
            let result = match message {
                Message::Hello { fingerprint, .. } => match self.fingerprint.mismatch(&fingerprint)
                {
                    None => {
                        let _ = out.send(Message::Hello {
                            fingerprint: self.fingerprint.clone(),
                            agent: self.one_sided.as_ref().map(|t| t.agent.metadata().encode()),
                        });
                        Ok(())
                    }
                    Some(why) => Err((None, why)),
                },
                Message::KvBegin {
                    request_id,
                    prompt,
                    params,
                    one_sided,
                } => {
                    self.begin(&mut incoming, request_id, prompt, params, one_sided, &out)
                        .await
                }
                Message::KvLayer { request_id, layer } => match incoming.get_mut(&request_id) {
                    Some(Incoming {
                        kv: Arriving::Frames(kv),
                        deserialize_s,
                        ..
                    }) => {
                        let start = Instant::now();
                        let added = kv.add_layer(layer as usize, &payload);
                        *deserialize_s += start.elapsed().as_secs_f64();
                        added.map_err(|e| (Some(request_id), e))
                    }
                    _ => Err((
                        Some(request_id),
                        "KV frames for an unknown or one-sided request".into(),
                    )),
                },
                Message::KvEnd {
                    request_id,
                    first_token,
                } => match incoming.remove(&request_id) {
                    None => Err((Some(request_id), "KvEnd for an unknown request".into())),
                    Some(mut request) if request.kv.is_complete() => {
                        request.first_token = Some(first_token);
                        let _ = out.send(Message::KvReceived { request_id });
                        let engine_id = self.next_id.fetch_add(1, Ordering::Relaxed);
                        generating
                            .lock()
                            .expect("generating lock")
                            .insert(request_id, engine_id);
                        self.clone().continue_request(
                            request_id,
                            engine_id,
                            request,
                            out.clone(),
                            generating.clone(),
                        );
                        Ok(())
                    }
                    Some(_) => Err((Some(request_id), "KvEnd before every layer arrived".into())),
                },
                Message::Generate {
                    request_id,
                    prompt,
                    params,
                    ..
                } => {
                    self.clone()
                        .run_locally(request_id, prompt, params, out.clone());
                    Ok(())
                }
                Message::Cancel { request_id } => {
                    if let Some(request) = incoming.remove(&request_id) {
                        self.release(request);
                    }
                    let engine_id = generating
                        .lock()
                        .expect("generating lock")
                        .remove(&request_id);
                    if let Some(engine_id) = engine_id {
                        self.handle.cancel(engine_id);
                    }
                    Ok(())
                }
                Message::SubscribeKvEvents => {
                    self.publish_kv_events(out.clone());
                    Ok(())
                }
                other => Err((None, format!("a decode server does not accept {other:?}"))),
            };
            if matches!(&result, Err((None, _))) {
                self.release_all(&mut incoming);
            }
            if let Err((request_id, message)) = result {
                let fatal = request_id.is_none();
                let _ = out.send(Message::Error {
                    request_id,
                    message,
                });
                if fatal {
                    return;
                }
            }
        }
    }

    /// Returns the blocks of one-sided requests that never completed.
    fn release_all(&self, incoming: &mut HashMap<u64, Incoming>) {
        for (_, request) in incoming.drain() {
            self.release(request);
        }
    }

    /// Returns a request's reserved blocks, if its KV was arriving one-sided.
    fn release(&self, request: Incoming) {
        if let Arriving::Blocks(blocks) = request.kv {
            self.handle.release_reserved(blocks);
        }
    }

    /// The decode engine's counters (running and waiting requests, blocks).
    pub fn engine_stats(&self) -> Result<shared::engine::metrics::EngineStats, HandleError> {
        self.handle.stats()
    }

    /// Streams the engine's block events to a router on this connection
    /// until either side goes away.
    fn publish_kv_events(&self, out: UnboundedSender<Message>) {
        let Ok(mut events) = self.handle.subscribe_kv_events() else {
            return send_error_all(&out, "the engine has stopped");
        };
        tokio::spawn(async move {
            while let Some(events) = events.recv().await {
                if out.send(Message::KvEvents { events }).is_err() {
                    return;
                }
            }
        });
    }

    async fn begin(
        &self,
        incoming: &mut HashMap<u64, Incoming>,
        request_id: u64,
        prompt: Vec<u32>,
        params: SamplingParams,
        one_sided: bool,
        out: &UnboundedSender<Message>,
    ) -> Result<(), (Option<u64>, String)> {
        if prompt.is_empty() || prompt.len() + params.max_tokens > self.context {
            return Err((
                Some(request_id),
                format!(
                    "a prompt of {} tokens plus {} new ones does not fit the context of {}",
                    prompt.len(),
                    params.max_tokens,
                    self.context
                ),
            ));
        }
        let kv = if one_sided {
            let Some(target) = &self.one_sided else {
                return Err((
                    Some(request_id),
                    "this decode server takes no one-sided writes: start it with --one-sided"
                        .into(),
                ));
            };
            let (handle, len) = (self.handle.clone(), prompt.len());
            let engine_id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let blocks = tokio::task::spawn_blocking(move || handle.reserve(engine_id, len))
                .await
                .map_err(|e| (Some(request_id), e.to_string()))?
                .map_err(|e| (Some(request_id), e.to_string()))?;
            let _ = out.send(Message::KvPlacement {
                request_id,
                blocks: blocks.iter().map(|b| b.0).collect(),
                region: target.region.0,
                block_size: target.block_size as u32,
                pool_slots: target.pool_slots as u64,
            });
            Arriving::Blocks(blocks)
        } else {
            let f = &self.fingerprint;
            Arriving::Frames(KvAssembler::new(
                f.layers as usize,
                prompt.len(),
                f.kv_heads as usize,
                f.head_dim as usize,
                self.kind,
            ))
        };
        incoming.insert(
            request_id,
            Incoming {
                prompt,
                params,
                kv,
                deserialize_s: 0.0,
                first_token: None,
            },
        );
        Ok(())
    }

    /// Hands a fully received prompt to the engine and streams its tokens back.
    fn continue_request(
        self: Arc<Self>,
        request_id: u64,
        engine_id: u64,
        request: Incoming,
        out: UnboundedSender<Message>,
        generating: Generating,
    ) {
        tokio::spawn(async move {
            let first_token = request.first_token.expect("set before continuing");
            let engine_request = Request::new(engine_id, request.prompt, request.params);
            let handle = self.handle.clone();
            let submitted = Instant::now();
            let kv = request.kv;
            let events = match submit(move || match kv {
                Arriving::Frames(kv) => {
                    handle.submit_prefilled(engine_request, first_token, kv.into_tensor())
                }
                Arriving::Blocks(blocks) => {
                    handle.submit_reserved(engine_request, first_token, blocks)
                }
            })
            .await
            {
                Ok(events) => events,
                Err(message) => return send_error(&out, request_id, message),
            };
            let breakdown = Breakdown {
                deserialize_s: request.deserialize_s,
                ..Breakdown::default()
            };
            self.stream_tokens(
                request_id,
                engine_id,
                vec![first_token],
                events,
                submitted,
                breakdown,
                out,
            )
            .await;
            generating
                .lock()
                .expect("generating lock")
                .remove(&request_id);
        });
    }

    /// The baseline: prefill and decode here, no transfer.
    fn run_locally(
        self: Arc<Self>,
        request_id: u64,
        prompt: Prompt,
        params: SamplingParams,
        out: UnboundedSender<Message>,
    ) {
        tokio::spawn(async move {
            let prompt = match prompt.into_tokens(&self.tokenizer) {
                Ok(p) => p,
                Err(e) => return send_error(&out, request_id, e),
            };
            let engine_id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let handle = self.handle.clone();
            let submitted = Instant::now();
            let prompt_tokens = prompt.len() as u32;
            let events = match submit(move || {
                handle.submit(Request::new(engine_id, prompt, params))
            })
            .await
            {
                Ok(events) => events,
                Err(message) => return send_error(&out, request_id, message),
            };
            let breakdown = Breakdown {
                prompt_tokens,
                ..Breakdown::default()
            };
            self.stream_tokens(
                request_id,
                engine_id,
                Vec::new(),
                events,
                submitted,
                breakdown,
                out,
            )
            .await;
        });
    }

    /// Relays the engine's events as Token frames, then Done with timings.
    /// If the connection is gone (the client hung up, or stopped reading at a
    /// stop string), the request is cancelled: its slot and blocks go to others.
    #[allow(clippy::too_many_arguments)]
    async fn stream_tokens(
        &self,
        request_id: u64,
        engine_id: u64,
        already: Vec<u32>,
        mut events: UnboundedReceiver<TokenEvent>,
        submitted: Instant,
        mut breakdown: Breakdown,
        out: UnboundedSender<Message>,
    ) {
        let mut decoder = self.tokenizer.stream_decoder();
        for &token in &already {
            let _ = decoder.push(token);
        }
        let mut first_at = None;
        let mut count = already.len() as u32;
        while let Some(event) = events.recv().await {
            match event {
                TokenEvent::Token { token, .. } => {
                    first_at.get_or_insert_with(Instant::now);
                    count += 1;
                    let text = decoder.push(token).ok().flatten().unwrap_or_default();
                    let sent = out.send(Message::Token {
                        request_id,
                        token,
                        text,
                    });
                    if sent.is_err() {
                        self.handle.cancel(engine_id);
                        return;
                    }
                }
                TokenEvent::Finished { metrics, .. } => {
                    let end = Instant::now();
                    breakdown.output_tokens = count;
                    breakdown.cached_prompt_tokens = metrics.cached_prompt_tokens as u32;
                    if already.is_empty() {
                        // Local: the engine did the prefill too.
                        breakdown.prefill_s = metrics.prefill_time.map_or(0.0, |d| d.as_secs_f64());
                        breakdown.decode_s = metrics.decode_time.as_secs_f64();
                    } else {
                        let first = first_at.unwrap_or(end);
                        breakdown.first_decode_step_s = (first - submitted).as_secs_f64();
                        breakdown.decode_s = (end - first).as_secs_f64();
                    }
                    let _ = out.send(Message::Done {
                        request_id,
                        breakdown,
                    });
                    return;
                }
            }
        }
        send_error(&out, request_id, "the engine stopped mid-request".into());
    }
}

/// Runs a (blocking) submission to the engine thread off the async runtime.
async fn submit(
    call: impl FnOnce() -> Result<UnboundedReceiver<TokenEvent>, HandleError> + Send + 'static,
) -> Result<UnboundedReceiver<TokenEvent>, String> {
    match tokio::task::spawn_blocking(call).await {
        Ok(Ok(events)) => Ok(events),
        Ok(Err(e)) => Err(format!("the decode engine refused the request: {e}")),
        Err(e) => Err(format!("the decode engine failed: {e}")),
    }
}

fn send_error_all(out: &UnboundedSender<Message>, message: &str) {
    let _ = out.send(Message::Error {
        request_id: None,
        message: message.to_string(),
    });
}

fn send_error(out: &UnboundedSender<Message>, request_id: u64, message: String) {
    let _ = out.send(Message::Error {
        request_id: Some(request_id),
        message,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_sided_backend_follows_where_the_kv_pool_lives() {
        let cpu = tch::Device::Cpu;
        let gpu = tch::Device::Cuda(0);
        let choose = |one_sided, backend: &str, device| {
            one_sided_backend(one_sided, backend, None, "127.0.0.1:7801", device)
        };
        assert!(choose(false, "cuda-ipc", cpu).unwrap().is_none());
        assert!(matches!(
            choose(true, "tcp", cpu).unwrap(),
            Some(BackendChoice::Tcp { listen }) if listen == "127.0.0.1:0"
        ));
        // A CPU thread cannot write GPU memory: TCP one-sided is turned off on a GPU.
        assert!(choose(true, "tcp", gpu).unwrap().is_none());
        assert!(matches!(
            choose(true, "cuda-ipc", gpu).unwrap(),
            Some(BackendChoice::CudaIpc { .. })
        ));
        // CUDA IPC shares GPU memory only.
        let err = choose(true, "cuda-ipc", cpu).unwrap_err();
        assert!(err.to_string().contains("--device cuda:N"), "{err}");
        assert!(choose(true, "carrier-pigeon", cpu).is_err());
    }
}
