//! Every translation between the daemon's types and the control API's messages, and the
//! one mapping of engine errors to gRPC status codes.

use std::time::Duration;

use tonic::{Code, Status};
use vfio_migd_proto::v1 as pb;

use crate::device::open::DeviceSummary;
use crate::device::sim::SimSpec;
use crate::device::{DeviceError, ErrorKind, IovaRange};
use crate::dirty::DirtyExport;
use crate::engine::dirty::{DeviceCoverage, DirtyTrackingStatus};
use crate::engine::{Decision, EngineError, GroupPlan};
use crate::fsm::Caps;
use crate::job::{JobSnapshot, JobStatus, Role};
use crate::registry::{Backend, GroupDef, RegistryError};

impl From<EngineError> for Status {
    fn from(e: EngineError) -> Status {
        let code = match &e {
            EngineError::NotFound(_) => Code::NotFound,
            EngineError::InvalidArgument(_) => Code::InvalidArgument,
            EngineError::FailedPrecondition(_) => Code::FailedPrecondition,
            EngineError::Unavailable(_) => Code::Unavailable,
            EngineError::PermissionDenied(_) => Code::PermissionDenied,
            EngineError::Aborted(_) => Code::Aborted,
            EngineError::Internal(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}

pub(crate) fn registry_status(e: RegistryError) -> Status {
    EngineError::from(e).into()
}

/// A device operation that failed on behalf of an API call, classified by what the
/// caller can do about it.
pub(crate) fn device_error(e: DeviceError) -> EngineError {
    let text = e.to_string();
    match e.kind {
        ErrorKind::NotFound | ErrorKind::Gone => EngineError::NotFound(text),
        ErrorKind::InvalidRequest | ErrorKind::TooManyRanges | ErrorKind::Overflow => {
            EngineError::InvalidArgument(text)
        }
        ErrorKind::Unsupported
        | ErrorKind::PermissionDenied
        | ErrorKind::Busy
        | ErrorKind::AlreadyActive
        | ErrorKind::BadFdUse => EngineError::FailedPrecondition(text),
        _ => EngineError::Internal(text),
    }
}

/// A simulated device as `RegisterDevice` describes it. proto3 cannot tell an absent
/// field from zero, so zero and empty mean "the simulator's default": model `sim`, 1 MiB
/// of state, a seed derived from the name, every capability.
pub(crate) fn sim_spec_from_proto(name: &str, spec: &pb::SimulatedDeviceSpec) -> Result<SimSpec, Status> {
    let mut sim = SimSpec::new(name);
    if !spec.model.is_empty() {
        sim.model.clone_from(&spec.model);
    }
    if spec.state_size != 0 {
        sim.state_size = spec.state_size;
    }
    if spec.seed != 0 {
        sim.seed = Some(spec.seed);
    }
    if !spec.caps.trim().is_empty() {
        sim.caps = Caps::parse(&spec.caps).ok_or_else(|| {
            Status::invalid_argument(format!(
                "device `{name}`: capabilities `{}` are not STOP_COPY|P2P|PRE_COPY",
                spec.caps
            ))
        })?;
    }
    Ok(sim)
}

pub(crate) fn decision_from_proto(raw: i32) -> Result<Option<Decision>, Status> {
    use pb::resolve_job_request::Decision as D;
    match D::try_from(raw) {
        Ok(D::Unspecified) => Ok(None),
        Ok(D::Committed) => Ok(Some(Decision::Commit)),
        Ok(D::NotCommitted) => Ok(Some(Decision::Abort)),
        Err(_) => Err(Status::invalid_argument(format!("unknown decision value {raw}"))),
    }
}

fn role(role: Role) -> pb::Role {
    match role {
        Role::Source => pb::Role::Source,
        Role::Destination => pb::Role::Destination,
    }
}

fn status(status: JobStatus) -> pb::JobStatus {
    match status {
        JobStatus::Running => pb::JobStatus::Running,
        JobStatus::Succeeded => pb::JobStatus::Succeeded,
        JobStatus::RolledBack => pb::JobStatus::RolledBack,
        JobStatus::Cancelled => pb::JobStatus::Cancelled,
        JobStatus::Failed => pb::JobStatus::Failed,
        JobStatus::InDoubt => pb::JobStatus::InDoubt,
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The control API's view of a job.
pub fn job_to_proto(s: &JobSnapshot) -> pb::Job {
    use std::sync::atomic::Ordering::Relaxed;
    pb::Job {
        job_id: s.job_id.clone(),
        role: role(s.role).into(),
        status: status(s.status).into(),
        phase: s.phase.as_str().to_string(),
        group: s.group.clone(),
        peer: s.peer.clone(),
        devices: s
            .devices
            .iter()
            .map(|d| pb::DeviceProgress {
                name: d.name.clone(),
                peer_name: d.peer_name.clone(),
                state: d.state.map(|st| st.kernel_name().to_string()).unwrap_or_default(),
                bytes_done: d.counters.bytes_done.load(Relaxed),
                bytes_total: d.counters.bytes_total.load(Relaxed),
                verified: d.verified,
                error: d.error.clone().unwrap_or_default(),
            })
            .collect(),
        phases: s
            .phases
            .iter()
            .map(|p| pb::PhaseTime {
                phase: p.phase.as_str().to_string(),
                started_unix_ns: p.started_unix_ns,
                duration_ns: nanos(p.duration.unwrap_or_else(|| p.started.elapsed())),
            })
            .collect(),
        bytes_done: s.bytes_done(),
        bytes_total: s.bytes_total(),
        rate_bytes_per_sec: s.rate_bytes_per_sec(),
        eta_ms: s.eta().map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        downtime_ns: s.downtime.map_or(0, nanos),
        error: s.error.clone().unwrap_or_default(),
        created_unix_ns: s.created_unix_ns,
        finished_unix_ns: s.finished_unix_ns.unwrap_or(0),
        plan: s.plan.clone(),
        dirty_tracking: s.dirty_tracking.iter().flatten().map(device_coverage_to_proto).collect(),
    }
}

/// The control API's view of a device; queries that failed leave their field empty
/// (`state` says why).
pub fn device_to_proto(
    summary: &DeviceSummary,
    backend: Backend,
    group: Option<String>,
    job: Option<String>,
) -> pb::Device {
    pb::Device {
        name: summary.name.clone(),
        backend: backend.as_str().to_string(),
        caps: summary.caps.as_ref().map(ToString::to_string).unwrap_or_default(),
        state: match &summary.state {
            Ok(state) => state.kernel_name().to_string(),
            Err(e) => format!("unknown ({})", e.kind),
        },
        identity: Some(pb::DeviceIdentityInfo {
            driver: summary.identity.driver.clone(),
            model: summary.identity.model.clone(),
        }),
        data_size: summary.data_size.as_ref().copied().unwrap_or(0),
        dma_logging: summary.dma_logging.as_ref().copied().unwrap_or(false),
        group: group.unwrap_or_default(),
        job_id: job.unwrap_or_default(),
        content_digest: summary.content_digest.clone().unwrap_or_default(),
    }
}

pub fn group_to_proto(def: &GroupDef) -> pb::Group {
    pb::Group {
        name: def.name.clone(),
        devices: def.devices.clone(),
        allow_multiple_non_p2p: def.allow_multiple_non_p2p,
    }
}

pub fn plan_to_proto(group: &str, plan: &GroupPlan) -> pb::GroupPlan {
    pb::GroupPlan {
        group: group.to_string(),
        devices: plan
            .devices
            .iter()
            .map(|d| pb::DevicePlan {
                name: d.name.clone(),
                caps: d.caps.to_string(),
                p2p: d.caps.has_p2p(),
                pre_copy: d.pre_copy,
                data_size: d.data_size,
                stop_order: d.stop_order.as_str().to_string(),
            })
            .collect(),
        steps: plan.steps(),
        total_data_size: plan.total_data_size(),
    }
}

pub(crate) fn iova_ranges_from_proto(ranges: &[pb::IovaRange]) -> Vec<IovaRange> {
    ranges.iter().map(|r| IovaRange { iova: r.iova, length: r.length }).collect()
}

fn iova_ranges_to_proto(ranges: &[IovaRange]) -> Vec<pb::IovaRange> {
    ranges.iter().map(|r| pb::IovaRange { iova: r.iova, length: r.length }).collect()
}

pub fn dirty_tracking_to_proto(status: &DirtyTrackingStatus) -> pb::DirtyTracking {
    pb::DirtyTracking {
        group: status.group.clone(),
        active: status.active,
        page_size: status.page_size,
        ranges: iova_ranges_to_proto(&status.ranges),
        devices: status.devices.iter().map(device_coverage_to_proto).collect(),
    }
}

fn device_coverage_to_proto(d: &DeviceCoverage) -> pb::DeviceDirtyCoverage {
    pb::DeviceDirtyCoverage {
        device: d.device.clone(),
        source: d.source.to_owned(),
        page_size: d.page_size.unwrap_or(0),
        reason: d.reason.clone().unwrap_or_default(),
        dirty_pages: d.dirty_pages,
        last_report_ns: d.last_report_latency.map_or(0, nanos),
        reports: d.reports,
        report_errors: d.report_errors,
    }
}

pub fn dirty_pages_to_proto(export: &DirtyExport) -> pb::DirtyPages {
    pb::DirtyPages {
        page_size: export.page_size,
        ranges: iova_ranges_to_proto(&export.ranges),
        chunks: export
            .chunks
            .iter()
            .map(|c| pb::DirtyBitmapChunk { iova: c.iova, pages: c.pages, words: c.words.clone() })
            .collect(),
        dirty_pages: export.dirty_pages(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{Job, Phase};

    #[test]
    fn every_engine_error_keeps_its_class_and_message() {
        let cases = [
            (EngineError::NotFound("job `j` not found".into()), Code::NotFound),
            (EngineError::InvalidArgument("bad".into()), Code::InvalidArgument),
            (EngineError::FailedPrecondition("nic0 busy in phase drain".into()), Code::FailedPrecondition),
            (EngineError::Unavailable("10.0.0.2:7410".into()), Code::Unavailable),
            (EngineError::Aborted("phase stop-copy: nic0".into()), Code::Aborted),
            (EngineError::Internal("x".into()), Code::Internal),
        ];
        for (err, code) in cases {
            let text = err.to_string();
            let status = Status::from(err);
            assert_eq!(status.code(), code);
            assert_eq!(status.message(), text);
        }
    }

    #[test]
    fn dirty_pages_keep_runs_chunks_and_their_count() {
        let export = DirtyExport {
            page_size: 4096,
            ranges: vec![IovaRange { iova: 0x10000, length: 3 * 4096 }],
            chunks: vec![crate::dirty::DirtyBitmapChunk {
                iova: 1 << 30,
                pages: 70,
                words: vec![0b1011, 1 << 5],
            }],
        };
        let pb = dirty_pages_to_proto(&export);
        assert_eq!(pb.page_size, 4096);
        assert_eq!(pb.ranges, [pb::IovaRange { iova: 0x10000, length: 3 * 4096 }]);
        assert_eq!(pb.chunks[0].iova, 1 << 30);
        assert_eq!(pb.chunks[0].pages, 70);
        assert_eq!(pb.chunks[0].words, [0b1011, 1 << 5]);
        assert_eq!(pb.dirty_pages, 3 + 4);
    }

    #[test]
    fn a_job_snapshot_shows_phases_bytes_and_outcome() {
        let job = Job::new("j1", Role::Source, "vm1", "peer:7410", vec![("nic0".into(), "nic9".into())]);
        job.enter_phase(Phase::Drain);
        let counters = job.counters("nic0").unwrap();
        counters.bytes_total.store(100, std::sync::atomic::Ordering::Relaxed);
        counters.bytes_done.store(40, std::sync::atomic::Ordering::Relaxed);
        job.finish(JobStatus::RolledBack, Some("phase drain: nic0: data_fd read failed".into()));
        let pb = job_to_proto(&job.snapshot());
        assert_eq!(pb.status(), pb::JobStatus::RolledBack);
        assert_eq!(pb.role(), pb::Role::Source);
        assert_eq!(pb.phase, "done");
        assert_eq!((pb.bytes_done, pb.bytes_total), (40, 100));
        assert_eq!(pb.devices[0].peer_name, "nic9");
        assert_eq!(pb.phases[0].phase, "drain");
        assert!(pb.error.contains("nic0"));
        assert!(pb.finished_unix_ns >= pb.created_unix_ns);
        assert!(pb.dirty_tracking.is_empty());
    }

    #[test]
    fn a_job_carries_the_dirty_statistics_of_its_devices() {
        let job = Job::new("j2", Role::Source, "vm1", "peer:7410", vec![("nic0".into(), "nic9".into())]);
        job.update(|s| {
            s.dirty_tracking = Some(vec![DeviceCoverage {
                device: "nic0".into(),
                source: "dma-logging",
                page_size: Some(4096),
                reason: None,
                dirty_pages: 12,
                reports: 3,
                report_errors: 1,
                last_report_latency: Some(Duration::from_micros(250)),
            }]);
        });
        let pb = job_to_proto(&job.snapshot());
        assert_eq!(
            pb.dirty_tracking,
            [pb::DeviceDirtyCoverage {
                device: "nic0".into(),
                source: "dma-logging".into(),
                page_size: 4096,
                reason: String::new(),
                dirty_pages: 12,
                last_report_ns: 250_000,
                reports: 3,
                report_errors: 1,
            }]
        );
    }
}
