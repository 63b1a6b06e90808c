//! The engine on its own thread, with channels in and out.
//!
//! libtorch calls block, and the engine must step continuously while
//! requests come and go, so it gets a dedicated OS thread — the same shape
//! as a database's single writer thread. Callers (HTTP handlers, TCP
//! servers) talk to it through an [`EngineHandle`]: submit a request, get a
//! stream of [`TokenEvent`]s back; cancel by id. The output channel is
//! tokio's unbounded channel, usable from async and plain threads alike.
//!
//! The thread also **publishes the prefix cache's block events** (which
//! block contents it now holds or has evicted) to subscribers, numbered from
//! 1 — what a KV-aware router (module 5) listens to.

use std::sync::mpsc;
use std::thread::JoinHandle;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::core::{Engine, EngineError};
use super::metrics::EngineStats;
use super::request::{Request, RequestId, TokenEvent};
use crate::kv::block::BlockId;
use crate::kv::prefix_cache::{KvEvent, NumberedKvEvent};

/// The engine's KV pool as a peer writing into it needs to see it.
pub struct PoolLayout {
    /// The pool tensor (shares storage with the engine's pool).
    pub tensor: tch::Tensor,
    pub layers: usize,
    pub block_size: usize,
    /// Blocks that hold sequences.
    pub num_blocks: usize,
    /// Slots per layer in the tensor: the blocks' slots plus those of the
    /// padding block at the end (see `KvPool::padding_block`).
    pub slots_per_layer: usize,
    /// Bytes of one token's K (or V) in one layer.
    pub slot_bytes: usize,
}

impl PoolLayout {
    /// Byte offset of `slot` in `layer`'s K (`which = 0`) or V (`which = 1`).
    pub fn slot_offset_bytes(&self, layer: usize, which: usize, slot: usize) -> usize {
        ((layer * 2 + which) * self.slots_per_layer + slot) * self.slot_bytes
    }
}

enum Command {
    Submit(
        Request,
        tokio::sync::mpsc::UnboundedSender<TokenEvent>,
        mpsc::Sender<Result<(), EngineError>>,
    ),
    SubmitPrefilled {
        request: Request,
        first_token: u32,
        kv: tch::Tensor,
        stream: tokio::sync::mpsc::UnboundedSender<TokenEvent>,
        ack: mpsc::Sender<Result<(), EngineError>>,
    },
    Reserve {
        id: RequestId,
        prompt_len: usize,
        reply: mpsc::Sender<Result<Vec<BlockId>, EngineError>>,
    },
    SubmitReserved {
        request: Request,
        first_token: u32,
        blocks: Vec<BlockId>,
        stream: tokio::sync::mpsc::UnboundedSender<TokenEvent>,
        ack: mpsc::Sender<Result<(), EngineError>>,
    },
    ReleaseReserved(Vec<BlockId>),
    PoolLayout(mpsc::Sender<PoolLayout>),
    Cancel(RequestId),
    Stats(mpsc::Sender<EngineStats>),
    SubscribeKvEvents(UnboundedSender<Vec<NumberedKvEvent>>),
    Shutdown,
}

/// A cloneable handle to an engine running on its own thread.
#[derive(Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
}

/// Owns the engine thread; dropping it stops the engine.
pub struct EngineThread {
    handle: EngineHandle,
    thread: Option<JoinHandle<()>>,
}

impl EngineThread {
    /// Starts `engine` on a new thread. `make_engine` runs on that thread,
    /// so the model is created where it is used.
    pub fn spawn<F>(make_engine: F) -> std::io::Result<EngineThread>
    where
        F: FnOnce() -> Engine + Send + 'static,
    {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || run(make_engine(), rx))?;
        Ok(EngineThread {
            handle: EngineHandle { commands: tx },
            thread: Some(thread),
        })
    }

    pub fn handle(&self) -> EngineHandle {
        self.handle.clone()
    }
}

impl Drop for EngineThread {
    fn drop(&mut self) {
        let _ = self.handle.commands.send(Command::Shutdown);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    #[error("the engine thread has stopped")]
    Stopped,
    #[error(transparent)]
    Rejected(#[from] EngineError),
}

impl EngineHandle {
    /// Submits a request; tokens arrive on the returned receiver, ending
    /// with a `Finished` event.
    pub fn submit(&self, request: Request) -> Result<UnboundedReceiver<TokenEvent>, HandleError> {
        let (tx, rx) = unbounded_channel();
        let (ack_tx, ack_rx) = mpsc::channel();
        self.commands
            .send(Command::Submit(request, tx, ack_tx))
            .map_err(|_| HandleError::Stopped)?;
        ack_rx.recv().map_err(|_| HandleError::Stopped)??;
        Ok(rx)
    }

    /// Continues a request whose prompt was prefilled elsewhere
    /// ([`Engine::decode_from`]): `kv` is the prompt's cache, `first_token`
    /// the token the prefill chose. Later tokens arrive on the receiver.
    pub fn submit_prefilled(
        &self,
        request: Request,
        first_token: u32,
        kv: tch::Tensor,
    ) -> Result<UnboundedReceiver<TokenEvent>, HandleError> {
        let (tx, rx) = unbounded_channel();
        let (ack_tx, ack_rx) = mpsc::channel();
        self.commands
            .send(Command::SubmitPrefilled {
                request,
                first_token,
                kv,
                stream: tx,
                ack: ack_tx,
            })
            .map_err(|_| HandleError::Stopped)?;
        ack_rx.recv().map_err(|_| HandleError::Stopped)??;
        Ok(rx)
    }

    /// Reserves pool blocks for a prompt a peer will write directly
    /// ([`Engine::reserve_blocks`]).
    pub fn reserve(&self, id: RequestId, prompt_len: usize) -> Result<Vec<BlockId>, HandleError> {
        let (tx, rx) = mpsc::channel();
        self.commands
            .send(Command::Reserve {
                id,
                prompt_len,
                reply: tx,
            })
            .map_err(|_| HandleError::Stopped)?;
        Ok(rx.recv().map_err(|_| HandleError::Stopped)??)
    }

    /// Decodes a request whose prompt KV a peer wrote into reserved `blocks`.
    pub fn submit_reserved(
        &self,
        request: Request,
        first_token: u32,
        blocks: Vec<BlockId>,
    ) -> Result<UnboundedReceiver<TokenEvent>, HandleError> {
        let (tx, rx) = unbounded_channel();
        let (ack_tx, ack_rx) = mpsc::channel();
        self.commands
            .send(Command::SubmitReserved {
                request,
                first_token,
                blocks,
                stream: tx,
                ack: ack_tx,
            })
            .map_err(|_| HandleError::Stopped)?;
        ack_rx.recv().map_err(|_| HandleError::Stopped)??;
        Ok(rx)
    }

    /// Returns reserved blocks unused (the transfer failed).
    pub fn release_reserved(&self, blocks: Vec<BlockId>) {
        let _ = self.commands.send(Command::ReleaseReserved(blocks));
    }

    /// The pool's tensor and layout, to register it with a transfer agent.
    pub fn pool_layout(&self) -> Result<PoolLayout, HandleError> {
        let (tx, rx) = mpsc::channel();
        self.commands
            .send(Command::PoolLayout(tx))
            .map_err(|_| HandleError::Stopped)?;
        rx.recv().map_err(|_| HandleError::Stopped)
    }

    pub fn cancel(&self, id: RequestId) {
        let _ = self.commands.send(Command::Cancel(id));
    }

    /// The prefix cache's block events from now on. The first batch is a
    /// snapshot: one `Stored` event naming every block cached already.
    pub fn subscribe_kv_events(
        &self,
    ) -> Result<UnboundedReceiver<Vec<NumberedKvEvent>>, HandleError> {
        let (tx, rx) = unbounded_channel();
        self.commands
            .send(Command::SubscribeKvEvents(tx))
            .map_err(|_| HandleError::Stopped)?;
        Ok(rx)
    }

    pub fn stats(&self) -> Result<EngineStats, HandleError> {
        let (tx, rx) = mpsc::channel();
        self.commands
            .send(Command::Stats(tx))
            .map_err(|_| HandleError::Stopped)?;
        rx.recv().map_err(|_| HandleError::Stopped)
    }
}

/// Numbers the engine's block events and hands them to every subscriber.
#[derive(Default)]
struct KvEventPublisher {
    subscribers: Vec<UnboundedSender<Vec<NumberedKvEvent>>>,
    last_seq: u64,
}

impl KvEventPublisher {
    fn number(&mut self, events: Vec<KvEvent>) -> Vec<NumberedKvEvent> {
        events
            .into_iter()
            .map(|event| {
                self.last_seq += 1;
                NumberedKvEvent {
                    seq: self.last_seq,
                    event,
                }
            })
            .collect()
    }

    /// A new subscriber first gets everything cached now, then what changes.
    fn subscribe(&mut self, engine: &Engine, subscriber: UnboundedSender<Vec<NumberedKvEvent>>) {
        let snapshot = self.number(vec![KvEvent::Stored {
            parent: None,
            hashes: engine.cached_block_hashes(),
        }]);
        if subscriber.send(snapshot).is_ok() {
            self.subscribers.push(subscriber);
        }
    }

    /// Drains the engine's events (always, so they never pile up) and sends
    /// them on; subscribers that went away are dropped.
    fn publish(&mut self, engine: &mut Engine) {
        let events = engine.drain_kv_events();
        if events.is_empty() || self.subscribers.is_empty() {
            return;
        }
        let batch = self.number(events);
        self.subscribers.retain(|s| s.send(batch.clone()).is_ok());
    }
}

fn run(mut engine: Engine, commands: mpsc::Receiver<Command>) {
    let mut publisher = KvEventPublisher::default();
    loop {
        publisher.publish(&mut engine);
        // Block for a command only when there is nothing to step.
        let next = if engine.has_unfinished() {
            match commands.try_recv() {
                Ok(c) => Some(c),
                Err(mpsc::TryRecvError::Empty) => None,
                Err(mpsc::TryRecvError::Disconnected) => return,
            }
        } else {
            match commands.recv() {
                Ok(c) => Some(c),
                Err(_) => return,
            }
        };
        match next {
            Some(Command::Submit(request, stream, ack)) => {
                let _ = ack.send(engine.add_request(request, Some(stream)));
                continue;
            }
            Some(Command::SubmitPrefilled {
                request,
                first_token,
                kv,
                stream,
                ack,
            }) => {
                let _ = ack.send(engine.decode_from(request, first_token, &kv, Some(stream)));
                continue;
            }
            Some(Command::Reserve {
                id,
                prompt_len,
                reply,
            }) => {
                let _ = reply.send(engine.reserve_blocks(id, prompt_len));
                continue;
            }
            Some(Command::SubmitReserved {
                request,
                first_token,
                blocks,
                stream,
                ack,
            }) => {
                let _ =
                    ack.send(engine.decode_from_blocks(request, first_token, blocks, Some(stream)));
                continue;
            }
            Some(Command::ReleaseReserved(blocks)) => {
                engine.release_reserved(&blocks);
                continue;
            }
            Some(Command::PoolLayout(reply)) => {
                let pool = engine.pool();
                let _ = reply.send(PoolLayout {
                    tensor: pool.tensor(),
                    layers: engine.model().config().num_hidden_layers,
                    block_size: pool.block_size(),
                    num_blocks: pool.num_blocks(),
                    slots_per_layer: pool.slots_per_layer(),
                    slot_bytes: pool.slot_bytes(),
                });
                continue;
            }
            Some(Command::Cancel(id)) => {
                engine.cancel(id);
                continue;
            }
            Some(Command::Stats(reply)) => {
                let _ = reply.send(engine.stats());
                continue;
            }
            Some(Command::SubscribeKvEvents(subscriber)) => {
                publisher.subscribe(&engine, subscriber);
                continue;
            }
            Some(Command::Shutdown) => return,
            None => {}
        }
        engine.step();
    }
}
