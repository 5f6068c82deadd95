//! The group's dirty bitmap: one bit per page over the tracked IOVA ranges.
//!
//! Layout, per range, is the kernel's real `DMA_LOGGING_REPORT` / iommufd layout: page
//! `n = (iova - range.iova) / page_size` is bit `n % 64` of word `n / 64` (the comment in
//! the uAPI header says otherwise and is wrong). Keeping the kernel's layout lets a device
//! report straight into the group's words ([`DirtyBitmap::report_in_place`]): the kernel
//! only ever sets bits, so reporting every device into the same words ORs them for free.
//! Where page sizes or range starts do not line up, a device reports into its own buffer
//! and [`DirtyBitmap::merge_report`] folds (finer device pages) or expands (coarser ones)
//! it into the group's pages.
//!
//! Sizes that matter: a 1 TiB guest at 4 KiB pages is 2^28 pages = 32 MiB of bitmap.
//! Every scan skips zero words in blocks, so a sparse round costs one read of the bitmap.

use std::fmt;

use crate::device::IovaRange;
use crate::dirty::ranges::{self, RangeError};

/// The default group granularity: the host page size.
pub const DEFAULT_PAGE_SIZE: u64 = 4096;

/// Refuses layouts whose bitmap would not fit in memory (16 GiB of bitmap = 512 TiB of
/// guest at 4 KiB pages); a bogus guest layout must fail, not abort on allocation.
pub const MAX_BITMAP_BYTES: u64 = 16 << 30;

/// Output words folded per pass in a merge: small enough that the destination block
/// stays in L1 while every source is ORed into it, so the destination is read and written
/// once however many sources there are.
const MERGE_BLOCK_WORDS: usize = 1024;

/// Below this many input bytes a second thread costs more than it saves.
const PARALLEL_MERGE_MIN_BYTES: usize = 8 << 20;

/// Export decides dense vs sparse per block of this many words (4 KiB of bitmap,
/// 32768 pages = 128 MiB of IOVA at 4 KiB).
const EXPORT_BLOCK_WORDS: usize = 512;

/// Bitmaps at least this large are exported by two threads.
const PARALLEL_EXPORT_MIN_BYTES: usize = 4 << 20;

/// Bytes one exported sparse range costs (iova + length).
const RANGE_EXPORT_BYTES: usize = 16;

/// Bytes a dense chunk costs on top of its words (iova + page count + word count).
const CHUNK_EXPORT_OVERHEAD: usize = 24;

/// Why a bitmap cannot be built or combined.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BitmapError {
    #[error(transparent)]
    Ranges(#[from] RangeError),
    #[error("a dirty bitmap of {bytes} bytes exceeds the {MAX_BITMAP_BYTES}-byte limit")]
    TooLarge { bytes: u64 },
    #[error("dirty bitmaps differ in layout (page size or ranges); they cannot be merged word by word")]
    LayoutMismatch,
    #[error("report page size {0:#x} is not a power of two")]
    BadReportPageSize(u64),
}

/// A dense stretch of the bitmap, exported as is: bit `n % 64` of `words[n / 64]` is
/// page `iova + n * page_size`, for `n < pages` (the kernel's layout).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmapChunk {
    pub iova: u64,
    pub pages: u64,
    pub words: Vec<u64>,
}

/// The dirty pages of a bitmap, block by block in whichever form is smaller: runs where
/// dirty pages are few or clustered, bitmap chunks where they are many and scattered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirtyExport {
    pub page_size: u64,
    /// Runs of dirty pages, sorted by IOVA, no two touching.
    pub ranges: Vec<IovaRange>,
    /// Dense chunks, sorted by IOVA; they never overlap `ranges`.
    pub chunks: Vec<DirtyBitmapChunk>,
}

impl DirtyExport {
    /// Number of dirty pages the export describes.
    pub fn dirty_pages(&self) -> u64 {
        let in_ranges: u64 = self.ranges.iter().map(|r| r.length / self.page_size).sum();
        in_ranges + self.chunks.iter().map(|c| count_ones(&c.words)).sum::<u64>()
    }

    /// The start address of every dirty page: those of `ranges` in order, then those of
    /// `chunks` in order.
    pub fn dirty_page_addresses(&self) -> impl Iterator<Item = u64> + '_ {
        let page_size = self.page_size;
        let from_ranges = self
            .ranges
            .iter()
            .flat_map(move |r| (0..r.length / page_size).map(move |n| r.iova + n * page_size));
        let from_chunks = self.chunks.iter().flat_map(move |chunk| {
            BitRuns::new(&chunk.words, chunk.pages)
                .flat_map(move |(start, end)| (start..end).map(move |n| chunk.iova + n * page_size))
        });
        from_ranges.chain(from_chunks)
    }

    /// Appends `later` (which covers higher IOVAs), joining a run cut at the seam.
    fn append(&mut self, later: DirtyExport) {
        let mut ranges = later.ranges.into_iter();
        if let (Some(last), Some(first)) = (self.ranges.last_mut(), ranges.as_slice().first())
            && last.end() == first.iova
        {
            last.length += first.length;
            ranges.next();
        }
        self.ranges.extend(ranges);
        self.chunks.extend(later.chunks);
    }

    fn push_run(&mut self, iova: u64, length: u64) {
        match self.ranges.last_mut() {
            Some(last) if last.end() == iova => last.length += length,
            _ => self.ranges.push(IovaRange { iova, length }),
        }
    }
}

/// A dirty bitmap over a set of IOVA ranges at one page size.
#[derive(Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    page_size: u64,
    page_shift: u32,
    /// Sorted, page-aligned, separated by at least one page ([`ranges::normalize`]).
    ranges: Vec<IovaRange>,
    /// Per range, `ceil(pages / 64)` words; bits past the range's last page stay zero.
    words: Vec<Vec<u64>>,
}

impl fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("page_size", &self.page_size)
            .field("ranges", &self.ranges)
            .field("dirty_pages", &self.count())
            .finish()
    }
}

impl DirtyBitmap {
    /// An all-clean bitmap over `ranges` (any order, overlapping or unaligned: they are
    /// aligned outward and merged) at `page_size` (a power of two ≥ 512).
    pub fn new(ranges: &[IovaRange], page_size: u64) -> Result<DirtyBitmap, BitmapError> {
        let ranges = ranges::normalize(ranges, page_size)?;
        let page_shift = page_size.trailing_zeros();
        let total_words: u64 = ranges.iter().map(|r| (r.length >> page_shift).div_ceil(64)).sum();
        let bytes = total_words.saturating_mul(8);
        if bytes > MAX_BITMAP_BYTES {
            return Err(BitmapError::TooLarge { bytes });
        }
        // `vec![0; n]` is a zeroed allocation: untouched pages of a huge, sparse bitmap
        // cost no memory.
        let words =
            ranges.iter().map(|r| vec![0u64; (r.length >> page_shift).div_ceil(64) as usize]).collect();
        Ok(DirtyBitmap { page_size, page_shift, ranges, words })
    }

    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// The tracked ranges: sorted, aligned, separated.
    pub fn ranges(&self) -> &[IovaRange] {
        &self.ranges
    }

    /// The words of range `index` (kernel layout).
    pub fn range_words(&self, index: usize) -> &[u64] {
        &self.words[index]
    }

    /// Total tracked pages.
    pub fn pages(&self) -> u64 {
        self.ranges.iter().map(|r| r.length >> self.page_shift).sum()
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| count_ones(w)).sum()
    }

    pub fn is_dirty(&self, iova: u64) -> bool {
        match self.range_index(iova) {
            Some(i) => {
                let page = (iova - self.ranges[i].iova) >> self.page_shift;
                self.words[i][(page / 64) as usize] & (1 << (page % 64)) != 0
            }
            None => false,
        }
    }

    /// Marks every page that `[iova, iova + length)` touches as dirty; parts outside the
    /// tracked ranges are ignored. Returns how many pages became dirty.
    pub fn mark(&mut self, iova: u64, length: u64) -> u64 {
        if length == 0 {
            return 0;
        }
        let end = iova.saturating_add(length);
        let mut newly_dirty = 0;
        let mut index = self.ranges.partition_point(|r| r.end() <= iova);
        while let Some(range) = self.ranges.get(index).copied() {
            if range.iova >= end {
                break;
            }
            let first = (iova.max(range.iova) - range.iova) >> self.page_shift;
            let last = (end.min(range.end()) - 1 - range.iova) >> self.page_shift;
            newly_dirty += set_bit_span(&mut self.words[index], first, last + 1);
            index += 1;
        }
        newly_dirty
    }

    /// Merges a report buffer produced for `[iova, iova + length)` at `page_size`: bit
    /// `n` says "something in `[iova + n * page_size, iova + (n + 1) * page_size)` was
    /// written" (clipped to the reported span). Every group page that span touches
    /// becomes dirty: a coarser report expands to all the group pages under each bit, a
    /// finer one folds (a group page is dirty if any finer page inside it is). When the
    /// page size is the group's and `iova` sits on the group's page grid, bits are ORed
    /// word by word instead. Returns how many group pages became dirty.
    pub fn merge_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
        words: &[u64],
    ) -> Result<u64, BitmapError> {
        if !page_size.is_power_of_two() {
            return Err(BitmapError::BadReportPageSize(page_size));
        }
        if length == 0 {
            return Ok(0);
        }
        let shift = page_size.trailing_zeros();
        let report_end = iova.saturating_add(length);
        let report_bits = (length.div_ceil(page_size)).min(words.len() as u64 * 64);
        if page_size == self.page_size && iova & (page_size - 1) == 0 {
            return Ok(self.or_aligned_report(iova, report_end, report_bits, words));
        }
        let mut newly_dirty = 0;
        for (first, end) in BitRuns::new(words, report_bits) {
            let start = iova.saturating_add(first << shift);
            let stop = iova.saturating_add(end << shift).min(report_end);
            newly_dirty += self.mark(start, stop - start);
        }
        Ok(newly_dirty)
    }

    /// Same page grid: each group range the report overlaps takes a bit-shifted OR of
    /// the matching span of report bits.
    fn or_aligned_report(&mut self, iova: u64, report_end: u64, report_bits: u64, words: &[u64]) -> u64 {
        let shift = self.page_shift;
        let bits_end = iova.saturating_add(report_bits << shift).min(report_end);
        let mut newly_dirty = 0;
        let mut index = self.ranges.partition_point(|r| r.end() <= iova);
        while let Some(range) = self.ranges.get(index).copied() {
            if range.iova >= bits_end {
                break;
            }
            let start = iova.max(range.iova);
            let stop = bits_end.min(range.end());
            let pages = (stop - start).div_ceil(self.page_size);
            let src_bit = (start - iova) >> shift;
            let dst_bit = (start - range.iova) >> shift;
            newly_dirty += or_bit_span(&mut self.words[index], dst_bit, words, src_bit, pages);
            index += 1;
        }
        newly_dirty
    }

    /// Lends the group's own words for a report of `[iova, iova + length)` at
    /// `page_size`, so the device writes its bits straight into the group bitmap
    /// (passing `&mut [u64]` of exactly `ceil(length / page_size / 64)` words to
    /// `dma_logging_report`). Possible when the page size is the group's and the span
    /// starts on a word boundary inside one range; otherwise `None` and `fill` is not
    /// called. Returns `fill`'s result and how many pages became dirty.
    pub fn report_in_place<R>(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
        fill: impl FnOnce(&mut [u64]) -> R,
    ) -> Option<(R, u64)> {
        if page_size != self.page_size || length == 0 {
            return None;
        }
        let index = self.range_index(iova)?;
        let range = self.ranges[index];
        if iova.checked_add(length)? > range.end() {
            return None;
        }
        let first_page = (iova - range.iova) >> self.page_shift;
        if !first_page.is_multiple_of(64) || (iova - range.iova) & (page_size - 1) != 0 {
            return None;
        }
        let pages = length.div_ceil(page_size);
        let first_word = (first_page / 64) as usize;
        let window = &mut self.words[index][first_word..first_word + pages.div_ceil(64) as usize];
        // Windows are at most a few MiB and stay in cache between the two counts.
        let before = count_ones(window);
        let result = fill(window);
        let range_pages = range.length >> self.page_shift;
        if first_page + pages == range_pages && !range_pages.is_multiple_of(64) {
            // Bits past the range's last page must stay clear whatever the device did.
            if let Some(last) = window.last_mut() {
                *last &= u64::MAX >> (64 - range_pages % 64);
            }
        }
        let after = count_ones(window);
        Some((result, after.saturating_sub(before)))
    }

    /// ORs `other` into this bitmap; both must have the same layout.
    pub fn merge_from(&mut self, other: &DirtyBitmap) -> Result<(), BitmapError> {
        self.merge_all(&[other])
    }

    /// ORs every bitmap of `others` into this one in a single pass over the destination
    /// (block by block, each block folded from every source while it sits in L1), on two
    /// threads for large inputs.
    pub fn merge_all(&mut self, others: &[&DirtyBitmap]) -> Result<(), BitmapError> {
        self.merge_all_with(others, PARALLEL_MERGE_MIN_BYTES)
    }

    fn merge_all_with(
        &mut self,
        others: &[&DirtyBitmap],
        parallel_min_bytes: usize,
    ) -> Result<(), BitmapError> {
        if others.iter().any(|o| o.page_size != self.page_size || o.ranges != self.ranges) {
            return Err(BitmapError::LayoutMismatch);
        }
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(2);
        for (index, dst) in self.words.iter_mut().enumerate() {
            let sources: Vec<&[u64]> = others.iter().map(|o| o.words[index].as_slice()).collect();
            let input_bytes = dst.len() * 8 * sources.len();
            if threads > 1 && input_bytes >= parallel_min_bytes && dst.len() >= 2 * MERGE_BLOCK_WORDS {
                let mid = dst.len() / 2 / MERGE_BLOCK_WORDS * MERGE_BLOCK_WORDS;
                let (low, high) = dst.split_at_mut(mid);
                let high_sources: Vec<&[u64]> = sources.iter().map(|s| &s[mid..]).collect();
                std::thread::scope(|scope| {
                    scope.spawn(|| or_sources_into(high, &high_sources));
                    or_sources_into(low, &sources);
                });
            } else {
                or_sources_into(dst, &sources);
            }
        }
        Ok(())
    }

    /// Returns the current dirty set and leaves this bitmap clean, for the next round.
    pub fn take_and_clear(&mut self) -> DirtyBitmap {
        let fresh = self.words.iter().map(|w| vec![0u64; w.len()]).collect();
        DirtyBitmap {
            page_size: self.page_size,
            page_shift: self.page_shift,
            ranges: self.ranges.clone(),
            words: std::mem::replace(&mut self.words, fresh),
        }
    }

    /// Clears every bit in place (no new allocation).
    pub fn clear(&mut self) {
        for words in &mut self.words {
            words.fill(0);
        }
    }

    /// The dirty pages as maximal runs, in IOVA order.
    pub fn dirty_ranges(&self) -> impl Iterator<Item = IovaRange> + '_ {
        self.ranges.iter().zip(&self.words).flat_map(move |(range, words)| {
            BitRuns::new(words, range.length >> self.page_shift).map(move |(first, end)| IovaRange {
                iova: range.iova + (first << self.page_shift),
                length: (end - first) << self.page_shift,
            })
        })
    }

    /// The dirty pages, block by block in whichever form is smaller (see
    /// [`DirtyExport`]). Clean blocks cost one read and produce nothing; large bitmaps
    /// are scanned by two threads.
    pub fn export(&self) -> DirtyExport {
        self.export_with(PARALLEL_EXPORT_MIN_BYTES)
    }

    fn export_with(&self, parallel_min_bytes: usize) -> DirtyExport {
        // (range index, block index) for every export block, in IOVA order.
        let blocks: Vec<(usize, usize)> = self
            .words
            .iter()
            .enumerate()
            .flat_map(|(range, words)| (0..words.len().div_ceil(EXPORT_BLOCK_WORDS)).map(move |b| (range, b)))
            .collect();
        let bytes: usize = self.words.iter().map(|w| w.len() * 8).sum();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(2);
        if threads < 2 || bytes < parallel_min_bytes || blocks.len() < 2 {
            return self.export_blocks(&blocks);
        }
        let (low, high) = blocks.split_at(blocks.len() / 2);
        let (mut first, second) = std::thread::scope(|scope| {
            let second = scope.spawn(|| self.export_blocks(high));
            let first = self.export_blocks(low);
            (first, second.join())
        });
        match second {
            Ok(second) => first.append(second),
            Err(panic) => std::panic::resume_unwind(panic),
        }
        first
    }

    fn export_blocks(&self, blocks: &[(usize, usize)]) -> DirtyExport {
        let shift = self.page_shift;
        let mut out = DirtyExport { page_size: self.page_size, ..DirtyExport::default() };
        for &(range_index, block_index) in blocks {
            let range = self.ranges[range_index];
            let words = &self.words[range_index];
            let first_word = block_index * EXPORT_BLOCK_WORDS;
            let block = &words[first_word..(first_word + EXPORT_BLOCK_WORDS).min(words.len())];
            let bit_before = if first_word == 0 { 0 } else { words[first_word - 1] >> 63 };
            let (any, runs) = block_runs(block, bit_before);
            if any == 0 {
                continue;
            }
            let lead = block.iter().take_while(|w| **w == 0).count();
            let trail = block.iter().rev().take_while(|w| **w == 0).count();
            let dense_words = block.len() - lead - trail;
            if runs as usize * RANGE_EXPORT_BYTES > dense_words * 8 + CHUNK_EXPORT_OVERHEAD {
                let chunk_first = (first_word + lead) as u64 * 64;
                let range_pages = range.length >> shift;
                out.chunks.push(DirtyBitmapChunk {
                    iova: range.iova + (chunk_first << shift),
                    pages: (range_pages - chunk_first).min(dense_words as u64 * 64),
                    words: block[lead..lead + dense_words].to_vec(),
                });
                continue;
            }
            // Bits past the range's last page are always clear: no limit to check.
            for (offset, &word) in block.iter().enumerate().skip(lead).take(dense_words) {
                let mut word = word;
                let word_page = (first_word + offset) as u64 * 64;
                while word != 0 {
                    let zeros = word.trailing_zeros();
                    // The top `zeros` bits of the shifted complement are ones, so this is at
                    // most 64 - zeros.
                    let ones = (!(word >> zeros)).trailing_zeros();
                    out.push_run(
                        range.iova + ((word_page + u64::from(zeros)) << shift),
                        u64::from(ones) << shift,
                    );
                    if zeros + ones == 64 {
                        break;
                    }
                    word &= u64::MAX << (zeros + ones);
                }
            }
        }
        out
    }

    fn range_index(&self, iova: u64) -> Option<usize> {
        let index = self.ranges.partition_point(|r| r.end() <= iova);
        self.ranges.get(index).filter(|r| r.iova <= iova).map(|_| index)
    }
}

fn count_ones(words: &[u64]) -> u64 {
    words.iter().map(|w| u64::from(w.count_ones())).sum()
}

/// `(OR of every word, number of runs of set bits starting in words)`; `bit_before` is
/// the bit just before `words[0]`. Each word looks at its predecessor's top bit rather
/// than a carried flag, so the loop vectorizes.
fn block_runs(words: &[u64], bit_before: u64) -> (u64, u64) {
    let Some(&first) = words.first() else { return (0, 0) };
    let mut any = first;
    let mut runs = u64::from((first & !((first << 1) | bit_before)).count_ones());
    for (&word, &previous) in words[1..].iter().zip(words) {
        any |= word;
        runs += u64::from((word & !((word << 1) | (previous >> 63))).count_ones());
    }
    (any, runs)
}

/// Sets bits `[start, end)`; returns how many were clear before.
fn set_bit_span(words: &mut [u64], start: u64, end: u64) -> u64 {
    debug_assert!(start < end);
    let first_word = (start / 64) as usize;
    let last_word = ((end - 1) / 64) as usize;
    let head = u64::MAX << (start % 64);
    let tail = u64::MAX >> (63 - (end - 1) % 64);
    let set = |word: &mut u64, mask: u64| {
        let newly = u64::from((mask & !*word).count_ones());
        *word |= mask;
        newly
    };
    if first_word == last_word {
        return set(&mut words[first_word], head & tail);
    }
    let mut newly = set(&mut words[first_word], head);
    for word in &mut words[first_word + 1..last_word] {
        newly += u64::from(word.count_zeros());
        *word = u64::MAX;
    }
    newly + set(&mut words[last_word], tail)
}

/// Reads up to 64 bits of `words` starting at bit `bit` (bits past the end read as 0).
fn read_bits(words: &[u64], bit: u64) -> u64 {
    let index = (bit / 64) as usize;
    let offset = bit % 64;
    let low = words.get(index).copied().unwrap_or(0) >> offset;
    if offset == 0 { low } else { low | words.get(index + 1).copied().unwrap_or(0) << (64 - offset) }
}

/// ORs `count` bits of `src` starting at `src_bit` into `dst` starting at `dst_bit`;
/// returns how many destination bits became set.
fn or_bit_span(dst: &mut [u64], dst_bit: u64, src: &[u64], src_bit: u64, count: u64) -> u64 {
    let mut newly = 0;
    if dst_bit.is_multiple_of(64) && src_bit.is_multiple_of(64) {
        let (d0, s0) = ((dst_bit / 64) as usize, (src_bit / 64) as usize);
        let whole = (count / 64) as usize;
        let available = src.len().saturating_sub(s0).min(whole);
        for (d, s) in dst[d0..d0 + available].iter_mut().zip(&src[s0..s0 + available]) {
            if *s != 0 {
                newly += u64::from((*s & !*d).count_ones());
                *d |= *s;
            }
        }
        let rest = count % 64;
        if rest != 0 && available == whole {
            let bits = read_bits(src, src_bit + whole as u64 * 64) & (u64::MAX >> (64 - rest));
            let d = &mut dst[d0 + whole];
            newly += u64::from((bits & !*d).count_ones());
            *d |= bits;
        }
        return newly;
    }
    let mut done = 0;
    while done < count {
        let take = (count - done).min(64);
        let mut bits = read_bits(src, src_bit + done);
        if take < 64 {
            bits &= u64::MAX >> (64 - take);
        }
        if bits != 0 {
            let at = dst_bit + done;
            let (index, offset) = ((at / 64) as usize, at % 64);
            let low = bits << offset;
            newly += u64::from((low & !dst[index]).count_ones());
            dst[index] |= low;
            if offset != 0 {
                let high = bits >> (64 - offset);
                if high != 0 {
                    newly += u64::from((high & !dst[index + 1]).count_ones());
                    dst[index + 1] |= high;
                }
            }
        }
        done += take;
    }
    newly
}

/// ORs every source into `dst` (all at least `dst.len()` long), block by block, four
/// sources per pass so that each destination word is loaded and stored once per four
/// sources.
fn or_sources_into(dst: &mut [u64], sources: &[&[u64]]) {
    for (block_index, block) in dst.chunks_mut(MERGE_BLOCK_WORDS).enumerate() {
        let offset = block_index * MERGE_BLOCK_WORDS;
        let mut rest = sources;
        loop {
            match rest {
                [a, b, c, d, tail @ ..] => {
                    or4(block, &a[offset..], &b[offset..], &c[offset..], &d[offset..]);
                    rest = tail;
                }
                [a, b, tail @ ..] => {
                    or2(block, &a[offset..], &b[offset..]);
                    rest = tail;
                }
                [a] => {
                    or1(block, &a[offset..]);
                    break;
                }
                [] => break,
            }
        }
    }
}

fn or1(dst: &mut [u64], a: &[u64]) {
    let a = &a[..dst.len()];
    for (d, a) in dst.iter_mut().zip(a) {
        *d |= a;
    }
}

fn or2(dst: &mut [u64], a: &[u64], b: &[u64]) {
    let n = dst.len();
    let (a, b) = (&a[..n], &b[..n]);
    for i in 0..n {
        dst[i] |= a[i] | b[i];
    }
}

fn or4(dst: &mut [u64], a: &[u64], b: &[u64], c: &[u64], d: &[u64]) {
    let n = dst.len();
    let (a, b, c, d) = (&a[..n], &b[..n], &c[..n], &d[..n]);
    for i in 0..n {
        dst[i] |= a[i] | b[i] | c[i] | d[i];
    }
}

/// Runs of set bits `(first, end)` among the first `limit` bits of `words`; long stretches
/// of zero words are skipped eight at a time.
pub(crate) struct BitRuns<'a> {
    words: &'a [u64],
    limit: u64,
    index: usize,
    /// The unconsumed bits of `words[index]`.
    current: u64,
}

impl<'a> BitRuns<'a> {
    pub(crate) fn new(words: &'a [u64], limit: u64) -> BitRuns<'a> {
        let limit = limit.min(words.len() as u64 * 64);
        BitRuns { words, limit, index: 0, current: words.first().copied().unwrap_or(0) }
    }
}

impl Iterator for BitRuns<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        while self.current == 0 {
            self.index += 1;
            self.current = *self.words.get(self.index)?;
            if self.current == 0 {
                while self.index + 8 < self.words.len()
                    && self.words[self.index + 1..self.index + 9].iter().fold(0, |a, w| a | w) == 0
                {
                    self.index += 8;
                }
            }
        }
        let zeros = self.current.trailing_zeros();
        let start = self.index as u64 * 64 + u64::from(zeros);
        if start >= self.limit {
            self.current = 0;
            self.index = self.words.len();
            return None;
        }
        let ones = (self.current >> zeros).trailing_ones();
        let end = if zeros + ones < 64 {
            self.current &= u64::MAX << (zeros + ones);
            self.index as u64 * 64 + u64::from(zeros + ones)
        } else {
            // The run reaches the top of this word: follow it through full words.
            loop {
                self.index += 1;
                let Some(&word) = self.words.get(self.index) else {
                    self.current = 0;
                    break self.index as u64 * 64;
                };
                let ones = word.trailing_ones();
                if ones < 64 {
                    self.current = word & (u64::MAX << ones);
                    break self.index as u64 * 64 + u64::from(ones);
                }
            }
        };
        Some((start, end.min(self.limit)))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use proptest::prelude::*;

    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;

    fn r(iova: u64, length: u64) -> IovaRange {
        IovaRange { iova, length }
    }

    #[test]
    fn layout_is_the_kernels_not_the_headers() {
        // Base 0x10000, 4 KiB pages: page 65 is word 1, bit 1. The header's formula would
        // have picked word 65 and bit (addr % 64).
        let mut bitmap = DirtyBitmap::new(&[r(0x10000, 256 * 4096)], 4096).unwrap();
        assert_eq!(bitmap.mark(0x10000 + 65 * 4096 + 7, 1), 1);
        assert_eq!(bitmap.range_words(0), &[0, 0b10, 0, 0]);
        assert!(bitmap.is_dirty(0x10000 + 65 * 4096));
        assert!(!bitmap.is_dirty(0x10000 + 64 * 4096));

        // A kernel report buffer for the same base: bit 0 of word 3 = page 192.
        let mut from_report = DirtyBitmap::new(&[r(0x10000, 256 * 4096)], 4096).unwrap();
        assert_eq!(from_report.merge_report(0x10000, 256 * 4096, 4096, &[0, 0, 0, 1]).unwrap(), 1);
        assert!(from_report.is_dirty(0x10000 + 192 * 4096));
        assert_eq!(from_report.range_words(0), &[0, 0, 0, 1]);
    }

    #[test]
    fn marks_span_words_and_ranges() {
        let mut bitmap = DirtyBitmap::new(&[r(0, 200 * 4096), r(300 * 4096, 10 * 4096)], 4096).unwrap();
        // Pages 60..=130 of the first range and nothing of the hole.
        assert_eq!(bitmap.mark(60 * 4096 + 1, 70 * 4096), 71);
        assert_eq!(bitmap.range_words(0), &[0xf << 60, u64::MAX, 0b111, 0]);
        // Spanning the hole into the second range: pages 199, then 300..=301.
        assert_eq!(bitmap.mark(199 * 4096, 103 * 4096 - 1), 3);
        assert_eq!(bitmap.range_words(1), &[0b11]);
        // Re-marking sets nothing new.
        assert_eq!(bitmap.mark(60 * 4096, 4096), 0);
        assert_eq!(bitmap.count(), 74);
        // Outside every range: ignored.
        assert_eq!(bitmap.mark(250 * 4096, 4096), 0);
        assert_eq!(bitmap.mark(u64::MAX - 10, 100), 0);
    }

    #[test]
    fn coarse_reports_expand_and_fine_reports_fold() {
        let mut bitmap = DirtyBitmap::new(&[r(0, 4 * MIB)], 16 * KIB).unwrap();
        // A 2 MiB-page report whose bit 1 covers [2 MiB, 4 MiB): 128 group pages.
        assert_eq!(bitmap.merge_report(0, 4 * MIB, 2 * MIB, &[0b10]).unwrap(), 128);
        assert_eq!(bitmap.dirty_ranges().collect::<Vec<_>>(), vec![r(2 * MIB, 2 * MIB)]);

        let mut bitmap = DirtyBitmap::new(&[r(0, 4 * MIB)], 16 * KIB).unwrap();
        // 4 KiB pages 3 and 4 straddle group pages 0 and 1; page 9 is in group page 2.
        assert_eq!(bitmap.merge_report(0, 4 * MIB, 4096, &[(1 << 3) | (1 << 4) | (1 << 9)]).unwrap(), 3);
        assert_eq!(bitmap.range_words(0)[0], 0b111);
    }

    #[test]
    fn unaligned_report_base_covers_both_group_pages_under_a_bit() {
        let mut bitmap = DirtyBitmap::new(&[r(0, MIB)], 4096).unwrap();
        // 8 KiB report pages starting at 4 KiB: bit 0 covers group pages 1 and 2.
        assert_eq!(bitmap.merge_report(4096, 64 * KIB, 8192, &[1]).unwrap(), 2);
        assert_eq!(bitmap.range_words(0)[0], 0b110);
        // Clipped to the reported length: a last bit past the span sets only what is in it.
        let mut bitmap = DirtyBitmap::new(&[r(0, MIB)], 4096).unwrap();
        assert_eq!(bitmap.merge_report(0, 12 * KIB, 8192, &[0b10]).unwrap(), 1);
        assert_eq!(bitmap.range_words(0)[0], 0b100);
    }

    #[test]
    fn report_in_place_lends_exactly_the_window_words() {
        let mut bitmap = DirtyBitmap::new(&[r(0x100000, 100 * 4096)], 4096).unwrap();
        let (len, newly) = bitmap
            .report_in_place(0x100000 + 64 * 4096, 36 * 4096, 4096, |words| {
                words[0] |= 1 | (1 << 40); // bit 40 is past the range's last page
                words.len()
            })
            .unwrap();
        assert_eq!(len, 1);
        assert_eq!(newly, 1);
        assert!(bitmap.is_dirty(0x100000 + 64 * 4096));
        assert_eq!(bitmap.range_words(0), &[0, 1]);
        // Not on a word boundary, another page size, or crossing the range end: refused.
        assert!(bitmap.report_in_place(0x100000 + 4096, 4096, 4096, |_| ()).is_none());
        assert!(bitmap.report_in_place(0x100000 + 32 * 4096, 4096, 4096, |_| ()).is_none());
        assert!(bitmap.report_in_place(0x100000, 8192, 8192, |_| ()).is_none());
        assert!(bitmap.report_in_place(0x100000, 101 * 4096, 4096, |_| ()).is_none());
        assert!(bitmap.report_in_place(0, 4096, 4096, |_| ()).is_none());
    }

    #[test]
    fn merge_take_count_and_clear() {
        let ranges = [r(0, MIB), r(4 * MIB, MIB)];
        let mut a = DirtyBitmap::new(&ranges, 4096).unwrap();
        let mut b = DirtyBitmap::new(&ranges, 4096).unwrap();
        a.mark(0, 4096);
        b.mark(0, 8192);
        b.mark(4 * MIB + 4096, 1);
        a.merge_from(&b).unwrap();
        assert_eq!(a.count(), 3);
        let taken = a.take_and_clear();
        assert_eq!(taken.count(), 3);
        assert_eq!(a.count(), 0);
        assert_eq!(a.ranges(), taken.ranges());
        b.clear();
        assert_eq!(b.count(), 0);
        let other_layout = DirtyBitmap::new(&[r(0, MIB)], 4096).unwrap();
        assert_eq!(a.merge_from(&other_layout), Err(BitmapError::LayoutMismatch));
        let other_page = DirtyBitmap::new(&ranges, 8192).unwrap();
        assert_eq!(a.merge_from(&other_page), Err(BitmapError::LayoutMismatch));
    }

    #[test]
    fn parallel_merge_equals_serial_merge() {
        let ranges = [r(0, 64 * MIB * 64), r(1 << 40, 3 * MIB)];
        let mut sources = Vec::new();
        let mut seed = 0x9e3779b97f4a7c15u64;
        for _ in 0..7 {
            let mut bitmap = DirtyBitmap::new(&ranges, 4096).unwrap();
            for _ in 0..2000 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let page = seed % bitmap.pages();
                let iova = if page < (1 << 20) { page * 4096 } else { (1 << 40) + (page % 768) * 4096 };
                bitmap.mark(iova, 1 + seed % 20_000);
            }
            sources.push(bitmap);
        }
        let refs: Vec<&DirtyBitmap> = sources.iter().collect();
        let mut serial = DirtyBitmap::new(&ranges, 4096).unwrap();
        serial.merge_all_with(&refs, usize::MAX).unwrap();
        let mut parallel = DirtyBitmap::new(&ranges, 4096).unwrap();
        parallel.merge_all_with(&refs, 0).unwrap();
        assert_eq!(serial, parallel);
        let mut one_by_one = DirtyBitmap::new(&ranges, 4096).unwrap();
        for source in &sources {
            for range in source.dirty_ranges() {
                one_by_one.mark(range.iova, range.length);
            }
        }
        assert_eq!(serial, one_by_one);
        assert!(serial.count() > 0);
    }

    #[test]
    fn export_picks_runs_or_chunks_by_density() {
        let mut bitmap = DirtyBitmap::new(&[r(0, 1 << 30)], 4096).unwrap();
        // Sparse block: two runs.
        bitmap.mark(0, 3 * 4096);
        bitmap.mark(100 * 4096, 4096);
        // Dense block (every other page of 4 KiB of bitmap = 32768 pages, at block 3).
        let dense_first = 3 * 32768u64;
        for n in (0..32768).step_by(2) {
            bitmap.mark((dense_first + n) * 4096, 1);
        }
        // A run crossing the boundary of blocks 5 and 6 comes out as one range.
        bitmap.mark((6 * 32768 - 2) * 4096, 4 * 4096);
        let export = bitmap.export();
        assert_eq!(export.dirty_pages(), bitmap.count());
        assert_eq!(
            export.ranges,
            vec![r(0, 3 * 4096), r(100 * 4096, 4096), r((6 * 32768 - 2) * 4096, 4 * 4096)]
        );
        assert_eq!(export.chunks.len(), 1);
        assert_eq!(export.chunks[0].iova, dense_first * 4096);
        assert_eq!(export.chunks[0].pages, 32768);
        assert!(export.chunks[0].words.iter().all(|w| *w == 0x5555_5555_5555_5555));
        // Split between two threads at any block, the export is the same.
        assert_eq!(bitmap.export_with(0), export);
        let addresses: BTreeSet<u64> = export.dirty_page_addresses().collect();
        let expected: BTreeSet<u64> =
            bitmap.dirty_ranges().flat_map(|r| (r.iova..r.end()).step_by(4096)).collect();
        assert_eq!(addresses, expected);
    }

    #[test]
    fn refuses_absurd_layouts() {
        assert_eq!(
            DirtyBitmap::new(&[r(0, 1 << 62)], 4096).unwrap_err(),
            BitmapError::TooLarge { bytes: (1 << 50) / 8 }
        );
        assert!(matches!(DirtyBitmap::new(&[], 4096), Err(BitmapError::Ranges(RangeError::Empty))));
        assert!(matches!(
            DirtyBitmap::new(&[r(0, 4096)], 1000),
            Err(BitmapError::Ranges(RangeError::BadPageSize(1000)))
        ));
    }

    /// Group pages (absolute page numbers) that `[start, end)` touches inside `ranges`.
    fn model_pages(ranges: &[IovaRange], page_size: u64, start: u64, end: u64, into: &mut BTreeSet<u64>) {
        for range in ranges {
            let (s, e) = (start.max(range.iova), end.min(range.end()));
            if s < e {
                into.extend(s / page_size..e.div_ceil(page_size));
            }
        }
    }

    fn bitmap_pages(bitmap: &DirtyBitmap) -> BTreeSet<u64> {
        bitmap
            .dirty_ranges()
            .flat_map(|r| r.iova / bitmap.page_size()..r.end() / bitmap.page_size())
            .collect()
    }

    fn arb_layout() -> impl Strategy<Value = (Vec<IovaRange>, u64)> {
        (
            prop::collection::vec((0u64..(32 * MIB), 1u64..(4 * MIB)).prop_map(|(i, l)| r(i, l)), 1..6),
            prop::sample::select(vec![4096u64, 16 * KIB]),
        )
    }

    proptest! {
        #[test]
        fn merged_reports_equal_the_page_model(
            (ranges, group_page) in arb_layout(),
            reports in prop::collection::vec(
                (
                    0u64..(36 * MIB),
                    1u64..(6 * MIB),
                    prop::sample::select(vec![4096u64, 8192, 64 * KIB, 2 * MIB]),
                    prop::collection::vec(any::<u64>().prop_map(|w| w & w.rotate_left(17)), 0..40),
                ),
                1..5,
            ),
        ) {
            let mut bitmap = DirtyBitmap::new(&ranges, group_page).unwrap();
            let tracked = bitmap.ranges().to_vec();
            let mut model = BTreeSet::new();
            for (iova, length, page_size, words) in reports {
                let mut expected_new = model.clone();
                for n in 0..(length.div_ceil(page_size)).min(words.len() as u64 * 64) {
                    if words[(n / 64) as usize] >> (n % 64) & 1 == 1 {
                        let start = iova + n * page_size;
                        let end = (start + page_size).min(iova + length);
                        model_pages(&tracked, group_page, start, end, &mut expected_new);
                    }
                }
                let newly = bitmap.merge_report(iova, length, page_size, &words).unwrap();
                prop_assert_eq!(newly, (expected_new.len() - model.len()) as u64);
                model = expected_new;
                prop_assert_eq!(&bitmap_pages(&bitmap), &model);
            }
            prop_assert_eq!(bitmap.count(), model.len() as u64);
            let export = bitmap.export_with(usize::MAX);
            prop_assert_eq!(&bitmap.export_with(0), &export);
            let exported: BTreeSet<u64> = export.dirty_page_addresses().map(|a| a / group_page).collect();
            prop_assert_eq!(exported, model);
        }

        #[test]
        fn marks_equal_the_page_model(
            (ranges, group_page) in arb_layout(),
            writes in prop::collection::vec((0u64..(40 * MIB), 1u64..(300 * KIB)), 0..30),
        ) {
            let mut bitmap = DirtyBitmap::new(&ranges, group_page).unwrap();
            let tracked = bitmap.ranges().to_vec();
            let mut model = BTreeSet::new();
            for (iova, length) in writes {
                bitmap.mark(iova, length);
                model_pages(&tracked, group_page, iova, iova + length, &mut model);
            }
            prop_assert_eq!(bitmap_pages(&bitmap), model);
        }

        #[test]
        fn bit_runs_find_every_set_bit(words in prop::collection::vec(any::<u64>().prop_map(|w| w & (w >> 3)), 0..30), limit in 0u64..2000) {
            let mut from_runs = Vec::new();
            let mut previous_end = None;
            for (start, end) in BitRuns::new(&words, limit) {
                prop_assert!(start < end);
                // Maximal: a run never starts where the previous one ended.
                prop_assert!(previous_end.is_none_or(|e| e < start));
                previous_end = Some(end);
                from_runs.extend(start..end);
            }
            let expected: Vec<u64> = (0..limit.min(words.len() as u64 * 64))
                .filter(|n| words[(n / 64) as usize] >> (n % 64) & 1 == 1)
                .collect();
            prop_assert_eq!(from_runs, expected);
        }
    }
}
