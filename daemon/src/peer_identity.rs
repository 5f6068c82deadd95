//! Who is on the other end of a peer connection, as far as the transport can prove it.
//!
//! The engine decides by this value (a QueryJob is answered for a job only when its
//! own destination asks; Commit and Abort for a job come only from its source), and the
//! API layer fills it in from the connection: the remote address always, the names a
//! verified TLS certificate carries when the link is TLS.
//!
//! A job is bound to one peer ([`ExpectedPeer`]): on the destination to its source
//! (the identity `PrepareIncoming` named, or else the one whose handshake was accepted),
//! on the source to its destination. [`Bindings`] keeps them by job id, outside the engine.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use rustls::pki_types::CertificateDer;

/// What the transport proved about a peer daemon calling this one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The connection's remote address, when the transport has one.
    pub addr: Option<SocketAddr>,
    /// The names (DNS subject alternative names) of the peer's certificate,
    /// verified against the fleet CA; empty on a plaintext link, which proves no name.
    pub names: Vec<String>,
    /// The peer's end-entity certificate, verified against the fleet CA (TLS only).
    pub certificate: Option<CertificateDer<'static>>,
}

impl PeerIdentity {
    /// A TLS peer whose certificate chain was verified.
    pub fn verified(addr: Option<SocketAddr>, certificate: CertificateDer<'static>) -> PeerIdentity {
        PeerIdentity {
            addr,
            names: crate::tls::certificate_names(&certificate),
            certificate: Some(certificate),
        }
    }

    /// Whether this peer is `expected`: with TLS, the certificate is valid for that name
    /// (DNS or IP SAN, as a TLS client checks a server); in plaintext (loopback
    /// development), the remote address has that IP, or the name resolves to it.
    pub fn is(&self, expected: &str) -> bool {
        if let Some(cert) = &self.certificate {
            return crate::tls::certificate_matches(cert, expected);
        }
        let Some(addr) = self.addr else { return false };
        let host = crate::tls::host_of(expected);
        match host.parse::<std::net::IpAddr>() {
            Ok(ip) => ip == addr.ip(),
            Err(_) => {
                use std::net::ToSocketAddrs;
                (host, 0).to_socket_addrs().is_ok_and(|mut found| found.any(|a| a.ip() == addr.ip()))
            }
        }
    }

    /// Whether `other` is the same peer: the same verified certificate names (TLS), or
    /// the same remote IP (plaintext).
    pub fn same_peer(&self, other: &PeerIdentity) -> bool {
        match (&self.certificate, &other.certificate) {
            (Some(mine), Some(theirs)) => {
                mine == theirs || (!self.names.is_empty() && self.names == other.names)
            }
            (None, None) => self.addr.map(|a| a.ip()) == other.addr.map(|a| a.ip()),
            _ => false,
        }
    }

    /// How logs and errors name this peer.
    pub fn describe(&self) -> String {
        let addr = self.addr.map_or_else(|| "unknown address".to_owned(), |a| a.to_string());
        if self.certificate.is_none() {
            return format!("{addr} (plaintext)");
        }
        if self.names.is_empty() {
            format!("{addr} (certificate without DNS names)")
        } else {
            format!("{addr} ({})", self.names.join(", "))
        }
    }
}

/// Which peer a job accepts calls and data connections from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ExpectedPeer {
    /// Not bound yet: the first accepted handshake binds it (trust on first use within
    /// the fleet); only before the handshake.
    #[default]
    Unbound,
    /// The identity the control plane named (a certificate SAN, or in plaintext an address).
    Named(String),
    /// The peer whose handshake was accepted.
    SameAs(PeerIdentity),
}

impl ExpectedPeer {
    pub fn admits(&self, who: &PeerIdentity) -> bool {
        match self {
            ExpectedPeer::Unbound => true,
            ExpectedPeer::Named(name) => who.is(name),
            ExpectedPeer::SameAs(peer) => peer.same_peer(who),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            ExpectedPeer::Unbound => "any fleet peer".to_owned(),
            ExpectedPeer::Named(name) => format!("`{name}`"),
            ExpectedPeer::SameAs(peer) => peer.describe(),
        }
    }
}

/// Each job's expected peer, by job id. Filled by the control API (PrepareIncoming,
/// StartMigration) and the first accepted handshake; checked by the peer API before any
/// engine call.
#[derive(Debug, Default)]
pub struct Bindings {
    jobs: Mutex<HashMap<String, ExpectedPeer>>,
}

impl Bindings {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, ExpectedPeer>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Binds `job_id` to the peer the control plane named; an empty name leaves the job
    /// unbound until its handshake. A retried call does not loosen an existing binding.
    pub fn expect(&self, job_id: &str, name: &str) {
        let mut jobs = self.lock();
        let entry = jobs.entry(job_id.to_owned()).or_default();
        if !name.is_empty() {
            *entry = ExpectedPeer::Named(name.to_owned());
        }
    }

    /// After an accepted handshake: an unbound job is bound to `who` from now on.
    pub fn bind_on_handshake(&self, job_id: &str, who: &PeerIdentity) {
        let mut jobs = self.lock();
        let entry = jobs.entry(job_id.to_owned()).or_default();
        if *entry == ExpectedPeer::Unbound {
            *entry = ExpectedPeer::SameAs(who.clone());
        }
    }

    pub fn expected(&self, job_id: &str) -> ExpectedPeer {
        self.lock().get(job_id).cloned().unwrap_or_default()
    }

    /// Whether `who` may act on `job_id`. A job this daemon has no binding for is
    /// answered by the engine (not found, or not prepared).
    pub fn admits(&self, job_id: &str, who: &PeerIdentity) -> bool {
        self.lock().get(job_id).is_none_or(|expected| expected.admits(who))
    }

    pub fn forget(&self, job_id: &str) {
        self.lock().remove(job_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(addr: &str) -> PeerIdentity {
        PeerIdentity { addr: Some(addr.parse().unwrap()), ..PeerIdentity::default() }
    }

    #[test]
    fn plaintext_identity_is_the_address() {
        let peer = plain("127.0.0.2:5000");
        assert!(peer.is("127.0.0.2:7410"));
        assert!(peer.is("127.0.0.2"));
        assert!(!peer.is("127.0.0.3:7410"));
        assert!(peer.same_peer(&plain("127.0.0.2:6000")));
        assert!(!peer.same_peer(&plain("127.0.0.9:5000")));
    }

    #[test]
    fn a_binding_admits_only_its_peer_and_is_not_loosened() {
        let bindings = Bindings::default();
        let (a, b) = (plain("127.0.0.2:1"), plain("127.0.0.3:1"));
        assert!(bindings.admits("unknown-job", &a), "no binding: the engine answers");
        bindings.expect("job", "");
        assert!(bindings.admits("job", &a) && bindings.admits("job", &b), "unbound before the handshake");
        bindings.bind_on_handshake("job", &a);
        assert!(bindings.admits("job", &a));
        assert!(!bindings.admits("job", &b), "bound to the handshake's peer");
        bindings.bind_on_handshake("job", &b);
        assert!(!bindings.admits("job", &b), "a later handshake does not rebind");

        bindings.expect("named", "127.0.0.3");
        assert!(!bindings.admits("named", &a));
        assert!(bindings.admits("named", &b));
        bindings.expect("named", "");
        assert!(!bindings.admits("named", &a), "a retry without a name keeps the binding");
        bindings.forget("named");
        assert_eq!(bindings.expected("named"), ExpectedPeer::Unbound);
    }
}
