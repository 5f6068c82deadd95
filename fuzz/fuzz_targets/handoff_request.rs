//! The handoff request parser and its framing: arbitrary messages never panic, never
//! store more than the line limit, never take an fd after the first message, and a
//! completed line is at most the limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vfio_migd::handoff::request::{MAX_REQUEST_BYTES, RequestAssembler, RequestError, parse_request};

fuzz_target!(|data: &[u8]| {
    // Messages: a length byte, an fd-count byte, then that many bytes.
    let mut assembler = RequestAssembler::new();
    let mut rest = data;
    let mut first = true;
    while let [len, fds, tail @ ..] = rest {
        let len = usize::from(*len).min(tail.len());
        let (bytes, after) = tail.split_at(len);
        rest = after;
        let fds = usize::from(*fds % 10);
        match assembler.push(bytes, fds, false) {
            Ok(None) => {}
            Ok(Some(line)) => {
                assert!(line.len() <= MAX_REQUEST_BYTES);
                assert!(!line.contains(&b'\n'));
                let _ = parse_request(&line);
                break;
            }
            Err(RequestError::LateFd) => {
                assert!(!first && fds > 0);
                break;
            }
            Err(_) => break,
        }
        first = false;
    }
    // The parser alone, on the whole input as a line.
    if let Ok(request) = parse_request(data) {
        assert!(!request.name.trim().is_empty());
    }
});
