//! The real VFIO device backend: [`VfioDevice`] is a [`VfioDeviceFd`] plus the identity
//! the peer compares, behind the [`MigrationDevice`] trait.
//!
//! All checks the trait demands (FSM refusal before the kernel, state after a failed SET,
//! bitmap sizing) live in [`VfioDeviceFd`]; this type only names the device and forwards.
//! Operations outside the trait (BAR access, low power, PRECOPY_INFOv2 opt-in) are
//! reached through [`VfioDevice::handle`]; a cdev device's dirty-tracking HWPT through
//! [`MigrationDevice::dirty_tracking_hwpt`].

use std::os::fd::OwnedFd;
use std::sync::Arc;

use super::{DataFd, DeviceError, DeviceIdentity, IovaRange, MigrationDevice, PrecopyInfo};
use crate::dirty::{HwptDirty, IommufdHwpt};
use crate::fsm::{Caps, State};
use crate::vfio::sysfs::{link_basename, read_attribute};
use crate::vfio::{Attach, Bus, Iommufd, Sysfs, VfioDeviceFd, VfioHost};

#[derive(Debug)]
pub struct VfioDevice {
    handle: VfioDeviceFd,
    identity: DeviceIdentity,
}

impl VfioDevice {
    /// Opens `name` (a PCI address or an mdev UUID) through its IOMMU group; the identity
    /// comes from sysfs. This is the path kernels without iommufd (Debian 6.12) offer.
    pub fn open_group(host: &VfioHost, name: &str) -> Result<VfioDevice, DeviceError> {
        let identity = sysfs_identity(host.sysfs(), name)?;
        Ok(VfioDevice { handle: host.open_group(name)?, identity })
    }

    /// Opens `name` through its cdev, bound to `iommufd` and attached as `attach` says.
    pub fn open_cdev(
        host: &VfioHost,
        name: &str,
        iommufd: &Arc<Iommufd>,
        attach: Attach,
    ) -> Result<VfioDevice, DeviceError> {
        let identity = sysfs_identity(host.sysfs(), name)?;
        Ok(VfioDevice { handle: host.open_cdev(name, iommufd, attach)?, identity })
    }

    /// Adopts a device fd handed over by a VMM; the VMM, which knows the device, supplies
    /// its identity.
    pub fn from_inherited(
        host: &VfioHost,
        name: &str,
        fd: OwnedFd,
        identity: DeviceIdentity,
    ) -> Result<VfioDevice, DeviceError> {
        Ok(VfioDevice { handle: host.from_inherited(name, fd)?, identity })
    }

    pub fn new(handle: VfioDeviceFd, identity: DeviceIdentity) -> VfioDevice {
        VfioDevice { handle, identity }
    }

    /// The device handle, for operations outside [`MigrationDevice`].
    pub fn handle(&self) -> &VfioDeviceFd {
        &self.handle
    }
}

/// A device's identity from sysfs: the bound driver (`<device>/driver` link basename) and
/// the model: `vendor:device` for PCI (`15b3:101e`), the mdev type for mdevs (`mtty-1`).
pub fn sysfs_identity(sysfs: &Sysfs, name: &str) -> Result<DeviceIdentity, DeviceError> {
    let (bus, dir) = sysfs.device_dir(name)?;
    let driver = sysfs.driver(name)?;
    let model = match bus {
        Bus::Mdev => link_basename(name, &dir.join("mdev_type"))?,
        Bus::Pci => {
            let id = |attr: &str| -> Result<String, DeviceError> {
                let raw = read_attribute(name, &dir.join(attr))?;
                Ok(raw.trim_start_matches("0x").to_ascii_lowercase())
            };
            format!("{}:{}", id("vendor")?, id("device")?)
        }
    };
    Ok(DeviceIdentity { driver, model })
}

impl MigrationDevice for VfioDevice {
    fn name(&self) -> &str {
        self.handle.name()
    }

    fn identity(&self) -> DeviceIdentity {
        self.identity.clone()
    }

    fn caps(&self) -> Result<Caps, DeviceError> {
        self.handle.migration_caps()
    }

    fn state(&self) -> Result<State, DeviceError> {
        self.handle.state()
    }

    fn set_state(&self, target: State) -> Result<Option<DataFd>, DeviceError> {
        self.handle.set_state(target)
    }

    fn data_size(&self) -> Result<u64, DeviceError> {
        self.handle.data_size()
    }

    fn precopy_info(&self, data_fd: &DataFd) -> Result<PrecopyInfo, DeviceError> {
        self.handle.precopy_info(data_fd)
    }

    fn dma_logging_supported(&self) -> Result<bool, DeviceError> {
        self.handle.dma_logging_supported()
    }

    fn dma_logging_start(&self, ranges: &[IovaRange], page_size: u64) -> Result<u64, DeviceError> {
        self.handle.dma_logging_start(ranges, page_size)
    }

    fn dma_logging_stop(&self) -> Result<(), DeviceError> {
        self.handle.dma_logging_stop()
    }

    fn dma_logging_report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), DeviceError> {
        self.handle.dma_logging_report(iova, length, page_size, bitmap)
    }

    fn reset(&self) -> Result<(), DeviceError> {
        self.handle.reset()
    }

    /// The HWPT of a cdev-opened device, when it was allocated with dirty tracking
    /// ([`Attach::DirtyTrackingHwpt`]); automatic HWPTs have no dirty ops.
    fn dirty_tracking_hwpt(&self) -> Option<Arc<dyn HwptDirty>> {
        let (iommufd, binding) = self.handle.iommufd()?;
        binding
            .dirty_tracking
            .then(|| Arc::new(IommufdHwpt::new(Arc::clone(iommufd), binding.hwpt_id)) as Arc<dyn HwptDirty>)
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::io::Read;
    use std::os::unix::fs::symlink;
    use std::path::Path;

    use nix::errno::Errno;

    use super::*;
    use crate::device::{Direction, ErrorKind, Op};
    use crate::vfio::fake::{Call, FakeKernel, FakeVfioDevice};
    use crate::vfio::uapi::{
        VFIO_DEVICE_FEATURE, VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, VFIO_DEVICE_FEATURE_SET,
    };

    const MTTY: &str = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001";
    const NIC: &str = "0000:3b:00.2";

    /// A `/sys` with one mtty mdev (group 12) and one mlx5 VF (group 42).
    fn fake_sys() -> (tempfile::TempDir, Sysfs) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let root = root.as_path();
        let mdev = root.join("bus/mdev/devices").join(MTTY);
        fs::create_dir_all(&mdev).unwrap();
        symlink("../../../kernel/iommu_groups/12", mdev.join("iommu_group")).unwrap();
        symlink("../../../bus/mdev/drivers/mtty", mdev.join("driver")).unwrap();
        symlink("../../../devices/virtual/mtty/mtty/mdev_supported_types/mtty-1", mdev.join("mdev_type"))
            .unwrap();
        let pci = root.join("bus/pci/devices").join(NIC);
        fs::create_dir_all(&pci).unwrap();
        symlink("../../../kernel/iommu_groups/42", pci.join("iommu_group")).unwrap();
        symlink("../../../bus/pci/drivers/mlx5_vfio_pci", pci.join("driver")).unwrap();
        fs::write(pci.join("vendor"), "0x15B3\n").unwrap();
        fs::write(pci.join("device"), "0x101e\n").unwrap();
        (dir, Sysfs::at(root))
    }

    #[test]
    fn identity_comes_from_the_driver_link_and_the_model() {
        let (_dir, sys) = fake_sys();
        let mtty = sysfs_identity(&sys, MTTY).unwrap();
        assert_eq!(mtty, DeviceIdentity { driver: "mtty".into(), model: "mtty-1".into() });
        let nic = sysfs_identity(&sys, NIC).unwrap();
        assert_eq!(nic, DeviceIdentity { driver: "mlx5_vfio_pci".into(), model: "15b3:101e".into() });
    }

    /// The group path the real-kernel test takes for mtty, through the fake kernel; then the
    /// trait drives a migration arc and reads the session fd.
    #[test]
    fn an_mtty_opened_by_uuid_migrates_through_the_trait() {
        let (_dir, sys) = fake_sys();
        let mut model = FakeVfioDevice::new(Caps::MIGRATABLE[3], State::Running);
        model.stream = b"mtty-image".to_vec();
        let kernel = Arc::new(FakeKernel::with_device(model));
        let host = VfioHost::new(kernel.clone(), sys, "/dev");
        let device = VfioDevice::open_group(&host, MTTY).unwrap();
        assert_eq!(device.name(), MTTY);
        assert_eq!(device.identity().model, "mtty-1");
        assert_eq!(device.handle().open_path(), crate::vfio::OpenPath::Group { group: 12 });
        let opens: Vec<_> = kernel
            .calls()
            .into_iter()
            .filter_map(|c| if let Call::Open { path, .. } = c { Some(path) } else { None })
            .collect();
        assert_eq!(opens, [Path::new("/dev/vfio/vfio"), Path::new("/dev/vfio/12")]);

        assert_eq!(device.caps().unwrap(), Caps::MIGRATABLE[3]);
        let data_fd =
            device.set_state(State::StopCopy).unwrap().expect("RUNNING -> STOP_COPY opens a session");
        assert_eq!(data_fd.direction(), Direction::Saving);
        let mut stream = Vec::new();
        (&data_fd).read_to_end(&mut stream).unwrap();
        assert_eq!(stream, b"mtty-image");
        assert_eq!(device.state().unwrap(), State::StopCopy);
        assert_eq!(device.data_size().unwrap(), 10);
    }

    #[test]
    fn blocked_arcs_never_reach_the_kernel_through_the_trait() {
        let kernel =
            Arc::new(FakeKernel::with_device(FakeVfioDevice::new(Caps::MIGRATABLE[3], State::StopCopy)));
        let host = VfioHost::new(kernel.clone(), Sysfs::at("/nonexistent"), "/dev");
        let fd =
            nix::fcntl::open("/dev/null", nix::fcntl::OFlag::O_RDWR, nix::sys::stat::Mode::empty()).unwrap();
        let identity = DeviceIdentity { driver: "mtty".into(), model: "mtty-1".into() };
        let device = VfioDevice::from_inherited(&host, "vm1-uart", fd, identity.clone()).unwrap();
        assert_eq!(device.identity(), identity);
        let _ = device.caps().unwrap();
        kernel.clear();

        for target in [State::PreCopy, State::PreCopyP2p] {
            let err = device.set_state(target).unwrap_err();
            assert_eq!(err.errno, Errno::EINVAL);
            assert_eq!(err.kind, ErrorKind::InvalidRequest);
            assert_eq!(err.op, Op::SetState(target));
            assert_eq!(err.state_after, Some(State::StopCopy));
            assert!(err.to_string().contains("blocked"), "{err}");
        }
        let set_flags = VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE;
        let calls = kernel.ioctls();
        assert!(calls.iter().all(|c| c.request() == Some(VFIO_DEVICE_FEATURE)), "{calls:?}");
        assert!(
            calls.iter().all(|c| c.feature_flags() != Some(set_flags)),
            "a SET reached the kernel: {calls:?}"
        );
        assert_eq!(calls.len(), 2, "one GET of the current state per request, nothing else");
    }

    #[test]
    fn an_unknown_device_name_is_not_found() {
        let (_dir, sys) = fake_sys();
        let host = VfioHost::new(Arc::new(crate::vfio::LinuxSyscalls), sys, "/dev");
        let err = VfioDevice::open_group(&host, "6c1c8a7e-0000-4000-8000-000000000000").unwrap_err();
        assert_eq!(err.kind, ErrorKind::NotFound);
        assert_eq!(err.op, Op::Open);
        assert!(err.to_string().contains("6c1c8a7e-0000-4000-8000-000000000000"), "{err}");
    }
}
