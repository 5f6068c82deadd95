//! Dirty tracking per group through the daemon: start over a group of simulated devices,
//! exact dirty pages per call, coverage, typed errors, stop on a migration's end, and the
//! control API over its real socket.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use support::side::{Side, side, wait_finished};
use tonic::Code;
use tonic::transport::Channel;
use vfio_migd::device::sim::{Fault, FaultOp, IommuSpec, SimDevice, SimSpec};
use vfio_migd::device::{IovaRange, MigrationDevice};
use vfio_migd::dirty::DirtyExport;
use vfio_migd::engine::dirty::DirtyTrackingStatus;
use vfio_migd::engine::source::MigrationRequest;
use vfio_migd::engine::{Daemon, EngineError};
use vfio_migd::fsm::{Caps, State};
use vfio_migd::job::{JobSnapshot, JobStatus};
use vfio_migd::registry::Backend;
use vfio_migd_proto::v1 as pb;
use vfio_migd_proto::v1::control_client::ControlClient;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const PAGE: u64 = 4096;

/// Two guest ranges with a hole between them.
fn guest() -> Vec<IovaRange> {
    vec![IovaRange { iova: 0, length: 64 * MIB }, IovaRange { iova: GIB, length: 16 * MIB }]
}

fn sim(name: &str, logging: bool, seed: u64) -> SimSpec {
    let mut spec = SimSpec::new(name);
    spec.model = "sim-dirty".into();
    spec.caps = Caps::parse("STOP_COPY|P2P").unwrap();
    spec.state_size = 64 * 1024;
    spec.seed = Some(seed);
    spec.dma_logging.supported = logging;
    spec
}

/// Devices `a`, `b` (logging) and `c` (no logging) in group `vm`.
async fn group_of_three(prefix: &str) -> Side {
    let side = side(
        vec![
            sim(&format!("{prefix}-a"), true, 1),
            sim(&format!("{prefix}-b"), true, 2),
            sim(&format!("{prefix}-c"), false, 3),
        ],
        "",
    )
    .await;
    side.define_group("vm", &side.devices);
    side
}

/// The 4 KiB pages `writes` touch inside the guest ranges.
fn model_pages(writes: &[(u64, u64)]) -> BTreeSet<u64> {
    let mut pages = BTreeSet::new();
    for &(iova, length) in writes {
        for range in guest() {
            let (lo, hi) = (iova.max(range.iova), (iova + length).min(range.end()));
            if lo < hi {
                pages.extend((lo / PAGE..=(hi - 1) / PAGE).map(|p| p * PAGE));
            }
        }
    }
    pages
}

fn exported_pages(export: &DirtyExport) -> BTreeSet<u64> {
    let pages: Vec<u64> = export.dirty_page_addresses().collect();
    let set: BTreeSet<u64> = pages.iter().copied().collect();
    assert_eq!(set.len(), pages.len(), "a page is exported twice");
    assert_eq!(export.dirty_pages(), pages.len() as u64);
    set
}

fn coverage<'a>(
    status: &'a DirtyTrackingStatus,
    device: &str,
) -> &'a vfio_migd::engine::dirty::DeviceCoverage {
    status.devices.iter().find(|d| d.device == device).unwrap_or_else(|| panic!("no coverage for {device}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dirty_pages_are_exactly_the_union_of_the_devices_writes_since_the_last_call() {
    let side = group_of_three("d").await;
    let (a, b, c) = (&side.devices[0], &side.devices[1], &side.devices[2]);
    let status = side.daemon.start_dirty_tracking("vm", guest(), 0).await.unwrap();
    assert!(status.active);
    assert_eq!(status.page_size, PAGE);
    assert_eq!(status.ranges, guest());
    assert_eq!(status.devices.len(), 3);
    for dev in [a, b] {
        let cov = coverage(&status, dev.name());
        assert_eq!(cov.source, "dma-logging");
        assert_eq!(cov.page_size, Some(PAGE));
        assert_eq!(cov.reason, None);
        assert!(dev.dma_logging_active());
    }
    let not_covered = coverage(&status, c.name());
    assert_eq!(not_covered.source, "none");
    assert!(not_covered.reason.as_deref().unwrap().contains("DMA logging"), "{not_covered:?}");
    assert!(!c.dma_logging_active());

    // Overlapping writes from two devices, one crossing into the hole, one outside.
    let a_writes = [(0x1000, 1), (5 * MIB + 100, 3 * PAGE), (64 * MIB - 10, 4 * PAGE), (GIB + 7, 1)];
    let b_writes = [(0x1000, 8), (5 * MIB + 2 * PAGE, 4 * PAGE), (GIB + 15 * MIB, MIB), (2 * GIB, PAGE)];
    for &(iova, length) in &a_writes {
        a.dma_write(iova, length);
    }
    for &(iova, length) in &b_writes {
        b.dma_write(iova, length);
    }
    c.dma_write(40 * MIB, PAGE);
    let first = side.daemon.dirty_pages("vm").await.unwrap();
    assert_eq!(first.page_size, PAGE);
    let mut model = model_pages(&a_writes);
    model.extend(model_pages(&b_writes));
    assert_eq!(exported_pages(&first), model);

    // Nothing new: nothing dirty.
    assert_eq!(side.daemon.dirty_pages("vm").await.unwrap().dirty_pages(), 0);

    // Only the writes since the last call; one rewrites a page already returned.
    let again = [(0x1000, 1), (GIB + MIB, 2 * PAGE)];
    for &(iova, length) in &again {
        b.dma_write(iova, length);
    }
    let second = side.daemon.dirty_pages("vm").await.unwrap();
    assert_eq!(exported_pages(&second), model_pages(&again));

    let status = side.daemon.dirty_tracking("vm").await.unwrap();
    let expected_a = model_pages(&a_writes).len() as u64;
    // Pages both devices wrote in the same round count for the first device read (a).
    let b_only: BTreeSet<u64> = model_pages(&b_writes).difference(&model_pages(&a_writes)).copied().collect();
    assert_eq!(coverage(&status, a.name()).dirty_pages, expected_a);
    assert_eq!(coverage(&status, b.name()).dirty_pages, b_only.len() as u64 + 3);
    assert_eq!(coverage(&status, a.name()).reports, 3);
    assert!(coverage(&status, a.name()).last_report_latency.is_some());
    assert_eq!(coverage(&status, c.name()).reports, 0);

    let stopped = side.daemon.stop_dirty_tracking("vm").await.unwrap();
    assert!(!stopped.active);
    assert_eq!(coverage(&stopped, a.name()).dirty_pages, expected_a);
    assert!(side.devices.iter().all(|d| !d.dma_logging_active()));
    // Idempotent, and the group reads as untracked.
    let again = side.daemon.stop_dirty_tracking("vm").await.unwrap();
    assert!(!again.active && again.devices.is_empty());
    assert!(!side.daemon.dirty_tracking("vm").await.unwrap().active);
    assert!(matches!(side.daemon.dirty_pages("vm").await, Err(EngineError::FailedPrecondition(_))));
}

/// A device with DMA logging (also attached to `vm1`), one tracked only by the IOMMU
/// (`vm1`), one on a HWPT without dirty tracking (`vm2`) and one with neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_without_logging_are_tracked_by_their_hwpt_and_each_reports_its_source() {
    let mut logging = sim("h-log", true, 1);
    logging.iommu = Some(IommuSpec::new("vm1"));
    let mut virtio = sim("h-virtio", false, 2);
    virtio.iommu = Some(IommuSpec::new("vm1"));
    let mut qat = sim("h-qat", false, 3);
    qat.iommu = Some(IommuSpec { dirty_tracking: false, ..IommuSpec::new("vm2") });
    let uart = sim("h-uart", false, 4);
    let side = side(vec![logging, virtio, qat, uart], "").await;
    side.define_group("vm", &side.devices);
    let [logging, virtio, qat, uart] = &side.devices[..] else { unreachable!() };
    let iommu = side.daemon.registry.sim_iommu();

    let status = side.daemon.start_dirty_tracking("vm", guest(), 0).await.unwrap();
    let sources: Vec<(&str, &str)> = status.devices.iter().map(|d| (d.device.as_str(), d.source)).collect();
    assert_eq!(
        sources,
        [("h-log", "dma-logging"), ("h-virtio", "iommufd-hwpt"), ("h-qat", "none"), ("h-uart", "none")]
    );
    let hwpt = coverage(&status, "h-virtio");
    assert_eq!((hwpt.page_size, hwpt.reason.as_deref()), (Some(PAGE), None));
    let no_ops = coverage(&status, "h-qat").reason.as_deref().unwrap();
    assert!(no_ops.contains("cannot track dirty pages") && no_ops.contains("EOPNOTSUPP"), "{no_ops}");
    assert!(coverage(&status, "h-uart").reason.as_deref().unwrap().contains("DMA logging"));
    assert!(logging.dma_logging_active());
    assert_eq!(iommu.dirty_tracking_enabled("vm1"), Some(true));
    assert_eq!(iommu.dirty_tracking_enabled("vm2"), Some(false));

    // The logging device is seen by both its log and the tracked HWPT it shares; the
    // union is still exactly what the covered devices wrote.
    let log_writes = [(0x1000, 1), (5 * MIB + 100, 3 * PAGE), (GIB + 7, 1)];
    let virtio_writes = [(0x1000, 8), (40 * MIB, 2 * PAGE), (GIB + 15 * MIB, MIB), (2 * GIB, PAGE)];
    for &(iova, length) in &log_writes {
        logging.dma_write(iova, length);
    }
    for &(iova, length) in &virtio_writes {
        virtio.dma_write(iova, length);
    }
    qat.dma_write(20 * MIB, PAGE);
    uart.dma_write(30 * MIB, PAGE);
    let first = side.daemon.dirty_pages("vm").await.unwrap();
    let mut model = model_pages(&log_writes);
    model.extend(model_pages(&virtio_writes));
    assert_eq!(exported_pages(&first), model);

    let again = [(GIB + MIB, 2 * PAGE)];
    virtio.dma_write(again[0].0, again[0].1);
    assert_eq!(exported_pages(&side.daemon.dirty_pages("vm").await.unwrap()), model_pages(&again));

    let status = side.daemon.dirty_tracking("vm").await.unwrap();
    let virtio_only: BTreeSet<u64> =
        model_pages(&virtio_writes).difference(&model_pages(&log_writes)).copied().collect();
    let hwpt = coverage(&status, "h-virtio");
    assert_eq!(hwpt.dirty_pages, virtio_only.len() as u64 + 2);
    assert_eq!(hwpt.reports, 2);

    let stopped = side.daemon.stop_dirty_tracking("vm").await.unwrap();
    assert!(!stopped.active);
    assert_eq!(iommu.dirty_tracking_enabled("vm1"), Some(false));
    assert!(!logging.dma_logging_active());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dense_writes_come_back_as_bitmap_chunks_and_sparse_ones_as_ranges() {
    let side = group_of_three("x").await;
    let (a, b) = (&side.devices[0], &side.devices[1]);
    side.daemon.start_dirty_tracking("vm", guest(), 0).await.unwrap();
    // Every other page of the first range, from two devices: runs would cost far more
    // than the bitmap.
    let mut writes = Vec::new();
    for page in (0..64 * MIB / PAGE).step_by(2) {
        let write = (page * PAGE + 17, 1);
        if page % 4 == 0 {
            a.dma_write(write.0, write.1)
        } else {
            b.dma_write(write.0, write.1)
        }
        writes.push(write);
    }
    let sparse = [(GIB + 3 * MIB, 10 * PAGE)];
    a.dma_write(sparse[0].0, sparse[0].1);
    writes.extend(sparse);
    let export = side.daemon.dirty_pages("vm").await.unwrap();
    assert!(!export.chunks.is_empty(), "dense pages must be exported as chunks");
    assert_eq!(export.ranges, vec![IovaRange { iova: GIB + 3 * MIB, length: 10 * PAGE }]);
    assert_eq!(exported_pages(&export), model_pages(&writes));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_checked_and_errors_are_typed() {
    let side = group_of_three("e").await;
    let daemon = &side.daemon;
    assert!(matches!(daemon.start_dirty_tracking("nope", guest(), 0).await, Err(EngineError::NotFound(_))));
    assert!(matches!(daemon.stop_dirty_tracking("nope").await, Err(EngineError::NotFound(_))));
    assert!(matches!(daemon.dirty_pages("nope").await, Err(EngineError::NotFound(_))));
    assert!(matches!(
        daemon.start_dirty_tracking("vm", Vec::new(), 0).await,
        Err(EngineError::InvalidArgument(_))
    ));
    assert!(matches!(
        daemon.start_dirty_tracking("vm", guest(), 3000).await,
        Err(EngineError::InvalidArgument(_))
    ));
    assert!(matches!(
        daemon.start_dirty_tracking("vm", vec![IovaRange { iova: 0, length: 0 }], 0).await,
        Err(EngineError::InvalidArgument(_))
    ));
    assert!(matches!(daemon.dirty_pages("vm").await, Err(EngineError::FailedPrecondition(_))));
    assert!(side.devices.iter().all(|d| !d.dma_logging_active()));

    // A coarser group page than the devices log at.
    let status = daemon.start_dirty_tracking("vm", guest(), 64 * 1024).await.unwrap();
    assert_eq!(status.page_size, 64 * 1024);
    let Err(EngineError::FailedPrecondition(why)) = daemon.start_dirty_tracking("vm", guest(), 0).await
    else {
        panic!("a second start must be refused");
    };
    assert!(why.contains("already started"), "{why}");
    side.devices[1].dma_write(GIB + 70 * 1024, 1);
    let export = daemon.dirty_pages("vm").await.unwrap();
    assert_eq!(export.page_size, 64 * 1024);
    assert_eq!(exported_pages(&export), BTreeSet::from([GIB + 64 * 1024]));
    daemon.stop_dirty_tracking("vm").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_fails_to_start_fails_the_group_and_leaves_nothing_logging() {
    let side = group_of_three("f").await;
    side.devices[1].inject(Fault::errno(FaultOp::DmaLoggingStart, Errno::EIO).once());
    let Err(EngineError::Internal(why)) = side.daemon.start_dirty_tracking("vm", guest(), 0).await else {
        panic!("an EIO at start must fail the call");
    };
    assert!(why.contains("f-b"), "the failing device is named: {why}");
    assert!(side.devices.iter().all(|d| !d.dma_logging_active()), "device a was stopped again");
    assert!(!side.daemon.dirty_tracking("vm").await.unwrap().active);
    // The fault fired once: the group can be started now.
    assert!(side.daemon.start_dirty_tracking("vm", guest(), 0).await.unwrap().active);
    side.daemon.stop_dirty_tracking("vm").await.unwrap();
}

/// Reading a HWPT clears it for every reader: a second group on a tracked HWPT would take
/// the first group's pages away, so its start is refused until the first one stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hwpt_is_tracked_for_one_group_at_a_time() {
    let on_hwpt = |name: &str, logging: bool, hwpt: &str, seed: u64| {
        let mut spec = sim(name, logging, seed);
        spec.iommu = Some(IommuSpec::new(hwpt));
        spec
    };
    let side = side(
        vec![
            on_hwpt("one-log", true, "vm1", 1),
            on_hwpt("one-virtio", false, "vm1", 2),
            on_hwpt("two-virtio", false, "vm1", 3),
            on_hwpt("three-virtio", false, "vm2", 4),
        ],
        "",
    )
    .await;
    side.define_group("one", &side.devices[..2]);
    side.define_group("two", &side.devices[2..3]);
    side.define_group("three", &side.devices[3..]);
    side.daemon.start_dirty_tracking("one", guest(), 0).await.unwrap();
    side.devices[1].dma_write(MIB, PAGE);

    let Err(EngineError::FailedPrecondition(refused)) =
        side.daemon.start_dirty_tracking("two", guest(), 0).await
    else {
        panic!("a second group on a tracked HWPT must be refused");
    };
    for named in ["group `two`", "`two-virtio`", "sim-iommu hwpt vm1", "group `one`"] {
        assert!(refused.contains(named), "{named} missing from: {refused}");
    }
    assert!(!side.daemon.dirty_tracking("two").await.unwrap().active);
    // The refused start touched nothing: the first group still finds its page.
    assert_eq!(exported_pages(&side.daemon.dirty_pages("one").await.unwrap()), BTreeSet::from([MIB]));
    // Another HWPT is free to track.
    assert!(side.daemon.start_dirty_tracking("three", guest(), 0).await.unwrap().active);

    side.daemon.stop_dirty_tracking("one").await.unwrap();
    let status = side.daemon.start_dirty_tracking("two", guest(), 0).await.unwrap();
    assert_eq!(coverage(&status, "two-virtio").source, "iommufd-hwpt");
    // A group whose only tie to a tracked HWPT is a device with its own DMA logging is
    // refused too: a refused START would make that device fall back to the HWPT.
    let Err(EngineError::FailedPrecondition(refused)) =
        side.daemon.start_dirty_tracking("one", guest(), 0).await
    else {
        panic!("a group that may fall back to a tracked HWPT must be refused");
    };
    assert!(refused.contains("group `two`"), "{refused}");
    side.daemon.stop_dirty_tracking("two").await.unwrap();
    side.daemon.stop_dirty_tracking("three").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tracked_group_can_be_neither_deleted_nor_joined_until_tracking_stops() {
    let side = group_of_three("m").await;
    let registry = &side.daemon.registry;
    let late = Arc::new(SimDevice::with_iommu(sim("m-late", true, 9), registry.sim_iommu()).unwrap());
    registry.add_device(late.clone() as Arc<dyn MigrationDevice>, Backend::Sim).unwrap();

    // A start that fails leaves the membership free.
    side.devices[0].inject(Fault::errno(FaultOp::DmaLoggingStart, Errno::EIO).once());
    side.daemon.start_dirty_tracking("vm", guest(), 0).await.unwrap_err();
    registry.join_group("vm", "m-late").unwrap();
    assert_eq!(registry.group("vm").unwrap().devices.len(), 4);

    side.daemon.start_dirty_tracking("vm", guest(), 0).await.unwrap();
    let deleted = registry.delete_group("vm").unwrap_err();
    assert!(deleted.to_string().contains("stop dirty tracking first"), "{deleted}");
    assert!(
        matches!(EngineError::from(deleted), EngineError::FailedPrecondition(ref why) if why.contains("`vm`")),
        "a tracked group is a failed precondition naming the group"
    );
    let other = Arc::new(SimDevice::with_iommu(sim("m-other", true, 10), registry.sim_iommu()).unwrap());
    registry.add_device(other as Arc<dyn MigrationDevice>, Backend::Sim).unwrap();
    let joined = registry.join_group("vm", "m-other").unwrap_err();
    assert!(joined.to_string().contains("dirty-tracked"), "{joined}");
    let status = side.daemon.dirty_tracking("vm").await.unwrap();
    assert_eq!(status.devices.len(), 4, "the tracker covers exactly the members: {status:?}");

    side.daemon.stop_dirty_tracking("vm").await.unwrap();
    registry.join_group("vm", "m-other").unwrap();
    registry.delete_group("vm").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_fails_to_stop_is_tried_again_by_the_next_stop() {
    let side = group_of_three("s").await;
    side.daemon.start_dirty_tracking("vm", guest(), 0).await.unwrap();
    side.devices[0].inject(Fault::errno(FaultOp::DmaLoggingStop, Errno::EIO).once());
    let Err(EngineError::Internal(why)) = side.daemon.stop_dirty_tracking("vm").await else {
        panic!("a failed stop must be reported");
    };
    assert!(why.contains("s-a"), "{why}");
    assert!(side.devices[0].dma_logging_active());
    assert!(!side.devices[1].dma_logging_active());
    assert!(side.daemon.dirty_tracking("vm").await.unwrap().active, "a device still logs");
    // Still listed: a start is refused until the stop went through.
    let Err(EngineError::FailedPrecondition(refused)) =
        side.daemon.start_dirty_tracking("vm", guest(), 0).await
    else {
        panic!("start must wait for the failed stop");
    };
    assert!(refused.contains("stop it again"), "{refused}");
    assert!(!side.daemon.stop_dirty_tracking("vm").await.unwrap().active);
    assert!(side.devices.iter().all(|d| !d.dma_logging_active()));
    assert!(side.daemon.start_dirty_tracking("vm", guest(), 0).await.unwrap().active);
    side.daemon.stop_dirty_tracking("vm").await.unwrap();
}

/// A stop that is still on its way (as one a job's end starts) may be watched: once the
/// status says inactive, the group can be started again at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_seen_inactive_after_a_stop_can_be_started_again_at_once() {
    let side = group_of_three("s").await;
    for round in 0..200 {
        side.daemon.start_dirty_tracking("vm", guest(), 0).await.unwrap();
        let daemon = side.daemon.clone();
        let stop = tokio::spawn(async move { daemon.stop_dirty_tracking("vm").await });
        while side.daemon.dirty_tracking("vm").await.unwrap().active {
            tokio::task::yield_now().await;
        }
        if let Err(e) = side.daemon.start_dirty_tracking("vm", guest(), 0).await {
            panic!("round {round}: a group seen inactive was refused a start: {e}");
        }
        stop.await.unwrap().unwrap();
        assert!(side.daemon.stop_dirty_tracking("vm").await.unwrap().page_size != 0);
    }
}

/// The job's end is published before its task stops the group's tracking: wait for it.
async fn wait_tracking_stopped(daemon: &Daemon) {
    tokio::time::timeout(Duration::from_secs(60), async {
        while daemon.dirty_tracking("vm").await.unwrap().active {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("tracking was not stopped after the job ended");
}

async fn migrate_group(src: &Side, dst: &Side, job_id: &str) -> JobSnapshot {
    let dst_names: Vec<String> = dst.devices.iter().map(|d| d.name().to_owned()).collect();
    dst.daemon.prepare_incoming(job_id, dst_names.clone()).await.unwrap();
    let mapping = src.devices.iter().map(|d| d.name().to_owned()).zip(dst_names).collect();
    src.daemon
        .start_migration(MigrationRequest {
            job_id: job_id.into(),
            group: "vm".into(),
            peer: dst.peer.to_string(),
            mapping,
            phase_timeout_ms: 20_000,
            data_connections: 0,
        })
        .await
        .unwrap();
    let snapshot = wait_finished(&src.daemon, job_id).await;
    wait_finished(&dst.daemon, job_id).await;
    wait_tracking_stopped(&src.daemon).await;
    snapshot
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tracking_stops_when_a_migration_of_the_group_ends() {
    let src = group_of_three("src").await;
    let dst = side(vec![sim("dst-a", true, 11), sim("dst-b", true, 12), sim("dst-c", true, 13)], "").await;

    // A migration that fails and rolls back ends the tracking too.
    src.daemon.start_dirty_tracking("vm", guest(), 0).await.unwrap();
    src.devices[0].dma_write(0, PAGE);
    src.devices[1].inject(Fault::errno(FaultOp::SetState, Errno::EIO).in_state(State::StopCopy).once());
    let rolled_back = migrate_group(&src, &dst, "job-rollback").await;
    assert_eq!(rolled_back.status, JobStatus::RolledBack, "{:?}", rolled_back.error);
    assert!(src.devices.iter().all(|d| !d.dma_logging_active()));
    // The ended job keeps what tracking had found when it stopped (no report was read).
    assert_kept(
        &src.daemon,
        "job-rollback",
        &[("src-a", "dma-logging", 0, 0), ("src-b", "dma-logging", 0, 0), ("src-c", "none", 0, 0)],
    );
    // The destination's devices are in no group: nothing to show.
    assert_eq!(dst.daemon.job_view(&dst.daemon.job("job-rollback").unwrap()).dirty_tracking, Some(vec![]));

    // A successful migration, tracked from the start, to a destination whose devices are
    // a tracked group too.
    src.daemon.start_dirty_tracking("vm", guest(), 0).await.unwrap();
    src.devices[0].dma_write(MIB, PAGE);
    assert_eq!(src.daemon.dirty_pages("vm").await.unwrap().dirty_pages(), 1);
    dst.define_group("vm-dst", &dst.devices);
    dst.daemon.start_dirty_tracking("vm-dst", guest(), 0).await.unwrap();
    dst.devices[1].dma_write(GIB, PAGE);
    assert_eq!(dst.daemon.dirty_pages("vm-dst").await.unwrap().dirty_pages(), 1);
    let succeeded = migrate_group(&src, &dst, "job-ok").await;
    assert_eq!(succeeded.status, JobStatus::Succeeded, "{:?}", succeeded.error);
    assert!(src.devices.iter().all(|d| !d.dma_logging_active()));
    assert!(matches!(src.daemon.dirty_pages("vm").await, Err(EngineError::FailedPrecondition(_))));
    assert_kept(
        &src.daemon,
        "job-ok",
        &[("src-a", "dma-logging", 1, 1), ("src-b", "dma-logging", 0, 1), ("src-c", "none", 0, 0)],
    );
    // A destination does not stop its group's tracking; its job keeps the figures it had
    // when it ended, whatever later rounds find.
    assert!(dst.daemon.dirty_tracking("vm-dst").await.unwrap().active);
    dst.devices[2].dma_write(0, PAGE);
    assert_eq!(dst.daemon.dirty_pages("vm-dst").await.unwrap().dirty_pages(), 1);
    assert_kept(
        &dst.daemon,
        "job-ok",
        &[("dst-a", "dma-logging", 0, 1), ("dst-b", "dma-logging", 1, 1), ("dst-c", "dma-logging", 0, 1)],
    );
    dst.daemon.stop_dirty_tracking("vm-dst").await.unwrap();
}

/// What the API shows of a job's dirty statistics: device, source, dirty pages, reports.
fn assert_kept(daemon: &Daemon, job_id: &str, expected: &[(&str, &str, u64, u64)]) {
    let view = daemon.job_view(&daemon.job(job_id).unwrap());
    let kept = view.dirty_tracking.expect("an ended job keeps its statistics");
    let shown: Vec<(&str, &str, u64, u64)> =
        kept.iter().map(|d| (d.device.as_str(), d.source, d.dirty_pages, d.reports)).collect();
    assert_eq!(shown, expected, "job {job_id}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_api_starts_reads_and_stops_tracking() {
    let daemon = support::TestDaemon::start().await;
    let specs =
        [("api-a", true), ("api-b", true), ("api-c", false)].map(|(name, logging)| sim(name, logging, 7));
    let (mut control, _, sims) = group_over_the_api(&daemon, specs.into()).await;
    let ranges = guest_over_the_api();
    let started = control
        .start_dirty_tracking(pb::StartDirtyTrackingRequest {
            group: "vm".into(),
            ranges: ranges.clone(),
            page_size: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(started.active);
    assert_eq!(started.page_size, PAGE);
    assert_eq!(started.ranges, ranges);
    let sources: Vec<(&str, &str)> =
        started.devices.iter().map(|d| (d.device.as_str(), d.source.as_str())).collect();
    assert_eq!(sources, [("api-a", "dma-logging"), ("api-b", "dma-logging"), ("api-c", "none")]);
    assert!(!started.devices[2].reason.is_empty());

    let err = control
        .start_dirty_tracking(pb::StartDirtyTrackingRequest { group: "vm".into(), ranges, page_size: 0 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    sims[0].dma_write(0x3000, 1);
    sims[1].dma_write(GIB, 2 * PAGE);
    let pages =
        control.get_dirty_pages(pb::GetDirtyPagesRequest { group: "vm".into() }).await.unwrap().into_inner();
    assert_eq!(pages.page_size, PAGE);
    assert_eq!(pages.dirty_pages, 3);
    assert!(pages.chunks.is_empty());
    assert_eq!(
        pages.ranges,
        [pb::IovaRange { iova: 0x3000, length: PAGE }, pb::IovaRange { iova: GIB, length: 2 * PAGE }]
    );

    let stopped = control
        .stop_dirty_tracking(pb::StopDirtyTrackingRequest { group: "vm".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(!stopped.active);
    assert_eq!(stopped.devices[0].dirty_pages, 1);
    assert_eq!(stopped.devices[1].dirty_pages, 2);
    assert!(sims.iter().all(|d| !d.dma_logging_active()));
    let err = control.get_dirty_pages(pb::GetDirtyPagesRequest { group: "vm".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = control
        .start_dirty_tracking(pb::StartDirtyTrackingRequest {
            group: "vm".into(),
            ranges: Vec::new(),
            page_size: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    drop(control);
    daemon.stop().await.unwrap();
}

/// Migrates group `vm` (job `j-dirty`) to `peer`, which never answers: the job stays in
/// its handshake until it is cancelled.
fn started_request(devices: &[String], peer: &std::net::TcpListener) -> pb::StartMigrationRequest {
    pb::StartMigrationRequest {
        job_id: "j-dirty".into(),
        group: "vm".into(),
        peer: peer.local_addr().unwrap().to_string(),
        mapping: devices
            .iter()
            .map(|n| pb::DeviceMapping { source: n.clone(), destination: format!("{n}-dst") })
            .collect(),
        phase_timeout_ms: 600_000,
        data_connections: 0,
        ..Default::default()
    }
}

/// Registers `specs` in `daemon` and defines them as group `vm` through the control API.
async fn group_over_the_api(
    daemon: &support::TestDaemon,
    specs: Vec<SimSpec>,
) -> (ControlClient<Channel>, Vec<String>, Vec<Arc<SimDevice>>) {
    let sims: Vec<Arc<SimDevice>> =
        specs.into_iter().map(|spec| Arc::new(SimDevice::new(spec).unwrap())).collect();
    for device in &sims {
        daemon.daemon.registry.add_device(device.clone(), Backend::Sim).unwrap();
    }
    let names: Vec<String> = sims.iter().map(|d| d.name().to_owned()).collect();
    let mut control = daemon.control().await;
    control
        .define_group(pb::DefineGroupRequest {
            name: "vm".into(),
            devices: names.clone(),
            allow_multiple_non_p2p: false,
        })
        .await
        .unwrap();
    (control, names, sims)
}

/// [`guest`] as the control API takes it.
fn guest_over_the_api() -> Vec<pb::IovaRange> {
    guest().iter().map(|r| pb::IovaRange { iova: r.iova, length: r.length }).collect()
}

fn by_device(stats: &[pb::DeviceDirtyCoverage]) -> Vec<(&str, &str, u64, u64)> {
    stats.iter().map(|d| (d.device.as_str(), d.source.as_str(), d.dirty_pages, d.reports)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_shows_its_devices_dirty_statistics_live_and_keeps_the_last_ones_when_it_ends() {
    let daemon = support::TestDaemon::start().await;
    // Each logging device writes its `iovas` as soon as logging starts.
    let specs =
        [("job-a", true, vec![0x1000, 0x5000]), ("job-b", true, vec![GIB]), ("job-c", false, vec![0x9000])]
            .map(|(name, logging, iovas)| {
                let mut spec = sim(name, logging, 5);
                spec.dma_logging.writes.iovas = iovas;
                spec
            });
    let (mut control, names, sims) = group_over_the_api(&daemon, specs.into()).await;
    let ranges = guest_over_the_api();
    control
        .start_dirty_tracking(pb::StartDirtyTrackingRequest { group: "vm".into(), ranges, page_size: 0 })
        .await
        .unwrap();

    let silent_peer = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let started = control.start_migration(started_request(&names, &silent_peer)).await.unwrap().into_inner();
    assert_eq!(started.status(), pb::JobStatus::Running);
    assert_eq!(
        by_device(&started.dirty_tracking),
        [("job-a", "dma-logging", 0, 0), ("job-b", "dma-logging", 0, 0), ("job-c", "none", 0, 0)]
    );
    assert_eq!(started.dirty_tracking[0].page_size, PAGE);
    assert!(started.dirty_tracking[2].reason.contains("DMA logging"), "{:?}", started.dirty_tracking[2]);

    // A report round shows up in the running job, and wakes its watchers.
    let mut watch =
        control.watch_job(pb::WatchJobRequest { job_id: "j-dirty".into() }).await.unwrap().into_inner();
    assert!(watch.message().await.unwrap().unwrap().dirty_tracking.iter().all(|d| d.reports == 0));
    let pages =
        control.get_dirty_pages(pb::GetDirtyPagesRequest { group: "vm".into() }).await.unwrap().into_inner();
    assert_eq!(pages.dirty_pages, 3);
    let live = [("job-a", "dma-logging", 2, 1), ("job-b", "dma-logging", 1, 1), ("job-c", "none", 0, 0)];
    let watched = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let snapshot = watch.message().await.unwrap().expect("the job is still running");
            if snapshot.dirty_tracking.iter().any(|d| d.reports > 0) {
                return snapshot;
            }
        }
    })
    .await
    .expect("the watcher saw the report round");
    assert_eq!(watched.status(), pb::JobStatus::Running);
    assert_eq!(by_device(&watched.dirty_tracking), live);
    let shown = control.get_job(pb::GetJobRequest { job_id: "j-dirty".into() }).await.unwrap().into_inner();
    assert_eq!(shown.status(), pb::JobStatus::Running);
    assert_eq!(by_device(&shown.dirty_tracking), live);
    assert!(shown.dirty_tracking[..2].iter().all(|d| d.last_report_ns > 0 && d.report_errors == 0));
    let listed = control.list_jobs(pb::ListJobsRequest {}).await.unwrap().into_inner().jobs;
    assert_eq!(by_device(&listed[0].dirty_tracking), live);

    // The job ends (cancelled in its handshake): tracking stops, the job keeps the
    // statistics it had at that stop, sources included.
    control.cancel_job(pb::CancelJobRequest { job_id: "j-dirty".into() }).await.unwrap();
    let snapshot = wait_finished(&daemon.daemon, "j-dirty").await;
    assert_eq!(snapshot.status, JobStatus::Cancelled, "{:?}", snapshot.error);
    wait_tracking_stopped(&daemon.daemon).await;
    assert!(sims.iter().all(|d| !d.dma_logging_active()));
    let tracking = control
        .get_dirty_tracking(pb::GetDirtyTrackingRequest { group: "vm".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(!tracking.active && tracking.devices.is_empty());
    let ended = control.get_job(pb::GetJobRequest { job_id: "j-dirty".into() }).await.unwrap().into_inner();
    assert_eq!(ended.status(), pb::JobStatus::Cancelled);
    assert_eq!(by_device(&ended.dirty_tracking), live);
    assert_eq!(ended.dirty_tracking, shown.dirty_tracking);
    // Tracking the group again does not change what the ended job shows.
    control
        .start_dirty_tracking(pb::StartDirtyTrackingRequest {
            group: "vm".into(),
            ranges: vec![pb::IovaRange { iova: 0, length: MIB }],
            page_size: 0,
        })
        .await
        .unwrap();
    let listed = control.list_jobs(pb::ListJobsRequest {}).await.unwrap().into_inner().jobs;
    assert_eq!(listed[0].dirty_tracking, shown.dirty_tracking);
    control.stop_dirty_tracking(pb::StopDirtyTrackingRequest { group: "vm".into() }).await.unwrap();

    // A job of a group that was not tracked shows nothing, even once the group is.
    let mut untracked = started_request(&names, &silent_peer);
    untracked.job_id = "j-untracked".into();
    let running = control.start_migration(untracked).await.unwrap().into_inner();
    assert!(running.dirty_tracking.is_empty());
    control.cancel_job(pb::CancelJobRequest { job_id: "j-untracked".into() }).await.unwrap();
    wait_finished(&daemon.daemon, "j-untracked").await;
    let job = daemon.daemon.job("j-untracked").unwrap();
    tokio::time::timeout(Duration::from_secs(60), async {
        let mut changes = job.subscribe();
        while job.snapshot().dirty_tracking.is_none() {
            changes.changed().await.unwrap();
        }
    })
    .await
    .expect("the job's end was handled");
    control
        .start_dirty_tracking(pb::StartDirtyTrackingRequest {
            group: "vm".into(),
            ranges: vec![pb::IovaRange { iova: 0, length: MIB }],
            page_size: 0,
        })
        .await
        .unwrap();
    let ended =
        control.get_job(pb::GetJobRequest { job_id: "j-untracked".into() }).await.unwrap().into_inner();
    assert_eq!(ended.status(), pb::JobStatus::Cancelled);
    assert!(ended.dirty_tracking.is_empty(), "{:?}", ended.dirty_tracking);
    control.stop_dirty_tracking(pb::StopDirtyTrackingRequest { group: "vm".into() }).await.unwrap();
    drop((control, silent_peer));
    daemon.stop().await.unwrap();
}
