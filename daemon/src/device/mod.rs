//! The one interface the engine uses for a migratable device, whatever is behind it: a
//! real VFIO device (`vfio.rs`, the kernel's uAPI) or the simulator (`sim.rs`, the same
//! contract in user space, with fault injection).
//!
//! Every method is a blocking call that maps one-to-one onto a uAPI operation, so the
//! engine runs them on blocking threads, never on the async reactor. Implementations
//! report failures as [`DeviceError`] with the errno the kernel returned (or would
//! return) and its [`ErrorKind`].

pub mod open;
pub mod sim;
pub mod vfio;

use std::fmt;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;

use nix::errno::Errno;

use crate::dirty::HwptDirty;
use crate::fsm::{self, Caps, FsmError, State};
pub use crate::vfio::errno::ErrorKind;

/// A uAPI operation, named in errors and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Open,
    GetInfo,
    ProbeMigration,
    GetState,
    SetState(State),
    DataSize,
    PrecopyInfo,
    ProbeDmaLogging,
    DmaLoggingStart,
    DmaLoggingStop,
    DmaLoggingReport,
    LowPowerEntry,
    LowPowerExit,
    Reset,
    DataRead,
    DataWrite,
    GetRegionInfo,
    RegionRead,
    RegionWrite,
    EnablePrecopyInfoV2,
    IommufdIoasAlloc,
    IommufdHwInfo,
    IommufdHwptAlloc,
    IommufdSetDirtyTracking,
    IommufdGetDirtyBitmap,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Open => f.write_str("open"),
            Op::GetInfo => f.write_str("GET_INFO"),
            Op::ProbeMigration => f.write_str("FEATURE MIGRATION"),
            Op::GetState => f.write_str("GET MIG_DEVICE_STATE"),
            Op::SetState(s) => write!(f, "SET MIG_DEVICE_STATE {s}"),
            Op::DataSize => f.write_str("MIG_DATA_SIZE"),
            Op::PrecopyInfo => f.write_str("MIG_GET_PRECOPY_INFO"),
            Op::ProbeDmaLogging => f.write_str("PROBE DMA_LOGGING"),
            Op::DmaLoggingStart => f.write_str("DMA_LOGGING_START"),
            Op::DmaLoggingStop => f.write_str("DMA_LOGGING_STOP"),
            Op::DmaLoggingReport => f.write_str("DMA_LOGGING_REPORT"),
            Op::LowPowerEntry => f.write_str("LOW_POWER_ENTRY"),
            Op::LowPowerExit => f.write_str("LOW_POWER_EXIT"),
            Op::Reset => f.write_str("DEVICE_RESET"),
            Op::DataRead => f.write_str("data_fd read"),
            Op::DataWrite => f.write_str("data_fd write"),
            Op::GetRegionInfo => f.write_str("GET_REGION_INFO"),
            Op::RegionRead => f.write_str("region read"),
            Op::RegionWrite => f.write_str("region write"),
            Op::EnablePrecopyInfoV2 => f.write_str("SET MIG_PRECOPY_INFOv2"),
            Op::IommufdIoasAlloc => f.write_str("IOMMU_IOAS_ALLOC"),
            Op::IommufdHwInfo => f.write_str("IOMMU_GET_HW_INFO"),
            Op::IommufdHwptAlloc => f.write_str("IOMMU_HWPT_ALLOC"),
            Op::IommufdSetDirtyTracking => f.write_str("IOMMU_HWPT_SET_DIRTY_TRACKING"),
            Op::IommufdGetDirtyBitmap => f.write_str("IOMMU_HWPT_GET_DIRTY_BITMAP"),
        }
    }
}

/// A failed device operation: which device, which operation, the errno and what it means.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{device}: {op} failed: {kind} ({errno}){}", detail_suffix(.detail, .state_after))]
pub struct DeviceError {
    pub device: String,
    pub op: Op,
    pub errno: Errno,
    pub kind: ErrorKind,
    /// Extra context (e.g. why the FSM refused a request before it reached the kernel).
    pub detail: Option<String>,
    /// For a failed SET: the state a GET found afterwards (the kernel may have walked
    /// part of the path, or fallen into ERROR).
    pub state_after: Option<State>,
}

fn detail_suffix(detail: &Option<String>, state_after: &Option<State>) -> String {
    let mut out = String::new();
    if let Some(d) = detail {
        out.push_str(": ");
        out.push_str(d);
    }
    if let Some(s) = state_after {
        out.push_str(&format!("; device now in {s}"));
    }
    out
}

impl DeviceError {
    pub fn os(device: impl Into<String>, op: Op, errno: Errno) -> DeviceError {
        DeviceError {
            device: device.into(),
            op,
            errno,
            kind: ErrorKind::classify(errno),
            detail: None,
            state_after: None,
        }
    }

    /// A request the FSM refuses; the kernel would answer EINVAL, so it is never sent.
    pub fn refused(device: impl Into<String>, target: State, why: FsmError) -> DeviceError {
        DeviceError {
            detail: Some(why.to_string()),
            ..DeviceError::os(device, Op::SetState(target), Errno::EINVAL)
        }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> DeviceError {
        self.detail = Some(detail.into());
        self
    }

    pub fn with_state_after(mut self, state: Option<State>) -> DeviceError {
        self.state_after = state;
        self
    }
}

/// Compatibility identity: a destination device must match the source's exactly.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct DeviceIdentity {
    /// The kernel driver (`mlx5_vfio_pci`, `mtty`) or `sim`.
    pub driver: String,
    /// `vendor:device` for PCI, the mdev type for mdevs, the model for simulated devices.
    pub model: String,
}

impl fmt::Display for DeviceIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.driver, self.model)
    }
}

/// One IOVA range for DMA logging (`vfio_device_feature_dma_logging_range`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IovaRange {
    pub iova: u64,
    pub length: u64,
}

impl IovaRange {
    pub fn end(&self) -> u64 {
        self.iova.saturating_add(self.length)
    }
}

/// `struct vfio_precopy_info`, decoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrecopyInfo {
    pub initial_bytes: u64,
    pub dirty_bytes: u64,
    /// `VFIO_PRECOPY_INFO_REINIT`, meaningful only after opting in with feature 12.
    pub reinit: bool,
}

/// Which way a transfer session streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Read-only: the device's state comes out (PRE_COPY / STOP_COPY).
    Saving,
    /// Write-only: a state goes into the device (RESUMING).
    Resuming,
}

/// The file operations behind a data_fd that user space serves itself (the simulator's
/// pipes). A bare pipe cannot answer what the kernel's file answers: ENODEV once the
/// driver disabled the session, a temporary end (0 or ENOMSG) in PRE_COPY while the
/// writer side is still open, EFAULT or ENOMEM on the very write that carried a bad
/// resume stream. A backend that needs those answers attaches these operations to the
/// [`DataFd`] it hands out; they do the actual `read(2)`/`write(2)` on `fd` themselves.
pub trait DataFdOps: Send + Sync + fmt::Debug {
    fn read(&self, fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<usize, Errno>;
    fn write(&self, fd: BorrowedFd<'_>, buf: &[u8]) -> Result<usize, Errno>;
}

/// A transfer session's `data_fd`: a blocking stream file. Reads and writes retry on
/// EINTR; everything else is reported as the kernel (or the backend's [`DataFdOps`]) said it.
#[derive(Debug)]
pub struct DataFd {
    fd: OwnedFd,
    direction: Direction,
    ops: Option<Arc<dyn DataFdOps>>,
}

impl DataFd {
    pub fn new(fd: OwnedFd, direction: Direction) -> DataFd {
        DataFd { fd, direction, ops: None }
    }

    /// A data_fd whose reads and writes go through a user-space backend's operations.
    pub fn with_ops(fd: OwnedFd, direction: Direction, ops: Arc<dyn DataFdOps>) -> DataFd {
        DataFd { fd, direction, ops: Some(ops) }
    }

    pub fn direction(&self) -> Direction {
        self.direction
    }

    /// The user-space operations behind this fd, if a backend attached any; lets a
    /// backend recognise its own sessions (e.g. for `VFIO_MIG_GET_PRECOPY_INFO`).
    pub fn ops(&self) -> Option<&Arc<dyn DataFdOps>> {
        self.ops.as_ref()
    }

    /// The bare fd. Operations a backend attached are dropped: from then on it behaves
    /// like the plain pipe it is (EOF rather than ENODEV when the session is disabled).
    pub fn into_owned_fd(self) -> OwnedFd {
        self.fd
    }

    fn read_once(&self, buf: &mut [u8]) -> Result<usize, Errno> {
        match &self.ops {
            Some(ops) => ops.read(self.fd.as_fd(), buf),
            None => nix::unistd::read(self.fd.as_fd(), buf),
        }
    }

    fn write_once(&self, buf: &[u8]) -> Result<usize, Errno> {
        match &self.ops {
            Some(ops) => ops.write(self.fd.as_fd(), buf),
            None => nix::unistd::write(self.fd.as_fd(), buf),
        }
    }

    /// Reads what is available; `Ok(0)` is an end of stream (final in STOP_COPY,
    /// temporary in PRE_COPY). ENOMSG (a temporary end on mlx5 and virtio) is returned as
    /// an error of kind [`io::ErrorKind::WouldBlock`]-free `Errno`, for the caller to see.
    pub fn read_chunk(&self, buf: &mut [u8]) -> Result<usize, Errno> {
        loop {
            match self.read_once(buf) {
                Err(Errno::EINTR) => continue,
                other => return other,
            }
        }
    }

    /// Writes all of `buf`, retrying short writes and EINTR.
    pub fn write_all_bytes(&self, mut buf: &[u8]) -> Result<(), Errno> {
        while !buf.is_empty() {
            match self.write_once(buf) {
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e),
                Ok(0) => return Err(Errno::EIO),
                Ok(n) => buf = &buf[n..],
            }
        }
        Ok(())
    }
}

impl AsFd for DataFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for DataFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Read for &DataFd {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_chunk(buf).map_err(io::Error::from)
    }
}

impl Write for &DataFd {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match self.write_once(buf) {
                Err(Errno::EINTR) => continue,
                other => return other.map_err(io::Error::from),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A device that can be migrated with the VFIO migration v2 uAPI.
///
/// Implementations are thread-safe (the engine drives a group's devices from one
/// blocking thread each) and must refuse, with EINVAL and without side effects, every SET
/// the kernel refuses; a SET that would walk a blocked arc must never be issued.
pub trait MigrationDevice: Send + Sync + fmt::Debug {
    /// The name the daemon knows the device by (configuration, API, logs).
    fn name(&self) -> &str;

    /// Compatibility identity, compared between source and destination.
    fn identity(&self) -> DeviceIdentity;

    /// `VFIO_DEVICE_FEATURE_MIGRATION` GET. ENOTTY (kind `Unsupported`) when the device
    /// has no migration support at all.
    fn caps(&self) -> Result<Caps, DeviceError>;

    /// `MIG_DEVICE_STATE` GET.
    fn state(&self) -> Result<State, DeviceError>;

    /// `MIG_DEVICE_STATE` SET. Returns the new data_fd when the path's last arc opens a
    /// transfer session. On failure the error carries the state a GET found afterwards.
    fn set_state(&self, target: State) -> Result<Option<DataFd>, DeviceError>;

    /// `MIG_DATA_SIZE`: estimated length of the STOP_COPY stream; allowed in any state.
    fn data_size(&self) -> Result<u64, DeviceError>;

    /// `VFIO_MIG_GET_PRECOPY_INFO` on a saving data_fd; EINVAL outside PRE_COPY*.
    fn precopy_info(&self, data_fd: &DataFd) -> Result<PrecopyInfo, DeviceError>;

    /// PROBE of `DMA_LOGGING_START|SET`: whether the device can log DMA writes.
    fn dma_logging_supported(&self) -> Result<bool, DeviceError>;

    /// `DMA_LOGGING_START`; returns the page size the driver chose.
    fn dma_logging_start(&self, ranges: &[IovaRange], page_size: u64) -> Result<u64, DeviceError>;

    /// `DMA_LOGGING_STOP` (idempotent in every driver).
    fn dma_logging_stop(&self) -> Result<(), DeviceError>;

    /// `DMA_LOGGING_REPORT`: reads and clears the log of `[iova, iova + length)`, setting
    /// (never clearing) bit `n % 64` of word `n / 64` of `bitmap` for every dirty page
    /// `n = (addr - iova) / page_size`. `bitmap` must hold at least
    /// `ceil(length / page_size / 64)` words.
    fn dma_logging_report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), DeviceError>;

    /// `VFIO_DEVICE_RESET`: back to RUNNING, every session and data_fd disabled.
    fn reset(&self) -> Result<(), DeviceError>;

    /// The IOMMU HWPT with dirty tracking this device is attached to, if any: the dirty
    /// source for a device without DMA logging. Devices attached to the same HWPT return
    /// handles with equal [`HwptKey`](crate::dirty::HwptKey)s. `None` by default (group
    /// and inherited fds, automatic HWPTs).
    fn dirty_tracking_hwpt(&self) -> Option<Arc<dyn HwptDirty>> {
        None
    }

    /// A digest of the device's migratable state, where the backend can compute one
    /// without disturbing the device (the simulator can; a real device cannot, so the
    /// default is `None`). Lets a demo or a test prove byte-for-byte equality end to end.
    fn content_digest(&self) -> Option<String> {
        None
    }
}

/// Checks a SET against the FSM before it is issued, the way every implementation must:
/// returns the arcs the kernel will walk, or the EINVAL the kernel would return.
pub fn plan_set(
    device: &str,
    caps: Caps,
    current: State,
    target: State,
) -> Result<Vec<fsm::Arc>, DeviceError> {
    fsm::path(caps, current, target).map_err(|why| DeviceError::refused(device, target, why))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_device_operation_and_state() {
        let err = DeviceError::os("nic0", Op::SetState(State::StopCopy), Errno::EIO)
            .with_state_after(Some(State::Error));
        let text = err.to_string();
        assert_eq!(err.kind, ErrorKind::DeviceFailure);
        assert!(text.contains("nic0"), "{text}");
        assert!(text.contains("SET MIG_DEVICE_STATE STOP_COPY"), "{text}");
        assert!(text.contains("device now in ERROR"), "{text}");
    }

    #[test]
    fn plan_set_refuses_blocked_arcs_with_einval() {
        let err = plan_set("gpu0", Caps::MIGRATABLE[3], State::StopCopy, State::PreCopy).unwrap_err();
        assert_eq!(err.errno, Errno::EINVAL);
        assert_eq!(err.kind, ErrorKind::InvalidRequest);
        assert!(err.to_string().contains("blocked"));
    }

    #[test]
    fn data_fd_moves_bytes_both_ways() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let reader = DataFd::new(r, Direction::Saving);
        let writer = DataFd::new(w, Direction::Resuming);
        writer.write_all_bytes(b"state").unwrap();
        drop(writer);
        let mut buf = [0u8; 16];
        let n = reader.read_chunk(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"state");
        assert_eq!(reader.read_chunk(&mut buf).unwrap(), 0);
    }
}
