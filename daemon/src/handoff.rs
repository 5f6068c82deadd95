//! The fd handoff socket: a VMM that already owns a VFIO device hands its fd over, so the
//! daemon needs no access to device nodes at all (the least-privilege deployment).
//! gRPC cannot carry fds, hence this small side channel; the protocol is specified in
//! `docs/handoff-protocol.md`:
//!
//! - one connection per device; the client sends one JSON line ([`HandoffRequest`]) and,
//!   in the ancillary data of the same `sendmsg`, exactly one fd (`SCM_RIGHTS`);
//! - the daemon checks the fd, registers the device (backend `handoff`), optionally adds
//!   it to a group, and answers one JSON line ([`HandoffReply`]); then it closes.
//!
//! The fd is received with rustix, whose `recvmsg` yields `OwnedFd`s: no `unsafe` here.

use std::io::{self, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::device::DeviceIdentity;
use crate::device::open::{self, DeviceSummary, Handover};
use crate::device::sim::SimSpec;
use crate::engine::Daemon;
use crate::registry::Backend;

/// Longest request line accepted.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// A client that has not sent its request by then is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Fds beyond the first are received (and closed) only to detect the error.
const MAX_FDS_PER_READ: usize = 8;

/// What backs the handed-over fd.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendHint {
    /// A VFIO device fd (group device fd or bound cdev).
    #[default]
    Vfio,
    /// A simulated device described by `sim`; the fd only anchors its lifetime.
    Sim,
}

/// The request line.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandoffRequest {
    /// The name the daemon will know the device by.
    pub name: String,
    /// The group (VM) the device joins; created if it does not exist.
    #[serde(default)]
    pub group: Option<String>,
    /// Compatibility identity, for fds that cannot tell it themselves.
    #[serde(default)]
    pub identity: Option<DeviceIdentity>,
    #[serde(default)]
    pub backend: BackendHint,
    /// Required with `"backend": "sim"`: the keys of a `[[device]]` table with
    /// `kind = "sim"` (`model`, `state_size`, `seed`, `caps`, ...), without `name`.
    #[serde(default)]
    pub sim: Option<serde_json::Map<String, serde_json::Value>>,
}

/// The answer line.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffReply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// On success: the device as the daemon sees it (caps, state, identity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("receiving the request failed: {0}")]
    Io(#[from] io::Error),
    #[error("the connection closed before a complete request line")]
    Incomplete,
    #[error("the request line is longer than {MAX_REQUEST_BYTES} bytes")]
    TooLong,
    #[error("no request within {}s", REQUEST_TIMEOUT.as_secs())]
    Timeout,
    #[error("data after the request line: send one request per connection")]
    TrailingData,
    #[error("the request carried {0} fds; send exactly one fd with the request line")]
    FdCount(usize),
    #[error("the fds were truncated by the kernel (too many sent); send exactly one")]
    FdsTruncated,
    #[error("the request line is not a valid request: {0}")]
    BadRequest(String),
    #[error("{0}")]
    Refused(String),
}

/// Binds the handoff socket (0660, parent directory created, stale socket replaced).
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    crate::api::bind_unix(path)
}

/// Accepts handoffs until `shutdown`.
pub async fn serve(
    daemon: Arc<Daemon>,
    listener: UnixListener,
    shutdown: CancellationToken,
) -> io::Result<()> {
    loop {
        let (stream, _) = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            accepted = listener.accept() => accepted?,
        };
        let daemon = daemon.clone();
        tokio::spawn(async move {
            let peer = stream.peer_cred().map(|c| (c.uid(), c.pid())).ok();
            let reply = match tokio::time::timeout(REQUEST_TIMEOUT, receive(&stream)).await {
                Err(_) => Err(HandoffError::Timeout),
                Ok(Err(e)) => Err(e),
                Ok(Ok((line, fd))) => accept(&daemon, &line, fd).await,
            };
            let reply = match reply {
                Ok(device) => {
                    tracing::info!(?peer, %device, "device handed over");
                    HandoffReply { ok: true, error: None, device: Some(device) }
                }
                Err(e) => {
                    tracing::warn!(?peer, error = %e, "handoff refused");
                    HandoffReply { ok: false, error: Some(e.to_string()), device: None }
                }
            };
            let mut line = serde_json::to_vec(&reply).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
            line.push(b'\n');
            let mut stream = stream;
            if let Err(e) = stream.write_all(&line).await {
                tracing::debug!(error = %e, "handoff client left before the answer");
            }
        });
    }
}

/// Reads the request line and the fds that came with it.
async fn receive(stream: &UnixStream) -> Result<(Vec<u8>, OwnedFd), HandoffError> {
    let mut line = Vec::new();
    let mut fds = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let (bytes, truncated) = stream
            .async_io(Interest::READABLE, || {
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_READ))];
                let mut control = RecvAncillaryBuffer::new(&mut space);
                let msg = rustix::net::recvmsg(
                    stream,
                    &mut [IoSliceMut::new(&mut chunk)],
                    &mut control,
                    RecvFlags::CMSG_CLOEXEC,
                )
                .map_err(io::Error::from)?;
                for message in control.drain() {
                    if let RecvAncillaryMessage::ScmRights(received) = message {
                        fds.extend(received);
                    }
                }
                Ok((msg.bytes, msg.flags.contains(ReturnFlags::CTRUNC)))
            })
            .await?;
        if truncated {
            return Err(HandoffError::FdsTruncated);
        }
        if bytes == 0 {
            return Err(HandoffError::Incomplete);
        }
        line.extend_from_slice(&chunk[..bytes]);
        if let Some(end) = line.iter().position(|&b| b == b'\n') {
            if end + 1 != line.len() {
                return Err(HandoffError::TrailingData);
            }
            line.truncate(end);
            break;
        }
        if line.len() > MAX_REQUEST_BYTES {
            return Err(HandoffError::TooLong);
        }
    }
    if fds.len() != 1 {
        return Err(HandoffError::FdCount(fds.len()));
    }
    Ok((line, fds.remove(0)))
}

/// Checks and registers one handed-over device; returns its description.
async fn accept(daemon: &Arc<Daemon>, line: &[u8], fd: OwnedFd) -> Result<String, HandoffError> {
    let request: HandoffRequest =
        serde_json::from_slice(line).map_err(|e| HandoffError::BadRequest(e.to_string()))?;
    if request.name.trim().is_empty() {
        return Err(HandoffError::BadRequest("`name` must not be empty".into()));
    }
    if daemon.registry.device(&request.name).is_ok() {
        return Err(HandoffError::Refused(format!("device `{}` is already registered", request.name)));
    }
    let handover = match (request.backend, request.sim) {
        (BackendHint::Vfio, None) => Handover::Vfio { fd },
        (BackendHint::Sim, Some(mut keys)) => {
            keys.insert("name".into(), serde_json::Value::String(request.name.clone()));
            let spec = SimSpec::deserialize(serde_json::Value::Object(keys))
                .map_err(|e| HandoffError::BadRequest(format!("`sim`: {e}")))?;
            Handover::Sim { spec: Box::new(spec), anchor: fd }
        }
        (BackendHint::Sim, None) => {
            return Err(HandoffError::BadRequest("`\"backend\": \"sim\"` needs a `sim` object".into()));
        }
        (BackendHint::Vfio, Some(_)) => {
            return Err(HandoffError::BadRequest("a `sim` object needs `\"backend\": \"sim\"`".into()));
        }
    };
    let name = request.name.clone();
    let identity = request.identity.clone();
    let sim_iommu = daemon.registry.sim_iommu().clone();
    let (device, summary) = tokio::task::spawn_blocking(move || {
        let device = open::open_handed_over_device(&name, handover, identity.as_ref(), &sim_iommu)?;
        let summary = DeviceSummary::of(device.as_ref());
        Ok::<_, crate::device::DeviceError>((device, summary))
    })
    .await
    .map_err(|e| HandoffError::Refused(format!("device `{}`: open thread failed: {e}", request.name)))?
    .map_err(|e| HandoffError::Refused(e.to_string()))?;
    daemon.registry.add_device(device, Backend::Handoff).map_err(|e| HandoffError::Refused(e.to_string()))?;
    if let Some(group) = request.group.as_deref().filter(|g| !g.is_empty())
        && let Err(e) = daemon.registry.join_group(group, &request.name)
    {
        // All or nothing: a device that cannot join its VM's group is not kept.
        let _ = daemon.registry.remove_device(&request.name);
        return Err(HandoffError::Refused(e.to_string()));
    }
    Ok(summary.to_string())
}
