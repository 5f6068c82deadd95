//! Runs inside the real-kernel test guest (`tests/real-kernel/run.sh`): drives the kernel's
//! VFIO migration v2 uAPI on mtty mdevs through the project's own device layer
//! (`VfioDevice`, the `vfio` module and the FSM), never through ioctls of its own.
//!
//! Prints one `ok NAME` / `FAIL NAME: WHY` line per check and a final `N passed, M failed`
//! line; exits non-zero when a check failed.
//!
//! Usage: `vfio-kernel-check TYPE:UUID...`, two mdevs per type (a source and a
//! destination), e.g. `mtty-1:UUID mtty-1:UUID mtty-2:UUID mtty-2:UUID`.

use std::fs;
use std::path::Path;
use std::process::ExitCode;

use nix::errno::Errno;
use vfio_migd::device::vfio::{VfioDevice, sysfs_identity};
use vfio_migd::device::{
    DataFd, DeviceError, DeviceIdentity, Direction, ErrorKind, IovaRange, MigrationDevice,
};
use vfio_migd::fsm::{self, Caps, Session, State};
use vfio_migd::vfio::{OpenPath, VfioHost};
use vfio_migd_tests::mtty::{self, MttyType, PORT_SCRIPTS, PortScript, reg};
use vfio_migd_tests::report::{Report, ensure};

/// Ceiling on any stream read here: mtty images are under 100 bytes, so reading more
/// means the driver never reports the end.
const MAX_STREAM: usize = 4096;

fn show(err: DeviceError) -> String {
    err.to_string()
}

/// The last path component a sysfs symlink points to.
fn link_name(link: &Path) -> Result<String, String> {
    let target = fs::read_link(link).map_err(|e| format!("readlink {}: {e}", link.display()))?;
    target
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .ok_or_else(|| format!("{} points to {}", link.display(), target.display()))
}

/// Opens an mdev through the legacy group/container path, its group number read from
/// `/sys/bus/mdev/devices/<uuid>/iommu_group`, after checking sysfs agrees on its type.
fn open_mdev(mtty: MttyType, uuid: &str) -> Result<VfioDevice, String> {
    let host = VfioHost::system();
    let identity = sysfs_identity(host.sysfs(), uuid).map_err(show)?;
    let want = DeviceIdentity { driver: "mtty".to_string(), model: mtty.sysfs_name().to_string() };
    ensure(identity == want, || format!("sysfs identity {identity}, expected {want}"))?;
    let group_link = Path::new("/sys/bus/mdev/devices").join(uuid).join("iommu_group");
    let group_name = link_name(&group_link)?;
    let group: u32 = group_name.parse().map_err(|_| format!("IOMMU group `{group_name}` is not a number"))?;
    let handle = host.open_group_id(group, uuid).map_err(show)?;
    ensure(handle.open_path() == OpenPath::Group { group }, || {
        format!("opened via {:?}", handle.open_path())
    })?;
    Ok(VfioDevice::new(handle, identity))
}

/// Reads a saving data_fd until the driver reports the end of the stream.
fn read_stream(data_fd: &DataFd) -> Result<Vec<u8>, String> {
    let mut stream = Vec::new();
    let mut chunk = [0u8; 256];
    loop {
        match data_fd.read_chunk(&mut chunk) {
            Ok(0) => return Ok(stream),
            // A temporary end of a PRE_COPY stream some drivers report instead of 0.
            Err(Errno::ENOMSG) => return Ok(stream),
            Ok(n) => stream.extend_from_slice(&chunk[..n]),
            Err(errno) => return Err(format!("read after {} bytes: {errno}", stream.len())),
        }
        if stream.len() > MAX_STREAM {
            return Err(format!("more than {MAX_STREAM} bytes and no end of stream"));
        }
    }
}

fn expect_state(device: &VfioDevice, want: State) -> Result<(), String> {
    let got = device.state().map_err(show)?;
    ensure(got == want, || format!("GET says {got}, expected {want}"))
}

/// SET `target`, checking the returned data_fd against what the FSM predicts.
fn set_and_check(device: &VfioDevice, caps: Caps, target: State) -> Result<Option<DataFd>, String> {
    let current = device.state().map_err(show)?;
    let arcs = fsm::path(caps, current, target)
        .map_err(|why| format!("FSM refuses {current} -> {target}: {why}"))?;
    let data_fd = device.set_state(target).map_err(show)?;
    let end = arcs.last().map_or(current, |arc| arc.to);
    expect_state(device, end)?;
    match (fsm::session_of(&arcs), &data_fd) {
        (Session::None, None) => {}
        (Session::OpensSaving, Some(fd)) if fd.direction() == Direction::Saving => {}
        (Session::OpensResuming, Some(fd)) if fd.direction() == Direction::Resuming => {}
        (session, fd) => {
            return Err(format!(
                "{current} -> {target}: FSM predicts {session:?}, SET returned {}",
                match fd {
                    Some(fd) => format!("a {:?} data_fd", fd.direction()),
                    None => "no data_fd".to_string(),
                }
            ));
        }
    }
    Ok(data_fd)
}

/// SET `target` where the FSM says a session opens; its data_fd.
fn open_session(device: &VfioDevice, caps: Caps, target: State) -> Result<DataFd, String> {
    set_and_check(device, caps, target)?.ok_or_else(|| format!("-> {target} opened no session"))
}

fn write_port(device: &VfioDevice, port: usize, script: &PortScript) -> Result<(), String> {
    for (offset, value) in script.writes() {
        device.handle().bar_write(port as u32, offset, &[value]).map_err(show)?;
    }
    Ok(())
}

fn read_register(device: &VfioDevice, port: usize, offset: u64) -> Result<u8, String> {
    let mut byte = [0u8];
    device.handle().bar_read(port as u32, offset, &mut byte).map_err(show)?;
    Ok(byte[0])
}

/// Reads back what [`write_port`] set, on the device the state was resumed into. The RX
/// reads drain the FIFO, so this runs once.
fn verify_port(device: &VfioDevice, port: usize, script: &PortScript) -> Result<(), String> {
    let register = |offset| read_register(device, port, offset);
    let expect = |what: &str, got: u8, want: u8| {
        ensure(got == want, || format!("port {port} {what} = {got:#04x}, expected {want:#04x}"))
    };
    expect("SCR", register(reg::SCR)?, script.scratch)?;
    expect("LCR", register(reg::LCR)?, mtty::LCR_8N1)?;
    expect("MCR", register(reg::MCR)?, mtty::MCR_VALUE)?;
    expect("IER", register(reg::IER)? & 0x0F, mtty::IER_VALUE)?;
    let lsr = register(reg::LSR)?;
    expect(
        "LSR data-ready and tx bits",
        lsr & (mtty::LSR_DATA_READY | mtty::LSR_TX_IDLE),
        mtty::LSR_DATA_READY,
    )?;
    let mut fifo = [0u8; 4];
    for byte in &mut fifo {
        *byte = register(reg::DATA)?;
    }
    ensure(fifo == script.fifo, || {
        format!("port {port} RX gave {fifo:02x?}, expected {:02x?}", script.fifo)
    })?;
    expect("LSR once drained", register(reg::LSR)?, mtty::LSR_TX_IDLE)
}

/// Every state this device can be in, ERROR excluded.
fn states(caps: Caps) -> Vec<State> {
    State::ALL.into_iter().filter(|&state| caps.supports(state)).collect()
}

/// From RUNNING (after a reset) into `from`; a resuming session is fed `image` in full,
/// so that leaving RESUMING loads a state mtty itself produced.
fn enter(device: &VfioDevice, caps: Caps, from: State, image: &[u8]) -> Result<Option<DataFd>, String> {
    device.reset().map_err(show)?;
    expect_state(device, State::Running).map_err(|e| format!("after reset: {e}"))?;
    let data_fd = set_and_check(device, caps, from).map_err(|e| format!("entering {from}: {e}"))?;
    if let Some(fd) = &data_fd
        && fd.direction() == Direction::Resuming
    {
        fd.write_all_bytes(image).map_err(|errno| format!("writing the saved image: {errno}"))?;
    }
    Ok(data_fd)
}

/// One arc: the device in `from`, then SET `to`.
fn check_arc(device: &VfioDevice, caps: Caps, from: State, to: State, image: &[u8]) -> Result<(), String> {
    let _from_session = enter(device, caps, from, image)?;
    match fsm::path(caps, from, to) {
        Ok(_) => set_and_check(device, caps, to).map(drop),
        Err(why) => {
            // Refused by the project's layer before any SET: old kernels spin forever on
            // the blocked arcs, so the only evidence the kernel was not asked is the FSM's
            // own reason in the error and an unchanged device.
            let err = match device.set_state(to) {
                Ok(_) => return Err(format!("blocked {from} -> {to} was accepted")),
                Err(err) => err,
            };
            ensure(err.errno == Errno::EINVAL && err.kind == ErrorKind::InvalidRequest, || {
                format!("refusal is {} ({}), expected EINVAL", err.kind, err.errno)
            })?;
            ensure(err.detail.as_deref() == Some(why.to_string().as_str()), || {
                format!("refusal `{err}` does not carry the FSM's reason `{why}`")
            })?;
            expect_state(device, from)
        }
    }
}

/// Every reachable (from, to) pair of distinct states.
fn check_every_arc(report: &mut Report, tag: &str, device: &VfioDevice, caps: Caps, image: &[u8]) {
    for from in states(caps) {
        for to in states(caps) {
            if from != to {
                report.check(&format!("{tag}: arc {from} -> {to}"), check_arc(device, caps, from, to, image));
            }
        }
    }
    report.check(&format!("{tag}: reset after the arc sweep"), {
        device.reset().map_err(show).and_then(|()| expect_state(device, State::Running))
    });
}

/// Guest-visible state into `source`, then STOP → STOP_COPY; returns the stream.
fn save_stop_copy(
    report: &mut Report,
    tag: &str,
    mtty: MttyType,
    source: &VfioDevice,
    caps: Caps,
) -> Option<Vec<u8>> {
    report.step(
        &format!("{tag}: program UART registers through the BARs"),
        PORT_SCRIPTS
            .iter()
            .take(mtty.ports())
            .enumerate()
            .try_for_each(|(port, script)| write_port(source, port, script)),
    )?;
    report.step(&format!("{tag}: RUNNING -> STOP"), set_and_check(source, caps, State::Stop))?;
    let data_fd =
        report.step(&format!("{tag}: STOP -> STOP_COPY"), open_session(source, caps, State::StopCopy))?;
    let image = report.step(&format!("{tag}: STOP_COPY stream to EOF"), read_stream(&data_fd))?;
    let size = source.data_size().map_err(show);
    report.check(
        &format!("{tag}: stream length = MIG_DATA_SIZE"),
        size.and_then(|size| {
            ensure(image.len() as u64 == size, || format!("{} bytes, MIG_DATA_SIZE {size}", image.len()))
        }),
    );
    report.check(&format!("{tag}: stream header (magic, version, ports)"), mtty::check_header(&image, mtty));
    report.check(
        &format!("{tag}: stream carries the programmed registers, FIFO and divisor"),
        PORT_SCRIPTS
            .iter()
            .take(mtty.ports())
            .enumerate()
            .try_for_each(|(port, script)| script.check_record(&image, port)),
    );
    drop(data_fd);
    report.check(&format!("{tag}: STOP_COPY -> STOP -> RUNNING"), {
        set_and_check(source, caps, State::Stop)
            .and_then(|_| set_and_check(source, caps, State::Running))
            .map(drop)
    });
    Some(image)
}

/// The saved stream into a fresh device of the same type; the registers read back.
fn resume(report: &mut Report, tag: &str, mtty: MttyType, target: &VfioDevice, caps: Caps, image: &[u8]) {
    let steps = || -> Result<(), String> {
        set_and_check(target, caps, State::Stop)?;
        let data_fd = open_session(target, caps, State::Resuming)?;
        data_fd.write_all_bytes(image).map_err(|errno| format!("writing {} bytes: {errno}", image.len()))?;
        set_and_check(target, caps, State::Stop)?;
        drop(data_fd);
        set_and_check(target, caps, State::Running).map(drop)
    };
    if report.check(&format!("{tag}: STOP -> RESUMING, write stream, -> STOP -> RUNNING"), steps()) {
        report.check(
            &format!("{tag}: resumed registers and FIFO read back through the BARs"),
            PORT_SCRIPTS
                .iter()
                .take(mtty.ports())
                .enumerate()
                .try_for_each(|(port, script)| verify_port(target, port, script)),
        );
    }
}

/// RUNNING → PRE_COPY → PRE_COPY_P2P → STOP_COPY on one data_fd.
fn pre_copy(report: &mut Report, tag: &str, mtty: MttyType, source: &VfioDevice, caps: Caps, image: &[u8]) {
    let Some(data_fd) =
        report.step(&format!("{tag}: RUNNING -> PRE_COPY"), open_session(source, caps, State::PreCopy))
    else {
        return;
    };
    report.check(&format!("{tag}: PRECOPY_INFO initial 24, dirty 0"), {
        source.precopy_info(&data_fd).map_err(show).and_then(|info| {
            ensure(info.initial_bytes == mtty::HEADER_LEN as u64 && info.dirty_bytes == 0, || {
                format!("{info:?}")
            })
        })
    });
    let Some(mut stream) = report.step(&format!("{tag}: PRE_COPY initial data"), {
        read_stream(&data_fd).and_then(|head| {
            ensure(head.len() == mtty::HEADER_LEN, || format!("{} bytes before the end", head.len()))?;
            mtty::check_header(&head, mtty)?;
            Ok(head)
        })
    }) else {
        return;
    };
    let same_fd = |target| {
        set_and_check(source, caps, target)
            .and_then(|fd| ensure(fd.is_none(), || format!("-> {target} returned a new data_fd")))
    };
    report.check(&format!("{tag}: PRE_COPY -> PRE_COPY_P2P keeps the data_fd"), same_fd(State::PreCopyP2p));
    report.check(&format!("{tag}: PRE_COPY_P2P -> STOP_COPY keeps the data_fd"), same_fd(State::StopCopy));
    report.check(&format!("{tag}: rest of the stream on the same data_fd"), {
        read_stream(&data_fd).and_then(|rest| {
            stream.extend_from_slice(&rest);
            let size = source.data_size().map_err(show)?;
            ensure(stream.len() as u64 == size, || {
                format!("{} bytes in all, MIG_DATA_SIZE {size}", stream.len())
            })?;
            ensure(stream == image, || "the pre-copy stream differs from the STOP_COPY image".to_string())
        })
    });
    drop(data_fd);
    report.check(
        &format!("{tag}: STOP_COPY -> RUNNING"),
        set_and_check(source, caps, State::Running).map(drop),
    );
}

/// A stream cut short: leaving RESUMING fails with EINVAL and the device stays there.
fn truncated(report: &mut Report, tag: &str, target: &VfioDevice, caps: Caps, image: &[u8]) {
    let steps = || -> Result<(), String> {
        let data_fd = open_session(target, caps, State::Resuming)?;
        let cut = &image[..image.len() - 1];
        data_fd.write_all_bytes(cut).map_err(|errno| format!("writing {} bytes: {errno}", cut.len()))?;
        let err = match target.set_state(State::Stop) {
            Ok(_) => return Err("RESUMING -> STOP accepted a truncated stream".to_string()),
            Err(err) => err,
        };
        ensure(err.errno == Errno::EINVAL && err.kind == ErrorKind::InvalidRequest, || format!("{err}"))?;
        ensure(err.state_after == Some(State::Resuming), || {
            format!("state_after {:?} in `{err}`", err.state_after)
        })?;
        expect_state(target, State::Resuming)
    };
    report.check(
        &format!("{tag}: truncated stream: RESUMING -> STOP is EINVAL, device stays RESUMING"),
        steps(),
    );
    report.check(&format!("{tag}: reset after the truncated stream"), {
        target.reset().map_err(show).and_then(|()| expect_state(target, State::Running))
    });
}

fn dma_logging(report: &mut Report, tag: &str, device: &VfioDevice) {
    const PAGE: u64 = 4096;
    const LENGTH: u64 = 1 << 20;
    report.check(&format!("{tag}: DMA logging PROBE"), {
        device
            .dma_logging_supported()
            .map_err(show)
            .and_then(|yes| ensure(yes, || "PROBE says unsupported".into()))
    });
    report.check(&format!("{tag}: DMA_LOGGING_START"), {
        device.dma_logging_start(&[IovaRange { iova: 0, length: LENGTH }], PAGE).map(drop).map_err(show)
    });
    report.check(&format!("{tag}: DMA_LOGGING_REPORT is EOPNOTSUPP (kind Unsupported)"), {
        let mut bitmap = vec![0u64; (LENGTH / PAGE).div_ceil(64) as usize];
        match device.dma_logging_report(0, LENGTH, PAGE, &mut bitmap) {
            Ok(()) => Err("REPORT succeeded on a kernel without CONFIG_IOMMUFD_DRIVER".to_string()),
            Err(err) => ensure(err.errno == Errno::EOPNOTSUPP && err.kind == ErrorKind::Unsupported, || {
                format!("{err}")
            }),
        }
    });
    report.check(&format!("{tag}: DMA_LOGGING_STOP"), device.dma_logging_stop().map_err(show));
}

/// Every check for one mdev type, on a source and a destination device.
fn check_type(report: &mut Report, mtty: MttyType, uuids: &[String]) {
    let tag = mtty.sysfs_name();
    let [source_uuid, target_uuid] = uuids else {
        report.check(&format!("{tag}: two devices given"), Err(format!("{} given", uuids.len())));
        return;
    };
    let Some(source) =
        report.step(&format!("{tag}: open source {source_uuid}"), open_mdev(mtty, source_uuid))
    else {
        return;
    };
    let Some(target) =
        report.step(&format!("{tag}: open destination {target_uuid}"), open_mdev(mtty, target_uuid))
    else {
        return;
    };
    let want_caps = Caps::STOP_COPY.union(Caps::P2P).union(Caps::PRE_COPY);
    let Some(caps) = report.step(&format!("{tag}: migration caps = {want_caps}"), {
        source.caps().map_err(show).and_then(|caps| {
            ensure(caps == want_caps, || format!("caps {caps}"))?;
            Ok(caps)
        })
    }) else {
        return;
    };
    for (role, device) in [("source", &source), ("destination", &target)] {
        report.check(&format!("{tag}: {role} MIG_DATA_SIZE = {}", mtty.image_len()), {
            device
                .data_size()
                .map_err(show)
                .and_then(|size| ensure(size == mtty.image_len() as u64, || format!("MIG_DATA_SIZE {size}")))
        });
        report.check(&format!("{tag}: {role} starts in RUNNING"), expect_state(device, State::Running));
    }

    let Some(image) = save_stop_copy(report, tag, mtty, &source, caps) else {
        return;
    };
    resume(report, tag, mtty, &target, caps, &image);
    pre_copy(report, tag, mtty, &source, caps, &image);
    truncated(report, tag, &target, caps, &image);
    dma_logging(report, tag, &source);
    check_every_arc(report, tag, &source, caps, &image);
}

fn main() -> ExitCode {
    let mut report = Report::default();
    if let Some(by_type) = report.step("arguments", mtty::mdevs_by_type(std::env::args().skip(1))) {
        for (mtty, uuids) in by_type.values() {
            check_type(&mut report, *mtty, uuids);
        }
    }
    println!("{}", report.summary());
    if report.failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
