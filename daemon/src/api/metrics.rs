//! Prometheus metrics over HTTP (`[metrics] listen`, off by default): what a fleet's
//! monitoring alerts on. Jobs in doubt need an operator; rolled-back and failed jobs, the
//! downtime distribution and bytes moved show how migrations go; dirty tracking shows
//! which devices are covered and whether their reports fail.
//!
//! Every value is read from the daemon's tables as they are: a scrape never waits for a
//! device, a migration step or a dirty report round.
//!
//! Bytes moved are counted while jobs run: each scrape adds what every job moved since
//! the previous scrape to the counter of the job's role and its phase at that scrape
//! ([`ByteCounters`]), so a scrape in the middle of a migration shows the bytes moving and
//! the counter never goes down when a job ends. The phase is the one the job is in when
//! the scrape sees the bytes: with a scrape interval longer than a phase, bytes land in a
//! later phase. Bytes a job moved after the last scrape that saw it, and before the table
//! forgot it (`migration.retained_jobs`), are not counted.
//!
//! `process_*` figures follow Prometheus' client conventions and come from `/proc/self`.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::engine::Daemon;
use crate::engine::dirty::DeviceCoverage;
use crate::job::{DOWNTIME_BUCKETS, JobStatus, Phase, Role};

/// The text exposition format's media type.
pub const CONTENT_TYPE_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A client that sends no complete request header within this time is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `GET /metrics` on `listener` until `shutdown`; open connections finish the
/// request they are on.
pub async fn serve(listener: TcpListener, daemon: Arc<Daemon>, shutdown: CancellationToken) {
    let bytes = Arc::new(ByteCounters::default());
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of fds, most likely: let the other listeners breathe.
                    tracing::warn!(error = %e, "metrics listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let daemon = daemon.clone();
        let shutdown = shutdown.clone();
        let bytes = bytes.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let response = respond(&daemon, &bytes, &request);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let served = tokio::select! {
                served = connection.as_mut() => served,
                () = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = served {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
}

fn respond(daemon: &Daemon, bytes: &ByteCounters, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let reply = |status, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response
    };
    if request.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, "vfio-migd serves its metrics at /metrics\n".to_owned());
    }
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        let mut response = reply(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".to_owned());
        response.headers_mut().insert(ALLOW, "GET, HEAD".parse().expect("a valid header value"));
        return response;
    }
    let mut response = reply(StatusCode::OK, render(daemon, bytes));
    response.headers_mut().insert(CONTENT_TYPE, CONTENT_TYPE_TEXT.parse().expect("a valid header value"));
    response
}

/// Device-state bytes moved, by role and phase, counted as scrapes see jobs progress.
#[derive(Debug, Default)]
pub struct ByteCounters {
    inner: Mutex<ByteCountersInner>,
}

#[derive(Debug, Default)]
struct ByteCountersInner {
    /// What each job in the table had moved at the previous scrape.
    seen: HashMap<String, u64>,
    moved: BTreeMap<(Role, Phase), u64>,
}

impl ByteCounters {
    /// Adds what every job moved since the previous call; returns the counters.
    pub fn update(&self, daemon: &Daemon) -> BTreeMap<(Role, Phase), u64> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let ByteCountersInner { seen, moved } = &mut *inner;
        let mut still_listed = HashMap::new();
        for job in daemon.jobs.list() {
            let snapshot = job.snapshot();
            let done = snapshot.bytes_done();
            let before = seen.get(&snapshot.job_id).copied().unwrap_or(0);
            // A job's byte count only grows; if it ever went back, count nothing.
            *moved.entry((snapshot.role, snapshot.phase)).or_default() += done.saturating_sub(before);
            still_listed.insert(snapshot.job_id, done.max(before));
        }
        *seen = still_listed;
        moved.clone()
    }
}

/// The daemon's metrics in the Prometheus text format.
pub fn render(daemon: &Daemon, bytes: &ByteCounters) -> String {
    let mut out = Metrics::default();
    process_metrics(&mut out);

    out.family("vfio_migd_build_info", "gauge", "The running vfio-migd's version.");
    out.sample("vfio_migd_build_info", &[("version", env!("CARGO_PKG_VERSION"))], 1);

    let devices = daemon.registry.devices();
    out.family("vfio_migd_devices", "gauge", "Devices registered, by backend.");
    let mut backends: Vec<&str> = devices.iter().map(|(_, d)| d.backend.as_str()).collect();
    backends.sort_unstable();
    backends.dedup();
    for backend in backends {
        let count = devices.iter().filter(|(_, d)| d.backend.as_str() == backend).count();
        out.sample("vfio_migd_devices", &[("backend", backend)], count);
    }
    out.family("vfio_migd_devices_in_jobs", "gauge", "Registered devices a job is using.");
    let in_jobs = devices.iter().filter(|(name, _)| daemon.registry.job_of(name).is_some()).count();
    out.sample("vfio_migd_devices_in_jobs", &[], in_jobs);
    out.family("vfio_migd_groups", "gauge", "Device groups defined.");
    out.sample("vfio_migd_groups", &[], daemon.registry.groups().len());

    let snapshots: Vec<_> = daemon.jobs.list().iter().map(|job| job.snapshot()).collect();
    out.family(
        "vfio_migd_jobs",
        "gauge",
        "Jobs not ended, by role and status. A job in doubt holds its devices stopped until \
         an operator or control plane resolves it (ResolveJob).",
    );
    for role in [Role::Source, Role::Destination] {
        for status in [JobStatus::Running, JobStatus::InDoubt] {
            let count = snapshots.iter().filter(|s| s.role == role && s.status == status).count();
            out.sample("vfio_migd_jobs", &[("role", role.as_str()), ("status", status.as_str())], count);
        }
    }

    let totals = daemon.jobs.totals();
    out.family(
        "vfio_migd_jobs_ended_total",
        "counter",
        "Jobs ended since the daemon started, by role and status.",
    );
    for ((role, status), count) in &totals.ended {
        out.sample(
            "vfio_migd_jobs_ended_total",
            &[("role", role.as_str()), ("status", status.as_str())],
            count,
        );
    }
    out.family(
        "vfio_migd_migrated_bytes_total",
        "counter",
        "Device-state bytes moved since the daemon started, by role and by the phase the job \
         was in when a scrape saw them (counted while jobs run).",
    );
    for ((role, phase), moved) in bytes.update(daemon) {
        out.sample(
            "vfio_migd_migrated_bytes_total",
            &[("role", role.as_str()), ("phase", phase.as_str())],
            moved,
        );
    }
    out.family(
        "vfio_migd_downtime_seconds",
        "histogram",
        "Downtime of the successful source migrations: from the P2P barrier to the \
         destination's commit.",
    );
    let mut cumulative = 0;
    for (bound, count) in DOWNTIME_BUCKETS.iter().zip(&totals.downtime_buckets) {
        cumulative += count;
        out.sample("vfio_migd_downtime_seconds_bucket", &[("le", &bound.to_string())], cumulative);
    }
    out.sample("vfio_migd_downtime_seconds_bucket", &[("le", "+Inf")], totals.downtime_count);
    out.sample("vfio_migd_downtime_seconds_sum", &[], totals.downtime_sum.as_secs_f64());
    out.sample("vfio_migd_downtime_seconds_count", &[], totals.downtime_count);

    let tracked = daemon.published_dirty_tracking();
    out.family("vfio_migd_dirty_tracking_active", "gauge", "Whether a group's dirty tracking is on.");
    for status in &tracked {
        out.sample("vfio_migd_dirty_tracking_active", &[("group", &status.group)], u8::from(status.active));
    }
    out.family(
        "vfio_migd_dirty_tracking_covered",
        "gauge",
        "Whether a device of a tracked group is covered, by source (dma-logging, \
         iommufd-hwpt, or none: its DMA writes are not seen).",
    );
    for status in &tracked {
        for device in &status.devices {
            let labels =
                [("group", status.group.as_str()), ("device", &device.device), ("source", device.source)];
            out.sample("vfio_migd_dirty_tracking_covered", &labels, u8::from(device.source != "none"));
        }
    }
    // Counters that start again from zero when a group's tracking is started again
    // (Prometheus' rate() takes that as a counter reset).
    let per_device: [(&str, &str, DeviceFigure); 3] = [
        (
            "vfio_migd_dirty_pages_total",
            "Dirty pages a device's source reported since tracking started.",
            |d| d.dirty_pages,
        ),
        (
            "vfio_migd_dirty_reports_total",
            "Dirty reports read from a device's source since tracking started.",
            |d| d.reports,
        ),
        (
            "vfio_migd_dirty_report_errors_total",
            "Failed dirty reports of a device's source since tracking started (each one marks the \
             source's whole range dirty).",
            |d| d.report_errors,
        ),
    ];
    for (name, help, value) in per_device {
        out.family(name, "counter", help);
        for status in &tracked {
            for device in &status.devices {
                out.sample(name, &[("group", &status.group), ("device", &device.device)], value(device));
            }
        }
    }
    out.text
}

/// The standard `process_*` metrics of Prometheus' client libraries, from `/proc/self`
/// (proc(5)). A figure that cannot be read is left out rather than shown as zero.
fn process_metrics(out: &mut Metrics) {
    let stat = ProcessStat::read();
    if let Some(stat) = &stat {
        out.family("process_cpu_seconds_total", "counter", "User and system CPU time spent, in seconds.");
        out.sample("process_cpu_seconds_total", &[], stat.cpu_seconds);
    }
    if let Some(rss) = resident_bytes() {
        out.family("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.");
        out.sample("process_resident_memory_bytes", &[], rss);
    }
    if let Some(stat) = &stat {
        out.family("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.");
        out.sample("process_virtual_memory_bytes", &[], stat.virtual_bytes);
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        out.family("process_open_fds", "gauge", "Number of open file descriptors.");
        out.sample("process_open_fds", &[], fds.count());
    }
    if let Ok((soft, _)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
        out.family("process_max_fds", "gauge", "Maximum number of open file descriptors.");
        out.sample("process_max_fds", &[], soft);
    }
    if let Some(stat) = &stat {
        if let Some(start) = stat.start_time_seconds {
            out.family(
                "process_start_time_seconds",
                "gauge",
                "Start time of the process since unix epoch in seconds.",
            );
            out.sample("process_start_time_seconds", &[], start);
        }
        out.family("process_threads", "gauge", "Number of OS threads in the process.");
        out.sample("process_threads", &[], stat.threads);
    }
}

/// What `/proc/self/stat` says about the process.
struct ProcessStat {
    cpu_seconds: f64,
    virtual_bytes: u64,
    threads: u64,
    start_time_seconds: Option<f64>,
}

impl ProcessStat {
    fn read() -> Option<ProcessStat> {
        let text = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The command name is in parentheses and may hold spaces: fields count from the
        // last ')'; the first after it is field 3 (state).
        let rest = &text[text.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
        let ticks = rustix::param::clock_ticks_per_second() as f64;
        let boot_time = std::fs::read_to_string("/proc/stat").ok().and_then(|stat| {
            stat.lines().find_map(|line| line.strip_prefix("btime ")?.trim().parse::<u64>().ok())
        });
        Some(ProcessStat {
            cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
            threads: field(20)?,
            start_time_seconds: boot_time.and_then(|boot| Some(boot as f64 + field(22)? as f64 / ticks)),
            virtual_bytes: field(23)?,
        })
    }
}

/// Resident set size: `/proc/self/statm`'s second field, in pages.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * rustix::param::page_size() as u64)
}

/// One figure of a tracked device's statistics.
type DeviceFigure = fn(&DeviceCoverage) -> u64;

#[derive(Default)]
struct Metrics {
    text: String,
}

impl Metrics {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {}", help.replace('\\', "\\\\").replace('\n', "\\n"));
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (label, text)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let escaped = text.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
                let _ = write!(self.text, "{label}=\"{escaped}\"");
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::config::Config;
    use crate::device::IovaRange;
    use crate::device::sim::{SimDevice, SimSpec};
    use crate::job::Job;
    use crate::registry::{Backend, GroupDef, Registry};

    fn daemon(dir: &std::path::Path) -> Arc<Daemon> {
        let config = Config::from_toml(&format!("state_dir = \"{}\"\n", dir.display()), false).unwrap();
        let registry = Arc::new(Registry::default());
        for (name, logging) in [("nic0", true), ("uart0", false)] {
            let mut spec = SimSpec::new(name);
            spec.state_size = 4096;
            spec.dma_logging.supported = logging;
            registry.add_device(Arc::new(SimDevice::new(spec).unwrap()), Backend::Sim).unwrap();
        }
        registry
            .define_group(GroupDef {
                name: "vm \"1\"".into(),
                devices: vec!["nic0".into(), "uart0".into()],
                allow_multiple_non_p2p: true,
            })
            .unwrap();
        Daemon::new(config, registry).unwrap()
    }

    /// A job of `role` that moved `bytes` and ended with `status` after `downtime`.
    fn ended(
        daemon: &Daemon,
        id: &str,
        role: Role,
        status: JobStatus,
        bytes: u64,
        downtime: Option<Duration>,
    ) {
        let job = Job::new(id, role, "vm \"1\"", "", vec![("nic0".into(), "dst-nic0".into())]);
        daemon.jobs.insert_or_get(job.clone());
        job.counters("nic0").unwrap().bytes_done.store(bytes, Ordering::Relaxed);
        job.update(|s| s.downtime = downtime);
        job.finish(status, None);
        daemon.jobs.retire(id);
    }

    fn lines(text: &str) -> Vec<&str> {
        text.lines().filter(|line| !line.starts_with('#')).collect()
    }

    #[test]
    fn bytes_move_while_a_job_runs_and_never_go_back() {
        let dir = tempfile::tempdir().unwrap();
        let daemon = daemon(dir.path());
        let bytes = ByteCounters::default();
        let job = Job::new("live", Role::Source, "vm \"1\"", "", vec![("nic0".into(), "dst-nic0".into())]);
        daemon.jobs.insert_or_get(job.clone());
        let counter = job.counters("nic0").unwrap();
        let moved = |bytes: &ByteCounters, phase| bytes.update(&daemon).get(&(Role::Source, phase)).copied();
        job.enter_phase(Phase::PreCopy);
        counter.bytes_done.store(1000, Ordering::Relaxed);
        assert_eq!(moved(&bytes, Phase::PreCopy), Some(1000));
        counter.bytes_done.store(2500, Ordering::Relaxed);
        assert_eq!(moved(&bytes, Phase::PreCopy), Some(2500));
        job.enter_phase(Phase::Drain);
        counter.bytes_done.store(4000, Ordering::Relaxed);
        assert_eq!(moved(&bytes, Phase::Drain), Some(1500));
        assert_eq!(moved(&bytes, Phase::PreCopy), Some(2500));
        // The job ends and leaves the table: the counters stay where they were.
        job.finish(JobStatus::Succeeded, None);
        assert_eq!(moved(&bytes, Phase::Drain), Some(1500));
        let text = render(&daemon, &bytes);
        assert!(
            text.contains("vfio_migd_migrated_bytes_total{role=\"source\",phase=\"drain\"} 1500"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn the_metrics_add_up_what_the_daemon_did() {
        let dir = tempfile::tempdir().unwrap();
        let daemon = daemon(dir.path());
        ended(&daemon, "a", Role::Source, JobStatus::Succeeded, 1000, Some(Duration::from_millis(3)));
        ended(&daemon, "b", Role::Source, JobStatus::Succeeded, 500, Some(Duration::from_millis(40)));
        ended(&daemon, "c", Role::Source, JobStatus::RolledBack, 20, None);
        ended(&daemon, "d", Role::Destination, JobStatus::Succeeded, 1500, None);
        // Retiring again (a retried call) counts nothing twice.
        daemon.jobs.retire("a");
        let running = Job::new("e", Role::Source, "vm \"1\"", "", vec![]);
        daemon.jobs.insert_or_get(running);
        let doubt = Job::new("f", Role::Destination, "", "", vec![]);
        daemon.jobs.insert_or_get(doubt.clone());
        doubt.finish(JobStatus::InDoubt, Some("phase loaded: no word from the source".into()));
        daemon
            .start_dirty_tracking("vm \"1\"", vec![IovaRange { iova: 0, length: 1 << 20 }], 0)
            .await
            .unwrap();

        let bytes = ByteCounters::default();
        let text = render(&daemon, &bytes);
        let shown = lines(&text);
        for expected in [
            "vfio_migd_devices{backend=\"sim\"} 2",
            "vfio_migd_devices_in_jobs 0",
            "vfio_migd_groups 1",
            "vfio_migd_jobs{role=\"source\",status=\"running\"} 1",
            "vfio_migd_jobs{role=\"source\",status=\"in_doubt\"} 0",
            "vfio_migd_jobs{role=\"destination\",status=\"in_doubt\"} 1",
            "vfio_migd_jobs_ended_total{role=\"source\",status=\"succeeded\"} 2",
            "vfio_migd_jobs_ended_total{role=\"source\",status=\"rolled_back\"} 1",
            "vfio_migd_jobs_ended_total{role=\"destination\",status=\"succeeded\"} 1",
            "vfio_migd_migrated_bytes_total{role=\"source\",phase=\"done\"} 1520",
            "vfio_migd_migrated_bytes_total{role=\"destination\",phase=\"done\"} 1500",
            "vfio_migd_downtime_seconds_bucket{le=\"0.0025\"} 0",
            "vfio_migd_downtime_seconds_bucket{le=\"0.005\"} 1",
            "vfio_migd_downtime_seconds_bucket{le=\"0.025\"} 1",
            "vfio_migd_downtime_seconds_bucket{le=\"0.05\"} 2",
            "vfio_migd_downtime_seconds_bucket{le=\"10\"} 2",
            "vfio_migd_downtime_seconds_bucket{le=\"+Inf\"} 2",
            "vfio_migd_downtime_seconds_sum 0.043",
            "vfio_migd_downtime_seconds_count 2",
            // Label values are escaped.
            "vfio_migd_dirty_tracking_active{group=\"vm \\\"1\\\"\"} 1",
            "vfio_migd_dirty_tracking_covered{group=\"vm \\\"1\\\"\",device=\"nic0\",source=\"dma-logging\"} 1",
            "vfio_migd_dirty_tracking_covered{group=\"vm \\\"1\\\"\",device=\"uart0\",source=\"none\"} 0",
            "vfio_migd_dirty_report_errors_total{group=\"vm \\\"1\\\"\",device=\"nic0\"} 0",
        ] {
            assert!(shown.contains(&expected), "missing `{expected}` in:\n{text}");
        }
        // Every sample belongs to a family announced before it, once.
        let mut announced = Vec::new();
        for line in text.lines() {
            if let Some(family) = line.strip_prefix("# TYPE ") {
                let name = family.split(' ').next().unwrap();
                assert!(!announced.contains(&name), "{name} announced twice");
                announced.push(name);
            } else if !line.starts_with("# HELP ") {
                let name = line.split(['{', ' ']).next().unwrap();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix).filter(|f| announced.contains(f)))
                    .unwrap_or(name);
                assert_eq!(announced.last(), Some(&family), "`{line}` outside its family");
                let value = line.rsplit(' ').next().unwrap();
                assert!(value.parse::<f64>().is_ok(), "`{line}`: not a number");
            }
        }
        for process in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_max_fds ",
            "process_start_time_seconds ",
            "process_threads ",
        ] {
            assert!(shown.iter().any(|line| line.starts_with(process)), "missing {process}in:\n{text}");
        }
        daemon.stop_dirty_tracking("vm \"1\"").await.unwrap();
        assert!(
            lines(&render(&daemon, &bytes))
                .iter()
                .all(|line| !line.starts_with("vfio_migd_dirty_tracking_active"))
        );
    }
}
