//! Who is on the other end of a peer connection, as far as the transport can prove it.
//!
//! The engine decides by this value (a QueryJob is answered for a job only when its
//! own destination asks; Commit and Abort for a job come only from its source), and the
//! API layer fills it in from the connection: the remote address always, the names a
//! verified TLS certificate carries when the link is TLS.

use std::net::SocketAddr;

/// What the transport proved about a peer daemon calling this one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The connection's remote address, when the transport has one.
    pub addr: Option<SocketAddr>,
    /// The names (DNS and IP subject alternative names) of the peer's certificate,
    /// verified against the fleet CA; empty on a plaintext link, which proves no name.
    pub names: Vec<String>,
}
