//! The source side of a migration: the coordinator of the two-phase commit.
//!
//! Phases (see [`super::commit`] for the rules): handshake → [pre-copy] → P2P barrier →
//! stop-copy barrier → drain → await loaded → commit (journal, then tell) → cleanup.
//! Any failure before the commit record rolls every device back to RUNNING.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use vfio_migd_proto::v1 as pb;
use vfio_migd_proto::v1::peer_client::PeerClient;

use super::plan::{self, GroupPlan, StopOrder};
use super::{Daemon, Decision, EngineError, transition_all};
use crate::device::{DataFd, MigrationDevice};
use crate::fsm::State;
use crate::job::{Job, JobStatus, Phase, Role};
use crate::registry::Claim;
use crate::stream::{Preamble, Progress, StreamOptions, StreamSender, Switchover};

/// What `StartMigration` asks for.
#[derive(Clone, Debug)]
pub struct MigrationRequest {
    pub job_id: String,
    pub group: String,
    /// `host:port` of the destination daemon's peer listener.
    pub peer: String,
    /// (source device, destination device) for every device of the group.
    pub mapping: Vec<(String, String)>,
    /// 0: the configured default.
    pub phase_timeout_ms: u64,
    /// 0: the configured default.
    pub data_connections: usize,
}

#[derive(Debug)]
pub(crate) struct OutgoingJob {
    pub job: Arc<Job>,
    pub request: MigrationRequest,
    /// Held while the job runs and while it is in doubt: stopped devices stay reserved.
    claim: Mutex<Option<Claim>>,
}

/// A failure that ends the job: the phase it happened in and what went wrong.
#[derive(Debug)]
struct Failure {
    phase: Phase,
    message: String,
    cancelled: bool,
}

impl Failure {
    fn new(phase: Phase, message: impl Into<String>) -> Failure {
        Failure { phase, message: message.into(), cancelled: false }
    }
}

/// One device of the running job.
struct SourceDevice {
    index: u32,
    plan: plan::DevicePlan,
    device: Arc<dyn MigrationDevice>,
    peer_name: String,
    fd: Option<Arc<DataFd>>,
    switchover: Option<Switchover>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A peer client to `peer`, whose certificate must carry `expected` (or the host of
/// `peer`) when peers use TLS.
pub(crate) async fn peer_client(
    daemon: &Daemon,
    peer: &str,
    expected: &str,
    timeout: Duration,
) -> Result<PeerClient<Channel>, EngineError> {
    let limits = &daemon.config.peer.limits;
    let channel = crate::tls::peer_channel(
        daemon.tls.as_deref(),
        peer,
        expected,
        limits,
        timeout.min(Duration::from_secs(10)),
    )
    .await
    .map_err(EngineError::Unavailable)?;
    Ok(PeerClient::new(channel)
        .max_decoding_message_size(limits.max_message_bytes)
        .max_encoding_message_size(limits.max_message_bytes))
}

/// Asks a source daemon's journal for its decision on a job (for in-doubt resolution on
/// the destination). No record means no commit was ever decided. With TLS the source
/// must prove to be `expected` (the job's bound source identity, or the announced
/// address's host).
pub async fn query_decision(
    daemon: &Daemon,
    source_peer: &str,
    expected: &str,
    job_id: &str,
) -> Result<Decision, EngineError> {
    if source_peer.is_empty() {
        return Err(EngineError::FailedPrecondition(format!(
            "job `{job_id}`: the source's address is unknown; pass the decision explicitly"
        )));
    }
    let mut client = peer_client(daemon, source_peer, expected, Duration::from_secs(10)).await?;
    let answer = client
        .query_job(pb::QueryJobRequest { job_id: job_id.to_string() })
        .await
        .map_err(|s| EngineError::Unavailable(format!("source `{source_peer}`: {}", s.message())))?
        .into_inner();
    Ok(if answer.decision == "commit" { Decision::Commit } else { Decision::Abort })
}

impl Daemon {
    /// Starts migrating a group to a peer; idempotent for the same job id.
    pub async fn start_migration(self: &Arc<Self>, req: MigrationRequest) -> Result<Arc<Job>, EngineError> {
        self.journal.path_of(&req.job_id)?;
        if let Some(existing) = lock(&self.outgoing).get(&req.job_id) {
            let r = &existing.request;
            if r.group == req.group && r.peer == req.peer && r.mapping == req.mapping {
                return Ok(existing.job.clone());
            }
            return Err(EngineError::FailedPrecondition(format!(
                "job `{}` already exists with another group, peer or mapping",
                req.job_id
            )));
        }
        if self.jobs.get(&req.job_id).is_ok() || self.journal.read(&req.job_id)?.is_some() {
            return Err(EngineError::FailedPrecondition(format!("job id `{}` was already used", req.job_id)));
        }
        let group = self.registry.group(&req.group)?;
        for (src, _) in &req.mapping {
            if !group.devices.contains(src) {
                return Err(EngineError::InvalidArgument(format!(
                    "mapping names `{src}`, which is not in group `{}`",
                    req.group
                )));
            }
        }
        let mut ordered_mapping = Vec::with_capacity(group.devices.len());
        for name in &group.devices {
            let targets: Vec<_> = req.mapping.iter().filter(|(s, _)| s == name).collect();
            match targets.as_slice() {
                [(_, dst)] if !dst.is_empty() => ordered_mapping.push((name.clone(), dst.clone())),
                [] => {
                    return Err(EngineError::InvalidArgument(format!(
                        "device `{name}` of group `{}` has no destination in the mapping",
                        req.group
                    )));
                }
                _ => {
                    return Err(EngineError::InvalidArgument(format!(
                        "device `{name}` is mapped more than once"
                    )));
                }
            }
        }
        let peer_addr = super::destination::resolve_peer(&req.peer)?;
        let plan = self.plan(&req.group)?;
        let claim = self.registry.claim(&req.job_id, &group.devices)?;
        let job = Job::new(&req.job_id, Role::Source, &req.group, &req.peer, ordered_mapping.clone());
        job.update(|s| s.plan = plan.to_string());
        for d in &plan.devices {
            if let Some(c) = job.counters(&d.name) {
                c.bytes_total.store(d.data_size, Ordering::Relaxed);
            }
        }
        let (job, _) = self.jobs.insert_or_get(job);
        let devices: Vec<_> = claim.devices.iter().map(|(n, e)| (n.clone(), e.device.clone())).collect();
        let outgoing =
            Arc::new(OutgoingJob { job: job.clone(), request: req.clone(), claim: Mutex::new(Some(claim)) });
        lock(&self.outgoing).insert(req.job_id.clone(), outgoing.clone());
        tracing::info!(job = %req.job_id, group = %req.group, peer = %req.peer, plan = %plan, "migration planned");
        for step in plan.steps() {
            tracing::debug!(job = %req.job_id, step = %step, "plan step");
        }
        let daemon = self.clone();
        let job_task = job.clone();
        tokio::spawn(async move {
            daemon.run_source(job_task, req, plan, ordered_mapping, peer_addr, devices).await;
            if outgoing.job.snapshot().status.is_finished() {
                lock(&outgoing.claim).take();
            }
        });
        Ok(job)
    }

    async fn run_source(
        self: Arc<Self>,
        job: Arc<Job>,
        req: MigrationRequest,
        plan: GroupPlan,
        mapping: Vec<(String, String)>,
        peer_addr: SocketAddr,
        claimed: Vec<(String, Arc<dyn MigrationDevice>)>,
    ) {
        let timeout = self.phase_timeout(req.phase_timeout_ms);
        let mut devices: Vec<SourceDevice> = plan
            .devices
            .iter()
            .enumerate()
            .map(|(i, p)| SourceDevice {
                index: i as u32,
                plan: p.clone(),
                device: claimed.iter().find(|(n, _)| *n == p.name).map(|(_, d)| d.clone()).expect("claimed"),
                peer_name: mapping
                    .iter()
                    .find(|(s, _)| *s == p.name)
                    .map(|(_, d)| d.clone())
                    .unwrap_or_default(),
                fd: None,
                switchover: None,
            })
            .collect();
        let mut run = SourceRun {
            daemon: self.clone(),
            job: job.clone(),
            req: req.clone(),
            timeout,
            peer: None,
            sender: None,
            downtime_start: None,
            progress: Arc::new(Progress::new(devices.len())),
        };
        let outcome = run.migrate(&mut devices, &plan, peer_addr).await;
        match outcome {
            Ok(()) => {}
            Err(failure) => run.rollback(&mut devices, failure).await,
        }
        // After the job's last device step: never inside downtime.
        self.stop_dirty_tracking_after_job(&job).await;
        if job.snapshot().status.is_finished() {
            self.jobs.retire(&req.job_id);
        }
    }

    /// ResolveJob on the source: the journal decides. A recorded commit is re-sent.
    pub(crate) async fn resolve_outgoing(self: &Arc<Self>, job_id: &str) -> Result<Arc<Job>, EngineError> {
        let job = self.job(job_id)?;
        let snap = job.snapshot();
        match self.journal.read(job_id)? {
            Some(Decision::Commit) => {
                if snap.status == JobStatus::Succeeded {
                    return Ok(job);
                }
                let expected = match self.bindings.expected(job_id) {
                    crate::peer_identity::ExpectedPeer::Named(name) => name,
                    _ => String::new(),
                };
                let mut client = peer_client(self, &snap.peer, &expected, self.phase_timeout(0)).await?;
                client.commit(pb::CommitRequest { job_id: job_id.to_string() }).await.map_err(|s| {
                    EngineError::Unavailable(format!("peer `{}`: commit: {}", snap.peer, s.message()))
                })?;
                let started = snap.phases.iter().find(|p| p.phase == Phase::P2pBarrier).map(|p| p.started);
                job.update(|s| {
                    if let Some(start) = started {
                        s.downtime = Some(start.elapsed());
                    }
                });
                // Cleanup, outside downtime: STOP_COPY -> STOP, then the devices are free.
                let outgoing = lock(&self.outgoing).get(job_id).cloned();
                let claim = outgoing.and_then(|o| lock(&o.claim).take());
                if let Some(claim) = claim {
                    let targets: Vec<_> =
                        claim.devices.iter().map(|(_, e)| (e.device.clone(), State::Stop)).collect();
                    for ((device, _), r) in targets.iter().zip(transition_all(&targets).await) {
                        match r {
                            Ok(_) => job.set_device_state(device.name(), State::Stop),
                            Err(e) => {
                                tracing::warn!(job = %job_id, error = %e, "cleanup after resolution failed")
                            }
                        }
                    }
                }
                job.finish(JobStatus::Succeeded, None);
                self.jobs.retire(job_id);
                Ok(job)
            }
            Some(Decision::Abort) | None if snap.status == JobStatus::InDoubt => {
                Err(EngineError::Internal(format!(
                    "job `{job_id}` is in doubt but the journal holds no commit; this cannot happen (report a bug)"
                )))
            }
            _ => Err(EngineError::FailedPrecondition(format!(
                "job `{job_id}` is not in doubt ({:?}, phase {})",
                snap.status, snap.phase
            ))),
        }
    }

    /// Peer QueryJob: this daemon's view of a job, including its journaled decision.
    pub fn query_job(&self, job_id: &str) -> Result<pb::QueryJobResponse, EngineError> {
        let decision = match self.journal.read(job_id)? {
            Some(Decision::Commit) => "commit",
            Some(Decision::Abort) => "abort",
            None => "",
        };
        Ok(match self.jobs.get(job_id) {
            Ok(job) => {
                let s = job.snapshot();
                pb::QueryJobResponse {
                    known: true,
                    phase: s.phase.to_string(),
                    error: s.error.unwrap_or_default(),
                    decision: decision.into(),
                }
            }
            Err(_) => pb::QueryJobResponse {
                known: !decision.is_empty(),
                decision: decision.into(),
                ..Default::default()
            },
        })
    }
}

struct SourceRun {
    daemon: Arc<Daemon>,
    job: Arc<Job>,
    req: MigrationRequest,
    timeout: Duration,
    peer: Option<PeerClient<Channel>>,
    sender: Option<StreamSender>,
    downtime_start: Option<Instant>,
    progress: Arc<Progress>,
}

impl SourceRun {
    /// Races `fut` against the phase timeout and cancellation.
    async fn guard<T>(
        &self,
        phase: Phase,
        fut: impl Future<Output = Result<T, String>>,
    ) -> Result<T, Failure> {
        tokio::select! {
            biased;
            _ = self.job.cancel.cancelled() => Err(Failure { phase, message: "cancelled by the control API".into(), cancelled: true }),
            r = tokio::time::timeout(self.timeout, fut) => match r {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(message)) => Err(Failure::new(phase, message)),
                Err(_) => Err(Failure::new(phase, format!("timed out after {:?}", self.timeout))),
            },
        }
    }

    fn peer(&self) -> PeerClient<Channel> {
        self.peer.clone().expect("connected in the handshake")
    }

    /// Moves the listed devices in parallel; the first failure fails the phase.
    async fn barrier(
        &self,
        phase: Phase,
        devices: &mut [SourceDevice],
        pick: impl Fn(&SourceDevice) -> Option<State>,
    ) -> Result<(), Failure> {
        let chosen: Vec<usize> = (0..devices.len()).filter(|&i| pick(&devices[i]).is_some()).collect();
        if chosen.is_empty() {
            return Ok(());
        }
        let targets: Vec<_> =
            chosen.iter().map(|&i| (devices[i].device.clone(), pick(&devices[i]).expect("chosen"))).collect();
        let results = self.guard(phase, async { Ok(transition_all(&targets).await) }).await?;
        let mut first_error = None;
        for ((&i, (_, target)), result) in chosen.iter().zip(&targets).zip(results) {
            match result {
                Ok(fd) => {
                    self.job.set_device_state(devices[i].device.name(), *target);
                    if let Some(fd) = fd {
                        devices[i].fd = Some(Arc::new(fd));
                    }
                }
                Err(e) => {
                    if let Some(state) = e.state_after {
                        self.job.set_device_state(devices[i].device.name(), state);
                    }
                    self.job.update(|s| {
                        if let Some(d) = s.devices.iter_mut().find(|d| d.name == devices[i].device.name()) {
                            d.error = Some(e.to_string());
                        }
                    });
                    first_error.get_or_insert(e.to_string());
                }
            }
        }
        match first_error {
            Some(message) => Err(Failure::new(phase, message)),
            None => Ok(()),
        }
    }

    fn sync_progress(&self, devices: &[SourceDevice]) {
        for d in devices {
            if let Some(c) = self.job.counters(d.device.name()) {
                c.bytes_done.store(self.progress.bytes(d.index), Ordering::Relaxed);
            }
        }
        self.job.touch();
    }

    /// Hands a device's saving data_fd to its stream reader thread.
    fn start_stream(
        &self,
        phase: Phase,
        d: &mut SourceDevice,
        switchover: Switchover,
    ) -> Result<(), Failure> {
        let fd = d.fd.clone().ok_or_else(|| {
            Failure::new(phase, format!("device `{}`: no saving data_fd was opened", d.device.name()))
        })?;
        self.sender
            .as_ref()
            .expect("connected")
            .add_device(d.index, fd, switchover.clone())
            .map_err(|e| Failure::new(phase, format!("device `{}`: {e}", d.device.name())))?;
        d.switchover = Some(switchover);
        Ok(())
    }

    async fn migrate(
        &mut self,
        devices: &mut [SourceDevice],
        plan: &GroupPlan,
        peer_addr: SocketAddr,
    ) -> Result<(), Failure> {
        let job_id = self.req.job_id.clone();

        // Handshake: the destination checks everything before any device changes state.
        self.job.enter_phase(Phase::Handshake);
        let mut offered = Vec::with_capacity(devices.len());
        for d in devices.iter() {
            offered.push(pb::HandshakeDevice {
                index: d.index,
                source_name: d.plan.name.clone(),
                destination_name: d.peer_name.clone(),
                caps: d.plan.caps.bits(),
                data_size: d.plan.data_size,
                identity: Some({
                    let id = d.device.identity();
                    pb::DeviceIdentity { driver: id.driver, model: id.model }
                }),
            });
        }
        let connections = if self.req.data_connections == 0 {
            self.daemon.config.peer.data_connections
        } else {
            self.req.data_connections
        };
        let max_payload = self.daemon.config.peer.max_frame_payload;
        let peer = self.req.peer.clone();
        let timeout = self.timeout;
        let expected = match self.daemon.bindings.expected(&job_id) {
            crate::peer_identity::ExpectedPeer::Named(name) => name,
            _ => String::new(),
        };
        let daemon = self.daemon.clone();
        let mut client = self
            .guard(Phase::Handshake, async {
                peer_client(&daemon, &peer, &expected, timeout).await.map_err(|e| e.to_string())
            })
            .await?;
        let request = pb::HandshakeRequest {
            protocol_version: super::destination::PROTOCOL_VERSION,
            job_id: job_id.clone(),
            devices: offered,
            data_connections: connections as u32,
            max_frame_payload: max_payload as u32,
            source_peer: self.daemon.config.peer.advertised(),
        };
        let accepted = self
            .guard(Phase::Handshake, async {
                client
                    .handshake(request)
                    .await
                    .map(|r| r.into_inner())
                    .map_err(|s| format!("destination refused: {}", s.message()))
            })
            .await?;
        self.peer = Some(client);

        // Data connections are opened before the first device leaves RUNNING.
        let data_addr = SocketAddr::new(peer_addr.ip(), accepted.data_port as u16);
        let opts = StreamOptions {
            connections,
            max_payload,
            fault: self.daemon.config.test.stream_fault.map(Into::into),
            dead_peer: Duration::from_millis(self.daemon.config.peer.limits.dead_peer_ms),
            ..StreamOptions::default()
        };
        let preamble = Preamble { job_id: job_id.clone(), token: accepted.session_token.to_vec() };
        // The data connections prove the same destination identity as the channel.
        let data_tls = match &self.daemon.tls {
            Some(tls) => Some((
                tls.client_config(),
                crate::tls::server_name(&peer, &expected)
                    .map_err(|e| Failure::new(Phase::Handshake, e.to_string()))?,
            )),
            None => None,
        };
        let progress = self.progress.clone();
        let count = devices.len();
        let sender = self
            .guard(Phase::Handshake, async {
                StreamSender::connect_tls(data_addr, data_tls, preamble, opts, count, progress)
                    .await
                    .map_err(|e| format!("data connections: {e}"))
            })
            .await?;
        self.sender = Some(sender);

        // Pre-copy: initial data streams while the VM runs.
        if plan.any_pre_copy() {
            self.job.enter_phase(Phase::PreCopy);
            self.barrier(Phase::PreCopy, devices, |d| d.plan.pre_copy.then_some(State::PreCopy)).await?;
            for d in devices.iter_mut().filter(|d| d.plan.pre_copy) {
                self.start_stream(Phase::PreCopy, d, Switchover::new())?;
            }
            self.wait_initial_data(devices).await?;
        }

        // P2P barrier: every P2P device quiesced before any device stops.
        self.job.enter_phase(Phase::P2pBarrier);
        self.downtime_start = Some(Instant::now());
        self.barrier(Phase::P2pBarrier, devices, |d| match (d.plan.stop_order, d.plan.pre_copy) {
            (StopOrder::P2pQuiesce, true) => Some(State::PreCopyP2p),
            (StopOrder::P2pQuiesce, false) => Some(State::RunningP2p),
            _ => None,
        })
        .await?;

        // Stop-copy barrier: devices without P2P stop only now, after the others quiesced.
        self.job.enter_phase(Phase::StopCopy);
        self.barrier(Phase::StopCopy, devices, |_| Some(State::StopCopy)).await?;
        for d in devices.iter_mut() {
            match &d.switchover {
                Some(switchover) => switchover.fire(),
                None => {
                    let switchover = Switchover::new();
                    switchover.fire();
                    self.start_stream(Phase::StopCopy, d, switchover)?;
                }
            }
        }

        // Drain: every data_fd to EOF, in parallel, framed and checksummed.
        self.job.enter_phase(Phase::Drain);
        let sender = self.sender.take().expect("connected");
        let finish = sender.finish();
        tokio::pin!(finish);
        let mut ticker = tokio::time::interval(Duration::from_millis(100));
        let cancel = self.job.cancel.clone();
        let deadline = tokio::time::sleep(self.timeout);
        tokio::pin!(deadline);
        let summaries = loop {
            tokio::select! {
                r = &mut finish => break r.map_err(|e| {
                    let names = devices.iter().map(|d| (d.index, d.device.name()));
                    Failure::new(Phase::Drain, super::with_device_name(&e, names))
                })?,
                _ = ticker.tick() => self.sync_progress(devices),
                _ = cancel.cancelled() => return Err(Failure { phase: Phase::Drain, message: "cancelled by the control API".into(), cancelled: true }),
                _ = &mut deadline => return Err(Failure::new(Phase::Drain, format!("timed out after {:?}", self.timeout))),
            }
        };
        self.sync_progress(devices);
        for s in &summaries {
            let device = devices.iter().find(|d| d.index == s.index);
            if let Some(c) = device.and_then(|d| self.job.counters(d.device.name())) {
                c.bytes_total.store(s.bytes, Ordering::Relaxed);
                c.bytes_done.store(s.bytes, Ordering::Relaxed);
            }
        }

        // Await loaded: the destination verified every END record and loaded every device.
        self.job.enter_phase(Phase::AwaitLoaded);
        let mut peer = self.peer();
        let loaded = self
            .guard(Phase::AwaitLoaded, async {
                peer.await_loaded(pb::AwaitLoadedRequest { job_id: job_id.clone() })
                    .await
                    .map(|r| r.into_inner())
                    .map_err(|s| format!("destination: {}", s.message()))
            })
            .await?;
        self.job.update(|s| {
            for d in &mut s.devices {
                d.verified = loaded.devices.iter().any(|l| l.destination_name == d.peer_name);
            }
        });

        // Commit point: durable record first (rule S2), then tell the destination.
        if self.job.cancel.is_cancelled() {
            return Err(Failure {
                phase: Phase::AwaitLoaded,
                message: "cancelled by the control API".into(),
                cancelled: true,
            });
        }
        self.job.enter_phase(Phase::Commit);
        if let Err(e) = self.daemon.journal.record(&job_id, Decision::Commit) {
            return Err(Failure::new(Phase::Commit, format!("cannot journal the commit decision: {e}")));
        }
        tracing::info!(job = %job_id, "commit recorded");
        let mut peer = self.peer();
        let committed =
            tokio::time::timeout(self.timeout, peer.commit(pb::CommitRequest { job_id: job_id.clone() }))
                .await;
        match committed {
            Ok(Ok(_)) => {}
            Ok(Err(status))
                if status.code() != tonic::Code::Unavailable && status.code() != tonic::Code::Unknown =>
            {
                // The destination answered but failed to resume: rule D3, the source stays stopped.
                self.job.update(|s| s.downtime = self.downtime_start.map(|t| t.elapsed()));
                self.job.finish(
                    JobStatus::Failed,
                    Some(format!("phase commit: destination could not resume: {}", status.message())),
                );
                return Ok(());
            }
            other => {
                let why = match other {
                    Ok(Err(status)) => status.message().to_string(),
                    _ => format!("no answer within {:?}", self.timeout),
                };
                // Rule S3: committed but not delivered. Devices stay stopped; never resume.
                self.job.finish(
                    JobStatus::InDoubt,
                    Some(format!(
                        "phase commit: commit recorded but not delivered ({why}); resolve with ResolveJob"
                    )),
                );
                return Ok(());
            }
        }
        let downtime = self.downtime_start.map(|t| t.elapsed());
        self.job.update(|s| s.downtime = downtime);
        tracing::info!(job = %job_id, downtime_ms = downtime.map(|d| d.as_secs_f64() * 1e3), "destination running");

        // Cleanup, outside downtime: STOP_COPY -> STOP.
        self.job.enter_phase(Phase::Cleanup);
        for d in devices.iter_mut() {
            d.fd = None;
        }
        if let Err(f) = self.barrier(Phase::Cleanup, devices, |_| Some(State::Stop)).await {
            tracing::warn!(job = %job_id, error = %f.message, "cleanup after commit failed; the destination runs");
        }
        self.job.finish(JobStatus::Succeeded, None);
        Ok(())
    }

    /// Polls PRECOPY_INFO until every pre-copy device has sent its initial data (or the
    /// configured pre-copy budget is spent). Polling also drives drivers (mlx5, virtio)
    /// that start incremental saves from this ioctl.
    async fn wait_initial_data(&self, devices: &[SourceDevice]) -> Result<(), Failure> {
        let budget = Duration::from_millis(self.daemon.config.migration.pre_copy_max_ms);
        let started = Instant::now();
        loop {
            let mut pending = 0u64;
            for d in devices.iter().filter(|d| d.plan.pre_copy) {
                let fd = d.fd.clone().expect("pre-copy fd");
                let info = super::blocking(&d.device, move |dev| dev.precopy_info(&fd))
                    .await
                    .map_err(|e| Failure::new(Phase::PreCopy, e.to_string()))?;
                pending += info.initial_bytes;
            }
            self.sync_progress(devices);
            if pending == 0 {
                return Ok(());
            }
            if started.elapsed() >= budget {
                tracing::info!(job = %self.req.job_id, pending, "pre-copy budget spent; switching over");
                return Ok(());
            }
            if self.job.cancel.is_cancelled() {
                return Err(Failure {
                    phase: Phase::PreCopy,
                    message: "cancelled by the control API".into(),
                    cancelled: true,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Rule S1: before commit, every device goes back to RUNNING along legal arcs.
    async fn rollback(&mut self, devices: &mut [SourceDevice], failure: Failure) {
        let job_id = self.req.job_id.clone();
        let mut message = format!("phase {}: {}", failure.phase, failure.message);
        tracing::warn!(job = %job_id, phase = %failure.phase, error = %failure.message, "rolling back");
        self.job.enter_phase(Phase::Rollback);
        if let Some(sender) = self.sender.take() {
            sender.abort();
        }
        if let Err(e) = self.daemon.journal.record(&job_id, Decision::Abort) {
            tracing::warn!(job = %job_id, error = %e, "cannot journal the abort decision (no commit was recorded, so resuming is safe)");
        }
        if let Some(mut peer) = self.peer.clone() {
            let abort = peer.abort(pb::AbortRequest { job_id: job_id.clone(), reason: message.clone() });
            match tokio::time::timeout(Duration::from_secs(5), abort).await {
                Ok(Ok(answer)) => {
                    // The destination's own finding is the cause when this side only saw
                    // the connections it closed (a broken pipe in drain, for instance).
                    let found = answer.into_inner().destination_failure;
                    if !found.is_empty() && !message.contains(&found) {
                        message = format!("{message}; the destination found: {found}");
                    }
                }
                Ok(Err(s)) => {
                    tracing::warn!(job = %job_id, error = %s.message(), "destination did not confirm the abort")
                }
                Err(_) => tracing::warn!(job = %job_id, "destination did not answer the abort"),
            }
        }
        for d in devices.iter_mut() {
            d.fd = None;
            if let Some(s) = &d.switchover {
                s.fire();
            }
        }
        let mut errors = Vec::new();
        // Find where each device is; a device in ERROR can only be reset (its state is lost).
        let mut p2p = Vec::new();
        let mut all = Vec::new();
        for d in devices.iter() {
            let state = super::blocking(&d.device, |dev| dev.state()).await;
            match state {
                Ok(State::Running) => {}
                Ok(State::Error) => {
                    errors.push(format!(
                        "device `{}` fell into ERROR and was reset: its running state is lost",
                        d.device.name()
                    ));
                    if let Err(e) = super::blocking(&d.device, |dev| dev.reset()).await {
                        errors.push(format!("phase rollback: {e}"));
                    }
                }
                Ok(_) => {
                    if d.plan.caps.has_p2p() {
                        p2p.push((d.device.clone(), State::RunningP2p));
                    }
                    all.push((d.device.clone(), State::Running));
                }
                Err(e) => errors.push(format!("phase rollback: {e}")),
            }
        }
        // Resume order mirrors the stop order: every P2P device quiesced-running first.
        for ((device, target), r) in p2p.iter().zip(transition_all(&p2p).await) {
            match r {
                Ok(_) => self.job.set_device_state(device.name(), *target),
                Err(e) => errors.push(format!("phase rollback: {e}")),
            }
        }
        for ((device, target), r) in all.iter().zip(transition_all(&all).await) {
            match r {
                Ok(_) => self.job.set_device_state(device.name(), *target),
                Err(e) => errors.push(format!("phase rollback: {e}")),
            }
        }
        let status = if !errors.is_empty() {
            JobStatus::Failed
        } else if failure.cancelled {
            JobStatus::Cancelled
        } else {
            JobStatus::RolledBack
        };
        let full =
            if errors.is_empty() { message } else { format!("{message}; rollback: {}", errors.join("; ")) };
        self.job.finish(status, Some(full));
    }
}
