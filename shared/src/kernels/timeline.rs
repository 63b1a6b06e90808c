//! Where a decode layer's time goes, block by block.
//!
//! A diagnostic build of the layer kernel (`SPARK_DISAGG_LAYER_TIMELINE=1`,
//! `-DLAYER_TIMELINE=1` for NVRTC) has thread 0 of every block read the
//! GPU's global clock (`%globaltimer`, nanoseconds, one clock for all
//! multiprocessors) at each stage boundary of each layer, and stores it in
//! a `__device__` array of the module; its copying warp adds when it issued
//! its first and last tiles and how long it waited for free slots. The
//! host reads the array after a step ([`super::DecodeKernels::layer_timeline`]).
//! This module names the marks and turns them into stage times.
//!
//! It is the software analogue of a logic analyser on a bus: a timestamp
//! per event per unit, read out afterwards, so that the question "which
//! stage, which block?" is answered by data rather than by taking things
//! out and timing the rest. The build's only change to the layer's work is
//! one named barrier per stage (so that "done" means every computing warp
//! of the block is done); the default build compiles all of it out.

use std::ops::Range;

/// Layers and blocks the array has room for, and marks per (layer, block):
/// `TIMELINE_LAYERS`, `TIMELINE_BLOCKS` and `TIMELINE_MARKS` in `decode.cu`.
pub const TIMELINE_LAYERS: usize = 128;
pub const TIMELINE_BLOCKS: usize = 160;
pub const TIMELINE_MARKS: usize = 32;

/// The marks, as `decode.cu` numbers them (its `MARK_*`).
pub mod mark {
    /// The block began, before any barrier.
    pub const LAUNCHED: usize = 0;
    /// The kernels before it (the previous layer) have finished.
    pub const STARTED: usize = 1;
    /// The input is normalised and staged in shared memory.
    pub const STAGED: usize = 2;
    pub const QKV_DONE: usize = 3;
    pub const BARRIER1: usize = 4;
    pub const ATTENTION_DONE: usize = 5;
    pub const BARRIER2: usize = 6;
    pub const O_DONE: usize = 7;
    pub const BARRIER3: usize = 8;
    pub const GATE_UP_DONE: usize = 9;
    pub const BARRIER4: usize = 10;
    pub const DOWN_DONE: usize = 11;
    /// The copying warp issued its first tile.
    pub const FIRST_COPY: usize = 12;
    /// ... and its last.
    pub const LAST_COPY: usize = 13;
    /// Not a time: the nanoseconds it waited for free slots, in all.
    pub const SLOT_WAIT: usize = 14;
    /// Not times: the nanoseconds thread 0 spent in each product, in the
    /// layer's order ([`super::PRODUCTS`]): waiting for its tiles to
    /// arrive, ...
    pub const TILE_WAITS: [usize; 4] = [15, 16, 17, 18];
    /// ... in the dot products, ...
    pub const TILE_DOTS: [usize; 4] = [19, 20, 21, 22];
    /// ... and at its group's barrier after them.
    pub const TILE_SYNCS: [usize; 4] = [23, 24, 25, 26];
    /// A block's first attention item, timed by its thread 0 (a block with
    /// no item records none): its first query chunk seen (in the tagged
    /// build, waited for), ...
    pub const ATTN_QUERIES: usize = 27;
    /// ... its partition's result stored, ...
    pub const ATTN_PARTIAL: usize = 28;
    /// ... the partition counted (a fence and an atomic), ...
    pub const ATTN_COUNTED: usize = 29;
    /// ... and the partitions merged, where it was the last to finish.
    pub const ATTN_MERGED: usize = 30;
}

/// The products whose tile waits [`mark::TILE_WAITS`] holds, in order.
pub const PRODUCTS: [&str; 4] = ["qkv", "o", "gate/up", "down"];

const _: () = assert!(
    mark::ATTN_MERGED < TIMELINE_MARKS,
    "every mark has its place"
);

/// A stage of the layer: from one mark to the next, per block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stage {
    pub name: &'static str,
    pub from: usize,
    pub to: usize,
}

const fn stage(name: &'static str, from: usize, to: usize) -> Stage {
    Stage { name, from, to }
}

/// The layer's stages in order. A "barrier" stage is one block's wait at
/// a grid barrier: for most blocks the wait for the last to arrive, for
/// that last block the barrier's own cost (a fence, an atomic, a poll), so
/// a barrier's quickest block measures the barrier and its slowest block
/// the spread of the stage before it.
pub const STAGES: [Stage; 11] = [
    stage("wait for the layer before", mark::LAUNCHED, mark::STARTED),
    stage("staging (RMSNorm)", mark::STARTED, mark::STAGED),
    stage("qkv, RoPE, KV write", mark::STAGED, mark::QKV_DONE),
    stage("barrier 1", mark::QKV_DONE, mark::BARRIER1),
    stage("attention", mark::BARRIER1, mark::ATTENTION_DONE),
    stage("barrier 2", mark::ATTENTION_DONE, mark::BARRIER2),
    stage("o (staging, product)", mark::BARRIER2, mark::O_DONE),
    stage("barrier 3", mark::O_DONE, mark::BARRIER3),
    stage(
        "gate/up (RMSNorm, product)",
        mark::BARRIER3,
        mark::GATE_UP_DONE,
    ),
    stage("barrier 4", mark::GATE_UP_DONE, mark::BARRIER4),
    stage("down (staging, product)", mark::BARRIER4, mark::DOWN_DONE),
];

/// The parts of a block's first attention item, from the end of the qkv
/// stage's sync (`BARRIER1`): the wait for its queries, the keys and values
/// with the softmax (its partition's share of the work, and the wait for
/// the new token's key and value where the partition holds it), the count
/// that tells the last partition, and that last partition's merge (near
/// nothing for the others).
pub const ATTENTION_PARTS: [Stage; 4] = [
    stage("its queries seen", mark::BARRIER1, mark::ATTN_QUERIES),
    stage(
        "keys, values, softmax",
        mark::ATTN_QUERIES,
        mark::ATTN_PARTIAL,
    ),
    stage("fence and count", mark::ATTN_PARTIAL, mark::ATTN_COUNTED),
    stage("merge, if last", mark::ATTN_COUNTED, mark::ATTN_MERGED),
];

/// One decode step's marks: `[layer][block][mark]`, nanoseconds of the
/// GPU's global timer.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerTimeline {
    marks: Vec<u64>,
    layers: usize,
    blocks: usize,
}

impl LayerTimeline {
    /// The marks of `layers` layers of `blocks` blocks from the device
    /// array (`[TIMELINE_LAYERS][TIMELINE_BLOCKS][TIMELINE_MARKS]`, as read);
    /// both are capped at what the array holds.
    pub fn from_device_array(array: &[u64], layers: usize, blocks: usize) -> LayerTimeline {
        let (layers, blocks) = (layers.min(TIMELINE_LAYERS), blocks.min(TIMELINE_BLOCKS));
        let mut marks = Vec::with_capacity(layers * blocks * TIMELINE_MARKS);
        for layer in 0..layers {
            for block in 0..blocks {
                let at = (layer * TIMELINE_BLOCKS + block) * TIMELINE_MARKS;
                marks.extend_from_slice(&array[at..at + TIMELINE_MARKS]);
            }
        }
        LayerTimeline {
            marks,
            layers,
            blocks,
        }
    }

    pub fn layers(&self) -> usize {
        self.layers
    }

    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// Mark `mark` of block `block` in layer `layer`.
    pub fn mark(&self, layer: usize, block: usize, mark: usize) -> u64 {
        self.marks[(layer * self.blocks + block) * TIMELINE_MARKS + mark]
    }

    /// Whether every block of every layer recorded its stage marks in
    /// order (a mark never earlier than the one before it). A build or a
    /// read that went wrong shows here first.
    pub fn is_ordered(&self) -> bool {
        (0..self.layers).all(|l| {
            (0..self.blocks).all(|b| {
                STAGES
                    .iter()
                    .all(|s| self.mark(l, b, s.from) <= self.mark(l, b, s.to))
                    && self.mark(l, b, mark::LAUNCHED) > 0
            })
        })
    }

    /// Whether block `block` timed an attention item in layer `layer`: its
    /// marks lie between that layer's end of qkv and end of attention
    /// (a block with no item has zeros, or a stale value from an earlier
    /// run with more items, where the array was not cleared).
    pub fn timed_attention(&self, layer: usize, block: usize) -> bool {
        let at = |m| self.mark(layer, block, m);
        let (from, to) = (at(mark::BARRIER1), at(mark::ATTENTION_DONE));
        ATTENTION_PARTS
            .iter()
            .all(|p| from <= at(p.from) && at(p.from) <= at(p.to) && at(p.to) <= to)
    }

    /// Stage `stage` of layer `layer`, per block, in nanoseconds.
    pub fn stage_ns(&self, layer: usize, stage: &Stage) -> Vec<u64> {
        (0..self.blocks)
            .map(|b| {
                self.mark(layer, b, stage.to)
                    .saturating_sub(self.mark(layer, b, stage.from))
            })
            .collect()
    }

    /// When layer `layer` began: its first block's launch.
    pub fn layer_start(&self, layer: usize) -> u64 {
        (0..self.blocks)
            .map(|b| self.mark(layer, b, mark::LAUNCHED))
            .min()
            .unwrap_or(0)
    }

    /// When layer `layer` ended: its last block's end of the down product.
    pub fn layer_end(&self, layer: usize) -> u64 {
        (0..self.blocks)
            .map(|b| self.mark(layer, b, mark::DOWN_DONE))
            .max()
            .unwrap_or(0)
    }

    /// From layer `layer`'s first launch to its last block's end, ns.
    pub fn layer_ns(&self, layer: usize) -> u64 {
        self.layer_end(layer)
            .saturating_sub(self.layer_start(layer))
    }

    /// From layer `layer`'s last block's end to the next layer's first
    /// launch, ns (the launch gap between two kernels); None after the last.
    pub fn gap_ns(&self, layer: usize) -> Option<u64> {
        (layer + 1 < self.layers).then(|| {
            self.layer_start(layer + 1)
                .saturating_sub(self.layer_end(layer))
        })
    }
}

/// What one stage took, over many layers and steps.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StageTime {
    pub name: String,
    /// The median over layers and steps of the quickest block's time, µs.
    pub quickest_block_us: f64,
    /// The same for the median block's time, µs.
    pub median_block_us: f64,
    /// The same for the slowest block's time, µs.
    pub slowest_block_us: f64,
    /// When the median block ended the stage, µs after the layer's first
    /// launch (median over layers and steps): where the stages' durations
    /// move time between them, this says when a barrier actually passed.
    /// `None` in results saved before it was measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub median_end_us: Option<f64>,
}

/// Stage times and a layer's other costs, medians over the layers and
/// steps summarised.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TimelineSummary {
    pub stages: Vec<StageTime>,
    /// From a layer's first launch to its last block's end, µs.
    pub layer_us: f64,
    /// From a layer's end to the next one's first launch, µs.
    pub gap_us: f64,
    /// The copying warp's first and last copies, µs after the layer began.
    pub first_copy_us: f64,
    pub last_copy_us: f64,
    /// The copying warp's wait for free slots, µs (median block).
    pub slot_wait_us: f64,
    /// How long thread 0 waited for its tiles to arrive in each product
    /// ([`PRODUCTS`]), µs (median block): where it waited, the weight
    /// stream set the product's pace; where it did not, the computing
    /// warps did.
    pub tile_wait_us: Vec<f64>,
    /// Thread 0's time in each product's dot products, µs (median block;
    /// empty in results saved before it was measured).
    #[serde(default)]
    pub tile_dot_us: Vec<f64>,
    /// Thread 0's time at its group's barrier after each tile's dot
    /// products (waiting for the group's slowest warp), µs.
    #[serde(default)]
    pub tile_sync_us: Vec<f64>,
    /// The parts of a block's first attention item ([`ATTENTION_PARTS`]),
    /// over the blocks that had one: quickest, median and slowest block
    /// and when the median one ended it, as for the stages. Empty in
    /// results saved before it was measured.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attention_parts: Vec<StageTime>,
    /// Layers and steps the medians are over.
    pub layers: Vec<usize>,
    pub steps: usize,
}

/// The median of `values` (0 for none).
fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// The stage times of layers `layers` over `steps`: for each stage, the
/// quickest, the median and the slowest block's time of each (layer,
/// step), then the median of each over all of them.
pub fn summarize(steps: &[LayerTimeline], layers: Range<usize>) -> TimelineSummary {
    let us = |ns: u64| ns as f64 / 1e3;
    let each = |f: &dyn Fn(&LayerTimeline, usize) -> Option<f64>| -> f64 {
        let mut values: Vec<f64> = steps
            .iter()
            .flat_map(|t| {
                layers
                    .clone()
                    .filter(|&l| l < t.layers())
                    .map(move |l| (t, l))
            })
            .filter_map(|(t, l)| f(t, l))
            .collect();
        median(&mut values)
    };
    // The median block's time of a mark, from the layer's first launch.
    let since_start = |m: usize| {
        move |t: &LayerTimeline, l: usize| {
            let mut v: Vec<f64> = (0..t.blocks())
                .map(|b| us(t.mark(l, b, m).saturating_sub(t.layer_start(l))))
                .collect();
            Some(median(&mut v))
        }
    };
    // A stage's times over the blocks `counts` picks: the quickest, the
    // median and the slowest block of each (layer, step), and when the
    // median one ended it; a (layer, step) with no such block is left out.
    let stage_time = |stage: &Stage, counts: &dyn Fn(&LayerTimeline, usize, usize) -> bool| {
        let blocks = |t: &LayerTimeline, l: usize| -> Vec<usize> {
            (0..t.blocks()).filter(|&b| counts(t, l, b)).collect()
        };
        let per_block = |t: &LayerTimeline, l: usize| -> Vec<f64> {
            let ns = t.stage_ns(l, stage);
            blocks(t, l).into_iter().map(|b| us(ns[b])).collect()
        };
        let median_or_none = |mut v: Vec<f64>| (!v.is_empty()).then(|| median(&mut v));
        StageTime {
            name: stage.name.to_string(),
            quickest_block_us: each(&|t, l| per_block(t, l).into_iter().reduce(f64::min)),
            median_block_us: each(&|t, l| median_or_none(per_block(t, l))),
            slowest_block_us: each(&|t, l| per_block(t, l).into_iter().reduce(f64::max)),
            median_end_us: Some(each(&|t, l| {
                median_or_none(
                    blocks(t, l)
                        .into_iter()
                        .map(|b| us(t.mark(l, b, stage.to).saturating_sub(t.layer_start(l))))
                        .collect(),
                )
            })),
        }
    };
    let stages = STAGES
        .iter()
        .map(|stage| stage_time(stage, &|_, _, _| true))
        .collect();
    let timed = |t: &LayerTimeline, l: usize, b: usize| t.timed_attention(l, b);
    let attention_timed = steps.iter().any(|t| {
        layers
            .clone()
            .any(|l| l < t.layers() && (0..t.blocks()).any(|b| timed(t, l, b)))
    });
    let attention_parts = if attention_timed {
        ATTENTION_PARTS
            .iter()
            .map(|part| stage_time(part, &timed))
            .collect()
    } else {
        Vec::new()
    };
    // The median block's value of a mark that holds a duration.
    let median_of = |m: usize| {
        move |t: &LayerTimeline, l: usize| {
            let mut v: Vec<f64> = (0..t.blocks()).map(|b| us(t.mark(l, b, m))).collect();
            Some(median(&mut v))
        }
    };
    TimelineSummary {
        stages,
        layer_us: each(&|t, l| Some(us(t.layer_ns(l)))),
        gap_us: each(&|t, l| t.gap_ns(l).map(us)),
        first_copy_us: each(&since_start(mark::FIRST_COPY)),
        last_copy_us: each(&since_start(mark::LAST_COPY)),
        slot_wait_us: each(&median_of(mark::SLOT_WAIT)),
        tile_wait_us: mark::TILE_WAITS
            .iter()
            .map(|&m| each(&median_of(m)))
            .collect(),
        tile_dot_us: mark::TILE_DOTS
            .iter()
            .map(|&m| each(&median_of(m)))
            .collect(),
        tile_sync_us: mark::TILE_SYNCS
            .iter()
            .map(|&m| each(&median_of(m)))
            .collect(),
        attention_parts,
        layers: layers
            .filter(|&l| steps.iter().any(|t| l < t.layers()))
            .collect(),
        steps: steps.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device array with `layers` layers of `blocks` blocks whose block
    /// `b` of layer `l` starts at `l · 100 000 + b · 10` ns and spends
    /// `(stage + 1) · 1000 + b` ns in each stage; the copying warp's marks
    /// at 500 and 40 000 ns past the launch, 7 000 ns of waiting; in
    /// product i thread 0 waits `(i + 1) · 100 + b` ns for tiles, spends
    /// `(i + 1) · 200 + b` in dot products and `(i + 1) · 300 + b` at its
    /// group's barrier.
    fn synthetic(layers: usize, blocks: usize) -> Vec<u64> {
        let mut array = vec![0u64; TIMELINE_LAYERS * TIMELINE_BLOCKS * TIMELINE_MARKS];
        for l in 0..layers {
            for b in 0..blocks {
                let at = (l * TIMELINE_BLOCKS + b) * TIMELINE_MARKS;
                let launched = 1_000_000 + (l * 100_000 + b * 10) as u64;
                let mut t = launched;
                array[at + mark::LAUNCHED] = t;
                for (i, s) in STAGES.iter().enumerate() {
                    t += (i as u64 + 1) * 1000 + b as u64;
                    array[at + s.to] = t;
                }
                array[at + mark::FIRST_COPY] = launched + 500;
                array[at + mark::LAST_COPY] = launched + 40_000;
                array[at + mark::SLOT_WAIT] = 7_000;
                for i in 0..PRODUCTS.len() {
                    array[at + mark::TILE_WAITS[i]] = (i as u64 + 1) * 100 + b as u64;
                    array[at + mark::TILE_DOTS[i]] = (i as u64 + 1) * 200 + b as u64;
                    array[at + mark::TILE_SYNCS[i]] = (i as u64 + 1) * 300 + b as u64;
                }
            }
        }
        array
    }

    /// `synthetic`'s array with an attention item timed in the even blocks:
    /// block `b` sees its queries `100 + b` ns after `BARRIER1`, then takes
    /// 2000 ns for keys and values, 300 to count and 400 to merge, all
    /// within the attention stage (`5000 + b` ns).
    fn with_attention(layers: usize, blocks: usize) -> Vec<u64> {
        let mut array = synthetic(layers, blocks);
        for l in 0..layers {
            for b in (0..blocks).step_by(2) {
                let at = (l * TIMELINE_BLOCKS + b) * TIMELINE_MARKS;
                let queries = array[at + mark::BARRIER1] + 100 + b as u64;
                array[at + mark::ATTN_QUERIES] = queries;
                array[at + mark::ATTN_PARTIAL] = queries + 2000;
                array[at + mark::ATTN_COUNTED] = queries + 2300;
                array[at + mark::ATTN_MERGED] = queries + 2700;
            }
        }
        array
    }

    #[test]
    fn attention_parts_count_only_the_blocks_that_timed_an_item() {
        let timeline = LayerTimeline::from_device_array(&with_attention(2, 5), 2, 5);
        assert!(timeline.timed_attention(1, 4));
        assert!(!timeline.timed_attention(1, 3), "no item: zeros");
        let summary = summarize(&[timeline], 0..2);
        let parts = &summary.attention_parts;
        let names: Vec<&str> = parts.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ATTENTION_PARTS.map(|p| p.name));
        // Blocks 0, 2 and 4 waited 100, 102 and 104 ns for their queries.
        let queries = &parts[0];
        assert!(
            (queries.quickest_block_us - 0.100).abs() < 1e-9,
            "{queries:?}"
        );
        assert!(
            (queries.median_block_us - 0.102).abs() < 1e-9,
            "{queries:?}"
        );
        assert!(
            (queries.slowest_block_us - 0.104).abs() < 1e-9,
            "{queries:?}"
        );
        for (part, ns) in parts[1..].iter().zip([2000.0, 300.0, 400.0]) {
            assert!((part.median_block_us - ns / 1e3).abs() < 1e-9, "{part:?}");
        }
        // The merge ended, in the median timed block (2), 2802 ns after its
        // BARRIER1, which passed 10 000 + 4·2 ns after its launch, 20 ns
        // after the layer's.
        let end = parts[3].median_end_us.unwrap();
        assert!((end - (10.028 + 2.802)).abs() < 1e-9, "{end}");

        // A stale mark, outside the layer's attention stage, is no item.
        let mut array = with_attention(1, 3);
        array[2 * TIMELINE_MARKS + mark::ATTN_MERGED] += 1_000_000;
        let timeline = LayerTimeline::from_device_array(&array, 1, 3);
        assert!(timeline.timed_attention(0, 0));
        assert!(!timeline.timed_attention(0, 2));
        // Without any timed item (a build before the marks), no parts.
        let untimed = LayerTimeline::from_device_array(&synthetic(2, 3), 2, 3);
        assert!(summarize(&[untimed], 0..2).attention_parts.is_empty());
    }

    #[test]
    fn the_stages_follow_one_another_from_launch_to_the_end_of_down() {
        for (s, next) in STAGES.iter().zip(STAGES.iter().skip(1)) {
            assert_eq!(s.to, next.from, "{} and {}", s.name, next.name);
        }
        assert_eq!(STAGES[0].from, mark::LAUNCHED);
        assert_eq!(STAGES[STAGES.len() - 1].to, mark::DOWN_DONE);
    }

    #[test]
    fn marks_are_read_per_layer_and_block_from_the_device_layout() {
        let timeline = LayerTimeline::from_device_array(&synthetic(3, 4), 3, 4);
        assert_eq!((timeline.layers(), timeline.blocks()), (3, 4));
        assert_eq!(timeline.mark(2, 3, mark::LAUNCHED), 1_000_000 + 200_030);
        assert!(timeline.is_ordered());
        // Stage 2 (qkv) takes 3000 + b ns in block b.
        assert_eq!(
            timeline.stage_ns(1, &STAGES[2]),
            vec![3000, 3001, 3002, 3003]
        );
        // A layer runs from its first launch to its last block's end: the
        // last block launched 30 ns late and spent 4 ns more per stage.
        let per_stage: u64 = (1..=11).map(|i| i * 1000).sum();
        assert_eq!(timeline.layer_ns(0), 30 + per_stage + 11 * 3);
        assert_eq!(
            timeline.gap_ns(0),
            Some(100_000 - (30 + per_stage + 11 * 3))
        );
        assert_eq!(timeline.gap_ns(2), None);
    }

    #[test]
    fn a_block_that_did_not_record_is_not_ordered() {
        let mut array = synthetic(2, 2);
        array[(TIMELINE_BLOCKS + 1) * TIMELINE_MARKS + mark::BARRIER2] = 0;
        assert!(!LayerTimeline::from_device_array(&array, 2, 2).is_ordered());
        assert!(!LayerTimeline::from_device_array(&synthetic(1, 1), 1, 2).is_ordered());
    }

    #[test]
    fn the_summary_takes_medians_over_blocks_layers_and_steps() {
        let steps = vec![LayerTimeline::from_device_array(&synthetic(4, 5), 4, 5); 3];
        let summary = summarize(&steps, 1..3);
        assert_eq!(summary.layers, vec![1, 2]);
        assert_eq!(summary.steps, 3);
        // qkv: 3000 + b ns over blocks 0..5: quickest block 3000, median
        // 3002, slowest 3004.
        let qkv = &summary.stages[2];
        assert_eq!(qkv.name, STAGES[2].name);
        assert!((qkv.quickest_block_us - 3.000).abs() < 1e-9);
        assert!((qkv.median_block_us - 3.002).abs() < 1e-9);
        assert!((qkv.slowest_block_us - 3.004).abs() < 1e-9);
        // Block b launches 10·b ns after block 0, and its first three
        // stages take 1000, 2000 and 3000 ns plus b each: qkv ends
        // 6000 + 13·b ns after the layer's first launch; block 2 is the
        // median block.
        assert_eq!(qkv.median_end_us.map(|t| (t * 1e3).round()), Some(6026.0));
        assert!((summary.first_copy_us - 0.52).abs() < 1e-9, "{summary:?}");
        assert!((summary.slot_wait_us - 7.0).abs() < 1e-9);
        // Thread 0's times: the median block of five is block 2.
        for (times, unit) in [
            (&summary.tile_wait_us, 0.1),
            (&summary.tile_dot_us, 0.2),
            (&summary.tile_sync_us, 0.3),
        ] {
            assert_eq!(times.len(), PRODUCTS.len());
            for (i, got) in times.iter().enumerate() {
                let want = (i + 1) as f64 * unit + 0.002;
                assert!((got - want).abs() < 1e-9, "{summary:?}");
            }
        }
        let per_stage: f64 = (1..=11).map(|i| i as f64).sum();
        assert!((summary.layer_us - (per_stage + 0.040 + 0.044)).abs() < 1e-9);
        // Layers past the ones recorded are left out, not counted as zero.
        assert_eq!(summarize(&steps, 3..9).layers, vec![3]);
    }
}
