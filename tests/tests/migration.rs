//! End to end: two `vfio-migd` processes with simulated devices, driven through the real
//! control API over their Unix sockets; results checked byte for byte (content digests),
//! through device states, and in both daemons' arc logs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vfio_migd::device::sim::{ArcEvent, read_arc_log};
use vfio_migd::fsm::State;
use vfio_migd_proto::v1 as pb;
use vfio_migd_tests::{DaemonProcess, sim_device};

/// A simulated device on both sides: source `<name>`, destination `dst-<name>`.
#[derive(Clone)]
struct Dev {
    name: &'static str,
    model: &'static str,
    caps: &'static str,
    size: u64,
    /// Extra `[[device.faults]]` tables for the source device.
    src_faults: &'static str,
    /// Extra `[[device.faults]]` tables for the destination device.
    dst_faults: &'static str,
}

const fn dev(name: &'static str, caps: &'static str, size: u64) -> Dev {
    Dev { name, model: "sim-dev", caps, size, src_faults: "", dst_faults: "" }
}

struct Pair {
    dir: tempfile::TempDir,
    devs: Vec<Dev>,
    src: DaemonProcess,
    dst: DaemonProcess,
}

impl Pair {
    fn start(devs: &[Dev], src_extra: &str, dst_extra: &str) -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let mut src_toml = String::new();
        let mut dst_toml = String::new();
        for (i, d) in devs.iter().enumerate() {
            src_toml +=
                &sim_device(d.name, d.model, d.caps, d.size, 10 + i as u64, &arc_log(dir.path(), d.name));
            src_toml += d.src_faults;
            let dst_name = format!("dst-{}", d.name);
            dst_toml += &sim_device(
                &dst_name,
                d.model,
                d.caps,
                d.size,
                500 + i as u64,
                &arc_log(dir.path(), &dst_name),
            );
            dst_toml += d.dst_faults;
        }
        let src = DaemonProcess::spawn(dir.path(), "src", &src_toml, src_extra, true);
        let dst = DaemonProcess::spawn(dir.path(), "dst", &dst_toml, dst_extra, true);
        Pair { dir, devs: devs.to_vec(), src, dst }
    }

    /// The control socket opens before the configured devices are registered.
    async fn ready(self) -> Pair {
        for daemon in [&self.src, &self.dst] {
            daemon.wait_for_devices(self.devs.len()).await;
        }
        self
    }

    fn arcs(&self, device: &str) -> Vec<vfio_migd::device::sim::ArcLogEntry> {
        read_arc_log(&arc_log(self.dir.path(), device)).unwrap_or_default()
    }

    async fn digests(&self) -> (Vec<pb::Device>, Vec<pb::Device>) {
        let mut src = self.src.control().await;
        let mut dst = self.dst.control().await;
        let mut s = Vec::new();
        let mut d = Vec::new();
        for dev in &self.devs {
            s.push(
                src.get_device(pb::GetDeviceRequest { name: dev.name.into() }).await.unwrap().into_inner(),
            );
            d.push(
                dst.get_device(pb::GetDeviceRequest { name: format!("dst-{}", dev.name) })
                    .await
                    .unwrap()
                    .into_inner(),
            );
        }
        (s, d)
    }

    /// Prepares the destination, defines the group and starts the migration; returns the
    /// source's and the destination's final job.
    async fn migrate(&self, job_id: &str, timeout_ms: u64) -> (pb::Job, pb::Job) {
        let (mut src, mut dst, request) = self.start_job(job_id, timeout_ms).await;
        // A retried start with the same job id is idempotent.
        let again = src.start_migration(request).await.unwrap().into_inner();
        assert_eq!(again.job_id, job_id);
        let s = settle(&mut src, job_id).await;
        let d = settle(&mut dst, job_id).await;
        (s, d)
    }

    /// Prepares the destination, defines the group `vm` over every device and starts the
    /// migration; returns both control clients and the start request.
    async fn start_job(&self, job_id: &str, timeout_ms: u64) -> (Client, Client, pb::StartMigrationRequest) {
        let mut src = self.src.control().await;
        let mut dst = self.dst.control().await;
        let names: Vec<String> = self.devs.iter().map(|d| d.name.to_string()).collect();
        let dst_names: Vec<String> = names.iter().map(|n| format!("dst-{n}")).collect();
        dst.prepare_incoming(pb::PrepareIncomingRequest {
            job_id: job_id.into(),
            devices: dst_names.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        src.define_group(pb::DefineGroupRequest {
            name: "vm".into(),
            devices: names.clone(),
            allow_multiple_non_p2p: false,
        })
        .await
        .unwrap();
        let request = pb::StartMigrationRequest {
            job_id: job_id.into(),
            group: "vm".into(),
            peer: self.dst.peer.to_string(),
            mapping: names
                .iter()
                .zip(&dst_names)
                .map(|(s, d)| pb::DeviceMapping { source: s.clone(), destination: d.clone() })
                .collect(),
            phase_timeout_ms: timeout_ms,
            data_connections: 0,
            ..Default::default()
        };
        src.start_migration(request.clone()).await.unwrap();
        (src, dst, request)
    }
}

type Client = vfio_migd_proto::v1::control_client::ControlClient<tonic::transport::Channel>;

fn arc_log(dir: &Path, device: &str) -> PathBuf {
    dir.join(format!("{device}.arcs"))
}

async fn settle(
    client: &mut vfio_migd_proto::v1::control_client::ControlClient<tonic::transport::Channel>,
    job_id: &str,
) -> pb::Job {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let job = client.get_job(pb::GetJobRequest { job_id: job_id.into() }).await.unwrap().into_inner();
        if job.status() != pb::JobStatus::Running {
            return job;
        }
        assert!(Instant::now() < deadline, "job {job_id} did not settle: {job:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn entered(log: &[vfio_migd::device::sim::ArcLogEntry], state: State) -> Option<u64> {
    log.iter().find(|e| e.event == ArcEvent::Arc(state)).map(|e| e.time_ns)
}

async fn assert_migrated(pair: &Pair, src_job: &pb::Job, dst_job: &pb::Job) {
    assert_eq!(
        src_job.status(),
        pb::JobStatus::Succeeded,
        "source: {}\n{}",
        src_job.error,
        pair.src.log_text()
    );
    assert_eq!(
        dst_job.status(),
        pb::JobStatus::Succeeded,
        "destination: {}\n{}",
        dst_job.error,
        pair.dst.log_text()
    );
    assert!(src_job.downtime_ns > 0);
    let (src, dst) = pair.digests().await;
    for (s, d) in src.iter().zip(&dst) {
        assert_eq!(s.state, "STOP", "{}", s.name);
        assert_eq!(d.state, "RUNNING", "{}", d.name);
        assert!(!s.content_digest.is_empty());
        assert_eq!(s.content_digest, d.content_digest, "{} -> {} byte for byte", s.name, d.name);
    }
    // Arc logs: no device stopped before every P2P device was quiesced, and no destination
    // device ran before every P2P destination device was in RUNNING_P2P.
    let p2p: Vec<&Dev> = pair.devs.iter().filter(|d| d.caps.contains("P2P")).collect();
    let quiesced = p2p
        .iter()
        .map(|d| {
            let log = pair.arcs(d.name);
            entered(&log, State::RunningP2p)
                .into_iter()
                .chain(entered(&log, State::PreCopyP2p))
                .min()
                .expect("quiesced")
        })
        .max();
    let resumed_p2p = p2p
        .iter()
        .map(|d| entered(&pair.arcs(&format!("dst-{}", d.name)), State::RunningP2p).expect("p2p"))
        .max();
    let commit_record = pair.src.dir.join("state/journal").join(format!("{}.decision", src_job.job_id));
    assert_eq!(std::fs::read_to_string(&commit_record).unwrap().trim(), "commit");
    for d in &pair.devs {
        let log = pair.arcs(d.name);
        let stopped = entered(&log, State::Stop)
            .into_iter()
            .chain(entered(&log, State::StopCopy))
            .min()
            .expect("stopped");
        if let Some(q) = quiesced {
            assert!(stopped >= q, "{} stopped before the P2P barrier", d.name);
        }
        let dlog = pair.arcs(&format!("dst-{}", d.name));
        let running =
            dlog.iter().rev().find(|e| e.event == ArcEvent::Arc(State::Running)).expect("running").time_ns;
        if let Some(r) = resumed_p2p {
            assert!(running >= r, "dst-{} ran before the resume barrier", d.name);
        }
    }
}

/// After a failure before commit: every source device RUNNING with its state intact,
/// every destination device reset (no migrated state), never RESUMING -> STOP on a bad stream.
async fn assert_rolled_back(
    pair: &Pair,
    before: &[pb::Device],
    src_job: &pb::Job,
    dst_job: &pb::Job,
    expect: &[&str],
) {
    assert!(
        matches!(src_job.status(), pb::JobStatus::RolledBack | pb::JobStatus::Cancelled),
        "source: {:?} {}\n{}",
        src_job.status(),
        src_job.error,
        pair.src.log_text()
    );
    for word in expect {
        assert!(src_job.error.contains(word), "source error `{}` should mention `{word}`", src_job.error);
    }
    assert!(
        matches!(
            dst_job.status(),
            pb::JobStatus::RolledBack | pb::JobStatus::Running | pb::JobStatus::Cancelled
        ),
        "destination: {:?} {}",
        dst_job.status(),
        dst_job.error
    );
    let (src, dst) = pair.digests().await;
    for (s, b) in src.iter().zip(before) {
        assert_eq!(s.state, "RUNNING", "{}", s.name);
        assert_eq!(s.content_digest, b.content_digest, "{}: state must be intact", s.name);
    }
    for d in &dst {
        assert_eq!(d.state, "RUNNING", "{}", d.name);
        let src_digests: Vec<&String> = src.iter().map(|s| &s.content_digest).collect();
        assert!(!src_digests.contains(&&d.content_digest), "{} must hold no migrated state", d.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_of_one_two_and_eight_devices_move_byte_for_byte() {
    for (job, devs) in [
        ("one", vec![dev("a", "STOP_COPY|P2P|PRE_COPY", 0)]),
        ("two", vec![dev("a", "STOP_COPY|P2P", 1), dev("b", "STOP_COPY", (3 << 20) + 5)]),
        (
            "eight",
            (0..8)
                .map(|i| {
                    let names = ["d0", "d1", "d2", "d3", "d4", "d5", "d6", "d7"];
                    let caps = if i % 2 == 0 { "STOP_COPY|P2P|PRE_COPY" } else { "STOP_COPY|P2P" };
                    dev(names[i], caps, (i as u64 + 1) << 20)
                })
                .collect(),
        ),
    ] {
        let pair = Pair::start(&devs, "", "").ready().await;
        let (s, d) = pair.migrate(job, 60_000).await;
        assert_migrated(&pair, &s, &d).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_256_mib_device_moves_byte_for_byte() {
    let pair =
        Pair::start(&[dev("big", "STOP_COPY|P2P", 256 << 20), dev("small", "STOP_COPY|P2P", 4096)], "", "")
            .ready()
            .await;
    let (s, d) = pair.migrate("big", 120_000).await;
    assert_migrated(&pair, &s, &d).await;
    assert!(s.bytes_total >= 256 << 20);
}

/// A fault at every phase before commit, on source devices, destination devices and the
/// stream: the source ends RUNNING with identical state, the destination is reset, the
/// error names the device and the phase.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_before_commit_roll_the_group_back() {
    struct Case {
        name: &'static str,
        on: usize,
        src_faults: &'static str,
        dst_faults: &'static str,
        src_extra: &'static str,
        expect: &'static [&'static str],
    }
    let cases = [
        Case {
            name: "pre-copy",
            on: 0,
            src_faults: "[[device.faults]]\nkind = \"errno\"\nop = \"set_state\"\nstate = \"PRE_COPY\"\nerrno = \"EIO\"\n",
            dst_faults: "",
            src_extra: "",
            expect: &["pre-copy", "b0"],
        },
        Case {
            name: "p2p",
            on: 1,
            src_faults: "[[device.faults]]\nkind = \"errno\"\nop = \"set_state\"\nstate = \"RUNNING_P2P\"\nerrno = \"EIO\"\n",
            dst_faults: "",
            src_extra: "",
            expect: &["p2p-barrier", "b1"],
        },
        Case {
            name: "stop-copy",
            on: 2,
            src_faults: "[[device.faults]]\nkind = \"errno\"\nop = \"set_state\"\nstate = \"STOP_COPY\"\nerrno = \"EIO\"\n",
            dst_faults: "",
            src_extra: "",
            expect: &["stop-copy", "b2"],
        },
        Case {
            name: "short-stream",
            on: 0,
            src_faults: "[[device.faults]]\nkind = \"early_eof\"\nbytes = 100000\n",
            dst_faults: "",
            src_extra: "",
            expect: &["dst-b0"],
        },
        Case {
            name: "resuming",
            on: 1,
            src_faults: "",
            dst_faults: "[[device.faults]]\nkind = \"errno\"\nop = \"set_state\"\nstate = \"RESUMING\"\nerrno = \"EIO\"\n",
            src_extra: "",
            expect: &["handshake"],
        },
        Case {
            name: "load",
            on: 2,
            src_faults: "",
            dst_faults: "[[device.faults]]\nkind = \"errno\"\nop = \"set_state\"\nstate = \"STOP\"\nerrno = \"EIO\"\nnth = 2\n",
            src_extra: "",
            expect: &["await-loaded", "dst-b2"],
        },
        Case {
            name: "flip",
            on: 0,
            src_faults: "",
            dst_faults: "",
            src_extra: "[test.stream_fault]\nkind = \"flip_byte\"\ndevice = 1\nframe = 0\n",
            expect: &[],
        },
        Case {
            name: "truncate",
            on: 0,
            src_faults: "",
            dst_faults: "",
            src_extra: "[test.stream_fault]\nkind = \"truncate\"\ndevice = 2\nframe = 1\n",
            expect: &[],
        },
        Case {
            name: "drop",
            on: 0,
            src_faults: "",
            dst_faults: "",
            src_extra: "[test.stream_fault]\nkind = \"drop_connection\"\nframe = 2\n",
            expect: &[],
        },
    ];
    for case in cases {
        let mut devs = vec![
            dev("b0", "STOP_COPY|P2P|PRE_COPY", 2 << 20),
            dev("b1", "STOP_COPY|P2P", (2 << 20) + 3),
            dev("b2", "STOP_COPY", 3 << 20),
        ];
        devs[case.on].src_faults = case.src_faults;
        devs[case.on].dst_faults = case.dst_faults;
        let pair = Pair::start(&devs, case.src_extra, "").ready().await;
        let (before, _) = pair.digests().await;
        let (s, d) = pair.migrate(case.name, 30_000).await;
        eprintln!("case {}: source error: {}", case.name, s.error);
        assert_rolled_back(&pair, &before, &s, &d, case.expect).await;
        if case.src_extra.contains("stream_fault") {
            for dv in &pair.devs {
                let log = pair.arcs(&format!("dst-{}", dv.name));
                let loaded = log
                    .windows(1)
                    .any(|w| w[0].from == State::Resuming && w[0].event == ArcEvent::Arc(State::Stop));
                assert!(!loaded, "case {}: dst-{} went RESUMING -> STOP on a bad stream", case.name, dv.name);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_destination_rolls_the_source_back() {
    let mut devs = vec![dev("k0", "STOP_COPY|P2P", 64 << 20), dev("k1", "STOP_COPY|P2P", 64 << 20)];
    // Slow the destination's writes so the kill lands mid-stream.
    devs[0].dst_faults = "[[device.faults]]\nkind = \"stall\"\nop = \"data_write\"\nms = 200\n";
    let mut pair = Pair::start(&devs, "", "").ready().await;
    let (before, _) = pair.digests().await;
    let (mut src, _, _) = pair.start_job("kill", 20_000).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let job = src.get_job(pb::GetJobRequest { job_id: "kill".into() }).await.unwrap().into_inner();
        if job.phase == "drain" || job.status() != pb::JobStatus::Running {
            break;
        }
        assert!(Instant::now() < deadline, "never reached the drain phase");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    pair.dst.kill();
    let s = settle(&mut src, "kill").await;
    assert_eq!(s.status(), pb::JobStatus::RolledBack, "{}", s.error);
    for (dev, b) in pair.devs.iter().zip(&before) {
        let now = src.get_device(pb::GetDeviceRequest { name: dev.name.into() }).await.unwrap().into_inner();
        assert_eq!(now.state, "RUNNING");
        assert_eq!(now.content_digest, b.content_digest);
    }
}

/// Commit recorded but not delivered in time: the source is in doubt, stays stopped, and
/// ResolveJob on the source re-sends commit from its journal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_doubt_commit_is_resolved_from_the_source_journal() {
    let mut devs = vec![dev("c0", "STOP_COPY|P2P", 1 << 20)];
    // The destination takes longer to resume than the source waits for its answer.
    devs[0].dst_faults = "[[device.faults]]\nkind = \"stall\"\nop = \"set_state\"\nstate = \"RUNNING_P2P\"\nms = 3000\nnth = 2\n";
    let pair = Pair::start(&devs, "", "").ready().await;
    let (s, _) = pair.migrate("doubt", 1_500).await;
    assert_eq!(s.status(), pb::JobStatus::InDoubt, "{}", s.error);
    let mut src = pair.src.control().await;
    let device = src.get_device(pb::GetDeviceRequest { name: "c0".into() }).await.unwrap().into_inner();
    assert_ne!(device.state, "RUNNING", "a committed source must never resume");
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    let resolved = src
        .resolve_job(pb::ResolveJobRequest { job_id: "doubt".into(), decision: 0 })
        .await
        .unwrap()
        .into_inner();
    let resolved = if resolved.status() == pb::JobStatus::Succeeded {
        resolved
    } else {
        settle(&mut src, "doubt").await
    };
    assert_eq!(resolved.status(), pb::JobStatus::Succeeded, "{}", resolved.error);
    let (s_devs, d_devs) = pair.digests().await;
    assert_eq!(s_devs[0].content_digest, d_devs[0].content_digest);
    assert_eq!(d_devs[0].state, "RUNNING");
}

/// The source dies after the destination loaded: the destination holds, in doubt, and is
/// resolved "not committed" (the restarted source's journal has no commit): it resets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_in_doubt_is_resolved_not_committed() {
    let mut devs = vec![dev("n0", "STOP_COPY|P2P", 1 << 20)];
    // Loading takes a while: the source is killed meanwhile.
    devs[0].dst_faults =
        "[[device.faults]]\nkind = \"stall\"\nop = \"set_state\"\nstate = \"STOP\"\nms = 1500\nnth = 2\n";
    let mut pair = Pair::start(&devs, "", "[migration]\nphase_timeout_ms = 2000\n").ready().await;
    let (_, mut dst, _) = pair.start_job("orphan", 20_000).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let job = dst.get_job(pb::GetJobRequest { job_id: "orphan".into() }).await.unwrap().into_inner();
        if job.phase == "loading" {
            break;
        }
        assert!(Instant::now() < deadline, "destination never started loading: {job:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    pair.src.kill();
    let held = settle(&mut dst, "orphan").await;
    assert_eq!(held.status(), pb::JobStatus::InDoubt, "{}", held.error);
    let device = dst.get_device(pb::GetDeviceRequest { name: "dst-n0".into() }).await.unwrap().into_inner();
    assert_eq!(device.state, "STOP", "an in-doubt destination holds its devices stopped");
    let resolved = dst
        .resolve_job(pb::ResolveJobRequest {
            job_id: "orphan".into(),
            decision: pb::resolve_job_request::Decision::NotCommitted as i32,
        })
        .await
        .unwrap()
        .into_inner();
    let resolved =
        if resolved.status() == pb::JobStatus::InDoubt { settle(&mut dst, "orphan").await } else { resolved };
    assert_eq!(resolved.status(), pb::JobStatus::RolledBack, "{}", resolved.error);
    let device = dst.get_device(pb::GetDeviceRequest { name: "dst-n0".into() }).await.unwrap().into_inner();
    assert_eq!(device.state, "RUNNING");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_transfer_returns_the_source_to_running() {
    let mut devs = vec![dev("x0", "STOP_COPY|P2P", 32 << 20)];
    devs[0].dst_faults = "[[device.faults]]\nkind = \"stall\"\nop = \"data_write\"\nms = 100\n";
    let pair = Pair::start(&devs, "", "").ready().await;
    let (before, _) = pair.digests().await;
    let (mut src, mut dst, _) = pair.start_job("cancel", 30_000).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let job = src.get_job(pb::GetJobRequest { job_id: "cancel".into() }).await.unwrap().into_inner();
        if job.phase == "drain" {
            break;
        }
        assert!(Instant::now() < deadline, "never reached drain: {job:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    src.cancel_job(pb::CancelJobRequest { job_id: "cancel".into() }).await.unwrap();
    let s = settle(&mut src, "cancel").await;
    let d = settle(&mut dst, "cancel").await;
    assert_rolled_back(&pair, &before, &s, &d, &["cancelled"]).await;
    assert_eq!(s.status(), pb::JobStatus::Cancelled);
}
