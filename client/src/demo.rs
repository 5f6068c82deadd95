//! `vfio-migctl demo`: a real multi-device migration between two `vfio-migd` processes on
//! simulated devices, driven through the control API exactly as an operator would, then
//! verified byte for byte on the destination.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tonic::transport::{Channel, Endpoint};
use vfio_migd_proto::v1 as pb;
use vfio_migd_proto::v1::control_client::ControlClient;

use crate::watch::{self, Display};

/// One simulated device of the demo VM: (name, model, capabilities, state size).
const DEVICES: &[(&str, &str, &str, u64)] = &[
    ("nic0", "sim-nic", "STOP_COPY|P2P|PRE_COPY", 96 << 20),
    ("nic1", "sim-nic", "STOP_COPY|P2P|PRE_COPY", 48 << 20),
    ("gpu0", "sim-gpu", "STOP_COPY|P2P", 160 << 20),
    ("acc0", "sim-acc", "STOP_COPY", 16 << 20),
];

pub struct DemoOptions {
    pub keep: bool,
    pub display: Display,
    pub json: bool,
}

struct DaemonProcess {
    name: &'static str,
    child: Option<Child>,
    control: PathBuf,
    peer: String,
    log: PathBuf,
}

impl DaemonProcess {
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn daemon_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate vfio-migctl itself")?;
    let daemon = exe.with_file_name("vfio-migd");
    if !daemon.exists() {
        bail!("{} not found: build both binaries first (cargo build --release)", daemon.display());
    }
    Ok(daemon)
}

fn spawn(dir: &Path, name: &'static str, prefix: &str, seed_base: u64) -> anyhow::Result<DaemonProcess> {
    let home = dir.join(name);
    std::fs::create_dir_all(&home)?;
    let control = home.join("control.sock");
    let peer = format!("127.0.0.1:{}", free_port()?);
    let mut config = format!(
        "state_dir = \"{state}\"\n[control]\nsocket = \"{control}\"\n[handoff]\nsocket = \"{handoff}\"\n\
         [peer]\nlisten = \"{peer}\"\n",
        state = home.join("state").display(),
        control = control.display(),
        handoff = home.join("handoff.sock").display(),
    );
    for (i, (device, model, caps, size)) in DEVICES.iter().enumerate() {
        config.push_str(&format!(
            "[[device]]\nkind = \"sim\"\nname = \"{prefix}{device}\"\nmodel = \"{model}\"\ncaps = \"{caps}\"\n\
             state_size = {size}\nseed = {}\narc_log = \"{}\"\n",
            seed_base + i as u64,
            home.join(format!("{prefix}{device}.arcs")).display()
        ));
    }
    let config_path = home.join("config.toml");
    std::fs::write(&config_path, config)?;
    let log = home.join("vfio-migd.log");
    let out = std::fs::File::create(&log)?;
    let child = Command::new(daemon_binary()?)
        .arg("--config")
        .arg(&config_path)
        .env("VFIO_MIGD_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .context("cannot start vfio-migd")?;
    Ok(DaemonProcess { name, child: Some(child), control, peer, log })
}

async fn connect(daemon: &mut DaemonProcess) -> anyhow::Result<ControlClient<Channel>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = daemon.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            bail!(
                "{} daemon exited ({status}); its log:\n{}",
                daemon.name,
                std::fs::read_to_string(&daemon.log).unwrap_or_default()
            );
        }
        if daemon.control.exists() {
            let endpoint = Endpoint::from_shared(format!("unix://{}", daemon.control.display()))?;
            if let Ok(channel) = endpoint.connect().await {
                let mut client = ControlClient::new(channel);
                // The control socket opens before the configured devices are; wait for them.
                let listed = client.list_devices(pb::ListDevicesRequest {}).await;
                if listed.is_ok_and(|list| list.into_inner().devices.len() >= DEVICES.len()) {
                    return Ok(client);
                }
            }
        }
        if Instant::now() > deadline {
            bail!("{} daemon did not come up; log in {}", daemon.name, daemon.log.display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

/// Runs the demo; returns the process exit code (0: every device verified).
pub async fn run(opts: DemoOptions) -> anyhow::Result<u8> {
    let dir = std::env::temp_dir().join(format!("vfio-migd-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run_in(&dir, &opts).await;
    if opts.keep || result.is_err() {
        eprintln!("demo files (configs, logs, arc logs) kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

async fn run_in(dir: &Path, opts: &DemoOptions) -> anyhow::Result<u8> {
    let say = |text: String| {
        if !opts.json {
            println!("{text}");
        }
    };
    let mut source = spawn(dir, "source", "", 1)?;
    let mut destination = spawn(dir, "destination", "dst-", 1001)?;
    let mut src = connect(&mut source).await?;
    let mut dst = connect(&mut destination).await?;
    say(format!(
        "source daemon on {} (peer {}), destination daemon on {} (peer {})",
        source.control.display(),
        source.peer,
        destination.control.display(),
        destination.peer
    ));

    let job_id = format!("demo-{}", std::process::id());
    let names: Vec<String> = DEVICES.iter().map(|d| d.0.to_string()).collect();
    let dst_names: Vec<String> = names.iter().map(|n| format!("dst-{n}")).collect();
    dst.prepare_incoming(pb::PrepareIncomingRequest {
        job_id: job_id.clone(),
        devices: dst_names.clone(),
        ..Default::default()
    })
    .await?;
    src.define_group(pb::DefineGroupRequest {
        name: "vm-demo".into(),
        devices: names.clone(),
        allow_multiple_non_p2p: false,
    })
    .await?;
    let plan = src.plan_migration(pb::PlanMigrationRequest { group: "vm-demo".into() }).await?.into_inner();
    say(format!("plan for group vm-demo ({} devices, {}):", plan.devices.len(), mib(plan.total_data_size)));
    for step in &plan.steps {
        say(format!("  - {step}"));
    }
    src.start_migration(pb::StartMigrationRequest {
        job_id: job_id.clone(),
        group: "vm-demo".into(),
        peer: destination.peer.clone(),
        mapping: names
            .iter()
            .zip(&dst_names)
            .map(|(s, d)| pb::DeviceMapping { source: s.clone(), destination: d.clone() })
            .collect(),
        phase_timeout_ms: 0,
        data_connections: 0,
        expected_destination_identity: String::new(),
    })
    .await?;
    let job = watch::follow(&mut src, &job_id, opts.display).await?;
    if job.status() != pb::JobStatus::Succeeded {
        bail!("migration {job_id} ended {:?}: {}", job.status(), job.error);
    }
    say(format!("migrated {} in {:.0} ms of downtime", mib(job.bytes_total), job.downtime_ns as f64 / 1e6));

    let mut verified = Vec::new();
    let mut failed = 0;
    for (name, dst_name) in names.iter().zip(&dst_names) {
        let s = src.get_device(pb::GetDeviceRequest { name: name.clone() }).await?.into_inner();
        let d = dst.get_device(pb::GetDeviceRequest { name: dst_name.clone() }).await?.into_inner();
        let ok = !s.content_digest.is_empty()
            && s.content_digest == d.content_digest
            && d.state == "RUNNING"
            && s.state == "STOP";
        if ok {
            say(format!("verified {name} -> {dst_name}: {} ({})", mib(s.data_size), d.content_digest));
        } else {
            failed += 1;
            say(format!(
                "MISMATCH {name} -> {dst_name}: source {} [{}], destination {} [{}]",
                s.state, s.content_digest, d.state, d.content_digest
            ));
        }
        verified.push(serde_json::json!({
            "source": name, "destination": dst_name, "verified": ok,
            "source_state": s.state, "destination_state": d.state, "digest": d.content_digest,
        }));
    }
    if opts.json {
        println!(
            "{}",
            serde_json::json!({
                "job_id": job_id, "status": "succeeded", "bytes": job.bytes_total,
                "downtime_ns": job.downtime_ns, "devices": verified,
            })
        );
    }
    source.stop();
    destination.stop();
    Ok(if failed == 0 { 0 } else { 1 })
}
