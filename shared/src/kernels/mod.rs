//! The decode step's own CUDA kernels, compiled when the engine starts.
//!
//! A decode step written with PyTorch operations (`model::llama`) is easy
//! to read and slow on a GPU at small batches: each operation is a kernel,
//! a layer needs about thirty of them, and most move only a few kilobytes.
//! Even replayed from a CUDA graph, a kernel costs a couple of
//! microseconds, so the step spends more time starting kernels than
//! reading weights. Serving engines fix this with hand-written kernels
//! that do several operations in one pass; [`DecodeKernels`] holds these
//! (source: `decode.cu`, beside this file):
//!
//! | kernel            | replaces                                               |
//! |-------------------|--------------------------------------------------------|
//! | `rms_norm`        | PyTorch's `rms_norm`                                   |
//! | `rope_store_kv`   | RoPE on queries and keys (5 kernels) and the KV writes |
//! | `paged_attention` | the gather through the block table, the mask and SDPA  |
//! | `silu_mul`        | `silu` and the product of SwiGLU                       |
//! | `matvec`          | at small batch: a matrix product, with the RMSNorm or SwiGLU before it and the residual addition after it |
//! | `decode_layer`    | at small batch: a whole decoder layer, in one persistent kernel |
//! | `product_rows*`   | opt-in, up to 128 rows: a matrix product, with the residual addition or SwiGLU after it (`product`) |
//!
//! Above the matrix-vector kernel's batch limit the products are cuBLAS's,
//! and the residual additions ride on them (`addmm_` adds the product to
//! the residual stream in place); our own product kernel can take them
//! instead, though on an H100 it is slower (see `product`). The methods
//! that take a weight ([`DecodeKernels::norm_linear`] and its siblings)
//! choose among them by the number of rows.
//!
//! The source is compiled at run time by NVRTC — the way PyTorch builds its
//! own "jiterator" kernels — for the GPU at hand and for the model's shape
//! (head size, query heads per KV head, dtype are compile-time constants,
//! so the loops unroll and the registers are sized exactly). NVRTC comes
//! with the PyTorch wheel; building this crate needs no CUDA compiler. The
//! C++ side (`csrc/kernels.cpp`) compiles, loads, and launches on PyTorch's
//! current stream, so the kernels are captured into CUDA graphs like any
//! PyTorch operation.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use tch::{Device, Kind, Tensor};

use crate::model::config::LlamaConfig;

mod product;
pub mod timeline;
use product::{ProductEpilogue, ProductKernels};
use timeline::{LayerTimeline, TIMELINE_BLOCKS, TIMELINE_LAYERS, TIMELINE_MARKS};

/// The kernels' CUDA source.
pub const SOURCE: &str = include_str!("decode.cu");

/// Threads per block of `attention_partial` (`THREADS` in the source).
const ATTENTION_THREADS: usize = 128;
/// Key rows each lane group loads per partition: enough loads in flight
/// to hide memory latency, few enough to stay in registers.
const TOKENS_PER_GROUP: usize = 4;
/// Threads per block of `matvec` (`MATVEC_WARPS` · 32 in the source).
const MATVEC_THREADS: usize = 256;
/// The most rows `matvec` takes: beyond a few, each weight is used often
/// enough that cuBLAS's tiled kernels win.
const MATVEC_MAX_ROWS: usize = 4;
/// Static shared memory `matvec` may use for its staged input (the 48 KiB
/// limit, less room for its other arrays).
const MATVEC_SHARED_BYTES: usize = 46 * 1024;
/// Resident `matvec` blocks per multiprocessor the grid is sized for: the
/// registers of four 256-thread blocks fill a Hopper or Ampere SM.
const MATVEC_BLOCKS_PER_SM: usize = 4;

/// Threads per block of `decode_layer` (`LAYER_THREADS` in the source): one
/// block per multiprocessor, 15 warps that compute and one that copies
/// weights, up to 128 registers per thread.
const LAYER_THREADS: usize = 512;
/// `decode_layer`'s warps that compute (the last one copies).
const LAYER_COMPUTE_WARPS: usize = LAYER_THREADS / 32 - 1;
/// A slot of `decode_layer`'s weight ring, at least (a slot holds one tile:
/// a few whole weight rows; `SPARK_DISAGG_LAYER_SLOT_KB` overrides it).
/// Larger tiles mean fewer waits, sums and barriers per byte; on an H200,
/// 32 KiB (five slots) beat 24 KiB, 16 KiB (ten) and 11 KiB (fifteen).
const LAYER_SLOT_BYTES: usize = 32 * 1024;
/// Weight rows per tile, at most (each row's partial sums stay in registers).
const LAYER_TILE_ROWS: usize = 8;
/// Tiles of one block on their way at once, by default (see
/// `layer_copy_depth`): one, and `LAYER_DEEP_COPY_DEPTH` for a layer of
/// `LAYER_DEEP_COPY_MIN_BYTES` or more.
const LAYER_COPY_DEPTH: usize = 1;
const LAYER_DEEP_COPY_DEPTH: usize = 2;
const LAYER_DEEP_COPY_MIN_BYTES: usize = 160 << 20;
/// Of a block's first tiles, all qkv's, how many it asks for at once at the
/// layer's start, whatever the copy depth, by default for a layer under
/// `LAYER_DEEP_COPY_MIN_BYTES` (see `layer_start_tiles`).
const LAYER_START_TILES: usize = 3;
/// The most padding a row of a ring tile gets (see `tile_row_pitch`).
const TILE_ROW_PAD_MAX: usize = 128;

/// Bytes from one row of a ring tile to the next (`tile_pitch` in the
/// source): the row padded to 64 more than a multiple of 128, so that the
/// two rows that eight lanes read in one shared-memory cycle fall in
/// different banks. A slot gets room for this padding on top of its weight bytes,
/// and is a multiple of 128 bytes, so that every slot starts in bank 0.
fn tile_row_pitch(row_bytes: usize) -> usize {
    row_bytes + (64 + TILE_ROW_PAD_MAX - row_bytes % TILE_ROW_PAD_MAX) % TILE_ROW_PAD_MAX
}
/// How many of `decode_layer`'s warps read a tile together, each a share
/// of its columns (`LAYER_GROUP_WARPS` in the source), in order of
/// preference: the ring takes the first that gives it the most slots
/// (`LayerRing::choose`). Groups of three (five groups) come first; groups
/// of five (three groups) where that makes room for one slot more, since
/// the slots must be a multiple of the groups: with the staging sized for
/// one input row, an H100 block has room for six slots of 33 KiB, which
/// three groups can use and five cannot, and the batch-1 step took
/// 1.15–1.16 ms against 1.18–1.21 with five slots in five groups.
const LAYER_GROUP_WARP_CHOICES: [usize; 2] = [3, 5];

/// `SPARK_DISAGG_LAYER_GROUP_WARPS`, where set: one group size for the
/// ring instead of the choice (1 to 15 warps).
fn layer_group_warps_override() -> Option<usize> {
    let v = std::env::var("SPARK_DISAGG_LAYER_GROUP_WARPS").ok()?;
    match v.trim().parse::<usize>() {
        Ok(w) if (1..=LAYER_COMPUTE_WARPS).contains(&w) => Some(w),
        _ => {
            tracing::warn!(value = %v, "SPARK_DISAGG_LAYER_GROUP_WARPS is not a number of warps from 1 to {LAYER_COMPUTE_WARPS}; choosing");
            None
        }
    }
}

/// How much of the next product's weights `matvec` prefetches into L2, by
/// default; `SPARK_DISAGG_L2_PREFETCH_MB` overrides it (0 turns it off).
const L2_PREFETCH_MB: f64 = 4.0;

fn l2_prefetch_bytes() -> usize {
    let mb = match std::env::var("SPARK_DISAGG_L2_PREFETCH_MB") {
        Err(_) => L2_PREFETCH_MB,
        Ok(v) => v.parse::<f64>().unwrap_or_else(|_| {
            tracing::warn!(value = %v, "SPARK_DISAGG_L2_PREFETCH_MB is not a number of MB; using {L2_PREFETCH_MB}");
            L2_PREFETCH_MB
        }),
    };
    (mb.max(0.0) * 1024.0 * 1024.0) as usize
}

/// Whether small-batch steps (up to the matrix-vector limit) run each layer
/// as one persistent kernel (`decode_layer`) rather than seven launches
/// (the matrix-vector kernel and the attention kernels), given the value of
/// `SPARK_DISAGG_LAYER_KERNEL` (`None`: not set) and whether the GPU has
/// Hopper's bulk copies.
///
/// By default only where it has them. Without them the copying warp fills
/// the ring with Ampere's 16-byte copies, and on the H100 that path made
/// TinyLlama's step 1.43 ms against 1.23 for the seven launches (SmolLM2's
/// 0.68 against 0.67; experiments file, section 23); no Ampere GPU has run
/// either yet. `1` turns the layer kernel on wherever a block fits, `0` off.
fn layer_kernel_wanted(setting: Option<&str>, bulk_copies: bool) -> bool {
    match setting.map(str::trim) {
        None => bulk_copies,
        Some("0") => false,
        Some("1") => true,
        Some(other) => {
            tracing::warn!(
                value = %other,
                "SPARK_DISAGG_LAYER_KERNEL is neither 0 nor 1; using the default for this GPU"
            );
            bulk_copies
        }
    }
}

/// The whole number in environment variable `name` where it is set and
/// within `valid`, else `default` (with a warning that the value is not
/// `what` the variable holds).
fn env_whole_number(
    name: &str,
    default: usize,
    valid: std::ops::RangeInclusive<usize>,
    what: &str,
) -> usize {
    let Ok(v) = std::env::var(name) else {
        return default;
    };
    match v.trim().parse::<usize>() {
        Ok(n) if valid.contains(&n) => n,
        _ => {
            tracing::warn!(value = %v, "{name} is not {what}; using {default}");
            default
        }
    }
}

/// The smallest slot of the weight ring, in bytes: `SPARK_DISAGG_LAYER_SLOT_KB`
/// or the default.
fn layer_slot_floor() -> usize {
    let kb = env_whole_number(
        "SPARK_DISAGG_LAYER_SLOT_KB",
        LAYER_SLOT_BYTES / 1024,
        0..=usize::MAX / 1024,
        "a whole number of KiB",
    );
    kb * 1024
}

/// Whether `decode_layer` fills its ring with Hopper's bulk copies where the
/// GPU has them (the default); `SPARK_DISAGG_LAYER_BULK_COPY=0` makes it use
/// Ampere's 16-byte asynchronous copies instead, so that path can be tried
/// on a Hopper too.
fn layer_bulk_copy_allowed() -> bool {
    std::env::var("SPARK_DISAGG_LAYER_BULK_COPY").map_or(true, |v| v.trim() != "0")
}

/// Whether `decode_layer`'s copies mark the weights they bring through L2
/// as the first to evict (the default; see `l2_evict_first_policy` in
/// `decode.cu`); `SPARK_DISAGG_LAYER_EVICT_FIRST=0` copies without the hint.
fn layer_evict_first_allowed() -> bool {
    std::env::var("SPARK_DISAGG_LAYER_EVICT_FIRST").map_or(true, |v| v.trim() != "0")
}

/// Tiles a block of `decode_layer` keeps on their way from memory at once
/// (`LAYER_COPY_DEPTH` in the source), for a layer of `layer_bytes` of
/// weights. The default is 1: the copying warp issues a tile only once the
/// one before it has landed. The ring's other slots still fill ahead of the
/// computing warps; what the limit takes away is the queue of copies in the
/// memory system, which every other trip to L2 (the grid barriers' atomics,
/// attention's loads of the KV cache) would wait behind (experiments file,
/// section 22k).
///
/// That trade pays per layer, and a large layer's weights stream for much
/// longer than its syncs wait: there the stream's rate counts for more,
/// and one 33 KiB tile in flight per multiprocessor (4.4 MB on an H100,
/// 1.3 us of HBM at its peak) is a little short of what memory's latency
/// under load asks for (Little's law, chapter 1's exercise 15). So a layer
/// of 160 MiB or more gets two. On an H100 at batch 1, two tiles were
/// 2.8 % slower for TinyLlama's 88 MB a layer, even at 120 MB, and 2.2 %
/// faster at 220, 285 and 436 MB (Llama-3-8B; experiments file, section 27).
/// `SPARK_DISAGG_LAYER_COPY_DEPTH` sets the depth for any layer; 0 lifts the
/// limit (a copy as soon as a slot is free, as before); a depth of the
/// ring's slots or more is no limit.
fn layer_copy_depth(layer_bytes: usize) -> usize {
    env_tiles(
        "SPARK_DISAGG_LAYER_COPY_DEPTH",
        default_copy_depth(layer_bytes),
    )
}

/// A number of tiles from the environment variable `name`, or `default`.
fn env_tiles(name: &str, default: usize) -> usize {
    env_whole_number(name, default, 0..=usize::MAX, "a whole number of tiles")
}

/// Whether a layer of `layer_bytes` of weights streams long enough that the
/// stream's rate counts for more than the syncs it delays: two tiles of a
/// block in flight, and no burst at the start (see `layer_copy_depth` and
/// `layer_start_tiles`).
fn streams_long(layer_bytes: usize) -> bool {
    layer_bytes >= LAYER_DEEP_COPY_MIN_BYTES
}

/// How many of its first tiles a block of `decode_layer` asks for at once
/// at the layer's start (`LAYER_START_TILES` in the source), for a layer
/// of `layer_bytes` of weights, before the copy depth applies; only qkv's
/// tiles count, so a block with fewer of them asks for fewer.
///
/// The depth keeps the queue of copies short while other trips to L2 wait
/// behind it. At the layer's start nothing else is in flight: the ring is
/// empty, the layer before has finished, and everything waits for qkv's
/// output. A block of TinyLlama has two or three qkv tiles; one at a time,
/// they take as many trips to memory, one after the other, and the stage
/// waits for the block that is last. All at once, the step was 2.2-3.1 %
/// faster on an H100 for every layer of hidden size 2048 measured (TinyLlama
/// with either build, 53 and 120 MB a layer); for Llama-3-8B, whose blocks
/// have about twelve qkv tiles, three in flight through all of them was
/// 2.6 % slower than its depth of two, and even the first three alone were
/// 0.4 % slower: its qkv stage streams for long enough that one trip more
/// or less at the start does not count. So layers of 160 MiB or more, those
/// with the deeper copies, get no burst (experiments file, section 29).
/// `SPARK_DISAGG_LAYER_START_TILES` sets the number for any layer; 0 (or no
/// more than the depth) turns the burst off.
fn layer_start_tiles(layer_bytes: usize) -> usize {
    env_tiles(
        "SPARK_DISAGG_LAYER_START_TILES",
        default_start_tiles(layer_bytes),
    )
}

/// `layer_start_tiles` where the environment does not set it.
fn default_start_tiles(layer_bytes: usize) -> usize {
    if streams_long(layer_bytes) {
        0
    } else {
        LAYER_START_TILES
    }
}

/// `layer_copy_depth` where the environment does not set it.
fn default_copy_depth(layer_bytes: usize) -> usize {
    if streams_long(layer_bytes) {
        LAYER_DEEP_COPY_DEPTH
    } else {
        LAYER_COPY_DEPTH
    }
}

/// The bytes of a layer's weights from which `decode_layer` waits for
/// tagged words rather than grid barriers (see [`layer_tagged_wanted`]).
const LAYER_TAGGED_MIN_BYTES: usize = 64 << 20;

/// Whether `decode_layer`'s stages wait for tagged words (see
/// `store_tagged` in `decode.cu`) instead of grid barriers, given the
/// value of `SPARK_DISAGG_LAYER_TAGGED` (`None`: not set), the model's
/// dtype, the bytes of one layer's weights and the rows (sequences) the
/// kernel is compiled for.
///
/// A grid barrier is cheap (about 1 us) while the ring's copies are done,
/// and costs 2-5 us while they are in flight: its trips to L2 queue behind
/// the weight stream. The tagged words cost about the same either way (a
/// stage polls its input's words, each twice the bytes of the value). So
/// they win only where a layer's weights outlast the ring (26 MB on an
/// H100) long enough that the copies are still going at the later syncs.
/// Measured on an H100 at batch 1 over eight shapes from 7 to 436 MB a
/// layer, the tagged build lost 1-3 % up to 54 MB and won from 88 MB
/// (TinyLlama 1.5 %, 120 MB 4 %, Llama-3-8B 2 %; experiments file,
/// section 26); 64 MiB lies between. Only a kernel of one row, though:
/// compiled for four, TinyLlama's tagged build won 2 % at batch 1 and lost
/// 3 % at batch 2 and 10 % at batch 4 (each row's vectors are more words to
/// poll). Those builds kept the first barrier; without it (fix 32, section
/// 28) the tagged build was 1-2.6 % faster again on TinyLlama and
/// Llama-3-8B. Measured again over five of the shapes (section 29), it
/// lost 1 % at 7 MB a layer and 2 % at 31 MB, tied at 22 MB and won 0.7 %
/// at 53 MB and 3 % at 88 MB: the crossover moved below 53 MB, and 64 MiB
/// stays, as lowering it would gain under 1 % where measured. No other GPU has
/// been measured, nor f32 models, whose tagged build spills registers
/// (its words are 64 bits) and has run in no GPU test: they keep the
/// barriers. `1` turns them on for any model and rows, `0` off.
fn layer_tagged_wanted(setting: Option<&str>, kind: Kind, layer_bytes: usize, rows: usize) -> bool {
    let by_default = kind != Kind::Float && rows == 1 && layer_bytes >= LAYER_TAGGED_MIN_BYTES;
    match setting.map(str::trim) {
        None => by_default,
        Some("0") => false,
        Some("1") => true,
        Some(other) => {
            tracing::warn!(
                value = %other,
                "SPARK_DISAGG_LAYER_TAGGED is neither 0 nor 1; using the default for this model"
            );
            by_default
        }
    }
}

/// Whether `decode_layer` is built with its timeline (see [`timeline`]):
/// `SPARK_DISAGG_LAYER_TIMELINE=1`; off by default. A diagnostic build:
/// one more named barrier per stage and a clock read at each mark.
fn layer_timeline_wanted() -> bool {
    std::env::var("SPARK_DISAGG_LAYER_TIMELINE").is_ok_and(|v| v.trim() == "1")
}

/// Whether the kernels are compiled with line information
/// (`SPARK_DISAGG_KERNEL_LINEINFO=1`, NVRTC's `-lineinfo`; off by default),
/// so that compute-sanitizer and Nsight Compute name lines of `decode.cu`
/// instead of offsets into the binary. The code is the same either way.
fn kernel_line_info_wanted() -> bool {
    std::env::var("SPARK_DISAGG_KERNEL_LINEINFO").is_ok_and(|v| v.trim() == "1")
}

/// Blocks per multiprocessor that `attention_partial`'s grid aims for (see
/// [`attention_span`]): as many as fit on an H100's multiprocessor at once
/// (its registers allow four). Two ran as fast at batch 128 and slower at
/// batch 32; eight slower at both.
const ATTENTION_BLOCKS_PER_SM: usize = 4;

/// Whether `attention_partial` (batched decode, and batch 1 without the
/// layer kernel) runs on the tensor cores where it can: 16-bit models on
/// sm_80 and later (the default). `SPARK_DISAGG_ATTENTION_MMA=0` keeps it
/// on the CUDA cores, the way `decode_layer` does its own attention, so the
/// two can be compared.
fn attention_mma_allowed() -> bool {
    std::env::var("SPARK_DISAGG_ATTENTION_MMA").map_or(true, |v| v.trim() != "0")
}

/// Whether, on a Hopper or later, each layer's `decode_layer` is launched
/// with programmatic dependent launch (the default): the next layer's grid
/// is launched while this one runs, so that its blocks start about half a
/// microsecond after the last block of this one exits rather than one (the
/// cooperative launch, which the grid barriers need, keeps them from
/// starting any earlier). `SPARK_DISAGG_LAYER_OVERLAP=0` launches each
/// kernel after the last has finished.
fn layer_overlap_enabled() -> bool {
    std::env::var("SPARK_DISAGG_LAYER_OVERLAP").map_or(true, |v| v.trim() != "0")
}

/// Whether, on a Hopper or later, `attention_partial` is launched while
/// `rope_store_kv` runs and `attention_combine` while `attention_partial`
/// does (programmatic dependent launch, as between layer kernels): each
/// waits for the one before inside the kernel, so its launch and the
/// scheduling of its blocks are done by then. The default;
/// `SPARK_DISAGG_ATTENTION_OVERLAP=0` launches each after the last has
/// finished.
fn attention_overlap_enabled() -> bool {
    std::env::var("SPARK_DISAGG_ATTENTION_OVERLAP").map_or(true, |v| v.trim() != "0")
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum KernelError {
    #[error(
        "this build has no CUDA bridge (libtorch without CUDA, or CUDA's headers were missing \
         at build time: pip install nvidia-cuda-crt and rebuild)"
    )]
    NotCompiled,
    #[error("the decode kernels need a CUDA device, not {0:?}")]
    NotCuda(Device),
    #[error("the decode kernels do not cover this model: {0}")]
    Unsupported(String),
    #[error(
        "NVRTC (libnvrtc) was not found beside libtorch or on the library path; \
         pip install the nvidia-cuda-nvrtc wheel matching torch, or set LD_LIBRARY_PATH \
         ({0})"
    )]
    NoNvrtc(String),
    #[error("{stage}: {message}")]
    Cuda {
        stage: &'static str,
        message: String,
    },
}

/// What the kernels are compiled for: the model's dtype and attention
/// shape, and how many rows the matrix-vector kernel can stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KernelShape {
    pub kind: Kind,
    pub head_dim: usize,
    /// Query heads per key/value head.
    pub gqa_group: usize,
    /// The longest input row of a matrix product (hidden or intermediate size).
    pub matvec_k: usize,
    /// Rows `matvec` can take at most: 0 when the model's sizes do not
    /// split into 16-byte loads, fewer than 4 when 4 rows would not fit
    /// in shared memory.
    pub matvec_rows: usize,
    /// Bytes of one slot of `decode_layer`'s weight ring: at least the
    /// longest weight row, and a pair of rows of the hidden size (RoPE's and
    /// SwiGLU's pairs go into one tile).
    pub layer_slot_bytes: usize,
    /// Whether `decode_layer` may use bulk copies (where the GPU has them).
    pub layer_bulk_copy: bool,
    /// Whether those copies ask L2 to evict the weights first.
    pub layer_evict_first: bool,
    /// Tiles of a block on their way at once (0: as many as free slots).
    pub layer_copy_depth: usize,
    /// Of a block's first (qkv) tiles, how many go out at once at the
    /// layer's start, whatever the depth.
    pub layer_start_tiles: usize,
    /// Whether the layer's stages wait for tagged words
    /// rather than grid barriers.
    pub layer_tagged: bool,
    /// Whether `attention_partial` may use the tensor cores (where the GPU
    /// and the dtype allow them).
    pub attention_mma: bool,
    /// Whether `decode_layer` records its timeline (a diagnostic build).
    pub layer_timeline: bool,
}

impl KernelShape {
    /// The shape of `config` in `kind`, or why the kernels cannot run it,
    /// with as many rows as fit (see [`KernelShape::for_batches`]).
    pub fn of(config: &LlamaConfig, kind: Kind) -> Result<KernelShape, KernelError> {
        Self::for_batches(config, kind, usize::MAX)
    }

    /// The shape of `config` in `kind` with the matrix-vector kernel (and
    /// the layer kernel) compiled for at most `rows` input rows. Their
    /// staged input takes `rows` rows of shared memory, and in the layer
    /// kernel what the staging does not take the weight ring can: the
    /// engine compiles for the rows it will use
    /// (`EngineConfig::matvec_max_batch`). Whether the layer kernel waits
    /// for tagged words depends on those rows too.
    pub fn for_batches(
        config: &LlamaConfig,
        kind: Kind,
        rows: usize,
    ) -> Result<KernelShape, KernelError> {
        let sizes = [
            config.hidden_size,
            config.intermediate_size,
            config.num_attention_heads * config.head_dim(),
        ];
        let matvec_k = sizes.into_iter().max().unwrap_or(0);
        let elt = kind.elt_size_in_bytes();
        let layer_bytes = config.layer_parameters() * elt;
        let mut shape = KernelShape {
            kind,
            head_dim: config.head_dim(),
            gqa_group: config.num_attention_heads / config.num_kv_heads(),
            matvec_k,
            matvec_rows: 0,
            layer_slot_bytes: 0,
            layer_bulk_copy: layer_bulk_copy_allowed(),
            layer_evict_first: layer_evict_first_allowed(),
            layer_copy_depth: layer_copy_depth(layer_bytes),
            layer_start_tiles: layer_start_tiles(layer_bytes),
            layer_tagged: false,
            attention_mma: attention_mma_allowed(),
            layer_timeline: layer_timeline_wanted(),
        };
        shape.layer_slot_bytes = (layer_slot_floor() + LAYER_TILE_ROWS * TILE_ROW_PAD_MAX)
            .max(tile_row_pitch(matvec_k * elt))
            .max(2 * tile_row_pitch(config.hidden_size * elt))
            .next_multiple_of(TILE_ROW_PAD_MAX);
        if shape.scalar_kind().is_some() && sizes.iter().all(|k| k % shape.vec() == 0) {
            let row_bytes = matvec_k * elt;
            shape.matvec_rows = (MATVEC_SHARED_BYTES / row_bytes.max(1))
                .min(MATVEC_MAX_ROWS)
                .min(rows);
        }
        shape.layer_tagged = layer_tagged_wanted(
            std::env::var("SPARK_DISAGG_LAYER_TAGGED").ok().as_deref(),
            kind,
            layer_bytes,
            shape.matvec_rows,
        );
        shape.check()?;
        Ok(shape)
    }

    fn scalar_kind(self) -> Option<u8> {
        match self.kind {
            Kind::Float => Some(0),
            Kind::BFloat16 => Some(1),
            Kind::Half => Some(2),
            _ => None,
        }
    }

    /// Elements of one 16-byte load.
    fn vec(self) -> usize {
        16 / self.kind.elt_size_in_bytes()
    }

    /// Lanes that share one key row (16 bytes each).
    fn lanes(self) -> usize {
        self.head_dim / self.vec()
    }

    /// Context tokens per block of `attention_partial`.
    pub fn partition(self) -> usize {
        TOKENS_PER_GROUP * ATTENTION_THREADS / self.lanes()
    }

    /// Query heads per attention item of `decode_layer`: the largest
    /// divisor of the group whose queries and accumulators (`heads · vec`
    /// floats each) stay within 16 registers, so that the whole layer
    /// kernel fits in 128 registers per thread without spilling (2 for
    /// TinyLlama in bf16: its 8 query heads per KV head make 4 items).
    fn layer_heads(self) -> usize {
        (1..=self.gqa_group)
            .rev()
            .find(|h| self.gqa_group % h == 0 && h * self.vec() <= 16)
            .unwrap_or(1)
    }

    fn check(self) -> Result<(), KernelError> {
        let unsupported = |why: String| Err(KernelError::Unsupported(why));
        if self.scalar_kind().is_none() {
            return unsupported(format!("dtype {:?} (f32, bf16 and f16 are)", self.kind));
        }
        let row_bytes = self.head_dim * self.kind.elt_size_in_bytes();
        if row_bytes % 16 != 0 || !(16..=256).contains(&row_bytes) {
            return unsupported(format!(
                "a head of {} elements is {row_bytes} bytes; the kernels need 16 to 256, \
                 a multiple of 16",
                self.head_dim
            ));
        }
        if 32 % self.lanes() != 0 {
            return unsupported(format!("head_dim {} (not a power of two)", self.head_dim));
        }
        // Each lane keeps the queries and accumulators of the whole group in registers.
        if self.gqa_group * self.vec() > 64 {
            return unsupported(format!(
                "{} query heads per KV head in {:?} (registers)",
                self.gqa_group, self.kind
            ));
        }
        Ok(())
    }

    /// NVRTC's options for this shape, with groups of `group_warps` warps
    /// reading the layer kernel's tiles.
    fn options(self, group_warps: usize) -> Vec<String> {
        let mut options = vec![
            "-std=c++17".into(),
            format!("-DSCALAR_KIND={}", self.scalar_kind().expect("checked")),
            format!("-DHEAD_DIM={}", self.head_dim),
            format!("-DGQA_GROUP={}", self.gqa_group),
            format!("-DPARTITION={}", self.partition()),
            format!("-DLAYER_HEADS={}", self.layer_heads()),
            // With no room for a row, a token array keeps the source valid.
            format!("-DMATVEC_ROWS={}", self.matvec_rows.max(1)),
            format!(
                "-DMATVEC_K={}",
                if self.matvec_rows > 0 {
                    self.matvec_k
                } else {
                    self.vec()
                }
            ),
            format!("-DLAYER_THREADS={LAYER_THREADS}"),
            format!("-DLAYER_SLOT_BYTES={}", self.layer_slot_bytes),
            format!("-DLAYER_TILE_ROWS={LAYER_TILE_ROWS}"),
            format!("-DLAYER_GROUP_WARPS={group_warps}"),
            format!("-DLAYER_BULK_COPY_ALLOWED={}", self.layer_bulk_copy as u8),
            format!("-DLAYER_EVICT_FIRST={}", self.layer_evict_first as u8),
            format!("-DLAYER_COPY_DEPTH={}", self.layer_copy_depth),
            format!("-DLAYER_START_TILES={}", self.layer_start_tiles),
            format!("-DLAYER_TAGGED={}", self.layer_tagged as u8),
            format!("-DATTENTION_MMA_ALLOWED={}", self.attention_mma as u8),
            format!("-DLAYER_TIMELINE={}", self.layer_timeline as u8),
        ];
        if kernel_line_info_wanted() {
            options.push("-lineinfo".into());
        }
        options
    }
}

/// A kernel in a loaded module. Driver function handles may be launched
/// from any thread.
#[derive(Clone, Copy)]
struct Function(#[cfg_attr(not(cuda_bridge), allow(dead_code))] *mut c_void);
unsafe impl Send for Function {}
unsafe impl Sync for Function {}

/// A loaded module: one build of the source on one device.
#[derive(Clone, Copy)]
struct Module(#[cfg_attr(not(cuda_bridge), allow(dead_code))] *mut c_void);
unsafe impl Send for Module {}
unsafe impl Sync for Module {}

/// What one NVRTC build gives: its kernels by name, the module that holds
/// them, and the device's multiprocessor count (grids are sized by it).
struct Build {
    functions: HashMap<String, Function>,
    module: Module,
    multiprocessors: usize,
}

/// How a kernel is launched, besides its grid, block and shared memory.
/// (Without the CUDA bridge nothing is launched, and nothing reads it.)
#[derive(Debug, Clone, Copy, Default)]
#[cfg_attr(not(cuda_bridge), allow(dead_code))]
struct LaunchMode {
    /// All blocks resident at once, which the driver checks: a kernel that
    /// waits at grid-wide barriers needs it.
    cooperative: bool,
    /// The kernel may be launched while the one before it on the stream is
    /// still running (Hopper's programmatic dependent launch), once that one
    /// allows it; the kernel waits for it itself before reading its results.
    /// A cooperative kernel's blocks still start only when all of them fit.
    overlap_previous: bool,
}

/// One kernel argument, as `cuLaunchKernel` takes it: by address.
enum Arg {
    Ptr(*mut c_void),
    I32(i32),
    I64(i64),
    F32(f32),
}

impl Arg {
    fn tensor(t: &Tensor) -> Arg {
        Arg::Ptr(t.data_ptr())
    }

    fn address(&self) -> *mut c_void {
        match self {
            Arg::Ptr(p) => p as *const *mut c_void as *mut c_void,
            Arg::I32(v) => v as *const i32 as *mut c_void,
            Arg::I64(v) => v as *const i64 as *mut c_void,
            Arg::F32(v) => v as *const f32 as *mut c_void,
        }
    }
}

/// One decoder layer's weights, as `decode_layer` reads them.
pub struct LayerWeights<'a> {
    pub input_norm: &'a Tensor,
    /// `[(heads + 2·kv_heads)·head_dim, hidden]`: queries, keys, values.
    pub qkv_proj: &'a Tensor,
    /// `[hidden, heads·head_dim]`.
    pub o_proj: &'a Tensor,
    pub post_norm: &'a Tensor,
    /// `[2·inter, hidden]`: gate, then up.
    pub gate_up_proj: &'a Tensor,
    /// `[hidden, inter]`.
    pub down_proj: &'a Tensor,
}

/// What `decode_layer` needs of the step besides the weights: where each
/// sequence is, where its new key and value go, its blocks, RoPE's tables
/// (`[max_positions, head_dim / 2]`, f32) and RMSNorm's epsilon.
pub struct LayerStep<'a> {
    pub positions: &'a Tensor,
    pub write_slots: &'a Tensor,
    pub block_tables: &'a Tensor,
    pub block_size: usize,
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    pub eps: f64,
}

/// Scratch memory of `decode_layer` for one step, shared by its layers:
/// the rotated queries, the attention split's partial results, the
/// attention and SwiGLU outputs, and the counters of the grid barrier and
/// of the attention merge. The barrier's count starts at zero and grows
/// over the step's layers, so a scratch serves one step: make a new one
/// (a fresh zeroed tensor, inside a CUDA graph a memset) for the next.
pub struct LayerScratch {
    q: Tensor,
    attn: Tensor,
    act: Tensor,
    part_acc: Tensor,
    part_max: Tensor,
    part_sum: Tensor,
    sync: Tensor,
    /// Attention's output, x after the o projection, SwiGLU's output and
    /// qkv's output as tagged words (one per element: 32 bits, 64 for f32),
    /// zeroed; none where the kernel was built with grid barriers instead.
    tagged: Option<Tensor>,
    hidden: usize,
    partitions: usize,
}

/// `decode_layer`'s one argument, passed by value: field for field the
/// `LayerParams` of `decode.cu` (same order, same C types).
#[repr(C)]
struct LayerParams {
    x: *mut c_void,
    input_norm: *mut c_void,
    post_norm: *mut c_void,
    qkv_proj: *mut c_void,
    o_proj: *mut c_void,
    gate_up_proj: *mut c_void,
    down_proj: *mut c_void,
    positions: *mut c_void,
    slots: *mut c_void,
    block_tables: *mut c_void,
    cos_table: *mut c_void,
    sin_table: *mut c_void,
    k_cache: *mut c_void,
    v_cache: *mut c_void,
    q: *mut c_void,
    attn: *mut c_void,
    act: *mut c_void,
    attn_tagged: *mut c_void,
    x_tagged: *mut c_void,
    act_tagged: *mut c_void,
    qkv_tagged: *mut c_void,
    part_acc: *mut c_void,
    part_max: *mut c_void,
    part_sum: *mut c_void,
    sync: *mut c_void,
    eps: f32,
    scale: f32,
    rows: i32,
    hidden: i32,
    inter: i32,
    heads: i32,
    kv_heads: i32,
    max_blocks: i32,
    block_size: i32,
    partitions: i32,
    layer: i32,
    ring_slots: i32,
    tile_groups: i32,
}

/// The weight ring of `decode_layer`: how many slots its block's dynamic
/// shared memory holds, and how many groups of warps (of how many warps
/// each) take tiles from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerRing {
    pub slots: usize,
    pub groups: usize,
    pub group_warps: usize,
    pub slot_bytes: usize,
    /// Bytes of one group's partial sums of a tile (`TileSums`); a group has two.
    pub sums_bytes: usize,
    /// Tiles of a block on their way from memory at once, as compiled
    /// (`KernelShape::layer_copy_depth`; 0: as many as there are free slots).
    pub copy_depth: usize,
    /// Of a block's first (qkv) tiles, how many it asks for at once at the
    /// layer's start (`KernelShape::layer_start_tiles`).
    pub start_tiles: usize,
    /// Whether the stages wait for tagged words rather than
    /// grid barriers (`KernelShape::layer_tagged`).
    pub tagged: bool,
}

impl LayerRing {
    /// The largest ring that fits in `available` bytes of shared memory for
    /// groups of `group_warps` warps (each with two sets of `sums_bytes`),
    /// or None below two slots (with one, copying and computing could not
    /// overlap). Each slot also takes its two 8-byte barriers. The slots
    /// are a multiple of the groups, so that a slot is always read by the
    /// same group: a group then never waits for a tile whose slot still
    /// holds an older one (see `ring_product`).
    pub fn plan(
        available: usize,
        slot_bytes: usize,
        group_warps: usize,
        sums_bytes: usize,
    ) -> Option<LayerRing> {
        let most_groups = LAYER_COMPUTE_WARPS / group_warps.max(1);
        let room = available.checked_sub(most_groups * 2 * sums_bytes)?;
        let most = room / (slot_bytes + 16);
        if most < 2 || most_groups == 0 {
            return None;
        }
        let groups = most.min(most_groups);
        Some(LayerRing {
            slots: most / groups * groups,
            groups,
            group_warps,
            slot_bytes,
            sums_bytes,
            copy_depth: 0,
            start_tiles: 0,
            tagged: false,
        })
    }

    /// Of the group sizes `choices`, the plan with the most slots (the
    /// earlier choice on a tie), for a kernel staging `rows` input rows.
    pub fn choose(
        available: usize,
        slot_bytes: usize,
        rows: usize,
        choices: &[usize],
    ) -> Option<LayerRing> {
        choices
            .iter()
            .filter_map(|&warps| {
                let sums_bytes = warps * LAYER_TILE_ROWS * rows.max(1) * 4;
                LayerRing::plan(available, slot_bytes, warps, sums_bytes)
            })
            .fold(None, |best, ring| match best {
                Some(best) if best.slots >= ring.slots => Some(best),
                _ => Some(ring),
            })
    }

    /// The dynamic shared memory the ring takes.
    pub fn shared_bytes(self) -> usize {
        self.slots * (self.slot_bytes + 16) + self.groups * 2 * self.sums_bytes
    }

    /// The tiles of a block in flight at most, where that is fewer than
    /// the slots (None: a copy whenever a slot is free).
    pub fn copy_limit(self) -> Option<usize> {
        (self.copy_depth > 0 && self.copy_depth < self.slots).then_some(self.copy_depth)
    }

    /// How many qkv tiles a block asks for at once at the layer's start,
    /// where that is more than the copy limit (None: no burst, or no limit
    /// for it to lift). As many as there are slots at most.
    pub fn start_burst(self) -> Option<usize> {
        let limit = self.copy_limit()?;
        let tiles = self.start_tiles.min(self.slots);
        (tiles > limit).then_some(tiles)
    }
}

/// "6 slots of 33.0 KiB read by 3 groups of 5 warps, 1 tile of a block in
/// flight": what a result file says of the ring, since it depends on the
/// GPU, on the batches the kernels were compiled for and on
/// `SPARK_DISAGG_LAYER_COPY_DEPTH`. Without a limit the description ends
/// at the warps, as it did in results saved before the limit existed; a
/// burst of qkv tiles at the layer's start (fix 33) follows the limit in
/// brackets, "(qkv's first 3 at once)". A
/// build with tagged words (see [`layer_tagged_wanted`]) adds ", tagged
/// words instead of grid barriers" (", tagged words after attention" in
/// results of fix 30's build, which kept the first barrier).
impl std::fmt::Display for LayerRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} slots of {:.1} KiB read by {} groups of {} warps",
            self.slots,
            self.slot_bytes as f64 / 1024.0,
            self.groups,
            self.group_warps
        )?;
        match self.copy_limit() {
            Some(1) => write!(f, ", 1 tile of a block in flight")?,
            Some(depth) => write!(f, ", {depth} tiles of a block in flight")?,
            None => {}
        }
        if let Some(tiles) = self.start_burst() {
            write!(f, " (qkv's first {tiles} at once)")?;
        }
        if self.tagged {
            write!(f, ", tagged words instead of grid barriers")?;
        }
        Ok(())
    }
}

/// The ring `decode_layer` can have on `device`, of the group sizes
/// `choices`, or None where the layer kernel cannot run: before Ampere (no
/// mbarriers) or where two slots do not fit beside the kernel's own arrays.
/// The kernel's own (static) arrays do not depend on the group size, so a
/// kernel compiled for any of them tells how much room there is.
fn layer_ring(
    decode_layer: Function,
    device: usize,
    shape: KernelShape,
    choices: &[usize],
) -> Option<LayerRing> {
    let memory = imp::shared_memory(decode_layer, device).ok()?;
    if memory.capability < 80 {
        return None;
    }
    let available = memory.optin_bytes.saturating_sub(memory.static_bytes);
    let ring = LayerRing::choose(
        available,
        shape.layer_slot_bytes,
        shape.matvec_rows,
        choices,
    )?;
    Some(LayerRing {
        copy_depth: shape.layer_copy_depth,
        start_tiles: shape.layer_start_tiles,
        tagged: shape.layer_tagged,
        ..ring
    })
}

/// What a kernel may have of shared memory on its device.
struct SharedMemory {
    /// Bytes of the kernel's own (static) shared arrays.
    static_bytes: usize,
    /// The most one block may have in all, static and dynamic, once it asks.
    optin_bytes: usize,
    /// The device's compute capability, major · 10 + minor (90: Hopper).
    capability: usize,
}

/// The grid of `decode_layer` on `device`: one block per multiprocessor,
/// or 0 (the layer kernel off) when `on` is false, there is no ring, or a
/// block does not fit on a multiprocessor (or the driver cannot say).
fn layer_blocks(
    decode_layer: Function,
    device: usize,
    multiprocessors: usize,
    ring: Option<LayerRing>,
    on: bool,
) -> usize {
    let fits = |ring: LayerRing| {
        imp::occupancy(decode_layer, device, LAYER_THREADS, ring.shared_bytes())
            .is_ok_and(|b| b >= 1)
    };
    match ring {
        Some(ring) if on && fits(ring) => multiprocessors,
        _ => 0,
    }
}

// ANCHOR: attention_span
/// Partitions per `attention_partial` block, for `pairs` (sequence,
/// key/value head) pairs over contexts of `partitions` partitions, on a
/// GPU where the grid should have `blocks` blocks.
///
/// At batch 1 a layer has as few pairs as key/value heads (4 for
/// TinyLlama), so the context is split as finely as the partitions go
/// (the "flash-decoding" split) to give every multiprocessor work. At
/// batch 128 there are 512 pairs, already about four blocks per
/// multiprocessor of an H100: splitting further only adds partial results
/// to write and merge (with ten splits, the merge took 9 of the 49 µs a
/// layer spent on attention at batch 128). So each block reads the fewest
/// partitions that still make at most `blocks` blocks in all (when there
/// are fewer pairs than that), so that the grid runs in one wave.
fn attention_span(blocks: usize, pairs: usize, partitions: usize) -> usize {
    let partitions = partitions.max(1);
    let splits = (blocks / pairs.max(1)).clamp(1, partitions);
    partitions.div_ceil(splits)
}
// ANCHOR_END: attention_span

/// True when `t`'s data can be read in 16-byte loads.
fn aligned_16(t: &Tensor) -> bool {
    t.data_ptr() as usize % 16 == 0
}

/// How `matvec` makes its input from the tensor it is given.
#[derive(Clone, Copy)]
enum Prologue<'a> {
    /// The tensor as it is.
    Plain,
    /// RMSNorm with this weight and epsilon.
    RmsNorm(&'a Tensor, f64),
    /// SwiGLU's `silu(gate) · up` of a `[rows, 2·k]` gate/up projection.
    SiluMul,
}

/// Where `matvec` puts its result.
#[derive(Clone, Copy)]
enum Epilogue<'a> {
    /// A new tensor in the model's dtype.
    Store,
    /// Added in place to this tensor (the residual stream).
    AddTo(&'a Tensor),
    /// A new f32 tensor (logits).
    StoreF32,
}

impl Prologue<'_> {
    fn code(self) -> i32 {
        match self {
            Prologue::Plain => 0,
            Prologue::RmsNorm(..) => 1,
            Prologue::SiluMul => 2,
        }
    }
}

impl Epilogue<'_> {
    fn code(self) -> i32 {
        match self {
            Epilogue::Store => 0,
            Epilogue::AddTo(_) => 1,
            Epilogue::StoreF32 => 2,
        }
    }
}

/// The decode kernels, compiled for one model shape on one GPU.
#[derive(Clone)]
pub struct DecodeKernels {
    device: usize,
    /// The module the kernels are in (its `layer_timeline` array is read
    /// from it in a timeline build).
    module: Module,
    shape: KernelShape,
    /// Multiprocessors of the device: `matvec`'s grid is sized by them.
    multiprocessors: usize,
    /// Batches of at most this many rows take `matvec` (at most
    /// `shape.matvec_rows`); larger ones cuBLAS.
    matvec_limit: usize,
    /// How much of the next product's weights `matvec` prefetches into L2.
    l2_prefetch_bytes: usize,
    /// Blocks of `decode_layer`'s grid: one per multiprocessor, or 0 when
    /// the layer kernel is off (or a block does not fit on one).
    layer_blocks: usize,
    /// `decode_layer`'s weight ring (None: the kernel cannot run here).
    layer_ring: Option<LayerRing>,
    /// What `attention_partial`'s grid aims for (see [`ATTENTION_BLOCKS_PER_SM`]).
    attention_blocks: usize,
    /// Compute capability 9.0 or later: a kernel can be launched before the
    /// one ahead of it ends (programmatic dependent launch).
    hopper: bool,
    /// Whether a layer's kernel is launched while the previous layer's
    /// runs (see `layer_overlap_enabled`).
    layer_overlap: bool,
    /// Whether the attention kernels are launched to overlap the kernel
    /// before them (see `attention_overlap_enabled`).
    attention_overlap: bool,
    /// The batched products' kernels (None where they cannot run: see
    /// `ProductKernels::new`), and whether products take them.
    products: Option<ProductKernels>,
    product_on: bool,

    rms_norm: Function,
    silu_mul: Function,
    rope_store_kv: Function,
    attention_partial: Function,
    attention_combine: Function,
    matvec: Function,
    decode_layer: Function,
}

impl DecodeKernels {
    /// True when this build can compile and launch kernels at all.
    pub fn compiled() -> bool {
        cfg!(cuda_bridge)
    }

    /// The kernels for `config` in `kind` on `device`: compiled on first
    /// use (a fraction of a second), then shared by the whole process.
    pub fn get(
        config: &LlamaConfig,
        kind: Kind,
        device: Device,
    ) -> Result<Arc<DecodeKernels>, KernelError> {
        Self::for_shape(KernelShape::of(config, kind)?, device)
    }

    /// The kernels for `config` in `kind` on `device`, compiled for
    /// batches of at most `rows` rows on the matrix-vector and layer
    /// kernels (see [`KernelShape::for_batches`]); as `get` otherwise.
    pub fn get_for_batches(
        config: &LlamaConfig,
        kind: Kind,
        device: Device,
        rows: usize,
    ) -> Result<Arc<DecodeKernels>, KernelError> {
        Self::for_shape(KernelShape::for_batches(config, kind, rows)?, device)
    }

    /// The kernels compiled for `shape` (as `get` does for the shape of a
    /// model), so that a test can ask for a variant of it.
    pub fn for_shape(
        shape: KernelShape,
        device: Device,
    ) -> Result<Arc<DecodeKernels>, KernelError> {
        let choices = match layer_group_warps_override() {
            Some(warps) => vec![warps],
            None => LAYER_GROUP_WARP_CHOICES.to_vec(),
        };
        Self::for_shape_with_groups(shape, device, &choices)
    }

    /// As `for_shape`, the layer kernel's ring choosing among the group
    /// sizes `choices` (warps per group; none: the usual ones), so that a
    /// test can run each.
    pub fn for_shape_with_groups(
        shape: KernelShape,
        device: Device,
        choices: &[usize],
    ) -> Result<Arc<DecodeKernels>, KernelError> {
        let choices = if choices.is_empty() {
            &LAYER_GROUP_WARP_CHOICES[..]
        } else {
            choices
        };
        let Device::Cuda(index) = device else {
            return Err(KernelError::NotCuda(device));
        };
        type Compiled = (usize, KernelShape, Vec<usize>, Arc<DecodeKernels>);
        static CACHE: Mutex<Vec<Compiled>> = Mutex::new(Vec::new());
        let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((.., k)) = cache
            .iter()
            .find(|(d, s, c, _)| *d == index && *s == shape && c == choices)
        {
            return Ok(k.clone());
        }
        // Which group size the ring is best off with depends on the
        // kernel's own shared arrays, known only once it is built; they do
        // not depend on the group size. A build takes NVRTC from a tenth
        // of a second to two seconds, depending on the CPU, so every size
        // is built at once, each on a thread of its own, and the first
        // one's kernel decides which build is kept.
        let started = std::time::Instant::now();
        let mut builds = std::thread::scope(|scope| {
            let threads: Vec<_> = choices
                .iter()
                .map(|&warps| scope.spawn(move || imp::compile(index, &shape.options(warps))))
                .collect();
            threads
                .into_iter()
                .map(|thread| thread.join().expect("an NVRTC build thread panicked"))
                .collect::<Result<Vec<Build>, KernelError>>()
        })?;
        let layer_ring = builds[0]
            .functions
            .get("decode_layer")
            .and_then(|&f| layer_ring(f, index, shape, choices));
        let kept = layer_ring
            .and_then(|ring| choices.iter().position(|&w| w == ring.group_warps))
            .unwrap_or(0);
        let Build {
            functions,
            module,
            multiprocessors,
        } = builds.swap_remove(kept);
        for unused in builds {
            // Only memory is at stake: the kept build does not need it gone.
            if let Err(e) = imp::unload(unused.module, index) {
                tracing::warn!("{e}");
            }
        }
        tracing::info!(
            seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
            builds = choices.len(),
            "compiled the decode kernels"
        );
        let get = |name: &str| {
            functions
                .get(name)
                .copied()
                .ok_or_else(|| KernelError::Cuda {
                    stage: "kernel lookup",
                    message: format!("{name} is missing from the module"),
                })
        };
        let decode_layer = get("decode_layer")?;
        let layer_ring = layer_ring
            .filter(|ring| imp::reserve_shared(decode_layer, index, ring.shared_bytes()).is_ok());
        let hopper = imp::shared_memory(decode_layer, index).is_ok_and(|m| m.capability >= 90);
        let products = ProductKernels::new(
            |name| functions.get(name).copied(),
            shape.kind,
            index,
            multiprocessors,
            hopper,
        );
        let kernels = Arc::new(DecodeKernels {
            device: index,
            module,
            shape,
            multiprocessors,
            matvec_limit: shape.matvec_rows,
            l2_prefetch_bytes: l2_prefetch_bytes(),
            layer_blocks: layer_blocks(
                decode_layer,
                index,
                multiprocessors,
                layer_ring,
                layer_kernel_wanted(
                    std::env::var("SPARK_DISAGG_LAYER_KERNEL").ok().as_deref(),
                    hopper,
                ),
            ),
            layer_ring,
            attention_blocks: multiprocessors * ATTENTION_BLOCKS_PER_SM,
            hopper,
            layer_overlap: hopper && layer_overlap_enabled(),
            attention_overlap: hopper && attention_overlap_enabled(),
            product_on: products.is_some() && product::product_kernel_enabled(),
            products,
            rms_norm: get("rms_norm")?,
            silu_mul: get("silu_mul")?,
            rope_store_kv: get("rope_store_kv")?,
            attention_partial: get("attention_partial")?,
            attention_combine: get("attention_combine")?,
            matvec: get("matvec")?,
            decode_layer,
        });
        cache.push((index, shape, choices.to_vec(), kernels.clone()));
        Ok(kernels)
    }

    pub fn shape(&self) -> KernelShape {
        self.shape
    }

    /// The layer kernel's weight ring on this GPU (None: it cannot run here).
    pub fn layer_ring(&self) -> Option<LayerRing> {
        self.layer_ring
    }

    /// The layer kernel's marks from the last step it ran (see
    /// [`timeline`]), for a model of `layers` layers; None where the kernels
    /// were not built with the timeline (`SPARK_DISAGG_LAYER_TIMELINE=1`)
    /// or the layer kernel is off. Waits for the device to finish first.
    pub fn layer_timeline(&self, layers: usize) -> Result<Option<LayerTimeline>, KernelError> {
        if !self.shape.layer_timeline || self.layer_blocks == 0 {
            return Ok(None);
        }
        tch::Cuda::synchronize(self.device as i64);
        let mut array = vec![0u64; TIMELINE_LAYERS * TIMELINE_BLOCKS * TIMELINE_MARKS];
        let copied = imp::read_global(self.module, self.device, "layer_timeline", &mut array)?;
        if copied != array.len() * std::mem::size_of::<u64>() {
            return Err(KernelError::Cuda {
                stage: "reading the layer timeline",
                message: format!(
                    "the module's layer_timeline holds {copied} bytes, not {}: \
                     decode.cu and kernels/timeline.rs disagree on its size",
                    array.len() * std::mem::size_of::<u64>()
                ),
            });
        }
        Ok(Some(LayerTimeline::from_device_array(
            &array,
            layers,
            self.layer_blocks,
        )))
    }

    /// The same kernels with the matrix-vector kernel used for batches of at
    /// most `rows` rows (0: never; capped at what the shape allows). The
    /// engine sets it from `EngineConfig::matvec_max_batch`.
    pub fn with_matvec_limit(&self, rows: usize) -> DecodeKernels {
        DecodeKernels {
            matvec_limit: rows.min(self.shape.matvec_rows),
            ..self.clone()
        }
    }

    /// Batches of at most this many sequences use the matrix-vector kernel.
    pub fn matvec_limit(&self) -> usize {
        self.matvec_limit
    }

    /// True when those batches run each layer as one persistent kernel
    /// (`decode_layer`) rather than seven launches.
    pub fn layer_kernel(&self) -> bool {
        self.layer_blocks > 0 && self.matvec_limit > 0
    }

    /// The same kernels with each layer kernel launched while the one before
    /// it runs (programmatic dependent launch), or after it (on by default
    /// where the GPU can, a Hopper or later, unless
    /// `SPARK_DISAGG_LAYER_OVERLAP=0`). Only timing changes.
    pub fn with_layer_overlap(&self, on: bool) -> DecodeKernels {
        DecodeKernels {
            layer_overlap: on && self.hopper,
            ..self.clone()
        }
    }

    /// The same kernels with the attention kernels launched while the
    /// kernel before each runs, or after it (see
    /// `SPARK_DISAGG_ATTENTION_OVERLAP`). Only timing changes.
    pub fn with_attention_overlap(&self, on: bool) -> DecodeKernels {
        DecodeKernels {
            attention_overlap: on && self.hopper,
            ..self.clone()
        }
    }

    /// The same kernels with the persistent layer kernel on (where a block
    /// fits) or off, whatever the default for this GPU (on where it has
    /// bulk copies; see `SPARK_DISAGG_LAYER_KERNEL`).
    pub fn with_layer_kernel(&self, on: bool) -> DecodeKernels {
        DecodeKernels {
            layer_blocks: layer_blocks(
                self.decode_layer,
                self.device,
                self.multiprocessors,
                self.layer_ring,
                on,
            ),
            ..self.clone()
        }
    }

    fn launch(&self, function: Function, grid: [usize; 3], block: usize, args: &[Arg]) {
        self.launch_args(function, grid, block, LaunchMode::default(), args);
    }

    /// [`launch`](Self::launch), but free to start while the kernel before
    /// it on the stream finishes, where `attention_overlap` is on: the
    /// kernel must wait for that one itself (`grid_dependencies_wait` in
    /// the source) before it touches memory.
    fn launch_overlapping(&self, function: Function, grid: [usize; 3], block: usize, args: &[Arg]) {
        let mode = LaunchMode {
            cooperative: false,
            overlap_previous: self.attention_overlap,
        };
        self.launch_args(function, grid, block, mode, args);
    }

    fn launch_args(
        &self,
        function: Function,
        grid: [usize; 3],
        block: usize,
        mode: LaunchMode,
        args: &[Arg],
    ) {
        let mut addresses: Vec<*mut c_void> = args.iter().map(Arg::address).collect();
        self.launch_with(function, grid, block, 0, mode, &mut addresses);
    }

    fn launch_with(
        &self,
        function: Function,
        grid: [usize; 3],
        block: usize,
        shared_bytes: usize,
        mode: LaunchMode,
        addresses: &mut [*mut c_void],
    ) {
        let grid = grid.map(|g| u32::try_from(g).expect("grid dimension fits in u32"));
        if grid.contains(&0) {
            return;
        }
        if let Err(message) = imp::launch(
            function,
            self.device,
            grid,
            block as u32,
            shared_bytes as u32,
            mode,
            addresses,
        ) {
            panic!("launching a decode kernel failed: {message}");
        }
    }

    fn expect(&self, name: &str, t: &Tensor, kind: Kind) {
        assert!(
            t.device() == Device::Cuda(self.device) && t.kind() == kind && t.is_contiguous(),
            "{name} must be a contiguous {kind:?} tensor on cuda:{}, got {:?} {:?} {:?}",
            self.device,
            t.kind(),
            t.device(),
            t.size()
        );
    }

    /// RMSNorm over the last dimension of `x`, with `weight`.
    pub fn rms_norm(&self, x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
        self.expect("x", x, self.shape.kind);
        self.expect("weight", weight, self.shape.kind);
        let hidden = *x.size().last().expect("x has a last dimension") as usize;
        let out = x.empty_like();
        let rows = x.numel() / hidden;
        let vec = self.shape.vec();
        let vectorized = hidden % vec == 0 && [x, weight, &out].into_iter().all(aligned_16);
        // A thread per 16-byte piece of a row (or per element), up to 1024:
        // with a piece each, a thread loads once and keeps it (see the kernel).
        let pieces = if vectorized { hidden / vec } else { hidden };
        let threads = pieces.next_multiple_of(32).clamp(32, 1024);
        let args = [
            Arg::tensor(x),
            Arg::tensor(weight),
            Arg::tensor(&out),
            Arg::I32(hidden as i32),
            Arg::F32(eps as f32),
            Arg::I32(vectorized as i32),
        ];
        self.launch(self.rms_norm, [rows, 1, 1], threads, &args);
        out
    }

    /// `silu(gate) · up` of a fused `[.., 2·inter]` gate/up projection.
    pub fn silu_mul(&self, gate_up: &Tensor) -> Tensor {
        self.expect("gate_up", gate_up, self.shape.kind);
        let mut size = gate_up.size();
        let inter = size.last().expect("gate_up has a last dimension") / 2;
        *size.last_mut().expect("checked") = inter;
        let out = Tensor::empty(&size, (self.shape.kind, gate_up.device()));
        let total = out.numel();
        let vec = self.shape.vec();
        let vectorized = inter as usize % vec == 0 && aligned_16(gate_up) && aligned_16(&out);
        let per_thread = if vectorized { vec } else { 1 };
        let args = [
            Arg::tensor(gate_up),
            Arg::tensor(&out),
            Arg::I32(inter as i32),
            Arg::I64(total as i64),
            Arg::I32(vectorized as i32),
        ];
        let blocks = total.div_ceil(256 * per_thread);
        self.launch(self.silu_mul, [blocks, 1, 1], 256, &args);
        out
    }

    /// Rotates the queries and keys of `qkv` (`[tokens, (heads + 2·kv_heads)·head_dim]`)
    /// by RoPE at `positions`, writes keys and values into `k_cache` and
    /// `v_cache` (`[slots, kv_heads, head_dim]`) at `slots`, and returns the
    /// rotated queries `[tokens, heads, head_dim]`. `cos` and `sin` are the
    /// f32 tables `[max_positions, head_dim / 2]`.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_store_kv(
        &self,
        qkv: &Tensor,
        positions: &Tensor,
        slots: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
    ) -> Tensor {
        let kind = self.shape.kind;
        for (name, t, k) in [
            ("qkv", qkv, kind),
            ("positions", positions, Kind::Int64),
            ("slots", slots, Kind::Int64),
            ("cos", cos, Kind::Float),
            ("sin", sin, Kind::Float),
            ("k_cache", k_cache, kind),
            ("v_cache", v_cache, kind),
        ] {
            self.expect(name, t, k);
        }
        let kv_heads = k_cache.size()[1];
        let head_dim = self.shape.head_dim as i64;
        let tokens = positions.numel() as i64;
        let heads = qkv.numel() as i64 / tokens / head_dim - 2 * kv_heads;
        let q = Tensor::empty([tokens, heads, head_dim], (kind, qkv.device()));
        let vec = self.shape.vec() as i64;
        let vectorized = (head_dim / 2) % vec == 0
            && [qkv, cos, sin, &q, k_cache, v_cache]
                .into_iter()
                .all(aligned_16);
        // A thread per item (see the kernel): half a head's pairs of a query
        // or key head, or a value row, in 16-byte pieces where vectorized.
        let per_item = if vectorized { vec } else { 1 };
        let items = ((heads + kv_heads) * head_dim / 2 + kv_heads * head_dim) / per_item;
        let threads = (items as usize).next_multiple_of(32).clamp(32, 1024);
        let args = [
            Arg::tensor(qkv),
            Arg::tensor(positions),
            Arg::tensor(slots),
            Arg::tensor(cos),
            Arg::tensor(sin),
            Arg::tensor(&q),
            Arg::tensor(k_cache),
            Arg::tensor(v_cache),
            Arg::I32(heads as i32),
            Arg::I32(kv_heads as i32),
            Arg::I32(vectorized as i32),
        ];
        self.launch(self.rope_store_kv, [tokens as usize, 1, 1], threads, &args);
        q
    }

    /// Attention of one new token per sequence over its paged context.
    ///
    /// `q` is `[batch, heads, head_dim]`; `k_cache`, `v_cache` are one
    /// layer's pool `[slots, kv_heads, head_dim]`; row `b` of
    /// `block_tables` (`[batch, max_blocks]`) lists sequence `b`'s blocks,
    /// and `positions[b]` is its new token's position (it attends to
    /// positions `0..=positions[b]`). Returns `[batch, heads, head_dim]`.
    /// Neither the pool's slots past a sequence's context nor its block
    /// table's entries past it are read: they may hold anything.
    pub fn paged_attention(
        &self,
        q: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
        block_tables: &Tensor,
        positions: &Tensor,
        block_size: usize,
    ) -> Tensor {
        let pairs = q.size()[0] as usize * k_cache.size()[1] as usize;
        let partitions =
            (block_tables.size()[1] as usize * block_size).div_ceil(self.shape.partition());
        let span = attention_span(self.attention_blocks, pairs, partitions);
        self.paged_attention_in_spans(
            q,
            k_cache,
            v_cache,
            block_tables,
            positions,
            block_size,
            span,
        )
    }

    /// [`paged_attention`](Self::paged_attention) with each block reading
    /// `span` partitions of the context (the tests try several).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn paged_attention_in_spans(
        &self,
        q: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
        block_tables: &Tensor,
        positions: &Tensor,
        block_size: usize,
        span: usize,
    ) -> Tensor {
        let kind = self.shape.kind;
        for (name, t, k) in [
            ("q", q, kind),
            ("k_cache", k_cache, kind),
            ("v_cache", v_cache, kind),
            ("block_tables", block_tables, Kind::Int64),
            ("positions", positions, Kind::Int64),
        ] {
            self.expect(name, t, k);
        }
        assert!(aligned_16(q), "paged_attention: q is not 16-byte aligned");
        let (batch, heads, head_dim) = q.size3().expect("q is [batch, heads, head_dim]");
        let kv_heads = k_cache.size()[1];
        let max_blocks = block_tables.size()[1];
        // One block per (key/value head, sequence, span of `span`
        // partitions); each span leaves one partial result.
        let spans = (max_blocks as usize * block_size)
            .div_ceil(self.shape.partition())
            .div_ceil(span.max(1));
        let device = q.device();
        let out = Tensor::empty([batch, heads, head_dim], (kind, device));
        // Partial results to merge, unless each (sequence, key/value head)
        // has one block: that block normalises its result and writes it to
        // `out` itself.
        let parts = (spans > 1).then(|| {
            let f32_on = (Kind::Float, device);
            let p = spans as i64;
            (
                Tensor::empty([batch, heads, p, head_dim], f32_on),
                Tensor::empty([batch, heads, p], f32_on),
                Tensor::empty([batch, heads, p], f32_on),
            )
        });
        let null = || Arg::Ptr(std::ptr::null_mut());
        let [part_acc, part_max, part_sum, direct] = match &parts {
            Some((acc, max, sum)) => [Arg::tensor(acc), Arg::tensor(max), Arg::tensor(sum), null()],
            None => [null(), null(), null(), Arg::tensor(&out)],
        };
        let scale = 1.0 / (head_dim as f32).sqrt();
        let args = [
            Arg::tensor(q),
            Arg::tensor(k_cache),
            Arg::tensor(v_cache),
            Arg::tensor(block_tables),
            Arg::tensor(positions),
            Arg::I32(kv_heads as i32),
            Arg::I32(block_size as i32),
            Arg::I32(max_blocks as i32),
            Arg::I32(span.max(1) as i32),
            Arg::F32(scale),
            part_acc,
            part_max,
            part_sum,
            direct,
        ];
        let grid = [kv_heads as usize, batch as usize, spans];
        self.launch_overlapping(self.attention_partial, grid, ATTENTION_THREADS, &args);
        let Some((part_acc, part_max, part_sum)) = parts else {
            return out;
        };

        let args = [
            Arg::tensor(&part_acc),
            Arg::tensor(&part_max),
            Arg::tensor(&part_sum),
            Arg::I32(spans as i32),
            Arg::tensor(&out),
        ];
        let grid = [heads as usize, batch as usize, 1];
        self.launch_overlapping(self.attention_combine, grid, head_dim as usize, &args);
        out
    }

    // ANCHOR: matrix_products
    /// `rms_norm(x) · weightᵀ`: the products that follow a normalisation
    /// (queries/keys/values, gate/up).
    ///
    /// `next`, here and below, is the weight the following product reads:
    /// the matrix-vector kernel prefetches its start into L2 as it finishes
    /// (cuBLAS ignores it).
    pub fn norm_linear(
        &self,
        x: &Tensor,
        norm: &Tensor,
        eps: f64,
        weight: &Tensor,
        next: Option<&Tensor>,
    ) -> Tensor {
        if self.takes_matvec(x, weight) && aligned_16(norm) {
            self.matvec(
                x,
                Prologue::RmsNorm(norm, eps),
                weight,
                Epilogue::Store,
                next,
            )
        } else if self.takes_product(x, weight) {
            self.product(&self.rms_norm(x, norm, eps), weight, ProductEpilogue::Store)
        } else {
            self.rms_norm(x, norm, eps).linear(weight, None::<Tensor>)
        }
    }

    /// `rms_norm(x) · weightᵀ` in f32: the logits.
    pub fn norm_logits(&self, x: &Tensor, norm: &Tensor, eps: f64, weight: &Tensor) -> Tensor {
        if self.takes_matvec(x, weight) && aligned_16(norm) {
            self.matvec(
                x,
                Prologue::RmsNorm(norm, eps),
                weight,
                Epilogue::StoreF32,
                None,
            )
        } else if self.takes_product(x, weight) {
            self.product(
                &self.rms_norm(x, norm, eps),
                weight,
                ProductEpilogue::StoreF32,
            )
        } else {
            let h = self.rms_norm(x, norm, eps);
            h.linear(weight, None::<Tensor>).to_kind(Kind::Float)
        }
    }

    /// `residual += h · weightᵀ`: the attention output projection.
    pub fn linear_add(
        &self,
        h: &Tensor,
        weight: &Tensor,
        residual: &Tensor,
        next: Option<&Tensor>,
    ) {
        if self.takes_matvec(h, weight) {
            let _ = self.matvec(h, Prologue::Plain, weight, Epilogue::AddTo(residual), next);
        } else if self.takes_product(h, weight) && aligned_16(residual) {
            let _ = self.product(h, weight, ProductEpilogue::AddTo(residual));
        } else {
            let _ = residual.shallow_clone().addmm_(h, &weight.tr());
        }
    }

    /// `residual += (silu(gate) · up) · weightᵀ` of a fused gate/up
    /// projection: the MLP's down projection.
    pub fn silu_linear_add(
        &self,
        gate_up: &Tensor,
        weight: &Tensor,
        residual: &Tensor,
        next: Option<&Tensor>,
    ) {
        if self.takes_matvec(gate_up, weight) {
            let _ = self.matvec(
                gate_up,
                Prologue::SiluMul,
                weight,
                Epilogue::AddTo(residual),
                next,
            );
        } else {
            let _ = residual
                .shallow_clone()
                .addmm_(&self.silu_mul(gate_up), &weight.tr());
        }
    }

    /// `x += down · (silu(gate) · up)` of `rms_norm(x) · gate_upᵀ`: the
    /// whole MLP. With the product kernel the activation is applied as the
    /// gate/up product writes its output (two launches after the norm);
    /// otherwise the gate/up output goes to `silu_linear_add`.
    pub fn mlp_add(
        &self,
        x: &Tensor,
        norm: &Tensor,
        eps: f64,
        gate_up: &Tensor,
        down: &Tensor,
        next: Option<&Tensor>,
    ) {
        if !self.takes_matvec(x, gate_up) && self.takes_product(x, gate_up) {
            let h = self.rms_norm(x, norm, eps);
            let activation = self.product(&h, gate_up, ProductEpilogue::SwiGlu);
            self.linear_add(&activation, down, x, next);
        } else {
            let gate_up = self.norm_linear(x, norm, eps, gate_up, Some(down));
            self.silu_linear_add(&gate_up, down, x, next);
        }
    }
    // ANCHOR_END: matrix_products

    /// Whether a step of `rows` sequences runs its layers on `decode_layer`:
    /// the layer kernel is on, and the batch is small enough for the
    /// matrix-vector products it is built from.
    pub fn takes_layer_kernel(&self, rows: usize) -> bool {
        self.layer_blocks > 0 && (1..=self.matvec_limit).contains(&rows)
    }

    /// Scratch for one step of `decode_layer` at `rows` sequences of
    /// contexts up to `context` tokens of the model `config`.
    pub fn layer_scratch(
        &self,
        rows: usize,
        context: usize,
        config: &LlamaConfig,
        device: Device,
    ) -> LayerScratch {
        let (kind, head_dim) = (self.shape.kind, self.shape.head_dim as i64);
        let (hidden, inter) = (config.hidden_size, config.intermediate_size);
        let kv_heads = config.num_kv_heads();
        let (rows, heads) = (rows as i64, config.num_attention_heads as i64);
        let partitions = context.div_ceil(self.shape.partition());
        let p = partitions as i64;
        let f32_on = (Kind::Float, device);
        let chunks = (self.shape.gqa_group / self.shape.layer_heads()) as i64;
        // A tagged word is twice an element: its value and its tag.
        let tagged_kind = if kind == Kind::Float {
            Kind::Int64
        } else {
            Kind::Int
        };
        let qkv_words = rows * (heads + 2 * kv_heads as i64) * head_dim;
        let tagged_words = rows * (heads * head_dim + (hidden + inter) as i64) + qkv_words;
        LayerScratch {
            q: Tensor::empty([rows, heads, head_dim], (kind, device)),
            attn: Tensor::empty([rows, heads * head_dim], (kind, device)),
            act: Tensor::empty([rows, inter as i64], (kind, device)),
            part_acc: Tensor::empty([rows, heads, p, head_dim], f32_on),
            part_max: Tensor::empty([rows, heads, p], f32_on),
            part_sum: Tensor::empty([rows, heads, p], f32_on),
            sync: Tensor::zeros([1 + rows * kv_heads as i64 * chunks], (Kind::Int, device)),
            tagged: self
                .shape
                .layer_tagged
                .then(|| Tensor::zeros([tagged_words], (tagged_kind, device))),
            hidden,
            partitions,
        }
    }

    /// One decoder layer on the residual stream `x` (`[rows, hidden]`,
    /// updated in place), in one persistent kernel: see `decode_layer` in
    /// `decode.cu`. Keys and values of the new tokens go into `k_cache`
    /// and `v_cache` (`[slots, kv_heads, head_dim]`).
    #[allow(clippy::too_many_arguments)]
    pub fn decode_layer(
        &self,
        layer_index: usize,
        x: &Tensor,
        layer: &LayerWeights,
        k_cache: &Tensor,
        v_cache: &Tensor,
        step: &LayerStep,
        scratch: &LayerScratch,
    ) {
        let kind = self.shape.kind;
        let (rows, hidden) = x.size2().expect("x is [rows, hidden]");
        assert!(
            self.takes_layer_kernel(rows as usize),
            "decode_layer: {rows} rows, or the layer kernel is off"
        );
        for (name, t, k) in [
            ("x", x, kind),
            ("input_norm", layer.input_norm, kind),
            ("qkv_proj", layer.qkv_proj, kind),
            ("o_proj", layer.o_proj, kind),
            ("post_norm", layer.post_norm, kind),
            ("gate_up_proj", layer.gate_up_proj, kind),
            ("down_proj", layer.down_proj, kind),
            ("k_cache", k_cache, kind),
            ("v_cache", v_cache, kind),
            ("positions", step.positions, Kind::Int64),
            ("write_slots", step.write_slots, Kind::Int64),
            ("block_tables", step.block_tables, Kind::Int64),
            ("cos", step.cos, Kind::Float),
            ("sin", step.sin, Kind::Float),
        ] {
            self.expect(name, t, k);
            // Tensors of the model's dtype are read in 16-byte loads.
            assert!(
                k != kind || aligned_16(t),
                "decode_layer: {name} is not 16-byte aligned"
            );
        }
        let head_dim = self.shape.head_dim as i64;
        let kv_heads = k_cache.size()[1];
        let heads = kv_heads * self.shape.gqa_group as i64;
        let inter = layer.down_proj.size()[1];
        let max_blocks = step.block_tables.size()[1];
        for (name, t, want) in [
            (
                "qkv_proj",
                layer.qkv_proj,
                [(heads + 2 * kv_heads) * head_dim, hidden],
            ),
            ("o_proj", layer.o_proj, [hidden, heads * head_dim]),
            ("gate_up_proj", layer.gate_up_proj, [2 * inter, hidden]),
            ("down_proj", layer.down_proj, [hidden, inter]),
        ] {
            assert_eq!(t.size(), want, "decode_layer: {name} has the wrong shape");
        }
        let fits = |k: i64| k as usize <= self.shape.matvec_k && k as usize % self.shape.vec() == 0;
        assert!(
            fits(hidden) && fits(inter) && fits(heads * head_dim),
            "decode_layer: rows of {hidden}, {inter} or {} do not fit the compiled {}",
            heads * head_dim,
            self.shape.matvec_k
        );
        let ring = self
            .layer_ring
            .expect("the layer kernel is on, so it has a ring");
        assert!(
            2 * tile_row_pitch(hidden as usize * kind.elt_size_in_bytes()) <= ring.slot_bytes,
            "decode_layer: a pair of rows of {hidden} does not fit a slot of {} bytes",
            ring.slot_bytes
        );
        assert!(
            scratch.q.size()[0] == rows
                && scratch.act.size()[1] == inter
                && scratch.hidden == hidden as usize
                && scratch.partitions * self.shape.partition()
                    >= max_blocks as usize * step.block_size,
            "decode_layer: the scratch was made for another shape"
        );
        let ptr = |t: &Tensor| t.data_ptr();
        // The four vectors' places in the tagged words (null in a build
        // without them, which never reads them).
        let tagged_at = |words: i64| {
            scratch.tagged.as_ref().map_or(std::ptr::null_mut(), |t| {
                let word = t.kind().elt_size_in_bytes() as i64;
                ptr(t).wrapping_byte_add((words * word) as usize)
            })
        };
        let mut params = LayerParams {
            x: ptr(x),
            input_norm: ptr(layer.input_norm),
            post_norm: ptr(layer.post_norm),
            qkv_proj: ptr(layer.qkv_proj),
            o_proj: ptr(layer.o_proj),
            gate_up_proj: ptr(layer.gate_up_proj),
            down_proj: ptr(layer.down_proj),
            positions: ptr(step.positions),
            slots: ptr(step.write_slots),
            block_tables: ptr(step.block_tables),
            cos_table: ptr(step.cos),
            sin_table: ptr(step.sin),
            k_cache: ptr(k_cache),
            v_cache: ptr(v_cache),
            q: ptr(&scratch.q),
            attn: ptr(&scratch.attn),
            act: ptr(&scratch.act),
            attn_tagged: tagged_at(0),
            x_tagged: tagged_at(rows * heads * head_dim),
            act_tagged: tagged_at(rows * (heads * head_dim + hidden)),
            qkv_tagged: tagged_at(rows * (heads * head_dim + hidden + inter)),
            part_acc: ptr(&scratch.part_acc),
            part_max: ptr(&scratch.part_max),
            part_sum: ptr(&scratch.part_sum),
            sync: ptr(&scratch.sync),
            eps: step.eps as f32,
            scale: 1.0 / (head_dim as f32).sqrt(),
            rows: rows as i32,
            hidden: hidden as i32,
            inter: inter as i32,
            heads: heads as i32,
            kv_heads: kv_heads as i32,
            max_blocks: max_blocks as i32,
            block_size: step.block_size as i32,
            partitions: scratch.partitions as i32,
            layer: layer_index as i32,
            ring_slots: ring.slots as i32,
            tile_groups: ring.groups as i32,
        };
        let mut addresses = [&mut params as *mut LayerParams as *mut c_void];
        let grid = [self.layer_blocks, 1, 1];
        let shared = ring.shared_bytes();
        let mode = LaunchMode {
            cooperative: true,
            overlap_previous: self.layer_overlap,
        };
        self.launch_with(
            self.decode_layer,
            grid,
            LAYER_THREADS,
            shared,
            mode,
            &mut addresses,
        );
    }

    /// Whether `x · weightᵀ` goes to `matvec`: few enough rows, and input
    /// rows no longer than the kernel was compiled for, in whole 16-byte
    /// loads from 16-byte aligned memory.
    fn takes_matvec(&self, x: &Tensor, weight: &Tensor) -> bool {
        let fits = |k: usize| k <= self.shape.matvec_k && k % self.shape.vec() == 0;
        x.dim() == 2
            && x.size()[0] as usize <= self.matvec_limit
            && weight.size().get(1).is_some_and(|&k| fits(k as usize))
            && aligned_16(x)
            && aligned_16(weight)
    }

    /// Launches `matvec` on the rows of `input` (`[rows, k]`, or `[rows, 2·k]`
    /// for SwiGLU) and `weight` `[n, k]`; returns the product (for
    /// `AddTo`, the residual it was added to). At the end the first
    /// `l2_prefetch_bytes` of `next` are prefetched into L2.
    fn matvec(
        &self,
        input: &Tensor,
        prologue: Prologue,
        weight: &Tensor,
        epilogue: Epilogue,
        next: Option<&Tensor>,
    ) -> Tensor {
        let kind = self.shape.kind;
        self.expect("input", input, kind);
        // Only a contiguous tensor's bytes are one range to prefetch.
        let next = next.filter(|w| w.is_contiguous() && w.device() == weight.device());
        self.expect("weight", weight, kind);
        let (n, k) = weight.size2().expect("a weight is [n, k]");
        let rows = input.size()[0];
        let input_k = if matches!(prologue, Prologue::SiluMul) {
            2 * k
        } else {
            k
        };
        assert_eq!(
            input.size(),
            [rows, input_k],
            "matvec: input does not match the weight"
        );
        assert!(
            (k as usize) <= self.shape.matvec_k && rows as usize <= self.shape.matvec_rows,
            "matvec: {rows} rows of {k} exceed the compiled {} of {}",
            self.shape.matvec_rows,
            self.shape.matvec_k
        );
        let (norm, eps) = match prologue {
            Prologue::RmsNorm(norm, eps) => {
                self.expect("norm weight", norm, kind);
                (Arg::tensor(norm), eps as f32)
            }
            _ => (Arg::Ptr(std::ptr::null_mut()), 0.0),
        };
        let out = match epilogue {
            Epilogue::Store => Tensor::empty([rows, n], (kind, input.device())),
            Epilogue::StoreF32 => Tensor::empty([rows, n], (Kind::Float, input.device())),
            Epilogue::AddTo(residual) => {
                self.expect("residual", residual, kind);
                assert_eq!(residual.size(), [rows, n], "matvec: residual shape");
                residual.shallow_clone()
            }
        };
        let args = [
            Arg::tensor(input),
            norm,
            Arg::F32(eps),
            Arg::tensor(weight),
            Arg::tensor(&out),
            Arg::I32(rows as i32),
            Arg::I32(n as i32),
            Arg::I32(k as i32),
            Arg::I32(prologue.code()),
            Arg::I32(epilogue.code()),
            Arg::Ptr(next.map_or(std::ptr::null_mut(), Tensor::data_ptr)),
            Arg::I64(next.map_or(0, |w| {
                (w.numel() * w.kind().elt_size_in_bytes()).min(self.l2_prefetch_bytes) as i64
            })),
        ];
        // One output row per warp, at most as many blocks as stay resident:
        // each block stages the input once, then its warps stride over rows.
        let warps = MATVEC_THREADS / 32;
        let blocks = (n as usize)
            .div_ceil(warps)
            .min(self.multiprocessors * MATVEC_BLOCKS_PER_SM);
        self.launch(self.matvec, [blocks, 1, 1], MATVEC_THREADS, &args);
        out
    }
}

#[cfg(cuda_bridge)]
mod imp {
    use std::ffi::{c_char, c_int, c_uint, c_void, CString};
    use std::sync::OnceLock;

    use super::{Build, Function, HashMap, KernelError, LaunchMode, Module, SharedMemory, SOURCE};
    use crate::cuda_bridge::call;

    extern "C" {
        fn spark_nvrtc_open(
            library: *const c_char,
            builtins: *const c_char,
            out: *mut *mut c_void,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        fn spark_kernels_compile(
            nvrtc: *mut c_void,
            device: c_int,
            source: *const c_char,
            options: *const *const c_char,
            num_options: c_int,
            module: *mut *mut c_void,
            multiprocessors: *mut c_int,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        fn spark_kernels_unload(
            module: *mut c_void,
            device: c_int,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        fn spark_kernels_read_global(
            module: *mut c_void,
            device: c_int,
            name: *const c_char,
            dst: *mut c_void,
            bytes: usize,
            copied: *mut usize,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        fn spark_kernels_function(
            module: *mut c_void,
            name: *const c_char,
            function: *mut *mut c_void,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        fn spark_kernels_occupancy(
            function: *mut c_void,
            device: c_int,
            block: c_int,
            dynamic_shared: c_int,
            blocks: *mut c_int,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        fn spark_kernels_shared_memory(
            function: *mut c_void,
            device: c_int,
            static_bytes: *mut c_int,
            optin_bytes: *mut c_int,
            capability: *mut c_int,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        fn spark_kernels_reserve_shared(
            function: *mut c_void,
            device: c_int,
            bytes: c_int,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        fn spark_kernels_launch(
            function: *mut c_void,
            device: c_int,
            grid_x: c_uint,
            grid_y: c_uint,
            grid_z: c_uint,
            block_x: c_uint,
            shared_bytes: c_uint,
            cooperative: c_int,
            overlap_previous: c_int,
            args: *mut *mut c_void,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
    }

    /// Where NVRTC may be: beside libtorch (the PyTorch wheel's `nvidia/*/lib`
    /// packages, or a standalone libtorch's own `lib/`), then by name through
    /// the library path. Each entry is the library and its builtins companion.
    fn nvrtc_candidates() -> Vec<(String, Option<String>)> {
        let mut dirs = Vec::new();
        if let Some(lib) = crate::device::libtorch_lib_dir() {
            if let Some(site) = lib.parent().and_then(|torch| torch.parent()) {
                if let Ok(entries) = std::fs::read_dir(site.join("nvidia")) {
                    let mut packages: Vec<_> =
                        entries.flatten().map(|e| e.path().join("lib")).collect();
                    packages.sort();
                    dirs.extend(packages);
                }
            }
            dirs.push(lib);
        }
        let mut found = Vec::new();
        for dir in dirs {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            let mut names: Vec<String> = entries
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with("libnvrtc") && n.contains(".so") && !n.contains(".alt."))
                .collect();
            names.sort();
            let builtins = names.iter().find(|n| n.starts_with("libnvrtc-builtins"));
            if let Some(library) = names.iter().find(|n| !n.starts_with("libnvrtc-builtins")) {
                found.push((
                    dir.join(library).display().to_string(),
                    builtins.map(|b| dir.join(b).display().to_string()),
                ));
            }
        }
        for name in ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"] {
            found.push((name.to_string(), None));
        }
        found
    }

    /// NVRTC, opened once per process.
    fn nvrtc() -> Result<*mut c_void, KernelError> {
        static NVRTC: OnceLock<Result<usize, KernelError>> = OnceLock::new();
        NVRTC
            .get_or_init(|| {
                let mut tried = Vec::new();
                for (library, builtins) in nvrtc_candidates() {
                    let c_library = CString::new(library.clone()).expect("no NUL in a path");
                    let c_builtins = CString::new(builtins.unwrap_or_default()).expect("no NUL");
                    let mut out = std::ptr::null_mut();
                    // SAFETY: both strings outlive the call; `out` is written on success.
                    let opened = call(|err, len| unsafe {
                        spark_nvrtc_open(
                            c_library.as_ptr(),
                            c_builtins.as_ptr(),
                            &mut out,
                            err,
                            len,
                        )
                    });
                    match opened {
                        Ok(()) => return Ok(out as usize),
                        Err(message) => tried.push(format!("{library}: {message}")),
                    }
                }
                Err(KernelError::NoNvrtc(tried.join("; ")))
            })
            .clone()
            .map(|p| p as *mut c_void)
    }

    /// Compiles the source with `options` for `device`, loads it there and
    /// looks up every kernel.
    pub fn compile(device: usize, options: &[String]) -> Result<Build, KernelError> {
        let nvrtc = nvrtc()?;
        let source = CString::new(SOURCE).expect("no NUL in the source");
        let options: Vec<CString> = options
            .iter()
            .map(|o| CString::new(o.as_str()).expect("no NUL in an option"))
            .collect();
        let pointers: Vec<*const c_char> = options.iter().map(|o| o.as_ptr()).collect();
        let mut module = std::ptr::null_mut();
        let mut multiprocessors: c_int = 0;
        // SAFETY: every pointer refers to a live CString; `module` and
        // `multiprocessors` are written on success.
        call(|err, len| unsafe {
            spark_kernels_compile(
                nvrtc,
                device as c_int,
                source.as_ptr(),
                pointers.as_ptr(),
                pointers.len() as c_int,
                &mut module,
                &mut multiprocessors,
                err,
                len,
            )
        })
        .map_err(|message| KernelError::Cuda {
            stage: "compiling the decode kernels",
            message,
        })?;
        let mut functions = HashMap::new();
        for name in [
            "rms_norm",
            "silu_mul",
            "rope_store_kv",
            "attention_partial",
            "attention_combine",
            "matvec",
            "decode_layer",
            "product_rows16",
            "product_rows32",
            "product_rows64",
            "product_rows128",
        ] {
            let c_name = CString::new(name).expect("no NUL");
            let mut function = std::ptr::null_mut();
            // SAFETY: `module` was loaded above.
            call(|err, len| unsafe {
                spark_kernels_function(module, c_name.as_ptr(), &mut function, err, len)
            })
            .map_err(|message| KernelError::Cuda {
                stage: "looking up a decode kernel",
                message,
            })?;
            functions.insert(name.to_string(), Function(function));
        }
        Ok(Build {
            functions,
            module: Module(module),
            multiprocessors: multiprocessors.max(1) as usize,
        })
    }

    /// Copies the module's `__device__` array `name` into `dst`; returns the
    /// bytes copied (fewer where the array is smaller than `dst`).
    pub fn read_global(
        module: Module,
        device: usize,
        name: &str,
        dst: &mut [u64],
    ) -> Result<usize, KernelError> {
        let c_name = CString::new(name).expect("no NUL");
        let mut copied = 0usize;
        // SAFETY: `module` is loaded; `dst` is a live buffer of the length given.
        call(|err, len| unsafe {
            spark_kernels_read_global(
                module.0,
                device as c_int,
                c_name.as_ptr(),
                dst.as_mut_ptr() as *mut c_void,
                std::mem::size_of_val(dst),
                &mut copied,
                err,
                len,
            )
        })
        .map_err(|message| KernelError::Cuda {
            stage: "reading a kernel module's array",
            message,
        })?;
        Ok(copied)
    }

    /// Unloads a build's module; none of its kernels may run after.
    pub fn unload(module: Module, device: usize) -> Result<(), KernelError> {
        // SAFETY: `module` was loaded by `compile` and is unloaded once.
        call(|err, len| unsafe { spark_kernels_unload(module.0, device as c_int, err, len) })
            .map_err(|message| KernelError::Cuda {
                stage: "unloading an unused build of the decode kernels",
                message,
            })
    }

    /// Blocks of `block` threads of `function`, each with `dynamic_shared`
    /// bytes of dynamic shared memory, that fit on one multiprocessor.
    pub fn occupancy(
        function: Function,
        device: usize,
        block: usize,
        dynamic_shared: usize,
    ) -> Result<usize, KernelError> {
        let mut blocks: c_int = 0;
        // SAFETY: `function` is a loaded kernel; `blocks` is written on success.
        call(|err, len| unsafe {
            spark_kernels_occupancy(
                function.0,
                device as c_int,
                block as c_int,
                dynamic_shared as c_int,
                &mut blocks,
                err,
                len,
            )
        })
        .map_err(|message| KernelError::Cuda {
            stage: "asking the driver how many blocks fit",
            message,
        })?;
        Ok(blocks.max(0) as usize)
    }

    /// What `function` may have of shared memory on `device` (see `SharedMemory`).
    pub fn shared_memory(function: Function, device: usize) -> Result<SharedMemory, KernelError> {
        let (mut static_bytes, mut optin_bytes, mut capability): (c_int, c_int, c_int) = (0, 0, 0);
        // SAFETY: `function` is a loaded kernel; the outputs are written on success.
        call(|err, len| unsafe {
            spark_kernels_shared_memory(
                function.0,
                device as c_int,
                &mut static_bytes,
                &mut optin_bytes,
                &mut capability,
                err,
                len,
            )
        })
        .map_err(|message| KernelError::Cuda {
            stage: "asking the driver for shared memory",
            message,
        })?;
        Ok(SharedMemory {
            static_bytes: static_bytes.max(0) as usize,
            optin_bytes: optin_bytes.max(0) as usize,
            capability: capability.max(0) as usize,
        })
    }

    /// Lets `function` take `bytes` of dynamic shared memory per block.
    pub fn reserve_shared(
        function: Function,
        device: usize,
        bytes: usize,
    ) -> Result<(), KernelError> {
        // SAFETY: `function` is a loaded kernel.
        call(|err, len| unsafe {
            spark_kernels_reserve_shared(function.0, device as c_int, bytes as c_int, err, len)
        })
        .map_err(|message| KernelError::Cuda {
            stage: "reserving shared memory",
            message,
        })
    }

    pub fn launch(
        function: Function,
        device: usize,
        grid: [u32; 3],
        block: u32,
        shared_bytes: u32,
        mode: LaunchMode,
        args: &mut [*mut c_void],
    ) -> Result<(), String> {
        // SAFETY: `args` holds one pointer per kernel parameter, each to a
        // live value of the parameter's type (see `Arg` and `LayerParams`);
        // the tensors they point into are alive for the launch and, being
        // on PyTorch's stream, for the kernel's run.
        call(|err, len| unsafe {
            spark_kernels_launch(
                function.0,
                device as c_int,
                grid[0],
                grid[1],
                grid[2],
                block,
                shared_bytes,
                mode.cooperative as c_int,
                mode.overlap_previous as c_int,
                args.as_mut_ptr(),
                err,
                len,
            )
        })
    }
}

#[cfg(not(cuda_bridge))]
mod imp {
    use std::ffi::c_void;

    use super::{Build, Function, KernelError, LaunchMode, Module, SharedMemory};

    pub fn compile(_device: usize, _options: &[String]) -> Result<Build, KernelError> {
        Err(KernelError::NotCompiled)
    }

    pub fn unload(_module: Module, _device: usize) -> Result<(), KernelError> {
        Err(KernelError::NotCompiled)
    }

    pub fn read_global(
        _module: Module,
        _device: usize,
        _name: &str,
        _dst: &mut [u64],
    ) -> Result<usize, KernelError> {
        Err(KernelError::NotCompiled)
    }

    pub fn occupancy(
        _function: Function,
        _device: usize,
        _block: usize,
        _dynamic_shared: usize,
    ) -> Result<usize, KernelError> {
        Err(KernelError::NotCompiled)
    }

    pub fn shared_memory(_function: Function, _device: usize) -> Result<SharedMemory, KernelError> {
        Err(KernelError::NotCompiled)
    }

    pub fn reserve_shared(
        _function: Function,
        _device: usize,
        _bytes: usize,
    ) -> Result<(), KernelError> {
        Err(KernelError::NotCompiled)
    }

    pub fn launch(
        _function: Function,
        _device: usize,
        _grid: [u32; 3],
        _block: u32,
        _shared_bytes: u32,
        _mode: LaunchMode,
        _args: &mut [*mut c_void],
    ) -> Result<(), String> {
        Err(KernelError::NotCompiled.to_string())
    }
}

/// A small model with real attention shapes for the kernels' tests: heads
/// of 64, 4 query heads per KV head, 3 layers.
#[cfg(test)]
pub(crate) fn test_config() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 256,
        hidden_size: 512,
        intermediate_size: 1024,
        num_hidden_layers: 3,
        num_attention_heads: 8,
        num_key_value_heads: Some(2),
        max_position_embeddings: 1024,
        ..LlamaConfig::smollm2_135m()
    }
}

/// The GPU the kernels' tests run on: `None` (and a line saying why) on a
/// machine without one or in a build without the CUDA bridge, where those
/// tests check nothing.
#[cfg(test)]
pub(crate) fn test_gpu() -> Option<Device> {
    if crate::device::load_cuda_runtime().is_err() || !tch::Cuda::is_available() {
        eprintln!("no CUDA device: the fused kernels are not checked here");
        return None;
    }
    if !DecodeKernels::compiled() {
        eprintln!("this build has no CUDA bridge: the fused kernels are not checked");
        return None;
    }
    Some(Device::Cuda(0))
}

/// The largest difference between two tensors' elements, in f32 (the
/// kernels' tests compare with it).
#[cfg(test)]
pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Float) - b.to_kind(Kind::Float))
        .abs()
        .max()
        .double_value(&[])
}

/// The largest magnitude among a tensor's elements, in f32.
#[cfg(test)]
pub(crate) fn max_abs(a: &Tensor) -> f64 {
    a.to_kind(Kind::Float).abs().max().double_value(&[])
}

#[cfg(test)]
mod tests {
    //! What can be checked without a GPU: the shapes the source is compiled
    //! for. The kernels themselves are checked on a GPU in `model::llama::fused`.

    use super::*;

    #[test]
    fn a_number_from_the_environment_falls_back_outside_its_range() {
        // A variable no other test reads, so that setting it races nothing.
        const NAME: &str = "SPARK_DISAGG_TEST_WHOLE_NUMBER";
        let read = || env_whole_number(NAME, 2, 0..=4, "a test number");
        std::env::remove_var(NAME);
        assert_eq!(read(), 2, "unset: the default");
        for (value, expected) in [("3", 3), (" 0 ", 0), ("5", 2), ("-1", 2), ("two", 2)] {
            std::env::set_var(NAME, value);
            assert_eq!(read(), expected, "{value:?}");
        }
        std::env::remove_var(NAME);
    }

    #[test]
    fn the_layer_kernel_is_on_by_default_only_with_bulk_copies() {
        for bulk in [true, false] {
            assert_eq!(layer_kernel_wanted(None, bulk), bulk, "unset");
            assert!(
                layer_kernel_wanted(Some("1"), bulk),
                "1, bulk copies {bulk}"
            );
            assert!(layer_kernel_wanted(Some(" 1 "), bulk), "padded 1");
            assert!(
                !layer_kernel_wanted(Some("0"), bulk),
                "0, bulk copies {bulk}"
            );
            assert_eq!(layer_kernel_wanted(Some("yes"), bulk), bulk, "not 0 or 1");
        }
    }

    #[test]
    fn tagged_words_are_the_default_only_for_layers_the_ring_cannot_hold() {
        let bf16_layer = |name| LlamaConfig::preset(name).unwrap().layer_parameters() * 2;
        // SmolLM2's 7 MB a layer: barriers; TinyLlama's 88 MB and
        // Llama-3-8B's 436 MB: tagged words (the measured crossover), in a
        // kernel of one row only.
        let bf16 = |setting, bytes, rows| layer_tagged_wanted(setting, Kind::BFloat16, bytes, rows);
        assert!(!bf16(None, bf16_layer("smollm2-135m"), 1));
        assert!(bf16(None, bf16_layer("tinyllama-1.1b"), 1));
        assert!(bf16(None, bf16_layer("llama3-8b"), 1));
        assert!(!bf16(None, bf16_layer("tinyllama-1.1b"), 4));
        // f32 keeps the barriers unless asked: its tagged build was never measured.
        let tiny_f32 = bf16_layer("tinyllama-1.1b") * 2;
        assert!(!layer_tagged_wanted(None, Kind::Float, tiny_f32, 1));
        assert!(layer_tagged_wanted(Some("1"), Kind::Float, tiny_f32, 1));
        for bytes in [bf16_layer("smollm2-135m"), bf16_layer("tinyllama-1.1b")] {
            for rows in [1, 4] {
                let at = format!("{bytes} bytes, {rows} rows");
                assert!(bf16(Some(" 1 "), bytes, rows), "1 at {at}");
                assert!(!bf16(Some("0"), bytes, rows), "0 at {at}");
                assert_eq!(
                    bf16(Some("on"), bytes, rows),
                    bf16(None, bytes, rows),
                    "not 0 or 1 at {at}"
                );
            }
        }
    }

    #[test]
    fn large_layers_keep_two_tiles_of_a_block_in_flight_and_no_start_burst() {
        let bf16_layer = |name| LlamaConfig::preset(name).unwrap().layer_parameters() * 2;
        // Measured on an H100: one tile for TinyLlama's 88 MB a layer (and
        // anything smaller), two for Llama-3-8B's 436 MB.
        assert_eq!(default_copy_depth(bf16_layer("smollm2-135m")), 1);
        assert_eq!(default_copy_depth(bf16_layer("tinyllama-1.1b")), 1);
        assert_eq!(default_copy_depth(bf16_layer("llama3-8b")), 2);
        // TinyLlama in f32 is 176 MB a layer: a stream as long as a large model's.
        assert_eq!(default_copy_depth(bf16_layer("tinyllama-1.1b") * 2), 2);
        // The burst of qkv tiles at the start goes with the shallow copies.
        assert_eq!(default_start_tiles(bf16_layer("smollm2-135m")), 3);
        assert_eq!(default_start_tiles(bf16_layer("tinyllama-1.1b")), 3);
        assert_eq!(default_start_tiles(bf16_layer("llama3-8b")), 0);
    }

    #[test]
    fn attention_splits_the_context_only_until_the_grid_is_full() {
        // An H100 (132 multiprocessors, four blocks each), TinyLlama's four
        // key/value heads, a context of ten partitions.
        let blocks = 132 * 4;
        let span = |pairs| attention_span(blocks, pairs, 10);
        assert_eq!(span(4), 1, "batch 1: split as finely as it goes");
        assert_eq!(
            span(32 * 4),
            3,
            "batch 32: four splits (spans of 3, 3, 3, 1)"
        );
        assert_eq!(span(128 * 4), 10, "batch 128: no split, 512 blocks");
        assert_eq!(span(1024 * 4), 10, "more pairs than blocks: no split");
        assert_eq!(attention_span(blocks, 3, 0), 1, "an empty context");
    }

    #[test]
    fn tile_rows_are_padded_to_64_past_a_multiple_of_128() {
        for (row, pitch) in [
            (4096, 4160),
            (4160, 4160),
            (11264, 11328),
            (1152, 1216),
            (1200, 1216),
        ] {
            assert_eq!(tile_row_pitch(row), pitch, "row of {row} bytes");
        }
        for row in (16..20_000).step_by(16) {
            let pitch = tile_row_pitch(row);
            assert!(pitch >= row && pitch - row < TILE_ROW_PAD_MAX && pitch % 128 == 64);
        }
    }

    #[test]
    fn kernel_shapes_of_the_course_models() {
        let tiny = KernelShape::of(&LlamaConfig::tinyllama_1_1b(), Kind::BFloat16).unwrap();
        assert_eq!((tiny.head_dim, tiny.gqa_group), (64, 8));
        assert_eq!((tiny.matvec_k, tiny.matvec_rows), (5632, 4));
        // Two of the eight query heads per attention item of the layer
        // kernel: 2 · 8 bf16 values a lane keeps for each of q and acc.
        assert_eq!(tiny.layer_heads(), 2);
        let tiny_f32 = KernelShape::of(&LlamaConfig::tinyllama_1_1b(), Kind::Float).unwrap();
        assert_eq!(tiny_f32.layer_heads(), 4);
        // SmolLM2's 3 query heads per KV head divide only by 1 and 3.
        let smol = KernelShape::of(&LlamaConfig::smollm2_135m(), Kind::BFloat16).unwrap();
        assert_eq!((smol.gqa_group, smol.layer_heads()), (3, 1));

        // A slot of the weight ring holds the longest row (TinyLlama's
        // down projection: 5632 elements) and a pair of hidden-size rows,
        // each padded: 32 KiB and the padding of 8 rows unless those need
        // more. TinyLlama's 2048-element bf16 rows then make tiles of 8.
        let floor = 32 * 1024 + 8 * 128;
        assert_eq!(tiny.layer_slot_bytes, floor);
        assert_eq!(tiny.layer_slot_bytes / tile_row_pitch(2048 * 2), 8);
        assert_eq!(tiny_f32.layer_slot_bytes, floor);
        assert_eq!(smol.layer_slot_bytes, floor);
        let wide = LlamaConfig {
            intermediate_size: 14336,
            ..LlamaConfig::tinyllama_1_1b()
        };
        let wide = KernelShape::of(&wide, Kind::Float).unwrap();
        assert_eq!(wide.layer_slot_bytes, 14336 * 4 + 128);

        // Every compile-time constant the source uses is given.
        let options = tiny.options(LAYER_GROUP_WARP_CHOICES[0]);
        for name in [
            "SCALAR_KIND",
            "HEAD_DIM",
            "GQA_GROUP",
            "PARTITION",
            "MATVEC_ROWS",
            "MATVEC_K",
            "LAYER_HEADS",
            "LAYER_THREADS",
            "LAYER_SLOT_BYTES",
            "LAYER_TILE_ROWS",
            "LAYER_BULK_COPY_ALLOWED",
            "LAYER_EVICT_FIRST",
            "LAYER_COPY_DEPTH",
            "LAYER_TAGGED",
            "LAYER_GROUP_WARPS",
            "ATTENTION_MMA_ALLOWED",
        ] {
            assert!(SOURCE.contains(name), "{name} is not in decode.cu");
            assert!(
                options.iter().any(|o| o.starts_with(&format!("-D{name}="))),
                "{name} is not among the options {options:?}"
            );
        }
    }

    #[test]
    fn weight_ring_plans() {
        // An H100 block may have 227 KiB; TinyLlama's layer kernel keeps
        // about 45 KiB for itself. Five groups of three warps, each with two
        // sets of sums (3 warps · 8 rows · 4 inputs · 4 bytes): ten slots of
        // 16 KiB, two per group, or five of 32 KiB.
        let sums = 3 * 8 * 4 * 4;
        let h100 = LayerRing::plan(232_448 - 45_696, 16 * 1024, 3, sums).unwrap();
        assert_eq!((h100.slots, h100.groups), (10, 5));
        assert!(h100.shared_bytes() <= 232_448 - 45_696);
        let h100 = LayerRing::plan(232_448 - 45_696, 32 * 1024, 3, sums).unwrap();
        assert_eq!((h100.slots, h100.groups), (5, 5));
        // Fewer slots than groups: fewer groups, the slots still a multiple.
        let small = LayerRing::plan(3 * (16 * 1024 + 16) + 10 * sums, 16 * 1024, 3, sums).unwrap();
        assert_eq!((small.slots, small.groups), (3, 3));
        // One warp per group: as many groups as computing warps.
        let single = LayerRing::plan(40 * (8 * 1024 + 16) + 30 * 128, 8 * 1024, 1, 128).unwrap();
        assert_eq!(single.groups, LAYER_COMPUTE_WARPS);
        assert_eq!(single.slots % single.groups, 0);
        // Two slots at least, or no ring.
        let two = 2 * (16 * 1024 + 16) + 10 * sums;
        assert_eq!(
            LayerRing::plan(two, 16 * 1024, 3, sums).map(|r| r.slots),
            Some(2)
        );
        assert_eq!(LayerRing::plan(two - 1, 16 * 1024, 3, sums), None);
    }

    #[test]
    fn weight_ring_takes_the_group_size_with_the_most_slots() {
        let slot = 32 * 1024 + LAYER_TILE_ROWS * TILE_ROW_PAD_MAX;
        let choose = |available, rows| {
            let ring = LayerRing::choose(available, slot, rows, &LAYER_GROUP_WARP_CHOICES).unwrap();
            (ring.slots, ring.groups, ring.group_warps)
        };
        // An H100 (227 KiB a block) with TinyLlama's staging for one row
        // (about 11 KiB): room for six slots, which three groups of five
        // warps can use and five groups of three cannot.
        assert_eq!(choose(232_448 - 11_424, 1), (6, 3, 5));
        // Staging for four rows (about 45 KiB): five slots, five groups.
        assert_eq!(choose(232_448 - 45_696, 4), (5, 5, 3));
        // An A100 (163 KiB): four slots in four groups of three; and on a
        // tie the first choice.
        assert_eq!(choose(166_912 - 11_424, 1), (4, 4, 3));
        assert_eq!(choose(166_912 - 45_696, 4), (3, 3, 3));
        // One size asked for: that one, or no ring.
        let five = LayerRing::choose(232_448 - 45_696, slot, 4, &[5]).unwrap();
        assert_eq!((five.slots, five.groups), (3, 3));
        assert_eq!(LayerRing::choose(slot, slot, 1, &[3, 5]), None);
        let ring = LayerRing::choose(232_448 - 11_424, slot, 1, &LAYER_GROUP_WARP_CHOICES).unwrap();
        assert_eq!(
            ring.to_string(),
            "6 slots of 33.0 KiB read by 3 groups of 5 warps"
        );
        // The copy limit, where there is one, is part of the description;
        // a depth of the slots or more is no limit.
        let limited = |copy_depth| LayerRing { copy_depth, ..ring };
        assert_eq!(
            limited(1).to_string(),
            "6 slots of 33.0 KiB read by 3 groups of 5 warps, 1 tile of a block in flight"
        );
        assert_eq!(limited(2).copy_limit(), Some(2));
        assert!(limited(2)
            .to_string()
            .ends_with(", 2 tiles of a block in flight"));
        assert_eq!(limited(6).copy_limit(), None);
        assert_eq!(limited(6).to_string(), ring.to_string());
        // So is the tagged exchange, where it is on.
        let tagged = LayerRing {
            tagged: true,
            ..limited(1)
        };
        assert_eq!(
            tagged.to_string(),
            "6 slots of 33.0 KiB read by 3 groups of 5 warps, 1 tile of a block in flight, \
             tagged words instead of grid barriers"
        );

        // And the burst of qkv tiles at the layer's start, where it lifts
        // the limit: no more tiles than the slots.
        let bursting = |copy_depth, start_tiles| LayerRing {
            copy_depth,
            start_tiles,
            ..tagged
        };
        assert_eq!(
            bursting(1, 3).to_string(),
            "6 slots of 33.0 KiB read by 3 groups of 5 warps, 1 tile of a block in flight \
             (qkv's first 3 at once), tagged words instead of grid barriers"
        );
        assert_eq!(bursting(2, 3).start_burst(), Some(3));
        assert_eq!(bursting(1, 10).start_burst(), Some(6));
        assert_eq!(bursting(2, 2).start_burst(), None);
        assert_eq!(bursting(1, 0).start_burst(), None);
        assert_eq!(bursting(0, 3).start_burst(), None);
        assert_eq!(
            bursting(2, 2).to_string(),
            "6 slots of 33.0 KiB read by 3 groups of 5 warps, 2 tiles of a block in flight, \
             tagged words instead of grid barriers"
        );
    }

    #[test]
    fn staging_rows_follow_the_batches_asked_for() {
        let config = LlamaConfig::tinyllama_1_1b();
        let rows = |rows| {
            KernelShape::for_batches(&config, Kind::BFloat16, rows)
                .unwrap()
                .matvec_rows
        };
        let most = KernelShape::of(&config, Kind::BFloat16)
            .unwrap()
            .matvec_rows;
        assert!(most > 1, "TinyLlama's rows fit more than one: {most}");
        assert_eq!((rows(1), rows(16), rows(0)), (1, most, 0));
        let options = KernelShape::for_batches(&config, Kind::BFloat16, 1)
            .unwrap()
            .options(5);
        assert!(
            options.contains(&"-DMATVEC_ROWS=1".to_string()),
            "{options:?}"
        );
        assert!(
            options.contains(&"-DLAYER_GROUP_WARPS=5".to_string()),
            "{options:?}"
        );
    }
}
