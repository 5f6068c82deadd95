//! The peer API (`vfio_migd.v1.Peer`), served to source daemons on the peer listener.
//! The destination engine answers these calls; until it is wired every call reports the
//! service as unavailable, so a source fails its handshake cleanly instead of hanging.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use vfio_migd_proto::v1 as pb;

use crate::engine::Daemon;

#[derive(Debug, Clone)]
pub struct PeerService {
    daemon: Arc<Daemon>,
}

impl PeerService {
    pub fn new(daemon: Arc<Daemon>) -> PeerService {
        PeerService { daemon }
    }

    fn not_built(&self, call: &str, job_id: &str) -> Status {
        Status::unavailable(format!(
            "peer engine not built: {call} for job `{job_id}` refused by {}",
            self.daemon.config.peer.listen
        ))
    }
}

#[tonic::async_trait]
impl pb::peer_server::Peer for PeerService {
    async fn handshake(
        &self,
        request: Request<pb::HandshakeRequest>,
    ) -> Result<Response<pb::HandshakeResponse>, Status> {
        Err(self.not_built("Handshake", &request.into_inner().job_id))
    }

    async fn await_loaded(
        &self,
        request: Request<pb::AwaitLoadedRequest>,
    ) -> Result<Response<pb::AwaitLoadedResponse>, Status> {
        Err(self.not_built("AwaitLoaded", &request.into_inner().job_id))
    }

    async fn commit(
        &self,
        request: Request<pb::CommitRequest>,
    ) -> Result<Response<pb::CommitResponse>, Status> {
        Err(self.not_built("Commit", &request.into_inner().job_id))
    }

    async fn abort(&self, request: Request<pb::AbortRequest>) -> Result<Response<pb::AbortResponse>, Status> {
        Err(self.not_built("Abort", &request.into_inner().job_id))
    }

    async fn query_job(
        &self,
        request: Request<pb::QueryJobRequest>,
    ) -> Result<Response<pb::QueryJobResponse>, Status> {
        Err(self.not_built("QueryJob", &request.into_inner().job_id))
    }
}
