//! The control API (`vfio_migd.v1.Control`): a thin translation of requests into
//! registry, job and engine calls. Device queries block, so they run on blocking threads.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use nix::errno::Errno;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};
use vfio_migd_proto::v1 as pb;
use vfio_migd_proto::v1::register_device_request::Source;

use super::Readiness;
use super::convert::{
    decision_from_proto, device_error, device_to_proto, group_to_proto, job_to_proto, plan_to_proto,
    registry_status, sim_spec_from_proto,
};
use crate::access::{AccessPolicy, Caller, control_method_class};
use crate::device::open::{self, DeviceSummary, RealDevice};
use crate::device::{DeviceError, Op};
use crate::engine::Daemon;
use crate::engine::source::MigrationRequest;
use crate::job::Job;
use crate::registry::{Backend, GroupDef, RegisteredDevice};

/// At most this many snapshots per second reach a watcher while bytes move.
const WATCH_MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Byte counters move without waking watchers; look at them this often.
const WATCH_PROGRESS_POLL: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct ControlService {
    daemon: Arc<Daemon>,
    /// Ends streaming calls when the daemon shuts down (they would hold the server open).
    shutdown: CancellationToken,
    readiness: Readiness,
}

impl ControlService {
    pub fn new(daemon: Arc<Daemon>, shutdown: CancellationToken, readiness: Readiness) -> ControlService {
        ControlService { daemon, shutdown, readiness }
    }

    fn accepting_jobs(&self, job_id: &str) -> Result<(), Status> {
        if self.readiness.is_draining() {
            return Err(Status::unavailable(format!(
                "vfio-migd is shutting down: job `{job_id}` refused (running jobs are finishing)"
            )));
        }
        Ok(())
    }

    async fn describe(&self, name: &str, entry: Arc<RegisteredDevice>) -> Result<pb::Device, Status> {
        let backend = entry.backend;
        let summary = tokio::task::spawn_blocking(move || DeviceSummary::of(entry.device.as_ref()))
            .await
            .map_err(|e| Status::internal(format!("device `{name}`: query thread failed: {e}")))?;
        let registry = &self.daemon.registry;
        Ok(device_to_proto(&summary, backend, registry.group_of(name), registry.job_of(name)))
    }
}

fn required(value: &str, field: &str) -> Result<(), Status> {
    if value.trim().is_empty() {
        return Err(Status::invalid_argument(format!("`{field}` is required")));
    }
    Ok(())
}

fn job_response(daemon: &Daemon, job: &Job) -> Response<pb::Job> {
    Response::new(job_to_proto(&daemon.job_view(job)))
}

#[tonic::async_trait]
impl pb::control_server::Control for ControlService {
    async fn register_device(
        &self,
        request: Request<pb::RegisterDeviceRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        let req = request.into_inner();
        required(&req.name, "name")?;
        if self.daemon.registry.device(&req.name).is_ok() {
            return Err(registry_status(crate::registry::RegistryError::DuplicateDevice(req.name)));
        }
        let name = req.name.clone();
        let sim = match &req.source {
            Some(Source::Simulated(spec)) => {
                let spec = sim_spec_from_proto(&name, spec)?;
                let simulator = &self.daemon.config.simulator;
                open::check_remote_sim(&spec, simulator, "RegisterDevice").map_err(|e| {
                    if simulator.allow_remote {
                        Status::invalid_argument(e.to_string())
                    } else {
                        Status::permission_denied(e.to_string())
                    }
                })?;
                Some(spec)
            }
            _ => None,
        };
        let sim_iommu = self.daemon.registry.sim_iommu().clone();
        let opened = tokio::task::spawn_blocking(move || match (req.source, sim) {
            (Some(Source::SysfsDevice(sysfs_device)), _) => {
                let source = RealDevice::Group { sysfs_device };
                open::open_real_device(&name, &source).map(|d| (d, source.backend()))
            }
            (Some(Source::CdevPath(path)), _) => {
                let source = RealDevice::Cdev { path: path.into() };
                open::open_real_device(&name, &source).map(|d| (d, source.backend()))
            }
            (Some(Source::Simulated(_)), Some(spec)) => {
                open::open_sim_device(spec, &sim_iommu).map(|d| (d, Backend::Sim))
            }
            (Some(Source::Simulated(_)), None) | (None, _) => {
                Err(DeviceError::os(&name, Op::Open, Errno::EINVAL)
                    .with_detail("give one of `sysfs_device`, `cdev_path` or `simulated`"))
            }
        })
        .await
        .map_err(|e| Status::internal(format!("device `{}`: open thread failed: {e}", req.name)))?;
        let (device, backend) = opened.map_err(|e| Status::from(device_error(e)))?;
        let entry = self.daemon.registry.add_device(device, backend).map_err(registry_status)?;
        tracing::info!(device = %req.name, backend = backend.as_str(), "device registered");
        Ok(Response::new(self.describe(&req.name, entry).await?))
    }

    async fn list_devices(
        &self,
        _request: Request<pb::ListDevicesRequest>,
    ) -> Result<Response<pb::ListDevicesResponse>, Status> {
        let mut devices = Vec::new();
        for (name, entry) in self.daemon.registry.devices() {
            devices.push(self.describe(&name, entry).await?);
        }
        Ok(Response::new(pb::ListDevicesResponse { devices }))
    }

    async fn get_device(
        &self,
        request: Request<pb::GetDeviceRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        let name = request.into_inner().name;
        required(&name, "name")?;
        let entry = self.daemon.registry.device(&name).map_err(registry_status)?;
        Ok(Response::new(self.describe(&name, entry).await?))
    }

    async fn release_device(
        &self,
        request: Request<pb::ReleaseDeviceRequest>,
    ) -> Result<Response<pb::ReleaseDeviceResponse>, Status> {
        let name = request.into_inner().name;
        required(&name, "name")?;
        self.daemon.registry.remove_device(&name).map_err(registry_status)?;
        tracing::info!(device = %name, "device released");
        Ok(Response::new(pb::ReleaseDeviceResponse {}))
    }

    async fn define_group(
        &self,
        request: Request<pb::DefineGroupRequest>,
    ) -> Result<Response<pb::Group>, Status> {
        let req = request.into_inner();
        required(&req.name, "name")?;
        let def = self
            .daemon
            .registry
            .define_group(GroupDef {
                name: req.name,
                devices: req.devices,
                allow_multiple_non_p2p: req.allow_multiple_non_p2p,
            })
            .map_err(registry_status)?;
        tracing::info!(group = %def.name, devices = ?def.devices, "group defined");
        Ok(Response::new(group_to_proto(&def)))
    }

    async fn get_group(&self, request: Request<pb::GetGroupRequest>) -> Result<Response<pb::Group>, Status> {
        let name = request.into_inner().name;
        required(&name, "name")?;
        let def = self.daemon.registry.group(&name).map_err(registry_status)?;
        Ok(Response::new(group_to_proto(&def)))
    }

    async fn list_groups(
        &self,
        _request: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        let groups = self.daemon.registry.groups().iter().map(group_to_proto).collect();
        Ok(Response::new(pb::ListGroupsResponse { groups }))
    }

    async fn delete_group(
        &self,
        request: Request<pb::DeleteGroupRequest>,
    ) -> Result<Response<pb::DeleteGroupResponse>, Status> {
        let name = request.into_inner().name;
        required(&name, "name")?;
        self.daemon.registry.delete_group(&name).map_err(registry_status)?;
        tracing::info!(group = %name, "group deleted");
        Ok(Response::new(pb::DeleteGroupResponse {}))
    }

    async fn plan_migration(
        &self,
        request: Request<pb::PlanMigrationRequest>,
    ) -> Result<Response<pb::GroupPlan>, Status> {
        let group = request.into_inner().group;
        required(&group, "group")?;
        let daemon = self.daemon.clone();
        let name = group.clone();
        // Reading capabilities and MIG_DATA_SIZE are blocking ioctls.
        let plan = tokio::task::spawn_blocking(move || daemon.plan(&name))
            .await
            .map_err(|e| Status::internal(format!("group `{group}`: planning thread failed: {e}")))??;
        Ok(Response::new(plan_to_proto(&group, &plan)))
    }

    async fn prepare_incoming(
        &self,
        request: Request<pb::PrepareIncomingRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let req = request.into_inner();
        required(&req.job_id, "job_id")?;
        if req.devices.is_empty() {
            return Err(Status::invalid_argument("`devices` must name at least one device"));
        }
        self.accepting_jobs(&req.job_id)?;
        self.daemon.bindings.expect(&req.job_id, req.expected_source_identity.trim());
        let job = self.daemon.prepare_incoming(&req.job_id, req.devices).await?;
        Ok(job_response(&self.daemon, &job))
    }

    async fn start_migration(
        &self,
        request: Request<pb::StartMigrationRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let req = request.into_inner();
        required(&req.job_id, "job_id")?;
        required(&req.group, "group")?;
        required(&req.peer, "peer")?;
        if req.mapping.is_empty() {
            return Err(Status::invalid_argument(
                "`mapping` must map every device of the group to a destination device",
            ));
        }
        self.accepting_jobs(&req.job_id)?;
        // The destination's certificate must carry this name; the destination's QueryJob
        // calls about this job are accepted only from it.
        let destination = match req.expected_destination_identity.trim() {
            "" => crate::tls::host_of(req.peer.trim()).to_owned(),
            name => name.to_owned(),
        };
        self.daemon.bindings.expect(&req.job_id, &destination);
        let job = self
            .daemon
            .start_migration(MigrationRequest {
                job_id: req.job_id,
                group: req.group,
                peer: req.peer,
                mapping: req.mapping.into_iter().map(|m| (m.source, m.destination)).collect(),
                phase_timeout_ms: req.phase_timeout_ms,
                data_connections: req.data_connections as usize,
            })
            .await?;
        Ok(job_response(&self.daemon, &job))
    }

    async fn get_job(&self, request: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        let job_id = request.into_inner().job_id;
        required(&job_id, "job_id")?;
        let job = self.daemon.job(&job_id)?;
        Ok(job_response(&self.daemon, &job))
    }

    async fn list_jobs(
        &self,
        _request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let mut jobs: Vec<pb::Job> =
            self.daemon.jobs.list().iter().map(|j| job_to_proto(&self.daemon.job_view(j))).collect();
        jobs.sort_by_key(|j| j.created_unix_ns);
        Ok(Response::new(pb::ListJobsResponse { jobs }))
    }

    type WatchJobStream = ReceiverStream<Result<pb::Job, Status>>;

    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let job_id = request.into_inner().job_id;
        required(&job_id, "job_id")?;
        let job = self.daemon.job(&job_id)?;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(stream_job(self.daemon.clone(), job, tx, self.shutdown.clone()));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn cancel_job(&self, request: Request<pb::CancelJobRequest>) -> Result<Response<pb::Job>, Status> {
        let job_id = request.into_inner().job_id;
        required(&job_id, "job_id")?;
        let job = self.daemon.cancel(&job_id)?;
        tracing::info!(job = %job_id, "cancellation requested");
        Ok(job_response(&self.daemon, &job))
    }

    async fn resolve_job(
        &self,
        request: Request<pb::ResolveJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let req = request.into_inner();
        required(&req.job_id, "job_id")?;
        let decision = decision_from_proto(req.decision)?;
        let job = self.daemon.resolve(&req.job_id, decision).await?;
        Ok(job_response(&self.daemon, &job))
    }

    async fn start_dirty_tracking(
        &self,
        request: Request<pb::StartDirtyTrackingRequest>,
    ) -> Result<Response<pb::DirtyTracking>, Status> {
        let req = request.into_inner();
        required(&req.group, "group")?;
        let ranges = super::convert::iova_ranges_from_proto(&req.ranges);
        let status = self.daemon.start_dirty_tracking(&req.group, ranges, req.page_size).await?;
        Ok(Response::new(super::convert::dirty_tracking_to_proto(&status)))
    }

    async fn stop_dirty_tracking(
        &self,
        request: Request<pb::StopDirtyTrackingRequest>,
    ) -> Result<Response<pb::DirtyTracking>, Status> {
        let group = request.into_inner().group;
        required(&group, "group")?;
        let status = self.daemon.stop_dirty_tracking(&group).await?;
        Ok(Response::new(super::convert::dirty_tracking_to_proto(&status)))
    }

    async fn get_dirty_pages(
        &self,
        request: Request<pb::GetDirtyPagesRequest>,
    ) -> Result<Response<pb::DirtyPages>, Status> {
        let group = request.into_inner().group;
        required(&group, "group")?;
        let export = self.daemon.dirty_pages(&group).await?;
        Ok(Response::new(super::convert::dirty_pages_to_proto(&export)))
    }

    async fn get_dirty_tracking(
        &self,
        request: Request<pb::GetDirtyTrackingRequest>,
    ) -> Result<Response<pb::DirtyTracking>, Status> {
        let group = request.into_inner().group;
        required(&group, "group")?;
        let status = self.daemon.dirty_tracking(&group).await?;
        Ok(Response::new(super::convert::dirty_tracking_to_proto(&status)))
    }
}

/// Sends a snapshot of `job` on every change (at most one per [`WATCH_MIN_INTERVAL`]),
/// always the final one, and ends when the job has finished, the watcher hung up or the
/// daemon shuts down.
async fn stream_job(
    daemon: Arc<Daemon>,
    job: Arc<Job>,
    tx: mpsc::Sender<Result<pb::Job, Status>>,
    shutdown: CancellationToken,
) {
    let mut changes = job.subscribe();
    loop {
        changes.borrow_and_update();
        let snapshot = daemon.job_view(&job);
        let finished = snapshot.status.is_finished();
        let sent_bytes = snapshot.bytes_done();
        let sent_at = Instant::now();
        if tx.send(Ok(job_to_proto(&snapshot))).await.is_err() || finished {
            return;
        }
        loop {
            tokio::select! {
                () = shutdown.cancelled() => {
                    let _ = tx.send(Err(Status::unavailable("vfio-migd is shutting down"))).await;
                    return;
                }
                () = tx.closed() => return,
                // The sender lives in the job, which this task holds: it cannot close.
                _ = changes.changed() => break,
                () = tokio::time::sleep(WATCH_PROGRESS_POLL) => {
                    if job.snapshot().bytes_done() != sent_bytes {
                        break;
                    }
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => {
                let _ = tx.send(Err(Status::unavailable("vfio-migd is shutting down"))).await;
                return;
            }
            () = tokio::time::sleep_until(sent_at + WATCH_MIN_INTERVAL) => {}
        }
    }
}

/// The control service behind its access check: every call's method is classified
/// ([`control_method_class`]) and the connection's peer credentials (tonic's
/// [`UdsConnectInfo`], read with `SO_PEERCRED` at accept) must allow that class, else the
/// call is answered PERMISSION_DENIED before any handler runs.
#[derive(Clone, Debug)]
pub struct Authorized<S> {
    inner: S,
    policy: Arc<AccessPolicy>,
}

impl<S> Authorized<S> {
    pub fn new(inner: S, policy: AccessPolicy) -> Authorized<S> {
        Authorized { inner, policy: Arc::new(policy) }
    }
}

impl<S: NamedService> NamedService for Authorized<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for Authorized<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request.uri().path().rsplit('/').next().unwrap_or_default().to_string();
        let caller =
            request.extensions().get::<UdsConnectInfo>().and_then(|info| info.peer_cred).map(Caller::from);
        let class = control_method_class(&method);
        match self.policy.check(caller.as_ref(), class, &method) {
            Ok(()) => Box::pin(self.inner.call(request)),
            Err(denied) => {
                tracing::warn!(%method, caller = ?caller, "control call refused: {denied}");
                let response = Status::permission_denied(denied.to_string()).into_http();
                Box::pin(async move { Ok(response) })
            }
        }
    }
}
