//! The kernel boundary: VFIO migration v2 uAPI structs, request numbers and ioctls.
//! This is the only module of the project allowed to use `unsafe`.
//!
//! - [`uapi`]: `#[repr(C)]` structs, flag words and request numbers, layout-tested against
//!   the bindgen crates and the reference's literal values;
//! - [`syscalls`]: the seam every system call goes through ([`LinuxSyscalls`] for real);
//! - [`open`]: [`VfioHost`], the group/container, cdev/iommufd and inherited-fd open paths;
//! - [`handle`]: [`VfioDeviceFd`], the checked wrappers around each device ioctl;
//! - [`iommufd`]: IOAS/HWPT allocation and IOMMU dirty tracking;
//! - [`sysfs`]: where a device's group, cdev and driver are found;
//! - [`errno`]: what each errno means to the daemon.

pub mod errno;
#[cfg(test)]
pub(crate) mod fake;
pub mod handle;
pub mod iommufd;
pub mod open;
pub mod syscalls;
pub mod sysfs;
pub mod uapi;

pub use handle::{IommufdBinding, OpenPath, VfioDeviceFd};
pub use iommufd::{DirtyRead, IommuHwInfo, Iommufd};
pub use open::{Attach, VfioContainer, VfioHost};
pub use syscalls::{LinuxSyscalls, Syscalls};
pub use sysfs::{Bus, Sysfs};
