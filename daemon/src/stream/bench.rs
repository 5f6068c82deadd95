//! The stream against the physical limit of its path, measured in the same run: the
//! same endpoints (device-state producers at the source, consumers at the destination)
//! joined either by [`StreamSender`]/[`StreamReceiver`] or by a plain relay (read/write
//! loops, no framing, no checksum) over one TCP connection per device.
//!
//! Endpoints come from a [`BenchEndpoints`]; [`PipeEndpoints`] feeds and drains pipes
//! with threads, and the project's bench command can plug simulated devices in instead.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use nix::fcntl::{FcntlArg, fcntl};

use super::{
    DataGuard, Preamble, Progress, StreamError, StreamOptions, StreamReceiver, StreamSender, Switchover,
};
use crate::device::{DataFd, Direction};

/// One end of one device for one trial.
pub struct Endpoint {
    pub fd: DataFd,
    /// Waits for the producer or consumer behind `fd` and returns how many bytes it
    /// produced or consumed. Called after the transfer, once `fd` has been dropped.
    pub done: Box<dyn FnOnce() -> io::Result<u64> + Send>,
}

/// Producers and consumers of device state for benchmark trials.
pub trait BenchEndpoints: Send + Sync {
    /// A saving-side fd that yields `bytes` bytes of state and then its final end.
    fn source(&self, device: u32, bytes: u64) -> io::Result<Endpoint>;
    /// A resuming-side fd that consumes a device state.
    fn sink(&self, device: u32) -> io::Result<Endpoint>;
}

/// Pipes with a writer thread behind each source and a reader thread behind each sink.
pub struct PipeEndpoints {
    pipe_size: usize,
    pattern: Arc<Vec<u8>>,
}

impl PipeEndpoints {
    /// `pipe_size` goes to `F_SETPIPE_SZ` (1 MiB is the usual system maximum; the
    /// default 64 KiB makes the pipe the bottleneck).
    pub fn new(pipe_size: usize) -> PipeEndpoints {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let pattern = (0..1 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        PipeEndpoints { pipe_size, pattern: Arc::new(pattern) }
    }

    fn pipe(&self) -> io::Result<(OwnedFd, OwnedFd)> {
        let (r, w) = nix::unistd::pipe()?;
        let size = i32::try_from(self.pipe_size).unwrap_or(i32::MAX);
        fcntl(&w, FcntlArg::F_SETPIPE_SZ(size))?;
        Ok((r, w))
    }
}

impl BenchEndpoints for PipeEndpoints {
    fn source(&self, device: u32, bytes: u64) -> io::Result<Endpoint> {
        let (r, w) = self.pipe()?;
        let pattern = Arc::clone(&self.pattern);
        let feeder = thread::Builder::new().name(format!("bench-feed-{device}")).spawn(move || {
            let mut w = std::fs::File::from(w);
            let mut left = bytes;
            while left > 0 {
                let n = left.min(pattern.len() as u64) as usize;
                w.write_all(&pattern[..n])?;
                left -= n as u64;
            }
            Ok(bytes)
        })?;
        Ok(Endpoint { fd: DataFd::new(r, Direction::Saving), done: Box::new(move || join(feeder)) })
    }

    fn sink(&self, device: u32) -> io::Result<Endpoint> {
        let (r, w) = self.pipe()?;
        let drainer = thread::Builder::new().name(format!("bench-drain-{device}")).spawn(move || {
            let mut r = std::fs::File::from(r);
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0u64;
            loop {
                match r.read(&mut buf) {
                    Ok(0) => return Ok(total),
                    Ok(n) => total += n as u64,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        })?;
        Ok(Endpoint { fd: DataFd::new(w, Direction::Resuming), done: Box::new(move || join(drainer)) })
    }
}

fn join(handle: thread::JoinHandle<io::Result<u64>>) -> io::Result<u64> {
    handle.join().unwrap_or_else(|_| Err(io::Error::other("benchmark endpoint thread panicked")))
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("benchmark I/O: {0}")]
    Io(#[from] io::Error),
    #[error("benchmark stream: {0}")]
    Stream(#[from] StreamError),
    #[error("device {device}: {got} bytes arrived, {expected} were sent")]
    ShortDelivery { device: u32, expected: u64, got: u64 },
}

/// What a trial moves.
#[derive(Clone, Debug)]
pub struct BenchSetup {
    pub devices: usize,
    pub bytes_per_device: u64,
    /// For the stream; the relay always uses one connection per device, so pass
    /// `connections == devices` for a like-for-like comparison.
    pub opts: StreamOptions,
    /// Run the stream's data connections over TLS (the relay stays plain TCP).
    pub tls: Option<BenchTls>,
}

/// TLS for the stream arm: the destination's and the source's settings, and the name
/// the destination's certificate carries.
#[derive(Clone)]
pub struct BenchTls {
    pub server: Arc<rustls::ServerConfig>,
    pub client: Arc<rustls::ClientConfig>,
    pub name: rustls::pki_types::ServerName<'static>,
}

impl std::fmt::Debug for BenchTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BenchTls").field("name", &self.name).finish_non_exhaustive()
    }
}

impl BenchSetup {
    fn total_bytes(&self) -> u64 {
        self.bytes_per_device * self.devices as u64
    }
}

/// Medians of interleaved trials, in GB/s (10^9 bytes/s).
#[derive(Clone, Debug)]
pub struct Comparison {
    pub value: f64,
    pub baseline: f64,
    /// `value / baseline`.
    pub ratio: f64,
    pub values: Vec<f64>,
    pub baselines: Vec<f64>,
    /// Median over the stream trials of bytes per data frame: small frames mean the
    /// producers' reads return little at a time.
    pub mean_frame_bytes: f64,
    /// Median CPU time (user + system, whole process) per GB moved, stream and relay:
    /// what the stream costs on top of the path, whatever else the machine is doing.
    pub cpu_seconds_per_gb: f64,
    pub baseline_cpu_seconds_per_gb: f64,
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 { sorted[mid] } else { (sorted[mid - 1] + sorted[mid]) / 2.0 }
}

fn rate(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64() / 1e9
}

fn check_delivery(device: u32, expected: u64, got: u64) -> Result<(), BenchError> {
    if got == expected { Ok(()) } else { Err(BenchError::ShortDelivery { device, expected, got }) }
}

/// Runs `pairs` pairs of trials, alternating which of the two goes first, after one
/// unmeasured pair (the first trial of a process pays for page faults and socket
/// buffer growth that later ones do not).
pub async fn compare(
    endpoints: Arc<dyn BenchEndpoints>,
    setup: &BenchSetup,
    pairs: usize,
) -> Result<Comparison, BenchError> {
    let mut values = Vec::with_capacity(pairs);
    let mut baselines = Vec::with_capacity(pairs);
    let mut frame_sizes = Vec::with_capacity(pairs);
    let mut cpu = Vec::with_capacity(pairs);
    let mut baseline_cpu = Vec::with_capacity(pairs);
    let gb = setup.total_bytes() as f64 / 1e9;
    relay_trial_off_reactor(&endpoints, setup).await?;
    stream_trial(endpoints.as_ref(), setup).await?;
    for pair in 0..pairs {
        let relay_first = pair % 2 == 0;
        if relay_first {
            let (rate, seconds) = relay_trial_off_reactor(&endpoints, setup).await?;
            baselines.push(rate);
            baseline_cpu.push(seconds / gb);
        }
        let before = cpu_seconds()?;
        let trial = stream_trial(endpoints.as_ref(), setup).await?;
        cpu.push((cpu_seconds()? - before) / gb);
        values.push(trial.rate);
        frame_sizes.push(trial.mean_frame_bytes);
        if !relay_first {
            let (rate, seconds) = relay_trial_off_reactor(&endpoints, setup).await?;
            baselines.push(rate);
            baseline_cpu.push(seconds / gb);
        }
    }
    let (value, baseline) = (median(&values), median(&baselines));
    Ok(Comparison {
        value,
        baseline,
        ratio: value / baseline,
        values,
        baselines,
        mean_frame_bytes: median(&frame_sizes),
        cpu_seconds_per_gb: median(&cpu),
        baseline_cpu_seconds_per_gb: median(&baseline_cpu),
    })
}

/// CPU time the whole process has used so far.
fn cpu_seconds() -> io::Result<f64> {
    use nix::sys::resource::{UsageWho, getrusage};
    let usage = getrusage(UsageWho::RUSAGE_SELF).map_err(io::Error::from)?;
    let seconds = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    Ok(seconds(usage.user_time()) + seconds(usage.system_time()))
}

/// A relay trial on a blocking thread: its rate and the CPU seconds it used.
async fn relay_trial_off_reactor(
    endpoints: &Arc<dyn BenchEndpoints>,
    setup: &BenchSetup,
) -> Result<(f64, f64), BenchError> {
    let (endpoints, setup) = (Arc::clone(endpoints), setup.clone());
    tokio::task::spawn_blocking(move || {
        let before = cpu_seconds()?;
        let rate = relay_trial(endpoints.as_ref(), &setup)?;
        Ok((rate, cpu_seconds()? - before))
    })
    .await
    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// What one stream trial measured.
#[derive(Clone, Copy, Debug)]
pub struct StreamTrial {
    /// GB/s.
    pub rate: f64,
    pub mean_frame_bytes: f64,
}

/// One trial of the stream; GB/s from the first device given to the sender until every
/// consumer has seen its device's end. Connections and buffers are set up before.
pub async fn stream_trial(
    endpoints: &dyn BenchEndpoints,
    setup: &BenchSetup,
) -> Result<StreamTrial, BenchError> {
    let preamble = Preamble { job_id: "bench".into(), token: b"bench".to_vec() };
    let (receiver, port) = StreamReceiver::bind(Ipv4Addr::LOCALHOST.into()).await?;
    let mut sinks = Vec::with_capacity(setup.devices);
    let mut sink_fds = Vec::with_capacity(setup.devices);
    for device in 0..setup.devices as u32 {
        let sink = endpoints.sink(device)?;
        sink_fds.push((device, sink.fd));
        sinks.push(sink.done);
    }
    let guard = match &setup.tls {
        Some(tls) => DataGuard { tls: Some(tls.server.clone()), admit: Arc::new(|_| true) },
        None => DataGuard::plaintext(),
    };
    let handle = receiver.start_guarded(
        guard,
        preamble.clone(),
        sink_fds,
        setup.opts.clone(),
        Arc::new(Progress::new(setup.devices)),
    );
    let addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
    let progress = Arc::new(Progress::new(setup.devices));
    let tls = setup.tls.as_ref().map(|tls| (tls.client.clone(), tls.name.clone()));
    let sender =
        StreamSender::connect_tls(addr, tls, preamble, setup.opts.clone(), setup.devices, progress).await?;
    let mut sources = Vec::with_capacity(setup.devices);
    let mut source_fds = Vec::with_capacity(setup.devices);
    for device in 0..setup.devices as u32 {
        let source = endpoints.source(device, setup.bytes_per_device)?;
        source_fds.push(Arc::new(source.fd));
        sources.push(source.done);
    }

    let started = Instant::now();
    for (device, fd) in source_fds.into_iter().enumerate() {
        sender.add_device(device as u32, fd, Switchover::stop_copy())?;
    }
    let (sent, received) = tokio::join!(sender.finish(), handle.wait());
    sent?;
    let frames: u64 = received?.iter().map(|summary| summary.frames).sum();
    let consumed =
        tokio::task::spawn_blocking(move || sinks.into_iter().map(|done| done()).collect::<Vec<_>>())
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    let elapsed = started.elapsed();

    for (device, got) in consumed.into_iter().enumerate() {
        check_delivery(device as u32, setup.bytes_per_device, got?)?;
    }
    for done in sources {
        done()?;
    }
    Ok(StreamTrial {
        rate: rate(setup.total_bytes(), elapsed),
        mean_frame_bytes: setup.total_bytes() as f64 / frames.max(1) as f64,
    })
}

/// One trial of the plain relay, blocking: per device, a thread copies the source fd to
/// a TCP connection and another copies the connection to the sink fd.
pub fn relay_trial(endpoints: &dyn BenchEndpoints, setup: &BenchSetup) -> Result<f64, BenchError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addr = listener.local_addr()?;
    let mut outgoing = Vec::with_capacity(setup.devices);
    let mut incoming = Vec::with_capacity(setup.devices);
    for device in 0..setup.devices as u32 {
        let mut out = TcpStream::connect(addr)?;
        out.write_all(&device.to_le_bytes())?;
        let (mut inc, _) = listener.accept()?;
        let mut index = [0u8; 4];
        inc.read_exact(&mut index)?;
        for socket in [&out, &inc] {
            socket.set_nodelay(true)?;
            if let Some(size) = setup.opts.socket_buffer {
                use nix::sys::socket::{setsockopt, sockopt};
                setsockopt(socket, sockopt::SndBuf, &size).map_err(io::Error::from)?;
                setsockopt(socket, sockopt::RcvBuf, &size).map_err(io::Error::from)?;
            }
        }
        outgoing.push(out);
        incoming.push((u32::from_le_bytes(index), inc));
    }
    incoming.sort_by_key(|(index, _)| *index);
    let mut sinks = Vec::with_capacity(setup.devices);
    let mut sources = Vec::with_capacity(setup.devices);
    for device in 0..setup.devices as u32 {
        sinks.push(endpoints.sink(device)?);
        sources.push(endpoints.source(device, setup.bytes_per_device)?);
    }

    let buf_size = setup.opts.max_payload;
    let started = Instant::now();
    let mut relays = Vec::with_capacity(2 * setup.devices);
    let mut sink_done = Vec::with_capacity(setup.devices);
    let mut source_done = Vec::with_capacity(setup.devices);
    for ((source, mut out), (sink, (_, mut inc))) in
        sources.into_iter().zip(outgoing).zip(sinks.into_iter().zip(incoming))
    {
        let source_fd = source.fd;
        source_done.push(source.done);
        relays.push(thread::spawn(move || -> io::Result<()> {
            let mut buf = vec![0u8; buf_size];
            loop {
                let n = (&source_fd).read(&mut buf)?;
                if n == 0 {
                    return out.shutdown(std::net::Shutdown::Write);
                }
                out.write_all(&buf[..n])?;
            }
        }));
        let sink_fd = sink.fd;
        sink_done.push(sink.done);
        relays.push(thread::spawn(move || -> io::Result<()> {
            let mut buf = vec![0u8; buf_size];
            loop {
                let n = inc.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                sink_fd.write_all_bytes(&buf[..n]).map_err(io::Error::from)?;
            }
        }));
    }
    for relay in relays {
        relay.join().unwrap_or_else(|_| Err(io::Error::other("relay thread panicked")))?;
    }
    let consumed = sink_done.into_iter().map(|done| done()).collect::<Vec<_>>();
    let elapsed = started.elapsed();

    for (device, got) in consumed.into_iter().enumerate() {
        check_delivery(device as u32, setup.bytes_per_device, got?)?;
    }
    for done in source_done {
        done()?;
    }
    Ok(rate(setup.total_bytes(), elapsed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn both_arms_move_every_byte() {
        let setup = BenchSetup {
            devices: 3,
            bytes_per_device: 3 << 20,
            opts: StreamOptions { connections: 3, ..StreamOptions::default() },
            tls: None,
        };
        let comparison = compare(Arc::new(PipeEndpoints::new(1 << 20)), &setup, 1).await.unwrap();
        assert_eq!((comparison.values.len(), comparison.baselines.len()), (1, 1));
        assert!(comparison.value > 0.0 && comparison.baseline > 0.0);
    }

    #[test]
    fn median_of_even_and_odd_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
