//! The data connections: [`StreamSender`] on the source, [`StreamReceiver`] on the
//! destination.
//!
//! Each connection is a blocking `std::net::TcpStream` served by its own thread; tokio
//! only opens, accepts and waits. Blocking threads measured faster than tokio sockets on
//! this 2-core path (no reactor wake-ups between a device thread and the socket), see
//! `docs/stream-protocol.md`. The frame loops are generic over `Read`/`Write`, so a TLS
//! stream (e.g. `rustls::StreamOwned` over the same `TcpStream`) can replace the plain
//! socket after `connect`/`accept` without touching them; the preamble is sent inside it.
//!
//! Source: device `i` goes to connection `i % connections`. A connection thread takes
//! frames from its queue in the order the devices' readers queued them, writes header
//! and payload with one `writev`, and gives the buffer back to the device. It sends a
//! keepalive whenever it has been idle for a quarter of the stall timeout.
//!
//! Destination: a connection thread checks the preamble, then reads each header, reads
//! the payload straight into one of the device's buffers, checks checksum and sequence
//! (the frame is refused before anything reaches the device), and queues it for the
//! device's writer thread.

use std::collections::BTreeMap;
use std::io::{self, IoSlice, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::Duration;

use nix::sys::socket::{setsockopt, sockopt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::frame::{
    ACK_HEAD_LEN, Accepted, ConnectionDecoder, DeviceStreamSummary, END_RECORD_LEN, FRAME_HEADER_LEN,
    FrameHeader, FrameKind, PREAMBLE_HEAD_LEN, Preamble, PreambleHead, encode_ack, encode_preamble,
    parse_ack_head,
};
use super::pump::{
    BufferPool, DeviceReader, DeviceWriter, FrameQueue, Incoming, Outgoing, Popped, Progress, Switchover,
};
use super::{PreambleError, StreamError, StreamFault, StreamOptions};
use crate::device::{DataFd, Direction};

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
    links: Vec<SenderLink>,
    pools: Vec<Arc<BufferPool>>,
    added: Mutex<Vec<bool>>,
}

struct SenderLink {
    queue: Arc<FrameQueue<Outgoing>>,
    devices: Vec<u32>,
}

impl SenderShared {
    fn fail(&self, err: StreamError) {
        self.control.record(err);
        self.control.shut_down();
        for link in &self.links {
            link.queue.abort();
        }
        for pool in &self.pools {
            pool.abort();
        }
    }

    /// An injected fault ends its own connection only, so the receiver sees exactly
    /// the corruption the test asked for and nothing that the abort would add.
    fn fail_link(&self, connection: usize, err: StreamError) {
        self.control.record(err);
        let link = &self.links[connection];
        link.queue.abort();
        for &device in &link.devices {
            self.pools[device as usize].abort();
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
        opts.validate()?;
        let connections = opts.connections_for(devices);
        let setup_opts = opts.clone();
        let (sockets, pools) = off_reactor(move || {
            let sockets = (0..connections)
                .map(|c| open_link(addr, &preamble, &setup_opts, c, connections, devices))
                .collect::<Result<Vec<_>, _>>()?;
            let pools = (0..devices)
                .map(|_| Arc::new(BufferPool::new(setup_opts.buffers_per_device, setup_opts.max_payload)))
                .collect::<Vec<_>>();
            Ok((sockets, pools))
        })
        .await?;

        let links = (0..connections)
            .map(|c| SenderLink {
                queue: Arc::new(FrameQueue::new()),
                devices: devices_on(c, connections, 0..devices as u32),
            })
            .collect();
        let shared = Arc::new(SenderShared {
            control: Control::new(),
            opts,
            devices,
            links,
            pools,
            added: Mutex::new(vec![false; devices]),
        });
        let sender = StreamSender { shared: Arc::clone(&shared), finished: false };
        for (connection, socket) in sockets.into_iter().enumerate() {
            shared.control.register(&socket).map_err(|source| StreamError::Connection {
                connection,
                devices: shared.links[connection].devices.clone(),
                source,
            })?;
            let link = &shared.links[connection];
            let writer = LinkWriter {
                context: LinkContext {
                    connection,
                    devices: link.devices.clone(),
                    timeout: shared.opts.stall_timeout,
                },
                shutdown: socket.try_clone().map_err(|source| StreamError::Connection {
                    connection,
                    devices: link.devices.clone(),
                    source,
                })?,
                conn: socket,
                queue: Arc::clone(&link.queue),
                progress: Arc::clone(&progress),
                fault: shared.opts.fault,
                keepalive_every: shared.opts.stall_timeout / 4,
                aborted: Arc::clone(&shared.control.aborted),
                frames_sent: 0,
                held: None,
            };
            let thread_shared = Arc::clone(&shared);
            spawn(format!("migd-tx-{connection}"), move || {
                match writer.run() {
                    Ok(sent) => return thread_shared.control.link_done(sent),
                    // Whoever aborted has already recorded why.
                    Err(StreamError::Aborted) => {}
                    Err(err @ StreamError::FaultInjected { .. }) => thread_shared.fail_link(connection, err),
                    Err(err) => thread_shared.fail(err),
                }
                thread_shared.control.link_done(Vec::new());
            })?;
        }
        Ok(sender)
    }

    /// Starts the dedicated reader thread of device `index` (of `0..devices`). Until
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
        let connections = shared.links.len();
        let reader = DeviceReader {
            device: index,
            fd,
            switchover,
            pool: Arc::clone(&shared.pools[index as usize]),
            queue: Arc::clone(&shared.links[index as usize % connections].queue),
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
                // An injected fault waits for the other connections, so that what the
                // receiver sees does not depend on how fast this side gives up.
                |outcome| {
                    !matches!(outcome.error, Some(StreamError::FaultInjected { .. }))
                        || outcome.links_done == links
                },
            )
            .await;
        self.finished = result.is_ok();
        result
    }

    /// Stops everything promptly (cancel, rollback): queues and pools wake their
    /// waiters, connections are shut down. Reader threads inside a device `read()`
    /// finish when it returns. Idempotent.
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

/// Opens data connection `connection` and has its preamble accepted.
fn open_link(
    addr: SocketAddr,
    preamble: &Preamble,
    opts: &StreamOptions,
    connection: usize,
    connections: usize,
    devices: usize,
) -> Result<TcpStream, StreamError> {
    let context = LinkContext {
        connection,
        devices: devices_on(connection, connections, 0..devices as u32),
        timeout: opts.stall_timeout,
    };
    let not_aborted = AtomicBool::new(false);
    let mut socket = TcpStream::connect_timeout(&addr, opts.stall_timeout)
        .and_then(|socket| tune(&socket, opts).map(|()| socket))
        .map_err(|e| context.error(e, &not_aborted))?;
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

/// A source connection's thread: frames from the queue onto the wire.
struct LinkWriter<C> {
    context: LinkContext,
    conn: C,
    /// The same socket, to close it for writing once every END is out.
    shutdown: TcpStream,
    queue: Arc<FrameQueue<Outgoing>>,
    progress: Arc<Progress>,
    fault: Option<StreamFault>,
    keepalive_every: Duration,
    aborted: Arc<AtomicBool>,
    frames_sent: u64,
    /// A frame held back by [`StreamFault::ReorderFrames`].
    held: Option<Outgoing>,
}

impl<C: Write> LinkWriter<C> {
    fn run(mut self) -> Result<Vec<DeviceStreamSummary>, StreamError> {
        let keepalive = FrameHeader::keepalive().encode();
        let mut sent = Vec::with_capacity(self.context.devices.len());
        while sent.len() < self.context.devices.len() {
            match self.queue.pop(Some(self.keepalive_every)) {
                Popped::Item(frame) => sent.extend(self.send(frame)?),
                Popped::Idle => self.write(&keepalive, &[])?,
                Popped::Aborted => return Err(StreamError::Aborted),
            }
        }
        self.conn.flush().map_err(|e| self.context.error(e, &self.aborted))?;
        self.shutdown.shutdown(Shutdown::Write).map_err(|e| self.context.error(e, &self.aborted))?;
        Ok(sent)
    }

    fn write(&mut self, header: &[u8], payload: &[u8]) -> Result<(), StreamError> {
        write_frame(&mut self.conn, header, payload).map_err(|e| self.context.error(e, &self.aborted))
    }

    /// Writes a frame and gives its buffer back; returns the summary after an END.
    fn put(&mut self, frame: Outgoing) -> Result<Option<DeviceStreamSummary>, StreamError> {
        self.write(&frame.header.encode(), frame.payload())?;
        self.frames_sent += 1;
        if frame.header.kind == FrameKind::Data {
            self.progress.add(frame.device(), frame.payload().len());
        }
        Ok(frame.release())
    }

    fn send(&mut self, mut frame: Outgoing) -> Result<Option<DeviceStreamSummary>, StreamError> {
        let (device, sequence) = (frame.device(), frame.header.sequence);
        let hits = |d: u32, f: u64| d == device && f == sequence;
        match self.fault {
            Some(fault @ StreamFault::DropConnection { frame: after }) if self.frames_sent == after => {
                return Err(self.inject(fault));
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
                let half = &payload[..payload.len() / 2];
                self.write(&frame.header.encode(), half)?;
                return Err(self.inject(fault));
            }
            Some(StreamFault::DuplicateFrame { device: d, frame: f }) if hits(d, f) => {
                self.write(&frame.header.encode(), frame.payload())?;
            }
            // An END has no next frame to trade places with; it goes out as is.
            Some(StreamFault::ReorderFrames { device: d, frame: f })
                if hits(d, f) && frame.header.kind == FrameKind::Data =>
            {
                self.held = Some(frame);
                return Ok(None);
            }
            _ => {}
        }
        let mut ended = self.put(frame)?;
        if let Some(held) = self.held.take_if(|held| held.device() == device) {
            ended = ended.or(self.put(held)?);
        }
        Ok(ended)
    }

    fn inject(&mut self, fault: StreamFault) -> StreamError {
        let _ = self.conn.flush();
        let _ = self.shutdown.shutdown(Shutdown::Write);
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
        let connections = opts.connections_for(devices.len());
        let shared = Arc::new(ReceiverShared {
            control: Control::new(),
            cancel: CancellationToken::new(),
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
                        },
                    )
                })
                .collect(),
            claimed: Mutex::new(vec![false; connections]),
            opts,
        });
        let handle = ReceiveHandle { shared: Arc::clone(&shared), finished: false };
        if let Err(err) = shared.check(&devices) {
            shared.fail(err);
            return handle;
        }
        for (index, fd) in devices {
            let slot = &shared.slots[&index];
            let writer = DeviceWriter {
                device: index,
                fd,
                pool: Arc::clone(&slot.pool),
                queue: Arc::clone(&slot.queue),
                progress: Arc::clone(&progress),
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
    preamble: Preamble,
    opts: StreamOptions,
    connections: usize,
    indices: Vec<u32>,
    slots: BTreeMap<u32, DeviceSlot>,
    /// Which connection indices have presented a preamble.
    claimed: Mutex<Vec<bool>>,
}

struct DeviceSlot {
    pool: Arc<BufferPool>,
    queue: Arc<FrameQueue<Incoming>>,
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
        }
    }

    fn claim(&self, connection: u16) -> Result<(), PreambleError> {
        let mut claimed = lock(&self.claimed);
        match claimed.get_mut(usize::from(connection)) {
            Some(seen) if !*seen => {
                *seen = true;
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

async fn accept_links(listener: tokio::net::TcpListener, shared: Arc<ReceiverShared>) {
    for _ in 0..shared.connections {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shared.cancel.cancelled() => return,
        };
        let socket = accepted.and_then(|(socket, _)| {
            let socket = socket.into_std()?;
            socket.set_nonblocking(false)?;
            tune(&socket, &shared.opts)?;
            shared.control.register(&socket)?;
            Ok(socket)
        });
        let socket = match socket {
            Ok(socket) => socket,
            Err(source) => {
                let err = if shared.control.aborted.load(Ordering::Acquire) {
                    StreamError::Aborted
                } else {
                    StreamError::Listener { source }
                };
                shared.fail(err);
                return;
            }
        };
        let thread_shared = Arc::clone(&shared);
        let spawned = spawn("migd-rx".to_owned(), move || match serve_link(socket, &thread_shared) {
            Ok(()) => thread_shared.control.link_done(Vec::new()),
            Err(StreamError::Aborted) => {}
            Err(err) => thread_shared.fail(err),
        });
        if let Err(err) = spawned {
            shared.fail(err);
            return;
        }
    }
}

/// A destination connection's thread: preamble, then frames until the source closes.
fn serve_link<C: Read + Write>(mut conn: C, shared: &ReceiverShared) -> Result<(), StreamError> {
    let connection = accept_preamble(&mut conn, shared)?;
    let decoder =
        ConnectionDecoder::new(connection, shared.connections, &shared.indices, shared.opts.max_payload);
    let context =
        LinkContext { connection, devices: decoder.carried_devices(), timeout: shared.opts.stall_timeout };
    LinkReader { context, decoder, conn, shared }.run()
}

/// Reads and checks the preamble, claims its connection index and answers; a refusal
/// is answered with the reason before the error is reported.
fn accept_preamble<C: Read + Write>(conn: &mut C, shared: &ReceiverShared) -> Result<usize, StreamError> {
    let incomplete = || StreamError::BadPreamble { connection: None, reason: PreambleError::Incomplete };
    let mut raw = [0u8; PREAMBLE_HEAD_LEN];
    if read_full(conn, &mut raw).map_err(|_| incomplete())? < PREAMBLE_HEAD_LEN {
        return Err(incomplete());
    }
    let mut refuse = |connection: Option<u16>, reason: PreambleError| {
        let _ = conn.write_all(&encode_ack(Some(&reason.to_string())));
        let _ = conn.flush();
        StreamError::BadPreamble { connection, reason }
    };
    let head = PreambleHead::parse(&raw).map_err(|reason| refuse(None, reason))?;
    let mut body = vec![0u8; head.body_len()];
    let got = read_full(conn, &mut body).map_err(|_| incomplete())?;
    if got < body.len() {
        return Err(incomplete());
    }
    let mut refuse = |reason: PreambleError| {
        let _ = conn.write_all(&encode_ack(Some(&reason.to_string())));
        let _ = conn.flush();
        StreamError::BadPreamble { connection: Some(head.connection), reason }
    };
    head.verify(&raw, &body, &shared.preamble, shared.connections).map_err(&mut refuse)?;
    shared.claim(head.connection).map_err(&mut refuse)?;
    conn.write_all(&encode_ack(None)).and_then(|()| conn.flush()).map_err(|_| incomplete())?;
    Ok(usize::from(head.connection))
}

/// Where a frame's payload is read to.
enum Landing {
    /// One of the device's buffers: the payload goes to the device if it checks out.
    Device(Vec<u8>),
    /// A frame that is not device data: END, keepalive, or one that will be refused.
    Aside(Vec<u8>),
}

struct LinkReader<'a, C> {
    context: LinkContext,
    decoder: ConnectionDecoder,
    conn: C,
    shared: &'a ReceiverShared,
}

impl<C: Read> LinkReader<'_, C> {
    fn run(mut self) -> Result<(), StreamError> {
        let mut raw = [0u8; FRAME_HEADER_LEN];
        loop {
            let got = read_full(&mut self.conn, &mut raw).map_err(|e| self.io_error(e))?;
            if got == 0 {
                return self.decoder.finish();
            }
            if got < FRAME_HEADER_LEN {
                return Err(self.decoder.truncated_in_frame(None, got));
            }
            let header = self.decoder.header(&raw)?;
            let len = header.payload_len();
            let slot = self.shared.slots.get(&header.device);
            let mut landing = match slot {
                Some(slot) if self.decoder.is_deliverable(&header) => {
                    Landing::Device(slot.pool.take().ok_or(StreamError::Aborted)?)
                }
                // END records and keepalives are small; anything larger is refused below.
                _ => Landing::Aside(Vec::with_capacity(len.min(END_RECORD_LEN))),
            };
            let payload = match &mut landing {
                Landing::Device(buf) => &mut buf[..len],
                Landing::Aside(buf) => {
                    buf.resize(len, 0);
                    &mut buf[..]
                }
            };
            let got = read_full(&mut self.conn, payload).map_err(|e| self.io_error(e))?;
            if got < len {
                return Err(self.decoder.truncated_in_frame(Some(&header), got));
            }
            let accepted = match &landing {
                Landing::Device(buf) | Landing::Aside(buf) => self.decoder.accept(&header, &buf[..len])?,
            };
            let delivered = match (accepted, landing, slot) {
                (Accepted::Data { .. }, Landing::Device(buf), Some(slot)) => {
                    slot.queue.push(Incoming::Data { buf, len })
                }
                // Only reachable if `is_deliverable` and `accept` disagreed: still correct.
                (Accepted::Data { .. }, Landing::Aside(aside), Some(slot)) => {
                    let mut buf = slot.pool.take().ok_or(StreamError::Aborted)?;
                    buf[..len].copy_from_slice(&aside);
                    slot.queue.push(Incoming::Data { buf, len })
                }
                (Accepted::End(summary), _, Some(slot)) => slot.queue.push(Incoming::End(summary)),
                (Accepted::Keepalive, ..) => true,
                (_, _, None) => {
                    return Err(StreamError::UnknownDevice {
                        device: header.device,
                        sequence: header.sequence,
                    });
                }
            };
            if !delivered {
                return Err(StreamError::Aborted);
            }
        }
    }

    fn io_error(&self, err: io::Error) -> StreamError {
        self.context.error(err, &self.shared.control.aborted)
    }
}
