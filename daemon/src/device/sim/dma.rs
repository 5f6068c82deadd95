//! The simulated device's DMA: its writes, and the two things that may observe them —
//! its own DMA logging (`DMA_LOGGING_START/STOP/REPORT`, [`DmaLog`], with the kernel's
//! checks and its real bitmap layout) and the IOMMU HWPT it is attached to
//! ([`super::iommu`]) while that HWPT tracks.
//!
//! The log is sparse: the set of dirty logging pages (absolute `iova >> log2(page)`), so
//! its size follows the number of dirty pages, never the size of the logged ranges.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use nix::errno::Errno;

use super::arc_log::ArcEvent;
use super::fault::{FaultOp, Fired};
use super::image::mix;
use super::iommu::SimHwpt;
use super::session::Shared;
use super::spec::{DmaLoggingSpec, DmaWriteSpec};
use crate::device::IovaRange;

/// The smallest report page size the core accepts.
const MIN_REPORT_PAGE: u64 = 4096;

#[derive(Debug)]
struct Session {
    ranges: Vec<IovaRange>,
    page_shift: u32,
    dirty: BTreeSet<u64>,
}

/// A device's DMA logging session.
#[derive(Debug)]
pub(crate) struct DmaLog {
    spec: DmaLoggingSpec,
    session: Option<Session>,
}

/// A refusal: the errno and why.
pub(crate) type Refusal = (Errno, String);

impl DmaLog {
    pub fn new(spec: DmaLoggingSpec) -> DmaLog {
        DmaLog { spec, session: None }
    }

    pub fn is_active(&self) -> bool {
        self.session.is_some()
    }

    /// The logged ranges, while logging.
    fn ranges(&self) -> Option<&[IovaRange]> {
        self.session.as_ref().map(|s| s.ranges.as_slice())
    }

    /// START: checks in the order the core and mlx5 make them; returns the page size
    /// the driver tracks with.
    pub fn start(&mut self, ranges: &[IovaRange], page_size: u64) -> Result<u64, Refusal> {
        if ranges.is_empty() {
            return Err((Errno::EINVAL, "no ranges".into()));
        }
        if ranges.len() > self.spec.max_ranges as usize {
            return Err((Errno::E2BIG, format!("{} ranges, at most {}", ranges.len(), self.spec.max_ranges)));
        }
        // The core only masks with page_size - 1; anything but a power of two is nonsense.
        if !page_size.is_power_of_two() || page_size < MIN_REPORT_PAGE {
            return Err((Errno::EINVAL, format!("page size {page_size} is not a power of two >= 4096")));
        }
        for range in ranges {
            if range.iova % page_size != 0 || range.length % page_size != 0 || range.length == 0 {
                return Err((
                    Errno::EINVAL,
                    format!("range {range:x?} is empty or not aligned to {page_size}"),
                ));
            }
            if range.iova.checked_add(range.length).is_none() {
                return Err((Errno::EOVERFLOW, format!("range {range:x?} overflows")));
            }
        }
        if let Some(pair) = ranges.windows(2).find(|w| w[0].end() > w[1].iova) {
            return Err((
                Errno::EINVAL,
                format!("ranges {:x?} and {:x?} overlap or are unsorted", pair[0], pair[1]),
            ));
        }
        if self.session.is_some() {
            return Err((Errno::EINVAL, "logging already started".into()));
        }
        let chosen = page_size.clamp(self.spec.min_page_size, self.spec.max_page_size);
        self.session = Some(Session {
            ranges: ranges.to_vec(),
            page_shift: chosen.trailing_zeros(),
            dirty: BTreeSet::new(),
        });
        Ok(chosen)
    }

    pub fn stop(&mut self) {
        self.session = None;
    }

    /// A device DMA write of `[iova, iova + length)`: marks every logging page it
    /// touches inside a logged range. Nothing is logged when logging is off.
    pub fn write(&mut self, iova: u64, length: u64) {
        let Some(session) = self.session.as_mut() else { return };
        let end = iova.saturating_add(length);
        for range in &session.ranges {
            let (lo, hi) = (iova.max(range.iova), end.min(range.end()));
            if lo < hi {
                for page in (lo >> session.page_shift)..=((hi - 1) >> session.page_shift) {
                    session.dirty.insert(page);
                }
            }
        }
    }

    /// REPORT: reads and clears the log of `[iova, iova + length)`, setting bit `n % 64`
    /// of word `n / 64` for every report page `n` that a dirty logging page overlaps.
    /// A logging page only partly inside the window is reported but stays logged, so a
    /// later report of the neighbouring window still sees it.
    pub fn report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), Refusal> {
        if !page_size.is_power_of_two() || page_size < MIN_REPORT_PAGE {
            return Err((
                Errno::EINVAL,
                format!("report page size {page_size} is not a power of two >= 4096"),
            ));
        }
        if length == 0 {
            return Err((Errno::EINVAL, "report of length 0 (the kernel would compute garbage)".into()));
        }
        let Some(end) = iova.checked_add(length) else {
            return Err((Errno::EOVERFLOW, format!("report {iova:#x}+{length:#x} overflows")));
        };
        let pages = length.div_ceil(page_size);
        let words = pages.div_ceil(64);
        if (bitmap.len() as u64) < words {
            return Err((
                Errno::EFAULT,
                format!("bitmap of {} words, the report needs {words}", bitmap.len()),
            ));
        }
        let Some(session) = self.session.as_mut() else {
            return Err((Errno::EINVAL, "logging not started".into()));
        };
        let shift = session.page_shift;
        let first = iova >> shift;
        let last = (end - 1) >> shift;
        let mut cleared = Vec::new();
        for &page in session.dirty.range(first..=last) {
            let start = page << shift;
            let stop = start.saturating_add(1 << shift);
            let (lo, hi) = (start.max(iova), stop.min(end));
            set_bits(bitmap, (lo - iova) / page_size, (hi - 1 - iova) / page_size);
            if start >= iova && stop <= end {
                cleared.push(page);
            }
        }
        for page in cleared {
            session.dirty.remove(&page);
        }
        Ok(())
    }
}

/// A simulated device's DMA writes, and what observes them: its logging session and the
/// HWPT it is attached to. The HWPT reaches back through a weak reference to run the
/// device's timed writes and faults before it answers; locks are taken in the order
/// device core → this → HWPT state, never the other way.
#[derive(Debug)]
pub(crate) struct DeviceDma {
    shared: Arc<Shared>,
    hwpt: Option<Arc<SimHwpt>>,
    inner: Mutex<DmaInner>,
}

#[derive(Debug)]
struct DmaInner {
    log: DmaLog,
    writes: DmaWriteSpec,
    /// Pseudo-random writes made so far (their sequence number).
    sequence: u64,
    /// Fractional writes carried between ticks, in write-nanoseconds.
    carry: u128,
    last_tick: Instant,
}

impl DeviceDma {
    pub fn new(shared: Arc<Shared>, spec: DmaLoggingSpec, hwpt: Option<Arc<SimHwpt>>) -> DeviceDma {
        let writes = spec.writes.clone();
        let inner =
            DmaInner { log: DmaLog::new(spec), writes, sequence: 0, carry: 0, last_tick: Instant::now() };
        DeviceDma { shared, hwpt, inner: Mutex::new(inner) }
    }

    fn lock(&self) -> MutexGuard<'_, DmaInner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn logging_active(&self) -> bool {
        self.lock().log.is_active()
    }

    /// The device's timed writes up to now: they happen only while it runs.
    pub fn tick(&self) {
        let mut inner = self.lock();
        let now = Instant::now();
        let elapsed = now.duration_since(inner.last_tick);
        inner.last_tick = now;
        if inner.writes.per_second == 0 || !self.shared.state().is_running() {
            return;
        }
        inner.carry += elapsed.as_nanos() * u128::from(inner.writes.per_second);
        let count = (inner.carry / 1_000_000_000) as u64;
        inner.carry %= 1_000_000_000;
        self.random_writes(&mut inner, count);
    }

    /// A DMA write of `[iova, iova + length)`, seen by whatever tracks.
    pub fn write(&self, iova: u64, length: u64) {
        let mut inner = self.lock();
        self.write_locked(&mut inner, iova, length);
    }

    fn write_locked(&self, inner: &mut DmaInner, iova: u64, length: u64) {
        inner.log.write(iova, length);
        if let Some(hwpt) = &self.hwpt {
            hwpt.device_write(iova, length);
        }
    }

    /// `count` pseudo-random writes of one granule: in the logged ranges while logging,
    /// else in the HWPT's mappings while it tracks, else nowhere.
    fn random_writes(&self, inner: &mut DmaInner, count: u64) {
        if count == 0 {
            return;
        }
        let ranges = match inner.log.ranges() {
            Some(logged) => logged.to_vec(),
            None => match self.hwpt.as_ref().and_then(|hwpt| hwpt.write_window()) {
                Some(mapped) => mapped,
                None => return,
            },
        };
        let total: u64 = ranges.iter().map(|r| r.length).sum();
        if total == 0 {
            return;
        }
        let granule = inner.writes.granule;
        for _ in 0..count {
            let mut offset = mix(inner.writes.seed ^ 0xD1A_u64 ^ mix(inner.sequence)) % total;
            inner.sequence += 1;
            let range = ranges
                .iter()
                .find(|r| {
                    let inside = offset < r.length;
                    if !inside {
                        offset -= r.length;
                    }
                    inside
                })
                .copied()
                .expect("offset below the total length lies in a range");
            let iova = range.iova + offset / granule * granule;
            self.write_locked(inner, iova, granule);
        }
    }

    fn scripted_writes(&self, inner: &mut DmaInner) {
        let (iovas, granule) = (inner.writes.iovas.clone(), inner.writes.granule);
        for iova in iovas {
            self.write_locked(inner, iova, granule);
        }
    }

    /// DMA_LOGGING_START; the scripted `iovas` are written as soon as it succeeds.
    pub fn start_logging(&self, ranges: &[IovaRange], page_size: u64) -> Result<u64, Refusal> {
        let mut inner = self.lock();
        let chosen = inner.log.start(ranges, page_size)?;
        self.scripted_writes(&mut inner);
        Ok(chosen)
    }

    pub fn stop_logging(&self) {
        self.lock().log.stop();
    }

    /// DMA_LOGGING_REPORT, after the device's `per_report` writes.
    pub fn report_logging(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), Refusal> {
        let mut inner = self.lock();
        if inner.writes.per_report > 0 && inner.log.is_active() {
            let count = inner.writes.per_report;
            self.random_writes(&mut inner, count);
        }
        inner.log.report(iova, length, page_size, bitmap)
    }

    /// The HWPT is about to be read: the device's timed writes happen, and its
    /// `per_report` writes when no logging session reports them.
    pub fn before_hwpt_read(&self) {
        self.tick();
        let mut inner = self.lock();
        if inner.writes.per_report > 0 && !inner.log.is_active() {
            let count = inner.writes.per_report;
            self.random_writes(&mut inner, count);
        }
    }

    /// The HWPT started tracking: the scripted `iovas` are written.
    pub fn hwpt_tracking_started(&self) {
        let mut inner = self.lock();
        self.scripted_writes(&mut inner);
    }

    /// The faults this device arms on a HWPT operation (logged to its arc log).
    pub fn hwpt_faults(&self, op: FaultOp) -> Fired {
        let state = self.shared.state();
        let fired = self.shared.faults.lock().unwrap_or_else(|p| p.into_inner()).on_op(op, state);
        for what in &fired.descriptions {
            self.shared.arc_log.record(state, ArcEvent::Fault(what.clone()));
        }
        fired
    }
}

/// Sets bits `first..=last` (Linux bitmap layout on little-endian u64 words).
pub(crate) fn set_bits(bitmap: &mut [u64], first: u64, last: u64) {
    let (fw, lw) = ((first / 64) as usize, (last / 64) as usize);
    let low = !0u64 << (first % 64);
    let high = !0u64 >> (63 - last % 64);
    if fw == lw {
        bitmap[fw] |= low & high;
        return;
    }
    bitmap[fw] |= low;
    bitmap[fw + 1..lw].iter_mut().for_each(|w| *w = !0);
    bitmap[lw] |= high;
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn spec(min: u64, max: u64) -> DmaLoggingSpec {
        DmaLoggingSpec { min_page_size: min, max_page_size: max, max_ranges: 4, ..DmaLoggingSpec::default() }
    }

    fn range(iova: u64, length: u64) -> IovaRange {
        IovaRange { iova, length }
    }

    #[test]
    fn start_checks_like_the_kernel() {
        let mut log = DmaLog::new(spec(4096, 1 << 21));
        let cases: [(&[IovaRange], u64, Errno); 8] = [
            (&[], 4096, Errno::EINVAL),
            (&[range(0, 4096); 5], 4096, Errno::E2BIG),
            (&[range(0, 4096)], 3000, Errno::EINVAL),
            (&[range(0, 4096)], 2048, Errno::EINVAL),
            (&[range(512, 4096)], 4096, Errno::EINVAL),
            (&[range(0, 0)], 4096, Errno::EINVAL),
            (&[range(0, 8192), range(4096, 4096)], 4096, Errno::EINVAL),
            (&[range(u64::MAX - 4095, 8192)], 4096, Errno::EOVERFLOW),
        ];
        for (ranges, page, errno) in cases {
            assert_eq!(log.start(ranges, page).map_err(|e| e.0), Err(errno), "{ranges:x?} page {page}");
            assert!(!log.is_active());
        }
        // Unsorted ranges are refused too.
        assert_eq!(
            log.start(&[range(8192, 4096), range(0, 4096)], 4096).map_err(|e| e.0),
            Err(Errno::EINVAL)
        );
        assert_eq!(log.start(&[range(0, 1 << 22)], 4096), Ok(4096));
        assert_eq!(
            log.start(&[range(0, 1 << 22)], 4096).map_err(|e| e.0),
            Err(Errno::EINVAL),
            "second START"
        );
        log.stop();
        log.stop();
        // Page size negotiation: clamped into [min, max].
        let mut log = DmaLog::new(spec(8192, 1 << 16));
        assert_eq!(log.start(&[range(0, 1 << 22)], 4096), Ok(8192));
        log.stop();
        assert_eq!(log.start(&[range(0, 1 << 22)], 1 << 21), Ok(1 << 16));
    }

    #[test]
    fn report_checks_and_sequencing() {
        let mut log = DmaLog::new(spec(4096, 4096));
        let mut bitmap = [0u64; 4];
        assert_eq!(
            log.report(0, 4096, 4096, &mut bitmap).map_err(|e| e.0),
            Err(Errno::EINVAL),
            "before START"
        );
        log.start(&[range(0, 1 << 20)], 4096).unwrap();
        assert_eq!(log.report(0, 0, 4096, &mut bitmap).map_err(|e| e.0), Err(Errno::EINVAL));
        assert_eq!(log.report(0, 4096, 2048, &mut bitmap).map_err(|e| e.0), Err(Errno::EINVAL));
        assert_eq!(log.report(0, 4096, 6000, &mut bitmap).map_err(|e| e.0), Err(Errno::EINVAL));
        assert_eq!(log.report(u64::MAX, 2, 4096, &mut bitmap).map_err(|e| e.0), Err(Errno::EOVERFLOW));
        assert_eq!(log.report(0, 1 << 30, 4096, &mut bitmap).map_err(|e| e.0), Err(Errno::EFAULT));
    }

    #[test]
    fn report_sets_only_and_clears_the_log() {
        let mut log = DmaLog::new(spec(4096, 4096));
        log.start(&[range(0x10000, 0x100000)], 4096).unwrap();
        log.write(0x10000 + 3 * 4096, 1);
        log.write(0x10000 + 70 * 4096, 4096);
        let mut bitmap = [0u64, 1 << 63];
        log.report(0x10000, 128 * 4096, 4096, &mut bitmap).unwrap();
        assert_eq!(bitmap, [1 << 3, (1 << 63) | (1 << 6)], "bit n%64 of word n/64, caller's bits kept");
        let mut again = [0u64; 2];
        log.report(0x10000, 128 * 4096, 4096, &mut again).unwrap();
        assert_eq!(again, [0, 0], "read-and-clear");
        // Writes outside the logged ranges are not logged.
        log.write(0, 0x10000);
        log.report(0, 0x10000, 4096, &mut again).unwrap();
        assert_eq!(again, [0, 0]);
    }

    #[test]
    fn scripted_writes_happen_at_start_and_per_report() {
        let mut spec = spec(4096, 4096);
        spec.writes.iovas = vec![0x3000];
        spec.writes.per_report = 3;
        let shared = Arc::new(Shared::new(
            "dev".into(),
            super::super::fault::FaultTable::default(),
            super::super::arc_log::ArcLog::new("dev", None).unwrap(),
        ));
        let dma = DeviceDma::new(shared, spec, None);
        dma.start_logging(&[range(0, 0x40000)], 4096).unwrap();
        let mut bitmap = [0u64; 1];
        dma.report_logging(0, 0x40000, 4096, &mut bitmap).unwrap();
        assert!(bitmap[0] & (1 << 3) != 0, "the scripted IOVA is dirty");
        let dirty = bitmap[0].count_ones();
        assert!((2..=4).contains(&dirty), "1 scripted + 3 random writes (may coincide): {dirty}");
    }

    #[test]
    fn set_bits_edges() {
        let mut b = [0u64; 3];
        set_bits(&mut b, 0, 0);
        set_bits(&mut b, 63, 64);
        set_bits(&mut b, 130, 191);
        assert_eq!(b, [1 | (1 << 63), 1, !0u64 << 2]);
    }

    proptest! {
        /// The report against a byte-level model: report page n is set iff some write
        /// touched a logging page that overlaps report page n.
        #[test]
        fn report_layout_matches_a_naive_model(
            log_shift in 12u32..16,
            report_shift in 12u32..16,
            writes in prop::collection::vec((0u64..(1 << 20), 1u64..20000), 0..12),
            window in (0u64..64, 1u64..200),
        ) {
            let base = 1u64 << 24;
            let logged = range(base, 1 << 20);
            let mut log = DmaLog::new(spec(4096, 1 << 16));
            let chosen = log.start(&[logged], 1 << log_shift).unwrap();
            prop_assert_eq!(chosen, 1 << log_shift);
            for &(offset, len) in &writes {
                log.write(base + offset, len);
            }
            let report_page = 1u64 << report_shift;
            let iova = base + window.0 * 4096;
            let length = window.1 * 4096;
            let pages = length.div_ceil(report_page);
            let mut bitmap = vec![0u64; pages.div_ceil(64) as usize];
            log.report(iova, length, report_page, &mut bitmap).unwrap();
            for n in 0..pages {
                let lo = iova + n * report_page;
                let hi = (lo + report_page).min(iova + length);
                let expected = writes.iter().any(|&(offset, len)| {
                    let (ws, we) = (base + offset, (base + offset + len).min(logged.end()));
                    // The write's logging pages, clipped to the logged range.
                    let (ps, pe) = (ws >> log_shift << log_shift, ((we - 1) >> log_shift << log_shift) + (1 << log_shift));
                    ws < we && ps < hi && lo < pe
                });
                let got = bitmap[(n / 64) as usize] >> (n % 64) & 1 == 1;
                prop_assert_eq!(got, expected, "report page {}", n);
            }
            // Bits past the window's pages stay clear.
            for n in pages..bitmap.len() as u64 * 64 {
                prop_assert_eq!(bitmap[(n / 64) as usize] >> (n % 64) & 1, 0);
            }
        }
    }
}
