//! Group switchover: a group of simulated devices migrated by the engine between two
//! in-process daemons (real peer gRPC on loopback, real data connections), against the
//! same device work done raw — bare threads, std-style barriers and a plain TCP relay
//! per device, no framing, no journal, no RPCs.
//!
//! Both arms use fresh devices for every trial and verify every destination device
//! against its source afterwards (loaded state and a CRC over every state byte): a
//! figure of a migration that lost a byte is an error, not a number.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;
use vfio_migd::api::peer::PeerService;
use vfio_migd::config::Config;
use vfio_migd::device::sim::{SimDevice, SimSpec};
use vfio_migd::device::{DataFd, MigrationDevice};
use vfio_migd::engine::source::MigrationRequest;
use vfio_migd::engine::{Daemon, EngineError};
use vfio_migd::fsm::{Caps, State};
use vfio_migd::job::{JobSnapshot, JobStatus, Phase};
use vfio_migd::registry::{Backend, GroupDef, Registry};

use super::{BenchError, Pairs, median};

const MODEL: &str = "sim-bench-group";
const SOURCE_SEED: u64 = 0x5000_0000;
const DESTINATION_SEED: u64 = 0xd000_0000;
/// The plain relay's buffer per direction and device, as the stream's frames.
const RELAY_BUFFER: usize = 1 << 20;
/// Longest a benchmark migration may take before it counts as hung.
const JOB_TIMEOUT: Duration = Duration::from_secs(120);
/// The source phases that lie inside the downtime, in order.
const DOWNTIME_PHASES: [Phase; 5] =
    [Phase::P2pBarrier, Phase::StopCopy, Phase::Drain, Phase::AwaitLoaded, Phase::Commit];

/// The devices of one group (identical, as a VM's NICs or GPUs would be).
#[derive(Clone, Debug)]
pub struct GroupSpec {
    pub devices: usize,
    pub state_size: u64,
    pub caps: Caps,
    /// Bytes of state each source device changes per second while it runs.
    pub dirty_rate: u64,
}

impl GroupSpec {
    fn sims(&self, role: &str, seed: u64) -> Result<Vec<Arc<SimDevice>>, BenchError> {
        (0..self.devices)
            .map(|i| {
                let mut spec = SimSpec::new(format!("{role}-dev{i}"));
                spec.model = MODEL.into();
                spec.state_size = self.state_size;
                spec.caps = self.caps;
                spec.seed = Some(seed + i as u64);
                if role == "src" {
                    spec.dirty_rate = self.dirty_rate;
                }
                Ok(Arc::new(SimDevice::new(spec)?))
            })
            .collect()
    }
}

/// One engine migration: its downtime and how the source spent it, phase by phase.
#[derive(Clone, Debug)]
pub struct EngineTrial {
    pub downtime: Duration,
    pub phases: Vec<(Phase, Duration)>,
    /// From handshake to the destination running (pre-copy included).
    pub total: Duration,
}

/// One raw switchover: its downtime and the moment each stage ended, from the start.
#[derive(Clone, Copy, Debug)]
pub struct RawTrial {
    pub downtime: Duration,
    /// Every source in RUNNING_P2P.
    pub quiesced: Duration,
    /// Every stream at the destination (end of file on every relay connection).
    pub drained: Duration,
    /// Every destination device loaded (RESUMING -> STOP).
    pub loaded: Duration,
}

/// Checks every destination device against its source after a switchover.
fn verify(sources: &[Arc<SimDevice>], destinations: &[Arc<SimDevice>]) -> Result<(), BenchError> {
    for (source, destination) in sources.iter().zip(destinations) {
        let fail = |what: String| BenchError::Verification { device: destination.name().to_string(), what };
        let state = destination.state()?;
        if state != State::Running {
            return Err(fail(format!("it is in {state}, not RUNNING")));
        }
        let sent = source.state_id();
        if destination.loaded_state() != Some(sent) {
            return Err(fail(format!("it loaded {:?}, the source holds {sent}", destination.loaded_state())));
        }
        let (got, want) = (destination.content_digest(), source.content_digest());
        if got != want {
            return Err(fail(format!("content {got:?} differs from the source's {want:?}")));
        }
    }
    Ok(())
}

async fn verify_off_reactor(
    sources: Vec<Arc<SimDevice>>,
    destinations: Vec<Arc<SimDevice>>,
) -> Result<(), BenchError> {
    tokio::task::spawn_blocking(move || verify(&sources, &destinations))
        .await
        .map_err(|_| BenchError::Panicked)?
}

/// A daemon with its peer API served on a loopback port until it is dropped.
struct DaemonUnderTest {
    daemon: Arc<Daemon>,
    devices: Vec<Arc<SimDevice>>,
    peer: SocketAddr,
    _serving: oneshot::Sender<()>,
    _state_dir: tempfile::TempDir,
}

impl DaemonUnderTest {
    async fn start(devices: Vec<Arc<SimDevice>>, pre_copy: bool) -> Result<DaemonUnderTest, BenchError> {
        let state_dir = tempfile::tempdir()?;
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let peer = listener.local_addr()?;
        let toml = format!(
            "state_dir = \"{}\"\n[peer]\nlisten = \"{peer}\"\n[migration]\npre_copy = {pre_copy}\n",
            state_dir.path().display()
        );
        let config = Config::from_toml(&toml, false)?;
        let registry = Arc::new(Registry::default());
        for device in &devices {
            registry
                .add_device(device.clone() as Arc<dyn MigrationDevice>, Backend::Sim)
                .map_err(EngineError::from)?;
        }
        let daemon = Daemon::new(config, registry)?;
        let service = PeerService::new(daemon.clone()).into_server();
        let (serving, stop) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    // Dropping the sender stops the server.
                    let _ = stop.await;
                })
                .await;
            if let Err(e) = served {
                eprintln!("benchmark peer server on {peer}: {e}");
            }
        });
        Ok(DaemonUnderTest { daemon, devices, peer, _serving: serving, _state_dir: state_dir })
    }

    fn names(&self) -> Vec<String> {
        self.devices.iter().map(|d| d.name().to_string()).collect()
    }
}

async fn finished(daemon: &Daemon, job_id: &str, side: &'static str) -> Result<JobSnapshot, BenchError> {
    let job = daemon.job(job_id)?;
    let mut changes = job.subscribe();
    let wait = async {
        loop {
            let snapshot = job.snapshot();
            if snapshot.status != JobStatus::Running {
                return Ok(snapshot);
            }
            if changes.changed().await.is_err() {
                return Err(BenchError::Migration {
                    job: job_id.into(),
                    side,
                    what: "the job vanished while running".into(),
                });
            }
        }
    };
    tokio::time::timeout(JOB_TIMEOUT, wait).await.unwrap_or_else(|_| {
        Err(BenchError::Migration {
            job: job_id.into(),
            side,
            what: format!("not finished after {JOB_TIMEOUT:?}"),
        })
    })
}

fn succeeded(snapshot: &JobSnapshot, side: &'static str) -> Result<(), BenchError> {
    if snapshot.status == JobStatus::Succeeded {
        return Ok(());
    }
    Err(BenchError::Migration {
        job: snapshot.job_id.clone(),
        side,
        what: format!("{:?}: {}", snapshot.status, snapshot.error.as_deref().unwrap_or("no error recorded")),
    })
}

/// Migrates a fresh group with the engine, between two fresh daemons, and verifies it.
pub async fn engine_trial(group: &GroupSpec, pre_copy: bool) -> Result<EngineTrial, BenchError> {
    let source = DaemonUnderTest::start(group.sims("src", SOURCE_SEED)?, pre_copy).await?;
    let destination = DaemonUnderTest::start(group.sims("dst", DESTINATION_SEED)?, pre_copy).await?;
    let job_id = "bench";
    let (source_names, destination_names) = (source.names(), destination.names());
    destination.daemon.prepare_incoming(job_id, destination_names.clone()).await?;
    source
        .daemon
        .registry
        .define_group(GroupDef {
            name: "vm".into(),
            devices: source_names.clone(),
            allow_multiple_non_p2p: false,
        })
        .map_err(EngineError::from)?;
    source
        .daemon
        .start_migration(MigrationRequest {
            job_id: job_id.into(),
            group: "vm".into(),
            peer: destination.peer.to_string(),
            mapping: source_names.into_iter().zip(destination_names).collect(),
            phase_timeout_ms: 0,
            data_connections: 0,
        })
        .await?;
    let sent = finished(&source.daemon, job_id, "source").await?;
    let received = finished(&destination.daemon, job_id, "destination").await?;
    succeeded(&sent, "source")?;
    succeeded(&received, "destination")?;
    let downtime = sent.downtime.ok_or_else(|| BenchError::Migration {
        job: job_id.into(),
        side: "source",
        what: "succeeded without a measured downtime".into(),
    })?;
    let phases = sent.phases.iter().filter_map(|p| Some((p.phase, p.duration?))).collect();
    let total =
        sent.phases.iter().find(|p| p.phase == Phase::Handshake).map_or(Duration::ZERO, |handshake| {
            let resumed = sent.phases.iter().find(|p| p.phase == Phase::Cleanup).map(|p| p.started);
            resumed.map_or(Duration::ZERO, |at| at.saturating_duration_since(handshake.started))
        });
    for device in &source.devices {
        if device.state()? != State::Stop {
            return Err(BenchError::Verification {
                device: device.name().to_string(),
                what: format!("the source device is in {} after the job, not STOP", device.state()?),
            });
        }
    }
    verify_off_reactor(source.devices.clone(), destination.devices.clone()).await?;
    Ok(EngineTrial { downtime, phases, total })
}

/// A one-shot barrier that another party can abandon, so that one failing device ends
/// the trial with an error instead of leaving the others waiting forever.
struct Rendezvous {
    parties: usize,
    state: Mutex<(usize, bool)>,
    all_here: Condvar,
}

impl Rendezvous {
    fn new(parties: usize) -> Rendezvous {
        Rendezvous { parties, state: Mutex::new((0, false)), all_here: Condvar::new() }
    }

    fn wait(&self) -> Result<(), BenchError> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.0 += 1;
        if state.0 == self.parties {
            self.all_here.notify_all();
        }
        while state.0 < self.parties && !state.1 {
            state = self.all_here.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
        if state.0 >= self.parties { Ok(()) } else { Err(BenchError::Abandoned) }
    }

    fn abandon(&self) {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).1 = true;
        self.all_here.notify_all();
    }
}

/// The raw switchover's barriers, in the order the devices meet them.
struct Barriers {
    /// Every source thread ready (connections open, destinations in RESUMING and their
    /// threads already waiting on their connections).
    start: Rendezvous,
    /// Every source in RUNNING_P2P.
    quiesced: Rendezvous,
    /// Every destination in STOP (loaded).
    loaded: Rendezvous,
    /// Every destination in RUNNING_P2P.
    resumed_p2p: Rendezvous,
}

impl Barriers {
    fn abandon(&self) {
        for barrier in [&self.start, &self.quiesced, &self.loaded, &self.resumed_p2p] {
            barrier.abandon();
        }
    }

    /// Runs one device's part; a failure abandons every barrier so the others stop too.
    fn run<T>(&self, part: impl FnOnce() -> Result<T, BenchError>) -> Result<T, BenchError> {
        let result = part();
        if result.is_err() {
            self.abandon();
        }
        result
    }
}

/// A relay buffer with its pages already touched, so that faulting them in is not timed.
fn relay_buffer() -> Vec<u8> {
    vec![0x5a; RELAY_BUFFER]
}

fn source_part(
    device: &SimDevice,
    mut out: TcpStream,
    barriers: &Barriers,
) -> Result<(Instant, Instant), BenchError> {
    let mut buf = relay_buffer();
    barriers.start.wait()?;
    let started = Instant::now();
    device.set_state(State::RunningP2p)?;
    barriers.quiesced.wait()?;
    let quiesced = Instant::now();
    let fd = device.set_state(State::StopCopy)?.ok_or_else(|| BenchError::Verification {
        device: device.name().to_string(),
        what: "STOP_COPY opened no saving data_fd".into(),
    })?;
    loop {
        let n = (&fd).read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
    }
    out.shutdown(Shutdown::Write)?;
    Ok((started, quiesced))
}

fn destination_part(
    device: &SimDevice,
    fd: DataFd,
    mut incoming: TcpStream,
    barriers: &Barriers,
) -> Result<[Instant; 3], BenchError> {
    let mut buf = relay_buffer();
    loop {
        let n = incoming.read(&mut buf)?;
        if n == 0 {
            break;
        }
        fd.write_all_bytes(&buf[..n]).map_err(std::io::Error::from)?;
    }
    let drained = Instant::now();
    drop(fd);
    device.set_state(State::Stop)?;
    let loaded = Instant::now();
    barriers.loaded.wait()?;
    device.set_state(State::RunningP2p)?;
    barriers.resumed_p2p.wait()?;
    device.set_state(State::Running)?;
    Ok([drained, loaded, Instant::now()])
}

/// The same device work as [`engine_trial`] without the orchestrator: connections and
/// destination sessions are opened before the clock starts (as the engine does at its
/// handshake); then every source goes RUNNING -> RUNNING_P2P (barrier) -> STOP_COPY and
/// its data_fd is relayed to its destination over its own TCP connection, and every
/// destination goes RESUMING -> STOP (barrier) -> RUNNING_P2P (barrier) -> RUNNING.
/// Downtime runs from the first source transition to the last destination RUNNING.
pub fn raw_trial(group: &GroupSpec) -> Result<RawTrial, BenchError> {
    let sources = group.sims("src", SOURCE_SEED)?;
    let destinations = group.sims("dst", DESTINATION_SEED)?;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addr = listener.local_addr()?;
    let mut links = Vec::with_capacity(group.devices);
    for _ in 0..group.devices {
        // One pending connection at a time, so each accept returns the one just made.
        let out = TcpStream::connect(addr)?;
        let (incoming, _) = listener.accept()?;
        out.set_nodelay(true)?;
        incoming.set_nodelay(true)?;
        links.push((out, incoming));
    }
    let mut resuming = Vec::with_capacity(group.devices);
    for device in &destinations {
        resuming.push(device.set_state(State::Resuming)?.ok_or_else(|| BenchError::Verification {
            device: device.name().to_string(),
            what: "RESUMING opened no resuming data_fd".into(),
        })?);
    }
    let n = group.devices;
    let barriers = Barriers {
        start: Rendezvous::new(n),
        quiesced: Rendezvous::new(n),
        loaded: Rendezvous::new(n),
        resumed_p2p: Rendezvous::new(n),
    };
    let (source_results, destination_results) = thread::scope(|scope| {
        let mut source_threads = Vec::with_capacity(n);
        let mut destination_threads = Vec::with_capacity(n);
        for (((source, destination), (out, incoming)), fd) in
            sources.iter().zip(&destinations).zip(links).zip(resuming)
        {
            let barriers = &barriers;
            source_threads.push(scope.spawn(move || barriers.run(|| source_part(source, out, barriers))));
            destination_threads.push(
                scope.spawn(move || barriers.run(|| destination_part(destination, fd, incoming, barriers))),
            );
        }
        let sources: Vec<_> = source_threads.into_iter().map(joined).collect();
        let destinations: Vec<_> = destination_threads.into_iter().map(joined).collect();
        (sources, destinations)
    });
    let mut errors = Vec::new();
    let source_times = successes(source_results, &mut errors);
    let destination_times = successes(destination_results, &mut errors);
    if !errors.is_empty() {
        return Err(cause(errors));
    }
    for device in &sources {
        device.set_state(State::Stop)?;
    }
    verify(&sources, &destinations)?;

    let started = source_times.iter().map(|(started, _)| *started).min().expect("at least one device");
    let last = |times: Vec<Instant>| times.into_iter().max().expect("at least one device") - started;
    Ok(RawTrial {
        quiesced: last(source_times.iter().map(|(_, quiesced)| *quiesced).collect()),
        drained: last(destination_times.iter().map(|t| t[0]).collect()),
        loaded: last(destination_times.iter().map(|t| t[1]).collect()),
        downtime: last(destination_times.iter().map(|t| t[2]).collect()),
    })
}

fn joined<T>(handle: thread::ScopedJoinHandle<'_, Result<T, BenchError>>) -> Result<T, BenchError> {
    handle.join().unwrap_or(Err(BenchError::Panicked))
}

fn successes<T>(results: Vec<Result<T, BenchError>>, errors: &mut Vec<BenchError>) -> Vec<T> {
    let mut values = Vec::with_capacity(results.len());
    for result in results {
        match result {
            Ok(value) => values.push(value),
            Err(error) => errors.push(error),
        }
    }
    values
}

/// The error that made a trial fail: a device's own error rather than the "abandoned"
/// of the devices that stopped because of it.
fn cause(mut errors: Vec<BenchError>) -> BenchError {
    let first_real = errors.iter().position(|e| !matches!(e, BenchError::Abandoned)).unwrap_or(0);
    errors.swap_remove(first_real)
}

async fn raw_trial_off_reactor(group: &GroupSpec) -> Result<RawTrial, BenchError> {
    let group = group.clone();
    tokio::task::spawn_blocking(move || raw_trial(&group)).await.map_err(|_| BenchError::Panicked)?
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// What an engine-against-raw comparison measured, in ms.
#[derive(Clone, Debug)]
pub struct SwitchoverComparison {
    pub pairs: Pairs,
    /// Median time of each downtime phase of the engine's source.
    pub engine_phases_ms: BTreeMap<&'static str, f64>,
    /// Median end of each raw stage, from the first source transition.
    pub raw_stages_ms: BTreeMap<&'static str, f64>,
}

fn phase_medians(trials: &[EngineTrial]) -> BTreeMap<&'static str, f64> {
    DOWNTIME_PHASES
        .iter()
        .map(|phase| {
            let times: Vec<f64> = trials
                .iter()
                .map(|t| t.phases.iter().filter(|(p, _)| p == phase).map(|(_, d)| ms(*d)).sum())
                .collect();
            (phase.as_str(), median(&times))
        })
        .collect()
}

/// `pairs` interleaved pairs: the engine's downtime (value) against the raw switchover
/// (baseline), in ms, alternating which goes first.
pub async fn engine_against_raw(group: &GroupSpec, pairs: usize) -> Result<SwitchoverComparison, BenchError> {
    let mut result = Pairs::default();
    let mut engine_trials = Vec::with_capacity(pairs);
    let mut raw_trials = Vec::with_capacity(pairs);
    for pair in 0..pairs {
        if pair % 2 == 1 {
            raw_trials.push(raw_trial_off_reactor(group).await?);
        }
        engine_trials.push(engine_trial(group, true).await?);
        if pair % 2 == 0 {
            raw_trials.push(raw_trial_off_reactor(group).await?);
        }
    }
    result.values = engine_trials.iter().map(|t| ms(t.downtime)).collect();
    result.baselines = raw_trials.iter().map(|t| ms(t.downtime)).collect();
    let stage =
        |pick: fn(&RawTrial) -> Duration| median(&raw_trials.iter().map(|t| ms(pick(t))).collect::<Vec<_>>());
    let raw_stages_ms = BTreeMap::from([
        ("quiesced", stage(|t| t.quiesced)),
        ("drained", stage(|t| t.drained)),
        ("loaded", stage(|t| t.loaded)),
        ("running", stage(|t| t.downtime)),
    ]);
    Ok(SwitchoverComparison { pairs: result, engine_phases_ms: phase_medians(&engine_trials), raw_stages_ms })
}

/// What a pre-copy comparison measured, in ms.
#[derive(Clone, Debug)]
pub struct PrecopyComparison {
    /// Downtime with pre-copy (values) and without (baselines).
    pub pairs: Pairs,
    pub with_phases_ms: BTreeMap<&'static str, f64>,
    pub without_phases_ms: BTreeMap<&'static str, f64>,
    /// Median time from handshake to the destination running, with and without.
    pub total_with_ms: f64,
    pub total_without_ms: f64,
}

/// `pairs` interleaved pairs of engine migrations with pre-copy on (value) and off
/// (baseline), alternating which goes first.
pub async fn precopy_against_stop_copy(
    group: &GroupSpec,
    pairs: usize,
) -> Result<PrecopyComparison, BenchError> {
    let mut with = Vec::with_capacity(pairs);
    let mut without = Vec::with_capacity(pairs);
    for pair in 0..pairs {
        if pair % 2 == 1 {
            without.push(engine_trial(group, false).await?);
        }
        with.push(engine_trial(group, true).await?);
        if pair % 2 == 0 {
            without.push(engine_trial(group, false).await?);
        }
    }
    let downtimes = |trials: &[EngineTrial]| trials.iter().map(|t| ms(t.downtime)).collect::<Vec<_>>();
    let totals = |trials: &[EngineTrial]| median(&trials.iter().map(|t| ms(t.total)).collect::<Vec<_>>());
    if let Some(trial) = without.iter().find(|t| t.phases.iter().any(|(p, _)| *p == Phase::PreCopy)) {
        return Err(BenchError::Migration {
            job: "bench".into(),
            side: "source",
            what: format!("pre-copy ran although it was configured off ({:?})", trial.phases),
        });
    }
    Ok(PrecopyComparison {
        pairs: Pairs { values: downtimes(&with), baselines: downtimes(&without) },
        with_phases_ms: phase_medians(&with),
        without_phases_ms: phase_medians(&without),
        total_with_ms: totals(&with),
        total_without_ms: totals(&without),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(devices: usize, caps: Caps) -> GroupSpec {
        GroupSpec { devices, state_size: (256 << 10) + 5, caps, dirty_rate: 0 }
    }

    #[test]
    fn the_raw_switchover_moves_every_device_faithfully() {
        let trial = raw_trial(&small(3, Caps::STOP_COPY.union(Caps::P2P))).unwrap();
        assert!(trial.quiesced <= trial.drained);
        assert!(trial.drained <= trial.loaded && trial.loaded <= trial.downtime);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_engine_trial_reports_its_downtime_phase_by_phase() {
        let trial = engine_trial(&small(2, Caps::STOP_COPY.union(Caps::P2P)), true).await.unwrap();
        let phases: Vec<Phase> = trial.phases.iter().map(|(p, _)| *p).collect();
        for phase in DOWNTIME_PHASES {
            assert!(phases.contains(&phase), "{phase} missing from {phases:?}");
        }
        assert!(!phases.contains(&Phase::PreCopy), "devices without PRE_COPY never pre-copy");
        assert!(!trial.downtime.is_zero() && trial.downtime <= trial.total);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pre_copy_runs_only_when_configured_and_the_result_verifies() {
        let group = GroupSpec {
            dirty_rate: 1 << 20,
            ..small(2, Caps::STOP_COPY.union(Caps::P2P).union(Caps::PRE_COPY))
        };
        let comparison = precopy_against_stop_copy(&group, 1).await.unwrap();
        assert_eq!((comparison.pairs.values.len(), comparison.pairs.baselines.len()), (1, 1));
        assert!(comparison.with_phases_ms.values().all(|ms| ms.is_finite()));
    }

    #[test]
    fn a_destination_that_loaded_nothing_fails_verification() {
        let group = small(1, Caps::STOP_COPY.union(Caps::P2P));
        let sources = group.sims("src", SOURCE_SEED).unwrap();
        let destinations = group.sims("dst", DESTINATION_SEED).unwrap();
        // Both RUNNING, nothing migrated: the check must not pass on state alone.
        let err = verify(&sources, &destinations).unwrap_err().to_string();
        assert!(err.contains("dst-dev0") && err.contains("loaded None"), "{err}");
    }

    #[test]
    fn one_failing_party_releases_the_others() {
        let barrier = Rendezvous::new(3);
        thread::scope(|scope| {
            let waiter = scope.spawn(|| barrier.wait());
            // Only one of three parties ever arrives: the abandon must release it,
            // whether it arrived before or after.
            barrier.abandon();
            assert!(matches!(waiter.join().unwrap(), Err(BenchError::Abandoned)));
        });
        let complete = Rendezvous::new(2);
        thread::scope(|scope| {
            let other = scope.spawn(|| complete.wait());
            complete.wait().unwrap();
            other.join().unwrap().unwrap();
            // Abandoning after everybody met changes nothing for them.
            complete.abandon();
        });
    }
}
