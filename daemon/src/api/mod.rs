//! The daemon's listeners and the thin gRPC services behind them:
//! - the control socket (Unix, 0660): [`control::ControlService`], `grpc.health.v1` and
//!   server reflection (v1 and v1alpha), so `grpcurl -plaintext -unix <socket> list` works;
//! - the peer listener (TCP, mutual TLS when `[peer.tls]` is set): [`peer::PeerService`]
//!   and health, bounded by `[peer.limits]` ([`peer_listener`] accepts its connections);
//! - the fd handoff socket (Unix, 0660): [`crate::handoff`];
//! - when configured, Prometheus metrics over HTTP (TCP): [`metrics`].
//!
//! [`ApiServer::bind`] binds everything first, with health NOT_SERVING; the caller opens
//! its configured devices meanwhile and flips [`Readiness::set_serving`] when done.

pub mod control;
pub mod convert;
pub mod metrics;
pub mod peer;
pub mod peer_listener;

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use vfio_migd_proto::v1::control_server::{ControlServer, SERVICE_NAME as CONTROL_SERVICE};
use vfio_migd_proto::v1::peer_server::{PeerServer, SERVICE_NAME as PEER_SERVICE};

pub use control::ControlService;
pub use peer::PeerService;

use crate::access::AccessPolicy;
use crate::engine::Daemon;
use crate::job::{Job, JobStatus};

/// HTTP/2 flow-control windows: device states are hundreds of MiB; the 64 KiB defaults
/// would stall every stream on round trips.
const STREAM_WINDOW: u32 = 8 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;
const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot bind the {what} socket {}: {source}", path.display())]
    BindUnix {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot bind the {what} listener {addr}: {source}")]
    BindTcp {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("the {what} server failed: {source}")]
    Serve {
        what: &'static str,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("the handoff socket failed: {0}")]
    Handoff(#[source] io::Error),
    #[error(transparent)]
    Device(#[from] crate::device::open::ConfiguredDeviceError),
    #[error(
        "the peer listener {0} is not a loopback address and no [peer.tls] is configured; \
         configure [peer.tls], listen on loopback, or set [peer] insecure_plaintext = true"
    )]
    InsecurePeer(SocketAddr),
    #[error("a server task failed: {0}")]
    Task(String),
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// Binds a Unix socket for a local API: creates the parent directory (mode 0750, group
/// `group`) if missing, replaces a stale socket (refusing to delete anything that is not a
/// socket), sets mode 0660 and, with `group`, the socket's group. A directory that already
/// exists (e.g. systemd's `RuntimeDirectory=`) keeps its owner and mode: the daemon never
/// loosens or tightens a directory it did not create.
pub(crate) fn bind_unix(path: &Path, group: Option<&str>) -> io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    let gid = group.map(resolve_group).transpose()?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.exists()
    {
        std::fs::DirBuilder::new().recursive(true).mode(0o750).create(parent)?;
        // The mode given to mkdir is masked by the umask: set it again.
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o750))?;
        if gid.is_some() {
            std::os::unix::fs::chown(parent, None, gid)?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket; refusing to replace it",
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    if gid.is_some() {
        std::os::unix::fs::chown(path, None, gid)?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

/// A `socket_group` value: a group name, or a number.
fn resolve_group(group: &str) -> io::Result<u32> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(group) {
        Ok(Some(found)) => Ok(found.gid.as_raw()),
        Ok(None) => Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("socket_group `{group}` is not a group of this host"),
        )),
        Err(e) => Err(io::Error::other(format!("cannot look up socket_group `{group}`: {e}"))),
    }
}

/// Removes a socket file when the server stops, whatever the outcome.
#[derive(Debug)]
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.0.display(), error = %e, "cannot remove socket");
        }
    }
}

/// Flips the health status of every service this daemon serves, and tells the control
/// service whether new jobs are accepted.
#[derive(Clone, Debug)]
pub struct Readiness {
    health: HealthReporter,
    draining: Arc<AtomicBool>,
}

impl Readiness {
    async fn set(&self, status: ServingStatus) {
        for service in ["", CONTROL_SERVICE, PEER_SERVICE] {
            self.health.set_service_status(service, status).await;
        }
    }

    /// Ready: configured devices are open and migrations are accepted.
    pub async fn set_serving(&self) {
        self.draining.store(false, Ordering::Release);
        self.set(ServingStatus::Serving).await;
    }

    /// Starting up.
    pub async fn set_not_serving(&self) {
        self.set(ServingStatus::NotServing).await;
    }

    /// Stopping: NOT_SERVING, and `StartMigration`/`PrepareIncoming` are refused with
    /// UNAVAILABLE while running jobs finish; queries, cancellation and resolution still work.
    pub async fn drain(&self) {
        self.draining.store(true, Ordering::Release);
        self.set(ServingStatus::NotServing).await;
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

/// Every listener of the daemon, bound and not yet serving.
#[derive(Debug)]
pub struct ApiServer {
    daemon: Arc<Daemon>,
    readiness: Readiness,
    control: UnixListener,
    control_file: SocketFile,
    handoff: UnixListener,
    handoff_file: SocketFile,
    peer: TcpListener,
    metrics: Option<TcpListener>,
}

impl ApiServer {
    /// Binds the control socket, the handoff socket, the peer listener and the metrics
    /// listener (if any) named by the daemon's configuration. Health starts NOT_SERVING.
    pub async fn bind(daemon: Arc<Daemon>) -> Result<ApiServer, ApiError> {
        let config = &daemon.config;
        let unix = |what, path: &Path, group: &Option<String>| {
            bind_unix(path, group.as_deref()).map_err(|source| ApiError::BindUnix {
                what,
                path: path.to_path_buf(),
                source,
            })
        };
        let control = unix("control", &config.control.socket, &config.control.socket_group)?;
        let control_file = SocketFile(config.control.socket.clone());
        let handoff = unix("handoff", &config.handoff.socket, &config.handoff.socket_group)?;
        let handoff_file = SocketFile(config.handoff.socket.clone());
        let tcp = |what, addr| async move {
            TcpListener::bind(addr).await.map_err(|source| ApiError::BindTcp { what, addr, source })
        };
        if config.peer.tls.is_none() && !config.peer.listen.ip().is_loopback() {
            if !config.peer.insecure_plaintext {
                return Err(ApiError::InsecurePeer(config.peer.listen));
            }
            tracing::warn!(
                listen = %config.peer.listen,
                "INSECURE: the peer listener serves PLAINTEXT on a non-loopback address \
                 ([peer] insecure_plaintext = true): anyone who reaches it can read, start, commit \
                 or abort migrations and change device state. Configure [peer.tls]."
            );
        }
        let peer = tcp("peer", config.peer.listen).await?;
        let metrics = match config.metrics.listen {
            Some(addr) => Some(tcp("metrics", addr).await?),
            None => None,
        };
        let readiness = Readiness { health: HealthReporter::new(), draining: Arc::default() };
        readiness.set_not_serving().await;
        Ok(ApiServer { daemon, readiness, control, control_file, handoff, handoff_file, peer, metrics })
    }

    pub fn readiness(&self) -> Readiness {
        self.readiness.clone()
    }

    /// The peer listener's address (the port is chosen by the kernel for port 0).
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.peer.local_addr()
    }

    /// The metrics listener's address, when metrics are served.
    pub fn metrics_addr(&self) -> Option<io::Result<SocketAddr>> {
        self.metrics.as_ref().map(TcpListener::local_addr)
    }

    /// Serves until `shutdown`, then removes the socket files. Streaming calls
    /// (`WatchJob`) end at shutdown so they do not hold the server open. If one listener
    /// fails, the others are stopped too.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ApiError> {
        let ApiServer { daemon, readiness, control, control_file, handoff, handoff_file, peer, metrics } =
            self;
        let _remove_on_exit = (control_file, handoff_file);
        // Only what this socket serves is listed: the Peer service shares the descriptor
        // set but lives on the peer listener.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(vfio_migd_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .with_service_name(CONTROL_SERVICE)
                .with_service_name(HEALTH_SERVICE)
                .with_service_name("grpc.reflection.v1.ServerReflection")
                .with_service_name("grpc.reflection.v1alpha.ServerReflection")
        };
        let reflection_v1 = reflection().build_v1()?;
        let reflection_v1alpha = reflection().build_v1alpha()?;
        let health = || HealthServer::new(HealthService::from_health_reporter(readiness.health.clone()));

        let control_server = tuned_server()
            .add_service(health())
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(control::Authorized::new(
                ControlServer::new(ControlService::new(daemon.clone(), shutdown.clone(), readiness.clone())),
                AccessPolicy::for_this_process(daemon.config.control.access()),
            ))
            .serve_with_incoming_shutdown(
                UnixListenerStream::new(control),
                shutdown.clone().cancelled_owned(),
            );
        let limits = daemon.config.peer.limits.clone();
        let peer_server = peer_server(&limits)
            .add_service(health())
            .add_service(
                PeerServer::new(PeerService::new(daemon.clone()))
                    .max_decoding_message_size(limits.max_message_bytes)
                    .max_encoding_message_size(limits.max_message_bytes),
            )
            .serve_with_incoming_shutdown(
                peer_listener::incoming(peer, daemon.tls.clone(), limits.clone(), shutdown.clone()),
                shutdown.clone().cancelled_owned(),
            );
        let (metrics_daemon, metrics_shutdown) = (daemon.clone(), shutdown.clone());
        let metrics_server = async move {
            if let Some(listener) = metrics {
                metrics::serve(listener, metrics_daemon, metrics_shutdown).await;
            }
            Ok::<(), ApiError>(())
        };
        let handoff_server = crate::handoff::serve(daemon, handoff, shutdown.clone());
        tokio::try_join!(
            async { control_server.await.map_err(|source| ApiError::Serve { what: "control", source }) },
            async { peer_server.await.map_err(|source| ApiError::Serve { what: "peer", source }) },
            async { handoff_server.await.map_err(ApiError::Handoff) },
            metrics_server,
        )?;
        Ok(())
    }
}

/// The peer listener's server: every bound from `[peer.limits]`. Peer calls are small
/// (bulk data travels on the data connections), so windows stay small and a caller can
/// hold at most `max_concurrent_streams` × `stream_window_bytes` (capped by
/// `connection_window_bytes`) per connection, for at most `max_connections` connections.
fn peer_server(limits: &crate::config::PeerLimits) -> Server {
    let ms = Duration::from_millis;
    Server::builder()
        .initial_stream_window_size(limits.stream_window_bytes)
        .initial_connection_window_size(limits.connection_window_bytes)
        .max_concurrent_streams(limits.max_concurrent_streams)
        .concurrency_limit_per_connection(limits.concurrency_per_connection)
        .timeout(ms(limits.request_timeout_ms))
        .max_connection_age(ms(limits.max_connection_age_ms))
        .http2_keepalive_interval(Some(ms(limits.keepalive_interval_ms)))
        .http2_keepalive_timeout(Some(ms(limits.keepalive_timeout_ms)))
        .http2_max_header_list_size(16 << 10)
}

fn tuned_server() -> Server {
    Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .tcp_nodelay(true)
}

/// Lets running jobs end before the daemon stops: waits up to `finish` for them, then
/// cancels those still before their commit point (they roll back, the source's devices
/// run again) and waits up to `roll_back` more. Jobs in doubt do not hold the stop: their
/// journal resolves them after a restart. Returns how many jobs were still running at
/// the end.
pub async fn drain_jobs(daemon: &Daemon, finish: Duration, roll_back: Duration) -> usize {
    let running = || -> Vec<Arc<Job>> {
        daemon.jobs.list().into_iter().filter(|j| j.snapshot().status == JobStatus::Running).collect()
    };
    let jobs = running();
    if jobs.is_empty() {
        return 0;
    }
    tracing::info!(jobs = jobs.len(), "waiting for running jobs to end");
    if tokio::time::timeout(finish, all_ended(&jobs)).await.is_ok() {
        return 0;
    }
    let jobs = running();
    for job in &jobs {
        let id = job.id();
        match daemon.cancel(&id) {
            Ok(_) => tracing::warn!(job = %id, "stopping: cancelled before its commit point"),
            Err(e) => tracing::warn!(job = %id, error = %e, "stopping: cannot cancel"),
        }
    }
    let _ = tokio::time::timeout(roll_back, all_ended(&jobs)).await;
    let left = running().len();
    if left > 0 {
        tracing::error!(jobs = left, "stopping with jobs still running");
    }
    left
}

async fn all_ended(jobs: &[Arc<Job>]) {
    for job in jobs {
        let mut changes = job.subscribe();
        while job.snapshot().status == JobStatus::Running {
            if changes.changed().await.is_err() {
                break;
            }
        }
    }
}

/// Binds every listener (health NOT_SERVING), opens the configured devices, reports
/// SERVING, and serves until `shutdown`. `vfio-migd` itself uses [`ApiServer`] directly so
/// it can log each device and notify systemd in between.
pub async fn serve(daemon: Arc<Daemon>, shutdown: CancellationToken) -> Result<(), ApiError> {
    let server = ApiServer::bind(daemon.clone()).await?;
    let readiness = server.readiness();
    let running = tokio::spawn(server.run(shutdown.clone()));
    let opened = {
        let daemon = daemon.clone();
        tokio::task::spawn_blocking(move || {
            crate::device::open::open_all_configured(&daemon.config.devices, &daemon.registry)
        })
        .await
    };
    match opened {
        Ok(Ok(found)) => {
            for device in found {
                tracing::info!(%device, "device opened");
            }
            readiness.set_serving().await;
        }
        Ok(Err(e)) => {
            shutdown.cancel();
            let _ = running.await;
            return Err(ApiError::Device(e));
        }
        Err(join) => {
            shutdown.cancel();
            let _ = running.await;
            return Err(ApiError::Task(format!("device open thread: {join}")));
        }
    }
    running.await.unwrap_or_else(|join| Err(ApiError::Task(join.to_string())))
}
