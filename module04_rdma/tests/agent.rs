//! The transfer agent end to end: one-sided writes land where the
//! descriptors say, notifications follow the data, and every out-of-bounds
//! or unauthorised write is refused on both sides. On the TCP backend
//! everywhere; on ibverbs where this machine has an active RDMA port.

use std::time::Duration;

use module04_rdma::agent::{AgentError, BackendChoice, TransferAgent};
use module04_rdma::metadata::{AgentMetadata, BackendKind};
use module04_rdma::region::{Descriptor, Location, MemoryRegion, RegionId};
use rand::{Rng, SeedableRng};

fn agent(name: &str) -> TransferAgent {
    TransferAgent::new(
        name,
        BackendChoice::Tcp {
            listen: "127.0.0.1:0".into(),
        },
    )
    .unwrap()
}

fn filled(len: usize, seed: u64) -> (MemoryRegion, Vec<u8>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
    let region = MemoryRegion::alloc(len);
    unsafe { region.bytes_mut(0, len) }.copy_from_slice(&data);
    (region, data)
}

#[test]
fn scattered_blocks_land_where_the_descriptors_say() {
    scattered_blocks_land(agent("decode"), agent("prefill"));
}

/// Whether this machine has an RDMA port to test the ibverbs backend on.
fn rdma_port() -> bool {
    let probe = module00_env::rdma::probe();
    let found = probe.active_ports().next().is_some();
    if !found {
        eprintln!(
            "skipped: no RDMA device ({})",
            probe.missing.unwrap_or_default()
        );
    }
    found
}

#[test]
fn ibverbs_backend_moves_blocks_where_a_device_exists() {
    if !rdma_port() {
        return;
    }
    let rdma = |name: &str| {
        TransferAgent::new(
            name,
            BackendChoice::Ibverbs {
                device: None,
                listen: "127.0.0.1:0".into(),
            },
        )
        .unwrap()
    };
    scattered_blocks_land(rdma("decode"), rdma("prefill"));
}

#[test]
fn asking_for_ibverbs_without_a_device_says_why() {
    if rdma_port() {
        return;
    }
    let result = TransferAgent::new(
        "rdma",
        BackendChoice::Ibverbs {
            device: None,
            listen: "127.0.0.1:0".into(),
        },
    );
    match result {
        Err(AgentError::NoRdmaDevice(why)) => assert!(!why.is_empty()),
        Err(other) => panic!("expected NoRdmaDevice, got {other}"),
        Ok(_) => panic!("an ibverbs agent without an RDMA device"),
    }
}

#[test]
fn auto_uses_rdma_exactly_when_a_port_is_active() {
    let agent = TransferAgent::new(
        "auto",
        BackendChoice::Auto {
            listen: "127.0.0.1:0".into(),
        },
    )
    .unwrap();
    let expected = if rdma_port() {
        BackendKind::Ibverbs
    } else {
        BackendKind::Tcp
    };
    assert_eq!(agent.backend(), expected);
    assert_eq!(agent.metadata().backend, expected);
}

#[test]
fn backend_names_parse_or_say_what_is_accepted() {
    assert!(matches!(
        BackendChoice::parse("ibverbs:mlx5_0", "0.0.0.0:0").unwrap(),
        BackendChoice::Ibverbs { device: Some(d), .. } if d == "mlx5_0"
    ));
    assert!(matches!(
        BackendChoice::parse("tcp", "0.0.0.0:0").unwrap(),
        BackendChoice::Tcp { .. }
    ));
    let err = BackendChoice::parse("nixl", "0.0.0.0:0").unwrap_err();
    assert!(err.to_string().contains("auto, tcp, ibverbs"), "{err}");
    assert!(BackendChoice::parse("ibverbs:", "0.0.0.0:0").is_err());
}

#[test]
fn the_tcp_backend_refuses_gpu_memory_with_a_way_out() {
    let agent = agent("decode");
    let mut host = vec![0u8; 64];
    // Claimed to be GPU memory; refused before anything could touch it.
    let fake_gpu = unsafe { MemoryRegion::borrowed(host.as_mut_ptr(), 64, Location::Cuda(0)) };
    let err = agent.register(fake_gpu).unwrap_err();
    assert!(err.to_string().contains("host staging buffer"), "{err}");
    assert!(agent.metadata().regions.is_empty());
}

fn scattered_blocks_land(decode: TransferAgent, prefill: TransferAgent) {
    let pool = decode.register(MemoryRegion::alloc(64 * 1024)).unwrap();
    let (source, data) = filled(16 * 1024, 1);
    let local = prefill.register(source).unwrap();
    // The metadata travels as bytes (through etcd or a side channel in practice).
    let metadata = AgentMetadata::decode(&decode.metadata().encode()).unwrap();
    prefill.load_remote(&metadata).unwrap();

    // Four 4 KiB blocks into non-contiguous remote blocks, like paged KV.
    let remote_blocks = [9u64, 2, 14, 5];
    let pairs: Vec<(Descriptor, Descriptor)> = remote_blocks
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            (
                Descriptor::new(local, i as u64 * 4096, 4096),
                Descriptor::new(pool, b * 4096, 4096),
            )
        })
        .collect();
    let stats = prefill
        .write("decode", &pairs, b"request 7: layer 0 done")
        .unwrap();
    assert_eq!(stats.bytes, 16 * 1024);

    let note = decode
        .wait_notification(Duration::from_secs(5))
        .expect("notified");
    assert_eq!(note.from, "prefill");
    assert_eq!(note.data, b"request 7: layer 0 done");
    let memory = decode.region(pool).unwrap();
    for (i, &b) in remote_blocks.iter().enumerate() {
        let got = unsafe { memory.bytes(b as usize * 4096, 4096) };
        assert_eq!(got, &data[i * 4096..(i + 1) * 4096], "block {b}");
    }
    // Untouched blocks stay zero.
    assert!(unsafe { memory.bytes(0, 4096) }.iter().all(|&x| x == 0));
}

#[test]
fn out_of_bounds_and_unknown_regions_are_refused_before_sending() {
    let decode = agent("decode");
    let pool = decode.register(MemoryRegion::alloc(4096)).unwrap();
    let prefill = agent("prefill");
    let local = prefill.register(MemoryRegion::alloc(8192)).unwrap();
    prefill.load_remote(&decode.metadata()).unwrap();

    let too_far = [(
        Descriptor::new(local, 0, 4096),
        Descriptor::new(pool, 1, 4096),
    )];
    assert!(matches!(
        prefill.write("decode", &too_far, b""),
        Err(AgentError::OutOfBounds {
            region_len: 4096,
            ..
        })
    ));
    let local_overrun = [(
        Descriptor::new(local, 8000, 200),
        Descriptor::new(pool, 0, 200),
    )];
    assert!(matches!(
        prefill.write("decode", &local_overrun, b""),
        Err(AgentError::OutOfBounds { .. })
    ));
    let no_region = [(
        Descriptor::new(local, 0, 8),
        Descriptor::new(RegionId(42), 0, 8),
    )];
    assert!(matches!(
        prefill.write("decode", &no_region, b""),
        Err(AgentError::UnknownRegion { .. })
    ));
    let mismatch = [(Descriptor::new(local, 0, 8), Descriptor::new(pool, 0, 16))];
    assert!(matches!(
        prefill.write("decode", &mismatch, b""),
        Err(AgentError::LengthMismatch { .. })
    ));
    assert!(matches!(
        prefill.write("nobody", &[], b""),
        Err(AgentError::UnknownPeer(_))
    ));
    // Nothing arrived.
    assert!(decode
        .wait_notification(Duration::from_millis(100))
        .is_none());
}

#[test]
fn the_target_checks_again_stale_metadata_is_refused() {
    let decode = agent("decode");
    let pool = decode.register(MemoryRegion::alloc(4096)).unwrap();
    let prefill = agent("prefill");
    let local = prefill.register(MemoryRegion::alloc(4096)).unwrap();
    prefill.load_remote(&decode.metadata()).unwrap();
    // The target withdraws the region; the initiator's metadata still lists it.
    decode.deregister(pool);
    let pair = [(Descriptor::new(local, 0, 64), Descriptor::new(pool, 0, 64))];
    let err = prefill.write("decode", &pair, b"").unwrap_err();
    assert!(matches!(err, AgentError::Remote(_)), "{err}");
    assert!(err.to_string().contains("no region"), "{err}");
}

#[test]
fn a_forged_key_is_refused_by_the_target() {
    let decode = agent("decode");
    let pool = decode.register(MemoryRegion::alloc(4096)).unwrap();
    let prefill = agent("prefill");
    let local = prefill.register(MemoryRegion::alloc(4096)).unwrap();
    let mut forged = decode.metadata();
    forged.regions[0].rkey ^= 1;
    prefill.load_remote(&forged).unwrap();
    let pair = [(Descriptor::new(local, 0, 64), Descriptor::new(pool, 0, 64))];
    let err = prefill.write("decode", &pair, b"").unwrap_err();
    assert!(err.to_string().contains("wrong key"), "{err}");
}

#[test]
fn a_real_kv_tensor_crosses_into_a_registered_tensor() {
    use tch::{Device, Kind, Tensor};
    // A layer's K and V as the pool holds them, written into a pool-shaped tensor.
    let pool = Tensor::zeros([4, 2, 64, 3, 8], (Kind::Float, Device::Cpu));
    let decode = agent("decode");
    let pool_id = decode
        .register(unsafe { MemoryRegion::of_tensor(&pool) })
        .unwrap();
    let kv = Tensor::randn([2, 16, 3, 8], (Kind::Float, Device::Cpu)); // one block of K and V
    let prefill = agent("prefill");
    let local = prefill
        .register(unsafe { MemoryRegion::of_tensor(&kv) })
        .unwrap();
    prefill.load_remote(&decode.metadata()).unwrap();
    // Layer 1, block 2 (slots 32..48), K and V: two spans in the pool.
    let slot_bytes = 3 * 8 * 4;
    let layer_stride = 2 * 64 * slot_bytes;
    let pairs: Vec<(Descriptor, Descriptor)> = (0..2u64)
        .map(|which| {
            let src = which * 16 * slot_bytes;
            let dst = layer_stride + which * 64 * slot_bytes + 32 * slot_bytes;
            (
                Descriptor::new(local, src, 16 * slot_bytes),
                Descriptor::new(pool_id, dst, 16 * slot_bytes),
            )
        })
        .collect();
    prefill.write("decode", &pairs, b"done").unwrap();
    decode.wait_notification(Duration::from_secs(5)).unwrap();
    assert!(pool.get(1).narrow(1, 32, 16).equal(&kv));
    assert_eq!(
        pool.get(1)
            .narrow(1, 0, 32)
            .abs()
            .sum(Kind::Float)
            .double_value(&[]),
        0.0
    );
}

fn cuda_ipc(name: &str) -> Result<TransferAgent, AgentError> {
    TransferAgent::new(
        name,
        BackendChoice::CudaIpc {
            listen: "127.0.0.1:0".into(),
        },
    )
}

#[test]
fn cuda_ipc_is_chosen_by_name_and_refuses_host_memory() {
    assert!(matches!(
        BackendChoice::parse("cuda-ipc", "127.0.0.1:0").unwrap(),
        BackendChoice::CudaIpc { .. }
    ));
    match cuda_ipc("decode") {
        // Built with the CUDA bridge: the agent starts, but CUDA IPC shares
        // GPU memory only, and says what to use instead.
        Ok(agent) => {
            assert_eq!(agent.backend(), BackendKind::CudaIpc);
            let err = agent.register(MemoryRegion::alloc(64)).unwrap_err();
            assert!(err.to_string().contains("not host memory"), "{err}");
        }
        Err(err) => {
            assert!(!shared::cuda_ipc::compiled());
            assert!(err.to_string().contains("no CUDA IPC support"), "{err}");
        }
    }
}

/// Where the child process of the test below finds the target's metadata.
const IPC_CHILD: &str = "SPARK_DISAGG_TEST_IPC_METADATA";

/// The initiator's two transfers, as (source offset, target offset, length)
/// in bytes: three large spans (copied one by one) and twenty small ones
/// (moved by the index scatter), in disjoint parts of the target.
fn ipc_transfers() -> [Vec<(u64, u64, u64)>; 2] {
    let large = vec![(0, 4096, 1024), (2048, 0, 512), (8192, 65536, 4096)];
    let small = (0..20)
        .map(|i| (512 * i, 98304 + 1024 * (19 - i), 256))
        .collect();
    [large, small]
}

/// The real thing: a second process maps this one's GPU memory and its GPU
/// writes scattered spans into it (GPU 0 → the last GPU; with one GPU, both
/// processes share it). Needs a GPU with the CUDA bridge built; on a
/// machine without one the test says so and checks nothing.
#[test]
fn cuda_ipc_writes_land_in_another_process_gpu_memory() {
    use tch::{Device, Kind, Tensor};
    if let Ok(path) = std::env::var(IPC_CHILD) {
        // The initiator (child process).
        shared::device::load_cuda_runtime().unwrap();
        let metadata = AgentMetadata::decode(&std::fs::read(path).unwrap()).unwrap();
        let source = Tensor::arange(16384, (Kind::Int64, Device::Cuda(0))).to_kind(Kind::Uint8);
        let prefill = cuda_ipc("prefill").unwrap();
        let local = prefill
            .register(unsafe { MemoryRegion::of_tensor(&source) })
            .unwrap();
        prefill.load_remote(&metadata).unwrap();
        for spans in ipc_transfers() {
            let pairs: Vec<(Descriptor, Descriptor)> = spans
                .iter()
                .map(|&(from, to, len)| {
                    (
                        Descriptor::new(local, from, len),
                        Descriptor::new(metadata.regions[0].id, to, len),
                    )
                })
                .collect();
            prefill.write(&metadata.name, &pairs, b"written").unwrap();
        }
        return;
    }
    let gpus = shared::device::cuda_device_count();
    if !shared::cuda_ipc::compiled() || gpus == 0 {
        eprintln!("no CUDA device (or no CUDA bridge in this build): CUDA IPC not tested here");
        return;
    }
    let device = Device::Cuda(gpus - 1);
    let pool = Tensor::zeros([131072], (Kind::Uint8, device));
    let decode = cuda_ipc("decode").unwrap();
    decode
        .register(unsafe { MemoryRegion::of_tensor(&pool) })
        .unwrap();
    let path = std::env::temp_dir().join(format!("spark-ipc-{}.bin", std::process::id()));
    std::fs::write(&path, decode.metadata().encode()).unwrap();
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "cuda_ipc_writes_land_in_another_process_gpu_memory",
            "--include-ignored",
            "--nocapture",
        ])
        .env(IPC_CHILD, &path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(
        child.status.success(),
        "the initiator process failed: {}{}",
        String::from_utf8_lossy(&child.stdout),
        String::from_utf8_lossy(&child.stderr)
    );
    for _ in ipc_transfers() {
        let note = decode.wait_notification(Duration::from_secs(5)).unwrap();
        assert_eq!(note.data, b"written");
    }
    // Every span holds the source bytes (i mod 256), and nothing else was touched.
    let got = Vec::<u8>::try_from(&pool.to_device(Device::Cpu)).unwrap();
    let mut expected = vec![0u8; got.len()];
    for (from, to, len) in ipc_transfers().concat() {
        for i in 0..len as usize {
            expected[to as usize + i] = ((from as usize + i) % 256) as u8;
        }
    }
    assert_eq!(got, expected);
}
