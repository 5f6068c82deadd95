//! Client side of vfio-migd's local interfaces, shared by `vfio-migctl` and tests:
//! [`handoff`] hands a device fd over to the daemon (what a VMM does).
#![deny(unsafe_code)]

pub mod handoff;
