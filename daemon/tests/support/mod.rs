//! A daemon with its listeners on temporary sockets, served in-process, and clients that
//! reach it the way vfio-migctl does: over the Unix socket.

#![allow(dead_code)]

pub mod fleet;
pub mod side;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use vfio_migd::api::{ApiError, ApiServer, Readiness};
use vfio_migd::config::Config;
use vfio_migd::device::sim::{SimDevice, SimSpec};
use vfio_migd::engine::Daemon;
use vfio_migd::fsm::Caps;
use vfio_migd::registry::{Backend, Registry};
use vfio_migd_proto::v1::control_client::ControlClient;

pub struct TestDaemon {
    pub dir: tempfile::TempDir,
    pub daemon: Arc<Daemon>,
    pub readiness: Readiness,
    pub shutdown: CancellationToken,
    pub served: Option<JoinHandle<Result<(), ApiError>>>,
    /// Where Prometheus would scrape it.
    pub metrics: SocketAddr,
}

pub fn config_in(dir: &Path) -> Config {
    let text = format!(
        "state_dir = \"{0}/state\"\n[control]\nsocket = \"{0}/run/control.sock\"\n\
         [handoff]\nsocket = \"{0}/run/handoff.sock\"\n[peer]\nlisten = \"127.0.0.1:0\"\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n[simulator]\nallow_remote = true\n",
        dir.display()
    );
    Config::from_toml(&text, false).expect("test configuration")
}

impl TestDaemon {
    /// Binds and serves; health stays NOT_SERVING until `ready()`.
    pub async fn start_not_ready() -> TestDaemon {
        TestDaemon::start_not_ready_with(|_| {}).await
    }

    /// Serving, with the test configuration changed by `edit` first.
    pub async fn start_with(edit: impl FnOnce(&mut Config)) -> TestDaemon {
        let daemon = TestDaemon::start_not_ready_with(edit).await;
        daemon.readiness.set_serving().await;
        daemon
    }

    async fn start_not_ready_with(edit: impl FnOnce(&mut Config)) -> TestDaemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = config_in(dir.path());
        edit(&mut config);
        let daemon = Daemon::new(config, Arc::new(Registry::default())).expect("daemon");
        let server = ApiServer::bind(daemon.clone()).await.expect("bind");
        let readiness = server.readiness();
        let metrics = server.metrics_addr().expect("metrics are configured").expect("metrics address");
        let shutdown = CancellationToken::new();
        let served = Some(tokio::spawn(server.run(shutdown.clone())));
        TestDaemon { dir, daemon, readiness, shutdown, served, metrics }
    }

    pub async fn start() -> TestDaemon {
        let daemon = TestDaemon::start_not_ready().await;
        daemon.readiness.set_serving().await;
        daemon
    }

    pub fn control_socket(&self) -> PathBuf {
        self.daemon.config.control.socket.clone()
    }

    pub fn handoff_socket(&self) -> PathBuf {
        self.daemon.config.handoff.socket.clone()
    }

    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("unix://{}", self.control_socket().display()))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect to the control socket")
    }

    pub async fn control(&self) -> ControlClient<Channel> {
        ControlClient::new(self.channel().await)
    }

    /// Registers a simulated device with 4 KiB of state directly (as configuration would).
    pub fn add_device(&self, name: &str, caps: Caps) {
        let mut spec = SimSpec::new(name);
        spec.caps = caps;
        spec.state_size = 4096;
        spec.model = "sim-test".into();
        let device = SimDevice::new(spec).expect("simulated device");
        self.daemon.registry.add_device(Arc::new(device), Backend::Sim).expect("add device");
    }

    pub async fn stop(mut self) -> Result<(), ApiError> {
        self.shutdown.cancel();
        self.served.take().expect("served once").await.expect("server task")
    }
}
