//! A daemon with its listeners on temporary sockets, served in-process, and clients that
//! reach it the way vfio-migctl does: over the Unix socket.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use vfio_migd::api::{ApiError, ApiServer, Readiness};
use vfio_migd::config::Config;
use vfio_migd::device::{
    DataFd, DeviceError, DeviceIdentity, IovaRange, MigrationDevice, Op, PrecopyInfo, plan_set,
};
use vfio_migd::engine::Daemon;
use vfio_migd::fsm::{Caps, State};
use vfio_migd::registry::{Backend, Registry};
use vfio_migd_proto::v1::control_client::ControlClient;

pub struct TestDaemon {
    pub dir: tempfile::TempDir,
    pub daemon: Arc<Daemon>,
    pub readiness: Readiness,
    pub shutdown: CancellationToken,
    pub served: Option<JoinHandle<Result<(), ApiError>>>,
}

pub fn config_in(dir: &Path) -> Config {
    let text = format!(
        "state_dir = \"{0}/state\"\n[control]\nsocket = \"{0}/run/control.sock\"\n\
         [handoff]\nsocket = \"{0}/run/handoff.sock\"\n[peer]\nlisten = \"127.0.0.1:0\"\n",
        dir.display()
    );
    Config::from_toml(&text, false).expect("test configuration")
}

impl TestDaemon {
    /// Binds and serves; health stays NOT_SERVING until `ready()`.
    pub async fn start_not_ready() -> TestDaemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let daemon = Daemon::new(config_in(dir.path()), Arc::new(Registry::default())).expect("daemon");
        let server = ApiServer::bind(daemon.clone()).await.expect("bind");
        let readiness = server.readiness();
        let shutdown = CancellationToken::new();
        let served = Some(tokio::spawn(server.run(shutdown.clone())));
        TestDaemon { dir, daemon, readiness, shutdown, served }
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

    pub fn add_device(&self, name: &str, caps: Caps) {
        self.daemon
            .registry
            .add_device(Arc::new(TestDevice::new(name, caps, 4096)), Backend::Sim)
            .expect("add device");
    }

    pub async fn stop(mut self) -> Result<(), ApiError> {
        self.shutdown.cancel();
        self.served.take().expect("served once").await.expect("server task")
    }
}

/// A device that answers the queries the API makes (caps, state, data size) and walks
/// the kernel FSM on SET; it has no migration data (tests here never stream).
#[derive(Debug)]
pub struct TestDevice {
    name: String,
    caps: Caps,
    data_size: u64,
    state: Mutex<State>,
}

impl TestDevice {
    pub fn new(name: &str, caps: Caps, data_size: u64) -> TestDevice {
        TestDevice { name: name.into(), caps, data_size, state: Mutex::new(State::Running) }
    }
}

impl MigrationDevice for TestDevice {
    fn name(&self) -> &str {
        &self.name
    }
    fn identity(&self) -> DeviceIdentity {
        DeviceIdentity { driver: "test".into(), model: "test-device".into() }
    }
    fn caps(&self) -> Result<Caps, DeviceError> {
        Ok(self.caps)
    }
    fn state(&self) -> Result<State, DeviceError> {
        Ok(*self.state.lock().unwrap())
    }
    fn set_state(&self, target: State) -> Result<Option<DataFd>, DeviceError> {
        let mut state = self.state.lock().unwrap();
        let arcs = plan_set(&self.name, self.caps, *state, target)?;
        if arcs.iter().any(|arc| arc.session() != vfio_migd::fsm::Session::None) {
            return Err(DeviceError::os(&self.name, Op::SetState(target), Errno::EOPNOTSUPP)
                .with_detail("the API test device has no migration data"));
        }
        *state = target;
        Ok(None)
    }
    fn data_size(&self) -> Result<u64, DeviceError> {
        Ok(self.data_size)
    }
    fn precopy_info(&self, _data_fd: &DataFd) -> Result<PrecopyInfo, DeviceError> {
        Err(DeviceError::os(&self.name, Op::PrecopyInfo, Errno::EINVAL))
    }
    fn dma_logging_supported(&self) -> Result<bool, DeviceError> {
        Ok(false)
    }
    fn dma_logging_start(&self, _ranges: &[IovaRange], _page_size: u64) -> Result<u64, DeviceError> {
        Err(DeviceError::os(&self.name, Op::DmaLoggingStart, Errno::ENOTTY))
    }
    fn dma_logging_stop(&self) -> Result<(), DeviceError> {
        Err(DeviceError::os(&self.name, Op::DmaLoggingStop, Errno::ENOTTY))
    }
    fn dma_logging_report(&self, _: u64, _: u64, _: u64, _: &mut [u64]) -> Result<(), DeviceError> {
        Err(DeviceError::os(&self.name, Op::DmaLoggingReport, Errno::ENOTTY))
    }
    fn reset(&self) -> Result<(), DeviceError> {
        *self.state.lock().unwrap() = State::Running;
        Ok(())
    }
}
