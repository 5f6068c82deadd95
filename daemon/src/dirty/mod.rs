//! Dirty-page tracking for a group of devices.
//!
//! - [`ranges`]: which IOVA ranges to hand to `DMA_LOGGING_START` (pure);
//! - [`bitmap`]: the group's dirty bitmap in the kernel's layout, merging device reports
//!   of any page size, exporting dirty runs or chunks (pure);
//! - [`tracker`]: start / report / stop over the group's [`tracker::DirtySource`]s, with
//!   the all-or-nothing start and lost-log recovery rules, and which source tracks which
//!   device;
//! - [`hwpt`]: the IOMMU as a source: an iommufd HWPT with dirty tracking, shared by the
//!   devices attached to it;
//! - [`bench`]: the `bitmap_merge_8x32MiB` and `dirty_report_sparse` figures.

pub mod bench;
pub mod bitmap;
pub mod hwpt;
pub mod ranges;
pub mod tracker;

pub use bitmap::{DirtyBitmap, DirtyBitmapChunk, DirtyExport};
pub use hwpt::{HwptDirty, HwptKey, IommufdHwpt, IommufdHwptSource};
pub use ranges::plan_logging_ranges;
pub use tracker::{
    Coverage, DirtySource, DirtyTracker, DmaLoggingSource, ReportRound, SourceStats, TrackerConfig,
    TrackerError,
};
