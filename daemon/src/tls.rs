//! Mutual TLS between peer daemons: the peer gRPC listener and channel, and the data
//! connections, all authenticated against one fleet CA.
//!
//! Both sides present a certificate issued by the fleet CA and verify the other's
//! (client certificates are required). A source checks the destination's certificate
//! against the name it dialled (`--peer` host, or an explicit expected identity); a
//! destination checks every peer call and data connection of a job against the job's
//! expected source identity (`crate::peer_identity`).
//!
//! [`PeerTls`] holds the current material; [`PeerTls::reload`] re-reads the files so
//! that NEW connections use the new certificate, key and CA, while established ones
//! (running jobs) keep the session they negotiated. TLS 1.3 only, ring provider only.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// `[peer.tls]`: the daemon's certificate chain, its key and the fleet CA bundle (PEM).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PeerTlsConfig {
    /// This daemon's certificate (chain), PEM. Its SANs are its identity.
    pub cert: PathBuf,
    /// The certificate's private key (PKCS#8, PKCS#1 or SEC1), PEM.
    pub key: PathBuf,
    /// The fleet CA bundle, PEM: peers must present a certificate issued by one of them.
    pub ca: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("peer TLS {what} {}: {message}", path.display())]
    File { what: &'static str, path: PathBuf, message: String },
    #[error("peer TLS: the fleet CA bundle {}: {message}", path.display())]
    Ca { path: PathBuf, message: String },
    #[error("peer TLS: certificate {} and key {} are unusable together: {source}", cert.display(), key.display())]
    Identity {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("`{0}` is not a peer name a certificate can carry (a DNS name or an IP address)")]
    BadName(String),
}

/// One consistent set of TLS settings, built from the files at one moment.
pub struct TlsMaterial {
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial").finish_non_exhaustive()
    }
}

/// The daemon's peer TLS settings, reloadable.
#[derive(Debug)]
pub struct PeerTls {
    paths: PeerTlsConfig,
    current: RwLock<Arc<TlsMaterial>>,
}

impl PeerTls {
    /// Reads and checks the certificate, key and CA bundle.
    pub fn load(paths: &PeerTlsConfig) -> Result<PeerTls, TlsError> {
        let material = load_material(paths)?;
        Ok(PeerTls { paths: paths.clone(), current: RwLock::new(Arc::new(material)) })
    }

    /// Re-reads the files. New connections (gRPC and data) use the new material; those
    /// already open keep theirs, so running jobs are not disturbed. On error the old
    /// material stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let material = Arc::new(load_material(&self.paths)?);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = material;
        tracing::info!(cert = %self.paths.cert.display(), "peer TLS material reloaded");
        Ok(())
    }

    fn material(&self) -> Arc<TlsMaterial> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// What a listener (peer gRPC or data) accepts connections with now.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.material().server.clone()
    }

    /// What a connection to a peer is opened with now.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.material().client.clone()
    }
}

/// The ring provider. rustls deprecates it for lacking post-quantum key exchange, which
/// only its aws-lc-rs provider has; that one needs aws-lc-sys, minutes of C build on the
/// project's 2-core machines, so the fleet uses ring (X25519, P-256, P-384).
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_pem<T>(
    what: &'static str,
    path: &Path,
    parse: impl FnOnce(&[u8]) -> Result<T, String>,
) -> Result<T, TlsError> {
    let file = |message: String| TlsError::File { what, path: path.to_path_buf(), message };
    let bytes = std::fs::read(path).map_err(|e| file(e.to_string()))?;
    parse(&bytes).map_err(file)
}

fn certificates(bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs =
        CertificateDer::pem_slice_iter(bytes).collect::<Result<Vec<_>, _>>().map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("holds no PEM certificate".into());
    }
    Ok(certs)
}

/// Builds the server and client settings from the files named by `paths`.
pub fn load_material(paths: &PeerTlsConfig) -> Result<TlsMaterial, TlsError> {
    let chain = read_pem("certificate", &paths.cert, certificates)?;
    let key = read_pem("key", &paths.key, |b| PrivateKeyDer::from_pem_slice(b).map_err(|e| e.to_string()))?;
    let cas = read_pem("CA bundle", &paths.ca, certificates)?;
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots.add(ca).map_err(|e| TlsError::Ca { path: paths.ca.clone(), message: e.to_string() })?;
    }
    let roots = Arc::new(roots);
    let identity = |source| TlsError::Identity { cert: paths.cert.clone(), key: paths.key.clone(), source };
    let ca_error = |e: &dyn fmt::Display| TlsError::Ca { path: paths.ca.clone(), message: e.to_string() };
    let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| ca_error(&e))?;
    let server = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(identity)?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(identity)?;
    let server_verifier =
        WebPkiServerVerifier::builder_with_provider(roots, provider()).build().map_err(|e| ca_error(&e))?;
    let client = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(identity)?
        .with_webpki_verifier(server_verifier)
        .with_client_auth_cert(chain, key)
        .map_err(identity)?;
    Ok(TlsMaterial { server: Arc::new(server), client: Arc::new(client) })
}

/// The host part of a `host:port` peer address (`[v6]:port` included).
pub fn host_of(peer: &str) -> &str {
    let host = match peer.rsplit_once(':') {
        Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => peer,
    };
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host)
}

/// The name a peer's certificate must carry: `expected` when given, else the host of
/// the address it is dialled at.
pub fn server_name(peer: &str, expected: &str) -> Result<ServerName<'static>, TlsError> {
    let name = if expected.is_empty() { host_of(peer) } else { expected };
    ServerName::try_from(name.to_owned()).map_err(|_| TlsError::BadName(name.to_owned()))
}

/// The DNS subject alternative names of a certificate (IP SANs are matched by
/// [`certificate_matches`], not listed).
pub fn certificate_names(cert: &CertificateDer<'_>) -> Vec<String> {
    match webpki::EndEntityCert::try_from(cert) {
        Ok(parsed) => parsed.valid_dns_names().map(str::to_owned).collect(),
        Err(_) => Vec::new(),
    }
}

/// Whether `cert` is valid for `name` (a DNS name or an IP address), by the same rules
/// a TLS client applies to a server.
pub fn certificate_matches(cert: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(parsed) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    let Ok(name) = ServerName::try_from(host_of(name)) else {
        return false;
    };
    parsed.verify_is_valid_for_subject_name(&name).is_ok()
}

/// TCP keepalive and `TCP_USER_TIMEOUT` for every peer socket (gRPC and data), so a
/// dead peer (host down, cable cut) is noticed within `dead_after`, not after the
/// kernel's two hours: idle probes start after a third of it, every sixth of it.
pub fn set_keepalive(socket: &impl std::os::fd::AsFd, dead_after: Duration) -> io::Result<()> {
    use rustix::net::sockopt;
    let at_least_a_second = |d: Duration| d.max(Duration::from_secs(1));
    sockopt::set_socket_keepalive(socket, true)?;
    sockopt::set_tcp_keepidle(socket, at_least_a_second(dead_after / 3))?;
    sockopt::set_tcp_keepintvl(socket, at_least_a_second(dead_after / 6))?;
    sockopt::set_tcp_keepcnt(socket, 3)?;
    // Unacknowledged data (a peer that vanished mid-write) fails the socket after this.
    sockopt::set_tcp_user_timeout(socket, dead_after.as_millis().min(u128::from(u32::MAX)) as u32)?;
    Ok(())
}

/// An outgoing peer gRPC connection: plaintext (loopback development) or TLS.
pub enum PeerStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for PeerStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            PeerStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            PeerStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_flush(cx),
            PeerStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PeerStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            PeerStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Opens the connections of a peer gRPC channel: TCP with keepalives, then TLS (when
/// configured) verified against `server_name`.
#[derive(Clone)]
pub struct PeerConnector {
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    dead_after: Duration,
}

impl PeerConnector {
    /// `tls`: the holder (its current client settings are taken now) and the name the
    /// peer's certificate must carry.
    pub fn new(tls: Option<(&PeerTls, ServerName<'static>)>, dead_after: Duration) -> PeerConnector {
        PeerConnector { tls: tls.map(|(holder, name)| (holder.client_config(), name)), dead_after }
    }

    /// Opens one connection to `addr`.
    pub async fn open(&self, addr: &str) -> io::Result<PeerStream> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        set_keepalive(&tcp, self.dead_after)?;
        match &self.tls {
            None => Ok(PeerStream::Plain(tcp)),
            Some((config, name)) => {
                let tls = tokio_rustls::TlsConnector::from(config.clone()).connect(name.clone(), tcp).await?;
                Ok(PeerStream::Tls(Box::new(tls)))
            }
        }
    }
}

impl tower_service::Service<tonic::codegen::http::Uri> for PeerConnector {
    type Response = hyper_util::rt::TokioIo<PeerStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: tonic::codegen::http::Uri) -> Self::Future {
        let connector = self.clone();
        Box::pin(async move {
            let authority = uri.authority().map(|a| a.as_str().to_owned()).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("peer URI {uri} has no host:port"))
            })?;
            connector.open(&authority).await.map(hyper_util::rt::TokioIo::new)
        })
    }
}

/// Whether every address `listen` names is loopback (plaintext is allowed there only).
pub fn is_loopback(listen: SocketAddr) -> bool {
    listen.ip().is_loopback()
}

/// A gRPC channel to a peer daemon's listener at `peer` (`host:port`): TLS verified
/// against `expected` (or the host of `peer`) when `tls` is set, HTTP/2 keepalive and
/// the peer limits' windows either way. The connection is opened now.
pub async fn peer_channel(
    tls: Option<&PeerTls>,
    peer: &str,
    expected: &str,
    limits: &crate::config::PeerLimits,
    connect_timeout: Duration,
) -> Result<tonic::transport::Channel, String> {
    let ms = Duration::from_millis;
    let connector = match tls {
        Some(holder) => {
            let name = server_name(peer, expected).map_err(|e| e.to_string())?;
            PeerConnector::new(Some((holder, name)), ms(limits.dead_peer_ms))
        }
        None => PeerConnector::new(None, ms(limits.dead_peer_ms)),
    };
    // The scheme only tells tonic not to add its own TLS: the connector does it.
    tonic::transport::Endpoint::from_shared(format!("http://{peer}"))
        .map_err(|e| format!("peer `{peer}`: {e}"))?
        .connect_timeout(connect_timeout)
        .http2_keep_alive_interval(ms(limits.keepalive_interval_ms))
        .keep_alive_timeout(ms(limits.keepalive_timeout_ms))
        .keep_alive_while_idle(true)
        .initial_stream_window_size(limits.stream_window_bytes)
        .initial_connection_window_size(limits.connection_window_bytes)
        .connect_with_connector(connector)
        .await
        .map_err(|e| format!("cannot reach peer `{peer}`: {}", error_chain(&e)))
}

/// An error with its causes (a TLS refusal is usually two or three levels down).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// SIGHUP: the files at the configured paths are read again (new connections use them,
/// running jobs keep their sessions). Other paths need a restart.
impl crate::reload::Reloadable for PeerTls {
    fn name(&self) -> &'static str {
        "tls"
    }

    fn reload(&self, new: &crate::config::Config) -> crate::reload::Outcome {
        use crate::reload::Outcome;
        if new.peer.tls.as_ref() != Some(&self.paths) {
            return Outcome::Refused("[peer.tls] paths change only with a restart".to_owned());
        }
        match PeerTls::reload(self) {
            Ok(()) => Outcome::Reloaded(vec![format!(
                "peer certificate {}, key and CA re-read for new connections",
                self.paths.cert.display()
            )]),
            Err(e) => Outcome::Refused(e.to_string()),
        }
    }
}
