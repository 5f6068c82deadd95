//! The service manager's notification protocol (sd_notify(3)): readiness, a `STATUS=`
//! line naming the active jobs and their phase, watchdog pings, reload and stop progress.
//! Without `NOTIFY_SOCKET` every call is a no-op, so the daemon runs the same outside
//! systemd.

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::engine::Daemon;
use crate::job::JobStatus;

/// How many jobs the `STATUS=` line names before it only counts the rest.
const STATUS_JOBS_NAMED: usize = 4;
/// How often the status line is recomputed (it is sent only when it changed).
const STATUS_EVERY: Duration = Duration::from_millis(250);
/// While stopping, the stop timeout is pushed this far ahead …
pub const STOP_EXTENSION: Duration = Duration::from_secs(30);
/// … this often, so a drain that makes progress is never killed by `TimeoutStopSec`
/// (the drain itself is bounded by the daemon).
pub const STOP_EXTEND_EVERY: Duration = Duration::from_secs(10);

/// Sends `states`; a failure is logged, never fatal (systemd may have gone away).
pub fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// `RELOADING=1` with the `MONOTONIC_USEC=` stamp systemd ≥ 253 requires for
/// `Type=notify-reload`.
pub fn notify_reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(_) => notify(&[NotifyState::Reloading]),
    }
}

/// Pushes the stop timeout `STOP_EXTENSION` ahead.
pub fn extend_stop_timeout() {
    notify(&[NotifyState::ExtendTimeoutUsec(STOP_EXTENSION.as_micros().try_into().unwrap_or(u32::MAX))]);
}

/// The daemon's state as the status line starts: `serving`, `reloading`, `stopping`.
#[derive(Clone, Debug)]
pub struct Mode(Arc<watch::Sender<String>>);

impl Mode {
    pub fn new(initial: &str) -> Mode {
        Mode(Arc::new(watch::Sender::new(initial.to_owned())))
    }
    pub fn set(&self, mode: &str) {
        self.0.send_replace(mode.to_owned());
    }
    fn get(&self) -> String {
        self.0.borrow().clone()
    }
    fn subscribe(&self) -> watch::Receiver<String> {
        self.0.subscribe()
    }
}

/// `<mode>; N device(s); no jobs` or `<mode>; N device(s); 2 jobs: a source drain, b …`.
pub fn status_line(mode: &str, daemon: &Daemon) -> String {
    let devices = daemon.registry.devices().len();
    let mut active: Vec<_> = daemon
        .jobs
        .list()
        .iter()
        .map(|job| job.snapshot())
        .filter(|s| matches!(s.status, JobStatus::Running | JobStatus::InDoubt))
        .collect();
    active.sort_by(|a, b| a.job_id.cmp(&b.job_id));
    let mut line = format!("{mode}; {devices} device(s); ");
    if active.is_empty() {
        line.push_str("no jobs");
        return line;
    }
    line.push_str(&format!("{} job(s):", active.len()));
    for (i, job) in active.iter().take(STATUS_JOBS_NAMED).enumerate() {
        let what = if job.status == JobStatus::InDoubt { "in_doubt" } else { job.phase.as_str() };
        line.push_str(&format!(
            "{} {} {} {what}",
            if i == 0 { "" } else { "," },
            job.job_id,
            job.role.as_str()
        ));
    }
    if active.len() > STATUS_JOBS_NAMED {
        line.push_str(&format!(", +{} more", active.len() - STATUS_JOBS_NAMED));
    }
    line
}

/// Sends `STATUS=` whenever the line changes (mode, devices, jobs or their phases) until
/// `shutdown`.
pub async fn publish_status(daemon: Arc<Daemon>, mode: Mode, shutdown: CancellationToken) {
    let mut modes = mode.subscribe();
    let mut sent = String::new();
    loop {
        let line = status_line(&mode.get(), &daemon);
        if line != sent {
            notify(&[NotifyState::Status(&line)]);
            sent = line;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = modes.changed() => {}
            () = tokio::time::sleep(STATUS_EVERY) => {}
        }
    }
}

/// The watchdog period systemd asked for (`WATCHDOG_USEC`, for this process), if any.
pub fn watchdog_period() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|period| !period.is_zero())
}

/// Whether the daemon can still do its work: the runtime ran this task (so its workers
/// schedule), and a blocking-pool thread can take the job table's lock within `limit`
/// (device I/O and ioctls run there; a wedged pool or a lock held forever shows here).
pub async fn alive(daemon: &Arc<Daemon>, limit: Duration) -> Result<(), String> {
    let daemon = daemon.clone();
    match tokio::time::timeout(limit, tokio::task::spawn_blocking(move || daemon.jobs.list().len())).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(join)) => Err(format!("the liveness probe failed: {join}")),
        Err(_) => Err(format!("the blocking pool or the job table did not answer within {limit:?}")),
    }
}

/// Pings the watchdog every half `period` while [`alive`] holds, until `shutdown`. When
/// the probe fails the ping is withheld, and systemd restarts the daemon once a whole
/// period passed without one.
pub async fn watchdog(daemon: Arc<Daemon>, period: Duration, shutdown: CancellationToken) {
    let every = period / 2;
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(period_ms = period.as_millis() as u64, "systemd watchdog enabled");
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        match alive(&daemon, every / 2).await {
            Ok(()) => notify(&[NotifyState::Watchdog]),
            Err(why) => tracing::error!(reason = %why, "withholding the systemd watchdog ping"),
        }
    }
}
