//! RDMA over InfiniBand or RoCE, through libibverbs.
//!
//! The verbs, in the order a transfer needs them:
//!
//! 1. **open** the device and allocate a *protection domain* (`ibv_alloc_pd`):
//!    the scope that registrations and queue pairs share;
//! 2. **register** memory (`ibv_reg_mr`): the kernel pins the pages and the
//!    NIC learns their physical addresses; the registration has a local key
//!    (`lkey`, for our own work requests) and a remote key (`rkey`, which a
//!    peer must present to write). GPU memory registers the same way when
//!    `nvidia_peermem` is loaded (GPUDirect RDMA): the NIC then DMAs straight
//!    to and from HBM;
//! 3. **connect** a *reliable connected* (RC) queue pair to the peer's: each
//!    side creates one, they swap *(queue-pair number, packet sequence
//!    number, LID, GID)* over the side channel, and walk their QP through
//!    `INIT → RTR` (ready to receive) `→ RTS` (ready to send);
//! 4. **post** `RDMA WRITE` work requests (`ibv_post_send`): *(local address,
//!    length, lkey) → (remote address, rkey)*. Only the last of a batch asks
//!    for a completion; RC delivers in order, so its completion means every
//!    write before it has landed in the peer's memory;
//! 5. **poll** the completion queue (`ibv_poll_cq`) for it;
//! 6. **notify** the peer over the side channel, which answers once it has
//!    queued the notification.
//!
//! The target's CPU does nothing in steps 4–5: its NIC checks the rkey and
//! the registration's bounds and writes memory by itself.
//!
//! `ibv_post_send` and `ibv_poll_cq` are inline functions in `verbs.h`
//! that call through the device context's `ops` table; they are called the
//! same way here.
//!
//! What could not be done here: no machine this project has access to has
//! an RDMA device, so this code is built and its device-free parts are
//! tested in CI, but it has not moved a byte. `tests/agent.rs` runs a
//! transfer through it where `ibv_get_device_list` finds an active port.

use std::collections::HashMap;
use std::ffi::CStr;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ibverbs_sys as ffi;
use module00_env::rdma::RdmaProbe;

use super::channel::{self, Writes};
use super::{Backend, Registration, Target, WriteOp};
use crate::agent::AgentError;
use crate::metadata::{AgentMetadata, BackendKind};
use crate::region::{Location, MemoryRegion};

/// Work requests in flight per queue pair before we wait for a completion.
const BATCH: usize = 64;
/// One work request moves at most this much (an SGE's length is 32 bits;
/// devices often cap a message at 1 or 2 GiB).
const MAX_WRITE: u64 = 1 << 30;
/// A transfer that has not completed by then has failed (the QP's own
/// retry timers fire well before this).
const COMPLETION_TIMEOUT: Duration = Duration::from_secs(30);
/// Opens the side channel's QP handshake.
const HANDSHAKE: u8 = 0xB5;

/// The device and port an agent uses, chosen from module 0's probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortChoice {
    pub device: String,
    pub port: u8,
    /// RoCE: addressed by GID (routed, needs a GRH); InfiniBand: by LID.
    pub ethernet: bool,
    pub gid_index: u8,
}

/// Picks `wanted` (or the first device) with an ACTIVE port. RoCE ports use
/// their RoCE v2 GID (routable over UDP/IP), falling back to index 0.
pub fn choose_port(probe: &RdmaProbe, wanted: Option<&str>) -> Result<PortChoice, AgentError> {
    let mut active = probe
        .active_ports()
        .filter(|(device, _)| wanted.is_none_or(|w| w == *device));
    match active.next() {
        Some((device, port)) => {
            let ethernet = port.link_layer == "Ethernet";
            Ok(PortChoice {
                device: device.to_string(),
                port: port.port,
                ethernet,
                gid_index: if ethernet {
                    port.roce_v2_gid_index.unwrap_or(0) as u8
                } else {
                    0
                },
            })
        }
        None => Err(AgentError::NoRdmaDevice(match (wanted, &probe.missing) {
            (Some(w), _) => format!(
                "no active port on RDMA device {w:?} (devices: {}); see `module00_env`",
                probe
                    .devices
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            (None, Some(why)) => why.clone(),
            (None, None) => "no RDMA device has an active port".into(),
        })),
    }
}

/// What a peer needs to connect its queue pair to ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpEndpoint {
    pub qp_num: u32,
    pub psn: u32,
    pub lid: u16,
    pub gid: [u8; 16],
}

impl QpEndpoint {
    pub const ENCODED_LEN: usize = 26;

    pub fn encode(&self) -> [u8; Self::ENCODED_LEN] {
        let mut out = [0u8; Self::ENCODED_LEN];
        out[0..4].copy_from_slice(&self.qp_num.to_le_bytes());
        out[4..8].copy_from_slice(&self.psn.to_le_bytes());
        out[8..10].copy_from_slice(&self.lid.to_le_bytes());
        out[10..26].copy_from_slice(&self.gid);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<QpEndpoint, AgentError> {
        if bytes.len() != Self::ENCODED_LEN {
            return Err(AgentError::Backend(format!(
                "a queue-pair endpoint is {} bytes, got {}",
                Self::ENCODED_LEN,
                bytes.len()
            )));
        }
        Ok(QpEndpoint {
            qp_num: u32::from_le_bytes(bytes[0..4].try_into().expect("4")),
            psn: u32::from_le_bytes(bytes[4..8].try_into().expect("4")) & 0xff_ffff,
            lid: u16::from_le_bytes(bytes[8..10].try_into().expect("2")),
            gid: bytes[10..26].try_into().expect("16"),
        })
    }
}

/// An opened device with its protection domain.
struct Device {
    context: *mut ffi::ibv_context,
    pd: *mut ffi::ibv_pd,
    choice: PortChoice,
    lid: u16,
    mtu: ffi::ibv_mtu,
    gid: [u8; 16],
}

// SAFETY: libibverbs objects may be used from any thread; every queue pair
// is used by one thread at a time (it sits behind a Mutex).
unsafe impl Send for Device {}
unsafe impl Sync for Device {}

fn os_error(what: &str) -> AgentError {
    AgentError::Backend(format!("{what}: {}", std::io::Error::last_os_error()))
}

impl Device {
    fn open(choice: PortChoice) -> Result<Device, AgentError> {
        let mut count = 0;
        // SAFETY: the list holds `count` device pointers until freed.
        let list = unsafe { ffi::ibv_get_device_list(&mut count) };
        if list.is_null() {
            return Err(os_error("ibv_get_device_list"));
        }
        let devices = unsafe { std::slice::from_raw_parts(list, count.max(0) as usize) };
        let found = devices.iter().copied().find(|&d| {
            unsafe { CStr::from_ptr(ffi::ibv_get_device_name(d)) }.to_string_lossy()
                == choice.device
        });
        // A context stays valid after the list is freed.
        let context = found.map(|d| unsafe { ffi::ibv_open_device(d) });
        unsafe { ffi::ibv_free_device_list(list) };
        let context = match context {
            Some(c) if !c.is_null() => c,
            Some(_) => return Err(os_error(&format!("ibv_open_device({})", choice.device))),
            None => {
                return Err(AgentError::NoRdmaDevice(format!(
                    "device {} disappeared",
                    choice.device
                )))
            }
        };
        let mut device = Device {
            context,
            pd: std::ptr::null_mut(),
            choice,
            lid: 0,
            mtu: ffi::IBV_MTU_1024,
            gid: [0; 16],
        };
        device.pd = unsafe { ffi::ibv_alloc_pd(context) };
        if device.pd.is_null() {
            return Err(os_error("ibv_alloc_pd"));
        }
        let mut port = ffi::ibv_port_attr::default();
        // SAFETY: as in module 0: the exported ibv_query_port fills the
        // leading, stable fields (state … link_layer), which is all we read.
        let rc = unsafe {
            ffi::ibv_query_port(
                context,
                device.choice.port,
                &mut port as *mut ffi::ibv_port_attr as *mut _,
            )
        };
        if rc != 0 {
            return Err(os_error("ibv_query_port"));
        }
        device.lid = port.lid;
        device.mtu = port.active_mtu;
        let mut gid = ffi::ibv_gid::default();
        let rc = unsafe {
            ffi::ibv_query_gid(
                context,
                device.choice.port,
                device.choice.gid_index as i32,
                &mut gid,
            )
        };
        if rc != 0 {
            return Err(os_error("ibv_query_gid"));
        }
        device.gid = unsafe { gid.raw };
        Ok(device)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: created in `open`; registrations and QPs hold an Arc and
        // are gone by now.
        unsafe {
            if !self.pd.is_null() {
                ffi::ibv_dealloc_pd(self.pd);
            }
            ffi::ibv_close_device(self.context);
        }
    }
}

/// A memory registration with the NIC (an `ibv_mr`).
struct MemoryRegistration(*mut ffi::ibv_mr);

// SAFETY: an MR handle is an immutable description once created.
unsafe impl Send for MemoryRegistration {}
unsafe impl Sync for MemoryRegistration {}

impl MemoryRegistration {
    fn lkey(&self) -> u32 {
        unsafe { (*self.0).lkey }
    }
}

impl Drop for MemoryRegistration {
    fn drop(&mut self) {
        unsafe { ffi::ibv_dereg_mr(self.0) };
    }
}

/// An RC queue pair with its own completion queue (one poller per queue).
struct QueuePair {
    qp: *mut ffi::ibv_qp,
    cq: *mut ffi::ibv_cq,
    psn: u32,
    device: Arc<Device>,
}

// SAFETY: see Device; a QueuePair is used under a Mutex.
unsafe impl Send for QueuePair {}

impl QueuePair {
    fn create(device: Arc<Device>) -> Result<QueuePair, AgentError> {
        let cq = unsafe {
            ffi::ibv_create_cq(
                device.context,
                (BATCH * 2) as i32,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            )
        };
        if cq.is_null() {
            return Err(os_error("ibv_create_cq"));
        }
        let mut init = ffi::ibv_qp_init_attr {
            send_cq: cq,
            recv_cq: cq,
            cap: ffi::ibv_qp_cap {
                max_send_wr: BATCH as u32,
                max_recv_wr: 1,
                max_send_sge: 1,
                max_recv_sge: 1,
                max_inline_data: 0,
            },
            qp_type: ffi::ibv_qp_type::IBV_QPT_RC,
            sq_sig_all: 0,
            ..Default::default()
        };
        let qp = unsafe { ffi::ibv_create_qp(device.pd, &mut init) };
        if qp.is_null() {
            let e = os_error("ibv_create_qp");
            unsafe { ffi::ibv_destroy_cq(cq) };
            return Err(e);
        }
        // A packet sequence number to start from; any 24-bit value works.
        let psn = (std::process::id() ^ unsafe { (*qp).qp_num }) & 0xff_ffff;
        Ok(QueuePair {
            qp,
            cq,
            psn,
            device,
        })
    }

    fn endpoint(&self) -> QpEndpoint {
        QpEndpoint {
            qp_num: unsafe { (*self.qp).qp_num },
            psn: self.psn,
            lid: self.device.lid,
            gid: self.device.gid,
        }
    }

    fn modify(
        &self,
        attr: &mut ffi::ibv_qp_attr,
        mask: ffi::ibv_qp_attr_mask,
        step: &str,
    ) -> Result<(), AgentError> {
        let rc = unsafe { ffi::ibv_modify_qp(self.qp, attr, mask.0 as i32) };
        if rc != 0 {
            return Err(AgentError::Backend(format!(
                "moving the queue pair to {step} failed: {}",
                std::io::Error::from_raw_os_error(rc)
            )));
        }
        Ok(())
    }

    /// INIT → RTR → RTS against the peer's endpoint.
    fn connect(&self, peer: &QpEndpoint) -> Result<(), AgentError> {
        use ffi::ibv_qp_attr_mask as M;
        let port = self.device.choice.port;
        let mut attr = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_INIT,
            pkey_index: 0,
            port_num: port,
            qp_access_flags: (ffi::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
                | ffi::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE)
                .0,
            ..Default::default()
        };
        self.modify(
            &mut attr,
            M::IBV_QP_STATE | M::IBV_QP_PKEY_INDEX | M::IBV_QP_PORT | M::IBV_QP_ACCESS_FLAGS,
            "INIT",
        )?;

        let mut attr = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_RTR,
            path_mtu: self.device.mtu,
            dest_qp_num: peer.qp_num,
            rq_psn: peer.psn,
            max_dest_rd_atomic: 1,
            min_rnr_timer: 12,
            ..Default::default()
        };
        attr.ah_attr.dlid = peer.lid;
        attr.ah_attr.port_num = port;
        if self.device.choice.ethernet {
            attr.ah_attr.is_global = 1;
            attr.ah_attr.grh.dgid.raw = peer.gid;
            attr.ah_attr.grh.sgid_index = self.device.choice.gid_index;
            attr.ah_attr.grh.hop_limit = 64;
        }
        self.modify(
            &mut attr,
            M::IBV_QP_STATE
                | M::IBV_QP_AV
                | M::IBV_QP_PATH_MTU
                | M::IBV_QP_DEST_QPN
                | M::IBV_QP_RQ_PSN
                | M::IBV_QP_MAX_DEST_RD_ATOMIC
                | M::IBV_QP_MIN_RNR_TIMER,
            "RTR",
        )?;

        let mut attr = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_RTS,
            sq_psn: self.psn,
            timeout: 14,
            retry_cnt: 7,
            rnr_retry: 7,
            max_rd_atomic: 1,
            ..Default::default()
        };
        self.modify(
            &mut attr,
            M::IBV_QP_STATE
                | M::IBV_QP_SQ_PSN
                | M::IBV_QP_TIMEOUT
                | M::IBV_QP_RETRY_CNT
                | M::IBV_QP_RNR_RETRY
                | M::IBV_QP_MAX_QP_RD_ATOMIC,
            "RTS",
        )
    }

    /// Posts `ops` as RDMA WRITEs, `BATCH` at a time, and waits for each
    /// batch's last (signalled) completion.
    // ANCHOR: post_writes
    fn write(&self, ops: &[WriteOp<'_>], lkeys: &[u32]) -> Result<(), AgentError> {
        // Split writes larger than one work request may carry.
        let mut pieces = Vec::with_capacity(ops.len());
        for (op, &lkey) in ops.iter().zip(lkeys) {
            let mut done = 0;
            while done < op.len {
                let len = (op.len - done).min(MAX_WRITE);
                let local = op.local.as_ptr() as u64 + op.local_offset + done;
                pieces.push((local, len as u32, lkey, op.remote_address + done, op.rkey));
                done += len;
            }
        }
        for batch in pieces.chunks(BATCH) {
            let mut sges: Vec<ffi::ibv_sge> = batch
                .iter()
                .map(|&(addr, length, lkey, _, _)| ffi::ibv_sge { addr, length, lkey })
                .collect();
            let mut wrs: Vec<ffi::ibv_send_wr> = batch
                .iter()
                .enumerate()
                .map(|(i, &(_, _, _, remote_addr, rkey))| {
                    let mut wr = ffi::ibv_send_wr {
                        wr_id: i as u64,
                        num_sge: 1,
                        opcode: ffi::ibv_wr_opcode::IBV_WR_RDMA_WRITE,
                        ..unsafe { std::mem::zeroed() }
                    };
                    wr.wr.rdma = ffi::ibv_send_wr__bindgen_ty_2__bindgen_ty_1 { remote_addr, rkey };
                    wr
                })
                .collect();
            // Chain the requests: each names its SGE and the next request.
            let n = wrs.len();
            let (first, sge) = (wrs.as_mut_ptr(), sges.as_mut_ptr());
            for i in 0..n {
                // SAFETY: i and i + 1 index the vectors, which are not resized.
                unsafe {
                    (*first.add(i)).sg_list = sge.add(i);
                    if i + 1 < n {
                        (*first.add(i)).next = first.add(i + 1);
                    }
                }
            }
            wrs[n - 1].send_flags = ffi::ibv_send_flags::IBV_SEND_SIGNALED.0;
            let mut bad: *mut ffi::ibv_send_wr = std::ptr::null_mut();
            // SAFETY: the WR chain, its SGEs and the registered memory they
            // name outlive the call; the QP is ours alone (Mutex).
            let rc = unsafe {
                let post = (*(*self.qp).context)
                    .ops
                    .post_send
                    .expect("provider has post_send");
                post(self.qp, wrs.as_mut_ptr(), &mut bad)
            };
            if rc != 0 {
                return Err(AgentError::Backend(format!(
                    "ibv_post_send failed: {}",
                    std::io::Error::from_raw_os_error(rc)
                )));
            }
            self.wait_completion()?;
        }
        Ok(())
    }
    // ANCHOR_END: post_writes

    fn wait_completion(&self) -> Result<(), AgentError> {
        let deadline = Instant::now() + COMPLETION_TIMEOUT;
        // SAFETY: ibv_wc is plain data; zero is a valid "nothing yet".
        let mut wc: ffi::ibv_wc = unsafe { std::mem::zeroed() };
        loop {
            let polled = unsafe {
                let poll = (*(*self.cq).context)
                    .ops
                    .poll_cq
                    .expect("provider has poll_cq");
                poll(self.cq, 1, &mut wc)
            };
            match polled {
                0 if Instant::now() < deadline => std::hint::spin_loop(),
                0 => {
                    return Err(AgentError::Backend(format!(
                        "no RDMA completion within {COMPLETION_TIMEOUT:?}"
                    )))
                }
                n if n < 0 => return Err(AgentError::Backend("ibv_poll_cq failed".into())),
                _ => {
                    return match wc.error() {
                        None => Ok(()),
                        Some((status, vendor)) => {
                            let what = unsafe { CStr::from_ptr(ffi::ibv_wc_status_str(status)) };
                            Err(AgentError::Remote(format!(
                                "RDMA write failed: {} (vendor error {vendor:#x}); the queue pair is now in the error state",
                                what.to_string_lossy()
                            )))
                        }
                    }
                }
            }
        }
    }
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        unsafe {
            ffi::ibv_destroy_qp(self.qp);
            ffi::ibv_destroy_cq(self.cq);
        }
    }
}

/// One connected peer: our queue pair and the side channel.
struct Peer {
    qp: QueuePair,
    channel: TcpStream,
}

pub struct IbverbsBackend {
    name: String,
    address: String,
    device: Arc<Device>,
    registrations: Mutex<HashMap<u32, MemoryRegistration>>,
    peers: Mutex<HashMap<String, Arc<Mutex<Peer>>>>,
}

impl IbverbsBackend {
    /// Opens `device` (or the first with an active port), listens on
    /// `listen` for peers' queue-pair handshakes and notifications.
    /// [`AgentError::NoRdmaDevice`] when there is nothing to open.
    pub fn start(
        name: &str,
        device: Option<&str>,
        listen: &str,
        target: Target,
    ) -> Result<IbverbsBackend, AgentError> {
        let choice = choose_port(&module00_env::rdma::probe(), device)?;
        let device = Arc::new(Device::open(choice)?);
        let shared = device.clone();
        let address = channel::listen(name, listen, move |stream| {
            accept_peer(stream, shared.clone(), target.clone())
        })?;
        Ok(IbverbsBackend {
            name: name.to_string(),
            address,
            device,
            registrations: Mutex::new(HashMap::new()),
            peers: Mutex::new(HashMap::new()),
        })
    }
}

/// The target side of a handshake: a queue pair for this peer, kept for as
/// long as its side channel is open.
fn accept_peer(mut stream: TcpStream, device: Arc<Device>, target: Target) {
    let _ = stream.set_nodelay(true);
    let mut hello = [0u8; 1 + QpEndpoint::ENCODED_LEN];
    if stream.read_exact(&mut hello).is_err() {
        return;
    }
    if hello[0] != HANDSHAKE {
        return channel::fail(&mut stream, "expected a queue-pair handshake");
    }
    let qp = match QpEndpoint::decode(&hello[1..])
        .and_then(|peer| QueuePair::create(device).map(|qp| (qp, peer)))
        .and_then(|(qp, peer)| qp.connect(&peer).map(|_| qp))
    {
        Ok(qp) => qp,
        Err(e) => return channel::fail(&mut stream, &e.to_string()),
    };
    if stream.write_all(&qp.endpoint().encode()).is_err() {
        return;
    }
    // From here on the NIC applies the peer's writes; this thread only
    // relays notifications.
    channel::serve(stream, target, Writes::Refused);
    drop(qp);
}

impl Backend for IbverbsBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Ibverbs
    }

    fn address(&self) -> String {
        self.address.clone()
    }

    fn register(&self, region: u32, memory: &MemoryRegion) -> Result<Registration, AgentError> {
        let access = ffi::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
            | ffi::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE;
        // SAFETY: the region's contract keeps the memory alive while registered.
        let mr = unsafe {
            ffi::ibv_reg_mr(
                self.device.pd,
                memory.as_ptr().cast(),
                memory.len(),
                access.0 as i32,
            )
        };
        if mr.is_null() {
            let e = std::io::Error::last_os_error();
            let hint = match (memory.location(), e.raw_os_error()) {
                (Location::Cuda(n), _) => format!(
                    "GPU memory (cuda:{n}) needs GPUDirect RDMA: load nvidia_peermem \
                     (`sudo modprobe nvidia_peermem`, module 0 checks it) or register a host staging buffer"
                ),
                (_, Some(12)) => "raise the locked-memory limit (`ulimit -l unlimited`, or memlock in /etc/security/limits.conf)".into(),
                _ => "see `module00_env` for the device's state".into(),
            };
            return Err(AgentError::Backend(format!(
                "ibv_reg_mr of {} bytes failed: {e}; {hint}",
                memory.len()
            )));
        }
        let registration = MemoryRegistration(mr);
        let rkey = unsafe { (*mr).rkey };
        self.registrations
            .lock()
            .expect("registrations lock")
            .insert(region, registration);
        Ok(Registration::keyed(rkey))
    }

    fn deregister(&self, region: u32) {
        self.registrations
            .lock()
            .expect("registrations lock")
            .remove(&region);
    }

    fn connect(&self, peer: &AgentMetadata) -> Result<(), AgentError> {
        let mut channel = channel::connect(&peer.name, &peer.address)?;
        let qp = QueuePair::create(self.device.clone())?;
        let mut hello = vec![HANDSHAKE];
        hello.extend_from_slice(&qp.endpoint().encode());
        let broken = |e: std::io::Error| {
            AgentError::Backend(format!(
                "queue-pair handshake with {} failed: {e}",
                peer.name
            ))
        };
        channel.write_all(&hello).map_err(broken)?;
        let mut reply = [0u8; QpEndpoint::ENCODED_LEN];
        channel.read_exact(&mut reply).map_err(broken)?;
        qp.connect(&QpEndpoint::decode(&reply)?)?;
        self.peers.lock().expect("peers lock").insert(
            peer.name.clone(),
            Arc::new(Mutex::new(Peer { qp, channel })),
        );
        Ok(())
    }

    fn write(
        &self,
        peer: &str,
        ops: &[WriteOp<'_>],
        notification: &[u8],
    ) -> Result<(), AgentError> {
        let connection = super::connected(&self.peers, peer)?;
        let lkeys = {
            let registrations = self.registrations.lock().expect("registrations lock");
            ops.iter()
                .map(|op| {
                    registrations
                        .get(&op.local_region)
                        .map(MemoryRegistration::lkey)
                        .ok_or(AgentError::UnknownRegion {
                            agent: self.name.clone(),
                            region: op.local_region,
                        })
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        let mut connection = connection.lock().expect("peer lock");
        connection.qp.write(ops, &lkeys)?;
        channel::post(&mut connection.channel, peer, &self.name, &[], notification)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use module00_env::rdma::{GpuDirect, RdmaDevice, RdmaPort};

    fn port(port: u8, state: &str, link_layer: &str, roce_v2: Option<u32>) -> RdmaPort {
        RdmaPort {
            port,
            state: state.into(),
            link_layer: link_layer.into(),
            active_mtu: 4096,
            rate: None,
            gid0: None,
            roce_v2_gid_index: roce_v2,
        }
    }

    fn probe(devices: Vec<RdmaDevice>, missing: Option<&str>) -> RdmaProbe {
        RdmaProbe {
            devices,
            missing: missing.map(String::from),
            gpudirect: GpuDirect {
                peermem_loaded: false,
                nvidia_open_module: false,
            },
        }
    }

    #[test]
    fn endpoints_round_trip_and_reject_wrong_lengths() {
        let e = QpEndpoint {
            qp_num: 0x1234,
            psn: 0xab_cdef,
            lid: 7,
            gid: [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8],
        };
        assert_eq!(QpEndpoint::decode(&e.encode()).unwrap(), e);
        assert!(QpEndpoint::decode(&e.encode()[..25]).is_err());
        assert!(QpEndpoint::decode(&[0u8; 27]).is_err());
        // A PSN is 24 bits; stray high bits from the wire are dropped.
        let mut bytes = e.encode();
        bytes[7] = 0xff;
        assert_eq!(QpEndpoint::decode(&bytes).unwrap().psn, 0xab_cdef);
    }

    #[test]
    fn port_choice_prefers_active_ports_and_roce_v2_gids() {
        let devices = vec![
            RdmaDevice {
                name: "mlx5_0".into(),
                firmware: None,
                ports: vec![port(1, "DOWN", "InfiniBand", None)],
            },
            RdmaDevice {
                name: "mlx5_1".into(),
                firmware: None,
                ports: vec![port(1, "ACTIVE", "Ethernet", Some(3))],
            },
        ];
        let p = probe(devices, None);
        let chosen = choose_port(&p, None).unwrap();
        assert_eq!(
            chosen,
            PortChoice {
                device: "mlx5_1".into(),
                port: 1,
                ethernet: true,
                gid_index: 3
            }
        );
        let err = choose_port(&p, Some("mlx5_0")).unwrap_err();
        assert!(matches!(err, AgentError::NoRdmaDevice(_)), "{err}");
        assert!(err.to_string().contains("mlx5_0, mlx5_1"), "{err}");
    }

    #[test]
    fn no_device_is_reported_with_module_0s_reason() {
        let p = probe(Vec::new(), Some("this kernel has no RDMA support"));
        match choose_port(&p, None) {
            Err(AgentError::NoRdmaDevice(why)) => assert!(why.contains("no RDMA support")),
            other => panic!("expected NoRdmaDevice, got {other:?}"),
        }
    }
}
