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

use super::plan::Move;
use crate::device::{DataFd, DeviceError, MigrationDevice};

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
