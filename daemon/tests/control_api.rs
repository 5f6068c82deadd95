//! The control API over its real Unix socket: devices, groups, plans, jobs, health,
//! reflection, status codes, and a clean shutdown.

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use support::TestDaemon;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use vfio_migd::fsm::Caps;
use vfio_migd::job::{Job, JobStatus, Phase, Role};
use vfio_migd_proto::v1 as pb;

const P2P: Caps = Caps::MIGRATABLE[1];
const NO_P2P: Caps = Caps::STOP_COPY;

async fn health_of(daemon: &TestDaemon, service: &str) -> ServingStatus {
    HealthClient::new(daemon.channel().await)
        .check(HealthCheckRequest { service: service.into() })
        .await
        .expect("health check")
        .into_inner()
        .status()
}

#[tokio::test]
async fn health_is_not_serving_until_ready_then_serving() {
    let daemon = TestDaemon::start_not_ready().await;
    assert_eq!(health_of(&daemon, "").await, ServingStatus::NotServing);
    assert_eq!(health_of(&daemon, "vfio_migd.v1.Control").await, ServingStatus::NotServing);
    daemon.readiness.set_serving().await;
    assert_eq!(health_of(&daemon, "").await, ServingStatus::Serving);
    assert_eq!(health_of(&daemon, "vfio_migd.v1.Control").await, ServingStatus::Serving);
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn reflection_lists_what_the_control_socket_serves() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

    let daemon = TestDaemon::start().await;
    let mut client = ServerReflectionClient::new(daemon.channel().await);
    let ask = |request| ServerReflectionRequest { host: String::new(), message_request: Some(request) };
    let requests = vec![
        ask(MessageRequest::ListServices(String::new())),
        ask(MessageRequest::FileContainingSymbol("vfio_migd.v1.Control".into())),
    ];
    let mut responses =
        client.server_reflection_info(tokio_stream::iter(requests)).await.unwrap().into_inner();
    let first: ServerReflectionResponse = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else {
        panic!("expected a service list");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "vfio_migd.v1.Control",
        ]
    );
    let second: ServerReflectionResponse = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::FileDescriptorResponse(files)) = second.message_response else {
        panic!("expected the file declaring Control");
    };
    assert!(!files.file_descriptor_proto.is_empty());
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn devices_are_listed_shown_and_released() {
    let daemon = TestDaemon::start().await;
    daemon.add_device("nic0", P2P);
    daemon.add_device("gpu0", Caps::MIGRATABLE[3]);
    let mut control = daemon.control().await;

    let list = control.list_devices(pb::ListDevicesRequest {}).await.unwrap().into_inner().devices;
    let names: Vec<&str> = list.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["gpu0", "nic0"]);
    let nic = &list[1];
    assert_eq!(nic.caps, "STOP_COPY|P2P");
    assert_eq!(nic.state, "RUNNING");
    assert_eq!(nic.backend, "sim");
    assert!(nic.data_size >= 4096, "the stream carries the state and its framing");
    let identity = nic.identity.as_ref().unwrap();
    assert_eq!((identity.driver.as_str(), identity.model.as_str()), ("sim", "sim-test"));
    assert!(nic.content_digest.contains("crc32c="), "a simulated device digests its state: {nic:?}");
    assert_eq!(list[0].caps, "STOP_COPY|P2P|PRE_COPY");

    let shown = control.get_device(pb::GetDeviceRequest { name: "nic0".into() }).await.unwrap().into_inner();
    assert_eq!(&shown, nic);

    control.release_device(pb::ReleaseDeviceRequest { name: "nic0".into() }).await.unwrap();
    let err = control.get_device(pb::GetDeviceRequest { name: "nic0".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("`nic0`"), "{}", err.message());
    let err = control.release_device(pb::ReleaseDeviceRequest { name: "nic0".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn register_refuses_bad_requests_with_precise_codes() {
    use pb::register_device_request::Source;
    let daemon = TestDaemon::start().await;
    daemon.add_device("nic0", P2P);
    let mut control = daemon.control().await;
    let register = |name: &str, source| pb::RegisterDeviceRequest { name: name.into(), source };

    let err = control.register_device(register("x", None)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("sysfs_device"), "{}", err.message());

    let err = control.register_device(register("", Some(Source::SysfsDevice("0000:01:00.0".into())))).await;
    assert_eq!(err.unwrap_err().code(), Code::InvalidArgument);

    let err = control
        .register_device(register("nic0", Some(Source::CdevPath("/dev/vfio/devices/vfio0".into()))))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("already registered"), "{}", err.message());

    let missing = daemon.dir.path().join("no-such-vfio-cdev");
    let err = control
        .register_device(register("nic1", Some(Source::CdevPath(missing.display().to_string()))))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message().contains("nic1") && err.message().contains("no-such-vfio-cdev"),
        "{}",
        err.message()
    );

    let bad_caps =
        pb::SimulatedDeviceSpec { model: "m".into(), state_size: 4096, seed: 1, caps: "WARP".into() };
    let err = control.register_device(register("sim0", Some(Source::Simulated(bad_caps)))).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("WARP"), "{}", err.message());
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn groups_are_defined_shown_listed_and_deleted() {
    let daemon = TestDaemon::start().await;
    for name in ["nic0", "gpu0", "nvme0"] {
        daemon.add_device(name, P2P);
    }
    let mut control = daemon.control().await;
    let define = |name: &str, devices: &[&str]| pb::DefineGroupRequest {
        name: name.into(),
        devices: devices.iter().map(|d| d.to_string()).collect(),
        allow_multiple_non_p2p: false,
    };

    let vm1 = control.define_group(define("vm1", &["nic0", "gpu0"])).await.unwrap().into_inner();
    assert_eq!(vm1.devices, ["nic0", "gpu0"]);
    let shown = control.get_group(pb::GetGroupRequest { name: "vm1".into() }).await.unwrap().into_inner();
    assert_eq!(shown, vm1);

    let device = control.get_device(pb::GetDeviceRequest { name: "gpu0".into() }).await.unwrap().into_inner();
    assert_eq!(device.group, "vm1");

    let cases = [
        (define("vm1", &["nvme0"]), Code::InvalidArgument, "already defined"),
        (define("vm2", &["nic0"]), Code::FailedPrecondition, "belongs to group `vm1`"),
        (define("vm2", &["ghost"]), Code::NotFound, "`ghost`"),
        (define("vm2", &[]), Code::InvalidArgument, "no devices"),
        (define("vm2", &["nvme0", "nvme0"]), Code::InvalidArgument, "listed twice"),
        (define("", &["nvme0"]), Code::InvalidArgument, "`name`"),
    ];
    for (request, code, text) in cases {
        let err = control.define_group(request.clone()).await.unwrap_err();
        assert_eq!(err.code(), code, "{request:?}: {}", err.message());
        assert!(err.message().contains(text), "{request:?}: {}", err.message());
    }

    let err = control.release_device(pb::ReleaseDeviceRequest { name: "nic0".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    let groups = control.list_groups(pb::ListGroupsRequest {}).await.unwrap().into_inner().groups;
    assert_eq!(groups, [vm1]);
    control.delete_group(pb::DeleteGroupRequest { name: "vm1".into() }).await.unwrap();
    let err = control.get_group(pb::GetGroupRequest { name: "vm1".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = control.delete_group(pb::DeleteGroupRequest { name: "vm1".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn plans_follow_capabilities_and_refuse_unsafe_groups() {
    let daemon = TestDaemon::start().await;
    daemon.add_device("nic0", P2P);
    daemon.add_device("gpu0", Caps::MIGRATABLE[3]);
    daemon.add_device("uart0", NO_P2P);
    daemon.add_device("uart1", NO_P2P);
    daemon.add_device("dumb0", Caps::default());
    let mut control = daemon.control().await;
    let define = |name: &str, devices: &[&str], allow| pb::DefineGroupRequest {
        name: name.into(),
        devices: devices.iter().map(|d| d.to_string()).collect(),
        allow_multiple_non_p2p: allow,
    };
    let plan = |group: &str| pb::PlanMigrationRequest { group: group.into() };

    control.define_group(define("vm1", &["nic0", "gpu0", "uart0"], false)).await.unwrap();
    let vm1 = control.plan_migration(plan("vm1")).await.unwrap().into_inner();
    assert_eq!(vm1.group, "vm1");
    assert_eq!(vm1.total_data_size, vm1.devices.iter().map(|d| d.data_size).sum::<u64>());
    let orders: Vec<(&str, &str, bool)> =
        vm1.devices.iter().map(|d| (d.name.as_str(), d.stop_order.as_str(), d.pre_copy)).collect();
    assert_eq!(
        orders,
        [
            ("nic0", "p2p-quiesce", false),
            ("gpu0", "p2p-quiesce", true),
            ("uart0", "stop-after-barrier", false)
        ]
    );
    assert!(vm1.steps.iter().any(|s| s.starts_with("p2p barrier")), "{:?}", vm1.steps);

    control.define_group(define("vm2", &["uart1", "dumb0"], false)).await.unwrap();
    let err = control.plan_migration(plan("vm2")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("dumb0") && err.message().contains("unsupported"), "{}", err.message());

    control.delete_group(pb::DeleteGroupRequest { name: "vm1".into() }).await.unwrap();
    control.delete_group(pb::DeleteGroupRequest { name: "vm2".into() }).await.unwrap();
    control.define_group(define("vm3", &["uart0", "uart1"], false)).await.unwrap();
    let err = control.plan_migration(plan("vm3")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("uart0") && err.message().contains("uart1"), "{}", err.message());
    control.delete_group(pb::DeleteGroupRequest { name: "vm3".into() }).await.unwrap();
    control.define_group(define("vm3", &["uart0", "uart1"], true)).await.unwrap();
    let vm3 = control.plan_migration(plan("vm3")).await.unwrap().into_inner();
    assert!(vm3.devices.iter().all(|d| d.stop_order == "stop-after-barrier"));

    let err = control.plan_migration(plan("vm9")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("`vm9`"), "{}", err.message());
    let err = control.plan_migration(plan("")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn job_requests_are_validated_before_the_engine() {
    let daemon = TestDaemon::start().await;
    let mut control = daemon.control().await;
    let start = pb::StartMigrationRequest {
        job_id: "j1".into(),
        group: "vm1".into(),
        peer: "127.0.0.1:7410".into(),
        mapping: vec![pb::DeviceMapping { source: "a".into(), destination: "b".into() }],
        phase_timeout_ms: 0,
        data_connections: 0,
        ..Default::default()
    };
    for (request, field) in [
        (pb::StartMigrationRequest { job_id: String::new(), ..start.clone() }, "job_id"),
        (pb::StartMigrationRequest { group: String::new(), ..start.clone() }, "group"),
        (pb::StartMigrationRequest { peer: " ".into(), ..start.clone() }, "peer"),
        (pb::StartMigrationRequest { mapping: vec![], ..start.clone() }, "mapping"),
    ] {
        let err = control.start_migration(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(field), "{}", err.message());
    }
    let err = control
        .prepare_incoming(pb::PrepareIncomingRequest { job_id: "j1".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let err = control.get_job(pb::GetJobRequest { job_id: "nope".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = control.cancel_job(pb::CancelJobRequest { job_id: "nope".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = control.watch_job(pb::WatchJobRequest { job_id: "nope".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err =
        control.resolve_job(pb::ResolveJobRequest { job_id: "j1".into(), decision: 7 }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn dirty_tracking_of_an_unknown_group_is_not_found() {
    let daemon = TestDaemon::start().await;
    let mut control = daemon.control().await;
    let err = control.get_dirty_pages(pb::GetDirtyPagesRequest { group: "vm1".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("vm1"), "{}", err.message());
    daemon.stop().await.unwrap();
}

fn insert_job(daemon: &TestDaemon, id: &str) -> Arc<Job> {
    let job = Job::new(id, Role::Source, "vm1", "10.0.0.2:7410", vec![("nic0".into(), "nic9".into())]);
    let (job, fresh) = daemon.daemon.jobs.insert_or_get(job);
    assert!(fresh);
    job
}

#[tokio::test]
async fn jobs_are_listed_watched_to_their_end_and_cancelled() {
    let daemon = TestDaemon::start().await;
    let mut control = daemon.control().await;
    let job = insert_job(&daemon, "j1");
    job.enter_phase(Phase::Handshake);

    let listed = control.list_jobs(pb::ListJobsRequest {}).await.unwrap().into_inner().jobs;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].phase, "handshake");
    assert_eq!(listed[0].status(), pb::JobStatus::Running);

    let mut watch =
        control.watch_job(pb::WatchJobRequest { job_id: "j1".into() }).await.unwrap().into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.phase, "handshake");

    let driver = {
        let job = job.clone();
        tokio::spawn(async move {
            job.enter_phase(Phase::Drain);
            let counters = job.counters("nic0").unwrap();
            counters.bytes_total.store(1 << 20, Ordering::Relaxed);
            for _ in 0..8 {
                counters.bytes_done.fetch_add(128 << 10, Ordering::Relaxed);
                job.touch();
                tokio::task::yield_now().await;
            }
            job.enter_phase(Phase::Commit);
            job.finish(JobStatus::Succeeded, None);
        })
    };
    let mut seen = vec![first];
    while let Some(snapshot) = watch.message().await.unwrap() {
        seen.push(snapshot);
    }
    driver.await.unwrap();
    let last = seen.last().unwrap();
    assert_eq!(last.status(), pb::JobStatus::Succeeded, "the final snapshot always arrives");
    assert_eq!(last.bytes_done, 1 << 20);
    assert_eq!(last.devices[0].peer_name, "nic9");
    let phases: Vec<&str> = last.phases.iter().map(|p| p.phase.as_str()).collect();
    assert_eq!(phases, ["handshake", "drain", "commit"]);
    assert!(seen.iter().filter(|s| s.status() == pb::JobStatus::Succeeded).count() == 1);

    // A finished job streams exactly its final snapshot.
    let mut again =
        control.watch_job(pb::WatchJobRequest { job_id: "j1".into() }).await.unwrap().into_inner();
    assert_eq!(again.message().await.unwrap().unwrap().status(), pb::JobStatus::Succeeded);
    assert!(again.message().await.unwrap().is_none());

    let err = control.cancel_job(pb::CancelJobRequest { job_id: "j1".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    let running = insert_job(&daemon, "j2");
    running.enter_phase(Phase::PreCopy);
    let cancelled =
        control.cancel_job(pb::CancelJobRequest { job_id: "j2".into() }).await.unwrap().into_inner();
    assert_eq!(cancelled.job_id, "j2");
    assert!(running.cancel.is_cancelled(), "the engine task sees the cancellation");

    let past_commit = insert_job(&daemon, "j3");
    past_commit.enter_phase(Phase::Commit);
    let err = control.cancel_job(pb::CancelJobRequest { job_id: "j3".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("commit"), "{}", err.message());
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn shutdown_ends_watches_and_removes_the_sockets() {
    let daemon = TestDaemon::start().await;
    let control_socket = daemon.control_socket();
    let handoff_socket = daemon.handoff_socket();
    assert!(control_socket.exists() && handoff_socket.exists());
    let mode = std::fs::metadata(&control_socket).unwrap();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777, 0o660);

    insert_job(&daemon, "j1").enter_phase(Phase::Drain);
    let mut control = daemon.control().await;
    let mut watch =
        control.watch_job(pb::WatchJobRequest { job_id: "j1".into() }).await.unwrap().into_inner();
    watch.message().await.unwrap().unwrap();

    daemon.shutdown.cancel();
    let end = loop {
        match watch.message().await {
            Ok(Some(_)) => continue,
            other => break other,
        }
    };
    if let Err(status) = end {
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    daemon.stop().await.unwrap();
    assert!(!control_socket.exists(), "control socket removed on exit");
    assert!(!handoff_socket.exists(), "handoff socket removed on exit");
}

#[tokio::test]
async fn a_stale_socket_is_replaced_but_another_file_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let config = support::config_in(dir.path());
    std::fs::create_dir_all(config.control.socket.parent().unwrap()).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&config.control.socket).unwrap());
    assert!(config.control.socket.exists(), "a stale socket file is left behind");
    let daemon = vfio_migd::engine::Daemon::new(config.clone(), Default::default()).unwrap();
    let server = vfio_migd::api::ApiServer::bind(daemon).await.expect("stale socket replaced");
    drop(server);

    std::fs::remove_file(&config.handoff.socket).ok();
    std::fs::write(&config.handoff.socket, b"not a socket").unwrap();
    let daemon = vfio_migd::engine::Daemon::new(config.clone(), Default::default()).unwrap();
    let err = vfio_migd::api::ApiServer::bind(daemon).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("handoff") && text.contains("not a socket"), "{text}");
    assert_eq!(std::fs::read(&config.handoff.socket).unwrap(), b"not a socket");
}

#[tokio::test]
async fn simulated_devices_register_through_the_api() {
    use pb::register_device_request::Source;
    let daemon = TestDaemon::start().await;
    let mut control = daemon.control().await;
    let spec = pb::SimulatedDeviceSpec {
        model: "sim-nic".into(),
        state_size: 65536,
        seed: 3,
        caps: "STOP_COPY|P2P".into(),
    };
    let nic = control
        .register_device(pb::RegisterDeviceRequest {
            name: "nic0".into(),
            source: Some(Source::Simulated(spec)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (nic.backend.as_str(), nic.caps.as_str(), nic.state.as_str()),
        ("sim", "STOP_COPY|P2P", "RUNNING")
    );
    assert_eq!(nic.identity.unwrap().model, "sim-nic");
    assert!(nic.data_size >= 65536);

    let defaults = control
        .register_device(pb::RegisterDeviceRequest {
            name: "gpu0".into(),
            source: Some(Source::Simulated(pb::SimulatedDeviceSpec::default())),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(defaults.caps, "STOP_COPY|P2P|PRE_COPY");
    assert_eq!(defaults.identity.unwrap().model, "sim");

    let listed = control.list_devices(pb::ListDevicesRequest {}).await.unwrap().into_inner().devices;
    assert_eq!(listed.len(), 2);
    control.release_device(pb::ReleaseDeviceRequest { name: "nic0".into() }).await.unwrap();
    let listed = control.list_devices(pb::ListDevicesRequest {}).await.unwrap().into_inner().devices;
    assert_eq!(listed.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(), ["gpu0"]);
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn a_draining_daemon_refuses_new_jobs_but_answers_queries() {
    let daemon = TestDaemon::start().await;
    daemon.add_device("nic0", P2P);
    let mut control = daemon.control().await;
    daemon.readiness.drain().await;
    assert_eq!(health_of(&daemon, "").await, ServingStatus::NotServing);
    let err = control
        .prepare_incoming(pb::PrepareIncomingRequest {
            job_id: "j1".into(),
            devices: vec!["nic0".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("shutting down") && err.message().contains("j1"), "{}", err.message());
    let devices = control.list_devices(pb::ListDevicesRequest {}).await.unwrap().into_inner().devices;
    assert_eq!(devices.len(), 1);
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn stopping_waits_for_jobs_then_cancels_those_before_commit() {
    use std::time::Duration;
    use vfio_migd::api::drain_jobs;
    let daemon = TestDaemon::start().await;
    let engine = daemon.daemon.clone();
    assert_eq!(drain_jobs(&engine, Duration::from_secs(30), Duration::from_secs(30)).await, 0);

    // A job that ends on its own is waited for.
    let finishing = insert_job(&daemon, "finishing");
    finishing.enter_phase(Phase::Drain);
    let ender = tokio::spawn(async move { finishing.finish(JobStatus::Succeeded, None) });
    assert_eq!(drain_jobs(&engine, Duration::from_secs(30), Duration::from_secs(30)).await, 0);
    ender.await.unwrap();

    // A job that would not end is cancelled, and its engine rolls it back.
    let stuck = insert_job(&daemon, "stuck");
    stuck.enter_phase(Phase::PreCopy);
    let engine_task = {
        let job = stuck.clone();
        tokio::spawn(async move {
            job.cancel.cancelled().await;
            job.enter_phase(Phase::Rollback);
            job.finish(JobStatus::Cancelled, Some("cancelled: the daemon is stopping".into()));
        })
    };
    let in_doubt = insert_job(&daemon, "in-doubt");
    in_doubt.finish(JobStatus::InDoubt, Some("link lost after loaded".into()));
    assert_eq!(drain_jobs(&engine, Duration::from_millis(10), Duration::from_secs(30)).await, 0);
    engine_task.await.unwrap();
    assert_eq!(stuck.snapshot().status, JobStatus::Cancelled);

    // Past its commit point a job cannot be cancelled: the stop reports it.
    let committing = insert_job(&daemon, "committing");
    committing.enter_phase(Phase::Commit);
    assert_eq!(drain_jobs(&engine, Duration::from_millis(10), Duration::from_millis(10)).await, 1);
    assert!(!committing.cancel.is_cancelled());
    daemon.stop().await.unwrap();
}

/// One HTTP/1.1 exchange on a fresh connection: the status line, headers and body.
async fn http(addr: std::net::SocketAddr, method: &str, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect to the metrics listener");
    let request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("a header and a body");
    (head.to_owned(), body.to_owned())
}

#[tokio::test]
async fn metrics_are_served_over_http_for_prometheus() {
    let daemon = TestDaemon::start().await;
    daemon.add_device("nic0", P2P);
    daemon.add_device("nic1", P2P);
    insert_job(&daemon, "running-1");

    let (head, body) = http(daemon.metrics, "GET", "/metrics").await;
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    for expected in [
        "vfio_migd_devices{backend=\"sim\"} 2\n",
        "vfio_migd_jobs{role=\"source\",status=\"running\"} 1\n",
        "# TYPE vfio_migd_downtime_seconds histogram\n",
        &format!("vfio_migd_build_info{{version=\"{}\"}} 1\n", env!("CARGO_PKG_VERSION")),
    ] {
        assert!(body.contains(expected), "missing `{expected}` in:\n{body}");
    }
    promtool_check_metrics(&body);
    let (head, _) = http(daemon.metrics, "GET", "/").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    let (head, _) = http(daemon.metrics, "POST", "/metrics").await;
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
    assert!(head.to_ascii_lowercase().contains("allow: get, head"), "{head}");

    let metrics = daemon.metrics;
    daemon.stop().await.unwrap();
    assert!(tokio::net::TcpStream::connect(metrics).await.is_err(), "the listener closes with the daemon");
}

#[tokio::test]
async fn simulated_devices_over_the_api_need_allow_remote_and_fit_the_bound() {
    use pb::register_device_request::Source;
    let register = |state_size| pb::RegisterDeviceRequest {
        name: "sim0".into(),
        source: Some(Source::Simulated(pb::SimulatedDeviceSpec { state_size, ..Default::default() })),
    };
    let closed = TestDaemon::start_with(|config| config.simulator.allow_remote = false).await;
    let err = closed.control().await.register_device(register(4096)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("allow_remote = true"), "{}", err.message());
    assert!(closed.daemon.registry.device("sim0").is_err());
    closed.stop().await.unwrap();

    let bounded = TestDaemon::start_with(|config| config.simulator.max_state_size = 1 << 20).await;
    let mut control = bounded.control().await;
    // 1024 TiB once aborted the daemon on allocation; now it is refused up front.
    let err = control.register_device(register(1 << 50)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("max_state_size"), "{}", err.message());
    control.register_device(register(1 << 20)).await.unwrap();
    bounded.stop().await.unwrap();
}

/// `promtool check metrics` (Debian package `prometheus`) on a scrape: the format and
/// Prometheus' naming lints (counters end in `_total`, units in names). Skipped where
/// promtool is not installed, except in CI (`CI=true`), whose `.ci/run` installs it.
fn promtool_check_metrics(scrape: &str) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let spawned = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "promtool is missing in CI: .ci/run installs it (apt-get install prometheus)"
            );
            eprintln!(
                "SKIPPED promtool check: promtool is not installed (Debian: apt-get install prometheus)"
            );
            return;
        }
        Err(e) => panic!("cannot run promtool: {e}"),
    };
    child.stdin.take().unwrap().write_all(scrape.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics refused the scrape:\n{}{}\n{scrape}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
