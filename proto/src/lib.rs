//! Generated gRPC code for vfio-migd: the control API (`Control`) for control planes and
//! `vfio-migctl`, and the peer API (`Peer`) between daemons. Built from `vfio_migd/v1/*.proto`
//! by protox, so no protoc binary is needed.
#![deny(unsafe_code)]

pub mod v1 {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("vfio_migd.v1");
}

/// The encoded descriptor set, for gRPC server reflection (`grpcurl` works without .proto files).
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/vfio_migd_descriptor.bin"));
