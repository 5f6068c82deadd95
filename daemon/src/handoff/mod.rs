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
//!
//! Hardening (docs/handoff-protocol.md, "Limits"): the caller's `SO_PEERCRED` must be
//! allowed by `[handoff] admin_uids/admin_gids` (root and the daemon's own uid always
//! are); at most `[handoff] max_connections` connections are served at once; fds are
//! taken only with a connection's first message ([`request::RequestAssembler`]); the
//! request must be complete within `[handoff] request_timeout_ms`; an accept error (e.g.
//! EMFILE) is logged and retried with back-off, never fatal. A client may add devices only
//! to groups it created itself (same uid and pid). Simulated devices are accepted only
//! with `[simulator] allow_remote = true`.

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
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub mod request;

pub use request::{BackendHint, HandoffRequest, MAX_REQUEST_BYTES, RequestError};

use crate::access::{AccessClass, AccessDenied, AccessPolicy, Caller};
use crate::device::DeviceIdentity;
use crate::device::open::{self, DeviceSummary, Handover};
use crate::device::sim::SimSpec;
use crate::engine::Daemon;
use crate::registry::{Backend, GroupCreator};

/// Ancillary space for this many fds per `recvmsg`: enough to tell "one" from "several";
/// the kernel closes what does not fit (and flags `MSG_CTRUNC`), so no more are ever
/// installed in the daemon's fd table by one message.
const MAX_FDS_PER_READ: usize = 8;
/// First and longest pause after a failed accept (EMFILE, ENFILE, ENOBUFS...).
const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(50);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(2);

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
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error("no complete request within {0} ms")]
    Timeout(u64),
    #[error(transparent)]
    Denied(#[from] AccessDenied),
    #[error("{0}")]
    Refused(String),
}

/// Binds the handoff socket (0660, group `group`; parent directory created 0750, stale
/// socket replaced).
pub fn bind(path: &Path, group: Option<&str>) -> io::Result<UnixListener> {
    crate::api::bind_unix(path, group)
}

/// Accepts handoffs until `shutdown`. Never fails: accept errors are logged and retried
/// with back-off, since a full fd table (EMFILE) is a reason to wait, not to exit.
pub async fn serve(
    daemon: Arc<Daemon>,
    listener: UnixListener,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let config = &daemon.config.handoff;
    let policy = Arc::new(AccessPolicy::for_this_process(config.access()));
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let timeout_ms = config.request_timeout_ms;
    let mut backoff = ACCEPT_BACKOFF_FIRST;
    loop {
        // Wait for a free slot before accepting: extra clients wait in the listen backlog
        // and hold no fd of the daemon.
        let slot = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => return Ok(()),
            },
        };
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                backoff = ACCEPT_BACKOFF_FIRST;
                stream
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "handoff accept failed");
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let daemon = daemon.clone();
        let policy = policy.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let caller = stream.peer_cred().ok().map(Caller::from);
            let reply = handle(&daemon, &policy, &stream, caller, timeout_ms).await;
            let reply = match reply {
                Ok(device) => {
                    tracing::info!(?caller, %device, "device handed over");
                    HandoffReply { ok: true, error: None, device: Some(device) }
                }
                Err(e) => {
                    tracing::warn!(?caller, error = %e, "handoff refused");
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

async fn handle(
    daemon: &Arc<Daemon>,
    policy: &AccessPolicy,
    stream: &UnixStream,
    caller: Option<Caller>,
    timeout_ms: u64,
) -> Result<String, HandoffError> {
    // Checked before reading anything: a refused caller's fds are never received (the
    // kernel drops them with the connection).
    let Some(caller) = caller else {
        return Err(AccessDenied::NoCredentials { what: "device handoff".into() }.into());
    };
    if let Err(denied) = policy.check(Some(&caller), AccessClass::Admin, "device handoff") {
        // Wait for the request to be sent (without receiving it) so that the client reads
        // the refusal instead of meeting EPIPE on a connection closed under it.
        // A peek without control space installs no fd (the kernel flags MSG_CTRUNC).
        let sent = stream.async_io(Interest::READABLE, || {
            let mut byte = [MaybeUninit::uninit(); 1];
            rustix::net::recv(stream, &mut byte[..], RecvFlags::PEEK).map(|_| ()).map_err(io::Error::from)
        });
        let _ = tokio::time::timeout(Duration::from_millis(timeout_ms), sent).await;
        return Err(denied.into());
    }
    let (line, fd) = tokio::time::timeout(Duration::from_millis(timeout_ms), receive(stream))
        .await
        .map_err(|_| HandoffError::Timeout(timeout_ms))??;
    accept(daemon, &line, fd, caller).await
}

/// Reads the request line and the one fd that came with its first message.
async fn receive(stream: &UnixStream) -> Result<(Vec<u8>, OwnedFd), HandoffError> {
    let mut assembler = request::RequestAssembler::new();
    let mut first_fd = None;
    let mut chunk = [0u8; 4096];
    loop {
        let (bytes, fds, truncated) = stream
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
                let mut fds: Vec<OwnedFd> = Vec::new();
                for message in control.drain() {
                    if let RecvAncillaryMessage::ScmRights(received) = message {
                        fds.extend(received);
                    }
                }
                Ok((msg.bytes, fds, msg.flags.contains(ReturnFlags::CTRUNC)))
            })
            .await?;
        let count = fds.len();
        // At most one fd is ever kept; any other is closed here, before the next read.
        let mut fds = fds.into_iter();
        let this_fd = if count == 1 { fds.next() } else { None };
        drop(fds);
        match assembler.push(&chunk[..bytes], count, truncated)? {
            Some(line) => {
                let fd = first_fd.or(this_fd).ok_or(RequestError::FdCount(0))?;
                return Ok((line, fd));
            }
            None => {
                if first_fd.is_none() {
                    first_fd = this_fd;
                }
            }
        }
    }
}

/// Checks and registers one handed-over device; returns its description.
async fn accept(
    daemon: &Arc<Daemon>,
    line: &[u8],
    fd: OwnedFd,
    caller: Caller,
) -> Result<String, HandoffError> {
    let request = request::parse_request(line)?;
    if daemon.registry.device(&request.name).is_ok() {
        return Err(HandoffError::Refused(format!("device `{}` is already registered", request.name)));
    }
    let handover = match request.sim {
        None => Handover::Vfio { fd },
        Some(mut keys) => {
            keys.insert("name".into(), serde_json::Value::String(request.name.clone()));
            let spec = SimSpec::deserialize(serde_json::Value::Object(keys))
                .map_err(|e| RequestError::BadRequest(format!("`sim`: {e}")))?;
            open::check_remote_sim(&spec, &daemon.config.simulator, "the handoff socket")
                .map_err(|e| HandoffError::Refused(e.to_string()))?;
            Handover::Sim { spec: Box::new(spec), anchor: fd }
        }
    };
    let group = request.group.clone().filter(|g| !g.is_empty());
    let creator = GroupCreator { uid: caller.uid, pid: caller.pid };
    if let Some(group) = &group {
        // Checked before the device is opened; checked again (atomically) on joining.
        daemon.registry.may_join_as(group, &creator).map_err(|e| HandoffError::Refused(e.to_string()))?;
    }
    let name = request.name.clone();
    let identity = request.identity.map(|i| DeviceIdentity { driver: i.driver, model: i.model });
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
    if let Some(group) = &group
        && let Err(e) = daemon.registry.join_group_as(group, &request.name, &creator)
    {
        // All or nothing: a device that cannot join its VM's group is not kept.
        let _ = daemon.registry.remove_device(&request.name);
        return Err(HandoffError::Refused(e.to_string()));
    }
    Ok(summary.to_string())
}
