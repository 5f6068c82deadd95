//! Where sysfs says a VFIO device lives: its bus, IOMMU group, cdev node and driver.
//!
//! The root is configurable so tests can build a fake `/sys` tree in a temporary
//! directory; nothing here needs privileges.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use nix::errno::Errno;

use crate::device::{DeviceError, Op};

/// The bus a VFIO device sits on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bus {
    /// A PCI function (`/sys/bus/pci/devices/<domain:bus:dev.fn>`).
    Pci,
    /// A mediated device (`/sys/bus/mdev/devices/<uuid>`), e.g. mtty.
    Mdev,
}

impl Bus {
    fn dir_name(self) -> &'static str {
        match self {
            Bus::Pci => "pci",
            Bus::Mdev => "mdev",
        }
    }
}

/// A sysfs tree (`/sys` on a real host).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sysfs {
    root: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Sysfs {
        Sysfs::system()
    }
}

impl Sysfs {
    pub fn system() -> Sysfs {
        Sysfs::at("/sys")
    }

    pub fn at(root: impl Into<PathBuf>) -> Sysfs {
        Sysfs { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The device's sysfs directory; mdevs are looked up first (their names are UUIDs,
    /// which never collide with PCI addresses).
    pub fn device_dir(&self, name: &str) -> Result<(Bus, PathBuf), DeviceError> {
        check_device_name(name)?;
        let candidates = [Bus::Mdev, Bus::Pci].map(|bus| (bus, self.bus_dir(bus).join(name)));
        for (bus, dir) in &candidates {
            if dir.exists() {
                return Ok((*bus, dir.clone()));
            }
        }
        Err(DeviceError::os(name, Op::Open, Errno::ENOENT).with_detail(format!(
            "no such VFIO device: neither {} nor {} exists",
            candidates[0].1.display(),
            candidates[1].1.display()
        )))
    }

    /// The IOMMU group number (`<device>/iommu_group` links to `.../iommu_groups/<N>`).
    pub fn iommu_group(&self, name: &str) -> Result<u32, DeviceError> {
        let (_, dir) = self.device_dir(name)?;
        let link = dir.join("iommu_group");
        let group = link_basename(name, &link)?;
        group.parse().map_err(|_| {
            DeviceError::os(name, Op::Open, Errno::EINVAL)
                .with_detail(format!("{} does not name a group number: {group}", link.display()))
        })
    }

    /// The device's VFIO cdev node name (`vfioN`, from `<device>/vfio-dev/`), present when
    /// the kernel has `CONFIG_VFIO_DEVICE_CDEV`.
    pub fn cdev_name(&self, name: &str) -> Result<String, DeviceError> {
        let (_, dir) = self.device_dir(name)?;
        let vfio_dev = dir.join("vfio-dev");
        let entries = fs::read_dir(&vfio_dev).map_err(|e| io_error(name, &vfio_dev, &e))?;
        for entry in entries {
            let entry = entry.map_err(|e| io_error(name, &vfio_dev, &e))?;
            let file_name = entry.file_name().to_string_lossy().into_owned();
            if file_name.starts_with("vfio") {
                return Ok(file_name);
            }
        }
        Err(DeviceError::os(name, Op::Open, Errno::ENOENT)
            .with_detail(format!("{} holds no vfioN entry", vfio_dev.display())))
    }

    /// The name of the driver bound to the device (`<device>/driver` link basename).
    pub fn driver(&self, name: &str) -> Result<String, DeviceError> {
        let (_, dir) = self.device_dir(name)?;
        link_basename(name, &dir.join("driver"))
    }

    fn bus_dir(&self, bus: Bus) -> PathBuf {
        self.root.join("bus").join(bus.dir_name()).join("devices")
    }
}

/// The last component of where a sysfs link points.
pub fn link_basename(device: &str, link: &Path) -> Result<String, DeviceError> {
    let target = fs::read_link(link).map_err(|e| io_error(device, link, &e))?;
    target.file_name().map(|n| n.to_string_lossy().into_owned()).ok_or_else(|| {
        DeviceError::os(device, Op::Open, Errno::EINVAL).with_detail(format!(
            "{} points to {}, which has no name",
            link.display(),
            target.display()
        ))
    })
}

/// A sysfs attribute's content without the trailing newline.
pub fn read_attribute(device: &str, path: &Path) -> Result<String, DeviceError> {
    fs::read_to_string(path).map(|s| s.trim().to_string()).map_err(|e| io_error(device, path, &e))
}

/// Device names become path components and a C string: refuse anything that could escape
/// the sysfs directory or be truncated.
pub(crate) fn check_device_name(name: &str) -> Result<(), DeviceError> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
        return Err(DeviceError::os(name, Op::Open, Errno::EINVAL)
            .with_detail("not a device name (a PCI address or an mdev UUID)"));
    }
    Ok(())
}

pub(crate) fn io_error(device: &str, path: &Path, err: &io::Error) -> DeviceError {
    let errno = err.raw_os_error().map_or(Errno::EIO, Errno::from_raw);
    DeviceError::os(device, Op::Open, errno).with_detail(format!("{}: {err}", path.display()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;
    use crate::device::ErrorKind;

    fn fake_sys() -> (tempfile::TempDir, Sysfs) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let root = root.as_path();
        let mdev = root.join("bus/mdev/devices/83b8f4f2-509f-382f-3c1e-e6bfe0fa1001");
        fs::create_dir_all(&mdev).unwrap();
        fs::create_dir_all(root.join("kernel/iommu_groups/17")).unwrap();
        symlink(root.join("kernel/iommu_groups/17"), mdev.join("iommu_group")).unwrap();
        let pci = root.join("bus/pci/devices/0000:3b:00.2");
        fs::create_dir_all(pci.join("vfio-dev/vfio4")).unwrap();
        symlink("../../../kernel/iommu_groups/42", pci.join("iommu_group")).unwrap();
        symlink("../../../bus/pci/drivers/mlx5_vfio_pci", pci.join("driver")).unwrap();
        (dir, Sysfs::at(root))
    }

    #[test]
    fn resolves_groups_of_mdevs_and_pci_functions() {
        let (_dir, sys) = fake_sys();
        assert_eq!(sys.iommu_group("83b8f4f2-509f-382f-3c1e-e6bfe0fa1001").unwrap(), 17);
        assert_eq!(sys.iommu_group("0000:3b:00.2").unwrap(), 42);
        assert_eq!(sys.device_dir("0000:3b:00.2").unwrap().0, Bus::Pci);
        assert_eq!(sys.cdev_name("0000:3b:00.2").unwrap(), "vfio4");
        assert_eq!(sys.driver("0000:3b:00.2").unwrap(), "mlx5_vfio_pci");
    }

    #[test]
    fn a_missing_device_is_not_found_and_names_both_places() {
        let (_dir, sys) = fake_sys();
        let err = sys.iommu_group("0000:00:1f.7").unwrap_err();
        assert_eq!(err.kind, ErrorKind::NotFound);
        assert_eq!(err.op, Op::Open);
        let text = err.to_string();
        assert!(text.contains("0000:00:1f.7") && text.contains("bus/mdev/devices"), "{text}");
        // An mdev without a cdev (kernel without CONFIG_VFIO_DEVICE_CDEV).
        let err = sys.cdev_name("83b8f4f2-509f-382f-3c1e-e6bfe0fa1001").unwrap_err();
        assert_eq!(err.kind, ErrorKind::NotFound);
        assert!(err.to_string().contains("vfio-dev"), "{err}");
    }

    #[test]
    fn names_that_escape_sysfs_are_refused() {
        let (_dir, sys) = fake_sys();
        for bad in ["", ".", "..", "../../etc", "a/b", "x\0y"] {
            let err = sys.device_dir(bad).unwrap_err();
            assert_eq!(err.kind, ErrorKind::InvalidRequest, "{bad:?}");
        }
    }
}
