//! The real `vfio-migd` binary under a stand-in service manager: a Unix datagram socket
//! the test binds and names in `NOTIFY_SOCKET`, as systemd does for `Type=notify`.
//! Readiness, watchdog pings at half of `WATCHDOG_USEC`, `STATUS=` lines naming a running
//! job and its phase, and SIGHUP reloading the log level while a migration runs.

use std::io::Read;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tonic::transport::{Channel, Endpoint};
use vfio_migd_proto::v1::control_client::ControlClient;
use vfio_migd_proto::v1::{
    DefineGroupRequest, DeviceMapping, GetJobRequest, JobStatus, PrepareIncomingRequest,
    StartMigrationRequest,
};

/// One datagram from the daemon and when it arrived.
struct Notification {
    at: Instant,
    text: String,
}

/// The stand-in service manager's socket; a thread collects what arrives.
fn notify_socket(path: &Path) -> mpsc::Receiver<Notification> {
    let socket = UnixDatagram::bind(path).expect("bind the notify socket");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = socket.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            if tx.send(Notification { at: Instant::now(), text }).is_err() {
                return;
            }
        }
    });
    rx
}

/// Waits for a datagram containing `line`; returns it and everything seen before.
fn wait_for(rx: &mpsc::Receiver<Notification>, seen: &mut Vec<Notification>, line: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    if let Some(found) = seen.iter().find(|n| n.text.lines().any(|l| l.starts_with(line))) {
        return found.text.clone();
    }
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let n = rx.recv_timeout(left).unwrap_or_else(|_| {
            let texts: Vec<_> = seen.iter().map(|n| n.text.as_str()).collect();
            panic!("no `{line}` from the daemon; got {texts:?}")
        });
        let hit = n.text.lines().any(|l| l.starts_with(line));
        let text = n.text.clone();
        seen.push(n);
        if hit {
            return text;
        }
    }
}

/// Waits until `count` datagrams carrying the line `line` arrived in all.
fn wait_count(rx: &mpsc::Receiver<Notification>, seen: &mut Vec<Notification>, line: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.iter().filter(|n| n.text.lines().any(|l| l == line)).count() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(n) => seen.push(n),
            Err(_) => panic!("fewer than {count} `{line}` from the daemon"),
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Side {
    config: PathBuf,
    control: PathBuf,
    child: Child,
    stderr: PathBuf,
}

impl Side {
    fn spawn(dir: &Path, name: &str, body: &str, env: &[(&str, String)]) -> Side {
        let root = dir.join(name);
        std::fs::create_dir_all(&root).unwrap();
        let control = root.join("control.sock");
        let config = root.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "state_dir = \"{0}/state\"\n[control]\nsocket = \"{0}/control.sock\"\n\
                 [handoff]\nsocket = \"{0}/handoff.sock\"\n{body}",
                root.display()
            ),
        )
        .unwrap();
        let stderr = root.join("stderr.log");
        let child = Command::new(env!("CARGO_BIN_EXE_vfio-migd"))
            .arg("--config")
            .arg(&config)
            .env_remove("VFIO_MIGD_LOG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .env_remove("JOURNAL_STREAM")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("spawn vfio-migd");
        Side { config, control, child, stderr }
    }

    async fn control(&self) -> ControlClient<Channel> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let endpoint = Endpoint::from_shared(format!("unix://{}", self.control.display())).unwrap();
            match endpoint.connect().await {
                Ok(channel) => return ControlClient::new(channel),
                Err(e) if Instant::now() > deadline => panic!("cannot reach {}: {e}", self.control.display()),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    fn log(&self) -> String {
        let mut text = String::new();
        std::fs::File::open(&self.stderr).unwrap().read_to_string(&mut text).unwrap();
        text
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }

    /// SIGTERM, then the exit status.
    fn stop(mut self) -> std::process::ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "vfio-migd did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const SIM: &str = "caps = \"STOP_COPY|P2P\"\nstate_size = \"4MiB\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_status_and_sighup_reload_under_a_stand_in_service_manager() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notifications = notify_socket(&notify_path);
    let mut seen = Vec::new();

    let dst_port = free_port();
    let destination = Side::spawn(
        dir.path(),
        "dst",
        &format!(
            "[peer]\nlisten = \"127.0.0.1:{dst_port}\"\n[[device]]\nkind = \"sim\"\nname = \"d0\"\n{SIM}"
        ),
        &[],
    );
    // The source's first data read stalls: the job runs for seconds while the test
    // reloads the daemon under it.
    let source_body = |level: &str| {
        format!(
            "[log]\nlevel = \"{level}\"\n[peer]\nlisten = \"127.0.0.1:0\"\n\
             [[device]]\nkind = \"sim\"\nname = \"s0\"\n{SIM}\
             [[device.faults]]\nkind = \"stall\"\nop = \"data_read\"\nms = 2500\nonce = true\n"
        )
    };
    let source = Side::spawn(
        dir.path(),
        "src",
        &source_body("info"),
        &[
            ("NOTIFY_SOCKET", notify_path.display().to_string()),
            // 400 ms: pings are due every 200 ms.
            ("WATCHDOG_USEC", "400000".to_owned()),
        ],
    );

    let ready = wait_for(&notifications, &mut seen, "READY=1");
    assert!(ready.contains("STATUS=serving; 1 device(s); no jobs"), "{ready}");
    let ready_at = seen.last().map(|n| n.at).unwrap();

    // Watchdog: several pings, about every 200 ms (well inside the 400 ms period).
    std::thread::sleep(Duration::from_millis(1500));
    while let Ok(n) = notifications.try_recv() {
        seen.push(n);
    }
    let pings: Vec<Instant> =
        seen.iter().filter(|n| n.text.lines().any(|l| l == "WATCHDOG=1")).map(|n| n.at).collect();
    let after_ready = pings.iter().filter(|at| **at >= ready_at).count();
    assert!(after_ready >= 4, "{after_ready} watchdog pings in 1.5 s after READY");
    for gap in pings.windows(2).map(|w| w[1] - w[0]) {
        assert!(gap < Duration::from_millis(400), "a watchdog gap of {gap:?} exceeds the period");
    }

    // A job: the destination is prepared, the source started.
    let mut dst = destination.control().await;
    dst.prepare_incoming(PrepareIncomingRequest {
        job_id: "hup".into(),
        devices: vec!["d0".into()],
        ..Default::default()
    })
    .await
    .expect("prepare the destination");
    let mut src = source.control().await;
    src.define_group(DefineGroupRequest {
        name: "vm".into(),
        devices: vec!["s0".into()],
        ..Default::default()
    })
    .await
    .expect("define the group");
    src.start_migration(StartMigrationRequest {
        job_id: "hup".into(),
        group: "vm".into(),
        peer: format!("127.0.0.1:{dst_port}"),
        mapping: vec![DeviceMapping { source: "s0".into(), destination: "d0".into() }],
        ..Default::default()
    })
    .await
    .expect("start the migration");
    let status = wait_for(&notifications, &mut seen, "STATUS=serving; 1 device(s); 1 job(s): hup source");
    assert!(!status.contains("no jobs"), "{status}");

    // SIGHUP with the log level raised to debug while the job runs.
    assert!(!source.log().contains("DEBUG"), "debug lines before the reload");
    std::fs::write(&source.config, {
        let text = std::fs::read_to_string(&source.config).unwrap();
        text.replace("level = \"info\"", "level = \"debug\"")
    })
    .unwrap();
    source.signal(nix::sys::signal::Signal::SIGHUP);
    let reloading = wait_for(&notifications, &mut seen, "RELOADING=1");
    assert!(reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")), "{reloading}");
    // READY=1 again once the reload is done (the first READY=1 was consumed above).
    let ready_count = |seen: &[Notification]| seen.iter().filter(|n| n.text.contains("READY=1\n")).count();
    let deadline = Instant::now() + Duration::from_secs(30);
    while ready_count(&seen) < 2 {
        let n = notifications
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("READY=1 after reload");
        seen.push(n);
    }

    // The job is unaffected: it succeeds.
    let deadline = Instant::now() + Duration::from_secs(60);
    let job = loop {
        let job = src.get_job(GetJobRequest { job_id: "hup".into() }).await.unwrap().into_inner();
        if job.status != JobStatus::Running as i32 {
            break job;
        }
        assert!(Instant::now() < deadline, "the job did not end");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(job.status, JobStatus::Succeeded as i32, "{job:?}");
    wait_for(&notifications, &mut seen, "STATUS=serving; 1 device(s); no jobs");

    let log = source.log();
    assert!(log.contains("log.level `info` → `debug`"), "{log}");
    assert!(log.contains("DEBUG"), "no debug line after the reload:\n{log}");

    // A second reload that moves the peer listener is refused, naming the key; the
    // daemon keeps serving.
    std::fs::write(&source.config, {
        let text = std::fs::read_to_string(&source.config).unwrap();
        text.replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\"")
    })
    .unwrap();
    source.signal(nix::sys::signal::Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !source.log().contains("only a restart puts in force") {
        assert!(Instant::now() < deadline, "no refusal logged:\n{}", source.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(source.log().contains("[peer]"), "{}", source.log());
    wait_count(&notifications, &mut seen, "RELOADING=1", 2);
    wait_count(&notifications, &mut seen, "READY=1", 3);

    let status = source.stop();
    assert!(status.success(), "vfio-migd exited with {status}");
    wait_for(&notifications, &mut seen, "STOPPING=1");
    assert!(destination.stop().success());
}

#[test]
fn journald_gets_priority_prefixes_and_no_timestamps() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let log_path = root.join("journal.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let meta = log.metadata().unwrap();
    // The state directory is a file: the daemon fails at start, with an error line.
    std::fs::write(root.join("state"), "").unwrap();
    std::fs::write(
        root.join("config.toml"),
        format!(
            "state_dir = \"{0}/state\"\n[control]\nsocket = \"{0}/control.sock\"\n\
             [handoff]\nsocket = \"{0}/handoff.sock\"\n[peer]\nlisten = \"127.0.0.1:0\"\n",
            root.display()
        ),
    )
    .unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_vfio-migd"))
        .arg("--config")
        .arg(root.join("config.toml"))
        .env_remove("VFIO_MIGD_LOG")
        .env_remove("NOTIFY_SOCKET")
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stdout(Stdio::null())
        .stderr(log)
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(1));
    let text = std::fs::read_to_string(&log_path).unwrap();
    let first = text.lines().next().unwrap_or_default();
    assert!(first.starts_with("<3>"), "an error line at priority 3: {text}");
    assert!(first.contains("ERROR") && first.contains("state directory"), "{text}");
    // No timestamp of its own: journald stamps each line.
    assert!(!first[3..].trim_start().starts_with(char::is_numeric), "{text}");
}

#[test]
fn a_word_that_is_not_a_level_is_refused_at_check_config_and_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[log]\nlevel = \"warning\"\n").unwrap();
    for extra in [&["--check-config"][..], &[]] {
        let output = Command::new(env!("CARGO_BIN_EXE_vfio-migd"))
            .arg("--config")
            .arg(&config)
            .args(extra)
            .env_remove("VFIO_MIGD_LOG")
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{extra:?}");
        let err = String::from_utf8_lossy(&output.stderr);
        assert!(
            err.contains("`warning` is not a log level (did you mean `warn`?)")
                && err.contains("trace, debug, info, warn, error, off"),
            "{extra:?}: {err}"
        );
    }
}
