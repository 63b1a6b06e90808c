//! The bench's table keeps its shape (timings redacted), and the engine's
//! greedy output on the real model stays what it was.

use module01_baseline::bench::{self, BenchConfig};
use module01_baseline::report::{
    render_table, BenchReport, EngineSteps, Memory, PeerResult, Roofline, RooflineBandwidth, Setup,
};
use shared::device::MemoryInterface;
use shared::engine::sampling::SamplingParams;
use shared::engine::{Engine, EngineConfig, Request};
use shared::model::config::LlamaConfig;
use shared::model::llama::Llama;
use tch::{Device, Kind};

fn tiny_engine() -> Engine {
    let config = LlamaConfig {
        vocab_size: 256,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        max_position_embeddings: 128,
        ..LlamaConfig::smollm2_135m()
    };
    let model = Llama::random(config, 0, Device::Cpu, Kind::Float);
    let engine_config = EngineConfig {
        num_blocks: 64,
        ..EngineConfig::with_kv_budget(&model, 1 << 20)
    };
    Engine::new(model, engine_config, vec![]).unwrap()
}

fn report(with_peer: bool) -> BenchReport {
    let mut engine = tiny_engine();
    let config = BenchConfig {
        prompt_len: 8,
        output_len: 4,
        batch_sizes: vec![1, 2],
        num_requests: 3,
        request_rate: 0.0,
        seed: 1,
    };
    bench::warm_up(&mut engine, &config);
    let single = bench::single_request(&mut engine, &config);
    let batches: Vec<_> = config
        .batch_sizes
        .iter()
        .map(|&b| bench::batch(&mut engine, &config, b))
        .collect();
    let load = bench::offered_load(&mut engine, &config, &indicatif::ProgressBar::hidden());
    assert_eq!(load.requests, 3);
    assert!(batches.iter().all(|b| b.output_tokens_per_s > 0.0));
    assert!(
        batches
            .iter()
            .all(|b| b.decode_step_ms.is_some_and(|ms| ms > 0.0)),
        "the bare decode step is timed on a CPU too (padded, without graphs)"
    );
    let peers = if with_peer {
        vec![PeerResult {
            name: "peer".into(),
            single: single.clone(),
            batches: batches.clone(),
        }]
    } else {
        Vec::new()
    };
    BenchReport {
        setup: Setup {
            model: "tiny (random weights)".into(),
            parameters: engine.model().config().num_parameters(),
            device: "cpu".into(),
            device_name: "test machine".into(),
            dtype: "f32".into(),
            decode: "eager".into(),
            fused_kernels: false,
            matvec_max_batch: None,
            layer_kernel: false,
            layer_ring: None,
            decode_ahead: false,
            kv_cache_blocks: 64,
            max_num_batched_tokens: 512,
            date: "today".into(),
        },
        config,
        single,
        batches,
        load: Some(load),
        memory: Memory {
            cpu_peak_rss_mb: 1.0,
            gpu_used_mb: None,
            kv_pool_mb: 1.0,
        },
        engine_steps: None,
        roofline: None,
        peers,
        legacy_peer: None,
    }
}

#[test]
fn table_shape_without_peer() {
    insta::assert_snapshot!(render_table(&report(false), true));
}

#[test]
fn table_shape_with_peer() {
    let report = report(true);
    let table = render_table(&report, false);
    // Compared with itself, every ratio is exactly 1.
    assert!(table.contains("1.00x"), "{table}");
    insta::assert_snapshot!(render_table(&report, true));
}

#[test]
fn report_round_trips_through_json() {
    let report = report(false);
    let json = serde_json::to_string(&report).unwrap();
    let back: BenchReport = serde_json::from_str(&json).unwrap();
    assert_eq!(back.batches.len(), 2);
    assert_eq!(back.config.prompt_len, 8);
}

#[test]
fn engine_greedy_output_on_smollm2() {
    let path = shared::model::default_model_path().expect("run scripts/setup.sh");
    let loaded = shared::model::load_model(&path, Device::Cpu, Kind::Float).unwrap();
    let prompts = [
        "The capital of France is",
        "The largest planet in the solar system is",
    ];
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| loaded.tokenizer.encode(p).unwrap())
        .collect();
    let eos = loaded.tokenizer.eos_ids();
    let config = EngineConfig::with_kv_budget(&loaded.model, 64 << 20);
    let mut engine = Engine::new(loaded.model, config, eos).unwrap();
    let requests = ids
        .iter()
        .enumerate()
        .map(|(i, p)| Request::new(i as u64, p.clone(), SamplingParams::greedy(12)))
        .collect();
    let results = engine.generate_all(requests).unwrap();
    let text: Vec<String> = prompts
        .iter()
        .zip(&results)
        .map(|(p, (tokens, reason, _))| {
            format!(
                "{p}|{}| ({reason:?})",
                loaded.tokenizer.decode(tokens).unwrap()
            )
        })
        .collect();
    insta::assert_snapshot!(text.join("\n"));
}

/// Results saved when a bench had at most one peer (`"peer": {...}`) still
/// load, with that peer as the first of `peers`.
#[test]
fn results_with_one_legacy_peer_still_load() {
    let mut saved = serde_json::to_value(report(true)).unwrap();
    let object = saved.as_object_mut().unwrap();
    let peers = object.remove("peers").unwrap();
    object.insert("peer".into(), peers[0].clone());
    let report = BenchReport::from_json(&saved.to_string()).unwrap();
    assert_eq!(report.peers.len(), 1);
    assert_eq!(report.peers[0].name, "peer");
    assert!(render_table(&report, false).contains("1.00x"));
}

/// Two peers: a pair of columns each, and the ratio against each.
#[test]
fn table_has_a_column_pair_per_peer() {
    let mut report = report(true);
    let mut slower = report.peers[0].clone();
    slower.name = "slower".into();
    slower.single.decode_ms_per_token *= 2.0;
    report.peers.push(slower);
    let table = render_table(&report, false);
    let decode = table
        .lines()
        .find(|l| l.starts_with("single: decode"))
        .unwrap();
    assert!(
        decode.contains("1.00x") && decode.contains("2.00x"),
        "{table}"
    );
    assert!(table.lines().nth(3).unwrap().contains("slower"), "{table}");
}

/// The table's first line says how the decode step ran: on the fused
/// kernels, and up to which batch on the matrix-vector kernel.
#[test]
fn table_names_the_matrix_vector_limit() {
    let mut report = report(false);
    report.setup.fused_kernels = true;
    report.setup.matvec_max_batch = Some(1);
    let first = |r: &BenchReport| render_table(r, false).lines().next().unwrap().to_string();
    assert!(first(&report).ends_with("on fused kernels (matrix-vector products up to batch 1)"));
    report.setup.layer_kernel = true;
    assert!(first(&report)
        .ends_with("on fused kernels (one persistent kernel per layer up to batch 1)"));
    report.setup.layer_ring = Some("6 slots of 33.0 KiB read by 3 groups of 5 warps".into());
    assert!(first(&report).ends_with(
        "(one persistent kernel per layer up to batch 1, its weight ring 6 slots of 33.0 KiB \
         read by 3 groups of 5 warps)"
    ));
    report.setup.matvec_max_batch = Some(0);
    assert!(first(&report).ends_with("on fused kernels"));
    report.setup.fused_kernels = false;
    assert!(!first(&report).contains("fused"));
    report.setup.decode_ahead = true;
    assert!(first(&report).ends_with("decode steps, queued ahead"));
}

/// With decode steps queued ahead, the table says how many were used and
/// how many dropped.
#[test]
fn table_counts_the_steps_queued_ahead() {
    let mut report = report(false);
    report.engine_steps = Some(EngineSteps {
        steps: 40,
        queued_ahead_used: 31,
        queued_ahead_dropped: 2,
    });
    let line = "engine steps: 40; decode steps queued ahead: 31 used, 2 dropped";
    assert!(
        !render_table(&report, false).contains(line),
        "not queued ahead"
    );
    report.setup.decode_ahead = true;
    assert!(render_table(&report, false).contains(line));
}

/// The roofline's bandwidth: the flag where given, else the GPU's own; a
/// flag far from the GPU's peak is warned about; no GPU and no flag, no
/// roofline. The table says where the number came from.
#[test]
fn roofline_bandwidth_comes_from_the_flag_or_the_gpu() {
    let h100 = MemoryInterface {
        bus_bits: 5120,
        clock_mhz: 2619,
    };
    let from_gpu = RooflineBandwidth::choose(None, Some(h100)).unwrap();
    assert!((from_gpu.gb_per_s - 3352.3).abs() < 0.1, "{from_gpu:?}");
    assert_eq!(from_gpu.source, "NVML: 5120-bit bus at 2619 MHz");
    assert_eq!(from_gpu.warning, None);

    // The data sheet's figure, and a measured copy's (89 % of the peak).
    for fine in [3350.0, 2966.0] {
        let chosen = RooflineBandwidth::choose(Some(fine), Some(h100)).unwrap();
        assert_eq!((chosen.gb_per_s, chosen.warning), (fine, None));
    }
    // An H200's figure on an H100, and an A100's.
    for (wrong, why) in [(4800.0, "is above"), (1555.0, "is far below")] {
        let chosen = RooflineBandwidth::choose(Some(wrong), Some(h100)).unwrap();
        assert_eq!(chosen.gb_per_s, wrong, "the flag wins");
        let warning = chosen.warning.unwrap();
        assert!(
            warning.contains(why) && warning.contains("3352 GB/s"),
            "{warning}"
        );
    }
    let cpu = RooflineBandwidth::choose(Some(50.0), None).unwrap();
    assert_eq!(
        (cpu.source.as_str(), cpu.warning),
        ("--mem-bandwidth-gbps", None)
    );
    assert_eq!(RooflineBandwidth::choose(None, None), None);

    let mut report = report(false);
    report.roofline = Some(Roofline {
        weight_bytes: 2_069_000_000,
        bandwidth_gb_per_s: from_gpu.gb_per_s,
        bandwidth_source: from_gpu.source,
        floor_ms: 0.617,
        measured_ms: 1.24,
        ratio: 2.01,
    });
    let table = render_table(&report, false);
    assert!(
        table.contains("at 3352 GB/s (NVML: 5120-bit bus at 2619 MHz) the floor is 0.617 ms"),
        "{table}"
    );
    report.roofline.as_mut().unwrap().bandwidth_source = String::new();
    assert!(
        render_table(&report, false).contains("at 3352 GB/s the floor"),
        "older results"
    );
}

/// The single request runs several times, each with a prompt of its own: a
/// prompt seen before would come from the prefix cache, and its prefill
/// would time almost nothing. The medians are real times.
#[test]
fn single_request_runs_fresh_prompts() {
    let mut engine = tiny_engine();
    let config = BenchConfig {
        prompt_len: 40,
        output_len: 4,
        batch_sizes: vec![1],
        num_requests: 0,
        request_rate: 0.0,
        seed: 3,
    };
    assert_eq!(bench::single_runs(&engine), 3, "three runs on a CPU");
    let single = bench::single_request(&mut engine, &config);
    let stats = engine.stats();
    assert_eq!(
        stats.prefix_cache_hit_rate, 0.0,
        "no run found another's prompt blocks in the prefix cache"
    );
    assert!(stats.steps >= 3 * 4, "three requests of four tokens ran");
    assert!(single.prefill_ms > 0.0 && single.decode_ms_per_token > 0.0);
    assert!(single.end_to_end_ms >= single.prefill_ms);
}
