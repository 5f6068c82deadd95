use std::collections::BTreeSet;
use std::path::Path;

use proptest::prelude::*;

use super::*;
use crate::device::sim::{Fault, FaultOp, IommuMapping, IommuSpec, SimDevice, SimIommu, SimSpec};
use crate::device::vfio::VfioDevice;
use crate::device::{DeviceIdentity, MigrationDevice};
use crate::dirty::ranges::normalize;
use crate::dirty::tracker::{Coverage, DirtyTracker, SourceStats, TrackerConfig, TrackerError};
use crate::vfio::fake::{Call, FakeIommufd, FakeKernel, u32_at, u64_at};
use crate::vfio::uapi::{IOMMU_HWPT_GET_DIRTY_BITMAP, IOMMU_HWPT_SET_DIRTY_TRACKING};
use crate::vfio::{Attach, Sysfs, VfioHost};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const PAGE: u64 = 4096;

fn r(iova: u64, length: u64) -> IovaRange {
    IovaRange { iova, length }
}

fn stats_of<'a>(tracker: &'a DirtyTracker, name: &str) -> &'a SourceStats {
    tracker.stats().find(|s| s.name == name).unwrap_or_else(|| panic!("no source {name}"))
}

fn dirty_pages(bitmap: &DirtyBitmap) -> BTreeSet<u64> {
    bitmap.dirty_ranges().flat_map(|r| r.iova / bitmap.page_size()..r.end() / bitmap.page_size()).collect()
}

#[test]
fn hwpts_are_read_at_the_group_page_unless_a_guest_range_is_off_it() {
    let cases = [
        (4096, vec![r(0, MIB)], 4096),
        (64 * KIB, vec![r(0, MIB), r(GIB, 64 * KIB)], 64 * KIB),
        (64 * KIB, vec![r(0, MIB), r(GIB + 16 * KIB, 64 * KIB)], 16 * KIB),
        (64 * KIB, vec![r(0, 36 * KIB)], 4096),
        (2 * MIB, vec![r(0, 8 * MIB), r(GIB, 2 * MIB + 8 * KIB)], 8 * KIB),
        (512, vec![r(0, MIB)], 4096),
    ];
    for (group_page, guest, expected) in cases {
        let guest = normalize(&guest, 4096).unwrap();
        assert_eq!(read_page_size(group_page, &guest), expected, "group page {group_page:#x}, {guest:x?}");
    }
}

/// The group as the real backend builds it, through the syscall seam: two cdev devices
/// share one dirty-tracking HWPT, a third has its own, a fourth sits on an automatic HWPT.
#[test]
fn a_kernel_hwpt_serves_every_device_attached_to_it_with_the_exact_requests() {
    let iommu = FakeIommufd::default();
    let answers = iommu.clone();
    let kernel = Arc::new(FakeKernel::new(move |call| answers.answer(call)));
    let host = VfioHost::new(kernel.clone(), Sysfs::at("/nonexistent"), "/dev");
    let iommufd = host.open_iommufd().unwrap();
    let identity = DeviceIdentity { driver: "vfio-pci".into(), model: "1af4:1041".into() };
    let open = |name: &str, node: &str, attach: Attach| -> Arc<VfioDevice> {
        let handle = host.open_cdev_path(name, Path::new(node), &iommufd, attach).unwrap();
        Arc::new(VfioDevice::new(handle, identity.clone()))
    };
    let nic = open("nic0", "/dev/vfio/devices/vfio0", Attach::DirtyTrackingHwpt { ioas: None });
    let binding = nic.handle().iommufd().unwrap().1;
    let first = nic.dirty_tracking_hwpt().expect("a dirty-tracking HWPT");
    assert_eq!(first.key().hwpt_id(), binding.hwpt_id);
    let (ioas, shared_id) = (binding.ioas_id, binding.hwpt_id);
    let virtio =
        open("virtio0", "/dev/vfio/devices/vfio1", Attach::SharedDirtyTrackingHwpt { ioas, hwpt: shared_id });
    let qat = open("qat0", "/dev/vfio/devices/vfio2", Attach::DirtyTrackingHwpt { ioas: Some(ioas) });
    let uart = open("uart0", "/dev/vfio/devices/vfio3", Attach::NewIoas);
    let own_id = qat.dirty_tracking_hwpt().unwrap().key().hwpt_id();
    assert_eq!(virtio.dirty_tracking_hwpt().unwrap().key(), first.key());
    assert_ne!(own_id, shared_id);
    assert!(uart.dirty_tracking_hwpt().is_none(), "an automatic HWPT has no dirty ops");
    assert_eq!(first.label(), format!("/dev/iommu hwpt {shared_id}"));

    let guest = [r(0, 5 * MIB), r(GIB, MIB)];
    // 64 bytes of bitmap per call: 2 MiB windows.
    let config = TrackerConfig { report_window_bytes: 64, ..TrackerConfig::default() };
    let devices: [Arc<dyn MigrationDevice>; 4] = [nic, virtio, qat, uart];
    let mut tracker = DirtyTracker::for_devices(&devices, &guest, config).expect("a tracker");
    let shared_name = format!("/dev/iommu hwpt {shared_id}");
    let own_name = format!("/dev/iommu hwpt {own_id}");
    let names: Vec<(&str, &str, Vec<String>)> =
        tracker.stats().map(|s| (s.name.as_str(), s.kind, s.devices.clone())).collect();
    assert_eq!(
        names,
        [
            (shared_name.as_str(), "iommufd-hwpt", vec!["nic0".to_owned(), "virtio0".to_owned()]),
            (own_name.as_str(), "iommufd-hwpt", vec!["qat0".to_owned()]),
            ("uart0", "dma-logging", vec!["uart0".to_owned()]),
        ]
    );

    kernel.clear();
    tracker.start().unwrap();
    let set = |enable: u32, hwpt: u32| -> Vec<u8> {
        [16, enable, hwpt, 0].iter().flat_map(|v: &u32| v.to_ne_bytes()).collect()
    };
    let calls = kernel.ioctls();
    assert_eq!(calls.len(), 2, "one SET per HWPT, none per device: {calls:?}");
    assert!(calls.iter().all(|c| c.request() == Some(IOMMU_HWPT_SET_DIRTY_TRACKING)));
    assert_eq!(calls[0].bytes(), set(1, shared_id).as_slice());
    assert_eq!(calls[1].bytes(), set(1, own_id).as_slice());
    assert!(iommu.tracking(shared_id) && iommu.tracking(own_id));
    let uart_stats = stats_of(&tracker, "uart0");
    assert_eq!(uart_stats.coverage_source(), "none");
    assert!(uart_stats.coverage_reason().unwrap().contains("PROBE"), "{uart_stats:?}");
    assert_eq!(stats_of(&tracker, &shared_name).coverage_source(), "iommufd-hwpt");

    iommu.dma_write(shared_id, 0x1000, 1);
    iommu.dma_write(shared_id, 3 * MIB + 5, 2 * PAGE);
    iommu.dma_write(own_id, GIB + PAGE, 1);
    iommu.dma_write(shared_id, 6 * MIB, PAGE);
    kernel.clear();
    let round = tracker.report().unwrap();
    assert!(round.lost.is_empty());
    assert_eq!(round.new_dirty_pages, 5);
    let expected: BTreeSet<u64> = [1, 768, 769, 770, GIB / PAGE + 1].into();
    assert_eq!(dirty_pages(tracker.bitmap()), expected);

    // Four windows per HWPT (2 + 2 + 1 MiB, then 1 MiB), read and cleared, at 4 KiB.
    let windows = [(0, 2 * MIB), (2 * MIB, 2 * MIB), (4 * MIB, MIB), (GIB, MIB)];
    let gets: Vec<(u32, u32, u64, u64, u64)> = kernel
        .ioctls()
        .iter()
        .map(|call| {
            assert_eq!(call.request(), Some(IOMMU_HWPT_GET_DIRTY_BITMAP));
            let b = call.bytes();
            assert_eq!(
                (b.len(), u32_at(b, 0), u32_at(b, 8), u32_at(b, 12)),
                (48, 48, 0, 0),
                "size, flags, reserved"
            );
            (u32_at(b, 4), u32_at(b, 8), u64_at(b, 16), u64_at(b, 24), u64_at(b, 32))
        })
        .collect();
    let expected_gets: Vec<_> = [shared_id, own_id]
        .iter()
        .flat_map(|&hwpt| windows.iter().map(move |&(iova, length)| (hwpt, 0, iova, length, PAGE)))
        .collect();
    assert_eq!(gets, expected_gets);
    let shared = stats_of(&tracker, &shared_name);
    assert_eq!((shared.windows, shared.windows_in_place, shared.dirty_pages_found), (4, 4, 4));

    tracker.take_dirty();
    assert_eq!(tracker.report().unwrap().new_dirty_pages, 0, "the kernel cleared what it reported");

    kernel.clear();
    tracker.stop().unwrap();
    let calls = kernel.ioctls();
    assert_eq!(calls.iter().map(Call::bytes).collect::<Vec<_>>(), [set(0, shared_id), set(0, own_id)]);
    assert!(!iommu.tracking(shared_id) && !iommu.tracking(own_id));
    assert_eq!(stats_of(&tracker, &shared_name).coverage, Coverage::Idle);
}

/// A simulated device: DMA logging or not, on HWPT `hwpt` of `iommu` or on none.
fn sim_device(iommu: &Arc<SimIommu>, name: &str, logging: bool, hwpt: Option<IommuSpec>) -> Arc<SimDevice> {
    let mut spec = SimSpec::new(name);
    spec.dma_logging.supported = logging;
    spec.iommu = hwpt;
    Arc::new(SimDevice::with_iommu(spec, iommu).unwrap())
}

fn tracker_of(devices: &[&Arc<SimDevice>], guest: &[IovaRange], config: TrackerConfig) -> DirtyTracker {
    let devices: Vec<Arc<dyn MigrationDevice>> =
        devices.iter().map(|d| Arc::clone(*d) as Arc<dyn MigrationDevice>).collect();
    DirtyTracker::for_devices(&devices, guest, config).unwrap()
}

const GUEST: [IovaRange; 2] =
    [IovaRange { iova: 0, length: 8 * MIB }, IovaRange { iova: GIB, length: 2 * MIB }];
const VM1: &str = "sim-iommu hwpt vm1";

#[test]
fn start_is_all_or_nothing_when_a_hwpt_cannot_be_enabled() {
    let iommu = SimIommu::new();
    let a = sim_device(&iommu, "a", true, None);
    let b = sim_device(&iommu, "b", false, Some(IommuSpec::new("vm1")));
    let c = sim_device(&iommu, "c", true, None);
    b.inject(Fault::errno(FaultOp::HwptSetDirtyTracking, Errno::EIO).once());
    let mut tracker = tracker_of(&[&a, &b, &c], &GUEST, TrackerConfig::default());
    let err = tracker.start().unwrap_err();
    let TrackerError::Start { device, error, rollback_failures } = &err else { panic!("{err:?}") };
    assert_eq!((device.as_str(), error.errno), (VM1, Errno::EIO));
    assert!(rollback_failures.is_empty());
    assert!(err.to_string().contains(VM1), "{err}");
    assert!(!a.dma_logging_active(), "the device started before the HWPT was stopped again");
    assert!(!c.dma_logging_active(), "the device after it was never started");
    assert_eq!(iommu.dirty_tracking_enabled("vm1"), Some(false));
    assert!(!tracker.is_active());

    // The fault fired once: the same tracker starts now, each device on its source.
    tracker.start().unwrap();
    assert!(tracker.fully_covered());
    let kinds: Vec<(&str, &str)> = tracker.stats().map(|s| (s.name.as_str(), s.coverage_source())).collect();
    assert_eq!(kinds, [("a", "dma-logging"), (VM1, "iommufd-hwpt"), ("c", "dma-logging")]);
    tracker.stop().unwrap();
    assert_eq!(iommu.dirty_tracking_enabled("vm1"), Some(false));

    // A logging device failing after the HWPT started: the HWPT is disabled again.
    let d = sim_device(&iommu, "d", true, None);
    d.inject(Fault::errno(FaultOp::DmaLoggingStart, Errno::EIO).once());
    let mut tracker = tracker_of(&[&b, &d], &GUEST, TrackerConfig::default());
    let err = tracker.start().unwrap_err();
    assert!(matches!(&err, TrackerError::Start { device, .. } if device == "d"), "{err:?}");
    assert_eq!(iommu.dirty_tracking_enabled("vm1"), Some(false));
}

#[test]
fn a_hwpt_without_dirty_tracking_leaves_its_devices_uncovered_with_the_reason() {
    let iommu = SimIommu::new();
    let no_ops = IommuSpec { dirty_tracking: false, ..IommuSpec::new("vm1") };
    let a = sim_device(&iommu, "a", false, Some(no_ops.clone()));
    let b = sim_device(&iommu, "b", false, Some(no_ops));
    let c = sim_device(&iommu, "c", false, None);
    let mut tracker = tracker_of(&[&a, &b, &c], &GUEST, TrackerConfig::default());
    tracker.start().unwrap();
    assert!(!tracker.fully_covered());
    let hwpt = stats_of(&tracker, VM1);
    assert_eq!(hwpt.devices, ["a", "b"]);
    assert!(matches!(hwpt.coverage, Coverage::NotCovered { .. }));
    assert_eq!(hwpt.coverage_source(), "none");
    let reason = hwpt.coverage_reason().unwrap();
    assert!(reason.contains("cannot track dirty pages") && reason.contains("EOPNOTSUPP"), "{reason}");
    assert!(stats_of(&tracker, "c").coverage_reason().unwrap().contains("PROBE"));
    a.dma_write(0, PAGE);
    assert_eq!(tracker.report().unwrap().new_dirty_pages, 0);
    tracker.stop().unwrap();
}

#[test]
fn a_lost_hwpt_read_marks_its_range_dirty_and_restarts_clean() {
    let iommu = SimIommu::new();
    let dev = sim_device(&iommu, "virtio0", false, Some(IommuSpec::new("vm1")));
    let config = TrackerConfig { report_window_bytes: 64, ..TrackerConfig::default() };
    let mut tracker = tracker_of(&[&dev], &GUEST, config);
    tracker.start().unwrap();
    // The first 2 MiB window is read, the second fails with the write in it unread.
    dev.dma_write(MIB, 1);
    dev.dma_write(3 * MIB, 1);
    dev.inject(Fault::errno(FaultOp::HwptGetDirtyBitmap, Errno::EIO).nth(2));
    let round = tracker.report().unwrap();
    assert_eq!(round.lost.len(), 1);
    assert_eq!(round.lost[0].name, VM1);
    assert!(round.lost[0].restarted, "{:?}", round.lost[0]);
    assert_eq!(tracker.bitmap().count(), tracker.bitmap().pages());
    assert_eq!(round.new_dirty_pages, tracker.bitmap().pages(), "the page read before the failure counts");
    let stats = stats_of(&tracker, VM1);
    assert_eq!((stats.report_errors, stats.last_error.as_ref().unwrap().errno), (1, Errno::EIO));
    assert_eq!((stats.windows, stats.last_dirty_pages), (2, tracker.bitmap().pages()));
    assert_eq!(stats.coverage_source(), "iommufd-hwpt");

    // The restart enabled tracking again, which started from clean bits: the next round
    // holds only what was written after it.
    tracker.take_dirty();
    dev.dma_write(GIB + 3 * PAGE, 1);
    let round = tracker.report().unwrap();
    assert!(round.lost.is_empty());
    assert_eq!(dirty_pages(tracker.bitmap()), BTreeSet::from([GIB / PAGE + 3]));
    tracker.stop().unwrap();
    assert_eq!(iommu.dirty_tracking_enabled("vm1"), Some(false));
}

#[test]
fn a_coarse_group_page_over_finely_aligned_guest_ranges_is_read_finely_and_folded() {
    let iommu = SimIommu::new();
    let guest = [r(0, MIB), r(GIB + 4 * KIB, 60 * KIB)];
    let mapped = normalize(&guest, 4096)
        .unwrap()
        .iter()
        .map(|g| IommuMapping { iova: g.iova, length: g.length })
        .collect();
    let dev = sim_device(&iommu, "virtio0", false, Some(IommuSpec { mapped, ..IommuSpec::new("vm1") }));
    let config = TrackerConfig { page_size: 64 * KIB, ..TrackerConfig::default() };
    let mut tracker = tracker_of(&[&dev], &guest, config);
    tracker.start().unwrap();
    assert_eq!(stats_of(&tracker, VM1).page_size, Some(4096));
    dev.dma_write(GIB + 60 * KIB, 1);
    dev.dma_write(70 * KIB, 1);
    assert_eq!(tracker.report().unwrap().new_dirty_pages, 2);
    assert_eq!(dirty_pages(tracker.bitmap()), BTreeSet::from([1, GIB / (64 * KIB)]));
    assert_eq!(stats_of(&tracker, VM1).windows_in_place, 0, "4 KiB reads fold into 64 KiB pages");
    tracker.stop().unwrap();
}

const VM2: &str = "sim-iommu hwpt vm2";

fn refused() -> Fault {
    Fault::errno(FaultOp::DmaLoggingStart, Errno::EOPNOTSUPP)
}

fn sources(tracker: &DirtyTracker) -> Vec<(&str, &'static str, Vec<String>)> {
    tracker.stats().map(|s| (s.name.as_str(), s.coverage_source(), s.devices.clone())).collect()
}

#[test]
fn a_device_refused_logging_at_start_is_tracked_by_its_hwpt() {
    let iommu = SimIommu::new();
    // "mlx" comes before the HWPT-only device whose source it joins (which then starts
    // early); "solo" is alone on its HWPT, which gets a source of its own.
    let mlx = sim_device(&iommu, "mlx", true, Some(IommuSpec::new("vm1")));
    let plain = sim_device(&iommu, "plain", true, None);
    let virtio = sim_device(&iommu, "virtio", false, Some(IommuSpec::new("vm1")));
    let solo = sim_device(&iommu, "solo", true, Some(IommuSpec::new("vm2")));
    mlx.inject(refused());
    solo.inject(refused());
    let mut tracker = tracker_of(&[&mlx, &plain, &virtio, &solo], &GUEST, TrackerConfig::default());
    tracker.start().unwrap();
    let names = |list: &[&str]| list.iter().map(|n| (*n).to_owned()).collect::<Vec<String>>();
    assert_eq!(
        sources(&tracker),
        [
            ("mlx", "iommufd-hwpt", vec![]),
            ("plain", "dma-logging", names(&["plain"])),
            (VM1, "iommufd-hwpt", names(&["virtio", "mlx"])),
            ("solo", "iommufd-hwpt", vec![]),
            (VM2, "iommufd-hwpt", names(&["solo"])),
        ]
    );
    assert!(tracker.fully_covered());
    assert!(!mlx.dma_logging_active() && !solo.dma_logging_active() && plain.dma_logging_active());
    assert_eq!(iommu.dirty_tracking_enabled("vm1"), Some(true));
    assert_eq!(iommu.dirty_tracking_enabled("vm2"), Some(true));
    let mlx_stats = stats_of(&tracker, "mlx");
    assert!(matches!(&mlx_stats.coverage, Coverage::FellBack { hwpt, .. } if hwpt == VM1));
    let reason = mlx_stats.coverage_reason().unwrap();
    assert!(reason.contains("DMA_LOGGING_START") && reason.contains("EOPNOTSUPP"), "{reason}");
    assert!(reason.contains(VM1), "{reason}");
    // The HWPT's per-device reason: the refusal for the device that fell back, none for
    // the one that has no logging.
    let hwpt = stats_of(&tracker, VM1);
    assert_eq!(hwpt.device_reason("mlx"), Some(reason));
    assert_eq!(hwpt.device_reason("virtio"), None);
    assert!(stats_of(&tracker, VM2).device_reason("solo").unwrap().contains("EOPNOTSUPP"));

    mlx.dma_write(5 * PAGE + 1, 1);
    solo.dma_write(GIB + PAGE, 2 * PAGE);
    plain.dma_write(7 * MIB, 1);
    let round = tracker.report().unwrap();
    assert!(round.lost.is_empty());
    let expected: BTreeSet<u64> = [5, GIB / PAGE + 1, GIB / PAGE + 2, 7 * MIB / PAGE].into();
    assert_eq!(dirty_pages(tracker.bitmap()), expected);
    assert_eq!(round.new_dirty_pages, 4);
    assert_eq!(stats_of(&tracker, "mlx").dirty_pages_found, 0, "its pages are its HWPT's");
    assert_eq!(stats_of(&tracker, VM2).dirty_pages_found, 2);

    tracker.stop().unwrap();
    assert_eq!(iommu.dirty_tracking_enabled("vm1"), Some(false));
    assert_eq!(iommu.dirty_tracking_enabled("vm2"), Some(false));
    assert!(tracker.stats().all(|s| matches!(s.coverage, Coverage::Idle)), "{:?}", sources(&tracker));

    // Restarted with logging accepted: each device is back on its own source, and the
    // HWPT that only served a fallback is neither a source nor enabled.
    mlx.clear_faults();
    solo.clear_faults();
    tracker.take_dirty();
    tracker.start().unwrap();
    assert_eq!(
        sources(&tracker),
        [
            ("mlx", "dma-logging", names(&["mlx"])),
            ("plain", "dma-logging", names(&["plain"])),
            (VM1, "iommufd-hwpt", names(&["virtio"])),
            ("solo", "dma-logging", names(&["solo"])),
        ]
    );
    assert!(mlx.dma_logging_active() && solo.dma_logging_active());
    assert_eq!(iommu.dirty_tracking_enabled("vm2"), Some(false));
    assert_eq!(stats_of(&tracker, VM1).device_reason("mlx"), None);
    solo.dma_write(3 * MIB, 1);
    mlx.dma_write(GIB, 1);
    tracker.report().unwrap();
    assert_eq!(dirty_pages(tracker.bitmap()), BTreeSet::from([3 * MIB / PAGE, GIB / PAGE]));

    // And refused again: the same fallback as the first time.
    tracker.stop().unwrap();
    mlx.inject(refused());
    tracker.start().unwrap();
    assert_eq!(stats_of(&tracker, "mlx").coverage_source(), "iommufd-hwpt");
    assert_eq!(stats_of(&tracker, VM1).devices, ["virtio", "mlx"]);
    tracker.stop().unwrap();
}

#[test]
fn a_fallback_hwpt_that_cannot_be_enabled_fails_the_whole_start() {
    let iommu = SimIommu::new();
    let a = sim_device(&iommu, "a", true, None);
    let mlx = sim_device(&iommu, "mlx", true, Some(IommuSpec::new("vm1")));
    let c = sim_device(&iommu, "c", true, None);
    mlx.inject(refused());
    mlx.inject(Fault::errno(FaultOp::HwptSetDirtyTracking, Errno::EIO).once());
    let mut tracker = tracker_of(&[&a, &mlx, &c], &GUEST, TrackerConfig::default());
    let err = tracker.start().unwrap_err();
    let TrackerError::Start { device, error, rollback_failures } = &err else { panic!("{err:?}") };
    assert_eq!((device.as_str(), error.errno), (VM1, Errno::EIO));
    assert!(rollback_failures.is_empty());
    let message = err.to_string();
    assert!(message.contains(VM1) && message.contains("fallback of mlx"), "{message}");
    assert!(message.contains("EOPNOTSUPP"), "{message}");
    assert!(!a.dma_logging_active(), "started before the fallback, stopped again");
    assert!(!c.dma_logging_active(), "never started");
    assert_eq!(iommu.dirty_tracking_enabled("vm1"), Some(false));
    assert!(!tracker.is_active());

    // The enable fault fired once: the same tracker starts now, with the fallback.
    tracker.start().unwrap();
    assert!(tracker.fully_covered());
    assert_eq!(stats_of(&tracker, VM1).devices, ["mlx"]);
    assert!(a.dma_logging_active() && c.dma_logging_active());
    tracker.stop().unwrap();

    // A HWPT-only device's source failing after the fallback started it early: that
    // source is stopped again too.
    let virtio = sim_device(&iommu, "virtio", false, Some(IommuSpec::new("vm2")));
    let early = sim_device(&iommu, "early", true, Some(IommuSpec::new("vm2")));
    let d = sim_device(&iommu, "d", true, None);
    early.inject(refused());
    d.inject(Fault::errno(FaultOp::DmaLoggingStart, Errno::EIO).once());
    let mut tracker = tracker_of(&[&early, &virtio, &d], &GUEST, TrackerConfig::default());
    let err = tracker.start().unwrap_err();
    assert!(matches!(&err, TrackerError::Start { device, .. } if device == "d"), "{err:?}");
    assert_eq!(iommu.dirty_tracking_enabled("vm2"), Some(false));
}

#[test]
fn a_fallback_to_a_hwpt_without_dirty_ops_leaves_the_device_uncovered_with_both_reasons() {
    let iommu = SimIommu::new();
    let no_ops = IommuSpec { dirty_tracking: false, ..IommuSpec::new("vm1") };
    let mlx = sim_device(&iommu, "mlx", true, Some(no_ops));
    mlx.inject(refused());
    let mut tracker = tracker_of(&[&mlx], &GUEST, TrackerConfig::default());
    tracker.start().unwrap();
    assert!(!tracker.fully_covered());
    assert_eq!(sources(&tracker), [("mlx", "none", vec!["mlx".to_owned()])]);
    let reason = stats_of(&tracker, "mlx").coverage_reason().unwrap();
    assert!(reason.contains("DMA_LOGGING_START") && reason.contains(VM1), "{reason}");
    assert!(reason.contains("cannot track dirty pages"), "{reason}");
    tracker.stop().unwrap();
}

#[test]
fn a_lost_read_of_a_fallback_hwpt_restarts_it_like_any_other() {
    let iommu = SimIommu::new();
    let mlx = sim_device(&iommu, "mlx", true, Some(IommuSpec::new("vm1")));
    mlx.inject(refused());
    let mut tracker = tracker_of(&[&mlx], &GUEST, TrackerConfig::default());
    tracker.start().unwrap();
    mlx.inject(Fault::errno(FaultOp::HwptGetDirtyBitmap, Errno::EIO).once());
    let round = tracker.report().unwrap();
    assert_eq!(round.lost.len(), 1);
    assert_eq!(round.lost[0].name, VM1);
    assert!(round.lost[0].restarted, "{:?}", round.lost[0]);
    assert_eq!(tracker.bitmap().count(), tracker.bitmap().pages());
    assert_eq!(stats_of(&tracker, "mlx").coverage_source(), "iommufd-hwpt");

    tracker.take_dirty();
    mlx.dma_write(GIB + 3 * PAGE, 1);
    let round = tracker.report().unwrap();
    assert!(round.lost.is_empty());
    assert_eq!(dirty_pages(tracker.bitmap()), BTreeSet::from([GIB / PAGE + 3]));
    tracker.stop().unwrap();
    assert_eq!(iommu.dirty_tracking_enabled("vm1"), Some(false));
}

/// How a device of a generated group is tracked.
#[derive(Clone, Copy, Debug)]
enum Role {
    /// Own DMA logging, no HWPT.
    Logging,
    /// Own DMA logging, and attached to HWPT `n` (seen there too when it tracks).
    LoggingOnHwpt(usize),
    /// No DMA logging: HWPT `n` is its only source.
    HwptOnly(usize),
    /// DMA logging that START refuses (EOPNOTSUPP): falls back to HWPT `n`.
    RefusedOnHwpt(usize),
    /// Neither.
    Uncovered,
}

#[derive(Clone, Debug)]
struct DeviceCase {
    role: Role,
    /// Per round, writes as (guest range index, offset in 1/1024 of the range, length).
    writes: Vec<Vec<(usize, u64, u64)>>,
}

fn arb_device(rounds: usize) -> impl Strategy<Value = DeviceCase> {
    let role = prop_oneof![
        Just(Role::Logging),
        (0usize..2).prop_map(Role::LoggingOnHwpt),
        (0usize..2).prop_map(Role::HwptOnly),
        (0usize..2).prop_map(Role::HwptOnly),
        (0usize..2).prop_map(Role::RefusedOnHwpt),
        Just(Role::Uncovered),
    ];
    let writes = prop::collection::vec(
        prop::collection::vec((0usize..8, 0u64..1024, 1u64..(40 * KIB)), 0..10),
        rounds,
    );
    (role, writes).prop_map(|(role, writes)| DeviceCase { role, writes })
}

/// Guest ranges on 4 KiB (sometimes 64 KiB) boundaries, possibly touching or overlapping.
fn arb_guest() -> impl Strategy<Value = Vec<IovaRange>> {
    (
        prop::sample::select(vec![0u64, 1 << 32]),
        prop::sample::select(vec![PAGE, 64 * KIB]),
        prop::collection::vec((0u64..(48 * MIB / PAGE), 1u64..(6 * MIB / PAGE)), 1..5),
    )
        .prop_map(|(base, unit, ranges)| {
            ranges
                .into_iter()
                .map(|(at, len)| r(base + at * PAGE / unit * unit, (len * PAGE).div_ceil(unit) * unit))
                .collect()
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Groups mixing DMA-logging devices and devices tracked by HWPTs (shared or not,
    /// with or without dirty ops, mapping everything or just the guest): after each round
    /// the group bitmap holds exactly the group pages the covered devices wrote.
    #[test]
    fn mixed_sources_report_exactly_what_covered_devices_wrote(
        guest in arb_guest(),
        group_page in prop::sample::select(vec![PAGE, 16 * KIB]),
        window_bytes in prop::sample::select(vec![8usize, 24, 256, 2 << 20]),
        hwpt_ops in prop::collection::vec(prop::sample::select(vec![true, true, true, false]), 2),
        map_guest_only in any::<bool>(),
        devices in prop::collection::vec(arb_device(2), 1..6),
    ) {
        let iommu = SimIommu::new();
        let guest_4k = normalize(&guest, PAGE).unwrap();
        let mapped: Vec<IommuMapping> = if map_guest_only {
            guest_4k.iter().map(|g| IommuMapping { iova: g.iova, length: g.length }).collect()
        } else {
            Vec::new()
        };
        let hwpt_spec = |n: usize| IommuSpec {
            dirty_tracking: hwpt_ops[n],
            mapped: mapped.clone(),
            ..IommuSpec::new(format!("hwpt{n}"))
        };
        let sims: Vec<Arc<SimDevice>> = devices
            .iter()
            .enumerate()
            .map(|(i, case)| {
                let (logging, hwpt) = match case.role {
                    Role::Logging => (true, None),
                    Role::LoggingOnHwpt(n) => (true, Some(hwpt_spec(n))),
                    Role::HwptOnly(n) => (false, Some(hwpt_spec(n))),
                    Role::RefusedOnHwpt(n) => (true, Some(hwpt_spec(n))),
                    Role::Uncovered => (false, None),
                };
                let device = sim_device(&iommu, &format!("dev{i}"), logging, hwpt);
                if let Role::RefusedOnHwpt(_) = case.role {
                    device.inject(refused());
                }
                device
            })
            .collect();
        // A HWPT tracks when a device of the group has no (accepted) logging and relies
        // on it.
        let tracked: BTreeSet<usize> = devices
            .iter()
            .filter_map(|case| match case.role {
                Role::HwptOnly(n) | Role::RefusedOnHwpt(n) if hwpt_ops[n] => Some(n),
                _ => None,
            })
            .collect();
        let covered = |role: Role| match role {
            Role::Logging => true,
            Role::LoggingOnHwpt(_) => true,
            Role::HwptOnly(n) | Role::RefusedOnHwpt(n) => tracked.contains(&n),
            Role::Uncovered => false,
        };

        let config = TrackerConfig { page_size: group_page, report_window_bytes: window_bytes, ..TrackerConfig::default() };
        let refs: Vec<&Arc<SimDevice>> = sims.iter().collect();
        let mut tracker = tracker_of(&refs, &guest, config);
        tracker.start().unwrap();
        let expect_full = devices.iter().all(|case| covered(case.role));
        prop_assert_eq!(tracker.fully_covered(), expect_full);
        let hwpt_sources = tracker.stats().filter(|s| s.kind == "iommufd-hwpt").count();
        // A HWPT only fallbacks need, that cannot track, is no source.
        let hwpts_used: BTreeSet<usize> = devices
            .iter()
            .filter_map(|case| match case.role {
                Role::HwptOnly(n) => Some(n),
                Role::RefusedOnHwpt(n) if hwpt_ops[n] => Some(n),
                _ => None,
            })
            .collect();
        prop_assert_eq!(hwpt_sources, hwpts_used.len(), "one source per HWPT");
        for (i, case) in devices.iter().enumerate() {
            if let Role::RefusedOnHwpt(_) = case.role {
                let source = stats_of(&tracker, &format!("dev{i}")).coverage_source();
                prop_assert_eq!(source, if covered(case.role) { "iommufd-hwpt" } else { "none" });
            }
        }
        for n in 0..2 {
            let enabled = iommu.dirty_tracking_enabled(&format!("hwpt{n}")).unwrap_or(false);
            prop_assert_eq!(enabled, tracked.contains(&n));
        }

        for round in 0..2 {
            let mut model = BTreeSet::new();
            for (sim, case) in sims.iter().zip(&devices) {
                for &(range, fraction, length) in &case.writes[round] {
                    let target = guest[range % guest.len()];
                    let iova = target.iova + target.length * fraction / 1024;
                    let length = length.min(target.end() - iova).max(1);
                    sim.dma_write(iova, length);
                    if covered(case.role) {
                        model.extend(iova / group_page..=(iova + length - 1) / group_page);
                    }
                }
                // Far outside the guest: never reported, whatever tracks it.
                sim.dma_write(1 << 40, PAGE);
            }
            let report = tracker.report().unwrap();
            prop_assert!(report.lost.is_empty());
            prop_assert_eq!(report.new_dirty_pages, model.len() as u64);
            prop_assert_eq!(dirty_pages(tracker.bitmap()), model);
            let found: u64 = tracker.stats().map(|s| s.last_dirty_pages).sum();
            prop_assert_eq!(found, report.new_dirty_pages);
            tracker.take_dirty();
        }
        tracker.stop().unwrap();
        for n in 0..2 {
            prop_assert_ne!(iommu.dirty_tracking_enabled(&format!("hwpt{n}")), Some(true));
        }
        prop_assert!(sims.iter().all(|s| !s.dma_logging_active()));
    }
}
