//! vfio-migd: live migration of groups of VFIO devices between hypervisor hosts.
//!
//! Where things live (see `docs/architecture.md`):
//! - [`fsm`]: the kernel's migration state machine, pure and exhaustively tested;
//! - [`vfio`]: the kernel boundary (uAPI structs, ioctls, open paths) — the only `unsafe`;
//! - [`device`]: the `MigrationDevice` trait, the real VFIO backend and the simulator;
//! - [`stream`]: the device-state stream between two daemons (frames, pumps, connections).
#![deny(unsafe_code)]

pub mod device;
pub mod fsm;
pub mod stream;
#[allow(unsafe_code)]
pub mod vfio;
