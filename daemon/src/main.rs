//! `vfio-migd`: the daemon. Loads the configuration, opens the configured devices, serves
//! the control socket, the fd handoff socket, the peer listener and (when configured) the
//! metrics listener until SIGTERM/SIGINT. SIGHUP reads the configuration again and puts
//! in force what can change live (see `vfio_migd::reload`).
//!
//! Exit codes: 0 after a clean stop, 1 when the daemon fails while starting or running,
//! 2 for a bad command line or configuration.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use sd_notify::NotifyState;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use vfio_migd::api::{ApiServer, drain_jobs};
use vfio_migd::config::{Config, DEFAULT_CONFIG_PATH, DeviceConfig};
use vfio_migd::device::open::open_all_configured;
use vfio_migd::engine::Daemon;
use vfio_migd::registry::Registry;
use vfio_migd::reload::{Outcome, Reloader, RestartOnly};
use vfio_migd::systemd;
use vfio_migd::telemetry::LogHandle;

/// How long a stop waits for running jobs to end on their own, then for the cancelled
/// ones to roll back; together below the unit's TimeoutStopSec (330 s).
const JOBS_FINISH: Duration = Duration::from_secs(240);
const JOBS_ROLL_BACK: Duration = Duration::from_secs(60);

#[derive(Debug, Parser)]
#[command(
    name = "vfio-migd",
    version,
    about = "Live-migration daemon for groups of VFIO devices",
    after_help = "Environment:\n  VFIO_MIGD__<SECTION>__<KEY>  overrides a configuration key \
                  (e.g. VFIO_MIGD__PEER__LISTEN=0.0.0.0:7410)\n  VFIO_MIGD_LOG                \
                  overrides log.level (tracing filter syntax)"
)]
struct Args {
    #[arg(long, value_name = "PATH", help = format!("Configuration file (TOML) [default: {DEFAULT_CONFIG_PATH}, optional]"))]
    config: Option<PathBuf>,
    /// Accept the test-only `[test]` section (fault injection). Never in production.
    #[arg(long)]
    allow_test_faults: bool,
    /// Load and check the configuration, print a summary, and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match Config::load(args.config.as_deref(), args.allow_test_faults) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("vfio-migd: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        if let Err(e) = vfio_migd::telemetry::filter(&config.log) {
            eprintln!("vfio-migd: {e}");
            return ExitCode::from(2);
        }
        if let Some(tls) = &config.peer.tls
            && let Err(e) = vfio_migd::tls::load_material(tls)
        {
            eprintln!("vfio-migd: {e}");
            return ExitCode::from(2);
        }
        print!("{}", summary(&config));
        return ExitCode::SUCCESS;
    }
    let log = match vfio_migd::telemetry::init(&config.log) {
        Ok(log) => Arc::new(log),
        Err(e) => {
            eprintln!("vfio-migd: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime =
        match tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("vfio-migd").build() {
            Ok(runtime) => runtime,
            Err(e) => {
                eprintln!("vfio-migd: cannot start the async runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
    match runtime.block_on(run(config, &args, log)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The subscriber writes to stderr: this is the one line the operator sees, so
            // it is printed even where the log filter would hide errors (`level = "off"`).
            if tracing::enabled!(tracing::Level::ERROR) {
                tracing::error!("{e:#}");
            } else {
                eprintln!("vfio-migd: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config, args: &Args, log: Arc<LogHandle>) -> anyhow::Result<()> {
    // Before anything else: SIGHUP's default action would kill the daemon.
    let mut sigterm = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
    let reloader = Reloader::default();
    reloader.register(log);
    reloader.register(Arc::new(RestartOnly::new(config.clone())));
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("cannot create the state directory {}", config.state_dir.display()))?;
    let daemon = Daemon::new(config, Arc::new(Registry::default())).context("cannot start the engine")?;
    if let Some(tls) = &daemon.tls {
        reloader.register(tls.clone());
    }
    let server = ApiServer::bind(daemon.clone()).await?;
    let readiness = server.readiness();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        control = %daemon.config.control.socket.display(),
        handoff = %daemon.config.handoff.socket.display(),
        peer = %server.peer_addr()?,
        metrics = %match server.metrics_addr().transpose()? {
            Some(addr) => format!("http://{addr}/metrics"),
            None => "off".to_owned(),
        },
        state_dir = %daemon.config.state_dir.display(),
        "listening (not serving until the configured devices are open)"
    );
    let shutdown = CancellationToken::new();
    let mut serving = tokio::spawn(server.run(shutdown.clone()));
    let mode = systemd::Mode::new("starting: opening devices");
    let background = CancellationToken::new();
    let _stop_background = background.clone().drop_guard();
    tokio::spawn(systemd::publish_status(daemon.clone(), mode.clone(), background.clone()));
    if let Some(period) = systemd::watchdog_period() {
        tokio::spawn(systemd::watchdog(daemon.clone(), period, background.clone()));
    }

    let opened = {
        let daemon = daemon.clone();
        tokio::task::spawn_blocking(move || open_all_configured(&daemon.config.devices, &daemon.registry))
            .await
    };
    let found = match opened {
        Ok(Ok(found)) => found,
        Ok(Err(e)) => return stop(shutdown, serving, Err(e.into())).await,
        Err(join) => {
            return stop(shutdown, serving, Err(anyhow::anyhow!("device open thread failed: {join}"))).await;
        }
    };
    for device in &found {
        tracing::info!(%device, "device opened");
    }
    readiness.set_serving().await;
    mode.set("serving");
    systemd::notify(&[NotifyState::Ready, NotifyState::Status(&systemd::status_line("serving", &daemon))]);
    tracing::info!(devices = found.len(), "serving");

    loop {
        tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: stopping"); break; }
            _ = sighup.recv() => reload(args, &reloader, &mode, &daemon),
            ended = &mut serving => {
                return match ended {
                    Ok(Ok(())) => Err(anyhow::anyhow!("the servers stopped on their own")),
                    Ok(Err(e)) => Err(e.into()),
                    Err(join) => Err(anyhow::anyhow!("server task failed: {join}")),
                };
            }
        }
    }
    readiness.drain().await;
    mode.set("stopping: running jobs end");
    systemd::notify(&[NotifyState::Stopping]);
    // The listeners keep serving while jobs end: a destination needs its peer API until
    // the commit. A second signal stops at once. The drain is bounded (JOBS_FINISH +
    // JOBS_ROLL_BACK); meanwhile systemd's stop timeout is pushed ahead so a unit with a
    // shorter TimeoutStopSec does not kill a migration in its blackout.
    let drained = drain_jobs(&daemon, JOBS_FINISH, JOBS_ROLL_BACK);
    tokio::pin!(drained);
    let mut extend = tokio::time::interval(systemd::STOP_EXTEND_EVERY);
    loop {
        tokio::select! {
            left = &mut drained => {
                if left > 0 {
                    tracing::warn!(jobs = left, "stopping with jobs still running");
                }
                break;
            }
            _ = extend.tick() => systemd::extend_stop_timeout(),
            _ = sigterm.recv() => { tracing::warn!("second SIGTERM: stopping without waiting for jobs"); break; }
            _ = sigint.recv() => { tracing::warn!("second SIGINT: stopping without waiting for jobs"); break; }
        }
    }
    stop(shutdown, serving, Ok(())).await
}

/// SIGHUP: reads the configuration again and offers it to every reloadable part; logs what
/// each one put in force or why it refused. A configuration that does not load changes
/// nothing.
fn reload(args: &Args, reloader: &Reloader, mode: &systemd::Mode, daemon: &vfio_migd::engine::Daemon) {
    systemd::notify_reloading();
    mode.set("reloading");
    tracing::info!("SIGHUP: reloading the configuration");
    match Config::load(args.config.as_deref(), args.allow_test_faults) {
        Err(e) => tracing::error!(error = %e, "reload refused: the running configuration stays"),
        Ok(new) => {
            for (part, outcome) in reloader.reload(&new) {
                match outcome {
                    Outcome::Reloaded(changes) => {
                        tracing::info!(part, changes = %changes.join("; "), "reloaded");
                    }
                    Outcome::Unchanged => tracing::debug!(part, "unchanged"),
                    Outcome::Refused(why) => tracing::warn!(part, reason = %why, "reload refused"),
                }
            }
        }
    }
    mode.set("serving");
    systemd::notify(&[NotifyState::Ready, NotifyState::Status(&systemd::status_line("serving", daemon))]);
}

/// Stops the servers (their socket files are removed) and returns `outcome`, or the
/// servers' own failure if the outcome was fine.
async fn stop(
    shutdown: CancellationToken,
    serving: tokio::task::JoinHandle<Result<(), vfio_migd::api::ApiError>>,
    outcome: anyhow::Result<()>,
) -> anyhow::Result<()> {
    shutdown.cancel();
    let served = serving.await;
    outcome?;
    served.context("server task failed")??;
    Ok(())
}

/// What `--check-config` prints.
fn summary(config: &Config) -> String {
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line("configuration OK".into());
    line(format!("control.socket            {}", config.control.socket.display()));
    line(format!("handoff.socket            {}", config.handoff.socket.display()));
    line(format!("peer.listen               {}", config.peer.listen));
    line(format!("peer.data_connections     {}", config.peer.data_connections));
    line(format!("peer.max_frame_payload    {}", config.peer.max_frame_payload));
    line(format!("peer.advertise            {}", config.peer.advertised()));
    line(format!(
        "peer.tls                  {}",
        match &config.peer.tls {
            Some(tls) => format!("cert {} ca {}", tls.cert.display(), tls.ca.display()),
            None if config.peer.insecure_plaintext => "off (INSECURE plaintext allowed)".to_owned(),
            None => "off (plaintext, loopback only)".to_owned(),
        }
    ));
    line(format!("peer.limits.max_connections {}", config.peer.limits.max_connections));
    line(format!(
        "peer.data_ports           {}",
        config.peer.data_ports.map_or_else(|| "ephemeral".to_owned(), |range| range.to_string())
    ));
    line(format!("state_dir                 {}", config.state_dir.display()));
    line(format!("migration.phase_timeout_ms {}", config.migration.phase_timeout_ms));
    line(format!("migration.pre_copy        {}", config.migration.pre_copy));
    line(format!("migration.pre_copy_max_ms {}", config.migration.pre_copy_max_ms));
    line(format!("migration.retained_jobs   {}", config.migration.retained_jobs));
    line(format!(
        "metrics.listen            {}",
        config.metrics.listen.map_or_else(|| "off".to_owned(), |addr| addr.to_string())
    ));
    line(format!("log.level                 {}", config.log.level));
    line(format!("log.format                {:?}", config.log.format).to_lowercase());
    line(format!("devices                   {}", config.devices.len()));
    for device in &config.devices {
        line(match device {
            DeviceConfig::Sim(spec) => format!(
                "  {}: sim {} caps={} state_size={}",
                spec.name, spec.model, spec.caps, spec.state_size
            ),
            DeviceConfig::Group { name, sysfs_device } => format!("  {name}: vfio-group {sysfs_device}"),
            DeviceConfig::Cdev { name, path } => format!("  {name}: vfio-cdev {}", path.display()),
        });
    }
    if config.test.stream_fault.is_some() {
        line("test.stream_fault         set (test-only fault injection is active)".into());
    }
    out
}
