//! The batched step's matrix products on our own kernel (`product_rows*`
//! in `decode.cu`), for 1 to 128 rows of 16-bit inputs on Ampere or later.
//! Off by default; `SPARK_DISAGG_PRODUCT_KERNEL=1` turns it on.
//!
//! A decode step of 32 sequences multiplies a `[32, 2048]` input by each
//! weight matrix: a few megabytes of weights, read once, with 32 rows of
//! arithmetic on each. That is still a memory stream, yet cuBLAS took
//! 8-20 µs for each of TinyLlama's four products a layer on an H100, where
//! the stream needs 2.5-14. Two things looked like the cause: its tiles
//! are cut for large matrices, so the small products ran on 64-88 blocks
//! of a GPU with 132 multiprocessors, and each product starts cold when
//! the kernel before it ends. This kernel cuts every product into about
//! two blocks per multiprocessor (splitting `k` where the weight has few
//! rows), starts copying weights before the kernel ahead has finished
//! (they do not depend on it), and fuses the SwiGLU activation into the
//! gate/up product, so the MLP is two launches (`mlp_add`) instead of three.
//!
//! Measured on the H100 (`results/h100/module01_decode_experiments_h100.txt`,
//! section 16), it is correct and slower than cuBLAS at every batch from
//! 4 to 128: bare batch-32 step 1.81 ms against 1.63, 3.64 against 2.12 at
//! 128. Its weight stream alone runs near the bandwidth; what it loses is
//! the rest: the split products' partial sums take several trips to
//! memory at the end, and the tensor-core work does not hide behind the
//! copies with eight warps per multiprocessor and `mma.sync` (cuBLAS uses
//! Hopper's `wgmma` and TMA). Chapter 1 has the numbers and what to try.

use std::sync::{Arc, Mutex};

use tch::{Device, Kind, Tensor};

use super::{aligned_16, imp, Arg, DecodeKernels, Function, LaunchMode};

/// Threads per block (`PRODUCT_THREADS` in the source): eight warps.
const PRODUCT_THREADS: usize = 256;
/// Weight rows per unit of work (`PRODUCT_ROWS`).
const PRODUCT_ROWS: usize = 64;
/// Columns of `k` per stage of a block's ring (`PRODUCT_DEPTH`).
const PRODUCT_DEPTH: usize = 64;
/// Bytes of a row in shared memory: a stage's 64 elements and 16 of padding.
const PRODUCT_PITCH_BYTES: usize = (PRODUCT_DEPTH + 8) * 2;
/// The heights of input the kernels are compiled for, smallest first:
/// `product_rows16`, `product_rows32`, … (rows past the input's are zeros).
const PRODUCT_HEIGHTS: [usize; 4] = [16, 32, 64, 128];
/// Stages of each one's ring (`STAGES` of `PRODUCT_KERNEL` in the source).
const PRODUCT_STAGES: [usize; 4] = [8, 8, 6, 4];
/// Blocks per multiprocessor the grid aims for: two, so that each
/// multiprocessor has one block's copies in flight while the other's warps
/// compute, and the grid still runs in one wave (one and four were slower
/// on the H100).
const PRODUCT_BLOCKS_PER_SM: usize = 2;

/// Units of weight rows a split product may have (one counter each).
const PRODUCT_COUNTERS: usize = 4096;
/// Ranges a product's `k` is split into, at most (`PRODUCT_MAX_SPLITS`:
/// the block that adds them up loads all of them at once).
const PRODUCT_MAX_SPLITS: usize = 8;

/// Whether the batched products take `product_rows*` where they can
/// (`SPARK_DISAGG_PRODUCT_KERNEL=1`) or cuBLAS (the default: on the H100
/// cuBLAS is still faster at every batch from 4 to 128; see the module's
/// documentation).
pub(super) fn product_kernel_enabled() -> bool {
    std::env::var("SPARK_DISAGG_PRODUCT_KERNEL").is_ok_and(|v| v.trim() == "1")
}

/// Blocks per multiprocessor a product's grid aims for
/// (`SPARK_DISAGG_PRODUCT_BLOCKS_PER_SM`, else `PRODUCT_BLOCKS_PER_SM`).
fn product_blocks_per_sm() -> usize {
    std::env::var("SPARK_DISAGG_PRODUCT_BLOCKS_PER_SM")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(PRODUCT_BLOCKS_PER_SM)
        .max(1)
}

/// The most rows of input the product kernel takes
/// (`SPARK_DISAGG_PRODUCT_MAX_ROWS`, at most 128; more go to cuBLAS).
fn product_max_rows() -> usize {
    std::env::var("SPARK_DISAGG_PRODUCT_MAX_ROWS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(PRODUCT_HEIGHTS[3])
        .min(PRODUCT_HEIGHTS[3])
}

/// Whether, on a Hopper or later, a product is launched while the kernel
/// before it runs, so that its blocks copy their first weights before
/// that kernel ends (the default; `SPARK_DISAGG_PRODUCT_OVERLAP=0` waits).
fn product_overlap_enabled() -> bool {
    std::env::var("SPARK_DISAGG_PRODUCT_OVERLAP").map_or(true, |v| v.trim() != "0")
}

/// How many ranges a product's `k` is split into: enough that the grid has
/// about `target` blocks when the weight has only `units` units of rows,
/// never more than its `chunks` stages of `k`, and one where the units alone
/// come near `target`. Each range ends in partial sums that one block adds
/// up, so splitting is not free: it is for the small products (the
/// attention projections), not for those that fill the GPU by themselves.
pub(crate) fn product_splits(units: usize, chunks: usize, target: usize) -> usize {
    (target / units.max(1)).clamp(1, chunks.clamp(1, PRODUCT_MAX_SPLITS))
}

/// What the product kernel does with `x · Wᵀ` (`epilogue` in the source).
#[derive(Clone, Copy)]
pub(crate) enum ProductEpilogue<'a> {
    /// Writes it, in the model's type.
    Store,
    /// Writes it in f32 (the logits).
    StoreF32,
    /// Adds it to this residual stream, in place.
    AddTo(&'a Tensor),
    /// `W` is the fused gate/up weight: writes `silu(gate) · up`, half as
    /// wide as `W` has rows.
    SwiGlu,
}

impl ProductEpilogue<'_> {
    fn code(self) -> i32 {
        match self {
            ProductEpilogue::Store => 0,
            ProductEpilogue::StoreF32 => 1,
            ProductEpilogue::AddTo(_) => 2,
            ProductEpilogue::SwiGlu => 3,
        }
    }
}

/// The product kernels of a device, and what they share.
#[derive(Clone)]
pub(crate) struct ProductKernels {
    /// One per entry of `PRODUCT_HEIGHTS`, its shared memory reserved.
    functions: [Function; 4],
    /// One counter per unit of a split product; each launch leaves them at
    /// zero. Products of one device run on one stream at a time (the
    /// engine's), so they can share these.
    counters: Arc<Mutex<Tensor>>,
    /// Blocks the grid aims for.
    target_blocks: usize,
    /// Launched to overlap the kernel before (see `product_overlap_enabled`).
    overlap: bool,
    /// Inputs of more rows go to cuBLAS (see `product_max_rows`).
    max_rows: usize,
}

impl ProductKernels {
    /// The kernels named in `functions`, or None where they cannot run: a
    /// 32-bit model, a GPU before Ampere, or too little shared memory.
    pub(crate) fn new(
        get: impl Fn(&str) -> Option<Function>,
        kind: Kind,
        device: usize,
        multiprocessors: usize,
        hopper: bool,
    ) -> Option<ProductKernels> {
        if !matches!(kind, Kind::BFloat16 | Kind::Half) {
            return None;
        }
        let mut functions = Vec::new();
        for height in PRODUCT_HEIGHTS {
            let function = get(&format!("product_rows{height}"))?;
            let memory = imp::shared_memory(function, device).ok()?;
            if memory.capability < 80 {
                return None;
            }
            imp::reserve_shared(function, device, shared_bytes(height)).ok()?;
            functions.push(function);
        }
        let counters = Tensor::zeros([PRODUCT_COUNTERS as i64], (Kind::Int, Device::Cuda(device)));
        Some(ProductKernels {
            functions: functions.try_into().ok()?,
            counters: Arc::new(Mutex::new(counters)),
            target_blocks: multiprocessors * product_blocks_per_sm(),
            overlap: hopper && product_overlap_enabled(),
            max_rows: product_max_rows(),
        })
    }
}

/// Dynamic shared memory of a block of the kernel for `height` input rows
/// (one of `PRODUCT_HEIGHTS`): its ring of stages, each a stage's worth of
/// the unit's weight rows and of the input rows (92-111 KiB, so two blocks
/// fit on an H100's multiprocessor).
fn shared_bytes(height: usize) -> usize {
    let stages = PRODUCT_HEIGHTS
        .iter()
        .position(|&h| h == height)
        .map_or(0, |i| PRODUCT_STAGES[i]);
    stages * (PRODUCT_ROWS + height) * PRODUCT_PITCH_BYTES
}

impl DecodeKernels {
    /// The same kernels with the batched products on `product_rows*` (where
    /// they can run; off by default, see `SPARK_DISAGG_PRODUCT_KERNEL`) or
    /// on cuBLAS.
    pub fn with_product_kernel(&self, on: bool) -> DecodeKernels {
        DecodeKernels {
            product_on: on && self.products.is_some(),
            ..self.clone()
        }
    }

    /// The same kernels with the products launched to overlap the kernel
    /// before them, or not (see `SPARK_DISAGG_PRODUCT_OVERLAP`). Only
    /// timing changes.
    pub fn with_product_overlap(&self, on: bool) -> DecodeKernels {
        let products = self.products.clone().map(|p| ProductKernels {
            overlap: on && self.hopper,
            ..p
        });
        DecodeKernels {
            products,
            ..self.clone()
        }
    }

    /// True when the batched products run on `product_rows*`.
    pub fn product_kernel(&self) -> bool {
        self.product_on
    }

    /// Whether `x · weightᵀ` goes to the product kernel: it is on, `x` has
    /// 1 to `max_rows` rows, both are 16-byte aligned rows of whole 16-byte
    /// pieces, and the weight has a multiple of 8 rows (the epilogue writes
    /// four outputs at a time, 8-byte aligned, also for SwiGLU's half).
    pub(crate) fn takes_product(&self, x: &Tensor, weight: &Tensor) -> bool {
        let Some(products) = self.products.as_ref().filter(|_| self.product_on) else {
            return false;
        };
        let vec = 16 / self.shape.kind.elt_size_in_bytes();
        let rows = x.size().first().copied().unwrap_or(0) as usize;
        x.dim() == 2
            && (1..=products.max_rows).contains(&rows)
            && weight
                .size2()
                .is_ok_and(|(n, k)| n % 8 == 0 && k as usize % vec == 0 && x.size()[1] == k)
            && aligned_16(x)
            && aligned_16(weight)
    }

    /// Launches the product kernel for `x` (`[rows, k]`) and `weight`
    /// (`[n, k]`); returns the output (for `AddTo`, the residual it was
    /// added to). The caller checked `takes_product`.
    pub(crate) fn product(&self, x: &Tensor, weight: &Tensor, epilogue: ProductEpilogue) -> Tensor {
        let products = self.products.as_ref().expect("the product kernel is on");
        let kind = self.shape.kind;
        self.expect("input", x, kind);
        self.expect("weight", weight, kind);
        let (n, k) = weight.size2().expect("a weight is [n, k]");
        let rows = x.size()[0];
        let height = PRODUCT_HEIGHTS
            .iter()
            .position(|&h| rows as usize <= h)
            .expect("the caller checked the rows");
        let device = x.device();
        let out = match epilogue {
            ProductEpilogue::Store => Tensor::empty([rows, n], (kind, device)),
            ProductEpilogue::StoreF32 => Tensor::empty([rows, n], (Kind::Float, device)),
            ProductEpilogue::SwiGlu => Tensor::empty([rows, n / 2], (kind, device)),
            ProductEpilogue::AddTo(residual) => {
                self.expect("residual", residual, kind);
                assert_eq!(residual.size(), [rows, n], "product: residual shape");
                residual.shallow_clone()
            }
        };
        let units = (n as usize).div_ceil(PRODUCT_ROWS);
        let chunks = (k as usize).div_ceil(PRODUCT_DEPTH);
        let mut splits = product_splits(units, chunks, products.target_blocks);
        if units > PRODUCT_COUNTERS {
            splits = 1;
        }
        // Partial sums of every split, in the units' own row order.
        let partials = if splits > 1 {
            Tensor::empty(
                [(splits * units * PRODUCT_ROWS) as i64 * rows],
                (Kind::Float, device),
            )
        } else {
            Tensor::empty([0], (Kind::Float, device))
        };
        let counters = products
            .counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .data_ptr();
        let args = [
            Arg::tensor(x),
            Arg::tensor(weight),
            Arg::tensor(&out),
            Arg::tensor(&partials),
            Arg::Ptr(counters),
            Arg::I32(rows as i32),
            Arg::I32(n as i32),
            Arg::I32(k as i32),
            Arg::I32(epilogue.code()),
        ];
        let mut addresses: Vec<_> = args.iter().map(Arg::address).collect();
        let mode = LaunchMode {
            cooperative: false,
            overlap_previous: products.overlap,
        };
        self.launch_with(
            products.functions[height],
            [units, splits, 1],
            PRODUCT_THREADS,
            shared_bytes(PRODUCT_HEIGHTS[height]),
            mode,
            &mut addresses,
        );
        out
    }

    /// The counters of split products, as they stand (for tests: zero
    /// between launches).
    #[cfg(test)]
    pub(crate) fn product_counters(&self) -> Option<Tensor> {
        let products = self.products.as_ref()?;
        let counters = products.counters.lock().unwrap_or_else(|p| p.into_inner());
        Some(counters.copy())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{max_abs, max_diff, test_config, test_gpu};

    /// The product kernel against cuBLAS (the path it replaces, which the
    /// fused tests check against PyTorch) for every epilogue, at heights
    /// from 1 to 128 rows (each of the four kernels, and rows that leave a
    /// kernel's tile part empty), weights that end inside a unit, `k` that
    /// ends inside a stage, and products split along `k` or not. Splits
    /// are added in a fixed order, so two runs agree bit for bit, with the
    /// launch overlapping the kernel before or not; the counters are left
    /// at zero.
    #[test]
    fn batched_products_match_cublas() {
        let Some(device) = test_gpu() else { return };
        let _no_grad = tch::no_grad_guard();
        for kind in [Kind::BFloat16, Kind::Half] {
            let kernels = DecodeKernels::get(&test_config(), kind, device).unwrap();
            let memory = imp::shared_memory(kernels.rms_norm, kernels.device).unwrap();
            if memory.capability < 80 {
                eprintln!("no product kernel before Ampere: not checked here");
                return;
            }
            assert!(
                kernels.products.is_some(),
                "the product kernels should load"
            );
            // No matrix-vector kernel, so that every height takes the product kernel.
            let ours = kernels.with_matvec_limit(0).with_product_kernel(true);
            let cublas = ours.with_product_kernel(false);
            let waiting = ours.with_product_overlap(false);
            for (rows, n, k) in [
                (1i64, 296i64, 512i64),
                (5, 2560, 520),
                (16, 2048, 2048),
                (17, 64, 128),
                (32, 11264, 576),
                (64, 512, 1408),
                (100, 1000, 64),
                (128, 2560, 2048),
            ] {
                let check = |what: &str, got: &Tensor, want: &Tensor| {
                    let diff = max_diff(got, want);
                    assert!(
                        diff <= 2e-2 * max_abs(want).max(1.0),
                        "{what}, {kind:?}, {rows} rows, n {n}, k {k}: {diff}"
                    );
                };
                let x = Tensor::randn([rows, k], (kind, device));
                let w = Tensor::randn([n, k], (kind, device)) / (k as f64).sqrt();
                let norm = Tensor::randn([k], (kind, device));
                assert!(ours.takes_product(&x, &w), "{rows} x {n} x {k}");
                assert!(!cublas.takes_product(&x, &w));

                let got = ours.norm_linear(&x, &norm, 1e-5, &w, None);
                check(
                    "norm_linear",
                    &got,
                    &cublas.norm_linear(&x, &norm, 1e-5, &w, None),
                );
                let again = waiting.norm_linear(&x, &norm, 1e-5, &w, None);
                assert!(got.equal(&again), "{rows} x {n} x {k}: runs differ");

                let logits = ours.norm_logits(&x, &norm, 1e-5, &w);
                assert_eq!(logits.kind(), Kind::Float);
                check(
                    "norm_logits",
                    &logits,
                    &cublas.norm_logits(&x, &norm, 1e-5, &w),
                );

                let h = Tensor::randn([rows, k], (kind, device));
                let residual = Tensor::randn([rows, n], (kind, device));
                let want = residual.copy();
                ours.linear_add(&h, &w, &residual, None);
                cublas.linear_add(&h, &w, &want, None);
                check("linear_add", &residual, &want);

                // The MLP: the gate/up weight is w, the down weight [k, n/2].
                let down = Tensor::randn([k, n / 2], (kind, device)) / (n as f64 / 2.0).sqrt();
                let got = x.copy();
                let want = x.copy();
                ours.mlp_add(&got, &norm, 1e-5, &w, &down, None);
                cublas.mlp_add(&want, &norm, 1e-5, &w, &down, None);
                check("mlp_add", &got, &want);
                // The activation alone, against silu_mul of cuBLAS's gate/up.
                let normed = ours.rms_norm(&x, &norm, 1e-5);
                let activation = ours.product(&normed, &w, ProductEpilogue::SwiGlu);
                let gate_up = cublas.norm_linear(&x, &norm, 1e-5, &w, None);
                check("swiglu", &activation, &cublas.silu_mul(&gate_up));
            }
            let counters = ours.product_counters().unwrap();
            assert_eq!(counters.abs().sum(Kind::Int64).int64_value(&[]), 0);
        }
    }

    #[test]
    fn products_split_k_only_until_the_grid_is_full() {
        // An H100: 132 multiprocessors, two blocks each.
        let target = 264;
        // TinyLlama's qkv (2560 rows, k 2048): 40 units split six ways.
        assert_eq!(product_splits(40, 32, target), 6);
        // Its o projection and down projection: 32 units, eight ways.
        assert_eq!(product_splits(32, 32, target), 8);
        assert_eq!(product_splits(32, 88, target), 8);
        // gate/up (11 264 rows): 176 units fill the grid by themselves.
        assert_eq!(product_splits(176, 32, target), 1);
        // The logits (32 000 rows): 500 units, one wave of two.
        assert_eq!(product_splits(500, 32, target), 1);
        // A short k is never split finer than its stages, nor any k more
        // than eight ways.
        assert_eq!(product_splits(2, 3, target), 3);
        assert_eq!(product_splits(2, 32, target), 8);
        assert_eq!(product_splits(0, 0, target), 1);
    }

    #[test]
    fn product_blocks_fit_twice_on_a_hopper_multiprocessor() {
        // 227 KiB of shared memory a block may opt into on an H100, 228 in
        // all per multiprocessor (1 KiB of it reserved per block).
        for height in PRODUCT_HEIGHTS {
            assert!(
                2 * (shared_bytes(height) + 1024) <= 228 * 1024,
                "{height} rows: {} bytes",
                shared_bytes(height)
            );
        }
        assert_eq!(shared_bytes(32), 8 * 96 * 144);
        assert_eq!(shared_bytes(128), 4 * 192 * 144);
    }
}
