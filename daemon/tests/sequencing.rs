//! Group sequencing end to end (issue #11, cases 5 and 7): two daemons in one process,
//! simulated devices that do peer-to-peer DMA into each other, real peer gRPC and data
//! connections on loopback.

mod support;

use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use support::side::{Side, side, wait_finished};
use vfio_migd::device::MigrationDevice;
use vfio_migd::device::sim::{ArcEvent, Fault, FaultOp, SimDevice, SimSpec};
use vfio_migd::engine::source::MigrationRequest;
use vfio_migd::fsm::{Caps, State};
use vfio_migd::job::{JobSnapshot, JobStatus};

fn spec(name: &str, model: &str, caps: &str, seed: u64, p2p_writes_per_second: u64) -> SimSpec {
    let mut s = SimSpec::new(name);
    s.model = model.into();
    s.caps = Caps::parse(caps).unwrap();
    s.state_size = 256 << 10;
    s.seed = Some(seed);
    s.p2p_writes_per_second = p2p_writes_per_second;
    s
}

/// Source and destination sides of `devices` (model, caps, P2P writes per second on the
/// source), the source's devices connected to each other for P2P DMA.
async fn pair(devices: &[(&str, &str, u64)]) -> (Side, Side) {
    let src = side(
        devices
            .iter()
            .enumerate()
            .map(|(i, (m, caps, rate))| spec(&format!("src-{m}"), m, caps, 100 + i as u64, *rate))
            .collect(),
        "",
    )
    .await;
    let dst = side(
        devices
            .iter()
            .enumerate()
            .map(|(i, (m, caps, _))| spec(&format!("dst-{m}"), m, caps, 900 + i as u64, 0))
            .collect(),
        "",
    )
    .await;
    for device in &src.devices {
        device.connect_p2p(&src.devices);
    }
    (src, dst)
}

async fn migrate(src: &Side, dst: &Side, job_id: &str) -> (JobSnapshot, JobSnapshot) {
    let names: Vec<String> = src.devices.iter().map(|d| d.name().to_string()).collect();
    let dst_names: Vec<String> = dst.devices.iter().map(|d| d.name().to_string()).collect();
    dst.daemon.prepare_incoming(job_id, dst_names.clone()).await.unwrap();
    src.define_group("vm", &src.devices);
    let req = MigrationRequest {
        job_id: job_id.into(),
        group: "vm".into(),
        peer: dst.peer.to_string(),
        mapping: names.into_iter().zip(dst_names).collect(),
        phase_timeout_ms: 20_000,
        data_connections: 0,
    };
    src.daemon.start_migration(req).await.unwrap();
    (wait_finished(&src.daemon, job_id).await, wait_finished(&dst.daemon, job_id).await)
}

fn time_of(device: &SimDevice, to: State) -> u64 {
    device.arc_log().iter().find(|e| e.event == ArcEvent::Arc(to)).map(|e| e.time_ns).expect("arc walked")
}

/// Case 5 of issue #11: the device without P2P (`acc`) writes P2P DMA into the two P2P
/// devices until its own STOP returns. Its stop is slow (a 100 ms arc, as firmware
/// commands are). On main it walked RUNNING -> STOP -> STOP_COPY in parallel with the
/// quiesced devices' STOP_COPY, so its writes landed in devices whose state was being
/// saved, and the destination received corrupt state. Now it stops alone, while the others
/// still accept its writes, and the group arrives intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn case_5_the_device_without_p2p_stops_alone_and_its_p2p_writes_arrive_intact() {
    let (src, dst) = pair(&[
        ("nic", "STOP_COPY|P2P|PRE_COPY", 0),
        ("gpu", "STOP_COPY|P2P", 0),
        ("acc", "STOP_COPY", 20_000),
    ])
    .await;
    let acc = src.devices[2].clone();
    acc.inject(Fault::stall(FaultOp::SetState, Duration::from_millis(100)).in_state(State::Stop).once());
    let (s, d) = migrate(&src, &dst, "job-case-5").await;
    assert_eq!(s.status, JobStatus::Succeeded, "{:?}", s.error);
    assert_eq!(d.status, JobStatus::Succeeded, "{:?}", d.error);
    for (sd, dd) in src.devices.iter().zip(&dst.devices) {
        let (accepted, corrupting) = sd.p2p_writes_received();
        assert_eq!(corrupting, 0, "{}: P2P writes reached it while stopped", sd.name());
        if sd.name() != acc.name() {
            assert!(accepted > 0, "{}: the test must exercise P2P DMA", sd.name());
        }
        assert_eq!(dd.content_digest(), sd.content_digest(), "{} arrives byte for byte", sd.name());
        assert_eq!(dd.state().unwrap(), State::Running);
    }
    // The order on the source: acc's STOP returned before any device left RUNNING_P2P /
    // PRE_COPY_P2P, and after both had entered it.
    let acc_stopped = time_of(&acc, State::Stop);
    for p2p in &src.devices[..2] {
        let quiesced = p2p
            .arc_log()
            .iter()
            .find(|e| matches!(e.event, ArcEvent::Arc(State::RunningP2p) | ArcEvent::Arc(State::PreCopyP2p)))
            .map(|e| e.time_ns)
            .expect("quiesced");
        assert!(quiesced <= acc_stopped, "{} quiesced after acc stopped", p2p.name());
        assert!(time_of(p2p, State::StopCopy) >= acc_stopped, "{} stopped before acc", p2p.name());
    }
}

/// Case 5, destination half: a P2P device that fails STOP -> RUNNING_P2P keeps every
/// device from starting, and the destination — which holds the VM's only copy after
/// Commit — holds them in doubt instead of resetting; a retried commit finishes the
/// resume from where they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn case_5_a_failed_resume_barrier_starts_no_device_and_resets_none() {
    let (src, dst) =
        pair(&[("gpu", "STOP_COPY|P2P", 0), ("nic", "STOP_COPY|P2P", 0), ("acc", "STOP_COPY", 0)]).await;
    // The first RUNNING_P2P arc is on the way to RESUMING; the second is the resume's.
    dst.devices[1].inject(Fault::errno(FaultOp::SetState, Errno::EIO).in_state(State::RunningP2p).nth(2));
    let (s, d) = migrate(&src, &dst, "job-case-5-dst").await;
    assert_eq!(d.status, JobStatus::InDoubt, "{:?}", d.error);
    let error = d.error.clone().unwrap();
    assert!(error.contains("resume p2p barrier failed") && error.contains("dst-nic"), "{error}");
    assert!(error.contains("no device was started") && error.contains("never reset"), "{error}");
    assert_ne!(s.status, JobStatus::RolledBack, "the source journaled commit: {:?}", s.error);
    for dev in &dst.devices {
        assert!(!dev.arcs().iter().any(|a| a.to == State::Running), "{} started", dev.name());
        assert!(dev.loaded_state().is_some(), "{} was reset", dev.name());
    }
    for dev in &src.devices {
        assert!(!dev.state().unwrap().is_running(), "{} runs on the source too", dev.name());
    }
    // A retried commit resumes from where the devices are.
    dst.daemon.resolve("job-case-5-dst", Some(vfio_migd::engine::Decision::Commit)).await.unwrap();
    let d = dst.daemon.job("job-case-5-dst").unwrap().snapshot();
    assert_eq!(d.status, JobStatus::Succeeded, "{:?}", d.error);
    for (sd, dd) in src.devices.iter().zip(&dst.devices) {
        assert_eq!(dd.state().unwrap(), State::Running);
        assert_eq!(dd.content_digest(), sd.content_digest());
    }
}

/// Case 7 of issue #11: a P2P-quiesced device keeps running — it takes P2P writes and
/// its state changes — but initiates none; a write into a stopped device corrupts what it
/// saves, and the destination's verification refuses the stream.
#[test]
fn case_7_quiesced_devices_run_and_take_p2p_writes_but_initiate_none() {
    let writer = Arc::new(SimDevice::new(spec("writer", "m", "STOP_COPY|P2P", 1, 50_000)).unwrap());
    let peer = Arc::new(SimDevice::new(spec("peer", "m", "STOP_COPY|P2P", 2, 0)).unwrap());
    writer.connect_p2p(&[writer.clone(), peer.clone()]);
    let wait_for = |what: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !what() {
            assert!(std::time::Instant::now() < deadline, "timed out");
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    // The peer quiesced: it takes the writes and its state changes.
    peer.set_state(State::RunningP2p).unwrap();
    let before = peer.state_id();
    wait_for(&|| peer.p2p_writes_received().0 > 10);
    assert_ne!(peer.state_id(), before, "a RUNNING_P2P device still changes under P2P writes");
    // The writer quiesced: no write starts once its SET returned.
    writer.set_state(State::RunningP2p).unwrap();
    let frozen = peer.p2p_writes_received();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(peer.p2p_writes_received(), frozen, "a RUNNING_P2P device initiated P2P DMA");
    // Writer running again, peer stopped: the writes corrupt the peer's saved state.
    writer.set_state(State::Running).unwrap();
    peer.set_state(State::Stop).unwrap();
    wait_for(&|| peer.p2p_writes_received().1 > 0);
    writer.set_state(State::RunningP2p).unwrap();
    let fd = peer.set_state(State::StopCopy).unwrap().expect("saving data_fd");
    let mut stream = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = fd.read_chunk(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        stream.extend_from_slice(&buf[..n]);
    }
    let dst = SimDevice::new(spec("dst", "m", "STOP_COPY|P2P", 3, 0)).unwrap();
    dst.set_state(State::Stop).unwrap();
    let resume = dst.set_state(State::Resuming).unwrap().expect("resuming data_fd");
    let written = resume.write_all_bytes(&stream);
    let loaded = written
        .map_err(|e| e.to_string())
        .and_then(|()| dst.set_state(State::Stop).map_err(|e| e.to_string()));
    assert!(loaded.is_err(), "the destination loaded a state corrupted by a P2P write into a stopped device");
    assert!(
        peer.arc_log()
            .iter()
            .any(|e| matches!(&e.event, ArcEvent::Fault(w) if w.contains("P2P DMA write from writer")))
    );
}

/// Case 7 of issue #11, last part: a cancel that raced the commit (it passed the phase
/// check just before the job committed) must not skip the source's STOP_COPY -> STOP
/// cleanup, which main's cancel-guarded barrier gave up on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn case_7_a_cancel_racing_the_commit_does_not_skip_the_cleanup() {
    let (src, dst) = pair(&[("gpu", "STOP_COPY|P2P", 0), ("nic", "STOP_COPY|P2P", 0)]).await;
    // The destination's resume is slow, so the source sits in its commit phase a while.
    dst.devices[0].inject(
        Fault::stall(FaultOp::SetState, Duration::from_millis(300)).in_state(State::RunningP2p).nth(2),
    );
    let names: Vec<String> = src.devices.iter().map(|d| d.name().to_string()).collect();
    let dst_names: Vec<String> = dst.devices.iter().map(|d| d.name().to_string()).collect();
    dst.daemon.prepare_incoming("job-race", dst_names.clone()).await.unwrap();
    src.define_group("vm", &src.devices);
    let job = src
        .daemon
        .start_migration(MigrationRequest {
            job_id: "job-race".into(),
            group: "vm".into(),
            peer: dst.peer.to_string(),
            mapping: names.into_iter().zip(dst_names).collect(),
            phase_timeout_ms: 20_000,
            data_connections: 0,
        })
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(20), async {
        while job.snapshot().phase != vfio_migd::job::Phase::Commit {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("the job reached its commit phase");
    job.cancel.cancel();
    let s = wait_finished(&src.daemon, "job-race").await;
    assert_eq!(s.status, JobStatus::Succeeded, "{:?}", s.error);
    for dev in &src.devices {
        assert_eq!(dev.state().unwrap(), State::Stop, "{} left in STOP_COPY", dev.name());
    }
}
