//! Executes the group sequencer's steps ([`super::plan::Step`]) on devices: the async
//! shell around the pure plans of `plan.rs`.
//!
//! Only the pieces every driver shares live here: a barrier (one SET per device, in
//! parallel, each on a blocking thread) and a reset that rides out the kernel's EAGAIN.
//! The drivers (`source.rs`, `destination.rs`) walk the steps themselves, because what
//! a step means to the job (its phase, the data_fds a SET opens, when the streams switch
//! over) is theirs.

use std::sync::Arc;
use std::time::Duration;

use super::plan::{self, BarrierKind, Member, Move, SequenceError, Step};
use crate::device::{DataFd, DeviceError, MigrationDevice};
use crate::fsm::State;

/// How many times a reset answered EAGAIN/EBUSY is tried in all. `VFIO_DEVICE_RESET`
/// fails with EAGAIN when `pci_try_reset_function()` cannot take the device lock or a
/// sibling function's (`drivers/vfio/pci/vfio_pci_core.c`): it is contention, not a
/// failure, and usually clears within milliseconds.
pub const RESET_ATTEMPTS: u32 = 6;

/// The first back-off between reset attempts; it doubles each time (20, 40, … 320 ms:
/// about 0.6 s in all before giving up).
const RESET_BACKOFF: Duration = Duration::from_millis(20);

/// Moves `devices[m.device]` to `m.target` for every move, in parallel, and waits for
/// all of them: one barrier. Results are in `moves` order.
pub async fn barrier(
    devices: &[Arc<dyn MigrationDevice>],
    moves: &[Move],
) -> Vec<Result<Option<DataFd>, DeviceError>> {
    let targets: Vec<_> = moves.iter().map(|m| (devices[m.device].clone(), m.target)).collect();
    super::transition_all(&targets).await
}

/// `VFIO_DEVICE_RESET`, retried while the kernel answers EAGAIN/EBUSY (lock contention),
/// [`RESET_ATTEMPTS`] times with a doubling back-off; then the last error, saying so.
pub async fn reset(device: &Arc<dyn MigrationDevice>) -> Result<(), DeviceError> {
    let mut backoff = RESET_BACKOFF;
    let mut attempt = 1;
    loop {
        match super::blocking(device, |d| d.reset()).await {
            Ok(()) => return Ok(()),
            Err(e) if e.kind.is_transient() && attempt < RESET_ATTEMPTS => {
                tracing::debug!(device = %device.name(), attempt, error = %e, "reset busy; retrying");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
                attempt += 1;
            }
            Err(e) if e.kind.is_transient() => {
                let detail = format!(
                    "still busy after {RESET_ATTEMPTS} attempts over {:?}; the device keeps the state it had",
                    RESET_BACKOFF * ((1 << (RESET_ATTEMPTS - 1)) - 1)
                );
                let detail = match &e.detail {
                    Some(d) => format!("{d}; {detail}"),
                    None => detail,
                };
                return Err(e.with_detail(detail));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Why the destination's resume did not bring every device to RUNNING. Neither is a
/// reason to reset: after Commit the devices hold the VM's only running copy (the source
/// journaled commit and never resumes), so the driver holds them and reports the job in
/// doubt; a retried resume starts from wherever they are.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ResumeError {
    #[error("cannot plan the resume: {0}")]
    Plan(#[from] SequenceError),
    #[error(
        "{} failed: {}; devices held where they are ({}), none reset: {}",
        step.as_str(),
        failures.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
        held.iter().map(|(n, s)| format!("`{n}` in {s}")).collect::<Vec<_>>().join(", "),
        if held.iter().any(|(_, s)| *s == State::Running) {
            "the devices already running stay running, the others wait for a retried resume"
        } else {
            "no device was started"
        }
    )]
    Incomplete {
        /// The step that failed; no later step ran.
        step: BarrierKind,
        failures: Vec<DeviceError>,
        /// Every device and the state it was left in (for a device whose SET failed: what
        /// the kernel reported, or the state before the SET if it reported nothing).
        held: Vec<(String, State)>,
    },
}

/// Executes [`plan::resume`] from `members` (each device's current state): P2P devices to
/// RUNNING_P2P, then the device(s) without P2P, then the P2P devices to RUNNING, stopping
/// at the first step in which any device fails — so if a P2P device cannot reach
/// RUNNING_P2P, no device is started. `moved` hears every device that reached its target.
pub async fn resume(
    devices: &[Arc<dyn MigrationDevice>],
    members: &[Member],
    moved: impl Fn(&str, State),
) -> Result<(), ResumeError> {
    let steps = plan::resume(members)?;
    let mut states: Vec<State> = members.iter().map(|m| m.state).collect();
    for step in &steps {
        let Step::Barrier { kind, moves } = step else { continue };
        let mut failures = Vec::new();
        for (m, result) in moves.iter().zip(barrier(devices, moves).await) {
            match result {
                Ok(_) => {
                    states[m.device] = m.target;
                    moved(devices[m.device].name(), m.target);
                }
                Err(e) => {
                    if let Some(after) = e.state_after {
                        states[m.device] = after;
                    }
                    failures.push(e);
                }
            }
        }
        if !failures.is_empty() {
            let held = devices.iter().zip(&states).map(|(d, s)| (d.name().to_string(), *s)).collect();
            return Err(ResumeError::Incomplete { step: *kind, failures, held });
        }
    }
    Ok(())
}
