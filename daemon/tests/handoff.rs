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
