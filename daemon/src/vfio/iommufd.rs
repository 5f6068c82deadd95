//! An iommufd handle (`/dev/iommu`): IO address spaces, hardware page tables, and the
//! IOMMU's own dirty tracking — the dirty source for devices without DMA logging (virtio,
//! qat, hisi, xe) and a cross-check for those with it (reference §4.3).
//!
//! Neither this machine's kernel nor the 6.12 test kernel has `CONFIG_IOMMUFD`; this module
//! is verified through the syscall seam only.

use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use nix::errno::Errno;

use super::syscalls::{OPEN_RDWR, Syscalls, ioctl_with};
use super::uapi::*;
use crate::device::{DeviceError, Op};

/// The iommufd node.
pub const IOMMUFD_PATH: &str = "/dev/iommu";

/// What `IOMMU_GET_HW_INFO` says about the IOMMU behind a bound device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IommuHwInfo {
    /// `enum iommu_hw_info_type` (VT-d, SMMUv3, AMD ...).
    pub data_type: u32,
    /// `enum iommufd_hw_capabilities` bits.
    pub capabilities: u64,
    pub max_pasid_log2: u8,
}

impl IommuHwInfo {
    /// `IOMMU_HW_CAP_DIRTY_TRACKING`: VT-d second-stage A/D, AMD HAD, SMMUv3 HTTU/DBM.
    pub fn dirty_tracking(&self) -> bool {
        self.capabilities & IOMMU_HW_CAP_DIRTY_TRACKING != 0
    }
}

/// Whether `IOMMU_HWPT_GET_DIRTY_BITMAP` clears the bits it reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyRead {
    /// Read and clear: the normal per-round report.
    Clear,
    /// `IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR`: for the read right before unmapping a range.
    NoClear,
}

impl DirtyRead {
    /// `iommu_hwpt_get_dirty_bitmap.flags` for this read.
    pub fn flags(self) -> u32 {
        match self {
            DirtyRead::Clear => 0,
            DirtyRead::NoClear => IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR,
        }
    }
}

/// An open iommufd. Objects (IOAS, HWPT) live as long as the fd; devices bound to it keep
/// an `Arc` so it outlives them.
pub struct Iommufd {
    sys: Arc<dyn Syscalls>,
    fd: OwnedFd,
    label: String,
}

impl fmt::Debug for Iommufd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Iommufd").field("label", &self.label).field("fd", &self.fd).finish()
    }
}

impl AsFd for Iommufd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Iommufd {
    pub fn open(sys: Arc<dyn Syscalls>, path: &Path) -> Result<Iommufd, DeviceError> {
        let label = path.display().to_string();
        let fd = sys
            .open(path, OPEN_RDWR)
            .map_err(|errno| DeviceError::os(&label, Op::Open, errno).with_detail(format!("open {label}")))?;
        Ok(Iommufd { sys, fd, label })
    }

    /// An iommufd handed over by another process (e.g. the VMM that owns the IOAS).
    pub fn from_owned_fd(sys: Arc<dyn Syscalls>, fd: OwnedFd, label: impl Into<String>) -> Iommufd {
        Iommufd { sys, fd, label: label.into() }
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    fn err(&self, op: Op, errno: Errno) -> DeviceError {
        DeviceError::os(&self.label, op, errno)
    }

    /// `IOMMU_IOAS_ALLOC`: a new, empty IO address space.
    pub fn ioas_alloc(&self) -> Result<u32, DeviceError> {
        let mut arg = IoasAlloc { size: argsz::<IoasAlloc>(), ..Default::default() };
        // SAFETY: IOMMU_IOAS_ALLOC takes `struct iommu_ioas_alloc`, which has no pointers.
        unsafe { ioctl_with(&*self.sys, self.fd.as_fd(), IOMMU_IOAS_ALLOC, &mut arg) }
            .map_err(|e| self.err(Op::IommufdIoasAlloc, e))?;
        Ok(arg.out_ioas_id)
    }

    /// `IOMMU_GET_HW_INFO` for a device bound to this iommufd (no type-specific data).
    pub fn hw_info(&self, dev_id: u32) -> Result<IommuHwInfo, DeviceError> {
        let mut arg = HwInfo { size: argsz::<HwInfo>(), dev_id, ..Default::default() };
        // SAFETY: IOMMU_GET_HW_INFO takes `struct iommu_hw_info`; `data_len` is 0, so the
        // kernel writes nothing through `data_uptr` (0).
        unsafe { ioctl_with(&*self.sys, self.fd.as_fd(), IOMMU_GET_HW_INFO, &mut arg) }
            .map_err(|e| self.err(Op::IommufdHwInfo, e))?;
        Ok(IommuHwInfo {
            data_type: arg.out_data_type,
            capabilities: arg.out_capabilities,
            max_pasid_log2: arg.out_max_pasid_log2,
        })
    }

    /// `IOMMU_HWPT_ALLOC` of a kernel-managed page table over the IOAS `pt_id`; with
    /// `dirty_tracking` the HWPT can track dirty bits (EOPNOTSUPP if the IOMMU cannot).
    /// Automatic HWPTs (attaching a device straight to an IOAS) never can.
    pub fn hwpt_alloc(&self, dev_id: u32, pt_id: u32, dirty_tracking: bool) -> Result<u32, DeviceError> {
        let flags = if dirty_tracking { IOMMU_HWPT_ALLOC_DIRTY_TRACKING } else { 0 };
        let mut arg = HwptAlloc { size: argsz::<HwptAlloc>(), flags, dev_id, pt_id, ..Default::default() };
        // SAFETY: IOMMU_HWPT_ALLOC takes `struct iommu_hwpt_alloc`; data type NONE with
        // `data_len` 0 means the kernel follows no pointer.
        unsafe { ioctl_with(&*self.sys, self.fd.as_fd(), IOMMU_HWPT_ALLOC, &mut arg) }
            .map_err(|e| self.err(Op::IommufdHwptAlloc, e))?;
        Ok(arg.out_hwpt_id)
    }

    /// `IOMMU_HWPT_SET_DIRTY_TRACKING`. Enabling first clears every dirty bit (a clean
    /// snapshot), then starts tracking.
    pub fn set_dirty_tracking(&self, hwpt_id: u32, enable: bool) -> Result<(), DeviceError> {
        let flags = if enable { IOMMU_HWPT_DIRTY_TRACKING_ENABLE } else { 0 };
        let mut arg =
            HwptSetDirtyTracking { size: argsz::<HwptSetDirtyTracking>(), flags, hwpt_id, reserved: 0 };
        // SAFETY: IOMMU_HWPT_SET_DIRTY_TRACKING takes this pointer-free struct.
        unsafe { ioctl_with(&*self.sys, self.fd.as_fd(), IOMMU_HWPT_SET_DIRTY_TRACKING, &mut arg) }
            .map_err(|e| self.err(Op::IommufdSetDirtyTracking, e))?;
        Ok(())
    }

    /// `IOMMU_HWPT_GET_DIRTY_BITMAP` of `[iova, iova + length)`: sets (never clears) bit
    /// `n % 64` of `bitmap[n / 64]` for each dirty page `n = (addr - iova) / page_size`.
    ///
    /// `bitmap` must hold `ceil(length / page_size / 64)` words; a shorter one is refused
    /// with EINVAL before the call, since the kernel would write past it. Only query mapped
    /// ranges: the kernel silently skips unmapped parts (reference §6.21).
    pub fn get_dirty_bitmap(
        &self,
        hwpt_id: u32,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
        read: DirtyRead,
    ) -> Result<(), DeviceError> {
        let op = Op::IommufdGetDirtyBitmap;
        check_bitmap(&self.label, op, length, page_size, bitmap.len())?;
        let flags = read.flags();
        let mut arg = HwptGetDirtyBitmap {
            size: argsz::<HwptGetDirtyBitmap>(),
            hwpt_id,
            flags,
            reserved: 0,
            iova,
            length,
            page_size,
            data: bitmap.as_mut_ptr() as u64,
        };
        // SAFETY: IOMMU_HWPT_GET_DIRTY_BITMAP takes this struct; `data` points to `bitmap`,
        // exclusively borrowed for the call and checked above to cover every bit the kernel
        // may set for `length` at `page_size`.
        unsafe { ioctl_with(&*self.sys, self.fd.as_fd(), IOMMU_HWPT_GET_DIRTY_BITMAP, &mut arg) }
            .map_err(|e| self.err(op, e))?;
        Ok(())
    }
}

/// Refuses, before the kernel sees it, a report it would mishandle: a zero length (wraps
/// inside the bitmap code), a page size that is not a power of two, or a bitmap too short
/// for the range (the kernel would set bits past its end).
pub(crate) fn check_bitmap(
    device: &str,
    op: Op,
    length: u64,
    page_size: u64,
    words: usize,
) -> Result<(), DeviceError> {
    let refuse = |why: String| Err(DeviceError::os(device, op, Errno::EINVAL).with_detail(why));
    if length == 0 {
        return refuse("a report of length 0 is never sent (the kernel would wrap)".into());
    }
    if !page_size.is_power_of_two() {
        return refuse(format!("page size {page_size} is not a power of two"));
    }
    let needed = bitmap_words(length, page_size).unwrap_or(u64::MAX);
    if (words as u64) < needed {
        return refuse(format!(
            "bitmap of {words} words is too short: {length} bytes at page size {page_size} need {needed}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::ErrorKind;
    use crate::vfio::fake::*;
    use crate::vfio::syscalls::IoctlArg;

    fn iommufd(kernel: &Arc<FakeKernel>) -> Iommufd {
        Iommufd::open(kernel.clone(), Path::new(IOMMUFD_PATH)).unwrap()
    }

    #[test]
    fn dirty_tracking_toggles_with_the_exact_bytes() {
        let kernel = Arc::new(FakeKernel::new(|_| Ok(0)));
        let fd = iommufd(&kernel);
        fd.set_dirty_tracking(7, true).unwrap();
        fd.set_dirty_tracking(7, false).unwrap();
        let calls = kernel.ioctls();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].request(), Some(0x3B8B));
        // size 16, flags ENABLE, hwpt_id 7, reserved 0 (reference §4.3).
        let expected_on: Vec<u8> = [16u32, 1, 7, 0].iter().flat_map(|v| v.to_ne_bytes()).collect();
        assert_eq!(calls[0].bytes(), expected_on.as_slice());
        let expected_off: Vec<u8> = [16u32, 0, 7, 0].iter().flat_map(|v| v.to_ne_bytes()).collect();
        assert_eq!(calls[1].bytes(), expected_off.as_slice());
    }

    #[test]
    fn dirty_bitmap_is_encoded_and_filled_like_the_kernel_does() {
        const IOVA: u64 = 0x1_0000_0000;
        const PAGE: u64 = 4096;
        // The fake kernel marks the pages at IOVA + 0, + 3 pages and + 130 pages dirty.
        let kernel = Arc::new(FakeKernel::new(|call| {
            let b = match call {
                Syscall::Open { .. } => return Ok(0),
                Syscall::Ioctl { request: IOMMU_HWPT_GET_DIRTY_BITMAP, arg: IoctlArg::Buffer(b), .. } => b,
                _ => return Err(Errno::ENOTTY),
            };
            let (iova, page_size, data) = (u64_at(b, 16), u64_at(b, 32), u64_at(b, 40));
            for addr in [IOVA, IOVA + 3 * PAGE, IOVA + 130 * PAGE] {
                // SAFETY: `data` is the bitmap the code under test lends for this call;
                // the test sized it for 192 pages, so page 130 is inside it.
                unsafe { set_user_bit(data, (addr - iova) / page_size) };
            }
            Ok(0)
        }));
        let fd = iommufd(&kernel);
        let mut bitmap = vec![0u64; 3];
        fd.get_dirty_bitmap(9, IOVA, 192 * PAGE, PAGE, &mut bitmap, DirtyRead::NoClear).unwrap();
        assert_eq!(bitmap, vec![0b1001, 0, 1 << (130 - 128)]);

        let call = &kernel.ioctls()[0];
        assert_eq!(call.request(), Some(0x3B8C));
        let b = call.bytes();
        assert_eq!(b.len(), 48);
        assert_eq!(u32_at(b, 0), 48, "size");
        assert_eq!(u32_at(b, 4), 9, "hwpt_id");
        assert_eq!(u32_at(b, 8), 1, "flags: NO_CLEAR");
        assert_eq!(u32_at(b, 12), 0, "reserved");
        assert_eq!(u64_at(b, 16), IOVA);
        assert_eq!(u64_at(b, 24), 192 * PAGE);
        assert_eq!(u64_at(b, 32), PAGE);
        assert_eq!(u64_at(b, 40), bitmap.as_ptr() as u64, "data points at the caller's bitmap");

        fd.get_dirty_bitmap(9, IOVA, PAGE, PAGE, &mut bitmap, DirtyRead::Clear).unwrap();
        assert_eq!(u32_at(kernel.ioctls()[1].bytes(), 8), 0, "flags: clear");
    }

    #[test]
    fn short_bitmaps_zero_lengths_and_odd_page_sizes_never_reach_the_kernel() {
        let kernel = Arc::new(FakeKernel::new(|_| Ok(0)));
        let fd = iommufd(&kernel);
        let mut two = vec![0u64; 2];
        let cases = [(129 * 4096, 4096), (0, 4096), (4096, 3000), (4096, 0)];
        for (length, page_size) in cases {
            let err = fd.get_dirty_bitmap(1, 0, length, page_size, &mut two, DirtyRead::Clear).unwrap_err();
            assert_eq!(err.kind, ErrorKind::InvalidRequest, "{length} {page_size}");
        }
        assert!(kernel.ioctls().is_empty());
        // 128 pages fit two words exactly; iommufd allows pages below 4 KiB.
        fd.get_dirty_bitmap(1, 0, 128 * 2048, 2048, &mut two, DirtyRead::Clear).unwrap();
        assert_eq!(kernel.ioctls().len(), 1);
    }

    #[test]
    fn hwpt_alloc_hw_info_and_ioas_alloc_carry_their_flags_and_ids() {
        let kernel = Arc::new(FakeKernel::new(|call| match call {
            Syscall::Ioctl { request: IOMMU_IOAS_ALLOC, arg: IoctlArg::Buffer(b), .. } => {
                put_u32(b, 8, 3);
                Ok(0)
            }
            Syscall::Ioctl { request: IOMMU_GET_HW_INFO, arg: IoctlArg::Buffer(b), .. } => {
                put_u32(b, 24, 1);
                put_u64(b, 32, 1);
                Ok(0)
            }
            Syscall::Ioctl { request: IOMMU_HWPT_ALLOC, arg: IoctlArg::Buffer(b), .. } => {
                put_u32(b, 16, 11);
                Ok(0)
            }
            Syscall::Open { .. } => Ok(0),
            _ => Err(Errno::ENOTTY),
        }));
        let fd = iommufd(&kernel);
        assert_eq!(fd.ioas_alloc().unwrap(), 3);
        let info = fd.hw_info(5).unwrap();
        assert!(info.dirty_tracking());
        assert_eq!(info.data_type, 1);
        assert_eq!(fd.hwpt_alloc(5, 3, true).unwrap(), 11);

        let calls = kernel.ioctls();
        assert_eq!(calls.iter().map(|c| c.request().unwrap()).collect::<Vec<_>>(), [0x3B81, 0x3B8A, 0x3B89]);
        assert_eq!(calls[0].bytes(), [12u32, 0, 0].iter().flat_map(|v| v.to_ne_bytes()).collect::<Vec<_>>());
        let hw = calls[1].bytes();
        assert_eq!((u32_at(hw, 0), u32_at(hw, 8), u32_at(hw, 12), u64_at(hw, 16)), (40, 5, 0, 0));
        let alloc = calls[2].bytes();
        assert_eq!(alloc.len(), 48);
        assert_eq!(u32_at(alloc, 0), 48, "size");
        assert_eq!(u32_at(alloc, 4), 2, "flags: IOMMU_HWPT_ALLOC_DIRTY_TRACKING");
        assert_eq!(u32_at(alloc, 8), 5, "dev_id");
        assert_eq!(u32_at(alloc, 12), 3, "pt_id");
        assert!(alloc[16..].iter().all(|&b| b == 0), "no data, no fault queue");
    }

    #[test]
    fn an_iommu_without_dirty_tracking_is_unsupported() {
        let kernel = Arc::new(FakeKernel::new(|call| match call {
            Syscall::Open { .. } => Ok(0),
            _ => Err(Errno::EOPNOTSUPP),
        }));
        let fd = iommufd(&kernel);
        let err = fd.set_dirty_tracking(2, true).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Unsupported);
        assert_eq!(err.op, Op::IommufdSetDirtyTracking);
        assert!(err.to_string().contains("/dev/iommu"), "{err}");
    }
}
