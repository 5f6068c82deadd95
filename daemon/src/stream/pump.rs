//! The blocking side of the stream: each device's `data_fd` is read (source) or written
//! (destination) by its own thread, with a few buffers allocated before any data flows
//! and reused for the whole stream.
//!
//! Source: a device's reader reads a buffer, checksums it while it is in cache, and
//! writes the frame to its connection itself ([`FrameSink`], a lock per connection), so
//! the bytes go from the fd to the socket on one core with no hand-off, as in a plain
//! relay. A slow connection blocks the readers that share it: that is the back-pressure.
//!
//! Destination: a connection's receiver thread reads each payload into one of the
//! device's [`BufferPool`] buffers (blocking while all are in flight: back-pressure) and
//! queues it for the device's writer thread, which gives it back once written. Queues
//! carry only pool buffers and END records, so they are bounded by the pools. (A device
//! alone on its connection is written by the receiver thread itself, see `transport`.)
//!
//! Every blocking wait can be aborted; a thread blocked inside a `read()` or `write()` of
//! a device fd cannot, and finishes when the fd returns.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use nix::errno::Errno;

use super::StreamError;
use super::frame::{DeviceEncoder, DeviceStreamSummary, END_RECORD_LEN, FrameHeader};
use crate::device::{DataFd, Op};

/// A lock that survives a panicked holder: the guarded data here are queues and flags
/// that stay consistent between operations.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Tells a device's reader thread that the device reached STOP_COPY: from then on a
/// 0-byte read is the final end of the state. Before it (PRE_COPY), a 0-byte read or
/// ENOMSG is a temporary end: the reader waits a little and reads again.
///
/// Fire it only after the SET to STOP_COPY returned. A stream opened directly in
/// STOP_COPY starts fired ([`Switchover::stop_copy`]).
#[derive(Clone, Debug, Default)]
pub struct Switchover {
    inner: Arc<SwitchoverState>,
}

#[derive(Debug, Default)]
struct SwitchoverState {
    fired: Mutex<bool>,
    changed: Condvar,
}

impl Switchover {
    /// For a device in PRE_COPY.
    pub fn new() -> Switchover {
        Switchover::default()
    }

    /// For a device already in STOP_COPY.
    pub fn stop_copy() -> Switchover {
        let switchover = Switchover::new();
        switchover.fire();
        switchover
    }

    pub fn fire(&self) {
        *lock(&self.inner.fired) = true;
        self.inner.changed.notify_all();
    }

    pub fn is_fired(&self) -> bool {
        *lock(&self.inner.fired)
    }

    /// Waits until fired or `timeout` passed.
    fn wait(&self, timeout: Duration) {
        let fired = lock(&self.inner.fired);
        let _unused = self.inner.changed.wait_timeout_while(fired, timeout, |fired| !*fired);
    }
}

/// Bytes of device state moved so far, per device index `0..devices`: readable while
/// the stream runs. The source counts bytes handed to its data connections, the
/// destination bytes written into the devices.
#[derive(Debug)]
pub struct Progress {
    bytes: Vec<AtomicU64>,
}

impl Progress {
    pub fn new(devices: usize) -> Progress {
        Progress { bytes: (0..devices).map(|_| AtomicU64::new(0)).collect() }
    }

    pub fn devices(&self) -> usize {
        self.bytes.len()
    }

    pub fn bytes(&self, device: u32) -> u64 {
        self.bytes.get(device as usize).map_or(0, |b| b.load(Ordering::Relaxed))
    }

    pub fn total(&self) -> u64 {
        self.bytes.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    pub(crate) fn add(&self, device: u32, bytes: usize) {
        if let Some(counter) = self.bytes.get(device as usize) {
            counter.fetch_add(bytes as u64, Ordering::Relaxed);
        }
    }
}

/// A device's buffers. Taking blocks while all are in flight.
#[derive(Debug)]
pub(crate) struct BufferPool {
    state: Mutex<PoolState>,
    returned: Condvar,
}

#[derive(Debug)]
struct PoolState {
    free: Vec<Vec<u8>>,
    aborted: bool,
}

impl BufferPool {
    /// Allocates and touches every buffer now, so neither allocation nor page faults
    /// happen while the devices are stopped.
    pub(crate) fn new(buffers: usize, size: usize) -> BufferPool {
        let pool = BufferPool::empty();
        pool.fill(buffers, size);
        pool
    }

    /// A pool whose buffers arrive later, from [`BufferPool::fill`] on the thread that
    /// owns the device (so the allocation happens neither on the reactor nor in downtime).
    pub(crate) fn empty() -> BufferPool {
        BufferPool {
            state: Mutex::new(PoolState { free: Vec::new(), aborted: false }),
            returned: Condvar::new(),
        }
    }

    pub(crate) fn fill(&self, buffers: usize, size: usize) {
        for _ in 0..buffers {
            // A non-zero fill: a zeroed allocation may come back as untouched zero pages,
            // deferring the page faults to the first read.
            self.give(vec![0x5a; size]);
        }
    }

    /// A free buffer, or `None` once aborted.
    pub(crate) fn take(&self) -> Option<Vec<u8>> {
        let mut state = lock(&self.state);
        loop {
            if state.aborted {
                return None;
            }
            if let Some(buf) = state.free.pop() {
                return Some(buf);
            }
            state = self.returned.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
    }

    pub(crate) fn give(&self, buf: Vec<u8>) {
        lock(&self.state).free.push(buf);
        self.returned.notify_one();
    }

    pub(crate) fn abort(&self) {
        lock(&self.state).aborted = true;
        self.returned.notify_all();
    }
}

/// A FIFO between threads; bounded by the pools its items come from.
#[derive(Debug)]
pub(crate) struct FrameQueue<T> {
    state: Mutex<QueueState<T>>,
    pushed: Condvar,
}

#[derive(Debug)]
struct QueueState<T> {
    items: VecDeque<T>,
    aborted: bool,
}

pub(crate) enum Popped<T> {
    Item(T),
    Aborted,
}

impl<T> FrameQueue<T> {
    pub(crate) fn new() -> FrameQueue<T> {
        FrameQueue {
            state: Mutex::new(QueueState { items: VecDeque::new(), aborted: false }),
            pushed: Condvar::new(),
        }
    }

    /// Returns `false` (dropping the item) once aborted.
    pub(crate) fn push(&self, item: T) -> bool {
        let mut state = lock(&self.state);
        if state.aborted {
            return false;
        }
        state.items.push_back(item);
        drop(state);
        self.pushed.notify_one();
        true
    }

    /// Waits for an item.
    pub(crate) fn pop(&self) -> Popped<T> {
        let mut state = lock(&self.state);
        loop {
            if state.aborted {
                return Popped::Aborted;
            }
            if let Some(item) = state.items.pop_front() {
                return Popped::Item(item);
            }
            state = self.pushed.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
    }

    pub(crate) fn abort(&self) {
        let mut state = lock(&self.state);
        state.aborted = true;
        state.items.clear();
        drop(state);
        self.pushed.notify_all();
    }
}

/// A frame on its way from a device's reader to a data connection.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub(crate) header: FrameHeader,
    pub(crate) payload: OutgoingPayload,
}

#[derive(Debug)]
pub(crate) enum OutgoingPayload {
    /// A pool buffer; the payload is its first `header.length` bytes.
    Data {
        buf: Vec<u8>,
        pool: Arc<BufferPool>,
    },
    End {
        record: [u8; END_RECORD_LEN],
        summary: DeviceStreamSummary,
    },
}

impl Outgoing {
    pub(crate) fn device(&self) -> u32 {
        self.header.device
    }

    pub(crate) fn payload(&self) -> &[u8] {
        match &self.payload {
            OutgoingPayload::Data { buf, .. } => &buf[..self.header.payload_len()],
            OutgoingPayload::End { record, .. } => record,
        }
    }

    pub(crate) fn payload_mut(&mut self) -> &mut [u8] {
        let len = self.header.payload_len();
        match &mut self.payload {
            OutgoingPayload::Data { buf, .. } => &mut buf[..len],
            OutgoingPayload::End { record, .. } => record,
        }
    }

    /// Gives the buffer back to its device; returns the summary if this was the END.
    pub(crate) fn release(self) -> Option<DeviceStreamSummary> {
        match self.payload {
            OutgoingPayload::Data { buf, pool } => {
                pool.give(buf);
                None
            }
            OutgoingPayload::End { summary, .. } => Some(summary),
        }
    }
}

/// Where a device's reader puts its frames: the connection the device travels on.
pub(crate) trait FrameSink: Send + Sync {
    /// Writes the frame to the wire and gives its buffer back (also on failure).
    fn send(&self, frame: Outgoing) -> Result<(), StreamError>;
}

/// How long the reader waits before reading again after an EAGAIN in STOP_COPY.
const FINAL_PHASE_RETRY: Duration = Duration::from_millis(1);

/// The source's reader of one device's saving `data_fd`.
pub(crate) struct DeviceReader {
    pub(crate) device: u32,
    pub(crate) fd: Arc<DataFd>,
    pub(crate) switchover: Switchover,
    pub(crate) pool: Arc<BufferPool>,
    pub(crate) sink: Arc<dyn FrameSink>,
    pub(crate) max_payload: usize,
    pub(crate) precopy_poll: Duration,
    pub(crate) aborted: Arc<AtomicBool>,
}

impl DeviceReader {
    /// Reads the device to its final end, sending a data frame per read and then the
    /// END record. Each payload is checksummed here, right after the read, while it is
    /// still in this core's cache.
    pub(crate) fn run(self) -> Result<DeviceStreamSummary, StreamError> {
        let mut encoder = DeviceEncoder::new(self.device);
        loop {
            let Some(mut buf) = self.pool.take() else { return Err(StreamError::Aborted) };
            // Only a read issued after the switchover was seen can return the final end.
            let final_phase = self.switchover.is_fired();
            match self.fd.read_chunk(&mut buf[..self.max_payload]) {
                Ok(0) if final_phase => {
                    self.pool.give(buf);
                    break;
                }
                // After the switchover the device is in STOP_COPY, where ENOMSG may not be
                // returned: waiting for more would spin until the phase deadline.
                Err(Errno::ENOMSG) if final_phase => {
                    self.pool.give(buf);
                    return Err(StreamError::EnomsgInStopCopy { device: self.device });
                }
                Err(Errno::EAGAIN) if final_phase => {
                    // A blocking fd should not say EAGAIN; if a driver does, back off
                    // instead of spinning (the fired switchover no longer waits).
                    self.pool.give(buf);
                    if self.aborted.load(Ordering::Acquire) {
                        return Err(StreamError::Aborted);
                    }
                    std::thread::sleep(self.precopy_poll.min(FINAL_PHASE_RETRY));
                }
                Ok(0) | Err(Errno::ENOMSG | Errno::EAGAIN) => {
                    self.pool.give(buf);
                    if self.aborted.load(Ordering::Acquire) {
                        return Err(StreamError::Aborted);
                    }
                    self.switchover.wait(self.precopy_poll);
                }
                Ok(n) => {
                    let header = encoder.data(&buf[..n]);
                    let payload = OutgoingPayload::Data { buf, pool: Arc::clone(&self.pool) };
                    self.sink.send(Outgoing { header, payload })?;
                }
                Err(errno) => {
                    return Err(StreamError::DataFd { device: self.device, op: Op::DataRead, errno });
                }
            }
        }
        let (header, record, summary) = encoder.end();
        self.sink.send(Outgoing { header, payload: OutgoingPayload::End { record, summary } })?;
        Ok(summary)
    }
}

/// A verified frame on its way from a data connection to a device's writer.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// A pool buffer whose first `len` bytes go into the device.
    Data { buf: Vec<u8>, len: usize },
    /// The END record matched; nothing more will come for this device.
    End(DeviceStreamSummary),
}

/// The destination's writer of one device's resuming `data_fd`.
pub(crate) struct DeviceWriter {
    pub(crate) device: u32,
    pub(crate) fd: DataFd,
    pub(crate) pool: Arc<BufferPool>,
    pub(crate) queue: Arc<FrameQueue<Incoming>>,
    pub(crate) progress: Arc<Progress>,
}

impl DeviceWriter {
    /// Writes every verified payload into the device; returns the summary once the END
    /// record came and every byte before it was written. The fd is closed on return.
    pub(crate) fn run(self) -> Result<DeviceStreamSummary, StreamError> {
        loop {
            match self.queue.pop() {
                Popped::Item(Incoming::Data { buf, len }) => {
                    let written = self.fd.write_all_bytes(&buf[..len]);
                    self.pool.give(buf);
                    written.map_err(|errno| StreamError::DataFd {
                        device: self.device,
                        op: Op::DataWrite,
                        errno,
                    })?;
                    self.progress.add(self.device, len);
                }
                Popped::Item(Incoming::End(summary)) => return Ok(summary),
                Popped::Aborted => return Err(StreamError::Aborted),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::thread;

    use super::*;

    #[test]
    fn pool_blocks_until_a_buffer_returns_and_wakes_on_abort() {
        let pool = Arc::new(BufferPool::new(1, 8));
        let first = pool.take().unwrap();
        let waiter = {
            let pool = Arc::clone(&pool);
            thread::spawn(move || {
                let buf = pool.take().unwrap();
                let len = buf.len();
                pool.give(buf);
                len
            })
        };
        pool.give(first);
        assert_eq!(waiter.join().unwrap(), 8);

        let _held = pool.take().unwrap();
        let waiter = {
            let pool = Arc::clone(&pool);
            thread::spawn(move || pool.take())
        };
        pool.abort();
        assert!(waiter.join().unwrap().is_none());
    }

    #[test]
    fn queue_keeps_order_and_aborts() {
        let queue = Arc::new(FrameQueue::new());
        assert!(queue.push(1));
        assert!(queue.push(2));
        assert!(matches!(queue.pop(), Popped::Item(1)));
        assert!(matches!(queue.pop(), Popped::Item(2)));
        let waiter = {
            let queue = Arc::clone(&queue);
            thread::spawn(move || matches!(queue.pop(), Popped::Aborted))
        };
        queue.abort();
        assert!(waiter.join().unwrap());
        assert!(!queue.push(3));
    }

    #[test]
    fn switchover_wakes_a_waiting_reader() {
        let switchover = Switchover::new();
        assert!(!switchover.is_fired());
        let waiter = {
            let switchover = switchover.clone();
            thread::spawn(move || {
                // Without the wake-up this would take an hour.
                switchover.wait(Duration::from_secs(3600));
                switchover.is_fired()
            })
        };
        switchover.fire();
        assert!(waiter.join().unwrap());
        assert!(Switchover::stop_copy().is_fired());
    }

    #[test]
    fn progress_counts_per_device() {
        let progress = Progress::new(2);
        progress.add(0, 5);
        progress.add(1, 7);
        progress.add(9, 100);
        assert_eq!((progress.bytes(0), progress.bytes(1), progress.total()), (5, 7, 12));
    }

    /// A driver that answers ENOMSG to every read (a PRE_COPY temporary end).
    #[derive(Debug)]
    struct AlwaysEnomsg;

    impl crate::device::DataFdOps for AlwaysEnomsg {
        fn read(&self, _fd: std::os::fd::BorrowedFd<'_>, _buf: &mut [u8]) -> Result<usize, Errno> {
            Err(Errno::ENOMSG)
        }
        fn write(&self, _fd: std::os::fd::BorrowedFd<'_>, _buf: &[u8]) -> Result<usize, Errno> {
            Err(Errno::EBADF)
        }
    }

    #[derive(Debug, Default)]
    struct CountingSink(Mutex<usize>);

    impl FrameSink for CountingSink {
        fn send(&self, _frame: Outgoing) -> Result<(), StreamError> {
            *lock(&self.0) += 1;
            Ok(())
        }
    }

    fn enomsg_reader(switchover: Switchover, aborted: Arc<AtomicBool>) -> DeviceReader {
        let (read, _write) = nix::unistd::pipe().unwrap();
        DeviceReader {
            device: 3,
            fd: Arc::new(DataFd::with_ops(read, crate::device::Direction::Saving, Arc::new(AlwaysEnomsg))),
            switchover,
            pool: Arc::new(BufferPool::new(2, 64)),
            sink: Arc::new(CountingSink::default()),
            max_payload: 64,
            precopy_poll: Duration::from_millis(5),
            aborted,
        }
    }

    /// Case 8 of issue #11: after the switchover (STOP_COPY) ENOMSG is a driver bug, not
    /// a temporary end: the reader fails at once, naming the device, instead of spinning
    /// on it until the phase deadline.
    #[test]
    fn case_8_enomsg_after_the_switchover_is_an_error_not_a_spin() {
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = enomsg_reader(Switchover::stop_copy(), Arc::default());
        std::thread::spawn(move || tx.send(reader.run()).unwrap());
        let result = rx.recv_timeout(Duration::from_secs(5)).expect("the reader spun on ENOMSG in STOP_COPY");
        let error = result.expect_err("ENOMSG in STOP_COPY must fail the stream");
        assert!(matches!(error, StreamError::EnomsgInStopCopy { device: 3 }), "{error}");
        assert_eq!(error.device(), Some(3));
        assert!(error.to_string().contains("ENOMSG in STOP_COPY"), "{error}");
    }

    /// In PRE_COPY ENOMSG keeps meaning "nothing more for now": the reader waits.
    #[test]
    fn enomsg_before_the_switchover_still_waits() {
        let (tx, rx) = std::sync::mpsc::channel();
        let aborted = Arc::new(AtomicBool::new(false));
        let reader = enomsg_reader(Switchover::new(), aborted.clone());
        std::thread::spawn(move || tx.send(reader.run()).unwrap());
        assert!(rx.recv_timeout(Duration::from_millis(50)).is_err(), "PRE_COPY's ENOMSG ended the stream");
        aborted.store(true, Ordering::Release);
        let result = rx.recv_timeout(Duration::from_secs(5)).expect("abort ends the wait");
        assert!(matches!(result, Err(StreamError::Aborted)));
    }
}
