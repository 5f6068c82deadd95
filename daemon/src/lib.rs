//! vfio-migd: live migration of groups of VFIO devices between hypervisor hosts.
//!
//! Where things live (see `docs/architecture.md`):
//! - [`fsm`]: the kernel's migration state machine, pure and exhaustively tested;
//! - [`vfio`]: the kernel boundary (uAPI structs, ioctls, open paths) — the only `unsafe`;
//! - [`device`]: the `MigrationDevice` trait, the real VFIO backend and the simulator;
//! - [`dirty`]: dirty-page tracking over a group (range planning, bitmap, tracker).
#![deny(unsafe_code)]

pub mod device;
pub mod dirty;
pub mod fsm;
#[allow(unsafe_code)]
pub mod vfio;
