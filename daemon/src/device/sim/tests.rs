//! The simulator against the kernel's contract, through the `MigrationDevice` trait.

use std::time::{Duration, Instant};

use nix::errno::Errno;

use super::*;
use crate::device::ErrorKind;
use crate::fsm::Session;

fn spec(name: &str, caps: Caps, size: u64) -> SimSpec {
    SimSpec { caps, state_size: size, seed: Some(0x5EED), ..SimSpec::new(name) }
}

fn device(caps: Caps, size: u64) -> SimDevice {
    SimDevice::new(spec("dev", caps, size)).unwrap()
}

const FULL: Caps = Caps::MIGRATABLE[3];

/// Reads until a read returns 0 (the final end in STOP_COPY, a temporary one in PRE_COPY).
fn read_available(fd: &DataFd) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 256 << 10];
    loop {
        match fd.read_chunk(&mut buf).unwrap() {
            0 => return out,
            n => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Streams `src` into `dst` until `src` ends, without holding the stream; returns the
/// byte count.
fn relay(src: &DataFd, dst: &DataFd) -> u64 {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        match src.read_chunk(&mut buf).unwrap() {
            0 => return total,
            n => {
                dst.write_all_bytes(&buf[..n]).unwrap();
                total += n as u64;
            }
        }
    }
}

/// A complete STOP_COPY stream of a fresh device with `spec`'s identity and state.
fn saved_stream(spec: &SimSpec) -> Vec<u8> {
    let src = SimDevice::new(spec.clone()).unwrap();
    let fd = src.set_state(State::StopCopy).unwrap().unwrap();
    read_available(&fd)
}

/// Brings a fresh device to `state` the way the engine would, keeping the data_fd.
/// RESUMING gets a complete valid stream written, so leaving it loads.
fn bring_to(dev: &SimDevice, state: State) -> Option<DataFd> {
    if state == State::Running {
        return None;
    }
    let fd = dev.set_state(state).unwrap();
    if state == State::Resuming {
        let stream = saved_stream(dev.spec());
        fd.as_ref().unwrap().write_all_bytes(&stream).unwrap();
    }
    fd
}

fn supported_states(caps: Caps) -> Vec<State> {
    State::ALL.into_iter().filter(|&s| caps.supports(s)).collect()
}

/// The arcs a driver with `caps` must implement (uAPI reference §2.3).
fn driver_arcs(caps: Caps) -> Vec<fsm::Arc> {
    use State::*;
    let mut arcs = vec![(Stop, StopCopy), (StopCopy, Stop), (Stop, Resuming), (Resuming, Stop)];
    match (caps.has_p2p(), caps.has_pre_copy()) {
        (false, false) => arcs.extend([(Running, Stop), (Stop, Running)]),
        (true, false) => arcs.extend([
            (Running, RunningP2p),
            (RunningP2p, Running),
            (RunningP2p, Stop),
            (Stop, RunningP2p),
        ]),
        (false, true) => arcs.extend([
            (Running, Stop),
            (Stop, Running),
            (Running, PreCopy),
            (PreCopy, Running),
            (PreCopy, StopCopy),
        ]),
        (true, true) => arcs.extend([
            (Running, RunningP2p),
            (RunningP2p, Running),
            (RunningP2p, Stop),
            (Stop, RunningP2p),
            (Running, PreCopy),
            (PreCopy, Running),
            (PreCopy, PreCopyP2p),
            (PreCopyP2p, PreCopy),
            (RunningP2p, PreCopyP2p),
            (PreCopyP2p, RunningP2p),
            (PreCopyP2p, StopCopy),
        ]),
    }
    let mut arcs: Vec<fsm::Arc> = arcs.into_iter().map(|(from, to)| fsm::Arc { from, to }).collect();
    arcs.sort_by_key(|a| (a.from, a.to));
    arcs
}

#[test]
fn every_arc_of_every_capability_set_follows_the_kernel_fsm() {
    for caps in Caps::MIGRATABLE {
        let mut walked: Vec<fsm::Arc> = Vec::new();
        for from in supported_states(caps) {
            for to in State::ALL {
                let dev = device(caps, 3 * 4096 + 1);
                let _held = bring_to(&dev, from);
                assert_eq!(dev.state().unwrap(), from);
                let logged_before = dev.arcs().len();
                let result = dev.set_state(to);
                let new_arcs = dev.arcs()[logged_before..].to_vec();
                match fsm::path(caps, from, to) {
                    Ok(path) => {
                        let fd = result.unwrap_or_else(|e| panic!("{caps} {from} -> {to}: {e}"));
                        assert_eq!(new_arcs, path, "{caps} {from} -> {to}");
                        assert_eq!(dev.state().unwrap(), to);
                        let opens = fsm::session_of(&path) != Session::None;
                        assert_eq!(fd.is_some(), opens, "{caps} {from} -> {to}: data_fd");
                        if let Some(fd) = fd {
                            let expected = match fsm::session_of(&path) {
                                Session::OpensResuming => Direction::Resuming,
                                _ => Direction::Saving,
                            };
                            assert_eq!(fd.direction(), expected);
                        }
                        walked.extend(path);
                    }
                    Err(_) => {
                        let err = result.unwrap_err();
                        assert_eq!(err.errno, Errno::EINVAL, "{caps} {from} -> {to}");
                        assert_eq!(err.state_after, Some(from));
                        assert!(new_arcs.is_empty(), "a refused SET walks nothing");
                        assert_eq!(dev.state().unwrap(), from);
                    }
                }
            }
        }
        walked.sort_by_key(|a| (a.from, a.to));
        walked.dedup();
        assert_eq!(walked, driver_arcs(caps), "{caps}: every arc a driver implements, and no other");
    }
}

#[test]
fn refused_requests_are_einval_without_side_effects() {
    let plain = device(Caps::STOP_COPY, 4096);
    for target in [State::RunningP2p, State::PreCopy, State::PreCopyP2p, State::Error] {
        let err = plain.set_state(target).unwrap_err();
        assert_eq!(
            (err.errno, err.kind, err.state_after),
            (Errno::EINVAL, ErrorKind::InvalidRequest, Some(State::Running))
        );
    }
    let full = device(FULL, 4096);
    let _fd = full.set_state(State::StopCopy).unwrap();
    for target in [State::PreCopy, State::PreCopyP2p] {
        let err = full.set_state(target).unwrap_err();
        assert_eq!(err.errno, Errno::EINVAL);
        assert!(err.to_string().contains("blocked"), "{err}");
        assert_eq!(full.state().unwrap(), State::StopCopy);
    }
    // In ERROR nothing but a reset is accepted.
    full.inject(Fault::fall_into_error().in_state(State::Stop));
    let err = full.set_state(State::Stop).unwrap_err();
    assert_eq!(
        (err.errno, err.kind, err.state_after),
        (Errno::EIO, ErrorKind::DeviceFailure, Some(State::Error))
    );
    assert_eq!(full.state().unwrap(), State::Error);
    for target in State::ALL {
        let err = full.set_state(target).unwrap_err();
        assert_eq!(
            (err.errno, err.state_after),
            (Errno::EINVAL, Some(State::Error)),
            "SET {target} in ERROR"
        );
    }
    full.reset().unwrap();
    assert_eq!(full.state().unwrap(), State::Running);
}

#[test]
fn round_trips_are_byte_for_byte_for_every_size() {
    for size in [0, 1, 4096 + 3, 8 << 20] {
        let spec = spec("src", FULL, size);
        let src = SimDevice::new(spec.clone()).unwrap();
        let dst = SimDevice::new(SimSpec { name: "dst".into(), seed: Some(1), ..spec }).unwrap();
        src.dirty_state(25).unwrap();
        assert_ne!(src.state_digest(), dst.state_digest(), "size {size}: the two start different");
        let out = src.set_state(State::StopCopy).unwrap().unwrap();
        let into = dst.set_state(State::Resuming).unwrap().unwrap();
        let moved = relay(&out, &into);
        assert_eq!(moved, src.data_size().unwrap(), "size {size}: MIG_DATA_SIZE is the exact stream length");
        assert_eq!(dst.set_state(State::Stop).unwrap().map(|_| ()), None);
        let expected = src.state_id();
        assert_eq!(expected.generation, if size == 0 { 0 } else { 25 });
        assert_eq!(dst.loaded_state(), Some(expected), "size {size}");
        assert_eq!(dst.state_digest(), src.state_digest(), "size {size}");
        assert_eq!(dst.state_digest(), digest_of(expected), "size {size}");
        // The destination runs on from the migrated state.
        dst.set_state(State::Running).unwrap();
        assert_eq!(dst.state_id(), expected);
        src.set_state(State::Running).unwrap();
    }
}

#[test]
fn data_size_is_the_stop_copy_length_in_every_state() {
    let dev = device(FULL, 5 * 4096 + 17);
    let expected = dev.data_size().unwrap();
    let _pre = dev.set_state(State::PreCopy).unwrap();
    assert_eq!(dev.data_size().unwrap(), expected);
    dev.set_state(State::Stop).unwrap();
    let _res = dev.set_state(State::Resuming).unwrap();
    assert_eq!(dev.data_size().unwrap(), expected);
    dev.reset().unwrap();
    let fd = dev.set_state(State::StopCopy).unwrap().unwrap();
    assert_eq!(read_available(&fd).len() as u64, expected);
}

#[test]
fn pre_copy_continues_the_same_fd_through_p2p_into_stop_copy() {
    let size = 300 * 4096 + 100;
    let spec = spec("src", FULL, size);
    let src = SimDevice::new(spec.clone()).unwrap();
    let dst = SimDevice::new(SimSpec { name: "dst".into(), ..spec }).unwrap();
    let into = dst.set_state(State::Resuming).unwrap().unwrap();

    let fd = src.set_state(State::PreCopy).unwrap().unwrap();
    let info = src.precopy_info(&fd).unwrap();
    assert_eq!(info.dirty_bytes, 0);
    let initial = info.initial_bytes;
    assert!(initial > size, "the initial image is the whole state plus framing");

    // initial_bytes counts down exactly as the engine reads.
    let mut chunk = vec![0u8; 10_000];
    let n = fd.read_chunk(&mut chunk).unwrap();
    into.write_all_bytes(&chunk[..n]).unwrap();
    assert_eq!(src.precopy_info(&fd).unwrap().initial_bytes, initial - n as u64);
    let rest = read_available(&fd);
    into.write_all_bytes(&rest).unwrap();
    assert_eq!(n + rest.len(), initial as usize);
    assert_eq!(
        src.precopy_info(&fd).unwrap(),
        PrecopyInfo { initial_bytes: 0, dirty_bytes: 0, reinit: false }
    );
    assert_eq!(fd.read_chunk(&mut chunk).unwrap(), 0, "temporary end: 0 like mtty");

    // The device keeps running: the dirty pages become readable after PRECOPY_INFO.
    src.dirty_state(20).unwrap();
    let dirty = src.precopy_info(&fd).unwrap().dirty_bytes;
    assert!(dirty > 0);
    let batch = read_available(&fd);
    assert_eq!(batch.len() as u64, dirty, "dirty_bytes is exactly what the next reads deliver");
    into.write_all_bytes(&batch).unwrap();

    src.dirty_state(7).unwrap();
    assert_eq!(
        src.set_state(State::PreCopyP2p).unwrap().map(|_| ()),
        None,
        "no new fd inside the saving group"
    );
    // A P2P-quiesced device keeps running (it only initiates no P2P DMA): its changes
    // are owed to the stream like any other (issue #11, case 7).
    assert!(src.dirty_state(1).is_ok(), "a PRE_COPY_P2P device keeps running");
    let pending = src.precopy_info(&fd).unwrap();
    assert_eq!(pending.initial_bytes, 0);
    assert!(pending.dirty_bytes > 0, "pages dirtied before quiescing are still owed");

    assert_eq!(src.set_state(State::StopCopy).unwrap().map(|_| ()), None, "STOP_COPY continues the same fd");
    assert_eq!(src.precopy_info(&fd).unwrap_err().errno, Errno::EINVAL, "PRECOPY_INFO outside PRE_COPY*");
    relay(&fd, &into);
    dst.set_state(State::Stop).unwrap();
    assert_eq!(dst.loaded_state(), Some(src.state_id()));
    assert_eq!(src.state_id().generation, 28);
    assert_eq!(dst.state_digest(), src.state_digest());

    src.set_state(State::Stop).unwrap();
    assert_eq!(fd.read_chunk(&mut chunk), Err(Errno::ENODEV), "STOP_COPY -> STOP disables the fd");
    assert_eq!(
        src.arcs(),
        [
            (State::Running, State::PreCopy),
            (State::PreCopy, State::PreCopyP2p),
            (State::PreCopyP2p, State::StopCopy),
            (State::StopCopy, State::Stop)
        ]
        .map(|(from, to)| fsm::Arc { from, to })
    );
}

#[test]
fn pre_copy_can_answer_enomsg_at_the_temporary_end() {
    let dev = SimDevice::new(SimSpec { precopy_end: PrecopyEnd::Enomsg, ..spec("mlx", FULL, 4096) }).unwrap();
    let fd = dev.set_state(State::PreCopy).unwrap().unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0;
    let err = loop {
        match fd.read_chunk(&mut buf) {
            Ok(n) => total += n as u64,
            Err(err) => break err,
        }
    };
    assert_eq!(err, Errno::ENOMSG);
    assert_eq!(ErrorKind::classify(err), ErrorKind::NoDataYet);
    assert_eq!(total, dev.data_size().unwrap() - 40, "the initial bytes are the stream without END");
    let fd2 = dev.set_state(State::StopCopy).unwrap();
    assert!(fd2.is_none());
    assert_eq!(read_available(&fd).len(), 40, "STOP_COPY adds only the END record");
}

#[test]
fn leaving_pre_copy_for_stop_abandons_the_session() {
    let dev = device(FULL, 64 << 10);
    let fd = dev.set_state(State::PreCopy).unwrap().unwrap();
    let mut buf = [0u8; 100];
    assert!(fd.read_chunk(&mut buf).unwrap() > 0);
    dev.set_state(State::Stop).unwrap();
    assert_eq!(
        dev.arcs().iter().map(|a| a.to).collect::<Vec<_>>(),
        [State::PreCopy, State::Running, State::RunningP2p, State::Stop]
    );
    assert_eq!(fd.read_chunk(&mut buf), Err(Errno::ENODEV));
    let err = dev.precopy_info(&fd).unwrap_err();
    assert_eq!(err.errno, Errno::EINVAL);
    // A new PRE_COPY session does not accept the abandoned fd.
    dev.set_state(State::Running).unwrap();
    let _fresh = dev.set_state(State::PreCopy).unwrap().unwrap();
    assert_eq!(dev.precopy_info(&fd).unwrap_err().errno, Errno::ENODEV);
}

#[test]
fn resume_rejects_truncated_corrupt_and_over_long_streams_and_stays_in_resuming() {
    let spec = spec("d", FULL, 20 * 4096 + 9);
    let stream = saved_stream(&spec);
    let fresh = || {
        let dev = SimDevice::new(spec.clone()).unwrap();
        let fd = dev.set_state(State::Resuming).unwrap().unwrap();
        (dev, fd)
    };
    let expect_stays = |dev: &SimDevice, what: &str| {
        let err = dev.set_state(State::Running).unwrap_err();
        assert_eq!((err.errno, err.state_after), (Errno::EINVAL, Some(State::Resuming)), "{what}: {err}");
        assert_eq!(dev.state().unwrap(), State::Resuming, "{what}");
        assert_eq!(dev.loaded_state(), None, "{what}");
        err
    };

    // Nothing written.
    let (dev, _fd) = fresh();
    expect_stays(&dev, "empty");

    // Truncated, then completed: mtty lets the rest be written.
    let (dev, fd) = fresh();
    fd.write_all_bytes(&stream[..stream.len() - 10]).unwrap();
    let err = expect_stays(&dev, "truncated");
    assert!(err.to_string().contains("incomplete"), "{err}");
    fd.write_all_bytes(&stream[stream.len() - 10..]).unwrap();
    dev.set_state(State::Stop).unwrap();
    assert!(dev.loaded_state().is_some());
    assert_eq!(fd.write_all_bytes(b"x"), Err(Errno::ENODEV), "the session ended with the load");

    // Corrupt payload: accepted on write, found by the device's own check.
    for at in [200, stream.len() / 2, stream.len() - 3] {
        let (dev, fd) = fresh();
        let mut bad = stream.clone();
        bad[at] ^= 1;
        fd.write_all_bytes(&bad).unwrap();
        let err = expect_stays(&dev, "corrupt");
        assert!(err.to_string().contains("rejected"), "{err}");
        dev.reset().unwrap();
        assert_eq!(dev.state().unwrap(), State::Running);
    }

    // One byte too many: that write fails with ENOMEM and the stream is bad for good.
    let (dev, fd) = fresh();
    fd.write_all_bytes(&stream).unwrap();
    let err = fd.write_all_bytes(&[0]).unwrap_err();
    assert_eq!((err, ErrorKind::classify(err)), (Errno::ENOMEM, ErrorKind::StreamTooLarge));
    expect_stays(&dev, "over-long");

    // The same through the bare pipe (no write-side checks): still refused at STOP.
    let (dev, fd) = fresh();
    let raw = DataFd::new(fd.into_owned_fd(), Direction::Resuming);
    raw.write_all_bytes(&stream).unwrap();
    raw.write_all_bytes(b"trailing").unwrap();
    expect_stays(&dev, "over-long through the raw fd");
}

#[test]
fn incompatible_streams_fail_the_write_with_efault() {
    let source = spec("a", FULL, 8192);
    let other_model = saved_stream(&SimSpec { model: "sim-gpu".into(), ..source.clone() });
    let other_size = saved_stream(&SimSpec { state_size: 4096, ..source.clone() });
    let garbage = vec![0x55u8; 200];
    for (stream, what) in [(other_model, "model"), (other_size, "size"), (garbage, "magic")] {
        let dev = SimDevice::new(source.clone()).unwrap();
        let fd = dev.set_state(State::Resuming).unwrap().unwrap();
        let err = fd.write_all_bytes(&stream).unwrap_err();
        assert_eq!((err, ErrorKind::classify(err)), (Errno::EFAULT, ErrorKind::StreamRejected), "{what}");
        assert_eq!(fd.write_all_bytes(&stream), Err(Errno::EFAULT), "{what}: later writes fail too");
        let err = dev.set_state(State::Stop).unwrap_err();
        assert_eq!((err.errno, err.state_after), (Errno::EINVAL, Some(State::Resuming)), "{what}");
        assert!(err.to_string().contains("incompatible") || err.to_string().contains("magic"), "{err}");
    }
}

#[test]
fn every_errno_class_the_simulator_produces() {
    let classify = |r: Result<(), DeviceError>| r.map_err(|e| e.kind).unwrap_err();

    // No migration support at all: ENOTTY everywhere but reset.
    let none = device(Caps::default(), 4096);
    assert_eq!(classify(none.caps().map(drop)), ErrorKind::Unsupported);
    assert_eq!(classify(none.state().map(drop)), ErrorKind::Unsupported);
    assert_eq!(classify(none.set_state(State::Stop).map(drop)), ErrorKind::Unsupported);
    assert_eq!(classify(none.data_size().map(drop)), ErrorKind::Unsupported);
    none.reset().unwrap();

    // No DMA logging: the probe says no, the operations are ENOTTY.
    let mut no_log = spec("nolog", FULL, 4096);
    no_log.dma_logging.supported = false;
    let dev = SimDevice::new(no_log).unwrap();
    assert!(!dev.dma_logging_supported().unwrap());
    let ranges = [IovaRange { iova: 0, length: 4096 }];
    assert_eq!(classify(dev.dma_logging_start(&ranges, 4096).map(drop)), ErrorKind::Unsupported);
    assert_eq!(classify(dev.dma_logging_stop()), ErrorKind::Unsupported);
    assert_eq!(classify(dev.dma_logging_report(0, 4096, 4096, &mut [0])), ErrorKind::Unsupported);

    // No PRE_COPY: its data_fd has no PRECOPY_INFO ioctl.
    let pds = device(Caps::MIGRATABLE[1], 4096);
    let fd = pds.set_state(State::StopCopy).unwrap().unwrap();
    assert_eq!(pds.precopy_info(&fd).unwrap_err().errno, Errno::ENOTTY);

    // Logging limits.
    let dev = device(FULL, 4096);
    let many: Vec<IovaRange> = (0..257).map(|i| IovaRange { iova: i * 8192, length: 4096 }).collect();
    let err = dev.dma_logging_start(&many, 4096).unwrap_err();
    assert_eq!((err.errno, err.kind), (Errno::E2BIG, ErrorKind::TooManyRanges));
    let err = dev.dma_logging_start(&[IovaRange { iova: u64::MAX - 4095, length: 8192 }], 4096).unwrap_err();
    assert_eq!((err.errno, err.kind), (Errno::EOVERFLOW, ErrorKind::Overflow));
    let err = dev.dma_logging_report(0, 4096, 4096, &mut [0]).unwrap_err();
    assert_eq!((err.errno, err.kind), (Errno::EINVAL, ErrorKind::InvalidRequest), "REPORT before START");
    dev.dma_logging_start(&ranges, 4096).unwrap();
    let err = dev.dma_logging_start(&ranges, 4096).unwrap_err();
    assert_eq!(err.errno, Errno::EINVAL, "second START");
    dev.dma_logging_stop().unwrap();
    dev.dma_logging_stop().unwrap();

    // Wrong direction and disabled sessions.
    let fd = dev.set_state(State::StopCopy).unwrap().unwrap();
    assert_eq!(fd.write_all_bytes(b"x"), Err(Errno::EBADF));
    dev.set_state(State::Stop).unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(ErrorKind::classify(fd.read_chunk(&mut buf).unwrap_err()), ErrorKind::Gone);
    let res = dev.set_state(State::Resuming).unwrap().unwrap();
    assert_eq!(res.read_chunk(&mut buf), Err(Errno::EBADF));
    assert_eq!(dev.precopy_info(&res).unwrap_err().errno, Errno::ENOTTY);
    dev.reset().unwrap();
    assert_eq!(res.write_all_bytes(b"x"), Err(Errno::ENODEV));

    // An injected errno is reported with its own class.
    dev.inject(Fault::errno(FaultOp::Reset, Errno::EAGAIN).once());
    let err = dev.reset().unwrap_err();
    assert_eq!((err.errno, err.kind), (Errno::EAGAIN, ErrorKind::Busy));
    assert!(err.kind.is_transient());
    dev.reset().unwrap();
}

#[test]
fn an_injected_errno_part_way_leaves_the_device_at_the_intermediate_state() {
    let dev = device(FULL, 4096);
    dev.inject(Fault::errno(FaultOp::SetState, Errno::EIO).in_state(State::StopCopy).once());
    let err = dev.set_state(State::StopCopy).unwrap_err();
    assert_eq!((err.errno, err.state_after), (Errno::EIO, Some(State::Stop)));
    assert_eq!(dev.state().unwrap(), State::Stop);
    let log = dev.arc_log();
    assert_eq!(dev.arcs().iter().map(|a| a.to).collect::<Vec<_>>(), [State::RunningP2p, State::Stop]);
    assert!(matches!(&log.last().unwrap().event, ArcEvent::Fault(what) if what.contains("EIO")), "{log:?}");
    // `once`: the retry goes through.
    assert!(dev.set_state(State::StopCopy).unwrap().is_some());

    // nth: only the second call fails.
    dev.inject(Fault::errno(FaultOp::DataSize, Errno::EBUSY).nth(2));
    assert!(dev.data_size().is_ok());
    assert_eq!(dev.data_size().unwrap_err().errno, Errno::EBUSY);
    assert!(dev.data_size().is_ok());
    dev.clear_faults();
    dev.inject(Fault::errno(FaultOp::GetState, Errno::EIO).in_state(State::Running));
    assert!(dev.state().is_ok(), "only in RUNNING");
}

#[test]
fn a_stall_delays_the_operation_and_then_it_proceeds() {
    let dev = device(FULL, 4096);
    dev.inject(Fault::stall(FaultOp::SetState, Duration::from_millis(30)).in_state(State::Stop));
    let started = Instant::now();
    dev.set_state(State::Stop).unwrap();
    assert!(started.elapsed() >= Duration::from_millis(30), "sleeps never return early");
    assert_eq!(dev.state().unwrap(), State::Stop);
    dev.inject(Fault::stall(FaultOp::DataRead, Duration::from_millis(20)).once());
    let fd = dev.set_state(State::StopCopy).unwrap().unwrap();
    let started = Instant::now();
    assert_eq!(read_available(&fd).len() as u64, dev.data_size().unwrap());
    assert!(started.elapsed() >= Duration::from_millis(20));
}

#[test]
fn short_reads_deliver_at_most_n_bytes_and_the_stream_still_loads() {
    let spec = spec("d", FULL, 3 * 4096);
    let src = SimDevice::new(spec.clone()).unwrap();
    src.inject(Fault::short_reads(1000));
    let dst = SimDevice::new(spec).unwrap();
    let out = src.set_state(State::StopCopy).unwrap().unwrap();
    let into = dst.set_state(State::Resuming).unwrap().unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let (mut reads, mut total) = (0, 0);
    loop {
        let n = out.read_chunk(&mut buf).unwrap();
        assert!(n <= 1000, "read of {n}");
        if n == 0 {
            break;
        }
        reads += 1;
        total += n as u64;
        into.write_all_bytes(&buf[..n]).unwrap();
    }
    assert_eq!(total, src.data_size().unwrap());
    assert!(reads >= total.div_ceil(1000));
    dst.set_state(State::Stop).unwrap();
    assert_eq!(dst.state_digest(), src.state_digest());
}

#[test]
fn an_early_eof_truncates_the_stream_and_the_destination_notices() {
    let spec = spec("d", FULL, 5 * 4096);
    let src = SimDevice::new(spec.clone()).unwrap();
    src.inject(Fault::early_eof(5000).in_state(State::StopCopy));
    let dst = SimDevice::new(spec).unwrap();
    let out = src.set_state(State::StopCopy).unwrap().unwrap();
    let into = dst.set_state(State::Resuming).unwrap().unwrap();
    assert_eq!(relay(&out, &into), 5000);
    let err = dst.set_state(State::Stop).unwrap_err();
    assert_eq!((err.errno, err.state_after), (Errno::EINVAL, Some(State::Resuming)));
}

#[test]
fn corruption_is_caught_by_the_destination() {
    let spec = spec("d", FULL, 5 * 4096);
    let len = SimDevice::new(spec.clone()).unwrap().data_size().unwrap();
    // In the payload: found at RESUMING->STOP; in the header: the write fails.
    for (offset, on_write) in [(len / 2, None), (len - 1, None), (3, Some(Errno::EFAULT))] {
        let src = SimDevice::new(spec.clone()).unwrap();
        src.inject(Fault::corrupt(offset).once());
        let dst = SimDevice::new(spec.clone()).unwrap();
        let out = src.set_state(State::StopCopy).unwrap().unwrap();
        let bytes = read_available(&out);
        assert_eq!(bytes.len() as u64, len);
        let into = dst.set_state(State::Resuming).unwrap().unwrap();
        assert_eq!(into.write_all_bytes(&bytes).err(), on_write, "offset {offset}");
        let err = dst.set_state(State::Stop).unwrap_err();
        assert_eq!((err.errno, err.state_after), (Errno::EINVAL, Some(State::Resuming)), "offset {offset}");
        // `once`: the next session is clean.
        src.set_state(State::Stop).unwrap();
        let again = read_available(&src.set_state(State::StopCopy).unwrap().unwrap());
        assert_ne!(again, bytes);
    }
}

#[test]
fn data_path_errnos_are_injectable() {
    let dev = device(FULL, 4096);
    dev.inject(Fault::errno(FaultOp::DataRead, Errno::EIO).once());
    let fd = dev.set_state(State::StopCopy).unwrap().unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(fd.read_chunk(&mut buf), Err(Errno::EIO));
    assert_eq!(fd.read_chunk(&mut buf), Ok(16), "nothing was consumed by the failed read");
    dev.inject(Fault::errno(FaultOp::DataWrite, Errno::ENOSPC));
    dev.set_state(State::Stop).unwrap();
    let res = dev.set_state(State::Resuming).unwrap().unwrap();
    assert_eq!(res.write_all_bytes(b"abc"), Err(Errno::ENOSPC));
}

#[test]
fn reset_from_every_state_returns_to_a_power_on_running_device() {
    let mut states = supported_states(FULL);
    states.push(State::Error);
    for state in states {
        let dev = device(FULL, 4 * 4096);
        dev.dirty_state(3).unwrap();
        dev.dma_logging_start(&[IovaRange { iova: 0, length: 1 << 20 }], 4096).unwrap();
        let fd = if state == State::Error {
            dev.inject(Fault::fall_into_error().in_state(State::Stop).once());
            let _ = dev.set_state(State::Stop);
            None
        } else {
            bring_to(&dev, state)
        };
        assert_eq!(dev.state().unwrap(), state);
        dev.reset().unwrap();
        assert_eq!(dev.state().unwrap(), State::Running, "from {state}");
        let last = dev.arc_log().pop().unwrap();
        assert_eq!((last.from, last.event), (state, ArcEvent::Reset));
        assert_eq!(dev.state_id().generation, 0, "power-on state after reset from {state}");
        assert_eq!(dev.loaded_state(), None);
        assert!(!dev.dma_logging_active());
        if let Some(fd) = fd {
            let result = match fd.direction() {
                Direction::Saving => fd.read_chunk(&mut [0u8; 8]).map(drop),
                Direction::Resuming => fd.write_all_bytes(b"x"),
            };
            assert_eq!(result, Err(Errno::ENODEV), "fd opened for {state} after reset");
        }
        // And it migrates again.
        assert!(dev.set_state(State::StopCopy).unwrap().is_some());
    }
}

#[test]
fn dma_logging_reports_device_writes_at_the_report_granularity() {
    let mut spec = spec("nic", FULL, 4096);
    spec.dma_logging.min_page_size = 8192;
    let dev = SimDevice::new(spec).unwrap();
    assert!(dev.dma_logging_supported().unwrap());
    let base = 1 << 30;
    assert_eq!(dev.dma_logging_start(&[IovaRange { iova: base, length: 1 << 20 }], 4096).unwrap(), 8192);
    dev.dma_write(base + 3 * 4096 + 5, 1); // logging page 1 = report pages 2 and 3
    dev.dma_write(base + 100 * 4096, 4096 * 3); // logging pages 50, 51 = report pages 100..=103
    let mut bitmap = vec![0u64; 4];
    dev.dma_logging_report(base, 1 << 20, 4096, &mut bitmap).unwrap();
    assert_eq!(bitmap, [0b1100, 0b1111 << 36, 0, 0]);
    // At a coarser report page each logging page maps to the page containing it.
    dev.dma_write(base + 3 * 4096, 1);
    let mut coarse = [0u64];
    dev.dma_logging_report(base, 1 << 20, 1 << 16, &mut coarse).unwrap();
    assert_eq!(coarse, [1]);
    dev.dma_logging_stop().unwrap();
    assert!(!dev.dma_logging_active());
}

#[test]
fn the_arc_log_file_is_readable_from_outside() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("arcs.tsv");
    let first = SimDevice::new(SimSpec { arc_log: Some(path.clone()), ..spec("one", FULL, 4096) }).unwrap();
    let second =
        SimDevice::new(SimSpec { arc_log: Some(path.clone()), ..spec("two", Caps::STOP_COPY, 4096) })
            .unwrap();
    let _a = first.set_state(State::StopCopy).unwrap();
    let _b = second.set_state(State::Resuming).unwrap();
    first.inject(Fault::errno(FaultOp::SetState, Errno::EIO).in_state(State::Stop));
    assert!(first.set_state(State::Stop).is_err());
    second.reset().unwrap();

    let read = read_arc_log(&path).unwrap();
    let mut memory = first.arc_log();
    memory.extend(second.arc_log());
    memory.sort_by_key(|e| e.time_ns);
    assert_eq!(read, memory);
    let one: Vec<_> = read.iter().filter(|e| e.device == "one").filter_map(ArcLogEntry::arc).collect();
    assert_eq!(one, fsm::path(FULL, State::Running, State::StopCopy).unwrap());
    let two: Vec<_> = read.iter().filter(|e| e.device == "two").collect();
    assert_eq!(two.len(), 3);
    assert_eq!(two[2].event, ArcEvent::Reset);
    assert!(read.iter().any(|e| e.device == "one" && matches!(e.event, ArcEvent::Fault(_))));
}

#[test]
fn configured_faults_are_armed_from_the_start() {
    let spec = SimSpec {
        faults: vec![Fault::errno(FaultOp::ProbeMigration, Errno::EIO).once()],
        ..spec("f", FULL, 4096)
    };
    let dev = SimDevice::new(spec).unwrap();
    assert_eq!(dev.caps().unwrap_err().errno, Errno::EIO);
    assert_eq!(dev.caps().unwrap(), FULL);
    assert_eq!(dev.identity(), DeviceIdentity { driver: "sim".into(), model: "sim".into() });
}

#[test]
fn a_dirty_rate_changes_the_state_only_while_running() {
    let dev = SimDevice::new(SimSpec { dirty_rate: 1 << 30, ..spec("busy", FULL, 64 << 10) }).unwrap();
    std::thread::sleep(Duration::from_millis(5));
    let running = dev.state_id().generation;
    assert!(running > 0, "1 GiB/s over 5 ms dirties pages");
    dev.set_state(State::Stop).unwrap();
    let stopped = dev.state_id().generation;
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(dev.state_id().generation, stopped, "a stopped device does not change");
}
