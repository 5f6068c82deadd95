//! The destination's validation of a connection (frames, sequence, checksums, END
//! records): arbitrary bytes never panic; a device state encoded by the source always
//! decodes to its own summary; and a single flipped byte in an encoded stream is always
//! refused (it is what lets the destination move a device to STOP only on a match).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vfio_migd::stream::frame::{decode_connection, encode_device};

const MAX_PAYLOAD: usize = 1024;

fuzz_target!(|data: &[u8]| {
    // 1. Arbitrary bytes as a connection carrying devices 0 and 1.
    let _ = decode_connection(data, &[0, 1], MAX_PAYLOAD);

    // 2. The input as a device state: it round-trips, and any flipped byte is caught.
    let Some((&selector, state)) = data.split_first() else { return };
    let payload = 1 + usize::from(selector) % MAX_PAYLOAD;
    let stream: Vec<u8> = encode_device(0, state, payload).concat();
    let summaries = decode_connection(&stream, &[0], MAX_PAYLOAD).expect("a sealed stream decodes");
    assert_eq!(summaries.len(), 1);
    assert_eq!(summaries[0].bytes, state.len() as u64);
    let at = (usize::from(selector) * 7919) % stream.len();
    let mut corrupt = stream.clone();
    corrupt[at] ^= 1 << (selector % 8);
    assert!(decode_connection(&corrupt, &[0], MAX_PAYLOAD).is_err(), "flip at {at} of {} accepted", stream.len());
});
