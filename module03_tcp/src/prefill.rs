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

use module04_rdma::agent::{AgentError, BackendChoice, TransferAgent};
use module04_rdma::metadata::AgentMetadata;
use module04_rdma::region::{Descriptor, MemoryRegion, RegionId};
use shared::engine::sampling::{Sampler, SamplingParams};
use shared::model::llama::{causal_attention, AttentionCache, Llama};
use shared::model::tokenizer::Tokenizer;
use shared::wire::{self, FrameError, Message, ModelFingerprint, Prompt, TransferMode};
use tch::{Kind, Tensor};
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
    /// The decode worker's transfer agent, loaded into ours, if it offers one.
    remote_agent: Option<String>,
}

impl DecodeLink {
    async fn connect(
        address: &str,
        fingerprint: &ModelFingerprint,
        pool: BufferPool,
        agent: &TransferAgent,
    ) -> Result<DecodeLink, String> {
        let unreachable = |e: &dyn std::fmt::Display| {
            format!(
                "cannot reach the decode server at {address}: {e}. Is a decode server (`module03_tcp decode`, or a module 6 decode worker) listening there?"
            )
        };
        let stream = TcpStream::connect(address)
            .await
            .map_err(|e| unreachable(&e))?;
        stream.set_nodelay(true).map_err(|e| unreachable(&e))?;
        let (mut reader, mut writer) = stream.into_split();
        let hello = Message::Hello {
            fingerprint: fingerprint.clone(),
            agent: None,
        };
        wire::write_frame(&mut writer, &hello, &[])
            .await
            .map_err(|e| unreachable(&e))?;
        let mut scratch = Vec::new();
        let mut remote_agent = None;
        match wire::read_frame(&mut reader, 0, &mut scratch).await {
            Ok(Message::Hello {
                fingerprint: theirs,
                agent: offered,
            }) => {
                if let Some(why) = fingerprint.mismatch(&theirs) {
                    return Err(why);
                }
                if let Some(bytes) = offered {
                    remote_agent = Some(load_decode_agent(agent, &bytes, address)?);
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
                    | Message::KvPlacement { request_id, .. }
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
            remote_agent,
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

/// Loads the decode worker's agent metadata into ours. The decode worker
/// may have bound its agent to a wildcard address (0.0.0.0); it is reached
/// on the host this link already connected to.
fn load_decode_agent(
    agent: &TransferAgent,
    bytes: &[u8],
    decode_address: &str,
) -> Result<String, String> {
    let mut metadata = AgentMetadata::decode(bytes).map_err(|e| e.to_string())?;
    if let (Some((host, _)), Some((_, port))) = (
        decode_address.rsplit_once(':'),
        metadata.address.rsplit_once(':'),
    ) {
        metadata.address = format!("{host}:{port}");
    }
    agent
        .load_remote(&metadata)
        .map_err(|e| format!("cannot connect to the decode worker's transfer agent: {e}"))?;
    Ok(metadata.name)
}

/// Where the decode worker wants a one-sided request's KV.
struct Placement {
    blocks: Vec<u32>,
    region: RegionId,
    block_size: usize,
    pool_slots: usize,
}

/// Memory the prefill worker stages a prompt's KV in for one-sided writes,
/// registered with its agent once at start-up: host memory for the TCP and
/// RDMA backends, memory of the model's GPU for CUDA IPC (whose writes go
/// GPU to GPU).
struct Staging {
    region: RegionId,
    memory: Arc<MemoryRegion>,
    device: tch::Device,
    /// Keeps GPU staging memory alive while registered (a `Mutex` only
    /// because a tensor handle may not be shared between threads).
    _gpu: Option<Mutex<Tensor>>,
}

/// One client request, as a prefill server receives it.
struct ClientRequest {
    id: u64,
    prompt: Prompt,
    params: SamplingParams,
    mode: TransferMode,
    /// The decode worker to ship the KV to (else the server's default).
    decode: Option<String>,
}

/// A prefill server: one model, a link to each decode server it ships KV
/// to, many clients.
pub struct PrefillServer {
    /// Locked by the blocking thread that runs a prefill — never from an
    /// async task, where waiting for a long forward pass would stall the
    /// runtime (and with it every connection and the etcd keep-alive).
    model: Mutex<Llama>,
    /// The model's context length, read once (so no task takes the lock for it).
    context: usize,
    tokenizer: Tokenizer,
    fingerprint: ModelFingerprint,
    /// Where KV goes when a request names no decode worker.
    default_decode: Option<String>,
    links: tokio::sync::Mutex<HashMap<String, Arc<DecodeLink>>>,
    next_id: AtomicU64,
    pool: BufferPool,
    agent: TransferAgent,
    staging: Staging,
}

/// Bytes of host memory staged for one-sided transfers, unless told otherwise.
pub const DEFAULT_STAGING_BYTES: usize = 256 << 20;

impl PrefillServer {
    /// A prefill server whose one-sided transfers use the TCP backend.
    /// Requests that name no decode worker go to `decode_address`, if any.
    pub fn new(
        model: Llama,
        tokenizer: Tokenizer,
        decode_address: Option<String>,
    ) -> Arc<PrefillServer> {
        let tcp = BackendChoice::Tcp {
            listen: "127.0.0.1:0".into(),
        };
        Self::with_staging(model, tokenizer, decode_address, DEFAULT_STAGING_BYTES, tcp)
            .expect("a transfer agent on loopback starts")
    }

    /// As [`PrefillServer::new`], with `staging_bytes` of memory for
    /// one-sided transfers (the largest prompt KV it can send that way),
    /// registered with a transfer agent on `backend`: host memory, or with
    /// `BackendChoice::CudaIpc` memory of the model's GPU. The prefill side
    /// only initiates writes, so its agent's listen address is never dialled.
    pub fn with_staging(
        model: Llama,
        tokenizer: Tokenizer,
        decode_address: Option<String>,
        staging_bytes: usize,
        backend: BackendChoice,
    ) -> Result<Arc<PrefillServer>, AgentError> {
        static AGENTS: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "prefill-{}-{}",
            std::process::id(),
            AGENTS.fetch_add(1, Ordering::Relaxed)
        );
        let on_gpu = matches!(backend, BackendChoice::CudaIpc { .. });
        let device = if on_gpu {
            model.device()
        } else {
            tch::Device::Cpu
        };
        if on_gpu && device == tch::Device::Cpu {
            return Err(AgentError::Backend(
                "the cuda-ipc transfer backend moves KV from GPU to GPU: run the prefill worker \
                 on a GPU (--device cuda:N), or use the tcp backend"
                    .into(),
            ));
        }
        let agent = TransferAgent::new(&name, backend)?;
        let gpu = on_gpu.then(|| Tensor::zeros([staging_bytes as i64], (Kind::Uint8, device)));
        let region = match &gpu {
            // SAFETY: the tensor is kept in `Staging` as long as the agent.
            Some(tensor) => agent.register(unsafe { MemoryRegion::of_tensor(tensor) })?,
            None => agent.register(MemoryRegion::alloc(staging_bytes))?,
        };
        let memory = agent.region(region).expect("just registered");
        Ok(Arc::new(PrefillServer {
            agent,
            staging: Staging {
                region,
                memory,
                device,
                _gpu: gpu.map(Mutex::new),
            },
            fingerprint: ModelFingerprint::of(&model),
            context: model.config().max_position_embeddings,
            model: Mutex::new(model),
            tokenizer,
            default_decode: decode_address,
            links: tokio::sync::Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            pool: BufferPool::default(),
        }))
    }

    /// Serves clients on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        loop {
            let (stream, _) = listener.accept().await?;
            let server = self.clone();
            tokio::spawn(async move { server.serve_client(stream).await });
        }
    }

    /// The link to decode server `address`, (re)connecting if there is none
    /// or it died.
    async fn link(&self, address: &str) -> Result<Arc<DecodeLink>, String> {
        let mut links = self.links.lock().await;
        if let Some(link) = links
            .get(address)
            .filter(|l| !l.dead.load(Ordering::SeqCst))
        {
            return Ok(link.clone());
        }
        let link = Arc::new(
            DecodeLink::connect(address, &self.fingerprint, self.pool.clone(), &self.agent).await?,
        );
        links.insert(address.to_string(), link.clone());
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
                    params,
                    mode,
                    decode,
                }) => {
                    let (server, to_client) = (self.clone(), to_client.clone());
                    tokio::spawn(async move {
                        let request = ClientRequest {
                            id: request_id,
                            prompt,
                            params,
                            mode,
                            decode,
                        };
                        if let Err(message) = server.run_request(request, &to_client).await {
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

    /// Copies every layer's K and V into the registered staging memory,
    /// laid out `[layers, 2, tokens, kv_heads, head_dim]` (one copy).
    /// Returns the bytes staged.
    fn stage(&self, layers: &[(usize, Tensor, Tensor)]) -> Result<u64, String> {
        let Some((_, k0, _)) = layers.first() else {
            return Ok(0);
        };
        let (_, heads, tokens, dim) = k0.size4().expect("K is [1, kv_heads, tokens, head_dim]");
        let kind = k0.kind();
        let bytes = layers.len() * 2 * (tokens * heads * dim) as usize * kind.elt_size_in_bytes();
        if bytes > self.staging.memory.len() {
            return Err(format!(
                "this prompt's KV ({} MiB) exceeds the one-sided staging memory ({} MiB); use mode bulk or layerwise",
                bytes >> 20,
                self.staging.memory.len() >> 20
            ));
        }
        // SAFETY: the staging memory is ours; the model lock held by the
        // caller means no other request stages or sends from it now.
        let view = unsafe {
            Tensor::from_blob(
                self.staging.memory.as_ptr(),
                &[layers.len() as i64, 2, tokens, heads, dim],
                &[],
                kind,
                self.staging.device,
            )
        };
        for (layer, k, v) in layers {
            view.get(*layer as i64)
                .copy_(&Tensor::stack(&[k.get(0), v.get(0)], 0).transpose(1, 2));
        }
        Ok(bytes as u64)
    }

    // ANCHOR: write_one_sided
    /// One-sided writes of the staged KV into the decode worker's reserved
    /// blocks: for every layer, K and V, and block, one contiguous span.
    fn write_one_sided(
        &self,
        peer: &str,
        to: &Placement,
        layers: &[(usize, Tensor, Tensor)],
    ) -> Result<(), String> {
        let Some((_, k0, _)) = layers.first() else {
            return Ok(());
        };
        let (_, heads, tokens, dim) = k0.size4().expect("K is [1, kv_heads, tokens, head_dim]");
        let tokens = tokens as usize;
        let slot = (heads * dim) as usize * k0.kind().elt_size_in_bytes();
        let mut pairs = Vec::with_capacity(layers.len() * 2 * to.blocks.len());
        for layer in 0..layers.len() {
            for which in 0..2 {
                for (j, &block) in to.blocks.iter().enumerate() {
                    let first = j * to.block_size;
                    if first >= tokens {
                        break;
                    }
                    let n = to.block_size.min(tokens - first);
                    let local = ((layer * 2 + which) * tokens + first) * slot;
                    let target = ((layer * 2 + which) * to.pool_slots
                        + block as usize * to.block_size)
                        * slot;
                    pairs.push((
                        Descriptor::new(self.staging.region, local as u64, (n * slot) as u64),
                        Descriptor::new(to.region, target as u64, (n * slot) as u64),
                    ));
                }
            }
        }
        self.agent
            .write(peer, &pairs, b"")
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
    // ANCHOR_END: write_one_sided

    /// One request: prefill, ship the KV, relay the decode worker's tokens.
    async fn run_request(
        self: &Arc<Self>,
        request: ClientRequest,
        to_client: &UnboundedSender<Message>,
    ) -> Result<(), String> {
        let ClientRequest {
            id: client_id,
            prompt,
            params,
            mode,
            decode,
        } = request;
        if mode == TransferMode::Local {
            return Err("local requests run on the decode server alone: send them there".into());
        }
        let Some(decode) = decode.or_else(|| self.default_decode.clone()) else {
            return Err("no decode worker named: this prefill server was started without --decode, so each request must name one".into());
        };
        let prompt = prompt.into_tokens(&self.tokenizer)?;
        let context = self.context;
        if prompt.is_empty() || prompt.len() + params.max_tokens > context {
            return Err(format!(
                "the prompt has {} tokens; it must have at least 1 and leave room for {} new ones in the context of {context}",
                prompt.len(),
                params.max_tokens
            ));
        }
        let link = self.link(&decode).await?;
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
        let one_sided = mode == TransferMode::OneSided;
        if one_sided && link.remote_agent.is_none() {
            return Err("the decode server offers no transfer agent: start it with --one-sided to use mode onesided".into());
        }
        send(
            Message::KvBegin {
                request_id: id,
                prompt: prompt.clone(),
                params: params.clone(),
                one_sided,
            },
            Vec::new(),
        )?;
        // One-sided: the decode worker answers with the blocks to write into.
        let placement = if one_sided {
            match replies.recv().await {
                Some(Message::KvPlacement {
                    blocks,
                    region,
                    block_size,
                    pool_slots,
                    ..
                }) => Some(Placement {
                    blocks,
                    region: RegionId(region),
                    block_size: block_size as usize,
                    pool_slots: pool_slots as usize,
                }),
                Some(Message::Error { message, .. }) => return Err(message),
                Some(other) => return Err(format!("expected KvPlacement, got {other:?}")),
                None => return Err("the connection to the decode server closed".into()),
            }
        } else {
            None
        };
        let remote_agent = link.remote_agent.clone();

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
            let mut one_sided_s = 0.0;
            match (&placement, &remote_agent) {
                (Some(placement), Some(peer)) => {
                    let start = Instant::now();
                    kv_bytes = server.stage(&held)?;
                    serialize_s += start.elapsed().as_secs_f64();
                    let start = Instant::now();
                    server.write_one_sided(peer, placement, &held)?;
                    one_sided_s = start.elapsed().as_secs_f64();
                }
                _ => {
                    for (layer, k, v) in &held {
                        ship(*layer, k, v, &mut serialize_s, &mut kv_bytes);
                    }
                }
            }
            Ok::<_, String>((
                first_token,
                forward_s,
                serialize_s,
                kv_bytes,
                one_sided_s,
                Instant::now(),
            ))
        });
        let (first_token, prefill_s, serialize_s, kv_bytes, one_sided_s, sent_at) = compute
            .await
            .map_err(|e| format!("the prefill failed: {e}"))??;
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

        // One-sided writes completed before the compute thread returned: their
        // time is exposed transfer; KvReceived then only confirms.
        let mut transfer_exposed_s = one_sided_s;
        while let Some(reply) = replies.recv().await {
            match reply {
                Message::KvReceived { .. } => transfer_exposed_s += sent_at.elapsed().as_secs_f64(),
                Message::Token { token, text, .. } => {
                    let sent = to_client.send(Message::Token {
                        request_id: client_id,
                        token,
                        text,
                    });
                    if sent.is_err() {
                        // The client is gone: free the decode worker's slot.
                        let _ = send(Message::Cancel { request_id: id }, Vec::new());
                        return Err("the client went away; the request was cancelled".into());
                    }
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
