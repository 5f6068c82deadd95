//! The fd handoff socket, driven the way a VMM drives it (docs/handoff-protocol.md):
//! what it refuses, and that a refusal says precisely why and registers nothing.

mod support;

use std::io::{BufRead, BufReader, IoSlice, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use serde_json::json;
use support::TestDaemon;
use vfio_migctl::handoff::{HandoffReply, hand_over};
use vfio_migd::fsm::Caps;

/// Sends one request line with any number of fds (the library client always sends one).
fn send_raw(socket: &Path, line: &[u8], fds: &[BorrowedFd<'_>]) -> HandoffReply {
    let stream = UnixStream::connect(socket).unwrap();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() {
        assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
    }
    let sent =
        rustix::net::sendmsg(&stream, &[IoSlice::new(line)], &mut control, SendFlags::empty()).unwrap();
    (&stream).write_all(&line[sent..]).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap()
}

fn refusal(reply: HandoffReply) -> String {
    assert!(!reply.ok, "expected a refusal, got {reply:?}");
    assert!(reply.device.is_none());
    reply.error.expect("a refusal says why")
}

#[tokio::test]
async fn a_pipe_is_refused_as_not_a_vfio_device() {
    let daemon = TestDaemon::start().await;
    let socket = daemon.handoff_socket();
    let (reader, _writer) = nix::unistd::pipe().unwrap();
    let reply = tokio::task::spawn_blocking(move || {
        hand_over(&socket, &json!({ "name": "nic0", "group": "vm1" }), reader.as_fd()).unwrap()
    })
    .await
    .unwrap();
    let error = refusal(reply);
    assert!(error.contains("nic0"), "{error}");
    assert!(error.contains("pipe:["), "names what the fd is: {error}");
    assert!(error.contains("not a VFIO device fd"), "{error}");
    assert!(daemon.daemon.registry.device("nic0").is_err(), "nothing registered");
    assert!(daemon.daemon.registry.group("vm1").is_err(), "no group created");
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn the_request_must_carry_exactly_one_fd() {
    let daemon = TestDaemon::start().await;
    let socket = daemon.handoff_socket();
    let replies = tokio::task::spawn_blocking(move || {
        let (a, b) = nix::unistd::pipe().unwrap();
        let line = b"{\"name\":\"nic0\"}\n";
        (send_raw(&socket, line, &[]), send_raw(&socket, line, &[a.as_fd(), b.as_fd()]))
    })
    .await
    .unwrap();
    let none = refusal(replies.0);
    assert!(none.contains("carried 0 fds") && none.contains("exactly one"), "{none}");
    let two = refusal(replies.1);
    assert!(two.contains("carried 2 fds"), "{two}");
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn malformed_requests_are_refused_with_the_reason() {
    let daemon = TestDaemon::start().await;
    daemon.add_device("taken", Caps::MIGRATABLE[1]);
    let socket = daemon.handoff_socket();
    let errors = tokio::task::spawn_blocking(move || {
        let (fd, _keep) = nix::unistd::pipe().unwrap();
        let send = |line: &str| refusal(send_raw(&socket, line.as_bytes(), &[fd.as_fd()]));
        [
            send("not json\n"),
            send("{\"name\":\"nic0\",\"colour\":\"blue\"}\n"),
            send("{\"name\":\"\"}\n"),
            send("{\"name\":\"nic0\",\"backend\":\"sim\"}\n"),
            send("{\"name\":\"taken\"}\n"),
            send("{\"name\":\"nic0\"}"),
            send("{\"name\":\"nic0\"}\n{\"name\":\"nic1\"}\n"),
        ]
    })
    .await
    .unwrap();
    let expected = [
        "not a valid request",
        "colour",
        "`name` must not be empty",
        "needs a `sim` object",
        "`taken` is already registered",
        "closed before a complete request line",
        "one request per connection",
    ];
    for (error, text) in errors.iter().zip(expected) {
        assert!(error.contains(text), "expected {text:?} in {error:?}");
    }
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn a_simulated_device_is_handed_over_into_its_group_and_anchored_by_its_fd() {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    use vfio_migd_proto::v1 as pb;

    let daemon = TestDaemon::start().await;
    let socket = daemon.handoff_socket();
    let (anchor_reader, anchor_writer) = nix::unistd::pipe().unwrap();
    fcntl(&anchor_reader, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).unwrap();
    let replies = tokio::task::spawn_blocking(move || {
        let sim = json!({ "model": "sim-nic", "state_size": "64KiB", "caps": "STOP_COPY|P2P" });
        let first = hand_over(
            &socket,
            &json!({ "name": "nic0", "group": "vm1", "backend": "sim", "sim": sim }),
            anchor_writer.as_fd(),
        )
        .unwrap();
        drop(anchor_writer);
        let other = vfio_migctl::handoff::sim_anchor().unwrap();
        let second = hand_over(
            &socket,
            &json!({ "name": "gpu0", "group": "vm1", "backend": "sim", "sim": { "caps": "STOP_COPY" },
                     "identity": { "driver": "sim", "model": "sim" } }),
            other.as_fd(),
        )
        .unwrap();
        let mismatch = hand_over(
            &socket,
            &json!({ "name": "gpu1", "backend": "sim", "sim": {}, "identity": { "driver": "sim", "model": "x" } }),
            other.as_fd(),
        )
        .unwrap();
        let bad_key = hand_over(
            &socket,
            &json!({ "name": "gpu2", "backend": "sim", "sim": { "colour": "blue" } }),
            other.as_fd(),
        )
        .unwrap();
        let vfio_with_sim = hand_over(&socket, &json!({ "name": "gpu3", "sim": {} }), other.as_fd()).unwrap();
        [first, second, mismatch, bad_key, vfio_with_sim]
    })
    .await
    .unwrap();
    let [first, second, mismatch, bad_key, vfio_with_sim] = replies;
    assert!(first.ok, "{first:?}");
    assert!(first.device.as_deref().unwrap().contains("sim/sim-nic"), "{first:?}");
    assert!(second.ok, "{second:?}");
    assert!(refusal(mismatch).contains("identity mismatch"));
    assert!(refusal(bad_key).contains("colour"));
    assert!(refusal(vfio_with_sim).contains("needs `\"backend\": \"sim\"`"));

    let mut control = daemon.control().await;
    let group = control.get_group(pb::GetGroupRequest { name: "vm1".into() }).await.unwrap().into_inner();
    assert_eq!(group.devices, ["nic0", "gpu0"]);
    let nic = control.get_device(pb::GetDeviceRequest { name: "nic0".into() }).await.unwrap().into_inner();
    assert_eq!(
        (nic.backend.as_str(), nic.caps.as_str(), nic.state.as_str()),
        ("handoff", "STOP_COPY|P2P", "RUNNING")
    );
    assert_eq!(nic.group, "vm1");

    // The daemon holds the anchor as long as it holds the device.
    let mut byte = [0u8; 1];
    assert_eq!(nix::unistd::read(&anchor_reader, &mut byte), Err(nix::errno::Errno::EAGAIN));
    control.delete_group(pb::DeleteGroupRequest { name: "vm1".into() }).await.unwrap();
    control.release_device(pb::ReleaseDeviceRequest { name: "nic0".into() }).await.unwrap();
    assert_eq!(nix::unistd::read(&anchor_reader, &mut byte), Ok(0), "released: the anchor is closed");
    daemon.stop().await.unwrap();
}

fn fd_count(pid: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

/// The fds of this process that refer to one of the pipes with these inodes.
fn fds_on_pipes(inodes: &[u64]) -> Vec<String> {
    let links = std::fs::read_dir("/proc/self/fd").unwrap().filter_map(|entry| {
        let link = std::fs::read_link(entry.ok()?.path()).ok()?;
        Some(link.to_string_lossy().into_owned())
    });
    links.filter(|link| inodes.iter().any(|inode| *link == format!("pipe:[{inode}]"))).collect()
}

/// One connection: the first message with its one fd, then 1-byte messages with 8 fds
/// each for as long as the daemon reads them. Returns the daemon's answer.
fn flood(socket: &Path, fds: &[BorrowedFd<'_>], messages: usize) -> HandoffReply {
    let stream = UnixStream::connect(socket).unwrap();
    let send = |bytes: &[u8], fds: &[BorrowedFd<'_>]| {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(8))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
        rustix::net::sendmsg(&stream, &[IoSlice::new(bytes)], &mut control, SendFlags::NOSIGNAL)
    };
    send(b"{", &fds[..1]).unwrap();
    for _ in 0..messages {
        if send(b"x", &fds[..8]).is_err() {
            break; // the daemon refused and closed: exactly what should happen
        }
    }
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap()
}

#[tokio::test]
async fn an_fd_flood_on_one_connection_is_refused_and_leaves_no_fds_behind() {
    let daemon = TestDaemon::start().await;
    let socket = daemon.handoff_socket();
    let pipes: Vec<_> = (0..4).map(|_| nix::unistd::pipe().unwrap()).collect();
    // Both ends of a pipe share its inode; an fd the daemon kept still links to it. (The
    // daemon runs in this process beside other tests, so a plain fd count would see
    // their fds too.)
    let inodes: Vec<u64> = pipes.iter().map(|(r, _)| rustix::fs::fstat(r).unwrap().st_ino).collect();
    let (reply, kept) = tokio::task::spawn_blocking(move || {
        let fds: Vec<BorrowedFd<'_>> = pipes.iter().flat_map(|(r, w)| [r.as_fd(), w.as_fd()]).collect();
        let reply = flood(&socket, &fds, 2000);
        std::thread::sleep(std::time::Duration::from_millis(100));
        drop(pipes);
        (reply, fds_on_pipes(&inodes))
    })
    .await
    .unwrap();
    let error = refusal(reply);
    assert!(error.contains("fds arrived after the first message"), "{error}");
    assert!(kept.is_empty(), "the daemon kept fds of the flood: {kept:?}");
    // Still serving.
    let socket = daemon.handoff_socket();
    let reply = tokio::task::spawn_blocking(move || {
        let anchor = vfio_migctl::handoff::sim_anchor().unwrap();
        hand_over(&socket, &json!({ "name": "sim0", "backend": "sim", "sim": {} }), anchor.as_fd()).unwrap()
    })
    .await
    .unwrap();
    assert!(reply.ok, "{reply:?}");
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn simulated_devices_from_the_socket_need_allow_remote() {
    let daemon = TestDaemon::start_with(|config| config.simulator.allow_remote = false).await;
    let socket = daemon.handoff_socket();
    let reply = tokio::task::spawn_blocking(move || {
        let anchor = vfio_migctl::handoff::sim_anchor().unwrap();
        hand_over(&socket, &json!({ "name": "sim0", "backend": "sim", "sim": {} }), anchor.as_fd()).unwrap()
    })
    .await
    .unwrap();
    let error = refusal(reply);
    assert!(error.contains("allow_remote = true") && error.contains("handoff socket"), "{error}");
    assert!(daemon.daemon.registry.device("sim0").is_err());
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn remote_simulated_devices_are_bounded_and_carry_no_arc_log_or_faults() {
    let daemon = TestDaemon::start_with(|config| config.simulator.max_state_size = 1 << 20).await;
    let socket = daemon.handoff_socket();
    let log = daemon.dir.path().join("written-by-root");
    let log_text = log.display().to_string();
    let replies = tokio::task::spawn_blocking(move || {
        let anchor = vfio_migctl::handoff::sim_anchor().unwrap();
        let send = |sim| {
            hand_over(&socket, &json!({ "name": "sim0", "backend": "sim", "sim": sim }), anchor.as_fd())
        };
        [
            send(json!({ "state_size": "1024TiB" })).unwrap(),
            send(json!({ "arc_log": log_text })).unwrap(),
            send(json!({ "faults": [] })).unwrap(),
            send(json!({ "state_size": "1MiB" })).unwrap(),
        ]
    })
    .await
    .unwrap();
    let [huge, arc_log, faults, fits] = replies;
    let huge = refusal(huge);
    assert!(huge.contains("max_state_size"), "{huge}");
    assert!(
        refusal(arc_log).contains("`arc_log` is accepted only for devices in the daemon's configuration")
    );
    assert!(refusal(faults).contains("`faults` is accepted only"));
    assert!(!log.exists(), "no file created from a socket request");
    assert!(fits.ok, "at the bound is fine: {fits:?}");
    daemon.stop().await.unwrap();
}

#[tokio::test]
async fn a_client_adds_devices_only_to_groups_its_own_process_created() {
    let daemon = TestDaemon::start().await;
    // A group defined over the control API (or by another VMM) is not this client's.
    daemon.add_device("other", Caps::MIGRATABLE[1]);
    daemon.daemon.registry.join_group("vm-other", "other").unwrap();
    let socket = daemon.handoff_socket();
    let reply = tokio::task::spawn_blocking(move || {
        let anchor = vfio_migctl::handoff::sim_anchor().unwrap();
        hand_over(
            &socket,
            &json!({ "name": "spy0", "group": "vm-other", "backend": "sim", "sim": {} }),
            anchor.as_fd(),
        )
        .unwrap()
    })
    .await
    .unwrap();
    let error = refusal(reply);
    assert!(error.contains("was not created by this client") && error.contains("vm-other"), "{error}");
    assert!(daemon.daemon.registry.device("spy0").is_err(), "the device is not kept");
    assert_eq!(daemon.daemon.registry.group("vm-other").unwrap().devices, ["other"]);
    daemon.stop().await.unwrap();
}

/// A spawned daemon whose fd table is full (RLIMIT_NOFILE lowered, then filled with idle
/// control connections) meets EMFILE on accept: it logs, backs off and keeps running, and
/// serves handoffs again once fds are free.
#[test]
fn emfile_on_accept_does_not_stop_the_daemon() {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let control = dir.path().join("run/control.sock");
    let handoff = dir.path().join("run/handoff.sock");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{0}/state\"\n[control]\nsocket = \"{1}\"\n[handoff]\nsocket = \"{2}\"\n\
             [peer]\nlisten = \"127.0.0.1:0\"\n[simulator]\nallow_remote = true\n",
            dir.path().display(),
            control.display(),
            handoff.display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
    let mut child = Command::new("prlimit")
        .arg("--nofile=64:64")
        .arg(env!("CARGO_BIN_EXE_vfio-migd"))
        .arg("--config")
        .arg(&config)
        .env("VFIO_MIGD_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !(handoff.exists() && control.exists()) {
        assert!(started.elapsed() < Duration::from_secs(30), "the daemon did not start");
        assert!(child.try_wait().unwrap().is_none(), "the daemon exited at start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = child.id().to_string();
    // Fill its fd table with idle control connections (the control server accepts them).
    let mut idle = Vec::new();
    for _ in 0..80 {
        idle.push(UnixStream::connect(&control).unwrap());
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(fd_count(&pid) >= 60, "the daemon's fd table is (nearly) full: {}", fd_count(&pid));
    // Handoffs now meet EMFILE on accept.
    let waiting: Vec<UnixStream> = (0..4).map(|_| UnixStream::connect(&handoff).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(500));
    assert!(child.try_wait().unwrap().is_none(), "EMFILE on accept stopped the daemon");
    drop(waiting);
    drop(idle);
    std::thread::sleep(Duration::from_millis(500));
    // It recovers: a handoff succeeds.
    let anchor = vfio_migctl::handoff::sim_anchor().unwrap();
    let started = Instant::now();
    let reply = loop {
        let reply =
            hand_over(&handoff, &json!({ "name": "sim0", "backend": "sim", "sim": {} }), anchor.as_fd());
        match reply {
            Ok(reply) if reply.ok => break reply,
            other if started.elapsed() > Duration::from_secs(10) => panic!("no recovery: {other:?}"),
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    assert!(reply.ok);
    assert!(child.try_wait().unwrap().is_none(), "the daemon is still running");
    let _ = Command::new("kill").arg("-TERM").arg(&pid).status();
    let status = child.wait().unwrap();
    let text = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();
    assert!(text.contains("handoff accept failed"), "the EMFILE was logged: {text}");
    assert!(status.success() || status.code().is_some(), "{status:?}");
}
