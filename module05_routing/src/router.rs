//! The live router: who the workers are (etcd), what they hold (their KV
//! event streams), and where the next request goes (a policy).
//!
//! ```text
//!            etcd watch: joins and leaves
//!   etcd ─────────────────────────────────► Router ◄── KvEvents ── worker 1
//!                                            │  ▲  ◄── KvEvents ── worker 2
//!                         route(prompt) ─────┘  └── RouteGuard dropped: load − 1
//! ```
//!
//! Membership comes from the registry's watch; for every decode or
//! aggregated worker that joins, the router opens a TCP connection to it,
//! sends `SubscribeKvEvents`, and applies the numbered events it streams
//! back to one [`PrefixIndex`]. A direct stream rather than etcd, because
//! block events come by the thousand per second and need no durability
//! (see `registry`). If that stream breaks, the worker is dropped from
//! routing at once — a crashed worker stops receiving requests within
//! milliseconds, not when its lease expires seconds later.
//!
//! Load is what the router itself has sent and not yet seen finish: every
//! routed request holds a [`RouteGuard`] until it ends.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shared::kv::block::BlockTable;
use shared::kv::hash::{block_hashes, BlockHash};
use shared::wire::{self, Message};
use tokio::net::TcpStream;

use crate::index::{PrefixIndex, WorkerEvent, WorkerId};
use crate::policy::{RouteRequest, RoutingPolicy, WorkerLoad};
use crate::registry::{Membership, Registry, RegistryError, Role, WorkerInfo};

/// A worker the router can send requests to.
#[derive(Debug, Clone)]
struct Member {
    id: WorkerId,
    info: WorkerInfo,
    active_requests: usize,
    active_blocks: usize,
    /// Whether its KV event stream is connected (prefill workers have none).
    events_connected: bool,
}

struct State {
    members: BTreeMap<String, Member>,
    index: PrefixIndex,
    policy: Box<dyn RoutingPolicy>,
    next_id: u32,
}

/// The router; share it as `Arc<Router>`.
pub struct Router {
    state: Mutex<State>,
    block_size: usize,
    /// Set by [`Router::close`]: the deployment is stopping, so workers'
    /// event streams closing is expected, not news.
    closing: AtomicBool,
}

/// Where a request goes, and what the router believed about it.
#[derive(Debug)]
pub struct Route {
    pub worker: WorkerInfo,
    /// Prompt blocks the chosen worker holds, by the index.
    pub cached_blocks: usize,
    /// Full blocks in the prompt.
    pub prompt_blocks: usize,
    pub guard: RouteGuard,
}

/// Counts a routed request as load on its worker until dropped.
pub struct RouteGuard {
    router: Arc<Router>,
    worker: String,
    id: WorkerId,
    blocks: usize,
}

impl std::fmt::Debug for RouteGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteGuard")
            .field("worker", &self.worker)
            .field("blocks", &self.blocks)
            .finish()
    }
}

impl Drop for RouteGuard {
    fn drop(&mut self) {
        let mut state = self.router.state.lock().expect("router lock");
        if let Some(m) = state.members.get_mut(&self.worker) {
            if m.id == self.id {
                m.active_requests = m.active_requests.saturating_sub(1);
                m.active_blocks = m.active_blocks.saturating_sub(self.blocks);
            }
        }
    }
}

/// A worker as the router sees it now (for `/health`, metrics and reports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerStatus {
    pub info: WorkerInfo,
    pub active_requests: usize,
    /// Blocks the index says this worker holds.
    pub indexed_blocks: usize,
    pub events_connected: bool,
}

impl Router {
    /// Starts routing among the workers registered in `registry`, now and
    /// later, with `policy`; prompts are hashed in blocks of `block_size`
    /// tokens, which must be the workers' block size.
    pub async fn start(
        registry: &Registry,
        policy: Box<dyn RoutingPolicy>,
        block_size: usize,
    ) -> Result<Arc<Router>, RegistryError> {
        let router = Arc::new(Router {
            state: Mutex::new(State {
                members: BTreeMap::new(),
                index: PrefixIndex::new(),
                policy,
                next_id: 0,
            }),
            block_size,
            closing: AtomicBool::new(false),
        });
        let (workers, mut changes) = registry.watch().await?;
        for info in workers {
            router.join(info);
        }
        let weak = Arc::downgrade(&router);
        tokio::spawn(async move {
            while let Some(change) = changes.recv().await {
                let Some(router) = weak.upgrade() else { return };
                match change {
                    Membership::Joined(info) => router.join(info),
                    Membership::Left { name } => {
                        router.leave(&name, None);
                    }
                }
            }
        });
        Ok(router)
    }

    pub fn policy_name(&self) -> String {
        self.state.lock().expect("router lock").policy.name()
    }

    fn join(self: &Arc<Self>, info: WorkerInfo) {
        let id = {
            let mut state = self.state.lock().expect("router lock");
            if let Some(m) = state.members.get(&info.name) {
                if m.info == info {
                    return; // a repeated put (lease renewal does not put, a restart might)
                }
            }
            let id = WorkerId(state.next_id);
            state.next_id += 1;
            let old = state.members.insert(
                info.name.clone(),
                Member {
                    id,
                    info: info.clone(),
                    active_requests: 0,
                    active_blocks: 0,
                    events_connected: false,
                },
            );
            if let Some(old) = old {
                state.index.remove_worker(old.id);
            }
            id
        };
        tracing::info!(worker = %info.name, address = %info.address, role = ?info.role, "worker joined");
        if info.role != Role::Prefill {
            let router = Arc::downgrade(self);
            tokio::spawn(async move {
                let reason = follow_kv_events(&router, id, &info).await;
                // A worker that left cleanly is gone from etcd (and from here)
                // before its stream closes; only a crash is news.
                let Some(router) = router.upgrade() else {
                    return;
                };
                if router.leave(&info.name, Some(id)) {
                    if router.closing.load(Ordering::Relaxed) {
                        tracing::debug!(worker = %info.name, %reason, "KV event stream closed while stopping");
                    } else {
                        tracing::warn!(worker = %info.name, %reason, "KV event stream broke; worker dropped from routing");
                    }
                }
            });
        }
    }

    /// Says the deployment is stopping: workers' event streams will close
    /// before etcd reports them gone, and that is no longer worth a warning.
    pub fn close(&self) {
        self.closing.store(true, Ordering::Relaxed);
    }

    /// Drops worker `name` (only if it is still incarnation `id`, when
    /// given); returns whether it was there to drop.
    fn leave(&self, name: &str, id: Option<WorkerId>) -> bool {
        let mut state = self.state.lock().expect("router lock");
        let same = state
            .members
            .get(name)
            .is_some_and(|m| id.is_none_or(|id| m.id == id));
        if same {
            let member = state.members.remove(name).expect("present");
            state.index.remove_worker(member.id);
            tracing::info!(worker = %name, "worker left");
        }
        same
    }

    fn apply_events(&self, id: WorkerId, events: Vec<shared::kv::prefix_cache::NumberedKvEvent>) {
        let mut state = self.state.lock().expect("router lock");
        if let Some(m) = state.members.values_mut().find(|m| m.id == id) {
            m.events_connected = true;
        } else {
            return;
        }
        for e in events {
            state.index.apply(&WorkerEvent {
                worker: id,
                seq: e.seq,
                event: e.event,
            });
        }
    }

    /// Tokens per block, as the workers hash them.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The chained block hashes the router uses for `tokens`.
    pub fn hashes(&self, tokens: &[u32]) -> Vec<BlockHash> {
        block_hashes(tokens, self.block_size)
    }

    /// Chooses a decode or aggregated worker for a prompt of `tokens` in
    /// conversation `session`; `None` when there is none.
    pub fn route(self: &Arc<Self>, tokens: &[u32], session: u64) -> Option<Route> {
        let hashes = self.hashes(tokens);
        let blocks = BlockTable::blocks_for(tokens.len() + 1, self.block_size);
        let mut state = self.state.lock().expect("router lock");
        let state = &mut *state;
        let loads: Vec<WorkerLoad> = state
            .members
            .values()
            .filter(|m| m.info.role != Role::Prefill)
            .map(|m| WorkerLoad {
                id: m.id,
                active_requests: m.active_requests,
                active_blocks: m.active_blocks,
            })
            .collect();
        if loads.is_empty() {
            return None;
        }
        let request = RouteRequest {
            hashes: &hashes,
            session,
        };
        let id = state.policy.choose(&request, &loads, &state.index);
        let cached_blocks = state.index.overlaps(&hashes).get(&id).copied().unwrap_or(0);
        let member = state
            .members
            .values_mut()
            .find(|m| m.id == id)
            .expect("the policy picks one of the workers offered");
        Some(self.admit(member, blocks, cached_blocks, hashes.len()))
    }

    /// Requests in flight on the least busy prefill worker; `None` if there
    /// is no prefill worker.
    pub fn prefill_queue(&self) -> Option<usize> {
        let state = self.state.lock().expect("router lock");
        state
            .members
            .values()
            .filter(|m| m.info.role == Role::Prefill)
            .map(|m| m.active_requests)
            .min()
    }

    /// The prefill worker with the fewest requests in flight, if any.
    pub fn route_prefill(self: &Arc<Self>, tokens: usize) -> Option<Route> {
        let blocks = BlockTable::blocks_for(tokens, self.block_size);
        let mut state = self.state.lock().expect("router lock");
        let member = state
            .members
            .values_mut()
            .filter(|m| m.info.role == Role::Prefill)
            .min_by_key(|m| (m.active_requests, m.id))?;
        Some(self.admit(member, blocks, 0, 0))
    }

    fn admit(
        self: &Arc<Self>,
        member: &mut Member,
        blocks: usize,
        cached_blocks: usize,
        prompt_blocks: usize,
    ) -> Route {
        member.active_requests += 1;
        member.active_blocks += blocks;
        Route {
            worker: member.info.clone(),
            cached_blocks,
            prompt_blocks,
            guard: RouteGuard {
                router: self.clone(),
                worker: member.info.name.clone(),
                id: member.id,
                blocks,
            },
        }
    }

    /// Every worker the router knows, in name order.
    pub fn workers(&self) -> Vec<WorkerStatus> {
        let state = self.state.lock().expect("router lock");
        state
            .members
            .values()
            .map(|m| WorkerStatus {
                info: m.info.clone(),
                active_requests: m.active_requests,
                indexed_blocks: state.index.blocks_of(m.id),
                events_connected: m.events_connected,
            })
            .collect()
    }

    /// Waits until at least `decode` decode-or-aggregated workers (with
    /// their event streams connected) and `prefill` prefill workers are
    /// known, or `timeout` passes; returns whether they are.
    pub async fn wait_for(&self, decode: usize, prefill: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let workers = self.workers();
            let d = workers
                .iter()
                .filter(|w| w.info.role != Role::Prefill && w.events_connected)
                .count();
            let p = workers
                .iter()
                .filter(|w| w.info.role == Role::Prefill)
                .count();
            if d >= decode && p >= prefill {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

// ANCHOR: follow_kv_events
/// Subscribes to one worker's KV events and applies them until the stream
/// ends; returns why it ended.
async fn follow_kv_events(
    router: &std::sync::Weak<Router>,
    id: WorkerId,
    info: &WorkerInfo,
) -> String {
    // The worker listens before it registers, but give a slow start a moment.
    let mut stream = None;
    for attempt in 0..20 {
        match TcpStream::connect(&info.address).await {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) if attempt == 19 => return format!("cannot connect to {}: {e}", info.address),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let stream = stream.expect("connected or returned");
    let _ = stream.set_nodelay(true);
    let (mut reader, mut writer) = stream.into_split();
    if let Err(e) = wire::write_frame(&mut writer, &Message::SubscribeKvEvents, &[]).await {
        return e.to_string();
    }
    let mut scratch = Vec::new();
    loop {
        match wire::read_frame(&mut reader, 0, &mut scratch).await {
            Ok(Message::KvEvents { events }) => match router.upgrade() {
                Some(router) => router.apply_events(id, events),
                None => return "the router stopped".into(),
            },
            Ok(Message::Error { message, .. }) => return message,
            Ok(other) => return format!("unexpected frame {other:?}"),
            Err(e) => return e.to_string(),
        }
    }
}
// ANCHOR_END: follow_kv_events
