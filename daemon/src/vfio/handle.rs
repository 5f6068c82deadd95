//! [`VfioDeviceFd`]: an open VFIO device and every migration-related operation on it,
//! each a thin, checked wrapper around one ioctl.
//!
//! The handle enforces the kernel traps the reference lists (§6) *before* the kernel sees a
//! request: FSM-invalid SETs (above all STOP_COPY → PRE_COPY*, which hangs kernels before
//! 7.2) and any SET while the device is in ERROR are refused; DMA-logging reports with a
//! zero length or a bitmap too short for the range are refused; PRECOPY_INFO always sends
//! `flags = 0` and trusts the REINIT bit only after the feature-12 opt-in.

use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use nix::errno::Errno;

use super::iommufd::{Iommufd, check_bitmap};
use super::syscalls::{IoctlArg, Syscalls, ioctl_with};
use super::uapi::*;
use crate::device::{DataFd, DeviceError, Direction, ErrorKind, IovaRange, Op, PrecopyInfo, plan_set};
use crate::fsm::{Caps, FsmError, Session, State, session_of};

/// Feature payloads (and whole feature arguments) with no user pointers inside: the kernel
/// touches nothing but the argument buffer.
///
/// # Safety
///
/// Implementors must contain no field the kernel interprets as a user pointer.
pub(crate) unsafe trait PointerFree: Pod {}

macro_rules! pointer_free {
    ($($ty:ty),* $(,)?) => {$(
        // SAFETY: every field is a plain value (sizes, flags, states, ids, an fd number).
        unsafe impl PointerFree for $ty {}
    )*};
}

pointer_free!(
    FeatureHeader,
    Feature<FeatureMigration>,
    Feature<FeatureMigState>,
    Feature<FeatureMigDataSize>,
    Feature<LowPowerEntryWithWakeup>,
    DeviceInfo,
    RegionInfo,
    VfioPrecopyInfo,
);

/// How the device fd was obtained; what keeps its IOMMU context alive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenPath {
    /// Legacy group/container (`/dev/vfio/<group>`).
    Group { group: u32 },
    /// Device cdev bound to iommufd.
    Cdev(IommufdBinding),
    /// Handed over by another process (a VMM); it keeps the IOMMU context.
    Inherited,
}

/// Where a cdev-opened device sits in iommufd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IommufdBinding {
    /// `out_devid` of `VFIO_DEVICE_BIND_IOMMUFD`.
    pub dev_id: u32,
    /// The IO address space the device's page table maps.
    pub ioas_id: u32,
    /// The HWPT the device is attached to (automatic for a plain IOAS attach).
    pub hwpt_id: u32,
    /// Whether `hwpt_id` was allocated with `IOMMU_HWPT_ALLOC_DIRTY_TRACKING`.
    pub dirty_tracking: bool,
}

/// The fds a device fd depends on. Declared after the device fd in [`VfioDeviceFd`], so
/// they are closed after it.
pub(crate) enum Backing {
    Group {
        /// Held open only: closing it detaches the group from the container.
        _group: OwnedFd,
        /// Held open only; closed after the group, which must leave it first. Shared by
        /// every group a VMM put into the same container.
        _container: Arc<OwnedFd>,
        id: u32,
    },
    Cdev {
        iommufd: Arc<Iommufd>,
        binding: IommufdBinding,
    },
    Inherited,
}

/// An open VFIO device.
pub struct VfioDeviceFd {
    name: String,
    sys: Arc<dyn Syscalls>,
    device: OwnedFd,
    backing: Backing,
    caps: OnceLock<Caps>,
    precopy_v2: AtomicBool,
    /// Serialises GET-then-SET and RESET, so no two transitions interleave.
    transitions: Mutex<()>,
}

impl fmt::Debug for VfioDeviceFd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VfioDeviceFd")
            .field("name", &self.name)
            .field("fd", &self.device.as_raw_fd())
            .field("path", &self.open_path())
            .finish()
    }
}

impl AsFd for VfioDeviceFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.device.as_fd()
    }
}

impl VfioDeviceFd {
    pub(crate) fn new(
        name: String,
        sys: Arc<dyn Syscalls>,
        device: OwnedFd,
        backing: Backing,
    ) -> VfioDeviceFd {
        VfioDeviceFd {
            name,
            sys,
            device,
            backing,
            caps: OnceLock::new(),
            precopy_v2: AtomicBool::new(false),
            transitions: Mutex::new(()),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Gives the device the name the operator knows it by (configuration, control API):
    /// a device opened by its sysfs name is still named `nic0` in every later error.
    pub fn renamed(mut self, name: impl Into<String>) -> VfioDeviceFd {
        self.name = name.into();
        self
    }

    pub fn open_path(&self) -> OpenPath {
        match &self.backing {
            Backing::Group { id, .. } => OpenPath::Group { group: *id },
            Backing::Cdev { binding, .. } => OpenPath::Cdev(*binding),
            Backing::Inherited => OpenPath::Inherited,
        }
    }

    /// The iommufd a cdev-opened device is bound to, for HWPT dirty tracking.
    pub fn iommufd(&self) -> Option<(&Arc<Iommufd>, IommufdBinding)> {
        match &self.backing {
            Backing::Cdev { iommufd, binding } => Some((iommufd, *binding)),
            _ => None,
        }
    }

    fn err(&self, op: Op, errno: Errno) -> DeviceError {
        DeviceError::os(&self.name, op, errno)
    }

    /// One ioctl on the device fd with a pointer-free argument.
    fn call<T: PointerFree>(&self, op: Op, request: u64, arg: &mut T) -> Result<i32, DeviceError> {
        // SAFETY: `T` has no user pointers, so the kernel touches only `arg`, which is the
        // whole struct `request` expects (each caller pairs them).
        unsafe { ioctl_with(&*self.sys, self.device.as_fd(), request, arg) }.map_err(|e| self.err(op, e))
    }

    // -----------------------------------------------------------------------------------
    // Device information and regions.

    /// `VFIO_DEVICE_GET_INFO`.
    pub fn device_info(&self) -> Result<DeviceInfo, DeviceError> {
        let mut info = DeviceInfo { argsz: argsz::<DeviceInfo>(), ..Default::default() };
        self.call(Op::GetInfo, VFIO_DEVICE_GET_INFO, &mut info)?;
        Ok(info)
    }

    /// `VFIO_DEVICE_GET_REGION_INFO` for region `index` (BARn is n, config space 7).
    pub fn region_info(&self, index: u32) -> Result<RegionInfo, DeviceError> {
        let mut info = RegionInfo { argsz: argsz::<RegionInfo>(), index, ..Default::default() };
        self.call(Op::GetRegionInfo, VFIO_DEVICE_GET_REGION_INFO, &mut info)?;
        Ok(info)
    }

    /// Reads `buf.len()` bytes at `offset` inside `region` (`pread` at the region's file
    /// offset). Emulated registers want the access width they model: pass a 1-byte buffer
    /// for a UART register. Only while the device runs; not in STOP/STOP_COPY.
    pub fn region_read(&self, region: &RegionInfo, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let start =
            self.region_span(Op::RegionRead, region, VFIO_REGION_INFO_FLAG_READ, offset, buf.len())?;
        let mut done = 0;
        while done < buf.len() {
            match self.sys.pread(self.device.as_fd(), &mut buf[done..], start + done as u64) {
                Ok(0) => return Err(self.err(Op::RegionRead, Errno::EIO).with_detail("short region read")),
                Ok(n) => done += n,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(self.err(Op::RegionRead, e)),
            }
        }
        Ok(())
    }

    /// Writes `data` at `offset` inside `region` (`pwrite` at the region's file offset).
    pub fn region_write(&self, region: &RegionInfo, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        let start =
            self.region_span(Op::RegionWrite, region, VFIO_REGION_INFO_FLAG_WRITE, offset, data.len())?;
        let mut done = 0;
        while done < data.len() {
            match self.sys.pwrite(self.device.as_fd(), &data[done..], start + done as u64) {
                Ok(0) => return Err(self.err(Op::RegionWrite, Errno::EIO).with_detail("short region write")),
                Ok(n) => done += n,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(self.err(Op::RegionWrite, e)),
            }
        }
        Ok(())
    }

    /// [`region_read`](Self::region_read) of PCI BAR `bar`.
    pub fn bar_read(&self, bar: u32, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let region = self.region_info(VFIO_PCI_BAR0_REGION_INDEX + bar)?;
        self.region_read(&region, offset, buf)
    }

    /// [`region_write`](Self::region_write) of PCI BAR `bar`.
    pub fn bar_write(&self, bar: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        let region = self.region_info(VFIO_PCI_BAR0_REGION_INDEX + bar)?;
        self.region_write(&region, offset, data)
    }

    /// The device-fd offset of `[offset, offset + len)` inside `region`, refusing accesses
    /// outside it or of a kind the region does not allow.
    fn region_span(
        &self,
        op: Op,
        region: &RegionInfo,
        flag: u32,
        offset: u64,
        len: usize,
    ) -> Result<u64, DeviceError> {
        if region.flags & flag == 0 {
            return Err(self.err(op, Errno::EINVAL).with_detail(format!(
                "region {} does not allow this access (flags {:#x})",
                region.index, region.flags
            )));
        }
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|end| end > region.size) {
            return Err(self.err(op, Errno::EINVAL).with_detail(format!(
                "{len} bytes at {offset:#x} fall outside region {} of {:#x} bytes",
                region.index, region.size
            )));
        }
        region.offset.checked_add(offset).ok_or_else(|| self.err(op, Errno::EOVERFLOW))
    }

    // -----------------------------------------------------------------------------------
    // Migration FSM.

    /// `VFIO_DEVICE_FEATURE_MIGRATION` GET, cached (a driver's capabilities do not change).
    /// ENOTTY — kind `Unsupported` — when the device has no migration support.
    pub fn migration_caps(&self) -> Result<Caps, DeviceError> {
        if let Some(caps) = self.caps.get() {
            return Ok(*caps);
        }
        let flags = VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIGRATION;
        let mut arg = Feature::new(flags, FeatureMigration::default());
        self.call(Op::ProbeMigration, VFIO_DEVICE_FEATURE, &mut arg)?;
        let caps = Caps::from_bits(arg.payload.flags);
        if !caps.is_migratable() {
            return Err(self.err(Op::ProbeMigration, Errno::ENOTTY).with_detail(format!(
                "the driver reports migration flags {:#x} without STOP_COPY",
                arg.payload.flags
            )));
        }
        Ok(*self.caps.get_or_init(|| caps))
    }

    /// `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE` GET.
    pub fn state(&self) -> Result<State, DeviceError> {
        let flags = VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE;
        let mut arg = Feature::new(flags, FeatureMigState { device_state: 0, data_fd: -1 });
        self.call(Op::GetState, VFIO_DEVICE_FEATURE, &mut arg)?;
        State::from_raw(arg.payload.device_state).ok_or_else(|| {
            self.err(Op::GetState, Errno::EPROTO)
                .with_detail(format!("the kernel reported unknown state {}", arg.payload.device_state))
        })
    }

    /// `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE` SET, checked against the FSM first.
    ///
    /// Refused without a SET reaching the kernel (EINVAL, kind `InvalidRequest`): a target
    /// the device lacks (no ioctl at all), any request while the device is in ERROR (only
    /// [`reset`](Self::reset) recovers; a SET would WARN in the kernel), and arcs the kernel
    /// blocks. Returns the new data_fd when the path's last arc opens a session. After a
    /// failed SET the error carries the state a GET found (`state_after`).
    pub fn set_state(&self, target: State) -> Result<Option<DataFd>, DeviceError> {
        let op = Op::SetState(target);
        let caps = self.migration_caps()?;
        if !caps.supports(target) {
            return Err(DeviceError::refused(&self.name, target, FsmError::TargetUnsupported(target, caps)));
        }
        let _serial = self.transitions.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let current = self.state()?;
        if current == State::Error {
            return Err(self
                .err(op, Errno::EINVAL)
                .with_detail("the device is in ERROR; only VFIO_DEVICE_RESET recovers it")
                .with_state_after(Some(State::Error)));
        }
        let arcs =
            plan_set(&self.name, caps, current, target).map_err(|e| e.with_state_after(Some(current)))?;
        if arcs.is_empty() {
            return Ok(None);
        }

        let flags = VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE;
        let mut arg = Feature::new(flags, FeatureMigState { device_state: target.as_raw(), data_fd: -1 });
        if let Err(err) = self.call(op, VFIO_DEVICE_FEATURE, &mut arg) {
            // The kernel echoes the requested state; only a GET says where the device is.
            return Err(err.with_state_after(self.state().ok()));
        }
        let data_fd = (arg.payload.data_fd >= 0).then(|| {
            // SAFETY: the SET succeeded and the kernel installed this fd for the new
            // transfer session (the `Syscalls` contract); nothing else owns it.
            unsafe { OwnedFd::from_raw_fd(arg.payload.data_fd) }
        });
        match (session_of(&arcs), data_fd) {
            (Session::None, None) => Ok(None),
            (Session::OpensSaving, Some(fd)) => Ok(Some(DataFd::new(fd, Direction::Saving))),
            (Session::OpensResuming, Some(fd)) => Ok(Some(DataFd::new(fd, Direction::Resuming))),
            (Session::None, Some(fd)) => {
                let direction =
                    if target == State::Resuming { Direction::Resuming } else { Direction::Saving };
                tracing::warn!(device = %self.name, %current, %target, "kernel returned a data_fd the FSM did not predict");
                Ok(Some(DataFd::new(fd, direction)))
            }
            (_, None) => Err(self
                .err(op, Errno::EIO)
                .with_detail("the kernel reported success but returned no data_fd for a session-opening arc")
                .with_state_after(self.state().ok())),
        }
    }

    /// `VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`: estimated STOP_COPY stream length; any state.
    pub fn data_size(&self) -> Result<u64, DeviceError> {
        let flags = VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIG_DATA_SIZE;
        let mut arg = Feature::new(flags, FeatureMigDataSize::default());
        self.call(Op::DataSize, VFIO_DEVICE_FEATURE, &mut arg)?;
        Ok(arg.payload.stop_copy_length)
    }

    /// `VFIO_MIG_GET_PRECOPY_INFO` on a saving data_fd (EINVAL outside PRE_COPY*). Sends
    /// `flags = 0`; `reinit` is reported only after [`enable_precopy_info_v2`]
    /// succeeded, since v1 drivers echo whatever `flags` held.
    ///
    /// [`enable_precopy_info_v2`]: Self::enable_precopy_info_v2
    pub fn precopy_info(&self, data_fd: &DataFd) -> Result<PrecopyInfo, DeviceError> {
        if data_fd.direction() != Direction::Saving {
            return Err(self
                .err(Op::PrecopyInfo, Errno::EBADF)
                .with_detail("PRECOPY_INFO is only valid on a saving data_fd"));
        }
        let mut arg = VfioPrecopyInfo { argsz: argsz::<VfioPrecopyInfo>(), ..Default::default() };
        // SAFETY: VFIO_MIG_GET_PRECOPY_INFO takes `struct vfio_precopy_info` (no pointers)
        // on the saving data_fd, which `data_fd` is.
        unsafe { ioctl_with(&*self.sys, data_fd.as_fd(), VFIO_MIG_GET_PRECOPY_INFO, &mut arg) }
            .map_err(|e| self.err(Op::PrecopyInfo, e))?;
        Ok(PrecopyInfo {
            initial_bytes: arg.initial_bytes,
            dirty_bytes: arg.dirty_bytes,
            reinit: self.precopy_v2.load(Ordering::Acquire) && arg.flags & VFIO_PRECOPY_INFO_REINIT != 0,
        })
    }

    /// Opts in to `VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2` (kernel 7.1+): PROBE, then SET.
    /// `Ok(false)` when the device lacks PRE_COPY or the kernel/driver lacks the feature.
    pub fn enable_precopy_info_v2(&self) -> Result<bool, DeviceError> {
        let op = Op::EnablePrecopyInfoV2;
        if !self.migration_caps()?.has_pre_copy() {
            return Ok(false);
        }
        let feature = VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFO_V2;
        let mut probe = FeatureHeader::bare(VFIO_DEVICE_FEATURE_PROBE | feature);
        match self.call(op, VFIO_DEVICE_FEATURE, &mut probe) {
            Ok(_) => {}
            // Unknown features are ENOTTY, or EINVAL from older drivers without a
            // `device_feature` op.
            Err(e) if matches!(e.kind, ErrorKind::Unsupported | ErrorKind::InvalidRequest) => {
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
        self.call(op, VFIO_DEVICE_FEATURE, &mut FeatureHeader::bare(feature))?;
        self.precopy_v2.store(true, Ordering::Release);
        Ok(true)
    }

    /// Whether PRECOPY_INFO reports carry a trustworthy REINIT bit.
    pub fn precopy_info_v2_enabled(&self) -> bool {
        self.precopy_v2.load(Ordering::Acquire)
    }

    /// `VFIO_DEVICE_RESET`: the FSM returns to RUNNING; every data_fd is disabled. May fail
    /// with EAGAIN (kind `Busy`) on reset-lock contention; retrying is the caller's call.
    pub fn reset(&self) -> Result<(), DeviceError> {
        let _serial = self.transitions.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // SAFETY: VFIO_DEVICE_RESET takes no argument.
        unsafe { self.sys.ioctl(self.device.as_fd(), VFIO_DEVICE_RESET, IoctlArg::None) }
            .map_err(|e| self.err(Op::Reset, e))?;
        Ok(())
    }

    // -----------------------------------------------------------------------------------
    // DMA logging.

    /// PROBE of `DMA_LOGGING_START` with SET: whether the device can log its DMA writes.
    pub fn dma_logging_supported(&self) -> Result<bool, DeviceError> {
        let flags =
            VFIO_DEVICE_FEATURE_PROBE | VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_START;
        match self.call(Op::ProbeDmaLogging, VFIO_DEVICE_FEATURE, &mut FeatureHeader::bare(flags)) {
            Ok(_) => Ok(true),
            Err(e) if e.kind == ErrorKind::Unsupported => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `DMA_LOGGING_START` over `ranges` at `page_size` (a power of two); returns the page
    /// size the driver chose, which may differ. Empty range lists, empty ranges and bad
    /// page sizes are refused before the call (the core does not check them all).
    pub fn dma_logging_start(&self, ranges: &[IovaRange], page_size: u64) -> Result<u64, DeviceError> {
        let op = Op::DmaLoggingStart;
        let refuse = |why: String| Err(self.err(op, Errno::EINVAL).with_detail(why));
        if ranges.is_empty() {
            return refuse("no ranges to log".into());
        }
        if let Some(empty) = ranges.iter().find(|r| r.length == 0) {
            return refuse(format!("empty range at {:#x}", empty.iova));
        }
        if !page_size.is_power_of_two() {
            return refuse(format!("page size {page_size} is not a power of two"));
        }
        let num_ranges = u32::try_from(ranges.len()).map_err(|_| self.err(op, Errno::E2BIG))?;
        let uapi_ranges: Vec<DmaLoggingRange> =
            ranges.iter().map(|r| DmaLoggingRange { iova: r.iova, length: r.length }).collect();
        let flags = VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_START;
        let mut arg = Feature::new(
            flags,
            DmaLoggingControl { page_size, num_ranges, reserved: 0, ranges: uapi_ranges.as_ptr() as u64 },
        );
        // SAFETY: DMA_LOGGING_START takes the header plus `dma_logging_control`, whose
        // `ranges` points to `uapi_ranges`: `num_ranges` initialised entries that live until
        // the end of this function and are only read.
        unsafe { ioctl_with(&*self.sys, self.device.as_fd(), VFIO_DEVICE_FEATURE, &mut arg) }
            .map_err(|e| self.err(op, e))?;
        Ok(arg.payload.page_size)
    }

    /// `DMA_LOGGING_STOP` (idempotent in every driver).
    pub fn dma_logging_stop(&self) -> Result<(), DeviceError> {
        let flags = VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP;
        self.call(Op::DmaLoggingStop, VFIO_DEVICE_FEATURE, &mut FeatureHeader::bare(flags))?;
        Ok(())
    }

    /// `DMA_LOGGING_REPORT` of `[iova, iova + length)`: reads and clears the device's log
    /// and sets (never clears) bit `n % 64` of `bitmap[n / 64]` for each dirty page
    /// `n = (addr - iova) / page_size` — relative to `iova`, not to the logged ranges.
    ///
    /// `bitmap` must hold `ceil(length / page_size / 64)` words; a shorter one (the kernel
    /// would set bits past its end), a zero length (the kernel wraps) or a page size that
    /// is not a power of two is refused with EINVAL before the call. On any error the log
    /// is lost: treat the range as dirty. EOPNOTSUPP (kind `Unsupported`) where the kernel
    /// lacks `CONFIG_IOMMUFD_DRIVER` (e.g. Debian 6.12 with mtty).
    pub fn dma_logging_report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), DeviceError> {
        let op = Op::DmaLoggingReport;
        check_bitmap(&self.name, op, length, page_size, bitmap.len())?;
        let flags = VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT;
        let mut arg = Feature::new(
            flags,
            DmaLoggingReport { iova, length, page_size, bitmap: bitmap.as_mut_ptr() as u64 },
        );
        // SAFETY: DMA_LOGGING_REPORT takes the header plus `dma_logging_report`, whose
        // `bitmap` points to `bitmap`: exclusively borrowed for the call and checked above to
        // cover every bit the kernel may set for `length` at `page_size`.
        unsafe { ioctl_with(&*self.sys, self.device.as_fd(), VFIO_DEVICE_FEATURE, &mut arg) }
            .map_err(|e| self.err(op, e))?;
        Ok(())
    }

    // -----------------------------------------------------------------------------------
    // Low power.

    /// `LOW_POWER_ENTRY`: allow runtime PM to power the device down; any access wakes it.
    pub fn low_power_entry(&self) -> Result<(), DeviceError> {
        let flags = VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY;
        self.call(Op::LowPowerEntry, VFIO_DEVICE_FEATURE, &mut FeatureHeader::bare(flags))?;
        Ok(())
    }

    /// `LOW_POWER_ENTRY_WITH_WAKEUP`: as above, signalling `eventfd` when the device wakes.
    pub fn low_power_entry_with_wakeup(&self, eventfd: BorrowedFd<'_>) -> Result<(), DeviceError> {
        let flags = VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP;
        let payload = LowPowerEntryWithWakeup { wakeup_eventfd: eventfd.as_raw_fd(), reserved: 0 };
        self.call(Op::LowPowerEntry, VFIO_DEVICE_FEATURE, &mut Feature::new(flags, payload))?;
        Ok(())
    }

    /// `LOW_POWER_EXIT`.
    pub fn low_power_exit(&self) -> Result<(), DeviceError> {
        let flags = VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_LOW_POWER_EXIT;
        self.call(Op::LowPowerExit, VFIO_DEVICE_FEATURE, &mut FeatureHeader::bare(flags))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vfio::fake::*;

    const SET_STATE: u32 = 0x0002_0002;
    const GET_STATE: u32 = 0x0001_0002;

    fn handle(kernel: &Arc<FakeKernel>) -> VfioDeviceFd {
        let fd =
            nix::fcntl::open("/dev/null", nix::fcntl::OFlag::O_RDWR, nix::sys::stat::Mode::empty()).unwrap();
        VfioDeviceFd::new("dev0".into(), kernel.clone(), fd, Backing::Inherited)
    }

    fn device(caps: Caps, state: State) -> (Arc<FakeKernel>, VfioDeviceFd) {
        let kernel = Arc::new(FakeKernel::with_device(FakeVfioDevice::new(caps, state)));
        let handle = handle(&kernel);
        (kernel, handle)
    }

    fn words(values: &[u32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_ne_bytes()).collect()
    }

    #[test]
    fn caps_are_asked_once_with_the_migration_get() {
        let (kernel, dev) = device(Caps::MIGRATABLE[3], State::Running);
        assert_eq!(dev.migration_caps().unwrap(), Caps::MIGRATABLE[3]);
        assert_eq!(dev.migration_caps().unwrap(), Caps::MIGRATABLE[3]);
        let calls = kernel.ioctls();
        assert_eq!(calls.len(), 1, "cached");
        assert_eq!(calls[0].request(), Some(0x3B75));
        // argsz 16, flags GET|MIGRATION, payload zero at offset 8.
        let mut expected = words(&[16, 0x0001_0001]);
        expected.extend([0; 8]);
        assert_eq!(calls[0].bytes(), expected.as_slice());
    }

    #[test]
    fn a_device_without_migration_is_unsupported() {
        let kernel = Arc::new(FakeKernel::new(|_| Err(Errno::ENOTTY)));
        let dev = handle(&kernel);
        let err = dev.migration_caps().unwrap_err();
        assert_eq!(err.kind, ErrorKind::Unsupported);
        assert_eq!(err.op, Op::ProbeMigration);
        let err = dev.set_state(State::Stop).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Unsupported, "no FSM without caps");
    }

    #[test]
    fn set_state_encodes_the_target_and_wraps_the_session_fd() {
        let (kernel, dev) = device(Caps::MIGRATABLE[3], State::Running);
        let fd = dev.set_state(State::PreCopy).unwrap().expect("RUNNING -> PRE_COPY opens a saving session");
        assert_eq!(fd.direction(), Direction::Saving);
        let calls = kernel.ioctls();
        let set = calls.iter().find(|c| c.feature_flags() == Some(SET_STATE)).unwrap();
        let mut expected = words(&[16, SET_STATE, State::PreCopy.as_raw()]);
        expected.extend((-1i32).to_ne_bytes());
        assert_eq!(set.bytes(), expected.as_slice(), "argsz 16, SET|2, PRE_COPY, data_fd -1");

        // PRE_COPY -> STOP_COPY stays in the saving group: no new fd.
        assert!(dev.set_state(State::StopCopy).unwrap().is_none());
        // STOP_COPY -> RESUMING walks through STOP and opens a resuming session.
        let fd = dev.set_state(State::Resuming).unwrap().unwrap();
        assert_eq!(fd.direction(), Direction::Resuming);
        // Already there: nothing is sent.
        kernel.clear();
        assert!(dev.set_state(State::Resuming).unwrap().is_none());
        assert!(kernel.ioctls().iter().all(|c| c.feature_flags() == Some(GET_STATE)));
    }

    #[test]
    fn refused_requests_send_no_set() {
        let (kernel, dev) = device(Caps::MIGRATABLE[0], State::StopCopy);
        dev.migration_caps().unwrap();
        kernel.clear();
        // A state the device lacks is refused from the cached caps alone: no ioctl at all.
        for target in [State::RunningP2p, State::PreCopy, State::Error] {
            let err = dev.set_state(target).unwrap_err();
            assert_eq!((err.errno, err.kind), (Errno::EINVAL, ErrorKind::InvalidRequest), "{target}");
        }
        assert!(kernel.calls().is_empty(), "{:?}", kernel.calls());

        // The blocked arc needs the current state, and nothing more.
        let (kernel, dev) = device(Caps::MIGRATABLE[3], State::StopCopy);
        dev.migration_caps().unwrap();
        kernel.clear();
        let err = dev.set_state(State::PreCopyP2p).unwrap_err();
        assert!(err.detail.unwrap().contains("blocked"));
        assert_eq!(err.state_after, Some(State::StopCopy));
        let flags: Vec<_> = kernel.ioctls().iter().map(|c| c.feature_flags()).collect();
        assert_eq!(flags, [Some(GET_STATE)]);
    }

    #[test]
    fn a_device_in_error_is_only_reset() {
        let (kernel, dev) = device(Caps::MIGRATABLE[3], State::Error);
        let err = dev.set_state(State::Running).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidRequest);
        assert_eq!(err.state_after, Some(State::Error));
        assert!(err.to_string().contains("VFIO_DEVICE_RESET"), "{err}");
        assert!(kernel.ioctls().iter().all(|c| c.feature_flags() != Some(SET_STATE)));

        dev.reset().unwrap();
        let reset = kernel.ioctls().into_iter().last().unwrap();
        assert_eq!(reset, Call::Ioctl { fd: dev.as_fd().as_raw_fd(), request: 0x3B6F, sent: Sent::None });
        assert_eq!(dev.state().unwrap(), State::Running);
        assert!(dev.set_state(State::Stop).unwrap().is_none());
    }

    #[test]
    fn a_failed_set_reports_where_a_get_found_the_device() {
        let mut model = FakeVfioDevice::new(Caps::MIGRATABLE[1], State::Running);
        model.fail_next_set = Some((Errno::EIO, State::RunningP2p));
        let kernel = Arc::new(FakeKernel::with_device(model));
        let dev = handle(&kernel);
        let err = dev.set_state(State::StopCopy).unwrap_err();
        assert_eq!(err.errno, Errno::EIO);
        assert_eq!(err.kind, ErrorKind::DeviceFailure);
        assert_eq!(err.op, Op::SetState(State::StopCopy));
        assert_eq!(err.state_after, Some(State::RunningP2p), "an intermediate state of the path");
        let flags: Vec<_> = kernel.ioctls().iter().filter_map(|c| c.feature_flags()).collect();
        assert_eq!(flags, [0x0001_0001, GET_STATE, SET_STATE, GET_STATE]);
    }

    #[test]
    fn a_kernel_that_opens_no_fd_for_a_session_arc_is_reported() {
        let kernel = Arc::new(FakeKernel::new(|call| match call {
            Syscall::Ioctl { arg: IoctlArg::Buffer(b), .. } if u32_at(b, 4) == 0x0001_0001 => {
                put_u64(b, 8, 1);
                Ok(0)
            }
            Syscall::Ioctl { arg: IoctlArg::Buffer(b), .. } if u32_at(b, 4) == GET_STATE => {
                put_u32(b, 8, State::Stop.as_raw());
                Ok(0)
            }
            _ => Ok(0),
        }));
        let dev = handle(&kernel);
        let err = dev.set_state(State::StopCopy).unwrap_err();
        assert_eq!(err.kind, ErrorKind::DeviceFailure);
        assert!(err.to_string().contains("no data_fd"), "{err}");
    }

    #[test]
    fn precopy_info_sends_zero_flags_and_ignores_them_without_v2() {
        let mut model = FakeVfioDevice::new(Caps::MIGRATABLE[3], State::PreCopy);
        // A v1 driver echoes (here: reports) a flag word that means nothing.
        model.precopy = (24, 7, VFIO_PRECOPY_INFO_REINIT);
        let kernel = Arc::new(FakeKernel::with_device(model));
        let dev = handle(&kernel);
        let saving = DataFd::new(nix::unistd::pipe().unwrap().0, Direction::Saving);
        let info = dev.precopy_info(&saving).unwrap();
        assert_eq!(info, PrecopyInfo { initial_bytes: 24, dirty_bytes: 7, reinit: false });
        let call = kernel.ioctls().into_iter().last().unwrap();
        assert_eq!(call.request(), Some(0x3B79));
        let Call::Ioctl { fd, .. } = &call else { unreachable!() };
        assert_eq!(*fd, saving.as_raw_fd(), "issued on the data_fd, not the device fd");
        assert_eq!(call.bytes(), [words(&[24, 0]), vec![0; 16]].concat().as_slice());

        let resuming = DataFd::new(nix::unistd::pipe().unwrap().1, Direction::Resuming);
        assert_eq!(dev.precopy_info(&resuming).unwrap_err().kind, ErrorKind::BadFdUse);
    }

    #[test]
    fn precopy_info_v2_is_probed_then_set_and_unlocks_reinit() {
        let mut model = FakeVfioDevice::new(Caps::MIGRATABLE[3], State::PreCopy);
        model.precopy = (4096, 0, VFIO_PRECOPY_INFO_REINIT);
        model.probe_ok = vec![12];
        let kernel = Arc::new(FakeKernel::new({
            let mut model = model;
            move |call| match call {
                // The SET of feature 12 (no payload) succeeds.
                Syscall::Ioctl { arg: IoctlArg::Buffer(b), .. } if u32_at(b, 4) == 0x0002_000C => Ok(0),
                other => model.answer(other),
            }
        }));
        let dev = handle(&kernel);
        assert!(!dev.precopy_info_v2_enabled());
        assert!(dev.enable_precopy_info_v2().unwrap());
        assert!(dev.precopy_info_v2_enabled());
        let calls = kernel.ioctls();
        assert_eq!(calls[1].bytes(), words(&[8, 0x0006_000C]).as_slice(), "PROBE|SET|12, header only");
        assert_eq!(calls[2].bytes(), words(&[8, 0x0002_000C]).as_slice(), "SET|12, header only");

        let saving = DataFd::new(nix::unistd::pipe().unwrap().0, Direction::Saving);
        let info = dev.precopy_info(&saving).unwrap();
        assert!(info.reinit);
        assert_eq!(info.initial_bytes, 4096);
        assert_eq!(u32_at(kernel.ioctls().last().unwrap().bytes(), 4), 0, "flags still sent as 0");
    }

    #[test]
    fn precopy_info_v2_is_skipped_where_it_cannot_exist() {
        // No PRE_COPY: not even a probe.
        let (kernel, dev) = device(Caps::MIGRATABLE[1], State::Running);
        assert!(!dev.enable_precopy_info_v2().unwrap());
        assert_eq!(kernel.ioctls().len(), 1, "only the MIGRATION GET");
        // A kernel before 7.1: the probe fails, nothing is set.
        let (kernel, dev) = device(Caps::MIGRATABLE[3], State::Running);
        assert!(!dev.enable_precopy_info_v2().unwrap());
        let flags: Vec<_> = kernel.ioctls().iter().filter_map(|c| c.feature_flags()).collect();
        assert_eq!(flags, [0x0001_0001, 0x0006_000C]);
        assert!(!dev.precopy_info_v2_enabled());
    }

    #[test]
    fn low_power_features_carry_their_flag_words_and_eventfd() {
        let kernel = Arc::new(FakeKernel::new(|_| Ok(0)));
        let dev = handle(&kernel);
        // Any fd stands in for the eventfd: the seam only sees its number.
        let (eventfd, _write_end) = nix::unistd::pipe().unwrap();
        dev.low_power_entry().unwrap();
        dev.low_power_entry_with_wakeup(eventfd.as_fd()).unwrap();
        dev.low_power_exit().unwrap();
        let calls = kernel.ioctls();
        assert!(calls.iter().all(|c| c.request() == Some(0x3B75)));
        assert_eq!(calls[0].bytes(), words(&[8, 0x0002_0003]).as_slice());
        let raw = eventfd.as_fd().as_raw_fd();
        assert_eq!(calls[1].bytes(), words(&[16, 0x0002_0004, raw as u32, 0]).as_slice());
        assert_eq!(calls[2].bytes(), words(&[8, 0x0002_0005]).as_slice());

        let kernel = Arc::new(FakeKernel::new(|_| Err(Errno::ENOTTY)));
        let err = handle(&kernel).low_power_entry().unwrap_err();
        assert_eq!((err.op, err.kind), (Op::LowPowerEntry, ErrorKind::Unsupported));
    }

    /// What the kernel receives for DMA_LOGGING_START, read back through the ranges pointer
    /// the way `copy_from_user` would, and the driver's page size copied back.
    #[test]
    fn dma_logging_start_passes_the_ranges_and_returns_the_chosen_page_size() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let kernel = Arc::new(FakeKernel::new({
            let seen = seen.clone();
            move |call| {
                let Syscall::Ioctl { request: VFIO_DEVICE_FEATURE, arg: IoctlArg::Buffer(b), .. } = call
                else {
                    return Err(Errno::ENOTTY);
                };
                match u32_at(b, 4) {
                    0x0006_0006 => Ok(0),
                    0x0002_0006 => {
                        let (num, ptr) = (u32_at(b, 16) as usize, u64_at(b, 24));
                        // SAFETY: `ptr` is the ranges array the handle keeps alive across
                        // this call, holding `num_ranges` entries.
                        let ranges: Vec<DmaLoggingRange> = unsafe { read_user(ptr, num) };
                        seen.lock().unwrap().extend(ranges);
                        put_u64(b, 8, 2 << 20); // the driver picked 2 MiB
                        Ok(0)
                    }
                    0x0002_0007 => Ok(0),
                    _ => Err(Errno::EINVAL),
                }
            }
        }));
        let dev = handle(&kernel);
        assert!(dev.dma_logging_supported().unwrap());
        let ranges =
            [IovaRange { iova: 0, length: 0x8000_0000 }, IovaRange { iova: 1 << 32, length: 1 << 30 }];
        assert_eq!(dev.dma_logging_start(&ranges, 4096).unwrap(), 2 << 20);
        dev.dma_logging_stop().unwrap();

        assert_eq!(
            *seen.lock().unwrap(),
            [
                DmaLoggingRange { iova: 0, length: 0x8000_0000 },
                DmaLoggingRange { iova: 1 << 32, length: 1 << 30 }
            ]
        );
        let calls = kernel.ioctls();
        assert_eq!(calls[0].bytes(), words(&[8, 0x0006_0006]).as_slice(), "PROBE|SET|START");
        let start = calls[1].bytes();
        assert_eq!(start.len(), 32);
        assert_eq!((u32_at(start, 0), u32_at(start, 4)), (32, 0x0002_0006));
        assert_eq!(u64_at(start, 8), 4096, "requested page size");
        assert_eq!((u32_at(start, 16), u32_at(start, 20)), (2, 0), "num_ranges, reserved");
        assert_ne!(u64_at(start, 24), 0, "ranges pointer");
        assert_eq!(calls[2].bytes(), words(&[8, 0x0002_0007]).as_slice(), "STOP: argsz 8");
    }

    #[test]
    fn dma_logging_start_refuses_what_the_core_does_not_check() {
        let kernel = Arc::new(FakeKernel::new(|_| Ok(0)));
        let dev = handle(&kernel);
        let range = IovaRange { iova: 0, length: 4096 };
        assert!(dev.dma_logging_start(&[], 4096).is_err());
        assert!(dev.dma_logging_start(&[range, IovaRange { iova: 8192, length: 0 }], 4096).is_err());
        assert!(dev.dma_logging_start(&[range], 0).is_err());
        assert!(dev.dma_logging_start(&[range], 6000).is_err());
        assert!(kernel.ioctls().is_empty());
    }

    #[test]
    fn dma_logging_report_sizes_the_bitmap_and_uses_the_kernel_layout() {
        const IOVA: u64 = 0x4000_0000;
        let kernel = Arc::new(FakeKernel::new(|call| {
            let Syscall::Ioctl { arg: IoctlArg::Buffer(b), .. } = call else { return Err(Errno::ENOTTY) };
            let (iova, page_size, bitmap) = (u64_at(b, 8), u64_at(b, 24), u64_at(b, 32));
            // The driver saw DMA writes at these addresses: bits are relative to `iova`.
            for addr in [IOVA + 5 * 4096, IOVA + 64 * 4096 + 100, IOVA + 199 * 4096] {
                // SAFETY: the handle lent a bitmap checked to cover 200 pages.
                unsafe { set_user_bit(bitmap, (addr - iova) / page_size) };
            }
            Ok(0)
        }));
        let dev = handle(&kernel);
        let length = 200 * 4096;
        let mut short = vec![0u64; 3];
        let err = dev.dma_logging_report(IOVA, length, 4096, &mut short).unwrap_err();
        assert_eq!((err.op, err.kind), (Op::DmaLoggingReport, ErrorKind::InvalidRequest));
        assert!(err.to_string().contains("need 4"), "{err}");
        let mut bitmap = vec![0u64; 4];
        assert_eq!(
            dev.dma_logging_report(IOVA, 0, 4096, &mut bitmap).unwrap_err().kind,
            ErrorKind::InvalidRequest
        );
        assert!(kernel.ioctls().is_empty(), "refused before the kernel");

        dev.dma_logging_report(IOVA, length, 4096, &mut bitmap).unwrap();
        assert_eq!(bitmap, [1 << 5, 1, 0, 1 << (199 - 192)]);
        let b = kernel.ioctls()[0].bytes().to_vec();
        assert_eq!(b.len(), 40);
        assert_eq!((u32_at(&b, 0), u32_at(&b, 4)), (40, 0x0001_0008));
        assert_eq!((u64_at(&b, 8), u64_at(&b, 16), u64_at(&b, 24)), (IOVA, length, 4096));
        assert_eq!(u64_at(&b, 32), bitmap.as_ptr() as u64);
    }

    /// Debian 6.12 without CONFIG_IOMMUFD_DRIVER answers REPORT with EOPNOTSUPP (mtty).
    #[test]
    fn an_unsupported_report_is_kind_unsupported() {
        let kernel = Arc::new(FakeKernel::new(|_| Err(Errno::EOPNOTSUPP)));
        let dev = handle(&kernel);
        let mut bitmap = [0u64; 1];
        let err = dev.dma_logging_report(0, 4096, 4096, &mut bitmap).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Unsupported);
        assert_eq!(err.errno, Errno::EOPNOTSUPP);
    }

    #[test]
    fn bar_access_goes_to_the_region_offset_with_the_access_width() {
        const BAR0: u64 = 0;
        let kernel = Arc::new(FakeKernel::new(|call| match call {
            Syscall::Ioctl { request: VFIO_DEVICE_GET_REGION_INFO, arg: IoctlArg::Buffer(b), .. } => {
                let index = u32_at(b, 8);
                put_u32(b, 4, VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE);
                put_u64(b, 16, 8);
                put_u64(b, 24, u64::from(index) << 40);
                Ok(0)
            }
            Syscall::Pread { buf, .. } => {
                buf.fill(0xA5);
                Ok(buf.len() as i32)
            }
            Syscall::Pwrite { data, .. } => Ok(data.len() as i32),
            _ => Err(Errno::ENOTTY),
        }));
        let dev = handle(&kernel);
        dev.bar_write(0, 7, &[0xA5]).unwrap();
        let mut scr = [0u8; 1];
        dev.bar_read(0, 7, &mut scr).unwrap();
        assert_eq!(scr, [0xA5]);
        let region = dev.region_info(0).unwrap();
        assert_eq!((region.size, region.offset), (8, BAR0));
        let err = dev.region_read(&region, 7, &mut [0u8; 2]).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidRequest, "past the 8-byte BAR");

        let fd = dev.as_fd().as_raw_fd();
        let io: Vec<_> = kernel.calls().into_iter().filter(|c| !matches!(c, Call::Ioctl { .. })).collect();
        assert_eq!(
            io,
            [
                Call::Pwrite { fd, offset: BAR0 + 7, data: vec![0xA5] },
                Call::Pread { fd, offset: BAR0 + 7, len: 1 }
            ]
        );
        let region_info = &kernel.ioctls()[0];
        assert_eq!(region_info.request(), Some(0x3B6C));
        assert_eq!(region_info.bytes(), [words(&[32, 0, 0, 0]), vec![0; 16]].concat().as_slice());
        dev.bar_read(1, 0, &mut scr).unwrap();
        assert!(matches!(kernel.calls().last(), Some(Call::Pread { offset, .. }) if *offset == 1 << 40));
    }

    #[test]
    fn info_data_size_and_state_decode_the_kernel_answers() {
        let (kernel, dev) = device(Caps::MIGRATABLE[3], State::RunningP2p);
        let info = dev.device_info().unwrap();
        assert_eq!((info.num_regions, info.num_irqs), (9, 5));
        assert_ne!(info.flags & VFIO_DEVICE_FLAGS_PCI, 0);
        assert_eq!(dev.state().unwrap(), State::RunningP2p);
        assert_eq!(dev.data_size().unwrap(), b"device-state".len() as u64);
        let calls = kernel.ioctls();
        assert_eq!(calls[0].request(), Some(0x3B6B));
        assert_eq!(calls[0].bytes(), [words(&[24]), vec![0; 20]].concat().as_slice());
        assert_eq!(calls[2].bytes(), [words(&[16, 0x0001_0009]), vec![0; 8]].concat().as_slice());

        let kernel = Arc::new(FakeKernel::new(|call| {
            if let Syscall::Ioctl { arg: IoctlArg::Buffer(b), .. } = call {
                put_u32(b, 8, 99);
            }
            Ok(0)
        }));
        assert_eq!(handle(&kernel).state().unwrap_err().kind, ErrorKind::Other);
    }
}
