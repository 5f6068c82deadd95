//! The IOMMU as a dirty source: an iommufd HWPT allocated with dirty tracking
//! (`IOMMU_HWPT_SET_DIRTY_TRACKING`, `IOMMU_HWPT_GET_DIRTY_BITMAP`, reference §4.3).
//!
//! [`HwptDirty`] is the seam: a HWPT that can track dirty pages, whether the kernel's
//! ([`IommufdHwpt`], over [`Iommufd`]) or the simulator's. Every device attached to a HWPT
//! hands out a handle to it ([`crate::device::MigrationDevice::dirty_tracking_hwpt`]);
//! handles of one HWPT compare equal by [`HwptKey`], so the tracker builds one
//! [`IommufdHwptSource`] per HWPT and one SET / GET serves every device on it.
//!
//! Kernel behaviour the source is written against (verified in
//! `drivers/iommu/iommufd/{hw_pagetable,io_pagetable}.c` and the VT-d/AMD dirty ops):
//! - enabling first clears every dirty bit of the HWPT (a clean snapshot), so a restart
//!   after a lost read starts clean; SET is idempotent;
//! - a read must start and end on the IOAS alignment and on its page size (EINVAL), and
//!   reads and clears (unless NO_CLEAR);
//! - the walk stops at the first unmapped byte **without an error** (the core drops the
//!   walk's result), and a read while tracking is off also succeeds with nothing set
//!   (the driver's EINVAL is dropped the same way). Hence reads cover exactly the guest
//!   layout, which must be what the IOAS maps, at a page size every guest range starts
//!   and ends on.
//!
//! A HWPT's reads clear its bits for everyone: one HWPT must be tracked by one group.

use std::fmt;
use std::sync::Arc;

use nix::errno::Errno;

use crate::device::{DeviceError, ErrorKind, IovaRange, Op};
use crate::dirty::bitmap::DirtyBitmap;
use crate::dirty::ranges::{MIN_LOGGING_PAGE_SIZE, normalize};
use crate::dirty::tracker::{DirtySource, SourceReport, SourceStart, StartRequest, report_windows};
use crate::vfio::{DirtyRead, Iommufd};

/// Which HWPT a handle designates: the iommufd (or simulated IOMMU) it lives in, by
/// identity, and its object id there. Handles to one HWPT have equal keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HwptKey {
    owner: usize,
    hwpt_id: u32,
}

impl HwptKey {
    /// The key of object `hwpt_id` in `owner`. The address only identifies the owner
    /// while it is alive, which every handle holding a key guarantees.
    pub fn of<T: ?Sized>(owner: &Arc<T>, hwpt_id: u32) -> HwptKey {
        HwptKey { owner: Arc::as_ptr(owner).cast::<()>() as usize, hwpt_id }
    }

    pub fn hwpt_id(&self) -> u32 {
        self.hwpt_id
    }
}

/// A HWPT that can track dirty pages.
pub trait HwptDirty: Send + Sync + fmt::Debug {
    /// Equal for every handle to the same HWPT.
    fn key(&self) -> HwptKey;

    /// Name in errors and statistics, e.g. `/dev/iommu hwpt 11`.
    fn label(&self) -> &str;

    /// `IOMMU_HWPT_SET_DIRTY_TRACKING`; enabling clears every dirty bit first. EOPNOTSUPP
    /// (kind `Unsupported`) when the HWPT has no dirty tracking.
    fn set_dirty_tracking(&self, enable: bool) -> Result<(), DeviceError>;

    /// `IOMMU_HWPT_GET_DIRTY_BITMAP` of `[iova, iova + length)`: sets (never clears) bit
    /// `n % 64` of `bitmap[n / 64]` for each dirty page `n = (addr - iova) / page_size`.
    fn get_dirty_bitmap(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
        read: DirtyRead,
    ) -> Result<(), DeviceError>;
}

/// A kernel HWPT: object `hwpt_id` of an open iommufd.
#[derive(Debug)]
pub struct IommufdHwpt {
    iommufd: Arc<Iommufd>,
    hwpt_id: u32,
    label: String,
}

impl IommufdHwpt {
    pub fn new(iommufd: Arc<Iommufd>, hwpt_id: u32) -> IommufdHwpt {
        let label = format!("{} hwpt {hwpt_id}", iommufd.label());
        IommufdHwpt { iommufd, hwpt_id, label }
    }

    fn named(&self, mut error: DeviceError) -> DeviceError {
        error.device.clone_from(&self.label);
        error
    }
}

impl HwptDirty for IommufdHwpt {
    fn key(&self) -> HwptKey {
        HwptKey::of(&self.iommufd, self.hwpt_id)
    }

    fn label(&self) -> &str {
        &self.label
    }

    fn set_dirty_tracking(&self, enable: bool) -> Result<(), DeviceError> {
        self.iommufd.set_dirty_tracking(self.hwpt_id, enable).map_err(|e| self.named(e))
    }

    fn get_dirty_bitmap(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
        read: DirtyRead,
    ) -> Result<(), DeviceError> {
        self.iommufd
            .get_dirty_bitmap(self.hwpt_id, iova, length, page_size, bitmap, read)
            .map_err(|e| self.named(e))
    }
}

/// The page size a HWPT is read at: the group's (so windows land straight in the group's
/// words), halved while some guest range does not start and end on it, down to 4 KiB. A
/// range aligned outward past its mapping would start the kernel's walk in a hole, where
/// it stops without an error.
fn read_page_size(group_page: u64, guest: &[IovaRange]) -> u64 {
    let mut page = group_page.max(MIN_LOGGING_PAGE_SIZE);
    while page > MIN_LOGGING_PAGE_SIZE
        && guest.iter().any(|r| !r.iova.is_multiple_of(page) || !r.end().is_multiple_of(page))
    {
        page /= 2;
    }
    page
}

/// Dirty tracking by the IOMMU for every device of the group attached to one HWPT.
#[derive(Debug)]
pub struct IommufdHwptSource {
    hwpt: Arc<dyn HwptDirty>,
    name: String,
    devices: Vec<String>,
    /// The read page size and ranges, once started.
    page_size: u64,
    ranges: Vec<IovaRange>,
    /// Read buffer for windows that cannot go straight into the group bitmap.
    scratch: Vec<u64>,
}

impl IommufdHwptSource {
    /// A source over `hwpt` for `devices` (the group's devices attached to it).
    pub fn new(hwpt: Arc<dyn HwptDirty>, devices: Vec<String>) -> IommufdHwptSource {
        let name = hwpt.label().to_owned();
        IommufdHwptSource { hwpt, name, devices, page_size: 0, ranges: Vec::new(), scratch: Vec::new() }
    }

    pub fn key(&self) -> HwptKey {
        self.hwpt.key()
    }

    /// Adds a device of the group that is attached to the same HWPT.
    pub fn add_device(&mut self, device: String) {
        self.devices.push(device);
    }
}

impl DirtySource for IommufdHwptSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn devices(&self) -> Vec<String> {
        self.devices.clone()
    }

    fn kind(&self) -> &'static str {
        "iommufd-hwpt"
    }

    fn start(&mut self, request: &StartRequest<'_>) -> Result<SourceStart, DeviceError> {
        let page_size = read_page_size(request.page_size, request.guest_ranges);
        let ranges = normalize(request.guest_ranges, page_size).map_err(|e| {
            DeviceError::os(&self.name, Op::IommufdSetDirtyTracking, Errno::EINVAL).with_detail(e.to_string())
        })?;
        match self.hwpt.set_dirty_tracking(true) {
            Ok(()) => {
                self.page_size = page_size;
                self.ranges = ranges.clone();
                Ok(SourceStart::Tracking { page_size, ranges })
            }
            Err(e) if e.kind == ErrorKind::Unsupported => Ok(SourceStart::Unsupported {
                reason: format!(
                    "no DMA logging, and the IOMMU cannot track dirty pages on its HWPT (allocated \
                     without IOMMU_HWPT_ALLOC_DIRTY_TRACKING, or no A/D support): {e}"
                ),
            }),
            Err(e) => Err(e),
        }
    }

    fn report(
        &mut self,
        group: &mut DirtyBitmap,
        window_bytes: usize,
        progress: &mut SourceReport,
    ) -> Result<(), DeviceError> {
        let (hwpt, name, page_size) = (&self.hwpt, &self.name, self.page_size);
        report_windows(
            group,
            &self.ranges,
            page_size,
            window_bytes,
            &mut self.scratch,
            progress,
            |iova, length, words| hwpt.get_dirty_bitmap(iova, length, page_size, words, DirtyRead::Clear),
            |e| DeviceError::os(name, Op::IommufdGetDirtyBitmap, Errno::EINVAL).with_detail(e.to_string()),
        )
    }

    fn stop(&mut self) -> Result<(), DeviceError> {
        self.hwpt.set_dirty_tracking(false)
    }
}

#[cfg(test)]
mod tests;
