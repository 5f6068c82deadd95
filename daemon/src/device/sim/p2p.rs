//! Peer-to-peer DMA between the simulated devices of one VM.
//!
//! A device with `p2p_writes_per_second` has a writer thread that, while the device may
//! initiate P2P DMA (RUNNING, PRE_COPY), writes into its peers (connected with
//! [`super::SimDevice::connect_p2p`]) in turn. What a write does depends on the peer's
//! state at that instant, as a write into a BAR would:
//!
//! * a running peer (RUNNING, PRE_COPY, RUNNING_P2P, PRE_COPY_P2P: a P2P-quiesced device
//!   still answers MMIO) takes it: one page of its state changes, and is dirty for the
//!   PRE_COPY stream like any other change;
//! * a stopped peer (STOP, STOP_COPY, RESUMING, ERROR) must not change — that is what the
//!   kernel's P2P quiescing (`include/uapi/linux/vfio.h`, RUNNING_P2P) is for — so the
//!   write *corrupts* it: its state changes behind its dirty tracking, and every stream it
//!   saves from then on is corrupt, which the destination's verification rejects. Only a
//!   reset clears it.
//!
//! "Outstanding P2P DMA is complete when the arc returns": the writer holds its device's
//! `gate` around each write, and every arc the device walks takes the gate, so no write
//! starts after a SET that left RUNNING/PRE_COPY returned. The peer's `inbox` makes the
//! state check and the delivery one step, also against the peer's own arcs (which hold
//! it while they walk). Locks: device core → gate → inbox; a writer takes its own gate,
//! then the peer's inbox; nothing is taken under an inbox but a session's own lock.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::fsm::State;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Writes a device received and has not yet applied to its state.
#[derive(Debug, Default)]
pub(crate) struct Inbox {
    /// Taken while running: legitimate state changes.
    pub accepted: u64,
    /// Arrived while stopped: changes behind the device's back.
    pub corrupting: u64,
}

/// One device's end of the P2P model.
#[derive(Debug, Default)]
pub(crate) struct P2pPort {
    gate: Mutex<()>,
    inbox: Mutex<Inbox>,
    corrupted: AtomicBool,
    accepted_total: AtomicU64,
    corrupting_total: AtomicU64,
}

impl P2pPort {
    /// Held while the device initiates a write, and while it walks an arc.
    pub fn gate(&self) -> MutexGuard<'_, ()> {
        lock(&self.gate)
    }

    pub fn inbox(&self) -> MutexGuard<'_, Inbox> {
        lock(&self.inbox)
    }

    /// A write from `from` arrives while the device is in `state` (read under the inbox
    /// lock, so the device's arcs cannot slip between). Returns a description if the write
    /// corrupted the device, for its arc log.
    pub fn receive(&self, inbox: &mut Inbox, state: State, from: &str) -> Option<String> {
        if state.is_running() {
            inbox.accepted += 1;
            self.accepted_total.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        inbox.corrupting += 1;
        self.corrupting_total.fetch_add(1, Ordering::Relaxed);
        let first = !self.corrupted.swap(true, Ordering::AcqRel);
        first.then(|| format!("P2P DMA write from {from} received in {state}: the device's state is corrupt"))
    }

    /// Whether a write reached the device while it was stopped (since the last reset).
    pub fn is_corrupted(&self) -> bool {
        self.corrupted.load(Ordering::Acquire)
    }

    /// Writes received so far: (taken while running, arrived while stopped).
    pub fn totals(&self) -> (u64, u64) {
        (self.accepted_total.load(Ordering::Relaxed), self.corrupting_total.load(Ordering::Relaxed))
    }

    /// A reset: pending writes are dropped with the state they would have changed.
    pub fn reset(&self) {
        *lock(&self.inbox) = Inbox::default();
        self.corrupted.store(false, Ordering::Release);
    }
}
