//! The simulator's migration stream, version 1. All integers little-endian.
//!
//! ```text
//! header   magic "VFSIMST\0" | version u32 = 1 | header_len u32 | state_size u64 | seed u64
//!          | generation u64 (at session start) | page_size u32 = 4096 | model_len u32
//!          | model bytes | crc32c u32 of everything before it
//! PAGES    tag u32 "PAGE" | count u32 (1..=256) | first_page u64 | crc32c u32 of the 16
//!          bytes before it and the versions | reserved u32 | versions [count] u64
//!          | payload: the bytes of pages first_page.. at those versions (last page short)
//! END      tag u32 "END!" | reserved u32 | generation u64 (final) | records u64 (PAGES
//!          records before it) | stream_bytes u64 (offset of END) | crc32c u32 of every
//!          stream byte before this field | reserved u32
//! ```
//!
//! A STOP→STOP_COPY stream is the header, the whole image in records of 256 pages and END.
//! A PRE_COPY stream starts the same way (header + image = the initial bytes), adds a
//! record for every page dirtied while it runs, and ends with END when the device reaches
//! STOP_COPY: records are applied in order, so the concatenation reconstructs the final
//! state. A destination checks the header against its own model and size, every payload
//! byte against the generator, END's digest over the whole stream, and finally that the
//! page versions it received are exactly the state `(seed, generation)` (nothing missing,
//! nothing stale). It keeps one version per page and one page of scratch.

use super::image::{Image, STATE_PAGE, fill_page, page_count, page_len};

pub(crate) const MAGIC: [u8; 8] = *b"VFSIMST\0";
pub(crate) const VERSION: u32 = 1;
const HEADER_FIXED: usize = 48;
const TAG_PAGES: u32 = u32::from_le_bytes(*b"PAGE");
const TAG_END: u32 = u32::from_le_bytes(*b"END!");
const PAGES_HEAD: usize = 24;
pub(crate) const END_LEN: u64 = 40;
/// Pages per record (1 MiB of payload).
pub(crate) const MAX_RUN: u32 = 256;
pub(crate) const MAX_MODEL_LEN: usize = 255;

/// Why a destination rejects a stream. The first five make the write that completes the
/// header fail with EFAULT (as hisi and mtty do); bytes after END make the write fail
/// with ENOMEM (more than the device's image); the rest are found by the device's own
/// checks and make RESUMING→STOP fail with EINVAL.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error("not a simulator stream (bad magic)")]
    BadMagic,
    #[error("unsupported stream version {0}")]
    UnsupportedVersion(u32),
    #[error("corrupt stream header")]
    HeaderCorrupt,
    #[error("incompatible model: stream of {found:?}, device is {expected:?}")]
    ModelMismatch { expected: String, found: String },
    #[error("incompatible state size: stream carries {found} bytes, device holds {expected}")]
    SizeMismatch { expected: u64, found: u64 },
    #[error("corrupt record at stream offset {offset}")]
    RecordCorrupt { offset: u64 },
    #[error("page data differs from the source's at page {page} (stream offset {offset})")]
    ContentMismatch { page: u64, offset: u64 },
    #[error("bytes after the END record at stream offset {offset}")]
    TrailingBytes { offset: u64 },
    #[error("END record does not match the stream ({what})")]
    EndMismatch { what: &'static str },
    #[error("received pages are not the state at generation {generation} ({missing} missing, {stale} stale)")]
    StateMismatch { generation: u64, missing: u64, stale: u64 },
}

impl StreamError {
    /// The errno a write carrying the offending bytes fails with, when the driver
    /// checks it on write; `None` when it is only found at RESUMING→STOP.
    pub fn write_errno(&self) -> Option<nix::errno::Errno> {
        use nix::errno::Errno;
        match self {
            StreamError::BadMagic
            | StreamError::UnsupportedVersion(_)
            | StreamError::HeaderCorrupt
            | StreamError::ModelMismatch { .. }
            | StreamError::SizeMismatch { .. } => Some(Errno::EFAULT),
            StreamError::TrailingBytes { .. } => Some(Errno::ENOMEM),
            _ => None,
        }
    }
}

/// What a destination device accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Compat {
    pub model: String,
    pub size: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct StreamHeader {
    pub size: u64,
    pub seed: u64,
    pub generation: u64,
    pub model: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct EndRecord {
    pub generation: u64,
    pub records: u64,
    pub stream_bytes: u64,
    pub crc32c: u32,
}

pub(crate) fn header_len(model: &str) -> u64 {
    (HEADER_FIXED + model.len() + 4) as u64
}

pub(crate) fn encode_header(header: &StreamHeader) -> Vec<u8> {
    let mut out = Vec::with_capacity(header_len(&header.model) as usize);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(header_len(&header.model) as u32).to_le_bytes());
    out.extend_from_slice(&header.size.to_le_bytes());
    out.extend_from_slice(&header.seed.to_le_bytes());
    out.extend_from_slice(&header.generation.to_le_bytes());
    out.extend_from_slice(&(STATE_PAGE as u32).to_le_bytes());
    out.extend_from_slice(&(header.model.len() as u32).to_le_bytes());
    out.extend_from_slice(header.model.as_bytes());
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Length of a PAGES record for `count` pages from `first` in a state of `size` bytes.
pub(crate) fn pages_record_len(size: u64, first: u64, count: u32) -> u64 {
    let end = ((first + u64::from(count)) * STATE_PAGE).min(size);
    PAGES_HEAD as u64 + 8 * u64::from(count) + (end - first * STATE_PAGE)
}

/// Records of the whole image: `(first_page, count)` chunks of [`MAX_RUN`] pages.
pub(crate) fn image_chunk(size: u64, chunk: u64) -> (u64, u32) {
    let first = chunk * u64::from(MAX_RUN);
    (first, (page_count(size) - first).min(u64::from(MAX_RUN)) as u32)
}

pub(crate) fn image_chunks(size: u64) -> u64 {
    page_count(size).div_ceil(u64::from(MAX_RUN))
}

pub(crate) fn image_len(size: u64) -> u64 {
    (0..image_chunks(size))
        .map(|c| {
            let (first, count) = image_chunk(size, c);
            pages_record_len(size, first, count)
        })
        .sum()
}

/// Exact length of a STOP→STOP_COPY stream (what MIG_DATA_SIZE reports).
pub(crate) fn full_stream_len(model: &str, size: u64) -> u64 {
    header_len(model) + image_len(size) + END_LEN
}

/// Appends a PAGES record (header, versions and generated payload) to `out`.
pub(crate) fn encode_pages(seed: u64, size: u64, first: u64, versions: &[u64], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&TAG_PAGES.to_le_bytes());
    out.extend_from_slice(&(versions.len() as u32).to_le_bytes());
    out.extend_from_slice(&first.to_le_bytes());
    let mut crc = crc32c::crc32c(&out[start..]);
    let versions_at = out.len() + 8;
    out.extend_from_slice(&[0; 8]);
    for v in versions {
        out.extend_from_slice(&v.to_le_bytes());
    }
    crc = crc32c::crc32c_append(crc, &out[versions_at..]);
    out[start + 16..start + 20].copy_from_slice(&crc.to_le_bytes());
    for (i, &version) in versions.iter().enumerate() {
        let page = first + i as u64;
        let len = page_len(size, page);
        let at = out.len();
        out.resize(at + len, 0);
        fill_page(seed, page, version, &mut out[at..]);
    }
}

/// The END record; `crc_before` is the CRC-32C of every stream byte before it.
pub(crate) fn encode_end(generation: u64, records: u64, stream_bytes: u64, crc_before: u32) -> [u8; 40] {
    let mut out = [0u8; 40];
    out[0..4].copy_from_slice(&TAG_END.to_le_bytes());
    out[8..16].copy_from_slice(&generation.to_le_bytes());
    out[16..24].copy_from_slice(&records.to_le_bytes());
    out[24..32].copy_from_slice(&stream_bytes.to_le_bytes());
    let crc = crc32c::crc32c_append(crc_before, &out[..32]);
    out[32..36].copy_from_slice(&crc.to_le_bytes());
    out
}

/// What the framer finds, in stream order.
pub(crate) trait FrameSink {
    fn header(&mut self, _header: &StreamHeader) -> Result<(), StreamError> {
        Ok(())
    }
    fn pages(&mut self, _first: u64, _versions: &[u64], _offset: u64) -> Result<(), StreamError> {
        Ok(())
    }
    fn payload(&mut self, _bytes: &[u8], _offset: u64) -> Result<(), StreamError> {
        Ok(())
    }
    fn end(&mut self, _end: &EndRecord) -> Result<(), StreamError> {
        Ok(())
    }
}

/// A sink that only wants the framing checks.
pub(crate) struct FramingOnly;
impl FrameSink for FramingOnly {}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    HeaderFixed,
    HeaderRest { total: usize },
    Tag,
    PagesHead,
    Versions { first: u64, count: u32 },
    Payload { left: u64 },
    End,
    Done,
}

/// Incremental decoder of the framing: feeds any split of the stream, finds every
/// structural error at the byte that reveals it. Pure, no I/O.
#[derive(Clone, Debug)]
pub(crate) struct Framer {
    compat: Compat,
    pages: u64,
    phase: Phase,
    scratch: Vec<u8>,
    pos: u64,
    record_start: u64,
    records: u64,
    digest: Option<u32>,
    digest_until: u64,
    error: Option<StreamError>,
}

impl Framer {
    /// `digest`: also check END's CRC over the whole stream (the device's loader does;
    /// the write path only needs the framing).
    pub fn new(compat: Compat, digest: bool) -> Framer {
        let pages = page_count(compat.size);
        Framer {
            compat,
            pages,
            phase: Phase::HeaderFixed,
            scratch: Vec::with_capacity(HEADER_FIXED + MAX_MODEL_LEN + 4),
            pos: 0,
            record_start: 0,
            records: 0,
            digest: digest.then_some(0),
            digest_until: u64::MAX,
            error: None,
        }
    }

    #[cfg(test)]
    pub fn ended(&self) -> bool {
        self.phase == Phase::Done
    }

    pub fn feed(&mut self, mut bytes: &[u8], sink: &mut impl FrameSink) -> Result<(), StreamError> {
        if let Some(err) = &self.error {
            return Err(err.clone());
        }
        while !bytes.is_empty() {
            let used = match self.step(bytes, sink) {
                Ok(used) => used,
                Err(err) => {
                    self.error = Some(err.clone());
                    return Err(err);
                }
            };
            if let Some(crc) = self.digest.as_mut() {
                let covered = (self.digest_until.saturating_sub(self.pos)).min(used as u64) as usize;
                *crc = crc32c::crc32c_append(*crc, &bytes[..covered]);
            }
            // `step` may finish a record and advance the digest limit only after the
            // digest of these bytes, so the limit always refers to bytes not yet counted.
            self.pos += used as u64;
            bytes = &bytes[used..];
            self.after_step(sink).inspect_err(|err| self.error = Some(err.clone()))?;
        }
        Ok(())
    }

    /// Takes bytes into the current phase; returns how many it consumed.
    fn step(&mut self, bytes: &[u8], sink: &mut impl FrameSink) -> Result<usize, StreamError> {
        match self.phase {
            Phase::Payload { left } => {
                let n = (left.min(bytes.len() as u64)) as usize;
                sink.payload(&bytes[..n], self.pos)?;
                self.phase = Phase::Payload { left: left - n as u64 };
                Ok(n)
            }
            Phase::Done => Err(StreamError::TrailingBytes { offset: self.pos }),
            _ => {
                let want = self.phase_len() - self.scratch.len();
                let n = want.min(bytes.len());
                self.scratch.extend_from_slice(&bytes[..n]);
                if self.phase == Phase::Tag && self.scratch.len() == 4 && self.tag()? == TAG_END {
                    // The digest covers END's first 32 bytes and stops at its CRC field.
                    self.digest_until = self.record_start + 32;
                }
                Ok(n)
            }
        }
    }

    fn phase_len(&self) -> usize {
        match self.phase {
            Phase::HeaderFixed => HEADER_FIXED,
            Phase::HeaderRest { total } => total,
            Phase::Tag => 4,
            Phase::PagesHead => PAGES_HEAD,
            Phase::Versions { count, .. } => PAGES_HEAD + 8 * count as usize,
            Phase::End => END_LEN as usize,
            Phase::Payload { .. } | Phase::Done => 0,
        }
    }

    fn tag(&self) -> Result<u32, StreamError> {
        let tag = u32::from_le_bytes(self.scratch[0..4].try_into().expect("4 bytes"));
        match tag {
            TAG_PAGES | TAG_END => Ok(tag),
            _ => Err(StreamError::RecordCorrupt { offset: self.record_start }),
        }
    }

    fn after_step(&mut self, sink: &mut impl FrameSink) -> Result<(), StreamError> {
        if let Phase::Payload { left: 0 } = self.phase {
            self.next_record();
            return Ok(());
        }
        if matches!(self.phase, Phase::Payload { .. } | Phase::Done) || self.scratch.len() < self.phase_len()
        {
            return Ok(());
        }
        match self.phase.clone() {
            Phase::HeaderFixed => {
                let s = &self.scratch;
                if s[0..8] != MAGIC {
                    return Err(StreamError::BadMagic);
                }
                let version = le32(s, 8);
                if version != VERSION {
                    return Err(StreamError::UnsupportedVersion(version));
                }
                let total = le32(s, 12) as usize;
                let model_len = le32(s, 44) as usize;
                if model_len > MAX_MODEL_LEN || total != HEADER_FIXED + model_len + 4 {
                    return Err(StreamError::HeaderCorrupt);
                }
                self.phase = Phase::HeaderRest { total };
            }
            Phase::HeaderRest { total } => {
                let s = &self.scratch;
                if crc32c::crc32c(&s[..total - 4]) != le32(s, total - 4) || le32(s, 40) as u64 != STATE_PAGE {
                    return Err(StreamError::HeaderCorrupt);
                }
                let model = String::from_utf8(s[HEADER_FIXED..total - 4].to_vec())
                    .map_err(|_| StreamError::HeaderCorrupt)?;
                let header =
                    StreamHeader { size: le64(s, 16), seed: le64(s, 24), generation: le64(s, 32), model };
                if header.model != self.compat.model {
                    return Err(StreamError::ModelMismatch {
                        expected: self.compat.model.clone(),
                        found: header.model,
                    });
                }
                if header.size != self.compat.size {
                    return Err(StreamError::SizeMismatch { expected: self.compat.size, found: header.size });
                }
                sink.header(&header)?;
                self.next_record();
            }
            Phase::Tag => {
                self.phase = if self.tag()? == TAG_END { Phase::End } else { Phase::PagesHead };
            }
            Phase::PagesHead => {
                let s = &self.scratch;
                let count = le32(s, 4);
                let first = le64(s, 8);
                let fits = first.checked_add(u64::from(count)).is_some_and(|end| end <= self.pages);
                if count == 0 || count > MAX_RUN || !fits || le32(s, 20) != 0 {
                    return Err(StreamError::RecordCorrupt { offset: self.record_start });
                }
                self.phase = Phase::Versions { first, count };
            }
            Phase::Versions { first, count } => {
                let s = &self.scratch;
                let crc = crc32c::crc32c_append(crc32c::crc32c(&s[..16]), &s[PAGES_HEAD..]);
                if crc != le32(s, 16) {
                    return Err(StreamError::RecordCorrupt { offset: self.record_start });
                }
                let versions: Vec<u64> = s[PAGES_HEAD..].chunks_exact(8).map(|c| le64(c, 0)).collect();
                sink.pages(first, &versions, self.record_start)?;
                self.records += 1;
                let end = ((first + u64::from(count)) * STATE_PAGE).min(self.compat.size);
                self.phase = Phase::Payload { left: end - first * STATE_PAGE };
                self.scratch.clear();
                if let Phase::Payload { left: 0 } = self.phase {
                    self.next_record();
                }
            }
            Phase::End => {
                let s = &self.scratch;
                let end = EndRecord {
                    generation: le64(s, 8),
                    records: le64(s, 16),
                    stream_bytes: le64(s, 24),
                    crc32c: le32(s, 32),
                };
                if le32(s, 4) != 0 || le32(s, 36) != 0 {
                    return Err(StreamError::RecordCorrupt { offset: self.record_start });
                }
                if end.stream_bytes != self.record_start {
                    return Err(StreamError::EndMismatch { what: "stream length" });
                }
                if end.records != self.records {
                    return Err(StreamError::EndMismatch { what: "record count" });
                }
                if self.digest.is_some_and(|crc| crc != end.crc32c) {
                    return Err(StreamError::EndMismatch { what: "stream digest" });
                }
                sink.end(&end)?;
                self.phase = Phase::Done;
            }
            Phase::Payload { .. } | Phase::Done => unreachable!("handled above"),
        }
        Ok(())
    }

    fn next_record(&mut self) {
        self.scratch.clear();
        self.record_start = self.pos;
        self.phase = Phase::Tag;
    }
}

fn le32(s: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(s[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(s: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(s[at..at + 8].try_into().expect("8 bytes"))
}

/// The destination's checks on top of the framing: every payload byte against the
/// generator, and at END the received versions against the state `(seed, generation)`.
#[derive(Debug)]
pub(crate) struct Loader {
    size: u64,
    seed: u64,
    /// `u64::MAX` for a page not received yet.
    versions: Vec<u64>,
    record_versions: Vec<u64>,
    record_first: u64,
    /// Position inside the current record's payload.
    page_index: usize,
    page_offset: usize,
    expected: Vec<u8>,
    loaded: Option<Image>,
}

const UNSET: u64 = u64::MAX;

impl Loader {
    pub fn new(size: u64) -> Loader {
        Loader {
            size,
            seed: 0,
            versions: vec![UNSET; page_count(size) as usize],
            record_versions: Vec::new(),
            record_first: 0,
            page_index: 0,
            page_offset: 0,
            expected: vec![0; STATE_PAGE as usize],
            loaded: None,
        }
    }

    /// The verified state, once END was accepted.
    pub fn take_loaded(&mut self) -> Option<Image> {
        self.loaded.take()
    }

    fn prepare_page(&mut self) {
        let page = self.record_first + self.page_index as u64;
        let len = page_len(self.size, page);
        fill_page(self.seed, page, self.record_versions[self.page_index], &mut self.expected[..len]);
    }
}

impl FrameSink for Loader {
    fn header(&mut self, header: &StreamHeader) -> Result<(), StreamError> {
        self.seed = header.seed;
        Ok(())
    }

    fn pages(&mut self, first: u64, versions: &[u64], _offset: u64) -> Result<(), StreamError> {
        self.record_first = first;
        self.record_versions.clear();
        self.record_versions.extend_from_slice(versions);
        self.page_index = 0;
        self.page_offset = 0;
        for (i, &v) in versions.iter().enumerate() {
            self.versions[(first + i as u64) as usize] = v;
        }
        self.prepare_page();
        Ok(())
    }

    fn payload(&mut self, mut bytes: &[u8], mut offset: u64) -> Result<(), StreamError> {
        while !bytes.is_empty() {
            let page = self.record_first + self.page_index as u64;
            let len = page_len(self.size, page);
            let n = (len - self.page_offset).min(bytes.len());
            if bytes[..n] != self.expected[self.page_offset..self.page_offset + n] {
                return Err(StreamError::ContentMismatch { page, offset });
            }
            bytes = &bytes[n..];
            offset += n as u64;
            self.page_offset += n;
            if self.page_offset == len && self.page_index + 1 < self.record_versions.len() {
                self.page_index += 1;
                self.page_offset = 0;
                self.prepare_page();
            }
        }
        Ok(())
    }

    fn end(&mut self, end: &EndRecord) -> Result<(), StreamError> {
        let expected = Image::replay(self.seed, self.size, end.generation);
        let missing = self.versions.iter().filter(|&&v| v == UNSET).count() as u64;
        let stale = self
            .versions
            .iter()
            .zip(&expected.versions)
            .filter(|(got, want)| **got != UNSET && got != want)
            .count() as u64;
        if missing != 0 || stale != 0 {
            return Err(StreamError::StateMismatch { generation: end.generation, missing, stale });
        }
        self.loaded = Some(expected);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compat(size: u64) -> Compat {
        Compat { model: "m1".into(), size }
    }

    /// A complete STOP_COPY stream of `image`, built the way the saving session does.
    pub(crate) fn full_stream(image: &Image, model: &str) -> Vec<u8> {
        let mut out = encode_header(&StreamHeader {
            size: image.size,
            seed: image.seed,
            generation: image.generation,
            model: model.into(),
        });
        for chunk in 0..image_chunks(image.size) {
            let (first, count) = image_chunk(image.size, chunk);
            let versions = &image.versions[first as usize..(first + u64::from(count)) as usize];
            encode_pages(image.seed, image.size, first, versions, &mut out);
        }
        let crc = crc32c::crc32c(&out);
        let end = encode_end(image.generation, image_chunks(image.size), out.len() as u64, crc);
        out.extend_from_slice(&end);
        out
    }

    fn load(bytes: &[u8], size: u64, split: usize) -> Result<Image, StreamError> {
        let mut framer = Framer::new(compat(size), true);
        let mut loader = Loader::new(size);
        for piece in bytes.chunks(split.max(1)) {
            framer.feed(piece, &mut loader)?;
        }
        loader.take_loaded().ok_or(StreamError::EndMismatch { what: "missing END (test)" })
    }

    #[test]
    fn stream_length_matches_the_formula() {
        for size in [0, 1, 4095, 4096, 4097, 256 * 4096, 256 * 4096 + 1, 3 << 20] {
            let image = Image::power_on(5, size);
            assert_eq!(full_stream(&image, "m1").len() as u64, full_stream_len("m1", size), "size {size}");
        }
    }

    #[test]
    fn round_trip_at_every_split() {
        let mut image = Image::power_on(77, 3 * 4096 + 10);
        for _ in 0..5 {
            image.dirty_one();
        }
        let bytes = full_stream(&image, "m1");
        for split in [1, 2, 3, 7, 24, 4096, bytes.len()] {
            assert_eq!(load(&bytes, image.size, split).unwrap(), image, "split {split}");
        }
    }

    #[test]
    fn every_single_byte_corruption_is_caught() {
        let image = Image::power_on(3, 2 * 4096 + 100);
        let bytes = full_stream(&image, "m1");
        for at in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x40;
            assert!(load(&bad, image.size, 977).is_err(), "flip at {at} not caught");
        }
    }

    #[test]
    fn truncation_and_trailing_bytes_are_caught() {
        let image = Image::power_on(3, 5000);
        let bytes = full_stream(&image, "m1");
        for cut in 0..bytes.len() {
            let mut framer = Framer::new(compat(image.size), true);
            let mut loader = Loader::new(image.size);
            framer.feed(&bytes[..cut], &mut loader).unwrap();
            assert!(!framer.ended());
            assert!(loader.take_loaded().is_none());
        }
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(
            load(&long, image.size, 4096),
            Err(StreamError::TrailingBytes { offset: bytes.len() as u64 })
        );
    }

    #[test]
    fn header_checks_map_to_efault() {
        let image = Image::power_on(3, 10);
        let bytes = full_stream(&image, "other");
        let err = load(&bytes, 10, 1000).unwrap_err();
        assert!(matches!(err, StreamError::ModelMismatch { .. }), "{err}");
        assert_eq!(err.write_errno(), Some(nix::errno::Errno::EFAULT));
        let err = load(&full_stream(&image, "m1"), 11, 1000).unwrap_err();
        assert!(matches!(err, StreamError::SizeMismatch { .. }), "{err}");
        assert_eq!(
            load(b"garbage garbage garbage garbage garbage garbage!", 10, 3),
            Err(StreamError::BadMagic)
        );
        assert_eq!(StreamError::TrailingBytes { offset: 0 }.write_errno(), Some(nix::errno::Errno::ENOMEM));
        assert_eq!(StreamError::ContentMismatch { page: 0, offset: 0 }.write_errno(), None);
    }

    #[test]
    fn stale_or_missing_pages_are_caught_at_end() {
        let mut image = Image::power_on(8, 4 * 4096);
        let stale = full_stream(&image, "m1");
        image.dirty_one();
        // The old image with the END of the new generation: one page is stale.
        let mut framer = Framer::new(compat(image.size), true);
        let mut loader = Loader::new(image.size);
        let end_at = stale.len() - END_LEN as usize;
        framer.feed(&stale[..end_at], &mut loader).unwrap();
        let end = encode_end(1, 1, end_at as u64, crc32c::crc32c(&stale[..end_at]));
        let err = framer.feed(&end, &mut loader).unwrap_err();
        assert_eq!(err, StreamError::StateMismatch { generation: 1, missing: 0, stale: 1 });
    }
}
