//! Access to the control socket by uid: the built `vfio-migctl` run as `nobody` (with
//! `setpriv`) against a daemon served in-process. Needs root (to switch uid); without it
//! the test says so and passes vacuously.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use vfio_migd::api::ApiServer;
use vfio_migd::config::Config;
use vfio_migd::engine::Daemon;
use vfio_migd::registry::Registry;

const NOBODY: u32 = 65534;

struct Served {
    dir: tempfile::TempDir,
    daemon: Arc<Daemon>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), vfio_migd::api::ApiError>>,
}

impl Served {
    /// A daemon whose control socket is group `nogroup` (so `nobody` can connect) and
    /// whose `[control]` section adds `access` (TOML lines).
    async fn start(access: &str) -> Served {
        Served::start_with(access, "").await
    }

    /// As [`Served::start`], with `handoff` (TOML lines) added to `[handoff]`.
    async fn start_with(access: &str, handoff: &str) -> Served {
        let dir = tempfile::tempdir().unwrap();
        // nobody must reach the socket: the temp dir is 0700 by default.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let text = format!(
            "state_dir = \"{0}/state\"\n[control]\nsocket = \"{0}/run/control.sock\"\n\
             socket_group = \"nogroup\"\n{access}\n\
             [handoff]\nsocket = \"{0}/run/handoff.sock\"\nsocket_group = \"nogroup\"\n{handoff}\n\
             [simulator]\nallow_remote = true\n[peer]\nlisten = \"127.0.0.1:0\"\n\
             [[device]]\nkind = \"sim\"\nname = \"nic0\"\nstate_size = 4096\n",
            dir.path().display()
        );
        let config = Config::from_toml(&text, false).unwrap();
        let daemon = Daemon::new(config, Arc::new(Registry::default())).unwrap();
        let server = ApiServer::bind(daemon.clone()).await.unwrap();
        vfio_migd::device::open::open_all_configured(&daemon.config.devices, &daemon.registry).unwrap();
        server.readiness().set_serving().await;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.run(shutdown.clone()));
        Served { dir, daemon, shutdown, task }
    }

    fn socket(&self) -> PathBuf {
        self.daemon.config.control.socket.clone()
    }

    /// `vfio-migctl`, copied where `nobody` can execute it.
    fn client(&self) -> PathBuf {
        let copy = self.dir.path().join("vfio-migctl");
        if !copy.exists() {
            std::fs::copy(env!("CARGO_BIN_EXE_vfio-migctl"), &copy).unwrap();
            std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        copy
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

async fn as_nobody(client: &Path, socket: &Path, args: &[&str]) -> Output {
    tokio::process::Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
        .arg(client)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .env_remove("VFIO_MIGD_SOCKET")
        .output()
        .await
        .expect("run setpriv")
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

#[tokio::test]
async fn a_uid_that_is_not_allowed_is_refused_with_permission_denied() {
    if !is_root() {
        println!("SKIPPED: switching to uid nobody with setpriv needs root (CI runs as root)");
        return;
    }
    let served = Served::start("").await;
    let listed = as_nobody(&served.client(), &served.socket(), &["devices", "list"]).await;
    let out = text(&listed);
    assert!(!listed.status.success(), "nobody must not list devices: {out}");
    assert!(out.to_lowercase().contains("permission denied"), "{out}");
    assert!(
        out.contains(&format!("uid {NOBODY}")) && out.contains("ListDevices"),
        "names caller and call: {out}"
    );
    // Root (this process) still can.
    let mut control = vfio_migd_proto::v1::control_client::ControlClient::new(
        tonic::transport::Endpoint::from_shared(format!("unix://{}", served.socket().display()))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let devices = control.list_devices(vfio_migd_proto::v1::ListDevicesRequest {}).await.unwrap();
    assert_eq!(devices.into_inner().devices.len(), 1);
    served.stop().await;
}

#[tokio::test]
async fn a_read_only_uid_can_list_devices_but_cannot_migrate() {
    if !is_root() {
        println!("SKIPPED: switching to uid nobody with setpriv needs root (CI runs as root)");
        return;
    }
    let served = Served::start(&format!("read_uids = [{NOBODY}]")).await;
    let client = served.client();
    let socket = served.socket();
    let listed = as_nobody(&client, &socket, &["--json", "devices", "list"]).await;
    assert!(listed.status.success(), "a reader lists devices: {}", text(&listed));
    assert!(text(&listed).contains("nic0"), "{}", text(&listed));

    served.daemon.registry.join_group("vm1", "nic0").unwrap();
    let migrate = as_nobody(
        &client,
        &socket,
        &[
            "migrate",
            "--job-id",
            "j1",
            "--group",
            "vm1",
            "--peer",
            "127.0.0.1:9",
            "--map",
            "nic0=nic0",
            "--no-watch",
        ],
    )
    .await;
    let out = text(&migrate);
    assert!(!migrate.status.success(), "a reader must not migrate: {out}");
    assert!(out.to_lowercase().contains("permission denied"), "{out}");
    assert!(
        out.contains("StartMigration") && out.contains("mutating"),
        "names the call and the class: {out}"
    );
    assert!(served.daemon.jobs.list().is_empty(), "no job was created");
    // The socket and its directory carry the configured group and modes.
    use std::os::unix::fs::MetadataExt;
    let socket_meta = std::fs::metadata(&socket).unwrap();
    assert_eq!((socket_meta.gid(), socket_meta.mode() & 0o777), (NOBODY, 0o660));
    let dir_meta = std::fs::metadata(socket.parent().unwrap()).unwrap();
    assert_eq!((dir_meta.gid(), dir_meta.mode() & 0o777), (NOBODY, 0o750));
    served.stop().await;
}

#[tokio::test]
async fn a_handoff_needs_an_admin_uid() {
    if !is_root() {
        println!("SKIPPED: switching to uid nobody with setpriv needs root (CI runs as root)");
        return;
    }
    let args =
        ["handoff", "--name", "sim0", "--sim", "STOP_COPY|P2P", "--state-size", "4KiB", "--handoff-socket"];
    for (handoff, allowed) in [("", false), (&*format!("admin_uids = [{NOBODY}]"), true)] {
        let served = Served::start_with(&format!("read_uids = [{NOBODY}]"), handoff).await;
        let socket = served.daemon.config.handoff.socket.clone();
        let mut full: Vec<&str> = args.to_vec();
        let socket_text = socket.display().to_string();
        full.push(&socket_text);
        let output = as_nobody(&served.client(), &served.socket(), &full).await;
        let out = text(&output);
        assert_eq!(output.status.success(), allowed, "[handoff] {handoff:?} (allowed: {allowed}): {out}");
        if !allowed {
            assert!(out.contains("permission denied") && out.contains(&format!("uid {NOBODY}")), "{out}");
        }
        assert_eq!(served.daemon.registry.device("sim0").is_ok(), allowed);
        served.stop().await;
    }
}
