//! The client side of the fd handoff protocol (`docs/handoff-protocol.md`): one
//! connection per device, one JSON request line sent together with exactly one fd
//! (`SCM_RIGHTS`), one JSON answer line.

use std::io::{self, BufRead, BufReader, IoSlice, Write};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use serde::Deserialize;

/// Default path of the daemon's handoff socket.
pub const DEFAULT_HANDOFF_SOCKET: &str = "/run/vfio-migd/handoff.sock";

/// The daemon's answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct HandoffReply {
    pub ok: bool,
    #[serde(default)]
    pub error: Option<String>,
    /// On success: the device as the daemon sees it.
    #[serde(default)]
    pub device: Option<String>,
}

/// Sends `request` (a JSON object, see the protocol document) with `fd` and returns the
/// daemon's answer. A refusal is `Ok` with `ok == false`; `Err` means the exchange itself
/// failed.
pub fn hand_over(socket: &Path, request: &serde_json::Value, fd: BorrowedFd<'_>) -> io::Result<HandoffReply> {
    let stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_vec(request).map_err(io::Error::other)?;
    line.push(b'\n');

    let fds = [fd];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(io::Error::other("ancillary buffer too small for one fd"));
    }
    let sent = rustix::net::sendmsg(&stream, &[IoSlice::new(&line)], &mut control, SendFlags::NOSIGNAL)
        .map_err(io::Error::from)?;
    // The fd travelled with the first byte; the rest of a long line goes plainly.
    (&stream).write_all(&line[sent..])?;

    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer)?;
    if answer.is_empty() {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the daemon closed without answering"));
    }
    serde_json::from_str(&answer)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad answer {answer:?}: {e}")))
}

/// An anonymous fd to hand over with a simulated device: the daemon keeps it open as
/// long as it holds the device, the way it holds a real device's fd.
pub fn sim_anchor() -> io::Result<OwnedFd> {
    rustix::fs::memfd_create("vfio-migd-sim-device", rustix::fs::MemfdFlags::CLOEXEC).map_err(io::Error::from)
}
