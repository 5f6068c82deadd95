//! The migration engine: moves a group of devices to a peer daemon as one unit.
//!
//! - [`plan`]: the group plan from capabilities and the group sequencer (pure);
//! - [`sequence`]: executes the sequencer's steps on devices;
//! - [`commit`]: the two-phase commit rules and the source's journal;
//! - [`source`]: the source side (coordinator);
//! - [`destination`]: the destination side (serves the peer API);
//! - [`dirty`]: dirty tracking per group (the control API's dirty RPCs).
//!
//! Device ioctls block (STOP_COPY can take hundreds of milliseconds on real devices), so
//! every FSM transition runs on a blocking thread, in parallel across a group's devices;
//! [`transition_all`] is the barrier.

pub mod commit;
pub mod destination;
pub mod dirty;
pub mod plan;
pub mod protocol;
pub mod sequence;
pub mod source;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::Config;
use crate::device::{DataFd, DeviceError, MigrationDevice};
use crate::fsm::State;
use crate::job::{Job, JobTable, Phase};
use crate::registry::{Registry, RegistryError};

pub use commit::{Decision, Journal, JournalError};
pub use plan::{GroupPlan, PlanError};

/// Why an engine call failed, by the class the API maps to a gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    InvalidArgument(String),
    /// The request is valid but the world is not ready for it (device busy or in the
    /// wrong state, job in the wrong phase, incompatible peer device).
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("peer unavailable: {0}")]
    Unavailable(String),
    /// The caller is not the peer this job answers to.
    #[error("{0}")]
    PermissionDenied(String),
    /// The migration failed and was rolled back.
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    Internal(String),
}

impl From<RegistryError> for EngineError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::UnknownDevice(_) | RegistryError::UnknownGroup(_) => {
                EngineError::NotFound(e.to_string())
            }
            RegistryError::Busy { .. }
            | RegistryError::InGroup { .. }
            | RegistryError::Tracked(_)
            | RegistryError::MigratedAway { .. } => EngineError::FailedPrecondition(e.to_string()),
            _ => EngineError::InvalidArgument(e.to_string()),
        }
    }
}

impl From<JournalError> for EngineError {
    fn from(e: JournalError) -> Self {
        match e {
            JournalError::BadJobId(_) => EngineError::InvalidArgument(e.to_string()),
            _ => EngineError::Internal(e.to_string()),
        }
    }
}

impl From<PlanError> for EngineError {
    fn from(e: PlanError) -> Self {
        EngineError::FailedPrecondition(e.to_string())
    }
}

/// A device failure during a phase: what the job reports.
#[derive(Debug, Clone)]
pub struct PhaseFailure {
    pub phase: Phase,
    pub error: DeviceError,
}

impl std::fmt::Display for PhaseFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "phase {}: {}", self.phase, self.error)
    }
}

/// The daemon's shared state: everything the API and the engine tasks need.
#[derive(Debug)]
pub struct Daemon {
    pub config: Config,
    pub registry: Arc<Registry>,
    pub jobs: JobTable,
    pub journal: Journal,
    /// Destination-side jobs, by job id.
    pub(crate) incoming: Mutex<HashMap<String, Arc<destination::IncomingJob>>>,
    /// Source-side jobs, by job id.
    pub(crate) outgoing: Mutex<HashMap<String, Arc<source::OutgoingJob>>>,
    /// Dirty tracking, by group. Shared with the blocking threads that stop a tracker, so
    /// that a stopped tracker leaves the table before its lock is released.
    pub(crate) dirty: Arc<dirty::Trackers>,
    /// Peer TLS material (`[peer.tls]`), reloadable; `None`: plaintext (loopback).
    pub tls: Option<Arc<crate::tls::PeerTls>>,
    /// Which peer each job accepts calls from (checked by the peer API).
    pub bindings: crate::peer_identity::Bindings,
}

impl Daemon {
    pub fn new(config: Config, registry: Arc<Registry>) -> Result<Arc<Daemon>, EngineError> {
        let journal = Journal::open(&config.state_dir)?;
        let tls = match &config.peer.tls {
            Some(paths) => Some(Arc::new(
                crate::tls::PeerTls::load(paths)
                    .map_err(|e| EngineError::FailedPrecondition(e.to_string()))?,
            )),
            None => None,
        };
        Ok(Arc::new(Daemon {
            jobs: JobTable::new(config.migration.retained_jobs),
            config,
            registry,
            journal,
            incoming: Mutex::default(),
            outgoing: Mutex::default(),
            dirty: Arc::default(),
            tls,
            bindings: crate::peer_identity::Bindings::default(),
        }))
    }

    pub fn phase_timeout(&self, override_ms: u64) -> Duration {
        Duration::from_millis(if override_ms == 0 {
            self.config.migration.phase_timeout_ms
        } else {
            override_ms
        })
    }

    /// The plan for a group, without touching any device beyond reading capabilities.
    pub fn plan(&self, group: &str) -> Result<GroupPlan, EngineError> {
        let def = self.registry.group(group)?;
        let mut facts = Vec::with_capacity(def.devices.len());
        for name in &def.devices {
            let entry = self.registry.device(name)?;
            facts.push(
                device_facts(entry.device.as_ref())
                    .map_err(|e| EngineError::FailedPrecondition(e.to_string()))?,
            );
        }
        Ok(plan::plan_group(&facts, def.allow_multiple_non_p2p, self.config.migration.pre_copy)?)
    }

    pub fn job(&self, job_id: &str) -> Result<Arc<Job>, EngineError> {
        self.jobs.get(job_id).map_err(|e| EngineError::NotFound(e.to_string()))
    }

    /// Cancels a job before commit (it rolls back); after commit it is refused.
    pub fn cancel(&self, job_id: &str) -> Result<Arc<Job>, EngineError> {
        let job = self.job(job_id)?;
        let snap = job.snapshot();
        if snap.status.is_finished() {
            return Err(EngineError::FailedPrecondition(format!(
                "job `{job_id}` already ended ({:?})",
                snap.status
            )));
        }
        if matches!(snap.phase, Phase::Commit | Phase::Cleanup | Phase::Resume | Phase::Loaded) {
            return Err(EngineError::FailedPrecondition(format!(
                "job `{job_id}` is past its commit point ({}); it can no longer be cancelled",
                snap.phase
            )));
        }
        job.cancel.cancel();
        Ok(job)
    }
}

pub fn device_facts(device: &dyn MigrationDevice) -> Result<plan::DeviceFacts, DeviceError> {
    Ok(plan::DeviceFacts {
        name: device.name().to_string(),
        caps: device.caps()?,
        data_size: device.data_size()?,
    })
}

/// Moves every device to its target in parallel (one blocking thread each) and waits for
/// all of them: a barrier. Results are in input order.
pub async fn transition_all(
    devices: &[(Arc<dyn MigrationDevice>, State)],
) -> Vec<Result<Option<DataFd>, DeviceError>> {
    let handles: Vec<_> = devices
        .iter()
        .map(|(device, target)| {
            let device = device.clone();
            let target = *target;
            tokio::task::spawn_blocking(move || device.set_state(target))
        })
        .collect();
    let mut results = Vec::with_capacity(handles.len());
    for (handle, (device, target)) in handles.into_iter().zip(devices) {
        results.push(handle.await.unwrap_or_else(|join| {
            Err(DeviceError::os(device.name(), crate::device::Op::SetState(*target), nix::errno::Errno::EIO)
                .with_detail(format!("transition thread panicked: {join}")))
        }));
    }
    results
}

/// Runs a blocking device call off the reactor.
pub async fn blocking<T: Send + 'static>(
    device: &Arc<dyn MigrationDevice>,
    op: impl FnOnce(&dyn MigrationDevice) -> Result<T, DeviceError> + Send + 'static,
) -> Result<T, DeviceError> {
    let dev = device.clone();
    let name = device.name().to_string();
    tokio::task::spawn_blocking(move || op(dev.as_ref())).await.unwrap_or_else(|join| {
        Err(DeviceError::os(name, crate::device::Op::GetState, nix::errno::Errno::EIO)
            .with_detail(format!("device thread panicked: {join}")))
    })
}

/// A stream error as an operator reads it: the stream counts devices by their index in
/// it, which only this side can turn into the device's name.
pub(crate) fn with_device_name<'a>(
    error: &crate::stream::StreamError,
    names: impl IntoIterator<Item = (u32, &'a str)>,
) -> String {
    let named = error.device().and_then(|index| names.into_iter().find(|(i, _)| *i == index));
    match named {
        Some((index, name)) => format!("{error}; device {index} is `{name}`"),
        None => error.to_string(),
    }
}
