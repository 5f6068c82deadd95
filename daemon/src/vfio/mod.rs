//! The kernel boundary: VFIO migration v2 uAPI structs, request numbers and ioctls.
//! This is the only module of the project allowed to use `unsafe`.

pub mod errno;
