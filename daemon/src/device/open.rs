//! How a device comes to be held by the daemon. There are three ways in, one function each,
//! and every caller (configuration at start, `RegisterDevice`, the fd handoff socket) goes
//! through them:
//! - [`open_real_device`]: the daemon opens a VFIO device itself (group/container or
//!   cdev/iommufd);
//! - [`open_handed_over_device`]: a VMM handed over the device fd it already owns;
//! - [`open_sim_device`]: the simulator.
//!
//! [`DeviceSummary`] is what the daemon reports about a device it holds (logs at start,
//! the control API).

use std::fmt;
use std::fs;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::errno::Errno;

use super::sim::{SimDevice, SimIommu, SimSpec, SimSpecError};
use super::vfio::{VfioDevice, sysfs_identity};
use super::{DataFd, DeviceError, DeviceIdentity, IovaRange, MigrationDevice, Op, PrecopyInfo};
use crate::config::DeviceConfig;
use crate::fsm::{Caps, State};
use crate::registry::Backend;
use crate::vfio::sysfs::link_basename;
use crate::vfio::{Attach, VfioHost};

/// Where a real VFIO device is opened from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RealDevice {
    /// Legacy group/container path, by sysfs name (PCI BDF or mdev UUID).
    Group { sysfs_device: String },
    /// `/dev/vfio/devices/vfioN`, bound through `/dev/iommu`.
    Cdev { path: PathBuf },
}

impl RealDevice {
    pub fn backend(&self) -> Backend {
        match self {
            RealDevice::Group { .. } => Backend::VfioGroup,
            RealDevice::Cdev { .. } => Backend::VfioCdev,
        }
    }
}

impl fmt::Display for RealDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RealDevice::Group { sysfs_device } => write!(f, "vfio-group {sysfs_device}"),
            RealDevice::Cdev { path } => write!(f, "vfio-cdev {}", path.display()),
        }
    }
}

/// A device the daemon holds, and how it came to hold it.
#[derive(Debug)]
pub struct OpenedDevice {
    pub device: Arc<dyn MigrationDevice>,
    pub backend: Backend,
}

/// Errors of a lookup done by another name (the sysfs name) still name the device the
/// way the operator does.
fn as_named(name: &str, looked_up: &str) -> impl FnOnce(DeviceError) -> DeviceError {
    let shown = format!("{name} ({looked_up})");
    move |mut e| {
        e.device = shown;
        e
    }
}

/// Opens a real VFIO device by path: the single place where the daemon opens a device
/// node itself. A cdev device gets a fresh iommufd and IOAS of its own: the daemon maps no
/// guest memory, it only drives the migration uAPI.
pub fn open_real_device(name: &str, source: &RealDevice) -> Result<Arc<dyn MigrationDevice>, DeviceError> {
    let host = VfioHost::system();
    let device = match source {
        RealDevice::Group { sysfs_device } => {
            let named = || as_named(name, sysfs_device);
            let identity = sysfs_identity(host.sysfs(), sysfs_device).map_err(named())?;
            let handle = host.open_group(sysfs_device).map_err(named())?.renamed(name);
            VfioDevice::new(handle, identity)
        }
        RealDevice::Cdev { path } => {
            fs::metadata(path).map_err(|e| io_open_error(name, &e, format!("{}", path.display())))?;
            let sysfs_name = cdev_sysfs_name(&host, name, path)?;
            let identity = sysfs_identity(host.sysfs(), &sysfs_name).map_err(as_named(name, &sysfs_name))?;
            let iommufd = host.open_iommufd()?;
            VfioDevice::new(host.open_cdev_path(name, path, &iommufd, Attach::NewIoas)?, identity)
        }
    };
    Ok(Arc::new(device))
}

fn io_open_error(name: &str, e: &std::io::Error, what: String) -> DeviceError {
    DeviceError::os(name, Op::Open, Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))).with_detail(what)
}

/// The sysfs name (PCI address, mdev UUID) behind `/dev/vfio/devices/vfioN`:
/// `/sys/class/vfio-dev/vfioN/device` links to it.
fn cdev_sysfs_name(host: &VfioHost, name: &str, cdev: &Path) -> Result<String, DeviceError> {
    let node = cdev.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let link = host.sysfs().root().join("class/vfio-dev").join(&node).join("device");
    link_basename(name, &link)
}

/// Creates a simulated device on the daemon's simulated IOMMU `iommu`: the single place
/// where the simulator is instantiated.
pub fn open_sim_device(
    spec: SimSpec,
    iommu: &Arc<SimIommu>,
) -> Result<Arc<dyn MigrationDevice>, DeviceError> {
    let name = spec.name.clone();
    match SimDevice::with_iommu(spec, iommu) {
        Ok(device) => Ok(Arc::new(device)),
        Err(SimSpecError::ArcLog { path, source, .. }) => {
            Err(io_open_error(&name, &source, format!("arc log {}", path.display())))
        }
        Err(e) => Err(DeviceError::os(&name, Op::Open, Errno::EINVAL).with_detail(e.to_string())),
    }
}

/// Refuses a simulated device whose state is larger than `max_state_size`
/// (`[simulator] max_state_size`): the simulator holds the whole state in memory, so an
/// unbounded size from a socket would let any client exhaust the daemon's memory.
pub fn check_sim_state_size(spec: &SimSpec, max_state_size: u64) -> Result<(), DeviceError> {
    if spec.state_size > max_state_size {
        return Err(DeviceError::os(&spec.name, Op::Open, Errno::EFBIG).with_detail(format!(
            "simulated state_size {} bytes is more than simulator.max_state_size ({max_state_size} bytes)",
            spec.state_size
        )));
    }
    Ok(())
}

/// Refuses a simulated device that arrives from outside the daemon's configuration
/// (RegisterDevice, the handoff socket) unless `[simulator] allow_remote` is set, and
/// bounds its state size.
pub fn check_remote_sim(
    spec: &SimSpec,
    simulator: &crate::config::SimulatorConfig,
    via: &str,
) -> Result<(), DeviceError> {
    if !simulator.allow_remote {
        return Err(DeviceError::os(&spec.name, Op::Open, Errno::EPERM).with_detail(format!(
            "simulated devices are not accepted over {via} (set `[simulator] allow_remote = true` in \
             the daemon's configuration for tests and demos)"
        )));
    }
    if spec.arc_log.is_some() || !spec.faults.is_empty() {
        return Err(DeviceError::os(&spec.name, Op::Open, Errno::EPERM).with_detail(
            "`arc_log` and `faults` are accepted only for devices in the daemon's configuration file",
        ));
    }
    check_sim_state_size(spec, simulator.max_state_size)
}

/// Opens whatever a `[[device]]` table of the configuration names (a simulated device on
/// `sim_iommu`).
pub fn open_configured(
    config: &DeviceConfig,
    sim_iommu: &Arc<SimIommu>,
) -> Result<OpenedDevice, DeviceError> {
    let source = match config {
        DeviceConfig::Sim(spec) => {
            return Ok(OpenedDevice {
                device: open_sim_device(SimSpec::clone(spec), sim_iommu)?,
                backend: Backend::Sim,
            });
        }
        DeviceConfig::Group { sysfs_device, .. } => RealDevice::Group { sysfs_device: sysfs_device.clone() },
        DeviceConfig::Cdev { path, .. } => RealDevice::Cdev { path: path.clone() },
    };
    let device = open_real_device(config.name(), &source)?;
    Ok(OpenedDevice { device, backend: source.backend() })
}

/// What an fd handed over by a VMM turned out to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandedOverFd {
    /// A device fd from `VFIO_GROUP_GET_DEVICE_FD` (an anonymous inode).
    GroupDevice,
    /// An opened (and, by the VMM, iommufd-bound) `/dev/vfio/devices/vfioN`.
    Cdev { path: PathBuf },
}

/// Tells a VFIO device fd from anything else by what the kernel says the fd is, so that
/// a wrong fd is refused with a message naming what it is instead of an ioctl's ENOTTY.
pub fn classify_vfio_fd(name: &str, fd: BorrowedFd<'_>) -> Result<HandedOverFd, DeviceError> {
    let refuse = |what: String| {
        DeviceError::os(name, Op::GetInfo, Errno::ENOTTY).with_detail(format!(
            "the handed-over fd is {what}, not a VFIO device fd (expected `anon_inode:[vfio-device]` \
             from VFIO_GROUP_GET_DEVICE_FD or an opened /dev/vfio/devices/vfioN)"
        ))
    };
    let link = fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|e| {
            DeviceError::os(name, Op::GetInfo, Errno::from_raw(e.raw_os_error().unwrap_or(libc::EBADF)))
                .with_detail("cannot inspect the handed-over fd through /proc/self/fd")
        })?
        .to_string_lossy()
        .into_owned();
    if link == "anon_inode:[vfio-device]" {
        return Ok(HandedOverFd::GroupDevice);
    }
    let file = fs::File::from(fd.try_clone_to_owned().map_err(|e| {
        DeviceError::os(name, Op::GetInfo, Errno::from_raw(e.raw_os_error().unwrap_or(libc::EBADF)))
    })?);
    let meta = file.metadata().map_err(|e| {
        DeviceError::os(name, Op::GetInfo, Errno::from_raw(e.raw_os_error().unwrap_or(libc::EBADF)))
    })?;
    if meta.file_type().is_char_device() {
        use std::os::unix::fs::MetadataExt;
        let major = rustix::fs::major(meta.rdev());
        match char_major_name(major).as_deref() {
            Some("vfio-dev") => return Ok(HandedOverFd::Cdev { path: PathBuf::from(link) }),
            Some("vfio") => {
                return Err(refuse(format!(
                    "a VFIO group or container ({link}); hand over the device fd that \
                     VFIO_GROUP_GET_DEVICE_FD returned instead"
                )));
            }
            _ => {}
        }
    }
    Err(refuse(format!("`{link}`")))
}

/// The driver name `/proc/devices` registers for a character major number.
fn char_major_name(major: u32) -> Option<String> {
    let text = fs::read_to_string("/proc/devices").ok()?;
    let chars = text.split("\n\n").next()?;
    chars.lines().skip(1).find_map(|line| {
        let (num, name) = line.trim().split_once(' ')?;
        (num.parse::<u32>().ok()? == major).then(|| name.trim().to_string())
    })
}

/// What a handed-over fd carries.
#[derive(Debug)]
pub enum Handover {
    /// A real VFIO device fd.
    Vfio { fd: OwnedFd },
    /// A simulated device: the simulator runs in the daemon and the fd is only its
    /// lifetime anchor (see docs/handoff-protocol.md for what this does not model).
    Sim { spec: Box<SimSpec>, anchor: OwnedFd },
}

/// Turns an fd handed over by a VMM into a device. A real device's fd is checked to be a
/// VFIO device fd, then adopted by the VFIO backend (which checks it with
/// `VFIO_DEVICE_GET_INFO`). `identity` names the device where the fd alone cannot (a
/// group device fd carries no sysfs path); where the device can tell, they must agree.
/// A simulated device is opened on `sim_iommu`.
pub fn open_handed_over_device(
    name: &str,
    handover: Handover,
    identity: Option<&DeviceIdentity>,
    sim_iommu: &Arc<SimIommu>,
) -> Result<Arc<dyn MigrationDevice>, DeviceError> {
    let mismatch = |expected: &DeviceIdentity, actual: &DeviceIdentity| {
        DeviceError::os(name, Op::Open, Errno::EINVAL)
            .with_detail(format!("identity mismatch: the request says {expected}, the device is {actual}"))
    };
    match handover {
        Handover::Vfio { fd } => {
            let host = VfioHost::system();
            let found = match classify_vfio_fd(name, fd.as_fd())? {
                HandedOverFd::Cdev { path } => cdev_sysfs_name(&host, name, &path)
                    .and_then(|sysfs_name| sysfs_identity(host.sysfs(), &sysfs_name))
                    .ok(),
                HandedOverFd::GroupDevice => None,
            };
            let identity = match (identity, found) {
                (Some(given), Some(found)) if *given != found => return Err(mismatch(given, &found)),
                (Some(given), _) => given.clone(),
                (None, Some(found)) => found,
                (None, None) => {
                    return Err(DeviceError::os(name, Op::Open, Errno::EINVAL).with_detail(
                        "the fd does not tell which device it is (a VFIO_GROUP_GET_DEVICE_FD fd has no \
                         sysfs path): give `identity` {driver, model} in the request",
                    ));
                }
            };
            Ok(Arc::new(VfioDevice::from_inherited(&host, name, fd, identity)?))
        }
        Handover::Sim { spec, anchor } => {
            let device = open_sim_device(*spec, sim_iommu)?;
            if let Some(expected) = identity {
                let actual = device.identity();
                if &actual != expected {
                    return Err(mismatch(expected, &actual));
                }
            }
            Ok(Arc::new(Anchored { device, _anchor: anchor }))
        }
    }
}

/// A device whose lifetime is tied to an fd the daemon must keep open while it holds the
/// device (the anchor of a handed-over simulated device).
#[derive(Debug)]
struct Anchored {
    device: Arc<dyn MigrationDevice>,
    _anchor: OwnedFd,
}

impl MigrationDevice for Anchored {
    fn name(&self) -> &str {
        self.device.name()
    }
    fn identity(&self) -> DeviceIdentity {
        self.device.identity()
    }
    fn caps(&self) -> Result<Caps, DeviceError> {
        self.device.caps()
    }
    fn state(&self) -> Result<State, DeviceError> {
        self.device.state()
    }
    fn set_state(&self, target: State) -> Result<Option<DataFd>, DeviceError> {
        self.device.set_state(target)
    }
    fn data_size(&self) -> Result<u64, DeviceError> {
        self.device.data_size()
    }
    fn precopy_info(&self, data_fd: &DataFd) -> Result<PrecopyInfo, DeviceError> {
        self.device.precopy_info(data_fd)
    }
    fn dma_logging_supported(&self) -> Result<bool, DeviceError> {
        self.device.dma_logging_supported()
    }
    fn dma_logging_start(&self, ranges: &[IovaRange], page_size: u64) -> Result<u64, DeviceError> {
        self.device.dma_logging_start(ranges, page_size)
    }
    fn dma_logging_stop(&self) -> Result<(), DeviceError> {
        self.device.dma_logging_stop()
    }
    fn dma_logging_report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), DeviceError> {
        self.device.dma_logging_report(iova, length, page_size, bitmap)
    }
    fn reset(&self) -> Result<(), DeviceError> {
        self.device.reset()
    }
    fn content_digest(&self) -> Option<String> {
        self.device.content_digest()
    }
    fn dirty_tracking_hwpt(&self) -> Option<Arc<dyn crate::dirty::HwptDirty>> {
        self.device.dirty_tracking_hwpt()
    }
}

/// What the daemon reports about a device it holds. Each query is a blocking uAPI call;
/// a failing one is reported in place rather than hiding the others.
#[derive(Clone, Debug)]
pub struct DeviceSummary {
    pub name: String,
    pub identity: DeviceIdentity,
    pub caps: Result<Caps, DeviceError>,
    pub state: Result<State, DeviceError>,
    pub data_size: Result<u64, DeviceError>,
    pub dma_logging: Result<bool, DeviceError>,
    /// Where the backend can tell without disturbing the device (the simulator).
    pub content_digest: Option<String>,
}

impl DeviceSummary {
    /// Queries the device (blocking: run it off the reactor).
    pub fn of(device: &dyn MigrationDevice) -> DeviceSummary {
        DeviceSummary {
            name: device.name().to_string(),
            identity: device.identity(),
            caps: device.caps(),
            state: device.state(),
            data_size: device.data_size(),
            dma_logging: device.dma_logging_supported(),
            content_digest: device.content_digest(),
        }
    }
}

impl fmt::Display for DeviceSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn show<T: fmt::Display>(r: &Result<T, DeviceError>) -> String {
            match r {
                Ok(v) => v.to_string(),
                Err(e) => format!("unknown ({})", e.kind),
            }
        }
        write!(
            f,
            "{}: {} caps={} state={} data_size={} dma_logging={}",
            self.name,
            self.identity,
            show(&self.caps),
            show(&self.state),
            show(&self.data_size),
            show(&self.dma_logging)
        )
    }
}

/// A `[[device]]` of the configuration that could not be opened at start.
#[derive(Debug, thiserror::Error)]
#[error("configured device `{name}` ({kind}): {error}")]
pub struct ConfiguredDeviceError {
    pub name: String,
    pub kind: &'static str,
    pub error: String,
}

/// Opens every device of the configuration into `registry`, in order; stops at the first
/// that fails (the daemon does not start half-configured). Returns what it found.
pub fn open_all_configured(
    devices: &[DeviceConfig],
    registry: &crate::registry::Registry,
) -> Result<Vec<DeviceSummary>, ConfiguredDeviceError> {
    let mut found = Vec::with_capacity(devices.len());
    for config in devices {
        let fail = |error: String| ConfiguredDeviceError {
            name: config.name().to_string(),
            kind: config_kind(config),
            error,
        };
        let opened = open_configured(config, registry.sim_iommu()).map_err(|e| fail(e.to_string()))?;
        let summary = DeviceSummary::of(opened.device.as_ref());
        registry.add_device(opened.device, opened.backend).map_err(|e| fail(e.to_string()))?;
        found.push(summary);
    }
    Ok(found)
}

fn config_kind(config: &DeviceConfig) -> &'static str {
    match config {
        DeviceConfig::Sim(_) => "sim",
        DeviceConfig::Group { .. } => "vfio-group",
        DeviceConfig::Cdev { .. } => "vfio-cdev",
    }
}
