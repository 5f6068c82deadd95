//! The three ways the daemon comes to hold a VFIO device fd: the legacy group/container
//! API, the device cdev bound to iommufd, and an fd inherited from a VMM.
//!
//! [`VfioHost`] bundles what they need from the host: the syscall seam, the sysfs tree and
//! the `/dev` directory. Every failure is a [`DeviceError`] with `Op::Open` whose detail
//! names the step (and path) that failed.

use std::ffi::CString;
use std::fmt;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::errno::Errno;

use super::handle::{Backing, IommufdBinding, VfioDeviceFd};
use super::iommufd::Iommufd;
use super::syscalls::{IoctlArg, LinuxSyscalls, OPEN_RDWR, Syscalls, ioctl_with};
use super::sysfs::{Sysfs, check_device_name};
use super::uapi::*;
use crate::device::{DeviceError, Op};

/// What a cdev-opened device is attached to in iommufd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    /// A fresh IOAS; the kernel creates an automatic HWPT (no dirty tracking).
    NewIoas,
    /// An existing IOAS or HWPT id (e.g. one shared by all devices of a VM).
    Existing(u32),
    /// A HWPT allocated with `IOMMU_HWPT_ALLOC_DIRTY_TRACKING` over `ioas` (a fresh IOAS if
    /// `None`). EOPNOTSUPP (kind `Unsupported`) when the IOMMU cannot track dirty bits.
    DirtyTrackingHwpt { ioas: Option<u32> },
    /// A dirty-tracking HWPT another device already got (`hwpt` over `ioas`), so that one
    /// SET / GET serves both. Every device on such a HWPT must be able to track dirty
    /// bits: EOPNOTSUPP when this one's IOMMU cannot.
    SharedDirtyTrackingHwpt { ioas: u32, hwpt: u32 },
}

/// The host's VFIO nodes, reached through a syscall seam.
#[derive(Clone)]
pub struct VfioHost {
    sys: Arc<dyn Syscalls>,
    sysfs: Sysfs,
    dev: PathBuf,
}

impl fmt::Debug for VfioHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VfioHost").field("sysfs", &self.sysfs).field("dev", &self.dev).finish()
    }
}

impl Default for VfioHost {
    fn default() -> VfioHost {
        VfioHost::system()
    }
}

fn open_err(name: &str, errno: Errno, step: impl Into<String>) -> DeviceError {
    DeviceError::os(name, Op::Open, errno).with_detail(step)
}

impl VfioHost {
    /// The real kernel, `/sys` and `/dev`.
    pub fn system() -> VfioHost {
        VfioHost::new(Arc::new(LinuxSyscalls), Sysfs::system(), "/dev")
    }

    pub fn new(sys: Arc<dyn Syscalls>, sysfs: Sysfs, dev: impl Into<PathBuf>) -> VfioHost {
        VfioHost { sys, sysfs, dev: dev.into() }
    }

    pub fn sysfs(&self) -> &Sysfs {
        &self.sysfs
    }

    pub fn syscalls(&self) -> &Arc<dyn Syscalls> {
        &self.sys
    }

    fn open_node(&self, name: &str, path: &Path) -> Result<OwnedFd, DeviceError> {
        self.sys
            .open(path, OPEN_RDWR)
            .map_err(|errno| open_err(name, errno, format!("open {}", path.display())))
    }

    /// Opens `name` (a PCI address or an mdev UUID) through its IOMMU group, found in sysfs.
    pub fn open_group(&self, name: &str) -> Result<VfioDeviceFd, DeviceError> {
        let group = self.sysfs.iommu_group(name)?;
        self.open_group_id(group, name)
    }

    /// The legacy path: a new container with the type1v2 IOMMU, group `group` attached to
    /// it, then `VFIO_GROUP_GET_DEVICE_FD(name)`. The container and group fds live as long
    /// as the device fd. (Two devices of one group cannot be opened this way: the group
    /// node opens only once.)
    pub fn open_group_id(&self, group: u32, name: &str) -> Result<VfioDeviceFd, DeviceError> {
        check_device_name(name)?;
        self.open_container(name)?.open_device(group, name)
    }

    /// Opens `/dev/vfio/vfio` and checks it offers the type1v2 IOMMU. Several groups may
    /// join the container, the way a VMM puts every group of one VM into one container;
    /// `name` only labels the errors.
    pub fn open_container(&self, name: &str) -> Result<VfioContainer, DeviceError> {
        let sys = &*self.sys;
        let container = self.open_node(name, &self.dev.join("vfio/vfio"))?;

        // SAFETY: VFIO_GET_API_VERSION takes no argument.
        let version = unsafe { sys.ioctl(container.as_fd(), VFIO_GET_API_VERSION, IoctlArg::None) }
            .map_err(|e| open_err(name, e, "VFIO_GET_API_VERSION"))?;
        if version != VFIO_API_VERSION {
            return Err(open_err(name, Errno::EINVAL, format!("unknown VFIO API version {version}")));
        }
        let type1v2 = u64::from(VFIO_TYPE1V2_IOMMU);
        // SAFETY: VFIO_CHECK_EXTENSION takes the extension number by value.
        let has_type1v2 =
            unsafe { sys.ioctl(container.as_fd(), VFIO_CHECK_EXTENSION, IoctlArg::Value(type1v2)) }
                .map_err(|e| open_err(name, e, "VFIO_CHECK_EXTENSION(VFIO_TYPE1v2_IOMMU)"))?;
        if has_type1v2 != 1 {
            return Err(open_err(name, Errno::EOPNOTSUPP, "the container lacks VFIO_TYPE1v2_IOMMU"));
        }
        Ok(VfioContainer {
            sys: self.sys.clone(),
            dev: self.dev.clone(),
            fd: Arc::new(container),
            iommu_set: false,
        })
    }
    /// Opens `/dev/iommu`.
    pub fn open_iommufd(&self) -> Result<Arc<Iommufd>, DeviceError> {
        Iommufd::open(self.sys.clone(), &self.dev.join("iommu")).map(Arc::new)
    }

    /// Opens `name` through its cdev (`/dev/vfio/devices/vfioN`, found in sysfs).
    pub fn open_cdev(
        &self,
        name: &str,
        iommufd: &Arc<Iommufd>,
        attach: Attach,
    ) -> Result<VfioDeviceFd, DeviceError> {
        let cdev = self.sysfs.cdev_name(name)?;
        self.open_cdev_path(name, &self.dev.join("vfio/devices").join(cdev), iommufd, attach)
    }

    /// The cdev path: open the node, `VFIO_DEVICE_BIND_IOMMUFD`, prepare the page table
    /// `attach` asks for, `VFIO_DEVICE_ATTACH_IOMMUFD_PT`. The device holds the iommufd.
    pub fn open_cdev_path(
        &self,
        name: &str,
        cdev: &Path,
        iommufd: &Arc<Iommufd>,
        attach: Attach,
    ) -> Result<VfioDeviceFd, DeviceError> {
        check_device_name(name)?;
        let sys = &*self.sys;
        let device = self.open_node(name, cdev)?;

        let mut bind = DeviceBindIommufd {
            argsz: argsz::<DeviceBindIommufd>(),
            flags: 0,
            iommufd: iommufd.as_fd().as_raw_fd(),
            out_devid: 0,
            token_uuid_ptr: 0,
        };
        // SAFETY: VFIO_DEVICE_BIND_IOMMUFD takes `struct vfio_device_bind_iommufd`; without
        // VFIO_DEVICE_BIND_FLAG_TOKEN the kernel does not follow `token_uuid_ptr`.
        unsafe { ioctl_with(sys, device.as_fd(), VFIO_DEVICE_BIND_IOMMUFD, &mut bind) }
            .map_err(|e| open_err(name, e, format!("VFIO_DEVICE_BIND_IOMMUFD to {}", iommufd.label())))?;
        let dev_id = bind.out_devid;

        let (ioas_id, pt_id, dirty_tracking) = match attach {
            Attach::NewIoas => {
                let ioas = iommufd.ioas_alloc()?;
                (ioas, ioas, false)
            }
            Attach::Existing(id) => (id, id, false),
            Attach::DirtyTrackingHwpt { ioas } => {
                let ioas = match ioas {
                    Some(id) => id,
                    None => iommufd.ioas_alloc()?,
                };
                if !iommufd.hw_info(dev_id)?.dirty_tracking() {
                    return Err(open_err(
                        name,
                        Errno::EOPNOTSUPP,
                        "the IOMMU behind the device cannot track dirty pages",
                    ));
                }
                (ioas, iommufd.hwpt_alloc(dev_id, ioas, true)?, true)
            }
            Attach::SharedDirtyTrackingHwpt { ioas, hwpt } => {
                if !iommufd.hw_info(dev_id)?.dirty_tracking() {
                    return Err(open_err(
                        name,
                        Errno::EOPNOTSUPP,
                        format!("the IOMMU behind the device cannot track dirty pages on HWPT {hwpt}"),
                    ));
                }
                (ioas, hwpt, true)
            }
        };

        let mut attach_pt =
            DeviceAttachIommufdPt { argsz: argsz::<DeviceAttachIommufdPt>(), flags: 0, pt_id, pasid: 0 };
        // SAFETY: VFIO_DEVICE_ATTACH_IOMMUFD_PT takes this pointer-free struct.
        unsafe { ioctl_with(sys, device.as_fd(), VFIO_DEVICE_ATTACH_IOMMUFD_PT, &mut attach_pt) }
            .map_err(|e| open_err(name, e, format!("VFIO_DEVICE_ATTACH_IOMMUFD_PT to {pt_id}")))?;

        let binding = IommufdBinding { dev_id, ioas_id, hwpt_id: attach_pt.pt_id, dirty_tracking };
        let backing = Backing::Cdev { iommufd: iommufd.clone(), binding };
        Ok(VfioDeviceFd::new(name.to_string(), self.sys.clone(), device, backing))
    }

    /// Accepts a device fd handed over by a VMM (SCM_RIGHTS) after checking with
    /// `VFIO_DEVICE_GET_INFO` that it is one. The VMM keeps the IOMMU context.
    pub fn from_inherited(&self, name: &str, fd: OwnedFd) -> Result<VfioDeviceFd, DeviceError> {
        let device = VfioDeviceFd::new(name.to_string(), self.sys.clone(), fd, Backing::Inherited);
        device.device_info().map_err(|e| {
            DeviceError::os(name, Op::Open, e.errno)
                .with_detail("the inherited fd is not a usable VFIO device fd (VFIO_DEVICE_GET_INFO failed)")
        })?;
        Ok(device)
    }
}

/// A VFIO container (`/dev/vfio/vfio`) with the type1v2 IOMMU, shared by the IOMMU groups
/// attached to it. The IOMMU is set when the first group joins (the kernel refuses
/// `VFIO_SET_IOMMU` on a container without a group); later groups join the IOMMU already
/// set. Every device opened through it keeps the container open.
pub struct VfioContainer {
    sys: Arc<dyn Syscalls>,
    dev: PathBuf,
    fd: Arc<OwnedFd>,
    iommu_set: bool,
}

impl fmt::Debug for VfioContainer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VfioContainer")
            .field("fd", &self.fd.as_raw_fd())
            .field("iommu_set", &self.iommu_set)
            .finish()
    }
}

impl VfioContainer {
    /// Attaches group `group` (`/dev/vfio/<group>`, which must be viable) to this container,
    /// then `VFIO_GROUP_GET_DEVICE_FD(name)`. The device fd keeps the group and the
    /// container open.
    pub fn open_device(&mut self, group: u32, name: &str) -> Result<VfioDeviceFd, DeviceError> {
        check_device_name(name)?;
        let sys = &*self.sys;
        let group_path = self.dev.join(format!("vfio/{group}"));
        let group_fd = sys
            .open(&group_path, OPEN_RDWR)
            .map_err(|errno| open_err(name, errno, format!("open {}", group_path.display())))?;
        let mut status = GroupStatus { argsz: argsz::<GroupStatus>(), flags: 0 };
        // SAFETY: VFIO_GROUP_GET_STATUS takes `struct vfio_group_status`, which has no pointers.
        unsafe { ioctl_with(sys, group_fd.as_fd(), VFIO_GROUP_GET_STATUS, &mut status) }
            .map_err(|e| open_err(name, e, "VFIO_GROUP_GET_STATUS"))?;
        if status.flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(open_err(
                name,
                Errno::EINVAL,
                format!("IOMMU group {group} is not viable: bind every device of the group to a VFIO driver"),
            ));
        }

        let mut container_fd = self.fd.as_raw_fd().to_ne_bytes();
        // SAFETY: VFIO_GROUP_SET_CONTAINER reads one int (the container fd) at the pointer.
        unsafe { sys.ioctl(group_fd.as_fd(), VFIO_GROUP_SET_CONTAINER, IoctlArg::Buffer(&mut container_fd)) }
            .map_err(|e| open_err(name, e, "VFIO_GROUP_SET_CONTAINER"))?;
        if !self.iommu_set {
            let type1v2 = u64::from(VFIO_TYPE1V2_IOMMU);
            // SAFETY: VFIO_SET_IOMMU takes the IOMMU type by value.
            unsafe { sys.ioctl(self.fd.as_fd(), VFIO_SET_IOMMU, IoctlArg::Value(type1v2)) }
                .map_err(|e| open_err(name, e, "VFIO_SET_IOMMU(VFIO_TYPE1v2_IOMMU)"))?;
            self.iommu_set = true;
        }

        let mut device_name = CString::new(name)
            .map_err(|_| open_err(name, Errno::EINVAL, "device name contains NUL"))?
            .into_bytes_with_nul();
        // SAFETY: VFIO_GROUP_GET_DEVICE_FD reads a NUL-terminated string at the pointer, and
        // the buffer ends with the NUL.
        let raw = unsafe {
            sys.ioctl(group_fd.as_fd(), VFIO_GROUP_GET_DEVICE_FD, IoctlArg::Buffer(&mut device_name))
        }
        .map_err(|e| open_err(name, e, format!("VFIO_GROUP_GET_DEVICE_FD in group {group}")))?;
        // SAFETY: on success VFIO_GROUP_GET_DEVICE_FD returns a new fd that only this
        // process, and now only this `OwnedFd`, owns (the `Syscalls` contract).
        let device = unsafe { OwnedFd::from_raw_fd(raw) };
        let backing = Backing::Group { _group: group_fd, _container: self.fd.clone(), id: group };
        Ok(VfioDeviceFd::new(name.to_string(), self.sys.clone(), device, backing))
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::symlink;

    use super::*;
    use crate::device::ErrorKind;
    use crate::fsm::{Caps, State};
    use crate::vfio::OpenPath;
    use crate::vfio::fake::*;

    const UUID: &str = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001";

    fn words(values: &[u32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_ne_bytes()).collect()
    }

    fn opened_fd(calls: &[Call], wanted: &str) -> RawFd {
        calls
            .iter()
            .find_map(|c| match c {
                Call::Open { path, fd: Some(fd) } if path == Path::new(wanted) => Some(*fd),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{wanted} was not opened: {calls:?}"))
    }

    use std::os::fd::RawFd;

    /// The sequence the reference prescribes for the legacy path, byte for byte.
    #[test]
    fn the_group_path_follows_the_container_protocol() {
        let kernel =
            Arc::new(FakeKernel::with_device(FakeVfioDevice::new(Caps::MIGRATABLE[3], State::Running)));
        let host = VfioHost::new(kernel.clone(), Sysfs::at("/nonexistent"), "/dev");
        let device = host.open_group_id(12, UUID).unwrap();
        assert_eq!(device.open_path(), OpenPath::Group { group: 12 });

        let calls = kernel.calls();
        let container = opened_fd(&calls, "/dev/vfio/vfio");
        let group = opened_fd(&calls, "/dev/vfio/12");
        let mut name = UUID.as_bytes().to_vec();
        name.push(0);
        let expected = [
            Call::Open { path: "/dev/vfio/vfio".into(), fd: Some(container) },
            Call::Ioctl { fd: container, request: 0x3B64, sent: Sent::None },
            Call::Ioctl { fd: container, request: 0x3B65, sent: Sent::Value(3) },
            Call::Open { path: "/dev/vfio/12".into(), fd: Some(group) },
            Call::Ioctl { fd: group, request: 0x3B67, sent: Sent::Bytes(words(&[8, 0])) },
            Call::Ioctl { fd: group, request: 0x3B68, sent: Sent::Bytes(container.to_ne_bytes().to_vec()) },
            Call::Ioctl { fd: container, request: 0x3B66, sent: Sent::Value(3) },
            Call::Ioctl { fd: group, request: 0x3B6A, sent: Sent::Bytes(name) },
        ];
        assert_eq!(calls, expected);
        // The device fd is the one GET_DEVICE_FD returned, distinct from the others.
        let fd = device.as_fd().as_raw_fd();
        assert!(fd != container && fd != group);
        assert_eq!(device.state().unwrap(), State::Running);
    }

    /// A VMM's view: the groups of one VM in one container, whose IOMMU is set once, when
    /// the first group joins; every device keeps the shared container open.
    #[test]
    fn groups_of_one_vm_share_a_container_whose_iommu_is_set_once() {
        const SECOND: &str = "83b8f4f2-509f-382f-3c1e-e6bfe0fa2001";
        let kernel =
            Arc::new(FakeKernel::with_device(FakeVfioDevice::new(Caps::MIGRATABLE[3], State::Running)));
        let host = VfioHost::new(kernel.clone(), Sysfs::at("/nonexistent"), "/dev");
        let mut container = host.open_container("vm1").unwrap();
        let first = container.open_device(12, UUID).unwrap();
        let second = container.open_device(13, SECOND).unwrap();
        assert_eq!(first.open_path(), OpenPath::Group { group: 12 });
        assert_eq!(second.open_path(), OpenPath::Group { group: 13 });

        let calls = kernel.calls();
        let shared = opened_fd(&calls, "/dev/vfio/vfio");
        let opens = calls.iter().filter(|c| matches!(c, Call::Open { .. })).count();
        assert_eq!(opens, 3, "one container, two groups: {calls:?}");
        let joined: Vec<_> = calls
            .iter()
            .filter_map(|c| match c {
                Call::Ioctl { fd, request: 0x3B68, sent: Sent::Bytes(b) } => Some((*fd, b.clone())),
                _ => None,
            })
            .collect();
        let groups = [opened_fd(&calls, "/dev/vfio/12"), opened_fd(&calls, "/dev/vfio/13")];
        assert_eq!(
            joined,
            groups.map(|group| (group, shared.to_ne_bytes().to_vec())),
            "both groups join the one container"
        );
        let set_iommu: Vec<_> =
            calls.iter().filter(|c| matches!(c, Call::Ioctl { request: 0x3B66, .. })).collect();
        assert_eq!(set_iommu, [&Call::Ioctl { fd: shared, request: 0x3B66, sent: Sent::Value(3) }]);

        // The devices outlive the container handle they came from.
        drop(container);
        assert_eq!(second.state().unwrap(), State::Running);
    }

    #[test]
    fn a_group_that_is_not_viable_or_a_container_without_type1v2_is_refused() {
        let kernel = Arc::new(FakeKernel::new(|call| match call {
            Syscall::Ioctl { request: VFIO_CHECK_EXTENSION, .. } => Ok(1),
            Syscall::Ioctl { request: VFIO_GROUP_GET_STATUS, .. } => Ok(0), // flags stay 0
            _ => Ok(0),
        }));
        let host = VfioHost::new(kernel.clone(), Sysfs::at("/nonexistent"), "/dev");
        let err = host.open_group_id(7, UUID).unwrap_err();
        assert_eq!((err.op, err.kind), (Op::Open, ErrorKind::InvalidRequest));
        assert!(err.to_string().contains("group 7 is not viable"), "{err}");
        assert!(kernel.ioctls().iter().all(|c| c.request() != Some(VFIO_GROUP_GET_DEVICE_FD)));

        let kernel = Arc::new(FakeKernel::new(|_| Ok(0)));
        let host = VfioHost::new(kernel.clone(), Sysfs::at("/nonexistent"), "/dev");
        let err = host.open_group_id(7, UUID).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Unsupported);
        assert!(err.to_string().contains("VFIO_TYPE1v2_IOMMU"), "{err}");
    }

    #[test]
    fn a_missing_group_node_is_not_found_and_names_the_path() {
        let mut model = FakeVfioDevice::new(Caps::MIGRATABLE[0], State::Running);
        let kernel = Arc::new(FakeKernel::new(move |call| match call {
            Syscall::Open { path } if path == Path::new("/dev/vfio/4242") => Err(Errno::ENOENT),
            other => model.answer(other),
        }));
        let host = VfioHost::new(kernel.clone(), Sysfs::at("/nonexistent"), "/dev");
        let err = host.open_group_id(4242, UUID).unwrap_err();
        assert_eq!((err.op, err.kind), (Op::Open, ErrorKind::NotFound));
        assert!(err.to_string().contains("/dev/vfio/4242"), "{err}");
        assert_eq!(kernel.ioctls().len(), 2, "only the container was asked");

        // The real kernel, against an empty /dev: the container node is the first missing.
        let dev = tempfile::tempdir().unwrap();
        let host = VfioHost::new(Arc::new(LinuxSyscalls), Sysfs::at("/nonexistent"), dev.path());
        let err = host.open_group_id(3, UUID).unwrap_err();
        assert_eq!(err.kind, ErrorKind::NotFound);
        assert!(err.to_string().contains("vfio/vfio"), "{err}");
        // And a device sysfs does not know.
        let err = host.open_group(UUID).unwrap_err();
        assert_eq!(err.kind, ErrorKind::NotFound);
        assert!(err.to_string().contains(UUID), "{err}");
    }

    /// A kernel with iommufd: BIND answers dev_id 3, IOAS_ALLOC ioas 5, HW_INFO the dirty
    /// capability (when `dirty`), HWPT_ALLOC hwpt 11, ATTACH to an IOAS its automatic hwpt 9.
    fn iommufd_kernel(dirty: bool) -> Arc<FakeKernel> {
        Arc::new(FakeKernel::new(move |call| match call {
            Syscall::Open { .. } => Ok(0),
            Syscall::Ioctl { request: VFIO_DEVICE_BIND_IOMMUFD, arg: IoctlArg::Buffer(b), .. } => {
                put_u32(b, 12, 3);
                Ok(0)
            }
            Syscall::Ioctl { request: IOMMU_IOAS_ALLOC, arg: IoctlArg::Buffer(b), .. } => {
                put_u32(b, 8, 5);
                Ok(0)
            }
            Syscall::Ioctl { request: IOMMU_GET_HW_INFO, arg: IoctlArg::Buffer(b), .. } => {
                put_u64(b, 32, u64::from(dirty));
                Ok(0)
            }
            Syscall::Ioctl { request: IOMMU_HWPT_ALLOC, arg: IoctlArg::Buffer(b), .. } => {
                put_u32(b, 16, 11);
                Ok(0)
            }
            Syscall::Ioctl { request: VFIO_DEVICE_ATTACH_IOMMUFD_PT, arg: IoctlArg::Buffer(b), .. } => {
                if u32_at(b, 8) == 5 {
                    put_u32(b, 8, 9);
                }
                Ok(0)
            }
            Syscall::Ioctl { request: IOMMU_HWPT_SET_DIRTY_TRACKING, .. } => Ok(0),
            _ => Err(Errno::ENOTTY),
        }))
    }

    fn fake_sys_with_cdev() -> (tempfile::TempDir, Sysfs) {
        let dir = tempfile::tempdir().unwrap();
        let mdev = dir.path().join("bus/mdev/devices").join(UUID);
        fs::create_dir_all(mdev.join("vfio-dev/vfio4")).unwrap();
        symlink("../../../kernel/iommu_groups/12", mdev.join("iommu_group")).unwrap();
        let sys = Sysfs::at(dir.path());
        (dir, sys)
    }

    #[test]
    fn the_cdev_path_binds_allocates_an_ioas_and_attaches() {
        let kernel = iommufd_kernel(false);
        let (_dir, sys) = fake_sys_with_cdev();
        let host = VfioHost::new(kernel.clone(), sys, "/dev");
        let iommufd = host.open_iommufd().unwrap();
        let device = host.open_cdev(UUID, &iommufd, Attach::NewIoas).unwrap();
        let binding = IommufdBinding { dev_id: 3, ioas_id: 5, hwpt_id: 9, dirty_tracking: false };
        assert_eq!(device.open_path(), OpenPath::Cdev(binding));
        assert_eq!(device.iommufd().unwrap().1, binding);

        let calls = kernel.calls();
        let iommu = opened_fd(&calls, "/dev/iommu");
        let cdev = opened_fd(&calls, "/dev/vfio/devices/vfio4");
        let mut bind = words(&[24, 0, iommu as u32, 0]);
        bind.extend([0; 8]);
        let expected = [
            Call::Open { path: "/dev/iommu".into(), fd: Some(iommu) },
            Call::Open { path: "/dev/vfio/devices/vfio4".into(), fd: Some(cdev) },
            Call::Ioctl { fd: cdev, request: 0x3B76, sent: Sent::Bytes(bind) },
            Call::Ioctl { fd: iommu, request: 0x3B81, sent: Sent::Bytes(words(&[12, 0, 0])) },
            Call::Ioctl { fd: cdev, request: 0x3B77, sent: Sent::Bytes(words(&[16, 0, 5, 0])) },
        ];
        assert_eq!(calls, expected);

        // An existing IOAS is attached as is, with no allocation.
        kernel.clear();
        let shared = host.open_cdev_path(
            "second",
            Path::new("/dev/vfio/devices/vfio5"),
            &iommufd,
            Attach::Existing(5),
        );
        assert_eq!(shared.unwrap().iommufd().unwrap().1.ioas_id, 5);
        assert!(kernel.ioctls().iter().all(|c| c.request() != Some(IOMMU_IOAS_ALLOC)));
    }

    #[test]
    fn the_cdev_path_can_attach_a_dirty_tracking_hwpt() {
        let kernel = iommufd_kernel(true);
        let host = VfioHost::new(kernel.clone(), Sysfs::at("/nonexistent"), "/dev");
        let iommufd = host.open_iommufd().unwrap();
        let cdev = Path::new("/dev/vfio/devices/vfio0");
        let device = host
            .open_cdev_path("0000:3b:00.2", cdev, &iommufd, Attach::DirtyTrackingHwpt { ioas: None })
            .unwrap();
        let (fd, binding) = device.iommufd().unwrap();
        assert_eq!(binding, IommufdBinding { dev_id: 3, ioas_id: 5, hwpt_id: 11, dirty_tracking: true });
        fd.set_dirty_tracking(binding.hwpt_id, true).unwrap();

        let requests: Vec<_> = kernel.ioctls().iter().map(|c| c.request().unwrap()).collect();
        assert_eq!(requests, [0x3B76, 0x3B81, 0x3B8A, 0x3B89, 0x3B77, 0x3B8B]);
        let calls = kernel.ioctls();
        let alloc = calls[3].bytes();
        assert_eq!(
            (u32_at(alloc, 4), u32_at(alloc, 8), u32_at(alloc, 12)),
            (2, 3, 5),
            "DIRTY_TRACKING, dev 3, ioas 5"
        );
        assert_eq!(calls[4].bytes(), words(&[16, 0, 11, 0]).as_slice(), "attach to the new hwpt");
    }

    #[test]
    fn an_iommu_without_dirty_tracking_gets_no_hwpt() {
        let kernel = iommufd_kernel(false);
        let host = VfioHost::new(kernel.clone(), Sysfs::at("/nonexistent"), "/dev");
        let iommufd = host.open_iommufd().unwrap();
        let cdev = Path::new("/dev/vfio/devices/vfio0");
        let err = host
            .open_cdev_path("0000:3b:00.2", cdev, &iommufd, Attach::DirtyTrackingHwpt { ioas: Some(5) })
            .unwrap_err();
        assert_eq!((err.op, err.kind), (Op::Open, ErrorKind::Unsupported));
        let requests: Vec<_> = kernel.ioctls().iter().map(|c| c.request().unwrap()).collect();
        assert_eq!(requests, [0x3B76, 0x3B8A], "bind, hw info, then stop");
    }

    #[test]
    fn an_inherited_fd_is_accepted_only_if_it_answers_get_info() {
        let kernel =
            Arc::new(FakeKernel::with_device(FakeVfioDevice::new(Caps::MIGRATABLE[1], State::Running)));
        let host = VfioHost::new(kernel.clone(), Sysfs::at("/nonexistent"), "/dev");
        let fd =
            nix::fcntl::open("/dev/null", nix::fcntl::OFlag::O_RDWR, nix::sys::stat::Mode::empty()).unwrap();
        let raw = fd.as_raw_fd();
        let device = host.from_inherited("vm1-nic", fd).unwrap();
        assert_eq!(device.open_path(), OpenPath::Inherited);
        assert_eq!(device.as_fd().as_raw_fd(), raw);
        assert_eq!(
            kernel.ioctls(),
            [Call::Ioctl {
                fd: raw,
                request: 0x3B6B,
                sent: Sent::Bytes([words(&[24]), vec![0; 20]].concat())
            }]
        );

        let not_vfio = Arc::new(FakeKernel::new(|_| Err(Errno::ENOTTY)));
        let host = VfioHost::new(not_vfio, Sysfs::at("/nonexistent"), "/dev");
        let fd =
            nix::fcntl::open("/dev/null", nix::fcntl::OFlag::O_RDWR, nix::sys::stat::Mode::empty()).unwrap();
        let err = host.from_inherited("vm1-nic", fd).unwrap_err();
        assert_eq!(err.op, Op::Open);
        assert!(err.to_string().contains("not a usable VFIO device fd"), "{err}");
    }
}
