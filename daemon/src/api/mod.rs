//! gRPC services.
pub mod peer;
