//! The source side of a migration: the coordinator of the two-phase commit.
//!
//! Phases (see [`super::commit`] for the rules): handshake → [pre-copy] → switchover
//! (P2P barrier, the device without P2P stopped alone, stop-copy barrier, in the order
//! [`super::plan::switchover`] gives) → drain → await loaded → commit (journal, then
//! tell) → cleanup. Any failure before the commit record rolls every device back to its
//! starting state ([`super::plan::rollback`]).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use vfio_migd_proto::v1 as pb;
use vfio_migd_proto::v1::peer_client::PeerClient;

use super::plan::{self, BarrierKind, GroupPlan};
use super::protocol::{self, Answer, QueryReply, ReadBack, Sender, SourceAction, SourceEvent, SourceMachine};
use super::{Daemon, Decision, EngineError, transition_all};
use crate::device::{DataFd, MigrationDevice};
use crate::fsm::State;
use crate::job::{Job, JobStatus, Phase, Role};
use crate::peer_identity::PeerIdentity;
use crate::registry::Claim;
use crate::stream::{Preamble, Progress, StreamOptions, StreamSender, Switchover};
use tokio_util::sync::CancellationToken;

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
    /// The commit protocol's source half: every decision about the job is its.
    machine: Mutex<SourceMachine>,
    /// Ticks whenever the machine moved (a query answered "not yet" waits on it).
    moved: tokio::sync::watch::Sender<u64>,
    /// Stops the transfer: a query from the destination decided abort (rule S3).
    stop: CancellationToken,
    /// Each device's state when it was claimed (rule S0): what a rollback returns to.
    recorded: Vec<(String, State)>,
    /// Where the job's destination is: only it is answered QueryJob.
    peer_ip: std::net::IpAddr,
}

impl OutgoingJob {
    fn feed(&self, event: SourceEvent) -> Vec<SourceAction> {
        let actions = lock(&self.machine).on(event);
        self.moved.send_modify(|n| *n += 1);
        actions
    }

    fn status(&self) -> JobStatus {
        lock(&self.machine).status()
    }

    fn device_names(&self) -> Vec<String> {
        self.recorded.iter().map(|(n, _)| n.clone()).collect()
    }
}

/// Why a transfer stopped when the destination asked for the outcome first.
const PRESUMED_ABORT: &str =
    "the destination asked for the job's outcome before any decision; abort was journaled (presumed abort)";

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

/// Asks a source daemon for its decision on a job (for in-doubt resolution on the
/// destination). `Unknown` means hold: the source does not know the job. With TLS the
/// source must prove to be `expected` (the job's bound source identity, or the
/// announced address's host).
pub async fn query_decision(
    daemon: &Daemon,
    source_peer: &str,
    expected: &str,
    job_id: &str,
) -> Result<Answer, EngineError> {
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
    Ok(match pb::JobDecision::try_from(answer.decision_value) {
        Ok(pb::JobDecision::Commit) => Answer::Commit,
        Ok(pb::JobDecision::Abort) => Answer::Abort,
        Ok(pb::JobDecision::Unknown) => Answer::Unknown,
        // An older source: only its text; no text is no answer, never an abort.
        _ => match answer.decision.as_str() {
            "commit" => Answer::Commit,
            "abort" => Answer::Abort,
            _ => Answer::Unknown,
        },
    })
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
        // Rule S0: only devices that run the VM are migrated; their states are recorded.
        let mut recorded = Vec::with_capacity(claim.devices.len());
        for (name, entry) in &claim.devices {
            let state = super::blocking(&entry.device, |d| d.state())
                .await
                .map_err(|e| EngineError::FailedPrecondition(e.to_string()))?;
            protocol::check_claim(name, state, self.registry.migrated_away(name).as_deref())
                .map_err(|e| EngineError::FailedPrecondition(e.to_string()))?;
            recorded.push((name.clone(), state));
        }
        let job = Job::new(&req.job_id, Role::Source, &req.group, &req.peer, ordered_mapping.clone());
        job.update(|s| s.plan = plan.to_string());
        for d in &plan.devices {
            if let Some(c) = job.counters(&d.name) {
                c.bytes_total.store(d.data_size, Ordering::Relaxed);
            }
        }
        let (job, _) = self.jobs.insert_or_get(job);
        let devices: Vec<_> = claim.devices.iter().map(|(n, e)| (n.clone(), e.device.clone())).collect();
        let outgoing = Arc::new(OutgoingJob {
            job: job.clone(),
            request: req.clone(),
            claim: Mutex::new(Some(claim)),
            machine: Mutex::new(SourceMachine::new()),
            moved: tokio::sync::watch::channel(0).0,
            stop: CancellationToken::new(),
            recorded,
            peer_ip: peer_addr.ip(),
        });
        lock(&self.outgoing).insert(req.job_id.clone(), outgoing.clone());
        tracing::info!(job = %req.job_id, group = %req.group, peer = %req.peer, plan = %plan, "migration planned");
        for step in plan.steps() {
            tracing::debug!(job = %req.job_id, step = %step, "plan step");
        }
        let daemon = self.clone();
        let task_outgoing = outgoing.clone();
        tokio::spawn(async move {
            daemon.run_source(task_outgoing, req, plan, ordered_mapping, peer_addr, devices).await;
            if outgoing.job.snapshot().status.is_finished() {
                lock(&outgoing.claim).take();
            }
        });
        Ok(job)
    }

    async fn run_source(
        self: Arc<Self>,
        outgoing: Arc<OutgoingJob>,
        req: MigrationRequest,
        plan: GroupPlan,
        mapping: Vec<(String, String)>,
        peer_addr: SocketAddr,
        claimed: Vec<(String, Arc<dyn MigrationDevice>)>,
    ) {
        let job = outgoing.job.clone();
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
            outgoing: outgoing.clone(),
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

    /// Records a decision; on failure reads the journal back (rule S4) and says what it found.
    fn journal_event(&self, job_id: &str, decision: Decision) -> (SourceEvent, Option<String>) {
        match self.journal.record(job_id, decision) {
            Ok(()) => (SourceEvent::Journaled(decision), None),
            Err(error) => {
                let read_back = match self.journal.read(job_id) {
                    Ok(Some(Decision::Commit)) => ReadBack::Commit,
                    Ok(Some(Decision::Abort)) => ReadBack::Abort,
                    Ok(None) => ReadBack::Nothing,
                    Err(_) => ReadBack::Unreadable,
                };
                tracing::error!(job = %job_id, error = %error, ?read_back, "journal write failed");
                (SourceEvent::JournalFailed { wrote: decision, read_back }, Some(error.to_string()))
            }
        }
    }

    /// ResolveJob on the source: the machine decides from the journal; a commit is
    /// (re)written durably and re-sent.
    pub(crate) async fn resolve_outgoing(self: &Arc<Self>, job_id: &str) -> Result<Arc<Job>, EngineError> {
        let job = self.job(job_id)?;
        let outgoing = lock(&self.outgoing).get(job_id).cloned().ok_or_else(|| {
            EngineError::NotFound(format!("job `{job_id}` is not a source job of this daemon"))
        })?;
        let status = outgoing.status();
        if status != JobStatus::InDoubt {
            return Err(EngineError::FailedPrecondition(format!(
                "job `{job_id}` is not in doubt ({status:?}, phase {})",
                job.snapshot().phase
            )));
        }
        let mut queue: std::collections::VecDeque<SourceAction> =
            outgoing.feed(SourceEvent::ResolveAsked).into();
        let mut trouble = None;
        while let Some(action) = queue.pop_front() {
            let event = match action {
                SourceAction::Journal(decision) => {
                    let (event, error) = self.journal_event(job_id, decision);
                    trouble = error.or(trouble);
                    Some(event)
                }
                SourceAction::MarkMigratedAway => {
                    self.registry.mark_migrated_away(&outgoing.device_names(), job_id);
                    None
                }
                SourceAction::SendCommit => {
                    let peer = outgoing.request.peer.clone();
                    let sent = async {
                        let expected = match self.bindings.expected(job_id) {
                            crate::peer_identity::ExpectedPeer::Named(name) => name,
                            _ => String::new(),
                        };
                        let mut client = peer_client(self, &peer, &expected, self.phase_timeout(0)).await?;
                        client.commit(pb::CommitRequest { job_id: job_id.to_string() }).await.map_err(|s| {
                            EngineError::Unavailable(format!("peer `{peer}`: commit: {}", s.message()))
                        })
                    };
                    Some(match sent.await {
                        Ok(_) => SourceEvent::CommitAcked,
                        Err(e) => {
                            trouble = Some(e.to_string());
                            SourceEvent::CommitUnconfirmed
                        }
                    })
                }
                SourceAction::Cleanup => {
                    let started = job
                        .snapshot()
                        .phases
                        .iter()
                        .find(|p| p.phase == Phase::P2pBarrier)
                        .map(|p| p.started);
                    job.update(|s| s.downtime = started.map(|t| t.elapsed()));
                    // Cleanup, outside downtime: STOP_COPY -> STOP, then the devices are free.
                    let claim = lock(&outgoing.claim).take();
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
                    None
                }
                _ => None,
            };
            if let Some(event) = event {
                queue.extend(outgoing.feed(event));
            }
        }
        match outgoing.status() {
            JobStatus::Succeeded => {
                job.finish(JobStatus::Succeeded, None);
                self.jobs.retire(job_id);
                Ok(job)
            }
            _ => Err(EngineError::Unavailable(format!(
                "job `{job_id}` is still in doubt: {}",
                trouble.unwrap_or_else(|| "the destination did not confirm the commit".into())
            ))),
        }
    }

    /// Peer QueryJob, answered only to the job's own destination (rule S3): an undecided
    /// job is decided "abort" durably before the answer, and never committed after it; a
    /// job this daemon does not know is `unknown`. Anyone else is refused and nothing is
    /// journaled.
    pub async fn query_job(
        &self,
        job_id: &str,
        caller: &PeerIdentity,
    ) -> Result<pb::QueryJobResponse, EngineError> {
        self.journal.path_of(job_id)?;
        let outgoing = lock(&self.outgoing).get(job_id).cloned();
        let Some(outgoing) = outgoing else {
            let answer = match self.journal.read(job_id)? {
                Some(Decision::Commit) => Answer::Commit,
                Some(Decision::Abort) => Answer::Abort,
                None => Answer::Unknown,
            };
            return Ok(query_response(answer, None));
        };
        let from = if caller.addr.map(|a| a.ip()) == Some(outgoing.peer_ip) {
            Sender::JobPeer
        } else {
            Sender::Stranger
        };
        let mut moved = outgoing.moved.subscribe();
        let deadline = tokio::time::Instant::now() + self.phase_timeout(0);
        loop {
            moved.mark_unchanged();
            let mut queue: std::collections::VecDeque<SourceAction> =
                outgoing.feed(SourceEvent::QueryAsked { from }).into();
            let mut reply = None;
            while let Some(action) = queue.pop_front() {
                match action {
                    SourceAction::Journal(decision) => {
                        let (event, _) = self.journal_event(job_id, decision);
                        queue.extend(outgoing.feed(event));
                    }
                    SourceAction::StopTransfer => outgoing.stop.cancel(),
                    SourceAction::Reply(r) => reply = Some(r),
                    // The job's own task rolls back once its transfer stopped.
                    _ => {}
                }
            }
            match reply {
                Some(QueryReply::Answer(answer)) => return Ok(query_response(answer, Some(&outgoing.job))),
                Some(QueryReply::PermissionDenied) => {
                    return Err(EngineError::PermissionDenied(format!(
                        "job `{job_id}` answers only its destination ({}); {} is not it",
                        outgoing.peer_ip,
                        caller.addr.map_or_else(|| "an unknown address".to_string(), |a| a.to_string())
                    )));
                }
                Some(QueryReply::Unavailable) => {
                    return Err(EngineError::Unavailable(format!(
                        "job `{job_id}`: the journal cannot give a durable answer yet"
                    )));
                }
                Some(QueryReply::NotYet) | None => {
                    if tokio::time::timeout_at(deadline, moved.changed()).await.is_err() {
                        return Err(EngineError::Unavailable(format!("job `{job_id}`: no decision yet")));
                    }
                }
            }
        }
    }
}

/// The QueryJob answer, in the enum and in the text older peers read.
fn query_response(answer: Answer, job: Option<&Arc<Job>>) -> pb::QueryJobResponse {
    let (value, text) = match answer {
        Answer::Commit => (pb::JobDecision::Commit, "commit"),
        Answer::Abort => (pb::JobDecision::Abort, "abort"),
        Answer::Unknown => (pb::JobDecision::Unknown, ""),
    };
    let snapshot = job.map(|j| j.snapshot());
    pb::QueryJobResponse {
        known: answer != Answer::Unknown,
        phase: snapshot.as_ref().map(|s| s.phase.to_string()).unwrap_or_default(),
        error: snapshot.and_then(|s| s.error).unwrap_or_default(),
        decision: text.into(),
        decision_value: value.into(),
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
    outgoing: Arc<OutgoingJob>,
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
            _ = self.outgoing.stop.cancelled() => Err(Failure::new(phase, PRESUMED_ABORT)),
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
        // The transitions run on their own task: a timeout or cancel must not leave a SET
        // running behind the rollback (rule S6). The barrier is joined before it fails.
        let moving = targets.clone();
        let mut transitions = tokio::spawn(async move { transition_all(&moving).await });
        let results = match self.guard(phase, async { Ok((&mut transitions).await) }).await {
            Ok(joined) => joined,
            Err(failure) => {
                let _settled = transitions.await;
                return Err(failure);
            }
        };
        let results = results.map_err(|e| Failure::new(phase, format!("the transition task failed: {e}")))?;
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

        // Switchover, in the sequencer's order (engine/plan.rs): the P2P barrier; hold
        // before-stop; the device without P2P stopped alone and confirmed; every device to
        // STOP_COPY; final dirty sync; hold after-stop. Planned before the downtime starts,
        // from the states this job put the devices in: nothing is asked of a device here.
        let steps = plan.switchover().map_err(|e| Failure::new(Phase::P2pBarrier, e.to_string()))?;
        self.job.enter_phase(Phase::P2pBarrier);
        self.downtime_start = Some(Instant::now());
        let mut stopping = false;
        for step in &steps {
            match step {
                plan::Step::Barrier { kind, moves } => {
                    let phase =
                        if *kind == BarrierKind::P2pQuiesce { Phase::P2pBarrier } else { Phase::StopCopy };
                    if phase == Phase::StopCopy && !stopping {
                        stopping = true;
                        self.job.enter_phase(Phase::StopCopy);
                    }
                    self.barrier(phase, devices, |d| {
                        moves.iter().find(|m| m.device == d.index as usize).map(|m| m.target)
                    })
                    .await?;
                }
                plan::Step::FinalDirtySync => {
                    // Every device is in STOP_COPY (the sequencer puts this step right
                    // after the last stop): the drain starts now, the sync runs beside it.
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
                    // The final dirty read itself is issue #15's; nothing to do yet.
                }
                // Issue #15 gives the holds a body (the control plane's go, the VMM's RAM).
                plan::Step::Hold(_) => {}
                plan::Step::Reset { .. } => {
                    return Err(Failure::new(Phase::StopCopy, "the switchover plan asked for a reset"));
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

        // The decision is the machine's (engine/protocol): the durable record first (rule
        // S2), then Commit. Nothing but the commit decision runs inside the downtime here.
        if self.job.cancel.is_cancelled() {
            return Err(Failure {
                phase: Phase::AwaitLoaded,
                message: "cancelled by the control API".into(),
                cancelled: true,
            });
        }
        self.job.enter_phase(Phase::Commit);
        let mut queue: std::collections::VecDeque<SourceAction> =
            self.outgoing.feed(SourceEvent::Loaded).into();
        let mut trouble: Option<String> = None;
        while let Some(action) = queue.pop_front() {
            let event = match action {
                SourceAction::Journal(decision) => {
                    let (event, error) = self.daemon.journal_event(&job_id, decision);
                    if let Some(error) = error {
                        trouble = Some(format!("cannot journal the {} decision: {error}", decision.as_str()));
                    } else if decision == Decision::Commit {
                        tracing::info!(job = %job_id, "commit recorded");
                    }
                    Some(event)
                }
                SourceAction::MarkMigratedAway => {
                    self.daemon.registry.mark_migrated_away(&self.outgoing.device_names(), &job_id);
                    None
                }
                SourceAction::SendCommit => {
                    let mut peer = self.peer();
                    let answer = tokio::time::timeout(
                        self.timeout,
                        peer.commit(pb::CommitRequest { job_id: job_id.clone() }),
                    )
                    .await;
                    Some(match answer {
                        Ok(Ok(_)) => SourceEvent::CommitAcked,
                        Ok(Err(status)) => {
                            trouble =
                                Some(format!("the destination answered Commit with: {}", status.message()));
                            SourceEvent::CommitUnconfirmed
                        }
                        Err(_) => {
                            trouble = Some(format!("no answer to Commit within {:?}", self.timeout));
                            SourceEvent::CommitUnconfirmed
                        }
                    })
                }
                SourceAction::Cleanup => {
                    let downtime = self.downtime_start.map(|t| t.elapsed());
                    self.job.update(|s| s.downtime = downtime);
                    tracing::info!(job = %job_id, downtime_ms = downtime.map(|d| d.as_secs_f64() * 1e3), "destination running");
                    // Cleanup, outside downtime: STOP_COPY -> STOP.
                    self.job.enter_phase(Phase::Cleanup);
                    for d in devices.iter_mut() {
                        d.fd = None;
                    }
                    // Not through `barrier`: its guard gives up on a cancel, and a cancel that
                    // raced the commit must not leave the devices in STOP_COPY.
                    let targets: Vec<_> = devices.iter().map(|d| (d.device.clone(), State::Stop)).collect();
                    for ((device, target), r) in targets.iter().zip(transition_all(&targets).await) {
                        match r {
                            Ok(_) => self.job.set_device_state(device.name(), *target),
                            Err(e) => {
                                tracing::warn!(job = %job_id, error = %e, "cleanup after commit failed; the destination runs")
                            }
                        }
                    }
                    None
                }
                // Abort decided here (the commit write left nothing on disk): the rollback
                // path sends it and returns the devices.
                SourceAction::SendAbort | SourceAction::Rollback => {
                    return Err(Failure::new(
                        Phase::Commit,
                        trouble.take().unwrap_or_else(|| PRESUMED_ABORT.to_string()),
                    ));
                }
                SourceAction::StopTransfer | SourceAction::Reply(_) | SourceAction::RefuseCancel => None,
            };
            if let Some(event) = event {
                queue.extend(self.outgoing.feed(event));
            }
        }
        match self.outgoing.status() {
            JobStatus::Succeeded => self.job.finish(JobStatus::Succeeded, None),
            status => {
                // Rules S4/S7: a commit is or may be on disk: never resumed, never "failed".
                let why = trouble.unwrap_or_else(|| "the commit was not confirmed".into());
                self.job.finish(
                    status,
                    Some(format!("phase commit: {why}; the devices stay stopped; resolve with ResolveJob")),
                );
            }
        }
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

    /// Rule S1: before commit, every device goes back to its recorded state along legal
    /// arcs, in the order `plan::rollback` gives.
    async fn rollback(&mut self, devices: &mut [SourceDevice], failure: Failure) {
        let job_id = self.req.job_id.clone();
        let mut message = format!("phase {}: {}", failure.phase, failure.message);
        tracing::warn!(job = %job_id, phase = %failure.phase, error = %failure.message, "rolling back");
        self.job.enter_phase(Phase::Rollback);
        if let Some(sender) = self.sender.take() {
            sender.abort();
        }
        // The machine decides whether the devices may resume (rules S1, S4).
        let mut queue: std::collections::VecDeque<SourceAction> =
            self.outgoing.feed(SourceEvent::TransferFailed { cancelled: failure.cancelled }).into();
        while let Some(action) = queue.pop_front() {
            match action {
                SourceAction::Journal(decision) => {
                    let (event, error) = self.daemon.journal_event(&job_id, decision);
                    if let Some(e) = error {
                        tracing::warn!(job = %job_id, error = %e, "cannot journal the {} decision", decision.as_str());
                    }
                    queue.extend(self.outgoing.feed(event));
                }
                SourceAction::MarkMigratedAway => {
                    self.daemon.registry.mark_migrated_away(&self.outgoing.device_names(), &job_id);
                }
                _ => {}
            }
        }
        // A journal write another path started (a query's presumed abort) may still be
        // under way: the machine says when the devices may move.
        let mut moved = self.outgoing.moved.subscribe();
        let may_roll_back = loop {
            let (rolling_back, commit_possible) = {
                let machine = lock(&self.outgoing.machine);
                (machine.rolling_back(), machine.commit_possible())
            };
            if rolling_back || commit_possible {
                break rolling_back;
            }
            if tokio::time::timeout(self.timeout, moved.changed()).await.is_err() {
                break false;
            }
        };
        if !may_roll_back {
            // A commit is or may be on disk: the devices stay stopped (rule S4).
            let status = self.outgoing.status();
            self.job.finish(
                status,
                Some(format!("{message}; a commit may be recorded, so the devices stay stopped; resolve with ResolveJob")),
            );
            return;
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
        // Find where each device is, then climb back in the sequencer's order
        // (engine/plan.rs, `rollback`): P2P devices to RUNNING_P2P, then the device
        // without P2P, resets of devices in ERROR, then every device to its recorded state.
        let mut members = Vec::with_capacity(devices.len());
        let mut planned = Vec::with_capacity(devices.len());
        for d in devices.iter() {
            match super::blocking(&d.device, |dev| dev.state()).await {
                Ok(state) => {
                    members.push(plan::Member::new(d.device.name(), d.plan.caps, state));
                    planned.push(d.device.clone());
                }
                Err(e) => errors.push(format!("phase rollback: {e}")),
            }
        }
        let recorded: Vec<State> = planned
            .iter()
            .map(|device| {
                self.outgoing
                    .recorded
                    .iter()
                    .find(|(name, _)| name == device.name())
                    .map_or(State::Running, |(_, state)| *state)
            })
            .collect();
        let steps = plan::rollback(&members, &recorded).unwrap_or_else(|e| {
            errors.push(format!("phase rollback: {e}"));
            Vec::new()
        });
        // A device whose SET failed is left where the kernel left it (and named in the
        // error); the others go on, since the VM needs them running on this host.
        let mut failed = vec![false; planned.len()];
        for step in &steps {
            match step {
                plan::Step::Barrier { moves, .. } => {
                    let moves: Vec<plan::Move> =
                        moves.iter().copied().filter(|m| !failed[m.device]).collect();
                    for (m, r) in moves.iter().zip(super::sequence::barrier(&planned, &moves).await) {
                        match r {
                            Ok(_) => self.job.set_device_state(planned[m.device].name(), m.target),
                            Err(e) => {
                                failed[m.device] = true;
                                errors.push(format!("phase rollback: {e}"));
                            }
                        }
                    }
                }
                plan::Step::Reset { devices: broken } => {
                    for &i in broken {
                        let device = &planned[i];
                        errors.push(format!(
                            "device `{}` fell into ERROR and was reset: its running state is lost",
                            device.name()
                        ));
                        match super::sequence::reset(device).await {
                            Ok(()) => self.job.set_device_state(device.name(), State::Running),
                            Err(e) => {
                                failed[i] = true;
                                errors.push(format!("phase rollback: {e}"));
                            }
                        }
                    }
                }
                plan::Step::Hold(_) | plan::Step::FinalDirtySync => {}
            }
        }
        self.outgoing.feed(SourceEvent::RolledBack { ok: errors.is_empty() });
        let status = self.outgoing.status();
        let full =
            if errors.is_empty() { message } else { format!("{message}; rollback: {}", errors.join("; ")) };
        self.job.finish(status, Some(full));
    }
}
