//! The source side of a migration (the coordinator of the two-phase commit).

use std::sync::Arc;

use super::{Daemon, EngineError};
use crate::job::Job;

/// What `StartMigration` asks for.
#[derive(Clone, Debug)]
pub struct MigrationRequest {
    pub job_id: String,
    pub group: String,
    /// `host:port` of the destination daemon's peer listener.
    pub peer: String,
    /// (source device, destination device) for every device of the group.
    pub mapping: Vec<(String, String)>,
    /// 0: the configured default.
    pub phase_timeout_ms: u64,
    /// 0: the configured default.
    pub data_connections: usize,
}

impl Daemon {
    /// Starts migrating a group to a peer; idempotent for the same job id.
    pub async fn start_migration(self: &Arc<Self>, req: MigrationRequest) -> Result<Arc<Job>, EngineError> {
        Err(EngineError::Internal(format!("job {}: the source engine is being built", req.job_id)))
    }
}
