//! Peer security between two daemons in one process, each with its real listeners
//! (control socket, TLS peer listener) and simulated devices: certificates from a test
//! fleet CA (rcgen). A correct pair migrates; every impostor is refused before any
//! device changes state; the peer listener's connection cap holds.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use support::fleet::{Fleet, tls_toml};
use support::side::wait_finished;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use vfio_migd::api::ApiServer;
use vfio_migd::config::{Config, PeerLimits};
use vfio_migd::device::MigrationDevice;
use vfio_migd::device::sim::{SimDevice, SimSpec};
use vfio_migd::engine::Daemon;
use vfio_migd::fsm::{Caps, State};
use vfio_migd::job::{JobStatus, Phase};
use vfio_migd::registry::{Backend, Registry};
use vfio_migd::tls::{PeerTls, PeerTlsConfig};
use vfio_migd_proto::v1 as pb;
use vfio_migd_proto::v1::control_client::ControlClient;
use vfio_migd_proto::v1::peer_client::PeerClient;

struct Node {
    daemon: Arc<Daemon>,
    devices: Vec<Arc<SimDevice>>,
    peer: SocketAddr,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A daemon named `prefix` with two simulated devices (`<prefix>-nic`, `<prefix>-gpu`),
/// its peer listener on loopback, TLS when `tls` is given, `peer_extra` under `[peer]`.
async fn node(prefix: &str, tls: Option<&PeerTlsConfig>, peer_extra: &str) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "state_dir = \"{0}/state\"\n[control]\nsocket = \"{0}/control.sock\"\n\
         [handoff]\nsocket = \"{0}/handoff.sock\"\n[peer]\nlisten = \"127.0.0.1:0\"\n{peer_extra}\n{1}",
        dir.path().display(),
        tls.map(tls_toml).unwrap_or_default()
    );
    let config = Config::from_toml(&toml, false).unwrap();
    let registry = Arc::new(Registry::default());
    let mut devices = Vec::new();
    for (i, (name, caps, size)) in
        [("nic", "STOP_COPY|P2P", 3 << 20), ("gpu", "STOP_COPY|P2P", (1 << 20) + 17)].into_iter().enumerate()
    {
        let mut spec = SimSpec::new(format!("{prefix}-{name}"));
        spec.model = format!("sim-{name}");
        spec.caps = Caps::parse(caps).unwrap();
        spec.state_size = size;
        spec.seed = Some(7 + i as u64 + prefix.len() as u64);
        let device = Arc::new(SimDevice::with_iommu(spec, registry.sim_iommu()).unwrap());
        registry.add_device(device.clone() as Arc<dyn MigrationDevice>, Backend::Sim).unwrap();
        devices.push(device);
    }
    let daemon = Daemon::new(config, registry).unwrap();
    let server = ApiServer::bind(daemon.clone()).await.unwrap();
    let peer = server.peer_addr().unwrap();
    server.readiness().set_serving().await;
    let shutdown = CancellationToken::new();
    tokio::spawn(server.run(shutdown.clone()));
    Node { daemon, devices, peer, shutdown, _dir: dir }
}

impl Node {
    async fn control(&self) -> ControlClient<Channel> {
        let socket = self.daemon.config.control.socket.display().to_string();
        ControlClient::new(
            Endpoint::from_shared(format!("unix://{socket}")).unwrap().connect().await.unwrap(),
        )
    }

    fn names(&self) -> Vec<String> {
        self.devices.iter().map(|d| d.name().to_owned()).collect()
    }

    /// No device of this node has walked a single arc.
    fn untouched(&self) -> bool {
        self.devices.iter().all(|d| d.arcs().is_empty() && d.state().unwrap() == State::Running)
    }
}

/// Prepares `job_id` on `dst` (expecting `source_identity`), then starts it on `src`
/// (expecting `destination_identity`), over the control API, and waits for the source.
async fn migrate(
    src: &Node,
    dst: &Node,
    job_id: &str,
    source_identity: &str,
    destination_identity: &str,
) -> vfio_migd::job::JobSnapshot {
    let mut dst_control = dst.control().await;
    if dst.daemon.job(job_id).is_err() {
        dst_control
            .prepare_incoming(pb::PrepareIncomingRequest {
                job_id: job_id.into(),
                devices: dst.names(),
                expected_source_identity: source_identity.into(),
            })
            .await
            .unwrap();
    }
    let mut src_control = src.control().await;
    if src.daemon.registry.group("vm").is_err() {
        src_control
            .define_group(pb::DefineGroupRequest {
                name: "vm".into(),
                devices: src.names(),
                allow_multiple_non_p2p: false,
            })
            .await
            .unwrap();
    }
    src_control
        .start_migration(pb::StartMigrationRequest {
            job_id: job_id.into(),
            group: "vm".into(),
            peer: dst.peer.to_string(),
            mapping: src
                .names()
                .into_iter()
                .zip(dst.names())
                .map(|(source, destination)| pb::DeviceMapping { source, destination })
                .collect(),
            phase_timeout_ms: 20_000,
            data_connections: 2,
            expected_destination_identity: destination_identity.into(),
        })
        .await
        .unwrap();
    wait_finished(&src.daemon, job_id).await
}

/// The destination's job is exactly as PrepareIncoming left it.
fn still_prepared(dst: &Node, job_id: &str) {
    let snap = dst.daemon.job(job_id).unwrap().snapshot();
    assert_eq!((snap.status, snap.phase), (JobStatus::Running, Phase::Prepared), "{job_id}: {snap:?}");
    assert!(dst.untouched(), "{job_id}: a destination device changed state");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_correct_pair_migrates_over_mutual_tls() {
    let fleet = Fleet::new("fleet");
    let src = node("src", Some(&fleet.member("a", &["node-a.fleet"])), "").await;
    let dst = node("dst", Some(&fleet.member("b", &["node-b.fleet", "127.0.0.1"])), "").await;
    let snap = migrate(&src, &dst, "job-tls", "node-a.fleet", "node-b.fleet").await;
    assert_eq!(snap.status, JobStatus::Succeeded, "{:?}", snap.error);
    let d = wait_finished(&dst.daemon, "job-tls").await;
    assert_eq!(d.status, JobStatus::Succeeded, "{:?}", d.error);
    for (s, d) in src.devices.iter().zip(&dst.devices) {
        assert_eq!(d.state().unwrap(), State::Running, "{}", d.name());
        assert_eq!(d.content_digest(), s.content_digest(), "{} -> {} byte for byte", s.name(), d.name());
        assert_eq!(d.loaded_state(), Some(s.state_id()));
    }

    // Without an explicit identity the destination is checked against the host of
    // --peer (its certificate carries 127.0.0.1), and the job binds to the source whose
    // handshake was accepted.
    let back = node("back", Some(&fleet.member("a2", &["node-a.fleet"])), "").await;
    let snap = migrate(&back, &dst, "job-tls-2", "", "").await;
    assert_eq!(snap.status, JobStatus::Succeeded, "{:?}", snap.error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn impostors_are_refused_before_any_device_changes_state() {
    let fleet = Fleet::new("fleet");
    let stranger = Fleet::new("other fleet");
    let cases: [(&str, Option<PeerTlsConfig>, &str); 5] = [
        ("unknown-ca", Some(stranger.member("a", &["node-a.fleet"])), "node-b.fleet"),
        ("expired", Some(fleet.expired_member("a-old", &["node-a.fleet"])), "node-b.fleet"),
        ("wrong-source-san", Some(fleet.member("c", &["node-c.fleet"])), "node-b.fleet"),
        ("wrong-destination-san", Some(fleet.member("a", &["node-a.fleet"])), "node-z.fleet"),
        ("plaintext", None, "node-b.fleet"),
    ];
    for (case, tls, destination_identity) in cases {
        let dst = node("dst", Some(&fleet.member("b", &["node-b.fleet"])), "").await;
        let src = node(case, tls.as_ref(), "").await;
        let job_id = format!("job-{case}");
        let snap = migrate(&src, &dst, &job_id, "node-a.fleet", destination_identity).await;
        assert_eq!(snap.status, JobStatus::RolledBack, "{case}: {snap:?}");
        let error = snap.error.unwrap_or_default();
        assert!(!error.is_empty(), "{case}: the source must say why");
        assert!(src.devices.iter().all(|d| d.state().unwrap() == State::Running), "{case}: source runs");
        still_prepared(&dst, &job_id);
        if case == "wrong-source-san" {
            assert!(error.contains("node-a.fleet"), "{case}: names the expected source: {error}");
        }
    }
}

/// A peer client with `tls` to `node`, whose certificate must carry `name`.
async fn peer_client(tls: &PeerTlsConfig, node: &Node, name: &str) -> PeerClient<Channel> {
    let holder = PeerTls::load(tls).unwrap();
    let channel = vfio_migd::tls::peer_channel(
        Some(&holder),
        &node.peer.to_string(),
        name,
        &PeerLimits::default(),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    PeerClient::new(channel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fleet_member_that_is_not_the_jobs_source_is_denied_and_changes_nothing() {
    let fleet = Fleet::new("fleet");
    let dst = node("dst", Some(&fleet.member("b", &["node-b.fleet"])), "").await;
    dst.control()
        .await
        .prepare_incoming(pb::PrepareIncomingRequest {
            job_id: "job-3".into(),
            devices: dst.names(),
            expected_source_identity: "node-a.fleet".into(),
        })
        .await
        .unwrap();
    let third = fleet.member("c", &["node-c.fleet"]);
    let mut client = peer_client(&third, &dst, "node-b.fleet").await;
    let job_id = || "job-3".to_string();
    let handshake = pb::HandshakeRequest {
        protocol_version: vfio_migd::engine::destination::PROTOCOL_VERSION,
        job_id: job_id(),
        devices: dst
            .names()
            .iter()
            .enumerate()
            .map(|(i, name)| pb::HandshakeDevice {
                index: i as u32,
                source_name: format!("evil-{i}"),
                destination_name: name.clone(),
                caps: Caps::parse("STOP_COPY|P2P").unwrap().bits(),
                data_size: 4096,
                identity: None,
            })
            .collect(),
        data_connections: 1,
        max_frame_payload: 1 << 20,
        source_peer: "127.0.0.1:1".into(),
    };
    let denied = [
        ("Handshake", client.handshake(handshake).await.map(drop)),
        ("AwaitLoaded", client.await_loaded(pb::AwaitLoadedRequest { job_id: job_id() }).await.map(drop)),
        ("Commit", client.commit(pb::CommitRequest { job_id: job_id() }).await.map(drop)),
        ("Abort", client.abort(pb::AbortRequest { job_id: job_id(), reason: "x".into() }).await.map(drop)),
        ("QueryJob", client.query_job(pb::QueryJobRequest { job_id: job_id() }).await.map(drop)),
    ];
    for (call, result) in denied {
        let status = result.expect_err(call);
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{call}: {status:?}");
        assert!(status.message().contains("node-a.fleet"), "{call}: {}", status.message());
    }
    still_prepared(&dst, "job-3");

    // The real source still migrates the job that was attacked.
    let src = node("src", Some(&fleet.member("a", &["node-a.fleet"])), "").await;
    let snap = migrate(&src, &dst, "job-3", "node-a.fleet", "node-b.fleet").await;
    assert_eq!(snap.status, JobStatus::Succeeded, "{:?}", snap.error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_applies_to_new_connections() {
    let fleet = Fleet::new("fleet");
    let next = Fleet::new("next fleet");
    let b = fleet.member("b", &["node-b.fleet"]);
    let dst = node("dst", Some(&b), "").await;
    let a = fleet.member("a", &["node-a.fleet"]);
    let mut before = peer_client(&a, &dst, "node-b.fleet").await;
    before.query_job(pb::QueryJobRequest { job_id: "none".into() }).await.unwrap();

    // The destination moves to the next fleet's CA and certificate: an old-fleet client
    // can no longer connect, the connection it already had keeps working, and a
    // next-fleet client is accepted.
    let old_fleet_client = PeerTls::load(&a).unwrap();
    let b2 = next.member("b", &["node-b.fleet"]);
    for (from, to) in [(&b2.cert, &b.cert), (&b2.key, &b.key), (&b2.ca, &b.ca)] {
        std::fs::copy(from, to).unwrap();
    }
    dst.daemon.tls.as_ref().unwrap().reload().unwrap();
    let refused = vfio_migd::tls::peer_channel(
        Some(&old_fleet_client),
        &dst.peer.to_string(),
        "node-b.fleet",
        &PeerLimits::default(),
        Duration::from_secs(5),
    )
    .await;
    assert!(refused.is_err(), "the old fleet's client must be refused after the reload");
    before.query_job(pb::QueryJobRequest { job_id: "none".into() }).await.unwrap();
    let mut after = peer_client(&next.member("a", &["node-a.fleet"]), &dst, "node-b.fleet").await;
    after.query_job(pb::QueryJobRequest { job_id: "none".into() }).await.unwrap();
}

/// Whether the server closed `socket` (EOF or reset) rather than keeping it open.
fn closed_by_server(socket: &mut std::net::TcpStream) -> bool {
    use std::io::Read;
    socket.set_nonblocking(true).unwrap();
    // An open HTTP/2 connection has the server's SETTINGS to read, or nothing yet.
    let mut buf = [0u8; 256];
    match socket.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_connections_beyond_the_cap_are_closed() {
    let node = node("dst", None, "[peer.limits]\nmax_connections = 256\n").await;
    let peer = node.peer;
    let mut sockets = tokio::task::spawn_blocking(move || {
        (0..3000).map(|_| std::net::TcpStream::connect(peer).unwrap()).collect::<Vec<_>>()
    })
    .await
    .unwrap();
    // The listener closes what is over the cap as fast as it accepts.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let open = loop {
        let open = sockets.iter_mut().map(closed_by_server).filter(|closed| !closed).count();
        if open <= 256 || tokio::time::Instant::now() > deadline {
            break open;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(open <= 256, "{open} idle connections kept open, the cap is 256");
    assert!(open > 0, "connections within the cap are served");
    // Once the idle clients leave, the listener serves again.
    drop(sockets);
    let endpoint = Endpoint::from_shared(format!("http://{peer}")).unwrap();
    let mut client = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Ok(channel) = endpoint.connect().await {
                let mut client = PeerClient::new(channel);
                if client.query_job(pb::QueryJobRequest { job_id: "none".into() }).await.is_ok() {
                    return client;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the listener serves again once the idle connections are gone");
    client.query_job(pb::QueryJobRequest { job_id: "none".into() }).await.unwrap();
}
