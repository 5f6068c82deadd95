//! Dirty tracking over a group: start every source as one step, report them all into
//! the group bitmap, stop them all.
//!
//! A [`DirtySource`] is whatever observes some devices' DMA writes: a device's own DMA
//! logging ([`DmaLoggingSource`], one per device) or an iommufd HWPT with dirty tracking
//! ([`IommufdHwptSource`], one for every device of the group attached to it). The tracker
//! does not care which; it owns the group [`DirtyBitmap`], the start/stop atomicity and the
//! recovery rules:
//!
//! - **start** is all or nothing: a source that cannot track (ENOTTY/EOPNOTSUPP) is
//!   recorded as not covered, with the reason, and is not a failure (a logging device
//!   with a HWPT falls back to it first, see below); any other failure, a fallback
//!   HWPT's included, stops the sources already started and names the one that failed.
//! - **report** reads every source in turn (never concurrently: the kernel's bitmap writes
//!   are plain read-modify-writes, and sources may share the group's words). When a source
//!   fails, its log is lost: its whole tracked range is marked dirty and logging is
//!   restarted (STOP + START); while that keeps failing, every round marks it all dirty.
//! - **stop** tries every source, collects the failures, and is idempotent.
//!
//! The group bitmap covers exactly the guest's IOVA layout at the group page size. A DMA
//! logging device gets START ranges planned from it (at most `max_ranges`, fewer after
//! E2BIG), and is read per START range — pds refuses windows that cross a tracked
//! range — in windows of at most `report_window_bytes` of bitmap, each a multiple of 64
//! pages from the range start, at the page size the driver chose. When that page size is
//! the group's and a window lands on a word boundary of one group range, the device writes
//! straight into the group's words; otherwise into a reused scratch buffer that is then
//! expanded or folded into the group's pages.
//!
//! **Which source tracks a device** ([`DirtyTracker::for_devices`]) is decided per device:
//! its own DMA logging when its PROBE says it has some; otherwise the HWPT it is attached
//! to, if that HWPT was allocated with dirty tracking; otherwise it is not covered, with
//! the reason. PROBE is not the last word: mlx5 says yes, then refuses START with
//! EOPNOTSUPP when the tracked space exceeds its firmware window. Such a device falls
//! back, at that start, to its HWPT as if it had no logging — joining the group's source
//! for that HWPT (started early if its turn has not come) or a new one — and its coverage
//! says `"iommufd-hwpt"`, with the refusal as its reason. Each start decides again (a
//! restart re-probes); a log lost later is restarted on the same source, never moved.
//! QEMU decides for the whole VM instead: device logging when every device
//! supports it, IOMMU tracking for all of them otherwise — its dirty tracking is one switch
//! per container. Deciding per device keeps what each choice is good at: device logging
//! sees only the device's own writes, in the ranges and at the granularity the driver
//! offers, and costs the IOMMU nothing; IOMMU tracking is the only way to cover devices
//! without logging (virtio, qat, hisi, xe), but it slows every device on the HWPT (A/D
//! updates, an IOTLB flush per read) and marks whole huge IOPTEs. A group that mixes
//! vendors would otherwise lose either the precision of its logging devices or the
//! coverage of the others — and devices opened through the group/container path have no
//! HWPT at all. A logging device that shares a tracked HWPT is seen by both sources; the
//! group bitmap is their union, which is still exact for every write.
//!
//! Every call blocks on device ioctls: run the tracker on a blocking thread.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;

use crate::device::{DeviceError, ErrorKind, IovaRange, MigrationDevice, Op};
use crate::dirty::bitmap::{BitmapError, DEFAULT_PAGE_SIZE, DirtyBitmap, DirtyExport};
use crate::dirty::hwpt::{HwptDirty, HwptKey, IommufdHwptSource};
use crate::dirty::ranges::{
    KERNEL_MAX_RANGES, MIN_LOGGING_PAGE_SIZE, RangeError, normalize, plan_logging_ranges,
};

/// Bitmap bytes per `DMA_LOGGING_REPORT` call: the kernel pins at most 2 MiB of user
/// bitmap per window anyway (512 pages of page pointers), i.e. 64 GiB of IOVA at 4 KiB.
pub const DEFAULT_REPORT_WINDOW_BYTES: usize = 2 << 20;

/// Tracker settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrackerConfig {
    /// Group bitmap granularity (power of two ≥ 512; DMA logging is asked for at least
    /// 4096).
    pub page_size: u64,
    /// Most ranges offered to a device's `DMA_LOGGING_START` (fewer after E2BIG).
    pub max_ranges: usize,
    /// Most bitmap bytes one report call may fill (whole u64 words; at least 8).
    pub report_window_bytes: usize,
}

impl Default for TrackerConfig {
    fn default() -> TrackerConfig {
        TrackerConfig {
            page_size: DEFAULT_PAGE_SIZE,
            max_ranges: KERNEL_MAX_RANGES,
            report_window_bytes: DEFAULT_REPORT_WINDOW_BYTES,
        }
    }
}

/// What a source is asked to track.
#[derive(Clone, Copy, Debug)]
pub struct StartRequest<'a> {
    /// The group bitmap's ranges: the guest's IOVA layout, aligned to `page_size`,
    /// sorted and separated.
    pub ranges: &'a [IovaRange],
    /// The guest's IOVA layout as given, aligned outward to 4 KiB only, sorted and
    /// merged: what the IOAS maps, so what an IOMMU read may cover.
    pub guest_ranges: &'a [IovaRange],
    /// The group bitmap's granularity.
    pub page_size: u64,
    /// Most ranges to offer a device at once.
    pub max_ranges: usize,
}

/// How a source's start went, when it did not fail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceStart {
    /// Logging: at `page_size` (the driver's choice) over `ranges` (a superset of the
    /// request: aligned, possibly merged across holes).
    Tracking { page_size: u64, ranges: Vec<IovaRange> },
    /// The source cannot track these devices; nothing was started.
    Unsupported { reason: String },
}

/// What one report of one source did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceReport {
    /// Group pages this report turned dirty (pages another source already dirtied in
    /// the same round are not counted again).
    pub new_dirty_pages: u64,
    /// Report calls issued.
    pub windows: u64,
    /// Of those, how many wrote straight into the group bitmap.
    pub windows_in_place: u64,
}

/// A way of learning which guest pages some devices wrote by DMA.
pub trait DirtySource: Send + fmt::Debug {
    /// Name in errors and statistics (the device's name for DMA logging).
    fn name(&self) -> &str;

    /// The devices whose DMA this source observes.
    fn devices(&self) -> Vec<String>;

    /// The coverage source label: `"dma-logging"`, `"iommufd-hwpt"`.
    fn kind(&self) -> &'static str;

    /// Starts tracking. `Ok(Unsupported)` when the source cannot track at all; `Err`
    /// only for failures (the tracker then stops every source already started).
    fn start(&mut self, request: &StartRequest<'_>) -> Result<SourceStart, DeviceError>;

    /// Reads and clears the log since the last report into `group`, in calls of at most
    /// `window_bytes` of bitmap each, counting into `progress` as it goes (so a failure
    /// part-way still accounts for the windows already read). After an error the log is
    /// lost; the tracker marks the source's whole range dirty and restarts it.
    fn report(
        &mut self,
        group: &mut DirtyBitmap,
        window_bytes: usize,
        progress: &mut SourceReport,
    ) -> Result<(), DeviceError>;

    /// Stops tracking (idempotent).
    fn stop(&mut self) -> Result<(), DeviceError>;
}

/// A device's own DMA logging (`VFIO_DEVICE_FEATURE_DMA_LOGGING_*`).
#[derive(Debug)]
pub struct DmaLoggingSource {
    device: Arc<dyn MigrationDevice>,
    /// The driver's page size and the START ranges, once started.
    page_size: u64,
    ranges: Vec<IovaRange>,
    /// Report buffer for windows that cannot go straight into the group bitmap; reused
    /// (and zeroed) across windows and rounds.
    scratch: Vec<u64>,
    /// A PROBE answer already obtained, used by the next start instead of asking again.
    probed: Option<Result<bool, DeviceError>>,
}

impl DmaLoggingSource {
    pub fn new(device: Arc<dyn MigrationDevice>) -> DmaLoggingSource {
        DmaLoggingSource { device, page_size: 0, ranges: Vec::new(), scratch: Vec::new(), probed: None }
    }

    /// A source whose device was just probed (to choose its source): the first start
    /// takes `probe` as the PROBE's answer; later starts probe again.
    pub fn with_probe(
        device: Arc<dyn MigrationDevice>,
        probe: Result<bool, DeviceError>,
    ) -> DmaLoggingSource {
        DmaLoggingSource { probed: Some(probe), ..DmaLoggingSource::new(device) }
    }

    fn start_error(&self, errno: Errno, detail: String) -> DeviceError {
        DeviceError::os(self.device.name(), Op::DmaLoggingStart, errno).with_detail(detail)
    }
}

impl DirtySource for DmaLoggingSource {
    fn name(&self) -> &str {
        self.device.name()
    }

    fn devices(&self) -> Vec<String> {
        vec![self.device.name().to_owned()]
    }

    fn kind(&self) -> &'static str {
        "dma-logging"
    }

    fn start(&mut self, request: &StartRequest<'_>) -> Result<SourceStart, DeviceError> {
        let probe = self.probed.take().unwrap_or_else(|| self.device.dma_logging_supported());
        match probe {
            Ok(true) => {}
            Ok(false) => {
                return Ok(SourceStart::Unsupported {
                    reason: "the device does not support DMA logging (PROBE)".to_owned(),
                });
            }
            Err(e) if e.kind == ErrorKind::Unsupported => {
                return Ok(SourceStart::Unsupported { reason: e.to_string() });
            }
            Err(e) => return Err(e),
        }
        let requested = request.page_size.max(MIN_LOGGING_PAGE_SIZE);
        let mut max_ranges = request.max_ranges;
        let mut stale_session_cleared = false;
        loop {
            let plan = plan_logging_ranges(request.ranges, requested, max_ranges)
                .map_err(|e| self.start_error(Errno::EINVAL, e.to_string()))?;
            match self.device.dma_logging_start(&plan, requested) {
                Ok(chosen) if chosen.is_power_of_two() && chosen >= MIN_LOGGING_PAGE_SIZE => {
                    self.page_size = chosen;
                    self.ranges = plan.clone();
                    return Ok(SourceStart::Tracking { page_size: chosen, ranges: plan });
                }
                Ok(chosen) => {
                    // REPORT would refuse this page size: nothing could ever be read back.
                    let stopped = self.device.dma_logging_stop();
                    let mut detail =
                        format!("the driver chose page size {chosen:#x}, not a power of two ≥ 4096");
                    if let Err(e) = stopped {
                        detail.push_str(&format!("; stopping it again failed: {e}"));
                    }
                    return Err(self.start_error(Errno::EINVAL, detail));
                }
                Err(e) if e.kind == ErrorKind::TooManyRanges && plan.len() > 1 => {
                    // The kernel's cap is PAGE_SIZE / 16 (more on 64 KiB-page hosts); a
                    // driver may cap lower. Halving finds any cap in a few tries.
                    tracing::debug!(
                        device = self.name(),
                        ranges = plan.len(),
                        "E2BIG, retrying with fewer ranges"
                    );
                    max_ranges = plan.len() / 2;
                }
                Err(e) if e.kind == ErrorKind::Unsupported => {
                    return Ok(SourceStart::Unsupported { reason: e.to_string() });
                }
                Err(e)
                    if matches!(e.kind, ErrorKind::AlreadyActive | ErrorKind::InvalidRequest)
                        && !stale_session_cleared =>
                {
                    // A session left over (mlx5/pds answer EINVAL or EEXIST to a second
                    // START): stop it and try once more.
                    stale_session_cleared = true;
                    if let Err(stop) = self.device.dma_logging_stop() {
                        return Err(
                            e.with_detail(format!("stopping a possible stale session failed: {stop}"))
                        );
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn report(
        &mut self,
        group: &mut DirtyBitmap,
        window_bytes: usize,
        progress: &mut SourceReport,
    ) -> Result<(), DeviceError> {
        let device = &self.device;
        report_windows(
            group,
            &self.ranges,
            self.page_size,
            window_bytes,
            &mut self.scratch,
            progress,
            |iova, length, words| device.dma_logging_report(iova, length, self.page_size, words),
            |e| {
                DeviceError::os(device.name(), Op::DmaLoggingReport, Errno::EINVAL).with_detail(e.to_string())
            },
        )
    }

    fn stop(&mut self) -> Result<(), DeviceError> {
        self.device.dma_logging_stop()
    }
}

/// Reads `ranges` (each aligned to `page_size`) into `group` with `read(iova, length,
/// words)`, one call per window of at most `window_bytes` of bitmap, each window a
/// multiple of 64 pages from its range's start, counting into `report`. A window that
/// lines up with the group's words is read straight into them; any other into `scratch`
/// (reused, zeroed per window), then expanded or folded into the group's pages.
#[allow(clippy::too_many_arguments, reason = "one caller per source kind, each naming every part")]
pub(crate) fn report_windows(
    group: &mut DirtyBitmap,
    ranges: &[IovaRange],
    page_size: u64,
    window_bytes: usize,
    scratch: &mut Vec<u64>,
    report: &mut SourceReport,
    mut read: impl FnMut(u64, u64, &mut [u64]) -> Result<(), DeviceError>,
    merge_failed: impl Fn(BitmapError) -> DeviceError,
) -> Result<(), DeviceError> {
    let window_pages = (window_bytes / 8).max(1) as u64 * 64;
    let window_length = window_pages.saturating_mul(page_size);
    for range in ranges {
        let mut iova = range.iova;
        while iova < range.end() {
            let length = window_length.min(range.end() - iova);
            report.windows += 1;
            match group.report_in_place(iova, length, page_size, |words| read(iova, length, words)) {
                Some((result, newly_dirty)) => {
                    result?;
                    report.windows_in_place += 1;
                    report.new_dirty_pages += newly_dirty;
                }
                None => {
                    let words = length.div_ceil(page_size).div_ceil(64) as usize;
                    scratch.clear();
                    scratch.resize(words, 0);
                    read(iova, length, scratch)?;
                    report.new_dirty_pages +=
                        group.merge_report(iova, length, page_size, scratch).map_err(&merge_failed)?;
                }
            }
            iova += length;
        }
    }
    Ok(())
}

/// Whether, and how, a source's devices are tracked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Coverage {
    /// Not started (or stopped).
    Idle,
    Tracking {
        /// The driver's chosen page size.
        page_size: u64,
        /// What the device tracks (a superset of the guest ranges).
        ranges: Vec<IovaRange>,
    },
    /// The log was lost and logging could not be restarted yet: every round reports the
    /// whole of `ranges` dirty and tries to restart.
    Lost { ranges: Vec<IovaRange>, reason: String },
    /// The source cannot track these devices.
    NotCovered { reason: String },
    /// The device's DMA logging was refused at start (`reason`), and the HWPT source
    /// `hwpt` tracks it instead: this source observes nothing until the next start.
    FellBack { hwpt: String, reason: String },
}

/// Per-source statistics (per device for DMA logging).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceStats {
    pub name: String,
    pub kind: &'static str,
    pub devices: Vec<String>,
    pub coverage: Coverage,
    /// Devices a HWPT source tracks because their own DMA logging was refused at start:
    /// (device, the refusal). Each is also in `devices`.
    pub refused_logging: Vec<(String, String)>,
    /// The driver's page size at the last successful start.
    pub page_size: Option<u64>,
    /// Group pages this source turned dirty, over every round (including pages marked
    /// dirty because its log was lost).
    pub dirty_pages_found: u64,
    /// The same, in the last round.
    pub last_dirty_pages: u64,
    /// Successful reports.
    pub reports: u64,
    pub report_errors: u64,
    /// Report calls, and how many of them went straight into the group bitmap.
    pub windows: u64,
    pub windows_in_place: u64,
    pub last_report_latency: Option<Duration>,
    pub last_error: Option<DeviceError>,
}

impl SourceStats {
    /// The source's kind (`"dma-logging"`, `"iommufd-hwpt"`) while its devices are
    /// covered, `"none"` otherwise. A lost log still counts as covered: its range is
    /// reported all dirty.
    /// A device whose logging fell back to its HWPT counts as `"iommufd-hwpt"`.
    pub fn coverage_source(&self) -> &'static str {
        match self.coverage {
            Coverage::Tracking { .. } | Coverage::Lost { .. } => self.kind,
            Coverage::FellBack { .. } => "iommufd-hwpt",
            Coverage::Idle | Coverage::NotCovered { .. } => "none",
        }
    }

    /// Why the devices are not (precisely) covered, or why they are tracked by a HWPT
    /// although they have DMA logging.
    pub fn coverage_reason(&self) -> Option<&str> {
        match &self.coverage {
            Coverage::Lost { reason, .. }
            | Coverage::NotCovered { reason }
            | Coverage::FellBack { reason, .. } => Some(reason),
            Coverage::Idle => Some("not started"),
            Coverage::Tracking { .. } => None,
        }
    }

    /// [`coverage_reason`](Self::coverage_reason) for one of `devices`: for a device that
    /// joined this HWPT because its DMA logging was refused, that refusal.
    pub fn device_reason(&self, device: &str) -> Option<&str> {
        self.coverage_reason().or_else(|| {
            self.refused_logging.iter().find(|(name, _)| name == device).map(|(_, why)| why.as_str())
        })
    }
}

/// A source whose log was lost in a round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LostLog {
    pub name: String,
    pub reason: String,
    /// Whether logging was restarted (the next round is precise again).
    pub restarted: bool,
}

/// What one report round found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReportRound {
    /// Group pages that became dirty in this round.
    pub new_dirty_pages: u64,
    pub elapsed: Duration,
    /// Sources whose whole range was marked dirty because their log was lost.
    pub lost: Vec<LostLog>,
}

#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    #[error(transparent)]
    Ranges(#[from] RangeError),
    #[error(transparent)]
    Bitmap(#[from] BitmapError),
    #[error("report window of {0} bytes is smaller than one bitmap word")]
    WindowTooSmall(usize),
    #[error("dirty tracking could not start on {device}: {error}{}", rollback_suffix(.rollback_failures))]
    Start {
        device: String,
        error: DeviceError,
        /// Sources started earlier in the same call that could not be stopped again.
        rollback_failures: Vec<DeviceError>,
    },
    #[error("dirty tracking is already started")]
    AlreadyStarted,
    #[error("dirty tracking is not started")]
    NotStarted,
    #[error("stopping dirty tracking failed: {}", join_errors(.failures))]
    Stop { failures: Vec<DeviceError> },
}

fn rollback_suffix(failures: &[DeviceError]) -> String {
    if failures.is_empty() {
        String::new()
    } else {
        format!("; rolling back also failed: {}", join_errors(failures))
    }
}

fn join_errors(errors: &[DeviceError]) -> String {
    errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

#[derive(Debug)]
struct Slot {
    source: Box<dyn DirtySource>,
    stats: SourceStats,
    /// The source may be logging: set by a start, cleared by a successful stop.
    needs_stop: bool,
    /// For a device's logging source: the device's dirty-tracking HWPT, which tracks it
    /// when START refuses logging (EOPNOTSUPP: mlx5 beyond its firmware window).
    fallback: Option<Arc<dyn HwptDirty>>,
    /// For a HWPT source: the HWPT it reads, which fallen-back devices join.
    hwpt: Option<HwptKey>,
    /// Created by a start only to track fallen-back devices; dropped by the next start.
    for_fallback: bool,
}

impl Slot {
    fn new(source: Box<dyn DirtySource>) -> Slot {
        Slot {
            stats: SourceStats {
                name: source.name().to_owned(),
                kind: source.kind(),
                devices: source.devices(),
                coverage: Coverage::Idle,
                refused_logging: Vec::new(),
                page_size: None,
                dirty_pages_found: 0,
                last_dirty_pages: 0,
                reports: 0,
                report_errors: 0,
                windows: 0,
                windows_in_place: 0,
                last_report_latency: None,
                last_error: None,
            },
            source,
            needs_stop: false,
            fallback: None,
            hwpt: None,
            for_fallback: false,
        }
    }

    fn tracked_ranges(&self) -> &[IovaRange] {
        match &self.stats.coverage {
            Coverage::Tracking { ranges, .. } | Coverage::Lost { ranges, .. } => ranges,
            Coverage::Idle | Coverage::NotCovered { .. } | Coverage::FellBack { .. } => &[],
        }
    }

    fn tracking(&mut self, page_size: u64, ranges: Vec<IovaRange>) {
        self.needs_stop = true;
        self.stats.page_size = Some(page_size);
        self.stats.coverage = Coverage::Tracking { page_size, ranges };
    }

    /// After a stop: a covered source goes idle; "not covered" stays, it describes the
    /// device.
    fn stopped(&mut self) {
        self.needs_stop = false;
        if matches!(
            self.stats.coverage,
            Coverage::Tracking { .. } | Coverage::Lost { .. } | Coverage::FellBack { .. }
        ) {
            self.stats.coverage = Coverage::Idle;
        }
    }
}

/// Dirty tracking for one group of devices; see the module documentation.
#[derive(Debug)]
pub struct DirtyTracker {
    config: TrackerConfig,
    /// The group bitmap's ranges, kept apart so that sources can read them while the
    /// bitmap is being written.
    ranges: Vec<IovaRange>,
    /// The guest layout at 4 KiB ([`StartRequest::guest_ranges`]).
    guest: Vec<IovaRange>,
    bitmap: DirtyBitmap,
    slots: Vec<Slot>,
    active: bool,
}

impl DirtyTracker {
    /// A tracker over `sources` for the guest's IOVA layout `guest_ranges` (any order,
    /// overlapping or unaligned).
    pub fn new(
        sources: Vec<Box<dyn DirtySource>>,
        guest_ranges: &[IovaRange],
        config: TrackerConfig,
    ) -> Result<DirtyTracker, TrackerError> {
        let slots = sources.into_iter().map(Slot::new).collect();
        DirtyTracker::with_slots(slots, guest_ranges, config)
    }

    fn with_slots(
        slots: Vec<Slot>,
        guest_ranges: &[IovaRange],
        config: TrackerConfig,
    ) -> Result<DirtyTracker, TrackerError> {
        if config.max_ranges == 0 {
            return Err(RangeError::NoRangesAllowed.into());
        }
        if config.report_window_bytes < 8 {
            return Err(TrackerError::WindowTooSmall(config.report_window_bytes));
        }
        let bitmap = DirtyBitmap::new(guest_ranges, config.page_size)?;
        let guest = normalize(guest_ranges, MIN_LOGGING_PAGE_SIZE)?;
        Ok(DirtyTracker { config, ranges: bitmap.ranges().to_vec(), guest, bitmap, slots, active: false })
    }

    /// A tracker choosing each device's source (see the module documentation): its own
    /// DMA logging when the PROBE (asked here, blocking) says it has some, else the HWPT it
    /// is attached to, one source per HWPT in the order their first device appears. A
    /// device with neither gets a logging source that reports it not covered at start;
    /// a PROBE that fails for another reason fails the start, naming the device. A
    /// logging device's HWPT is kept as its fallback for a START that refuses logging.
    pub fn for_devices(
        devices: &[Arc<dyn MigrationDevice>],
        guest_ranges: &[IovaRange],
        config: TrackerConfig,
    ) -> Result<DirtyTracker, TrackerError> {
        enum Chosen {
            Logging(DmaLoggingSource, Option<Arc<dyn HwptDirty>>),
            Hwpt(IommufdHwptSource),
        }
        let mut chosen: Vec<Chosen> = Vec::with_capacity(devices.len());
        for device in devices {
            let probe = device.dma_logging_supported();
            let no_logging = match &probe {
                Ok(supported) => !supported,
                Err(e) => e.kind == ErrorKind::Unsupported,
            };
            if no_logging && let Some(hwpt) = device.dirty_tracking_hwpt() {
                let name = device.name().to_owned();
                let key = hwpt.key();
                match chosen.iter_mut().find_map(|c| match c {
                    Chosen::Hwpt(source) if source.key() == key => Some(source),
                    _ => None,
                }) {
                    Some(shared) => shared.add_device(name),
                    None => chosen.push(Chosen::Hwpt(IommufdHwptSource::new(hwpt, vec![name]))),
                }
                continue;
            }
            let fallback = device.dirty_tracking_hwpt();
            chosen.push(Chosen::Logging(DmaLoggingSource::with_probe(Arc::clone(device), probe), fallback));
        }
        let slots = chosen
            .into_iter()
            .map(|c| match c {
                Chosen::Logging(source, fallback) => Slot { fallback, ..Slot::new(Box::new(source)) },
                Chosen::Hwpt(source) => {
                    let hwpt = Some(source.key());
                    Slot { hwpt, ..Slot::new(Box::new(source)) }
                }
            })
            .collect();
        DirtyTracker::with_slots(slots, guest_ranges, config)
    }

    /// Starts every source, as one step: either every source that can track is tracking,
    /// or none is (the error names the source that failed). A device whose START refuses
    /// logging falls back to its dirty-tracking HWPT, if it has one: it joins the group's
    /// source for that HWPT (started now if it was not yet) or a new one. Every start
    /// decides afresh: the fallbacks of the previous one are undone first.
    pub fn start(&mut self) -> Result<(), TrackerError> {
        if self.active {
            return Err(TrackerError::AlreadyStarted);
        }
        forget_fallbacks(&mut self.slots);
        let request = StartRequest {
            ranges: &self.ranges,
            guest_ranges: &self.guest,
            page_size: self.config.page_size,
            max_ranges: self.config.max_ranges,
        };
        // Slots started (or found unable to track) in this call: a HWPT source may be
        // started early, for a device that fell back to it.
        let mut attempted = vec![false; self.slots.len()];
        let mut index = 0;
        while index < self.slots.len() {
            if attempted[index] {
                index += 1;
                continue;
            }
            attempted[index] = true;
            let outcome = match self.slots[index].source.start(&request) {
                Ok(SourceStart::Unsupported { reason }) if self.slots[index].fallback.is_some() => {
                    fall_back(&mut self.slots, index, reason, &request, &mut attempted)
                }
                Ok(start) => {
                    started(&mut self.slots[index], start);
                    Ok(())
                }
                Err(error) => Err((index, error)),
            };
            if let Err((failed, error)) = outcome {
                let slot = &mut self.slots[failed];
                slot.stats.last_error = Some(error.clone());
                let device = slot.stats.name.clone();
                let mut rollback_failures = Vec::new();
                for (slot, _) in self.slots.iter_mut().zip(&attempted).filter(|(_, tried)| **tried) {
                    if !slot.needs_stop {
                        continue;
                    }
                    match slot.source.stop() {
                        Ok(()) => slot.stopped(),
                        Err(e) => rollback_failures.push(e),
                    }
                }
                return Err(TrackerError::Start { device, error, rollback_failures });
            }
            index += 1;
        }
        self.active = true;
        Ok(())
    }

    /// Reads every source's log into the group bitmap. A source's failure is not an
    /// error of the round: its range is marked dirty and it is restarted (see
    /// [`ReportRound::lost`]).
    pub fn report(&mut self) -> Result<ReportRound, TrackerError> {
        if !self.active {
            return Err(TrackerError::NotStarted);
        }
        let round_started = Instant::now();
        let mut round = ReportRound::default();
        let request = StartRequest {
            ranges: &self.ranges,
            guest_ranges: &self.guest,
            page_size: self.config.page_size,
            max_ranges: self.config.max_ranges,
        };
        for slot in &mut self.slots {
            let mut progress = SourceReport::default();
            let outcome = match &slot.stats.coverage {
                Coverage::Tracking { .. } => {
                    let started = Instant::now();
                    let window_bytes = self.config.report_window_bytes;
                    let result = slot.source.report(&mut self.bitmap, window_bytes, &mut progress);
                    slot.stats.last_report_latency = Some(started.elapsed());
                    result.map_err(|error| {
                        slot.stats.report_errors += 1;
                        let cause = format!("report failed, log lost: {error}");
                        slot.stats.last_error = Some(error);
                        cause
                    })
                }
                Coverage::Lost { .. } => Err("log lost in an earlier round".to_owned()),
                Coverage::Idle | Coverage::NotCovered { .. } | Coverage::FellBack { .. } => continue,
            };
            // Windows read before a failure count too: their pages are in the bitmap.
            slot.stats.windows += progress.windows;
            slot.stats.windows_in_place += progress.windows_in_place;
            slot.stats.last_dirty_pages = progress.new_dirty_pages;
            slot.stats.dirty_pages_found += progress.new_dirty_pages;
            match outcome {
                Ok(()) => slot.stats.reports += 1,
                Err(cause) => round.lost.push(recover_lost_log(slot, &mut self.bitmap, &request, cause)),
            }
            round.new_dirty_pages += slot.stats.last_dirty_pages;
        }
        round.elapsed = round_started.elapsed();
        Ok(round)
    }

    /// Stops every source that may be logging, trying each even when one fails.
    /// Idempotent: once everything stopped, it does nothing; sources that failed to stop
    /// are tried again by the next call.
    pub fn stop(&mut self) -> Result<(), TrackerError> {
        self.active = false;
        let mut failures = Vec::new();
        for slot in &mut self.slots {
            if !slot.needs_stop {
                if matches!(slot.stats.coverage, Coverage::FellBack { .. }) {
                    // Its HWPT's source is stopped in this loop; nothing to stop here.
                    slot.stats.coverage = Coverage::Idle;
                }
                continue;
            }
            match slot.source.stop() {
                Ok(()) => slot.stopped(),
                Err(e) => {
                    slot.stats.last_error = Some(e.clone());
                    failures.push(e);
                }
            }
        }
        if failures.is_empty() { Ok(()) } else { Err(TrackerError::Stop { failures }) }
    }

    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Whether a source still logs: after a stop that failed on a device, that device's
    /// source does until a stop goes through.
    pub fn is_logging(&self) -> bool {
        self.slots.iter().any(|slot| slot.needs_stop)
    }

    /// Whether every source is precisely tracking (none lost, none unsupported; a
    /// device that fell back is as covered as the HWPT source tracking it).
    pub fn fully_covered(&self) -> bool {
        self.slots
            .iter()
            .all(|slot| matches!(slot.stats.coverage, Coverage::Tracking { .. } | Coverage::FellBack { .. }))
    }

    /// The dirty pages accumulated since the last [`take_dirty`](Self::take_dirty).
    pub fn bitmap(&self) -> &DirtyBitmap {
        &self.bitmap
    }

    /// Hands over the accumulated dirty pages and starts a fresh set.
    pub fn take_dirty(&mut self) -> DirtyBitmap {
        self.bitmap.take_and_clear()
    }

    /// Exports the accumulated dirty pages and clears the bitmap in place: a round loop
    /// that uses this never allocates (and never page-faults in) a new group bitmap.
    pub fn export_and_clear(&mut self) -> DirtyExport {
        let export = self.bitmap.export();
        self.bitmap.clear();
        export
    }

    pub fn stats(&self) -> impl Iterator<Item = &SourceStats> {
        self.slots.iter().map(|slot| &slot.stats)
    }

    pub fn config(&self) -> TrackerConfig {
        self.config
    }
}

impl Drop for DirtyTracker {
    /// Logging left on costs the device throughput until its fd is closed, so a tracker
    /// that was not stopped stops its sources here (blocking, like every other call).
    fn drop(&mut self) {
        if self.is_logging()
            && let Err(e) = self.stop()
        {
            tracing::warn!(error = %e, "stopping dirty tracking on drop failed");
        }
    }
}

/// Records how a source's start went, when it did not fail.
fn started(slot: &mut Slot, start: SourceStart) {
    match start {
        SourceStart::Tracking { page_size, ranges } => slot.tracking(page_size, ranges),
        SourceStart::Unsupported { reason } => {
            tracing::info!(source = slot.stats.name, %reason, "not covered by dirty tracking");
            slot.stats.coverage = Coverage::NotCovered { reason };
        }
    }
}

/// Undoes the previous start's fallbacks, so that every device is probed and started on
/// its own source again: HWPT sources lose the devices that joined them, and the ones
/// created for fallbacks go (unless a failed stop left them tracking: the next stop must
/// still reach them).
fn forget_fallbacks(slots: &mut Vec<Slot>) {
    slots.retain(|slot| !slot.for_fallback || slot.needs_stop);
    for slot in slots {
        slot.stats.devices = slot.source.devices();
        slot.stats.refused_logging.clear();
    }
}

/// The device of logging slot `index` was refused logging (`refusal`): track it by its
/// HWPT, through the group's source for that HWPT (starting it if this call has not yet)
/// or a new one. `Err` names the slot that failed to start.
fn fall_back(
    slots: &mut Vec<Slot>,
    index: usize,
    refusal: String,
    request: &StartRequest<'_>,
    attempted: &mut Vec<bool>,
) -> Result<(), (usize, DeviceError)> {
    let Some(hwpt) = slots[index].fallback.clone() else {
        started(&mut slots[index], SourceStart::Unsupported { reason: refusal });
        return Ok(());
    };
    let device = slots[index].stats.name.clone();
    let key = hwpt.key();
    let target = match slots.iter().position(|slot| slot.hwpt == Some(key)) {
        Some(target) => target,
        None => {
            let source = IommufdHwptSource::new(hwpt, Vec::new());
            slots.push(Slot { hwpt: Some(key), for_fallback: true, ..Slot::new(Box::new(source)) });
            attempted.push(false);
            slots.len() - 1
        }
    };
    if !attempted[target] {
        attempted[target] = true;
        match slots[target].source.start(request) {
            Ok(start) => started(&mut slots[target], start),
            Err(mut error) => {
                let why = format!("the fallback of {device}, whose DMA logging was refused: {refusal}");
                error.detail = Some(match error.detail.take() {
                    Some(detail) => format!("{detail}; {why}"),
                    None => why,
                });
                return Err((target, error));
            }
        }
    }
    let hwpt_name = slots[target].stats.name.clone();
    match &slots[target].stats.coverage {
        Coverage::Tracking { .. } | Coverage::Lost { .. } => {
            tracing::info!(device, hwpt = hwpt_name, %refusal, "DMA logging refused; tracked by the IOMMU");
            let reason = format!("DMA logging refused ({refusal}); tracked by {hwpt_name} instead");
            let joined = &mut slots[target].stats;
            joined.devices.push(device.clone());
            joined.refused_logging.push((device, reason.clone()));
            let slot = &mut slots[index];
            slot.stats.devices.clear();
            slot.stats.coverage = Coverage::FellBack { hwpt: hwpt_name, reason };
        }
        coverage => {
            let why = match coverage {
                Coverage::NotCovered { reason } => reason.clone(),
                _ => "it is not tracking".to_owned(),
            };
            let reason = format!("{refusal}; falling back to {hwpt_name} failed: {why}");
            if slots[target].for_fallback && target == slots.len() - 1 {
                // Created for this device alone, and useless to it.
                slots.pop();
                attempted.pop();
            }
            started(&mut slots[index], SourceStart::Unsupported { reason });
        }
    }
    Ok(())
}

/// A source's log is lost: everything it tracks is dirty this round; try STOP + START so
/// that the next round is precise again.
fn recover_lost_log(
    slot: &mut Slot,
    bitmap: &mut DirtyBitmap,
    request: &StartRequest<'_>,
    cause: String,
) -> LostLog {
    let ranges = slot.tracked_ranges().to_vec();
    let newly_dirty: u64 = ranges.iter().map(|r| bitmap.mark(r.iova, r.length)).sum();
    slot.stats.last_dirty_pages += newly_dirty;
    slot.stats.dirty_pages_found += newly_dirty;
    tracing::warn!(source = slot.stats.name, %cause, "dirty log lost; whole range marked dirty");
    let restart = slot.source.stop().and_then(|()| {
        slot.needs_stop = false;
        slot.source.start(request)
    });
    let (coverage, reason, restarted) = match restart {
        Ok(SourceStart::Tracking { page_size, ranges }) => {
            slot.needs_stop = true;
            slot.stats.page_size = Some(page_size);
            (Coverage::Tracking { page_size, ranges }, cause, true)
        }
        Ok(SourceStart::Unsupported { reason: why }) => {
            let reason = format!("{cause}; restart refused: {why}");
            (Coverage::Lost { ranges, reason: reason.clone() }, reason, false)
        }
        Err(e) => {
            let reason = format!("{cause}; restart failed: {e}");
            slot.stats.last_error = Some(e);
            (Coverage::Lost { ranges, reason: reason.clone() }, reason, false)
        }
    };
    slot.stats.coverage = coverage;
    LostLog { name: slot.stats.name.clone(), reason, restarted }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashSet};
    use std::sync::Mutex;

    use proptest::prelude::*;

    use super::*;
    use crate::device::{DataFd, DeviceIdentity, PrecopyInfo};
    use crate::fsm::{Caps, State};

    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;

    fn r(iova: u64, length: u64) -> IovaRange {
        IovaRange { iova, length }
    }

    /// What a [`LoggingOnlyDevice`] does; tests change it between calls.
    #[derive(Clone, Debug)]
    struct Behaviour {
        probe: Result<bool, Errno>,
        max_ranges: usize,
        /// The driver clamps the requested page size into this interval (like mlx5).
        page_size_min: u64,
        page_size_max: u64,
        start_error: Option<Errno>,
        /// Fail the report call with this 0-based index (counted over the device's life).
        report_error_at: Option<(usize, Errno)>,
        stop_error: Option<Errno>,
    }

    impl Default for Behaviour {
        fn default() -> Behaviour {
            Behaviour {
                probe: Ok(true),
                max_ranges: KERNEL_MAX_RANGES,
                page_size_min: 4096,
                page_size_max: 1 << 30,
                start_error: None,
                report_error_at: None,
                stop_error: None,
            }
        }
    }

    #[derive(Debug, Default)]
    struct Log {
        behaviour: Behaviour,
        /// START ranges and the chosen page size while logging.
        session: Option<(Vec<IovaRange>, u64)>,
        /// Dirty granules: (START range index, granule index within the range). Granules
        /// are relative to the range start, like pds's per-region bitmaps.
        dirty: BTreeSet<(usize, u64)>,
        calls: Vec<&'static str>,
        reports: usize,
        max_report_words: usize,
    }

    /// A test device that only does DMA logging, with the kernel core's START/REPORT
    /// checks and injectable failures. Every other operation answers ENOTTY.
    #[derive(Debug)]
    struct LoggingOnlyDevice {
        name: String,
        log: Mutex<Log>,
    }

    impl LoggingOnlyDevice {
        fn new(name: &str, behaviour: Behaviour) -> Arc<LoggingOnlyDevice> {
            Arc::new(LoggingOnlyDevice {
                name: name.to_owned(),
                log: Mutex::new(Log { behaviour, ..Log::default() }),
            })
        }

        fn error(&self, op: Op, errno: Errno) -> DeviceError {
            DeviceError::os(&self.name, op, errno)
        }

        fn set(&self, change: impl FnOnce(&mut Behaviour)) {
            change(&mut self.log.lock().unwrap().behaviour);
        }

        fn calls(&self) -> Vec<&'static str> {
            self.log.lock().unwrap().calls.clone()
        }

        fn session(&self) -> Option<(Vec<IovaRange>, u64)> {
            self.log.lock().unwrap().session.clone()
        }

        /// A DMA write by the device: logged at its granularity if it hits a START range.
        fn dma_write(&self, iova: u64, length: u64) {
            let mut log = self.log.lock().unwrap();
            let Some((ranges, page_size)) = log.session.clone() else { return };
            for (index, range) in ranges.iter().enumerate() {
                let (start, end) = (iova.max(range.iova), (iova + length).min(range.end()));
                if start < end {
                    for granule in (start - range.iova) / page_size..=(end - 1 - range.iova) / page_size {
                        log.dirty.insert((index, granule));
                    }
                }
            }
        }
    }

    impl MigrationDevice for LoggingOnlyDevice {
        fn name(&self) -> &str {
            &self.name
        }

        fn identity(&self) -> DeviceIdentity {
            DeviceIdentity { driver: "test".to_owned(), model: "logging-only".to_owned() }
        }

        fn caps(&self) -> Result<Caps, DeviceError> {
            Err(self.error(Op::ProbeMigration, Errno::ENOTTY))
        }

        fn state(&self) -> Result<State, DeviceError> {
            Err(self.error(Op::GetState, Errno::ENOTTY))
        }

        fn set_state(&self, target: State) -> Result<Option<DataFd>, DeviceError> {
            Err(self.error(Op::SetState(target), Errno::ENOTTY))
        }

        fn data_size(&self) -> Result<u64, DeviceError> {
            Err(self.error(Op::DataSize, Errno::ENOTTY))
        }

        fn precopy_info(&self, _: &DataFd) -> Result<PrecopyInfo, DeviceError> {
            Err(self.error(Op::PrecopyInfo, Errno::ENOTTY))
        }

        fn dma_logging_supported(&self) -> Result<bool, DeviceError> {
            let mut log = self.log.lock().unwrap();
            log.calls.push("probe");
            log.behaviour.probe.map_err(|errno| self.error(Op::ProbeDmaLogging, errno))
        }

        fn dma_logging_start(&self, ranges: &[IovaRange], page_size: u64) -> Result<u64, DeviceError> {
            let mut log = self.log.lock().unwrap();
            log.calls.push("start");
            let fail = |errno| Err(self.error(Op::DmaLoggingStart, errno));
            if let Some(errno) = log.behaviour.start_error {
                return fail(errno);
            }
            if log.session.is_some() || ranges.is_empty() {
                return fail(Errno::EINVAL);
            }
            if ranges.len() > log.behaviour.max_ranges {
                return fail(Errno::E2BIG);
            }
            if ranges.iter().any(|r| r.iova % page_size != 0 || r.length % page_size != 0 || r.length == 0) {
                return fail(Errno::EINVAL);
            }
            let mut sorted = ranges.to_vec();
            sorted.sort();
            if sorted.windows(2).any(|w| w[0].end() > w[1].iova) {
                return fail(Errno::EINVAL);
            }
            let chosen = page_size.clamp(log.behaviour.page_size_min, log.behaviour.page_size_max);
            log.session = Some((ranges.to_vec(), chosen));
            log.dirty.clear();
            Ok(chosen)
        }

        fn dma_logging_stop(&self) -> Result<(), DeviceError> {
            let mut log = self.log.lock().unwrap();
            log.calls.push("stop");
            if let Some(errno) = log.behaviour.stop_error {
                return Err(self.error(Op::DmaLoggingStop, errno));
            }
            log.session = None;
            log.dirty.clear();
            Ok(())
        }

        fn dma_logging_report(
            &self,
            iova: u64,
            length: u64,
            page_size: u64,
            bitmap: &mut [u64],
        ) -> Result<(), DeviceError> {
            let mut log = self.log.lock().unwrap();
            log.calls.push("report");
            let call = log.reports;
            log.reports += 1;
            log.max_report_words = log.max_report_words.max(bitmap.len());
            let fail = |errno| Err(self.error(Op::DmaLoggingReport, errno));
            let Some((ranges, granule_size)) = log.session.clone() else { return fail(Errno::EINVAL) };
            if length == 0 || !page_size.is_power_of_two() || page_size < 4096 {
                return fail(Errno::EINVAL);
            }
            // pds: a report window must lie inside one tracked range.
            let Some(index) = ranges.iter().position(|r| r.iova <= iova && iova + length <= r.end()) else {
                return fail(Errno::EINVAL);
            };
            if (bitmap.len() as u64) < length.div_ceil(page_size).div_ceil(64) {
                return fail(Errno::EFAULT);
            }
            let range = ranges[index];
            let in_window: Vec<(usize, u64)> = log
                .dirty
                .iter()
                .copied()
                .filter(|&(i, g)| {
                    let start = range.iova + g * granule_size;
                    i == index && start < iova + length && start + granule_size > iova
                })
                .collect();
            for key in &in_window {
                log.dirty.remove(key);
            }
            if let Some((at, errno)) = log.behaviour.report_error_at
                && at == call
            {
                return fail(errno);
            }
            for (_, granule) in in_window {
                let start = (range.iova + granule * granule_size).max(iova);
                let end = (range.iova + (granule + 1) * granule_size).min(range.end()).min(iova + length);
                for n in (start - iova) / page_size..=(end - 1 - iova) / page_size {
                    bitmap[(n / 64) as usize] |= 1 << (n % 64);
                }
            }
            Ok(())
        }

        fn reset(&self) -> Result<(), DeviceError> {
            Err(self.error(Op::Reset, Errno::ENOTTY))
        }
    }

    fn group_tracker(
        devices: &[&Arc<LoggingOnlyDevice>],
        guest: &[IovaRange],
        config: TrackerConfig,
    ) -> DirtyTracker {
        let devices: Vec<Arc<dyn MigrationDevice>> =
            devices.iter().map(|d| Arc::clone(*d) as Arc<dyn MigrationDevice>).collect();
        DirtyTracker::for_devices(&devices, guest, config).unwrap()
    }

    fn stats_of<'a>(tracker: &'a DirtyTracker, name: &str) -> &'a SourceStats {
        tracker.stats().find(|s| s.name == name).unwrap()
    }

    fn dirty_pages(bitmap: &DirtyBitmap) -> BTreeSet<u64> {
        bitmap
            .dirty_ranges()
            .flat_map(|r| r.iova / bitmap.page_size()..r.end() / bitmap.page_size())
            .collect()
    }

    /// The group pages a device's writes must produce: each write dirties the device's
    /// granules (relative to its START ranges), and each granule every group page it
    /// touches inside the guest ranges.
    fn model_pages(
        device: &LoggingOnlyDevice,
        writes: &[(u64, u64)],
        group: &DirtyBitmap,
        into: &mut BTreeSet<u64>,
    ) {
        let (ranges, granule) = device.session().expect("device is logging");
        let page = group.page_size();
        for &(iova, length) in writes {
            for range in &ranges {
                let (start, end) = (iova.max(range.iova), (iova + length).min(range.end()));
                if start >= end {
                    continue;
                }
                for g in (start - range.iova) / granule..=(end - 1 - range.iova) / granule {
                    let g_start = range.iova + g * granule;
                    let g_end = (g_start + granule).min(range.end());
                    for tracked in group.ranges() {
                        let (s, e) = (g_start.max(tracked.iova), g_end.min(tracked.end()));
                        if s < e {
                            into.extend(s / page..e.div_ceil(page));
                        }
                    }
                }
            }
        }
    }

    const GUEST: [IovaRange; 3] = [
        IovaRange { iova: 0, length: 8 * MIB },
        IovaRange { iova: 16 * MIB, length: 4 * MIB },
        IovaRange { iova: 1 << 32, length: 2 * MIB },
    ];

    #[test]
    fn start_is_all_or_nothing_and_names_the_failing_device() {
        let a = LoggingOnlyDevice::new("a", Behaviour::default());
        let no_probe =
            LoggingOnlyDevice::new("no-probe", Behaviour { probe: Ok(false), ..Behaviour::default() });
        let no_ops =
            LoggingOnlyDevice::new("no-ops", Behaviour { probe: Err(Errno::ENOTTY), ..Behaviour::default() });
        let d = LoggingOnlyDevice::new("d", Behaviour::default());
        let broken = LoggingOnlyDevice::new(
            "broken",
            Behaviour { start_error: Some(Errno::EIO), ..Behaviour::default() },
        );
        let f = LoggingOnlyDevice::new("f", Behaviour::default());
        let mut tracker =
            group_tracker(&[&a, &no_probe, &no_ops, &d, &broken, &f], &GUEST, TrackerConfig::default());

        let err = tracker.start().unwrap_err();
        match &err {
            TrackerError::Start { device, error, rollback_failures } => {
                assert_eq!(device, "broken");
                assert_eq!(error.errno, Errno::EIO);
                assert!(rollback_failures.is_empty());
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains("broken"), "{err}");
        assert!(!tracker.is_active());
        // Started devices were stopped again; the one after the failure was only probed
        // (to choose its source), never started.
        assert_eq!(a.calls(), ["probe", "start", "stop"]);
        assert_eq!(d.calls(), ["probe", "start", "stop"]);
        assert!(a.session().is_none() && d.session().is_none());
        assert_eq!(f.calls(), ["probe"]);
        assert_eq!(no_probe.calls(), ["probe"]);
        assert_eq!(stats_of(&tracker, "a").coverage, Coverage::Idle);
        assert!(matches!(tracker.report(), Err(TrackerError::NotStarted)));

        // Once the device recovers, the same tracker starts.
        broken.set(|b| b.start_error = None);
        tracker.start().unwrap();
        assert!(tracker.is_active());
        assert!(matches!(tracker.start(), Err(TrackerError::AlreadyStarted)));
        assert!(!tracker.fully_covered());
        let covered = stats_of(&tracker, "f");
        assert_eq!(covered.coverage_source(), "dma-logging");
        assert_eq!(covered.page_size, Some(4096));
        let not_covered = stats_of(&tracker, "no-probe");
        assert_eq!(not_covered.coverage_source(), "none");
        assert!(not_covered.coverage_reason().unwrap().contains("PROBE"));
        let not_covered = stats_of(&tracker, "no-ops");
        assert_eq!(not_covered.coverage_source(), "none");
        assert!(not_covered.coverage_reason().unwrap().contains("unsupported"), "{not_covered:?}");
        tracker.stop().unwrap();
        assert!(a.session().is_none() && broken.session().is_none() && f.session().is_none());
    }

    #[test]
    fn rollback_failures_are_reported_with_the_start_failure() {
        let a =
            LoggingOnlyDevice::new("a", Behaviour { stop_error: Some(Errno::EIO), ..Behaviour::default() });
        let b = LoggingOnlyDevice::new(
            "b",
            Behaviour { start_error: Some(Errno::ENODEV), ..Behaviour::default() },
        );
        let mut tracker = group_tracker(&[&a, &b], &GUEST, TrackerConfig::default());
        let err = tracker.start().unwrap_err();
        let TrackerError::Start { device, rollback_failures, .. } = &err else { panic!("{err:?}") };
        assert_eq!(device, "b");
        assert_eq!(rollback_failures.len(), 1);
        assert_eq!(rollback_failures[0].device, "a");
        assert!(err.to_string().contains("rolling back also failed"), "{err}");
        // The device that could not be stopped is retried by stop().
        a.set(|b| b.stop_error = None);
        tracker.stop().unwrap();
        assert!(a.session().is_none());
    }

    #[test]
    fn unsupported_at_start_is_not_a_failure() {
        let a = LoggingOnlyDevice::new("a", Behaviour::default());
        let too_big = LoggingOnlyDevice::new(
            "too-big",
            Behaviour { start_error: Some(Errno::EOPNOTSUPP), ..Behaviour::default() },
        );
        let mut tracker = group_tracker(&[&a, &too_big], &GUEST, TrackerConfig::default());
        tracker.start().unwrap();
        let stats = stats_of(&tracker, "too-big");
        assert!(matches!(stats.coverage, Coverage::NotCovered { .. }));
        assert!(stats.coverage_reason().unwrap().contains("DMA_LOGGING_START"));
        tracker.report().unwrap();
        tracker.stop().unwrap();
        assert_eq!(too_big.calls(), ["probe", "start"]);
    }

    #[test]
    fn e2big_replans_with_fewer_ranges() {
        let guest: Vec<IovaRange> = (0..5).map(|i| r(i * 4 * MIB, MIB)).collect();
        let dev = LoggingOnlyDevice::new("dev", Behaviour { max_ranges: 2, ..Behaviour::default() });
        let mut tracker = group_tracker(&[&dev], &guest, TrackerConfig::default());
        tracker.start().unwrap();
        assert_eq!(dev.calls(), ["probe", "start", "start"]);
        let (ranges, _) = dev.session().unwrap();
        assert_eq!(ranges.len(), 2);
        // The merged ranges cover holes; a write in a guest range is still found exactly.
        dev.dma_write(12 * MIB + 5, 1);
        assert_eq!(tracker.report().unwrap().new_dirty_pages, 1);
        assert!(tracker.bitmap().is_dirty(12 * MIB));
    }

    #[test]
    fn stale_session_is_stopped_and_start_retried_once() {
        let dev = LoggingOnlyDevice::new("dev", Behaviour::default());
        dev.dma_logging_start(&[r(0, 4096)], 4096).unwrap();
        let mut tracker = group_tracker(&[&dev], &GUEST, TrackerConfig::default());
        tracker.start().unwrap();
        assert_eq!(dev.calls(), ["start", "probe", "start", "stop", "start"]);
        assert_eq!(dev.session().unwrap().0.len(), 3);

        // A device that keeps refusing fails after the one retry.
        let stuck = LoggingOnlyDevice::new(
            "stuck",
            Behaviour { start_error: Some(Errno::EEXIST), ..Behaviour::default() },
        );
        let mut tracker = group_tracker(&[&stuck], &GUEST, TrackerConfig::default());
        let err = tracker.start().unwrap_err();
        assert!(
            matches!(&err, TrackerError::Start { device, error, .. } if device == "stuck" && error.errno == Errno::EEXIST)
        );
        assert_eq!(stuck.calls(), ["probe", "start", "stop", "start"]);
    }

    #[test]
    fn a_failed_report_marks_the_whole_range_dirty_and_restarts_logging() {
        let good = LoggingOnlyDevice::new("good", Behaviour::default());
        let flaky = LoggingOnlyDevice::new(
            "flaky",
            Behaviour { report_error_at: Some((1, Errno::EIO)), ..Behaviour::default() },
        );
        let mut tracker = group_tracker(&[&good, &flaky], &GUEST, TrackerConfig::default());
        tracker.start().unwrap();
        good.dma_write(0, 1);
        flaky.dma_write(16 * MIB, 1);
        let round = tracker.report().unwrap();
        // Report call 1 of "flaky" (its second START range) failed.
        assert_eq!(round.lost.len(), 1);
        assert_eq!(round.lost[0].name, "flaky");
        assert!(round.lost[0].restarted);
        assert_eq!(tracker.bitmap().count(), tracker.bitmap().pages());
        assert_eq!(round.new_dirty_pages, tracker.bitmap().pages());
        let stats = stats_of(&tracker, "flaky");
        assert_eq!(stats.report_errors, 1);
        assert_eq!(stats.last_error.as_ref().unwrap().errno, Errno::EIO);
        assert_eq!(stats.coverage_source(), "dma-logging");
        assert!(matches!(stats.coverage, Coverage::Tracking { .. }));
        assert!(flaky.calls().ends_with(&["stop", "probe", "start"]), "{:?}", flaky.calls());

        // The next round is precise again.
        let all_pages = tracker.bitmap().pages();
        assert_eq!(tracker.export_and_clear().dirty_pages(), all_pages);
        assert_eq!(tracker.bitmap().count(), 0);
        flaky.dma_write(17 * MIB, 1);
        let round = tracker.report().unwrap();
        assert!(round.lost.is_empty());
        assert_eq!(dirty_pages(tracker.bitmap()), BTreeSet::from([17 * MIB / 4096]));
    }

    #[test]
    fn a_log_that_cannot_restart_is_reported_all_dirty_every_round() {
        let dev = LoggingOnlyDevice::new(
            "dev",
            Behaviour { report_error_at: Some((0, Errno::EIO)), ..Behaviour::default() },
        );
        let mut tracker = group_tracker(&[&dev], &GUEST, TrackerConfig::default());
        tracker.start().unwrap();
        dev.set(|b| b.start_error = Some(Errno::EIO));
        let round = tracker.report().unwrap();
        assert!(!round.lost[0].restarted);
        assert!(round.lost[0].reason.contains("restart failed"), "{}", round.lost[0].reason);
        assert!(matches!(stats_of(&tracker, "dev").coverage, Coverage::Lost { .. }));
        assert_eq!(stats_of(&tracker, "dev").coverage_source(), "dma-logging");
        assert!(!tracker.fully_covered());

        tracker.take_dirty();
        let round = tracker.report().unwrap();
        assert_eq!(round.new_dirty_pages, tracker.bitmap().pages());
        assert!(!round.lost[0].restarted);

        dev.set(|b| b.start_error = None);
        tracker.take_dirty();
        let round = tracker.report().unwrap();
        assert!(round.lost[0].restarted);
        assert!(tracker.fully_covered());
        tracker.take_dirty();
        dev.dma_write(4096, 1);
        let round = tracker.report().unwrap();
        assert!(round.lost.is_empty());
        assert_eq!(round.new_dirty_pages, 1);
    }

    #[test]
    fn stop_tries_every_device_collects_errors_and_is_idempotent() {
        let a = LoggingOnlyDevice::new("a", Behaviour::default());
        let b = LoggingOnlyDevice::new("b", Behaviour::default());
        let c = LoggingOnlyDevice::new("c", Behaviour::default());
        let mut tracker = group_tracker(&[&a, &b, &c], &GUEST, TrackerConfig::default());
        tracker.start().unwrap();
        a.set(|x| x.stop_error = Some(Errno::EIO));
        c.set(|x| x.stop_error = Some(Errno::ENODEV));
        let err = tracker.stop().unwrap_err();
        let TrackerError::Stop { failures } = &err else { panic!("{err:?}") };
        let names: Vec<&str> = failures.iter().map(|e| e.device.as_str()).collect();
        assert_eq!(names, ["a", "c"]);
        assert!(b.session().is_none());
        assert!(!tracker.is_active());

        // Only the devices that failed are tried again.
        a.set(|x| x.stop_error = None);
        c.set(|x| x.stop_error = None);
        tracker.stop().unwrap();
        assert_eq!(a.calls().iter().filter(|c| **c == "stop").count(), 2);
        assert_eq!(b.calls().iter().filter(|c| **c == "stop").count(), 1);
        tracker.stop().unwrap();
        assert_eq!(a.calls().iter().filter(|c| **c == "stop").count(), 2);
        assert_eq!(stats_of(&tracker, "a").coverage, Coverage::Idle);
    }

    #[test]
    fn dropping_a_started_tracker_stops_logging() {
        let dev = LoggingOnlyDevice::new("dev", Behaviour::default());
        let mut tracker = group_tracker(&[&dev], &GUEST, TrackerConfig::default());
        tracker.start().unwrap();
        drop(tracker);
        assert!(dev.session().is_none());
    }

    #[test]
    fn one_tebibyte_range_is_reported_in_kernel_sized_windows() {
        let dev = LoggingOnlyDevice::new("dev", Behaviour::default());
        let mut tracker = group_tracker(&[&dev], &[r(0, 1 << 40)], TrackerConfig::default());
        tracker.start().unwrap();
        dev.dma_write((1 << 40) - 1, 1);
        let round = tracker.report().unwrap();
        assert_eq!(round.new_dirty_pages, 1);
        let log = dev.log.lock().unwrap();
        // 2^28 pages = 32 MiB of bitmap = 16 windows of 2 MiB, each exactly 2 MiB.
        assert_eq!(log.reports, 16);
        assert_eq!(log.max_report_words, DEFAULT_REPORT_WINDOW_BYTES / 8);
        drop(log);
        let stats = stats_of(&tracker, "dev");
        assert_eq!((stats.windows, stats.windows_in_place), (16, 16));
    }

    #[test]
    fn reports_go_in_place_only_when_page_sizes_line_up() {
        let same = LoggingOnlyDevice::new("same", Behaviour::default());
        let coarse =
            LoggingOnlyDevice::new("coarse", Behaviour { page_size_min: 64 * KIB, ..Behaviour::default() });
        let config = TrackerConfig { report_window_bytes: 64, ..TrackerConfig::default() };
        let mut tracker = group_tracker(&[&same, &coarse], &GUEST, config);
        tracker.start().unwrap();
        same.dma_write(3 * MIB, 10);
        coarse.dma_write(5 * MIB + 3, 1);
        let round = tracker.report().unwrap();
        assert_eq!(round.new_dirty_pages, 1 + 16);
        let same_stats = stats_of(&tracker, "same");
        assert!(same_stats.windows > 3);
        assert_eq!(same_stats.windows, same_stats.windows_in_place);
        assert_eq!(stats_of(&tracker, "same").dirty_pages_found, 1);
        let coarse_stats = stats_of(&tracker, "coarse");
        assert_eq!(coarse_stats.windows_in_place, 0);
        assert_eq!(coarse_stats.page_size, Some(64 * KIB));
        assert_eq!(coarse_stats.dirty_pages_found, 16);
        // Never more than the window's bitmap bytes per call.
        assert!(same.log.lock().unwrap().max_report_words <= 8);
        assert!(coarse.log.lock().unwrap().max_report_words <= 8);
    }

    #[test]
    fn configuration_errors_are_typed() {
        let dev: Arc<dyn MigrationDevice> = LoggingOnlyDevice::new("dev", Behaviour::default());
        let bad_window = TrackerConfig { report_window_bytes: 4, ..TrackerConfig::default() };
        assert!(matches!(
            DirtyTracker::for_devices(&[Arc::clone(&dev)], &GUEST, bad_window),
            Err(TrackerError::WindowTooSmall(4))
        ));
        let no_ranges = TrackerConfig { max_ranges: 0, ..TrackerConfig::default() };
        assert!(matches!(
            DirtyTracker::for_devices(&[Arc::clone(&dev)], &GUEST, no_ranges),
            Err(TrackerError::Ranges(RangeError::NoRangesAllowed))
        ));
        assert!(matches!(
            DirtyTracker::for_devices(&[dev], &[r(0, 0)], TrackerConfig::default()),
            Err(TrackerError::Bitmap(BitmapError::Ranges(RangeError::ZeroLength { .. })))
        ));
    }

    #[derive(Clone, Debug)]
    struct DeviceCase {
        page_size: u64,
        max_ranges: usize,
        /// Writes as (guest range index, offset fraction in 1/1024, length).
        writes: Vec<Vec<(usize, u64, u64)>>,
    }

    fn arb_device(rounds: usize) -> impl Strategy<Value = DeviceCase> {
        (
            prop::sample::select(vec![4096u64, 8192, 64 * KIB, 2 * MIB]),
            prop::sample::select(vec![1usize, 2, 3, 256]),
            prop::collection::vec(
                prop::collection::vec((0usize..8, 0u64..1024, 1u64..(40 * KIB)), 0..12),
                rounds,
            ),
        )
            .prop_map(|(page_size, max_ranges, writes)| DeviceCase { page_size, max_ranges, writes })
    }

    fn arb_guest() -> impl Strategy<Value = Vec<IovaRange>> {
        (
            prop::sample::select(vec![0u64, 1 << 32, 1 << 40]),
            prop::collection::vec((0u64..(48 * MIB), 1u64..(6 * MIB)), 1..6),
        )
            .prop_map(|(base, ranges)| ranges.into_iter().map(|(i, l)| r(base + i, l)).collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        /// Devices with their own page sizes and range limits write into the guest; after
        /// each round the group bitmap holds exactly the group pages their logs cover.
        #[test]
        fn group_bitmap_equals_the_model(
            guest in arb_guest(),
            group_page in prop::sample::select(vec![4096u64, 16 * KIB]),
            window_bytes in prop::sample::select(vec![8usize, 24, 256, 2 << 20]),
            max_ranges in prop::sample::select(vec![1usize, 2, 256]),
            devices in prop::collection::vec(arb_device(2), 1..4),
        ) {
            let fakes: Vec<Arc<LoggingOnlyDevice>> = devices
                .iter()
                .enumerate()
                .map(|(i, case)| {
                    LoggingOnlyDevice::new(&format!("dev{i}"), Behaviour {
                        max_ranges: case.max_ranges,
                        page_size_min: case.page_size,
                        page_size_max: case.page_size,
                        ..Behaviour::default()
                    })
                })
                .collect();
            let refs: Vec<&Arc<LoggingOnlyDevice>> = fakes.iter().collect();
            let config = TrackerConfig { page_size: group_page, max_ranges, report_window_bytes: window_bytes };
            let mut tracker = group_tracker(&refs, &guest, config);
            tracker.start().unwrap();
            prop_assert!(tracker.fully_covered());
            for (device, case) in fakes.iter().zip(&devices) {
                let (ranges, page_size) = device.session().unwrap();
                prop_assert!(ranges.len() <= case.max_ranges.min(max_ranges));
                prop_assert_eq!(page_size, case.page_size);
            }
            for round in 0..2 {
                let mut model = BTreeSet::new();
                for (device, case) in fakes.iter().zip(&devices) {
                    let writes: Vec<(u64, u64)> = case.writes[round]
                        .iter()
                        .map(|&(range, fraction, length)| {
                            let target = guest[range % guest.len()];
                            let iova = target.iova + target.length * fraction / 1024;
                            (iova, length.min(target.end() - iova).max(1))
                        })
                        .collect();
                    for &(iova, length) in &writes {
                        device.dma_write(iova, length);
                    }
                    model_pages(device, &writes, tracker.bitmap(), &mut model);
                }
                let report = tracker.report().unwrap();
                prop_assert!(report.lost.is_empty());
                prop_assert_eq!(report.new_dirty_pages, model.len() as u64);
                prop_assert_eq!(dirty_pages(tracker.bitmap()), model);
                let found: u64 = tracker.stats().map(|s| s.last_dirty_pages).sum();
                prop_assert_eq!(found, report.new_dirty_pages);
                tracker.take_dirty();
            }
            tracker.stop().unwrap();
            let widest: HashSet<usize> = fakes.iter().map(|d| d.log.lock().unwrap().max_report_words).collect();
            for words in widest {
                prop_assert!(words <= window_bytes / 8);
            }
        }
    }
}
