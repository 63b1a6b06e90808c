//! One attention call for many sequences of different lengths, laid end
//! to end: PyTorch's FlashAttention with cumulative sequence lengths.
//!
//! A step's prefill forward runs the chunks of several prompts as one row
//! of tokens (see [`runner`]). The norms and products do not care where a
//! prompt ends; attention does. `scaled_dot_product_attention` only knows
//! rectangles `[batch, heads, len, head_dim]`, so the runner used to cut the
//! row into groups of equally long chunks and pad each group's contexts to
//! the longest, with a mask for chunks that have a past: per layer, two
//! gathers, a head repeat and an SDPA call *per group*, all queued by the
//! host.
//!
//! FlashAttention's own entry point takes the lengths instead of padding
//! them away. Sequence `i` owns query rows `cu_seq_q[i] .. cu_seq_q[i+1]`
//! and key rows `cu_seq_k[i] .. cu_seq_k[i+1]` (the "varlen" interface that
//! vLLM and FlashAttention's authors use for packed batches), so one call
//! covers the whole row. It reads each key/value head once for all of its
//! query heads (grouped-query attention, no repeat), and its causal mask is
//! aligned to the *end* of each sequence: a chunk of `q` queries after a
//! past of `k - q` keys sees the whole past, which is exactly the mask the
//! runner built by hand.
//!
//! The kernel needs a GPU of compute capability 8.0 or later (Ampere),
//! half-precision tensors (bf16 or f16) and a head dimension that is a
//! multiple of 8 up to 256. [`usable`] answers, for a device, whether the
//! call works there (it tries once); elsewhere the runner keeps its groups.
//! tch does not bind the operation (it returns five tensors); the call goes
//! through the C++ bridge (`csrc/varlen_attention.cpp`).
//!
//! [`runner`]: super::runner

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use tch::{Device, Kind, Tensor};

use super::host_copy::upload;

/// Why a varlen attention call did not run.
#[derive(Debug, thiserror::Error)]
pub enum VarlenAttentionError {
    #[error(
        "this build has no CUDA bridge (libtorch without CUDA, or CUDA's headers were missing \
         at build time: pip install nvidia-cuda-crt and rebuild)"
    )]
    NotCompiled,
    #[error(
        "FlashAttention over packed sequences failed: {0} \
         (SPARK_DISAGG_VARLEN_ATTENTION=0 runs attention per group of chunks instead)"
    )]
    Flash(String),
}

/// Where each sequence's queries and keys lie in a packed forward.
#[cfg_attr(not(cuda_bridge), allow(dead_code))]
pub struct PackedSequences {
    /// `[sequences + 1]` int32 on the device: query rows of sequence `i`
    /// are `cu_q[i] .. cu_q[i+1]`.
    cu_q: Tensor,
    /// The same for keys (each sequence's whole context, past included).
    cu_k: Tensor,
    max_q: i64,
    max_k: i64,
}

impl PackedSequences {
    /// `lengths` holds `(queries, keys)` per sequence, in the order they
    /// are laid out; keys count the past and the new tokens.
    pub fn new(lengths: &[(usize, usize)], device: Device) -> PackedSequences {
        let cumulative = |pick: fn(&(usize, usize)) -> usize| -> Tensor {
            let sums: Vec<i64> = std::iter::once(0)
                .chain(lengths.iter().scan(0, |sum, l| {
                    *sum += pick(l) as i64;
                    Some(*sum)
                }))
                .collect();
            upload(&sums, device).to_kind(Kind::Int)
        };
        PackedSequences {
            cu_q: cumulative(|l| l.0),
            cu_k: cumulative(|l| l.1),
            max_q: lengths.iter().map(|l| l.0).max().unwrap_or(0) as i64,
            max_k: lengths.iter().map(|l| l.1).max().unwrap_or(0) as i64,
        }
    }
}

/// Causal attention of `q` `[total_q, heads, head_dim]` over `k` and `v`
/// `[total_k, kv_heads, head_dim]`, sequence by sequence as `sequences`
/// says. Returns `[total_q, heads, head_dim]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    sequences: &PackedSequences,
) -> Result<Tensor, VarlenAttentionError> {
    imp::attention(q, k, v, sequences)
}

/// True when [`attention`] runs for tensors of `kind` with heads of
/// `head_dim` on `device`: a CUDA device where FlashAttention works (tried
/// once per device with a tiny call), a half-precision kind, a head
/// dimension the kernel has, and `SPARK_DISAGG_VARLEN_ATTENTION` not `0`.
pub fn usable(device: Device, kind: Kind, head_dim: i64) -> bool {
    let Device::Cuda(index) = device else {
        return false;
    };
    let half = matches!(kind, Kind::BFloat16 | Kind::Half);
    let shaped = head_dim % 8 == 0 && (8..=256).contains(&head_dim);
    if !(half && shaped && enabled()) {
        return false;
    }
    static PROBED: OnceLock<Mutex<HashMap<usize, bool>>> = OnceLock::new();
    let mut probed = PROBED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    *probed.entry(index).or_insert_with(|| match probe(device) {
        Ok(()) => true,
        Err(err) => {
            tracing::info!("prefill attention runs per group of chunks on {device:?}: {err}");
            false
        }
    })
}

/// `SPARK_DISAGG_VARLEN_ATTENTION=0` turns the packed call off (to compare);
/// read once, not at every forward.
fn enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED
        .get_or_init(|| std::env::var("SPARK_DISAGG_VARLEN_ATTENTION").map_or(true, |v| v != "0"))
}

/// One tiny call: two sequences, two query heads on one key/value head.
fn probe(device: Device) -> Result<(), VarlenAttentionError> {
    let options = (Kind::BFloat16, device);
    let q = Tensor::ones([3, 2, 8], options);
    let kv = Tensor::ones([5, 1, 8], options);
    let sequences = PackedSequences::new(&[(1, 2), (2, 3)], device);
    attention(&q, &kv, &kv, &sequences).map(|_| ())
}

#[cfg(cuda_bridge)]
mod imp {
    use std::ffi::{c_char, c_int, c_void};

    use tch::Tensor;

    use super::{PackedSequences, VarlenAttentionError};

    extern "C" {
        fn spark_varlen_attention(
            query: *const c_void,
            key: *const c_void,
            value: *const c_void,
            cu_seq_q: *const c_void,
            cu_seq_k: *const c_void,
            max_q: i64,
            max_k: i64,
            out: *mut *mut c_void,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
    }

    pub fn attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        sequences: &PackedSequences,
    ) -> Result<Tensor, VarlenAttentionError> {
        // tch's tensor handle is a pointer to the C++ at::Tensor.
        let ptr = |t: &Tensor| t.as_ptr().cast::<c_void>();
        let mut out = std::ptr::null_mut();
        crate::cuda_bridge::call(|e, n| unsafe {
            spark_varlen_attention(
                ptr(q),
                ptr(k),
                ptr(v),
                ptr(&sequences.cu_q),
                ptr(&sequences.cu_k),
                sequences.max_q,
                sequences.max_k,
                &mut out,
                e,
                n,
            )
        })
        .map_err(VarlenAttentionError::Flash)?;
        // SAFETY: on success the bridge hands over a new at::Tensor, which
        // tch frees with `delete`, as it was made with `new`.
        Ok(unsafe { Tensor::from_ptr(out.cast()) })
    }
}

#[cfg(not(cuda_bridge))]
mod imp {
    use tch::Tensor;

    use super::{PackedSequences, VarlenAttentionError};

    pub fn attention(
        _q: &Tensor,
        _k: &Tensor,
        _v: &Tensor,
        _sequences: &PackedSequences,
    ) -> Result<Tensor, VarlenAttentionError> {
        Err(VarlenAttentionError::NotCompiled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each sequence attended alone by SDPA (its causal mask shifted to the
    /// end, its key/value heads repeated) against one packed call.
    #[test]
    fn one_packed_call_matches_each_sequence_alone() {
        let device = crate::device::cuda_if_available();
        if !usable(device, Kind::BFloat16, 64) {
            eprintln!("no GPU with FlashAttention here: the packed call is not checked");
            return;
        }
        tch::manual_seed(3);
        let (heads, kv_heads, head_dim) = (8, 2, 64);
        // (queries, keys): a whole prompt, chunks after pasts, one token.
        let lengths = [(7, 7), (5, 11), (3, 40), (1, 9)];
        let options = (Kind::BFloat16, device);
        let total = |pick: fn(&(usize, usize)) -> usize| lengths.iter().map(pick).sum::<usize>();
        let q = Tensor::randn([total(|l| l.0) as i64, heads, head_dim], options);
        let k = Tensor::randn([total(|l| l.1) as i64, kv_heads, head_dim], options);
        let v = Tensor::randn([total(|l| l.1) as i64, kv_heads, head_dim], options);
        let packed = attention(&q, &k, &v, &PackedSequences::new(&lengths, device)).unwrap();
        assert_eq!(packed.size(), q.size());

        let (mut q_row, mut k_row) = (0, 0);
        for &(nq, nk) in &lengths {
            let (nq, nk) = (nq as i64, nk as i64);
            // [len, heads, dim] -> [1, heads, len, dim], heads repeated.
            let batch = |x: Tensor| x.transpose(0, 1).unsqueeze(0).to_kind(Kind::Float);
            let repeat = |x: Tensor| x.repeat_interleave_self_int(heads / kv_heads, 1, None);
            let qs = batch(q.narrow(0, q_row, nq));
            let ks = batch(repeat(k.narrow(0, k_row, nk)));
            let vs = batch(repeat(v.narrow(0, k_row, nk)));
            let rows = Tensor::arange(nq, (Kind::Int64, device)).reshape([-1, 1]);
            let cols = Tensor::arange(nk, (Kind::Int64, device)).reshape([1, -1]);
            let mask = cols.le_tensor(&(rows + (nk - nq)));
            let want = Tensor::scaled_dot_product_attention(
                &qs,
                &ks,
                &vs,
                Some(&mask),
                0.0,
                false,
                None,
                false,
            );
            let got = batch(packed.narrow(0, q_row, nq));
            let diff = (&got - &want).abs().max().double_value(&[]);
            assert!(diff < 0.03, "sequence ({nq}, {nk}) differs by {diff}");
            q_row += nq;
            k_row += nk;
        }
    }

    #[test]
    fn not_usable_on_a_cpu_or_in_full_precision() {
        assert!(!usable(Device::Cpu, Kind::BFloat16, 64));
        assert!(!usable(Device::Cuda(0), Kind::Float, 64));
        assert!(!usable(Device::Cuda(0), Kind::BFloat16, 60));
    }
}
