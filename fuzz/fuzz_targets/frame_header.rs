//! The frame header decoder: any 24 bytes parse or fail with a typed error (never a
//! panic), a parsed header never promises more payload than the limit, and every header
//! the encoder seals parses back to itself and verifies its payload.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vfio_migd::stream::frame::{END_RECORD_LEN, FRAME_HEADER_LEN, FrameHeader, FrameKind};

const MAX_PAYLOAD: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    if let Some((raw, payload)) = data.split_first_chunk::<FRAME_HEADER_LEN>() {
        if let Ok(header) = FrameHeader::parse(raw, MAX_PAYLOAD) {
            assert!(header.payload_len() <= MAX_PAYLOAD);
            if header.verify(&payload[..payload.len().min(header.payload_len())]).is_ok() {
                assert_eq!(&header.encode(), raw, "a verified header re-encodes to its bytes");
            }
        }
        // Round trip of what the encoder makes from the same bytes.
        let kind = [FrameKind::Data, FrameKind::End][usize::from(raw[0] & 1)];
        let device = u32::from_le_bytes([raw[1], raw[2], raw[3], raw[4]]) & 0xffff;
        let sequence = u64::from_le_bytes(raw[5..13].try_into().unwrap());
        // An END frame always carries exactly its 24-byte record (the decoder refuses any
        // other length, as it must); a data frame any payload up to the limit.
        let mut record = [0u8; END_RECORD_LEN];
        let payload = if kind == FrameKind::End {
            let n = payload.len().min(END_RECORD_LEN);
            record[..n].copy_from_slice(&payload[..n]);
            &record[..]
        } else {
            &payload[..payload.len().min(MAX_PAYLOAD)]
        };
        let sealed = FrameHeader::seal(kind, device, sequence, payload);
        let parsed = FrameHeader::parse(&sealed.encode(), MAX_PAYLOAD).expect("a sealed header parses");
        assert_eq!(parsed, sealed);
        parsed.verify(payload).expect("a sealed header verifies its payload");
    }
});
