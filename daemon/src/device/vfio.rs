//! The real VFIO device backend.
