//! One request to a worker, from the caller's side: open a connection, send
//! `Generate`, read tokens until `Done`.
//!
//! A connection per request keeps failure simple: if the worker dies, this
//! request's read fails at once and nothing else is affected; if the caller
//! hangs up (a client went away, a stop string matched), the worker sees
//! the connection close and cancels the request. Opening a loopback or LAN
//! TCP connection costs tens of microseconds — noise next to a prefill.

use std::time::Duration;

use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate::engine::sampling::SamplingParams;
use crate::wire::{self, Breakdown, FrameError, Message, Prompt, TransferMode};

#[derive(Debug, thiserror::Error)]
pub enum WorkerClientError {
    #[error("cannot reach the worker at {address}: {source}")]
    Connect {
        address: String,
        source: std::io::Error,
    },
    #[error("no connection to the worker at {0} within the timeout")]
    ConnectTimeout(String),
    #[error("the worker connection failed: {0}")]
    Frame(#[from] FrameError),
    /// The worker (or the decode worker behind a prefill worker) refused or
    /// failed the request.
    #[error("{0}")]
    Worker(String),
    #[error("unexpected reply from the worker: {0}")]
    Unexpected(String),
}

/// What comes back for a request.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerReply {
    Token { token: u32, text: String },
    Done(Breakdown),
}

/// What to ask a worker.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    pub params: SamplingParams,
    pub mode: TransferMode,
    /// For a prefill worker: the decode worker to ship the KV to.
    pub decode: Option<String>,
}

/// An open request to a worker.
pub struct WorkerStream {
    reader: OwnedReadHalf,
    /// Kept open: closing it would tell the worker to cancel.
    _writer: OwnedWriteHalf,
    scratch: Vec<u8>,
    done: bool,
}

/// How long to wait for a worker to accept a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

impl WorkerStream {
    /// Connects to the worker at `address` and sends `request`.
    pub async fn open(
        address: &str,
        request: GenerateRequest,
    ) -> Result<WorkerStream, WorkerClientError> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address))
            .await
            .map_err(|_| WorkerClientError::ConnectTimeout(address.to_string()))?
            .map_err(|source| WorkerClientError::Connect {
                address: address.to_string(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        let (reader, mut writer) = stream.into_split();
        let message = Message::Generate {
            request_id: 0,
            prompt: request.prompt,
            params: request.params,
            mode: request.mode,
            decode: request.decode,
        };
        wire::write_frame(&mut writer, &message, &[]).await?;
        Ok(WorkerStream {
            reader,
            _writer: writer,
            scratch: Vec::new(),
            done: false,
        })
    }

    /// The next token, or `Done`; after `Done`, `None`.
    pub async fn next(&mut self) -> Option<Result<WorkerReply, WorkerClientError>> {
        if self.done {
            return None;
        }
        let reply = match wire::read_frame(&mut self.reader, 0, &mut self.scratch).await {
            Ok(Message::Token { token, text, .. }) => Ok(WorkerReply::Token { token, text }),
            Ok(Message::Done { breakdown, .. }) => Ok(WorkerReply::Done(breakdown)),
            Ok(Message::Error { message, .. }) => Err(WorkerClientError::Worker(message)),
            Ok(other) => Err(WorkerClientError::Unexpected(format!("{other:?}"))),
            Err(FrameError::Closed) => Err(WorkerClientError::Worker(
                "the worker closed the connection mid-request".into(),
            )),
            Err(e) => Err(e.into()),
        };
        self.done = !matches!(reply, Ok(WorkerReply::Token { .. }));
        Some(reply)
    }
}
