//! The wire protocol between clients, prefill workers and decode workers.
//!
//! Every message travels as one **frame**:
//!
//! ```text
//! ┌───────┬─────────┬────────────┬─────────────┬──────────────────┬───────────────┐
//! │ magic │ version │ header len │ payload len │ header (bincode) │ payload bytes │
//! │ SDKV  │ u16 LE  │ u32 LE     │ u64 LE      │ a `Message`      │ raw KV bytes  │
//! └───────┴─────────┴────────────┴─────────────┴──────────────────┴───────────────┘
//! ```
//!
//! The header is a small `Message` encoded with bincode; the payload is the
//! raw bytes of one layer's K and V, written straight from the tensor's
//! memory and read straight into a buffer — never passed through bincode,
//! which would copy it once more. Both lengths are checked against hard caps
//! *before* anything is allocated, so a corrupt or hostile peer cannot make
//! a worker allocate gigabytes; a wrong magic or version fails at once with
//! a sentence saying so.
//!
//! KV caches are only meaningful to the exact model that computed them, so
//! every connection starts with a [`Message::Hello`] carrying a
//! [`ModelFingerprint`], and a decode worker refuses KV from any other model.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::engine::sampling::SamplingParams;
use crate::kv::prefix_cache::NumberedKvEvent;
use crate::model::llama::Llama;
use crate::model::tokenizer::Tokenizer;

pub const MAGIC: [u8; 4] = *b"SDKV";
/// Bumped whenever a frame or message changes shape.
pub const PROTOCOL_VERSION: u16 = 3;
/// Bytes before the header: magic, version, two lengths.
pub const PREFIX_LEN: usize = 4 + 2 + 4 + 8;
/// Headers are small (ids, token lists, timings); anything bigger is corrupt.
pub const MAX_HEADER_BYTES: u32 = 1 << 20;
/// Default cap on one payload (one layer's KV): 1 GiB.
pub const DEFAULT_MAX_PAYLOAD: u64 = 1 << 30;

/// Which model (and dtype) a worker runs; KV crosses only between equals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelFingerprint {
    /// [`Llama::fingerprint`]: configuration, dtype and a sample of the weights.
    pub weights: u64,
    pub layers: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub dtype: String,
}

impl ModelFingerprint {
    pub fn of(model: &Llama) -> ModelFingerprint {
        let c = model.config();
        ModelFingerprint {
            weights: model.fingerprint(),
            layers: c.num_hidden_layers as u32,
            kv_heads: c.num_kv_heads() as u32,
            head_dim: c.head_dim() as u32,
            dtype: crate::device::kind_name(model.kind()).to_string(),
        }
    }

    /// Why `other`'s KV cannot be used here, or `None` if it can.
    pub fn mismatch(&self, other: &ModelFingerprint) -> Option<String> {
        if self == other {
            return None;
        }
        Some(format!(
            "the peer runs a different model: its KV cache ({} layers, {} KV heads × {}, {}, weights {:016x}) \
             does not fit this worker's ({} layers, {} KV heads × {}, {}, weights {:016x}); \
             start both workers with the same --model and --dtype",
            other.layers, other.kv_heads, other.head_dim, other.dtype, other.weights,
            self.layers, self.kv_heads, self.head_dim, self.dtype, self.weights
        ))
    }
}

/// A prompt as text, which the worker tokenizes, or as token ids, from a
/// frontend that tokenized it already (to count it and hash its blocks).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

impl Prompt {
    /// The prompt's token ids: text is tokenized, ids are checked against
    /// the vocabulary (an id out of range would index past the embedding table).
    pub fn into_tokens(self, tokenizer: &Tokenizer) -> Result<Vec<u32>, String> {
        let tokens = match self {
            Prompt::Text(text) => tokenizer.encode(&text).map_err(|e| e.to_string())?,
            Prompt::Tokens(tokens) => {
                let vocab = tokenizer.vocab_size();
                if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
                    return Err(format!(
                        "token id {bad} is outside the vocabulary of {vocab} tokens"
                    ));
                }
                tokens
            }
        };
        if tokens.is_empty() {
            return Err("the prompt is empty".into());
        }
        Ok(tokens)
    }
}

/// How the prefill worker ships a prompt's KV.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransferMode {
    /// No transfer: one worker prefills and decodes (the baseline).
    Local,
    /// All layers after the whole prefill has finished.
    Bulk,
    /// Each layer as soon as its part of the prefill is done, overlapping
    /// the transfer with the remaining layers' compute.
    Layerwise,
    /// One-sided writes straight into the decode worker's reserved pool
    /// blocks (module 4's transfer agent), after the forward pass.
    OneSided,
}

impl TransferMode {
    pub fn name(self) -> &'static str {
        match self {
            TransferMode::Local => "local",
            TransferMode::Bulk => "bulk",
            TransferMode::Layerwise => "layerwise",
            TransferMode::OneSided => "onesided",
        }
    }
}

/// Where one request's time went, filled in along the path.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Breakdown {
    pub prompt_tokens: u32,
    /// Prompt tokens whose KV the worker's prefix cache already held
    /// (0 in results saved before it was reported).
    #[serde(default)]
    pub cached_prompt_tokens: u32,
    pub output_tokens: u32,
    pub kv_bytes: u64,
    /// Prefill worker: the forward pass over the prompt.
    pub prefill_s: f64,
    /// Prefill worker: tensor → send buffers, all layers.
    pub serialize_s: f64,
    /// Prefill worker: from the end of the forward pass until the decode
    /// worker confirmed it holds every layer — the transfer time prefill did
    /// not hide.
    pub transfer_exposed_s: f64,
    /// Decode worker: received bytes → KV tensor, all layers.
    pub deserialize_s: f64,
    /// Decode worker: handing the KV to the engine until its first new token.
    pub first_decode_step_s: f64,
    /// Decode worker: the remaining tokens.
    pub decode_s: f64,
    /// Client: request sent → last token received.
    pub total_s: f64,
    /// Client: request sent → first token received.
    pub ttft_s: f64,
}

impl Breakdown {
    /// The time disaggregation added: serialization, exposed transfer, deserialization.
    pub fn transfer_overhead_s(&self) -> f64 {
        self.serialize_s + self.transfer_exposed_s + self.deserialize_s
    }
}

/// Everything that travels, as the header of a frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// First frame on every connection, both ways. A decode worker that
    /// accepts one-sided writes adds its transfer agent's metadata.
    Hello {
        fingerprint: ModelFingerprint,
        agent: Option<Vec<u8>>,
    },
    /// Client → prefill worker (or → decode worker, for the local baseline).
    /// A prefill worker ships the KV to `decode`, or to the decode worker it
    /// was started with when `decode` is `None`.
    Generate {
        request_id: u64,
        prompt: Prompt,
        params: SamplingParams,
        mode: TransferMode,
        decode: Option<String>,
    },
    /// Prefill → decode: a prompt's KV follows in one [`Message::KvLayer`]
    /// frame per layer, then [`Message::KvEnd`].
    /// With `one_sided`, no KvLayer frames follow: the decode worker
    /// answers with [`Message::KvPlacement`] and the prefill worker writes
    /// the KV into those blocks through its transfer agent.
    KvBegin {
        request_id: u64,
        prompt: Vec<u32>,
        params: SamplingParams,
        one_sided: bool,
    },
    /// Decode → prefill: where a one-sided request's KV goes — the reserved
    /// pool blocks, and the pool's geometry (the agent region holding it,
    /// tokens per block, slots per layer's K or V) to turn them into byte offsets.
    KvPlacement {
        request_id: u64,
        blocks: Vec<u32>,
        region: u32,
        block_size: u32,
        pool_slots: u64,
    },
    /// Prefill → decode: the payload is layer `layer`'s K then V, each
    /// `[tokens, kv_heads, head_dim]` in the fingerprint's dtype.
    KvLayer { request_id: u64, layer: u32 },
    /// Prefill → decode: the prefill is complete and chose `first_token`.
    KvEnd { request_id: u64, first_token: u32 },
    /// Decode → prefill: every layer has arrived.
    KvReceived { request_id: u64 },
    /// A generated token, with its text (toward the client).
    Token {
        request_id: u64,
        token: u32,
        text: String,
    },
    /// The request ended; its time breakdown so far.
    Done {
        request_id: u64,
        breakdown: Breakdown,
    },
    /// Prefill → decode: the client of this request went away (it hung up,
    /// or a stop string ended it); stop generating.
    Cancel { request_id: u64 },
    /// Router → worker: stream me your prefix cache's block events. The
    /// connection then carries only [`Message::KvEvents`], starting with a
    /// snapshot of every block cached now.
    SubscribeKvEvents,
    /// Worker → router: stored and removed blocks, numbered by the worker.
    KvEvents { events: Vec<NumberedKvEvent> },
    /// Something failed; `request_id` is `None` when the whole connection is doomed.
    Error {
        request_id: Option<u64>,
        message: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    #[error("the peer closed the connection")]
    Closed,
    #[error(
        "not a spark-disagg frame (bad magic {0:02x?}): is the other side a spark-disagg worker?"
    )]
    BadMagic([u8; 4]),
    #[error("the peer speaks protocol version {peer}, this build speaks {ours}: rebuild both sides from the same commit")]
    Version { peer: u16, ours: u16 },
    #[error("frame header of {0} bytes exceeds the {MAX_HEADER_BYTES}-byte cap")]
    HeaderTooLarge(u32),
    #[error("frame payload of {len} bytes exceeds the cap of {cap} bytes")]
    PayloadTooLarge { len: u64, cap: u64 },
    #[error("malformed frame header: {0}")]
    Decode(String),
    #[error("the frame ended after {got} of {expected} bytes")]
    Truncated { got: usize, expected: usize },
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ MAX_HEADER_BYTES as usize }>()
}

/// Parses the fixed prefix; returns the header and payload lengths.
pub fn parse_prefix(prefix: &[u8; PREFIX_LEN], max_payload: u64) -> Result<(u32, u64), FrameError> {
    let magic: [u8; 4] = prefix[0..4].try_into().expect("4 bytes");
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    let version = u16::from_le_bytes(prefix[4..6].try_into().expect("2 bytes"));
    if version != PROTOCOL_VERSION {
        return Err(FrameError::Version {
            peer: version,
            ours: PROTOCOL_VERSION,
        });
    }
    let header_len = u32::from_le_bytes(prefix[6..10].try_into().expect("4 bytes"));
    let payload_len = u64::from_le_bytes(prefix[10..18].try_into().expect("8 bytes"));
    if header_len > MAX_HEADER_BYTES {
        return Err(FrameError::HeaderTooLarge(header_len));
    }
    if payload_len > max_payload {
        return Err(FrameError::PayloadTooLarge {
            len: payload_len,
            cap: max_payload,
        });
    }
    Ok((header_len, payload_len))
}

fn decode_header(bytes: &[u8]) -> Result<Message, FrameError> {
    let (message, used) = bincode::serde::decode_from_slice(bytes, bincode_config())
        .map_err(|e| FrameError::Decode(e.to_string()))?;
    if used != bytes.len() {
        return Err(FrameError::Decode(format!(
            "{} stray bytes after the message",
            bytes.len() - used
        )));
    }
    Ok(message)
}

/// Encodes a frame into one buffer (header and payload together). Used for
/// small frames and by tests; [`write_frame`] avoids copying the payload.
pub fn encode_frame(message: &Message, payload: &[u8]) -> Vec<u8> {
    let header = bincode::serde::encode_to_vec(message, bincode_config()).expect("messages encode");
    let mut out = Vec::with_capacity(PREFIX_LEN + header.len() + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(payload);
    out
}

/// Decodes one frame from the start of `bytes`; returns the message, its
/// payload and the bytes used. The synchronous twin of [`read_frame`], for
/// tests and the fuzz target.
pub fn decode_frame(bytes: &[u8], max_payload: u64) -> Result<(Message, &[u8], usize), FrameError> {
    let prefix: &[u8; PREFIX_LEN] = bytes
        .get(..PREFIX_LEN)
        .and_then(|p| p.try_into().ok())
        .ok_or(FrameError::Truncated {
            got: bytes.len(),
            expected: PREFIX_LEN,
        })?;
    let (header_len, payload_len) = parse_prefix(prefix, max_payload)?;
    let header_end = PREFIX_LEN + header_len as usize;
    let end = header_end + payload_len as usize;
    if bytes.len() < end {
        return Err(FrameError::Truncated {
            got: bytes.len(),
            expected: end,
        });
    }
    let message = decode_header(&bytes[PREFIX_LEN..header_end])?;
    Ok((message, &bytes[header_end..end], end))
}

/// Writes one frame. The payload is written from the caller's buffer as is.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    message: &Message,
    payload: &[u8],
) -> Result<(), FrameError> {
    let header = bincode::serde::encode_to_vec(message, bincode_config()).expect("messages encode");
    let mut prefix = [0u8; PREFIX_LEN];
    prefix[0..4].copy_from_slice(&MAGIC);
    prefix[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    prefix[6..10].copy_from_slice(&(header.len() as u32).to_le_bytes());
    prefix[10..18].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    writer.write_all(&prefix).await?;
    writer.write_all(&header).await?;
    writer.write_all(payload).await?;
    writer.flush().await?;
    Ok(())
}

/// Reads one frame; the payload goes into `payload` (resized, its memory
/// reused across calls). A clean end of stream before a frame starts is
/// [`FrameError::Closed`]; anywhere else it is [`FrameError::Truncated`].
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    max_payload: u64,
    payload: &mut Vec<u8>,
) -> Result<Message, FrameError> {
    let mut prefix = [0u8; PREFIX_LEN];
    let mut got = 0;
    while got < PREFIX_LEN {
        match reader.read(&mut prefix[got..]).await? {
            0 if got == 0 => return Err(FrameError::Closed),
            0 => {
                return Err(FrameError::Truncated {
                    got,
                    expected: PREFIX_LEN,
                })
            }
            n => got += n,
        }
    }
    let (header_len, payload_len) = parse_prefix(&prefix, max_payload)?;
    let mut header = vec![0u8; header_len as usize];
    read_exact(reader, &mut header).await?;
    let message = decode_header(&header)?;
    payload.resize(payload_len as usize, 0);
    read_exact(reader, payload).await?;
    Ok(message)
}

async fn read_exact<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8],
) -> Result<(), FrameError> {
    let mut got = 0;
    while got < buf.len() {
        match reader.read(&mut buf[got..]).await? {
            0 => {
                return Err(FrameError::Truncated {
                    got,
                    expected: buf.len(),
                })
            }
            n => got += n,
        }
    }
    Ok(())
}

// ANCHOR: layer_payload
/// One layer's K and V (`[batch 1, kv_heads, tokens, head_dim]` each, as
/// attention holds them, on any device) → the payload of a
/// [`Message::KvLayer`]: K then V as `[tokens, kv_heads, head_dim]`.
///
/// One copy: a tensor view is laid over `buffer`'s memory and the layer is
/// copied into it, which transposes, and moves from the GPU if need be, in
/// the same pass. There is no intermediate contiguous tensor.
pub fn layer_payload(k: &Tensor, v: &Tensor, buffer: &mut Vec<u8>) {
    let (_, heads, tokens, dim) = k.size4().expect("K is [1, kv_heads, tokens, head_dim]");
    let kind = k.kind();
    buffer.resize(
        2 * (tokens * heads * dim) as usize * kind.elt_size_in_bytes(),
        0,
    );
    // SAFETY: the view covers exactly `buffer`'s bytes (sized just above),
    // is written only through `copy_`, and is dropped before this returns.
    let mut view = unsafe {
        Tensor::from_blob(
            buffer.as_mut_ptr(),
            &[2, tokens, heads, dim],
            &[],
            kind,
            Device::Cpu,
        )
    };
    view.copy_(&Tensor::stack(&[k.get(0), v.get(0)], 0).transpose(1, 2));
}
// ANCHOR_END: layer_payload

/// Collects a prompt's KV layer by layer, as frames arrive, into one
/// `[layers, 2, tokens, kv_heads, head_dim]` tensor — what
/// `Engine::decode_from` imports.
pub struct KvAssembler {
    kv: Tensor,
    received: Vec<bool>,
    layer_bytes: usize,
}

impl KvAssembler {
    pub fn new(layers: usize, tokens: usize, kv_heads: usize, head_dim: usize, kind: Kind) -> Self {
        let shape = [
            layers as i64,
            2,
            tokens as i64,
            kv_heads as i64,
            head_dim as i64,
        ];
        KvAssembler {
            kv: Tensor::empty(shape, (kind, Device::Cpu)),
            received: vec![false; layers],
            layer_bytes: 2 * tokens * kv_heads * head_dim * kind.elt_size_in_bytes(),
        }
    }

    /// Copies one layer's payload into place (one copy, from a view of the bytes).
    pub fn add_layer(&mut self, layer: usize, payload: &[u8]) -> Result<(), String> {
        if layer >= self.received.len() {
            return Err(format!(
                "layer {layer} of a {}-layer model",
                self.received.len()
            ));
        }
        if self.received[layer] {
            return Err(format!("layer {layer} arrived twice"));
        }
        if payload.len() != self.layer_bytes {
            return Err(format!(
                "layer {layer} has {} bytes, expected {}",
                payload.len(),
                self.layer_bytes
            ));
        }
        let s = self.kv.size();
        // SAFETY: `view` borrows `payload`, whose length was just checked,
        // and is dropped at the end of this function.
        let view = unsafe {
            Tensor::from_blob(
                payload.as_ptr(),
                &[2, s[2], s[3], s[4]],
                &[],
                self.kv.kind(),
                Device::Cpu,
            )
        };
        self.kv.get(layer as i64).copy_(&view);
        self.received[layer] = true;
        Ok(())
    }

    pub fn is_complete(&self) -> bool {
        self.received.iter().all(|&r| r)
    }

    /// The assembled KV; only meaningful once [`KvAssembler::is_complete`].
    pub fn into_tensor(self) -> Tensor {
        self.kv
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Message {
        Message::Hello {
            fingerprint: ModelFingerprint {
                weights: 42,
                layers: 30,
                kv_heads: 3,
                head_dim: 64,
                dtype: "f32".into(),
            },
            agent: None,
        }
    }

    #[test]
    fn frames_round_trip() {
        let payload = [1u8, 2, 3, 4, 5];
        let bytes = encode_frame(&hello(), &payload);
        let (message, body, used) = decode_frame(&bytes, DEFAULT_MAX_PAYLOAD).unwrap();
        assert_eq!(message, hello());
        assert_eq!(body, payload);
        assert_eq!(used, bytes.len());
    }

    #[test]
    fn bad_magic_version_and_caps_are_refused() {
        let good = encode_frame(&hello(), &[0; 16]);
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(
            decode_frame(&bad, 1 << 20),
            Err(FrameError::BadMagic(_))
        ));
        let mut newer = good.clone();
        newer[4] = 99;
        let err = decode_frame(&newer, 1 << 20).unwrap_err();
        assert!(err.to_string().contains("rebuild both sides"), "{err}");
        // A payload over the cap is refused from the prefix alone.
        assert!(matches!(
            decode_frame(&good, 8),
            Err(FrameError::PayloadTooLarge { len: 16, cap: 8 })
        ));
        let mut huge_header = good.clone();
        huge_header[6..10].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_frame(&huge_header, 1 << 20),
            Err(FrameError::HeaderTooLarge(_))
        ));
    }

    #[test]
    fn truncation_anywhere_is_an_error() {
        let bytes = encode_frame(&hello(), &[7; 100]);
        for cut in 0..bytes.len() {
            assert!(
                decode_frame(&bytes[..cut], DEFAULT_MAX_PAYLOAD).is_err(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        // A cheap, deterministic fuzz: the real fuzz target is shared/fuzz.
        let mut state = 0x9e3779b97f4a7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let valid = encode_frame(&hello(), &[9; 32]);
        for i in 0..20_000 {
            let mut bytes = if i % 2 == 0 {
                valid.clone()
            } else {
                (0..(next() % 64) as usize).map(|_| next() as u8).collect()
            };
            // Flip a few bytes of valid frames, keeping the magic and version
            // half the time so the header decoder itself gets exercised.
            for _ in 0..(next() % 4) {
                if !bytes.is_empty() {
                    let at = (next() as usize) % bytes.len();
                    if i % 4 != 0 || at >= 6 {
                        bytes[at] = next() as u8;
                    }
                }
            }
            let _ = decode_frame(&bytes, 1 << 16);
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn async_reader_matches_the_sync_decoder() {
        let mut wire = Vec::new();
        write_frame(&mut wire, &hello(), &[5; 10]).await.unwrap();
        assert_eq!(wire, encode_frame(&hello(), &[5; 10]));
        let mut reader = &wire[..];
        let mut payload = Vec::new();
        let message = read_frame(&mut reader, DEFAULT_MAX_PAYLOAD, &mut payload)
            .await
            .unwrap();
        assert_eq!(message, hello());
        assert_eq!(payload, vec![5; 10]);
        assert!(matches!(
            read_frame(&mut reader, DEFAULT_MAX_PAYLOAD, &mut payload).await,
            Err(FrameError::Closed)
        ));
        let mut cut = &wire[..wire.len() - 3];
        assert!(matches!(
            read_frame(&mut cut, DEFAULT_MAX_PAYLOAD, &mut payload).await,
            Err(FrameError::Truncated { .. })
        ));
    }

    #[test]
    fn layer_payload_and_assembler_round_trip() {
        let (heads, tokens, dim) = (3, 5, 4);
        let k = Tensor::randn([1, heads, tokens, dim], (Kind::Float, Device::Cpu));
        let v = Tensor::randn([1, heads, tokens, dim], (Kind::Float, Device::Cpu));
        let mut buffer = Vec::new();
        layer_payload(&k, &v, &mut buffer);
        assert_eq!(buffer.len(), 2 * (heads * tokens * dim) as usize * 4);
        let mut assembler = KvAssembler::new(
            2,
            tokens as usize,
            heads as usize,
            dim as usize,
            Kind::Float,
        );
        assembler.add_layer(1, &buffer).unwrap();
        assert!(!assembler.is_complete());
        assert!(assembler
            .add_layer(1, &buffer)
            .unwrap_err()
            .contains("twice"));
        assert!(assembler
            .add_layer(0, &buffer[1..])
            .unwrap_err()
            .contains("bytes"));
        assembler.add_layer(0, &buffer).unwrap();
        assert!(assembler.is_complete());
        let kv = assembler.into_tensor();
        // Layer 1's K, as [tokens, heads, dim], is k transposed.
        assert!(kv.get(1).get(0).equal(&k.get(0).transpose(0, 1)));
        assert!(kv.get(1).get(1).equal(&v.get(0).transpose(0, 1)));
    }
}
