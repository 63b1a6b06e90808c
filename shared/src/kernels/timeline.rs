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
pub const TIMELINE_MARKS: usize = 28;

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
}

/// The products whose tile waits [`mark::TILE_WAITS`] holds, in order.
pub const PRODUCTS: [&str; 4] = ["qkv", "o", "gate/up", "down"];

const _: () = assert!(
    mark::TILE_SYNCS[3] < TIMELINE_MARKS,
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
    let stages = STAGES
        .iter()
        .map(|stage| {
            let per_block = |t: &LayerTimeline, l: usize| -> Vec<f64> {
                t.stage_ns(l, stage).into_iter().map(us).collect()
            };
            StageTime {
                name: stage.name.to_string(),
                quickest_block_us: each(&|t, l| per_block(t, l).into_iter().reduce(f64::min)),
                median_block_us: each(&|t, l| Some(median(&mut per_block(t, l)))),
                slowest_block_us: each(&|t, l| per_block(t, l).into_iter().reduce(f64::max)),
                median_end_us: Some(each(&since_start(stage.to))),
            }
        })
        .collect();
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
