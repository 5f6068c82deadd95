//! `vfio-migctl`: the command-line client of vfio-migd.
//!
//! Exit codes: 0 success, 1 failure, 2 usage error, 3 migration rolled back or cancelled,
//! 4 job in doubt (needs `resolve`), 5 daemon unreachable.

mod demo;
mod dirty;
mod render;
mod watch;

use std::error::Error as _;
use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use vfio_migctl::handoff::{self, DEFAULT_HANDOFF_SOCKET};
use vfio_migd_proto::v1 as pb;
use vfio_migd_proto::v1::control_client::ControlClient;

use crate::watch::Display;

const EXIT_FAILURE: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_ROLLED_BACK: u8 = 3;
const EXIT_IN_DOUBT: u8 = 4;
const EXIT_UNREACHABLE: u8 = 5;

#[derive(Debug, Parser)]
#[command(
    name = "vfio-migctl",
    version,
    about = "Control vfio-migd: devices, groups, live migrations and dirty tracking of VFIO device groups",
    propagate_version = true,
    after_help = "Exit codes: 0 success, 1 failure, 2 usage error, 3 migration rolled back or cancelled, \
                  4 job in doubt (run `resolve`), 5 daemon unreachable."
)]
struct Cli {
    /// Control socket of vfio-migd.
    #[arg(
        long,
        global = true,
        env = "VFIO_MIGD_SOCKET",
        default_value = "/run/vfio-migd/control.sock",
        value_name = "PATH"
    )]
    socket: PathBuf,
    /// Print machine-readable JSON instead of text (and no progress bars).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Devices held by the daemon (default: list them).
    Devices {
        #[command(subcommand)]
        action: Option<DevicesCmd>,
    },
    /// Groups: the devices of one VM, migrated together (default: list them).
    Groups {
        #[command(subcommand)]
        action: Option<GroupsCmd>,
    },
    /// Migrate a group to a peer daemon and follow it to the end.
    Migrate(MigrateArgs),
    /// Prepare this daemon to receive devices for a job (run on the destination first).
    Incoming {
        /// The job id the source will use.
        #[arg(long)]
        job_id: String,
        /// Destination devices, by name.
        #[arg(required = true, value_name = "DEVICE")]
        devices: Vec<String>,
        /// The source daemon's identity (a DNS or IP name in its TLS certificate; with
        /// plaintext peers, its address): only it may hand over, commit or abort the
        /// job. Without it, the first fleet peer whose handshake is accepted does.
        #[arg(long, value_name = "NAME")]
        source_identity: Option<String>,
    },
    /// Jobs, running and recently finished (default: list them).
    Jobs {
        #[command(subcommand)]
        action: Option<JobsCmd>,
    },
    /// Follow a job until it ends, with progress.
    Watch { job_id: String },
    /// Cancel a job before its commit point; the source's devices run again.
    Cancel { job_id: String },
    /// Resolve a job that is in doubt after losing its peer.
    Resolve {
        job_id: String,
        /// On the destination: what the source's journal says. Ignored on the source,
        /// whose own journal decides.
        #[arg(long, value_enum)]
        decision: Option<DecisionArg>,
    },
    /// Dirty tracking of a group: the guest pages its devices write by DMA, merged into
    /// one bitmap (DMA logging per device, or the IOMMU's dirty tracking).
    Dirty {
        #[command(subcommand)]
        action: DirtyCmd,
    },
    /// Whether the daemon is serving (exit 0) or not (1); for probes.
    Health,
    /// Hand a device fd over to the daemon through its handoff socket (what a VMM does).
    Handoff(HandoffArgs),
    /// Start two vfio-migd daemons with simulated devices, migrate a VM's group of four
    /// devices between them, verify every device byte for byte, and clean up.
    Demo {
        /// Keep the demo's directory (configs, daemon logs, arc logs) afterwards.
        #[arg(long)]
        keep: bool,
    },
    /// Print a shell completion script, e.g.
    /// `vfio-migctl completions bash > /usr/share/bash-completion/completions/vfio-migctl`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (vfio-migctl.1 and one per subcommand) into a directory.
    Man {
        /// Directory to write into (created if missing), e.g. /usr/share/man/man1.
        #[arg(default_value = ".", value_name = "DIR")]
        dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum DevicesCmd {
    /// List every device.
    List,
    /// Show one device: identity, capabilities, state, data size.
    Show { name: String },
    /// Open a device and register it under a name.
    Register(RegisterArgs),
    /// Release a device (it must be in no group and no job).
    Release { name: String },
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("source").required(true).args(["sysfs_device", "cdev", "sim"]))]
struct RegisterArgs {
    /// Name for the device.
    name: String,
    /// Open through the legacy group/container path (PCI BDF or mdev UUID).
    #[arg(long, value_name = "BDF|UUID")]
    sysfs_device: Option<String>,
    /// Open through the device's cdev and iommufd.
    #[arg(long, value_name = "PATH")]
    cdev: Option<PathBuf>,
    #[command(flatten)]
    sim: SimArgs,
}

#[derive(Debug, Args)]
struct SimArgs {
    /// Simulate a device with these capabilities, e.g. STOP_COPY|P2P|PRE_COPY.
    #[arg(long, value_name = "CAPS")]
    sim: Option<String>,
    /// Simulated device state size (bytes, or with KiB/MiB/GiB) [default: 1MiB]. Only with
    /// --sim: a real device's state is its own.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, requires = "sim")]
    state_size: Option<u64>,
    /// Simulated device model (part of its compatibility identity) [default: sim-device].
    #[arg(long, requires = "sim")]
    model: Option<String>,
    /// Seed of the simulated device's state content [default: 0].
    #[arg(long, requires = "sim")]
    seed: Option<u64>,
}

impl SimArgs {
    fn spec(&self) -> Option<pb::SimulatedDeviceSpec> {
        self.sim.as_ref().map(|caps| pb::SimulatedDeviceSpec {
            model: self.model.clone().unwrap_or_else(|| "sim-device".to_owned()),
            state_size: self.state_size.unwrap_or(1 << 20),
            seed: self.seed.unwrap_or(0),
            caps: caps.clone(),
        })
    }
}

#[derive(Debug, Subcommand)]
enum GroupsCmd {
    /// List every group.
    List,
    /// Show one group.
    Show { name: String },
    /// Define a group over registered devices.
    Define {
        name: String,
        #[arg(required = true, value_name = "DEVICE")]
        devices: Vec<String>,
        /// Allow two or more devices without P2P (only safe if they never do
        /// peer-to-peer DMA).
        #[arg(long)]
        allow_multiple_non_p2p: bool,
    },
    /// Delete a group (its devices stay registered).
    Delete { name: String },
}

#[derive(Debug, Args)]
struct MigrateArgs {
    /// Job id, chosen by the caller: starting again with the same id is idempotent.
    #[arg(long, required_unless_present = "dry_run")]
    job_id: Option<String>,
    /// The group to migrate.
    #[arg(long)]
    group: String,
    /// The destination daemon's peer listener.
    #[arg(long, value_name = "HOST:PORT", required_unless_present = "dry_run", value_parser = parse_peer)]
    peer: Option<String>,
    /// Source device = destination device, once per device of the group.
    #[arg(long = "map", value_name = "SRC=DST", required_unless_present = "dry_run", value_parser = parse_mapping)]
    mapping: Vec<(String, String)>,
    /// Only print the plan (no device is touched).
    #[arg(long)]
    dry_run: bool,
    /// Timeout of each phase in milliseconds (0: the daemon's default).
    #[arg(long, default_value_t = 0)]
    timeout_ms: u64,
    /// Data connections to the peer (0: the daemon's default).
    #[arg(long, default_value_t = 0)]
    connections: u32,
    /// The name the destination's TLS certificate must carry (default: the host of --peer).
    #[arg(long, value_name = "NAME")]
    destination_identity: Option<String>,
    /// Start the job and return without following it.
    #[arg(long)]
    no_watch: bool,
}

#[derive(Debug, Subcommand)]
enum JobsCmd {
    /// List jobs.
    List,
    /// Show one job in full.
    Show { job_id: String },
}

#[derive(Debug, Subcommand)]
enum DirtyCmd {
    /// Start tracking every device of a group over the guest's IOVA layout; prints which
    /// source covers each device (devices that cannot be tracked are named, with why).
    #[command(after_help = "Sizes: decimal or 0x hex, with an optional B, KiB, MiB, GiB or TiB suffix.\n\
                            Example: vfio-migctl dirty start vm1 --range 0:2GiB --range 4GiB:0x80000000")]
    Start {
        /// The group, as `groups define` named it.
        group: String,
        /// A guest IOVA range, once per range of the guest's memory layout.
        #[arg(long = "range", value_name = "IOVA:LENGTH", required = true, value_parser = parse_range)]
        ranges: Vec<(u64, u64)>,
        /// Granularity of the group's dirty bitmap (a power of two; default 4KiB).
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        page_size: Option<u64>,
    },
    /// Stop tracking a group; prints the final statistics. Fails if it was not started.
    Stop {
        /// The group, as `groups define` named it.
        group: String,
    },
    /// Which source covers each device of a group, and what it found so far.
    Status {
        /// The group, as `groups define` named it.
        group: String,
    },
    /// Read and clear the pages dirtied since the last `pages` (or the start). Prints the
    /// count and the first runs of dirty pages; --json lists every run.
    Pages {
        /// The group, as `groups define` named it.
        group: String,
        /// Write every run of dirty pages to FILE instead, one JSON object per line:
        /// {"iova":N,"length":N} in bytes, sorted by IOVA. The file is created before the
        /// pages are read (reading clears them on the daemon).
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DecisionArg {
    Committed,
    NotCommitted,
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("fd_source").required(true).args(["fd_path", "sim"]))]
struct HandoffArgs {
    /// Name for the device.
    #[arg(long)]
    name: String,
    /// Open this path and hand over the fd (a bound /dev/vfio/devices/vfioN, say).
    #[arg(long, value_name = "PATH")]
    fd_path: Option<PathBuf>,
    #[command(flatten)]
    sim: SimArgs,
    /// The group (VM) the device joins; created if it does not exist.
    #[arg(long)]
    group: Option<String>,
    /// Compatibility identity, for fds that cannot tell it themselves.
    #[arg(long, value_name = "DRIVER/MODEL", value_parser = parse_identity)]
    identity: Option<(String, String)>,
    /// The daemon's handoff socket.
    #[arg(long, env = "VFIO_MIGD_HANDOFF_SOCKET", default_value = DEFAULT_HANDOFF_SOCKET, value_name = "PATH")]
    handoff_socket: PathBuf,
}

/// A size or address: decimal or `0x` hex, with an optional binary suffix
/// (`4096`, `0x1000`, `64KiB`, `2G`, `1TiB`).
fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let what = || format!("`{text}` is not a size like 4096, 0x1000, 64KiB or 2GiB");
    let (digits, unit, radix) = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => {
            let split = hex.find(|c: char| !c.is_ascii_hexdigit()).unwrap_or(hex.len());
            (&hex[..split], &hex[split..], 16)
        }
        None => {
            let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
            (&text[..split], &text[split..], 10)
        }
    };
    if digits.is_empty() {
        return Err(what());
    }
    let number = u64::from_str_radix(digits, radix).map_err(|_| format!("`{text}` is too large"))?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "TiB" | "T" => 1 << 40,
        other => return Err(format!("unknown size unit `{other}` (use B, KiB, MiB, GiB or TiB)")),
    };
    number.checked_mul(multiplier).ok_or_else(|| format!("`{text}` is too large"))
}

/// `IOVA:LENGTH`, both sizes as [`parse_size`] reads them.
fn parse_range(text: &str) -> Result<(u64, u64), String> {
    let Some((iova, length)) = text.split_once(':') else {
        return Err(format!("`{text}` is not IOVA:LENGTH (e.g. 0:2GiB or 0x100000000:0x40000000)"));
    };
    let iova = parse_size(iova).map_err(|e| format!("IOVA of `{text}`: {e}"))?;
    let length = parse_size(length).map_err(|e| format!("length of `{text}`: {e}"))?;
    if length == 0 {
        return Err(format!("`{text}`: the length must not be zero"));
    }
    if iova.checked_add(length).is_none() {
        return Err(format!("`{text}` ends past the 64-bit IOVA space"));
    }
    Ok((iova, length))
}

fn parse_mapping(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((src, dst)) if !src.is_empty() && !dst.is_empty() && !dst.contains('=') => {
            Ok((src.to_string(), dst.to_string()))
        }
        _ => Err(format!("`{text}` is not SRC=DST (source device name = destination device name)")),
    }
}

fn parse_peer(text: &str) -> Result<String, String> {
    match text.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(text.to_string()),
        _ => Err(format!("`{text}` is not HOST:PORT")),
    }
}

fn parse_identity(text: &str) -> Result<(String, String), String> {
    match text.split_once('/') {
        Some((driver, model)) if !driver.is_empty() && !model.is_empty() => {
            Ok((driver.to_string(), model.to_string()))
        }
        _ => Err(format!("`{text}` is not DRIVER/MODEL")),
    }
}

/// Why the command failed, with its exit code.
#[derive(Debug)]
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn new(code: u8, message: impl Into<String>) -> Failure {
        Failure { code, message: message.into() }
    }
}

/// The whole chain of causes, for errors whose top level says little ("transport error").
fn causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl From<Status> for Failure {
    fn from(status: Status) -> Failure {
        // A status the client library made up from a broken connection carries its cause;
        // one the daemon sent does not.
        if status.source().is_some() {
            return Failure::new(
                EXIT_UNREACHABLE,
                format!("lost the connection to vfio-migd: {}", causes(&status)),
            );
        }
        let code = match status.code() {
            Code::NotFound => "not found",
            Code::InvalidArgument => "invalid argument",
            Code::FailedPrecondition => "failed precondition",
            Code::Unavailable => "unavailable",
            Code::Aborted => "aborted",
            Code::Unimplemented => "not implemented",
            Code::Internal => "internal error",
            _ => "error",
        };
        Failure::new(EXIT_FAILURE, format!("{code}: {}", status.message()))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Devices { action: Some(DevicesCmd::Register(args)) } = &cli.command
        && args.sim.sim.is_none()
        && (args.sim.state_size.is_some() || args.sim.model.is_some() || args.sim.seed.is_some())
    {
        eprintln!(
            "vfio-migctl: --state-size, --model and --seed describe a simulated device and need --sim; \
             a device opened with --cdev or --sysfs-device reports its own"
        );
        return ExitCode::from(EXIT_USAGE);
    }
    let result = match cli.command {
        Command::Completions { shell } => completions(shell),
        Command::Man { ref dir } => man_pages(dir),
        Command::Handoff(ref args) => handoff(args, cli.json),
        Command::Demo { keep } => match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
            Ok(runtime) => {
                let opts = demo::DemoOptions { keep, display: display_for(cli.json), json: cli.json };
                runtime
                    .block_on(demo::run(opts))
                    .map_err(|e| Failure::new(EXIT_FAILURE, format!("demo: {e:#}")))
            }
            Err(e) => Err(Failure::new(EXIT_FAILURE, format!("cannot start the async runtime: {e}"))),
        },
        _ => match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(runtime) => runtime.block_on(run(&cli)),
            Err(e) => Err(Failure::new(EXIT_FAILURE, format!("cannot start the async runtime: {e}"))),
        },
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            eprintln!("vfio-migctl: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

async fn connect(socket: &Path) -> Result<Channel, Failure> {
    if !socket.exists() {
        return Err(Failure::new(
            EXIT_UNREACHABLE,
            format!(
                "cannot reach vfio-migd: {} does not exist (is the daemon running? see --socket / VFIO_MIGD_SOCKET)",
                socket.display()
            ),
        ));
    }
    let endpoint = Endpoint::from_shared(format!("unix://{}", socket.display()))
        .map_err(|e| Failure::new(EXIT_USAGE, format!("bad socket path {}: {e}", socket.display())))?;
    endpoint.connect().await.map_err(|e| {
        Failure::new(
            EXIT_UNREACHABLE,
            format!("cannot reach vfio-migd at {}: {}", socket.display(), causes(&e)),
        )
    })
}

fn print_json(value: &Value) {
    println!("{}", serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string()));
}

/// Prints either the JSON value or the text.
fn emit(json: bool, value: impl FnOnce() -> Value, text: impl FnOnce() -> String) {
    if json {
        print_json(&value());
    } else {
        print!("{}", text());
    }
}

async fn run(cli: &Cli) -> Result<u8, Failure> {
    let channel = connect(&cli.socket).await?;
    if let Command::Health = cli.command {
        return health(channel, cli.json).await;
    }
    let mut client = ControlClient::new(channel);
    let json = cli.json;
    match &cli.command {
        Command::Devices { action } => {
            devices(&mut client, action.as_ref().unwrap_or(&DevicesCmd::List), json).await
        }
        Command::Groups { action } => {
            groups(&mut client, action.as_ref().unwrap_or(&GroupsCmd::List), json).await
        }
        Command::Migrate(args) => migrate(&mut client, args, json).await,
        Command::Incoming { job_id, devices, source_identity } => {
            let job = client
                .prepare_incoming(pb::PrepareIncomingRequest {
                    job_id: job_id.clone(),
                    devices: devices.clone(),
                    expected_source_identity: source_identity.clone().unwrap_or_default(),
                })
                .await?
                .into_inner();
            emit(
                json,
                || render::job_json(&job),
                || format!("job {} prepared to receive {} device(s)\n", job.job_id, job.devices.len()),
            );
            Ok(0)
        }
        Command::Jobs { action } => match action.as_ref().unwrap_or(&JobsCmd::List) {
            JobsCmd::List => {
                let jobs = client.list_jobs(pb::ListJobsRequest {}).await?.into_inner().jobs;
                emit(
                    json,
                    || json!(jobs.iter().map(render::job_json).collect::<Vec<_>>()),
                    || render::jobs_table(&jobs),
                );
                Ok(0)
            }
            JobsCmd::Show { job_id } => {
                let job = client.get_job(pb::GetJobRequest { job_id: job_id.clone() }).await?.into_inner();
                emit(json, || render::job_json(&job), || render::job_details(&job));
                Ok(0)
            }
        },
        Command::Watch { job_id } => follow(&mut client, job_id, json).await,
        Command::Dirty { action } => dirty_tracking(&mut client, action, json).await,
        Command::Cancel { job_id } => {
            let job = client.cancel_job(pb::CancelJobRequest { job_id: job_id.clone() }).await?.into_inner();
            emit(json, || render::job_json(&job), || format!("job {} cancellation requested\n", job.job_id));
            Ok(0)
        }
        Command::Resolve { job_id, decision } => {
            use pb::resolve_job_request::Decision;
            let decision = match decision {
                None => Decision::Unspecified,
                Some(DecisionArg::Committed) => Decision::Committed,
                Some(DecisionArg::NotCommitted) => Decision::NotCommitted,
            };
            let job = client
                .resolve_job(pb::ResolveJobRequest { job_id: job_id.clone(), decision: decision.into() })
                .await?
                .into_inner();
            emit(
                json,
                || render::job_json(&job),
                || format!("job {} resolved: {}\n", job.job_id, render::status_name(job.status())),
            );
            Ok(0)
        }
        Command::Health
        | Command::Handoff(_)
        | Command::Demo { .. }
        | Command::Completions { .. }
        | Command::Man { .. } => unreachable_command(),
    }
}

/// `vfio-migctl completions SHELL`: the script on stdout (a closed pipe is an error, not
/// a panic).
fn completions(shell: clap_complete::Shell) -> Result<u8, Failure> {
    use std::io::Write;
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut <Cli as clap::CommandFactory>::command(), "vfio-migctl", &mut script);
    std::io::stdout()
        .write_all(&script)
        .map_err(|e| Failure::new(EXIT_FAILURE, format!("cannot write the completion script: {e}")))?;
    Ok(0)
}

/// `vfio-migctl man DIR`: one page for the command and one per subcommand
/// (`vfio-migctl-jobs-show.1`, as git names its pages).
fn man_pages(dir: &Path) -> Result<u8, Failure> {
    let fail = |e: std::io::Error| {
        Failure::new(EXIT_FAILURE, format!("cannot write man pages into {}: {e}", dir.display()))
    };
    std::fs::create_dir_all(dir).map_err(fail)?;
    let command = <Cli as clap::CommandFactory>::command();
    clap_mangen::generate_to(command, dir).map_err(fail)?;
    Ok(0)
}

/// Commands dispatched before a control connection exists never reach [`run`]'s match.
fn unreachable_command() -> Result<u8, Failure> {
    Err(Failure::new(EXIT_FAILURE, "internal error: command dispatched twice"))
}

async fn health(channel: Channel, json: bool) -> Result<u8, Failure> {
    let response = HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await?
        .into_inner();
    let status = response.status();
    let name = status.as_str_name();
    emit(json, || json!({ "status": name }), || format!("{name}\n"));
    Ok(if status == ServingStatus::Serving { 0 } else { EXIT_FAILURE })
}

async fn devices(
    client: &mut ControlClient<Channel>,
    action: &DevicesCmd,
    json: bool,
) -> Result<u8, Failure> {
    match action {
        DevicesCmd::List => {
            let devices = client.list_devices(pb::ListDevicesRequest {}).await?.into_inner().devices;
            emit(
                json,
                || json!(devices.iter().map(render::device_json).collect::<Vec<_>>()),
                || render::devices_table(&devices),
            );
        }
        DevicesCmd::Show { name } => {
            let device = client.get_device(pb::GetDeviceRequest { name: name.clone() }).await?.into_inner();
            emit(json, || render::device_json(&device), || render::device_details(&device));
        }
        DevicesCmd::Register(args) => {
            use pb::register_device_request::Source;
            let source = if let Some(bdf) = &args.sysfs_device {
                Source::SysfsDevice(bdf.clone())
            } else if let Some(path) = &args.cdev {
                Source::CdevPath(path.display().to_string())
            } else if let Some(spec) = args.sim.spec() {
                Source::Simulated(spec)
            } else {
                return Err(Failure::new(EXIT_USAGE, "give --sysfs-device, --cdev or --sim"));
            };
            let device = client
                .register_device(pb::RegisterDeviceRequest { name: args.name.clone(), source: Some(source) })
                .await?
                .into_inner();
            emit(json, || render::device_json(&device), || render::device_details(&device));
        }
        DevicesCmd::Release { name } => {
            client.release_device(pb::ReleaseDeviceRequest { name: name.clone() }).await?;
            emit(json, || json!({ "released": name }), || format!("device {name} released\n"));
        }
    }
    Ok(0)
}

async fn groups(client: &mut ControlClient<Channel>, action: &GroupsCmd, json: bool) -> Result<u8, Failure> {
    match action {
        GroupsCmd::List => {
            let groups = client.list_groups(pb::ListGroupsRequest {}).await?.into_inner().groups;
            emit(
                json,
                || json!(groups.iter().map(render::group_json).collect::<Vec<_>>()),
                || render::groups_table(&groups),
            );
        }
        GroupsCmd::Show { name } => {
            let group = client.get_group(pb::GetGroupRequest { name: name.clone() }).await?.into_inner();
            emit(json, || render::group_json(&group), || render::group_details(&group));
        }
        GroupsCmd::Define { name, devices, allow_multiple_non_p2p } => {
            let group = client
                .define_group(pb::DefineGroupRequest {
                    name: name.clone(),
                    devices: devices.clone(),
                    allow_multiple_non_p2p: *allow_multiple_non_p2p,
                })
                .await?
                .into_inner();
            emit(json, || render::group_json(&group), || render::group_details(&group));
        }
        GroupsCmd::Delete { name } => {
            client.delete_group(pb::DeleteGroupRequest { name: name.clone() }).await?;
            emit(json, || json!({ "deleted": name }), || format!("group {name} deleted\n"));
        }
    }
    Ok(0)
}

async fn migrate(client: &mut ControlClient<Channel>, args: &MigrateArgs, json: bool) -> Result<u8, Failure> {
    if args.dry_run {
        let plan =
            client.plan_migration(pb::PlanMigrationRequest { group: args.group.clone() }).await?.into_inner();
        emit(json, || render::plan_json(&plan), || render::plan_text(&plan));
        return Ok(0);
    }
    let missing = |what: &str| Failure::new(EXIT_USAGE, format!("--{what} is required without --dry-run"));
    let job_id = args.job_id.clone().ok_or_else(|| missing("job-id"))?;
    let peer = args.peer.clone().ok_or_else(|| missing("peer"))?;
    let job = client
        .start_migration(pb::StartMigrationRequest {
            job_id: job_id.clone(),
            group: args.group.clone(),
            peer,
            mapping: args
                .mapping
                .iter()
                .map(|(source, destination)| pb::DeviceMapping {
                    source: source.clone(),
                    destination: destination.clone(),
                })
                .collect(),
            phase_timeout_ms: args.timeout_ms,
            data_connections: args.connections,
            expected_destination_identity: args.destination_identity.clone().unwrap_or_default(),
        })
        .await?
        .into_inner();
    if args.no_watch {
        emit(json, || render::job_json(&job), || format!("job {} started ({})\n", job.job_id, job.phase));
        return Ok(0);
    }
    follow(client, &job_id, json).await
}

async fn dirty_tracking(
    client: &mut ControlClient<Channel>,
    action: &DirtyCmd,
    json: bool,
) -> Result<u8, Failure> {
    match action {
        DirtyCmd::Start { group, ranges, page_size } => {
            let tracking = client
                .start_dirty_tracking(pb::StartDirtyTrackingRequest {
                    group: group.clone(),
                    ranges: ranges.iter().map(|&(iova, length)| pb::IovaRange { iova, length }).collect(),
                    page_size: page_size.unwrap_or(0),
                })
                .await?
                .into_inner();
            emit(json, || render::dirty_tracking_json(&tracking), || render::dirty_tracking_text(&tracking));
        }
        DirtyCmd::Stop { group } => {
            let tracking = client
                .stop_dirty_tracking(pb::StopDirtyTrackingRequest { group: group.clone() })
                .await?
                .into_inner();
            // The daemon's stop is idempotent (a migration's end stops tracking too); an
            // operator asking to stop what never ran has the wrong group or a stale view.
            if tracking.page_size == 0 {
                return Err(Failure::new(
                    EXIT_FAILURE,
                    format!(
                        "failed precondition: group `{group}`: dirty tracking is not started (nothing to stop)"
                    ),
                ));
            }
            emit(json, || render::dirty_tracking_json(&tracking), || render::dirty_tracking_text(&tracking));
        }
        DirtyCmd::Status { group } => {
            let tracking = client
                .get_dirty_tracking(pb::GetDirtyTrackingRequest { group: group.clone() })
                .await?
                .into_inner();
            emit(json, || render::dirty_tracking_json(&tracking), || render::dirty_tracking_text(&tracking));
        }
        DirtyCmd::Pages { group, output } => {
            // Created first: the call clears the pages it returns, so a file that cannot be
            // written must fail before anything is read.
            let mut file = match output {
                Some(path) => Some(std::io::BufWriter::new(std::fs::File::create(path).map_err(|e| {
                    Failure::new(EXIT_FAILURE, format!("cannot create {}: {e}", path.display()))
                })?)),
                None => None,
            };
            let pages =
                client.get_dirty_pages(pb::GetDirtyPagesRequest { group: group.clone() }).await?.into_inner();
            let runs = dirty::runs(&pages);
            let written_to = output.as_ref().map(|path| path.display().to_string());
            if let (Some(file), Some(path)) = (file.as_mut(), written_to.as_deref()) {
                dirty::write_runs(file, &runs).map_err(|e| {
                    Failure::new(
                        EXIT_FAILURE,
                        format!(
                            "writing {path} failed: {e} ({} dirty pages were read and cleared on the daemon)",
                            pages.dirty_pages
                        ),
                    )
                })?;
            }
            emit(
                json,
                || dirty::pages_json(group, &pages, &runs, written_to.as_deref()),
                || dirty::pages_text(group, &pages, &runs, written_to.as_deref()),
            );
        }
    }
    Ok(0)
}

/// Follows a job to its end, prints the summary, and turns the outcome into the exit code.
fn display_for(json: bool) -> Display {
    if json {
        Display::Quiet
    } else if std::io::stdout().is_terminal() {
        Display::Bars
    } else {
        Display::Lines
    }
}

async fn follow(client: &mut ControlClient<Channel>, job_id: &str, json: bool) -> Result<u8, Failure> {
    let display = display_for(json);
    let job = watch::follow(client, job_id, display).await?;
    if json {
        print_json(&render::job_json(&job));
    } else {
        print!("{}", render::job_details(&job));
        if job.status() == pb::JobStatus::InDoubt {
            println!(
                "the job is in doubt: run `vfio-migctl resolve {}` (on the destination, add \
                 --decision from the source's journal)",
                job.job_id
            );
        }
    }
    Ok(match job.status() {
        pb::JobStatus::Succeeded | pb::JobStatus::Running | pb::JobStatus::Unspecified => 0,
        pb::JobStatus::RolledBack | pb::JobStatus::Cancelled => EXIT_ROLLED_BACK,
        pb::JobStatus::InDoubt => EXIT_IN_DOUBT,
        pb::JobStatus::Failed => EXIT_FAILURE,
    })
}

fn handoff(args: &HandoffArgs, json: bool) -> Result<u8, Failure> {
    if !args.handoff_socket.exists() {
        return Err(Failure::new(
            EXIT_UNREACHABLE,
            format!(
                "cannot reach vfio-migd: {} does not exist (is the daemon running? see --handoff-socket)",
                args.handoff_socket.display()
            ),
        ));
    }
    let mut request = json!({ "name": args.name });
    if let Some(group) = &args.group {
        request["group"] = json!(group);
    }
    if let Some((driver, model)) = &args.identity {
        request["identity"] = json!({ "driver": driver, "model": model });
    }
    let fd = if let Some(spec) = args.sim.spec() {
        request["backend"] = json!("sim");
        request["sim"] = json!({ "model": spec.model, "state_size": spec.state_size, "seed": spec.seed, "caps": spec.caps });
        handoff::sim_anchor()
            .map_err(|e| Failure::new(EXIT_FAILURE, format!("cannot create the anchor fd: {e}")))?
    } else if let Some(path) = &args.fd_path {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Failure::new(EXIT_FAILURE, format!("cannot open {}: {e}", path.display())))?
            .into()
    } else {
        return Err(Failure::new(EXIT_USAGE, "give --fd-path or --sim"));
    };
    let reply = handoff::hand_over(&args.handoff_socket, &request, fd.as_fd()).map_err(|e| {
        Failure::new(
            EXIT_UNREACHABLE,
            format!("handoff through {} failed: {e}", args.handoff_socket.display()),
        )
    })?;
    if json {
        print_json(&json!({ "ok": reply.ok, "error": reply.error, "device": reply.device }));
    }
    if reply.ok {
        if !json {
            println!("handed over: {}", reply.device.unwrap_or_default());
        }
        Ok(0)
    } else {
        let error = reply.error.unwrap_or_else(|| "refused without a reason".into());
        if json {
            Ok(EXIT_FAILURE)
        } else {
            Err(Failure::new(EXIT_FAILURE, format!("handoff refused: {error}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_mappings_and_peers_parse_or_say_why() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("0x1000"), Ok(4096));
        assert_eq!(parse_size("0x2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1TiB"), Ok(1 << 40));
        assert!(parse_size("3 parsecs").unwrap_err().contains("unit"));
        assert!(parse_size("0x").is_err() && parse_size("GiB").is_err());
        assert!(parse_size("0x10000000000000000").unwrap_err().contains("too large"));
        assert!(parse_size("16777216TiB").unwrap_err().contains("too large"));
        assert_eq!(parse_range("0:2GiB"), Ok((0, 2 << 30)));
        assert_eq!(parse_range("0x100000000:0x40000000"), Ok((1 << 32, 1 << 30)));
        assert!(parse_range("4096").unwrap_err().contains("IOVA:LENGTH"));
        assert!(parse_range("0:0").unwrap_err().contains("zero"));
        assert!(parse_range("0xffffffffffff0000:1MiB").unwrap_err().contains("64-bit"));
        assert!(parse_range("x:4096").unwrap_err().contains("IOVA of"));
        assert_eq!(parse_mapping("nic0=nic9"), Ok(("nic0".into(), "nic9".into())));
        assert!(parse_mapping("nic0").unwrap_err().contains("SRC=DST"));
        assert!(parse_mapping("a=b=c").is_err());
        assert_eq!(parse_peer("10.0.0.2:7410"), Ok("10.0.0.2:7410".into()));
        assert_eq!(parse_peer("[::1]:7410"), Ok("[::1]:7410".into()));
        assert!(parse_peer("host").is_err());
        assert_eq!(parse_identity("mtty/mtty-2"), Ok(("mtty".into(), "mtty-2".into())));
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
