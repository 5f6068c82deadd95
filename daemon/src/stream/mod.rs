//! The device-state stream between two daemons: every device's saving `data_fd` on the
//! source is read to its final end, cut into checksummed frames, carried over a few TCP
//! data connections, verified, and written into the matching resuming `data_fd` on the
//! destination. The wire format is in `docs/stream-protocol.md`.
//!
//! - [`frame`]: the wire format, pure (no I/O), property-tested;
//! - [`pump`]: the blocking `data_fd` side: one dedicated thread per fd, moving a few
//!   reused buffers through bounded queues;
//! - [`transport`]: the data connections ([`StreamSender`], [`StreamReceiver`]);
//! - [`bench`]: the stream against a plain relay between the same endpoints.
//!
//! Threads: each saving `data_fd` has its own reader thread, which also writes the
//! device's frames to its connection; each destination connection has a receiver thread,
//! which writes a device that travels alone on it, and devices sharing a connection each
//! have a writer thread. tokio only sets things up and waits for the outcome, so no
//! blocking fd is ever touched on the reactor. Memory is bounded by a few buffers of
//! `max_payload` per device whatever the state's size: a producer blocks when its
//! consumer is slower.
//!
//! Failure: the first error on either side aborts everything on that side (pools and
//! queues wake their waiters, sockets are shut down), which the peer sees at once as a
//! closed connection. The destination reports a device only after its end record matched
//! (byte count, frame count, digest) and every byte was written to its `data_fd`.

pub mod bench;
pub mod frame;
pub mod ports;
pub mod pump;
pub mod transport;

#[cfg(test)]
mod tests;

use std::fmt;
use std::io;
use std::time::Duration;

use nix::errno::Errno;

use crate::device::Op;

pub use frame::{DeviceStreamSummary, Preamble};
pub use pump::{Progress, Switchover};
pub use transport::{DataGuard, ReceiveHandle, StreamReceiver, StreamSender};

/// Largest payload a frame may carry (the wire's length field could say more; no peer
/// needs it, and a cap bounds what a corrupt header can make a receiver allocate).
pub const MAX_PAYLOAD_LIMIT: usize = 16 << 20;
/// Smallest `max_payload` accepted, so an END record always fits a frame.
pub const MIN_PAYLOAD_LIMIT: usize = 1024;

/// How a stream runs. Both sides must use the same `connections` and `max_payload`
/// (the peer handshake carries them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamOptions {
    /// Data connections to open; never more than the number of devices (device `i`
    /// travels on connection `i % connections`).
    pub connections: usize,
    /// Largest frame payload. QEMU found buffers above ~1 MiB no faster.
    pub max_payload: usize,
    /// Destination buffers of `max_payload` bytes per device that shares its connection,
    /// reused for the whole stream (at least 2). The source uses 2 per device.
    pub buffers_per_device: usize,
    /// A connection that makes no progress for this long fails with
    /// [`StreamError::Stalled`]; an idle source sends keepalives well within it.
    pub stall_timeout: Duration,
    /// How long a reader waits before reading again after a temporary end in PRE_COPY
    /// (a switchover wakes it at once).
    pub precopy_poll: Duration,
    /// TCP keepalive and `TCP_USER_TIMEOUT` on data connections: a peer whose host died
    /// is noticed within about this long even while a device has nothing to send.
    pub dead_peer: Duration,
    /// A data connection must complete its TLS handshake and preamble within this long
    /// (destination); a slow or silent one is dropped, the job goes on.
    pub preamble_timeout: Duration,
    /// Data connections whose preamble is still awaited at once (destination); more are
    /// closed at accept.
    pub max_pending_connections: usize,
    /// `SO_SNDBUF`/`SO_RCVBUF` for data connections; `None` keeps the kernel's
    /// autotuning, which measured fastest on loopback.
    pub socket_buffer: Option<usize>,
    /// **Test only.** Corrupts what the sender puts on the wire, after encoding, so that
    /// the receiver's validation is what gets tested. Never set in production: the
    /// configuration layer accepts it only behind an explicit test flag.
    pub fault: Option<StreamFault>,
}

impl Default for StreamOptions {
    fn default() -> StreamOptions {
        StreamOptions {
            connections: 4,
            max_payload: 1 << 20,
            buffers_per_device: 4,
            stall_timeout: Duration::from_secs(30),
            precopy_poll: Duration::from_millis(10),
            dead_peer: Duration::from_secs(20),
            preamble_timeout: Duration::from_secs(5),
            max_pending_connections: 16,
            socket_buffer: None,
            fault: None,
        }
    }
}

impl StreamOptions {
    pub fn validate(&self) -> Result<(), StreamError> {
        let problem = if self.connections == 0 || self.connections > usize::from(u16::MAX) {
            format!("connections must be 1..={}, not {}", u16::MAX, self.connections)
        } else if !(MIN_PAYLOAD_LIMIT..=MAX_PAYLOAD_LIMIT).contains(&self.max_payload) {
            format!(
                "max_payload must be {MIN_PAYLOAD_LIMIT}..={MAX_PAYLOAD_LIMIT} bytes, not {}",
                self.max_payload
            )
        } else if self.buffers_per_device < 2 {
            format!("buffers_per_device must be at least 2, not {}", self.buffers_per_device)
        } else if self.stall_timeout.is_zero()
            || self.precopy_poll.is_zero()
            || self.dead_peer.is_zero()
            || self.preamble_timeout.is_zero()
            || self.max_pending_connections == 0
        {
            "stall_timeout, precopy_poll, dead_peer, preamble_timeout and max_pending_connections must be positive"
                .to_owned()
        } else {
            return Ok(());
        };
        Err(StreamError::InvalidOptions(problem))
    }

    /// The number of connections both sides actually use for `devices` devices.
    pub fn connections_for(&self, devices: usize) -> usize {
        self.connections.min(devices)
    }
}

/// A deliberate corruption of the sender's output, for tests of the receiver. Frames
/// are named by device and sequence number (the END record is the frame after the last
/// data frame).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamFault {
    /// Flip one bit in the payload of that frame.
    FlipByte { device: u32, frame: u64 },
    /// Send the header and half the payload of that frame, then close the connection.
    Truncate { device: u32, frame: u64 },
    /// Close every data connection after it carried this many frames.
    DropConnection { frame: u64 },
    /// Send that frame twice.
    DuplicateFrame { device: u32, frame: u64 },
    /// Send that frame after the device's next one.
    ReorderFrames { device: u32, frame: u64 },
}

/// Which part of an END record disagreed with what arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndField {
    Bytes,
    Frames,
    Digest,
}

impl fmt::Display for EndField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EndField::Bytes => "byte count",
            EndField::Frames => "frame count",
            EndField::Digest => "digest",
        })
    }
}

/// Where a connection ended too early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Truncation {
    /// Inside a frame header (`received` of its bytes had arrived).
    InHeader { received: usize },
    /// Inside the payload of a frame.
    InPayload { device: u32, sequence: u64, received: usize, length: usize },
    /// Between frames, before this device's END record.
    BeforeEnd { device: u32, next_sequence: u64 },
}

impl fmt::Display for Truncation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Truncation::InHeader { received } => {
                write!(f, "inside a frame header ({received} of {} bytes)", frame::FRAME_HEADER_LEN)
            }
            Truncation::InPayload { device, sequence, received, length } => {
                write!(f, "inside frame {sequence} of device {device} ({received} of {length} payload bytes)")
            }
            Truncation::BeforeEnd { device, next_sequence } => {
                write!(f, "before the end record of device {device} (next frame would be {next_sequence})")
            }
        }
    }
}

/// Why a data connection's preamble was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PreambleError {
    #[error("not a vfio-migd data connection (magic {found:02x?})")]
    Magic { found: [u8; 8] },
    #[error("protocol version {found} is not supported (this daemon speaks {supported})")]
    Version { found: u16, supported: u16 },
    #[error("job id or session token longer than {limit} bytes")]
    TooLong { limit: usize },
    #[error("the connection closed or went silent before a whole preamble arrived")]
    Incomplete,
    #[error("preamble checksum mismatch")]
    Checksum,
    #[error("the job id is not the job this listener serves")]
    Job,
    #[error("the peer's certificate is not the job's source")]
    Peer,
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    #[error("session token does not match")]
    Token,
    #[error("source announces {found} data connections, this side expects {expected}")]
    ConnectionCount { found: u16, expected: usize },
    #[error("connection index {index} out of range for {count} connections")]
    ConnectionIndex { index: u16, count: u16 },
    #[error("connection index {index} presented twice")]
    DuplicateConnection { index: u16 },
}

/// Everything that can go wrong with a stream. Frame errors name the device, the frame's
/// sequence number and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(
        "device {device} frame {sequence}: checksum mismatch \
         (frame carries {carried:#010x}, its content gives {computed:#010x})"
    )]
    BadChecksum { device: u32, sequence: u64, carried: u32, computed: u32 },
    #[error(
        "device {device}: expected frame {expected}, received frame {received} ({})",
        sequence_problem(*.expected, *.received)
    )]
    UnexpectedSequence { device: u32, expected: u64, received: u64 },
    #[error("device {device} frame {sequence}: payload of {length} bytes exceeds the limit of {limit}")]
    Oversized { device: u32, sequence: u64, length: u32, limit: usize },
    #[error(
        "device {device} frame {sequence}: end record of {length} bytes (an end record has {})",
        frame::END_RECORD_LEN
    )]
    MalformedEnd { device: u32, sequence: u64, length: u32 },
    #[error("frame {sequence} names device {device}, which is not part of this stream")]
    UnknownDevice { device: u32, sequence: u64 },
    #[error(
        "device {device} frame {sequence} arrived on data connection {connection}, \
         but the device travels on connection {expected}"
    )]
    WrongConnection { device: u32, sequence: u64, connection: usize, expected: usize },
    #[error("device {device}: frame {sequence} arrived after the end record")]
    DataAfterEnd { device: u32, sequence: u64 },
    #[error("device {device}: end record says {field} {claimed}, the stream carried {actual}")]
    EndMismatch { device: u32, field: EndField, claimed: u64, actual: u64 },
    #[error("device {device} frame {sequence}: unknown flags {flags:#06x}")]
    UnknownFlags { device: u32, sequence: u64, flags: u16 },
    #[error(
        "frame header claiming device {device} frame {sequence} has marker {found:#06x}: \
         the stream is out of step"
    )]
    BadMarker { device: u32, sequence: u64, found: u16 },
    #[error("data connection {connection} ended {at}")]
    Truncated { connection: usize, at: Truncation },
    #[error("data connection {}: bad preamble: {reason}", connection_name(*.connection))]
    BadPreamble { connection: Option<u16>, reason: PreambleError },
    #[error("data connection {connection}: the destination refused it: {reason}")]
    Refused { connection: usize, reason: String },
    #[error("device {device}: {op} failed: {errno}")]
    DataFd { device: u32, op: Op, errno: Errno },
    /// `include/uapi/linux/vfio.h`: ENOMSG is the *temporary* end of a PRE_COPY stream;
    /// in STOP_COPY the end is final (read returns 0) and ENOMSG may not be returned.
    #[error(
        "device {device}: the data_fd read answered ENOMSG in STOP_COPY, where the uAPI allows only data or the final end: driver bug"
    )]
    EnomsgInStopCopy { device: u32 },
    #[error("data connection {connection} (devices {devices:?}): {source}")]
    Connection {
        connection: usize,
        devices: Vec<u32>,
        #[source]
        source: io::Error,
    },
    #[error(
        "data connection {connection} (devices {devices:?}): no progress for {timeout:?}, the peer stalled"
    )]
    Stalled { connection: usize, devices: Vec<u32>, timeout: Duration },
    #[error("device {device} is out of range: the stream has {devices} devices")]
    DeviceOutOfRange { device: u32, devices: usize },
    #[error("device {device} was given twice")]
    DuplicateDevice { device: u32 },
    #[error("device {device} was never given to the stream")]
    MissingDevice { device: u32 },
    #[error("device {device}: data_fd has the wrong direction for this side of the stream")]
    WrongDirection { device: u32 },
    #[error("data listener: {source}")]
    Listener {
        #[source]
        source: io::Error,
    },
    #[error("cannot start a stream thread: {source}")]
    Thread {
        #[source]
        source: io::Error,
    },
    #[error("test fault injected on data connection {connection}: {fault:?}")]
    FaultInjected { connection: usize, fault: StreamFault },
    #[error("invalid stream options: {0}")]
    InvalidOptions(String),
    #[error("the stream was aborted")]
    Aborted,
}

fn sequence_problem(expected: u64, received: u64) -> &'static str {
    if received < expected { "duplicated or replayed frame" } else { "frames missing or reordered" }
}

fn connection_name(connection: Option<u16>) -> String {
    connection.map_or_else(|| "(index unknown)".to_owned(), |c| c.to_string())
}

impl StreamError {
    /// The device the error is about, when it is about one device.
    pub fn device(&self) -> Option<u32> {
        match self {
            StreamError::BadChecksum { device, .. }
            | StreamError::UnexpectedSequence { device, .. }
            | StreamError::Oversized { device, .. }
            | StreamError::MalformedEnd { device, .. }
            | StreamError::UnknownDevice { device, .. }
            | StreamError::WrongConnection { device, .. }
            | StreamError::DataAfterEnd { device, .. }
            | StreamError::EndMismatch { device, .. }
            | StreamError::UnknownFlags { device, .. }
            | StreamError::DataFd { device, .. }
            | StreamError::EnomsgInStopCopy { device }
            | StreamError::DeviceOutOfRange { device, .. }
            | StreamError::DuplicateDevice { device }
            | StreamError::MissingDevice { device }
            | StreamError::WrongDirection { device } => Some(*device),
            StreamError::Truncated { at: Truncation::InPayload { device, .. }, .. }
            | StreamError::Truncated { at: Truncation::BeforeEnd { device, .. }, .. } => Some(*device),
            _ => None,
        }
    }
}
