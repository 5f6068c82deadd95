//! The migration engine between two daemons in one process: real peer gRPC and real TCP
//! data connections on loopback, simulated devices. (The multi-process tests in `tests/`
//! run the same flows through the daemon binary and the control API.)

mod support;

use nix::errno::Errno;
use std::time::Duration;
use support::side::{Side, side, wait_finished};
use vfio_migd::device::MigrationDevice;
use vfio_migd::device::sim::{ArcEvent, Fault, FaultOp, SimDevice, SimSpec};
use vfio_migd::engine::source::MigrationRequest;
use vfio_migd::fsm::{Caps, State};

use vfio_migd::engine::{Daemon, Decision, EngineError};
use vfio_migd::job::{JobSnapshot, JobStatus, JobTotals, Role};
use vfio_migd::peer_identity::PeerIdentity;
use vfio_migd_proto::v1 as pb;

fn spec(name: &str, model: &str, caps: &str, size: u64, seed: u64) -> SimSpec {
    let mut s = SimSpec::new(name);
    s.model = model.into();
    s.caps = Caps::parse(caps).unwrap();
    s.state_size = size;
    s.seed = Some(seed);
    s
}

/// Source `src-<name>` and destination `dst-<name>` devices of the same model and caps.
async fn pair(devices: &[(&str, &str, u64)], src_extra: &str, dst_extra: &str) -> (Side, Side) {
    let src = side(
        devices
            .iter()
            .enumerate()
            .map(|(i, (n, caps, size))| spec(&format!("src-{n}"), n, caps, *size, 100 + i as u64))
            .collect(),
        src_extra,
    )
    .await;
    let dst = side(
        devices
            .iter()
            .enumerate()
            .map(|(i, (n, caps, size))| spec(&format!("dst-{n}"), n, caps, *size, 900 + i as u64))
            .collect(),
        dst_extra,
    )
    .await;
    (src, dst)
}

async fn migrate(src: &Side, dst: &Side, job_id: &str) -> (JobSnapshot, JobSnapshot) {
    let names: Vec<String> = src.devices.iter().map(|d| d.name().to_string()).collect();
    let dst_names: Vec<String> = dst.devices.iter().map(|d| d.name().to_string()).collect();
    dst.daemon.prepare_incoming(job_id, dst_names.clone()).await.unwrap();
    if src.daemon.registry.group("vm").is_err() {
        src.define_group("vm", &src.devices);
    }
    let req = MigrationRequest {
        job_id: job_id.into(),
        group: "vm".into(),
        peer: src_peer_of(dst),
        mapping: names.into_iter().zip(dst_names).collect(),
        phase_timeout_ms: 20_000,
        data_connections: 0,
    };
    src.daemon.start_migration(req).await.unwrap();
    let s = wait_finished(&src.daemon, job_id).await;
    let d = wait_finished(&dst.daemon, job_id).await;
    (s, d)
}

/// The daemon's job totals once `jobs` jobs are counted (a job is counted just after it
/// ends, when the engine retires it).
async fn totals_after(daemon: &Daemon, jobs: u64) -> JobTotals {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let totals = daemon.jobs.totals();
            if totals.ended.values().sum::<u64>() >= jobs {
                return totals;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the ended jobs were never counted")
}

fn src_peer_of(dst: &Side) -> String {
    dst.peer.to_string()
}

fn assert_moved(src: &Side, dst: &Side) {
    for (s, d) in src.devices.iter().zip(&dst.devices) {
        assert_eq!(s.state().unwrap(), State::Stop, "{}", s.name());
        assert_eq!(d.state().unwrap(), State::Running, "{}", d.name());
        assert_eq!(d.content_digest(), s.content_digest(), "{} -> {} byte for byte", s.name(), d.name());
        assert_eq!(d.loaded_state(), Some(s.state_id()));
    }
}

fn time_of(device: &SimDevice, to: State) -> Option<u64> {
    device.arc_log().iter().find(|e| e.event == ArcEvent::Arc(to)).map(|e| e.time_ns)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mixed_group_moves_together_with_the_p2p_barrier() {
    let (src, dst) = pair(
        &[
            ("sim-nic", "STOP_COPY|P2P|PRE_COPY", 3 << 20),
            ("sim-gpu", "STOP_COPY|P2P", (5 << 20) + 17),
            ("sim-acc", "STOP_COPY", 4096),
        ],
        "",
        "",
    )
    .await;
    let (s, d) = migrate(&src, &dst, "job-mixed").await;
    assert_eq!(s.status, JobStatus::Succeeded, "{:?}", s.error);
    assert_eq!(d.status, JobStatus::Succeeded, "{:?}", d.error);
    assert!(s.downtime.is_some());
    assert_moved(&src, &dst);
    // No device entered STOP_COPY (or stopped) before every P2P device was quiesced.
    let quiesced: Vec<u64> = src.devices[..2]
        .iter()
        .map(|dev| {
            let log = dev.arc_log();
            log.iter()
                .find(|e| {
                    matches!(e.event, ArcEvent::Arc(State::RunningP2p) | ArcEvent::Arc(State::PreCopyP2p))
                })
                .map(|e| e.time_ns)
                .expect("quiesced")
        })
        .collect();
    let last_quiesce = *quiesced.iter().max().unwrap();
    for dev in &src.devices {
        let stopped = time_of(dev, State::Stop).or(time_of(dev, State::StopCopy)).expect("stopped");
        assert!(stopped >= last_quiesce, "{} stopped before the P2P barrier", dev.name());
    }
    // Destination: every P2P device reached RUNNING_P2P before any device RUNNING.
    let resumed_p2p =
        dst.devices[..2].iter().map(|d| time_of(d, State::RunningP2p).expect("p2p")).max().unwrap();
    for dev in &dst.devices {
        let running =
            dev.arc_log().iter().rev().find(|e| e.event == ArcEvent::Arc(State::Running)).unwrap().time_ns;
        assert!(running >= resumed_p2p, "{} ran before the resume barrier", dev.name());
    }
    // The commit record exists on the source.
    assert_eq!(src.daemon.journal.read("job-mixed").unwrap(), Some(vfio_migd::engine::Decision::Commit));
    // What the metrics count: one success on each side, the bytes each side moved (the
    // pre-copy device's re-sent pages too), the downtime.
    let state_bytes = (3 << 20) + (5 << 20) + 17 + 4096;
    assert!(s.bytes_done() >= state_bytes && d.bytes_done() == s.bytes_done(), "{}", s.bytes_done());
    let totals = totals_after(&src.daemon, 1).await;
    assert_eq!(totals.ended.into_iter().collect::<Vec<_>>(), [((Role::Source, JobStatus::Succeeded), 1)]);
    assert_eq!(totals.bytes.get(&Role::Source), Some(&s.bytes_done()));
    assert_eq!((totals.downtime_count, totals.downtime_sum), (1, s.downtime.unwrap()));
    let totals = totals_after(&dst.daemon, 1).await;
    assert_eq!(
        totals.ended.into_iter().collect::<Vec<_>>(),
        [((Role::Destination, JobStatus::Succeeded), 1)]
    );
    assert_eq!(totals.bytes.get(&Role::Destination), Some(&d.bytes_done()));
    assert_eq!(totals.downtime_count, 0, "downtime is the source's figure");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_failure_at_stop_copy_rolls_the_whole_group_back() {
    let (src, dst) =
        pair(&[("sim-nic", "STOP_COPY|P2P", 1 << 20), ("sim-gpu", "STOP_COPY|P2P", 2 << 20)], "", "").await;
    let before: Vec<_> = src.devices.iter().map(|d| d.content_digest()).collect();
    src.devices[1].inject(Fault::errno(FaultOp::SetState, Errno::EIO).in_state(State::StopCopy));
    let (s, d) = migrate(&src, &dst, "job-fail").await;
    assert_eq!(s.status, JobStatus::RolledBack);
    let err = s.error.unwrap();
    assert!(err.contains("stop-copy") && err.contains("src-sim-gpu"), "{err}");
    assert_eq!(d.status, JobStatus::RolledBack, "{:?}", d.error);
    for (dev, digest) in src.devices.iter().zip(before) {
        assert_eq!(dev.state().unwrap(), State::Running, "{}", dev.name());
        assert_eq!(dev.content_digest(), digest, "{} state intact", dev.name());
    }
    for dev in &dst.devices {
        assert_eq!(dev.state().unwrap(), State::Running);
        assert_eq!(dev.loaded_state(), None, "{} must hold no migrated state", dev.name());
        assert!(!dev.arcs().iter().any(|a| a.from == State::Resuming && a.to == State::Stop));
    }
    let totals = totals_after(&src.daemon, 1).await;
    assert_eq!(totals.ended.into_iter().collect::<Vec<_>>(), [((Role::Source, JobStatus::RolledBack), 1)]);
    assert_eq!(totals.downtime_count, 0, "only successful migrations have a downtime");
    let totals = totals_after(&dst.daemon, 1).await;
    assert_eq!(
        totals.ended.into_iter().collect::<Vec<_>>(),
        [((Role::Destination, JobStatus::RolledBack), 1)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_stream_never_reaches_resuming_to_stop() {
    let fault = "[test.stream_fault]\nkind = \"flip_byte\"\ndevice = 1\nframe = 1\n";
    let (src, dst) =
        pair(&[("sim-nic", "STOP_COPY|P2P", 3 << 20), ("sim-gpu", "STOP_COPY|P2P", 3 << 20)], fault, "")
            .await;
    let (s, d) = migrate(&src, &dst, "job-corrupt").await;
    assert_eq!(s.status, JobStatus::RolledBack);
    assert_eq!(d.status, JobStatus::RolledBack);
    // The destination names the device whose frame failed, not only its stream index.
    let error = d.error.unwrap();
    assert!(error.starts_with("phase receiving: device 1 frame 1: checksum mismatch"), "{error}");
    assert!(error.ends_with("; device 1 is `dst-sim-gpu`"), "{error}");
    let source_error = s.error.unwrap();
    assert!(source_error.contains(&error), "the source says what the destination found: {source_error}");
    for dev in &src.devices {
        assert_eq!(dev.state().unwrap(), State::Running);
    }
    for dev in &dst.devices {
        assert!(
            !dev.arcs().iter().any(|a| a.from == State::Resuming && a.to == State::Stop),
            "{}",
            dev.name()
        );
        assert_eq!(dev.state().unwrap(), State::Running);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_incompatible_destination_is_refused_before_any_device_moves() {
    let src = side(vec![spec("src-a", "model-a", "STOP_COPY|P2P", 4096, 1)], "").await;
    let dst = side(vec![spec("dst-a", "model-b", "STOP_COPY|P2P", 4096, 2)], "").await;
    let (s, d) = {
        dst.daemon.prepare_incoming("job-x", vec!["dst-a".into()]).await.unwrap();
        src.define_group("vm", &src.devices);
        src.daemon
            .start_migration(MigrationRequest {
                job_id: "job-x".into(),
                group: "vm".into(),
                peer: dst.peer.to_string(),
                mapping: vec![("src-a".into(), "dst-a".into())],
                phase_timeout_ms: 5_000,
                data_connections: 0,
            })
            .await
            .unwrap();
        let s = wait_finished(&src.daemon, "job-x").await;
        (s, dst.daemon.job("job-x").unwrap().snapshot())
    };
    assert_eq!(s.status, JobStatus::RolledBack);
    assert!(s.error.as_deref().unwrap_or_default().contains("incompatible"), "{:?}", s.error);
    assert!(src.devices[0].arcs().is_empty(), "the source device must not have moved");
    assert!(dst.devices[0].arcs().is_empty(), "the destination device must not have moved");
    assert_eq!(d.status, JobStatus::Running, "the destination stays prepared");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_with_two_devices_without_p2p_is_refused() {
    let (src, _dst) = pair(&[("a", "STOP_COPY", 4096), ("b", "STOP_COPY|PRE_COPY", 4096)], "", "").await;
    src.define_group("vm", &src.devices);
    let err = src.daemon.plan("vm").unwrap_err();
    assert!(err.to_string().contains("cannot be quiesced"), "{err}");
}

/// Starts `job_id` from group `vm` to `dst` without waiting for it to end.
async fn start(src: &Side, dst: &Side, job_id: &str, phase_timeout_ms: u64) {
    let names: Vec<String> = src.devices.iter().map(|d| d.name().to_string()).collect();
    let dst_names: Vec<String> = dst.devices.iter().map(|d| d.name().to_string()).collect();
    dst.daemon.prepare_incoming(job_id, dst_names.clone()).await.unwrap();
    if src.daemon.registry.group("vm").is_err() {
        src.define_group("vm", &src.devices);
    }
    src.daemon
        .start_migration(MigrationRequest {
            job_id: job_id.into(),
            group: "vm".into(),
            peer: src_peer_of(dst),
            mapping: names.into_iter().zip(dst_names).collect(),
            phase_timeout_ms,
            data_connections: 0,
        })
        .await
        .unwrap();
}

fn from(ip: [u8; 4]) -> PeerIdentity {
    PeerIdentity {
        addr: Some(std::net::SocketAddr::from((ip, 40_000))),
        names: Vec::new(),
        certificate: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn case1_devices_that_migrated_away_or_are_paused_are_never_claimed() {
    let (src, dst) = pair(&[("sim-nic", "STOP_COPY|P2P", 1 << 20)], "", "").await;
    let (s, d) = migrate(&src, &dst, "job-first").await;
    assert_eq!((s.status, d.status), (JobStatus::Succeeded, JobStatus::Succeeded), "{:?}", s.error);
    // The claim goes once the job's task ended.
    for _ in 0..100 {
        if src.daemon.registry.job_of("src-sim-nic").is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A retry of the same group (automation, an operator) must not resume the state that
    // now runs on the destination.
    let err = src
        .daemon
        .start_migration(MigrationRequest {
            job_id: "job-second".into(),
            group: "vm".into(),
            peer: src_peer_of(&dst),
            mapping: vec![("src-sim-nic".into(), "dst-sim-nic".into())],
            phase_timeout_ms: 2_000,
            data_connections: 0,
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("migrated away in job `job-first`"), "{err}");
    assert_eq!(src.devices[0].state().unwrap(), State::Stop);
    assert_eq!(dst.devices[0].state().unwrap(), State::Running);

    // A VM paused on purpose (devices in STOP) is not migrated, and not restarted.
    let (src, dst) = pair(&[("sim-gpu", "STOP_COPY|P2P", 4096)], "", "").await;
    src.devices[0].set_state(State::Stop).unwrap();
    src.define_group("vm", &src.devices);
    dst.daemon.prepare_incoming("job-paused", vec!["dst-sim-gpu".into()]).await.unwrap();
    let err = src
        .daemon
        .start_migration(MigrationRequest {
            job_id: "job-paused".into(),
            group: "vm".into(),
            peer: src_peer_of(&dst),
            mapping: vec![("src-sim-gpu".into(), "dst-sim-gpu".into())],
            phase_timeout_ms: 2_000,
            data_connections: 0,
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("`src-sim-gpu` is in STOP"), "{err}");
    assert_eq!(src.devices[0].state().unwrap(), State::Stop);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn case2_a_commit_left_on_disk_by_a_failed_journal_write_holds_the_devices() {
    let (src, dst) =
        pair(&[("sim-nic", "STOP_COPY|P2P", 1 << 20), ("sim-acc", "STOP_COPY", 8192)], "", "").await;
    src.daemon.journal.fail_next_directory_sync();
    start(&src, &dst, "job-sync", 20_000).await;
    let s = wait_finished(&src.daemon, "job-sync").await;
    assert_eq!(s.status, JobStatus::InDoubt, "{:?}", s.error);
    assert_eq!(src.daemon.journal.read("job-sync").unwrap(), Some(Decision::Commit));
    for dev in &src.devices {
        assert_ne!(dev.state().unwrap(), State::Running, "{} resumed with a commit on disk", dev.name());
    }
    for dev in &dst.devices {
        assert_eq!(dev.state().unwrap(), State::Stop, "{} must hold its loaded state", dev.name());
    }
    // The operator's resolve writes the commit durably and delivers it.
    let job = src.daemon.resolve("job-sync", None).await.unwrap();
    assert_eq!(job.snapshot().status, JobStatus::Succeeded);
    assert_moved(&src, &dst);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn case3_a_query_before_the_decision_is_a_durable_abort_and_strangers_learn_nothing() {
    let (src, dst) = pair(&[("sim-nic", "STOP_COPY|P2P", 8 << 20)], "", "").await;
    // A job nobody knows is `unknown`, which a destination holds on, not `abort`.
    let unknown = src.daemon.query_job("job-never", &from([127, 0, 0, 1])).await.unwrap();
    assert_eq!(unknown.decision_value(), pb::JobDecision::Unknown);
    assert_eq!(unknown.decision, "");
    start(&src, &dst, "job-early", 20_000).await;
    // Not the job's destination: refused, and nothing journaled.
    let err = src.daemon.query_job("job-early", &from([127, 0, 0, 2])).await.unwrap_err();
    assert!(matches!(err, EngineError::PermissionDenied(_)), "{err}");
    assert_eq!(src.daemon.journal.read("job-early").unwrap(), None);
    // The job's destination asks before the decision: abort, journaled before the answer.
    let answer = src.daemon.query_job("job-early", &from([127, 0, 0, 1])).await.unwrap();
    assert_eq!(answer.decision_value(), pb::JobDecision::Abort);
    assert_eq!(answer.decision, "abort");
    assert_eq!(src.daemon.journal.read("job-early").unwrap(), Some(Decision::Abort));
    let job = src.daemon.job("job-early").unwrap();
    for _ in 0..300 {
        if job.snapshot().status != JobStatus::Running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = job.snapshot();
    assert_eq!(s.status, JobStatus::RolledBack, "phase {}: {:?}", s.phase, s.error);
    assert_eq!(src.devices[0].state().unwrap(), State::Running);
    // Whether or not the handshake came first, the destination never runs the state.
    assert_ne!(dst.daemon.job("job-early").unwrap().snapshot().status, JobStatus::Succeeded);
    assert_eq!(dst.devices[0].loaded_state(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn case4_after_loaded_a_stranger_can_neither_commit_nor_abort() {
    let (src, dst) = pair(&[("sim-nic", "STOP_COPY|P2P", 1 << 20)], "", "").await;
    // The journal fault holds the job between "loaded" and the delivered commit.
    src.daemon.journal.fail_next_directory_sync();
    start(&src, &dst, "job-held", 20_000).await;
    assert_eq!(wait_finished(&src.daemon, "job-held").await.status, JobStatus::InDoubt);
    let stranger = from([127, 0, 0, 2]);
    let err = dst.daemon.commit_incoming("job-held", Some(&stranger)).await.unwrap_err();
    assert!(matches!(err, EngineError::PermissionDenied(_)), "{err}");
    let err =
        dst.daemon.abort_incoming("job-held", "a stranger says abort", Some(&stranger)).await.unwrap_err();
    assert!(matches!(err, EngineError::PermissionDenied(_)), "{err}");
    assert_eq!(dst.devices[0].state().unwrap(), State::Stop, "the loaded state is held");
    src.daemon.resolve("job-held", None).await.unwrap();
    assert_moved(&src, &dst);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn case6_a_timed_out_barrier_is_joined_before_the_rollback() {
    let (src, dst) =
        pair(&[("sim-nic", "STOP_COPY|P2P", 1 << 20), ("sim-gpu", "STOP_COPY|P2P", 1 << 20)], "", "").await;
    src.devices[1]
        .inject(Fault::stall(FaultOp::SetState, Duration::from_millis(1500)).in_state(State::StopCopy));
    start(&src, &dst, "job-slow", 500).await;
    let s = wait_finished(&src.daemon, "job-slow").await;
    assert_eq!(s.status, JobStatus::RolledBack, "{:?}", s.error);
    // Had the stalled SET been left running, it would land now, after "rolled back".
    tokio::time::sleep(Duration::from_millis(2000)).await;
    for dev in &src.devices {
        assert_eq!(dev.state().unwrap(), State::Running, "{} moved after the rollback", dev.name());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn case9_a_commit_the_destination_did_not_confirm_is_never_reported_failed() {
    let (src, dst) = pair(&[("sim-nic", "STOP_COPY|P2P", 1 << 20)], "", "").await;
    // The destination obeys Commit but a device fails to resume: the answer is an error.
    dst.devices[0].inject(Fault::errno(FaultOp::SetState, Errno::EIO).in_state(State::Running));
    start(&src, &dst, "job-unconfirmed", 20_000).await;
    let s = wait_finished(&src.daemon, "job-unconfirmed").await;
    assert_eq!(src.daemon.journal.read("job-unconfirmed").unwrap(), Some(Decision::Commit));
    assert_eq!(s.status, JobStatus::InDoubt, "a journaled commit is never `failed`: {:?}", s.error);
    assert_ne!(src.devices[0].state().unwrap(), State::Running);
}
