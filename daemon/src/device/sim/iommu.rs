//! The simulator's IOMMU: HWPTs with dirty tracking, shared by the simulated devices that
//! name them (`[device.iommu] hwpt = "vm1"`), answering `IOMMU_HWPT_SET_DIRTY_TRACKING`
//! and `IOMMU_HWPT_GET_DIRTY_BITMAP` as iommufd and the VT-d/AMD dirty ops do (reference
//! §4.3, trap 21):
//!
//! - SET: flags other than ENABLE → EOPNOTSUPP; an unknown or nested HWPT id → ENOENT; a
//!   HWPT allocated without dirty tracking → EOPNOTSUPP. Enabling first clears every dirty
//!   bit, even when already enabled; disabling leaves the bits. Both are idempotent.
//! - GET: flags other than NO_CLEAR → EOPNOTSUPP; ENOENT as above; `iova + length - 1`
//!   overflowing → EOVERFLOW; `iova` or `iova + length` off the IOMMU page (the IOAS
//!   alignment) or off `page_size`, or `page_size` 0 → EINVAL; no dirty ops → EOPNOTSUPP.
//!   Then it reads, and clears unless NO_CLEAR, from `iova` up to the first unmapped byte:
//!   the kernel drops the walk's error, so the rest is silently left unread — as is
//!   everything while tracking is off (the driver's EINVAL is dropped the same way).
//!   Each dirty IOMMU page sets every `page_size` bit it overlaps.
//! - A device's DMA write dirties the IOMMU pages it touches inside the mappings, only
//!   while the HWPT tracks.
//!
//! Where the simulator is stricter than the kernel: a zero length or a `page_size` that is
//! not a power of two is EINVAL (the kernel computes garbage), and a bitmap too short for
//! the request is ENOMEM (the kernel's answer when it cannot pin the buffer; a short Rust
//! slice cannot be followed past its end). Huge IOPTEs are not modelled: mappings use the
//! IOMMU page, as with `IOMMU_OPTION_HUGE_PAGES = 0`.
//!
//! One [`SimIommu`] stands for one iommufd: the daemon's registry owns one, so two daemons
//! in one process never share a HWPT. Faults on the HWPT operations are those armed on the
//! attached devices ([`FaultOp::HwptSetDirtyTracking`], [`FaultOp::HwptGetDirtyBitmap`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use nix::errno::Errno;

use super::dma::{DeviceDma, Refusal, set_bits};
use super::fault::{FaultOp, Fired};
use super::spec::IommuSpec;
use crate::device::{DeviceError, IovaRange, Op};
use crate::dirty::{HwptDirty, HwptKey};
use crate::vfio::DirtyRead;
use crate::vfio::uapi::{IOMMU_HWPT_DIRTY_TRACKING_ENABLE, IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR};

/// The label of a simulated IOMMU in errors (the kernel's is `/dev/iommu`).
pub const SIM_IOMMU_LABEL: &str = "sim-iommu";

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A simulated iommufd: its HWPT objects, by id and by name.
#[derive(Debug, Default)]
pub struct SimIommu {
    objects: Mutex<Objects>,
}

#[derive(Debug, Default)]
struct Objects {
    last_id: u32,
    table: BTreeMap<u32, Object>,
    /// The paging HWPTs devices name, with their ids.
    by_name: BTreeMap<String, (u32, Arc<SimHwpt>)>,
}

#[derive(Debug)]
enum Object {
    Paging(Arc<SimHwpt>),
    /// A nested HWPT: a valid object, but not one dirty tracking applies to.
    Nested,
}

impl Objects {
    fn insert(&mut self, object: Object) -> u32 {
        self.last_id += 1;
        self.table.insert(self.last_id, object);
        self.last_id
    }
}

impl SimIommu {
    pub fn new() -> Arc<SimIommu> {
        Arc::new(SimIommu::default())
    }

    /// The HWPT `spec` names, allocated on first use; every later user must describe it
    /// identically.
    pub(crate) fn hwpt(&self, spec: &IommuSpec) -> Result<(u32, Arc<SimHwpt>), String> {
        let mut objects = lock(&self.objects);
        if let Some((id, hwpt)) = objects.by_name.get(&spec.hwpt) {
            if hwpt.spec != *spec {
                return Err(format!(
                    "HWPT `{}` is already described differently by another device: {:?}",
                    spec.hwpt, hwpt.spec
                ));
            }
            return Ok((*id, Arc::clone(hwpt)));
        }
        let hwpt = Arc::new(SimHwpt::new(spec.clone()));
        let id = objects.insert(Object::Paging(Arc::clone(&hwpt)));
        objects.by_name.insert(spec.hwpt.clone(), (id, Arc::clone(&hwpt)));
        Ok((id, hwpt))
    }

    /// The id of the HWPT named `name`.
    pub fn hwpt_id(&self, name: &str) -> Option<u32> {
        lock(&self.objects).by_name.get(name).map(|(id, _)| *id)
    }

    /// `IOMMU_HWPT_ALLOC` of a nested HWPT over the paging HWPT `parent`.
    pub fn alloc_nested(&self, parent: u32) -> Result<u32, Errno> {
        let mut objects = lock(&self.objects);
        match objects.table.get(&parent) {
            Some(Object::Paging(_)) => Ok(objects.insert(Object::Nested)),
            _ => Err(Errno::ENOENT),
        }
    }

    /// Whether the HWPT named `name` is tracking dirty pages.
    pub fn dirty_tracking_enabled(&self, name: &str) -> Option<bool> {
        let hwpt = lock(&self.objects).by_name.get(name).map(|(_, hwpt)| Arc::clone(hwpt))?;
        Some(hwpt.state().tracking)
    }

    /// `iommufd_get_hwpt_paging()`: ENOENT for unknown ids and for non-paging HWPTs.
    fn paging(&self, hwpt_id: u32) -> Result<Arc<SimHwpt>, Refusal> {
        match lock(&self.objects).table.get(&hwpt_id) {
            Some(Object::Paging(hwpt)) => Ok(Arc::clone(hwpt)),
            Some(Object::Nested) => {
                Err((Errno::ENOENT, format!("HWPT {hwpt_id} is nested, not a paging HWPT")))
            }
            None => Err((Errno::ENOENT, format!("no HWPT {hwpt_id}"))),
        }
    }

    /// `IOMMU_HWPT_SET_DIRTY_TRACKING` with the raw `flags` word.
    pub fn set_dirty_tracking(&self, hwpt_id: u32, flags: u32) -> Result<(), Refusal> {
        if flags & !IOMMU_HWPT_DIRTY_TRACKING_ENABLE != 0 {
            return Err((Errno::EOPNOTSUPP, format!("unknown flags {flags:#x}")));
        }
        let hwpt = self.paging(hwpt_id)?;
        hwpt.faults(FaultOp::HwptSetDirtyTracking)?;
        if !hwpt.spec.dirty_tracking {
            return Err((Errno::EOPNOTSUPP, format!("HWPT `{}` has no dirty tracking ops", hwpt.spec.hwpt)));
        }
        let enable = flags & IOMMU_HWPT_DIRTY_TRACKING_ENABLE != 0;
        {
            let mut state = hwpt.state();
            if enable {
                // iopt_set_dirty_tracking(): a clean snapshot first, every time.
                state.dirty.clear();
            }
            state.tracking = enable;
        }
        if enable {
            for device in hwpt.devices() {
                device.hwpt_tracking_started();
            }
        }
        Ok(())
    }

    /// `IOMMU_HWPT_GET_DIRTY_BITMAP` with the raw `flags` word; `bitmap` is the user
    /// buffer the kernel would pin.
    pub fn get_dirty_bitmap(
        &self,
        hwpt_id: u32,
        flags: u32,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), Refusal> {
        if flags & !IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR != 0 {
            return Err((Errno::EOPNOTSUPP, format!("unknown flags {flags:#x}")));
        }
        let hwpt = self.paging(hwpt_id)?;
        hwpt.faults(FaultOp::HwptGetDirtyBitmap)?;
        let span = format!("[{iova:#x}, +{length:#x})");
        let Some(last) = iova.checked_add(length.wrapping_sub(1)) else {
            return Err((Errno::EOVERFLOW, format!("{span} overflows")));
        };
        if length == 0 {
            return Err((Errno::EINVAL, "length 0".into()));
        }
        let align = hwpt.spec.page_size;
        let end_aligned = |unit: u64| last.wrapping_add(1).is_multiple_of(unit);
        if !iova.is_multiple_of(align) || !end_aligned(align) {
            return Err((Errno::EINVAL, format!("{span} is not aligned to the IOMMU page {align:#x}")));
        }
        if !page_size.is_power_of_two() {
            return Err((Errno::EINVAL, format!("page size {page_size:#x} is not a power of two")));
        }
        if !iova.is_multiple_of(page_size) || !end_aligned(page_size) {
            return Err((Errno::EINVAL, format!("{span} is not aligned to the page size {page_size:#x}")));
        }
        if !hwpt.spec.dirty_tracking {
            return Err((Errno::EOPNOTSUPP, format!("HWPT `{}` has no dirty tracking ops", hwpt.spec.hwpt)));
        }
        let bits = (last - iova) / page_size + 1;
        if (bitmap.len() as u64) < bits.div_ceil(64) {
            return Err((Errno::ENOMEM, format!("bitmap of {} words for {bits} pages", bitmap.len())));
        }
        for device in hwpt.devices() {
            device.before_hwpt_read();
        }
        hwpt.read(iova, last, page_size, bitmap, flags & IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR == 0);
        Ok(())
    }
}

/// A paging HWPT of the simulated IOMMU.
pub(crate) struct SimHwpt {
    spec: IommuSpec,
    /// Sorted; empty means everything is mapped.
    mapped: Vec<IovaRange>,
    page_shift: u32,
    state: Mutex<HwptState>,
    devices: Mutex<Vec<Weak<DeviceDma>>>,
}

#[derive(Debug, Default)]
struct HwptState {
    tracking: bool,
    /// Dirty IOMMU pages (`iova >> page_shift`).
    dirty: BTreeSet<u64>,
}

impl fmt::Debug for SimHwpt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimHwpt").field("spec", &self.spec).finish_non_exhaustive()
    }
}

impl SimHwpt {
    fn new(spec: IommuSpec) -> SimHwpt {
        SimHwpt {
            mapped: spec.mapped_ranges(),
            page_shift: spec.page_size.trailing_zeros(),
            spec,
            state: Mutex::new(HwptState::default()),
            devices: Mutex::new(Vec::new()),
        }
    }

    fn state(&self) -> MutexGuard<'_, HwptState> {
        lock(&self.state)
    }

    /// `VFIO_DEVICE_ATTACH_IOMMUFD_PT` of a device to this HWPT.
    pub fn attach(&self, device: Weak<DeviceDma>) {
        let mut devices = lock(&self.devices);
        devices.retain(|d| d.strong_count() > 0);
        devices.push(device);
    }

    /// The attached devices still alive (taken out of the lock: their hooks lock the
    /// device, then this HWPT's state).
    fn devices(&self) -> Vec<Arc<DeviceDma>> {
        lock(&self.devices).iter().filter_map(Weak::upgrade).collect()
    }

    /// Every attached device's faults on `op`: stalls add up, the first errno wins.
    fn faults(&self, op: FaultOp) -> Result<(), Refusal> {
        let mut stall = std::time::Duration::ZERO;
        let mut failure = None;
        for device in self.devices() {
            let Fired { stall: more, errno, .. } = device.hwpt_faults(op);
            stall += more;
            if let (None, Some(errno)) = (&failure, errno) {
                failure = Some((errno, format!("injected fault (device {})", device.name())));
            }
        }
        if !stall.is_zero() {
            std::thread::sleep(stall);
        }
        failure.map_or(Ok(()), Err)
    }

    /// The mapped ranges random DMA writes may land in, while tracking: `None` when
    /// everything is mapped (no finite window) or tracking is off.
    pub fn write_window(&self) -> Option<Vec<IovaRange>> {
        (self.state().tracking && !self.mapped.is_empty()).then(|| self.mapped.clone())
    }

    /// The device wrote `[iova, iova + length)`: the IOMMU sets the dirty bit of every
    /// mapped IOPTE it went through, while tracking.
    pub fn device_write(&self, iova: u64, length: u64) {
        if length == 0 {
            return;
        }
        let mut state = self.state();
        if !state.tracking {
            return;
        }
        let last = iova.saturating_add(length - 1);
        let mut mark =
            |lo: u64, hi: u64| state.dirty.extend((lo >> self.page_shift)..=(hi >> self.page_shift));
        if self.mapped.is_empty() {
            mark(iova, last);
            return;
        }
        for range in &self.mapped {
            let (lo, hi) = (iova.max(range.iova), last.min(range.end() - 1));
            if lo <= hi {
                mark(lo, hi);
            }
        }
    }

    /// The last byte the kernel's walk reaches from `iova` toward `last`: the end of the
    /// contiguous mappings starting at `iova` (`None` if `iova` itself is unmapped).
    fn walk_end(&self, iova: u64, last: u64) -> Option<u64> {
        if self.mapped.is_empty() {
            return Some(last);
        }
        let mut index = self.mapped.partition_point(|r| r.end() <= iova);
        let first = self.mapped.get(index).filter(|r| r.iova <= iova)?;
        let mut reached = first.end() - 1;
        while reached < last {
            index += 1;
            match self.mapped.get(index) {
                Some(next) if next.iova == reached + 1 => reached = next.end() - 1,
                _ => break,
            }
        }
        Some(reached.min(last))
    }

    /// The read itself, on a checked request.
    fn read(&self, iova: u64, last: u64, page_size: u64, bitmap: &mut [u64], clear: bool) {
        let mut state = self.state();
        if !state.tracking {
            return;
        }
        let Some(reached) = self.walk_end(iova, last) else { return };
        let shift = self.page_shift;
        let found: Vec<u64> = state.dirty.range((iova >> shift)..=(reached >> shift)).copied().collect();
        for &page in &found {
            let lo = (page << shift).max(iova);
            let hi = ((page << shift) + ((1 << shift) - 1)).min(reached);
            set_bits(bitmap, (lo - iova) / page_size, (hi - iova) / page_size);
        }
        if clear {
            for page in found {
                state.dirty.remove(&page);
            }
        }
    }
}

/// A device's handle on its HWPT, for the dirty tracker.
#[derive(Debug)]
pub struct SimHwptHandle {
    iommu: Arc<SimIommu>,
    hwpt_id: u32,
    label: String,
}

impl SimHwptHandle {
    pub fn new(iommu: Arc<SimIommu>, hwpt_id: u32, name: &str) -> SimHwptHandle {
        SimHwptHandle { iommu, hwpt_id, label: format!("{SIM_IOMMU_LABEL} hwpt {name}") }
    }

    fn error(&self, op: Op, (errno, why): Refusal) -> DeviceError {
        DeviceError::os(&self.label, op, errno).with_detail(why)
    }
}

impl HwptDirty for SimHwptHandle {
    fn key(&self) -> HwptKey {
        HwptKey::of(&self.iommu, self.hwpt_id)
    }

    fn label(&self) -> &str {
        &self.label
    }

    fn set_dirty_tracking(&self, enable: bool) -> Result<(), DeviceError> {
        let flags = if enable { IOMMU_HWPT_DIRTY_TRACKING_ENABLE } else { 0 };
        self.iommu
            .set_dirty_tracking(self.hwpt_id, flags)
            .map_err(|refusal| self.error(Op::IommufdSetDirtyTracking, refusal))
    }

    fn get_dirty_bitmap(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
        read: DirtyRead,
    ) -> Result<(), DeviceError> {
        let flags = read.flags();
        self.iommu
            .get_dirty_bitmap(self.hwpt_id, flags, iova, length, page_size, bitmap)
            .map_err(|refusal| self.error(Op::IommufdGetDirtyBitmap, refusal))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::device::MigrationDevice;
    use crate::device::sim::fault::Fault;
    use crate::device::sim::spec::IommuMapping;
    use crate::device::sim::{SimDevice, SimSpec, SimSpecError};

    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;
    const ENABLE: u32 = IOMMU_HWPT_DIRTY_TRACKING_ENABLE;
    const NO_CLEAR: u32 = IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR;

    fn mapping(iova: u64, length: u64) -> IommuMapping {
        IommuMapping { iova, length }
    }

    /// A simulated IOMMU with one device (no DMA logging) on HWPT `vm1` as `iommu` says.
    fn one_device(iommu: IommuSpec) -> (Arc<SimIommu>, SimDevice, u32) {
        let sim_iommu = SimIommu::new();
        let mut spec = SimSpec::new("dev");
        spec.dma_logging.supported = false;
        spec.iommu = Some(iommu);
        let device = SimDevice::with_iommu(spec, &sim_iommu).unwrap();
        let id = sim_iommu.hwpt_id("vm1").unwrap();
        (sim_iommu, device, id)
    }

    fn errno(result: Result<(), Refusal>) -> Errno {
        result.unwrap_err().0
    }

    /// The bit numbers set in `bitmap`.
    fn bits(bitmap: &[u64]) -> Vec<u64> {
        (0..bitmap.len() as u64 * 64).filter(|&n| bitmap[(n / 64) as usize] >> (n % 64) & 1 == 1).collect()
    }

    #[test]
    fn set_dirty_tracking_refuses_like_iommufd() {
        let (iommu, _dev, id) = one_device(IommuSpec::new("vm1"));
        assert_eq!(errno(iommu.set_dirty_tracking(id, 2)), Errno::EOPNOTSUPP, "unknown flag");
        assert_eq!(errno(iommu.set_dirty_tracking(id + 100, ENABLE)), Errno::ENOENT, "unknown id");
        let nested = iommu.alloc_nested(id).unwrap();
        assert_eq!(errno(iommu.set_dirty_tracking(nested, ENABLE)), Errno::ENOENT, "nested HWPT");
        assert_eq!(iommu.alloc_nested(nested), Err(Errno::ENOENT), "nested over nested");
        iommu.set_dirty_tracking(id, ENABLE).unwrap();
        iommu.set_dirty_tracking(id, ENABLE).unwrap();
        assert_eq!(iommu.dirty_tracking_enabled("vm1"), Some(true));
        iommu.set_dirty_tracking(id, 0).unwrap();
        iommu.set_dirty_tracking(id, 0).unwrap();
        assert_eq!(iommu.dirty_tracking_enabled("vm1"), Some(false));

        let (iommu, _dev, id) = one_device(IommuSpec { dirty_tracking: false, ..IommuSpec::new("vm1") });
        assert_eq!(errno(iommu.set_dirty_tracking(id, ENABLE)), Errno::EOPNOTSUPP, "no dirty ops");
        let mut bitmap = [0u64; 1];
        assert_eq!(errno(iommu.get_dirty_bitmap(id, 0, 0, 4096, 4096, &mut bitmap)), Errno::EOPNOTSUPP);
    }

    #[test]
    fn get_dirty_bitmap_checks_the_request_like_iommufd() {
        let (iommu, _dev, id) = one_device(IommuSpec { page_size: 8 * KIB, ..IommuSpec::new("vm1") });
        iommu.set_dirty_tracking(id, ENABLE).unwrap();
        let mut bitmap = [0u64; 4];
        let mut get = |flags: u32, iova: u64, length: u64, page: u64| {
            iommu.get_dirty_bitmap(id, flags, iova, length, page, &mut bitmap).map_err(|e| e.0)
        };
        assert_eq!(get(2, 0, 8 * KIB, 4096), Err(Errno::EOPNOTSUPP), "unknown flag");
        assert_eq!(get(0, u64::MAX - 8191, 16 * KIB, 4096), Err(Errno::EOVERFLOW));
        assert_eq!(get(0, 8 * KIB, 0, 4096), Err(Errno::EOVERFLOW), "length 0 wraps");
        assert_eq!(get(0, 0, 0, 4096), Err(Errno::EINVAL), "length 0 at IOVA 0");
        assert_eq!(get(0, 4 * KIB, 8 * KIB, 4096), Err(Errno::EINVAL), "start off the IOMMU page");
        assert_eq!(get(0, 0, 12 * KIB, 4096), Err(Errno::EINVAL), "end off the IOMMU page");
        assert_eq!(get(0, 0, 8 * KIB, 0), Err(Errno::EINVAL), "page size 0");
        assert_eq!(get(0, 0, 8 * KIB, 3000), Err(Errno::EINVAL), "page size not a power of two");
        assert_eq!(get(0, 8 * KIB, 16 * KIB, 16 * KIB), Err(Errno::EINVAL), "off the page size");
        assert_eq!(get(0, 0, 1024 * 8 * KIB, 2 * KIB), Err(Errno::ENOMEM), "bitmap too short");
        assert_eq!(get(NO_CLEAR, 0, 64 * KIB, 2 * KIB), Ok(()));
        assert_eq!(errno(iommu.get_dirty_bitmap(id + 7, 0, 0, 8192, 4096, &mut [0])), Errno::ENOENT);
    }

    #[test]
    fn reads_clear_unless_no_clear_and_enabling_starts_clean() {
        let (iommu, dev, id) = one_device(IommuSpec::new("vm1"));
        dev.dma_write(0x3000, 1);
        let mut bitmap = [0u64; 1];
        iommu.set_dirty_tracking(id, ENABLE).unwrap();
        iommu.get_dirty_bitmap(id, 0, 0, 64 * 4096, 4096, &mut bitmap).unwrap();
        assert!(bits(&bitmap).is_empty(), "a write before tracking leaves no trace");

        dev.dma_write(0x3000, 1);
        dev.dma_write(0x5fff, 2);
        let mut bitmap = [1u64 << 63];
        iommu.get_dirty_bitmap(id, NO_CLEAR, 0, 64 * 4096, 4096, &mut bitmap).unwrap();
        assert_eq!(bits(&bitmap), [3, 5, 6, 63], "bits only set, the caller's kept");
        let mut bitmap = [0u64];
        iommu.get_dirty_bitmap(id, 0, 0, 64 * 4096, 4096, &mut bitmap).unwrap();
        assert_eq!(bits(&bitmap), [3, 5, 6], "NO_CLEAR left them");
        let mut bitmap = [0u64];
        iommu.get_dirty_bitmap(id, 0, 0, 64 * 4096, 4096, &mut bitmap).unwrap();
        assert!(bits(&bitmap).is_empty(), "read and cleared");

        // Bits left when tracking stops are dropped by the next enable.
        dev.dma_write(0x1000, 1);
        iommu.set_dirty_tracking(id, 0).unwrap();
        dev.dma_write(0x2000, 1);
        let mut bitmap = [0u64];
        iommu.get_dirty_bitmap(id, 0, 0, 64 * 4096, 4096, &mut bitmap).unwrap();
        assert!(bits(&bitmap).is_empty(), "a read while tracking is off succeeds with nothing");
        iommu.set_dirty_tracking(id, ENABLE).unwrap();
        iommu.get_dirty_bitmap(id, 0, 0, 64 * 4096, 4096, &mut bitmap).unwrap();
        assert!(bits(&bitmap).is_empty(), "enable cleared the stale bit");
    }

    #[test]
    fn one_iommu_page_sets_every_report_page_it_overlaps() {
        let (iommu, dev, id) = one_device(IommuSpec { page_size: 8 * KIB, ..IommuSpec::new("vm1") });
        iommu.set_dirty_tracking(id, ENABLE).unwrap();
        dev.dma_write(3 * 8 * KIB + 5, 1);
        let mut bitmap = [0u64];
        iommu.get_dirty_bitmap(id, NO_CLEAR, 0, 32 * 2 * KIB, 2 * KIB, &mut bitmap).unwrap();
        assert_eq!(bits(&bitmap), [12, 13, 14, 15], "one 8 KiB IOPTE = four 2 KiB pages");
        let mut bitmap = [0u64];
        iommu.get_dirty_bitmap(id, 0, 0, 64 * KIB, 32 * KIB, &mut bitmap).unwrap();
        assert_eq!(bits(&bitmap), [0]);
    }

    #[test]
    fn the_walk_stops_at_the_first_unmapped_byte_without_an_error() {
        let mapped = vec![mapping(0, MIB), mapping(MIB, MIB), mapping(3 * MIB, MIB)];
        let (iommu, dev, id) = one_device(IommuSpec { mapped, ..IommuSpec::new("vm1") });
        iommu.set_dirty_tracking(id, ENABLE).unwrap();
        for iova in [MIB / 2, 3 * MIB / 2, 5 * MIB / 2, 7 * MIB / 2] {
            dev.dma_write(iova, 1);
        }
        let page = 64 * KIB;
        let mut bitmap = [0u64];
        iommu.get_dirty_bitmap(id, 0, 0, 4 * MIB, page, &mut bitmap).unwrap();
        assert_eq!(bits(&bitmap), [8, 24], "two touching mappings, then the hole at 2 MiB ends the walk");
        let mut bitmap = [0u64];
        iommu.get_dirty_bitmap(id, 0, 2 * MIB, 2 * MIB, page, &mut bitmap).unwrap();
        assert!(bits(&bitmap).is_empty(), "a read starting in a hole reads nothing");
        iommu.get_dirty_bitmap(id, 0, 3 * MIB, MIB, page, &mut bitmap).unwrap();
        assert_eq!(bits(&bitmap), [8], "the write at 3.5 MiB was never read, never cleared");
    }

    #[test]
    fn devices_naming_a_hwpt_share_it_and_must_agree_on_it() {
        let iommu = SimIommu::new();
        let mut a = SimSpec::new("a");
        a.iommu = Some(IommuSpec::new("vm1"));
        let b = SimSpec { name: "b".into(), ..a.clone() };
        let other = SimSpec { name: "c".into(), iommu: Some(IommuSpec::new("vm2")), ..a.clone() };
        let (a, b, c) = (
            SimDevice::with_iommu(a, &iommu).unwrap(),
            SimDevice::with_iommu(b, &iommu).unwrap(),
            SimDevice::with_iommu(other, &iommu).unwrap(),
        );
        let key = |d: &SimDevice| d.dirty_tracking_hwpt().unwrap().key();
        assert_eq!(key(&a), key(&b));
        assert_ne!(key(&a), key(&c));
        assert_eq!(a.dirty_tracking_hwpt().unwrap().label(), "sim-iommu hwpt vm1");
        // The same name on another IOMMU (another daemon) is another HWPT.
        let elsewhere =
            SimDevice::with_iommu(SimSpec { name: "d".into(), ..a.spec().clone() }, &SimIommu::new());
        assert_ne!(key(&a), key(&elsewhere.unwrap()));

        let conflicting = SimSpec {
            name: "e".into(),
            iommu: Some(IommuSpec { page_size: 8 * KIB, ..IommuSpec::new("vm1") }),
            ..SimSpec::new("e")
        };
        let err = SimDevice::with_iommu(conflicting, &iommu).unwrap_err();
        assert!(matches!(&err, SimSpecError::Iommu { name, .. } if name == "e"), "{err}");
        assert!(err.to_string().contains("described differently"), "{err}");
        assert!(SimDevice::new(SimSpec::new("plain")).unwrap().dirty_tracking_hwpt().is_none());
    }

    #[test]
    fn every_device_writes_into_its_hwpt_with_or_without_logging() {
        let iommu = SimIommu::new();
        let mut logging = SimSpec::new("logging");
        logging.iommu = Some(IommuSpec::new("vm1"));
        let mut silent = SimSpec::new("silent");
        silent.dma_logging.supported = false;
        silent.iommu = Some(IommuSpec::new("vm1"));
        let (logging, silent) =
            (SimDevice::with_iommu(logging, &iommu).unwrap(), SimDevice::with_iommu(silent, &iommu).unwrap());
        let hwpt = silent.dirty_tracking_hwpt().unwrap();
        hwpt.set_dirty_tracking(true).unwrap();
        logging.dma_write(0, 1);
        silent.dma_write(2 * 4096, 1);
        let mut bitmap = [0u64];
        hwpt.get_dirty_bitmap(0, 64 * 4096, 4096, &mut bitmap, DirtyRead::Clear).unwrap();
        assert_eq!(bits(&bitmap), [0, 2]);
        assert!(!logging.dma_logging_active(), "the HWPT saw it; the device was never asked to log");
    }

    #[test]
    fn configured_writes_land_in_the_mappings_while_the_hwpt_tracks() {
        let iommu = SimIommu::new();
        let mut spec = SimSpec::new("gen");
        spec.dma_logging.supported = false;
        spec.dma_logging.writes.iovas = vec![5 * 4096];
        spec.dma_logging.writes.per_report = 4;
        spec.iommu = Some(IommuSpec { mapped: vec![mapping(MIB, MIB)], ..IommuSpec::new("vm1") });
        let dev = SimDevice::with_iommu(spec, &iommu).unwrap();
        let hwpt = dev.dirty_tracking_hwpt().unwrap();
        hwpt.set_dirty_tracking(true).unwrap();
        let mut low = [0u64];
        hwpt.get_dirty_bitmap(0, 64 * 4096, 4096, &mut low, DirtyRead::NoClear).unwrap();
        assert!(bits(&low).is_empty(), "the scripted IOVA is not mapped: nothing dirty there");
        let mut mapped = [0u64; 4];
        hwpt.get_dirty_bitmap(MIB, MIB, 4096, &mut mapped, DirtyRead::Clear).unwrap();
        let found = bits(&mapped).len();
        assert!((1..=8).contains(&found), "4 random writes per read, two reads so far: {found}");

        // A device whose HWPT tracks with a mapped scripted IOVA dirties it at enable.
        let iommu = SimIommu::new();
        let mut spec = SimSpec::new("script");
        spec.dma_logging.supported = false;
        spec.dma_logging.writes.iovas = vec![MIB + 3 * 4096];
        spec.iommu = Some(IommuSpec::new("vm1"));
        let dev = SimDevice::with_iommu(spec, &iommu).unwrap();
        let hwpt = dev.dirty_tracking_hwpt().unwrap();
        hwpt.set_dirty_tracking(true).unwrap();
        let mut bitmap = [0u64];
        hwpt.get_dirty_bitmap(MIB, 64 * 4096, 4096, &mut bitmap, DirtyRead::Clear).unwrap();
        assert_eq!(bits(&bitmap), [3]);
    }

    #[test]
    fn faults_armed_on_an_attached_device_fire_on_the_hwpt() {
        let (iommu, dev, _) = one_device(IommuSpec::new("vm1"));
        dev.inject(Fault::errno(FaultOp::HwptSetDirtyTracking, Errno::EIO).once());
        dev.inject(Fault::errno(FaultOp::HwptGetDirtyBitmap, Errno::ENOMEM).nth(2));
        let hwpt = dev.dirty_tracking_hwpt().unwrap();
        let err = hwpt.set_dirty_tracking(true).unwrap_err();
        assert_eq!((err.op, err.errno), (Op::IommufdSetDirtyTracking, Errno::EIO));
        assert!(err.to_string().contains("sim-iommu hwpt vm1") && err.to_string().contains("dev"), "{err}");
        assert_eq!(iommu.dirty_tracking_enabled("vm1"), Some(false), "a failed SET changed nothing");
        hwpt.set_dirty_tracking(true).unwrap();
        let mut bitmap = [0u64];
        hwpt.get_dirty_bitmap(0, 4096, 4096, &mut bitmap, DirtyRead::Clear).unwrap();
        let err = hwpt.get_dirty_bitmap(0, 4096, 4096, &mut bitmap, DirtyRead::Clear).unwrap_err();
        assert_eq!((err.op, err.errno), (Op::IommufdGetDirtyBitmap, Errno::ENOMEM));
        let faults =
            dev.arc_log().iter().filter(|e| matches!(e.event, super::super::ArcEvent::Fault(_))).count();
        assert_eq!(faults, 2, "both fired faults are in the device's arc log");
        // A stall delays the operation, then it proceeds.
        dev.inject(Fault::stall(FaultOp::HwptGetDirtyBitmap, Duration::from_millis(1)).once());
        hwpt.get_dirty_bitmap(0, 4096, 4096, &mut bitmap, DirtyRead::Clear).unwrap();
    }
}
