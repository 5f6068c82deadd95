//! The stream's wire format, pure: encoders and decoders over byte slices, no I/O, so
//! that every rule can be property-tested and fuzzed. `docs/stream-protocol.md` is the
//! prose version of this file; keep them in step.
//!
//! All integers are little-endian.
//!
//! Frame header (24 bytes), then `length` payload bytes:
//! ```text
//!  0  u16  marker "VF"
//!  2  u16  flags: exactly one of DATA 0x1, END 0x2, KEEPALIVE 0x4
//!  4  u32  device index
//!  8  u64  sequence number, per device, from 0 (the END record is the last one)
//! 16  u32  payload length
//! 20  u32  crc32c(payload ‖ header bytes 0..20)
//! ```
//!
//! The checksum covers the header fields as well as the payload, so a corrupt device
//! index, sequence number or length is caught like a corrupt payload byte. The payload
//! comes first in the checksum so that the source's reader thread checksums the payload
//! while it is still in cache from the `read()`, then appends the 20 header bytes.
//!
//! END record payload (24 bytes): `u64 bytes, u64 data frames, u64 digest`. The digest
//! is the CRC-32C of the concatenated checksums (as `u32` LE) of the device's data frames,
//! zero-extended. Each of those checksums covers one frame's payload, device, sequence
//! number and length, so the digest commits to every byte of the device's state and to
//! its order, and both sides get it for four bytes per frame. A second hash over the
//! payload (a whole-stream CRC, or xxh3-64 at 7.2 GB/s) would cost each side another pass
//! over every byte, about a sixth of a 2-core machine's budget at the link's ~2 GB/s.
//! Whole-stream CRC via `crc32c_combine` avoids the pass but costs a GF(2) matrix
//! exponentiation per frame in the crc32c crate (zlib's algorithm).
//!
//! A KEEPALIVE frame (device `u32::MAX`, sequence 0, no payload) keeps an idle
//! connection (a device with nothing to send in PRE_COPY) from tripping the peer's
//! stall timeout.

use std::collections::BTreeMap;

use super::{EndField, PreambleError, StreamError, Truncation};

pub const PROTOCOL_VERSION: u16 = 1;
pub const FRAME_HEADER_LEN: usize = 24;
pub const END_RECORD_LEN: usize = 24;
/// "VF" on the wire.
pub const FRAME_MARKER: u16 = u16::from_le_bytes(*b"VF");
/// The device index of keepalive frames; never a real device.
pub const KEEPALIVE_DEVICE: u32 = u32::MAX;

const FLAG_DATA: u16 = 0x1;
const FLAG_END: u16 = 0x2;
const FLAG_KEEPALIVE: u16 = 0x4;
/// The header bytes the checksum covers (everything but the checksum itself).
const CHECKED_HEADER_LEN: usize = 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    Data,
    End,
    Keepalive,
}

impl FrameKind {
    fn flags(self) -> u16 {
        match self {
            FrameKind::Data => FLAG_DATA,
            FrameKind::End => FLAG_END,
            FrameKind::Keepalive => FLAG_KEEPALIVE,
        }
    }

    fn from_flags(flags: u16) -> Option<FrameKind> {
        match flags {
            FLAG_DATA => Some(FrameKind::Data),
            FLAG_END => Some(FrameKind::End),
            FLAG_KEEPALIVE => Some(FrameKind::Keepalive),
            _ => None,
        }
    }
}

/// A decoded frame header. Build one with [`FrameHeader::seal`] so the checksum is right.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    pub device: u32,
    pub sequence: u64,
    pub length: u32,
    pub crc: u32,
}

impl FrameHeader {
    /// The header of a frame carrying `payload`, with its checksum.
    ///
    /// # Panics
    /// If `payload` is longer than `u32::MAX` bytes; callers bound payloads by
    /// [`super::MAX_PAYLOAD_LIMIT`].
    pub fn seal(kind: FrameKind, device: u32, sequence: u64, payload: &[u8]) -> FrameHeader {
        let length = u32::try_from(payload.len()).expect("frame payloads are bounded by MAX_PAYLOAD_LIMIT");
        let mut header = FrameHeader { kind, device, sequence, length, crc: 0 };
        header.crc = header.checksum(payload);
        header
    }

    pub fn keepalive() -> FrameHeader {
        FrameHeader::seal(FrameKind::Keepalive, KEEPALIVE_DEVICE, 0, &[])
    }

    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut out = [0u8; FRAME_HEADER_LEN];
        out[0..2].copy_from_slice(&FRAME_MARKER.to_le_bytes());
        out[2..4].copy_from_slice(&self.kind.flags().to_le_bytes());
        out[4..8].copy_from_slice(&self.device.to_le_bytes());
        out[8..16].copy_from_slice(&self.sequence.to_le_bytes());
        out[16..20].copy_from_slice(&self.length.to_le_bytes());
        out[20..24].copy_from_slice(&self.crc.to_le_bytes());
        out
    }

    /// Decodes a header and checks what can be checked before the payload arrives:
    /// marker, flags, and a length the receiver is willing to read.
    pub fn parse(raw: &[u8; FRAME_HEADER_LEN], max_payload: usize) -> Result<FrameHeader, StreamError> {
        let marker = u16::from_le_bytes([raw[0], raw[1]]);
        let flags = u16::from_le_bytes([raw[2], raw[3]]);
        let device = u32::from_le_bytes(raw[4..8].try_into().expect("4 bytes"));
        let sequence = u64::from_le_bytes(raw[8..16].try_into().expect("8 bytes"));
        let length = u32::from_le_bytes(raw[16..20].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(raw[20..24].try_into().expect("4 bytes"));
        if marker != FRAME_MARKER {
            return Err(StreamError::BadMarker { device, sequence, found: marker });
        }
        let kind =
            FrameKind::from_flags(flags).ok_or(StreamError::UnknownFlags { device, sequence, flags })?;
        let len = length as usize;
        match kind {
            FrameKind::Data if len > max_payload => {
                return Err(StreamError::Oversized { device, sequence, length, limit: max_payload });
            }
            FrameKind::End if len != END_RECORD_LEN => {
                return Err(StreamError::MalformedEnd { device, sequence, length });
            }
            FrameKind::Keepalive if len != 0 => {
                return Err(StreamError::Oversized { device, sequence, length, limit: 0 });
            }
            _ => {}
        }
        Ok(FrameHeader { kind, device, sequence, length, crc })
    }

    pub fn payload_len(&self) -> usize {
        self.length as usize
    }

    fn checksum(&self, payload: &[u8]) -> u32 {
        let header = self.encode();
        crc32c::crc32c_append(crc32c::crc32c(payload), &header[..CHECKED_HEADER_LEN])
    }

    /// Checks the frame's checksum against its header fields and `payload`.
    pub fn verify(&self, payload: &[u8]) -> Result<(), StreamError> {
        let computed = self.checksum(payload);
        if computed == self.crc {
            Ok(())
        } else {
            Err(StreamError::BadChecksum {
                device: self.device,
                sequence: self.sequence,
                carried: self.crc,
                computed,
            })
        }
    }
}

/// What a device's END record claims.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndRecord {
    pub bytes: u64,
    pub frames: u64,
    pub digest: u64,
}

impl EndRecord {
    pub fn encode(&self) -> [u8; END_RECORD_LEN] {
        let mut out = [0u8; END_RECORD_LEN];
        out[0..8].copy_from_slice(&self.bytes.to_le_bytes());
        out[8..16].copy_from_slice(&self.frames.to_le_bytes());
        out[16..24].copy_from_slice(&self.digest.to_le_bytes());
        out
    }

    /// `payload` is exactly [`END_RECORD_LEN`] bytes ([`FrameHeader::parse`] checked it).
    fn decode(payload: &[u8]) -> EndRecord {
        let word = |at: usize| u64::from_le_bytes(payload[at..at + 8].try_into().expect("8 bytes"));
        EndRecord { bytes: word(0), frames: word(8), digest: word(16) }
    }
}

/// What one device's stream carried, as both sides count it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceStreamSummary {
    pub index: u32,
    /// Bytes of device state (payload bytes of data frames).
    pub bytes: u64,
    /// Data frames (the END record is not counted).
    pub frames: u64,
    pub digest: u64,
}

/// Running totals of one device's stream, identical on both sides when all is well.
#[derive(Clone, Copy, Debug)]
struct Tally {
    device: u32,
    next_sequence: u64,
    bytes: u64,
    digest: u32,
}

impl Tally {
    fn new(device: u32) -> Tally {
        Tally { device, next_sequence: 0, bytes: 0, digest: 0 }
    }

    fn count(&mut self, header: &FrameHeader) {
        self.next_sequence += 1;
        self.bytes += u64::from(header.length);
        self.digest = crc32c::crc32c_append(self.digest, &header.crc.to_le_bytes());
    }

    fn summary(&self) -> DeviceStreamSummary {
        DeviceStreamSummary {
            index: self.device,
            bytes: self.bytes,
            frames: self.next_sequence,
            digest: u64::from(self.digest),
        }
    }
}

/// The source's side of one device: numbers and seals its frames.
#[derive(Clone, Debug)]
pub struct DeviceEncoder {
    tally: Tally,
}

impl DeviceEncoder {
    pub fn new(device: u32) -> DeviceEncoder {
        DeviceEncoder { tally: Tally::new(device) }
    }

    /// The header of the next data frame, carrying `payload`.
    pub fn data(&mut self, payload: &[u8]) -> FrameHeader {
        let header = FrameHeader::seal(FrameKind::Data, self.tally.device, self.tally.next_sequence, payload);
        self.tally.count(&header);
        header
    }

    /// The END frame (header and payload) and what the stream carried.
    pub fn end(&self) -> (FrameHeader, [u8; END_RECORD_LEN], DeviceStreamSummary) {
        let summary = self.tally.summary();
        let record =
            EndRecord { bytes: summary.bytes, frames: summary.frames, digest: summary.digest }.encode();
        let header = FrameHeader::seal(FrameKind::End, self.tally.device, self.tally.next_sequence, &record);
        (header, record, summary)
    }
}

/// The destination's side of one device: accepts a frame only if it is intact, the next
/// in sequence, and the device has not ended.
#[derive(Clone, Debug)]
pub struct DeviceDecoder {
    tally: Tally,
    ended: bool,
}

/// What an accepted frame means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accepted {
    /// Payload to write into the device.
    Data {
        device: u32,
    },
    /// The device's stream is complete and its END record matched.
    End(DeviceStreamSummary),
    Keepalive,
}

impl DeviceDecoder {
    pub fn new(device: u32) -> DeviceDecoder {
        DeviceDecoder { tally: Tally::new(device), ended: false }
    }

    pub fn ended(&self) -> bool {
        self.ended
    }

    pub fn next_sequence(&self) -> u64 {
        self.tally.next_sequence
    }

    /// Checks a frame of this device. The checksum comes first: a frame whose fields
    /// cannot be trusted is reported as corrupt, not as out of sequence.
    pub fn accept(&mut self, header: &FrameHeader, payload: &[u8]) -> Result<Accepted, StreamError> {
        header.verify(payload)?;
        let device = self.tally.device;
        if self.ended {
            return Err(StreamError::DataAfterEnd { device, sequence: header.sequence });
        }
        if header.sequence != self.tally.next_sequence {
            return Err(StreamError::UnexpectedSequence {
                device,
                expected: self.tally.next_sequence,
                received: header.sequence,
            });
        }
        match header.kind {
            FrameKind::Data => {
                self.tally.count(header);
                Ok(Accepted::Data { device })
            }
            FrameKind::End => {
                let claimed = EndRecord::decode(payload);
                let actual = self.tally.summary();
                for (field, claimed, actual) in [
                    (EndField::Bytes, claimed.bytes, actual.bytes),
                    (EndField::Frames, claimed.frames, actual.frames),
                    (EndField::Digest, claimed.digest, actual.digest),
                ] {
                    if claimed != actual {
                        return Err(StreamError::EndMismatch { device, field, claimed, actual });
                    }
                }
                self.ended = true;
                Ok(Accepted::End(actual))
            }
            FrameKind::Keepalive => Ok(Accepted::Keepalive),
        }
    }
}

/// One data connection's view of the stream: which devices it carries, each one's
/// decoder, and which devices belong elsewhere.
#[derive(Clone, Debug)]
pub struct ConnectionDecoder {
    connection: usize,
    connections: usize,
    max_payload: usize,
    carried: BTreeMap<u32, DeviceDecoder>,
    stream_devices: Vec<u32>,
}

impl ConnectionDecoder {
    /// `devices` are every device of the stream; this connection carries those with
    /// `index % connections == connection`.
    pub fn new(connection: usize, connections: usize, devices: &[u32], max_payload: usize) -> Self {
        let carried = devices
            .iter()
            .filter(|&&d| d as usize % connections == connection)
            .map(|&d| (d, DeviceDecoder::new(d)))
            .collect();
        let mut stream_devices = devices.to_vec();
        stream_devices.sort_unstable();
        ConnectionDecoder { connection, connections, max_payload, carried, stream_devices }
    }

    pub fn carried_devices(&self) -> Vec<u32> {
        self.carried.keys().copied().collect()
    }

    pub fn header(&self, raw: &[u8; FRAME_HEADER_LEN]) -> Result<FrameHeader, StreamError> {
        FrameHeader::parse(raw, self.max_payload)
    }

    /// Whether the frame's payload will be written into a device if it checks out: the
    /// receiver reads such payloads straight into one of the device's buffers.
    pub fn is_deliverable(&self, header: &FrameHeader) -> bool {
        header.kind == FrameKind::Data && self.carried.get(&header.device).is_some_and(|d| !d.ended())
    }

    pub fn accept(&mut self, header: &FrameHeader, payload: &[u8]) -> Result<Accepted, StreamError> {
        if header.kind == FrameKind::Keepalive {
            header.verify(payload)?;
            return Ok(Accepted::Keepalive);
        }
        if let Some(decoder) = self.carried.get_mut(&header.device) {
            return decoder.accept(header, payload);
        }
        header.verify(payload)?;
        let (device, sequence) = (header.device, header.sequence);
        if self.stream_devices.binary_search(&device).is_ok() {
            Err(StreamError::WrongConnection {
                device,
                sequence,
                connection: self.connection,
                expected: device as usize % self.connections,
            })
        } else {
            Err(StreamError::UnknownDevice { device, sequence })
        }
    }

    /// The connection ended `received` bytes into a frame whose header was `header`
    /// (`None`: inside the header).
    pub fn truncated_in_frame(&self, header: Option<&FrameHeader>, received: usize) -> StreamError {
        let at = match header {
            None => Truncation::InHeader { received },
            Some(h) => Truncation::InPayload {
                device: h.device,
                sequence: h.sequence,
                received,
                length: h.payload_len(),
            },
        };
        StreamError::Truncated { connection: self.connection, at }
    }

    /// The connection ended between frames: fine only after every END record.
    pub fn finish(&self) -> Result<(), StreamError> {
        match self.carried.values().find(|d| !d.ended()) {
            None => Ok(()),
            Some(open) => Err(StreamError::Truncated {
                connection: self.connection,
                at: Truncation::BeforeEnd { device: open.tally.device, next_sequence: open.next_sequence() },
            }),
        }
    }
}

/// Decodes a whole connection's bytes (connection 0 of 1, carrying `devices`) and
/// returns what every device's stream carried: the reference decoder for tests and
/// fuzzing, built from the same parts as the receiver.
pub fn decode_connection(
    bytes: &[u8],
    devices: &[u32],
    max_payload: usize,
) -> Result<Vec<DeviceStreamSummary>, StreamError> {
    let mut decoder = ConnectionDecoder::new(0, 1, devices, max_payload);
    let mut summaries = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let Some(raw) = rest.first_chunk::<FRAME_HEADER_LEN>() else {
            return Err(decoder.truncated_in_frame(None, rest.len()));
        };
        let header = decoder.header(raw)?;
        rest = &rest[FRAME_HEADER_LEN..];
        if rest.len() < header.payload_len() {
            return Err(decoder.truncated_in_frame(Some(&header), rest.len()));
        }
        let (payload, after) = rest.split_at(header.payload_len());
        rest = after;
        if let Accepted::End(summary) = decoder.accept(&header, payload)? {
            summaries.push(summary);
        }
    }
    decoder.finish()?;
    summaries.sort_by_key(|s| s.index);
    Ok(summaries)
}

/// Encodes one device's whole stream cut into payloads of at most `max_payload` bytes
/// (the reference encoder for tests and fuzzing).
pub fn encode_device(device: u32, state: &[u8], max_payload: usize) -> Vec<Vec<u8>> {
    let mut encoder = DeviceEncoder::new(device);
    let mut frames: Vec<Vec<u8>> = state
        .chunks(max_payload.max(1))
        .map(|chunk| [&encoder.data(chunk).encode()[..], chunk].concat())
        .collect();
    let (header, record, _) = encoder.end();
    frames.push([&header.encode()[..], &record[..]].concat());
    frames
}

/// Identifies the job and the connection at the start of every data connection.
#[derive(Clone, PartialEq, Eq)]
pub struct Preamble {
    pub job_id: String,
    /// The session token from the peer handshake; never logged.
    pub token: Vec<u8>,
}

impl std::fmt::Debug for Preamble {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Preamble")
            .field("job_id", &self.job_id)
            .field("token", &format_args!("<{} bytes>", self.token.len()))
            .finish()
    }
}

/// "VFMIGSTR": a vfio-migd data connection.
pub const PREAMBLE_MAGIC: [u8; 8] = *b"VFMIGSTR";
/// Magic, version, connection index, connection count, job id length, token length.
pub const PREAMBLE_HEAD_LEN: usize = 18;
/// Longest job id and token a preamble may carry.
pub const PREAMBLE_FIELD_LIMIT: usize = 1024;
const PREAMBLE_CRC_LEN: usize = 4;

/// A preamble's fixed-size head, from which the reader learns how much follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PreambleHead {
    pub connection: u16,
    pub connections: u16,
    job_len: u16,
    token_len: u16,
}

impl PreambleHead {
    pub fn parse(raw: &[u8; PREAMBLE_HEAD_LEN]) -> Result<PreambleHead, PreambleError> {
        let found: [u8; 8] = raw[0..8].try_into().expect("8 bytes");
        if found != PREAMBLE_MAGIC {
            return Err(PreambleError::Magic { found });
        }
        let field = |at: usize| u16::from_le_bytes([raw[at], raw[at + 1]]);
        let version = field(8);
        if version != PROTOCOL_VERSION {
            return Err(PreambleError::Version { found: version, supported: PROTOCOL_VERSION });
        }
        let head = PreambleHead {
            connection: field(10),
            connections: field(12),
            job_len: field(14),
            token_len: field(16),
        };
        if usize::from(head.job_len.max(head.token_len)) > PREAMBLE_FIELD_LIMIT {
            return Err(PreambleError::TooLong { limit: PREAMBLE_FIELD_LIMIT });
        }
        Ok(head)
    }

    /// Bytes that follow the head: job id, token, checksum.
    pub fn body_len(&self) -> usize {
        usize::from(self.job_len) + usize::from(self.token_len) + PREAMBLE_CRC_LEN
    }

    /// Checks the body's checksum and that it names `expected` with the right token and
    /// a connection this side expects (`connections` in all).
    pub fn verify(
        &self,
        raw_head: &[u8; PREAMBLE_HEAD_LEN],
        body: &[u8],
        expected: &Preamble,
        connections: usize,
    ) -> Result<(), PreambleError> {
        if body.len() != self.body_len() {
            return Err(PreambleError::Checksum);
        }
        let (fields, crc) = body.split_at(body.len() - PREAMBLE_CRC_LEN);
        let carried = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
        if crc32c::crc32c_append(crc32c::crc32c(raw_head), fields) != carried {
            return Err(PreambleError::Checksum);
        }
        let (job, token) = fields.split_at(usize::from(self.job_len));
        if job != expected.job_id.as_bytes() {
            return Err(PreambleError::Job);
        }
        if !tokens_equal(token, &expected.token) {
            return Err(PreambleError::Token);
        }
        if usize::from(self.connections) != connections {
            return Err(PreambleError::ConnectionCount { found: self.connections, expected: connections });
        }
        if self.connection >= self.connections {
            return Err(PreambleError::ConnectionIndex { index: self.connection, count: self.connections });
        }
        Ok(())
    }
}

/// Compares tokens in time independent of where they differ.
fn tokens_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The bytes a source sends first on data connection `connection` of `connections`.
pub fn encode_preamble(
    preamble: &Preamble,
    connection: u16,
    connections: u16,
) -> Result<Vec<u8>, PreambleError> {
    let too_long = || PreambleError::TooLong { limit: PREAMBLE_FIELD_LIMIT };
    let job_len = u16::try_from(preamble.job_id.len()).map_err(|_| too_long())?;
    let token_len = u16::try_from(preamble.token.len()).map_err(|_| too_long())?;
    if usize::from(job_len.max(token_len)) > PREAMBLE_FIELD_LIMIT {
        return Err(too_long());
    }
    let mut out = Vec::with_capacity(PREAMBLE_HEAD_LEN + preamble.job_id.len() + preamble.token.len() + 4);
    out.extend_from_slice(&PREAMBLE_MAGIC);
    for field in [PROTOCOL_VERSION, connection, connections, job_len, token_len] {
        out.extend_from_slice(&field.to_le_bytes());
    }
    out.extend_from_slice(preamble.job_id.as_bytes());
    out.extend_from_slice(&preamble.token);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// The destination's answer to a preamble: "VFOK" or "VFNO", a `u16` length and (for
/// a refusal) the reason as UTF-8.
pub const ACK_HEAD_LEN: usize = 6;
const ACK_ACCEPT: [u8; 4] = *b"VFOK";
const ACK_REFUSE: [u8; 4] = *b"VFNO";
const ACK_REASON_LIMIT: usize = 1024;

pub fn encode_ack(refusal: Option<&str>) -> Vec<u8> {
    let reason = refusal.unwrap_or("");
    let reason = &reason.as_bytes()[..reason.len().min(ACK_REASON_LIMIT)];
    let mut out = Vec::with_capacity(ACK_HEAD_LEN + reason.len());
    out.extend_from_slice(if refusal.is_some() { &ACK_REFUSE } else { &ACK_ACCEPT });
    out.extend_from_slice(&(reason.len() as u16).to_le_bytes());
    out.extend_from_slice(reason);
    out
}

/// An answer's head: whether it accepts, and how long the reason that follows is.
/// `Err` carries a description of a head that is not an answer at all.
pub fn parse_ack_head(raw: &[u8; ACK_HEAD_LEN]) -> Result<(bool, usize), String> {
    let len = usize::from(u16::from_le_bytes([raw[4], raw[5]]));
    match raw[0..4].try_into().expect("4 bytes") {
        ACK_ACCEPT if len == 0 => Ok((true, 0)),
        ACK_REFUSE if len <= ACK_REASON_LIMIT => Ok((false, len)),
        other => Err(format!("unexpected answer to the preamble: {other:02x?}")),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const MAX: usize = 4096;

    fn stream_of(devices: &[(u32, Vec<u8>)], max_payload: usize) -> Vec<Vec<u8>> {
        // Interleave devices frame by frame, the way connections mix them.
        let mut per_device: Vec<std::collections::VecDeque<Vec<u8>>> =
            devices.iter().map(|(d, s)| encode_device(*d, s, max_payload).into()).collect();
        let mut frames = Vec::new();
        while per_device.iter().any(|q| !q.is_empty()) {
            for q in &mut per_device {
                frames.extend(q.pop_front());
            }
        }
        frames
    }

    fn indices(devices: &[(u32, Vec<u8>)]) -> Vec<u32> {
        devices.iter().map(|(d, _)| *d).collect()
    }

    fn device_states(largest: usize) -> impl Strategy<Value = Vec<(u32, Vec<u8>)>> {
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..largest), 1..4)
            .prop_map(|states| states.into_iter().enumerate().map(|(i, s)| (i as u32, s)).collect())
    }

    #[test]
    fn header_layout_is_the_documented_one() {
        let header = FrameHeader::seal(FrameKind::Data, 0x0102_0304, 0x0506_0708_090a_0b0c, b"abc");
        let raw = header.encode();
        assert_eq!(&raw[0..2], b"VF");
        assert_eq!(&raw[2..4], &[1, 0]);
        assert_eq!(&raw[4..8], &[4, 3, 2, 1]);
        assert_eq!(&raw[8..16], &[0x0c, 0x0b, 0x0a, 9, 8, 7, 6, 5]);
        assert_eq!(&raw[16..20], &[3, 0, 0, 0]);
        let expected_crc = crc32c::crc32c_append(crc32c::crc32c(b"abc"), &raw[..20]);
        assert_eq!(&raw[20..24], &expected_crc.to_le_bytes());
        assert_eq!(FrameHeader::parse(&raw, MAX).unwrap(), header);
    }

    #[test]
    fn empty_state_is_one_end_record() {
        let frames = encode_device(7, &[], MAX);
        assert_eq!(frames.len(), 1);
        let summaries = decode_connection(&frames.concat(), &[7], MAX).unwrap();
        assert_eq!(summaries, vec![DeviceStreamSummary { index: 7, bytes: 0, frames: 0, digest: 0 }]);
    }

    #[test]
    fn header_errors_name_what_is_wrong() {
        let good = FrameHeader::seal(FrameKind::Data, 3, 9, &[0; 10]).encode();
        let mut raw = good;
        raw[0] = b'X';
        assert!(matches!(
            FrameHeader::parse(&raw, MAX),
            Err(StreamError::BadMarker { device: 3, sequence: 9, .. })
        ));
        let mut raw = good;
        raw[2] = 0x3;
        assert!(matches!(
            FrameHeader::parse(&raw, MAX),
            Err(StreamError::UnknownFlags { device: 3, sequence: 9, flags: 3 })
        ));
        let big = FrameHeader::seal(FrameKind::Data, 3, 9, &vec![0; MAX + 1]).encode();
        assert!(matches!(
            FrameHeader::parse(&big, MAX),
            Err(StreamError::Oversized { device: 3, sequence: 9, length, limit: MAX }) if length as usize == MAX + 1
        ));
        let short_end = FrameHeader::seal(FrameKind::End, 3, 9, &[0; 8]).encode();
        assert!(matches!(
            FrameHeader::parse(&short_end, MAX),
            Err(StreamError::MalformedEnd { device: 3, sequence: 9, length: 8 })
        ));
    }

    #[test]
    fn sequence_errors_tell_duplicates_from_gaps() {
        let frames = encode_device(0, &[1; 3 * 1024], 1024);
        let duplicated = [&frames[0][..], &frames[1], &frames[1], &frames[2], &frames[3]].concat();
        let err = decode_connection(&duplicated, &[0], 1024).unwrap_err();
        assert!(matches!(err, StreamError::UnexpectedSequence { device: 0, expected: 2, received: 1 }));
        assert!(err.to_string().contains("duplicated"), "{err}");
        let reordered = [&frames[0][..], &frames[2], &frames[1], &frames[3]].concat();
        let err = decode_connection(&reordered, &[0], 1024).unwrap_err();
        assert!(matches!(err, StreamError::UnexpectedSequence { device: 0, expected: 1, received: 2 }));
        assert!(err.to_string().contains("missing or reordered"), "{err}");
    }

    #[test]
    fn data_after_end_unknown_and_misrouted_devices_are_refused() {
        let frames = encode_device(0, &[1; 100], 1024);
        let mut after_end = frames.concat();
        after_end.extend(encode_device(0, &[2; 10], 1024).remove(0));
        assert!(matches!(
            decode_connection(&after_end, &[0], 1024),
            Err(StreamError::DataAfterEnd { device: 0, sequence: 0 })
        ));
        let stranger = encode_device(5, &[1; 10], 1024).concat();
        assert!(matches!(
            decode_connection(&stranger, &[0], 1024),
            Err(StreamError::UnknownDevice { device: 5, sequence: 0 })
        ));
        let mut decoder = ConnectionDecoder::new(1, 2, &[0, 1, 2, 3], 1024);
        let frame = encode_device(2, &[1; 10], 1024).remove(0);
        let header = decoder.header(frame[..FRAME_HEADER_LEN].try_into().unwrap()).unwrap();
        assert!(matches!(
            decoder.accept(&header, &frame[FRAME_HEADER_LEN..]),
            Err(StreamError::WrongConnection { device: 2, sequence: 0, connection: 1, expected: 0 })
        ));
    }

    #[test]
    fn end_record_must_match_what_arrived() {
        let state = [9u8; 2048];
        let mut frames = encode_device(4, &state, 1024);
        let end = frames.pop().unwrap();
        for (field, at) in [(EndField::Bytes, 0), (EndField::Frames, 8), (EndField::Digest, 16)] {
            let mut record = EndRecord::decode(&end[FRAME_HEADER_LEN..]).encode();
            record[at] ^= 0x40;
            let header = FrameHeader::seal(FrameKind::End, 4, 2, &record);
            let forged = [frames.concat(), header.encode().to_vec(), record.to_vec()].concat();
            match decode_connection(&forged, &[4], 1024) {
                Err(StreamError::EndMismatch { device: 4, field: f, .. }) => assert_eq!(f, field),
                other => panic!("forged {field}: {other:?}"),
            }
        }
    }

    #[test]
    fn truncation_is_located() {
        let frames = encode_device(1, &[5; 3000], 1024).concat();
        let cut_in_payload = &frames[..FRAME_HEADER_LEN + 1024 + FRAME_HEADER_LEN + 10];
        assert!(matches!(
            decode_connection(cut_in_payload, &[1], 1024),
            Err(StreamError::Truncated {
                at: Truncation::InPayload { device: 1, sequence: 1, received: 10, length: 1024 },
                ..
            })
        ));
        let cut_in_header = &frames[..FRAME_HEADER_LEN + 1024 + 5];
        assert!(matches!(
            decode_connection(cut_in_header, &[1], 1024),
            Err(StreamError::Truncated { at: Truncation::InHeader { received: 5 }, .. })
        ));
        let cut_before_end = &frames[..frames.len() - FRAME_HEADER_LEN - END_RECORD_LEN];
        assert!(matches!(
            decode_connection(cut_before_end, &[1], 1024),
            Err(StreamError::Truncated { at: Truncation::BeforeEnd { device: 1, next_sequence: 3 }, .. })
        ));
    }

    #[test]
    fn keepalives_are_accepted_anywhere() {
        let keepalive = FrameHeader::keepalive().encode();
        let frames = encode_device(0, &[3; 1500], 1024);
        let stream = [&keepalive[..], &frames[0], &keepalive, &frames[1], &frames[2], &keepalive].concat();
        assert_eq!(decode_connection(&stream, &[0], 1024).unwrap()[0].bytes, 1500);
    }

    #[test]
    fn preamble_round_trip_and_refusals() {
        let expected = Preamble { job_id: "job-1".into(), token: vec![1, 2, 3, 4] };
        let check = |bytes: &[u8], connections: usize| -> Result<PreambleHead, PreambleError> {
            let raw_head: [u8; PREAMBLE_HEAD_LEN] = bytes[..PREAMBLE_HEAD_LEN].try_into().unwrap();
            let head = PreambleHead::parse(&raw_head)?;
            let body = &bytes[PREAMBLE_HEAD_LEN..];
            assert_eq!(body.len(), head.body_len());
            head.verify(&raw_head, body, &expected, connections).map(|()| head)
        };
        let good = encode_preamble(&expected, 2, 4).unwrap();
        let head = check(&good, 4).unwrap();
        assert_eq!((head.connection, head.connections), (2, 4));
        assert_eq!(check(&good, 3), Err(PreambleError::ConnectionCount { found: 4, expected: 3 }));

        let other_job =
            encode_preamble(&Preamble { job_id: "job-2".into(), ..expected.clone() }, 0, 4).unwrap();
        assert_eq!(check(&other_job, 4), Err(PreambleError::Job));
        let other_token =
            encode_preamble(&Preamble { token: vec![1, 2, 3, 5], ..expected.clone() }, 0, 4).unwrap();
        assert_eq!(check(&other_token, 4), Err(PreambleError::Token));
        let out_of_range = encode_preamble(&expected, 4, 4).unwrap();
        assert_eq!(check(&out_of_range, 4), Err(PreambleError::ConnectionIndex { index: 4, count: 4 }));

        let mut future = good.clone();
        future[8] = 2;
        assert_eq!(check(&future, 4), Err(PreambleError::Version { found: 2, supported: PROTOCOL_VERSION }));
        let mut stranger = good.clone();
        stranger[0] = b'G';
        assert!(matches!(check(&stranger, 4), Err(PreambleError::Magic { .. })));
        let mut flipped = good.clone();
        flipped[PREAMBLE_HEAD_LEN + 1] ^= 1;
        assert_eq!(check(&flipped, 4), Err(PreambleError::Checksum));
    }

    #[test]
    fn acks_round_trip() {
        let ok = encode_ack(None);
        assert_eq!(parse_ack_head(ok[..ACK_HEAD_LEN].try_into().unwrap()), Ok((true, 0)));
        let no = encode_ack(Some("bad token"));
        assert_eq!(parse_ack_head(no[..ACK_HEAD_LEN].try_into().unwrap()), Ok((false, 9)));
        assert_eq!(&no[ACK_HEAD_LEN..], b"bad token");
        assert!(parse_ack_head(b"HTTP/1").is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn streams_round_trip(devices in device_states(3 * MAX), max in 1usize..=MAX) {
            let stream = stream_of(&devices, max).concat();
            let summaries = decode_connection(&stream, &indices(&devices), max).unwrap();
            prop_assert_eq!(summaries.len(), devices.len());
            for ((device, state), summary) in devices.iter().zip(&summaries) {
                prop_assert_eq!(summary.index, *device);
                prop_assert_eq!(summary.bytes, state.len() as u64);
                prop_assert_eq!(summary.frames, state.len().div_ceil(max) as u64);
            }
            // What the decoder accepted is exactly what was encoded, in order.
            let mut decoder = ConnectionDecoder::new(0, 1, &indices(&devices), max);
            let mut rebuilt: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
            for frame in stream_of(&devices, max) {
                let header = decoder.header(frame[..FRAME_HEADER_LEN].try_into().unwrap()).unwrap();
                let payload = &frame[FRAME_HEADER_LEN..];
                if let Accepted::Data { device } = decoder.accept(&header, payload).unwrap() {
                    rebuilt.entry(device).or_default().extend_from_slice(payload);
                }
            }
            for (device, state) in &devices {
                prop_assert_eq!(rebuilt.remove(device).unwrap_or_default(), state.clone());
            }
        }

        #[test]
        fn every_single_bit_flip_is_detected(
            // Small states: every bit of one frame is flipped, each time decoding it all.
            devices in device_states(700),
            max in 64usize..=256,
            pick in any::<prop::sample::Index>(),
        ) {
            let frames = stream_of(&devices, max);
            let frame = pick.get(&frames);
            let offset = frames.iter().take_while(|f| !std::ptr::eq(*f, frame)).map(Vec::len).sum::<usize>();
            let clean = frames.concat();
            // Every bit of the chosen frame, header and payload alike.
            for bit in 0..frame.len() * 8 {
                let mut corrupt = clean.clone();
                corrupt[offset + bit / 8] ^= 1 << (bit % 8);
                prop_assert!(
                    decode_connection(&corrupt, &indices(&devices), max).is_err(),
                    "flip of bit {} in a frame went unnoticed", bit
                );
            }
        }

        #[test]
        fn a_flipped_payload_bit_is_a_checksum_error_of_that_frame(
            state in prop::collection::vec(any::<u8>(), 1..4 * MAX),
            pick in any::<prop::sample::Index>(),
        ) {
            let stream = encode_device(3, &state, MAX).concat();
            let target = pick.index(state.len());
            let (frame, within) = (target / MAX, target % MAX);
            let mut corrupt = stream;
            corrupt[frame * (FRAME_HEADER_LEN + MAX) + FRAME_HEADER_LEN + within] ^= 0x10;
            let err = decode_connection(&corrupt, &[3], MAX).unwrap_err();
            prop_assert!(
                matches!(err, StreamError::BadChecksum { device: 3, sequence, .. } if sequence == frame as u64),
                "{:?}", err
            );
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_connection(&bytes, &[0, 1], 256);
        }

        #[test]
        fn arbitrary_preambles_never_panic(bytes in prop::collection::vec(any::<u8>(), PREAMBLE_HEAD_LEN..64)) {
            let raw: [u8; PREAMBLE_HEAD_LEN] = bytes[..PREAMBLE_HEAD_LEN].try_into().unwrap();
            if let Ok(head) = PreambleHead::parse(&raw) {
                let expected = Preamble { job_id: "j".into(), token: vec![0] };
                let _ = head.verify(&raw, &bytes[PREAMBLE_HEAD_LEN..], &expected, 1);
            }
        }
    }
}
