//! The data connections: [`StreamSender`] on the source, [`StreamReceiver`] on the
//! destination.
//!
//! Connections are blocking `std::net::TcpStream`s, or [`rustls::StreamOwned`] over them
//! when peers use TLS ([`DataConn`]); tokio only opens, accepts and waits. Blocking
//! threads measured faster than tokio sockets on this 2-core path (no reactor wake-ups
//! between a device thread and the socket), see `docs/stream-protocol.md`. The frame
//! loops are generic over `Read`/`Write`; with TLS the preamble travels inside it, and
//! the per-frame checksums stay (one wire format in every mode).
//!
//! A destination data port serves exactly one job. A connection that fails its TLS
//! handshake, presents a certificate other than the job's source, or sends a bad
//! preamble is dropped on its own with a generic refusal: it is not counted, and the job
//! goes on (until its deadline, if the real source never comes).
//!
//! Source: device `i` goes to connection `i % connections`. Each device's reader thread
//! writes its frames to its connection itself, header and payload in one `writev`, under
//! the connection's lock, so frames of one device stay in order and the bytes move from
//! the fd to the socket on one core, as in a plain relay. A keepalive thread writes a
//! keepalive on any connection idle for a quarter of the stall timeout.
//!
//! Destination: a thread per connection checks the preamble, then reads each header,
//! reads the payload straight into one of the device's buffers, and checks checksum and
//! sequence before anything reaches the device. A device alone on its connection is
//! then written by that thread itself (it is the device's dedicated thread); devices
//! sharing a connection each have a writer thread fed through a bounded queue, so a slow
//! device holds up the others only once its buffers are all in flight.

use std::collections::BTreeMap;
use std::io::{self, IoSlice, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, TryLockError};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::socket::{setsockopt, sockopt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::frame::{
    ACK_HEAD_LEN, Accepted, ConnectionDecoder, DeviceStreamSummary, END_RECORD_LEN, FRAME_HEADER_LEN,
    FrameHeader, FrameKind, PREAMBLE_HEAD_LEN, Preamble, PreambleHead, encode_ack, encode_preamble,
    parse_ack_head,
};
use super::pump::{
    BufferPool, DeviceReader, DeviceWriter, FrameQueue, FrameSink, Incoming, Outgoing, Progress, Switchover,
};
use super::{PreambleError, StreamError, StreamFault, StreamOptions};
use crate::device::{DataFd, Direction};
use crate::peer_identity::PeerIdentity;

/// A data connection: plain TCP (loopback development) or TLS over it.
pub enum DataConn {
    Plain(TcpStream),
    TlsClient(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
    TlsServer(Box<rustls::StreamOwned<rustls::ServerConnection, TcpStream>>),
}

impl DataConn {
    /// The socket underneath, for options, clones and shutdown.
    fn tcp(&self) -> &TcpStream {
        match self {
            DataConn::Plain(s) => s,
            DataConn::TlsClient(s) => s.get_ref(),
            DataConn::TlsServer(s) => s.get_ref(),
        }
    }

    /// Ends the TLS session cleanly before the socket is shut down for writing, so the
    /// receiver sees an end of stream, not a truncation attack.
    fn close_notify(&mut self) -> io::Result<()> {
        match self {
            DataConn::Plain(_) => Ok(()),
            DataConn::TlsClient(s) => {
                s.conn.send_close_notify();
                s.flush()
            }
            DataConn::TlsServer(s) => {
                s.conn.send_close_notify();
                s.flush()
            }
        }
    }
}

impl Read for DataConn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            DataConn::Plain(s) => s.read(buf),
            DataConn::TlsClient(s) => s.read(buf),
            DataConn::TlsServer(s) => s.read(buf),
        }
    }
}

impl Write for DataConn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            DataConn::Plain(s) => s.write(buf),
            DataConn::TlsClient(s) => s.write(buf),
            DataConn::TlsServer(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            DataConn::Plain(s) => s.write_vectored(bufs),
            DataConn::TlsClient(s) => s.write_vectored(bufs),
            DataConn::TlsServer(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            DataConn::Plain(s) => s.flush(),
            DataConn::TlsClient(s) => s.flush(),
            DataConn::TlsServer(s) => s.flush(),
        }
    }
}

/// Runs a TLS handshake to completion on a blocking socket (its timeouts apply).
fn finish_handshake<D>(conn: &mut rustls::ConnectionCommon<D>, socket: &mut TcpStream) -> io::Result<()> {
    while conn.is_handshaking() {
        conn.complete_io(socket)?;
    }
    // The client's last flight (its Finished) may still be buffered.
    while conn.wants_write() {
        conn.write_tls(socket)?;
    }
    Ok(())
}

/// Who may open data connections to a destination's data port, and how.
#[derive(Clone)]
pub struct DataGuard {
    /// TLS settings of the data port (client certificates required); `None`: plaintext.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Whether a connection's peer is the job's source (asked per connection, after its
    /// TLS handshake, so it sees the binding the peer handshake made).
    pub admit: Arc<dyn Fn(&PeerIdentity) -> bool + Send + Sync>,
}

impl DataGuard {
    /// Plaintext, any peer (the session token still binds connections to the job).
    pub fn plaintext() -> DataGuard {
        DataGuard { tls: None, admit: Arc::new(|_| true) }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The devices that travel on `connection`.
fn devices_on(connection: usize, connections: usize, devices: impl IntoIterator<Item = u32>) -> Vec<u32> {
    devices.into_iter().filter(|&d| d as usize % connections == connection).collect()
}

/// Runs blocking setup work off the reactor.
async fn off_reactor<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StreamError> + Send + 'static,
) -> Result<T, StreamError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(StreamError::Aborted),
    }
}

fn spawn(name: String, body: impl FnOnce() + Send + 'static) -> Result<(), StreamError> {
    thread::Builder::new().name(name).spawn(body).map(drop).map_err(|source| StreamError::Thread { source })
}

fn tune(socket: &TcpStream, opts: &StreamOptions) -> io::Result<()> {
    socket.set_nodelay(true)?;
    crate::tls::set_keepalive(socket, opts.dead_peer)?;
    if let Some(size) = opts.socket_buffer {
        let size = size.min(i32::MAX as usize);
        setsockopt(socket, sockopt::SndBuf, &size).map_err(io::Error::from)?;
        setsockopt(socket, sockopt::RcvBuf, &size).map_err(io::Error::from)?;
    }
    socket.set_read_timeout(Some(opts.stall_timeout))?;
    socket.set_write_timeout(Some(opts.stall_timeout))
}

/// Reads until `buf` is full or the peer closed; returns how much arrived.
fn read_full(conn: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match conn.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Writes a header and its payload, as one `writev` when the socket takes it all.
fn write_frame(conn: &mut impl Write, header: &[u8], payload: &[u8]) -> io::Result<()> {
    let mut slices = [IoSlice::new(header), IoSlice::new(payload)];
    let mut pending = &mut slices[..];
    while !pending.is_empty() {
        match conn.write_vectored(pending) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut pending, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A connection's I/O failure, as the stream reports it.
struct LinkContext {
    connection: usize,
    devices: Vec<u32>,
    timeout: Duration,
}

impl LinkContext {
    fn error(&self, err: io::Error, aborted: &AtomicBool) -> StreamError {
        if aborted.load(Ordering::Acquire) {
            return StreamError::Aborted;
        }
        match err.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => StreamError::Stalled {
                connection: self.connection,
                devices: self.devices.clone(),
                timeout: self.timeout,
            },
            _ => StreamError::Connection {
                connection: self.connection,
                devices: self.devices.clone(),
                source: err,
            },
        }
    }
}

/// Where a side of the stream stands; the first error wins.
struct Outcome {
    summaries: Vec<DeviceStreamSummary>,
    links_done: usize,
    error: Option<StreamError>,
}

/// What both sides share between their threads and the task that waits for them.
struct Control {
    aborted: Arc<AtomicBool>,
    outcome: Mutex<Outcome>,
    changed: Notify,
    /// Clones of the connections, to shut them down from any thread.
    sockets: Mutex<Vec<TcpStream>>,
}

impl Control {
    fn new() -> Control {
        Control {
            aborted: Arc::new(AtomicBool::new(false)),
            outcome: Mutex::new(Outcome { summaries: Vec::new(), links_done: 0, error: None }),
            changed: Notify::new(),
            sockets: Mutex::new(Vec::new()),
        }
    }

    fn record(&self, err: StreamError) {
        let mut outcome = lock(&self.outcome);
        if outcome.error.is_none() {
            outcome.error = Some(err);
        }
        drop(outcome);
        self.changed.notify_one();
    }

    /// Keeps a clone of `socket` for [`Control::shut_down`]; refuses once aborted.
    fn register(&self, socket: &TcpStream) -> io::Result<()> {
        let clone = socket.try_clone()?;
        let mut sockets = lock(&self.sockets);
        if self.aborted.load(Ordering::Acquire) {
            let _ = clone.shutdown(Shutdown::Both);
            return Err(io::ErrorKind::ConnectionAborted.into());
        }
        sockets.push(clone);
        Ok(())
    }

    /// Sets the abort flag and unblocks every socket read and write. Dropping the clones
    /// lets the connections close for real (with a reset if data was left unread), so
    /// the peer learns at once.
    fn shut_down(&self) {
        let sockets = {
            let mut sockets = lock(&self.sockets);
            self.aborted.store(true, Ordering::Release);
            std::mem::take(&mut *sockets)
        };
        for socket in sockets {
            let _ = socket.shutdown(Shutdown::Both);
        }
        self.changed.notify_one();
    }

    fn link_done(&self, summaries: Vec<DeviceStreamSummary>) {
        let mut outcome = lock(&self.outcome);
        outcome.links_done += 1;
        outcome.summaries.extend(summaries);
        drop(outcome);
        self.changed.notify_one();
    }

    fn device_done(&self, summary: DeviceStreamSummary) {
        lock(&self.outcome).summaries.push(summary);
        self.changed.notify_one();
    }

    /// Waits until `complete` says so (→ the sorted summaries) or an error is recorded
    /// that `fatal` says ends the wait.
    async fn wait(
        &self,
        complete: impl Fn(&Outcome) -> bool,
        fatal: impl Fn(&Outcome) -> bool,
    ) -> Result<Vec<DeviceStreamSummary>, StreamError> {
        loop {
            let changed = self.changed.notified();
            {
                let mut outcome = lock(&self.outcome);
                if outcome.error.is_some() && fatal(&outcome) {
                    return Err(outcome.error.take().unwrap_or(StreamError::Aborted));
                }
                if outcome.error.is_none() && complete(&outcome) {
                    let mut summaries = std::mem::take(&mut outcome.summaries);
                    summaries.sort_by_key(|s| s.index);
                    return Ok(summaries);
                }
            }
            changed.await;
        }
    }
}

/// The source side of a stream: reads every device's saving `data_fd` and sends it.
pub struct StreamSender {
    shared: Arc<SenderShared>,
    finished: bool,
}

struct SenderShared {
    control: Control,
    opts: StreamOptions,
    devices: usize,
    links: Vec<Link<DataConn>>,
    pools: Vec<Arc<BufferPool>>,
    added: Mutex<Vec<bool>>,
    progress: Arc<Progress>,
    /// Wakes the keepalive thread when a connection closes or everything stops.
    keepalive_wake: (Mutex<()>, Condvar),
}

impl SenderShared {
    fn fail(&self, err: StreamError) {
        self.control.record(err);
        self.control.shut_down();
        for pool in &self.pools {
            pool.abort();
        }
        self.wake_keepalive();
    }

    fn wake_keepalive(&self) {
        // Taking the lock orders this wake-up after the keepalive thread's last check.
        let _order = lock(&self.keepalive_wake.0);
        self.keepalive_wake.1.notify_all();
    }

    fn stopped(&self) -> bool {
        self.control.aborted.load(Ordering::Acquire)
            || self.links.iter().all(|link| link.closed.load(Ordering::Acquire))
    }

    /// Sends a keepalive on every connection that has been idle for `idle`, until all
    /// are closed: a device in PRE_COPY may have nothing to send for a long time.
    fn keep_alive(&self) {
        let idle = self.opts.stall_timeout / 4;
        loop {
            // The lock is not held while writing: a keepalive stuck on a full socket
            // must not hold up `fail`, which wakes this thread.
            let guard = lock(&self.keepalive_wake.0);
            drop(self.keepalive_wake.1.wait_timeout_while(guard, idle / 2, |_| !self.stopped()));
            if self.stopped() {
                return;
            }
            for link in &self.links {
                if let Err(err) = link.keepalive(idle) {
                    self.fail(err);
                    return;
                }
            }
        }
    }
}

impl StreamSender {
    /// Opens every data connection to `addr` and has each preamble accepted, before any
    /// device data flows (call it outside downtime). Buffers for all `devices` devices
    /// are allocated here too.
    pub async fn connect(
        addr: SocketAddr,
        preamble: Preamble,
        opts: StreamOptions,
        devices: usize,
        progress: Arc<Progress>,
    ) -> Result<StreamSender, StreamError> {
        StreamSender::connect_tls(addr, None, preamble, opts, devices, progress).await
    }

    /// [`StreamSender::connect`] over TLS when `tls` is set: every connection verifies
    /// the destination's certificate against the name given and presents this daemon's.
    pub async fn connect_tls(
        addr: SocketAddr,
        tls: Option<(Arc<rustls::ClientConfig>, rustls::pki_types::ServerName<'static>)>,
        preamble: Preamble,
        opts: StreamOptions,
        devices: usize,
        progress: Arc<Progress>,
    ) -> Result<StreamSender, StreamError> {
        opts.validate()?;
        let connections = opts.connections_for(devices);
        let setup_opts = opts.clone();
        let (sockets, pools) = off_reactor(move || {
            let sockets = (0..connections)
                .map(|c| open_link(addr, tls.as_ref(), &preamble, &setup_opts, c, connections, devices))
                .collect::<Result<Vec<_>, _>>()?;
            // One buffer in flight, one more for a ReorderFrames fault to hold back.
            let pools = (0..devices)
                .map(|_| Arc::new(BufferPool::new(SOURCE_BUFFERS, setup_opts.max_payload)))
                .collect::<Vec<_>>();
            Ok((sockets, pools))
        })
        .await?;

        let control = Control::new();
        let mut links = Vec::with_capacity(connections);
        for (connection, socket) in sockets.into_iter().enumerate() {
            let devices = devices_on(connection, connections, 0..devices as u32);
            let io_error = |source| StreamError::Connection { connection, devices: devices.clone(), source };
            control.register(socket.tcp()).map_err(io_error)?;
            let shutdown = socket.tcp().try_clone().map_err(io_error)?;
            links.push(Link {
                state: Mutex::new(LinkState {
                    conn: socket,
                    shutdown,
                    open_devices: devices.len(),
                    sent: Vec::with_capacity(devices.len()),
                    frames_sent: 0,
                    held: None,
                    last_write: Instant::now(),
                }),
                context: LinkContext { connection, devices, timeout: opts.stall_timeout },
                closed: AtomicBool::new(false),
                aborted: Arc::clone(&control.aborted),
            });
        }
        let shared = Arc::new(SenderShared {
            control,
            opts,
            devices,
            links,
            pools,
            added: Mutex::new(vec![false; devices]),
            progress,
            keepalive_wake: (Mutex::new(()), Condvar::new()),
        });
        let sender = StreamSender { shared: Arc::clone(&shared), finished: false };
        if connections > 0 {
            spawn("migd-keepalive".to_owned(), move || shared.keep_alive())?;
        }
        Ok(sender)
    }

    /// Starts the dedicated reader thread of device `index` (of `0..devices`), which
    /// writes the device's frames to connection `index % connections`. Until
    /// `switchover` fires, a 0-byte read or ENOMSG only means "nothing more for now".
    pub fn add_device(&self, index: u32, fd: Arc<DataFd>, switchover: Switchover) -> Result<(), StreamError> {
        let shared = &self.shared;
        if index as usize >= shared.devices {
            return Err(StreamError::DeviceOutOfRange { device: index, devices: shared.devices });
        }
        if fd.direction() != Direction::Saving {
            return Err(StreamError::WrongDirection { device: index });
        }
        if shared.control.aborted.load(Ordering::Acquire) {
            return Err(StreamError::Aborted);
        }
        {
            let mut added = lock(&shared.added);
            if std::mem::replace(&mut added[index as usize], true) {
                return Err(StreamError::DuplicateDevice { device: index });
            }
        }
        let reader = DeviceReader {
            device: index,
            fd,
            switchover,
            pool: Arc::clone(&shared.pools[index as usize]),
            sink: Arc::new(DeviceRoute {
                shared: Arc::clone(shared),
                link: index as usize % shared.links.len(),
            }),
            max_payload: shared.opts.max_payload,
            precopy_poll: shared.opts.precopy_poll,
            aborted: Arc::clone(&shared.control.aborted),
        };
        let thread_shared = Arc::clone(shared);
        spawn(format!("migd-rd-{index}"), move || match reader.run() {
            // Aborted: whoever aborted has already recorded why.
            Ok(_) | Err(StreamError::Aborted) => {}
            Err(err) => thread_shared.fail(err),
        })
    }

    /// Waits until every device's END record was written to its connection and the
    /// connections were closed for writing. That the destination verified them is for
    /// the peer protocol to tell (AwaitLoaded).
    pub async fn finish(mut self) -> Result<Vec<DeviceStreamSummary>, StreamError> {
        let missing = lock(&self.shared.added).iter().position(|added| !added);
        if let Some(device) = missing {
            self.shared.fail(StreamError::MissingDevice { device: device as u32 });
        }
        let links = self.shared.links.len();
        let result = self
            .shared
            .control
            .wait(
                |outcome| outcome.links_done == links,
                // An injected fault waits for the other connections (unless something
                // else stopped them), so that what the receiver sees does not depend on
                // how fast this side gives up.
                |outcome| {
                    !matches!(outcome.error, Some(StreamError::FaultInjected { .. }))
                        || outcome.links_done == links
                        || self.shared.control.aborted.load(Ordering::Acquire)
                },
            )
            .await;
        self.finished = result.is_ok();
        result
    }

    /// Stops everything promptly (cancel, rollback): connections are shut down, so
    /// readers blocked on a socket wake up. Readers inside a device `read()` finish when
    /// it returns. Idempotent.
    pub fn abort(&self) {
        self.shared.fail(StreamError::Aborted);
    }
}

impl Drop for StreamSender {
    fn drop(&mut self) {
        if !self.finished {
            self.abort();
        }
    }
}

/// Buffers per device on the source: one in flight, one for a ReorderFrames fault.
const SOURCE_BUFFERS: usize = 2;

/// Opens data connection `connection` and has its preamble accepted.
fn open_link(
    addr: SocketAddr,
    tls: Option<&(Arc<rustls::ClientConfig>, rustls::pki_types::ServerName<'static>)>,
    preamble: &Preamble,
    opts: &StreamOptions,
    connection: usize,
    connections: usize,
    devices: usize,
) -> Result<DataConn, StreamError> {
    let context = LinkContext {
        connection,
        devices: devices_on(connection, connections, 0..devices as u32),
        timeout: opts.stall_timeout,
    };
    let not_aborted = AtomicBool::new(false);
    let mut socket = TcpStream::connect_timeout(&addr, opts.stall_timeout)
        .and_then(|socket| tune(&socket, opts).map(|()| socket))
        .map_err(|e| context.error(e, &not_aborted))?;
    let mut socket = match tls {
        None => DataConn::Plain(socket),
        Some((config, name)) => {
            let tls_error = |e: &dyn std::fmt::Display| StreamError::BadPreamble {
                connection: u16::try_from(connection).ok(),
                reason: PreambleError::Tls(e.to_string()),
            };
            let mut session =
                rustls::ClientConnection::new(config.clone(), name.clone()).map_err(|e| tls_error(&e))?;
            finish_handshake(&mut session, &mut socket).map_err(|e| tls_error(&e))?;
            DataConn::TlsClient(Box::new(rustls::StreamOwned::new(session, socket)))
        }
    };
    present_preamble(&mut socket, preamble, &context, connections).map_err(|e| match e {
        PresentError::Io(e) => context.error(e, &not_aborted),
        PresentError::Stream(e) => e,
    })?;
    Ok(socket)
}

enum PresentError {
    Io(io::Error),
    Stream(StreamError),
}

impl From<io::Error> for PresentError {
    fn from(e: io::Error) -> PresentError {
        PresentError::Io(e)
    }
}

/// Sends the preamble and reads the destination's answer.
fn present_preamble<C: Read + Write>(
    conn: &mut C,
    preamble: &Preamble,
    context: &LinkContext,
    connections: usize,
) -> Result<(), PresentError> {
    let refused = |reason: String| {
        PresentError::Stream(StreamError::Refused { connection: context.connection, reason })
    };
    let index = u16::try_from(context.connection).map_err(|_| refused("too many connections".into()))?;
    let count = u16::try_from(connections).map_err(|_| refused("too many connections".into()))?;
    let bytes = encode_preamble(preamble, index, count).map_err(|reason| {
        PresentError::Stream(StreamError::BadPreamble { connection: Some(index), reason })
    })?;
    conn.write_all(&bytes)?;
    conn.flush()?;
    let mut head = [0u8; ACK_HEAD_LEN];
    if read_full(conn, &mut head)? < ACK_HEAD_LEN {
        return Err(refused("the destination closed the connection without answering".into()));
    }
    let (accepted, reason_len) = parse_ack_head(&head).map_err(refused)?;
    if accepted {
        return Ok(());
    }
    let mut reason = vec![0u8; reason_len];
    let got = read_full(conn, &mut reason)?;
    Err(refused(String::from_utf8_lossy(&reason[..got]).into_owned()))
}

/// How a device's reader reaches its connection.
struct DeviceRoute {
    shared: Arc<SenderShared>,
    link: usize,
}

impl FrameSink for DeviceRoute {
    fn send(&self, frame: Outgoing) -> Result<(), StreamError> {
        let shared = &self.shared;
        match shared.links[self.link].send(frame, shared.opts.fault, &shared.progress) {
            Ok(None) => Ok(()),
            Ok(Some(sent)) => {
                shared.control.link_done(sent);
                shared.wake_keepalive();
                Ok(())
            }
            // An injected fault ends its own connection only, so the receiver sees
            // exactly the corruption the test asked for and nothing an abort would add.
            Err(err @ StreamError::FaultInjected { .. }) => {
                shared.control.record(err);
                shared.control.link_done(Vec::new());
                shared.wake_keepalive();
                Err(StreamError::Aborted)
            }
            Err(err) => Err(err),
        }
    }
}

/// A source connection. The readers of the devices that travel on it write to it one
/// frame at a time, under its lock.
struct Link<C> {
    context: LinkContext,
    state: Mutex<LinkState<C>>,
    /// Every END is out (or a fault ended the connection); nothing more is written.
    closed: AtomicBool,
    aborted: Arc<AtomicBool>,
}

struct LinkState<C> {
    conn: C,
    /// The same socket, to close it for writing once every END is out.
    shutdown: TcpStream,
    open_devices: usize,
    sent: Vec<DeviceStreamSummary>,
    frames_sent: u64,
    /// A frame held back by [`StreamFault::ReorderFrames`].
    held: Option<Outgoing>,
    last_write: Instant,
}

impl Link<DataConn> {
    /// Writes `frame` (corrupted as `fault` says, in tests). Returns every device's
    /// summary once the last END of this connection is out and it is closed for writing.
    fn send(
        &self,
        mut frame: Outgoing,
        fault: Option<StreamFault>,
        progress: &Progress,
    ) -> Result<Option<Vec<DeviceStreamSummary>>, StreamError> {
        let mut state = lock(&self.state);
        if self.aborted.load(Ordering::Acquire) || self.closed.load(Ordering::Acquire) {
            return Err(StreamError::Aborted);
        }
        let (device, sequence) = (frame.device(), frame.header.sequence);
        let hits = |d: u32, f: u64| d == device && f == sequence;
        match fault {
            Some(fault @ StreamFault::DropConnection { frame: after }) if state.frames_sent == after => {
                return Err(self.inject(&mut state, fault));
            }
            Some(StreamFault::FlipByte { device: d, frame: f }) if hits(d, f) => {
                let payload = frame.payload_mut();
                let middle = payload.len() / 2;
                if let Some(byte) = payload.get_mut(middle) {
                    *byte ^= 0x01;
                }
            }
            Some(fault @ StreamFault::Truncate { device: d, frame: f }) if hits(d, f) => {
                let payload = frame.payload();
                self.write(&mut state, &frame.header.encode(), &payload[..payload.len() / 2])?;
                return Err(self.inject(&mut state, fault));
            }
            Some(StreamFault::DuplicateFrame { device: d, frame: f }) if hits(d, f) => {
                self.write(&mut state, &frame.header.encode(), frame.payload())?;
            }
            // An END has no next frame to trade places with; it goes out as is.
            Some(StreamFault::ReorderFrames { device: d, frame: f })
                if hits(d, f) && frame.header.kind == FrameKind::Data =>
            {
                state.held = Some(frame);
                return Ok(None);
            }
            _ => {}
        }
        self.put(&mut state, frame, progress)?;
        if let Some(held) = state.held.take_if(|held| held.device() == device) {
            self.put(&mut state, held, progress)?;
        }
        if state.open_devices > 0 {
            return Ok(None);
        }
        state.conn.flush().map_err(|e| self.context.error(e, &self.aborted))?;
        state.conn.close_notify().map_err(|e| self.context.error(e, &self.aborted))?;
        state.shutdown.shutdown(Shutdown::Write).map_err(|e| self.context.error(e, &self.aborted))?;
        self.closed.store(true, Ordering::Release);
        Ok(Some(std::mem::take(&mut state.sent)))
    }

    /// Writes a frame and gives its buffer back, counting ENDs.
    fn put(
        &self,
        state: &mut LinkState<DataConn>,
        frame: Outgoing,
        progress: &Progress,
    ) -> Result<(), StreamError> {
        self.write(state, &frame.header.encode(), frame.payload())?;
        state.frames_sent += 1;
        if frame.header.kind == FrameKind::Data {
            progress.add(frame.device(), frame.payload().len());
        }
        if let Some(summary) = frame.release() {
            state.sent.push(summary);
            state.open_devices -= 1;
        }
        Ok(())
    }

    fn write(
        &self,
        state: &mut LinkState<DataConn>,
        header: &[u8],
        payload: &[u8],
    ) -> Result<(), StreamError> {
        write_frame(&mut state.conn, header, payload).map_err(|e| self.context.error(e, &self.aborted))?;
        state.last_write = Instant::now();
        Ok(())
    }

    /// Sends a keepalive if nothing was written for `idle` and no reader is writing.
    fn keepalive(&self, idle: Duration) -> Result<(), StreamError> {
        let mut state = match self.state.try_lock() {
            Ok(state) => state,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return Ok(()),
        };
        if self.closed.load(Ordering::Acquire) || state.last_write.elapsed() < idle {
            return Ok(());
        }
        self.write(&mut state, &FrameHeader::keepalive().encode(), &[])
    }

    fn inject(&self, state: &mut LinkState<DataConn>, fault: StreamFault) -> StreamError {
        let _ = state.conn.flush();
        let _ = state.conn.close_notify();
        let _ = state.shutdown.shutdown(Shutdown::Write);
        self.closed.store(true, Ordering::Release);
        StreamError::FaultInjected { connection: self.context.connection, fault }
    }
}

/// The destination side of a stream, before it starts: a listener on an ephemeral port.
pub struct StreamReceiver {
    listener: tokio::net::TcpListener,
}

impl StreamReceiver {
    /// Listens on an ephemeral port of `addr` (the peer listener's address); the port
    /// goes to the source in the handshake.
    pub async fn bind(addr: IpAddr) -> Result<(StreamReceiver, u16), StreamError> {
        let listener = tokio::net::TcpListener::bind((addr, 0))
            .await
            .map_err(|source| StreamError::Listener { source })?;
        StreamReceiver::from_listener(listener)
    }

    /// Receives on a listener bound by the caller (e.g. in `[peer] data_ports`, see
    /// [`super::ports`]); returns its port.
    pub fn from_listener(listener: tokio::net::TcpListener) -> Result<(StreamReceiver, u16), StreamError> {
        let port = listener.local_addr().map_err(|source| StreamError::Listener { source })?.port();
        Ok((StreamReceiver { listener }, port))
    }

    /// Starts a writer thread per device (each allocates its buffers), then accepts the
    /// data connections, checks their preambles and serves each on its own thread.
    /// Must be called inside a tokio runtime.
    pub fn start(
        self,
        preamble: Preamble,
        devices: Vec<(u32, DataFd)>,
        opts: StreamOptions,
        progress: Arc<Progress>,
    ) -> ReceiveHandle {
        self.start_guarded(DataGuard::plaintext(), preamble, devices, opts, progress)
    }

    /// [`StreamReceiver::start`], admitting only connections `guard` admits (TLS with
    /// the job's source certificate, when set).
    pub fn start_guarded(
        self,
        guard: DataGuard,
        preamble: Preamble,
        devices: Vec<(u32, DataFd)>,
        opts: StreamOptions,
        progress: Arc<Progress>,
    ) -> ReceiveHandle {
        let connections = opts.connections_for(devices.len());
        let cancel = CancellationToken::new();
        let shared = Arc::new(ReceiverShared {
            control: Control::new(),
            accepting: cancel.child_token(),
            cancel,
            guard,
            pending: AtomicUsize::new(0),
            preamble,
            connections,
            indices: devices.iter().map(|(index, _)| *index).collect(),
            slots: devices
                .iter()
                .map(|(index, _)| {
                    (
                        *index,
                        DeviceSlot {
                            pool: Arc::new(BufferPool::empty()),
                            queue: Arc::new(FrameQueue::new()),
                            direct: Mutex::new(None),
                        },
                    )
                })
                .collect(),
            claimed: Mutex::new(vec![false; connections]),
            opts,
            progress,
        });
        let handle = ReceiveHandle { shared: Arc::clone(&shared), finished: false };
        if let Err(err) = shared.check(&devices) {
            shared.fail(err);
            return handle;
        }
        let mut per_connection = vec![0usize; connections];
        for (index, _) in &devices {
            per_connection[*index as usize % connections] += 1;
        }
        for (index, fd) in devices {
            let slot = &shared.slots[&index];
            if per_connection[index as usize % connections] == 1 {
                *lock(&slot.direct) = Some(fd);
                continue;
            }
            let writer = DeviceWriter {
                device: index,
                fd,
                pool: Arc::clone(&slot.pool),
                queue: Arc::clone(&slot.queue),
                progress: Arc::clone(&shared.progress),
            };
            let thread_shared = Arc::clone(&shared);
            let (buffers, size) = (shared.opts.buffers_per_device, shared.opts.max_payload);
            let spawned = spawn(format!("migd-wr-{index}"), move || {
                writer.pool.fill(buffers, size);
                match writer.run() {
                    Ok(summary) => thread_shared.control.device_done(summary),
                    Err(StreamError::Aborted) => {}
                    Err(err) => thread_shared.fail(err),
                }
            });
            if let Err(err) = spawned {
                shared.fail(err);
                return handle;
            }
        }
        tokio::spawn(accept_links(self.listener, Arc::clone(&shared)));
        handle
    }
}

/// A running destination stream.
pub struct ReceiveHandle {
    shared: Arc<ReceiverShared>,
    finished: bool,
}

struct ReceiverShared {
    control: Control,
    cancel: CancellationToken,
    /// Cancelled once every connection index is claimed (or everything stops).
    accepting: CancellationToken,
    guard: DataGuard,
    /// Connections accepted whose TLS handshake and preamble are still awaited.
    pending: AtomicUsize,
    preamble: Preamble,
    opts: StreamOptions,
    connections: usize,
    indices: Vec<u32>,
    slots: BTreeMap<u32, DeviceSlot>,
    /// Which connection indices have presented a preamble.
    claimed: Mutex<Vec<bool>>,
    progress: Arc<Progress>,
}

struct DeviceSlot {
    pool: Arc<BufferPool>,
    queue: Arc<FrameQueue<Incoming>>,
    /// The fd of a device alone on its connection, for that connection's thread.
    direct: Mutex<Option<DataFd>>,
}

impl ReceiverShared {
    fn check(&self, devices: &[(u32, DataFd)]) -> Result<(), StreamError> {
        self.opts.validate()?;
        if self.slots.len() != devices.len() {
            let mut seen = std::collections::BTreeSet::new();
            if let Some((index, _)) = devices.iter().find(|(index, _)| !seen.insert(*index)) {
                return Err(StreamError::DuplicateDevice { device: *index });
            }
        }
        match devices.iter().find(|(_, fd)| fd.direction() != Direction::Resuming) {
            Some((index, _)) => Err(StreamError::WrongDirection { device: *index }),
            None => Ok(()),
        }
    }

    fn fail(&self, err: StreamError) {
        self.control.record(err);
        self.cancel.cancel();
        self.control.shut_down();
        for slot in self.slots.values() {
            slot.pool.abort();
            slot.queue.abort();
            drop(lock(&slot.direct).take());
        }
    }

    fn claim(&self, connection: u16) -> Result<(), PreambleError> {
        let mut claimed = lock(&self.claimed);
        match claimed.get_mut(usize::from(connection)) {
            Some(seen) if !*seen => {
                *seen = true;
                if claimed.iter().all(|&c| c) {
                    self.accepting.cancel();
                }
                Ok(())
            }
            Some(_) => Err(PreambleError::DuplicateConnection { index: connection }),
            None => Err(PreambleError::ConnectionIndex {
                index: connection,
                count: u16::try_from(self.connections).unwrap_or(u16::MAX),
            }),
        }
    }
}

impl ReceiveHandle {
    /// Resolves once every device's END record matched and every byte before it was
    /// written into the device's `data_fd`, and every connection closed cleanly; or
    /// with the first error, which has already aborted everything.
    pub async fn wait(mut self) -> Result<Vec<DeviceStreamSummary>, StreamError> {
        let (devices, links) = (self.shared.slots.len(), self.shared.connections);
        let result = self
            .shared
            .control
            .wait(|outcome| outcome.summaries.len() == devices && outcome.links_done == links, |_| true)
            .await;
        self.finished = result.is_ok();
        result
    }

    /// Stops everything promptly; the devices' writer threads finish their current
    /// `write()` and close the fds. Idempotent.
    pub fn abort(&self) {
        self.shared.fail(StreamError::Aborted);
    }
}

impl Drop for ReceiveHandle {
    fn drop(&mut self) {
        if !self.finished {
            self.abort();
        }
    }
}

/// What a refused data connection is told: nothing about the job, its id or token.
const GENERIC_REFUSAL: &str = "refused: this data port does not serve that connection";

/// Accepts data connections until every connection index is claimed or the stream
/// stops. Each is admitted on its own thread (TLS handshake, peer check, preamble) under
/// the preamble timeout; one that fails is dropped alone. Accept errors (EMFILE, ...)
/// are logged and retried with back-off.
async fn accept_links(listener: tokio::net::TcpListener, shared: Arc<ReceiverShared>) {
    const FIRST_BACKOFF: Duration = Duration::from_millis(10);
    let mut backoff = FIRST_BACKOFF;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shared.accepting.cancelled() => return,
        };
        let (socket, remote) = match accepted {
            Ok(accepted) => {
                backoff = FIRST_BACKOFF;
                accepted
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "data port: accept failed");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = shared.accepting.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        if shared.pending.fetch_add(1, Ordering::AcqRel) >= shared.opts.max_pending_connections {
            shared.pending.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!(%remote, "data port: too many connections awaiting their preamble; closed");
            continue;
        }
        let socket = socket.into_std().and_then(|socket| {
            socket.set_nonblocking(false)?;
            tune(&socket, &shared.opts)?;
            socket.set_read_timeout(Some(shared.opts.preamble_timeout))?;
            socket.set_write_timeout(Some(shared.opts.preamble_timeout))?;
            Ok(socket)
        });
        let socket = match socket {
            Ok(socket) => socket,
            Err(e) => {
                shared.pending.fetch_sub(1, Ordering::AcqRel);
                tracing::warn!(%remote, error = %e, "data port: cannot set up a connection");
                continue;
            }
        };
        let thread_shared = Arc::clone(&shared);
        let spawned = spawn("migd-rx".to_owned(), move || {
            let admitted = admit_link(socket, remote, &thread_shared);
            thread_shared.pending.fetch_sub(1, Ordering::AcqRel);
            let (conn, connection) = match admitted {
                Ok(admitted) => admitted,
                Err(reason) => {
                    tracing::warn!(%remote, %reason, "data port: connection refused; the job goes on");
                    return;
                }
            };
            let ready = thread_shared.control.register(conn.tcp()).and_then(|()| {
                conn.tcp().set_read_timeout(Some(thread_shared.opts.stall_timeout))?;
                conn.tcp().set_write_timeout(Some(thread_shared.opts.stall_timeout))
            });
            if let Err(source) = ready {
                let err = if thread_shared.control.aborted.load(Ordering::Acquire) {
                    StreamError::Aborted
                } else {
                    StreamError::Listener { source }
                };
                thread_shared.fail(err);
                return;
            }
            match serve_link(conn, usize::from(connection), &thread_shared) {
                Ok(()) => thread_shared.control.link_done(Vec::new()),
                Err(StreamError::Aborted) => {}
                Err(err) => thread_shared.fail(err),
            }
        });
        if let Err(err) = spawned {
            shared.pending.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!(%remote, error = %err, "data port: cannot start a connection thread");
        }
    }
}

/// TLS handshake (when configured), the peer check and the preamble of one connection.
fn admit_link(
    mut socket: TcpStream,
    remote: SocketAddr,
    shared: &ReceiverShared,
) -> Result<(DataConn, u16), PreambleError> {
    let tls_error = |e: &dyn std::fmt::Display| PreambleError::Tls(e.to_string());
    let (mut conn, who) = match &shared.guard.tls {
        None => (DataConn::Plain(socket), PeerIdentity { addr: Some(remote), ..PeerIdentity::default() }),
        Some(config) => {
            let mut session = rustls::ServerConnection::new(config.clone()).map_err(|e| tls_error(&e))?;
            finish_handshake(&mut session, &mut socket).map_err(|e| tls_error(&e))?;
            let certificate = session
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|cert| cert.clone().into_owned())
                .ok_or_else(|| tls_error(&"no client certificate"))?;
            let who = PeerIdentity::verified(Some(remote), certificate);
            (DataConn::TlsServer(Box::new(rustls::StreamOwned::new(session, socket))), who)
        }
    };
    if !(shared.guard.admit)(&who) {
        refuse(&mut conn);
        return Err(PreambleError::Peer);
    }
    let connection = accept_preamble(&mut conn, shared)?;
    Ok((conn, connection))
}

fn refuse(conn: &mut impl Write) {
    let _ = conn.write_all(&encode_ack(Some(GENERIC_REFUSAL)));
    let _ = conn.flush();
}

/// A destination connection's thread, once admitted: frames until the source closes.
fn serve_link<C: Read + Write>(
    conn: C,
    connection: usize,
    shared: &ReceiverShared,
) -> Result<(), StreamError> {
    let decoder =
        ConnectionDecoder::new(connection, shared.connections, &shared.indices, shared.opts.max_payload);
    let carried = decoder.carried_devices();
    let direct = match carried[..] {
        [device] => lock(&shared.slots[&device].direct).take().map(|fd| DirectDevice {
            device,
            fd,
            buf: vec![0x5a; shared.opts.max_payload],
        }),
        _ => None,
    };
    let context = LinkContext { connection, devices: carried, timeout: shared.opts.stall_timeout };
    LinkReader { context, decoder, conn, shared, direct }.run()
}

/// Reads and checks the preamble (its size is bounded by the head, its time by the
/// socket's preamble timeout) and claims its connection index. A refusal is answered
/// generically: the job id and token are never echoed.
fn accept_preamble<C: Read + Write>(conn: &mut C, shared: &ReceiverShared) -> Result<u16, PreambleError> {
    let mut raw = [0u8; PREAMBLE_HEAD_LEN];
    if read_full(conn, &mut raw).map_err(|_| PreambleError::Incomplete)? < PREAMBLE_HEAD_LEN {
        return Err(PreambleError::Incomplete);
    }
    let refused = |conn: &mut C, reason: PreambleError| {
        refuse(conn);
        reason
    };
    let head = PreambleHead::parse(&raw).map_err(|reason| refused(conn, reason))?;
    let mut body = vec![0u8; head.body_len()];
    let got = read_full(conn, &mut body).map_err(|_| PreambleError::Incomplete)?;
    if got < body.len() {
        return Err(PreambleError::Incomplete);
    }
    head.verify(&raw, &body, &shared.preamble, shared.connections).map_err(|reason| refused(conn, reason))?;
    shared.claim(head.connection).map_err(|reason| refused(conn, reason))?;
    conn.write_all(&encode_ack(None)).and_then(|()| conn.flush()).map_err(|_| PreambleError::Incomplete)?;
    Ok(head.connection)
}

/// A device that travels alone on its connection: the connection's receiver thread is
/// then dedicated to it and writes its payloads itself, with no hand-off to a writer.
struct DirectDevice {
    device: u32,
    fd: DataFd,
    buf: Vec<u8>,
}

struct LinkReader<'a, C> {
    context: LinkContext,
    decoder: ConnectionDecoder,
    conn: C,
    shared: &'a ReceiverShared,
    direct: Option<DirectDevice>,
}

impl<C: Read> LinkReader<'_, C> {
    fn run(mut self) -> Result<(), StreamError> {
        let mut raw = [0u8; FRAME_HEADER_LEN];
        // END records, keepalives, and frames about to be refused.
        let mut aside = Vec::with_capacity(END_RECORD_LEN);
        loop {
            let got = read_full(&mut self.conn, &mut raw).map_err(|e| self.io_error(e))?;
            if got == 0 {
                return self.decoder.finish();
            }
            if got < FRAME_HEADER_LEN {
                return Err(self.decoder.truncated_in_frame(None, got));
            }
            let header = self.decoder.header(&raw)?;
            if self.decoder.is_deliverable(&header) {
                self.data(&header)?;
                continue;
            }
            aside.resize(header.payload_len(), 0);
            self.read_payload(&header, &mut aside)?;
            match self.decoder.accept(&header, &aside)? {
                Accepted::End(summary) => self.end(summary)?,
                Accepted::Keepalive => {}
                Accepted::Data { device } => self.deliver_copy(device, &aside)?,
            }
        }
    }

    fn read_payload(&mut self, header: &FrameHeader, payload: &mut [u8]) -> Result<(), StreamError> {
        let got = read_full(&mut self.conn, payload).map_err(|e| self.io_error(e))?;
        if got < payload.len() {
            return Err(self.decoder.truncated_in_frame(Some(header), got));
        }
        Ok(())
    }

    /// A data frame of a device this connection carries: read into the device's buffer,
    /// checked, then written (direct) or queued for the device's writer.
    fn data(&mut self, header: &FrameHeader) -> Result<(), StreamError> {
        let len = header.payload_len();
        if let Some(mut direct) = self.direct.take_if(|direct| direct.device == header.device) {
            let result = self.read_payload(header, &mut direct.buf[..len]).and_then(|()| {
                self.decoder.accept(header, &direct.buf[..len])?;
                direct.write(len, &self.shared.progress)
            });
            self.direct = Some(direct);
            return result;
        }
        let slot = self.slot(header.device)?;
        let mut buf = slot.pool.take().ok_or(StreamError::Aborted)?;
        self.read_payload(header, &mut buf[..len])?;
        self.decoder.accept(header, &buf[..len])?;
        self.queue(header.device, Incoming::Data { buf, len })
    }

    /// Only reachable if `is_deliverable` and `accept` ever disagreed: still delivers.
    fn deliver_copy(&mut self, device: u32, payload: &[u8]) -> Result<(), StreamError> {
        if let Some(direct) = self.direct.as_mut().filter(|direct| direct.device == device) {
            direct.buf[..payload.len()].copy_from_slice(payload);
            return direct.write(payload.len(), &self.shared.progress);
        }
        let mut buf = self.slot(device)?.pool.take().ok_or(StreamError::Aborted)?;
        buf[..payload.len()].copy_from_slice(payload);
        self.queue(device, Incoming::Data { buf, len: payload.len() })
    }

    /// The device's END matched: done once every byte before it is in the device.
    fn end(&mut self, summary: DeviceStreamSummary) -> Result<(), StreamError> {
        if self.direct.as_ref().is_some_and(|direct| direct.device == summary.index) {
            // Every payload was written synchronously; closing the fd ends the session.
            self.direct = None;
            self.shared.control.device_done(summary);
            return Ok(());
        }
        self.queue(summary.index, Incoming::End(summary))
    }

    fn slot(&self, device: u32) -> Result<&DeviceSlot, StreamError> {
        self.shared.slots.get(&device).ok_or(StreamError::Aborted)
    }

    fn queue(&self, device: u32, item: Incoming) -> Result<(), StreamError> {
        if self.slot(device)?.queue.push(item) { Ok(()) } else { Err(StreamError::Aborted) }
    }

    fn io_error(&self, err: io::Error) -> StreamError {
        self.context.error(err, &self.shared.control.aborted)
    }
}

impl DirectDevice {
    fn write(&self, len: usize, progress: &Progress) -> Result<(), StreamError> {
        self.fd.write_all_bytes(&self.buf[..len]).map_err(|errno| StreamError::DataFd {
            device: self.device,
            op: crate::device::Op::DataWrite,
            errno,
        })?;
        progress.add(self.device, len);
        Ok(())
    }
}
