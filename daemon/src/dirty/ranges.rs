//! Planning the IOVA ranges handed to `DMA_LOGGING_START`.
//!
//! The guest's IOVA layout arrives in any order, possibly overlapping, touching and
//! unaligned. The kernel wants at most `LOG_MAX_RANGES` non-overlapping ranges, each
//! aligned to the requested page size (E2BIG beyond the count, EINVAL for overlap or
//! misalignment). Planning aligns outward, merges what touches, then — when there are
//! still too many — merges the two neighbours with the smallest gap, one pair at a time,
//! exactly like the kernel's `vfio_combine_iova_ranges()` (the leftmost pair wins a tie).
//! The merged ranges track the holes between them too; holes are not DMA-mapped, so they
//! never come back dirty, they only cost bitmap space.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::device::IovaRange;

/// `LOG_MAX_RANGES` on a kernel with 4 KiB pages (`PAGE_SIZE / 16`); 64 KiB-page kernels
/// accept 4096, but 256 is what every x86-64 host accepts.
pub const KERNEL_MAX_RANGES: usize = 256;

/// Smallest granularity the pure cores accept. DMA logging itself needs ≥ 4096; iommufd
/// dirty bitmaps go lower.
pub const MIN_PAGE_SIZE: u64 = 512;

/// Smallest page size `DMA_LOGGING_START` / `DMA_LOGGING_REPORT` accept.
pub const MIN_LOGGING_PAGE_SIZE: u64 = 4096;

/// Why a set of IOVA ranges cannot be planned.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("no IOVA ranges to track")]
    Empty,
    #[error("IOVA range #{index} at {iova:#x} has zero length")]
    ZeroLength { index: usize, iova: u64 },
    #[error(
        "IOVA range #{index} at {iova:#x} of {length:#x} bytes runs past the end of the 64-bit IOVA space"
    )]
    Overflow { index: usize, iova: u64, length: u64 },
    #[error("page size {0:#x} is not a power of two of at least {MIN_PAGE_SIZE} bytes")]
    BadPageSize(u64),
    #[error("a plan needs room for at least one range")]
    NoRangesAllowed,
}

/// Checks a tracking granularity: a power of two of at least [`MIN_PAGE_SIZE`].
pub fn check_page_size(page_size: u64) -> Result<(), RangeError> {
    if page_size.is_power_of_two() && page_size >= MIN_PAGE_SIZE {
        Ok(())
    } else {
        Err(RangeError::BadPageSize(page_size))
    }
}

/// The exact tracked area: `input` aligned outward to `page_size`, sorted, with
/// overlapping and touching ranges merged (consecutive results are separated by at least
/// one page). No limit on the count.
pub fn normalize(input: &[IovaRange], page_size: u64) -> Result<Vec<IovaRange>, RangeError> {
    check_page_size(page_size)?;
    if input.is_empty() {
        return Err(RangeError::Empty);
    }
    let mask = page_size - 1;
    // (start, end) pairs; `end` is exclusive and fits in u64 (checked below).
    let mut spans = Vec::with_capacity(input.len());
    for (index, range) in input.iter().enumerate() {
        if range.length == 0 {
            return Err(RangeError::ZeroLength { index, iova: range.iova });
        }
        let overflow = RangeError::Overflow { index, iova: range.iova, length: range.length };
        let end = range.iova.checked_add(range.length).ok_or(overflow.clone())?;
        let end = end.checked_add(mask).ok_or(overflow)? & !mask;
        spans.push((range.iova & !mask, end));
    }
    spans.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(spans.len());
    for (start, end) in spans {
        match merged.last_mut() {
            Some((_, last_end)) if start <= *last_end => *last_end = (*last_end).max(end),
            _ => merged.push((start, end)),
        }
    }
    Ok(merged.into_iter().map(|(iova, end)| IovaRange { iova, length: end - iova }).collect())
}

/// The `DMA_LOGGING_START` ranges for `input`: [`normalize`]d, then reduced to at most
/// `max_ranges` by merging smallest gaps first.
pub fn plan_logging_ranges(
    input: &[IovaRange],
    page_size: u64,
    max_ranges: usize,
) -> Result<Vec<IovaRange>, RangeError> {
    if max_ranges == 0 {
        return Err(RangeError::NoRangesAllowed);
    }
    Ok(coalesce(normalize(input, page_size)?, max_ranges))
}

/// Merges neighbours of sorted, disjoint `ranges` until at most `max_ranges` remain,
/// always the pair with the smallest gap (leftmost on ties), as the kernel does when a
/// device accepts fewer ranges than it was given. O(n log n): a heap of gaps with lazy
/// deletion instead of the kernel's rescan per merge.
pub fn coalesce(ranges: Vec<IovaRange>, max_ranges: usize) -> Vec<IovaRange> {
    let max_ranges = max_ranges.max(1);
    let count = ranges.len();
    if count <= max_ranges {
        return ranges;
    }
    if max_ranges == 1 {
        let start = ranges[0].iova;
        let end = ranges[count - 1].end();
        return vec![IovaRange { iova: start, length: end - start }];
    }
    let mut end: Vec<u64> = ranges.iter().map(IovaRange::end).collect();
    // next[i] == count means "no right neighbour".
    let mut next: Vec<usize> = (1..=count).collect();
    let mut alive = vec![true; count];
    let mut gaps: BinaryHeap<Reverse<(u64, usize, usize)>> =
        (0..count - 1).map(|i| Reverse((ranges[i + 1].iova - end[i], i, i + 1))).collect();
    let mut remaining = count;
    while remaining > max_ranges {
        let Some(Reverse((_, left, right))) = gaps.pop() else { break };
        // A stale entry: one side was absorbed since it was pushed. A left range's end
        // only changes when it absorbs its right neighbour, so a live `next` link means
        // the recorded gap is still exact.
        if !alive[left] || !alive[right] || next[left] != right {
            continue;
        }
        end[left] = end[right];
        alive[right] = false;
        next[left] = next[right];
        let after = next[right];
        if after < count {
            gaps.push(Reverse((ranges[after].iova - end[left], left, after)));
        }
        remaining -= 1;
    }
    ranges
        .iter()
        .zip(end)
        .zip(alive)
        .filter(|(_, alive)| *alive)
        .map(|((range, end), _)| IovaRange { iova: range.iova, length: end - range.iova })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;
    const GIB: u64 = 1024 * MIB;

    fn r(iova: u64, length: u64) -> IovaRange {
        IovaRange { iova, length }
    }

    #[test]
    fn plans_table() {
        /// (what, input, page size, max ranges, expected plan)
        type Case = (&'static str, Vec<IovaRange>, u64, usize, Vec<IovaRange>);
        let table: &[Case] = &[
            ("single aligned range is kept", vec![r(0, 2 * GIB)], 4096, 256, vec![r(0, 2 * GIB)]),
            (
                "unaligned range is aligned outward",
                vec![r(0x1001, 0x2000)],
                4096,
                256,
                vec![r(0x1000, 0x3000)],
            ),
            (
                "touching ranges merge, order does not matter",
                vec![r(0x3000, 0x1000), r(0x1000, 0x2000)],
                4096,
                256,
                vec![r(0x1000, 0x3000)],
            ),
            (
                "ranges touching only after alignment merge",
                vec![r(0x1000, 0x800), r(0x1900, 0x100)],
                4096,
                256,
                vec![r(0x1000, 0x1000)],
            ),
            (
                "overlap and containment merge",
                vec![r(0x10000, 0x8000), r(0x12000, 0x1000), r(0x17000, 0x4000)],
                4096,
                256,
                vec![r(0x10000, 0xb000)],
            ),
            (
                "QEMU layout: low RAM, high RAM, 64-bit PCI hole",
                vec![r(4 * GIB, 60 * GIB), r(0, 2 * GIB), r(1 << 45, 256 * GIB)],
                4096,
                256,
                vec![r(0, 2 * GIB), r(4 * GIB, 60 * GIB), r(1 << 45, 256 * GIB)],
            ),
            (
                "over the limit: the smallest gap is merged first",
                vec![r(0, 0x1000), r(0x10000, 0x1000), r(0x12000, 0x1000)],
                4096,
                2,
                vec![r(0, 0x1000), r(0x10000, 0x3000)],
            ),
            (
                "equal gaps: the leftmost pair is merged first",
                vec![r(0, 0x1000), r(0x2000, 0x1000), r(0x4000, 0x1000)],
                4096,
                2,
                vec![r(0, 0x3000), r(0x4000, 0x1000)],
            ),
            (
                "one range allowed: the span of everything",
                vec![r(0x5000, 0x1000), r(0, 0x1000), r(1 << 40, 0x1000)],
                4096,
                1,
                vec![r(0, (1 << 40) + 0x1000)],
            ),
            (
                "64 KiB pages",
                vec![r(0x11000, 0x1000), r(0x31000, 0x1000)],
                64 * KIB,
                256,
                vec![r(0x10000, 0x10000), r(0x30000, 0x10000)],
            ),
            (
                "range ending at the last aligned page below 2^64",
                vec![r(u64::MAX - 0x2fff, 0x2000)],
                4096,
                256,
                vec![r(u64::MAX - 0x2fff, 0x2000)],
            ),
        ];
        for (what, input, page_size, max, want) in table {
            let got = plan_logging_ranges(input, *page_size, *max).unwrap();
            assert_eq!(&got, want, "{what}");
        }
    }

    #[test]
    fn rejects_table() {
        let table: &[(&str, Vec<IovaRange>, u64, usize, RangeError)] = &[
            ("no ranges", vec![], 4096, 256, RangeError::Empty),
            (
                "zero length",
                vec![r(0, 0x1000), r(0x5000, 0)],
                4096,
                256,
                RangeError::ZeroLength { index: 1, iova: 0x5000 },
            ),
            (
                "end overflows",
                vec![r(u64::MAX - 10, 100)],
                4096,
                256,
                RangeError::Overflow { index: 0, iova: u64::MAX - 10, length: 100 },
            ),
            (
                "end overflows only once aligned up",
                vec![r(u64::MAX - 0xfff, 0x10)],
                4096,
                256,
                RangeError::Overflow { index: 0, iova: u64::MAX - 0xfff, length: 0x10 },
            ),
            ("page size not a power of two", vec![r(0, 0x1000)], 3000, 256, RangeError::BadPageSize(3000)),
            ("page size too small", vec![r(0, 0x1000)], 256, 256, RangeError::BadPageSize(256)),
            ("no range allowed", vec![r(0, 0x1000)], 4096, 0, RangeError::NoRangesAllowed),
        ];
        for (what, input, page_size, max, want) in table {
            assert_eq!(&plan_logging_ranges(input, *page_size, *max).unwrap_err(), want, "{what}");
        }
    }

    #[test]
    fn thousands_of_ranges_fit_the_kernel_limit() {
        // Every 4th page mapped, 10_000 ranges: the plan must fit LOG_MAX_RANGES.
        let input: Vec<IovaRange> = (0..10_000u64).map(|i| r(i * 0x4000, 0x1000)).collect();
        let plan = plan_logging_ranges(&input, 4096, KERNEL_MAX_RANGES).unwrap();
        assert_eq!(plan.len(), KERNEL_MAX_RANGES);
        assert_eq!(plan[0].iova, 0);
        assert_eq!(plan.last().unwrap().end(), 9_999 * 0x4000 + 0x1000);
    }

    /// The kernel's `vfio_combine_iova_ranges()`, literally: rescan for the smallest gap
    /// (strictly smaller wins, so the leftmost on ties), merge that pair, repeat.
    fn kernel_combine(mut ranges: Vec<IovaRange>, max: usize) -> Vec<IovaRange> {
        if max == 1 && !ranges.is_empty() {
            let end = ranges.last().unwrap().end();
            return vec![r(ranges[0].iova, end - ranges[0].iova)];
        }
        while ranges.len() > max {
            let mut best = 0;
            let mut min_gap = u64::MAX;
            for i in 1..ranges.len() {
                let gap = ranges[i].iova - ranges[i - 1].end();
                if gap < min_gap {
                    min_gap = gap;
                    best = i - 1;
                }
            }
            let right = ranges.remove(best + 1);
            ranges[best].length = right.end() - ranges[best].iova;
        }
        ranges
    }

    fn arb_ranges() -> impl Strategy<Value = Vec<IovaRange>> {
        // Small address space and sizes so that overlaps, touches and tiny gaps are common.
        prop::collection::vec(
            (0u64..(1 << 24), 1u64..(1 << 18)).prop_map(|(iova, length)| r(iova, length)),
            1..40,
        )
    }

    fn arb_page_size() -> impl Strategy<Value = u64> {
        prop::sample::select(vec![512u64, 4096, 8192, 64 * KIB, 2 * MIB])
    }

    proptest! {
        #[test]
        fn plan_is_sorted_disjoint_aligned_covering_and_bounded(
            input in arb_ranges(),
            page_size in arb_page_size(),
            max in 1usize..12,
        ) {
            let plan = plan_logging_ranges(&input, page_size, max).unwrap();
            prop_assert!(!plan.is_empty());
            prop_assert!(plan.len() <= max);
            for range in &plan {
                prop_assert!(range.length > 0);
                prop_assert_eq!(range.iova % page_size, 0);
                prop_assert_eq!(range.length % page_size, 0);
            }
            for pair in plan.windows(2) {
                // Strictly separated: touching ranges would have been merged.
                prop_assert!(pair[0].end() < pair[1].iova, "{:?}", pair);
            }
            for range in &input {
                prop_assert!(
                    plan.iter().any(|p| p.iova <= range.iova && range.end() <= p.end()),
                    "{:?} not covered by {:?}", range, plan
                );
            }
        }

        #[test]
        fn normalize_tracks_exactly_the_aligned_input(input in arb_ranges(), page_size in arb_page_size()) {
            let plan = normalize(&input, page_size).unwrap();
            let pages_of = |ranges: &[IovaRange]| {
                let mut pages = std::collections::BTreeSet::new();
                for range in ranges {
                    for page in range.iova / page_size..range.end().div_ceil(page_size) {
                        pages.insert(page);
                    }
                }
                pages
            };
            prop_assert_eq!(pages_of(&plan), pages_of(&input));
        }

        #[test]
        fn coalescing_matches_the_kernel(input in arb_ranges(), max in 1usize..12) {
            let normalized = normalize(&input, 4096).unwrap();
            prop_assert_eq!(coalesce(normalized.clone(), max), kernel_combine(normalized, max));
        }
    }
}
