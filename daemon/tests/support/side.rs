//! One side of a migration inside the test process: a daemon with simulated devices on
//! one simulated IOMMU, its peer API served on loopback, and no control socket (tests
//! call the engine directly).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_stream::wrappers::TcpListenerStream;
use vfio_migd::api::peer::PeerService;
use vfio_migd::config::Config;
use vfio_migd::device::MigrationDevice;
use vfio_migd::device::sim::{SimDevice, SimSpec};
use vfio_migd::engine::Daemon;
use vfio_migd::job::{JobSnapshot, JobStatus};
use vfio_migd::registry::{Backend, GroupDef, Registry};

pub struct Side {
    pub daemon: Arc<Daemon>,
    pub devices: Vec<Arc<SimDevice>>,
    pub peer: SocketAddr,
    _dir: tempfile::TempDir,
}

/// A daemon with `specs` registered, configured by `extra_toml` besides its state
/// directory and peer listener.
pub async fn side(specs: Vec<SimSpec>, extra_toml: &str) -> Side {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let peer = listener.local_addr().unwrap();
    let toml = format!("state_dir = \"{}\"\n[peer]\nlisten = \"{peer}\"\n{extra_toml}", dir.path().display());
    let config = Config::from_toml(&toml, true).unwrap();
    let registry = Arc::new(Registry::default());
    let mut devices = Vec::new();
    for spec in specs {
        let device = Arc::new(SimDevice::with_iommu(spec, registry.sim_iommu()).unwrap());
        registry.add_device(device.clone() as Arc<dyn MigrationDevice>, Backend::Sim).unwrap();
        devices.push(device);
    }
    let daemon = Daemon::new(config, registry).unwrap();
    let service = PeerService::new(daemon.clone()).into_server();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    Side { daemon, devices, peer, _dir: dir }
}

impl Side {
    /// Defines group `name` of `members`, in their order.
    pub fn define_group(&self, name: &str, members: &[Arc<SimDevice>]) {
        self.daemon
            .registry
            .define_group(GroupDef {
                name: name.into(),
                devices: members.iter().map(|d| d.name().to_owned()).collect(),
                allow_multiple_non_p2p: false,
            })
            .unwrap();
    }
}

/// The job's snapshot once it is no longer running.
pub async fn wait_finished(daemon: &Daemon, job_id: &str) -> JobSnapshot {
    let job = daemon.job(job_id).unwrap();
    let mut changes = job.subscribe();
    tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            let snapshot = job.snapshot();
            if snapshot.status != JobStatus::Running {
                return snapshot;
            }
            changes.changed().await.unwrap();
        }
    })
    .await
    .expect("job did not finish")
}
