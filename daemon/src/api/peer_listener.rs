//! The peer listener's connections: a counting accept loop (at most
//! `[peer.limits] max_connections` at once; more are closed at accept), TCP keepalive on
//! every socket, and the TLS handshake (with the holder's current settings, so a reload
//! applies to new connections) under a timeout, off the accept loop. Accept errors
//! (EMFILE, ENFILE, ...) are logged and retried with back-off, never fatal.
//!
//! Each connection carries what the transport proved about its peer
//! ([`PeerConnectInfo`]), which tonic hands to every request on it.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

use crate::config::PeerLimits;
use crate::peer_identity::PeerIdentity;
use crate::tls::PeerTls;

/// What a peer request knows about its connection (in the request's extensions).
#[derive(Clone, Debug)]
pub struct PeerConnectInfo {
    /// The listener address the connection arrived on (its IP hosts the data ports).
    pub local: Option<SocketAddr>,
    pub identity: PeerIdentity,
}

enum PeerIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// One accepted peer connection; holds its slot of the connection cap until dropped.
pub struct PeerConnection {
    io: PeerIo,
    info: PeerConnectInfo,
    _slot: OwnedSemaphorePermit,
}

impl Connected for PeerConnection {
    type ConnectInfo = PeerConnectInfo;

    fn connect_info(&self) -> PeerConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for PeerConnection {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            PeerIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            PeerIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PeerConnection {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            PeerIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            PeerIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            PeerIo::Plain(s) => Pin::new(s).poll_flush(cx),
            PeerIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            PeerIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            PeerIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Logs a repeated event at most once a second, with how many were folded in.
struct Throttled {
    last: Option<Instant>,
    folded: u64,
}

impl Throttled {
    fn hit(&mut self) -> Option<u64> {
        self.folded += 1;
        if self.last.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.folded))
    }
}

/// Accepts peer connections on `listener` until `shutdown`, yielding those that passed
/// the cap and (with `tls`) a TLS handshake with a fleet certificate.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<PeerTls>>,
    limits: PeerLimits,
    shutdown: CancellationToken,
) -> ReceiverStream<Result<PeerConnection, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(accept_loop(listener, tls, limits, shutdown, tx));
    ReceiverStream::new(rx)
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<Arc<PeerTls>>,
    limits: PeerLimits,
    shutdown: CancellationToken,
    tx: mpsc::Sender<Result<PeerConnection, io::Error>>,
) {
    const FIRST_BACKOFF: Duration = Duration::from_millis(10);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let dead_peer = Duration::from_millis(limits.dead_peer_ms);
    let handshake_timeout = Duration::from_millis(limits.handshake_timeout_ms);
    let mut backoff = FIRST_BACKOFF;
    let mut over_cap = Throttled { last: None, folded: 0 };
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => return,
            () = tx.closed() => return,
        };
        let (tcp, remote) = match accepted {
            Ok(accepted) => {
                backoff = FIRST_BACKOFF;
                accepted
            }
            Err(e) => {
                // EMFILE and friends: the listener is fine, the process is short of
                // something; wait for it to come back instead of spinning or exiting.
                tracing::warn!(error = %e, retry_in = ?backoff, "peer listener: accept failed");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if let Some(count) = over_cap.hit() {
                tracing::warn!(
                    %remote,
                    refused = count,
                    max_connections = limits.max_connections,
                    "peer listener: connection limit reached ([peer.limits] max_connections); closing new connections"
                );
            }
            drop(tcp);
            continue;
        };
        let local = tcp.local_addr().ok();
        if let Err(e) = tcp.set_nodelay(true).and_then(|()| crate::tls::set_keepalive(&tcp, dead_peer)) {
            tracing::warn!(%remote, error = %e, "peer listener: cannot set socket options");
            continue;
        }
        let Some(tls) = &tls else {
            let identity = PeerIdentity { addr: Some(remote), ..PeerIdentity::default() };
            let conn = PeerConnection {
                io: PeerIo::Plain(tcp),
                info: PeerConnectInfo { local, identity },
                _slot: slot,
            };
            if tx.send(Ok(conn)).await.is_err() {
                return;
            }
            continue;
        };
        // The handshake runs on its own task so a slow or silent client holds only its
        // own slot, for at most the handshake timeout.
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
        let tx = tx.clone();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::warn!(%remote, error = %e, "peer listener: TLS handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::warn!(%remote, timeout = ?handshake_timeout, "peer listener: TLS handshake timed out");
                    return;
                }
            };
            let certificate = stream.get_ref().1.peer_certificates().and_then(|chain| chain.first()).cloned();
            let Some(certificate) = certificate else {
                tracing::warn!(%remote, "peer listener: TLS peer without a client certificate");
                return;
            };
            let identity = PeerIdentity::verified(Some(remote), certificate.into_owned());
            tracing::debug!(peer = %identity.describe(), "peer listener: TLS connection");
            let conn = PeerConnection {
                io: PeerIo::Tls(Box::new(stream)),
                info: PeerConnectInfo { local, identity },
                _slot: slot,
            };
            let _ = tx.send(Ok(conn)).await;
        });
    }
}
