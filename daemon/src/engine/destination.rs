//! The destination side of a migration: prepared by the control plane, then driven by the
//! source through the peer API (handshake, await-loaded, commit or abort).
//!
//! Rules D1–D5 of [`super::commit`] are enforced here: every failure before "loaded"
//! resets every device; after "loaded" nothing but Commit, Abort or an explicit
//! resolution moves a device.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::protocol::Answer;
use super::{Daemon, Decision, EngineError, transition_all};
use crate::device::{DeviceIdentity, MigrationDevice};
use crate::fsm::{Caps, State};
use crate::job::{Job, JobStatus, Phase, Role};
use crate::peer_identity::PeerIdentity;
use crate::registry::Claim;
use crate::stream::{Preamble, Progress, StreamOptions, StreamReceiver};

/// How a job the source aborted states its end (and how a later Abort tells it from a
/// failure of its own).
const ABORTED_BY_SOURCE: &str = "aborted by the source: ";

/// The stream protocol version spoken in the peer handshake.
pub const PROTOCOL_VERSION: u32 = 1;

/// One device as the source describes it in the handshake.
#[derive(Clone, Debug)]
pub struct OfferedDevice {
    pub index: u32,
    pub source_name: String,
    pub destination_name: String,
    pub caps: Caps,
    pub data_size: u64,
    pub identity: DeviceIdentity,
}

#[derive(Clone, Debug)]
pub struct Offer {
    pub protocol_version: u32,
    pub job_id: String,
    pub devices: Vec<OfferedDevice>,
    pub data_connections: usize,
    pub max_frame_payload: usize,
    pub source_peer: String,
}

#[derive(Clone, Debug)]
pub struct Accepted {
    pub data_port: u16,
    pub token: Vec<u8>,
}

/// Where the receive-and-load task ended.
#[derive(Clone, Debug, PartialEq, Eq)]
enum LoadOutcome {
    Pending,
    Loaded(Vec<(String, u64, u64)>),
    Failed(String),
}

pub(crate) struct IncomingJob {
    pub job: Arc<Job>,
    expected: Vec<String>,
    claim: Mutex<Option<Claim>>,
    /// Destination devices in frame-index order, set by the handshake.
    devices: Mutex<Vec<(u32, Arc<dyn MigrationDevice>)>>,
    /// Devices with the P2P capability (read at the handshake, so the resume barrier
    /// after commit — inside downtime — asks the devices nothing).
    p2p: Mutex<HashSet<String>>,
    outcome: watch::Sender<LoadOutcome>,
    /// Serialises handshake / commit / abort / resolve.
    step: tokio::sync::Mutex<()>,
    source_peer: Mutex<String>,
    /// The address the handshake came from: after it, only that peer is the job's source
    /// (rule D5; the security issue adds the certificate's names).
    source_addr: Mutex<Option<std::net::IpAddr>>,
    /// What the receive found wrong, set as soon as it failed: an Abort the source sends
    /// because its connections broke may come before the failure is handled, and must
    /// not bury the cause.
    receive_failure: Mutex<Option<String>>,
}

impl std::fmt::Debug for IncomingJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncomingJob").field("job", &self.job.id()).field("expected", &self.expected).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl IncomingJob {
    /// Rule D5: Commit and Abort come from the job's source only (`None`: the operator's
    /// own ResolveJob on this daemon). Before the handshake no source is known: a Commit
    /// is refused, an Abort only ends a job that touched no device yet.
    fn authenticate(
        &self,
        job_id: &str,
        what: &str,
        caller: Option<&PeerIdentity>,
    ) -> Result<(), EngineError> {
        let Some(caller) = caller else { return Ok(()) };
        let source = *lock(&self.source_addr);
        if source.is_none() && what == "Abort" {
            return Ok(());
        }
        let from = caller.addr.map(|a| a.ip());
        if source.is_some() && from == source {
            return Ok(());
        }
        Err(EngineError::PermissionDenied(format!(
            "{what} for job `{job_id}` refused: it comes from {}, not from the job's source ({})",
            from.map_or_else(|| "an unknown address".to_string(), |ip| ip.to_string()),
            source.map_or_else(|| "none yet: no handshake".to_string(), |ip| ip.to_string()),
        )))
    }

    fn devices(&self) -> Vec<(u32, Arc<dyn MigrationDevice>)> {
        lock(&self.devices).clone()
    }

    fn release(&self) {
        lock(&self.claim).take();
    }
}

impl Daemon {
    pub(crate) fn incoming_job(&self, job_id: &str) -> Result<Arc<IncomingJob>, EngineError> {
        lock(&self.incoming).get(job_id).cloned().ok_or_else(|| {
            EngineError::FailedPrecondition(format!(
                "job `{job_id}` is not prepared on this destination (call PrepareIncoming first)"
            ))
        })
    }

    /// Prepares this daemon to receive `devices` for `job_id` (idempotent for the same
    /// device list). Every device must be registered, free, and RUNNING (a fresh device).
    pub async fn prepare_incoming(
        self: &Arc<Self>,
        job_id: &str,
        devices: Vec<String>,
    ) -> Result<Arc<Job>, EngineError> {
        self.journal.path_of(job_id)?;
        if devices.is_empty() {
            return Err(EngineError::InvalidArgument("PrepareIncoming needs at least one device".into()));
        }
        if let Some(existing) = lock(&self.incoming).get(job_id).cloned() {
            let same: HashSet<&String> = existing.expected.iter().collect();
            if same == devices.iter().collect() && existing.expected.len() == devices.len() {
                return Ok(existing.job.clone());
            }
            return Err(EngineError::FailedPrecondition(format!(
                "job `{job_id}` is already prepared with devices {:?}",
                existing.expected
            )));
        }
        if self.jobs.get(job_id).is_ok() {
            return Err(EngineError::FailedPrecondition(format!(
                "job id `{job_id}` is already used by another job"
            )));
        }
        let claim = self.registry.claim(job_id, &devices)?;
        for (name, entry) in &claim.devices {
            let device = entry.device.clone();
            let state = super::blocking(&device, |d| d.state())
                .await
                .map_err(|e| EngineError::FailedPrecondition(e.to_string()))?;
            if state != State::Running {
                return Err(EngineError::FailedPrecondition(format!(
                    "device `{name}` is in {state}; a destination device must be RUNNING with no VM state (reset it first)"
                )));
            }
        }
        let job = Job::new(
            job_id,
            Role::Destination,
            "",
            "",
            devices.iter().map(|d| (d.clone(), String::new())).collect(),
        );
        let (job, _) = self.jobs.insert_or_get(job);
        job.enter_phase(Phase::Prepared);
        let incoming = Arc::new(IncomingJob {
            job: job.clone(),
            expected: devices,
            claim: Mutex::new(Some(claim)),
            devices: Mutex::default(),
            p2p: Mutex::default(),
            outcome: watch::channel(LoadOutcome::Pending).0,
            step: tokio::sync::Mutex::new(()),
            source_peer: Mutex::default(),
            source_addr: Mutex::default(),
            receive_failure: Mutex::default(),
        });
        lock(&self.incoming).insert(job_id.to_string(), incoming);
        tracing::info!(job = %job_id, devices = ?job.snapshot().devices.iter().map(|d| &d.name).collect::<Vec<_>>(), "prepared for incoming migration");
        self.watch_cancel(job.clone());
        Ok(job)
    }

    /// CancelJob on the destination: before "loaded" it resets the devices.
    fn watch_cancel(self: &Arc<Self>, job: Arc<Job>) {
        let daemon = self.clone();
        tokio::spawn(async move {
            job.cancel.cancelled().await;
            let id = job.id();
            if let Ok(incoming) = daemon.incoming_job(&id) {
                let _step = incoming.step.lock().await;
                if job.snapshot().status == JobStatus::Running && job.snapshot().phase != Phase::Loaded {
                    daemon
                        .reset_all(&incoming, JobStatus::Cancelled, "cancelled by the control API".into())
                        .await;
                }
            }
        });
    }

    /// Peer Handshake: checks the offer against the prepared job and the local devices,
    /// then moves every device to RESUMING and opens the data listener.
    pub async fn accept_offer(
        self: &Arc<Self>,
        offer: Offer,
        listen_ip: std::net::IpAddr,
        caller: &PeerIdentity,
    ) -> Result<Accepted, EngineError> {
        if offer.protocol_version != PROTOCOL_VERSION {
            return Err(EngineError::FailedPrecondition(format!(
                "stream protocol version {} is not supported (this daemon speaks {PROTOCOL_VERSION})",
                offer.protocol_version
            )));
        }
        let incoming = self.incoming_job(&offer.job_id)?;
        let _step = incoming.step.lock().await;
        let job = incoming.job.clone();
        let snap = job.snapshot();
        if snap.phase != Phase::Prepared || snap.status != JobStatus::Running {
            return Err(EngineError::FailedPrecondition(format!(
                "job `{}` is in phase {} ({:?}); a handshake is only accepted once, right after PrepareIncoming",
                offer.job_id, snap.phase, snap.status
            )));
        }
        // Every check happens before any device changes state.
        let offered: HashSet<&String> = offer.devices.iter().map(|d| &d.destination_name).collect();
        let expected: HashSet<&String> = incoming.expected.iter().collect();
        if offered != expected || offered.len() != offer.devices.len() {
            return Err(EngineError::FailedPrecondition(format!(
                "device mapping {:?} does not match the prepared devices {:?}",
                offer
                    .devices
                    .iter()
                    .map(|d| format!("{}={}", d.source_name, d.destination_name))
                    .collect::<Vec<_>>(),
                incoming.expected
            )));
        }
        let indexes: HashSet<u32> = offer.devices.iter().map(|d| d.index).collect();
        if indexes.len() != offer.devices.len() {
            return Err(EngineError::InvalidArgument("duplicate device index in the handshake".into()));
        }
        let mut devices = Vec::with_capacity(offer.devices.len());
        for offered in &offer.devices {
            let entry = self.registry.device(&offered.destination_name)?;
            let device = entry.device.clone();
            let identity = device.identity();
            if identity != offered.identity {
                return Err(EngineError::FailedPrecondition(format!(
                    "device `{}` is {identity}, but source device `{}` is {}: incompatible",
                    offered.destination_name, offered.source_name, offered.identity
                )));
            }
            let caps = super::blocking(&device, |d| d.caps())
                .await
                .map_err(|e| EngineError::FailedPrecondition(e.to_string()))?;
            if caps != offered.caps {
                return Err(EngineError::FailedPrecondition(format!(
                    "device `{}` has capabilities {caps}, source device `{}` has {}: incompatible",
                    offered.destination_name, offered.source_name, offered.caps
                )));
            }
            if caps.has_p2p() {
                lock(&incoming.p2p).insert(offered.destination_name.clone());
            }
            devices.push((offered.index, device));
        }
        job.update(|s| {
            s.peer = offer.source_peer.clone();
            for d in &mut s.devices {
                if let Some(o) = offer.devices.iter().find(|o| o.destination_name == d.name) {
                    d.peer_name = o.source_name.clone();
                    d.counters.bytes_total.store(o.data_size, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
        *lock(&incoming.source_peer) = reachable_source(&offer.source_peer, caller);
        *lock(&incoming.source_addr) = caller.addr.map(|a| a.ip());
        *lock(&incoming.devices) = devices.clone();

        let token = crate::token::session_token().map_err(|e| EngineError::Internal(e.to_string()))?;
        // Open the data listener before touching devices: nothing to undo if it fails.
        let listener = crate::stream::ports::bind_data_listener(listen_ip, self.config.peer.data_ports)
            .await
            .map_err(|e| EngineError::Unavailable(e.to_string()))?;
        let (receiver, data_port) = StreamReceiver::from_listener(listener)
            .map_err(|e| EngineError::Internal(format!("cannot open the data listener: {e}")))?;

        job.enter_phase(Phase::Receiving);
        let targets: Vec<_> = devices.iter().map(|(_, d)| (d.clone(), State::Resuming)).collect();
        let results = transition_all(&targets).await;
        let mut fds = Vec::with_capacity(devices.len());
        let mut failure = None;
        for ((index, device), result) in devices.iter().zip(results) {
            match result {
                Ok(Some(fd)) => {
                    job.set_device_state(device.name(), State::Resuming);
                    fds.push((*index, fd));
                }
                Ok(None) => {
                    failure.get_or_insert(format!("device `{}`: RESUMING opened no data_fd", device.name()));
                }
                Err(e) => {
                    failure.get_or_insert(format!("phase receiving: {e}"));
                }
            }
        }
        if let Some(message) = failure {
            drop(fds);
            self.reset_all(&incoming, JobStatus::RolledBack, message.clone()).await;
            return Err(EngineError::Aborted(message));
        }

        let progress = Arc::new(Progress::new(fds.len()));
        let limits = &self.config.peer.limits;
        let opts = StreamOptions {
            connections: offer.data_connections.max(1),
            max_payload: offer.max_frame_payload,
            dead_peer: Duration::from_millis(limits.dead_peer_ms),
            preamble_timeout: Duration::from_millis(limits.handshake_timeout_ms),
            max_pending_connections: limits.max_pending_data_connections,
            ..StreamOptions::default()
        };
        // Data connections must come from the job's source (its binding is set once
        // this handshake is accepted, before the source can connect).
        let guard = {
            let (daemon, job_id) = (self.clone(), offer.job_id.clone());
            crate::stream::DataGuard {
                tls: self.tls.as_ref().map(|tls| tls.server_config()),
                admit: Arc::new(move |who| daemon.bindings.admits(&job_id, who)),
            }
        };
        let handle = receiver.start_guarded(
            guard,
            Preamble { job_id: offer.job_id.clone(), token: token.clone() },
            fds,
            opts,
            progress.clone(),
        );
        let daemon = self.clone();
        let timeout = self.phase_timeout(0);
        let index_names: Vec<(u32, String)> =
            devices.iter().map(|(i, d)| (*i, d.name().to_string())).collect();
        let incoming = incoming.clone();
        tokio::spawn(async move {
            let counters: Vec<_> = index_names.iter().map(|(_, n)| incoming.job.counters(n)).collect();
            // Dropping an unfinished receive (at the end of this block) aborts its
            // connections and writer threads.
            let result = {
                let receive = handle.wait();
                tokio::pin!(receive);
                let mut ticker = tokio::time::interval(Duration::from_millis(100));
                // A source that vanished before (or while) streaming must not hold the
                // devices in RESUMING forever: rule D1 resets them.
                let deadline = tokio::time::sleep(timeout);
                tokio::pin!(deadline);
                loop {
                    tokio::select! {
                        r = &mut receive => break r.map_err(|e| {
                            super::with_device_name(&e, index_names.iter().map(|(i, n)| (*i, n.as_str())))
                        }),
                        _ = &mut deadline => break Err(format!("the device streams were not complete within {timeout:?}")),
                        _ = ticker.tick() => {
                            for ((index, _), c) in index_names.iter().zip(&counters) {
                                if let Some(c) = c {
                                    c.bytes_done.store(progress.bytes(*index), std::sync::atomic::Ordering::Relaxed);
                                }
                            }
                            incoming.job.touch();
                        }
                    }
                }
            };
            for ((index, _), c) in index_names.iter().zip(&counters) {
                if let Some(c) = c {
                    c.bytes_done.store(progress.bytes(*index), std::sync::atomic::Ordering::Relaxed);
                }
            }
            let result = result.map_err(|message| format!("phase receiving: {message}"));
            if let Err(message) = &result {
                *lock(&incoming.receive_failure) = Some(message.clone());
            }
            daemon.finish_receive(incoming, result, index_names, timeout).await;
        });
        Ok(Accepted { data_port, token })
    }

    /// After the stream: every END record matched, so the drivers may load.
    async fn finish_receive(
        self: &Arc<Self>,
        incoming: Arc<IncomingJob>,
        received: Result<Vec<crate::stream::DeviceStreamSummary>, String>,
        index_names: Vec<(u32, String)>,
        commit_wait: Duration,
    ) {
        let step = incoming.step.lock().await;
        let job = incoming.job.clone();
        if job.snapshot().status != JobStatus::Running {
            return;
        }
        let summaries = match received {
            Ok(s) => s,
            Err(message) => {
                self.reset_all(&incoming, JobStatus::RolledBack, message.clone()).await;
                incoming.outcome.send_replace(LoadOutcome::Failed(message));
                return;
            }
        };
        job.enter_phase(Phase::Loading);
        job.update(|s| {
            for d in &mut s.devices {
                d.verified = true;
            }
        });
        let devices = incoming.devices();
        let targets: Vec<_> = devices.iter().map(|(_, d)| (d.clone(), State::Stop)).collect();
        let results = transition_all(&targets).await;
        let mut failure = None;
        for ((_, device), result) in devices.iter().zip(results) {
            match result {
                Ok(_) => job.set_device_state(device.name(), State::Stop),
                Err(e) => {
                    failure.get_or_insert(format!("phase loading: {e}"));
                }
            }
        }
        if let Some(message) = failure {
            self.reset_all(&incoming, JobStatus::RolledBack, message.clone()).await;
            incoming.outcome.send_replace(LoadOutcome::Failed(message));
            return;
        }
        let loaded = summaries
            .iter()
            .map(|s| {
                let name = index_names
                    .iter()
                    .find(|(i, _)| *i == s.index)
                    .map(|(_, n)| n.clone())
                    .unwrap_or_default();
                (name, s.bytes, s.frames)
            })
            .collect();
        job.enter_phase(Phase::Loaded);
        incoming.outcome.send_replace(LoadOutcome::Loaded(loaded));
        drop(step);
        // Rule D2: hold. Without Commit or Abort in time the job is in doubt, never reset.
        let daemon = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(commit_wait).await;
            let _step = incoming.step.lock().await;
            let snap = incoming.job.snapshot();
            if snap.status == JobStatus::Running && snap.phase == Phase::Loaded {
                tracing::warn!(job = %snap.job_id, "no commit or abort from the source; job in doubt, devices held stopped");
                incoming.job.finish(
                    JobStatus::InDoubt,
                    Some(
                        "phase loaded: the source never said commit or abort; resolve with ResolveJob".into(),
                    ),
                );
                drop(daemon);
            }
        });
    }

    /// Peer AwaitLoaded: waits until every device is loaded (RESUMING -> STOP succeeded).
    pub async fn await_loaded(
        &self,
        job_id: &str,
        timeout: Duration,
    ) -> Result<Vec<(String, u64, u64)>, EngineError> {
        let incoming = self.incoming_job(job_id)?;
        let mut rx = incoming.outcome.subscribe();
        let wait = async {
            loop {
                let current = rx.borrow_and_update().clone();
                match current {
                    LoadOutcome::Loaded(devices) => return Ok(devices),
                    LoadOutcome::Failed(message) => return Err(EngineError::Aborted(message)),
                    LoadOutcome::Pending => {}
                }
                if rx.changed().await.is_err() {
                    return Err(EngineError::Internal("the receive task vanished".into()));
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.map_err(|_| {
            EngineError::Unavailable(format!("job `{job_id}`: devices not loaded within {timeout:?}"))
        })?
    }

    /// Peer Commit (rule D2/D3): resume every device in the sequencer's order
    /// ([`super::plan::resume`]): P2P devices to RUNNING_P2P (barrier), then the device
    /// without P2P, then the P2P devices to RUNNING. If a step fails no later step runs,
    /// and the job is held in doubt, never reset. Idempotent once succeeded.
    pub async fn commit_incoming(
        self: &Arc<Self>,
        job_id: &str,
        caller: Option<&PeerIdentity>,
    ) -> Result<u64, EngineError> {
        let incoming = self.incoming_job(job_id)?;
        incoming.authenticate(job_id, "Commit", caller)?;
        let _step = incoming.step.lock().await;
        let job = incoming.job.clone();
        let snap = job.snapshot();
        if snap.status == JobStatus::Succeeded {
            return Ok(snap.finished_unix_ns.unwrap_or_default());
        }
        let holding = snap.phase == Phase::Loaded && snap.status == JobStatus::Running
            || snap.status == JobStatus::InDoubt;
        if !holding {
            return Err(EngineError::FailedPrecondition(format!(
                "job `{job_id}` cannot commit in phase {} ({:?})",
                snap.phase, snap.status
            )));
        }
        job.update(|s| s.status = JobStatus::Running);
        let loaded = snap.phase == Phase::Loaded;
        job.enter_phase(Phase::Resume);
        let devices: Vec<Arc<dyn MigrationDevice>> = incoming.devices().into_iter().map(|(_, d)| d).collect();
        let p2p_names = lock(&incoming.p2p).clone();
        // What the handshake learnt is all the plan needs (P2P or not), so the first
        // resume asks the devices nothing inside downtime: they are all loaded (STOP). A
        // resume retried after a failed one starts from where the devices really are.
        let mut members = Vec::with_capacity(devices.len());
        for device in &devices {
            let caps = if p2p_names.contains(device.name()) {
                Caps::STOP_COPY.union(Caps::P2P)
            } else {
                Caps::STOP_COPY
            };
            let state = if loaded {
                State::Stop
            } else {
                super::blocking(device, |d| d.state())
                    .await
                    .map_err(|e| EngineError::Internal(format!("phase resume: {e}")))?
            };
            members.push(super::plan::Member::new(device.name(), caps, state));
        }
        let resumed =
            super::sequence::resume(&devices, &members, |name, state| job.set_device_state(name, state))
                .await;
        if let Err(e) = resumed {
            // After Commit the devices hold the VM's state and the source stays stopped:
            // never reset them; hold them (claimed) in doubt for a retried commit.
            let message = format!("phase resume: {e}; retry with ResolveJob (commit), never reset");
            tracing::error!(job = %job_id, error = %message, "resume incomplete; devices held");
            job.finish(JobStatus::InDoubt, Some(message.clone()));
            return Err(EngineError::Internal(message));
        }
        incoming.release();
        self.keep_dirty_statistics(&job);
        let running_at = crate::job::unix_ns();
        job.finish(JobStatus::Succeeded, None);
        self.jobs.retire(job_id);
        Ok(running_at)
    }

    /// Peer Abort: the source decided not to commit (rule D1): reset every device.
    /// Returns the error the job had failed with on its own before the abort, if it had.
    pub async fn abort_incoming(
        self: &Arc<Self>,
        job_id: &str,
        reason: &str,
        caller: Option<&PeerIdentity>,
    ) -> Result<Option<String>, EngineError> {
        let incoming = self.incoming_job(job_id)?;
        incoming.authenticate(job_id, "Abort", caller)?;
        let _step = incoming.step.lock().await;
        let snap = incoming.job.snapshot();
        match snap.status {
            JobStatus::Succeeded => {
                Err(EngineError::FailedPrecondition(format!("job `{job_id}` already committed and resumed")))
            }
            JobStatus::Running | JobStatus::InDoubt => {
                let found = lock(&incoming.receive_failure).clone();
                let message = found.clone().unwrap_or_else(|| format!("{ABORTED_BY_SOURCE}{reason}"));
                self.reset_all(&incoming, JobStatus::RolledBack, message).await;
                Ok(found)
            }
            _ => Ok(snap.error.filter(|error| !error.starts_with(ABORTED_BY_SOURCE))),
        }
    }

    /// Resets every device of an incoming job (power-on state, no migrated state) and
    /// ends the job. Reset is retried on EAGAIN-style contention.
    async fn reset_all(self: &Arc<Self>, incoming: &IncomingJob, status: JobStatus, message: String) {
        let job = &incoming.job;
        job.enter_phase(Phase::Reset);
        let mut devices: Vec<Arc<dyn MigrationDevice>> =
            incoming.devices().into_iter().map(|(_, d)| d).collect();
        if devices.is_empty() {
            for name in &incoming.expected {
                if let Ok(entry) = self.registry.device(name) {
                    devices.push(entry.device.clone());
                }
            }
        }
        let mut errors = Vec::new();
        for device in &devices {
            let state = super::blocking(device, |d| d.state()).await;
            if state == Ok(State::Running) {
                job.set_device_state(device.name(), State::Running);
                continue;
            }
            let mut attempt = 0;
            loop {
                match super::blocking(device, |d| d.reset()).await {
                    Ok(()) => {
                        job.set_device_state(device.name(), State::Running);
                        break;
                    }
                    Err(e) if e.kind.is_transient() && attempt < 5 => {
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
                    }
                    Err(e) => {
                        errors.push(format!("phase reset: {e}"));
                        break;
                    }
                }
            }
        }
        incoming.release();
        let message = if errors.is_empty() { message } else { format!("{message}; {}", errors.join("; ")) };
        self.keep_dirty_statistics(job);
        job.finish(if errors.is_empty() { status } else { JobStatus::Failed }, Some(message));
        self.jobs.retire(&job.id());
    }

    /// Resolves an in-doubt job. On the source its own journal decides (a recorded commit
    /// is re-sent). On the destination `decision` decides, or, when absent, the source's
    /// journal is asked through the peer API.
    pub async fn resolve(
        self: &Arc<Self>,
        job_id: &str,
        decision: Option<Decision>,
    ) -> Result<Arc<Job>, EngineError> {
        let job = self.job(job_id)?;
        match job.snapshot().role {
            Role::Source => self.resolve_outgoing(job_id).await,
            Role::Destination => {
                let incoming = self.incoming_job(job_id)?;
                let decision = match decision {
                    Some(d) => d,
                    None => {
                        let source = lock(&incoming.source_peer).clone();
                        // The announced address is only where to dial: the source
                        // must prove the identity this job is bound to.
                        let expected = match self.bindings.expected(job_id) {
                            crate::peer_identity::ExpectedPeer::Named(name) => name,
                            crate::peer_identity::ExpectedPeer::SameAs(peer) => {
                                peer.names.first().cloned().unwrap_or_default()
                            }
                            crate::peer_identity::ExpectedPeer::Unbound => String::new(),
                        };
                        match super::source::query_decision(self, &source, &expected, job_id).await? {
                            Answer::Commit => Decision::Commit,
                            Answer::Abort => Decision::Abort,
                            // Rule D3: the source does not know the job: hold, never reset.
                            Answer::Unknown => {
                                return Err(EngineError::FailedPrecondition(format!(
                                    "job `{job_id}`: the source `{source}` does not know this job; the devices stay held (resolve with an explicit decision only if you know the source's outcome)"
                                )));
                            }
                        }
                    }
                };
                match decision {
                    Decision::Commit => {
                        self.commit_incoming(job_id, None).await?;
                    }
                    Decision::Abort => {
                        self.abort_incoming(job_id, "resolved: the source did not commit", None).await?;
                    }
                }
                Ok(job)
            }
        }
    }
}

/// Where to ask the source about a job: the address it announced, except that an
/// unspecified announced IP (a source listening on 0.0.0.0 or [::]) is replaced by the
/// IP its handshake came from, with the announced port.
fn reachable_source(announced: &str, caller: &PeerIdentity) -> String {
    match (announced.parse::<SocketAddr>(), caller.addr) {
        (Ok(addr), Some(from)) if addr.ip().is_unspecified() => {
            SocketAddr::new(from.ip(), addr.port()).to_string()
        }
        _ => announced.to_string(),
    }
}

/// The address to dial for a peer given as `host:port`.
pub fn resolve_peer(peer: &str) -> Result<SocketAddr, EngineError> {
    use std::net::ToSocketAddrs;
    peer.to_socket_addrs()
        .map_err(|e| EngineError::InvalidArgument(format!("peer `{peer}`: {e}")))?
        .next()
        .ok_or_else(|| EngineError::InvalidArgument(format!("peer `{peer}` resolves to no address")))
}
