//! Transfer sessions: each data_fd is a real pipe (1 MiB where the system allows),
//! served by one thread.
//!
//! * Saving: a writer thread generates the stream into the pipe, the engine reads the
//!   other end. What the device has *committed* to the stream (`queued`) grows when the
//!   session opens, when PRECOPY_INFO cuts a batch of dirty pages, and at STOP_COPY.
//! * Resuming: a reader thread drains the pipe and verifies the stream as it arrives
//!   (framing, payload, digest); RESUMING→STOP asks it to drain what was written and
//!   takes its verdict.
//!
//! The [`DataFd`]s handed out carry [`DataFdOps`] that answer what the kernel's file
//! would where a bare pipe cannot: ENODEV once the session is disabled, a temporary end
//! (0 or ENOMSG) at the end of what PRE_COPY has to offer, EFAULT or ENOMEM on the very
//! write that carries an incompatible header or bytes beyond the END record. A raw fd
//! taken out of the `DataFd` (or passed to another process) still moves the same bytes,
//! with plain pipe semantics: EOF instead of ENODEV, a blocking read instead of a
//! temporary end, PRECOPY_INFO's `initial_bytes` not counting down (it counts the reads
//! made through the `DataFd`), and stream errors reported only at RESUMING→STOP.
//!
//! Locks: the device's lock is taken before a session's, never the other way round;
//! the threads never take the device's lock.

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::arc_log::{ArcEvent, ArcLog};
use super::fault::{FaultOp, FaultTable};
use super::image::Image;
use super::p2p::P2pPort;
use super::spec::PrecopyEnd;
use super::stream::{self, Compat, Framer, FramingOnly, Loader, StreamError, StreamHeader};
use crate::device::{DataFd, DataFdOps, Direction};
use crate::fsm::State;

/// Pipe size for data_fds: pipes of the default 64 KiB are 4× slower.
const PIPE_SIZE: usize = 1 << 20;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What the sessions share with the device: its name, faults, arc log and a mirror of
/// its state (for fault filters on the data path, which must not take the device lock).
#[derive(Debug)]
pub(crate) struct Shared {
    pub name: String,
    pub faults: Mutex<FaultTable>,
    pub arc_log: ArcLog,
    state: AtomicU32,
    /// Peer-to-peer DMA into and out of the device ([`super::p2p`]).
    pub p2p: P2pPort,
}

impl Shared {
    pub fn new(name: String, faults: FaultTable, arc_log: ArcLog) -> Shared {
        Shared {
            name,
            faults: Mutex::new(faults),
            arc_log,
            state: AtomicU32::new(State::Running.as_raw()),
            p2p: P2pPort::default(),
        }
    }

    /// A P2P DMA write from device `from` reaches this device.
    pub fn receive_p2p(&self, from: &str) {
        let mut inbox = self.p2p.inbox();
        let state = self.state();
        if let Some(what) = self.p2p.receive(&mut inbox, state, from) {
            self.arc_log.record(state, ArcEvent::Fault(what));
        }
    }

    pub fn state(&self) -> State {
        State::from_raw(self.state.load(Ordering::Acquire)).expect("only valid states are stored")
    }

    pub fn set_state(&self, state: State) {
        self.state.store(state.as_raw(), Ordering::Release);
    }

    /// Applies the faults armed for a data_fd read or write.
    fn data_faults(&self, op: FaultOp) -> Result<(), Errno> {
        let state = self.state();
        let fired = lock(&self.faults).on_op(op, state);
        for what in &fired.descriptions {
            self.arc_log.record(state, ArcEvent::Fault(what.clone()));
        }
        if !fired.stall.is_zero() {
            std::thread::sleep(fired.stall);
        }
        fired.errno.map_or(Ok(()), Err)
    }
}

/// A pipe for a data_fd: `(read end, write end)`, close-on-exec like the kernel's fds.
fn data_pipe() -> Result<(OwnedFd, OwnedFd), Errno> {
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    if fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32)).is_err() {
        // Unprivileged processes are capped by /proc/sys/fs/pipe-max-size.
        let max = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .unwrap_or(0);
        if max > 0 {
            let _ = fcntl(&write, FcntlArg::F_SETPIPE_SZ(max.min(PIPE_SIZE as i32)));
        }
    }
    Ok((read, write))
}

fn set_nonblocking(fd: &OwnedFd) -> Result<(), Errno> {
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map(drop)
}

/// Wakes a session thread out of `poll`: a non-blocking self-pipe.
#[derive(Debug)]
struct Waker {
    read: OwnedFd,
    write: OwnedFd,
}

impl Waker {
    fn new() -> Result<Waker, Errno> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        Ok(Waker { read, write })
    }

    fn wake(&self) {
        // A full pipe already wakes the thread: EAGAIN is fine.
        let _ = nix::unistd::write(&self.write, &[1]);
    }

    fn drain(&self) {
        let mut buf = [0u8; 64];
        while matches!(nix::unistd::read(self.read.as_fd(), &mut buf), Ok(n) if n > 0) {}
    }

    /// Waits until the waker or `fd` (for `events`) is ready.
    fn wait(&self, fd: Option<(BorrowedFd<'_>, PollFlags)>) {
        let mut fds = vec![PollFd::new(self.read.as_fd(), PollFlags::POLLIN)];
        if let Some((fd, events)) = fd {
            fds.push(PollFd::new(fd, events));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(err) => {
                // Only ENOMEM is possible here; back off instead of spinning.
                tracing::warn!(%err, "poll on a simulator session pipe failed");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        self.drain();
    }
}

fn spawn(name: String, body: impl FnOnce() + Send + 'static) -> Result<(), Errno> {
    std::thread::Builder::new()
        .name(name)
        .spawn(body)
        .map(drop)
        .map_err(|err| Errno::from_raw(err.raw_os_error().unwrap_or(Errno::EAGAIN as i32)))
}

/// Session faults armed when a saving session opens.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SaveFaults {
    pub short_reads: Option<usize>,
    pub early_eof: Option<u64>,
    pub corrupt: Option<u64>,
}

/// A piece of the stream the device committed to.
#[derive(Debug)]
enum Piece {
    Header(Vec<u8>),
    /// The image as a snapshot of page versions, produced chunk by chunk.
    Image {
        next_chunk: u64,
        versions: Arc<[u64]>,
    },
    Pages {
        first: u64,
        versions: Vec<u64>,
    },
    End {
        generation: u64,
    },
}

#[derive(Debug)]
struct SaveState {
    pieces: VecDeque<Piece>,
    /// Bytes committed to the stream so far.
    queued: u64,
    /// Bytes the engine has read through the data_fd.
    consumed: u64,
    /// End of the initial bytes (header and image) of a PRE_COPY stream.
    initial_end: u64,
    /// END is queued: the stream is complete once read.
    complete: bool,
    disabled: bool,
}

/// Counters PRECOPY_INFO is computed from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SaveProgress {
    pub queued: u64,
    pub consumed: u64,
    pub initial_end: u64,
}

/// A saving session: the stream of one PRE_COPY/STOP_COPY data_fd.
#[derive(Debug)]
pub(crate) struct SaveSession {
    shared: Arc<Shared>,
    seed: u64,
    size: u64,
    precopy_end: PrecopyEnd,
    faults: SaveFaults,
    state: Mutex<SaveState>,
    waker: Waker,
}

/// What a new saving session streams first.
pub(crate) struct SaveStart<'a> {
    pub image: &'a Image,
    pub model: &'a str,
    /// STOP→STOP_COPY: the whole stream is known (and ends) at once.
    pub complete: bool,
    pub precopy_end: PrecopyEnd,
    pub faults: SaveFaults,
}

impl SaveSession {
    /// Opens the session and its writer thread; returns the engine's end.
    pub fn open(shared: &Arc<Shared>, start: SaveStart<'_>) -> Result<(Arc<SaveSession>, DataFd), Errno> {
        let image = start.image;
        let header = stream::encode_header(&StreamHeader {
            size: image.size,
            seed: image.seed,
            generation: image.generation,
            model: start.model.to_string(),
        });
        let initial_end = header.len() as u64 + stream::image_len(image.size);
        let mut pieces = VecDeque::from([Piece::Header(header)]);
        if stream::image_chunks(image.size) > 0 {
            pieces.push_back(Piece::Image { next_chunk: 0, versions: image.versions.clone().into() });
        }
        let mut queued = initial_end;
        if start.complete {
            pieces.push_back(Piece::End { generation: image.generation });
            queued += stream::END_LEN;
        }
        let (read, write) = data_pipe()?;
        set_nonblocking(&write)?;
        let session = Arc::new(SaveSession {
            shared: shared.clone(),
            seed: image.seed,
            size: image.size,
            precopy_end: start.precopy_end,
            faults: start.faults,
            state: Mutex::new(SaveState {
                pieces,
                queued,
                consumed: 0,
                initial_end,
                complete: start.complete,
                disabled: false,
            }),
            waker: Waker::new()?,
        });
        let writer = session.clone();
        spawn(format!("sim-save-{}", shared.name), move || writer.run_writer(write))?;
        let ops: Arc<dyn DataFdOps> = session.clone();
        Ok((session, DataFd::with_ops(read, Direction::Saving, ops)))
    }

    pub fn is(&self, ops: &Arc<dyn DataFdOps>) -> bool {
        std::ptr::addr_eq(Arc::as_ptr(ops), self as *const SaveSession)
    }

    pub fn progress(&self) -> SaveProgress {
        let st = lock(&self.state);
        SaveProgress { queued: st.queued, consumed: st.consumed, initial_end: st.initial_end }
    }

    /// Commits dirty pages (runs of `(first, versions)`) to the stream.
    pub fn append_pages(&self, runs: Vec<(u64, Vec<u64>)>) {
        let mut st = lock(&self.state);
        for (first, versions) in runs {
            st.queued += stream::pages_record_len(self.size, first, versions.len() as u32);
            st.pieces.push_back(Piece::Pages { first, versions });
        }
        drop(st);
        self.waker.wake();
    }

    /// Commits the END record: the stream is complete.
    pub fn finish(&self, generation: u64) {
        let mut st = lock(&self.state);
        st.pieces.push_back(Piece::End { generation });
        st.queued += stream::END_LEN;
        st.complete = true;
        drop(st);
        self.waker.wake();
    }

    /// The driver disables the file: reads fail with ENODEV from now on.
    pub fn disable(&self) {
        lock(&self.state).disabled = true;
        self.waker.wake();
    }

    /// Waits for the next unit of work, one record's worth of a piece. `None`: the
    /// session is disabled; `Some(None)`: the stream is complete and fully produced.
    fn next_piece(&self) -> Option<Option<Piece>> {
        loop {
            let mut st = lock(&self.state);
            if st.disabled {
                return None;
            }
            let complete = st.complete;
            match st.pieces.front_mut() {
                Some(Piece::Image { next_chunk, versions }) => {
                    let chunk = *next_chunk;
                    *next_chunk += 1;
                    let (first, count) = stream::image_chunk(self.size, chunk);
                    let range = first as usize..(first + u64::from(count)) as usize;
                    let piece = Piece::Pages { first, versions: versions[range].to_vec() };
                    if *next_chunk >= stream::image_chunks(self.size) {
                        st.pieces.pop_front();
                    }
                    return Some(Some(piece));
                }
                Some(_) => return Some(st.pieces.pop_front()),
                None if complete => return Some(None),
                None => {
                    drop(st);
                    self.waker.wait(None);
                }
            }
        }
    }

    fn run_writer(&self, pipe: OwnedFd) {
        block_sigpipe();
        let mut out: Vec<u8> = Vec::with_capacity(PIPE_SIZE + 4096);
        let (mut produced, mut crc, mut records) = (0u64, 0u32, 0u64);
        let limit = self.faults.early_eof.unwrap_or(u64::MAX);
        // An empty image is a header followed directly by END (or the PRE_COPY's end).
        while produced < limit {
            // `None`: disabled; `Some(None)`: everything produced.
            let Some(Some(piece)) = self.next_piece() else { return };
            out.clear();
            match piece {
                Piece::Header(bytes) => out.extend_from_slice(&bytes),
                Piece::Pages { first, versions } => {
                    stream::encode_pages(self.seed, self.size, first, &versions, &mut out);
                    records += 1;
                }
                Piece::End { generation } => {
                    out.extend_from_slice(&stream::encode_end(generation, records, produced, crc))
                }
                Piece::Image { .. } => unreachable!("next_piece splits the image into records"),
            }
            crc = crc32c::crc32c_append(crc, &out);
            if let Some(at) = self.faults.corrupt
                && (produced..produced + out.len() as u64).contains(&at)
            {
                out[(at - produced) as usize] ^= 0xFF;
            }
            let len = (out.len() as u64).min(limit - produced) as usize;
            if !self.write_out(&pipe, &out[..len]) {
                return;
            }
            produced += len as u64;
        }
        // Dropping the write end is the EOF the reader sees.
    }

    /// Writes all of `bytes`, waiting for room; false once disabled or the reader is gone.
    fn write_out(&self, pipe: &OwnedFd, mut bytes: &[u8]) -> bool {
        while !bytes.is_empty() {
            match nix::unistd::write(pipe, bytes) {
                Ok(n) => bytes = &bytes[n..],
                Err(Errno::EAGAIN) => {
                    self.waker.wait(Some((pipe.as_fd(), PollFlags::POLLOUT)));
                    if lock(&self.state).disabled {
                        return false;
                    }
                }
                Err(Errno::EINTR) => {}
                // EPIPE: the engine closed its end; the device does not care.
                Err(_) => return false,
            }
        }
        true
    }
}

impl DataFdOps for SaveSession {
    fn read(&self, fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<usize, Errno> {
        self.shared.data_faults(FaultOp::DataRead)?;
        let limit = {
            let st = lock(&self.state);
            if st.disabled {
                return Err(Errno::ENODEV);
            }
            let mut available = st.queued - st.consumed;
            if let Some(eof) = self.faults.early_eof {
                if st.consumed >= eof {
                    return Ok(0);
                }
                available = available.min(eof - st.consumed);
            }
            if available == 0 {
                return match (st.complete, self.precopy_end) {
                    (true, _) | (false, PrecopyEnd::Zero) => Ok(0),
                    (false, PrecopyEnd::Enomsg) => Err(Errno::ENOMSG),
                };
            }
            let cap = self.faults.short_reads.unwrap_or(usize::MAX);
            buf.len().min(cap).min(usize::try_from(available).unwrap_or(usize::MAX))
        };
        if limit == 0 {
            return Ok(0);
        }
        // Blocks only for bytes already committed: the writer is producing them.
        let n = nix::unistd::read(fd, &mut buf[..limit])?;
        let mut st = lock(&self.state);
        if st.disabled {
            return Err(Errno::ENODEV);
        }
        if n == 0 {
            // The writer stopped before producing committed bytes: a device failure.
            return Err(Errno::EIO);
        }
        st.consumed += n as u64;
        if self.shared.p2p.is_corrupted() {
            // A P2P write reached the device while it was stopped: what it saves is no
            // longer the state it stopped with.
            buf[0] ^= 0xFF;
        }
        Ok(n)
    }

    fn write(&self, _fd: BorrowedFd<'_>, _buf: &[u8]) -> Result<usize, Errno> {
        // The saving file is opened read-only.
        Err(Errno::EBADF)
    }
}

fn block_sigpipe() {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
    let mut set = SigSet::empty();
    set.add(Signal::SIGPIPE);
    // Writes to a closed pipe then fail with EPIPE instead of killing the process.
    let _ = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None);
}

#[derive(Debug, Default)]
struct ResumeState {
    disabled: bool,
    received: u64,
    drain_requested: u64,
    drain_done: u64,
    thread_gone: bool,
    /// The first thing wrong with the stream.
    error: Option<StreamError>,
    loaded: Option<Image>,
}

/// The engine's writes, checked on the way in (framing only).
#[derive(Debug)]
struct WriteSide {
    framer: Framer,
    /// Once a write failed for the stream's content, every later write fails the same way.
    failed: Option<Errno>,
}

/// A resuming session: the stream of one RESUMING data_fd.
#[derive(Debug)]
pub(crate) struct ResumeSession {
    shared: Arc<Shared>,
    write_side: Mutex<WriteSide>,
    state: Mutex<ResumeState>,
    changed: Condvar,
    waker: Waker,
}

/// Why RESUMING→STOP cannot load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum LoadError {
    Invalid(StreamError),
    Truncated { received: u64 },
    Gone,
}

impl ResumeSession {
    pub fn open(shared: &Arc<Shared>, compat: Compat) -> Result<(Arc<ResumeSession>, DataFd), Errno> {
        let (read, write) = data_pipe()?;
        set_nonblocking(&read)?;
        let session = Arc::new(ResumeSession {
            shared: shared.clone(),
            write_side: Mutex::new(WriteSide { framer: Framer::new(compat.clone(), false), failed: None }),
            state: Mutex::new(ResumeState::default()),
            changed: Condvar::new(),
            waker: Waker::new()?,
        });
        let reader = session.clone();
        spawn(format!("sim-resume-{}", shared.name), move || {
            reader.run_reader(read, compat);
            lock(&reader.state).thread_gone = true;
            reader.changed.notify_all();
        })?;
        let ops: Arc<dyn DataFdOps> = session.clone();
        Ok((session, DataFd::with_ops(write, Direction::Resuming, ops)))
    }

    pub fn disable(&self) {
        lock(&self.state).disabled = true;
        self.waker.wake();
    }

    /// Waits until every byte written before this call is verified, then gives the
    /// verdict: the loaded state, or why there is none (the session stays usable).
    pub fn finish(&self) -> Result<Image, LoadError> {
        let mut st = lock(&self.state);
        st.drain_requested += 1;
        let ticket = st.drain_requested;
        drop(st);
        self.waker.wake();
        let mut st = lock(&self.state);
        while st.drain_done < ticket && !st.thread_gone {
            st = self.changed.wait(st).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        if let Some(err) = &st.error {
            return Err(LoadError::Invalid(err.clone()));
        }
        if st.drain_done < ticket {
            return Err(LoadError::Gone);
        }
        match st.loaded.take() {
            Some(image) => Ok(image),
            None => Err(LoadError::Truncated { received: st.received }),
        }
    }

    fn run_reader(&self, pipe: OwnedFd, compat: Compat) {
        let size = compat.size;
        let mut framer = Framer::new(compat, true);
        let mut loader = Loader::new(size);
        let mut buf = vec![0u8; PIPE_SIZE];
        let mut writers_gone = false;
        loop {
            let requested = lock(&self.state).drain_requested;
            // Everything in the pipe now was written before `requested` was observed.
            while !writers_gone {
                match nix::unistd::read(pipe.as_fd(), &mut buf) {
                    Ok(0) => writers_gone = true,
                    Ok(n) => {
                        let verdict = framer.feed(&buf[..n], &mut loader);
                        let mut st = lock(&self.state);
                        st.received += n as u64;
                        if let Err(err) = verdict {
                            st.error.get_or_insert(err);
                        } else if let Some(image) = loader.take_loaded() {
                            st.loaded = Some(image);
                        }
                    }
                    Err(Errno::EINTR) => {}
                    Err(Errno::EAGAIN) => break,
                    Err(_) => writers_gone = true,
                }
            }
            let mut st = lock(&self.state);
            if st.disabled {
                return;
            }
            if requested > st.drain_done {
                st.drain_done = requested;
                self.changed.notify_all();
            }
            let again = st.drain_requested > st.drain_done;
            drop(st);
            if !again {
                self.waker.wait((!writers_gone).then(|| (pipe.as_fd(), PollFlags::POLLIN)));
            }
        }
    }
}

impl DataFdOps for ResumeSession {
    fn read(&self, _fd: BorrowedFd<'_>, _buf: &mut [u8]) -> Result<usize, Errno> {
        // The resuming file is opened write-only.
        Err(Errno::EBADF)
    }

    fn write(&self, fd: BorrowedFd<'_>, buf: &[u8]) -> Result<usize, Errno> {
        self.shared.data_faults(FaultOp::DataWrite)?;
        let mut ws = lock(&self.write_side);
        if lock(&self.state).disabled {
            return Err(Errno::ENODEV);
        }
        if let Some(errno) = ws.failed {
            return Err(errno);
        }
        let mut probe = ws.framer.clone();
        if let Err(err) = probe.feed(buf, &mut FramingOnly)
            && let Some(errno) = err.write_errno()
        {
            // Rejected on write, as hisi/mtty (EFAULT) and every driver past its
            // maximum image (ENOMEM) do; the stream is now bad for good.
            ws.failed = Some(errno);
            lock(&self.state).error.get_or_insert(err);
            return Err(errno);
        }
        let n = match nix::unistd::write(fd, buf) {
            Ok(n) => n,
            Err(Errno::EPIPE) => return Err(Errno::ENODEV),
            Err(err) => return Err(err),
        };
        if n == buf.len() {
            ws.framer = probe;
        } else {
            // Errors past the written prefix are found again by the next write.
            let _ = ws.framer.feed(&buf[..n], &mut FramingOnly);
        }
        Ok(n)
    }
}
