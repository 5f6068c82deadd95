//! The data-connection preamble decoder: arbitrary bytes never panic and never pass for
//! the expected job's preamble unless they are exactly its encoding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vfio_migd::stream::frame::{PREAMBLE_HEAD_LEN, PreambleHead, encode_preamble};
use vfio_migd::stream::Preamble;

fuzz_target!(|data: &[u8]| {
    let expected = Preamble { job_id: "job-7".into(), token: vec![0x5a; 16] };
    let Some((raw, rest)) = data.split_first_chunk::<PREAMBLE_HEAD_LEN>() else { return };
    let Ok(head) = PreambleHead::parse(raw) else { return };
    let body = &rest[..rest.len().min(head.body_len())];
    if head.verify(raw, body, &expected, 2).is_ok() {
        let encoded = encode_preamble(&expected, head.connection, 2).expect("encodes");
        assert_eq!(&encoded[..PREAMBLE_HEAD_LEN], raw);
        assert_eq!(&encoded[PREAMBLE_HEAD_LEN..], body);
    }
});
