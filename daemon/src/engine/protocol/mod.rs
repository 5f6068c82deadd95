//! The two-phase commit between a source and a destination daemon, as two pure state
//! machines: `on(event) -> actions`, no I/O, no clock. The async drivers
//! ([`super::source`], [`super::destination`]) perform the actions (journal writes, RPCs,
//! device transitions) and feed back what happened as events; the job status a control
//! plane reads is derived from the machine ([`SourceMachine::status`],
//! [`DestinationMachine::status`]), never from the last error.
//!
//! The rules the machines implement are listed in [`super::commit`]; [`model`] (tests
//! only) explores every interleaving of the two machines with a lossy, reordering,
//! duplicating network, crashes, timeouts, cancels, operator resolution and third-party
//! messages, and checks that a VM's state never runs on both hosts.

pub mod destination;
#[cfg(test)]
mod model;
pub mod source;

pub use destination::{DestinationAction, DestinationEvent, DestinationMachine, DestinationReply};
pub use source::{QueryReply, SourceAction, SourceEvent, SourceMachine};

use crate::fsm::State;

/// Who sent a peer request, as the driver judged it against the job: the job's own
/// peer (its destination, for the source; its source, for the destination), or anyone
/// else. The machines never obey a stranger.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Sender {
    JobPeer,
    Stranger,
}

/// The source's answer to a destination asking how a job ended (`QueryJob`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Answer {
    Commit,
    Abort,
    /// The source does not know the job (never seen, or its record pruned): the
    /// destination holds, it never resets on this answer.
    Unknown,
}

/// What the journal holds after a write failed, read back by the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ReadBack {
    Commit,
    Abort,
    Nothing,
    /// The journal could not be read either.
    Unreadable,
}

/// Why the source refuses to claim a device for a migration.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClaimRefusal {
    #[error(
        "device `{device}` is in {state}; a migration starts only from RUNNING (a paused VM's devices are not migrated)"
    )]
    NotRunning { device: String, state: State },
    #[error(
        "device `{device}` migrated away in job `{job}`: its state now runs on the destination; release the device before using it again"
    )]
    MigratedAway { device: String, job: String },
}

/// Rule S0: a device may be claimed for a migration only while it runs the VM, and
/// never once its state migrated away (it would resume a VM that runs elsewhere).
pub fn check_claim(device: &str, state: State, migrated_away_in: Option<&str>) -> Result<(), ClaimRefusal> {
    if let Some(job) = migrated_away_in {
        return Err(ClaimRefusal::MigratedAway { device: device.into(), job: job.into() });
    }
    if state != State::Running {
        return Err(ClaimRefusal::NotRunning { device: device.into(), state });
    }
    Ok(())
}

/// Test-only switches that put a flaw of the old engine back into the machines, so that
/// the model check can be shown to catch it (issue cases 1, 2, 3, 4, 6 and 9).
#[cfg(test)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Flaws {
    /// Case 1: claim a device whatever its state, and roll back to RUNNING.
    pub claim_any_state: bool,
    /// Case 2: a failed commit write rolls back without reading the journal back.
    pub journal_failure_rolls_back: bool,
    /// Case 3: "no decision yet" is answered Abort without journaling it, and the
    /// destination resets on "unknown".
    pub presumed_abort_not_durable: bool,
    /// Case 4: the destination obeys Commit and Abort from anyone.
    pub trust_any_peer: bool,
    /// Case 6: rollback reads states without joining the barrier's transitions.
    pub rollback_without_join: bool,
    /// Case 9: a commit the destination did not confirm ends the job `failed`.
    pub commit_error_fails_job: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case1_only_a_running_device_that_never_migrated_away_is_claimed() {
        assert_eq!(check_claim("nic0", State::Running, None), Ok(()));
        let err = check_claim("nic0", State::Stop, None).unwrap_err();
        assert!(err.to_string().contains("`nic0` is in STOP"), "{err}");
        let err = check_claim("nic0", State::Running, Some("job-1")).unwrap_err();
        assert!(err.to_string().contains("migrated away in job `job-1`"), "{err}");
    }
}
