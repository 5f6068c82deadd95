//! The built `vfio-migctl` binary against a daemon served in-process on a temporary
//! socket: output, `--json` parseability and exit codes.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;

use serde_json::Value;
use tokio_util::sync::CancellationToken;
use vfio_migd::api::ApiServer;
use vfio_migd::config::Config;
use vfio_migd::engine::Daemon;
use vfio_migd::job::{Job, JobStatus, Phase, Role};
use vfio_migd::registry::Registry;

struct Served {
    _dir: tempfile::TempDir,
    daemon: Arc<Daemon>,
    peer: std::net::SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), vfio_migd::api::ApiError>>,
}

impl Served {
    async fn start() -> Served {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "state_dir = \"{0}/state\"\n[control]\nsocket = \"{0}/run/control.sock\"\n\
             [handoff]\nsocket = \"{0}/run/handoff.sock\"\n[peer]\nlisten = \"127.0.0.1:0\"\n\
             [simulator]\nallow_remote = true\n",
            dir.path().display()
        );
        let daemon =
            Daemon::new(Config::from_toml(&text, false).unwrap(), Arc::new(Registry::default())).unwrap();
        let server = ApiServer::bind(daemon.clone()).await.unwrap();
        let peer = server.peer_addr().unwrap();
        server.readiness().set_serving().await;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.run(shutdown.clone()));
        Served { _dir: dir, daemon, peer, shutdown, task }
    }

    fn socket(&self) -> PathBuf {
        self.daemon.config.control.socket.clone()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

async fn migctl(socket: &Path, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_vfio-migctl"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .env_remove("VFIO_MIGD_SOCKET")
        .output()
        .await
        .expect("run vfio-migctl")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn json(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", stdout(output)))
}

fn one_line_error(output: &Output) -> String {
    let text = stderr(output);
    assert_eq!(text.trim_end().lines().count(), 1, "one clear line, no backtrace: {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_serving_in_text_and_json() {
    let served = Served::start().await;
    let text = migctl(&served.socket(), &["health"]).await;
    assert_eq!(text.status.code(), Some(0), "{}", stderr(&text));
    assert_eq!(stdout(&text).trim(), "SERVING");
    let as_json = migctl(&served.socket(), &["--json", "health"]).await;
    assert_eq!(json(&as_json)["status"], "SERVING");
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_daemon_exits_5_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("control.sock");
    for args in [&["health"][..], &["devices"], &["--json", "jobs", "list"]] {
        let output = migctl(&missing, args).await;
        assert_eq!(output.status.code(), Some(5), "{args:?}");
        let error = one_line_error(&output);
        assert!(error.contains("cannot reach vfio-migd") && error.contains("control.sock"), "{error}");
    }
    // A socket file nobody listens on.
    drop(std::os::unix::net::UnixListener::bind(&missing).unwrap());
    let output = migctl(&missing, &["health"]).await;
    assert_eq!(output.status.code(), Some(5));
    one_line_error(&output);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_exit_2() {
    let socket = Path::new("/nonexistent/control.sock");
    for args in [
        &["frobnicate"][..],
        &["migrate", "--group", "vm1"],
        &["migrate", "--group", "vm1", "--job-id", "j", "--peer", "h:1", "--map", "nic0"],
        &["migrate", "--group", "vm1", "--job-id", "j", "--peer", "no-port", "--map", "a=b"],
        &["devices", "register", "x"],
        &["resolve", "j1", "--decision", "maybe"],
        &["incoming", "--job-id", "j1"],
    ] {
        let output = migctl(socket, args).await;
        assert_eq!(output.status.code(), Some(2), "{args:?}: {}", stderr(&output));
        assert!(!stderr(&output).contains("panicked"), "{args:?}");
    }
    let help = migctl(socket, &["--help"]).await;
    assert_eq!(help.status.code(), Some(0));
    assert!(stdout(&help).contains("Exit codes"));
    let version = migctl(socket, &["--version"]).await;
    assert_eq!(stdout(&version).trim(), format!("vfio-migctl {}", env!("CARGO_PKG_VERSION")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_refusals_exit_1_with_the_reason() {
    let served = Served::start().await;
    let socket = served.socket();
    let cases: [(&[&str], &str); 4] = [
        (&["devices", "show", "nic0"], "not found: device `nic0` is not registered"),
        (&["groups", "define", "vm1", "ghost"], "`ghost`"),
        (&["migrate", "--group", "vm1", "--dry-run"], "group `vm1` is not defined"),
        (&["jobs", "show", "j9"], "job `j9` not found"),
    ];
    for (args, text) in cases {
        let output = migctl(&socket, args).await;
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        let error = one_line_error(&output);
        assert!(error.contains(text), "{args:?}: {error}");
    }
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_lists_print_and_parse() {
    let served = Served::start().await;
    let socket = served.socket();
    for what in ["devices", "groups", "jobs"] {
        let text = migctl(&socket, &[what]).await;
        assert_eq!(text.status.code(), Some(0));
        assert_eq!(stdout(&text).trim(), format!("no {what}"));
        let as_json = migctl(&socket, &["--json", what, "list"]).await;
        assert_eq!(json(&as_json), Value::Array(vec![]), "{what}");
    }
    served.stop().await;
}

fn insert_job(daemon: &Daemon, id: &str) -> Arc<Job> {
    let job = Job::new(id, Role::Source, "vm1", "10.0.0.2:7410", vec![("nic0".into(), "nic9".into())]);
    daemon.jobs.insert_or_get(job).0
}

/// Drives a job through phases to `status` while the CLI watches it.
async fn watch_to(served: &Served, id: &str, status: JobStatus, extra: &[&str]) -> Output {
    let job = insert_job(&served.daemon, id);
    job.enter_phase(Phase::Handshake);
    let driver = tokio::spawn(async move {
        // Let the watcher attach first; it would see the final state either way.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        job.enter_phase(Phase::Drain);
        let counters = job.counters("nic0").unwrap();
        counters.bytes_total.store(3 << 20, std::sync::atomic::Ordering::Relaxed);
        counters.bytes_done.store(3 << 20, std::sync::atomic::Ordering::Relaxed);
        job.update(|s| s.downtime = Some(std::time::Duration::from_millis(42)));
        let error =
            (status != JobStatus::Succeeded).then(|| "phase drain: nic0: data_fd read failed".to_string());
        job.finish(status, error);
    });
    let mut args = extra.to_vec();
    args.extend(["watch", id]);
    let output = migctl(&served.socket(), &args).await;
    driver.await.unwrap();
    output
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_ends_with_a_summary_and_the_outcome_as_exit_code() {
    let served = Served::start().await;

    let ok = watch_to(&served, "ok", JobStatus::Succeeded, &[]).await;
    assert_eq!(ok.status.code(), Some(0), "{}", stderr(&ok));
    let text = stdout(&ok);
    assert!(text.contains("job ok (source): succeeded"), "{text}");
    assert!(text.contains("moved:    3.00 MiB"), "{text}");
    assert!(text.contains("downtime: 42 ms"), "{text}");
    assert!(text.contains("phases:   handshake"), "{text}");

    let rolled_back = watch_to(&served, "rb", JobStatus::RolledBack, &[]).await;
    assert_eq!(rolled_back.status.code(), Some(3));
    assert!(stdout(&rolled_back).contains("data_fd read failed"));

    let cancelled = watch_to(&served, "cx", JobStatus::Cancelled, &["--json"]).await;
    assert_eq!(cancelled.status.code(), Some(3));
    let job = json(&cancelled);
    assert_eq!(job["status"], "cancelled");
    assert_eq!(job["bytes_done"], 3 << 20);
    assert_eq!(job["devices"][0]["peer_name"], "nic9");

    let in_doubt = watch_to(&served, "id", JobStatus::InDoubt, &[]).await;
    assert_eq!(in_doubt.status.code(), Some(4));
    assert!(stdout(&in_doubt).contains("vfio-migctl resolve id"), "{}", stdout(&in_doubt));

    let failed = watch_to(&served, "f", JobStatus::Failed, &["--json"]).await;
    assert_eq!(failed.status.code(), Some(1));
    assert_eq!(json(&failed)["status"], "failed");

    let listed = migctl(&served.socket(), &["--json", "jobs"]).await;
    let jobs = json(&listed);
    assert_eq!(jobs.as_array().map(Vec::len), Some(5));
    let shown = migctl(&served.socket(), &["jobs", "show", "rb"]).await;
    assert_eq!(shown.status.code(), Some(0));
    assert!(stdout(&shown).contains("rolled_back"));
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_groups_plans_and_handoff_through_the_cli() {
    let served = Served::start().await;
    let socket = served.socket();
    let run = |args: &'static [&'static str]| migctl(&socket, args);

    let registered = run(&[
        "devices",
        "register",
        "nic0",
        "--sim",
        "STOP_COPY|P2P",
        "--state-size",
        "64KiB",
        "--model",
        "sim-nic",
    ])
    .await;
    assert_eq!(registered.status.code(), Some(0), "{}", stderr(&registered));
    assert!(stdout(&registered).contains("identity:    sim/sim-nic"), "{}", stdout(&registered));
    let gpu = run(&["--json", "devices", "register", "gpu0", "--sim", "STOP_COPY|P2P|PRE_COPY"]).await;
    assert_eq!(json(&gpu)["caps"], "STOP_COPY|P2P|PRE_COPY");

    let listed = json(&run(&["--json", "devices"]).await);
    let names: Vec<&str> = listed.as_array().unwrap().iter().map(|d| d["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["gpu0", "nic0"]);
    assert_eq!(listed[1]["state"], "RUNNING");
    let table = stdout(&run(&["devices", "list"]).await);
    assert!(
        table.starts_with("NAME") && table.contains("nic0") && table.contains("STOP_COPY|P2P"),
        "{table}"
    );

    let defined = run(&["groups", "define", "vm1", "nic0", "gpu0"]).await;
    assert_eq!(defined.status.code(), Some(0), "{}", stderr(&defined));
    let plan = json(&run(&["--json", "migrate", "--group", "vm1", "--dry-run"]).await);
    assert_eq!(plan["group"], "vm1");
    assert_eq!(plan["devices"][1]["pre_copy"], true);
    assert!(plan["steps"].as_array().unwrap().len() >= 5);
    let plan_text = stdout(&run(&["migrate", "--group", "vm1", "--dry-run"]).await);
    assert!(plan_text.contains("p2p barrier"), "{plan_text}");

    let handoff_socket = served.daemon.config.handoff.socket.display().to_string();
    let handed = migctl(
        &socket,
        &[
            "handoff",
            "--name",
            "uart0",
            "--sim",
            "STOP_COPY",
            "--group",
            "vm2",
            "--handoff-socket",
            &handoff_socket,
        ],
    )
    .await;
    assert_eq!(handed.status.code(), Some(0), "{}", stderr(&handed));
    assert!(stdout(&handed).starts_with("handed over: uart0"), "{}", stdout(&handed));
    let refused = migctl(
        &socket,
        &["--json", "handoff", "--name", "uart0", "--sim", "STOP_COPY", "--handoff-socket", &handoff_socket],
    )
    .await;
    assert_eq!(refused.status.code(), Some(1));
    let reply = json(&refused);
    assert_eq!(reply["ok"], false);
    assert!(reply["error"].as_str().unwrap().contains("already registered"), "{reply}");

    let groups = json(&run(&["--json", "groups"]).await);
    assert_eq!(groups.as_array().map(Vec::len), Some(2));
    let uart = json(&run(&["--json", "devices", "show", "uart0"]).await);
    assert_eq!((uart["backend"].as_str(), uart["group"].as_str()), (Some("handoff"), Some("vm2")));

    let busy = run(&["devices", "release", "nic0"]).await;
    assert_eq!(busy.status.code(), Some(1));
    assert!(one_line_error(&busy).contains("belongs to group `vm1`"));
    assert_eq!(run(&["groups", "delete", "vm1"]).await.status.code(), Some(0));
    let released = run(&["--json", "devices", "release", "nic0"]).await;
    assert_eq!(json(&released)["released"], "nic0");
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_between_two_daemons_is_followed_to_its_outcome() {
    let source = Served::start().await;
    let destination = Served::start().await;
    let register = |served: &Served, name: &'static str, caps: &'static str, model: &'static str| {
        let socket = served.socket();
        async move {
            let args =
                ["devices", "register", name, "--sim", caps, "--state-size", "256KiB", "--model", model];
            let out = migctl(&socket, &args).await;
            assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        }
    };
    for served in [&source, &destination] {
        register(served, "nic0", "STOP_COPY|P2P|PRE_COPY", "sim-nic").await;
        register(served, "gpu0", "STOP_COPY|P2P", "sim-gpu").await;
    }
    register(&destination, "gpu1", "STOP_COPY|P2P", "other-gpu").await;
    let src = source.socket();
    let dst = destination.socket();
    assert_eq!(migctl(&src, &["groups", "define", "vm1", "nic0", "gpu0"]).await.status.code(), Some(0));
    let peer = destination.peer.to_string();

    // `migrate` of group vm1 to the destination as job `job`, with gpu0 mapped by `gpu_map`.
    let migrate_vm1 = |json: bool, job: &'static str, gpu_map: &'static str| {
        let mut args = vec!["migrate", "--job-id", job, "--group", "vm1", "--peer", &peer];
        args.extend(["--map", "nic0=nic0", "--map", gpu_map]);
        if json {
            args.insert(0, "--json");
        }
        args
    };
    // A destination device of another model: the handshake refuses, the source rolls back.
    assert_eq!(migctl(&dst, &["incoming", "--job-id", "j2", "nic0", "gpu1"]).await.status.code(), Some(0));
    let refused = migctl(&src, &migrate_vm1(false, "j2", "gpu0=gpu1")).await;
    assert_eq!(refused.status.code(), Some(3), "{}{}", stdout(&refused), stderr(&refused));
    assert!(stdout(&refused).contains("rolled_back"), "{}", stdout(&refused));

    // A refused destination job keeps its devices until it is cancelled.
    assert_eq!(migctl(&dst, &["cancel", "j2"]).await.status.code(), Some(0));
    let prepared = migctl(&dst, &["--json", "incoming", "--job-id", "j1", "nic0", "gpu0"]).await;
    assert_eq!(json(&prepared)["role"], "destination");
    let moved = migctl(&src, &migrate_vm1(true, "j1", "gpu0=gpu0")).await;
    assert_eq!(moved.status.code(), Some(0), "{}{}", stdout(&moved), stderr(&moved));
    let job = json(&moved);
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["bytes_done"], job["bytes_total"]);
    assert!(job["downtime_ns"].as_u64().unwrap() > 0);
    let digest = |socket: PathBuf, name: &'static str| async move {
        json(&migctl(&socket, &["--json", "devices", "show", name]).await)["content_digest"].clone()
    };
    assert_eq!(
        digest(src.clone(), "nic0").await,
        digest(dst.clone(), "nic0").await,
        "the state arrived intact"
    );

    // The group migrated away: its devices are never claimed again (they hold a state
    // that runs on the destination now), and the refusal says so.
    let again = migctl(&src, &migrate_vm1(false, "j3", "gpu0=gpu1")).await;
    assert_ne!(again.status.code(), Some(0), "{}{}", stdout(&again), stderr(&again));
    assert!(stderr(&again).contains("migrated away in job `j1`"), "{}", stderr(&again));
    source.stop().await;
    destination.stop().await;
}

/// Registers a simulated device whose DMA logging, once started, writes `iovas` (one
/// 4 KiB page each); without `logging` the driver has no DMA logging at all.
fn add_dma_device(daemon: &Daemon, name: &str, logging: bool, iovas: &[u64]) {
    use vfio_migd::device::sim::{SimDevice, SimSpec};
    let mut spec = SimSpec::new(name);
    spec.state_size = 64 * 1024;
    spec.dma_logging.supported = logging;
    spec.dma_logging.writes.iovas = iovas.to_vec();
    let device = Arc::new(SimDevice::new(spec).unwrap());
    daemon.registry.add_device(device, vfio_migd::registry::Backend::Sim).unwrap();
}

fn runs(value: &Value) -> Vec<(u64, u64)> {
    value["runs"]
        .as_array()
        .unwrap_or_else(|| panic!("no runs: {value}"))
        .iter()
        .map(|r| (r["iova"].as_u64().unwrap(), r["length"].as_u64().unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dirty_tracking_is_started_read_and_stopped_through_the_cli() {
    const GIB: u64 = 1 << 30;
    let served = Served::start().await;
    let socket = served.socket();
    add_dma_device(&served.daemon, "nic0", true, &[0x1000, 0x5000]);
    add_dma_device(&served.daemon, "gpu0", true, &[0x5000, GIB + 0x2000]);
    add_dma_device(&served.daemon, "uart0", false, &[0x9000]);
    let defined = migctl(&socket, &["groups", "define", "vm1", "nic0", "gpu0", "uart0"]).await;
    assert_eq!(defined.status.code(), Some(0), "{}", stderr(&defined));

    // Refusals: usage errors exit 2 before anything is sent, the daemon's exit 1.
    for (args, text) in [
        (&["dirty", "start", "vm1", "--range", "4096"][..], "IOVA:LENGTH"),
        (&["dirty", "start", "vm1", "--range", "0:0"], "must not be zero"),
        (&["dirty", "start", "vm1", "--range", "0:12parsecs"], "unknown size unit"),
        (&["dirty", "start", "vm1", "--range", "0xffffffffffffffff:2"], "64-bit"),
        (&["dirty", "start", "vm1"], "--range"),
        (&["dirty", "pages"], "GROUP"),
    ] {
        let output = migctl(&socket, args).await;
        assert_eq!(output.status.code(), Some(2), "{args:?}: {}", stderr(&output));
        assert!(stderr(&output).contains(text), "{args:?}: {}", stderr(&output));
    }
    for (args, text) in [
        (&["dirty", "start", "ghost", "--range", "0:1GiB"][..], "not found: group `ghost` is not defined"),
        (&["dirty", "status", "ghost"], "not found: group `ghost`"),
        (&["dirty", "stop", "vm1"], "failed precondition: group `vm1`: dirty tracking is not started"),
        (&["dirty", "pages", "vm1"], "failed precondition: group `vm1`: dirty tracking is not started"),
        (&["dirty", "start", "vm1", "--range", "0:1GiB", "--page-size", "3000"], "invalid argument"),
    ] {
        let output = migctl(&socket, args).await;
        assert_eq!(output.status.code(), Some(1), "{args:?}: {}", stdout(&output));
        let error = one_line_error(&output);
        assert!(error.contains(text), "{args:?}: {error}");
    }
    let status = migctl(&socket, &["dirty", "status", "vm1"]).await;
    assert_eq!(stdout(&status), "group vm1: dirty tracking is not started\n");

    let started = migctl(
        &socket,
        &["--json", "dirty", "start", "vm1", "--range", "0:64MiB", "--range", "0x40000000:16MiB"],
    )
    .await;
    assert_eq!(started.status.code(), Some(0), "{}", stderr(&started));
    let tracking = json(&started);
    assert_eq!(tracking["active"], true);
    assert_eq!(tracking["page_size"], 4096);
    assert_eq!(tracking["ranges"][1]["iova"], GIB);
    let again = migctl(&socket, &["dirty", "start", "vm1", "--range", "0:64MiB"]).await;
    assert_eq!(again.status.code(), Some(1));
    assert!(one_line_error(&again).contains("already started"));

    // Status names each device's source, and why a device is not covered.
    let status = migctl(&socket, &["dirty", "status", "vm1"]).await;
    assert_eq!(status.status.code(), Some(0), "{}", stderr(&status));
    let text = stdout(&status);
    assert!(text.starts_with("group vm1: dirty tracking active, 4.00 KiB pages, 80.00 MiB"), "{text}");
    let line = |device: &str| text.lines().find(|l| l.contains(device)).unwrap_or_else(|| panic!("{text}"));
    assert!(line("nic0").contains("dma-logging"), "{text}");
    assert!(line("gpu0").contains("dma-logging"), "{text}");
    assert!(line("uart0").contains("none") && line("uart0").contains("DMA logging"), "{text}");
    let sources = json(&migctl(&socket, &["--json", "dirty", "status", "vm1"]).await);
    let sources: Vec<(&str, &str)> = sources["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["device"].as_str().unwrap(), d["source"].as_str().unwrap()))
        .collect();
    assert_eq!(sources, [("nic0", "dma-logging"), ("gpu0", "dma-logging"), ("uart0", "none")]);

    // Exactly the pages the devices wrote, once: reading clears them.
    let pages = migctl(&socket, &["--json", "dirty", "pages", "vm1"]).await;
    assert_eq!(pages.status.code(), Some(0), "{}", stderr(&pages));
    let pages = json(&pages);
    assert_eq!(pages["dirty_pages"], 3);
    assert_eq!(runs(&pages), [(0x1000, 4096), (0x5000, 4096), (GIB + 0x2000, 4096)]);
    let cleared = json(&migctl(&socket, &["--json", "dirty", "pages", "vm1"]).await);
    assert_eq!(cleared["dirty_pages"], 0);
    assert_eq!(runs(&cleared), []);
    let text = stdout(&migctl(&socket, &["dirty", "pages", "vm1"]).await);
    assert!(text.starts_with("group vm1: 0 dirty page(s)"), "{text}");

    // A running job of the group shows each device's statistics.
    let job = Job::new("jd", Role::Source, "vm1", "10.0.0.2:7410", vec![("nic0".into(), "nic9".into())]);
    let job = served.daemon.jobs.insert_or_get(job).0;
    let shown = migctl(&socket, &["jobs", "show", "jd"]).await;
    let text = stdout(&shown);
    assert!(text.contains("dirty tracking:"), "{text}");
    let nic = text.lines().find(|l| l.contains("nic0") && l.contains("dma-logging")).expect(&text);
    assert!(nic.contains("4.00 KiB"), "{nic}");
    let shown = json(&migctl(&socket, &["--json", "jobs", "show", "jd"]).await);
    assert_eq!(shown["dirty_tracking"][0]["device"], "nic0");
    assert_eq!(shown["dirty_tracking"][0]["dirty_pages"], 2);
    assert_eq!(shown["dirty_tracking"][0]["reports"], 3);
    job.finish(JobStatus::Succeeded, None);

    let stopped = migctl(&socket, &["dirty", "stop", "vm1"]).await;
    assert_eq!(stopped.status.code(), Some(0), "{}", stderr(&stopped));
    assert!(stdout(&stopped).starts_with("group vm1: dirty tracking stopped"), "{}", stdout(&stopped));
    let stopped_again = migctl(&socket, &["--json", "dirty", "stop", "vm1"]).await;
    assert_eq!(stopped_again.status.code(), Some(1));
    assert!(one_line_error(&stopped_again).contains("not started"));
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dirty_pages_go_to_a_file_as_json_lines() {
    let served = Served::start().await;
    let socket = served.socket();
    add_dma_device(&served.daemon, "nic0", true, &[0x3000, 0x4000, 0x8000]);
    assert_eq!(migctl(&socket, &["groups", "define", "vm1", "nic0"]).await.status.code(), Some(0));
    let dir = tempfile::tempdir().unwrap();

    // A file that cannot be created fails before the pages are read (and cleared).
    assert_eq!(migctl(&socket, &["dirty", "start", "vm1", "--range", "0:1MiB"]).await.status.code(), Some(0));
    let missing = dir.path().join("no/such/dir/pages.jsonl");
    let refused = migctl(&socket, &["dirty", "pages", "vm1", "--output", missing.to_str().unwrap()]).await;
    assert_eq!(refused.status.code(), Some(1));
    assert!(one_line_error(&refused).contains("cannot create"));

    let file = dir.path().join("pages.jsonl");
    let written = migctl(&socket, &["dirty", "pages", "vm1", "--output", file.to_str().unwrap()]).await;
    assert_eq!(written.status.code(), Some(0), "{}", stderr(&written));
    let text = stdout(&written);
    assert!(text.starts_with("group vm1: 3 dirty page(s)") && text.contains("2 run(s)"), "{text}");
    assert!(text.contains("pages.jsonl"), "{text}");
    let lines: Vec<Value> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(
        lines,
        [
            serde_json::json!({ "iova": 0x3000, "length": 0x2000 }),
            serde_json::json!({ "iova": 0x8000, "length": 0x1000 })
        ]
    );
    let summary = json(
        &migctl(&socket, &["--json", "dirty", "pages", "vm1", "--output", file.to_str().unwrap()]).await,
    );
    assert_eq!(summary["dirty_pages"], 0);
    assert_eq!(summary["output"], file.to_str().unwrap());
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "");
    assert_eq!(migctl(&socket, &["dirty", "stop", "vm1"]).await.status.code(), Some(0));
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_and_man_pages_are_generated() {
    let nowhere = Path::new("/nonexistent/control.sock");
    for (shell, marker) in
        [("bash", "complete -F"), ("zsh", "#compdef vfio-migctl"), ("fish", "complete -c vfio-migctl")]
    {
        let output = migctl(nowhere, &["completions", shell]).await;
        assert_eq!(output.status.code(), Some(0), "{shell}: {}", stderr(&output));
        let script = stdout(&output);
        assert!(script.contains(marker), "{shell}: no `{marker}`");
        assert!(script.contains("migrate") && script.contains("job-id"), "{shell}: subcommands and flags");
    }
    let dir = tempfile::tempdir().unwrap();
    let man = dir.path().join("man1");
    let output = migctl(nowhere, &["man", man.to_str().unwrap()]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let page = std::fs::read_to_string(man.join("vfio-migctl.1")).expect("vfio-migctl.1");
    assert!(page.starts_with(".ie") || page.contains(".TH vfio-migctl 1"), "{page}");
    assert!(page.contains("Exit codes"), "the page carries the exit codes");
    let migrate = std::fs::read_to_string(man.join("vfio-migctl-migrate.1")).expect("a page per subcommand");
    assert!(migrate.contains("job\\-id"), "{migrate}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_device_options_without_sim_are_refused() {
    let nowhere = Path::new("/nonexistent/control.sock");
    let output = migctl(
        nowhere,
        &["devices", "register", "x", "--cdev", "/dev/vfio/devices/vfio0", "--state-size", "3000"],
    )
    .await;
    assert_eq!(output.status.code(), Some(2));
    let error = one_line_error(&output);
    assert!(error.contains("--state-size") && error.contains("need --sim"), "{error}");
}
