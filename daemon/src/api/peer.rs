//! The peer API between daemons: a thin translation of `vfio_migd.v1.Peer` onto the
//! destination engine (and, for QueryJob, the source's journal).

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};
use vfio_migd_proto::v1 as pb;
use vfio_migd_proto::v1::peer_server::Peer;

use crate::device::DeviceIdentity;
use crate::engine::destination::{Offer, OfferedDevice};
use crate::engine::{Daemon, EngineError};
use crate::fsm::Caps;

/// Runs a state-changing peer request on its own task, so that it completes even when
/// the caller gives up (a timed-out or dropped RPC cancels the handler's future): a
/// half-done handshake, commit or abort would leave devices between states.
async fn run_to_completion<T: Send + 'static>(
    work: impl Future<Output = Result<T, EngineError>> + Send + 'static,
) -> Result<T, EngineError> {
    tokio::spawn(work)
        .await
        .unwrap_or_else(|e| Err(EngineError::Internal(format!("peer request task failed: {e}"))))
}

/// What the transport proved about the caller (filled by the peer listener; a request
/// that did not come through it, e.g. in-process, has only its remote address).
fn caller<T>(request: &Request<T>) -> crate::peer_identity::PeerIdentity {
    match request.extensions().get::<super::peer_listener::PeerConnectInfo>() {
        Some(info) => info.identity.clone(),
        None => crate::peer_identity::PeerIdentity { addr: request.remote_addr(), ..Default::default() },
    }
}

pub struct PeerService {
    daemon: Arc<Daemon>,
}

impl PeerService {
    pub fn new(daemon: Arc<Daemon>) -> PeerService {
        PeerService { daemon }
    }

    pub fn into_server(self) -> pb::peer_server::PeerServer<PeerService> {
        pb::peer_server::PeerServer::new(self)
    }

    /// Refuses, before anything changes, a call about `job_id` from a peer the job is
    /// not bound to (its source on a destination, its destination on a source).
    fn authorise(&self, job_id: &str, who: &crate::peer_identity::PeerIdentity) -> Result<(), Status> {
        if self.daemon.bindings.admits(job_id, who) {
            return Ok(());
        }
        let expected = self.daemon.bindings.expected(job_id).describe();
        tracing::warn!(job = %job_id, peer = %who.describe(), %expected, "peer call refused: not the job's peer");
        Err(Status::permission_denied(format!(
            "job `{job_id}` accepts peer calls only from {expected}, not from {}",
            who.describe()
        )))
    }
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn handshake(
        &self,
        request: Request<pb::HandshakeRequest>,
    ) -> Result<Response<pb::HandshakeResponse>, Status> {
        let listen_ip = match request.extensions().get::<super::peer_listener::PeerConnectInfo>() {
            Some(info) => info.local.map(|a| a.ip()),
            None => request.local_addr().map(|a| a.ip()),
        }
        .unwrap_or(self.daemon.config.peer.listen.ip());
        let who = caller(&request);
        let req = request.into_inner();
        self.authorise(&req.job_id, &who)?;
        let mut devices = Vec::with_capacity(req.devices.len());
        for d in req.devices {
            let identity = d.identity.ok_or_else(|| {
                Status::invalid_argument(format!("device `{}` has no identity", d.source_name))
            })?;
            devices.push(OfferedDevice {
                index: d.index,
                source_name: d.source_name,
                destination_name: d.destination_name,
                caps: Caps::from_bits(d.caps),
                data_size: d.data_size,
                identity: DeviceIdentity { driver: identity.driver, model: identity.model },
            });
        }
        if req.max_frame_payload < 4096 || req.max_frame_payload > 16 << 20 {
            return Err(Status::invalid_argument(format!(
                "max_frame_payload {} is outside 4 KiB..16 MiB",
                req.max_frame_payload
            )));
        }
        if req.data_connections == 0 || req.data_connections > 64 {
            return Err(Status::invalid_argument(format!(
                "data_connections {} is outside 1..64",
                req.data_connections
            )));
        }
        let offer = Offer {
            protocol_version: req.protocol_version,
            job_id: req.job_id,
            devices,
            data_connections: req.data_connections as usize,
            max_frame_payload: req.max_frame_payload as usize,
            source_peer: req.source_peer,
        };
        let daemon = self.daemon.clone();
        let job_id = offer.job_id.clone();
        let from = who.clone();
        let accepted = run_to_completion(async move { daemon.accept_offer(offer, listen_ip, &from).await })
            .await
            .map_err(Status::from)?;
        // From now on the job takes calls and data connections only from this peer.
        self.daemon.bindings.bind_on_handshake(&job_id, &who);
        Ok(Response::new(pb::HandshakeResponse {
            protocol_version: crate::engine::destination::PROTOCOL_VERSION,
            data_port: accepted.data_port as u32,
            session_token: accepted.token.into(),
        }))
    }

    async fn await_loaded(
        &self,
        request: Request<pb::AwaitLoadedRequest>,
    ) -> Result<Response<pb::AwaitLoadedResponse>, Status> {
        let who = caller(&request);
        let req = request.into_inner();
        self.authorise(&req.job_id, &who)?;
        let timeout = Duration::from_millis(self.daemon.config.migration.phase_timeout_ms);
        let loaded = self.daemon.await_loaded(&req.job_id, timeout).await.map_err(Status::from)?;
        Ok(Response::new(pb::AwaitLoadedResponse {
            devices: loaded
                .into_iter()
                .map(|(destination_name, bytes, frames)| pb::DeviceLoaded { destination_name, bytes, frames })
                .collect(),
        }))
    }

    async fn commit(
        &self,
        request: Request<pb::CommitRequest>,
    ) -> Result<Response<pb::CommitResponse>, Status> {
        let who = caller(&request);
        let req = request.into_inner();
        self.authorise(&req.job_id, &who)?;
        let daemon = self.daemon.clone();
        let running_at_unix_ns =
            run_to_completion(async move { daemon.commit_incoming(&req.job_id, Some(&who)).await })
                .await
                .map_err(Status::from)?;
        Ok(Response::new(pb::CommitResponse { running_at_unix_ns }))
    }

    async fn abort(&self, request: Request<pb::AbortRequest>) -> Result<Response<pb::AbortResponse>, Status> {
        let who = caller(&request);
        let req = request.into_inner();
        self.authorise(&req.job_id, &who)?;
        let daemon = self.daemon.clone();
        let destination_failure =
            run_to_completion(
                async move { daemon.abort_incoming(&req.job_id, &req.reason, Some(&who)).await },
            )
            .await
            .map_err(Status::from)?;
        Ok(Response::new(pb::AbortResponse { destination_failure: destination_failure.unwrap_or_default() }))
    }

    async fn query_job(
        &self,
        request: Request<pb::QueryJobRequest>,
    ) -> Result<Response<pb::QueryJobResponse>, Status> {
        let who = caller(&request);
        let req = request.into_inner();
        self.authorise(&req.job_id, &who)?;
        Ok(Response::new(self.daemon.query_job(&req.job_id, &who).await.map_err(Status::from)?))
    }
}
