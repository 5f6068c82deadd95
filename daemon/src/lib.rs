//! vfio-migd: live migration of groups of VFIO devices between hypervisor hosts.
//!
//! Where things live (see `docs/architecture.md`):
//! - [`fsm`]: the kernel's migration state machine, pure and exhaustively tested;
//! - [`vfio`]: the kernel boundary (uAPI structs, ioctls, open paths) — the only `unsafe`;
//! - [`device`]: the `MigrationDevice` trait, the real VFIO backend and the simulator;
//! - [`dirty`]: DMA-logging ranges, the group dirty bitmap and the tracker;
//! - [`engine`]: the group sequencer (plan, source, destination, two-phase commit);
//! - [`stream`]: the device-state stream between daemons (frames, pumps, connections);
//! - [`job`]: job identity, phases, progress, downtime;
//! - [`peer_identity`]: who a peer daemon is (address, verified certificate names);
//! - [`registry`]: devices and groups owned by this daemon;
//! - [`config`]: the TOML configuration;
//! - [`access`]: who may use the local sockets (SO_PEERCRED, per call class);
//! - [`api`]: the control and peer gRPC services and the listeners;
//! - [`handoff`]: the fd handoff socket (VMMs hand over their device fds);
//! - [`telemetry`]: logging setup;
//! - [`token`]: session tokens from the kernel's random generator;
//! - [`tls`]: mutual TLS between peer daemons (fleet CA, reloadable material);
//! - [`reload`]: what SIGHUP changes live;
//! - [`systemd`]: readiness, status, watchdog and stop notifications to systemd.
#![deny(unsafe_code)]

pub mod access;
pub mod api;
pub mod config;
pub mod device;
pub mod dirty;
pub mod engine;
pub mod fsm;
pub mod handoff;
pub mod job;
pub mod peer_identity;
pub mod registry;
pub mod reload;
pub mod stream;
pub mod systemd;
pub mod telemetry;
pub mod tls;
pub mod token;
#[allow(unsafe_code)]
pub mod vfio;
