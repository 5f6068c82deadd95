//! The VFIO and iommufd uAPI as the kernel lays it out: request numbers, flag words and
//! `#[repr(C)]` argument structs (`include/uapi/linux/vfio.h`, `include/uapi/linux/iommufd.h`).
//!
//! Written by hand rather than taken from `vfio-bindings`, so that the daemon owns exactly
//! the subset it sends and can model features newer than a given bindings release; the
//! layout tests compare every struct and request number against the bindings crates and
//! against the literal values in the kernel reference (docs: kernel-vfio-uapi.md §1).
//!
//! Every struct here is plain data: integer fields only and no padding, which the
//! `uapi_struct!` macro checks at compile time. That is what makes it sound to hand the
//! kernel (or a test's fake kernel) the struct's bytes.

use std::mem::size_of;

/// Marker for uAPI argument structs whose bytes may be handed to the kernel as they are.
///
/// # Safety
///
/// Implementors must be `#[repr(C)]`, consist of integer fields (or arrays of them) only,
/// and contain no padding, so every byte is initialised and every bit pattern is valid.
pub unsafe trait Pod: Copy + Default + Send + Sync + 'static {}

/// Defines a `#[repr(C)]` uAPI struct, proves at compile time that it has no padding, and
/// marks it [`Pod`].
macro_rules! uapi_struct {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$fmeta:meta])* pub $field:ident : $ty:ty),* $(,)? }) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct $name { $($(#[$fmeta])* pub $field: $ty),* }

        const _: () = assert!(size_of::<$name>() == 0 $(+ size_of::<$ty>())*, "uAPI struct has padding");

        // SAFETY: `#[repr(C)]`, integer fields only, and the assertion above proves the size
        // is the sum of the field sizes, i.e. there is no padding.
        unsafe impl Pod for $name {}
    };
}

// ---------------------------------------------------------------------------------------
// Request numbers. Every VFIO and iommufd ioctl is `_IO(';', nr)`: no size, no direction
// bits, whatever the `_IOWR` in the header comments says (reference §1.1).

/// `VFIO_TYPE`, `';'`; iommufd uses the same type byte.
pub const VFIO_TYPE: u32 = b';' as u32;
/// `VFIO_BASE`.
pub const VFIO_BASE: u32 = 100;
/// `IOMMUFD_CMD_BASE`: iommufd command numbers start here.
pub const IOMMUFD_CMD_BASE: u32 = 0x80;

/// `_IO(';', nr)`.
const fn io(nr: u32) -> u64 {
    ((VFIO_TYPE << 8) | nr) as u64
}

/// Container: the API version, `VFIO_API_VERSION` (0) on every kernel.
pub const VFIO_GET_API_VERSION: u64 = io(VFIO_BASE);
/// Container: whether an IOMMU backend is available (argument by value).
pub const VFIO_CHECK_EXTENSION: u64 = io(VFIO_BASE + 1);
/// Container: select the IOMMU backend (argument by value).
pub const VFIO_SET_IOMMU: u64 = io(VFIO_BASE + 2);
/// Group: [`GroupStatus`].
pub const VFIO_GROUP_GET_STATUS: u64 = io(VFIO_BASE + 3);
/// Group: attach to a container (argument: pointer to the container fd).
pub const VFIO_GROUP_SET_CONTAINER: u64 = io(VFIO_BASE + 4);
/// Group: get a device fd (argument: NUL-terminated device name; returns the fd).
pub const VFIO_GROUP_GET_DEVICE_FD: u64 = io(VFIO_BASE + 6);
/// Device: [`DeviceInfo`].
pub const VFIO_DEVICE_GET_INFO: u64 = io(VFIO_BASE + 7);
/// Device: [`RegionInfo`].
pub const VFIO_DEVICE_GET_REGION_INFO: u64 = io(VFIO_BASE + 8);
/// Device: reset; the migration FSM returns to RUNNING.
pub const VFIO_DEVICE_RESET: u64 = io(VFIO_BASE + 11);
/// Device: the feature multiplexer ([`FeatureHeader`] + payload).
pub const VFIO_DEVICE_FEATURE: u64 = io(VFIO_BASE + 17);
/// Device cdev: [`DeviceBindIommufd`].
pub const VFIO_DEVICE_BIND_IOMMUFD: u64 = io(VFIO_BASE + 18);
/// Device cdev: [`DeviceAttachIommufdPt`].
pub const VFIO_DEVICE_ATTACH_IOMMUFD_PT: u64 = io(VFIO_BASE + 19);
/// Saving data_fd (not the device fd): [`VfioPrecopyInfo`].
pub const VFIO_MIG_GET_PRECOPY_INFO: u64 = io(VFIO_BASE + 21);

/// iommufd: [`IoasAlloc`].
pub const IOMMU_IOAS_ALLOC: u64 = io(IOMMUFD_CMD_BASE + 0x01);
/// iommufd: [`HwptAlloc`].
pub const IOMMU_HWPT_ALLOC: u64 = io(IOMMUFD_CMD_BASE + 0x09);
/// iommufd: [`HwInfo`].
pub const IOMMU_GET_HW_INFO: u64 = io(IOMMUFD_CMD_BASE + 0x0A);
/// iommufd: [`HwptSetDirtyTracking`].
pub const IOMMU_HWPT_SET_DIRTY_TRACKING: u64 = io(IOMMUFD_CMD_BASE + 0x0B);
/// iommufd: [`HwptGetDirtyBitmap`].
pub const IOMMU_HWPT_GET_DIRTY_BITMAP: u64 = io(IOMMUFD_CMD_BASE + 0x0C);

// ---------------------------------------------------------------------------------------
// Container and group.

/// The only VFIO API version there has ever been.
pub const VFIO_API_VERSION: i32 = 0;
/// `VFIO_TYPE1v2_IOMMU`.
pub const VFIO_TYPE1V2_IOMMU: u32 = 3;
/// Every device of the group is bound to a VFIO driver (or none).
pub const VFIO_GROUP_FLAGS_VIABLE: u32 = 1 << 0;
/// The group is attached to a container.
pub const VFIO_GROUP_FLAGS_CONTAINER_SET: u32 = 1 << 1;

uapi_struct! {
    /// `struct vfio_group_status`.
    pub struct GroupStatus {
        pub argsz: u32,
        pub flags: u32,
    }
}

// ---------------------------------------------------------------------------------------
// Device information and regions.

/// The device supports `VFIO_DEVICE_RESET`.
pub const VFIO_DEVICE_FLAGS_RESET: u32 = 1 << 0;
/// A PCI device (mdevs such as mtty present themselves as PCI too).
pub const VFIO_DEVICE_FLAGS_PCI: u32 = 1 << 1;

uapi_struct! {
    /// `struct vfio_device_info`.
    pub struct DeviceInfo {
        pub argsz: u32,
        pub flags: u32,
        pub num_regions: u32,
        pub num_irqs: u32,
        pub cap_offset: u32,
        pub pad: u32,
    }
}

/// Region index of PCI BAR0 (`VFIO_PCI_BAR0_REGION_INDEX`); BARn is `n`.
pub const VFIO_PCI_BAR0_REGION_INDEX: u32 = 0;
/// Region index of PCI config space (`VFIO_PCI_CONFIG_REGION_INDEX`).
pub const VFIO_PCI_CONFIG_REGION_INDEX: u32 = 7;
/// The region may be read with `pread`.
pub const VFIO_REGION_INFO_FLAG_READ: u32 = 1 << 0;
/// The region may be written with `pwrite`.
pub const VFIO_REGION_INFO_FLAG_WRITE: u32 = 1 << 1;

uapi_struct! {
    /// `struct vfio_region_info`; `offset` is where the region starts in the device fd.
    pub struct RegionInfo {
        pub argsz: u32,
        pub flags: u32,
        pub index: u32,
        pub cap_offset: u32,
        pub size: u64,
        pub offset: u64,
    }
}

// ---------------------------------------------------------------------------------------
// VFIO_DEVICE_FEATURE.

/// Bits 0-15 of `flags`: the feature index.
pub const VFIO_DEVICE_FEATURE_MASK: u32 = 0xffff;
pub const VFIO_DEVICE_FEATURE_GET: u32 = 1 << 16;
pub const VFIO_DEVICE_FEATURE_SET: u32 = 1 << 17;
/// With GET and/or SET: succeed only if the feature supports those operations.
pub const VFIO_DEVICE_FEATURE_PROBE: u32 = 1 << 18;

pub const VFIO_DEVICE_FEATURE_MIGRATION: u32 = 1;
pub const VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE: u32 = 2;
pub const VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY: u32 = 3;
pub const VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP: u32 = 4;
pub const VFIO_DEVICE_FEATURE_LOW_POWER_EXIT: u32 = 5;
pub const VFIO_DEVICE_FEATURE_DMA_LOGGING_START: u32 = 6;
pub const VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP: u32 = 7;
pub const VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT: u32 = 8;
pub const VFIO_DEVICE_FEATURE_MIG_DATA_SIZE: u32 = 9;
/// `VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2` (7.1+): SET without payload opts in to
/// `VFIO_PRECOPY_INFO_REINIT`.
pub const VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFO_V2: u32 = 12;

/// `vfio_device_feature_migration.flags` bits (the same bits as [`crate::fsm::Caps`]).
pub const VFIO_MIGRATION_STOP_COPY: u64 = 1 << 0;
pub const VFIO_MIGRATION_P2P: u64 = 1 << 1;
pub const VFIO_MIGRATION_PRE_COPY: u64 = 1 << 2;

uapi_struct! {
    /// `struct vfio_device_feature` without its flexible `data[]`: the 8-byte header every
    /// feature call starts with. Alone, it is the whole argument of payload-less features.
    pub struct FeatureHeader {
        pub argsz: u32,
        pub flags: u32,
    }
}

impl FeatureHeader {
    /// A payload-less feature call (PROBE, DMA_LOGGING_STOP, LOW_POWER_ENTRY/EXIT, feature 12).
    pub const fn bare(flags: u32) -> FeatureHeader {
        FeatureHeader { argsz: size_of::<FeatureHeader>() as u32, flags }
    }
}

uapi_struct! {
    /// `struct vfio_device_feature_migration`.
    pub struct FeatureMigration {
        pub flags: u64,
    }
}

uapi_struct! {
    /// `struct vfio_device_feature_mig_state`: `data_fd` is -1 unless the SET opened a
    /// transfer session.
    pub struct FeatureMigState {
        pub device_state: u32,
        pub data_fd: i32,
    }
}

uapi_struct! {
    /// `struct vfio_device_feature_mig_data_size`.
    pub struct FeatureMigDataSize {
        pub stop_copy_length: u64,
    }
}

uapi_struct! {
    /// `struct vfio_device_low_power_entry_with_wakeup`.
    pub struct LowPowerEntryWithWakeup {
        pub wakeup_eventfd: i32,
        pub reserved: u32,
    }
}

uapi_struct! {
    /// `struct vfio_device_feature_dma_logging_control`: `ranges` is a user pointer to
    /// `num_ranges` [`DmaLoggingRange`]s; the kernel copies back the page size it chose.
    pub struct DmaLoggingControl {
        pub page_size: u64,
        pub num_ranges: u32,
        pub reserved: u32,
        pub ranges: u64,
    }
}

uapi_struct! {
    /// `struct vfio_device_feature_dma_logging_range`.
    pub struct DmaLoggingRange {
        pub iova: u64,
        pub length: u64,
    }
}

uapi_struct! {
    /// `struct vfio_device_feature_dma_logging_report`: `bitmap` is a user pointer to
    /// `ceil(length / page_size / 64)` u64 words; bit `n % 64` of word `n / 64` is the page
    /// at `iova + n * page_size` (the header comment's formula is wrong, reference §1.6).
    pub struct DmaLoggingReport {
        pub iova: u64,
        pub length: u64,
        pub page_size: u64,
        pub bitmap: u64,
    }
}

/// A feature call's whole argument: the header immediately followed by the payload, which
/// thereby sits at offset 8 with the 8-byte alignment its `__aligned_u64` fields need.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Feature<P> {
    pub header: FeatureHeader,
    pub payload: P,
}

impl<P: Pod> Feature<P> {
    /// `argsz` is the size of header plus payload, exactly.
    pub fn new(flags: u32, payload: P) -> Feature<P> {
        Feature { header: FeatureHeader { argsz: size_of::<Feature<P>>() as u32, flags }, payload }
    }
}

/// Marks the feature composites the daemon sends as [`Pod`], proving for each that header
/// and payload leave no padding.
macro_rules! feature_pod {
    ($($payload:ty),* $(,)?) => {$(
        const _: () = assert!(
            size_of::<Feature<$payload>>() == size_of::<FeatureHeader>() + size_of::<$payload>(),
            "feature composite has padding"
        );
        // SAFETY: `#[repr(C)]` of two `Pod` fields, and the assertion above proves there is
        // no padding between or after them.
        unsafe impl Pod for Feature<$payload> {}
    )*};
}

feature_pod!(
    FeatureMigration,
    FeatureMigState,
    FeatureMigDataSize,
    LowPowerEntryWithWakeup,
    DmaLoggingControl,
    DmaLoggingReport,
);

// ---------------------------------------------------------------------------------------
// VFIO_MIG_GET_PRECOPY_INFO (on the saving data_fd).

/// New initial data was appended to the stream (only after opting in with feature 12).
pub const VFIO_PRECOPY_INFO_REINIT: u32 = 1 << 0;

uapi_struct! {
    /// `struct vfio_precopy_info`.
    pub struct VfioPrecopyInfo {
        pub argsz: u32,
        pub flags: u32,
        pub initial_bytes: u64,
        pub dirty_bytes: u64,
    }
}

// ---------------------------------------------------------------------------------------
// Device cdev and iommufd.

uapi_struct! {
    /// `struct vfio_device_bind_iommufd`. `token_uuid_ptr` (6.17+) is only read with
    /// `VFIO_DEVICE_BIND_FLAG_TOKEN`; older kernels copy just the first 16 bytes.
    pub struct DeviceBindIommufd {
        pub argsz: u32,
        pub flags: u32,
        pub iommufd: i32,
        pub out_devid: u32,
        pub token_uuid_ptr: u64,
    }
}

uapi_struct! {
    /// `struct vfio_device_attach_iommufd_pt`: in, an IOAS or HWPT id; out, the HWPT the
    /// device ended up attached to (an automatic one when an IOAS was given).
    pub struct DeviceAttachIommufdPt {
        pub argsz: u32,
        pub flags: u32,
        pub pt_id: u32,
        pub pasid: u32,
    }
}

uapi_struct! {
    /// `struct iommu_ioas_alloc`.
    pub struct IoasAlloc {
        pub size: u32,
        pub flags: u32,
        pub out_ioas_id: u32,
    }
}

/// `IOMMU_HWPT_ALLOC_DIRTY_TRACKING`: the HWPT can track IOMMU dirty bits.
pub const IOMMU_HWPT_ALLOC_DIRTY_TRACKING: u32 = 1 << 1;

uapi_struct! {
    /// `struct iommu_hwpt_alloc` (48 bytes since `fault_id`; older kernels accept the
    /// longer struct as long as the extra bytes are zero).
    pub struct HwptAlloc {
        pub size: u32,
        pub flags: u32,
        pub dev_id: u32,
        pub pt_id: u32,
        pub out_hwpt_id: u32,
        pub reserved: u32,
        pub data_type: u32,
        pub data_len: u32,
        pub data_uptr: u64,
        pub fault_id: u32,
        pub reserved2: u32,
    }
}

/// `IOMMU_HW_CAP_DIRTY_TRACKING` in [`HwInfo::out_capabilities`].
pub const IOMMU_HW_CAP_DIRTY_TRACKING: u64 = 1 << 0;

uapi_struct! {
    /// `struct iommu_hw_info`; `out_data_type` shares its slot with `in_data_type`.
    pub struct HwInfo {
        pub size: u32,
        pub flags: u32,
        pub dev_id: u32,
        pub data_len: u32,
        pub data_uptr: u64,
        pub out_data_type: u32,
        pub out_max_pasid_log2: u8,
        pub reserved: [u8; 3],
        pub out_capabilities: u64,
    }
}

/// `IOMMU_HWPT_DIRTY_TRACKING_ENABLE`.
pub const IOMMU_HWPT_DIRTY_TRACKING_ENABLE: u32 = 1 << 0;

uapi_struct! {
    /// `struct iommu_hwpt_set_dirty_tracking`.
    pub struct HwptSetDirtyTracking {
        pub size: u32,
        pub flags: u32,
        pub hwpt_id: u32,
        pub reserved: u32,
    }
}

/// `IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR`: read the dirty bits without clearing them.
pub const IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR: u32 = 1 << 0;

uapi_struct! {
    /// `struct iommu_hwpt_get_dirty_bitmap`: `data` is a user pointer to the bitmap, with
    /// the same layout as a DMA-logging report relative to `iova`.
    pub struct HwptGetDirtyBitmap {
        pub size: u32,
        pub hwpt_id: u32,
        pub flags: u32,
        pub reserved: u32,
        pub iova: u64,
        pub length: u64,
        pub page_size: u64,
        pub data: u64,
    }
}

/// Size of a uAPI struct for its `argsz`/`size` field.
pub const fn argsz<T: Pod>() -> u32 {
    size_of::<T>() as u32
}

/// u64 words a dirty bitmap needs for `length` bytes of IOVA at `page_size` granularity:
/// `ceil(ceil(length / page_size) / 64)`. `None` for a zero `page_size`.
pub const fn bitmap_words(length: u64, page_size: u64) -> Option<u64> {
    if page_size == 0 {
        return None;
    }
    Some(length.div_ceil(page_size).div_ceil(64))
}

#[cfg(test)]
mod tests {
    //! The oracle is never this module: struct layouts come from the `vfio-bindings` and
    //! `iommufd-bindings` crates (bindgen output of the kernel headers), request numbers
    //! from the bindings' type/base constants plus the header's documented offsets, and
    //! from the literal values of the kernel reference.

    use std::mem::{align_of, offset_of};

    use iommufd_bindings as iommufd;
    use vfio_bindings::bindings::vfio;

    use super::*;

    /// Asserts size, alignment and every listed field offset of `$ours` against `$theirs`.
    macro_rules! same_layout {
        ($ours:ty, $theirs:ty, { $($our_field:ident => $their_field:ident),* $(,)? }) => {{
            assert_eq!(size_of::<$ours>(), size_of::<$theirs>(), "size of {}", stringify!($ours));
            assert_eq!(align_of::<$ours>(), align_of::<$theirs>(), "align of {}", stringify!($ours));
            $(
                assert_eq!(
                    offset_of!($ours, $our_field),
                    offset_of!($theirs, $their_field),
                    "offset of {}::{}",
                    stringify!($ours),
                    stringify!($our_field)
                );
            )*
        }};
    }

    #[test]
    fn vfio_structs_match_the_bindings() {
        same_layout!(GroupStatus, vfio::vfio_group_status, { argsz => argsz, flags => flags });
        same_layout!(DeviceInfo, vfio::vfio_device_info, {
            argsz => argsz, flags => flags, num_regions => num_regions, num_irqs => num_irqs,
            cap_offset => cap_offset, pad => pad,
        });
        same_layout!(RegionInfo, vfio::vfio_region_info, {
            argsz => argsz, flags => flags, index => index, cap_offset => cap_offset,
            size => size, offset => offset,
        });
        same_layout!(FeatureMigration, vfio::vfio_device_feature_migration, { flags => flags });
        same_layout!(FeatureMigState, vfio::vfio_device_feature_mig_state, {
            device_state => device_state, data_fd => data_fd,
        });
        same_layout!(FeatureMigDataSize, vfio::vfio_device_feature_mig_data_size, {
            stop_copy_length => stop_copy_length,
        });
        same_layout!(LowPowerEntryWithWakeup, vfio::vfio_device_low_power_entry_with_wakeup, {
            wakeup_eventfd => wakeup_eventfd, reserved => reserved,
        });
        same_layout!(DmaLoggingControl, vfio::vfio_device_feature_dma_logging_control, {
            page_size => page_size, num_ranges => num_ranges, reserved => __reserved, ranges => ranges,
        });
        same_layout!(DmaLoggingRange, vfio::vfio_device_feature_dma_logging_range, {
            iova => iova, length => length,
        });
        same_layout!(DmaLoggingReport, vfio::vfio_device_feature_dma_logging_report, {
            iova => iova, length => length, page_size => page_size, bitmap => bitmap,
        });
        same_layout!(VfioPrecopyInfo, vfio::vfio_precopy_info, {
            argsz => argsz, flags => flags, initial_bytes => initial_bytes, dirty_bytes => dirty_bytes,
        });
        same_layout!(DeviceBindIommufd, vfio::vfio_device_bind_iommufd, {
            argsz => argsz, flags => flags, iommufd => iommufd, out_devid => out_devid,
            token_uuid_ptr => token_uuid_ptr,
        });
        same_layout!(DeviceAttachIommufdPt, vfio::vfio_device_attach_iommufd_pt, {
            argsz => argsz, flags => flags, pt_id => pt_id, pasid => pasid,
        });
    }

    /// The header is the bindings' `vfio_device_feature` minus its flexible array, and every
    /// composite puts its payload exactly where `data[]` starts, 8-byte aligned.
    #[test]
    fn feature_composites_put_the_payload_at_data() {
        assert_eq!(size_of::<FeatureHeader>(), size_of::<vfio::vfio_device_feature>());
        assert_eq!(offset_of!(FeatureHeader, argsz), offset_of!(vfio::vfio_device_feature, argsz));
        assert_eq!(offset_of!(FeatureHeader, flags), offset_of!(vfio::vfio_device_feature, flags));
        let data = offset_of!(vfio::vfio_device_feature, data);
        assert_eq!(data, 8, "reference §1.2: payload at offset 8");

        macro_rules! composite {
            ($payload:ty, $theirs:ty, $whole:expr) => {{
                assert_eq!(offset_of!(Feature<$payload>, header), 0);
                assert_eq!(offset_of!(Feature<$payload>, payload), data, "{}", stringify!($payload));
                assert_eq!(align_of::<Feature<$payload>>(), 8, "{}", stringify!($payload));
                assert_eq!(size_of::<Feature<$payload>>(), data + size_of::<$theirs>());
                // Whole-buffer sizes for argsz, from the reference's table (§1.3).
                assert_eq!(Feature::new(0, <$payload>::default()).header.argsz, $whole);
            }};
        }
        composite!(FeatureMigration, vfio::vfio_device_feature_migration, 16);
        composite!(FeatureMigState, vfio::vfio_device_feature_mig_state, 16);
        composite!(FeatureMigDataSize, vfio::vfio_device_feature_mig_data_size, 16);
        composite!(LowPowerEntryWithWakeup, vfio::vfio_device_low_power_entry_with_wakeup, 16);
        composite!(DmaLoggingControl, vfio::vfio_device_feature_dma_logging_control, 32);
        composite!(DmaLoggingReport, vfio::vfio_device_feature_dma_logging_report, 40);
        assert_eq!(FeatureHeader::bare(0).argsz, 8, "DMA_LOGGING_STOP: argsz 8");
    }

    #[test]
    fn iommufd_structs_match_the_bindings() {
        same_layout!(IoasAlloc, iommufd::iommu_ioas_alloc, {
            size => size, flags => flags, out_ioas_id => out_ioas_id,
        });
        same_layout!(HwptAlloc, iommufd::iommu_hwpt_alloc, {
            size => size, flags => flags, dev_id => dev_id, pt_id => pt_id, out_hwpt_id => out_hwpt_id,
            reserved => __reserved, data_type => data_type, data_len => data_len,
            data_uptr => data_uptr, fault_id => fault_id, reserved2 => __reserved2,
        });
        same_layout!(HwInfo, iommufd::iommu_hw_info, {
            size => size, flags => flags, dev_id => dev_id, data_len => data_len,
            data_uptr => data_uptr, out_data_type => __bindgen_anon_1,
            out_max_pasid_log2 => out_max_pasid_log2, reserved => __reserved,
            out_capabilities => out_capabilities,
        });
        same_layout!(HwptSetDirtyTracking, iommufd::iommu_hwpt_set_dirty_tracking, {
            size => size, flags => flags, hwpt_id => hwpt_id, reserved => __reserved,
        });
        same_layout!(HwptGetDirtyBitmap, iommufd::iommu_hwpt_get_dirty_bitmap, {
            size => size, hwpt_id => hwpt_id, flags => flags, reserved => __reserved,
            iova => iova, length => length, page_size => page_size, data => data,
        });
    }

    /// Struct sizes the reference states (verified there with a C compile), independent of
    /// any bindings release.
    #[test]
    fn struct_sizes_match_the_reference() {
        assert_eq!(size_of::<FeatureMigration>(), 8);
        assert_eq!(align_of::<FeatureMigration>(), 8);
        assert_eq!(size_of::<FeatureMigState>(), 8);
        assert_eq!(align_of::<FeatureMigState>(), 4);
        assert_eq!(size_of::<VfioPrecopyInfo>(), 24);
        assert_eq!(size_of::<DmaLoggingControl>(), 24);
        assert_eq!(size_of::<DmaLoggingRange>(), 16);
        assert_eq!(size_of::<DmaLoggingReport>(), 32);
        assert_eq!(size_of::<HwptSetDirtyTracking>(), 16);
        assert_eq!(size_of::<HwptGetDirtyBitmap>(), 48);
        assert_eq!(offset_of!(HwptGetDirtyBitmap, data), 40);
        assert_eq!(offset_of!(DmaLoggingReport, bitmap), 24);
        assert_eq!(offset_of!(DmaLoggingControl, ranges), 16);
    }

    /// The bindings drop `_IO()` macros, so the expected numbers are rebuilt from the
    /// bindings' `VFIO_TYPE`/`VFIO_BASE` and the offsets `vfio.h` writes next to each define.
    #[test]
    fn vfio_request_numbers_match_the_bindings_constants() {
        let expected = |k: u32| (u64::from(vfio::VFIO_TYPE) << 8) | u64::from(vfio::VFIO_BASE + k);
        let table = [
            (VFIO_GET_API_VERSION, 0, "VFIO_GET_API_VERSION"),
            (VFIO_CHECK_EXTENSION, 1, "VFIO_CHECK_EXTENSION"),
            (VFIO_SET_IOMMU, 2, "VFIO_SET_IOMMU"),
            (VFIO_GROUP_GET_STATUS, 3, "VFIO_GROUP_GET_STATUS"),
            (VFIO_GROUP_SET_CONTAINER, 4, "VFIO_GROUP_SET_CONTAINER"),
            (VFIO_GROUP_GET_DEVICE_FD, 6, "VFIO_GROUP_GET_DEVICE_FD"),
            (VFIO_DEVICE_GET_INFO, 7, "VFIO_DEVICE_GET_INFO"),
            (VFIO_DEVICE_GET_REGION_INFO, 8, "VFIO_DEVICE_GET_REGION_INFO"),
            (VFIO_DEVICE_RESET, 11, "VFIO_DEVICE_RESET"),
            (VFIO_DEVICE_FEATURE, 17, "VFIO_DEVICE_FEATURE"),
            (VFIO_DEVICE_BIND_IOMMUFD, 18, "VFIO_DEVICE_BIND_IOMMUFD"),
            (VFIO_DEVICE_ATTACH_IOMMUFD_PT, 19, "VFIO_DEVICE_ATTACH_IOMMUFD_PT"),
            (VFIO_MIG_GET_PRECOPY_INFO, 21, "VFIO_MIG_GET_PRECOPY_INFO"),
        ];
        for (ours, k, name) in table {
            assert_eq!(ours, expected(k), "{name}");
        }
    }

    #[test]
    fn iommufd_request_numbers_match_the_bindings_commands() {
        let expected = |cmd: u32| (u64::from(iommufd::IOMMUFD_TYPE) << 8) | u64::from(cmd);
        assert_eq!(IOMMUFD_CMD_BASE, iommufd::IOMMUFD_CMD_BASE);
        assert_eq!(IOMMU_IOAS_ALLOC, expected(iommufd::IOMMUFD_CMD_IOAS_ALLOC));
        assert_eq!(IOMMU_HWPT_ALLOC, expected(iommufd::IOMMUFD_CMD_HWPT_ALLOC));
        assert_eq!(IOMMU_GET_HW_INFO, expected(iommufd::IOMMUFD_CMD_GET_HW_INFO));
        assert_eq!(IOMMU_HWPT_SET_DIRTY_TRACKING, expected(iommufd::IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING));
        assert_eq!(IOMMU_HWPT_GET_DIRTY_BITMAP, expected(iommufd::IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP));
    }

    /// Literal values from the kernel reference (§1.1) and `vfio.h`.
    #[test]
    fn request_numbers_match_the_reference_literals() {
        assert_eq!(VFIO_GET_API_VERSION, 0x3B64);
        assert_eq!(VFIO_CHECK_EXTENSION, 0x3B65);
        assert_eq!(VFIO_SET_IOMMU, 0x3B66);
        assert_eq!(VFIO_GROUP_GET_STATUS, 0x3B67);
        assert_eq!(VFIO_GROUP_SET_CONTAINER, 0x3B68);
        assert_eq!(VFIO_GROUP_GET_DEVICE_FD, 0x3B6A);
        assert_eq!(VFIO_DEVICE_GET_INFO, 0x3B6B);
        assert_eq!(VFIO_DEVICE_GET_REGION_INFO, 0x3B6C);
        assert_eq!(VFIO_DEVICE_RESET, 0x3B6F);
        assert_eq!(VFIO_DEVICE_FEATURE, 0x3B75);
        assert_eq!(VFIO_DEVICE_BIND_IOMMUFD, 0x3B76);
        assert_eq!(VFIO_DEVICE_ATTACH_IOMMUFD_PT, 0x3B77);
        assert_eq!(VFIO_MIG_GET_PRECOPY_INFO, 0x3B79);
        assert_eq!(IOMMU_IOAS_ALLOC, 0x3B81);
        assert_eq!(IOMMU_HWPT_ALLOC, 0x3B89);
        assert_eq!(IOMMU_GET_HW_INFO, 0x3B8A);
        assert_eq!(IOMMU_HWPT_SET_DIRTY_TRACKING, 0x3B8B);
        assert_eq!(IOMMU_HWPT_GET_DIRTY_BITMAP, 0x3B8C);
    }

    #[test]
    fn flag_and_feature_constants_match_the_bindings() {
        assert_eq!(VFIO_TYPE, u32::from(vfio::VFIO_TYPE));
        assert_eq!(VFIO_BASE, vfio::VFIO_BASE);
        assert_eq!(VFIO_TYPE, u32::from(iommufd::IOMMUFD_TYPE));
        assert_eq!(VFIO_API_VERSION as u32, vfio::VFIO_API_VERSION);
        assert_eq!(VFIO_TYPE1V2_IOMMU, vfio::VFIO_TYPE1v2_IOMMU);
        assert_eq!(VFIO_GROUP_FLAGS_VIABLE, vfio::VFIO_GROUP_FLAGS_VIABLE);
        assert_eq!(VFIO_GROUP_FLAGS_CONTAINER_SET, vfio::VFIO_GROUP_FLAGS_CONTAINER_SET);
        assert_eq!(VFIO_DEVICE_FLAGS_RESET, vfio::VFIO_DEVICE_FLAGS_RESET);
        assert_eq!(VFIO_DEVICE_FLAGS_PCI, vfio::VFIO_DEVICE_FLAGS_PCI);
        assert_eq!(VFIO_PCI_BAR0_REGION_INDEX, vfio::VFIO_PCI_BAR0_REGION_INDEX);
        assert_eq!(VFIO_PCI_CONFIG_REGION_INDEX, vfio::VFIO_PCI_CONFIG_REGION_INDEX);
        assert_eq!(VFIO_REGION_INFO_FLAG_READ, vfio::VFIO_REGION_INFO_FLAG_READ);
        assert_eq!(VFIO_REGION_INFO_FLAG_WRITE, vfio::VFIO_REGION_INFO_FLAG_WRITE);
        assert_eq!(VFIO_DEVICE_FEATURE_MASK, vfio::VFIO_DEVICE_FEATURE_MASK);
        assert_eq!(VFIO_DEVICE_FEATURE_GET, vfio::VFIO_DEVICE_FEATURE_GET);
        assert_eq!(VFIO_DEVICE_FEATURE_SET, vfio::VFIO_DEVICE_FEATURE_SET);
        assert_eq!(VFIO_DEVICE_FEATURE_PROBE, vfio::VFIO_DEVICE_FEATURE_PROBE);
        assert_eq!(VFIO_DEVICE_FEATURE_MIGRATION, vfio::VFIO_DEVICE_FEATURE_MIGRATION);
        assert_eq!(VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, vfio::VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE);
        assert_eq!(VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY, vfio::VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY);
        assert_eq!(
            VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP,
            vfio::VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP
        );
        assert_eq!(VFIO_DEVICE_FEATURE_LOW_POWER_EXIT, vfio::VFIO_DEVICE_FEATURE_LOW_POWER_EXIT);
        assert_eq!(VFIO_DEVICE_FEATURE_DMA_LOGGING_START, vfio::VFIO_DEVICE_FEATURE_DMA_LOGGING_START);
        assert_eq!(VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP, vfio::VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP);
        assert_eq!(VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, vfio::VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT);
        assert_eq!(VFIO_DEVICE_FEATURE_MIG_DATA_SIZE, vfio::VFIO_DEVICE_FEATURE_MIG_DATA_SIZE);
        assert_eq!(VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFO_V2, vfio::VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2);
        assert_eq!(VFIO_MIGRATION_STOP_COPY, u64::from(vfio::VFIO_MIGRATION_STOP_COPY));
        assert_eq!(VFIO_MIGRATION_P2P, u64::from(vfio::VFIO_MIGRATION_P2P));
        assert_eq!(VFIO_MIGRATION_PRE_COPY, u64::from(vfio::VFIO_MIGRATION_PRE_COPY));
        assert_eq!(VFIO_PRECOPY_INFO_REINIT, vfio::VFIO_PRECOPY_INFO_REINIT);
        assert_eq!(
            IOMMU_HWPT_ALLOC_DIRTY_TRACKING,
            iommufd::iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_DIRTY_TRACKING
        );
        assert_eq!(
            IOMMU_HW_CAP_DIRTY_TRACKING,
            u64::from(iommufd::iommufd_hw_capabilities_IOMMU_HW_CAP_DIRTY_TRACKING)
        );
        assert_eq!(
            IOMMU_HWPT_DIRTY_TRACKING_ENABLE,
            iommufd::iommufd_hwpt_set_dirty_tracking_flags_IOMMU_HWPT_DIRTY_TRACKING_ENABLE
        );
        assert_eq!(
            IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR,
            iommufd::iommufd_hwpt_get_dirty_bitmap_flags_IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR
        );
    }

    /// The flag words of the reference's feature table (§1.2).
    #[test]
    fn feature_flag_words_match_the_reference() {
        use crate::fsm::Caps;
        let get = VFIO_DEVICE_FEATURE_GET;
        let set = VFIO_DEVICE_FEATURE_SET;
        assert_eq!(get | VFIO_DEVICE_FEATURE_MIGRATION, 0x0001_0001);
        assert_eq!(get | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, 0x0001_0002);
        assert_eq!(set | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, 0x0002_0002);
        assert_eq!(set | VFIO_DEVICE_FEATURE_DMA_LOGGING_START, 0x0002_0006);
        assert_eq!(set | VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP, 0x0002_0007);
        assert_eq!(get | VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, 0x0001_0008);
        assert_eq!(get | VFIO_DEVICE_FEATURE_MIG_DATA_SIZE, 0x0001_0009);
        assert_eq!(set | VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFO_V2, 0x0002_000C);
        assert_eq!(VFIO_DEVICE_FEATURE_PROBE | set | VFIO_DEVICE_FEATURE_DMA_LOGGING_START, 0x0006_0006);
        // The FSM's capability bits are the uAPI's.
        assert_eq!(Caps::STOP_COPY.bits(), VFIO_MIGRATION_STOP_COPY);
        assert_eq!(Caps::P2P.bits(), VFIO_MIGRATION_P2P);
        assert_eq!(Caps::PRE_COPY.bits(), VFIO_MIGRATION_PRE_COPY);
    }

    #[test]
    fn bitmap_words_round_up_pages_then_words() {
        assert_eq!(bitmap_words(4096, 4096), Some(1));
        assert_eq!(bitmap_words(64 * 4096, 4096), Some(1));
        assert_eq!(bitmap_words(65 * 4096, 4096), Some(2));
        assert_eq!(bitmap_words(4097, 4096), Some(1));
        assert_eq!(bitmap_words(1 << 30, 4096), Some((1 << 18) / 64));
        assert_eq!(bitmap_words(0, 4096), Some(0));
        assert_eq!(bitmap_words(4096, 0), None);
    }
}
