//! Dirty tracking per group, as the control API offers it: one [`DirtyTracker`] per
//! group, started and stopped on request, read and cleared by `GetDirtyPages`, stopped
//! when a migration of the group ends.
//!
//! Every tracker call blocks on device ioctls (and building a tracker allocates the group
//! bitmap, up to tens of MiB), so each runs on a blocking thread; the tracker's own mutex
//! is only ever taken there.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::device::{ErrorKind, IovaRange, MigrationDevice};
use crate::dirty::bitmap::DEFAULT_PAGE_SIZE;
use crate::dirty::{Coverage, DirtyExport, DirtyTracker, TrackerConfig, TrackerError};
use crate::engine::{Daemon, EngineError};

/// A group's tracker, shared between the calls that use it.
#[derive(Debug)]
pub struct GroupTracking {
    group: String,
    tracker: Mutex<DirtyTracker>,
}

impl GroupTracking {
    fn tracker(&self) -> MutexGuard<'_, DirtyTracker> {
        self.tracker.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// How one device is covered, and what its tracking found so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceCoverage {
    pub device: String,
    /// `"dma-logging"` (its own log) or `"iommufd-hwpt"` (the IOMMU, for a device
    /// without DMA logging) while covered, `"none"` otherwise.
    pub source: &'static str,
    /// The page size its source reads at, from the last successful start.
    pub page_size: Option<u64>,
    /// Why the device is not (precisely) covered.
    pub reason: Option<String>,
    /// Group pages its source turned dirty, over every round (a HWPT's figures are shared
    /// by every device on it).
    pub dirty_pages: u64,
    pub reports: u64,
    pub report_errors: u64,
    pub last_report_latency: Option<Duration>,
}

/// A group's dirty tracking as `StartDirtyTracking` / `StopDirtyTracking` answer it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyTrackingStatus {
    pub group: String,
    pub active: bool,
    /// Group bitmap granularity; 0 when the group is not tracked.
    pub page_size: u64,
    /// The tracked guest layout, page-aligned and sorted.
    pub ranges: Vec<IovaRange>,
    pub devices: Vec<DeviceCoverage>,
}

impl DirtyTrackingStatus {
    fn untracked(group: &str) -> DirtyTrackingStatus {
        DirtyTrackingStatus {
            group: group.to_owned(),
            active: false,
            page_size: 0,
            ranges: Vec::new(),
            devices: Vec::new(),
        }
    }

    fn of(group: &str, tracker: &DirtyTracker) -> DirtyTrackingStatus {
        let active = tracker.is_active();
        let devices = tracker
            .stats()
            .flat_map(|stats| {
                let reason = match &stats.coverage {
                    // Idle coverage only means "not started" before the first start.
                    Coverage::Idle if !active => Some("dirty tracking is stopped".to_owned()),
                    _ => stats.coverage_reason().map(str::to_owned),
                };
                stats.devices.iter().map(move |device| DeviceCoverage {
                    device: device.clone(),
                    source: stats.coverage_source(),
                    page_size: stats.page_size,
                    reason: reason.clone(),
                    dirty_pages: stats.dirty_pages_found,
                    reports: stats.reports,
                    report_errors: stats.report_errors,
                    last_report_latency: stats.last_report_latency,
                })
            })
            .collect();
        DirtyTrackingStatus {
            group: group.to_owned(),
            active,
            page_size: tracker.config().page_size,
            ranges: tracker.bitmap().ranges().to_vec(),
            devices,
        }
    }
}

impl Daemon {
    /// Starts dirty tracking over every device of `group`, for the guest layout `ranges`
    /// at `page_size` (0: 4096). Each device is tracked by its own DMA logging, or else by
    /// its dirty-tracking HWPT; devices with neither are reported as not covered. A
    /// source that fails to start fails the call, with every source stopped again.
    pub async fn start_dirty_tracking(
        &self,
        group: &str,
        ranges: Vec<IovaRange>,
        page_size: u64,
    ) -> Result<DirtyTrackingStatus, EngineError> {
        let def = self.registry.group(group)?;
        if ranges.is_empty() {
            return Err(EngineError::InvalidArgument(
                "`ranges` must give the guest's IOVA layout (at least one range)".to_owned(),
            ));
        }
        let devices = def
            .devices
            .iter()
            .map(|name| Ok(self.registry.device(name)?.device.clone()))
            .collect::<Result<Vec<Arc<dyn MigrationDevice>>, EngineError>>()?;
        let config = TrackerConfig {
            page_size: if page_size == 0 { DEFAULT_PAGE_SIZE } else { page_size },
            ..TrackerConfig::default()
        };
        let tracker = run_blocking(group, move || DirtyTracker::for_devices(&devices, &ranges, config))
            .await?
            .map_err(|e| tracker_error(group, e))?;
        let tracking = Arc::new(GroupTracking { group: group.to_owned(), tracker: Mutex::new(tracker) });
        {
            let mut trackers = lock(&self.dirty);
            if let Some(existing) = trackers.get(group) {
                // An entry is active, starting, or left by a stop that failed on a device.
                let why = match existing.tracker.try_lock().map(|t| t.is_active()) {
                    Ok(false) => {
                        "it is being stopped, or its last stop failed on a device: stop it again first"
                    }
                    _ => "it is already started",
                };
                return Err(EngineError::FailedPrecondition(format!(
                    "group `{group}`: cannot start dirty tracking: {why}"
                )));
            }
            trackers.insert(group.to_owned(), tracking.clone());
        }
        let starting = tracking.clone();
        let started = run_blocking(group, move || {
            let mut tracker = starting.tracker();
            tracker.start().map(|()| DirtyTrackingStatus::of(&starting.group, &tracker))
        })
        .await
        .and_then(|r| r.map_err(|e| tracker_error(group, e)));
        match started {
            Ok(status) => {
                let covered = status.devices.iter().filter(|d| d.source != "none").count();
                tracing::info!(group, covered, devices = status.devices.len(), "dirty tracking started");
                Ok(status)
            }
            Err(e) => {
                // Nothing is logging (the tracker stopped what it had started).
                self.forget_tracking(&tracking);
                Err(e)
            }
        }
    }

    /// Stops dirty tracking of `group`; a group that is not tracked is left as it is.
    /// Returns the final statistics. The group stays listed until every device stopped
    /// (a snapshot never says "inactive" while a device still logs); when a device fails
    /// to stop, the next call tries that device again.
    pub async fn stop_dirty_tracking(&self, group: &str) -> Result<DirtyTrackingStatus, EngineError> {
        self.registry.group(group)?;
        let Some(tracking) = lock(&self.dirty).get(group).cloned() else {
            return Ok(DirtyTrackingStatus::untracked(group));
        };
        let stopping = tracking.clone();
        let (stopped, status) = run_blocking(group, move || {
            let mut tracker = stopping.tracker();
            let result = tracker.stop();
            (result, DirtyTrackingStatus::of(&stopping.group, &tracker))
        })
        .await?;
        stopped.map_err(|e| tracker_error(group, e))?;
        self.forget_tracking(&tracking);
        tracing::info!(group, "dirty tracking stopped");
        Ok(status)
    }

    /// Reads every device's log and returns the pages dirtied since the previous call
    /// (or the start), clearing them.
    pub async fn dirty_pages(&self, group: &str) -> Result<DirtyExport, EngineError> {
        let tracking = self.group_tracking(group)?;
        run_blocking(group, move || {
            let mut tracker = tracking.tracker();
            let round = tracker.report()?;
            for lost in &round.lost {
                tracing::warn!(
                    group = tracking.group,
                    device = lost.name,
                    restarted = lost.restarted,
                    reason = lost.reason,
                    "dirty log lost: its whole range is reported dirty"
                );
            }
            Ok(tracker.export_and_clear())
        })
        .await?
        .map_err(|e| tracker_error(group, e))
    }

    /// The group's tracking now: coverage per device and statistics.
    pub async fn dirty_tracking(&self, group: &str) -> Result<DirtyTrackingStatus, EngineError> {
        self.registry.group(group)?;
        let Some(tracking) = lock(&self.dirty).get(group).cloned() else {
            return Ok(DirtyTrackingStatus::untracked(group));
        };
        // A report round may hold the tracker for a while: wait on a blocking thread.
        run_blocking(group, move || DirtyTrackingStatus::of(&tracking.group, &tracking.tracker())).await
    }

    /// Called when a migration of `group` has ended, whatever its outcome: the dirty log
    /// served that migration, and logging left on costs the devices throughput.
    pub(crate) async fn stop_dirty_tracking_after_job(&self, group: &str, job_id: &str) {
        if !lock(&self.dirty).contains_key(group) {
            return;
        }
        match self.stop_dirty_tracking(group).await {
            Ok(_) => tracing::info!(group, job = job_id, "dirty tracking stopped: the migration ended"),
            Err(e) => tracing::warn!(group, job = job_id, error = %e, "stopping dirty tracking failed"),
        }
    }

    /// Unlists `tracking`, unless a later start already replaced it.
    fn forget_tracking(&self, tracking: &Arc<GroupTracking>) {
        let mut trackers = lock(&self.dirty);
        if trackers.get(&tracking.group).is_some_and(|listed| Arc::ptr_eq(listed, tracking)) {
            trackers.remove(&tracking.group);
        }
    }

    fn group_tracking(&self, group: &str) -> Result<Arc<GroupTracking>, EngineError> {
        self.registry.group(group)?;
        lock(&self.dirty).get(group).cloned().ok_or_else(|| {
            EngineError::FailedPrecondition(format!("group `{group}`: dirty tracking is not started"))
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn run_blocking<T: Send + 'static>(
    group: &str,
    call: impl FnOnce() -> T + Send + 'static,
) -> Result<T, EngineError> {
    tokio::task::spawn_blocking(call).await.map_err(|join| {
        EngineError::Internal(format!("group `{group}`: dirty tracking thread failed: {join}"))
    })
}

/// The class of a tracker failure: bad layouts are the caller's; a device refusing the
/// ranges or busy with another session is a precondition; anything else is internal.
fn tracker_error(group: &str, e: TrackerError) -> EngineError {
    let text = format!("group `{group}`: {e}");
    match &e {
        TrackerError::Ranges(_) | TrackerError::Bitmap(_) | TrackerError::WindowTooSmall(_) => {
            EngineError::InvalidArgument(text)
        }
        TrackerError::AlreadyStarted | TrackerError::NotStarted => EngineError::FailedPrecondition(text),
        TrackerError::Start { error, .. } => match error.kind {
            ErrorKind::InvalidRequest | ErrorKind::TooManyRanges | ErrorKind::Overflow => {
                EngineError::InvalidArgument(text)
            }
            ErrorKind::Busy
            | ErrorKind::AlreadyActive
            | ErrorKind::PermissionDenied
            | ErrorKind::Gone
            | ErrorKind::NotFound
            | ErrorKind::BadFdUse => EngineError::FailedPrecondition(text),
            _ => EngineError::Internal(text),
        },
        TrackerError::Stop { .. } => EngineError::Internal(text),
    }
}
