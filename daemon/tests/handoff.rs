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
