//! Support for end-to-end tests: real `vfio-migd` daemon processes with simulated devices,
//! driven through the real control API over their Unix sockets; and what the real-kernel
//! test's guest programs share (the mtty stream layout and register scripts, the tally).

pub mod bench;
pub mod mtty;
pub mod report;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tonic::transport::{Channel, Endpoint};
use vfio_migd_proto::v1::control_client::ControlClient;

/// Directory holding the built `vfio-migd` and `vfio-migctl` binaries.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(&root)
            .args(["build", "--quiet", "-p", "vfio-migd", "-p", "vfio-migctl"])
            .status()
            .expect("run cargo build for the daemon binaries");
        assert!(status.success(), "building vfio-migd and vfio-migctl failed");
        let target =
            std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
        target.join("debug")
    })
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// One daemon process with its own state directory, sockets and log.
pub struct DaemonProcess {
    pub name: String,
    pub dir: PathBuf,
    pub control: PathBuf,
    pub handoff: PathBuf,
    pub peer: SocketAddr,
    pub log: PathBuf,
    child: Option<Child>,
}

impl DaemonProcess {
    /// Starts a daemon whose configuration is `devices_toml` (`[[device]]` tables) plus
    /// `extra_toml`, inside `dir/<name>`.
    pub fn spawn(
        dir: &Path,
        name: &str,
        devices_toml: &str,
        extra_toml: &str,
        allow_test_faults: bool,
    ) -> DaemonProcess {
        let home = dir.join(name);
        std::fs::create_dir_all(&home).expect("daemon dir");
        let control = home.join("control.sock");
        let handoff = home.join("handoff.sock");
        let peer: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let config = format!(
            "state_dir = \"{state}\"\n[control]\nsocket = \"{control}\"\n[handoff]\nsocket = \"{handoff}\"\n\
             [peer]\nlisten = \"{peer}\"\n{extra_toml}\n{devices_toml}\n",
            state = home.join("state").display(),
            control = control.display(),
            handoff = handoff.display(),
        );
        let config_path = home.join("config.toml");
        std::fs::write(&config_path, config).expect("write config");
        let log = home.join("daemon.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(bin_dir().join("vfio-migd"));
        cmd.arg("--config").arg(&config_path).env("VFIO_MIGD_LOG", "info,vfio_migd=debug");
        if allow_test_faults {
            cmd.arg("--allow-test-faults");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log"))
            .stderr(log_file)
            .spawn()
            .expect("spawn vfio-migd");
        let daemon =
            DaemonProcess { name: name.into(), dir: home, control, handoff, peer, log, child: Some(child) };
        daemon.wait_ready();
        daemon
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.control.exists() && std::os::unix::net::UnixStream::connect(&self.control).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("daemon {} did not open its control socket; log:\n{}", self.name, self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn control(&self) -> ControlClient<Channel> {
        let uri = format!("unix://{}", self.control.display());
        let channel =
            Endpoint::from_shared(uri).expect("uri").connect().await.expect("connect control socket");
        ControlClient::new(channel)
    }

    /// Waits until the daemon has registered `count` devices (they open after the socket).
    pub async fn wait_for_devices(&self, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut client = self.control().await;
        loop {
            let listed = client.list_devices(vfio_migd_proto::v1::ListDevicesRequest {}).await;
            if listed.is_ok_and(|l| l.into_inner().devices.len() >= count) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "daemon {} never registered {count} devices; log:\n{}",
                self.name,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait: a clean shutdown.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix_kill(child.id());
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn nix_kill(pid: u32) -> std::io::Result<()> {
    let status = Command::new("kill").arg("-TERM").arg(pid.to_string()).status()?;
    if status.success() { Ok(()) } else { Err(std::io::Error::other("kill failed")) }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `[[device]]` table for a simulated device.
pub fn sim_device(name: &str, model: &str, caps: &str, state_size: u64, seed: u64, arc_log: &Path) -> String {
    format!(
        "[[device]]\nkind = \"sim\"\nname = \"{name}\"\nmodel = \"{model}\"\ncaps = \"{caps}\"\n\
         state_size = {state_size}\nseed = {seed}\narc_log = \"{}\"\n",
        arc_log.display()
    )
}
