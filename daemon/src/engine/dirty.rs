//! Dirty tracking per group, as the control API offers it: one [`DirtyTracker`] per
//! group, started and stopped on request, read and cleared by `GetDirtyPages`, stopped
//! when a migration of the group ends.
//!
//! Every tracker call blocks on device ioctls (and building a tracker allocates the group
//! bitmap, up to tens of MiB), so each runs on a blocking thread; the tracker's own mutex
//! is only ever taken there. Job snapshots show the statistics of their devices without
//! waiting for a report round: every tracker call publishes the status it leaves, and a
//! stop keeps the last statistics in the jobs of the group, so that a job that ended
//! still says which source covered each device and what it found.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::device::{ErrorKind, IovaRange, MigrationDevice};
use crate::dirty::bitmap::DEFAULT_PAGE_SIZE;
use crate::dirty::{Coverage, DirtyExport, DirtyTracker, HwptDirty, TrackerConfig, TrackerError};
use crate::engine::{Daemon, EngineError};
use crate::job::{Job, JobSnapshot};
use crate::registry::Registry;

/// The daemon's dirty tracking, by group.
pub(crate) type Trackers = Mutex<HashMap<String, Arc<GroupTracking>>>;

/// A group's tracker, shared between the calls that use it.
#[derive(Debug)]
pub struct GroupTracking {
    group: String,
    tracker: Mutex<DirtyTracker>,
    /// The status the last tracker call left, for readers that must not wait while a
    /// report round holds the tracker. Only written with the tracker locked.
    published: Mutex<DirtyTrackingStatus>,
    /// The dirty-tracking HWPTs the group's devices are attached to, each with a device
    /// on it: every one the tracker may read, now or after a fallback. Held, so that
    /// their keys stay unique while listed.
    hwpts: Vec<(Arc<dyn HwptDirty>, String)>,
}

impl GroupTracking {
    fn new(group: &str, tracker: DirtyTracker, hwpts: Vec<(Arc<dyn HwptDirty>, String)>) -> GroupTracking {
        GroupTracking {
            group: group.to_owned(),
            published: Mutex::new(DirtyTrackingStatus::of(group, &tracker)),
            tracker: Mutex::new(tracker),
            hwpts,
        }
    }

    fn tracker(&self) -> MutexGuard<'_, DirtyTracker> {
        lock(&self.tracker)
    }

    fn publish(&self, tracker: &DirtyTracker) -> DirtyTrackingStatus {
        let status = DirtyTrackingStatus::of(&self.group, tracker);
        lock(&self.published).clone_from(&status);
        status
    }

    fn published(&self) -> MutexGuard<'_, DirtyTrackingStatus> {
        lock(&self.published)
    }
}

/// How one device is covered, and what its tracking found so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceCoverage {
    pub device: String,
    /// `"dma-logging"` (its own log) or `"iommufd-hwpt"` (the IOMMU, for a device
    /// without DMA logging or whose logging START was refused) while covered, `"none"`
    /// otherwise.
    pub source: &'static str,
    /// The page size its source reads at, from the last successful start.
    pub page_size: Option<u64>,
    /// Why the device is not (precisely) covered, or why the IOMMU tracks a device that
    /// has DMA logging.
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
        // A device whose stop failed still logs: the group is not shown inactive before
        // a stop went through on every device.
        let active = tracker.is_active() || tracker.is_logging();
        let devices = tracker
            .stats()
            .flat_map(|stats| {
                stats.devices.iter().map(move |device| DeviceCoverage {
                    device: device.clone(),
                    source: stats.coverage_source(),
                    page_size: stats.page_size,
                    reason: match &stats.coverage {
                        // Idle coverage only means "not started" before the first start.
                        Coverage::Idle if !tracker.is_active() => {
                            Some("dirty tracking is stopped".to_owned())
                        }
                        _ => stats.device_reason(device).map(str::to_owned),
                    },
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
        let hwpts: Vec<(Arc<dyn HwptDirty>, String)> = def
            .devices
            .iter()
            .zip(&devices)
            .filter_map(|(name, device)| Some((device.dirty_tracking_hwpt()?, name.clone())))
            .collect();
        let config = TrackerConfig {
            page_size: if page_size == 0 { DEFAULT_PAGE_SIZE } else { page_size },
            ..TrackerConfig::default()
        };
        let tracker = run_blocking(group, move || DirtyTracker::for_devices(&devices, &ranges, config))
            .await?
            .map_err(|e| tracker_error(group, e))?;
        let tracking = Arc::new(GroupTracking::new(group, tracker, hwpts));
        {
            let mut trackers = lock(&self.dirty);
            if let Some(why) = shared_hwpt(&trackers, &tracking) {
                return Err(EngineError::FailedPrecondition(format!(
                    "group `{group}`: cannot start dirty tracking: {why}"
                )));
            }
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
            // Under the trackers' lock, so that a group deleted since it was looked up
            // above is never tracked, and a tracked group is never deleted.
            self.registry.mark_tracked(group)?;
            trackers.insert(group.to_owned(), tracking.clone());
        }
        let starting = tracking.clone();
        let (trackers, registry) = (self.dirty.clone(), self.registry.clone());
        let started = run_blocking(group, move || {
            let mut tracker = starting.tracker();
            let started = tracker.start().map(|()| starting.publish(&tracker));
            if started.is_err() {
                // Nothing is logging (the tracker stopped what it had started).
                forget_tracking(&trackers, &registry, &starting);
            }
            started
        })
        .await;
        match started {
            Ok(Ok(status)) => {
                let covered = status.devices.iter().filter(|d| d.source != "none").count();
                tracing::info!(group, covered, devices = status.devices.len(), "dirty tracking started");
                self.touch_jobs_on(group);
                Ok(status)
            }
            Ok(Err(e)) => Err(tracker_error(group, e)),
            Err(e) => {
                forget_tracking(&self.dirty, &self.registry, &tracking);
                Err(e)
            }
        }
    }

    /// Stops dirty tracking of `group`; a group that is not tracked is left as it is.
    /// Returns the final statistics. The group stays listed until every device stopped
    /// (a snapshot never says "inactive" while a device still logs); when a device fails
    /// to stop, the next call tries that device again.
    pub async fn stop_dirty_tracking(&self, group: &str) -> Result<DirtyTrackingStatus, EngineError> {
        self.stop_tracking(group, None).await
    }

    /// Stops `group`'s tracking, first keeping its statistics in the jobs of the group
    /// that have not ended, and in `ending` (the job whose end stops it).
    async fn stop_tracking(
        &self,
        group: &str,
        ending: Option<&Arc<Job>>,
    ) -> Result<DirtyTrackingStatus, EngineError> {
        self.registry.group(group)?;
        let Some(tracking) = lock(&self.dirty).get(group).cloned() else {
            if let Some(ending) = ending {
                // Tracking the group later must not show up in a job that has ended.
                ending.update(|s| {
                    s.dirty_tracking.get_or_insert_with(Vec::new);
                });
            }
            return Ok(DirtyTrackingStatus::untracked(group));
        };
        let mut jobs = self.jobs_on_group(group);
        if let Some(ending) = ending
            && !jobs.iter().any(|job| Arc::ptr_eq(job, ending))
        {
            jobs.push(ending.clone());
        }
        let (trackers, registry) = (self.dirty.clone(), self.registry.clone());
        let (stopped, status) = run_blocking(group, move || {
            let mut tracker = tracking.tracker();
            // Before the stop: afterwards a source no longer says what covered its devices.
            let last = DirtyTrackingStatus::of(&tracking.group, &tracker);
            for job in &jobs {
                keep_statistics(job, &last);
            }
            let result = tracker.stop();
            if result.is_ok() {
                // With the tracker still locked: whoever then sees it inactive can start
                // the group again at once.
                forget_tracking(&trackers, &registry, &tracking);
            }
            (result, tracking.publish(&tracker))
        })
        .await?;
        stopped.map_err(|e| tracker_error(group, e))?;
        tracing::info!(group, "dirty tracking stopped");
        Ok(status)
    }

    /// Reads every device's log and returns the pages dirtied since the previous call
    /// (or the start), clearing them.
    pub async fn dirty_pages(&self, group: &str) -> Result<DirtyExport, EngineError> {
        let tracking = self.group_tracking(group)?;
        let exported = run_blocking(group, move || {
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
            let export = tracker.export_and_clear();
            tracking.publish(&tracker);
            Ok(export)
        })
        .await?
        .map_err(|e| tracker_error(group, e));
        // The round moved the statistics that watchers of the group's jobs see.
        self.touch_jobs_on(group);
        exported
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

    /// Called when a migration has ended, whatever its outcome: the dirty log served that
    /// migration, and logging left on costs the devices throughput. The job keeps the
    /// statistics its group's tracking had at this stop (none if the group was not tracked).
    pub(crate) async fn stop_dirty_tracking_after_job(&self, job: &Arc<Job>) {
        let snapshot = job.snapshot();
        let (group, job_id) = (snapshot.group.as_str(), snapshot.job_id.as_str());
        match self.stop_tracking(group, Some(job)).await {
            // The group was not tracked.
            Ok(status) if status.page_size == 0 => {}
            Ok(_) => tracing::info!(group, job = job_id, "dirty tracking stopped: the migration ended"),
            Err(e) => tracing::warn!(group, job = job_id, error = %e, "stopping dirty tracking failed"),
        }
    }

    /// Called before a job that does not stop tracking (a destination's) ends: it keeps
    /// the statistics its devices have now.
    pub(crate) fn keep_dirty_statistics(&self, job: &Job) {
        let live = self.live_statistics(&job.snapshot());
        job.update(|s| match live {
            Some(live) => s.dirty_tracking = Some(live),
            None => {
                s.dirty_tracking.get_or_insert_with(Vec::new);
            }
        });
    }

    /// What the API shows of `job`: its snapshot with the dirty tracking statistics of
    /// its devices, live while the job has not ended and their group is tracked, else
    /// those the job kept.
    pub fn job_view(&self, job: &Job) -> JobSnapshot {
        let mut snapshot = job.snapshot();
        let ended = snapshot.status.is_finished() && snapshot.dirty_tracking.is_some();
        if !ended && let Some(live) = self.live_statistics(&snapshot) {
            snapshot.dirty_tracking = Some(live);
        }
        snapshot
    }

    /// Every tracked group's status as its last tracker call left it: without waiting for
    /// a report round in progress (metrics scrapes must not block on devices).
    pub fn published_dirty_tracking(&self) -> Vec<DirtyTrackingStatus> {
        let mut published: Vec<DirtyTrackingStatus> =
            lock(&self.dirty).values().map(|tracking| tracking.published().clone()).collect();
        published.sort_by(|a, b| a.group.cmp(&b.group));
        published
    }

    /// The published statistics of the job's devices whose group is being tracked.
    fn live_statistics(&self, job: &JobSnapshot) -> Option<Vec<DeviceCoverage>> {
        let groups: Vec<(&str, String)> = job
            .devices
            .iter()
            .filter_map(|d| Some((d.name.as_str(), self.group_of_job_device(job, &d.name)?)))
            .collect();
        let trackers = lock(&self.dirty);
        let live: Vec<DeviceCoverage> = groups
            .iter()
            .filter_map(|(device, group)| {
                let published = trackers.get(group)?.published();
                if !published.active {
                    return None;
                }
                published.devices.iter().find(|d| d.device == *device).cloned()
            })
            .collect();
        (!live.is_empty()).then_some(live)
    }

    /// A source job migrates its group; a destination job's devices may belong to a
    /// group of this daemon.
    fn group_of_job_device(&self, job: &JobSnapshot, device: &str) -> Option<String> {
        if job.group.is_empty() { self.registry.group_of(device) } else { Some(job.group.clone()) }
    }

    /// The jobs that have not ended and hold a device of `group`.
    fn jobs_on_group(&self, group: &str) -> Vec<Arc<Job>> {
        self.jobs
            .list()
            .into_iter()
            .filter(|job| {
                let s = job.snapshot();
                !s.status.is_finished()
                    && s.devices
                        .iter()
                        .any(|d| self.group_of_job_device(&s, &d.name).as_deref() == Some(group))
            })
            .collect()
    }

    fn touch_jobs_on(&self, group: &str) {
        for job in self.jobs_on_group(group) {
            job.touch();
        }
    }

    /// Unlists `tracking`, unless a later start already replaced it.
    fn group_tracking(&self, group: &str) -> Result<Arc<GroupTracking>, EngineError> {
        self.registry.group(group)?;
        lock(&self.dirty).get(group).cloned().ok_or_else(|| {
            EngineError::FailedPrecondition(format!("group `{group}`: dirty tracking is not started"))
        })
    }
}

/// Why `tracking` must not start beside the trackers already listed: a HWPT one of its
/// devices is attached to is one another group's tracker may read. Reading a HWPT's dirty
/// bitmap clears it for every reader (and enabling tracking clears it too), so two
/// trackers of one HWPT would each lose the pages the other read: pages the memory
/// migration would then never re-send.
fn shared_hwpt(trackers: &HashMap<String, Arc<GroupTracking>>, tracking: &GroupTracking) -> Option<String> {
    trackers.values().filter(|other| other.group != tracking.group).find_map(|other| {
        tracking.hwpts.iter().find_map(|(hwpt, device)| {
            let (_, theirs) = other.hwpts.iter().find(|(their, _)| their.key() == hwpt.key())?;
            Some(format!(
                "device `{device}` is attached to {}, as is device `{theirs}` of group `{}`, \
                 which is tracked; reading a HWPT clears its dirty bits for every reader, so \
                 a HWPT is tracked for one group at a time",
                hwpt.label(),
                other.group
            ))
        })
    })
}

/// Takes `tracking` out of the table, if it is still the group's entry, and frees the
/// group for deletion and new members.
fn forget_tracking(trackers: &Trackers, registry: &Registry, tracking: &Arc<GroupTracking>) {
    let mut trackers = lock(trackers);
    if trackers.get(&tracking.group).is_some_and(|listed| Arc::ptr_eq(listed, tracking)) {
        trackers.remove(&tracking.group);
        registry.unmark_tracked(&tracking.group);
    }
}

/// Keeps `status`'s statistics of the job's devices in the job; those of its devices in
/// other groups stay as they were.
fn keep_statistics(job: &Job, status: &DirtyTrackingStatus) {
    job.update(|s| {
        let mut kept = s.dirty_tracking.take().unwrap_or_default();
        kept.retain(|d| !status.devices.iter().any(|stopped| stopped.device == d.device));
        kept.extend(status.devices.iter().filter(|d| s.devices.iter().any(|j| j.name == d.device)).cloned());
        kept.sort_by_key(|d| s.devices.iter().position(|j| j.name == d.device));
        s.dirty_tracking = Some(kept);
    });
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
