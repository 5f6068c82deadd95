//! Both ends of the stream over loopback, with pipes (and files) standing in for the
//! devices' data_fds. Timeouts here are safety nets against hangs, never assertions of
//! speed.

use std::fs::OpenOptions;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use nix::fcntl::{FcntlArg, fcntl};

use super::frame::{ACK_HEAD_LEN, PREAMBLE_HEAD_LEN, encode_preamble};
use super::*;
use crate::device::{DataFd, Direction};

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const SAFETY_NET: Duration = Duration::from_secs(120);
const MIB: usize = 1 << 20;

async fn within_safety_net<T>(work: impl Future<Output = T>) -> T {
    tokio::time::timeout(SAFETY_NET, work).await.expect("the stream hung")
}

fn preamble() -> Preamble {
    Preamble { job_id: "job-7".into(), token: b"session-token".to_vec() }
}

/// Reproducible, incompressible bytes, different per device.
fn state(device: u32, len: usize) -> Vec<u8> {
    let mut x = (0x9e37_79b9_7f4a_7c15u64 ^ u64::from(device).wrapping_mul(0x1234_5678_9abc_def1)) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let (r, w) = nix::unistd::pipe().unwrap();
    // As a simulated device does; without it the pipe, not the stream, is the bottleneck.
    let _ = fcntl(&w, FcntlArg::F_SETPIPE_SZ(MIB as i32));
    (r, w)
}

/// A saving data_fd that yields `bytes` and then its final end.
fn source(bytes: Vec<u8>) -> Arc<DataFd> {
    let (r, w) = pipe();
    thread::spawn(move || {
        let w = DataFd::new(w, Direction::Resuming);
        // EPIPE when the stream gave up early: fine, nobody wants the rest.
        let _ = w.write_all_bytes(&bytes);
    });
    Arc::new(DataFd::new(r, Direction::Saving))
}

/// A resuming data_fd, and what arrived through it once it is closed.
fn sink() -> (DataFd, JoinHandle<Vec<u8>>) {
    let (r, w) = pipe();
    let drainer = thread::spawn(move || {
        let mut received = Vec::new();
        std::fs::File::from(r).read_to_end(&mut received).unwrap();
        received
    });
    (DataFd::new(w, Direction::Resuming), drainer)
}

fn options(connections: usize) -> StreamOptions {
    StreamOptions { connections, ..StreamOptions::default() }
}

struct Transfer {
    sent: Result<Vec<DeviceStreamSummary>, StreamError>,
    received: Result<Vec<DeviceStreamSummary>, StreamError>,
    arrived: Vec<Vec<u8>>,
    sender_progress: Arc<Progress>,
    receiver_progress: Arc<Progress>,
}

/// Streams `states` (device `i` is `states[i]`) from one side to the other.
async fn transfer(states: &[Vec<u8>], opts: StreamOptions) -> Transfer {
    let devices = states.len();
    let (receiver, port) = StreamReceiver::bind(LOOPBACK).await.unwrap();
    let (fds, drainers): (Vec<_>, Vec<_>) = (0..devices).map(|_| sink()).unzip();
    let receiver_progress = Arc::new(Progress::new(devices));
    let handle = receiver.start(
        preamble(),
        fds.into_iter().enumerate().map(|(i, fd)| (i as u32, fd)).collect(),
        opts.clone(),
        Arc::clone(&receiver_progress),
    );
    let sender_progress = Arc::new(Progress::new(devices));
    let addr = SocketAddr::new(LOOPBACK, port);
    let opts_fault = opts.fault;
    let sender =
        StreamSender::connect(addr, preamble(), opts, devices, Arc::clone(&sender_progress)).await.unwrap();
    let faulty = opts_fault.is_some();
    for (i, bytes) in states.iter().enumerate() {
        match sender.add_device(i as u32, source(bytes.clone()), Switchover::stop_copy()) {
            Ok(()) => {}
            // A fault on an earlier device may have stopped the stream already.
            Err(StreamError::Aborted) if faulty => {}
            Err(err) => panic!("{err}"),
        }
    }
    let (sent, received) = within_safety_net(async { tokio::join!(sender.finish(), handle.wait()) }).await;
    let arrived = drainers.into_iter().map(|d| d.join().unwrap()).collect();
    Transfer { sent, received, arrived, sender_progress, receiver_progress }
}

fn assert_delivered(states: &[Vec<u8>], transfer: Transfer) {
    let sent = transfer.sent.unwrap();
    let received = transfer.received.unwrap();
    assert_eq!(sent, received, "both sides must count the same streams");
    for (i, (state, arrived)) in states.iter().zip(&transfer.arrived).enumerate() {
        assert_eq!(arrived.len(), state.len(), "device {i}: length");
        assert!(arrived == state, "device {i}: content differs");
        assert_eq!(received[i].index, i as u32);
        assert_eq!(received[i].bytes, state.len() as u64);
        assert_eq!(transfer.sender_progress.bytes(i as u32), state.len() as u64);
        assert_eq!(transfer.receiver_progress.bytes(i as u32), state.len() as u64);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_device_of_every_size_arrives_byte_for_byte() {
    for len in [0, 1, MIB + 1, 64 * MIB] {
        let states = vec![state(0, len)];
        assert_delivered(&states, transfer(&states, options(1)).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_devices_over_several_connections_arrive_byte_for_byte() {
    let sizes = [0, 1, MIB + 1, 3 * MIB, 17, 2 * MIB - 1, 4096, 5 * MIB];
    let states: Vec<_> = sizes.iter().enumerate().map(|(i, &len)| state(i as u32, len)).collect();
    // 1 and 3: every connection carries several devices; 8: each device alone on its
    // connection; 5: both kinds at once.
    for connections in [1, 3, 5, 8] {
        assert_delivered(&states, transfer(&states, options(connections)).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_frames_and_minimal_buffers_still_deliver() {
    let states: Vec<_> = (0..3).map(|i| state(i, 300_000)).collect();
    let opts = StreamOptions { max_payload: MIN_PAYLOAD_LIMIT, buffers_per_device: 2, ..options(2) };
    assert_delivered(&states, transfer(&states, opts).await);
}

/// Runs a faulty transfer of two devices with 4 KiB frames (every device has at least 16
/// frames, whatever sizes the pipe reads return), on one shared connection and on a
/// connection each; returns what the receiver said each time and what arrived.
async fn faulty(fault: StreamFault) -> Vec<(StreamError, Vec<Vec<u8>>, Vec<Vec<u8>>)> {
    let states: Vec<_> = (0..2).map(|i| state(i, 64 * 1024)).collect();
    let mut outcomes = Vec::new();
    for connections in [1, 2] {
        let opts = StreamOptions { max_payload: 4096, fault: Some(fault), ..options(connections) };
        let transfer = transfer(&states, opts).await;
        let err = transfer.received.expect_err("the receiver must refuse a faulty stream");
        outcomes.push((err, states.clone(), transfer.arrived));
    }
    outcomes
}

/// Nothing from a refused frame on may reach a device: what arrived is a prefix of
/// what was sent (another device may have completed before the fault was found).
fn assert_prefixes(states: &[Vec<u8>], arrived: &[Vec<u8>]) {
    for (state, arrived) in states.iter().zip(arrived) {
        assert!(state.starts_with(arrived), "a device received bytes that were never sent");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_is_a_checksum_error_of_that_frame() {
    for (err, states, arrived) in faulty(StreamFault::FlipByte { device: 1, frame: 3 }).await {
        assert!(matches!(err, StreamError::BadChecksum { device: 1, sequence: 3, .. }), "{err}");
        assert_eq!(err.device(), Some(1));
        assert!(arrived[1].len() <= 3 * 4096, "device 1 received bytes from frame 3 on");
        assert_prefixes(&states, &arrived);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_end_record_is_refused() {
    // One byte is one data frame, so frame 1 is the END record.
    let states = [state(0, 1)];
    let opts = StreamOptions { fault: Some(StreamFault::FlipByte { device: 0, frame: 1 }), ..options(1) };
    let transfer = transfer(&states, opts).await;
    let err = transfer.received.unwrap_err();
    assert!(matches!(err, StreamError::BadChecksum { device: 0, sequence: 1, .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_frame_is_located() {
    for (err, states, arrived) in faulty(StreamFault::Truncate { device: 0, frame: 5 }).await {
        let located = matches!(
            err,
            StreamError::Truncated { at: Truncation::InPayload { device: 0, sequence: 5, .. }, .. }
        );
        assert!(located, "{err}");
        assert!(arrived[0].len() <= 5 * 4096);
        assert_prefixes(&states, &arrived);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_is_a_truncation_before_end() {
    for (err, states, arrived) in faulty(StreamFault::DropConnection { frame: 6 }).await {
        assert!(matches!(err, StreamError::Truncated { at: Truncation::BeforeEnd { .. }, .. }), "{err}");
        assert_prefixes(&states, &arrived);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicated_frame_is_a_sequence_error() {
    for (err, states, arrived) in faulty(StreamFault::DuplicateFrame { device: 1, frame: 2 }).await {
        assert!(
            matches!(err, StreamError::UnexpectedSequence { device: 1, expected: 3, received: 2 }),
            "{err}"
        );
        assert!(arrived[1].len() <= 3 * 4096);
        assert_prefixes(&states, &arrived);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reordered_frames_are_a_sequence_error() {
    for (err, states, arrived) in faulty(StreamFault::ReorderFrames { device: 0, frame: 4 }).await {
        assert!(
            matches!(err, StreamError::UnexpectedSequence { device: 0, expected: 4, received: 5 }),
            "{err}"
        );
        assert!(arrived[0].len() <= 4 * 4096);
        assert_prefixes(&states, &arrived);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_on_one_connection_fails_the_whole_receive() {
    // Device 1 on connection 1 is corrupted; device 0 on connection 0 may well have
    // finished, but no summary is reported for anyone.
    let states: Vec<_> = (0..2).map(|i| state(i, 64 * 1024)).collect();
    let opts = StreamOptions {
        max_payload: 4096,
        fault: Some(StreamFault::FlipByte { device: 1, frame: 0 }),
        ..options(2)
    };
    let transfer = transfer(&states, opts).await;
    let err = transfer.received.unwrap_err();
    assert!(matches!(err, StreamError::BadChecksum { device: 1, sequence: 0, .. }), "{err}");
    assert!(transfer.arrived[1].is_empty());
}

/// Sends the real source's stream after the stray connections were refused, and checks
/// it arrives: a refused connection must not have cost the job anything.
async fn still_receives(handle: ReceiveHandle, port: u16, drainer: JoinHandle<Vec<u8>>) {
    let bytes = state(0, MIB + 3);
    let sender = StreamSender::connect(
        SocketAddr::new(LOOPBACK, port),
        preamble(),
        options(1),
        1,
        Arc::new(Progress::new(1)),
    )
    .await
    .expect("the real source is still accepted");
    sender.add_device(0, source(bytes.clone()), Switchover::stop_copy()).unwrap();
    let (sent, received) = within_safety_net(async { tokio::join!(sender.finish(), handle.wait()) }).await;
    assert_eq!(sent.unwrap(), received.unwrap());
    assert!(drainer.join().unwrap() == bytes, "the device state arrived intact");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_or_job_is_refused_alone_and_learns_nothing() {
    let (receiver, port) = StreamReceiver::bind(LOOPBACK).await.unwrap();
    let (fd, drainer) = sink();
    let handle = receiver.start(preamble(), vec![(0, fd)], options(1), Arc::new(Progress::new(1)));
    let addr = SocketAddr::new(LOOPBACK, port);
    for wrong in [
        Preamble { token: b"guessed".to_vec(), ..preamble() },
        Preamble { job_id: "job-8".into(), ..preamble() },
    ] {
        let connected =
            within_safety_net(StreamSender::connect(addr, wrong, options(1), 1, Arc::new(Progress::new(1))))
                .await;
        let Err(StreamError::Refused { connection: 0, reason }) = connected else {
            panic!("the stray source was not refused");
        };
        assert!(!reason.contains("job-7") && !reason.contains("session-token"), "{reason}");
        assert!(reason.contains("refused"), "{reason}");
    }
    still_receives(handle, port, drainer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_an_old_version_or_a_silent_client_is_dropped_alone() {
    // Only the head: a refused peer's unread bytes would turn the close into a reset.
    let mut old = encode_preamble(&preamble(), 0, 1).unwrap()[..PREAMBLE_HEAD_LEN].to_vec();
    old[8] = 0;
    let (receiver, port) = StreamReceiver::bind(LOOPBACK).await.unwrap();
    let (fd, drainer) = sink();
    let opts = StreamOptions { preamble_timeout: Duration::from_millis(300), ..options(1) };
    let handle = receiver.start(preamble(), vec![(0, fd)], opts, Arc::new(Progress::new(1)));
    // Silent: says nothing and is cut at the preamble timeout without answer.
    let silent = thread::spawn(move || {
        let mut conn = std::net::TcpStream::connect((LOOPBACK, port)).unwrap();
        let mut answer = Vec::new();
        let _ = conn.read_to_end(&mut answer);
        answer
    });
    for bytes in [b"GET / HTTP/1.1\r\n\r\n".to_vec(), old] {
        let client = thread::spawn(move || {
            let mut conn = std::net::TcpStream::connect((LOOPBACK, port)).unwrap();
            conn.write_all(&bytes).unwrap();
            let mut answer = Vec::new();
            let _ = conn.read_to_end(&mut answer);
            answer
        });
        let answer = client.join().unwrap();
        assert_eq!(&answer[..4], b"VFNO");
        let reason = String::from_utf8_lossy(&answer[ACK_HEAD_LEN..]).into_owned();
        assert!(reason.contains("refused") && !reason.contains("job-7"), "{reason}");
    }
    assert!(silent.join().unwrap().is_empty(), "a silent client is dropped without an answer");
    still_receives(handle, port, drainer).await;
}

fn stalling(opts: StreamOptions) -> StreamOptions {
    StreamOptions { stall_timeout: Duration::from_millis(300), ..opts }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_source_is_a_stall_on_the_destination() {
    let (receiver, port) = StreamReceiver::bind(LOOPBACK).await.unwrap();
    let (fd, _drainer) = sink();
    let handle = receiver.start(preamble(), vec![(0, fd)], stalling(options(1)), Arc::new(Progress::new(1)));
    let mut conn = std::net::TcpStream::connect((LOOPBACK, port)).unwrap();
    conn.write_all(&encode_preamble(&preamble(), 0, 1).unwrap()).unwrap();
    let err = within_safety_net(handle.wait()).await.unwrap_err();
    assert!(matches!(&err, StreamError::Stalled { connection: 0, devices, .. } if devices == &[0]), "{err}");
    drop(conn);
}

/// A destination that accepts the preamble and then does `after` with the connection.
fn fake_destination(after: impl FnOnce(std::net::TcpStream) + Send + 'static) -> SocketAddr {
    let listener = TcpListener::bind((LOOPBACK, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let expected = encode_preamble(&preamble(), 0, 1).unwrap();
        let mut got = vec![0u8; expected.len()];
        conn.read_exact(&mut got).unwrap();
        assert_eq!(&got[..PREAMBLE_HEAD_LEN], &expected[..PREAMBLE_HEAD_LEN]);
        conn.write_all(b"VFOK\0\0").unwrap();
        after(conn);
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_stops_reading_is_a_stall_on_the_source() {
    let (release, held) = std::sync::mpsc::channel::<()>();
    let addr = fake_destination(move |conn| {
        // Keep the connection open, unread, until the test is over.
        let _ = held.recv();
        drop(conn);
    });
    let sender = StreamSender::connect(addr, preamble(), stalling(options(1)), 1, Arc::new(Progress::new(1)))
        .await
        .unwrap();
    sender.add_device(0, source(state(0, 64 * MIB)), Switchover::stop_copy()).unwrap();
    let err = within_safety_net(sender.finish()).await.unwrap_err();
    assert!(matches!(err, StreamError::Stalled { connection: 0, .. }), "{err}");
    release.send(()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_closes_is_an_error_on_the_source() {
    let addr = fake_destination(drop);
    let sender =
        StreamSender::connect(addr, preamble(), options(1), 1, Arc::new(Progress::new(1))).await.unwrap();
    sender.add_device(0, source(state(0, 64 * MIB)), Switchover::stop_copy()).unwrap();
    let err = within_safety_net(sender.finish()).await.unwrap_err();
    assert!(
        matches!(&err, StreamError::Connection { connection: 0, devices, .. } if devices == &[0]),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborting_either_side_stops_both() {
    for abort_source in [true, false] {
        let (receiver, port) = StreamReceiver::bind(LOOPBACK).await.unwrap();
        let (fd, drainer) = sink();
        let handle = receiver.start(preamble(), vec![(0, fd)], options(1), Arc::new(Progress::new(1)));
        let progress = Arc::new(Progress::new(1));
        let addr = SocketAddr::new(LOOPBACK, port);
        let sender =
            StreamSender::connect(addr, preamble(), options(1), 1, Arc::clone(&progress)).await.unwrap();
        // A device in PRE_COPY that has produced a little and then nothing for now.
        let (r, w) = pipe();
        let w = DataFd::new(w, Direction::Resuming);
        w.write_all_bytes(&state(0, 100_000)).unwrap();
        sender.add_device(0, Arc::new(DataFd::new(r, Direction::Saving)), Switchover::new()).unwrap();
        within_safety_net(async {
            while progress.bytes(0) < 100_000 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        if abort_source {
            sender.abort();
            let err = within_safety_net(handle.wait()).await.unwrap_err();
            assert!(
                matches!(err, StreamError::Truncated { at: Truncation::BeforeEnd { device: 0, .. }, .. }),
                "{err}"
            );
            assert!(matches!(within_safety_net(sender.finish()).await, Err(StreamError::Aborted)));
        } else {
            handle.abort();
            // The reader is idle in PRE_COPY: the source learns from its next keepalive or
            // frame; more data makes that immediate.
            let more = thread::spawn(move || {
                let _ = w.write_all_bytes(&state(1, 8 * MIB));
            });
            let err = within_safety_net(sender.finish()).await.unwrap_err();
            assert!(matches!(err, StreamError::Connection { .. }), "{err}");
            more.join().unwrap();
        }
        assert!(drainer.join().unwrap().len() <= 100_000);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn precopy_zero_reads_are_temporary_until_the_switchover() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("precopy-state");
    let mut appender = OpenOptions::new().create(true).append(true).open(&path).unwrap();
    let first = state(0, 300_000);
    let second = state(1, 200_000);
    appender.write_all(&first).unwrap();
    // A regular file at its end reads 0 and later reads what was appended: the shape of
    // a saving data_fd in PRE_COPY that has nothing more for now.
    let fd = Arc::new(DataFd::new(std::fs::File::open(&path).unwrap().into(), Direction::Saving));

    let (receiver, port) = StreamReceiver::bind(LOOPBACK).await.unwrap();
    let (sink_fd, drainer) = sink();
    let opts = StreamOptions { precopy_poll: Duration::from_millis(2), ..options(1) };
    let handle = receiver.start(preamble(), vec![(0, sink_fd)], opts.clone(), Arc::new(Progress::new(1)));
    let progress = Arc::new(Progress::new(1));
    let addr = SocketAddr::new(LOOPBACK, port);
    let sender = StreamSender::connect(addr, preamble(), opts, 1, Arc::clone(&progress)).await.unwrap();
    let switchover = Switchover::new();
    sender.add_device(0, fd, switchover.clone()).unwrap();
    let wait = tokio::spawn(handle.wait());

    let wait_for_bytes = |bytes: u64| {
        let progress = Arc::clone(&progress);
        within_safety_net(async move {
            while progress.bytes(0) < bytes {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    wait_for_bytes(first.len() as u64).await;
    // The reader has seen its 0-byte reads by now, many times over; none of them ended it.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!wait.is_finished(), "a 0-byte read before the switchover ended the stream");
    appender.write_all(&second).unwrap();
    wait_for_bytes((first.len() + second.len()) as u64).await;
    assert!(!wait.is_finished());
    switchover.fire();

    let sent = within_safety_net(sender.finish()).await.unwrap();
    let received = within_safety_net(wait).await.unwrap().unwrap();
    assert_eq!(sent, received);
    assert_eq!(received[0].bytes, (first.len() + second.len()) as u64);
    assert_eq!(drainer.join().unwrap(), [first, second].concat());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misuse_is_refused_with_the_device_named() {
    let (receiver, port) = StreamReceiver::bind(LOOPBACK).await.unwrap();
    let (fds, _drainers): (Vec<_>, Vec<_>) = (0..2).map(|_| sink()).unzip();
    let handle = receiver.start(
        preamble(),
        fds.into_iter().enumerate().map(|(i, fd)| (i as u32, fd)).collect(),
        options(2),
        Arc::new(Progress::new(2)),
    );
    let addr = SocketAddr::new(LOOPBACK, port);
    let sender =
        StreamSender::connect(addr, preamble(), options(2), 2, Arc::new(Progress::new(2))).await.unwrap();
    let (r, w) = pipe();
    assert!(matches!(
        sender.add_device(0, Arc::new(DataFd::new(w, Direction::Resuming)), Switchover::stop_copy()),
        Err(StreamError::WrongDirection { device: 0 })
    ));
    assert!(matches!(
        sender.add_device(2, source(vec![1]), Switchover::stop_copy()),
        Err(StreamError::DeviceOutOfRange { device: 2, devices: 2 })
    ));
    sender.add_device(0, source(vec![1, 2, 3]), Switchover::stop_copy()).unwrap();
    assert!(matches!(
        sender.add_device(0, source(vec![1]), Switchover::stop_copy()),
        Err(StreamError::DuplicateDevice { device: 0 })
    ));
    let err = within_safety_net(sender.finish()).await.unwrap_err();
    assert!(matches!(err, StreamError::MissingDevice { device: 1 }), "{err}");
    // The source gave up, so the destination sees its connections end early.
    let err = within_safety_net(handle.wait()).await.unwrap_err();
    assert!(matches!(err, StreamError::Truncated { .. }), "{err}");
    drop(r);

    let (receiver, _) = StreamReceiver::bind(LOOPBACK).await.unwrap();
    let (a, _) = sink();
    let (b, _) = sink();
    let handle = receiver.start(preamble(), vec![(3, a), (3, b)], options(1), Arc::new(Progress::new(4)));
    assert!(matches!(
        within_safety_net(handle.wait()).await,
        Err(StreamError::DuplicateDevice { device: 3 })
    ));

    let bad = StreamOptions { buffers_per_device: 1, ..options(1) };
    let connected = StreamSender::connect(addr, preamble(), bad, 1, Arc::new(Progress::new(1))).await;
    assert!(matches!(connected, Err(StreamError::InvalidOptions(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_devices_is_an_empty_stream() {
    let (receiver, port) = StreamReceiver::bind(LOOPBACK).await.unwrap();
    let handle = receiver.start(preamble(), Vec::new(), options(4), Arc::new(Progress::new(0)));
    let addr = SocketAddr::new(LOOPBACK, port);
    let sender =
        StreamSender::connect(addr, preamble(), options(4), 0, Arc::new(Progress::new(0))).await.unwrap();
    assert!(within_safety_net(sender.finish()).await.unwrap().is_empty());
    assert!(within_safety_net(handle.wait()).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalives_carry_a_quiet_precopy_past_the_stall_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("quiet-state");
    std::fs::write(&path, state(0, 10_000)).unwrap();
    let fd = Arc::new(DataFd::new(std::fs::File::open(&path).unwrap().into(), Direction::Saving));
    let opts = StreamOptions { stall_timeout: Duration::from_millis(1500), ..options(1) };

    let (receiver, port) = StreamReceiver::bind(LOOPBACK).await.unwrap();
    let (sink_fd, drainer) = sink();
    let handle = receiver.start(preamble(), vec![(0, sink_fd)], opts.clone(), Arc::new(Progress::new(1)));
    let addr = SocketAddr::new(LOOPBACK, port);
    let sender = StreamSender::connect(addr, preamble(), opts, 1, Arc::new(Progress::new(1))).await.unwrap();
    let switchover = Switchover::new();
    sender.add_device(0, fd, switchover.clone()).unwrap();
    // Well past the stall timeout with nothing to send: only keepalives keep the
    // destination from declaring the source stalled.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    switchover.fire();
    let (sent, received) = within_safety_net(async { tokio::join!(sender.finish(), handle.wait()) }).await;
    assert_eq!(sent.unwrap(), received.unwrap());
    assert_eq!(drainer.join().unwrap(), state(0, 10_000));
}

/// A fleet CA (rcgen) and `names.len()` members, each as the daemon loads `[peer.tls]`.
fn fleet(names: &[&str]) -> (tempfile::TempDir, Vec<crate::tls::TlsMaterial>) {
    let dir = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(dir.path().join("ca.crt"), ca.self_signed(&ca_key).unwrap().pem()).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let members = names
        .iter()
        .map(|name| {
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec![name.to_string()])
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            let paths = crate::tls::PeerTlsConfig {
                cert: dir.path().join(format!("{name}.crt")),
                key: dir.path().join(format!("{name}.key")),
                ca: dir.path().join("ca.crt"),
            };
            std::fs::write(&paths.cert, cert.pem()).unwrap();
            std::fs::write(&paths.key, key.serialize_pem()).unwrap();
            crate::tls::load_material(&paths).unwrap()
        })
        .collect();
    (dir, members)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_only_the_jobs_source_gets_in_and_a_stranger_learns_nothing() {
    let (_dir, members) = fleet(&["src.fleet", "dst.fleet", "third.fleet"]);
    let [src, dst, third] = &members[..] else { unreachable!() };
    let (receiver, port) = StreamReceiver::bind(LOOPBACK).await.unwrap();
    let (fd, drainer) = sink();
    let guard = DataGuard {
        tls: Some(dst.server.clone()),
        admit: Arc::new(|who: &crate::peer_identity::PeerIdentity| who.is("src.fleet")),
    };
    let handle =
        receiver.start_guarded(guard, preamble(), vec![(0, fd)], options(1), Arc::new(Progress::new(1)));
    let addr = SocketAddr::new(LOOPBACK, port);
    let dst_name = crate::tls::server_name("dst.fleet:1", "").unwrap();

    // A fleet member that is not the job's source, even with the right job and token.
    let stranger = StreamSender::connect_tls(
        addr,
        Some((third.client.clone(), dst_name.clone())),
        preamble(),
        options(1),
        1,
        Arc::new(Progress::new(1)),
    )
    .await;
    let Err(StreamError::Refused { reason, .. }) = stranger else { panic!("the stranger was not refused") };
    assert!(!reason.contains("job-7") && !reason.contains("src.fleet"), "{reason}");
    // A plaintext client gets no TLS session, hence nothing.
    let plain = StreamSender::connect(addr, preamble(), options(1), 1, Arc::new(Progress::new(1))).await;
    assert!(plain.is_err(), "a plaintext client must be refused by a TLS data port");

    let bytes = state(0, 3 * MIB + 5);
    let sender = StreamSender::connect_tls(
        addr,
        Some((src.client.clone(), dst_name)),
        preamble(),
        options(1),
        1,
        Arc::new(Progress::new(1)),
    )
    .await
    .expect("the job's source is admitted");
    sender.add_device(0, source(bytes.clone()), Switchover::stop_copy()).unwrap();
    let (sent, received) = within_safety_net(async { tokio::join!(sender.finish(), handle.wait()) }).await;
    assert_eq!(sent.unwrap(), received.unwrap());
    assert!(drainer.join().unwrap() == bytes, "the device state arrived intact over TLS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncating_fault_reads_the_same_over_tls() {
    let (_dir, members) = fleet(&["src.fleet", "dst.fleet"]);
    let (receiver, port) = StreamReceiver::bind(LOOPBACK).await.unwrap();
    let (fd, _drainer) = sink();
    let guard = DataGuard { tls: Some(members[1].server.clone()), admit: Arc::new(|_| true) };
    let fault = StreamFault::Truncate { device: 0, frame: 1 };
    let opts = StreamOptions { max_payload: 4096, fault: Some(fault), ..options(1) };
    let handle =
        receiver.start_guarded(guard, preamble(), vec![(0, fd)], opts.clone(), Arc::new(Progress::new(1)));
    let name = crate::tls::server_name("dst.fleet:1", "").unwrap();
    let sender = StreamSender::connect_tls(
        SocketAddr::new(LOOPBACK, port),
        Some((members[0].client.clone(), name)),
        preamble(),
        opts,
        1,
        Arc::new(Progress::new(1)),
    )
    .await
    .unwrap();
    sender.add_device(0, source(state(0, 64 << 10)), Switchover::stop_copy()).unwrap();
    let (_, received) = within_safety_net(async { tokio::join!(sender.finish(), handle.wait()) }).await;
    let err = received.unwrap_err();
    assert!(
        matches!(
            err,
            StreamError::Truncated { at: Truncation::InPayload { device: 0, sequence: 1, .. }, .. }
        ),
        "{err}"
    );
}
