//! Benchmark figures for dirty tracking, measured against a baseline in the same run.
//!
//! Each figure alternates the measured operation and its baseline (pairs, the order
//! flipped every pair) and reports medians: the machines these run on are noisy. Rates
//! are in GB/s (10^9 bytes/s) with `ratio = value / baseline`; times in ms with
//! `ratio = baseline / value`, so that 1.0 is the baseline and smaller is worse.
//!
//! The guest is 1 TiB at 4 KiB pages in a QEMU-like layout (2 GiB below 4 GiB, the rest
//! above): 2^28 pages, 32 MiB of bitmap per device.

use std::hint::black_box;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::device::IovaRange;
use crate::dirty::bitmap::DirtyBitmap;

const GIB: u64 = 1 << 30;
const DEVICES: usize = 8;

/// One line of benchmark output.
#[derive(Clone, Debug, Serialize)]
pub struct BenchFigure {
    pub bench: &'static str,
    pub value: f64,
    pub unit: &'static str,
    pub baseline: f64,
    pub ratio: f64,
    /// Extra context (sizes, counts, per-pair ratio median).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl BenchFigure {
    /// The figure as one JSON object on one line.
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self)
            .unwrap_or_else(|e| format!("{{\"bench\":\"{}\",\"error\":\"{e}\"}}", self.bench))
    }
}

/// The 1 TiB guest layout.
fn guest_layout() -> Vec<IovaRange> {
    vec![IovaRange { iova: 0, length: 2 * GIB }, IovaRange { iova: 4 * GIB, length: 1022 * GIB }]
}

/// xorshift64: deterministic filler, no dependency.
struct Filler(u64);

impl Filler {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 }
}

fn time(f: impl FnOnce()) -> Duration {
    let started = Instant::now();
    f();
    started.elapsed()
}

/// Runs `pairs` interleaved (measured, baseline) pairs, flipping the order each pair.
fn interleaved(
    pairs: usize,
    mut measured: impl FnMut() -> Duration,
    mut baseline: impl FnMut() -> Duration,
) -> (Vec<Duration>, Vec<Duration>) {
    let (mut m, mut b) = (Vec::with_capacity(pairs), Vec::with_capacity(pairs));
    for pair in 0..pairs {
        if pair % 2 == 0 {
            m.push(measured());
            b.push(baseline());
        } else {
            b.push(baseline());
            m.push(measured());
        }
    }
    (m, b)
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

/// `bitmap_merge_8x32MiB`: OR 8 device bitmaps of 32 MiB into the group bitmap, in input
/// bytes per second, against `memcpy` of the same 256 MiB in the same run.
pub fn bitmap_merge_8x32mib(pairs: usize) -> BenchFigure {
    let layout = guest_layout();
    let mut filler = Filler(0x2545_f491_4f6c_dd1d);
    let devices: Vec<DirtyBitmap> = (0..DEVICES)
        .map(|_| {
            let mut words: Vec<u64> = Vec::new();
            let mut bitmap = DirtyBitmap::new(&layout, 4096).expect("fixed layout");
            for (index, range) in layout.iter().enumerate() {
                words.clear();
                words.extend((0..(range.length / 4096 / 64)).map(|_| filler.next() & filler.next()));
                bitmap.merge_report(range.iova, range.length, 4096, &words).expect("4096 is a power of two");
                debug_assert_eq!(bitmap.range_words(index).len(), words.len());
            }
            bitmap
        })
        .collect();
    let sources: Vec<&DirtyBitmap> = devices.iter().collect();
    let mut group = DirtyBitmap::new(&layout, 4096).expect("fixed layout");
    let source_words: Vec<&[u64]> =
        devices.iter().flat_map(|d| (0..layout.len()).map(move |i| d.range_words(i))).collect();
    let input_bytes: u64 = source_words.iter().map(|w| w.len() as u64 * 8).sum();
    let mut copy_target = vec![0u64; devices[0].pages() as usize / 64];
    // Fault in every destination page before timing.
    copy_target.fill(1);
    group.merge_all(&sources).expect("same layout");

    let (merges, copies) = interleaved(
        pairs,
        || time(|| group.merge_all(black_box(&sources)).expect("same layout")),
        || {
            time(|| {
                let mut at = 0;
                for words in &source_words {
                    if at + words.len() > copy_target.len() {
                        at = 0;
                    }
                    copy_target[at..at + words.len()].copy_from_slice(words);
                    at += words.len();
                }
                black_box(&copy_target);
            })
        },
    );
    black_box(group.count());
    let mut pair_ratios: Vec<f64> =
        merges.iter().zip(&copies).map(|(m, c)| c.as_secs_f64() / m.as_secs_f64()).collect();
    let mut merge_rates: Vec<f64> = merges.iter().map(|d| gbps(input_bytes, *d)).collect();
    let mut copy_rates: Vec<f64> = copies.iter().map(|d| gbps(input_bytes, *d)).collect();
    let value = median(&mut merge_rates);
    let baseline = median(&mut copy_rates);
    let mut extra = serde_json::Map::new();
    extra.insert("input_bytes".into(), input_bytes.into());
    extra.insert("pairs".into(), pairs.into());
    extra.insert("pair_ratio_median".into(), median(&mut pair_ratios).into());
    extra.insert("baseline_name".into(), "memcpy of the same input bytes".into());
    BenchFigure {
        bench: "bitmap_merge_8x32MiB",
        value,
        unit: "GB/s",
        baseline,
        ratio: value / baseline,
        extra,
    }
}

/// `dirty_report_sparse`: from 8 devices' reports (0.1 % of pages dirty each) to the
/// exported dirty ranges and chunks of the group, against reading the same report bitmaps once.
pub fn dirty_report_sparse(pairs: usize) -> BenchFigure {
    let layout = guest_layout();
    let mut filler = Filler(0x9e37_79b9_7f4a_7c15);
    let pages: u64 = layout.iter().map(|r| r.length / 4096).sum();
    let dirty_per_device = pages / 1000;
    let devices: Vec<DirtyBitmap> = (0..DEVICES)
        .map(|_| {
            let mut bitmap = DirtyBitmap::new(&layout, 4096).expect("fixed layout");
            for _ in 0..dirty_per_device {
                let page = filler.next() % pages;
                let iova = if page < 2 * GIB / 4096 {
                    page * 4096
                } else {
                    4 * GIB + (page - 2 * GIB / 4096) * 4096
                };
                bitmap.mark(iova, 1);
            }
            bitmap
        })
        .collect();
    let sources: Vec<&DirtyBitmap> = devices.iter().collect();
    let source_words: Vec<&[u64]> =
        devices.iter().flat_map(|d| (0..layout.len()).map(move |i| d.range_words(i))).collect();
    let input_bytes: u64 = source_words.iter().map(|w| w.len() as u64 * 8).sum();
    let mut group = DirtyBitmap::new(&layout, 4096).expect("fixed layout");
    group.merge_all(&sources).expect("same layout");
    let mut exported = group.export();

    let (rounds, reads) = interleaved(
        pairs,
        || {
            group.clear();
            time(|| {
                group.merge_all(black_box(&sources)).expect("same layout");
                exported = group.export();
            })
        },
        || {
            time(|| {
                let mut acc = 0u64;
                for words in &source_words {
                    acc |= words.iter().fold(0, |a, w| a | w);
                }
                black_box(acc);
            })
        },
    );
    let mut pair_ratios: Vec<f64> =
        rounds.iter().zip(&reads).map(|(m, r)| r.as_secs_f64() / m.as_secs_f64()).collect();
    let mut round_ms: Vec<f64> = rounds.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    let mut read_ms: Vec<f64> = reads.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    let value = median(&mut round_ms);
    let baseline = median(&mut read_ms);
    let mut extra = serde_json::Map::new();
    extra.insert("input_bytes".into(), input_bytes.into());
    extra.insert("pairs".into(), pairs.into());
    extra.insert("dirty_pages".into(), exported.dirty_pages().into());
    extra.insert("exported_ranges".into(), exported.ranges.len().into());
    extra.insert("exported_chunks".into(), exported.chunks.len().into());
    extra.insert("pair_ratio_median".into(), median(&mut pair_ratios).into());
    extra.insert("baseline_name".into(), "one read of the same report bitmaps".into());
    BenchFigure { bench: "dirty_report_sparse", value, unit: "ms", baseline, ratio: baseline / value, extra }
}
