//! The simulated migratable device.
