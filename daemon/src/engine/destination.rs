//! The destination side of a migration.

use std::sync::Arc;

use super::{Daemon, Decision, EngineError};
use crate::job::Job;

impl Daemon {
    /// Prepares this daemon to receive `devices` for `job_id` (idempotent).
    pub async fn prepare_incoming(
        self: &Arc<Self>,
        job_id: &str,
        devices: Vec<String>,
    ) -> Result<Arc<Job>, EngineError> {
        Err(EngineError::Internal(format!(
            "job {job_id}: the destination engine is being built ({} devices)",
            devices.len()
        )))
    }

    /// Resolves an in-doubt job: on the source from its own journal; on the destination
    /// from `decision` or, when absent, by asking the source's journal.
    pub async fn resolve(
        self: &Arc<Self>,
        job_id: &str,
        decision: Option<Decision>,
    ) -> Result<Arc<Job>, EngineError> {
        Err(EngineError::Internal(format!("job {job_id}: resolution is being built ({decision:?})")))
    }
}
