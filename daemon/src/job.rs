//! Jobs: one migration of one group, on either side. A job has an identity chosen by the
//! control plane (so a retried start is idempotent), a phase, per-device progress, phase
//! timestamps and the measured downtime. Watchers get a fresh snapshot on every change.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::engine::dirty::DeviceCoverage;
use crate::fsm::State;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Source,
    Destination,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Source => "source",
            Role::Destination => "destination",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JobStatus {
    Running,
    Succeeded,
    /// Failed before commit; the source's devices run again.
    RolledBack,
    /// Cancelled before commit; the source's devices run again.
    Cancelled,
    /// Failed after commit, or a rollback itself failed: needs an operator.
    Failed,
    /// The link died between "loaded" and the delivery of "commit"; see `engine::commit`.
    InDoubt,
}

impl JobStatus {
    pub fn is_finished(self) -> bool {
        !matches!(self, JobStatus::Running | JobStatus::InDoubt)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::RolledBack => "rolled_back",
            JobStatus::Cancelled => "cancelled",
            JobStatus::Failed => "failed",
            JobStatus::InDoubt => "in_doubt",
        }
    }
}

/// Phases of both sides (the names appear in logs, the API and the CLI).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    Created,
    // source
    Handshake,
    PreCopy,
    P2pBarrier,
    StopCopy,
    Drain,
    AwaitLoaded,
    Commit,
    Cleanup,
    Rollback,
    // destination
    Prepared,
    Receiving,
    Loading,
    Loaded,
    Resume,
    Reset,
    // both
    Done,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Created => "created",
            Phase::Handshake => "handshake",
            Phase::PreCopy => "pre-copy",
            Phase::P2pBarrier => "p2p-barrier",
            Phase::StopCopy => "stop-copy",
            Phase::Drain => "drain",
            Phase::AwaitLoaded => "await-loaded",
            Phase::Commit => "commit",
            Phase::Cleanup => "cleanup",
            Phase::Rollback => "rollback",
            Phase::Prepared => "prepared",
            Phase::Receiving => "receiving",
            Phase::Loading => "loading",
            Phase::Loaded => "loaded",
            Phase::Resume => "resume",
            Phase::Reset => "reset",
            Phase::Done => "done",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Live byte counters of one device, shared with the stream threads.
#[derive(Debug, Default)]
pub struct DeviceCounters {
    pub bytes_done: AtomicU64,
    pub bytes_total: AtomicU64,
}

#[derive(Clone, Debug)]
pub struct DeviceProgress {
    pub name: String,
    pub peer_name: String,
    pub state: Option<State>,
    pub counters: Arc<DeviceCounters>,
    pub verified: bool,
    pub error: Option<String>,
}

#[derive(Clone, Debug)]
pub struct PhaseTime {
    pub phase: Phase,
    pub started_unix_ns: u64,
    pub started: Instant,
    pub duration: Option<Duration>,
}

/// Everything the API shows about a job.
#[derive(Clone, Debug)]
pub struct JobSnapshot {
    pub job_id: String,
    pub role: Role,
    pub status: JobStatus,
    pub phase: Phase,
    pub group: String,
    pub peer: String,
    pub plan: String,
    pub devices: Vec<DeviceProgress>,
    pub phases: Vec<PhaseTime>,
    pub downtime: Option<Duration>,
    pub error: Option<String>,
    pub created_unix_ns: u64,
    pub finished_unix_ns: Option<u64>,
    pub created: Instant,
    pub finished: Option<Instant>,
    /// Dirty tracking statistics of the job's devices, kept when tracking of their group
    /// stopped while the job ran or when it ended (`Some(empty)`: the group was not
    /// tracked then); `None` until then. `Daemon::job_view` puts in what the API shows.
    pub dirty_tracking: Option<Vec<DeviceCoverage>>,
}

impl JobSnapshot {
    pub fn bytes_done(&self) -> u64 {
        self.devices.iter().map(|d| d.counters.bytes_done.load(Ordering::Relaxed)).sum()
    }

    pub fn bytes_total(&self) -> u64 {
        self.devices.iter().map(|d| d.counters.bytes_total.load(Ordering::Relaxed)).sum()
    }

    /// Average rate since the first data phase began.
    pub fn rate_bytes_per_sec(&self) -> f64 {
        let start = self
            .phases
            .iter()
            .find(|p| matches!(p.phase, Phase::PreCopy | Phase::Drain | Phase::Receiving))
            .map(|p| p.started);
        let Some(start) = start else { return 0.0 };
        let end = self.finished.unwrap_or_else(Instant::now);
        let secs = end.saturating_duration_since(start).as_secs_f64();
        if secs <= 0.0 { 0.0 } else { self.bytes_done() as f64 / secs }
    }

    pub fn eta(&self) -> Option<Duration> {
        let rate = self.rate_bytes_per_sec();
        let left = self.bytes_total().saturating_sub(self.bytes_done());
        (rate > 0.0 && self.status == JobStatus::Running).then(|| Duration::from_secs_f64(left as f64 / rate))
    }
}

pub fn unix_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// One job: its snapshot behind a lock, a watch channel that ticks on every change, and
/// the cancellation token its engine task observes.
#[derive(Debug)]
pub struct Job {
    snapshot: Mutex<JobSnapshot>,
    changed: watch::Sender<u64>,
    pub cancel: CancellationToken,
}

impl Job {
    pub fn new(
        job_id: &str,
        role: Role,
        group: &str,
        peer: &str,
        devices: Vec<(String, String)>,
    ) -> Arc<Job> {
        let now = Instant::now();
        let snapshot = JobSnapshot {
            job_id: job_id.into(),
            role,
            status: JobStatus::Running,
            phase: Phase::Created,
            group: group.into(),
            peer: peer.into(),
            plan: String::new(),
            devices: devices
                .into_iter()
                .map(|(name, peer_name)| DeviceProgress {
                    name,
                    peer_name,
                    state: None,
                    counters: Arc::default(),
                    verified: false,
                    error: None,
                })
                .collect(),
            phases: Vec::new(),
            downtime: None,
            error: None,
            created_unix_ns: unix_ns(),
            finished_unix_ns: None,
            created: now,
            finished: None,
            dirty_tracking: None,
        };
        Arc::new(Job {
            snapshot: Mutex::new(snapshot),
            changed: watch::channel(0).0,
            cancel: CancellationToken::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, JobSnapshot> {
        self.snapshot.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn snapshot(&self) -> JobSnapshot {
        self.lock().clone()
    }

    pub fn id(&self) -> String {
        self.lock().job_id.clone()
    }

    /// Applies a change and wakes watchers.
    pub fn update(&self, change: impl FnOnce(&mut JobSnapshot)) {
        change(&mut self.lock());
        self.changed.send_modify(|v| *v += 1);
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Wakes watchers without a state change (progress counters moved).
    pub fn touch(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    pub fn enter_phase(&self, phase: Phase) {
        let now = Instant::now();
        self.update(|s| {
            if let Some(last) = s.phases.last_mut() {
                last.duration.get_or_insert(now.saturating_duration_since(last.started));
            }
            s.phase = phase;
            s.phases.push(PhaseTime { phase, started_unix_ns: unix_ns(), started: now, duration: None });
        });
        let s = self.snapshot();
        tracing::info!(job = %s.job_id, role = s.role.as_str(), phase = %phase, "phase");
    }

    pub fn set_device_state(&self, name: &str, state: State) {
        self.update(|s| {
            if let Some(d) = s.devices.iter_mut().find(|d| d.name == name) {
                d.state = Some(state);
            }
        });
    }

    pub fn counters(&self, name: &str) -> Option<Arc<DeviceCounters>> {
        self.lock().devices.iter().find(|d| d.name == name).map(|d| d.counters.clone())
    }

    pub fn finish(&self, status: JobStatus, error: Option<String>) {
        let now = Instant::now();
        self.update(|s| {
            if let Some(last) = s.phases.last_mut() {
                last.duration.get_or_insert(now.saturating_duration_since(last.started));
            }
            s.status = status;
            if error.is_some() {
                s.error = error;
            }
            if status.is_finished() {
                s.phase = Phase::Done;
                s.finished = Some(now);
                s.finished_unix_ns = Some(unix_ns());
            }
        });
        let s = self.snapshot();
        match &s.error {
            Some(e) => tracing::warn!(job = %s.job_id, status = status.as_str(), error = %e, "job ended"),
            None => {
                tracing::info!(job = %s.job_id, status = status.as_str(), downtime_ms = s.downtime.map(|d| d.as_secs_f64() * 1e3), "job ended")
            }
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JobTableError {
    #[error("job `{0}` not found")]
    NotFound(String),
    #[error("job `{0}` already exists with a different role, group or devices")]
    Conflict(String),
}

/// Upper bounds, in seconds, of the downtime histogram's buckets: from a few devices of
/// small state (milliseconds) to GPUs with gigabytes that did not pre-copy (seconds).
pub const DOWNTIME_BUCKETS: [f64; 12] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// What the jobs that ended since the daemon started add up to (the metrics' counters;
/// the table itself forgets finished jobs beyond its retention).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobTotals {
    /// Ended jobs by role and final status.
    pub ended: BTreeMap<(Role, JobStatus), u64>,
    /// Device-state bytes moved by ended jobs, by role.
    pub bytes: BTreeMap<Role, u64>,
    /// Downtime of the source jobs that succeeded: count per bucket of
    /// [`DOWNTIME_BUCKETS`] (not cumulative), then the count above the last bound.
    pub downtime_buckets: [u64; DOWNTIME_BUCKETS.len() + 1],
    pub downtime_count: u64,
    pub downtime_sum: Duration,
}

impl JobTotals {
    fn add(&mut self, job: &JobSnapshot) {
        *self.ended.entry((job.role, job.status)).or_default() += 1;
        *self.bytes.entry(job.role).or_default() += job.bytes_done();
        if let (Role::Source, JobStatus::Succeeded, Some(downtime)) = (job.role, job.status, job.downtime) {
            let secs = downtime.as_secs_f64();
            let bucket =
                DOWNTIME_BUCKETS.iter().position(|&bound| secs <= bound).unwrap_or(DOWNTIME_BUCKETS.len());
            self.downtime_buckets[bucket] += 1;
            self.downtime_count += 1;
            self.downtime_sum += downtime;
        }
    }
}

/// All jobs of this daemon: running ones, and the most recent finished ones.
#[derive(Debug)]
pub struct JobTable {
    jobs: Mutex<BTreeMap<String, Arc<Job>>>,
    finished_order: Mutex<VecDeque<String>>,
    retained: usize,
    totals: Mutex<JobTotals>,
}

impl JobTable {
    pub fn new(retained: usize) -> JobTable {
        JobTable {
            jobs: Mutex::default(),
            finished_order: Mutex::default(),
            retained: retained.max(1),
            totals: Mutex::default(),
        }
    }

    pub fn totals(&self) -> JobTotals {
        self.totals.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Inserts `job` unless a job with that id exists; returns the job that is in the
    /// table and whether it is the new one.
    pub fn insert_or_get(&self, job: Arc<Job>) -> (Arc<Job>, bool) {
        let id = job.id();
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(existing) = jobs.get(&id) {
            return (existing.clone(), false);
        }
        jobs.insert(id, job.clone());
        (job, true)
    }

    pub fn get(&self, id: &str) -> Result<Arc<Job>, JobTableError> {
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| JobTableError::NotFound(id.into()))
    }

    pub fn list(&self) -> Vec<Arc<Job>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// Called when a job finished: the oldest finished jobs beyond the retention are dropped.
    /// Counted in the totals the first time.
    pub fn retire(&self, id: &str) {
        let mut order = self.finished_order.lock().unwrap_or_else(|p| p.into_inner());
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if !order.iter().any(|x| x == id) {
            order.push_back(id.to_string());
            if let Some(job) = jobs.get(id) {
                self.totals.lock().unwrap_or_else(|p| p.into_inner()).add(&job.snapshot());
            }
        }
        while order.len() > self.retained {
            if let Some(old) = order.pop_front() {
                jobs.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_timed_and_watchers_woken() {
        let job = Job::new("j1", Role::Source, "vm1", "peer:1", vec![("a".into(), "b".into())]);
        let mut rx = job.subscribe();
        job.enter_phase(Phase::Handshake);
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        job.enter_phase(Phase::Drain);
        job.counters("a").unwrap().bytes_done.store(10, Ordering::Relaxed);
        job.finish(JobStatus::Succeeded, None);
        let s = job.snapshot();
        assert_eq!(s.phase, Phase::Done);
        assert_eq!(s.phases.len(), 2);
        assert!(s.phases.iter().all(|p| p.duration.is_some()));
        assert_eq!(s.bytes_done(), 10);
        assert!(rx.has_changed().unwrap());
    }

    #[test]
    fn table_is_idempotent_and_retains_the_most_recent() {
        let table = JobTable::new(2);
        let (a, new) = table.insert_or_get(Job::new("a", Role::Source, "g", "", vec![]));
        assert!(new);
        let (again, new) = table.insert_or_get(Job::new("a", Role::Source, "g", "", vec![]));
        assert!(!new);
        assert!(Arc::ptr_eq(&a, &again));
        for id in ["b", "c"] {
            table.insert_or_get(Job::new(id, Role::Source, "g", "", vec![]));
        }
        for id in ["a", "b", "c"] {
            table.retire(id);
        }
        assert_eq!(table.get("a").unwrap_err(), JobTableError::NotFound("a".into()));
        assert!(table.get("b").is_ok() && table.get("c").is_ok());
    }
}
