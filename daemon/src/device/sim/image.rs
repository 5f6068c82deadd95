//! The simulated device's state: `state_size` bytes in 4 KiB pages, every byte a pure
//! function of `(seed, page, version)`.
//!
//! The state changes one page at a time: dirty event `k` (counted from 0) rewrites the
//! page [`dirtied_page`]`(seed, k)` and gives it version `k + 1`. The whole state is
//! therefore determined by `(seed, generation)`, where the generation is the number of
//! events so far; a device keeps only one version number per page and generates bytes
//! when they are needed, so no side ever holds a whole state in memory.

use std::fmt;

/// Granularity of the device state (not related to IOMMU or logging pages).
pub const STATE_PAGE: u64 = 4096;

/// What a simulated device's state is: these three numbers determine every byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StateId {
    pub seed: u64,
    /// Number of dirty events applied since the power-on state of `seed`.
    pub generation: u64,
    /// Bytes of state.
    pub size: u64,
}

impl fmt::Display for StateId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seed {:#x} generation {} size {}", self.seed, self.generation, self.size)
    }
}

/// A state and a digest over its bytes, in order: what tests compare between a source
/// and a destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StateDigest {
    pub id: StateId,
    /// CRC-32C of the `size` state bytes.
    pub crc32c: u32,
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// splitmix64's finaliser: a cheap bijective mix with good avalanche.
pub(crate) const fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

pub(crate) fn page_count(size: u64) -> u64 {
    size.div_ceil(STATE_PAGE)
}

/// Bytes of page `page` in a state of `size` bytes (the last page may be short).
pub(crate) fn page_len(size: u64, page: u64) -> usize {
    let start = page * STATE_PAGE;
    (size.saturating_sub(start)).min(STATE_PAGE) as usize
}

/// Fills `out` with the bytes of `page` at `version` (`out.len()` is the page's length).
/// A wyrand stream keyed by `(seed, page, version)`: one multiply per 8 bytes, so the
/// generator keeps up with the data path.
pub(crate) fn fill_page(seed: u64, page: u64, version: u64, out: &mut [u8]) {
    let mut state = mix(seed ^ mix(page.wrapping_mul(GOLDEN) ^ mix(version ^ 0x005E_ED0F_DA7A)));
    let mut next = || {
        state = state.wrapping_add(0xA076_1D64_78BD_642F);
        let product = u128::from(state) * u128::from(state ^ 0xE703_7ED1_A0B4_28DB);
        (product >> 64) as u64 ^ product as u64
    };
    let mut words = out.chunks_exact_mut(8);
    for word in &mut words {
        word.copy_from_slice(&next().to_le_bytes());
    }
    let tail = words.into_remainder();
    if !tail.is_empty() {
        let n = tail.len();
        tail.copy_from_slice(&next().to_le_bytes()[..n]);
    }
}

/// The page dirty event `event` rewrites (`pages` > 0).
pub(crate) fn dirtied_page(seed: u64, event: u64, pages: u64) -> u64 {
    mix(seed ^ 0xD1B5_4A32_D192_ED03 ^ mix(event)) % pages
}

/// A device's state as bookkeeping: one version per page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Image {
    pub seed: u64,
    pub generation: u64,
    pub size: u64,
    pub versions: Vec<u64>,
}

impl Image {
    pub fn power_on(seed: u64, size: u64) -> Image {
        Image { seed, generation: 0, size, versions: vec![0; page_count(size) as usize] }
    }

    /// The state `(seed, generation)`, by replaying every dirty event.
    pub fn replay(seed: u64, size: u64, generation: u64) -> Image {
        let mut image = Image::power_on(seed, size);
        if image.versions.is_empty() {
            // A state without pages cannot change; only generation 0 exists.
            image.generation = generation;
            return image;
        }
        for _ in 0..generation {
            image.dirty_one();
        }
        image
    }

    pub fn id(&self) -> StateId {
        StateId { seed: self.seed, generation: self.generation, size: self.size }
    }

    /// Applies the next dirty event; returns the page it rewrote (None without pages).
    pub fn dirty_one(&mut self) -> Option<u64> {
        let pages = self.versions.len() as u64;
        if pages == 0 {
            return None;
        }
        let page = dirtied_page(self.seed, self.generation, pages);
        self.generation += 1;
        self.versions[page as usize] = self.generation;
        Some(page)
    }

    /// CRC-32C over every byte, generated page by page.
    pub fn digest(&self) -> StateDigest {
        let mut page = vec![0u8; STATE_PAGE as usize];
        let mut crc = 0u32;
        for (index, &version) in self.versions.iter().enumerate() {
            let len = page_len(self.size, index as u64);
            fill_page(self.seed, index as u64, version, &mut page[..len]);
            crc = crc32c::crc32c_append(crc, &page[..len]);
        }
        StateDigest { id: self.id(), crc32c: crc }
    }
}

/// The digest of the state `id`, computed from scratch: what a device holding that state
/// must report.
pub fn digest_of(id: StateId) -> StateDigest {
    Image::replay(id.seed, id.size, id.generation).digest()
}

/// Pages changed since the last time they were queued for a PRE_COPY stream.
#[derive(Clone, Debug, Default)]
pub(crate) struct DirtyPages {
    words: Vec<u64>,
    count: u64,
}

impl DirtyPages {
    pub fn new(pages: u64) -> DirtyPages {
        DirtyPages { words: vec![0; pages.div_ceil(64) as usize], count: 0 }
    }

    pub fn insert(&mut self, page: u64) {
        let (word, bit) = ((page / 64) as usize, page % 64);
        if self.words[word] & (1 << bit) == 0 {
            self.words[word] |= 1 << bit;
            self.count += 1;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn clear(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
        self.count = 0;
    }

    /// Runs of consecutive dirty pages, each at most `max_run` long, in page order.
    pub fn runs(&self, max_run: u32) -> Vec<(u64, u32)> {
        let mut runs: Vec<(u64, u32)> = Vec::new();
        for (w, &word) in self.words.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let page = w as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                match runs.last_mut() {
                    Some((first, count)) if *first + u64::from(*count) == page && *count < max_run => {
                        *count += 1
                    }
                    _ => runs.push((page, 1)),
                }
            }
        }
        runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_depend_on_seed_page_and_version_only() {
        let mut a = vec![0u8; 4096];
        let mut b = vec![0u8; 4096];
        fill_page(1, 7, 3, &mut a);
        fill_page(1, 7, 3, &mut b);
        assert_eq!(a, b);
        fill_page(1, 7, 4, &mut b);
        assert_ne!(a, b);
        fill_page(2, 7, 3, &mut b);
        assert_ne!(a, b);
        fill_page(1, 8, 3, &mut b);
        assert_ne!(a, b);
        // A short last page is the prefix of the full page.
        let mut short = vec![0u8; 11];
        fill_page(1, 7, 3, &mut short);
        assert_eq!(&short[..], &a[..11]);
    }

    #[test]
    fn replay_reproduces_live_dirtying() {
        let mut live = Image::power_on(42, 10 * STATE_PAGE + 5);
        for _ in 0..100 {
            live.dirty_one();
        }
        assert_eq!(live, Image::replay(42, 10 * STATE_PAGE + 5, 100));
        assert_eq!(live.digest(), digest_of(live.id()));
        assert_ne!(live.digest().crc32c, Image::power_on(42, live.size).digest().crc32c);
    }

    #[test]
    fn empty_state_has_no_pages_and_a_fixed_digest() {
        let image = Image::power_on(9, 0);
        assert!(image.versions.is_empty());
        assert_eq!(image.digest().crc32c, 0);
    }

    #[test]
    fn dirty_runs_are_consecutive_and_capped() {
        let mut dirty = DirtyPages::new(1000);
        for page in [3, 4, 5, 9, 63, 64, 65, 999] {
            dirty.insert(page);
        }
        dirty.insert(4);
        assert_eq!(dirty.runs(256), vec![(3, 3), (9, 1), (63, 3), (999, 1)]);
        assert_eq!(dirty.runs(2), vec![(3, 2), (5, 1), (9, 1), (63, 2), (65, 1), (999, 1)]);
        dirty.clear();
        assert!(dirty.is_empty());
        assert!(dirty.runs(256).is_empty());
    }
}
